"""The training step as run.py builds it, for the benchmarks: model, optimizer, the loop with the
run's view plan, and the model-only bound: the same loop with no augmentation in the step, fed
one synthetic batch of ready views of the input pipeline's shape."""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from simclr_tf import data, distribute, program, train, views
from simclr_tf.config import Config


@dataclasses.dataclass
class Step:
    strategy: tf.distribute.Strategy
    info: data.DatasetInfo
    state: train.TrainState
    plan: views.ViewPlan  # the run's (data.view_plan)
    loop: object  # train.make_loop_fn's loop(iterator, n) for the run's plan
    model_loop: object  # the same with nothing done to the views in the step
    synthetic: object  # endless iterator over one distributed synthetic batch of ready views
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
    plan = data.view_plan(config, True)
    loop = train.make_loop_fn(config, state, strategy, plan)
    model_loop = train.make_loop_fn(config, state, strategy, dataclasses.replace(plan, in_step=()))
    # A batch's shape from the pipeline's spec: iterating it would fill a shuffle buffer.
    image_shape = tuple(data.build_dataset(config, True, plan=plan).element_spec[0].shape[1:])
    per_replica = config.train_batch_size // strategy.num_replicas_in_sync
    batch = (tf.random.uniform([per_replica, *image_shape]),
             tf.one_hot(tf.zeros([per_replica], tf.int32), info.num_classes))
    synthetic = iter(strategy.distribute_datasets_from_function(
        lambda _: tf.data.Dataset.from_tensors(batch).repeat()))
    return Step(strategy, info, state, plan, loop, model_loop, synthetic, image_shape, per_replica)
