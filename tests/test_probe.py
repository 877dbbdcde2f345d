"""Evaluation tools: kNN and linear probes, the balanced label subset, the probe command."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from simclr_tf import data, probe
from simclr_tf.config import Config, ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def clusters(n_per_class: int, classes: int, dim: int, seed: int):
    """Features around one orthogonal direction per class: linearly separable."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), n_per_class)
    x = np.eye(dim)[y] * 3.0 + rng.normal(0, 0.3, [len(y), dim])
    return x.astype(np.float32), y


@pytest.fixture(scope='module')
def separable():
    train_x, train_y = clusters(100, 5, 16, 0)
    test_x, test_y = clusters(40, 5, 16, 1)
    return train_x, train_y, test_x, test_y


def test_knn_separable_is_perfect_and_shuffled_is_chance(separable):
    train_x, train_y, test_x, test_y = separable
    knn = probe.knn_accuracies(train_x, train_y, test_x, test_y, 5)
    assert knn == {f'knn{k}{c}_top_1_accuracy': 1.0 for k in (200, 20) for c in ('', '_centred')}
    shuffled = np.random.default_rng(2).permutation(train_y)
    chance = probe.knn_accuracies(train_x, shuffled, test_x, test_y, 5)
    for value in chance.values():
        assert 0.08 <= value <= 0.35  # chance is 0.2 on 200 test examples


def test_centred_knn_ignores_a_shared_offset():
    # Centring subtracts the train mean, so adding one vector to every feature (as the mean image
    # does to raw pixels) changes nothing but float rounding.
    rng = np.random.default_rng(0)
    y_train, y_test = np.repeat(np.arange(5), 100), np.repeat(np.arange(5), 40)
    train_x = (np.eye(16)[y_train] + rng.normal(0, 0.6, [500, 16])).astype(np.float32)
    test_x = (np.eye(16)[y_test] + rng.normal(0, 0.6, [200, 16])).astype(np.float32)
    offset = rng.uniform(1, 3, [16]).astype(np.float32)
    plain = probe.knn_accuracies(train_x, y_train, test_x, y_test, 5)
    shifted = probe.knn_accuracies(train_x + offset, y_train, test_x + offset, y_test, 5)
    for k in (200, 20):
        centred = f'knn{k}_centred_top_1_accuracy'
        assert abs(shifted[centred] - plain[centred]) <= 0.01, (plain, shifted)
        assert 0.4 < plain[centred] < 1.0  # noisy enough that the ranking is tested


def test_linear_probe_holds_out_a_fifth_of_train_and_reports_both_accuracies(separable):
    train_x, train_y, test_x, test_y = separable
    result = probe.linear_probe(train_x, train_y, test_x, test_y, 5, grid=(1e-3, 1.0))
    assert result['top_1_accuracy'] == 1.0 and result['mean_per_class_accuracy'] == 1.0
    assert result['l2'] in (1e-3, 1.0)
    assert result['validation']['top_1_accuracy'] == 1.0  # on the held-out fifth


@pytest.mark.parametrize('fraction', [0.01, 0.1])
def test_balanced_subset_is_balanced_seeded_and_the_right_size(fraction):
    labels = np.repeat(np.arange(10), 500)[np.random.default_rng(0).permutation(5000)]
    subset = data.balanced_subset(labels, fraction, seed=1)
    assert len(subset) == round(fraction * 5000) and len(set(subset)) == len(subset)
    counts = np.bincount(labels[subset], minlength=10)
    assert counts.max() - counts.min() <= 1 and counts.min() == round(fraction * 500)
    np.testing.assert_array_equal(subset, data.balanced_subset(labels, fraction, seed=1))
    assert not np.array_equal(subset, data.balanced_subset(labels, fraction, seed=2))


def test_balanced_subset_of_unequal_classes_fills_from_the_larger_ones():
    labels = np.array([0] * 3 + [1] * 100 + [2] * 100 + [3] * 8)
    subset = data.balanced_subset(labels, 0.2, seed=0)  # 42 examples, 10.5 a class
    counts = np.bincount(labels[subset], minlength=4)
    assert len(subset) == 42 and counts[0] == 3 and counts[3] == 8
    assert abs(counts[1] - counts[2]) <= 1
    assert data.balanced_subset(labels, 1e-6, seed=0).shape == (1,)  # at least one example


def test_label_fraction_fine_tunes_on_the_subset(sample_dir):
    config = Config(dataset=sample_dir, train_split='train', eval_split='test', image_size=32,
                    train_mode='finetune', label_fraction=0.05, label_seed=4, use_tpu=False,
                    train_batch_size=10, seed=0).validate()
    info = data.dataset_info(config)
    assert info.num_train_examples == 50  # 5 % of 1,000, 5 per class
    batches = list(data.build_dataset(config, True).take(5))  # one epoch
    labels = np.concatenate([np.argmax(y.numpy(), 1) for _, y in batches])
    assert np.all(np.bincount(labels, minlength=10) == 5)
    subset_images = {bytes(np.round(x.numpy() * 255).astype(np.uint8))
                     for images, _ in batches for x in images}
    again = {bytes(np.round(x.numpy() * 255).astype(np.uint8))
             for images, _ in data.build_dataset(config, True).take(5) for x in images}
    assert len(subset_images) > 40 and len(subset_images & again) > 40


def test_label_fraction_is_rejected_in_pretraining():
    with pytest.raises(ConfigError, match=r'label_fraction=0.1 applies to train_mode=finetune'):
        Config(label_fraction=0.1, use_tpu=False).validate()
    with pytest.raises(ConfigError, match=r'label_fraction=0 must be in \(0, 1\]'):
        Config(label_fraction=0, train_mode='finetune', use_tpu=False).validate()


def test_probe_command_on_raw_pixels(sample_dir, tmp_path):
    out = tmp_path / 'pixels.json'
    proc = subprocess.run(
        [sys.executable, '-m', 'simclr_tf.probe', '--pixels', '--image_size=32',
         f'--dataset={sample_dir}', '--train_split=train[:500]', '--eval_split=test[:100]',
         '--l2_values=12', f'--out={out}'],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result['num_train_examples'] == 500 and result['num_eval_examples'] == 100
    assert result['feature_dim'] == 32 * 32 * 3
    for key in ('knn200_top_1_accuracy', 'knn20_top_1_accuracy', 'knn200_centred_top_1_accuracy',
                'linear_top_1_accuracy', 'linear_mean_per_class_accuracy'):
        assert 0.15 < result[key] < 0.6, (key, result[key])  # raw pixels beat chance (0.1)
    assert result['output'] == 'pixels' and result['linear_grid_size'] == 12
    bad = subprocess.run([sys.executable, '-m', 'simclr_tf.probe', '--pixels',
                          f'--dataset={sample_dir}'], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and '--image_size are required' in bad.stderr
    missing = subprocess.run([sys.executable, '-m', 'simclr_tf.probe', f'--model={tmp_path}/none',
                              f'--dataset={sample_dir}'], cwd=REPO, capture_output=True, text=True)
    assert missing.returncode == 2, missing.stderr[-2000:]
    assert missing.stderr.strip().splitlines()[-1].startswith('error: model=')
