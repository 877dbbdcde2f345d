"""Shared test set-up: two logical CPU devices, so distribution is tested without accelerators."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import pytest  # noqa: E402
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
