"""The augmentation module: the paper's probabilities and ranges, measured over many draws."""

import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from simclr_tf import augment, picture, views
from simclr_tf.config import Config

N = 2400  # draws for the statistical tests; 3 sigma of a fraction p is <= 0.031 at p = 0.5
CONFIG = Config(image_size=32, use_tpu=False)


@pytest.fixture(scope='module')
def image(sample_dir) -> np.ndarray:
    """A real, colourful 32x32 CIFAR-10 image (uint8)."""
    x = np.asarray(Image.open(os.path.join(sample_dir, 'train', 'bird', '0000.jpg')).convert('RGB'))
    assert x.shape == (32, 32, 3) and np.ptp(x.astype(int), axis=-1).mean() > 10, 'not colourful'
    return x


@pytest.fixture(scope='module')
def colour_views(image):
    """N draws of the colour distortion alone (no crop) of one image, and that image."""
    config = CONFIG.replace(augmentations='color')
    images = np.repeat(image[None], N, axis=0)
    out = augment.preprocess_for_pretrain(images, config, tf.constant([1, 2])).numpy()
    return out, augment.to_float(image).numpy()


def test_grayscale_is_applied_to_about_20_percent_of_views(colour_views):
    out, _ = colour_views
    gray = np.all(out[..., :1] == out, axis=(1, 2, 3))  # grayscale: three equal channels
    assert abs(gray.mean() - 0.2) <= 0.03, gray.mean()


def test_colour_jitter_is_applied_to_about_80_percent_of_views(colour_views):
    out, source = colour_views
    gray_source = augment.to_grayscale(source[None]).numpy()[0]
    # Without jitter a view is the source itself or its grey version, to the bit.
    untouched = np.all(out == source, axis=(1, 2, 3)) | np.all(out == gray_source, axis=(1, 2, 3))
    assert abs((1 - untouched.mean()) - 0.8) <= 0.03, 1 - untouched.mean()


def test_colour_jitter_ranges_and_random_order():
    x = tf.random.stateless_uniform([N, 4, 4, 3], [0, 1], 0.2, 0.8)
    seed = tf.constant([3, 4])
    y = augment.random_color_distortion(x, CONFIG, seed)
    assert float(tf.reduce_min(y)) >= 0 and float(tf.reduce_max(y)) <= 1
    assert not np.allclose(y.numpy(), x.numpy())
    off = CONFIG.replace(color_jitter_strength=0.0)
    assert np.array_equal(augment.random_color_distortion(x, off, seed).numpy(), x.numpy())
    # Additive (v1) brightness differs from multiplicative (v2) for the same seed.
    y1 = augment.random_color_distortion(x, CONFIG.replace(brightness='additive'), seed)
    assert not np.allclose(y1.numpy(), y.numpy())


def test_strength_zero_applies_no_colour_op_not_even_grey(image):
    config = CONFIG.replace(augmentations='color', color_jitter_strength=0.0)
    images = np.repeat(image[None], 200, axis=0)
    out = augment.preprocess_for_pretrain(images, config, tf.constant([1, 2])).numpy()
    np.testing.assert_array_equal(out, np.broadcast_to(augment.to_float(image).numpy(), out.shape))


def test_blur_is_applied_to_about_half_of_the_views_with_sigma_in_range(image):
    config = CONFIG.replace(use_blur=True)
    seed = tf.constant([5, 6], tf.int64)
    # The same per-image decisions batch_random_blur draws for its (only) view.
    apply, sigma = augment.sample_blur(N, augment.split_seed(seed, 1)[0])
    apply, sigma = apply.numpy(), sigma.numpy()
    assert abs(apply.mean() - 0.5) <= 0.03, apply.mean()
    assert sigma.min() >= 0.1 and sigma.max() <= 2.0 and sigma.max() - sigma.min() > 1.5

    views = tf.repeat(augment.to_float(image)[None], N, axis=0)
    (out,) = augment.batch_random_blur([views], config, seed)
    changed = np.any(out.numpy() != views.numpy(), axis=(1, 2, 3))
    assert not changed[~apply].any()  # not blurred: untouched
    assert changed[apply & (sigma > 0.3)].all()  # blurred (sigma ~0.1 is a no-op kernel)
    # Off unless 'blur' is listed and use_blur is on.
    for off in (config.replace(use_blur=False), config.replace(augmentations='crop,color')):
        assert augment.batch_random_blur([views], off, seed)[0] is views


