"""Transfer to other data sets, the paper's third evaluation (its appendix B.8, which follows
Kornblith et al. 2019): one encoder, one target data set, linear and fine-tuned.

    python -m simclr_tf.transfer --model=/tmp/simclr --dataset=oxford_flowers102 \\
        --protocols=linear,finetune --out=/tmp/transfer

- linear: `simclr_tf.linear` on frozen h (L-BFGS logistic regression, ℓ2 from a log-spaced grid
  chosen on validation, refitted on train + validation), images resized on the shorter side and
  centre-cropped to the encoder's size, no augmentation.
- finetune: the whole network from the encoder's weights, through the training program
  (`program.run`, train_mode=finetune; from scratch, train_mode=supervised, for --random_init):
  Nesterov momentum 0.9, BN momentum max(1 - 10/s, 0.9) for s steps an epoch, random crop and
  flip, learning rate x weight decay (divided by the learning rate) chosen on validation from a
  grid, then retrained on train + validation with each seed and tested.

A data set is one of PRESETS (its TFDS name, splits and metric: top-1, or mean per-class accuracy
for Aircraft, Pets, Caltech-101 and Flowers) or an image folder `<root>/{train,test}/<class>/*`
(with `--preset` for a preset's metric). Where it has no validation split, a fixed fifth of every
class of train is held out (`train[validation]`, the rest `train[fit]`). Each protocol writes one
JSON record `<out>/<protocol>.json` with every choice made; a rerun skips what is recorded.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Optional

import numpy as np

from simclr_tf import linear
from simclr_tf.config import Config, ConfigError

TOP1, PER_CLASS, MAP = 'top_1_accuracy', 'mean_per_class_accuracy', 'mean_average_precision_11'


@dataclasses.dataclass(frozen=True)
class Preset:
    """One of the paper's 12 transfer data sets: where it is and how it is scored."""
    name: str
    classes: int
    metric: str
    tfds: Optional[str]  # TFDS name[/config]; None: a folder to make (`layout`)
    validation: Optional[str] = None  # its own validation split; None: train[validation]
    test: str = 'test'
    layout: str = ''
    multi_label: bool = False


_FOLDER = ('<root>/{split}/<class>/<image>, split in {splits}, ')
PRESETS = {p.name: p for p in (
    Preset('food101', 101, TOP1, 'food101', test='validation'),  # TFDS's validation: the test set
    Preset('cifar10', 10, TOP1, 'cifar10'),
    Preset('cifar100', 100, TOP1, 'cifar100'),
    Preset('birdsnap', 500, TOP1, None, layout=_FOLDER.format(
        split='{train,test}', splits='train/test') + 'from the Birdsnap lists (test_images.txt '
        'is the test split); many image addresses no longer answer: use those you have'),
    Preset('sun397', 397, TOP1, 'sun397/standard-part1-120k'),  # the first official partition
    Preset('stanford_cars', 196, TOP1, 'cars196'),
    Preset('fgvc_aircraft', 100, PER_CLASS, None, validation='validation', layout=_FOLDER.format(
        split='{train,validation,test}', splits='train/validation/test') + 'one class folder a '
        'variant, from FGVC-Aircraft 2013b images_variant_{train,val,test}.txt, with the bottom '
        '20 px copyright banner cropped off'),
    Preset('voc2007', 20, MAP, 'voc/2007', validation='validation', multi_label=True),
    Preset('dtd', 47, TOP1, 'dtd', validation='validation'),  # TFDS's split 1
    Preset('oxford_iiit_pet', 37, PER_CLASS, 'oxford_iiit_pet'),
    Preset('caltech101', 102, PER_CLASS, 'caltech101'),  # 30 a class to train, as the paper
    Preset('oxford_flowers102', 102, PER_CLASS, 'oxford_flowers102', validation='validation'),
)}


