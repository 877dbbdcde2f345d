"""Arithmetic rate of TensorFlow's CPU convolution kernels on ResNet-18 (CIFAR) shapes.

    python bench/conv_kernels.py [--images=512 --repeats=3]

For each 3x3 stride-1 conv shape of ResNet-18 with the CIFAR stem at 32x32 (channels 64..512 at
32x32..4x4), times the three kernels a training step runs, forward (Conv2D), input gradient
(Conv2DBackpropInput) and weight gradient (Conv2DBackpropFilter), each alone on random tensors,
and prints GFLOP/s (2 · multiply-adds / s, best of `--repeats`), with a 4096² matmul as the
machine's reference. The default 512 images are one step of 256 pairs.
"""

import argparse
import json
import os
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '1')  # as run.py

import tensorflow as tf  # noqa: E402

SHAPES = ((32, 64), (16, 128), (8, 256), (4, 512))  # (spatial size, channels)


def best_seconds(fn, args, repeats: int) -> float:
    fn(*args).numpy()  # trace, and let oneDNN build its primitive
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args).numpy()
        times.append(time.perf_counter() - t0)
    return min(times)


@tf.function
def forward(x, w, dy):
    return tf.nn.conv2d(x, w, 1, 'SAME')


@tf.function
def input_gradient(x, w, dy):
    return tf.raw_ops.Conv2DBackpropInput(input_sizes=tf.shape(x), filter=w, out_backprop=dy,
                                          strides=[1, 1, 1, 1], padding='SAME')


@tf.function
def weight_gradient(x, w, dy):
    return tf.raw_ops.Conv2DBackpropFilter(input=x, filter_sizes=tf.shape(w), out_backprop=dy,
                                           strides=[1, 1, 1, 1], padding='SAME')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--images', type=int, default=512)
    parser.add_argument('--repeats', type=int, default=3)
    args = parser.parse_args()
    tf.config.threading.set_inter_op_parallelism_threads(1)

    a, b = tf.random.normal([4096, 4096]), tf.random.normal([4096, 4096])
    matmul = best_seconds(tf.function(tf.matmul), (a, b), args.repeats)
    rows = {'matmul_4096': round(2 * 4096 ** 3 / matmul / 1e9, 1)}
    print(f'matmul 4096x4096: {rows["matmul_4096"]:.1f} GFLOP/s')
    for size, channels in SHAPES:
        x = tf.random.normal([args.images, size, size, channels])
        w = tf.random.normal([3, 3, channels, channels])
        dy = tf.random.normal([args.images, size, size, channels])
        flop = 2 * args.images * size * size * 9 * channels * channels
        rates = {fn.__name__: round(flop / best_seconds(fn, (x, w, dy), args.repeats) / 1e9, 1)
                 for fn in (forward, input_gradient, weight_gradient)}
        rows[f'{size}x{size}x{channels}'] = rates
        print(f'{size:2d}x{size:<2d} {channels:3d} channels: '
              + ', '.join(f'{k} {v:.1f}' for k, v in rates.items()) + ' GFLOP/s', flush=True)
    print(json.dumps({'images': args.images, 'gflop_per_s': rows, 'cpus': os.cpu_count()}))


if __name__ == '__main__':
    main()
