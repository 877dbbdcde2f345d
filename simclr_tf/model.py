"""SimCLR as one Keras model: encoder f, projection head g and, when needed, a supervised head.

What goes where, as the authors' TF2 model.py:
- pretrain: the contrastive loss uses `proj_head_output` (z); with `lineareval_while_pretraining`
  a linear classifier is trained on hiddens[ft_proj_selector] behind a stop-gradient, so the
  labels never shape the representation.
- finetune (and the new supervised and distill modes, which train the same classifier from
  scratch, and a student on a teacher's softmax): the classifier sits on hiddens[ft_proj_selector] (h when 0, else a projection-head
  layer, as SimCLRv2; negative selectors count from z = -1) and its gradient flows into everything
  up to there, except the encoder stages frozen by `fine_tune_after_block`. The projection-head
  layers past the selected tensor feed no loss, so they are frozen like those stages (the authors
  left them trainable without gradients); their BN follows `frozen_bn` as the encoder's, and
  `proj_head_output` is still returned.

Variable paths start with 'resnet/', 'head_contrastive/' and 'head_supervised/' (not with the
model's name), so the authors' `variable_schema` regexes select the same variables.
"""

from __future__ import annotations

from typing import Optional

import keras
import tensorflow as tf

from simclr_tf.config import Config
from simclr_tf.heads import ProjectionHead, SupervisedHead
from simclr_tf.resnet import freeze, output_dim, resnet_from_config


def has_supervised_head(config: Config) -> bool:
    return config.trains_classifier or config.lineareval_while_pretraining


def supervised_input_dim(config: Config) -> int:
    """Width of hiddens[ft_proj_selector], what the supervised head reads: hiddens are
    [h, hidden layers (h's width)..., z (proj_out_dim)]."""
    index = config.ft_proj_index
    last = index == config.num_proj_outputs and index > 0
    return config.proj_out_dim if last else output_dim(config.resnet_depth,
                                                       config.width_multiplier)


class SimCLRModel(keras.Model):
    """`call(images, training)` maps float images [N, H, W, 3] in [0, 1] to a dict of float32
    tensors: the encoder stages (see resnet.py), 'proj_head_input' (= h), 'proj_head_output' (z)
    and 'logits_sup' when a supervised head exists."""

    def __init__(self, config: Config, num_classes: int, name: str = 'simclr', **kwargs):
        super().__init__(name=name, **kwargs)
        self.config, self.num_classes = config, num_classes
        self.encoder = resnet_from_config(config)
        # The heads in float32 under every policy (see heads.py); the encoder follows the policy.
        self.projection_head = ProjectionHead(config, dtype='float32')
        # N(0, 0.01) initialisation; zero_init_logits_layer zeroes it only when a run starts from
        # --checkpoint (checkpoint.Checkpointer), as the authors' code.
        self.supervised_head = (SupervisedHead(num_classes, dtype='float32')
                                if has_supervised_head(config) else None)
        for part in self._parts():
            # Root the part's variable paths at its own name. Keras 3 would otherwise prefix them
            # with the model's name, and nothing public sets a layer's path.
            part._parent_path = ''

    def _parts(self) -> list[keras.layers.Layer]:
        return [p for p in (self.encoder, self.projection_head, self.supervised_head) if p]

    def build(self, input_shape):
        self.encoder.build(input_shape)
        h_shape = (input_shape[0], self.encoder.output_dim)
        self.projection_head.build(h_shape)
        index = self.config.ft_proj_index
        if self.config.trains_classifier:
            # Layer j makes hiddens[j + 1]: those past the selected tensor feed no loss.
            for layer in self.projection_head.linear_layers[index:]:
                freeze(layer, self.config.frozen_bn)
        if self.supervised_head is not None:
            self.supervised_head.build((input_shape[0], supervised_input_dim(self.config)))

    def call(self, images, training: bool = False) -> dict[str, tf.Tensor]:
        outputs = dict(self.encoder(images, training=training))
        h = outputs['final_avg_pool']
        z, hiddens = self.projection_head(h, training=training)
        outputs['proj_head_input'] = h
        outputs['proj_head_output'] = tf.cast(z, tf.float32)
        if self.supervised_head is not None:
            features = hiddens[self.config.ft_proj_index]
            if self.config.train_mode == 'pretrain':
                # Linear eval alongside pretraining must not change the representation.
                features = tf.stop_gradient(features)
            logits = self.supervised_head(features, training=training)
            outputs['logits_sup'] = tf.cast(logits, tf.float32)
        return outputs

    def get_config(self) -> dict:
        return {'name': self.name, 'config': self.config.to_dict(),
                'num_classes': self.num_classes}

    @classmethod
    def from_config(cls, config: dict) -> 'SimCLRModel':
        config = dict(config)
        return cls(Config.from_dict(config.pop('config')), **config)


def build_model(config: Config, num_classes: int,
                image_size: Optional[int] = None) -> SimCLRModel:
    """A SimCLRModel with all its variables (create it inside a strategy's scope to distribute)."""
    model = SimCLRModel(config, num_classes)
    size = image_size or config.image_size
    model(tf.zeros([1, size, size, 3]), training=False)
    return model
