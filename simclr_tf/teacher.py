"""The teacher of train_mode=distill (SimCLRv2's third step): a trained classifier, frozen, whose
softmax the student learns on every train image.

`--teacher` names an export of this project (`model_dir/saved_model/<step>`), a checkpoint of
this project (a prefix, or a model_dir: its newest), or one of the authors' TF2 checkpoints or
SavedModels. Whatever the source, the teacher is rebuilt as a SimCLRModel of its own
configuration inside the run's strategy scope, so it runs on every replica beside the student,
and called in inference mode (BN on its moving statistics, nothing updated). It is not part of
the student's checkpoints: a resumed run reads `--teacher` again.
"""

from __future__ import annotations

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
    config: Config  # the teacher's own architecture
    num_classes: Optional[int]  # None: it has no classifier
    authors: Optional[authors.Source] = None


def open_source(path: str) -> Source:
    """What `--teacher=path` holds, read without building a model; ConfigError if nothing fit."""
    # An export, or a model_dir with exports and no checkpoint: its newest export.
    saved = None if model_dir_lib.list_checkpoints(path) else authors.find_saved_model(path)
    if saved and tf.io.gfile.exists(os.path.join(saved, 'assets.extra', 'config.json')):
        return _export(saved)
    try:
        theirs = authors.open_source(path)
    except ConfigError as e:
        raise ConfigError(f'teacher={path!r}: {checkpoint.first_line(e)}; expected an export '
                          '(model_dir/saved_model/<step>), a checkpoint or a model_dir') from None
    if theirs is not None:
        arch = authors.source_architecture(theirs)
        return Source(f'authors {theirs.kind}', theirs.path, authors.config_for(arch),
                      arch.num_classes, theirs)
    prefix = checkpoint.resolve_checkpoint(path)
    values = model_dir_lib.read_config(os.path.dirname(prefix))
    if values is None:
        raise ConfigError(f'teacher={path!r}: checkpoint {prefix} has no config.json beside it '
                          'to say its architecture; pass its export (model_dir/saved_model/<step>)')
    head = checkpoint.saved_head_shape(prefix)  # [inputs, classes]
    return Source('checkpoint', prefix, _config(values), head[1] if head else None)


def check(config: Config, num_classes: int) -> Source:
    """The teacher of `config`, checked against the dataset (before any model is built)."""
    source = open_source(config.teacher)
    if source.num_classes is None:
        raise ConfigError(f'teacher={config.teacher!r} ({source.kind} {source.path}) has no '
                          'classifier to distil: use a fine-tuned run, or one pretrained with '
                          '--lineareval_while_pretraining=True')
    if source.num_classes != num_classes:
        raise ConfigError(f'teacher={config.teacher!r} ({source.kind} {source.path}) has '
                          f'{source.num_classes} classes; dataset={config.dataset!r} has '
                          f'{num_classes}: distil on the data set the teacher was trained for')
    return source


def build(config: Config, num_classes: int, strategy: tf.distribute.Strategy,
          source: Optional[Source] = None) -> SimCLRModel:
    """The frozen teacher with its weights, created in `strategy`'s scope; `source`: as `check`
    found it (default: checked now)."""
    source = source or check(config, num_classes)
    with strategy.scope():
        model = build_model(source.config, num_classes)
    try:
        if source.kind == 'export':
            _restore_export(model, source.path)
        elif source.kind == 'checkpoint':
            status = tf.train.Checkpoint(model=model).restore(source.path)
            status.expect_partial().assert_existing_objects_matched()
        else:
            authors.restore(model, source.config, source.authors, '')
    except (AssertionError, ValueError, tf.errors.OpError) as e:
        raise ConfigError(f'teacher={config.teacher!r}: {source.kind} {source.path} does not '
                          f'hold the model its configuration describes: '
                          f'{checkpoint.first_line(e)}') from None
    model.trainable = False
    return model


def _export(path: str) -> Source:
    """An export of this project: its config in assets.extra, its classes from the shape of the
    last variable it saved (the model's variables end with the classifier's kernel and bias)."""
    config = _config(model_dir_lib.read_config(os.path.join(path, 'assets.extra')))
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


def _config(values: dict) -> Config:
    """A teacher's Config from its saved values; fields a newer version added take defaults."""
    known = {f.name for f in dataclasses.fields(Config)}
    return Config.from_dict({k: v for k, v in values.items() if k in known})
