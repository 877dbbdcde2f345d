"""The CIFAR-10 study: SimCLR within an hour on a 2-core CPU vs. two baselines, and the paper's
augmentation study at a smaller scale. Every step is a command a user could type; this script
runs them in order, times them and records commands and results in one JSON file.

    python bench/cifar10_study.py --data=../shared/data/cifar10-jpg.tar.gz --work=/tmp/study \\
        [--stages=pretrain,curve,probe,augment] [--out=bench/results/cifar10_study.json]

Stages:
  pretrain  run.py --flagfile=flags/cifar10_study.cfg (train_then_eval: linear head + kNN, export)
  curve     run.py --mode=eval on the kept checkpoints: kNN / linear-head accuracy over steps
  probe     python -m simclr_tf.probe on the SimCLR checkpoint, the same encoder randomly
            initialised, and raw pixels: kNN k=200 and k=20, offline linear classifier
  augment   pretraining for --augment_steps with crop,flip,color / crop,flip / color, each probed
            (kNN and linear fitted on --augment_probe_split)
The data (a tar.gz of train|test/<class>/*.jpg, or that folder) is extracted next to --work.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import tarfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUGMENTATION_SETS = ('crop,flip,color', 'crop,flip', 'color')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--data', required=True, help='cifar10-jpg.tar.gz or its extracted folder')
    parser.add_argument('--work', default='/tmp/simclr_study')
    parser.add_argument('--stages', default='pretrain,curve,probe,augment')
    parser.add_argument('--augment_steps', type=int, default=195,
                        help='pretraining steps of each augmentation run (195: half an epoch)')
    parser.add_argument('--augment_probe_split', default='train[:10000]',
                        help='train split the augmentation arms are probed with')
    parser.add_argument('--out', default=os.path.join(REPO, 'bench', 'results',
                                                      'cifar10_study.json'))
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    data = dataset_folder(args.data, args.work)
    record = json.load(open(args.out)) if os.path.exists(args.out) else {}

    def step(name: str, argv: list[str], result_file: str = None) -> None:
        command = ' '.join(map(shlex.quote, argv))
        print(f'== {name}: {command}', flush=True)
        t0 = time.time()
        proc = subprocess.run(argv, cwd=REPO, text=True, stdout=subprocess.PIPE)
        if proc.returncode:
            sys.exit(f'{name} failed (exit {proc.returncode}): {command}')
        entry = {'command': command.replace(data, '<cifar10>').replace(args.work, '<work>'),
                 'wall_minutes': round((time.time() - t0) / 60, 2)}
        if result_file:
            entry['result'] = json.load(open(result_file))
        record[name] = entry
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, 'w') as f:
            json.dump(record, f, indent=2, sort_keys=True)
        print(json.dumps(entry), flush=True)

    python = sys.executable
    simclr_dir = os.path.join(args.work, 'simclr')
    run = [python, 'run.py', '--flagfile=flags/cifar10_study.cfg', f'--dataset={data}']
    stages = args.stages.split(',')
    if 'pretrain' in stages:
        step('pretrain', run + [f'--model_dir={simclr_dir}'],
             os.path.join(simclr_dir, 'result.json'))
    if 'curve' in stages:
        step('curve', run + [f'--model_dir={simclr_dir}', '--mode=eval'])
        record['curve']['results'] = sorted(
            (json.load(open(os.path.join(simclr_dir, f))) for f in os.listdir(simclr_dir)
             if f.startswith('result_')), key=lambda r: r['global_step'])
    if 'probe' in stages:
        probe = [python, '-m', 'simclr_tf.probe', f'--dataset={data}']
        for name, extra in (('probe_simclr', [f'--model={simclr_dir}']),
                            ('probe_random_init', [f'--model={simclr_dir}', '--random_init']),
                            ('probe_pixels', ['--pixels', '--image_size=32'])):
            out = os.path.join(args.work, f'{name}.json')
            step(name, probe + extra + [f'--out={out}'], out)
    if 'augment' in stages:
        for augmentations in AUGMENTATION_SETS:
            name = 'augment_' + augmentations.replace(',', '_')
            model_dir = os.path.join(args.work, name)
            step(name, run + [f'--model_dir={model_dir}', f'--augmentations={augmentations}',
                              f'--train_steps={args.augment_steps}', '--mode=train'])
            out = os.path.join(args.work, f'probe_{name}.json')
            step('probe_' + name, [python, '-m', 'simclr_tf.probe', f'--dataset={data}',
                                   f'--model={model_dir}', f'--out={out}',
                                   f'--train_split={args.augment_probe_split}'], out)
    with open(args.out, 'w') as f:
        json.dump(record, f, indent=2, sort_keys=True)


def dataset_folder(path: str, work: str) -> str:
    """The image folder: `path` itself, or where its tar.gz is extracted (once)."""
    if os.path.isdir(path):
        return os.path.abspath(path)
    target = os.path.join(work, 'cifar10')
    if not os.path.isdir(os.path.join(target, 'train')):
        with tarfile.open(path) as tar:
            names = tar.getnames()
            top = os.path.commonpath(names) if len(names) > 1 else ''
            tar.extractall(target if not top else work, filter='data')
        if top and top != 'cifar10':
            os.rename(os.path.join(work, top), target)
    return target


if __name__ == '__main__':
    main()
