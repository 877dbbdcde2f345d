"""A run's start, decided once: the start plan.

Before the model_dir is touched, `resolve` answers once every question a start asks: what the run
does (mode, train_mode); where its weights come from (model_dir's newest checkpoint to resume,
`--checkpoint` of this project or of the authors with the variables it restores and the parts left
fresh and why, or scratch); its teacher; its data (source, splits, example counts, classes,
labelled fraction); its views; precision, strategy and replicas; the global batch, the learning
rate after scaling, warmup, steps and checkpoint cadence; and what model_dir will receive. Every
start-up check is made there, so a run that cannot start stops before anything is built, and
`--dry_run` stops with the same line. The plan is printed as a short block at the start, and a
training run keeps it in model_dir/plan.txt, beside config.json.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import os
from typing import Optional

import numpy as np
import tensorflow as tf

from simclr_tf import checkpoint, data, distribute, optim
from simclr_tf import model_dir as model_dir_lib
from simclr_tf import teacher as teacher_lib
from simclr_tf import views as views_lib
from simclr_tf.config import Config, ConfigError
from simclr_tf.model import has_supervised_head

TRAINING = ('train', 'train_then_eval')
PLAN_FILE = 'plan.txt'


@dataclasses.dataclass(frozen=True)
class StartPlan:
    """Everything a run's start decides; what runs after reads it and decides nothing again."""
    mode: str
    train_mode: str
    model_dir: str
    checkpoints: tuple[tuple[int, str], ...]  # model_dir's at the start, oldest first
    weights: Optional[checkpoint.Start]  # where training starts (None: eval, export)
    teacher: Optional[teacher_lib.Source]  # train_mode=distill
    data: Optional[data.DatasetInfo]  # None: export reads no data
    num_classes: int
    views: Optional[views_lib.ViewPlan]  # the training stream's (None: eval, export)
    precision: str
    devices: str  # the strategy and its replicas
    replicas: int
    batch: int  # global batch: of training, else of eval
    learning_rate: float  # after scaling with the batch
    warmup_steps: int
    total_steps: int
    checkpoint_steps: int
    writes: tuple[str, ...]  # what model_dir will receive
    warnings: tuple[str, ...] = ()
    config: Optional[Config] = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def training(self) -> bool:
        return self.mode in TRAINING

    @property
    def start_step(self) -> int:
        return self.weights.step if self.weights else 0

    def lines(self, warnings: bool = True) -> list[str]:
        """The plan as the block a run prints at its start (its warnings last)."""
        c = self.config
        lines = [f'start plan: mode={self.mode}, train_mode={self.train_mode}, '
                 f'model_dir={self.model_dir}', f'  weights: {self._weights()}']
        if self.teacher:
            lines.append(f'  teacher: {self.teacher.kind} {self.teacher.path} '
                         f'({self.teacher.num_classes} classes)')
        lines.append(f'  data: {self._data()}')
        if self.views:
            lines.append(f'  {self.views.line()}')
        lines.append(f'  devices: {self.devices}, precision {self.precision}')
        if self.training:
            scaled = (f'{c.learning_rate:g} x {self.batch}/256' if c.learning_rate_scaling ==
                      'linear' else f'{c.learning_rate:g} x sqrt({self.batch})')
            lines.append(f'  schedule: global batch {self.batch}, learning rate '
                         f'{self.learning_rate:g} ({scaled}), warmup {self.warmup_steps} steps, '
                         f'steps {self.start_step} to {self.total_steps}, a checkpoint every '
                         f'{self.checkpoint_steps} steps')
        elif self.mode == 'eval':
            lines.append(f'  eval: global batch {self.batch}'
                         + (f', {c.eval_steps} steps' if c.eval_steps else ', the whole split'))
        lines.append(f'  model_dir receives: {", ".join(self.writes)}')
        return lines + ([f'  warning: {w}' for w in self.warnings] if warnings else [])

    def _weights(self) -> str:
        if self.weights:
            parts = tuple(checkpoint.part_paths(self.config, self.num_classes))
            return self.weights.describe(parts)
        if self.mode == 'export':
            return f'the newest checkpoint, {self.checkpoints[-1][1]}'
        if not self.checkpoints:
            return (f'no checkpoint yet: waits for them until step {self.total_steps}'
                    + (f' (at most {self.config.eval_timeout}s without a new one)'
                       if self.config.eval_timeout else ''))
        return (f'{len(self.checkpoints)} checkpoints ({self.checkpoints[0][1]} to '
                f'{os.path.basename(self.checkpoints[-1][1])}), those not evaluated yet, then each '
                f'new one until step {self.total_steps}')

    def _data(self) -> str:
        c, info = self.config, self.data
        if info is None:
            return f'not read ({self.num_classes} classes, from the checkpoint)'
        if info.num_eval_examples is None:
            counts, splits = f'{info.num_train_examples} train', c.train_split
        else:
            counts = f'{info.num_train_examples} train / {info.num_eval_examples} eval'
            splits = f'{c.train_split}, {c.eval_split}'
        line = f'{c.dataset}: {counts} examples (splits {splits}), {info.num_classes} classes'
        if c.trains_classifier and c.label_fraction < 1:
            line += (f'; labels: label_fraction={c.label_fraction:g} of {c.train_split} '
                     f'(label_seed {c.label_seed})')
        return line

    def log(self) -> None:
        """The block, then each warning once, as a warning line."""
        for line in self.lines(warnings=False):
            logging.info('%s', line)
        for warning in self.warnings:
            logging.warning('%s', warning)

    def write(self) -> None:
        """Adds the plan, with the time, to model_dir/plan.txt (a training run's chief, once
        model_dir is claimed): one block for each start of the run."""
        path = os.path.join(self.model_dir, PLAN_FILE)
        old = ''
        if tf.io.gfile.exists(path):
            with tf.io.gfile.GFile(path) as f:
                old = f.read()
        now = datetime.datetime.now(datetime.timezone.utc)
        with tf.io.gfile.GFile(path + '.tmp', 'w') as f:
            f.write(old + f'# {now:%Y-%m-%d %H:%M:%S} UTC\n' + '\n'.join(self.lines()) + '\n\n')
        tf.io.gfile.rename(path + '.tmp', path, overwrite=True)


