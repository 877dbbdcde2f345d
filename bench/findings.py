"""The CIFAR-10 study's findings that one epoch is too short for (`cifar10_study.py --stages=
supervised_lr,head_long,color_long,batch,width`), each at a budget of several epochs:

  head_long   projection head none / linear / nonlinear of 2 layers (the paper's) / nonlinear of
              3 layers (SimCLRv2's, the authors' default), 2 seeds, probed on h and on z, and
              evaluated as the authors' code does (the linear head trained alongside) (Figure 8)
  color_long  colour strength 0.5 (the authors' CIFAR recipe) against 1.0 (the paper's ImageNet
              default), 2 seeds (Table 1, at length)
  batch       batch 128 / 256 / 512 (LARS lr 1.0 x B/256) x 2 and 8 epochs, seed 0, and seed 1 on
              the short pair, whose gap the finding rests on (Figure 9)
  width       width x0.125 / x0.25 / x0.5 pretrained and linearly probed, and the same networks
              trained supervised on all the labels for the same epochs (Figure 7)
  supervised_lr  the supervised arms' learning rate, chosen on a held-out 5,000 of the train
              images from the few-label stage's grid, at width x0.25 and 4 epochs

Every SimCLR arm is the main run's recipe (flags/cifar10_main.cfg: quarter-width ResNet-18, batch
256, LARS lr 1.0 x B/256, wd 1e-4, temperature 0.5, colour 0.5, no blur) with its knobs set,
pretrained (--mode=train) for its own epochs with a warmup of 10 % of them, then probed with
`python -m simclr_tf.probe` fitted on the whole train split and tested on the test split. Arms
with the same knobs are one run, whichever stages name them (the 8-epoch recipe at seed 0 is an
arm of all four). Each arm is probed as soon as it is trained, and recorded, so that a stage cut
short by the end of a session keeps every arm it finished; the arms that decide a finding come
first (seed 0 before seed 1; the linear and the paper's nonlinear head, then the authors'
three-layer head, the one-epoch table's 'nonlinear', then none).
"""

from __future__ import annotations

import os
import sys

H, Z = 'final_avg_pool', 'proj_head_output'
RECIPE = dict(epochs=8, batch=256, width=0.25, head='nonlinear3', color=0.5, seed=0)
HEADS = {'none': ['--proj_head_mode=none'],
         'linear': ['--proj_head_mode=linear'],
         'nonlinear2': ['--proj_head_mode=nonlinear', '--num_proj_layers=2'],
         'nonlinear3': ['--proj_head_mode=nonlinear', '--num_proj_layers=3']}
SUPERVISED_LRS = (0.1, 0.3, 1.0)  # x batch / 256, momentum SGD: the few-label stage's grid
HELD_OUT = 5000  # train images the supervised learning rate is chosen on


def arm(supervised: bool = False, **knobs) -> dict:
    return {**RECIPE, **knobs, 'supervised': supervised}


STAGES = {
    'head_long': [arm(head=h, seed=s) for s in (0, 1)
                  for h in ('nonlinear2', 'linear', 'nonlinear3', 'none')],
    'color_long': [arm(color=c, seed=s) for s in (0, 1) for c in (0.5, 1.0)],
    'batch': ([arm(batch=b, epochs=e) for e in (2, 8) for b in (128, 256, 512)]
              + [arm(batch=b, epochs=2, seed=1) for b in (128, 512)]),
    'width': [arm(width=w, supervised=s) for s in (False, True) for w in (0.125, 0.25, 0.5)],
}


def name(a: dict) -> str:
    """The run's name, from every knob: arms with the same knobs are the same run."""
    if a['supervised']:
        return f'supervised_{a["epochs"]:g}ep_w{a["width"]:g}_s{a["seed"]}'
    return (f'simclr_{a["epochs"]:g}ep_b{a["batch"]}_w{a["width"]:g}_{a["head"]}'
            f'_c{a["color"]:g}_s{a["seed"]}')


