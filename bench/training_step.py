"""The training step as run.py builds it, for the benchmarks: model, optimizer, loop, and one
synthetic batch of the input pipeline's shape to feed it (the model-only bound)."""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from simclr_tf import data, distribute, program, train
from simclr_tf.config import Config


@dataclasses.dataclass
class Step:
    strategy: tf.distribute.Strategy
    info: data.DatasetInfo
    state: train.TrainState
    loop: object  # train.make_loop_fn's loop(iterator, n)
    synthetic: object  # endless iterator over one distributed synthetic batch
    image_shape: tuple  # of one example as the pipeline yields it (views on channels)
    per_replica: int  # examples per replica batch


def build(config: Config) -> Step:
    """Devices, strategy, state and loop for `config` (call before TF touches its devices)."""
    distribute.configure_threads(config)
    if config.cpu_replicas > 1:
        distribute.configure_cpu_replicas(config.cpu_replicas)
    strategy = distribute.build_strategy(config)
    distribute.check_strategy(config, strategy)
    info = data.dataset_info(config, need_eval=False)
    program.set_up(config)
    state = train.build_state(config, strategy, info)
    loop = train.make_loop_fn(config, state, strategy)
    # A batch's shape from the pipeline's spec: iterating it would fill a shuffle buffer.
    image_shape = tuple(data.build_dataset(config, True).element_spec[0].shape[1:])
    per_replica = config.train_batch_size // strategy.num_replicas_in_sync
    batch = (tf.random.uniform([per_replica, *image_shape]),
             tf.one_hot(tf.zeros([per_replica], tf.int32), info.num_classes))
    synthetic = iter(strategy.distribute_datasets_from_function(
        lambda _: tf.data.Dataset.from_tensors(batch).repeat()))
    return Step(strategy, info, state, loop, synthetic, image_shape, per_replica)