def test_blur_kernel_is_ten_percent_of_the_side_and_keeps_a_flat_image_flat():
    assert 2 * augment.blur_radius(224) + 1 == 23 and 2 * augment.blur_radius(32) + 1 == 3
    flat = tf.fill([2, 24, 24, 3], 0.7)
    out = augment.gaussian_blur(flat, tf.constant([0.5, 2.0]), radius=5)
    np.testing.assert_allclose(out.numpy(), 0.7, atol=1e-6)  # reflect padding: no dark border


def _authors_crops(height: int, width: int, n: int, seed: int) -> np.ndarray:
    """n boxes (top, left, height, width) from TF's own op with the authors' arguments."""
    seeds = tf.random.experimental.stateless_split(tf.constant([seed, 0], tf.int64), n)

    @tf.function
    def draw(seeds):
        def one(s):
            begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
                [height, width, 3], tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), s,
                min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3),
                area_range=(0.08, 1.0), max_attempts=100, use_image_if_no_bounding_boxes=True)
            return tf.concat([begin[:2], size[:2]], 0)
        return tf.map_fn(one, seeds, fn_output_signature=tf.int32, parallel_iterations=64)
    return draw(seeds).numpy()


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov distance."""
    a, b = np.sort(a), np.sort(b)
    x = np.concatenate([a, b])
    return float(np.abs(np.searchsorted(a, x, 'right') / len(a)
                        - np.searchsorted(b, x, 'right') / len(b)).max())


def _crop_stats(boxes: np.ndarray, height: int, width: int) -> dict:
    top, left, h, w = boxes.T.astype(np.float64)
    return {'area': h * w / (height * width), 'aspect': w / h, 'top': top / height,
            'left': left / width, 'whole': (h == height) & (w == width)}


@pytest.mark.parametrize('height,width', [(32, 32), (375, 500), (2400, 1600), (100, 600)])
def test_crops_are_drawn_as_the_authors_tf_op_draws_them(height, width):
    n = 20000  # KS distance 0.02 is ~3 sigma at this size, ~2 at 10,000
    ours = augment.sample_crops(height, width, n, tf.constant([7, 8])).numpy()
    theirs = _authors_crops(height, width, n, seed=1)
    top, left, h, w = ours.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    ours, theirs = _crop_stats(ours, height, width), _crop_stats(theirs, height, width)
    for key in ('area', 'aspect', 'top', 'left'):
        assert _ks(ours[key], theirs[key]) < 0.02, key
    assert abs(ours['whole'].mean() - theirs['whole'].mean()) <= 0.01
    # Crops under 10 % of the image are rejected (min_object_covered), not just under 8 %.
    assert ours['area'][~ours['whole']].min() >= 0.1


@pytest.mark.parametrize('height,width,whole', [(45, 600, 0.73), (20, 600, 1.0)])
def test_crops_fall_back_to_the_whole_image_as_often_as_the_authors(height, width, whole):
    # 45 x 600: only 45 x 60 crops fit both ranges, and few of 100 attempts find one;
    # 20 x 600: none does.
    n = 50000
    ours = _crop_stats(augment.sample_crops(height, width, n, tf.constant([3, 4])).numpy(),
                       height, width)['whole'].mean()
    theirs = _crop_stats(_authors_crops(height, width, n, seed=2), height, width)['whole'].mean()
    assert abs(ours - theirs) <= 0.01 and abs(ours - whole) <= 0.01, (ours, theirs)


def test_crop_and_resize_is_tf_bicubic_resize_of_the_crop():
    images = tf.random.stateless_uniform([6, 20, 28, 3], [2, 3])
    boxes = augment.sample_crops(20, 28, 6, tf.constant([4, 4]))
    out = augment.crop_and_resize(images, boxes, 24)
    for image, (t, l, h, w), o in zip(images, boxes.numpy(), out):
        ref = tf.image.resize(image[t:t + h, l:l + w], [24, 24], method='bicubic')
        np.testing.assert_allclose(o.numpy(), ref.numpy(), atol=1e-5)


def test_outputs_are_float_images_in_range_of_the_right_shape(image):
    every = CONFIG.replace(image_size=24, augmentations='crop,flip,color,blur,cutout,sobel,noise,'
                                                       'rotate')
    batch = np.repeat(image[None], 8, axis=0)
    for x in (image, batch, augment.to_float(batch)):
        for out in (augment.preprocess_for_pretrain(x, every, tf.constant([0, 1])),
                    augment.preprocess_for_finetune(x, every, tf.constant([0, 1])),
                    augment.preprocess_for_eval(x, every)):
            assert out.dtype == tf.float32
            assert out.shape == x.shape[:-3] + (24, 24, 3)
            assert float(tf.reduce_min(out)) >= 0 and float(tf.reduce_max(out)) <= 1
    # Eval: <= 32 px as is; above, the central 87.5 % resized.
    np.testing.assert_array_equal(augment.preprocess_for_eval(image, CONFIG),
                                  augment.to_float(image))
    big = tf.random.stateless_uniform([64, 80, 3], [1, 1])
    ref = tf.image.resize(big[4:60, 12:68], [48, 48], method='bicubic')  # 56 = 0.875 * 64
    np.testing.assert_allclose(augment.preprocess_for_eval(big, CONFIG.replace(image_size=48)),
                               tf.clip_by_value(ref, 0, 1), atol=1e-5)
    # eval_crop_proportion=1: the shorter side resized, then the centre crop (the transfer
    # protocol's linear evaluation), at any size: 64 x 80 -> the central 64 x 64.
    whole = tf.image.resize(big[:, 8:72], [48, 48], method='bicubic')
    for size, ref in ((48, whole), (24, tf.image.resize(big[:, 8:72], [24, 24], method='bicubic'))):
        np.testing.assert_allclose(
            augment.preprocess_for_eval(big, CONFIG.replace(image_size=size,
                                                            eval_crop_proportion=1.0)),
            tf.clip_by_value(ref, 0, 1), atol=1e-5)


def test_two_views_of_one_image_differ_and_a_seed_fixes_a_view(image):
    one = augment.preprocess_for_pretrain(image, CONFIG, tf.constant([1, 0]))
    two = augment.preprocess_for_pretrain(image, CONFIG, tf.constant([1, 1]))
    again = augment.preprocess_for_pretrain(image, CONFIG, tf.constant([1, 0]))
    assert np.abs(one.numpy() - two.numpy()).mean() > 0.01
    np.testing.assert_array_equal(one.numpy(), again.numpy())


def test_with_crop_only_colour_statistics_are_untouched(image):
    crop = CONFIG.replace(augmentations='crop')
    solid = np.broadcast_to(np.array([200, 40, 90], np.uint8), (200, 32, 32, 3))
    out = augment.preprocess_for_pretrain(solid, crop, tf.constant([2, 2])).numpy()
    np.testing.assert_allclose(out, np.broadcast_to(solid / 255, out.shape), atol=1e-6)
    # On a real image the crops' colour means scatter around the image's; colour moves them.
    images = np.repeat(image[None], 500, axis=0)
    source_mean = augment.to_float(image).numpy().mean(axis=(0, 1))
    crops = augment.preprocess_for_pretrain(images, crop, tf.constant([3, 3])).numpy()
    coloured = augment.preprocess_for_pretrain(
        images, CONFIG.replace(augmentations='crop,color'), tf.constant([3, 3])).numpy()
    np.testing.assert_allclose(crops.mean(axis=(0, 1, 2)), source_mean, atol=0.02)
    assert not np.all(crops[..., :1] == crops, axis=(1, 2, 3)).any()  # never grey
    spread = lambda v: v.mean(axis=(1, 2)).std(axis=0).mean()  # noqa: E731
    assert spread(coloured) > 2 * spread(crops)


def test_the_ablation_ops(image):
    x = augment.to_float(np.repeat(image[None], 64, axis=0))
    seed = tf.constant([9, 9])
    rotated = augment.random_rotate(x, seed).numpy()
    turns = [np.all(rotated == np.rot90(x.numpy(), k, axes=(1, 2)), axis=(1, 2, 3))
             for k in range(4)]
    assert np.logical_or.reduce(turns).all() and all(t.any() for t in turns)
    cut = augment.cutout(x, seed).numpy()
    black = np.all(cut == 0, axis=-1).sum(axis=(1, 2))
    assert (black >= 8 * 8).all() and (black <= 16 * 16).all() and (black == 16 * 16).any()
    edges = augment.sobel(x).numpy()
    assert np.all(edges[..., :1] == edges) and edges.max() == 1.0
    noisy = augment.gaussian_noise(x, seed).numpy()
    assert 0 < np.abs(noisy - x.numpy()).mean() < 0.1


def test_the_list_order_is_the_order_of_application(image):
    a = augment.preprocess_for_pretrain(image, CONFIG.replace(augmentations='color,sobel'),
                                        tf.constant([1, 1]))
    b = augment.preprocess_for_pretrain(image, CONFIG.replace(augmentations='sobel,color'),
                                        tf.constant([1, 1]))
    assert np.all(a.numpy()[..., :1] == a.numpy())  # Sobel last: grey
    assert not np.allclose(a.numpy(), b.numpy())


def test_compiled_ops_compute_what_the_plain_ops_do():
    x = tf.random.stateless_uniform([8, 32, 32, 3], [1, 2])
    boxes = augment.sample_crops(32, 32, 8, tf.constant([1, 1]))
    order = tf.constant([[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]] * 2)
    p = [tf.random.stateless_uniform([8], [i, 0], 0.5, 1.5) for i in range(4)]
    coins = tf.constant([True, False] * 4), tf.constant([False, False, True, False] * 2)
    drawn = coins + (order, p[0], p[1] - 1, p[2], p[3], p[3] - 1)
    resize = lambda x, b: augment.crop_and_resize(x, b, 32)  # noqa: E731
    np.testing.assert_allclose(tf.function(resize, jit_compile=True)(x, boxes), resize(x, boxes),
                               atol=2e-5)
    np.testing.assert_allclose(augment.apply_color(x, drawn, jit=True),
                               augment.apply_color(x, drawn), atol=2e-5)
    # One image (one program of conditionals, compiled or not) is coloured as in the batch.
    for jit in (True, False):
        np.testing.assert_allclose(augment.apply_color(x[2:3], [v[2:3] for v in drawn], jit=jit),
                                   augment.apply_color(x, drawn)[2:3], atol=2e-5)


def test_colour_ops_are_tfs_saturation_and_hue_kernels():
    x = tf.concat([tf.random.stateless_uniform([6, 16, 16, 3], [4, 5]),
                   tf.fill([1, 16, 16, 3], 0.5), tf.zeros([1, 16, 16, 3])], 0)
    for factor in (0.2, 0.9, 1.7):
        np.testing.assert_allclose(tf.stack(augment._saturate(augment._planes(x), factor), -1),
                                   tf.image.adjust_saturation(x, factor), atol=2e-6)
    for delta in (-0.2, -0.03, 0.1, 0.2):
        np.testing.assert_allclose(tf.stack(augment._shift_hue(augment._planes(x),
                                                               tf.constant(delta)), -1),
                                   tf.image.adjust_hue(x, delta), atol=2e-6)


def test_the_picture_command_writes_a_grid_of_pairs(sample_dir, tmp_path):
    out = tmp_path / 'views.png'
    picture.main(['--dataset', sample_dir, '--out', str(out), '--n', '4', '--columns', '2',
                   '--scale', '1'])
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 * 34 + 4, 2 * 3 * 34 + 4, 3)  # 2 x 2 cells of 3 padded images


def test_a_crop_mirrored_before_the_resize_is_the_resized_crop_mirrored():
    image = tf.cast(tf.random.stateless_uniform([40, 50, 3], [6, 6], 0, 256, tf.int32), tf.uint8)
    box = tf.constant([3, 7, 30, 33])
    plain = augment.resized_crop(image, box, 24)
    mirrored_box = tf.constant([3, 50 - 7 - 33, 30, 33])  # the same box in the mirrored image
    np.testing.assert_allclose(augment.resized_crop(image[:, ::-1], mirrored_box, 24),
                               plain[:, ::-1], atol=1e-4)  # why finish_views flips after it


def test_single_compiled_crop_draws_as_the_authors_tf_op():
    # The input pipeline draws each image's boxes with the XLA-compiled sampler, one call each.
    n = 20000
    draw = tf.function(augment.sample_crops, jit_compile=True, autograph=False)
    seeds = tf.random.experimental.stateless_split(tf.constant([9, 0], tf.int64), n)
    ours = tf.function(lambda s: tf.map_fn(lambda x: draw(375, 500, 1, x)[0], s,
                                           fn_output_signature=tf.int32))(seeds).numpy()
    ours = _crop_stats(ours, 375, 500)
    theirs = _crop_stats(_authors_crops(375, 500, n, seed=3), 375, 500)
    for key in ('area', 'aspect', 'top', 'left'):
        assert _ks(ours[key], theirs[key]) < 0.02, key


def test_a_finished_crop_is_coloured_as_the_batch_code_colours_it():
    # finish_view of a view with colour left: scale, clip and colour in one program, same draw.
    config = CONFIG.replace(image_size=24, color_jitter_strength=1.0)
    crop = tf.random.stateless_uniform([24, 24, 3], [1, 2], -10, 265)  # bicubic overshoots
    for i in range(12):
        seed = tf.constant([i, 7], tf.int64)
        drawn = tf.function(augment.draw_color, jit_compile=True)(
            1, augment.op_seeds(seed)['color'], 1.0, config.brightness)
        expected = augment.apply_color(tf.clip_by_value(crop / 255.0, 0, 1)[None], drawn)[0]
        np.testing.assert_allclose(augment.finish_view(crop, ('color',), config, seed),
                                   expected, atol=2e-5)
    # Other rests go through view(); strength 0 is no colour op at all.
    unit = augment.finish_view(crop, ('color',), config.replace(color_jitter_strength=0.0), seed)
    np.testing.assert_array_equal(unit, tf.clip_by_value(crop / 255.0, 0, 1))


def test_the_compiled_colour_draw_has_the_authors_probabilities_and_ranges():
    # What the per-image path draws: the compiled draw (other numbers than the plain ops').
    compiled = tf.function(augment.draw_color, jit_compile=True)
    draw = tf.function(lambda s: tf.map_fn(
        lambda x: tf.concat([tf.reshape(tf.cast(v, tf.float32), [-1])
                             for v in compiled(1, x, 1.0, 'multiplicative')], 0),
        s, fn_output_signature=tf.float32))
    n = 4000
    d = draw(tf.random.experimental.stateless_split(tf.constant([5, 1], tf.int64), n)).numpy()
    jitter, gray, order, scale, shift, contrast, saturation, hue = (
        d[:, 0], d[:, 1], d[:, 2:6], d[:, 6], d[:, 7], d[:, 8], d[:, 9], d[:, 10])
    se = lambda p: 4 * np.sqrt(p * (1 - p) / n)  # noqa: E731
    assert abs(jitter.mean() - 0.8) < se(0.8) and abs(gray.mean() - 0.2) < se(0.2)
    assert abs(np.mean(jitter * gray) - 0.16) < se(0.16)  # independent coins
    for op in range(4):  # every op equally likely at every step
        assert all(abs(np.mean(order[:, k] == op) - 0.25) < se(0.25) for k in range(4))
    assert np.all(np.sort(order, axis=1) == np.arange(4))  # a permutation
    for factor in (scale, contrast, saturation):  # U(0.2, 1.8) at strength 1
        assert factor.min() >= 0.2 and factor.max() <= 1.8 and abs(factor.mean() - 1) < 0.04
    assert np.all(shift == 0) and np.abs(hue).max() <= 0.2 and abs(hue.mean()) < 0.01


def test_the_step_colours_a_trailing_colour_distortion_with_each_image_its_own_draw():
    config = CONFIG.replace(color_jitter_strength=1.0, use_blur=False, augment_placement='step')
    plan = views.plan_views(config, True, (32, 32), True, accelerator=False)
    assert plan.in_step == ('color',) and plan.host == ('crop', 'flip')
    n = 400
    images = tf.random.stateless_uniform([n, 8, 8, 3], [4, 5])
    seed = tf.constant([3, 11], tf.int64)
    out = views.step_views([images, images], plan, config, seed)
    grey = [np.mean(np.ptp(v.numpy(), axis=-1).max(axis=(1, 2)) < 1e-6) for v in out]
    same = [np.mean(np.abs(v.numpy() - images.numpy()).max(axis=(1, 2, 3)) < 1e-6) for v in out]
    for g, s in zip(grey, same):
        assert 0.14 < g < 0.26  # p = 0.2
        assert 0.10 < s < 0.22  # neither jitter (p = 0.8) nor grey: 0.16
    assert not np.allclose(out[0], out[1])  # each view its own draws
    np.testing.assert_array_equal(views.step_views([images, images], plan, config, seed)[0],
                                  out[0])
    # Colour on the host: the step leaves the views alone (blur off).
    host = views.plan_views(config.replace(augment_placement='host'), True, (32, 32), True, False)
    np.testing.assert_array_equal(views.step_views([images], host, config, seed)[0], images)


def test_finished_views_are_the_flipped_scaled_clipped_crops_side_by_side():
    crops = [tf.random.stateless_uniform([24, 24, 3], [i, 2], -10, 265) for i in range(2)]
    seeds = [tf.constant([i, 7], tf.int64) for i in range(2)]
    config = CONFIG.replace(image_size=24, color_jitter_strength=1.0)
    both = augment.finish_views(crops, (), config, seeds)
    np.testing.assert_allclose(both, tf.concat([tf.clip_by_value(c / 255, 0, 1) for c in crops],
                                               -1), atol=1e-7)
    flipped = augment.finish_views(crops, (), config, seeds, flips=tf.constant([True, False]))
    np.testing.assert_array_equal(flipped[..., :3], both[:, ::-1, :3])
    np.testing.assert_array_equal(flipped[..., 3:], both[..., 3:])
    coloured = augment.finish_views(crops, ('color',), config, seeds, flips=tf.constant([False,
                                                                                        True]))
    for v, crop in enumerate([crops[0], crops[1][:, ::-1]]):
        np.testing.assert_array_equal(coloured[..., 3 * v:3 * v + 3],
                                      augment.finish_view(crop, ('color',), config, seeds[v]))