def flags(a: dict, supervised_lr: float = None) -> list[str]:
    """run.py flags (after the flagfile) that set every knob of the arm."""
    epochs = [f'--train_epochs={a["epochs"]:g}', f'--warmup_epochs={a["epochs"] / 10:g}']
    common = [f'--width_multiplier={a["width"]:g}', f'--seed={a["seed"]}']
    if a['supervised']:
        return epochs + common + [f'--learning_rate={supervised_lr:g}']
    return (epochs + common + ['--mode=train', f'--train_batch_size={a["batch"]}',
                               *HEADS[a['head']], f'--color_jitter_strength={a["color"]:g}'])


def outputs(stage: str, a: dict) -> tuple[str, ...]:
    """What each arm's probe reads: z as well in the head stage (z = h without a head)."""
    return (H, Z) if stage == 'head_long' and a['head'] != 'none' else (H,)


def run(study, stages: list[str], data: str, work: str, main_flagfile: str) -> None:
    """Trains, then probes, the arms of each requested stage; notes the arms in the record."""
    python = sys.executable
    simclr = [python, 'run.py', f'--flagfile={main_flagfile}', f'--dataset={data}']
    supervised = supervised_command(data)
    probe = [python, '-m', 'simclr_tf.probe', f'--dataset={data}', '--train_split=train']
    lr = None
    if 'supervised_lr' in stages or any(a['supervised'] for s in stages for a in STAGES.get(s, ())):
        lr = supervised_lr(study, supervised, work)
    for stage in stages:
        if stage not in STAGES:
            continue
        index = dict(study.record.get('findings', {}))
        for a in STAGES[stage]:
            model_dir = os.path.join(work, name(a))
            if a['supervised']:
                study.step(name(a), supervised + flags(a, lr) + [f'--model_dir={model_dir}'],
                           os.path.join(model_dir, 'result.json'))
            else:
                study.step(name(a), simclr + flags(a) + [f'--model_dir={model_dir}'])
            runs = {'train': name(a)}
            if not a['supervised']:
                for output in outputs(stage, a):
                    key = f'probe_{name(a)}' + ('' if output == H else '_z')
                    out = os.path.join(work, f'{key}.json')
                    study.step(key, probe + [f'--model={model_dir}', f'--output={output}',
                                             f'--out={out}'], out, after=(name(a),))
                    runs['z' if output == Z else 'h'] = key
                if stage == 'head_long':  # the authors' own measure: the head trained alongside
                    key = f'eval_{name(a)}'
                    study.step(key, simclr + flags(a) + [f'--model_dir={model_dir}',
                                                         '--mode=eval', '--eval_timeout=1'],
                               os.path.join(model_dir, 'result.json'), after=(name(a),))
                    runs['alongside'] = key
            index.setdefault(stage, {})[name(a)] = {**a, **runs}
            study.note('findings', {**study.record.get('findings', {}), stage: index[stage]})


def supervised_command(data: str) -> list[str]:
    """run.py with the study's supervised recipe on `data` (the driver adds lr and epochs)."""
    return [sys.executable, 'run.py', '--flagfile=flags/cifar10_supervised.cfg',
            f'--dataset={data}']


def supervised_lr(study, supervised: list[str], work: str) -> float:
    """The supervised arms' learning rate: of SUPERVISED_LRS, the best on HELD_OUT train images
    after 4 epochs on the others (width x0.25); recorded as the step `supervised_lr`."""
    if 'result' in study.record.get('supervised_lr', {}):
        return study.record['supervised_lr']['result']['chosen']
    scores = {}
    for lr in SUPERVISED_LRS:
        key = f'supervised_lr{lr:g}'
        model_dir = os.path.join(work, key)
        study.step(key, supervised + flags(arm(epochs=4, supervised=True), lr) + [
            f'--train_split=train[{HELD_OUT}:]', f'--eval_split=train[:{HELD_OUT}]',
            f'--model_dir={model_dir}'], os.path.join(model_dir, 'result.json'))
        scores[lr] = study.record[key]['result']['eval/label_top_1_accuracy']
    chosen = max(scores, key=lambda lr: (scores[lr], -lr))
    study.note('supervised_lr', {'result': {'chosen': chosen, 'held_out_top_1': scores},
                                 'after': {f'supervised_lr{lr:g}': study.record[
                                     f'supervised_lr{lr:g}']['command'] for lr in scores}})
    return chosen