def resolve(config: Config, strategy: tf.distribute.Strategy) -> StartPlan:
    """The plan of `config`'s start on `strategy`. Raises ConfigError (DataError,
    faults.Unreadable) naming what cannot work: reads model_dir, the data's listing, the
    checkpoint and the teacher; writes nothing."""
    model_dir_lib.check_path(config.model_dir, create=True)
    warnings = distribute.check_strategy(config, strategy)
    found = tuple(model_dir_lib.list_checkpoints(config.model_dir))
    training = config.mode in TRAINING
    if not (training and config.start_over):  # --start_over moves model_dir's run aside
        model_dir_lib.check_config(config, model_dir_lib.read_config(config.model_dir))
    if config.mode == 'export':
        if not found:
            raise ConfigError(f'mode=export needs a checkpoint in model_dir={config.model_dir!r}')
        info, num_classes = None, _export_classes(config, found[-1][1])
    else:
        info = data.dataset_info(config, need_eval=config.mode != 'train')
        num_classes = info.num_classes
    if training:
        warnings += degenerate(config, info)
    weights = checkpoint.resolve_start(config, list(found), num_classes) if training else None
    teacher = (teacher_lib.check(config, num_classes)
               if training and config.train_mode == 'distill' else None)
    examples = info.num_train_examples if info else 0
    return StartPlan(
        mode=config.mode, train_mode=config.train_mode, model_dir=config.model_dir,
        checkpoints=found, weights=weights, teacher=teacher, data=info, num_classes=num_classes,
        views=data.view_plan(config, True) if training else None,
        precision=('float32' if config.mixed_precision == 'none'
                   else f'mixed {config.mixed_precision}'),
        devices=distribute.describe(strategy), replicas=strategy.num_replicas_in_sync,
        batch=config.train_batch_size if training else config.eval_batch_size,
        learning_rate=optim.scaled_learning_rate(config),
        warmup_steps=optim.warmup_steps(config, examples),
        total_steps=optim.train_steps(config, examples) if info else found[-1][0],
        checkpoint_steps=optim.checkpoint_steps(config, examples),
        writes=_writes(config, found), warnings=tuple(warnings), config=config)


