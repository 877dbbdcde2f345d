"""The CIFAR-10 study: SimCLR on a 2-core CPU vs. two baselines, and the paper's ablations at a
smaller scale. Every step is a command a user could type; this script runs them in order, times
them and records commands, wall times and results in one JSON file.

    python bench/cifar10_study.py --data=../shared/data/cifar10-jpg.tar.gz --work=/tmp/study \\
        [--stages=pretrain,curve,probe,head,loss,temperature,color,augment] \\
        [--out=bench/results/cifar10_study.json]

Stages:
  pretrain     run.py --flagfile=flags/cifar10_main.cfg (the 90-minute main run; train_then_eval:
               linear head + kNN, export)
  curve        run.py --mode=eval on the kept checkpoints: kNN / linear-head accuracy over steps
  probe        python -m simclr_tf.probe on the SimCLR checkpoint and the same encoder randomly
               initialised: kNN (plain and mean-centred) and the linear classifier
  pixels       the same probe on raw pixels
  head         projection head none / linear / nonlinear, each probed on h and on z (Figure 8)
  loss         NT-Xent / NT-Logistic / margin triplet, each over a small temperature or margin
               sweep (Table 2)
  temperature  NT-Xent at temperature 0.1 / 0.5 / 1.0 (Table 5)
  color        colour-distortion strength 0 / 0.25 / 0.5 / 1.0 (Table 1; 0 = no colour op)
  augment      crop+flip+colour / crop+flip / colour only (Figure 5)
  seed         the recipe again with another seed: how far one seed's arms move by chance
  precision    the recipe (float32) and the same under --mixed_precision=bfloat16
  fewlabel     1 % and 10 % of the labels: supervised from scratch, the main run fine-tuned from
               h and from the projection head's first layer, and that distilled on every image
               (bench/fewlabel.py; fewlabel_supervised: its rows that need no main run)
  head_long, color_long, batch, width, supervised_lr
               the findings one epoch is too short for: the head (Figure 8) and colour strength
               at 8 epochs, batch size x epochs (Figure 9), model width against supervised
               training (Figure 7); arms of the main run's recipe (bench/findings.py)
  transfer     the main run, the same network trained supervised and randomly initialised,
               transferred to CIFAR-100, Flowers-102, Caltech-101 and DTD (10 classes), linear
               and fine-tuned (bench/transfer_study.py; --transfer_data)
Every ablation arm pretrains for --arm_steps with the study's flags and seed, then is probed with
kNN and linear fitted on --arm_probe_split and tested on the whole test split.

Rerunning resumes: a step whose command already has a result in --out (after the same run, for
an evaluation) is skipped, and a pretraining step that was interrupted continues from the
checkpoints in its model_dir. Drivers of different stages may run at once on one --out.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also when run through runpy
import fewlabel  # noqa: E402
import findings  # noqa: E402
import transfer_study  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Ablation arms: stage -> [(arm name, extra run.py flags, outputs to probe)].
H, Z = 'final_avg_pool', 'proj_head_output'
ABLATIONS = {
    'head': [(f'head_{mode}', [f'--proj_head_mode={mode}'], (H, Z))
             for mode in ('none', 'linear', 'nonlinear')],
    'loss': ([(f'loss_nt_xent_t{t}', [f'--temperature={t}'], (H,)) for t in (0.1, 0.5, 1.0)]
             + [(f'loss_nt_logistic_t{t}', ['--contrastive_loss=nt_logistic', f'--temperature={t}'],
                 (H,)) for t in (0.1, 0.5, 1.0)]
             + [(f'loss_margin_triplet_m{m}', ['--contrastive_loss=margin_triplet', f'--margin={m}'],
                 (H,)) for m in (0.2, 0.5, 1.0)]),
    'temperature': [(f'temperature_{t}', [f'--temperature={t}'], (H,)) for t in (0.1, 0.5, 1.0)],
    'color': [(f'color_{s}', [f'--color_jitter_strength={s}'], (H,))
              for s in (0.0, 0.25, 0.5, 1.0)],
    'augment': [('augment_' + a.replace(',', '_'), [f'--augmentations={a}'], (H,))
                for a in ('crop,flip,color', 'crop,flip', 'color')],
    'seed': [('seed_1', ['--seed=1'], (H, Z))],
    # float32 (the recipe) against bfloat16, same seed and steps: within the seed spread?
    'precision': [(f'precision_{p}', [f'--mixed_precision={p}'], (H,))
                  for p in ('none', 'bfloat16')],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--data', required=True, help='cifar10-jpg.tar.gz or its extracted folder')
    parser.add_argument('--work', default='/tmp/simclr_study')
    parser.add_argument('--stages', default='pretrain,curve,probe,pixels,' + ','.join(ABLATIONS))
    parser.add_argument('--main_flagfile', default='flags/cifar10_main.cfg',
                        help='the main run (pretrain, curve, probe stages)')
    parser.add_argument('--main_epochs', type=float, default=None,
                        help='pretrain the main run for this many epochs instead of its '
                        "flagfile's (warmup 10 %% of them), into <work>/simclr_<n>ep: a shorter "
                        'budget for the stages built on it')
    parser.add_argument('--flagfile', default='flags/cifar10_study.cfg',
                        help='the recipe every ablation arm starts from (arms add their flags)')
    parser.add_argument('--arm_steps', type=int, default=390,
                        help='pretraining steps of each ablation arm (390: one epoch at batch 128)')
    parser.add_argument('--arm_probe_split', default='train[:10000]',
                        help='train split the ablation arms are probed with')
    parser.add_argument('--fewlabel_seeds', default='0,1',
                        help='fewlabel: seeds of the labelled subsets (and runs); the first '
                        "one's held-out part chooses the supervised learning rate")
    parser.add_argument('--distill_epochs', type=float, default=3,
                        help='fewlabel: epochs of distillation over the 50,000 train images')
    parser.add_argument('--transfer_data', default=os.path.join(REPO, '..', 'shared', 'data',
                                                                'transfer'),
                        help='transfer: the folder of cifar100/flowers102/caltech101/dtd10.tar.gz')
    parser.add_argument('--out', default=os.path.join(REPO, 'bench', 'results',
                                                      'cifar10_study.json'))
    args = parser.parse_args()
    unknown = set(args.stages.split(',')) - {'pretrain', 'curve', 'probe', 'pixels', 'fewlabel',
                                             'fewlabel_supervised', 'supervised_lr', 'transfer',
                                             *findings.STAGES, *ABLATIONS}
    if unknown:
        parser.error(f'unknown stages: {", ".join(sorted(unknown))}')
    os.makedirs(args.work, exist_ok=True)
    data = dataset_folder(args.data, args.work)
    study = Study(args.out, data, args.work)
    python = sys.executable
    main_run = [python, 'run.py', f'--flagfile={args.main_flagfile}', f'--dataset={data}']
    run = [python, 'run.py', f'--flagfile={args.flagfile}', f'--dataset={data}']
    probe = [python, '-m', 'simclr_tf.probe', f'--dataset={data}']
    simclr_dir, main = os.path.join(args.work, 'simclr'), 'pretrain'
    if args.main_epochs:
        simclr_dir += f'_{args.main_epochs:g}ep'
        main += f'_{args.main_epochs:g}ep'
        main_run += [f'--train_epochs={args.main_epochs:g}',
                     f'--warmup_epochs={args.main_epochs / 10:g}']
    stages = args.stages.split(',')
    if 'pretrain' in stages:
        study.step(main, main_run + [f'--model_dir={simclr_dir}'],
                   os.path.join(simclr_dir, 'result.json'))
    if 'curve' in stages:
        study.step('curve', main_run + [f'--model_dir={simclr_dir}', '--mode=eval'],
                   collect=lambda: sorted(
                       (json.load(open(os.path.join(simclr_dir, f))) for f in os.listdir(simclr_dir)
                        if f.startswith('result_')), key=lambda r: r['global_step']),
                   after=(main,))
    if 'probe' in stages:
        for name, extra in (('probe_simclr', [f'--model={simclr_dir}']),
                            ('probe_random_init', [f'--model={simclr_dir}', '--random_init'])):
            out = os.path.join(args.work, f'{name}.json')
            study.step(name, probe + extra + [f'--out={out}'], out, after=(main,))
    if 'pixels' in stages:
        out = os.path.join(args.work, 'probe_pixels.json')
        study.step('probe_pixels', probe + ['--pixels', '--image_size=32', f'--out={out}'], out)
    for stage in ('fewlabel_supervised', 'fewlabel'):
        if stage in stages:
            seeds = tuple(int(s) for s in args.fewlabel_seeds.split(','))
            summary = fewlabel.run(study, data, args.work, simclr_dir, main, seeds,
                                   args.distill_epochs, supervised_only=stage != 'fewlabel')
            if stage == 'fewlabel':
                print(fewlabel.table(summary), flush=True)
    findings.run(study, stages, data, args.work, args.main_flagfile)
    if 'transfer' in stages:
        lr = findings.supervised_lr(study, findings.supervised_command(data), args.work)
        transfer_study.run(study, data, args.work, args.transfer_data, simclr_dir, main, lr)
    recipe = flagfile_values(os.path.join(REPO, args.flagfile))
    for stage, arms in ABLATIONS.items():
        if stage not in stages:
            continue
        for name, extra, outputs in arms:
            changed, train = arm_run(extra, recipe)
            model_dir = os.path.join(args.work, train)
            study.step(train, run + [f'--model_dir={model_dir}', f'--train_steps={args.arm_steps}',
                                     '--mode=train', *changed])
            probes = {}
            for output in outputs:
                probes[output] = f'probe_{train}' + ('' if output == H else '_z')
                out = os.path.join(args.work, f'{probes[output]}.json')
                study.step(probes[output], probe + [
                    f'--model={model_dir}', f'--output={output}',
                    f'--train_split={args.arm_probe_split}', f'--out={out}'], out, after=(train,))
            # The index of arms, updated arm by arm and merged: other drivers may add theirs.
            study.note('arms', {**study.record.get('arms', {}),
                                name: {'stage': stage, 'train': train, 'probes': probes}})


def arm_run(extra: list[str], recipe: dict[str, str]) -> tuple[list[str], str]:
    """The flags an arm changes from the recipe, and the name of its training run. Arms that
    differ from the recipe only in values it already has (temperature 0.5 in the temperature,
    loss and colour stages) are one run, trained and probed once."""
    changed = [f for f in extra if recipe.get(f.split('=')[0]) != f.split('=', 1)[1]]
    return changed, 'arm_' + ('_'.join(f.lstrip('-').replace('=', '_').replace(',', '_')
                                       for f in changed) or 'recipe')


def flagfile_values(path: str) -> dict[str, str]:
    """'--name' -> value of each --name=value line of a flagfile."""
    lines = (line.strip() for line in open(path))
    return dict(line.split('=', 1) for line in lines if line.startswith('--') and '=' in line)


class Study:
    """The record file: one entry per step (command, wall time, result), written after each."""

    def __init__(self, path: str, data: str, work: str):
        self.path, self.data, self.work = path, data, work

    @property
    def record(self) -> dict:
        # Read afresh each time: drivers of other stages may run at the same time.
        return json.load(open(self.path)) if os.path.exists(self.path) else {}

    def step(self, name: str, argv: list[str], result_file: str = None, collect=None,
             after: tuple[str, ...] = ()) -> None:
        """Runs `argv` unless the record already holds its result for this very command, made
        after the very steps (by command) named in `after` (the run it evaluates)."""
        command = ' '.join(map(shlex.quote, argv))
        # Recorded without the machine's paths (interpreter, data, work folder), so a record
        # carried to another machine is still recognised and its finished steps are skipped.
        shown = (command.replace(shlex.quote(sys.executable), 'python', 1)
                 .replace(self.data, '<cifar10>').replace(self.work, '<work>'))
        record = self.record
        inputs = {dep: record.get(dep, {}).get('command') for dep in after}
        done = record.get(name, {})
        if (done.get('command') == shown and done.get('after', {}) == inputs
                and ('result' in done or 'results' in done)):
            print(f'== {name}: done, skipped', flush=True)
            return
        print(f'== {name}: {command}', flush=True)
        t0 = time.time()
        proc = subprocess.run(argv, cwd=REPO, text=True, stdout=subprocess.PIPE)
        if proc.returncode:
            sys.exit(f'{name} failed (exit {proc.returncode}): {command}\n'
                     'Rerun the same command to resume.')
        entry = {'command': shown, 'wall_minutes': round((time.time() - t0) / 60, 2)}
        if inputs:
            entry['after'] = inputs
        if result_file:
            entry['result'] = json.load(open(result_file))
        if collect:
            entry['results'] = collect()
        if not (result_file or collect):
            entry['result'] = {'exit': 0}  # a training step: done when it exits 0
        self.note(name, entry)
        print(json.dumps(entry), flush=True)

    def note(self, name: str, entry: dict) -> None:
        """Sets the record's `name` and writes the record (never half-written)."""
        record = self.record
        record[name] = entry
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = f'{self.path}.{os.getpid()}.tmp'
        with open(tmp, 'w') as f:
            json.dump(record, f, indent=2, sort_keys=True)
        os.replace(tmp, self.path)


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