@dataclasses.dataclass(frozen=True)
class Target:
    """A data set resolved against its source: the splits each step reads, and its metric."""
    dataset: str
    data_dir: Optional[str]
    metric: str
    fit: str  # trains while choosing hyperparameters
    validation: str  # chooses them
    train: str  # trains the final classifier: fit + validation
    test: str
    sizes: dict  # split -> examples
    num_classes: int
    class_names: Optional[tuple[str, ...]]


def resolve_target(dataset: str, data_dir: Optional[str] = None,
                   preset: Optional[str] = None) -> Target:
    """The target `dataset` names (a preset or an image folder), checked: every split exists, the
    train split has two classes or more, and the test split none that train lacks."""
    from simclr_tf import sources
    name = preset or (dataset if dataset in PRESETS else None)
    if name is not None and name not in PRESETS:
        raise ConfigError(f'preset={name!r} is not one of {", ".join(PRESETS)}')
    spec = PRESETS.get(name)
    if spec and spec.multi_label:
        raise ConfigError(f'{spec.name} is multi-label (scored by 11-point mAP over {spec.classes} '
                          'binary classifiers): the single-label readers and training program do '
                          'not take it')
    location = spec.tfds if spec and dataset == spec.name else dataset
    if location is None:
        raise ConfigError(f'{spec.name} is not in TFDS: pass --dataset=<folder laid out '
                          f'{spec.layout}> --preset={spec.name}')
    source = sources.open_source(location, data_dir)
    splits = getattr(source, 'splits', None) or list(source.builder.info.splits)
    own = spec.validation if spec else 'validation'
    validation = own if own in splits else 'train[validation]'
    test = spec.test if spec else 'test'
    target = Target(location, data_dir, spec.metric if spec else TOP1,
                    'train' if validation == own else 'train[fit]', validation,
                    f'train+{own}' if validation == own else 'train', test, {},
                    source.num_classes, source.class_names)
    labels = {split: source.labels(split) for split in (target.fit, target.validation, test)}
    train_classes = set(np.unique(np.concatenate([labels[target.fit],
                                                  labels[target.validation]])))
    if len(train_classes) < 2:
        raise ConfigError(f'dataset={dataset!r}: its train split has {len(train_classes)} class; '
                          'a classifier needs two or more')
    unseen = sorted(set(np.unique(labels[test])) - train_classes)
    if unseen:
        names = [source.class_names[c] if source.class_names else str(c) for c in unseen]
        raise ConfigError(f'dataset={dataset!r}: split {test!r} has classes that train has not: '
                          f'{", ".join(names[:10])}{" …" if len(names) > 10 else ""}')
    sizes = {split: int(len(y)) for split, y in labels.items()}
    return dataclasses.replace(target, sizes=sizes)


def check_encoder(path: Optional[str], random_init: bool, image_size: Optional[int]) -> Config:
    """The encoder's architecture at the size it will read, before anything is written."""
    from simclr_tf import encoders
    if not path:
        raise ConfigError('--model is required (a model_dir, checkpoint or export of this '
                          "project, or one of the authors' checkpoints or SavedModels)")
    config = encoders.open_source(path, what='model').config
    size = image_size or config.image_size
    if (size <= 32) != (config.image_size <= 32):
        raise ConfigError(f'image_size={size} does not fit model={path!r}: it was built for '
                          f'{config.image_size} px, with the '
                          f'{"CIFAR" if config.image_size <= 32 else "ImageNet"} stem, which takes '
                          f'{"<= 32" if config.image_size <= 32 else "> 32"} px')
    return config.replace(image_size=size)


