"""The measuring parts of bench/: FLOP accounting and the profile reader."""

import os
import sys

import keras
import tensorflow as tf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'bench'))
import profile_step  # noqa: E402


def test_conv_macs_counts_output_size_times_kernel_times_input_channels():
    model = keras.Sequential([keras.Input((8, 8, 3)),
                              keras.layers.Conv2D(4, 3, padding='same', use_bias=False),
                              keras.layers.Conv2D(2, 1, strides=2, use_bias=False)])
    # 8·8 outputs × 3·3·3 per output channel × 4, then 4·4 outputs × 1·1·4 × 2
    assert profile_step.conv_macs(model, (8, 8, 6), images=5) == 5 * (64 * 27 * 4 + 16 * 4 * 2)


def test_op_times_reads_the_ops_of_a_profiled_function(tmp_path):
    x, w = tf.random.normal([2, 8, 8, 3]), tf.random.normal([3, 3, 3, 4])
    conv = tf.function(lambda x, w: tf.nn.conv2d(x, w, 1, 'SAME'))
    conv(x, w)
    tf.profiler.experimental.start(str(tmp_path))
    conv(x, w).numpy()
    tf.profiler.experimental.stop()
    types = {name.rsplit(':', 1)[1] for name in profile_step.op_times(str(tmp_path))}
    assert any(t.endswith('Conv2D') for t in types)  # Conv2D, or oneDNN's _MklNativeConv2D
    assert not any('::' in t or t == 'Run' for t in types)  # runtime events are not ops
