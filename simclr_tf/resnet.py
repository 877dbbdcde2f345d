"""The encoder f(·): ResNet v1.5 (post-activation, stride on the 3x3 conv), as the authors' TF2.

Depths 18 and 34 use basic blocks, 50-200 bottleneck blocks; widths are 64·2^i × width_multiplier
(fractional multipliers allowed). Options of the paper and of SimCLRv2:

- CIFAR stem (`cifar_stem`): a 3x3 stride-1 first conv and no max pool.
- Selective Kernel (`sk_ratio > 0`), as the authors: the ResNet-D deep stem and average-pool
  projection shortcuts at every depth, and SK convs in place of the bottleneck blocks' 3x3 convs.
  Basic blocks (ResNet-18/34) keep plain 3x3 convs, as in the authors' code, so their published
  layouts and parameter counts (R18 11,199,968; R34 21,308,128 at sk_ratio=0.0625) match.
- Squeeze-excitation (`se_ratio > 0`) at the end of each residual branch.

`ResNet.call` returns the named stages of the authors' hub modules: `initial_conv` (stem conv
output, before BN), `initial_max_pool` (stem output), `block_group1..4` and `final_avg_pool` (h),
all float32 whatever the mixed-precision policy. Images are float [N, H, W, 3] in [0, 1], not
normalised, as the authors' models expect.

Fine-tuning from a block (`fine_tune_after_block = k >= 0`; 0 = stem, 1..4 = block groups) freezes
stages 0..k: their output is behind `tf.stop_gradient` and their weights leave `trainable_variables`
(never trained, never decayed). Their BN follows `frozen_bn` (see `freeze`). By default ('batch')
it does what the authors' code does: their stages get `trainable=False` on the wrapper layers only,
so the tf-keras BN inside still normalises with batch statistics and updates its moving averages
in a `training=True` call (measured with tf-keras 2.21). 'inference' keeps the pretrained moving
statistics instead (Keras 3's `trainable=False` BN).
"""

from __future__ import annotations

from typing import Optional

import keras
import tensorflow as tf

from simclr_tf.config import FROZEN_BN_MODES, Config

BATCH_NORM_EPSILON = 1e-5
STAGES = ('initial_conv', 'initial_max_pool', 'block_group1', 'block_group2', 'block_group3',
          'block_group4', 'final_avg_pool')
# depth -> (block type, blocks per group)
ARCHITECTURES = {
    18: ('basic', (2, 2, 2, 2)),
    34: ('basic', (3, 4, 6, 3)),
    50: ('bottleneck', (3, 4, 6, 3)),
    101: ('bottleneck', (3, 4, 23, 3)),
    152: ('bottleneck', (3, 8, 36, 3)),
    200: ('bottleneck', (3, 24, 36, 3)),
}


def channels(base: int, width_multiplier: float) -> int:
    """Channels of a layer whose width-1 size is `base`."""
    return max(1, round(base * width_multiplier))


def batch_norm(batch_norm_decay: float, global_bn: bool, zero_init: bool = False,
               center: bool = True, name: Optional[str] = None,
               dtype=None) -> keras.layers.BatchNormalization:
    """BN as the authors configure it; zero_init for the last BN of a residual branch. Under
    mixed precision Keras computes its moments (all-reduced too, with global_bn) and moving
    averages in float32, and only its output is in the compute dtype."""
    return keras.layers.BatchNormalization(
        momentum=batch_norm_decay, epsilon=BATCH_NORM_EPSILON, center=center, scale=True,
        gamma_initializer='zeros' if zero_init else 'ones', synchronized=global_bn, name=name,
        dtype=dtype)


def freeze(layer: keras.layers.Layer, frozen_bn: str = 'batch') -> None:
    """Takes a built layer's weights out of training. frozen_bn='batch': only the variables are
    made untrainable, so its BN layers stay in training mode (batch statistics, moving averages
    updated) in a training=True call, as the authors' code; 'inference': the layer is set
    `trainable=False`, which in Keras 3 also runs its BN on the moving statistics, untouched."""
    if frozen_bn not in FROZEN_BN_MODES:
        raise ValueError(f'frozen_bn={frozen_bn!r} must be one of {", ".join(FROZEN_BN_MODES)}')
    if frozen_bn == 'inference':
        layer.trainable = False
    else:
        for variable in layer.variables:
            variable.trainable = False