# ---------------------------------------------------------------- linear
def linear_transfer(path: str, target: Target, random_init: bool = False,
                    image_size: Optional[int] = None, grid: tuple[float, ...] = linear.PAPER_GRID,
                    batch_size: int = 256) -> dict:
    """The linear protocol on frozen h; the record (without predictions) and test predictions."""
    from simclr_tf import features
    encoder = features.load(path, random_init)
    config = features.data_config(encoder, target.dataset, target.data_dir, batch_size,
                                  crop_proportion=1.0)
    config = config.replace(image_size=image_size or encoder.config.image_size)
    t0 = time.time()
    read = {}
    for split in dict.fromkeys((target.fit, target.validation, target.test)):
        found, labels = features.extract(encoder, config, split, (features.H,))
        read[split] = (found[features.H], labels)
    seconds = time.time() - t0
    t0 = time.time()
    result = linear.evaluate(read[target.fit], read[target.validation], read[target.test],
                             target.num_classes, grid, target.metric)
    final = linear.fit(np.concatenate([read[target.fit][0], read[target.validation][0]]),
                       np.concatenate([read[target.fit][1], read[target.validation][1]]),
                       result['l2'])
    predicted = final.predict(read[target.test][0])
    return {'protocol': 'linear', 'encoder': encoder.description,
            'image_size': config.image_size, 'feature_dim': int(read[target.test][0].shape[1]),
            'feature_seconds': round(seconds, 1), 'fit_seconds': round(time.time() - t0, 1),
            'metric': target.metric, 'value': result[target.metric], **result,
            'predictions': predicted.tolist(), 'labels': read[target.test][1].tolist()}


# ---------------------------------------------------------------- fine-tuning
@dataclasses.dataclass(frozen=True)
class Schedule:
    """The fine-tuning protocol's budget and grid (the paper's: 20,000 steps at batch 256, 7
    learning rates x 8 weight decays)."""
    steps: int = 20000
    batch_size: int = 256
    learning_rates: tuple[float, ...] = tuple(float(v) for v in np.logspace(-4, -1, 7))
    weight_decays: tuple[float, ...] = (0.0,) + tuple(float(v) for v in np.logspace(-6, -3, 7))
    search_steps: Optional[int] = None  # steps of the grid's runs (default: steps)
    seeds: tuple[int, ...] = (0,)


ARCHITECTURE = ('resnet_depth', 'width_multiplier', 'sk_ratio', 'se_ratio', 'proj_head_mode',
                'num_proj_layers', 'proj_out_dim')


def finetune_config(encoder: Config, init: Optional[str], target: Target, schedule: Schedule,
                    lr: float, wd: float, seed: int, final: bool, model_dir: str,
                    image_size: int) -> Config:
    """One run of the grid (final=False: fit split, scored on validation) or a final run (train
    + validation, tested)."""
    train = target.train if final else target.fit
    steps = schedule.steps if final or not schedule.search_steps else schedule.search_steps
    per_epoch = math.ceil(target.sizes.get(train, target.sizes[target.fit]
                                           + target.sizes[target.validation])
                          / schedule.batch_size)
    return Config(
        **{k: getattr(encoder, k) for k in ARCHITECTURE}, image_size=image_size,
        mode='train_then_eval', train_mode='finetune' if init else 'supervised',
        checkpoint=init, zero_init_logits_layer=True, fine_tune_after_block=-1,
        ft_proj_selector=0, dataset=target.dataset, data_dir=target.data_dir, train_split=train,
        eval_split=target.test if final else target.validation, optimizer='momentum',
        momentum=0.9, learning_rate=lr, learning_rate_scaling='linear',
        weight_decay=wd / lr, warmup_epochs=0, train_steps=steps,
        train_batch_size=schedule.batch_size, eval_batch_size=256,
        batch_norm_decay=max(1 - 10 / per_epoch, 0.9), global_bn=True,
        checkpoint_steps=steps, keep_checkpoint_max=1, keep_hub_module_max=1,
        knn_train_examples=0, eval_crop_proportion=1.0 if image_size <= 32 else 0.0,
        use_tpu=False, seed=seed, model_dir=model_dir).validate()


def write_init(path: str, out: str) -> str:
    """The encoder at `path` (any source) as a checkpoint of this project with its config.json
    beside it: the one --checkpoint every fine-tuning run starts from."""
    import tensorflow as tf
    from simclr_tf import encoders
    prefix = os.path.join(out, 'init', 'ckpt-1')
    if tf.io.gfile.exists(prefix + '.index'):
        return prefix
    source = encoders.open_source(path, what='model')
    model = encoders.build(source, what='model')
    tmp = os.path.join(out, f'init.tmp-{os.getpid()}')
    tf.io.gfile.makedirs(tmp)
    # save(), not write(): the training program's restore expects a save counter.
    tf.train.Checkpoint(model=model).save(os.path.join(tmp, 'ckpt'))
    with open(os.path.join(tmp, 'config.json'), 'w') as f:
        f.write(source.config.to_json())
    os.replace(tmp, os.path.join(out, 'init'))
    return prefix


