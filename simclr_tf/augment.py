"""The stochastic data augmentation module (paper §3, Appendix A): the ops, and a view made of them.

Every op works on a batch of float32 images in [0, 1], [b, H, W, 3], with its own random
parameters per image, drawn by stateless ops from one seed (shape [2] int): a view is a pure
function of (images, seed). Working on whole batches lets a stream or a training step run one
graph call per batch instead of one per image.

The public API: `preprocess_for_pretrain`, `preprocess_for_finetune` and `preprocess_for_eval`
(one view of an image [H, W, 3] or a batch, for a pipeline of your own), `view` (any list of
ops), the ops themselves (`random_resized_crop` with the authors' crop draw `sample_crops`,
`random_flip`, `random_color_distortion` = `apply_color` of a `draw_color`, `to_grayscale`,
`batch_random_blur` with `gaussian_blur`, and the paper's other ablation ops of Figure 5:
`cutout`, `sobel`, `gaussian_noise`, `random_rotate`), and what the input pipeline builds on
(`finish_views`, `resized_crop`, `sample_views`, `op_seeds`). Where each op runs in a training
run (image by image, on batches, or in the training step) is decided by `views`, not here.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import tensorflow as tf

from simclr_tf import config as config_lib
from simclr_tf.config import Config

CROP_AREA = (0.08, 1.0)
CROP_ASPECT = (3 / 4, 4 / 3)  # width / height
CROP_ATTEMPTS = 100
CROP_MIN_COVERED = 0.1  # of the whole image: the authors' min_object_covered
EVAL_CROP_PROPORTION = 0.875
JITTER_P, GRAYSCALE_P, BLUR_P, FLIP_P = 0.8, 0.2, 0.5, 0.5
BLUR_SIGMA = (0.1, 2.0)
CUTOUT_SIDE = 0.5  # of the shorter side, as DeVries & Taylor's 16 px square on 32 px CIFAR
NOISE_STD_MAX = 0.1  # sigma ~ U(0, 0.1) per image, on the [0, 1] scale

Seed = tf.Tensor
RNG = 'philox'


def stateless_seed(seed: Optional[Seed]) -> Seed:
    """A stateless seed: the given one, or a fresh random one."""
    if seed is None:
        return tf.random.uniform([2], maxval=2**31 - 1, dtype=tf.int64)
    return tf.cast(seed, tf.int64)


# Philox named, not left to 'auto_select'. (XLA-compiled ops still draw other numbers than
# plain ones from the same seed; both are deterministic.)
def split_seed(seed: Seed, n: int) -> list[Seed]:
    """n independent stateless seeds from one."""
    return tf.unstack(tf.random.experimental.stateless_split(seed, n, alg=RNG))


def _uniform(seed: Seed, shape, low: float = 0.0, high: float = 1.0, dtype=tf.float32
             ) -> tf.Tensor:
    return tf.random.stateless_uniform(shape, seed, minval=low, maxval=high, dtype=dtype,
                                       alg=RNG)


def _per_image(x: tf.Tensor) -> tf.Tensor:
    """[b] -> [b, 1, 1, 1], to broadcast a per-image value over pixels."""
    return x[:, None, None, None]


def _select(fired: tf.Tensor, a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    return tf.where(_per_image(fired), a, b)


def to_float(image: tf.Tensor) -> tf.Tensor:
    """uint8 [0, 255] or float [0, 1] -> float32 [0, 1]."""
    return tf.image.convert_image_dtype(image, tf.float32)


# ---------------------------------------------------------------- crop and resize
def _round(x: tf.Tensor) -> tf.Tensor:
    return tf.round(x)  # half to even, as C's lrintf


def sample_crops(height, width, n, seed: Seed) -> tf.Tensor:
    """[n, 4] boxes (top, left, height, width) of random crops of an image of height x width,
    drawn as the authors draw them: TensorFlow's `sample_distorted_bounding_box` with area range
    (0.08, 1), aspect ratio (width / height) range (3/4, 4/3), min_object_covered 0.1 of the
    whole image, 100 attempts, the whole image if none succeeds.

    Each attempt (all drawn at once) follows the op's kernel: aspect ratio a ~ U(3/4, 4/3); the
    crop height uniform over the integers between round(sqrt(min_area / a)) and
    round(sqrt(max_area / a)) (capped so round(height * a) fits the width and height fits the
    height); width round(height * a); one step up or down if rounding left the area range;
    rejected if outside the ranges or under 10 % of the image. The offsets are uniform over
    [0, H - h) and [0, W - w), as the kernel's (never touching the far edge unless the crop
    spans the image). Seeded: the boxes are a pure function of (height, width, n, seed)."""
    aspect_seed, height_seed, offset_seed = split_seed(seed, 3)
    big_h, big_w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    min_area = CROP_AREA[0] * big_w * big_h  # float32, the kernel's order of operations
    max_area = CROP_AREA[1] * big_w * big_h
    aspect = _uniform(aspect_seed, [n, CROP_ATTEMPTS], *CROP_ASPECT)
    low = _round(tf.sqrt(min_area / aspect))
    high = _round(tf.sqrt(max_area / aspect))
    # The largest height whose rounded width fits (the kernel computes this one in double).
    fit = tf.cast(tf.floor((tf.cast(width, tf.float64) + 0.5 - 1e-7) / tf.cast(aspect, tf.float64)),
                  tf.float32)
    fit = tf.where(_round(fit * aspect) > big_w, fit - 1, fit)
    high = tf.minimum(tf.where(_round(high * aspect) > big_w, fit, high), big_h)
    low = tf.minimum(low, high)
    span = high - low + 1
    crop_h = low + tf.minimum(tf.floor(_uniform(height_seed, [n, CROP_ATTEMPTS]) * span), span - 1)
    crop_w = _round(crop_h * aspect)
    area = crop_w * crop_h
    grow = area < min_area
    crop_h = tf.where(grow, crop_h + 1, crop_h)
    crop_w = tf.where(grow, _round(crop_h * aspect), crop_w)
    area = crop_w * crop_h
    shrink = area > max_area
    crop_h = tf.where(shrink, crop_h - 1, crop_h)
    crop_w = tf.where(shrink, _round(crop_h * aspect), crop_w)
    area = crop_w * crop_h
    ok = ((area >= min_area) & (area <= max_area) & (crop_w <= big_w) & (crop_h <= big_h)
          & (crop_w > 0) & (crop_h > 0) & (area / (big_w * big_h) >= CROP_MIN_COVERED))
    first = tf.argmax(tf.cast(ok, tf.int32), axis=1)[:, None]
    found = tf.reduce_any(ok, axis=1)
    crop_h = tf.where(found, tf.gather(crop_h, first, batch_dims=1)[:, 0], big_h)
    crop_w = tf.where(found, tf.gather(crop_w, first, batch_dims=1)[:, 0], big_w)
    u = _uniform(offset_seed, [2, n])
    top = tf.minimum(tf.floor(u[0] * (big_h - crop_h)), tf.maximum(big_h - crop_h - 1, 0))
    left = tf.minimum(tf.floor(u[1] * (big_w - crop_w)), tf.maximum(big_w - crop_w - 1, 0))
    return tf.cast(tf.stack([top, left, crop_h, crop_w], axis=1), tf.int32)


def sample_views(height, width, crop_seed: Seed, flip_seeds: tf.Tensor
                 ) -> tuple[tf.Tensor, tf.Tensor]:
    """For n views of one image: their crops (`sample_crops` with crop_seed) and whether each is
    mirrored (`flip_coins` of its own seed, flip_seeds [n, 2]); one call for one compiled
    program."""
    n = flip_seeds.shape[0]
    flips = tf.stack([flip_coins(1, s)[0] for s in tf.unstack(flip_seeds, num=n)])
    return sample_crops(height, width, n, crop_seed), flips


def _bicubic_taps(start: tf.Tensor, length: tf.Tensor, size: int
                  ) -> tuple[tf.Tensor, tf.Tensor]:
    """Source indices and weights [b, size, 4] of bicubic resampling of the [start, start +
    length) window of each image to `size` samples, as tf.image.resize(method='bicubic') does:
    half-pixel centres, Keys' kernel with a = -0.5 (offsets quantised to 1/1024 like TF's
    table), taps outside the window dropped and the rest renormalised."""
    length_f = tf.cast(length, tf.float32)[:, None]
    x = (tf.range(size, dtype=tf.float32)[None, :] + 0.5) * length_f / size - 0.5
    x0 = tf.floor(x)
    t = tf.round((x - x0) * 1024.0) / 1024.0
    d = tf.abs(t[..., None] - tf.constant([-1.0, 0.0, 1.0, 2.0]))  # distance to each tap
    a = -0.5
    weights = tf.where(d <= 1.0, ((a + 2) * d - (a + 3)) * d * d + 1,
                       ((a * d - 5 * a) * d + 8 * a) * d - 4 * a)
    taps = x0[..., None] + tf.constant([-1.0, 0.0, 1.0, 2.0])
    weights *= tf.cast((taps >= 0) & (taps < length_f[..., None]), tf.float32)
    weights /= tf.reduce_sum(weights, axis=-1, keepdims=True)
    taps = tf.clip_by_value(taps, 0.0, length_f[..., None] - 1.0)
    return tf.cast(taps, tf.int32) + start[:, None, None], weights


def crop_and_resize(images: tf.Tensor, boxes: tf.Tensor, size: int) -> tf.Tensor:
    """Crops boxes [b, 4] (top, left, height, width) and resizes each to size x size, bicubic:
    separable gathers of 4 taps per output pixel, so the cost follows the output size. A
    single image (static batch 1) is cut and resized by TF's resize kernel, which is faster on
    large images."""
    if images.shape[0] == 1:
        return resized_crop(images[0], boxes[0], size)[None]
    rows, row_w = _bicubic_taps(boxes[:, 0], boxes[:, 2], size)
    cols, col_w = _bicubic_taps(boxes[:, 1], boxes[:, 3], size)
    x = tf.gather(images, rows, axis=1, batch_dims=1)  # [b, size, 4, W, C]
    x = tf.einsum('bstwc,bst->bswc', x, row_w)
    x = tf.gather(x, cols, axis=2, batch_dims=1)  # [b, size, size, 4, C]
    return tf.einsum('bsxtc,bxt->bsxc', x, col_w)


def resized_crop(image: tf.Tensor, box: tf.Tensor, size: int, rescale: bool = True
                 ) -> tf.Tensor:
    """The box (top, left, height, width) of one image [H, W, 3] (uint8 or float in [0, 1]),
    resized to size x size with tf.image.resize's bicubic (the authors' resize): float32.
    rescale=False leaves a uint8 image's crop in [0, 255] (`finish_views` scales it inside its
    program, saving a pass)."""
    window = tf.slice(image, tf.stack([box[0], box[1], 0]), tf.stack([box[2], box[3], 3]))
    # The same numbers from a float window, sooner: the kernel is slower reading uint8
    # (docs/benchmarks.md).
    out = tf.image.resize(tf.cast(window, tf.float32), [size, size], method='bicubic')
    return out / 255.0 if image.dtype == tf.uint8 and rescale else out


def random_resized_crop(images: tf.Tensor, size: int, seed: Seed) -> tf.Tensor:
    """The authors' random crop (`sample_crops`), resized to size x size (bicubic)."""
    shape = tf.shape(images)
    return crop_and_resize(images, sample_crops(shape[1], shape[2], shape[0], seed), size)


