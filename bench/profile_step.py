"""Where a training step's time goes: TensorFlow op time by op type, from the TF profiler.

    python bench/profile_step.py --flagfile=flags/cifar10_pretrain.cfg --dataset=/tmp/cifar10 \\
        --train_batch_size=256 --inter_op_threads=1 [--profile_steps=1 --top=12]

Takes run.py's flags; builds the step exactly as run.py does and runs it on one synthetic batch
of the pipeline's shape (the model-only step of bench/throughput.py). After two untimed steps
(compilation) it times one, then profiles `--profile_steps` and prints each op type's share of
the op time, the slowest single ops and, for convolutions, the arithmetic rate
(2 · multiply-adds / second) of each direction.
"""

import collections
import glob
import os
import sys
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

import run  # noqa: E402  (defines run.py's flags)

flags.DEFINE_integer('profile_steps', 1, 'Steps to profile.')
flags.DEFINE_integer('top', 12, 'Op types and single ops to list.')
FLAGS = flags.FLAGS


def op_times(logdir: str) -> collections.Counter:
    """Seconds per TF op ('name:type') in the profile written to `logdir`."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2
    times = collections.Counter()
    for path in glob.glob(os.path.join(logdir, '**', '*.xplane.pb'), recursive=True):
        space = xplane_pb2.XSpace()
        with open(path, 'rb') as f:
            space.ParseFromString(f.read())
        for plane in space.planes:
            names = {k: v.name for k, v in plane.event_metadata.items()}
            for line in plane.lines:
                for event in line.events:
                    name = names.get(event.metadata_id, '')
                    # TF ops are traced as 'name:Type'; runtime events as 'Class::Method'.
                    if ':' in name and '::' not in name and ' ' not in name and not name.startswith('$'):
                        times[name] += event.duration_ps * 1e-12
    return times


def main(argv) -> None:
    del argv
    import tensorflow as tf

    import training_step

    config = run.config_from_flags().replace(model_dir=tempfile.mkdtemp(prefix='simclr_prof_'),
                                             mode='train')
    step = training_step.build(config)
    loop, iterator = step.model_loop, step.synthetic

    loop(iterator, tf.constant(2)).numpy()
    t0 = time.perf_counter()
    loop(iterator, tf.constant(1)).numpy()
    step_s = time.perf_counter() - t0
    logdir = tempfile.mkdtemp(prefix='simclr_prof_')
    tf.profiler.experimental.start(logdir)
    loop(iterator, tf.constant(FLAGS.profile_steps)).numpy()
    tf.profiler.experimental.stop()

    times = op_times(logdir)
    by_type = collections.Counter()
    for name, seconds in times.items():
        by_type[name.rsplit(':', 1)[1]] += seconds / FLAGS.profile_steps
    total = sum(by_type.values())
    print(f'step (unprofiled) {step_s:.2f} s = {config.train_batch_size / step_s:.2f} pairs/s; '
          f'op time in a profiled step {total:.2f} s')
    for op_type, seconds in by_type.most_common(FLAGS.top):
        print(f'  {seconds:8.2f} s {100 * seconds / total:5.1f} %  {op_type}')
    convs = sum(s for t, s in by_type.items() if 'Conv2D' in t)
    print(f'convolutions: {convs:.2f} s ({100 * convs / total:.1f} % of the op time)')
    images = 2 * step.per_replica if config.train_mode == 'pretrain' else step.per_replica
    macs = conv_macs(step.state.model.encoder, step.image_shape, images)
    if macs:
        for direction in ('Conv2D', 'Conv2DBackpropInput', 'Conv2DBackpropFilter'):
            seconds = sum(s for t, s in by_type.items() if t.endswith(direction))
            if seconds:
                print(f'  {direction}: {2 * macs / seconds / 1e9:.0f} GFLOP/s '
                      f'({2 * macs / 1e9:.1f} GFLOP a step each direction)')
    print('slowest ops:')
    for name, seconds in times.most_common(FLAGS.top):
        print(f'  {seconds / FLAGS.profile_steps:8.3f} s  {name}')


def conv_macs(encoder, image_shape, images: int) -> int:
    """Multiply-adds of the encoder's forward convolutions for `images` images, read off the
    traced graph (output size × kernel size × input channels per Conv2D op)."""
    import tensorflow as tf
    spec = tf.TensorSpec([1, *image_shape[:2], 3], tf.float32)
    graph = tf.function(lambda x: encoder(x, training=False)).get_concrete_function(spec).graph
    macs = 0
    for op in graph.get_operations():
        if op.type == 'Conv2D':
            kh, kw, cin, _ = op.inputs[1].shape
            macs += op.outputs[0].shape.num_elements() * kh * kw * cin
    return macs * images


if __name__ == '__main__':
    app.run(main)
