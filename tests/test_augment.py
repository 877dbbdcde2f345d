"""The augmentation module: the paper's probabilities and ranges, measured over many draws."""

import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from simclr_tf import augment
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
    y = augment.color_jitter(x, 1.0, tf.constant([3, 4]))
    assert float(tf.reduce_min(y)) >= 0 and float(tf.reduce_max(y)) <= 1
    assert not np.allclose(y.numpy(), x.numpy())
    assert np.array_equal(augment.color_jitter(x, 0.0, tf.constant([3, 4])).numpy(), x.numpy())
    # Additive (v1) brightness differs from multiplicative (v2) for the same seed.
    y1 = augment.color_jitter(x, 1.0, tf.constant([3, 4]), brightness='additive')
    assert not np.allclose(y1.numpy(), y.numpy())


def test_blur_is_applied_to_about_half_of_the_views_with_sigma_in_range(image):
    config = CONFIG.replace(use_blur=True)
    seed = tf.constant([5, 6], tf.int64)
    # The same per-image decisions batch_random_blur draws for its (only) view.
    apply, sigma = augment._sample_blur(N, augment._split(seed, 1)[0])
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


@pytest.mark.parametrize('height,width,largest', [(32, 32, 1.0), (24, 40, 24 * 32 / 960)])
def test_crop_areas_and_aspect_ratios(height, width, largest):
    boxes = augment._sample_crops(height, width, N, tf.constant([7, 8])).numpy()
    top, left, h, w = boxes.T
    area = h * w / (height * width)
    aspect = w / h
    assert area.min() >= 0.08 and area.max() <= 1.0
    assert area.min() < 0.1 and area.max() > 0.95 * largest  # the whole range is used
    assert aspect.min() >= 3 / 4 and aspect.max() <= 4 / 3
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()


def test_crop_falls_back_to_a_centre_crop():
    # 2 x 100: no box of area >= 8 % can have an aspect ratio <= 4/3.
    boxes = augment._sample_crops(2, 100, 4, tf.constant([1, 1])).numpy()
    np.testing.assert_array_equal(boxes, [[0, 48, 2, 3]] * 4)


def test_crop_and_resize_is_tf_bicubic_resize_of_the_crop():
    images = tf.random.stateless_uniform([6, 20, 28, 3], [2, 3])
    boxes = augment._sample_crops(20, 28, 6, tf.constant([4, 4]))
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
    boxes = augment._sample_crops(32, 32, 8, tf.constant([1, 1]))
    op = tf.constant([0, 1, 2, 3, 3, 2, 1, 0])
    p = [tf.random.stateless_uniform([8], [i, 0], 0.5, 1.5) for i in range(4)]
    params = (p[0], p[1] - 1, p[2], p[3], p[3] - 1)
    for fn, args in ((lambda x, b: augment.crop_and_resize(x, b, 32), (x, boxes)),
                     (augment._jitter_step, (x, op) + params)):
        np.testing.assert_allclose(augment._xla(fn)(*args), fn(*args), atol=2e-5)


def test_the_picture_command_writes_a_grid_of_pairs(sample_dir, tmp_path):
    out = tmp_path / 'views.png'
    augment._main(['--dataset', sample_dir, '--out', str(out), '--n', '4', '--columns', '2',
                   '--scale', '1'])
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 * 34 + 4, 2 * 3 * 34 + 4, 3)  # 2 x 2 cells of 3 padded images
