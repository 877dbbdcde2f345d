"""The teacher of train_mode=distill (SimCLRv2's third step): a trained classifier, frozen, whose
softmax the student learns on every train image.

`--teacher` names any network `simclr_tf.encoders` reads: an export of this project
(`model_dir/saved_model/<step>`), a checkpoint of this project (a prefix, or a model_dir: its
newest), or one of the authors' TF2 checkpoints or SavedModels. Whatever the source, the teacher
is rebuilt as a SimCLRModel of its own configuration inside the run's strategy scope, so it runs
on every replica beside the student, and called in inference mode (BN on its moving statistics,
nothing updated). It is not part of the student's checkpoints: a resumed run reads `--teacher`
again.
"""

from __future__ import annotations

from typing import Optional

import tensorflow as tf

from simclr_tf import encoders
from simclr_tf.config import Config, ConfigError
from simclr_tf.model import SimCLRModel

Source = encoders.Source


def open_source(path: str) -> Source:
    """What `--teacher=path` holds, read without building a model; ConfigError if nothing fit."""
    return encoders.open_source(path, what='teacher')


def check(config: Config, num_classes: int) -> Source:
    """The teacher of `config`, checked against the dataset (before any model is built)."""
    source = open_source(config.teacher)
    if source.num_classes is None:
        raise ConfigError(f'teacher={config.teacher!r} ({source}) has no classifier to distil: '
                          'use a fine-tuned run, or one pretrained with '
                          '--lineareval_while_pretraining=True')
    if source.num_classes != num_classes:
        raise ConfigError(f'teacher={config.teacher!r} ({source}) has {source.num_classes} '
                          f'classes; dataset={config.dataset!r} has {num_classes}: distil on the '
                          'data set the teacher was trained for')
    return source


def build(config: Config, num_classes: int, strategy: tf.distribute.Strategy,
          source: Optional[Source] = None) -> SimCLRModel:
    """The frozen teacher with its weights, created in `strategy`'s scope; `source`: as `check`
    found it (default: checked now)."""
    source = source or check(config, num_classes)
    model = encoders.build(source, num_classes, strategy, what='teacher')
    model.trainable = False
    return model
