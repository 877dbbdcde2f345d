"""The README's result plots and tables from a study's model_dir and its JSON record.

    pip install matplotlib==3.11.2
    python bench/plots.py --model_dir=/tmp/simclr_study/simclr \\
        --study=bench/results/cifar10_study.json --out=docs

Writes docs/cifar10_training.png (the main run: training loss, contrastive accuracy, and test
accuracy over steps from the TensorBoard events and result_<step>.json files, with the
baselines; only when --model_dir holds the main run's events) and docs/cifar10_<stage>.png,
one chart per ablation stage of the record's arms, and prints the Markdown tables.
"""

import argparse
import glob
import json
import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

H, Z = 'final_avg_pool', 'proj_head_output'
KNN_COLUMNS = (('knn200_top_1_accuracy', 'kNN k=200'),
               ('knn200_centred_top_1_accuracy', 'kNN k=200 centred'),
               ('knn20_top_1_accuracy', 'kNN k=20'),
               ('knn20_centred_top_1_accuracy', 'kNN k=20 centred'))
COLUMNS = KNN_COLUMNS + (('linear_top_1_accuracy', 'linear'),)
BASELINES = (('probe_simclr', 'SimCLR (main run)'), ('probe_random_init', 'same encoder, random init'),
             ('probe_pixels', 'raw pixels'))


def scalars(model_dir: str, tags: tuple[str, ...]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) of each tag in model_dir's own event files (not eval's)."""
    import tensorflow as tf
    out = {t: [] for t in tags}
    for path in sorted(glob.glob(os.path.join(model_dir, 'events.out.tfevents.*'))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag in out:
                    out[value.tag].append((event.step, float(tf.make_ndarray(value.tensor))))
    return {t: sorted(dict(v).items()) for t, v in out.items()}


def best_knn(result: dict) -> float:
    """The best of the weighted kNN variants: k = 200 or 20, plain or centred."""
    return max(result.get(key, 0.0) for key, _ in KNN_COLUMNS)


def training_plot(model_dir: str, study: dict, path: str) -> None:
    train = scalars(model_dir, ('train/contrast_loss', 'train/contrast_acc'))
    curve = study.get('curve', {}).get('results', [])
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, tag, title in ((axes[0], 'train/contrast_loss', 'NT-Xent loss (train)'),
                           (axes[1], 'train/contrast_acc', 'contrastive accuracy (train)')):
        steps, values = zip(*train[tag]) if train[tag] else ((), ())
        ax.plot(steps, values, lw=1)
        ax.set_title(title)
        ax.set_xlabel('step')
    steps = [r['global_step'] for r in curve]
    for key, label in (('eval/knn_top_1_accuracy', 'kNN k=200 (10k train bank)'),
                       ('eval/label_top_1_accuracy', 'linear head (stop-gradient)')):
        axes[2].plot(steps, [r[key] for r in curve], marker='o', label=label)
    for name, label, style in (('probe_pixels', 'raw pixels, best kNN', '--'),
                               ('probe_pixels', 'raw pixels, linear', '-.'),
                               ('probe_random_init', 'random init, linear', ':')):
        if name in study:
            r = study[name]['result']
            value = best_knn(r) if 'kNN' in label else r['linear_top_1_accuracy']
            axes[2].axhline(value, ls=style, c='grey', label=label)
    axes[2].set_title('CIFAR-10 test top-1')
    axes[2].set_xlabel('step')
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(rows: list[tuple[str, dict]]) -> list[str]:
    lines = ['| features | ' + ' | '.join(c[1] for c in COLUMNS) + ' |',
             '|---' * (len(COLUMNS) + 1) + '|']
    for label, r in rows:
        lines.append(f'| {label} | ' + ' | '.join(
            f'{r[k]:.3f}' if k in r else '–' for k, _ in COLUMNS) + ' |')
    return lines


def ablation_plot(stage: str, arms: list[tuple[str, str, dict]], path: str) -> None:
    """Bars of best kNN and linear accuracy for each (arm, output) of one stage."""
    labels = [f'{arm}' + (' (z)' if output == Z else '') for arm, output, _ in arms]
    knn = [best_knn(r) for _, _, r in arms]
    linear = [r['linear_top_1_accuracy'] for _, _, r in arms]
    x = np.arange(len(arms))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.0 * len(arms)), 3.4))
    for offset, values, label in ((-0.2, knn, 'kNN (best of k=20/200, plain/centred)'),
                                  (0.2, linear, 'linear')):
        bars = ax.bar(x + offset, values, 0.4, label=label)
        ax.bar_label(bars, fmt='%.3f', fontsize=6, padding=1)
    # The arms differ by points, not tens of points: zoom in on the range they span.
    ax.set_ylim(max(0.0, min(knn + linear) - 0.05), max(knn + linear) + 0.04)
    ax.set_xticks(x, labels, rotation=30 if len(arms) > 5 else 0, ha='right' if len(arms) > 5
                  else 'center', fontsize=8)
    ax.set_ylabel('CIFAR-10 test top-1')
    ax.set_title(f'{stage}: the same budget each; recipe and seed as the arm says', fontsize=10)
    ax.legend(fontsize=7, loc='upper right', ncols=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model_dir', default=None,
                        help="the main run's model_dir (for its training plot)")
    parser.add_argument('--study', required=True)
    parser.add_argument('--out', default='docs')
    args = parser.parse_args()
    study = json.load(open(args.study))
    os.makedirs(args.out, exist_ok=True)
    if 'curve' in study and args.model_dir and glob.glob(
            os.path.join(args.model_dir, 'events.out.tfevents.*')):
        training_plot(args.model_dir, study, os.path.join(args.out, 'cifar10_training.png'))
    else:
        print('training plot not redrawn: no --model_dir with the main run\'s events')
    print('\n'.join(table([(label, study[name]['result']) for name, label in BASELINES
                           if name in study])))
    stages: dict[str, list] = {}
    for arm, entry in study.get('arms', {}).items():
        for output, probe in entry['probes'].items():
            if probe in study:
                stages.setdefault(entry['stage'], []).append(
                    (arm, output, study[probe]['result']))
    for stage, arms in stages.items():
        print(f'\n{stage}:')
        print('\n'.join(table([(arm + (' (z)' if output == Z else ''), r)
                               for arm, output, r in arms])))
        ablation_plot(stage, arms, os.path.join(args.out, f'cifar10_{stage}.png'))
    import findings_plots
    for stage, (table_of, plot) in findings_plots.TABLES.items():
        if stage in study.get('findings', {}):
            print(f'\n{stage}:')
            print('\n'.join(table_of(study)))
            if plot:
                plot(study, os.path.join(args.out, f'cifar10_{stage}.png'))


if __name__ == '__main__':
    main()
