"""The CIFAR-10 study's few-label stage (`cifar10_study.py --stages=fewlabel`): SimCLR(v2)'s
semi-supervised finding at CPU scale, under one protocol.

For each label fraction (1 %, 10 %) and seed, the labelled set is a class-balanced, seeded
subset of the train images (`simclr_tf.data.balanced_subset`, as `--label_fraction`), of which a
class-balanced fifth is held out. Every row trains on the other four fifths (flags/
cifar10_fewlabel.cfg), is evaluated at each of its checkpoints on the held-out fifth and on the
test split, and reports test top-1 at the checkpoint best on the held-out part (early stopping;
the test split never chooses anything):
  supervised  the same encoder from scratch (train_mode=supervised), learning rate chosen from
              SUPERVISED_LRS on the held-out part of seed 0's labels, then kept for other seeds
              (a row of seed 0 whose best checkpoint is its last, here or below, also runs once
              at twice the epochs: how far the budget held it back);
  finetune    the main pretrained run fine-tuned from h (ft_proj_selector=0) and from the
              projection head's first layer (=1, SimCLRv2), at the fixed FINETUNE_LR;
  distill     the latter as teacher, distilled into the same architecture (initialised from the
              main run, as the fine-tuned teacher was) on all 50,000 train images, labels unused;
              evaluated once at its end.
"""

import json
import os
import shutil
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRACTIONS = (0.01, 0.1)
HELD_OUT = 0.2  # of the labelled set: early stopping and the learning-rate choice
SUPERVISED_LRS = (0.1, 0.3, 1.0)  # x batch / 256; momentum SGD
SUPERVISED_WEIGHT_DECAY = 5e-4  # from scratch on few images: the usual CIFAR regulariser
FINETUNE_LR = 0.1  # x batch / 256; no weight decay, as the authors' fine-tuning
EPOCHS = {  # over the labelled four fifths; from scratch needs more passes than fine-tuning
    'supervised': {0.01: 300, 0.1: 40},
    'finetune': {0.01: 60, 0.1: 30},
}
CHECKPOINTS = 6  # per run: the candidates of early stopping
SELECTORS = {'h': 0, 'proj1': 1}


def labelled_folder(data: str, work: str, fraction: float, seed: int) -> str:
    """<work>/labels_<pct>_s<seed>/{train,heldout}/<class>/ (links to the labelled images) and
    test (a link to the test split): the labelled set split four fifths / one fifth."""
    sys.path.insert(0, REPO)
    from simclr_tf.data import balanced_subset
    root = os.path.join(work, f'labels_{fraction * 100:g}pct_s{seed}')
    if os.path.isdir(os.path.join(root, 'heldout')):
        return root
    classes = sorted(os.listdir(os.path.join(data, 'train')))
    paths = [os.path.join(data, 'train', c, f) for c in classes
             for f in sorted(os.listdir(os.path.join(data, 'train', c)))]
    labels = np.array([classes.index(p.split(os.sep)[-2]) for p in paths])
    chosen = balanced_subset(labels, fraction, seed)
    held = set(chosen[balanced_subset(labels[chosen], HELD_OUT, seed)])
    tmp = root + '.tmp'
    shutil.rmtree(tmp, ignore_errors=True)
    for i in chosen:
        split = 'heldout' if i in held else 'train'
        os.makedirs(os.path.join(tmp, split, classes[labels[i]]), exist_ok=True)
        os.symlink(paths[i], os.path.join(tmp, split, classes[labels[i]],
                                          os.path.basename(paths[i])))
    os.symlink(os.path.join(data, 'test'), os.path.join(tmp, 'test'))
    os.rename(tmp, root)
    return root


def eval_copy(run_dir: str, split: str, step: int = None) -> str:
    """<run_dir>.<split>: the run's config and checkpoints (all, or the one of `step`; hard
    links), for `--mode=eval` on another split (a model_dir keeps one result per step)."""
    target = f'{run_dir}.{split}'
    os.makedirs(target, exist_ok=True)
    prefix = 'ckpt-' if step is None else f'ckpt-{step}.'
    for name in os.listdir(run_dir):
        if name.startswith(prefix) or name == 'config.json':
            if not os.path.exists(os.path.join(target, name)):
                os.link(os.path.join(run_dir, name), os.path.join(target, name))
    return target


def accuracies(model_dir: str) -> dict[int, float]:
    """step -> eval top-1 of every result_<step>.json in model_dir."""
    found = {}
    for name in os.listdir(model_dir):
        if name.startswith('result_') and name.endswith('.json'):
            with open(os.path.join(model_dir, name)) as f:
                result = json.load(f)
            found[int(result['global_step'])] = result['eval/label_top_1_accuracy']
    return dict(sorted(found.items()))


def trained_and_evaluated(study, name: str, argv: list[str], run_dir: str) -> dict:
    """Trains (argv, --mode=train), evaluates every checkpoint on the held-out part and the best
    of them on test; returns {'heldout': {step: top-1}, 'best_step': ..., 'test': its top-1}."""
    study.step(name, argv + [f'--model_dir={run_dir}'])
    result = {}
    for split in ('heldout', 'test'):  # the test split only at the held-out's best step
        copy = eval_copy(run_dir, split, result.get('best_step'))
        # eval_timeout: the test copy's one checkpoint is not the run's last, which mode=eval
        # would otherwise wait for.
        study.step(f'{name}_{split}', argv + [f'--model_dir={copy}', '--mode=eval',
                                              f'--eval_split={split}', '--eval_timeout=1'],
                   collect=lambda copy=copy: accuracies(copy), after=(name,))
        curve = {int(k): v for k, v in study.record[f'{name}_{split}']['results'].items()}
        if split == 'heldout':
            result = {'heldout': curve,
                      'best_step': max(curve, key=lambda step: (curve[step], -step))}
        else:
            result['test'] = curve[result['best_step']]
    return result


