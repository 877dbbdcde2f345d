"""The CIFAR-10 study's transfer stage (`cifar10_study.py --stages=transfer`): the paper's transfer
finding at CPU scale, under its protocol (`python -m simclr_tf.transfer`).

Encoders, all the main run's network (quarter-width ResNet-18, CIFAR stem, 32 px):
  simclr      the main run (flags/cifar10_main.cfg, 22 epochs)
  supervised  the same network trained on CIFAR-10's labels for the same 22 epochs
              (flags/cifar10_supervised.cfg, the learning rate of the supervised_lr stage)
  random      the same network randomly initialised (linear: frozen random features;
              fine-tuned: trained from scratch on the target)
Targets: the image folders of ../shared/data/transfer (CIFAR-100, Flowers-102, Caltech-101, a
10-class DTD), read at 32 px, the encoders' resolution, each under its preset's metric.
Protocols: linear with the paper's 45-value l2 grid; fine-tuned with a CPU schedule (SCHEDULE:
fewer steps, batch 128, a 3 x 2 grid of the paper's values, 2 seeds).
"""

from __future__ import annotations

import json
import os
import sys
import tarfile

import findings

TARGETS = {'cifar100': 'cifar100', 'flowers102': 'oxford_flowers102',
           'caltech101': 'caltech101', 'dtd10': 'dtd'}  # archive -> the preset it is scored as
SCHEDULE = ['--steps=1000', '--search_steps=500', '--batch_size=128',
            '--learning_rates=0.01,0.0316,0.1', '--weight_decays=0,0.0001', '--seeds=0,1']
SUPERVISED_EPOCHS = 22  # the main run's


def targets(archives: str, work: str) -> dict[str, str]:
    """name -> its image folder, extracted once into <work>/transfer_data."""
    root = os.path.join(work, 'transfer_data')
    found = {}
    for name in TARGETS:
        folder = os.path.join(root, name)
        if not os.path.isdir(os.path.join(folder, 'test')):
            with tarfile.open(os.path.join(archives, f'{name}.tar.gz')) as tar:
                tar.extractall(root, filter='data')
        found[name] = folder
    return found


def run(study, data: str, work: str, archives: str, simclr_dir: str, main: str,
        supervised_lr: float) -> dict:
    """The supervised encoder, then both protocols for each encoder and target; returns (and
    records as `transfer`) {encoder: {target: {protocol: record without predictions}}}."""
    python = sys.executable
    supervised_dir = os.path.join(work, f'supervised_{SUPERVISED_EPOCHS}ep')
    study.step(f'supervised_{SUPERVISED_EPOCHS}ep', findings.supervised_command(data) + [
        f'--train_epochs={SUPERVISED_EPOCHS}', f'--warmup_epochs={SUPERVISED_EPOCHS / 10:g}',
        f'--learning_rate={supervised_lr:g}', f'--model_dir={supervised_dir}'],
        os.path.join(supervised_dir, 'result.json'))
    encoders = {'simclr': ([f'--model={simclr_dir}'], main),
                'supervised': ([f'--model={supervised_dir}'], f'supervised_{SUPERVISED_EPOCHS}ep'),
                'random': ([f'--model={simclr_dir}', '--random_init'], main)}
    summary = {}
    for name, folder in targets(archives, work).items():
        for encoder, (model, after) in encoders.items():
            out = os.path.join(work, 'transfer', encoder, name)
            key = f'transfer_{encoder}_{name}'
            study.step(key, [python, '-m', 'simclr_tf.transfer', *model, f'--dataset={folder}',
                             f'--preset={TARGETS[name]}', f'--out={out}', *SCHEDULE],
                       collect=lambda out=out: records(out), after=(after,))
            summary.setdefault(encoder, {})[name] = study.record[key]['results']
    study.note('transfer', {'after': [main, f'supervised_{SUPERVISED_EPOCHS}ep'],
                            'rows': summary, 'linear_p_values': p_values(work)})
    return summary


def p_values(work: str) -> dict[str, float]:
    """target -> the paired permutation test's p-value of SimCLR against supervised, linear."""
    import numpy as np
    from simclr_tf.transfer import permutation_test
    found = {}
    for name in TARGETS:
        correct = []
        for encoder in ('simclr', 'supervised'):
            with open(os.path.join(work, 'transfer', encoder, name, 'linear.json')) as f:
                record = json.load(f)
            correct.append(np.array(record['predictions']) == np.array(record['labels']))
        found[name] = permutation_test(*correct)
    return found


def records(out: str) -> dict:
    """protocol -> its record, predictions kept apart (<out>/<protocol>.json keeps them)."""
    found = {}
    for protocol in ('linear', 'finetune'):
        with open(os.path.join(out, f'{protocol}.json')) as f:
            record = json.load(f)
        found[protocol] = {k: v for k, v in record.items() if k not in ('predictions', 'labels')}
    return found