def center_crop_resize(images: tf.Tensor, size: int, proportion: float = 0.0) -> tf.Tensor:
    """The eval view: the central square of `proportion` of the shorter side, resized to size.
    0 is the authors': 0.875 above 32 px; at <= 32 px the image as it is (CIFAR), resized only
    if its size differs."""
    shape = tf.shape(images)
    h, w = shape[1], shape[2]
    if proportion or size > 32:
        share = proportion or EVAL_CROP_PROPORTION
        side = tf.cast(tf.round(share * tf.cast(tf.minimum(h, w), tf.float32)), tf.int32)
        box = tf.stack([(h - side + 1) // 2, (w - side + 1) // 2, side, side])
    else:
        box = tf.stack([0, 0, h, w])
    boxes = tf.tile(box[None], [shape[0], 1])
    return tf.cond((h == size) & (w == size) & (box[2] == h) & (box[3] == w),
                   lambda: tf.identity(images), lambda: crop_and_resize(images, boxes, size))


def flip_coins(n, seed: Seed) -> tf.Tensor:
    """[n] bools: which images random_flip with this seed mirrors."""
    return _uniform(seed, [n]) < FLIP_P


def random_flip(images: tf.Tensor, seed: Seed) -> tf.Tensor:
    return _select(flip_coins(tf.shape(images)[0], seed), tf.reverse(images, [2]), images)


# ---------------------------------------------------------------- colour distortion
def _jitter_params(b: tf.Tensor, strength: float, seed: Seed, brightness: str) -> tuple:
    """Per image: the order of the four ops ([b, 4]: the op at each step, 0 brightness,
    1 contrast, 2 saturation, 3 hue) and their parameters ([b] each)."""
    order_seed, b_seed, c_seed, s_seed, h_seed = split_seed(seed, 5)
    delta = 0.8 * strength

    def factor(seed):
        return _uniform(seed, [b], max(1.0 - delta, 0.0), 1.0 + delta)

    if brightness == 'multiplicative':
        bright_scale, bright_shift = factor(b_seed), tf.zeros([b])
    else:
        bright_scale, bright_shift = tf.ones([b]), _uniform(b_seed, [b], -delta, delta)
    hue_delta = min(0.2 * strength, 0.5)
    order = tf.argsort(_uniform(order_seed, [b, 4]), axis=1, stable=True)
    return (order, bright_scale, bright_shift, factor(c_seed), factor(s_seed),
            _uniform(h_seed, [b], -hue_delta, hue_delta))


def _planes(images: tf.Tensor) -> list[tf.Tensor]:
    return tf.unstack(images, axis=-1)


def _saturate(rgb: list, factor: tf.Tensor) -> list:
    """tf.image.adjust_saturation without the HSV round trip: with hue and value kept, each
    channel moves along (value - channel) by the clipped saturation's ratio s' / s."""
    value = tf.maximum(tf.maximum(rgb[0], rgb[1]), rgb[2])
    chroma = value - tf.minimum(tf.minimum(rgb[0], rgb[1]), rgb[2])
    ratio = tf.where(chroma > 0, tf.minimum(factor, value / tf.maximum(chroma, 1e-12)), 1.0)
    return [value - (value - c) * ratio for c in rgb]


def _shift_hue(rgb: list, delta: tf.Tensor) -> list:
    """tf.image.adjust_hue in RGB: the hue as rgb_to_hsv computes it (in sixths of the
    circle), shifted, and the channels rebuilt from (value, chroma, hue) as hsv_to_rgb does."""
    r, g, b = rgb
    value = tf.maximum(tf.maximum(r, g), b)
    chroma = value - tf.minimum(tf.minimum(r, g), b)
    inverse = 1.0 / tf.maximum(chroma, 1e-12)
    sixth = tf.where(r == value, (g - b) * inverse,
                     tf.where(g == value, (b - r) * inverse + 2.0, (r - g) * inverse + 4.0))
    hue = sixth + 6.0 * delta  # in (-2.2, 7.2): wrapped by comparisons, not a modulo
    hue = tf.where(hue < 0, hue + 6.0, tf.where(hue >= 6.0, hue - 6.0, hue))

    def channel(n):
        k = hue + n
        k = tf.where(k >= 6.0, k - 6.0, k)
        return value - chroma * tf.clip_by_value(tf.minimum(k, 4.0 - k), 0.0, 1.0)

    return [channel(5.0), channel(3.0), channel(1.0)]


def _jitter_ops(x: list, per: Callable, bright_scale, bright_shift, contrast, saturation,
                hue) -> list[Callable[[], list]]:
    """The four jitter ops (0 brightness, 1 contrast, 2 saturation, 3 hue) on colour planes x
    ([b, H, W] or [H, W] each); `per` broadcasts a per-image parameter over a plane."""
    return [lambda: [c * per(bright_scale) + per(bright_shift) for c in x],
            lambda: [c * per(contrast) + tf.reduce_mean(c, axis=[-2, -1], keepdims=True)
                     * (1.0 - per(contrast)) for c in x],
            lambda: _saturate(x, per(saturation)),
            lambda: _shift_hue(x, per(hue))]


def _jitter_step(images, op, bright_scale, bright_shift, contrast, saturation, hue):
    """Applies to each image of a batch its op of this step (0 brightness, 1 contrast,
    2 saturation, 3 hue) and clips: the four ops computed, each image's own kept (one program
    for images with different orders; a single image's steps are `_color_steps`). The three
    colour planes are handled apart, not as a channel axis: a compiled step then reads each
    pixel's three values once instead of once per output channel."""
    candidates = [tf.stack(f(), -1) for f in _jitter_ops(
        _planes(images), lambda v: v[:, None, None], bright_scale, bright_shift, contrast,
        saturation, hue)]
    out = candidates[3]
    for k in (2, 1, 0):
        out = _select(op == k, candidates[k], out)
    return tf.clip_by_value(out, 0.0, 1.0)


def apply_color(images: tf.Tensor, drawn: tuple, jit: bool = False) -> tf.Tensor:
    """The colour distortion `draw_color` drew, applied to [b, H, W, 3] images in [0, 1]: each
    image's four jitter steps where its jitter coin fired, then grey where its grey coin did.
    For a batch each step is one compiled program (run four times), which computes the four ops
    and keeps each image's own: in one program XLA would recompute every step inside each
    consumer of its output. A single image's steps are conditionals, whose outputs XLA keeps
    (one program, each step only its own op): the cheaper form image by image."""
    jitter, gray, order, *rest = drawn
    params = (order, *rest)
    if images.shape[0] == 1:
        return _compiled(_color_steps, jit)(images, jitter, gray, *params)
    out = images
    step = _compiled(_jitter_step, jit)
    for k in range(4):
        out = step(out, order[:, k], *params[1:])
    return _compiled(_select_then_gray, jit)(jitter, gray, out, images)


def _color_steps(images, jitter, gray, order, *params):
    """One image [1, H, W, 3] coloured with a drawn distortion. Worked on planes [3, H, W] (one
    transpose in, one out), so each step reads contiguous planes and computes only its own op;
    each step a conditional, whose output XLA keeps."""
    planes = tf.unstack(tf.transpose(images[0], [2, 0, 1]))
    source = planes
    scalars = [p[0] for p in params]
    for k in range(4):
        ops = _jitter_ops(planes, lambda v: v, *scalars)
        out = tf.switch_case(order[0, k], [lambda f=f: tf.stack(f()) for f in ops])
        planes = tf.unstack(tf.clip_by_value(out, 0.0, 1.0))
    planes = [tf.where(jitter[0], p, s) for p, s in zip(planes, source)]
    grey = _grey(planes)
    return tf.transpose(tf.stack([tf.where(gray[0], grey, p) for p in planes]), [1, 2, 0])[None]


def _select_then_gray(jitter: tf.Tensor, gray: tf.Tensor, jittered: tf.Tensor,
                      images: tf.Tensor) -> tf.Tensor:
    images = _select(jitter, jittered, images)
    return _select(gray, to_grayscale(images), images)


def draw_color(n: int, seed: Seed, strength: float, brightness: str = 'multiplicative'
               ) -> tuple:
    """The colour distortion's draw for n images, as the authors': whether the jitter fires
    (p = 0.8) and, independently, grey (p = 0.2); the order of the four jitter ops, uniform over
    permutations; brightness, contrast and saturation factors U(1 - 0.8 s, 1 + 0.8 s) (or an
    additive brightness U(-0.8 s, 0.8 s), v1) and a hue shift U(-0.2 s, 0.2 s). A tuple of [n]
    (order [n, 4]) tensors: (jitter, grey, order, brightness scale, brightness shift, contrast,
    saturation, hue)."""
    jitter, gray, jitter_seed = _color_coins(n, seed)
    return (jitter, gray) + _jitter_params(n, strength, jitter_seed, brightness)


def _finish_color(crop: tf.Tensor, scale: float, *drawn) -> tf.Tensor:
    """A resized crop [S, S, 3] in [0, scale] -> [0, 1], clipped, then coloured (`drawn`:
    `draw_color`'s for one image), one program."""
    return _color_steps(_unit(crop, scale)[None], *drawn)[0]


def finish_view(crop: tf.Tensor, names: Sequence[str], config: Config, seed: Seed,
                scale: float = 255.0) -> tf.Tensor:
    """The rest of a view after its crop (and flip), for one resized crop [S, S, 3] in
    [0, scale] (255: TF's resize of uint8 pixels): scaled to [0, 1] and clipped, then the named
    ops, compiled; float32 in [0, 1]. With colour alone left (the default pretraining view) one
    program draws the distortion and another scales, clips and colours the pixels: drawn
    inside the pixels' program, XLA would redo the draw for every pixel."""
    if tuple(names) == ('color',) and config.color_jitter_strength > 0:
        drawn = _xla(draw_color)(1, op_seeds(seed)['color'], config.color_jitter_strength,
                                config.brightness)
        return _xla(_finish_color)(crop, scale, *drawn)
    return view(_unit(crop, scale)[None], names, config, seed, fit=False, jit=True)[0]


def finish_views(crops: Sequence[tf.Tensor], names: Sequence[str], config: Config,
                 seeds: Sequence[Seed], scale: float = 255.0,
                 flips: Optional[tf.Tensor] = None) -> tf.Tensor:
    """`finish_view` of each crop with its seed, concatenated on channels: [S, S, 3V]; with
    `flips` ([V] bools) each crop mirrored first where true (the same, to float rounding, as
    mirroring before the bicubic resize, which is mirror-symmetric). With no op left (the
    colour distortion in the training step) one program flips, scales, clips and concatenates
    them all: one pass over the pixels."""
    if not names:
        return _xla(_units)(list(crops), scale, flips)
    crops = crops if flips is None else _mirrored(crops, flips)
    return tf.concat([finish_view(c, names, config, s, scale) for c, s in zip(crops, seeds)], -1)


def _mirrored(crops: Sequence[tf.Tensor], flips: tf.Tensor) -> list[tf.Tensor]:
    return [tf.where(f, tf.reverse(c, [1]), c)
            for c, f in zip(crops, tf.unstack(flips, num=len(crops)))]


def _unit(crop: tf.Tensor, scale: float) -> tf.Tensor:
    return tf.clip_by_value(crop / scale, 0.0, 1.0)


def _units(crops: list, scale: float, flips: Optional[tf.Tensor]) -> tf.Tensor:
    # Without flips nothing is mirrored: no reverse computed and thrown away.
    crops = crops if flips is None else _mirrored(crops, flips)
    return tf.concat([_unit(c, scale) for c in crops], -1)


def _grey(rgb: list) -> tf.Tensor:
    return 0.2989 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]  # tf.image.rgb_to_grayscale's


def to_grayscale(images: tf.Tensor) -> tf.Tensor:
    grey = _grey(_planes(images))
    return tf.stack([grey] * 3, axis=-1)


def _color_coins(batch: tf.Tensor, seed: Seed) -> tuple[tf.Tensor, tf.Tensor, Seed]:
    """Per image: whether the jitter fires (p = 0.8), whether grayscale fires (p = 0.2)."""
    jitter_coin, gray_coin, jitter_seed = split_seed(seed, 3)
    return (_uniform(jitter_coin, [batch]) < JITTER_P, _uniform(gray_coin, [batch]) < GRAYSCALE_P,
            jitter_seed)


def random_color_distortion(images: tf.Tensor, config: Config, seed: Seed, jit: bool = False
                            ) -> tf.Tensor:
    """Colour jitter with p = 0.8, then (independently) grayscale with p = 0.2. At strength 0
    no colour op at all, grey included, as the authors (their "no colour" ablations)."""
    if config.color_jitter_strength <= 0:
        return images
    drawn = draw_color(tf.shape(images)[0], seed, config.color_jitter_strength, config.brightness)
    return apply_color(images, drawn, jit=jit)


# ---------------------------------------------------------------- the ablation's other ops
def cutout(images: tf.Tensor, seed: Seed) -> tf.Tensor:
    """Blacks out a square of half the shorter side, centred anywhere (clipped at the border)."""
    shape = tf.shape(images)
    h, w = tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
    half = tf.floor(CUTOUT_SIDE * tf.minimum(h, w) / 2)
    centre = tf.floor(_uniform(seed, [2, shape[0], 1]) * tf.stack([h, w])[:, None, None])

    def inside(n, c):  # [b, n]: in [c - half, c + half)
        offset = tf.range(n)[None] - c
        return (offset >= -half) & (offset < half)

    rows, cols = inside(h, centre[0]), inside(w, centre[1])
    inside = rows[:, :, None, None] & cols[:, None, :, None]
    return tf.where(inside, 0.0, images)


def sobel(images: tf.Tensor) -> tf.Tensor:
    """Gradient magnitude of the grey image, scaled to [0, 1] per image, as three channels."""
    edges = tf.image.sobel_edges(tf.image.rgb_to_grayscale(images))  # [b, H, W, 1, 2]
    magnitude = tf.norm(edges, axis=-1)
    magnitude /= tf.maximum(tf.reduce_max(magnitude, axis=[1, 2, 3], keepdims=True), 1e-6)
    return tf.image.grayscale_to_rgb(magnitude)


def gaussian_noise(images: tf.Tensor, seed: Seed) -> tf.Tensor:
    std_seed, noise_seed = split_seed(seed, 2)
    std = _per_image(_uniform(std_seed, [tf.shape(images)[0]], 0.0, NOISE_STD_MAX))
    return images + std * tf.random.stateless_normal(tf.shape(images), noise_seed, alg=RNG)


def random_rotate(images: tf.Tensor, seed: Seed) -> tf.Tensor:
    """Rotation by 0, 90, 180 or 270 degrees, equally likely, per image (square images; a
    single image may be any shape)."""
    k = _uniform(seed, [tf.shape(images)[0]], 0, 4, tf.int32)
    if images.shape[0] == 1:
        return tf.image.rot90(images, k[0])
    out = images
    for quarter in (1, 2, 3):
        out = _select(k == quarter, tf.image.rot90(images, quarter), out)
    return out


# ---------------------------------------------------------------- views
# The ops a view is made of, by name; each maps a batch in [0, 1] to a batch in [0, 1].
_OPS: dict[str, Callable[[tf.Tensor, int, Seed], tf.Tensor]] = {
    'crop': lambda x, size, s: random_resized_crop(x, size, s),
    'flip': lambda x, size, s: random_flip(x, s),
    'cutout': lambda x, size, s: cutout(x, s),
    'sobel': lambda x, size, s: sobel(x),
    'noise': lambda x, size, s: gaussian_noise(x, s),
    'rotate': lambda x, size, s: random_rotate(x, s),
}  # and 'color', which needs more of the config: random_color_distortion


def pretrain_ops(config: Config) -> tuple[str, ...]:
    """The per-image ops of a pretraining view, in order (blur is batched separately)."""
    return tuple(name for name in config.augmentation_list if name != 'blur')


FINETUNE_OPS = ('crop', 'flip')  # the original's preprocess_for_train with color_distort=False


@functools.lru_cache(maxsize=None)
def _xla(fn: Callable) -> Callable:
    return tf.function(fn, jit_compile=True, autograph=False)


def _compiled(fn: Callable, jit: bool) -> Callable:
    """fn, or fn compiled with XLA (one program per input shape, shared by all callers). On a
    CPU, XLA fuses chains of elementwise steps into one pass over the pixels (docs/benchmarks.md
has the figures). The colour distortion is
    compiled apart from its neighbours: in one program XLA would recompute the whole fused
    jitter inside each of its consumers."""
    return _xla(fn) if jit else fn


def _run(images: tf.Tensor, names: tuple[str, ...], size: int, seeds: tf.Tensor, fit: bool,
         crop_proportion: float = 0.0) -> tf.Tensor:
    """to float, fit to size x size if asked (the eval view), then the named (non-colour) ops,
    clipping each."""
    images = to_float(images)
    if fit:
        images = tf.clip_by_value(center_crop_resize(images, size, crop_proportion), 0.0, 1.0)
    for name, seed in zip(names, tf.unstack(seeds, num=len(names))):
        images = tf.clip_by_value(_OPS[name](images, size, seed), 0.0, 1.0)
    return images


def op_seeds(seed: Optional[Seed]) -> dict[str, Seed]:
    """The seed of each op of a view drawn with `seed` (by the op's name, not its place)."""
    return dict(zip(config_lib.AUGMENTATIONS,
                    split_seed(stateless_seed(seed), len(config_lib.AUGMENTATIONS))))


def view(images: tf.Tensor, names: Sequence[str], config: Config, seed: Optional[Seed] = None,
         fit: bool = True, jit: bool = False) -> tf.Tensor:
    """One view of an image [H, W, 3] or a batch [b, H, W, 3] (uint8 or float in [0, 1]): the
    named ops in order, float32 in [0, 1] out. Without 'crop' the images are first fitted to
    image_size as for eval (fit=False: they already went through a crop).

    Each op draws from the seed of its name, not of its place, so adding an op leaves the
    others' draws unchanged. jit=True compiles the ops with XLA (the input pipeline does);
    compiled ops draw other numbers than plain ones from the same seed."""
    images = tf.convert_to_tensor(images)
    single = images.shape.rank == 3
    images = images[None] if single else images
    seeds = op_seeds(seed) if names else {}
    # Runs of ops between colour distortions, each one program when compiled.
    runs: list[tuple[str, ...]] = [()]
    for name in names:
        if name == 'color':
            runs += [('color',), ()]
        else:
            runs[-1] += (name,)
    for i, run in enumerate(runs):
        if run == ('color',):
            images = random_color_distortion(images, config, seeds['color'], jit)
        elif run or i == 0:
            run_seeds = tf.stack([seeds[name] for name in run]) if run else tf.zeros([0, 2],
                                                                                    tf.int64)
            images = _compiled(_run, jit)(images, run, config.image_size, run_seeds,
                                          fit and i == 0 and 'crop' not in names,
                                          config.eval_crop_proportion)
    size = config.image_size
    images = tf.ensure_shape(images, [None, size, size, 3])
    return images[0] if single else images


def preprocess_for_pretrain(image: tf.Tensor, config: Config, seed: Optional[Seed] = None
                            ) -> tf.Tensor:
    """One pretraining view of an image or a batch: `config.augmentation_list` except blur."""
    return view(image, pretrain_ops(config), config, seed)


def preprocess_for_finetune(image: tf.Tensor, config: Config, seed: Optional[Seed] = None
                            ) -> tf.Tensor:
    """Supervised training view: random crop and flip, no colour distortion."""
    return view(image, FINETUNE_OPS, config, seed)


def preprocess_for_eval(image: tf.Tensor, config: Config) -> tf.Tensor:
    return view(image, (), config)


# ---------------------------------------------------------------- batched blur
def blur_radius(image_size: int) -> int:
    """Kernel side 10 % of the image side, made odd as the authors do: radius (S // 10) // 2."""
    return (image_size // 10) // 2


def sample_blur(batch: tf.Tensor, seed: Seed) -> tuple[tf.Tensor, tf.Tensor]:
    """Per image: whether to blur (p = 0.5) and sigma ~ U(0.1, 2.0)."""
    coin_seed, sigma_seed = split_seed(seed, 2)
    return _uniform(coin_seed, [batch]) < BLUR_P, _uniform(sigma_seed, [batch], *BLUR_SIGMA)


def gaussian_blur(images: tf.Tensor, sigma: tf.Tensor, radius: int) -> tf.Tensor:
    """Separable Gaussian blur of [b, H, W, C] images, one sigma per image, reflect-padded (the
    original zero-pads, which darkens the border). The batch is folded into the channels so one
    depthwise convolution applies every image's own kernel."""
    if radius < 1:
        return images
    b, h, w, c = (tf.shape(images)[i] for i in range(4))
    x = tf.cast(tf.range(-radius, radius + 1), tf.float32)
    kernel = tf.exp(-tf.square(x)[None, :] / (2.0 * tf.square(sigma)[:, None]))  # [b, k]
    kernel = tf.repeat(kernel / tf.reduce_sum(kernel, axis=1, keepdims=True), c, axis=0)
    k = 2 * radius + 1
    folded = tf.reshape(tf.transpose(images, [1, 2, 0, 3]), [1, h, w, b * c])
    folded = tf.pad(folded, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode='REFLECT')
    horizontal = tf.reshape(tf.transpose(kernel), [1, k, b * c, 1])
    vertical = tf.reshape(tf.transpose(kernel), [k, 1, b * c, 1])
    folded = tf.nn.depthwise_conv2d(folded, horizontal, [1, 1, 1, 1], 'VALID')
    folded = tf.nn.depthwise_conv2d(folded, vertical, [1, 1, 1, 1], 'VALID')
    return tf.transpose(tf.reshape(folded, [h, w, b, c]), [2, 0, 1, 3])


def batch_random_blur(views: list[tf.Tensor], config: Config, seed: Optional[Seed] = None
                      ) -> list[tf.Tensor]:
    """Blurs each image of each [b, S, S, 3] view with p = 0.5, sigma ~ U(0.1, 2), when 'blur'
    is in the list and use_blur is on. Under a distribution strategy give each replica its own
    seed."""
    if 'blur' not in config.augmentation_list or not config.use_blur:
        return views
    radius = blur_radius(config.image_size)
    out = []
    for images, view_seed in zip(views, split_seed(stateless_seed(seed), len(views))):
        apply, sigma = sample_blur(tf.shape(images)[0], view_seed)
        blurred = gaussian_blur(images, sigma, radius)
        out.append(tf.clip_by_value(_select(apply, blurred, images), 0.0, 1.0))
    return out
