"""The README's result plots from a study's model_dir and its JSON record.

    pip install matplotlib==3.11.2
    python bench/plots.py --model_dir=/tmp/simclr_study/simclr \\
        --study=bench/results/cifar10_study.json --out=docs

Writes docs/cifar10_training.png (training loss, contrastive accuracy, kNN and linear-head
accuracy over steps, from the TensorBoard events and result_<step>.json files) and
docs/cifar10_augmentations.png (the augmentation study) and prints the Markdown tables.
"""

import argparse
import glob
import json
import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


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
    for key, label in (('eval/knn_top_1_accuracy', 'kNN k=200'),
                       ('eval/label_top_1_accuracy', 'linear head (stop-gradient)')):
        axes[2].plot(steps, [r[key] for r in curve], marker='o', label=label)
    for name, label, style in (('probe_random_init', 'random-init encoder, kNN', ':'),
                               ('probe_pixels', 'raw pixels, kNN', '--')):
        if name in study:
            axes[2].axhline(study[name]['result']['knn200_top_1_accuracy'], ls=style, c='grey',
                            label=label)
    axes[2].set_title('CIFAR-10 test top-1')
    axes[2].set_xlabel('step')
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def augmentation_plot(study: dict, path: str) -> list[str]:
    names = sorted(k for k in study if k.startswith('probe_augment_'))
    labels = [n[len('probe_augment_'):].replace('_', '+') for n in names]
    knn = [study[n]['result']['knn200_top_1_accuracy'] for n in names]
    linear = [study[n]['result']['linear_top_1_accuracy'] for n in names]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.bar(x - 0.2, knn, 0.4, label='kNN k=200')
    ax.bar(x + 0.2, linear, 0.4, label='linear')
    ax.set_xticks(x, labels)
    ax.set_ylabel('CIFAR-10 test top-1')
    ax.set_title('augmentations of a view (same budget each)')
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return [f'| {l} | {k:.3f} | {v:.3f} |' for l, k, v in zip(labels, knn, linear)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model_dir', required=True)
    parser.add_argument('--study', required=True)
    parser.add_argument('--out', default='docs')
    args = parser.parse_args()
    study = json.load(open(args.study))
    os.makedirs(args.out, exist_ok=True)
    training_plot(args.model_dir, study, os.path.join(args.out, 'cifar10_training.png'))
    print('| features | kNN k=200 | kNN k=20 | linear |')
    for name in ('probe_simclr', 'probe_random_init', 'probe_pixels'):
        if name in study:
            r = study[name]['result']
            print(f'| {name[6:]} | {r["knn200_top_1_accuracy"]:.3f} | '
                  f'{r["knn20_top_1_accuracy"]:.3f} | {r["linear_top_1_accuracy"]:.3f} |')
    if any(k.startswith('probe_augment_') for k in study):
        print('| augmentations | kNN k=200 | linear |')
        print('\n'.join(augmentation_plot(study, os.path.join(args.out,
                                                               'cifar10_augmentations.png'))))


if __name__ == '__main__':
    main()
