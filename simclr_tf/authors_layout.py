"""The authors' TF2 model (google-research/simclr `tf2/`) as a layout: for an `Architecture`, each
of their variables with its checkpoint key (`model/resnet_model/block_groups/0/layers/0/...`), its
shape, whether their model trains it, and the `.path` of the variable of this project's model that
takes its value, in the order tf-keras lists their variables (what their SavedModel keeps as
`model/<part>/variables/<i>`). Generated from the structure of their layers (which Keras
attribute holds which sub-layer, in what order), checked against layouts made by running their
code (tests/test_authors.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from simclr_tf.config import Config
from simclr_tf.resnet import ARCHITECTURES, channels, output_dim

SUFFIX = '/.ATTRIBUTES/VARIABLE_VALUE'
PARTS = ('resnet_model', '_projection_head', 'supervised_head')
SK_MIN_DIM = 32  # the authors' SK_Conv2D min_dim
DEFAULT_SK_RATIO = 0.0625  # SimCLRv2's


# ------------------------------------------------------------------ architecture
@dataclass(frozen=True)
class Architecture:
    """What the authors' variables determine (and `ft_proj_selector`, which they do not)."""
    resnet_depth: int = 50
    width_multiplier: float = 1.0
    cifar_stem: bool = False
    sk_ratio: float = 0.0
    se_ratio: float = 0.0
    proj_head_mode: str = 'nonlinear'  # none | linear | nonlinear
    num_proj_layers: int = 3
    proj_out_dim: int = 128
    num_classes: Optional[int] = None  # None: no supervised head
    ft_proj_selector: int = 0

    @classmethod
    def of(cls, config: Config, num_classes: Optional[int]) -> 'Architecture':
        return cls(config.resnet_depth, config.width_multiplier, config.cifar_stem,
                   config.sk_ratio, config.se_ratio, config.proj_head_mode,
                   config.num_proj_outputs, config.proj_out_dim, num_classes,
                   config.ft_proj_index)  # -1 (z) as the index the layout compares

    @property
    def h_dim(self) -> int:
        return output_dim(self.resnet_depth, self.width_multiplier)

    def describe(self) -> str:
        parts = [f'ResNet-{self.resnet_depth} {self.width_multiplier:g}x',
                 f'sk_ratio={self.sk_ratio:g}', f'se_ratio={self.se_ratio:g}',
                 'CIFAR stem' if self.cifar_stem else 'ImageNet stem']
        if self.proj_head_mode == 'none' or not self.num_proj_layers:
            parts.append('no projection head')
        else:
            parts.append(f'projection head {self.num_proj_layers} layers -> {self.proj_out_dim}')
        parts.append('no supervised head' if self.num_classes is None
                     else f'supervised head {self.num_classes} classes')
        return ', '.join(parts)


# ------------------------------------------------------------------ the authors' layout
@dataclass(frozen=True)
class Entry:
    key: str  # the authors' checkpoint key, without SUFFIX
    shape: tuple[int, ...]
    ours: str  # .path of this project's variable
    trainable: bool  # trainable as a weight kind (kernel, gamma, beta, bias)
    free: bool = False  # its shape depends on sk_ratio or se_ratio


@dataclass
class Layer:
    """A tf-keras layer of the authors' model: own weights, then tracked sub-layers in order."""
    weights: list[Entry] = dataclasses.field(default_factory=list)
    children: list['Layer'] = dataclasses.field(default_factory=list)
    trainable: bool = True


def trainable_weights(layer: Layer) -> list[Entry]:
    """tf-keras `Layer.trainable_weights`."""
    if not layer.trainable:
        return []
    return [w for w in layer.weights if w.trainable] + [
        w for c in layer.children for w in trainable_weights(c)]


def non_trainable_weights(layer: Layer) -> list[Entry]:
    """tf-keras `Layer.non_trainable_weights` (a frozen layer lists all its children's)."""
    if layer.trainable:
        return [w for w in layer.weights if not w.trainable] + [
            w for c in layer.children for w in non_trainable_weights(c)]
    own = [w for w in layer.weights if w.trainable] + [w for w in layer.weights if not w.trainable]
    return own + [w for c in layer.children for w in all_weights(c)]


def all_weights(layer: Layer) -> list[Entry]:
    """tf-keras `Layer.weights` (= `.variables`)."""
    return trainable_weights(layer) + non_trainable_weights(layer)


