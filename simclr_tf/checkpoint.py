"""Checkpoints: save and resume a run, and start fine-tuning from another run's weights."""

from __future__ import annotations

import logging
import os
import re
import shutil
from typing import Optional

import tensorflow as tf

from simclr_tf.config import Config, ConfigError


def resolve_checkpoint(path: str) -> str:
    """A checkpoint prefix from a prefix or a directory (its latest checkpoint)."""
    if tf.io.gfile.isdir(path):
        latest = tf.train.latest_checkpoint(path)
        if latest is None:
            raise ConfigError(f'checkpoint={path!r} is a directory with no checkpoint in it')
        return latest
    if not tf.io.gfile.exists(path + '.index'):
        raise ConfigError(f'checkpoint={path!r} is neither a checkpoint prefix nor a directory')
    return path


class Checkpointer:
    """Model, optimizer (and so the global step, `optimizer.iterations`) in `model_dir`.

    TensorFlow writes the `checkpoint` state file atomically after the data files, so a save that
    dies half-way never becomes the latest checkpoint. On a non-chief worker of a multi-worker run
    every worker must take part in the save; those write to a scratch directory that is removed.
    """

    def __init__(self, config: Config, model: tf.Module, optimizer: tf.Module, chief: bool = True,
                 task_id: int = 0):
        self.config = config
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
        self._scratch = None
        directory = config.model_dir
        if not chief:
            self._scratch = os.path.join(config.model_dir, f'.worker_{task_id}_scratch')
            directory = self._scratch
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, directory=directory, max_to_keep=config.keep_checkpoint_max)

    @property
    def latest(self) -> Optional[str]:
        return tf.train.latest_checkpoint(self.config.model_dir)

    def save(self, step: int) -> str:
        path = self.manager.save(checkpoint_number=step)
        if self._scratch:
            shutil.rmtree(self._scratch, ignore_errors=True)
        return path

    def restore(self, model: tf.keras.Model) -> str:
        """Resumes from `model_dir`, else starts from `config.checkpoint`; says which it did."""
        latest = self.latest
        if latest:
            self.checkpoint.restore(latest).assert_existing_objects_matched()
            return f'resumed from {latest}'
        if self.config.checkpoint:
            source = resolve_checkpoint(self.config.checkpoint)
            restored = restore_matching(model, source, self.config.variable_schema)
            message = f'initialised {len(restored)} variables from {source}'
            new = new_parts(model, restored)
            if new:
                message += f'; new (freshly initialised): {", ".join(new)}'
            if self.config.zero_init_logits_layer and model.supervised_head is not None:
                for v in model.supervised_head.trainable_variables:
                    v.assign(tf.zeros_like(v))
                message += ' (supervised head zero-initialised)'
            return message
        return 'started from scratch'


def restore_matching(model: tf.keras.Model, source: str, schema: str) -> list[str]:
    """Restores the variables whose `.path` matches `schema` (re.match) from a checkpoint.

    The authors' linear-eval recipe passes `(?!global_step|(?:.*/|^)Momentum|head)`: every encoder
    variable, no head. Only the parts that hold a selected variable are read, so a checkpoint whose
    supervised head has another number of classes can still seed the encoder.
    """
    pattern = re.compile(schema)
    parts = _parts(model)
    selected = {name: [v for v in layer.variables if pattern.match(v.path)]
                for name, layer in parts.items()}
    # A part the checkpoint does not hold at all (the supervised head of a run pretrained without
    # lineareval_while_pretraining) starts fresh, as the authors' restore(...).expect_partial().
    saved = {name.split('/')[1] for name, _ in tf.train.list_variables(source)
             if name.startswith('model/') and name.count('/') > 1}
    if selected and not saved & set(parts):
        raise ConfigError(f'checkpoint={source!r} holds none of this model\'s parts '
                          f'({", ".join(parts)})')
    for name in [n for n in selected if selected[n] and n not in saved]:
        logging.info('checkpoint %s holds no %s: it starts freshly initialised', source, name)
        selected[name] = []
    wanted = {name: layer for name, layer in parts.items() if selected[name]}
    keep = {id(v): v.numpy() for v in model.variables if not pattern.match(v.path)}
    if wanted:
        status = tf.train.Checkpoint(model=tf.train.Checkpoint(**wanted)).restore(source)
        status.expect_partial()
        try:
            status.assert_existing_objects_matched()
        except AssertionError as e:
            raise ConfigError(f'checkpoint={source!r} does not hold this model\'s '
                              f'{", ".join(wanted)} variables: {e}') from e
    # Parts restored whole may include unselected variables: put those back.
    for v in model.variables:
        if id(v) in keep:
            v.assign(keep[id(v)])
    restored = [v.path for vs in selected.values() for v in vs]
    logging.info('restored %d variables matching %r from %s: %s', len(restored), schema, source,
                 ', '.join(f'{n} {len(vs)}' for n, vs in selected.items()))
    return restored


def _parts(model: tf.keras.Model) -> dict:
    parts = {name: getattr(model, name) for name in ('encoder', 'projection_head', 'supervised_head')}
    return {name: layer for name, layer in parts.items() if layer is not None}


def new_parts(model: tf.keras.Model, restored: list[str]) -> list[str]:
    """The model's parts none of whose variables came from the checkpoint."""
    restored = set(restored)
    return [name for name, layer in _parts(model).items()
            if not any(v.path in restored for v in layer.variables)]
