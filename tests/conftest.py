"""Shared test set-up: two logical CPU devices, so distribution is tested without accelerators."""

import os

import pytest

from simclr_tf import logs

# TensorFlow prints start-up notices to file descriptor 2 at import. In the process that runs
# the tests, pytest catches them and gives them back at exit, so without this they follow
# pytest's summary; with two workers (pytest.ini) that is the controller, which runs no test.
logs.import_tensorflow_quietly()

import tensorflow as tf  # noqa: E402

# Must run before TensorFlow initialises its devices, i.e. before any test touches a tensor.
_cpus = tf.config.list_physical_devices('CPU')
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_DIR = os.path.join(REPO, 'data', 'cifar10_sample')


@pytest.fixture(scope='session')
def two_replicas() -> tf.distribute.Strategy:
    """MirroredStrategy over the two logical CPU devices."""
    return tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1'])


@pytest.fixture(scope='session')
def sample_dir() -> str:
    """The embedded real-image sample: data/cifar10_sample/{train,test}/<class>/*.jpg."""
    return SAMPLE_DIR


def sample_folder(root, classes=('airplane', 'cat'), train: int = 8, test: int = 2,
                  test_classes=None) -> str:
    """root/{train,test}/<class>/ with the sample's first `train` and `test` images of each class
    (`test_classes`: other classes in test)."""
    import shutil
    for split, n, names in (('train', train, classes), ('test', test, test_classes or classes)):
        for cls in names:
            os.makedirs(os.path.join(root, split, cls))
            for name in sorted(os.listdir(os.path.join(SAMPLE_DIR, split, cls)))[:n]:
                shutil.copy(os.path.join(SAMPLE_DIR, split, cls, name),
                            os.path.join(root, split, cls))
    return str(root)


@pytest.fixture
def small_folder(tmp_path):
    """tmp_path/data: `per_class` training and 2 test images of the sample's airplanes and cats
    (8 each: 16 training images, one global batch of the tests that need exactly one)."""
    import pathlib
    return lambda per_class=8: pathlib.Path(sample_folder(tmp_path / 'data', train=per_class))


@pytest.fixture
def release_locks():
    """Releases, after the test, the model_dir locks its in-process runs took."""
    yield
    from simclr_tf import model_dir
    model_dir.release_locks()


@pytest.fixture
def mixed_folder(tmp_path) -> str:
    """An image folder of 12 JPEGs of mixed sizes (the per-image path), made from the sample's
    cats: train/c0 and train/c1."""
    from PIL import Image
    root = tmp_path / 'mixed'
    cats = os.path.join(SAMPLE_DIR, 'train', 'cat')
    for i, path in enumerate(sorted(os.listdir(cats))[:12]):
        os.makedirs(root / 'train' / f'c{i % 2}', exist_ok=True)
        Image.open(os.path.join(cats, path)).resize((40 + 4 * i, 36 + 3 * (i % 3))).save(
            root / 'train' / f'c{i % 2}' / f'{i:02d}.jpg', quality=95)
    return str(root)