def set_layers(owner: keras.layers.Layer, layers: list) -> list[str]:
    """Makes each layer an attribute of `owner` under its own name; returns the names.

    Keras 3 wraps list attributes in a type tf.train.Checkpoint does not follow, so layers held
    only in a list would silently be missing from checkpoints.
    """
    for layer in layers:
        setattr(owner, layer.name, layer)
    return [layer.name for layer in layers]


def get_layers(owner: keras.layers.Layer, names: list[str]) -> list:
    return [getattr(owner, name) for name in names]


def _build_sequence(layers: list, input_shape: tuple) -> tuple:
    """Builds `layers` in order and returns their output shape. Composite layers build their
    children explicitly, which is much cheaper than Keras tracing `call` symbolically to do it."""
    for layer in layers:
        layer.build(input_shape)
        input_shape = layer.compute_output_shape(input_shape)
    return tuple(input_shape)


def _output_shape(layers: list, input_shape: tuple) -> tuple:
    for layer in layers:
        input_shape = layer.compute_output_shape(input_shape)
    return tuple(input_shape)


def _conv1x1(filters: int, use_bias: bool, name: str) -> keras.layers.Conv2D:
    return keras.layers.Conv2D(filters, 1, use_bias=use_bias, name=name,
                               kernel_initializer=keras.initializers.VarianceScaling())


