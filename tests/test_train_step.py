"""A training step on 2 replicas equals one on 1 device for the same global batch (global BN)."""

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import optim, train, views
from simclr_tf.config import Config
from simclr_tf.model import build_model

GLOBAL_PAIRS = 8  # images per global batch; each gives two views
# No op drawn in the step (blur, colour): each replica draws its own, one device other ones.
CONFIG = Config(resnet_depth=18, width_multiplier=0.25, image_size=16, proj_out_dim=16,
                train_batch_size=GLOBAL_PAIRS, use_tpu=False, use_blur=False,
                color_jitter_strength=0.0, temperature=0.5,
                learning_rate=0.5, weight_decay=1e-4, warmup_epochs=0, train_steps=10,
                lineareval_while_pretraining=True)
PLAN = views.plan_views(CONFIG, True, (16, 16), False, accelerator=False)


def _state(config, strategy, weights):
    with strategy.scope():
        model = build_model(config, 10)
        model.set_weights(weights)
        schedule = optim.WarmUpAndCosineDecay(scaled_lr=0.5, warmup_steps=0, total_steps=10)
        optimizer = optim.build_optimizer(config, schedule, model)
        optimizer.build(model.trainable_variables)
    return train.TrainState(model, optimizer, None, schedule, 10, 10)


def _batch():
    rng = np.random.default_rng(0)
    images = rng.uniform(size=[GLOBAL_PAIRS, 16, 16, 6]).astype(np.float32)
    labels = tf.one_hot(rng.integers(0, 10, GLOBAL_PAIRS), 10).numpy()
    return images, labels


@pytest.fixture(scope='module')
def initial_weights():
    return build_model(CONFIG, 10).get_weights()


def _one_device(config, weights):
    strategy = tf.distribute.get_strategy()
    state = _state(config, strategy, weights)
    metrics = tf.function(train.make_step_fn(config, state, strategy, PLAN))(*_batch())
    return metrics.numpy(), state


def _two_replicas(config, weights, strategy):
    state = _state(config, strategy, weights)
    images, labels = _batch()
    half = GLOBAL_PAIRS // 2

    def shard(array):
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: array[ctx.replica_id_in_sync_group * half:][:half])

    step_fn = train.make_step_fn(config, state, strategy, PLAN)

    @tf.function
    def step(x, y):
        return strategy.reduce(tf.distribute.ReduceOp.MEAN, strategy.run(step_fn, args=(x, y)),
                               axis=None)

    return step(shard(images), shard(labels)).numpy(), state


def _values(variables):
    return {v.path: np.asarray(v.numpy()) for v in variables}


def test_two_replicas_equal_one_device(initial_weights, two_replicas):
    one, state1 = _one_device(CONFIG, initial_weights)
    two, state2 = _two_replicas(CONFIG, initial_weights, two_replicas)
    names = train.metric_names(CONFIG, True)
    np.testing.assert_allclose(two, one, atol=1e-4, err_msg=str(names))
    trained1, trained2 = _values(state1.model.trainable_variables), _values(
        state2.model.trainable_variables)
    assert trained1.keys() == trained2.keys()
    initial = dict(zip([v.path for v in state1.model.weights], initial_weights))
    moved = 0
    for path in trained1:
        np.testing.assert_allclose(trained2[path], trained1[path], atol=1e-4, err_msg=path)
        moved += not np.allclose(trained1[path], initial[path], atol=1e-7)
    # Zero-initialised last BN gammas block the first step's gradient into their branch, so not
    # every weight moves; most do.
    assert moved > 0.6 * len(trained1), 'the step should change most weights'
    stats1 = _values(state1.model.non_trainable_variables)
    stats2 = _values(state2.model.non_trainable_variables)
    assert stats1 and stats1.keys() == stats2.keys()
    for path in stats1:
        np.testing.assert_allclose(stats2[path], stats1[path], atol=1e-4, err_msg=path)


def test_without_global_bn_the_statistics_differ(initial_weights, two_replicas):
    local = CONFIG.replace(global_bn=False)
    _, state1 = _one_device(local, initial_weights)
    _, state2 = _two_replicas(local, initial_weights, two_replicas)
    stats1 = _values(state1.model.non_trainable_variables)
    stats2 = _values(state2.model.non_trainable_variables)
    worst = max(np.max(np.abs(stats1[p] - stats2[p])) for p in stats1)
    assert worst > 1e-3, 'per-replica BN should see only its own half of the batch'
