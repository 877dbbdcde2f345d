"""Trained networks from every place the project reads them, rebuilt as this project's model.

A source is an export of this project (`model_dir/saved_model/<step>`, its configuration in
`assets.extra/config.json`), a checkpoint of this project (a `ckpt-N` prefix, or a model_dir: its
newest checkpoint, else its newest export; the configuration from the `config.json` beside it),
or one of the authors' TF2 checkpoints or SavedModels (the architecture inferred from the
variables' shapes). `open_source` reads what a source holds without building a model; `build`
rebuilds it as a SimCLRModel of its own configuration and restores its weights. The teacher of
distillation, the probe, the transfer command and the pictures all read their networks here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from typing import Optional

import tensorflow as tf

from simclr_tf import authors, checkpoint
from simclr_tf import model_dir as model_dir_lib
from simclr_tf.config import Config, ConfigError
from simclr_tf.model import SimCLRModel, build_model

_EXPORT_VARIABLE = re.compile(r'^variables/(\d+)/\.ATTRIBUTES/VARIABLE_VALUE$')


@dataclasses.dataclass(frozen=True)
class Source:
    kind: str  # 'export' | 'checkpoint' | the authors' ('authors checkpoint' | 'authors saved_model')
    path: str  # the export directory or checkpoint prefix read
    config: Config  # the network's own architecture
    num_classes: Optional[int]  # None: it has no classifier
    authors: Optional[authors.Source] = None

    def __str__(self) -> str:
        return f'{self.kind} {self.path}'


def open_source(path: str, what: str = 'path') -> Source:
    """What `path` holds, read without building a model; ConfigError (naming `what`, e.g.
    'teacher') if it holds no network this project can rebuild."""
    if not tf.io.gfile.exists(path) and not tf.io.gfile.exists(path + '.index'):
        raise ConfigError(f'{what}={path!r} does not exist')
    # An export, or a model_dir with exports and no checkpoint: its newest export.
    saved = None if model_dir_lib.list_checkpoints(path) else authors.find_saved_model(path)
    if saved and tf.io.gfile.exists(os.path.join(saved, 'assets.extra', 'config.json')):
        return _export(saved)
    try:
        theirs = authors.open_source(path)
    except ConfigError as e:
        raise ConfigError(f'{what}={path!r}: {checkpoint.first_line(e)}; expected an export '
                          '(model_dir/saved_model/<step>), a checkpoint or a model_dir') from None
    if theirs is not None:
        arch = authors.source_architecture(theirs)
        return Source(f'authors {theirs.kind}', theirs.path, authors.config_for(arch),
                      arch.num_classes, theirs)
    prefix = checkpoint.resolve_checkpoint(path)
    values = model_dir_lib.read_config(os.path.dirname(prefix))
    if values is None:
        raise ConfigError(f'{what}={path!r}: checkpoint {prefix} has no config.json beside it '
                          'to say its architecture; pass its export (model_dir/saved_model/<step>)')
    head = checkpoint.saved_head_shape(prefix)  # [inputs, classes]
    return Source('checkpoint', prefix, saved_config(values), head[1] if head else None)


def build(source: Source, num_classes: Optional[int] = None,
          strategy: Optional[tf.distribute.Strategy] = None, what: str = 'path') -> SimCLRModel:
    """The source's network with its weights (in `strategy`'s scope, if given). `num_classes`:
    the supervised head's classes (default: the source's own)."""
    classes = num_classes if num_classes is not None else (source.num_classes or 0)
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
        model = build_model(source.config, classes)
    try:
        if source.kind == 'export':
            _restore_export(model, source.path)
        elif source.kind == 'checkpoint':
            status = tf.train.Checkpoint(model=model).read(source.path)
            status.expect_partial().assert_existing_objects_matched()
        else:
            authors.restore(model, source.config, source.authors, '')
    except (AssertionError, ValueError, tf.errors.OpError) as e:
        raise ConfigError(f'{what}={source.path!r}: {source} does not hold the model its '
                          f'configuration describes: {checkpoint.first_line(e)}') from None
    return model


def _export(path: str) -> Source:
    """An export of this project: its config in assets.extra, its classes from the shape of the
    last variable it saved (the model's variables end with the classifier's kernel and bias)."""
    config = saved_config(model_dir_lib.read_config(os.path.join(path, 'assets.extra')))
    classes = None
    if config.trains_classifier or config.lineareval_while_pretraining:
        shapes = {int(m.group(1)): shape
                  for key, shape in tf.train.list_variables(os.path.join(path, 'variables',
                                                                         'variables'))
                  for m in [_EXPORT_VARIABLE.match(key)] if m}
        classes = shapes[max(shapes)][0] if shapes else None
    return Source('export', path, config, classes)


def _restore_export(model: SimCLRModel, path: str) -> None:
    """An export's `variables` list, in the order the same configuration builds them."""
    reader = tf.train.load_checkpoint(os.path.join(path, 'variables', 'variables'))
    keys = [f'variables/{i}/.ATTRIBUTES/VARIABLE_VALUE' for i in range(len(model.variables))]
    saved = sum(bool(_EXPORT_VARIABLE.match(k)) for k in reader.get_variable_to_shape_map())
    if saved != len(keys):
        raise ValueError(f'it saved {saved} variables, the model has {len(keys)}')
    values = [reader.get_tensor(k) for k in keys]  # all read before any is assigned
    for v, value in zip(model.variables, values):
        if tuple(v.shape) != value.shape:
            raise ValueError(f'{v.path} has shape {list(v.shape)}, the export {list(value.shape)}')
        v.assign(value)


def saved_config(values: dict) -> Config:
    """A Config from a run's saved values; fields a newer version added take defaults."""
    known = {f.name for f in dataclasses.fields(Config)}
    return Config.from_dict({k: v for k, v in values.items() if k in known})