class Conv2dFixedPadding(keras.layers.Conv2D):
    """Bias-free conv, fan-in truncated-normal init; a strided conv pads by (k-1)/2 explicitly and
    then runs VALID, so its padding does not depend on the input size (unlike SAME)."""

    def __init__(self, filters: int, kernel_size: int, strides: int = 1, **kwargs):
        kwargs.setdefault('kernel_initializer', keras.initializers.VarianceScaling())
        for fixed in ('padding', 'use_bias'):  # set here; present in get_config()
            kwargs.pop(fixed, None)
        super().__init__(filters, kernel_size, strides=strides, use_bias=False,
                         padding='same' if strides == 1 else 'valid', **kwargs)

    def _pads(self) -> list[list[int]]:
        total = self.kernel_size[0] - 1
        return [[0, 0], [total // 2, total - total // 2], [total // 2, total - total // 2], [0, 0]]

    def call(self, inputs):
        if self.strides[0] > 1:
            inputs = tf.pad(inputs, self._pads())
        return super().call(inputs)

    def compute_output_shape(self, input_shape):
        if self.strides[0] > 1:
            input_shape = [d if d is None else d + sum(pad)
                           for d, pad in zip(input_shape, self._pads())]
        return super().compute_output_shape(input_shape)


class _BNLayer(keras.layers.Layer):
    """Base for layers holding BN: keeps the BN settings for get_config."""

    def __init__(self, batch_norm_decay: float = 0.9, global_bn: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.batch_norm_decay = batch_norm_decay
        self.global_bn = global_bn

    def _bn(self, name: str, zero_init: bool = False) -> keras.layers.BatchNormalization:
        return batch_norm(self.batch_norm_decay, self.global_bn, zero_init=zero_init, name=name)

    def get_config(self) -> dict:
        return {**super().get_config(), 'batch_norm_decay': self.batch_norm_decay,
                'global_bn': self.global_bn}


class SelectiveKernelConv(_BNLayer):
    """SK conv (Li et al. 2019) as in SimCLRv2: one 3x3 conv makes two branches of `filters`
    channels; a softmax over the branches, computed from their pooled sum, mixes them. Includes
    its own BN-ReLU, so it replaces a conv + BN-ReLU pair."""

    def __init__(self, filters: int, strides: int, sk_ratio: float, min_dim: int = 32, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.strides, self.sk_ratio = filters, strides, sk_ratio
        self.min_dim = min_dim
        self.conv = Conv2dFixedPadding(2 * filters, 3, strides, name='conv')
        self.bn = self._bn('bn')
        self.fc_reduce = _conv1x1(max(int(filters * sk_ratio), min_dim), False, 'fc_reduce')
        self.bn_reduce = self._bn('bn_reduce')
        self.fc_expand = _conv1x1(2 * filters, False, 'fc_expand')

    def build(self, input_shape):
        shape = _build_sequence([self.conv, self.bn], input_shape)
        _build_sequence([self.fc_reduce, self.bn_reduce, self.fc_expand],
                        (shape[0], 1, 1, self.filters))

    def compute_output_shape(self, input_shape):
        return self.conv.compute_output_shape(input_shape)[:-1] + (self.filters,)

    def call(self, inputs, training: bool = False):
        x = tf.nn.relu(self.bn(self.conv(inputs), training=training))
        branches = tf.stack(tf.split(x, 2, axis=-1))  # [2, N, H, W, filters]
        pooled = tf.reduce_mean(tf.reduce_sum(branches, axis=0), axis=[1, 2], keepdims=True)
        z = tf.nn.relu(self.bn_reduce(self.fc_reduce(pooled), training=training))
        attention = tf.nn.softmax(tf.stack(tf.split(self.fc_expand(z), 2, axis=-1)), axis=0)
        return tf.reduce_sum(branches * attention, axis=0)

    def get_config(self) -> dict:
        return {**super().get_config(), 'filters': self.filters, 'strides': self.strides,
                'sk_ratio': self.sk_ratio, 'min_dim': self.min_dim}


class SqueezeExcitation(keras.layers.Layer):
    """SE (Hu et al. 2018): channel gates from the pooled features, bottleneck of
    max(1, int(filters · se_ratio)) units (filters = the block's base width, as the authors)."""

    def __init__(self, filters: int, se_ratio: float, out_filters: int, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.se_ratio, self.out_filters = filters, se_ratio, out_filters
        self.reduce = _conv1x1(max(1, int(filters * se_ratio)), True, 'reduce')
        self.expand = _conv1x1(out_filters, True, 'expand')

    def build(self, input_shape):
        _build_sequence([self.reduce, self.expand], (input_shape[0], 1, 1, input_shape[-1]))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def call(self, inputs):
        gates = self.expand(tf.nn.relu(self.reduce(tf.reduce_mean(inputs, [1, 2], keepdims=True))))
        return tf.sigmoid(gates) * inputs

    def get_config(self) -> dict:
        return {**super().get_config(), 'filters': self.filters, 'se_ratio': self.se_ratio,
                'out_filters': self.out_filters}


class ProjectionShortcut(_BNLayer):
    """1x1 conv + BN on the shortcut; ResNet-D style (avg pool, then a stride-1 conv) with SK."""

    def __init__(self, filters: int, strides: int, resnet_d: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.strides, self.resnet_d = filters, strides, resnet_d
        if resnet_d:
            # As the authors: pad-then-VALID 2x2 pool when strided, a SAME 2x2 pool otherwise.
            self.pool = keras.layers.AveragePooling2D(
                2, strides, padding='same' if strides == 1 else 'valid', name='avg_pool')
            self.conv = Conv2dFixedPadding(filters, 1, 1, name='conv')
        else:
            self.conv = Conv2dFixedPadding(filters, 1, strides, name='conv')
        self.bn = self._bn('bn')

    def _chain(self) -> list:
        return ([self.pool] if self.resnet_d else []) + [self.conv, self.bn]

    def _padded(self, input_shape):
        if self.resnet_d and self.strides > 1:  # the explicit pad of call()
            n, h, w, c = input_shape
            return (n, None if h is None else h + 1, None if w is None else w + 1, c)
        return tuple(input_shape)

    def build(self, input_shape):
        _build_sequence(self._chain(), self._padded(input_shape))

    def compute_output_shape(self, input_shape):
        return _output_shape(self._chain(), self._padded(input_shape))

    def call(self, inputs, training: bool = False):
        if self.resnet_d:
            if self.strides > 1:
                inputs = tf.pad(inputs, [[0, 0], [0, 1], [0, 1], [0, 0]])
            inputs = self.pool(inputs)
        return self.bn(self.conv(inputs), training=training)

    def get_config(self) -> dict:
        return {**super().get_config(), 'filters': self.filters, 'strides': self.strides,
                'resnet_d': self.resnet_d}


class _Block(_BNLayer):
    """Shared parts of the residual blocks: shortcut, optional SE, final add + ReLU."""

    expansion = 1

    def __init__(self, filters: int, strides: int, use_projection: bool = False,
                 sk_ratio: float = 0.0, se_ratio: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.strides, self.use_projection = filters, strides, use_projection
        self.sk_ratio, self.se_ratio = sk_ratio, se_ratio
        out = self.expansion * filters
        bn_args = dict(batch_norm_decay=self.batch_norm_decay, global_bn=self.global_bn)
        self.shortcut = (ProjectionShortcut(out, strides, resnet_d=sk_ratio > 0, name='shortcut',
                                            **bn_args) if use_projection else None)
        self.se = SqueezeExcitation(filters, se_ratio, out, name='se') if se_ratio > 0 else None

    def _conv_bn_relu(self, filters: int, strides: int, index: int,
                      selective_kernel: bool = False) -> list[keras.layers.Layer]:
        """The block's 3x3 conv + BN-ReLU, or an SK conv (which carries its own BN-ReLU)."""
        if selective_kernel and self.sk_ratio > 0:
            return [SelectiveKernelConv(filters, strides, self.sk_ratio, name=f'sk_conv_{index}',
                                        batch_norm_decay=self.batch_norm_decay,
                                        global_bn=self.global_bn)]
        return [Conv2dFixedPadding(filters, 3, strides, name=f'conv_{index}'),
                self._bn(f'bn_{index}'), keras.layers.ReLU(name=f'relu_{index}')]

    def build(self, input_shape):
        if self.shortcut is not None:
            self.shortcut.build(input_shape)
        shape = _build_sequence(self.residual, input_shape)
        if self.se is not None:
            self.se.build(shape)

    def compute_output_shape(self, input_shape):
        return _output_shape(self.residual, input_shape)

    @property
    def residual(self) -> list[keras.layers.Layer]:
        """The residual branch, in order."""
        return get_layers(self, self._residual)

    def call(self, inputs, training: bool = False):
        shortcut = inputs if self.shortcut is None else self.shortcut(inputs, training=training)
        x = inputs
        for layer in self.residual:  # Keras 3 passes `training` only to layers that take it
            x = layer(x, training=training)
        if self.se is not None:
            x = self.se(x)
        return tf.nn.relu(x + shortcut)

    def get_config(self) -> dict:
        return {**super().get_config(), 'filters': self.filters, 'strides': self.strides,
                'use_projection': self.use_projection, 'sk_ratio': self.sk_ratio,
                'se_ratio': self.se_ratio}


class ResidualBlock(_Block):
    """Basic block: 3x3 conv (strided) → BN-ReLU → 3x3 conv → BN (γ=0), plus the shortcut.
    `sk_ratio > 0` changes only the shortcut (ResNet-D), as the authors: no SK conv here."""

    expansion = 1

    def __init__(self, filters: int, strides: int, **kwargs):
        super().__init__(filters, strides, **kwargs)
        self._residual = set_layers(self, self._conv_bn_relu(filters, strides, 0) + [
            Conv2dFixedPadding(filters, 3, 1, name='conv_1'), self._bn('bn_1', zero_init=True)])


class BottleneckBlock(_Block):
    """Bottleneck: 1x1 → BN-ReLU → 3x3 (strided, v1.5) → BN-ReLU → 1x1 (4×) → BN (γ=0)."""

    expansion = 4

    def __init__(self, filters: int, strides: int, **kwargs):
        super().__init__(filters, strides, **kwargs)
        self._residual = set_layers(self, (
            [Conv2dFixedPadding(filters, 1, 1, name='conv_0'), self._bn('bn_0'),
             keras.layers.ReLU(name='relu_0')]
            + self._conv_bn_relu(filters, strides, 1, selective_kernel=True)
            + [Conv2dFixedPadding(4 * filters, 1, 1, name='conv_2'),
               self._bn('bn_2', zero_init=True)]))


BLOCKS = {'basic': ResidualBlock, 'bottleneck': BottleneckBlock}


class BlockGroup(keras.layers.Layer):
    """`num_blocks` blocks; the first one strides and projects its shortcut (as the authors,
    even when the shape is unchanged, e.g. the first group of ResNet-18/34)."""

    def __init__(self, filters: int, block: str, num_blocks: int, strides: int,
                 block_args: Optional[dict] = None, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.block, self.strides = filters, block, strides
        self.num_blocks = num_blocks
        self.block_args = dict(block_args or {})
        self._blocks = set_layers(self, [
            BLOCKS[block](filters, strides if i == 0 else 1, use_projection=i == 0,
                          name=f'block_{i}', **self.block_args)
            for i in range(num_blocks)])

    @property
    def blocks(self) -> list[_Block]:
        return get_layers(self, self._blocks)

    def build(self, input_shape):
        _build_sequence(self.blocks, input_shape)

    def compute_output_shape(self, input_shape):
        return _output_shape(self.blocks, input_shape)

    def call(self, inputs, training: bool = False):
        for block in self.blocks:
            inputs = block(inputs, training=training)
        return inputs

    def get_config(self) -> dict:
        return {**super().get_config(), 'filters': self.filters, 'block': self.block,
                'num_blocks': self.num_blocks, 'strides': self.strides,
                'block_args': self.block_args}


class Stem(_BNLayer):
    """CIFAR: 3x3/1 conv, BN-ReLU. ImageNet: 7x7/2 conv (SK: three 3x3 convs, the first /2,
    widths c/2, c/2, c), BN-ReLU, 3x3/2 max pool. Returns (initial_conv, initial_max_pool)."""

    def __init__(self, filters: int, cifar_stem: bool = False, deep: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.cifar_stem, self.deep = filters, cifar_stem, deep
        if cifar_stem:
            convs = [Conv2dFixedPadding(filters, 3, 1, name='conv_0')]
        elif deep:
            half = max(1, filters // 2)
            convs = [Conv2dFixedPadding(half, 3, 2, name='conv_0'), self._bn('bn_0'),
                     keras.layers.ReLU(name='relu_0'),
                     Conv2dFixedPadding(half, 3, 1, name='conv_1'), self._bn('bn_1'),
                     keras.layers.ReLU(name='relu_1'),
                     Conv2dFixedPadding(filters, 3, 1, name='conv_2')]
        else:
            convs = [Conv2dFixedPadding(filters, 7, 2, name='conv_0')]
        self._convs = set_layers(self, convs)
        self.bn = self._bn('bn')
        self.max_pool = (None if cifar_stem else
                         keras.layers.MaxPooling2D(3, 2, padding='same', name='max_pool'))

    @property
    def convs(self) -> list[keras.layers.Layer]:
        """The layers up to `initial_conv`."""
        return get_layers(self, self._convs)

    def _tail(self) -> list:
        return [self.bn] + ([] if self.max_pool is None else [self.max_pool])

    def build(self, input_shape):
        _build_sequence(self._tail(), _build_sequence(self.convs, input_shape))

    def compute_output_shape(self, input_shape):
        initial_conv = _output_shape(self.convs, input_shape)
        return initial_conv, _output_shape(self._tail(), initial_conv)

    def call(self, inputs, training: bool = False):
        x = inputs
        for layer in self.convs:
            x = layer(x, training=training)
        initial_conv = x
        x = tf.nn.relu(self.bn(x, training=training))
        if self.max_pool is not None:
            x = self.max_pool(x)
        return initial_conv, x

    def get_config(self) -> dict:
        return {**super().get_config(), 'filters': self.filters, 'cifar_stem': self.cifar_stem,
                'deep': self.deep}


class ResNet(keras.layers.Layer):
    """ResNet v1.5 encoder returning its named stages (see the module docstring)."""

    def __init__(self, depth: int = 50, width_multiplier: float = 1.0, cifar_stem: bool = False,
                 sk_ratio: float = 0.0, se_ratio: float = 0.0, batch_norm_decay: float = 0.9,
                 global_bn: bool = False, fine_tune_after_block: int = -1,
                 frozen_bn: str = 'batch', name: str = 'resnet', **kwargs):
        super().__init__(name=name, **kwargs)
        if depth not in ARCHITECTURES:
            raise ValueError(f'resnet depth {depth} is not one of {sorted(ARCHITECTURES)}')
        if not -1 <= fine_tune_after_block <= 4:
            raise ValueError(f'fine_tune_after_block={fine_tune_after_block} must be in [-1, 4]')
        self.depth, self.width_multiplier, self.cifar_stem = depth, width_multiplier, cifar_stem
        self.sk_ratio, self.se_ratio = sk_ratio, se_ratio
        self.batch_norm_decay, self.global_bn = batch_norm_decay, global_bn
        self.fine_tune_after_block, self.frozen_bn = fine_tune_after_block, frozen_bn

        bn_args = dict(batch_norm_decay=batch_norm_decay, global_bn=global_bn)
        block, num_blocks = ARCHITECTURES[depth]
        self.stem = Stem(channels(64, width_multiplier), cifar_stem=cifar_stem,
                         deep=sk_ratio > 0, name='stem', **bn_args)
        self._block_groups = set_layers(self, [
            BlockGroup(channels(64 * 2**i, width_multiplier), block, n, 1 if i == 0 else 2,
                       block_args=dict(sk_ratio=sk_ratio, se_ratio=se_ratio, **bn_args),
                       name=f'block_group{i + 1}')
            for i, n in enumerate(num_blocks)])

    @property
    def block_groups(self) -> list[BlockGroup]:
        return get_layers(self, self._block_groups)

    @property
    def frozen_stages(self) -> list[keras.layers.Layer]:
        """The stem and block groups up to `fine_tune_after_block`."""
        return ([self.stem] + self.block_groups)[:self.fine_tune_after_block + 1]

    def build(self, input_shape):
        self.stem.build(input_shape)
        _build_sequence(self.block_groups, self.stem.compute_output_shape(input_shape)[1])
        for stage in self.frozen_stages:
            freeze(stage, self.frozen_bn)

    def compute_output_shape(self, input_shape):
        initial_conv, shape = self.stem.compute_output_shape(input_shape)
        shapes = {'initial_conv': initial_conv, 'initial_max_pool': shape}
        for name, group in zip(STAGES[2:], self.block_groups):
            shapes[name] = shape = group.compute_output_shape(shape)
        shapes['final_avg_pool'] = (shape[0], shape[-1])
        return shapes

    @property
    def output_dim(self) -> int:
        """Size of h (final_avg_pool)."""
        return output_dim(self.depth, self.width_multiplier)

    def _end_of_stage(self, x: tf.Tensor, stage: int) -> tf.Tensor:
        """Stages up to `fine_tune_after_block` get no gradient."""
        return tf.stop_gradient(x) if stage == self.fine_tune_after_block else x

    def call(self, images, training: bool = False) -> dict[str, tf.Tensor]:
        outputs = {}
        outputs['initial_conv'], x = self.stem(images, training=training)
        outputs['initial_max_pool'] = x = self._end_of_stage(x, 0)
        for stage, group in enumerate(self.block_groups, start=1):
            x = self._end_of_stage(group(x, training=training), stage)
            outputs[f'block_group{stage}'] = x
        outputs['final_avg_pool'] = tf.reduce_mean(tf.cast(x, tf.float32), axis=[1, 2])
        return {name: tf.cast(outputs[name], tf.float32) for name in STAGES}

    def get_config(self) -> dict:
        return {**super().get_config(), 'depth': self.depth,
                'width_multiplier': self.width_multiplier, 'cifar_stem': self.cifar_stem,
                'sk_ratio': self.sk_ratio, 'se_ratio': self.se_ratio,
                'batch_norm_decay': self.batch_norm_decay, 'global_bn': self.global_bn,
                'fine_tune_after_block': self.fine_tune_after_block, 'frozen_bn': self.frozen_bn}


def output_dim(depth: int, width_multiplier: float) -> int:
    """Size of h (final_avg_pool) of a ResNet of this depth and width, without building it."""
    return BLOCKS[ARCHITECTURES[depth][0]].expansion * channels(512, width_multiplier)


def resnet_from_config(config: Config) -> ResNet:
    """The encoder a Config describes; freezing applies only when training a classifier."""
    return ResNet(
        depth=config.resnet_depth, width_multiplier=config.width_multiplier,
        cifar_stem=config.cifar_stem, sk_ratio=config.sk_ratio, se_ratio=config.se_ratio,
        batch_norm_decay=config.batch_norm_decay, global_bn=config.global_bn,
        fine_tune_after_block=(config.fine_tune_after_block
                               if config.trains_classifier else -1),
        frozen_bn=config.frozen_bn)