class Builder:
    """Generates the authors' layer tree for one Architecture."""

    def __init__(self, arch: Architecture, frozen_stages: int = -1):
        self.arch, self.frozen = arch, frozen_stages

    @staticmethod
    def _kernel(key: str, shape: tuple, ours: str, bias: Optional[int] = None,
                free: bool = False) -> Layer:
        weights = [Entry(f'{key}/kernel', tuple(shape), f'{ours}/kernel', True, free)]
        if bias is not None:
            weights.append(Entry(f'{key}/bias', (bias,), f'{ours}/bias', True, free))
        return Layer(weights)

    def conv(self, key: str, shape: tuple, ours: str) -> Layer:
        """Their Conv2dFixedPadding (a Conv2D under `conv2d`)."""
        return Layer(children=[self._kernel(f'{key}/conv2d', shape, ours)])

    @staticmethod
    def bn(key: str, c: int, ours: str, center: bool = True, free: bool = False) -> Layer:
        """Their BatchNormRelu (a BN under `bn`)."""
        names = ['gamma'] + (['beta'] if center else [])
        weights = [Entry(f'{key}/bn/{n}', (c,), f'{ours}/{n}', True, free) for n in names] + [
            Entry(f'{key}/bn/{n}', (c,), f'{ours}/{n}', False, free)
            for n in ('moving_mean', 'moving_variance')]
        return Layer(children=[Layer(weights)])

    # -------------------------------------------------------------- encoder
    def stem(self, key: str) -> list[Layer]:
        a = self.arch
        c = channels(64, a.width_multiplier)
        ours = 'resnet/stem'
        if a.cifar_stem:
            items = [self.conv(f'{key}/0', (3, 3, 3, c), f'{ours}/conv_0'),
                     self.bn(f'{key}/2', c, f'{ours}/bn')]
        elif a.sk_ratio > 0:
            half = max(1, c // 2)
            items = [self.conv(f'{key}/0', (3, 3, 3, half), f'{ours}/conv_0'),
                     self.bn(f'{key}/1', half, f'{ours}/bn_0'),
                     self.conv(f'{key}/2', (3, 3, half, half), f'{ours}/conv_1'),
                     self.bn(f'{key}/3', half, f'{ours}/bn_1'),
                     self.conv(f'{key}/4', (3, 3, half, c), f'{ours}/conv_2'),
                     self.bn(f'{key}/6', c, f'{ours}/bn')]
        else:
            items = [self.conv(f'{key}/0', (7, 7, 3, c), f'{ours}/conv_0'),
                     self.bn(f'{key}/2', c, f'{ours}/bn')]
        for item in items:  # the authors pass `trainable` to each stem layer
            item.trainable = self.frozen < 0
        return items

    def shortcut(self, key: str, c_in: int, c_out: int, strides: int, ours: str) -> list[Layer]:
        i = 0
        if self.arch.sk_ratio > 0:  # ResNet-D: [pad], avg pool, 1x1 conv, BN
            i = 2 if strides > 1 else 1
        return [self.conv(f'{key}/{i}', (1, 1, c_in, c_out), f'{ours}/conv'),
                self.bn(f'{key}/{i + 1}', c_out, f'{ours}/bn')]

    def sk(self, key: str, c_in: int, f: int, ours: str) -> Layer:
        mid = max(int(f * self.arch.sk_ratio), SK_MIN_DIM)
        return Layer(children=[
            self.conv(f'{key}/conv2d_fixed_padding', (3, 3, c_in, 2 * f), f'{ours}/conv'),
            self.bn(f'{key}/batch_norm_relu', 2 * f, f'{ours}/bn'),
            self._kernel(f'{key}/conv2d_0', (1, 1, f, mid), f'{ours}/fc_reduce', free=True),
            self.bn(f'{key}/batch_norm_relu_1', mid, f'{ours}/bn_reduce', free=True),
            self._kernel(f'{key}/conv2d_1', (1, 1, mid, 2 * f), f'{ours}/fc_expand', free=True)])

    def se(self, key: str, f: int, c_out: int, ours: str) -> Layer:
        r = max(1, int(f * self.arch.se_ratio))
        return Layer(children=[self._kernel(f'{key}/se_reduce', (1, 1, c_out, r),
                                             f'{ours}/reduce', bias=r, free=True),
                                self._kernel(f'{key}/se_expand', (1, 1, r, c_out),
                                             f'{ours}/expand', bias=c_out, free=True)])

    def bottleneck(self, key: str, c_in: int, f: int, strides: int, project: bool,
                   ours: str) -> Layer:
        a, out = self.arch, 4 * f
        layers = []
        if project:
            layers += self.shortcut(f'{key}/projection_layers', c_in, out, strides,
                                    f'{ours}/shortcut')
        k = f'{key}/conv_relu_dropblock_layers'
        main = [self.conv(f'{k}/0', (1, 1, c_in, f), f'{ours}/conv_0'),
                self.bn(f'{k}/1', f, f'{ours}/bn_0')]  # 2: DropBlock
        if a.sk_ratio > 0:
            main.append(self.sk(f'{k}/3', f, f, f'{ours}/sk_conv_1'))  # 4: DropBlock
            i = 5
        else:
            main += [self.conv(f'{k}/3', (3, 3, f, f), f'{ours}/conv_1'),
                     self.bn(f'{k}/4', f, f'{ours}/bn_1')]  # 5: DropBlock
            i = 6
        main += [self.conv(f'{k}/{i}', (1, 1, f, out), f'{ours}/conv_2'),
                 self.bn(f'{k}/{i + 1}', out, f'{ours}/bn_2')]  # i + 2: DropBlock
        if a.se_ratio > 0:
            main.append(self.se(f'{k}/{i + 3}', f, out, f'{ours}/se'))
        return Layer(children=layers + main)

    def basic(self, key: str, c_in: int, f: int, strides: int, project: bool,
              ours: str) -> Layer:
        k = f'{key}/conv2d_bn_layers'  # tracked before shortcut_layers
        layers = [self.conv(f'{k}/0', (3, 3, c_in, f), f'{ours}/conv_0'),
                  self.bn(f'{k}/1', f, f'{ours}/bn_0'),
                  self.conv(f'{k}/2', (3, 3, f, f), f'{ours}/conv_1'),
                  self.bn(f'{k}/3', f, f'{ours}/bn_1')]
        if project:
            layers += self.shortcut(f'{key}/shortcut_layers', c_in, f, strides, f'{ours}/shortcut')
        if self.arch.se_ratio > 0:
            layers.append(self.se(f'{key}/se_layer', f, f, f'{ours}/se'))
        return Layer(children=layers)

    def resnet(self, key: str) -> Layer:
        a = self.arch
        block_type, counts = ARCHITECTURES[a.resnet_depth]
        expansion = 4 if block_type == 'bottleneck' else 1
        block = self.bottleneck if block_type == 'bottleneck' else self.basic
        c_in = channels(64, a.width_multiplier)
        groups = []
        for g, n in enumerate(counts):
            f = channels(64 * 2**g, a.width_multiplier)
            blocks = []
            for j in range(n):
                blocks.append(block(f'{key}/block_groups/{g}/layers/{j}', c_in, f,
                                    (1 if g == 0 else 2) if j == 0 else 1, j == 0,
                                    f'resnet/block_group{g + 1}/block_{j}'))
                c_in = expansion * f
            groups.append(Layer(children=blocks, trainable=self.frozen < g + 1))
        return Layer(children=self.stem(f'{key}/initial_conv_relu_max_pool') + groups)

    # -------------------------------------------------------------- heads
    def linear(self, key: str, d_in: int, units: int, center: bool, use_bn: bool,
               ours: str) -> Layer:
        """Their LinearLayer: `bn_relu` (set in __init__) is tracked before `dense` (build)."""
        children = [self.bn(f'{key}/bn_relu', units, f'{ours}/bn', center=center)] if use_bn else []
        children.append(self._kernel(f'{key}/dense', (d_in, units), f'{ours}/dense',
                                     bias=None if use_bn else units))
        return Layer(children=children)

    def projection_head(self, key: str) -> Layer:
        a = self.arch
        n = a.num_proj_layers if a.proj_head_mode != 'none' else 0
        prefix = 'l' if a.proj_head_mode == 'linear' else 'nl'
        d = a.h_dim
        return Layer(children=[
            self.linear(f'{key}/linear_layers/{j}', d, a.proj_out_dim if j == n - 1 else d,
                        center=j < n - 1, use_bn=True, ours=f'head_contrastive/{prefix}_{j}')
            for j in range(n)])

    def supervised_head(self, key: str) -> Layer:
        a = self.arch
        n = a.num_proj_layers if a.proj_head_mode != 'none' else 0
        d_in = a.proj_out_dim if a.ft_proj_selector == n and n > 0 else a.h_dim
        return Layer(children=[self.linear(f'{key}/linear_layer', d_in, a.num_classes,
                                            center=True, use_bn=False,
                                            ours='head_supervised/linear_layer')])

    def parts(self) -> dict[str, Layer]:
        parts = {'resnet_model': self.resnet('model/resnet_model'),
                 '_projection_head': self.projection_head('model/_projection_head')}
        if self.arch.num_classes is not None:
            parts['supervised_head'] = self.supervised_head('model/supervised_head')
        return parts


def layout(arch: Architecture, frozen_stages: int = -1) -> dict[str, list[Entry]]:
    """The authors' variables of each model part, in their tf-keras `variables` order (what their
    SavedModel lists as `model/<part>/variables/<i>`). `frozen_stages` is their
    `fine_tune_after_block` when they fine-tuned (frozen stages change the order)."""
    return {name: all_weights(part) for name, part in Builder(arch, frozen_stages).parts().items()}


def checkpoint_layout(arch: Architecture) -> dict[str, Entry]:
    """Authors' checkpoint key (with SUFFIX) -> Entry."""
    return {e.key + SUFFIX: e for part in layout(arch).values() for e in part}
