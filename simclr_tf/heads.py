"""The heads on top of h: the projection head g(·) and the supervised (linear) head.

As the authors' TF2 model.py, with one fix: their 'linear' projection mode returned None (the
result of `list.append`); here it returns (z, [h, z]) like the other modes.

Both heads compute in float32 whatever the mixed-precision policy (`dtype='float32'`, which
their sublayers follow): z and the logits feed the losses, and the heads are a tiny share of the
step's work (a ResNet-50's 2048-wide head: ~0.2 % of its multiply-adds).

Variable paths start with the layer names 'head_contrastive' and 'head_supervised', so the authors'
linear-eval `variable_schema='(?!global_step|(?:.*/|^)Momentum|head)'` excludes exactly the heads.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import keras
import tensorflow as tf

from simclr_tf.config import Config
from simclr_tf.resnet import batch_norm, get_layers, set_layers


class LinearLayer(keras.layers.Layer):
    """Dense (N(0, 0.01²) init, or zeros) optionally followed by BN.

    With BN the dense layer has no bias; `use_bias` then decides BN's β (`center`).
    `units=None` means as many units as inputs (the hidden layers of the projection head).
    """

    def __init__(self, units: Optional[int], use_bias: bool = True, use_bn: bool = False,
                 zero_init: bool = False, batch_norm_decay: float = 0.9, global_bn: bool = False,
                 **kwargs):
        super().__init__(**kwargs)
        self.units, self.use_bias, self.use_bn, self.zero_init = units, use_bias, use_bn, zero_init
        self.batch_norm_decay, self.global_bn = batch_norm_decay, global_bn

    def build(self, input_shape):
        units = self.units or int(input_shape[-1])
        initializer = ('zeros' if self.zero_init
                       else keras.initializers.RandomNormal(stddev=0.01))
        self.dense = keras.layers.Dense(units, use_bias=self.use_bias and not self.use_bn,
                                        kernel_initializer=initializer, name='dense',
                                        dtype=self.dtype_policy)
        self.dense.build(input_shape)
        self.bn = None
        if self.use_bn:
            self.bn = batch_norm(self.batch_norm_decay, self.global_bn, center=self.use_bias,
                                 name='bn', dtype=self.dtype_policy)
            self.bn.build((input_shape[0], units))
        if not self.trainable:  # children made after `trainable=False` was set must follow it
            for layer in (self.dense, self.bn):
                if layer is not None:
                    layer.trainable = False

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units or input_shape[-1],)

    def call(self, inputs, training: bool = False):
        x = self.dense(inputs)
        if self.bn is not None:
            x = self.bn(x, training=training)
        return x

    def get_config(self) -> dict:
        return {**super().get_config(), 'units': self.units, 'use_bias': self.use_bias,
                'use_bn': self.use_bn, 'zero_init': self.zero_init,
                'batch_norm_decay': self.batch_norm_decay, 'global_bn': self.global_bn}


class ProjectionHead(keras.layers.Layer):
    """g(·): 'none' (z = h), 'linear' (one BN'd linear layer) or 'nonlinear' (num_proj_layers
    BN'd layers, ReLU after all but the last; hidden widths equal h's, the last proj_out_dim).

    `call(h, training)` returns (z, hiddens) with hiddens = [h, output of layer 1, ..., z];
    `ft_proj_selector` indexes this list.
    """

    def __init__(self, config: Config, name: str = 'head_contrastive', **kwargs):
        super().__init__(name=name, **kwargs)
        self.config = config
        bn_args = dict(batch_norm_decay=config.batch_norm_decay, global_bn=config.global_bn)
        mode = config.proj_head_mode
        if mode not in ('none', 'linear', 'nonlinear'):
            raise ValueError(f'unknown proj_head_mode {mode!r}')
        num_layers = config.num_proj_outputs
        self._linear_layers = set_layers(self, [
            LinearLayer(config.proj_out_dim if j == num_layers - 1 else None,
                        use_bias=j < num_layers - 1, use_bn=True,
                        name=f'{"l" if mode == "linear" else "nl"}_{j}',
                        dtype=self.dtype_policy, **bn_args)
            for j in range(num_layers)])

    @property
    def linear_layers(self) -> list[LinearLayer]:
        return get_layers(self, self._linear_layers)

    def build(self, input_shape):
        shape = tuple(input_shape)
        for layer in self.linear_layers:
            layer.build(shape)
            shape = layer.compute_output_shape(shape)

    def compute_output_shape(self, input_shape):
        return (tuple(input_shape[:-1]) + (self.config.proj_out_dim,) if self.linear_layers
                else tuple(input_shape))

    def call(self, inputs, training: bool = False) -> tuple[tf.Tensor, list[tf.Tensor]]:
        hiddens = [inputs]
        for j, layer in enumerate(self.linear_layers):
            x = layer(hiddens[-1], training=training)
            if j < len(self.linear_layers) - 1:
                x = tf.nn.relu(x)
            hiddens.append(x)
        return hiddens[-1], hiddens

    def get_config(self) -> dict:
        return {**super().get_config(), 'config': self.config.to_dict()}

    @classmethod
    def from_config(cls, config: dict) -> 'ProjectionHead':
        config = dict(config)
        return cls(Config.from_dict(config.pop('config')), **config)


class SupervisedHead(keras.layers.Layer):
    """The linear classifier: logits = W·x + b (W zero-initialised if `zero_init`)."""

    def __init__(self, num_classes: int, zero_init: bool = False, name: str = 'head_supervised',
                 **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_classes, self.zero_init = num_classes, zero_init
        self.linear_layer = LinearLayer(num_classes, use_bias=True, use_bn=False,
                                        zero_init=zero_init, name='linear_layer',
                                        dtype=self.dtype_policy)

    def build(self, input_shape):
        self.linear_layer.build(input_shape)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.num_classes,)

    def call(self, inputs, training: bool = False):
        return self.linear_layer(inputs, training=training)

    def get_config(self) -> dict:
        return {**super().get_config(), 'num_classes': self.num_classes,
                'zero_init': self.zero_init}


@dataclasses.dataclass(frozen=True)
class HeadMismatch:
    """A saved supervised head this run's cannot take, as one line: shapes are [inputs, classes]
    (this run's classes None while unknown), selectors None when not known."""
    source: str  # 'checkpoint <path>', "the authors' checkpoint <path>"
    theirs: tuple[int, ...]
    ours: tuple[int, Optional[int]]
    their_selector: Optional[int]
    our_selector: int

    @property
    def inputs_differ(self) -> bool:
        return self.theirs[0] != self.ours[0]

    def __str__(self) -> str:
        said = []
        if self.inputs_differ:
            there = ('' if self.their_selector is None
                     else f' (ft_proj_selector={self.their_selector} there)')
            said.append(f"reads {self.theirs[0]} inputs{there} and this model's {self.ours[0]} "
                        f'(ft_proj_selector={self.our_selector})')
        if self.ours[1] is not None and self.theirs[1] != self.ours[1]:
            said.append(f"has {self.theirs[1]} classes and this model's {self.ours[1]}")
        return f"{self.source}'s supervised head {', and '.join(said)}"

    def fresh(self) -> str:
        """Why the head starts fresh under zero_init_logits_layer."""
        return f'{self}: it starts fresh (zero_init_logits_layer zeroes it anyway)'

    def refusal(self) -> str:
        """Why the run stops, and the ways out."""
        ways = ['--zero_init_logits_layer=True to start the head fresh']
        if self.inputs_differ:
            ways.append(f'--ft_proj_selector={self.their_selector} to match it'
                        if self.their_selector is not None
                        else '--ft_proj_selector of the run that wrote it to match it')
        ways.append("--variable_schema='(?!head_supervised)' to leave it out")
        return f'{self}: pass {", ".join(ways[:-1])}, or {ways[-1]}'
