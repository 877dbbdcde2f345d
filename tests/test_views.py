"""Where each augmentation runs: one plan a run, by device and geometry; every placement of the
colour distortion draws from the same distributions and resumes exactly."""

import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from simclr_tf import data, views
from simclr_tf.config import Config, ConfigError

B = 32
CONFIG = Config(image_size=32, train_batch_size=B, seed=5, use_tpu=False, use_blur=False,
                color_jitter_strength=1.0, train_split='train')


def test_the_plan_by_device_and_geometry():
    plan = views.plan_views
    gpu = plan(CONFIG, True, (32, 32), True, accelerator=True)
    assert (gpu.host, gpu.batched, gpu.in_step, gpu.color) == (('crop', 'flip'), True,
                                                               ('color',), 'step')
    blurred = plan(CONFIG.replace(use_blur=True), True, None, True, accelerator=True)
    assert blurred.in_step == ('color', 'blur') and not blurred.batched
    assert blurred.crop == 'window'  # JPEG files of mixed sizes: decoded for the crops' window
    for size, geometry in (((32, 32), 'one size'), (None, 'mixed sizes')):
        cpu = plan(CONFIG, True, size, True, accelerator=False)
        assert cpu.color == views.CPU_COLOR[geometry] and 'auto: CPU only' in cpu.reason
    host = plan(CONFIG.replace(augment_placement='host'), True, None, True, accelerator=True)
    assert (host.host, host.in_step, host.color) == (('crop', 'flip', 'color'), (), 'host')
    step = plan(CONFIG.replace(augment_placement='step'), True, None, True, accelerator=False)
    assert step.in_step == ('color',) and step.host == ('crop', 'flip')
    # Cached images, or pixels rather than files: each decoded whole before its crops.
    assert plan(CONFIG.replace(cache_dataset=True), True, None, True, False).crop == 'image'
    assert plan(CONFIG, True, None, False, False).crop == 'image'
    # A quarter turn before the crop of non-square images of one size: image by image.
    turned = CONFIG.replace(augmentations='rotate,crop,flip,color')
    assert not plan(turned, True, (24, 32), True, False).batched
    assert plan(turned, True, (32, 32), True, False).batched
    # Nothing to place: fine-tuning, eval, strength 0, no colour in the list.
    tune = plan(CONFIG.replace(train_mode='finetune'), True, (32, 32), True, True)
    assert (tune.views, tune.host, tune.in_step, tune.color) == (1, ('crop', 'flip'), (), 'none')
    evaluation = plan(CONFIG, False, None, True, True)
    assert (evaluation.host, evaluation.crop, evaluation.color) == ((), 'central', 'none')
    for off in (CONFIG.replace(color_jitter_strength=0.0), CONFIG.replace(augmentations='crop')):
        assert plan(off, True, None, True, True).color == 'none'


def test_colour_before_other_ops_stays_on_the_host_and_step_refuses_it():
    early = CONFIG.replace(augmentations='crop,color,flip,blur')
    assert views.plan_views(early, True, None, True, accelerator=True).color == 'host'
    with pytest.raises(ConfigError, match=r'augment_placement=step .* has flip after it'):
        views.plan_views(early.replace(augment_placement='step'), True, None, True, True)


def test_the_plan_reads_in_one_line():
    line = views.plan_views(CONFIG.replace(use_blur=True), True, None, True, True).line()
    assert '\n' not in line
    assert line == ('views: 2 views of each image; input stream (image by image): crop, flip; '
                    "training step: color, blur; crop: random crops, each JPEG decoded only in its "
                    "crops' window; colour distortion: step (auto: the training step runs on an "
                    'accelerator)')


# ---------------------------------------------------------------- the same distributions
COLOUR = (200, 60, 90)  # saturated, so saturation and hue move it


@pytest.fixture(scope='module', params=['one size', 'mixed sizes'])
def flat_folder(request, tmp_path_factory) -> str:
    """64 images of one flat colour: crops and flips leave a view that colour, so a view's mean
    colour is the colour distortion's draw alone."""
    root = tmp_path_factory.mktemp('flat')
    for i in range(64):
        size = (32, 32) if request.param == 'one size' else (40 + 3 * (i % 7), 36 + 5 * (i % 5))
        os.makedirs(root / 'train' / f'c{i % 2}', exist_ok=True)
        Image.new('RGB', size, COLOUR).save(root / 'train' / f'c{i % 2}' / f'{i:02d}.png')
    return str(root)


def _view_colours(config: Config, batches: int = 8) -> np.ndarray:
    """Each view's mean colour, [views, 3], over `batches` batches of the stream, the step's ops
    applied as the plan says (each batch its own step seed)."""
    plan = data.view_plan(config, True, accelerator=False)
    out = []
    for step, (images, _) in enumerate(data.build_dataset(config, True, plan=plan).take(batches)):
        two = views.step_views(tf.split(images, 2, axis=-1), plan, config,
                               tf.constant([config.seed, step], tf.int64))
        out += [v.numpy().mean(axis=(1, 2)) for v in two]
    return np.concatenate(out)


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.sort(a), np.sort(b)
    x = np.concatenate([a, b])
    return float(np.abs(np.searchsorted(a, x, 'right') / len(a)
                        - np.searchsorted(b, x, 'right') / len(b)).max())


def test_every_placement_draws_the_same_colour_distribution(flat_folder):
    config = CONFIG.replace(dataset=flat_folder)
    colours = {p: _view_colours(config.replace(augment_placement=p)) for p in ('host', 'step')}
    source = np.array(COLOUR) / 255
    for placement, c in colours.items():
        assert c.shape == (512, 3)
        grey = np.ptp(c, axis=1) < 1e-3
        untouched = np.abs(c - source).max(axis=1) < 2e-3
        assert 0.15 < grey.mean() < 0.25, (placement, grey.mean())  # p = 0.2
        assert 0.12 < untouched.mean() < 0.21, (placement, untouched.mean())  # 0.8 x 0.2 off
    for channel in range(3):  # KS distance at 512 v 512: 0.12 is p ~ 0.001
        assert _ks(colours['host'][:, channel], colours['step'][:, channel]) < 0.12, channel
    assert not np.allclose(colours['host'], colours['step'])  # other draws, same law


@pytest.mark.parametrize('placement', ['host', 'step'])
def test_a_resumed_stream_continues_it_under_each_placement(flat_folder, sample_dir, placement):
    config = CONFIG.replace(augment_placement=placement, train_batch_size=8)
    # Across the first epoch's end: 200 of the sample's images, 64 of the flat folder's.
    for folder, split, start in ((sample_dir, 'train[:20%]', 24), (flat_folder, 'train', 7)):
        cfg = config.replace(dataset=folder, train_split=split)
        plan = data.view_plan(cfg, True, accelerator=False)
        stream = [x.numpy() for x, _ in data.build_dataset(cfg, True, plan=plan).take(start + 2)]
        resumed = [x.numpy() for x, _ in data.build_dataset(cfg, True, start_step=start,
                                                             plan=plan).take(2)]
        for k in range(2):
            np.testing.assert_array_equal(resumed[k], stream[start + k])
