"""Checkpoints: save and resume a run, and start fine-tuning from another run's weights."""

from __future__ import annotations

import logging
import os
import re
import shutil
from typing import Optional

import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

from simclr_tf import authors
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


def check_start(path: str) -> None:
    """Fails early, with a clear message, when `--checkpoint` names nothing to start from: a
    checkpoint (prefix or directory) or one of the authors' SavedModel exports."""
    if tf.io.gfile.isdir(path) and tf.train.latest_checkpoint(path) is None:
        if authors.find_saved_model(path) is None:
            raise ConfigError(f'checkpoint={path!r} is a directory with neither a checkpoint nor '
                              'a SavedModel in it')
        return
    resolve_checkpoint(path)


def optimizer_state(optimizer: tf.Module) -> tf.Module:
    """The optimizer's own variables (step, slots), as `optimizer/variables/<i>`.

    Checkpointing the Keras optimizer itself would key every trainable weight
    `optimizer/_trainable_variables/<i>` (its list of them is the shortest path to each), leaving
    `model/...` keys only to BN statistics. Without that list, every model variable is keyed by
    its place in the model: `model/encoder/stem/conv_0/_kernel`, `model/projection_head/...`,
    `model/supervised_head/...`.
    """
    state = tf.__internal__.tracking.AutoTrackable()
    state.variables = list(optimizer.variables)
    return state


def is_legacy(path: str) -> bool:
    """A checkpoint of this project written before model variables were keyed by name."""
    return any(k.startswith('optimizer/_iterations/') for k, _ in tf.train.list_variables(path))


class Checkpointer:
    """Model, optimizer (and so the global step, `optimizer.iterations`) in `model_dir`.

    TensorFlow writes the `checkpoint` state file atomically after the data files, so a save that
    dies half-way never becomes the latest checkpoint. On a non-chief worker of a multi-worker run
    every worker must take part in the save; those write to a scratch directory that is removed.
    """

    def __init__(self, config: Config, model: tf.Module, optimizer: tf.Module, chief: bool = True,
                 task_id: int = 0):
        self.config = config
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer_state(optimizer))
        self._legacy = tf.train.Checkpoint(model=model, optimizer=optimizer)  # reads older ones
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
            checkpoint = self._legacy if is_legacy(latest) else self.checkpoint
            checkpoint.restore(latest).assert_existing_objects_matched()
            return f'resumed from {latest}'
        if self.config.checkpoint:
            theirs = authors.open_source(self.config.checkpoint)
            if theirs is not None:  # the authors' TF2 checkpoint or SavedModel (their model zoo)
                source = f"the authors' {theirs.kind} {theirs.path}"
                restored, notes = authors.restore(model, self.config, theirs,
                                                  self.config.variable_schema)
            else:
                source = resolve_checkpoint(self.config.checkpoint)
                restored, notes = restore_matching(model, source, self.config.variable_schema), []
            message = f'initialised {len(restored)} variables from {source}'
            message += ''.join(f'; {note}' for note in notes)
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
    saved = saved_parts(source)
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


def saved_parts(source: str) -> set[str]:
    """The model parts a checkpoint of this project holds, read from its object graph (older
    checkpoints key head weights under the optimizer, so their key names do not tell)."""
    reader = tf.train.load_checkpoint(source)
    if not reader.has_tensor('_CHECKPOINTABLE_OBJECT_GRAPH'):  # written without objects
        return {name.split('/')[1] for name in reader.get_variable_to_shape_map()
                if name.startswith('model/') and name.count('/') > 1}
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor('_CHECKPOINTABLE_OBJECT_GRAPH'))
    model = [c.node_id for c in graph.nodes[0].children if c.local_name == 'model']
    return {c.local_name for c in graph.nodes[model[0]].children} if model else set()


def _parts(model: tf.keras.Model) -> dict:
    parts = {name: getattr(model, name) for name in ('encoder', 'projection_head', 'supervised_head')}
    return {name: layer for name, layer in parts.items() if layer is not None}


def new_parts(model: tf.keras.Model, restored: list[str]) -> list[str]:
    """The model's parts none of whose variables came from the checkpoint."""
    restored = set(restored)
    return [name for name, layer in _parts(model).items()
            if not any(v.path in restored for v in layer.variables)]
