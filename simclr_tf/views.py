"""The views of a run: which augmentations make one, and where each runs (one plan, printed).

A pretraining view is `config.augmentation_list` applied in order (paper §3, Appendix A). Its ops
run in three places:

- on the host, image by image: every op of the input stream when the source's images differ in
  size (a batch needs one size), each image decoded for them (a JPEG only in the window its
  crops need);
- on the host, on whole batches: every op of the input stream when the images share one size;
- in the training step, on whole batches: blur, as in the authors' code (their model's call), and
  the colour distortion where the plan puts it there.

Where the colour distortion runs is the one choice (`config.augment_placement`). `host` is the
authors' placement. `step` moves it off the host into the step's compiled program, where an
accelerator runs it and the host is left the decode and crops, the input's bound at 224 px.
`auto` takes `step` on a GPU or TPU and, on a CPU-only run, where the step and the stream share
the same cores, the placement measured faster for the source's geometry (`CPU_COLOR`). Only a
view's last op before blur can move: ops after it need its output. Every placement draws from
the same distributions; the draws themselves differ (the host keys them by image, the step by
(seed, step, replica)). So a resumed run continues exactly under the placement it had, and under
another (the flag changed, or `auto` on other hardware) with the same distributions, other draws.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import tensorflow as tf

from simclr_tf import augment
from simclr_tf.config import Config, ConfigError

# auto's placement of the colour distortion on a CPU-only run, by the source's geometry, from
# end-to-end measurements (docs/benchmarks.md, "Where the colour distortion runs"): there the
# stream and the step share the cores, and both placements cost the same within the noise at
# either geometry, so the authors' placement stays. A geometry where the step wins would say so.
CPU_COLOR = {'one size': 'host', 'mixed sizes': 'host'}

# How a view's random crop is cut, by where the images come from.
CROPS = {
    'batch': 'random crops of whole batches (images of one size)',
    'window': 'random crops, each JPEG decoded only in its crops\' window',
    'image': 'random crops of each image, decoded whole',
    'central': 'eval: the central crop (the image as it is at <= 32 px)',
    'none': 'no crop',
}


@dataclasses.dataclass(frozen=True)
class ViewPlan:
    """Where each augmentation of a run's views runs. `data.build_dataset` applies the host's
    ops, `step_views` the step's; nothing else decides."""
    views: int  # views of each image: 2 in pretraining, else 1
    host: tuple[str, ...]  # the input stream's ops, in order
    batched: bool  # the stream's ops run on whole batches (one image size), else image by image
    in_step: tuple[str, ...]  # the training step's ops, on whole batches
    crop: str  # how a view's crop is cut: a key of CROPS
    color: str  # where the colour distortion runs: 'host', 'step' or 'none'
    reason: str  # why there

    def line(self) -> str:
        """The plan in one line, as a run prints it at its start."""
        def ops(names):
            return ', '.join(names) or '-'
        where = 'on whole batches' if self.batched else 'image by image'
        return (f'views: {self.views} view{"s" if self.views > 1 else ""} of each image; input '
                f'stream ({where}): {ops(self.host)}; '
                f'training step: {ops(self.in_step)}; crop: {CROPS[self.crop]}; colour '
                f'distortion: {self.color} ({self.reason})')


def has_accelerator() -> bool:
    """Whether this process sees a GPU or TPU (else the training step runs on the CPU)."""
    return bool(tf.config.list_logical_devices('GPU') or tf.config.list_logical_devices('TPU'))


def plan_views(config: Config, training: bool, size: Optional[tuple[int, int]], files: bool,
               accelerator: bool) -> ViewPlan:
    """The plan for `config`'s training (or eval) stream of a source whose images all have
    `size` (height, width), or None for mixed sizes; `files`: its examples are encoded image
    files (so a JPEG can be decoded for its crops' window); `accelerator`: the training step runs
    on a GPU or TPU."""
    pretrain = training and config.train_mode == 'pretrain'
    names = (augment.pretrain_ops(config) if pretrain else augment.FINETUNE_OPS if training
             else ())
    color, reason = (_color_placement(config, names, size, accelerator) if pretrain
                     else ('none', 'not pretraining'))
    host = names[:-1] if color == 'step' else names
    crop_at = host.index('crop') + 1 if 'crop' in host else 0
    # A quarter turn before the crop keeps one size only if the images are square.
    one_size = size is not None and (size[0] == size[1] or 'rotate' not in host[:crop_at])
    if not training:
        crop = 'central'
    elif 'crop' not in host:
        crop = 'none'
    elif one_size:
        crop = 'batch'
    else:
        crop = ('window' if host[0] == 'crop' and files and not config.cache_dataset
                else 'image')
    blur = pretrain and 'blur' in config.augmentation_list and config.use_blur
    return ViewPlan(views=2 if pretrain else 1, host=host, batched=one_size,
                    in_step=(('color',) if color == 'step' else ()) + (('blur',) if blur else ()),
                    crop=crop, color=color, reason=reason)


def _color_placement(config: Config, names: tuple[str, ...], size: Optional[tuple[int, int]],
                     accelerator: bool) -> tuple[str, str]:
    """Where a pretraining view's colour distortion runs, and why."""
    if 'color' not in names or config.color_jitter_strength <= 0:
        return 'none', 'not in the augmentations' if 'color' not in names else 'strength 0'
    chosen = config.augment_placement
    if chosen == 'host':
        return 'host', "--augment_placement=host, the authors' placement"
    if names[-1] != 'color':
        if chosen == 'step':
            raise ConfigError(
                f'augment_placement=step moves the colour distortion into the training step, '
                f'which needs it to be the last op before blur; augmentations='
                f'{config.augmentations!r} has {", ".join(names[names.index("color") + 1:])} '
                'after it. Reorder them or use --augment_placement=auto or host')
        return 'host', 'ops after it in the view need it done first'
    if chosen == 'step':
        return 'step', '--augment_placement=step'
    if accelerator:
        return 'step', 'auto: the training step runs on an accelerator'
    geometry = 'one size' if size else 'mixed sizes'
    return CPU_COLOR[geometry], f'auto: CPU only, images of {geometry}'


def step_views(views: list[tf.Tensor], plan: ViewPlan, config: Config,
               seed: Optional[augment.Seed] = None) -> list[tf.Tensor]:
    """What the training step does to the stream's [b, S, S, 3] views: the plan's `in_step` ops
    (the colour distortion, each image its own draw, compiled; then blur). Under a distribution
    strategy give each replica its own seed."""
    color_seed, blur_seed = ((None, None) if seed is None
                             else augment.split_seed(augment.stateless_seed(seed), 2))
    if 'color' in plan.in_step:
        seeds = augment.split_seed(augment.stateless_seed(color_seed), len(views))
        views = [augment.random_color_distortion(v, config, s, jit=True)
                 for v, s in zip(views, seeds)]
    if 'blur' in plan.in_step:
        views = augment.batch_random_blur(views, config, blur_seed)
    return views