def finetune_transfer(path: str, target: Target, out: str, schedule: Schedule,
                      random_init: bool = False, image_size: Optional[int] = None,
                      record: Optional[dict] = None, save=lambda r: None) -> dict:
    """The fine-tuning protocol: the grid on validation (seed schedule.seeds[0]), then each seed
    retrained on train + validation at the chosen point and tested. `record` holds the runs
    already done (a rerun skips them); `save(record)` is called after each run."""
    from simclr_tf import encoders, program
    record = record or {}
    encoder = encoders.open_source(path, what='model').config
    size = image_size or encoder.image_size
    init = None if random_init else write_init(path, out)
    runs = record.setdefault('runs', {})

    def run(lr: float, wd: float, seed: int, final: bool) -> dict:
        key = f'{"final" if final else "search"}_lr{lr:.3g}_wd{wd:.3g}_s{seed}'
        if key not in runs:
            config = finetune_config(encoder, init, target, schedule, lr, wd, seed, final,
                                     os.path.join(out, key), size)
            t0 = time.time()
            result = program.run(config)
            runs[key] = {'learning_rate': lr, 'weight_decay': wd, 'seed': seed,
                         'split': config.train_split, 'evaluated_on': config.eval_split,
                         'steps': config.train_steps, 'batch_size': config.train_batch_size,
                         'batch_norm_decay': config.batch_norm_decay,
                         TOP1: result['eval/label_top_1_accuracy'],
                         PER_CLASS: result['eval/label_mean_per_class_accuracy'],
                         'minutes': round((time.time() - t0) / 60, 2)}
            save(record)
        return runs[key]

    grid = [(lr, wd) for lr in schedule.learning_rates for wd in schedule.weight_decays]
    seed = schedule.seeds[0]
    scores = {point: run(*point, seed, False)[target.metric] for point in grid}
    lr, wd = max(grid, key=lambda p: (scores[p], -p[0], -p[1]))  # ties: the smaller values
    finals = [run(lr, wd, s, True) for s in schedule.seeds]
    values = [f[target.metric] for f in finals]
    record.update({'protocol': 'finetune', 'encoder': f'{"random init of " if random_init else ""}'
                   f'{path}', 'image_size': size, 'metric': target.metric,
                   'learning_rate': lr, 'weight_decay': wd,
                   'validation': scores[(lr, wd)], 'grid_size': len(grid),
                   'steps': schedule.steps, 'search_steps': schedule.search_steps or schedule.steps,
                   'batch_size': schedule.batch_size, 'seeds': list(schedule.seeds),
                   'value': float(np.mean(values)), 'values': values,
                   TOP1: float(np.mean([f[TOP1] for f in finals])),
                   PER_CLASS: float(np.mean([f[PER_CLASS] for f in finals]))})
    save(record)
    return record


# ---------------------------------------------------------------- significance
def permutation_test(correct_a: np.ndarray, correct_b: np.ndarray, samples: int = 10000,
                     seed: int = 0) -> float:
    """Two-sided p-value of the difference in accuracy of two classifiers on the same test
    examples (paired): each example's two outcomes are swapped at random; the p-value is the
    share of swaps whose |difference| is at least the observed one (with the observed counted)."""
    a, b = np.asarray(correct_a, float), np.asarray(correct_b, float)
    observed = abs(a.mean() - b.mean())
    differ = a != b
    if not differ.any():
        return 1.0
    d = (a - b)[differ]  # +-1 where they disagree; swaps elsewhere change nothing
    signs = np.random.default_rng(seed).choice((-1.0, 1.0), size=(samples, len(d)))
    extreme = np.abs(signs @ d) / len(a) >= observed - 1e-12
    return float((extreme.sum() + 1) / (samples + 1))