def degenerate(config: Config, info: data.DatasetInfo) -> list[str]:
    """Warnings on a training set-up that runs but learns little or nothing, which a user may
    still mean (a smoke test): one class to classify, classes left without a labelled example,
    a batch larger than the examples it is drawn from."""
    warnings = []
    names = info.class_names or tuple(str(i) for i in range(info.num_classes))
    if config.trains_classifier and info.num_classes == 1:
        warnings.append(
            f'dataset {config.dataset} has one class ({names[0]}): train_mode='
            f'{config.train_mode} trains a classifier with nothing to tell apart (loss 0 and '
            'top-1 accuracy 1.000 from the first step); it needs two classes or more')
    labelled = data.label_subset(config)
    if labelled is not None:
        labels, subset = labelled
        present = np.unique(labels)
        missing = [names[c] for c in np.setdiff1d(present, labels[subset])]
        if missing:
            need = _rounded_up(len(present) / len(labels))
            warnings.append(
                f'label_fraction={config.label_fraction:g} labels {len(subset)} of the '
                f'{len(labels)} examples of {config.train_split}, which has {len(present)} '
                f'classes: {len(missing)} of them have no labelled example '
                f'({", ".join(missing[:5])}{", …" if len(missing) > 5 else ""}) and the '
                f'classifier never learns them; --label_fraction={need:g} or more labels an '
                'example of each')
    if config.train_batch_size > info.num_train_examples:
        which = ('labelled ' if config.trains_classifier and config.label_fraction < 1
                 and config.train_mode != 'distill' else '')
        warnings.append(
            f'train_batch_size={config.train_batch_size} is larger than the '
            f'{info.num_train_examples} {which}examples of {config.train_split}: every batch '
            'holds some images more than once'
            + (' (and the contrastive loss takes copies of an image for negatives)'
               if config.train_mode == 'pretrain' else '')
            + f'; --train_batch_size={info.num_train_examples} or less draws each once')
    return warnings


def _rounded_up(x: float) -> float:
    """x rounded up to 3 significant digits (a fraction to suggest that is never too small)."""
    unit = 10.0 ** (math.floor(math.log10(x)) - 2)
    return round(math.ceil(x / unit - 1e-9) * unit, 12)


def _export_classes(config: Config, newest: str) -> int:
    """The classes of the model export restores: its checkpoint's supervised head's, else (no
    head in it, or unreadable: the restore says so) the data's."""
    if not has_supervised_head(config):
        return 1  # no classifier: the count is not used
    try:
        head = checkpoint.saved_head_shape(newest)
    except (tf.errors.OpError, IndexError, OSError, ValueError):
        head = None
    return head[1] if head else data.dataset_info(config, need_eval=False).num_classes


def _writes(config: Config, found: tuple[tuple[int, str], ...]) -> tuple[str, ...]:
    """What model_dir will receive."""
    results = 'result.json, result_<step>.json, flags.json'
    exports = f'saved_model/<step>/ (the newest {config.keep_hub_module_max or "all"})'
    if config.mode == 'export':
        return (f'saved_model/{found[-1][0]}/',)
    if config.mode == 'eval':
        return (f'for each checkpoint evaluated: {results}, {exports}',)
    writes = [f'config.json, {PLAN_FILE}',
              f'ckpt-<step> (the newest {config.keep_checkpoint_max})', 'TensorBoard events']
    if config.start_over and model_dir_lib.contents(config.model_dir):
        writes.insert(0, 'first its files moved aside to previous-<UTC time>/')
    if config.mode == 'train_then_eval':
        writes.append(f'after training: {results}, saved_model/<step>/')
    return tuple(writes)