def run(study, data: str, work: str, simclr_dir: str, main: str, seeds: tuple[int, ...],
        distill_epochs: float, supervised_only: bool = False) -> dict:
    """Every row at both fractions and each seed; returns (and records) the summary.
    `supervised_only`: the rows that need no pretraining (they may run beside it)."""
    python = sys.executable
    base = [python, 'run.py', '--flagfile=flags/cifar10_fewlabel.cfg']
    summary = {}
    for fraction in FRACTIONS:
        pct = f'{fraction * 100:g}pct'
        chosen_lr = None
        for seed in seeds:
            folder = labelled_folder(data, work, fraction, seed)
            n = sum(len(files) for _, _, files in os.walk(os.path.join(folder, 'train')))
            runs = {}

            def steps(kind, times=1):
                total = -(-times * EPOCHS[kind][fraction] * n // 128)
                return [f'--train_steps={total}', f'--checkpoint_steps={-(-total // CHECKPOINTS)}']

            common = base + [f'--dataset={folder}', f'--seed={seed}']
            lrs = SUPERVISED_LRS if chosen_lr is None else (chosen_lr,)
            for lr in lrs:
                name = f'fewlabel_{pct}_s{seed}_supervised_lr{lr:g}'
                runs[f'supervised_lr{lr:g}'] = trained_and_evaluated(
                    study, name, common + ['--train_mode=supervised', f'--learning_rate={lr:g}',
                                           f'--weight_decay={SUPERVISED_WEIGHT_DECAY:g}']
                    + steps('supervised'), os.path.join(work, name))
            if chosen_lr is None:  # seed 0's held-out part chooses, once
                chosen_lr = max(lrs, key=lambda lr: max(
                    runs[f'supervised_lr{lr:g}']['heldout'].values()))
            runs['supervised'] = runs[f'supervised_lr{chosen_lr:g}']
            # A row of seed 0 still improving at its last checkpoint runs once more at twice
            # the epochs: how far the budget held it back.
            if seed == seeds[0] and runs['supervised']['best_step'] == max(
                    runs['supervised']['heldout']):
                name = f'fewlabel_{pct}_s{seed}_supervised_lr{chosen_lr:g}_x2'
                runs['supervised_x2'] = trained_and_evaluated(
                    study, name, common + ['--train_mode=supervised',
                                           f'--learning_rate={chosen_lr:g}',
                                           f'--weight_decay={SUPERVISED_WEIGHT_DECAY:g}']
                    + steps('supervised', 2), os.path.join(work, name))
            if supervised_only:
                continue
            for variant, selector in SELECTORS.items():
                name = f'fewlabel_{pct}_s{seed}_finetune_{variant}'
                flags = common + [
                    '--train_mode=finetune', f'--checkpoint={simclr_dir}',
                    '--zero_init_logits_layer=True', f'--ft_proj_selector={selector}',
                    f'--learning_rate={FINETUNE_LR:g}', '--weight_decay=0']
                row = runs[f'finetune_{variant}'] = trained_and_evaluated(
                    study, name, flags + steps('finetune'), os.path.join(work, name))
                if seed == seeds[0] and row['best_step'] == max(row['heldout']):
                    runs[f'finetune_{variant}_x2'] = trained_and_evaluated(
                        study, name + '_x2', flags + steps('finetune', 2),
                        os.path.join(work, name + '_x2'))
            teacher = runs['finetune_proj1']
            name = f'fewlabel_{pct}_s{seed}_distill'
            model_dir = os.path.join(work, name)
            study.step(name, base + [
                f'--dataset={data}', f'--seed={seed}', '--train_mode=distill',
                f'--teacher={work}/fewlabel_{pct}_s{seed}_finetune_proj1/'
                f'ckpt-{teacher["best_step"]}',
                f'--checkpoint={simclr_dir}', '--zero_init_logits_layer=True',
                f'--ft_proj_selector={SELECTORS["proj1"]}', f'--learning_rate={FINETUNE_LR:g}',
                '--weight_decay=0', f'--train_epochs={distill_epochs:g}', '--checkpoint_epochs=1',
                '--mode=train_then_eval', f'--model_dir={model_dir}'],
                os.path.join(model_dir, 'result.json'), after=(f'{name[:-8]}_finetune_proj1',))
            runs['distill'] = {'test': study.record[name]['result']['eval/label_top_1_accuracy']}
            summary[f'{pct}_s{seed}'] = {
                'labelled_train': n, 'supervised_lr': chosen_lr,
                **{row: r['test'] for row, r in runs.items() if not row.startswith('supervised_lr')},
                'best_steps': {row: r['best_step'] for row, r in runs.items() if 'best_step' in r}}
    if not supervised_only:
        study.note('fewlabel', {'after': main, 'rows': summary})
    return summary


def table(summary: dict) -> str:
    """Markdown: test top-1 per row and fraction, mean ± half the range over seeds."""
    rows = ('supervised', 'supervised_x2', 'finetune_h', 'finetune_h_x2', 'finetune_proj1',
            'finetune_proj1_x2', 'distill')
    lines = ['| CIFAR-10 test top-1 | 1 % labels | 10 % labels |', '|---|---|---|']
    for row in rows:
        cells = []
        for pct in ('1pct', '10pct'):
            values = [v[row] for k, v in summary.items() if k.startswith(pct + '_') and row in v]
            cells.append(f'{np.mean(values):.3f} ± {(max(values) - min(values)) / 2:.3f} '
                         f'({len(values)} seeds)' if values else '-')
        lines.append(f'| {row} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)