# ---------------------------------------------------------------- command
def _main(argv: Optional[list[str]] = None) -> None:
    from simclr_tf.probe import ArgumentParser
    parser = ArgumentParser(prog='python -m simclr_tf.transfer',
                            description=__doc__.split('\n')[0])
    parser.add_argument('--model', help='the encoder: a model_dir, checkpoint or export of this '
                        "project, or one of the authors' checkpoints or SavedModels")
    parser.add_argument('--random_init', action='store_true',
                        help="the model's architecture, randomly initialised (fine-tuning: "
                        'trained from scratch)')
    parser.add_argument('--dataset', required=True,
                        help=f'a preset ({", ".join(PRESETS)}) or an image folder')
    parser.add_argument('--preset', help='the preset whose protocol (metric) a folder takes')
    parser.add_argument('--data_dir', default=None, help='TFDS data_dir')
    parser.add_argument('--protocols', default='linear,finetune')
    parser.add_argument('--out', required=True, help='directory of the records and runs')
    parser.add_argument('--image_size', type=int, help="default: the model's own")
    parser.add_argument('--l2_values', type=int, default=len(linear.PAPER_GRID),
                        help="linear: log-spaced l2 values from 1e-6 to 1e5 (45: the paper's)")
    parser.add_argument('--steps', type=int, default=Schedule.steps)
    parser.add_argument('--search_steps', type=int, default=None,
                        help='steps of each run of the grid (default: --steps)')
    parser.add_argument('--batch_size', type=int, default=Schedule.batch_size)
    parser.add_argument('--learning_rates', default=None,
                        help="comma-separated (default: the paper's 7, 1e-4 to 0.1)")
    parser.add_argument('--weight_decays', default=None,
                        help="comma-separated, before division by the learning rate (default: "
                        "the paper's 0 and 7 from 1e-6 to 1e-3)")
    parser.add_argument('--seeds', default='0', help='of the final fine-tuning runs')
    args = parser.parse_args(argv)
    protocols = args.protocols.split(',')
    if set(protocols) - {'linear', 'finetune'} or not protocols:
        parser.error(f'--protocols={args.protocols}: linear, finetune or both')
    from simclr_tf import logs
    logs.setup()
    from simclr_tf.probe import cli_errors
    with cli_errors():
        check_encoder(args.model, args.random_init, args.image_size)
        target = resolve_target(args.dataset, args.data_dir, args.preset)
        floats = lambda text: tuple(float(v) for v in text.split(','))  # noqa: E731
        schedule = Schedule(
            steps=args.steps, batch_size=args.batch_size, search_steps=args.search_steps,
            learning_rates=floats(args.learning_rates) if args.learning_rates
            else Schedule.learning_rates,
            weight_decays=floats(args.weight_decays) if args.weight_decays
            else Schedule.weight_decays,
            seeds=tuple(int(s) for s in args.seeds.split(',')))
        os.makedirs(args.out, exist_ok=True)
        shared = {'dataset': args.dataset, 'target': dataclasses.asdict(target),
                  'model': args.model, 'random_init': args.random_init}
        for protocol in protocols:
            path = os.path.join(args.out, f'{protocol}.json')
            record = _read(path)
            if record.get('protocol') == protocol and 'value' in record:
                print(f'{protocol}: done ({path})')
                continue
            save = lambda r, path=path: _write(path, {**shared, **r})  # noqa: E731
            if protocol == 'linear':
                grid = tuple(float(v) for v in np.logspace(-6, 5, args.l2_values))
                record = linear_transfer(args.model, target, args.random_init, args.image_size,
                                         grid)
                save(record)
            else:
                record = finetune_transfer(args.model, target, args.out, schedule,
                                           args.random_init, args.image_size, record, save)
            print(f'{protocol}: {target.metric} {record["value"]:.4f} ({path})')


def _read(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _write(path: str, record: dict) -> None:
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w') as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)


if __name__ == '__main__':
    _main()
