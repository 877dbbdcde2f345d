"""LARS against a hand-computed reference, the warmup + cosine schedule, the weight-decay policy."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import optim
from simclr_tf.config import Config

LR, MOMENTUM, WD, EETA = 0.1, 0.9, 0.01, 0.001


def np_lars(w, v, g, decay_and_adapt, nesterov=False):
    """One classic-momentum LARS step, as the authors' lars_optimizer.py."""
    if decay_and_adapt:
        g = g + WD * w
        w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
        trust = EETA * w_norm / g_norm if w_norm > 0 and g_norm > 0 else 1.0
    else:
        trust = 1.0
    v = MOMENTUM * v + LR * trust * g
    update = MOMENTUM * v + LR * trust * g if nesterov else v
    return w - update, v


def _start():
    rng = np.random.default_rng(0)
    w_adapted = rng.normal(size=(3, 4)).astype(np.float32)
    w_excluded = rng.normal(size=(4,)).astype(np.float32)
    grads = [[rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(4,)).astype(np.float32)]
             for _ in range(2)]
    return w_adapted, w_excluded, grads


def _reference(w_adapted, w_excluded, grads, nesterov=False):
    wa, wb = w_adapted.astype(np.float64), w_excluded.astype(np.float64)
    va, vb = np.zeros_like(wa), np.zeros_like(wb)
    for ga, gb in grads:
        wa, va = np_lars(wa, va, ga, True, nesterov)
        wb, vb = np_lars(wb, vb, gb, False, nesterov)
    return wa, wb


@pytest.mark.parametrize('nesterov', [False, True])
def test_lars_two_steps_match_numpy(nesterov):
    w_adapted, w_excluded, grads = _start()
    a, b = keras.Variable(w_adapted), keras.Variable(w_excluded)
    opt = optim.LARS(LR, momentum=MOMENTUM, use_nesterov=nesterov, weight_decay=WD,
                     exclude_from_weight_decay=[b], eeta=EETA)
    for ga, gb in grads:
        opt.apply_gradients([(tf.constant(ga), a), (tf.constant(gb), b)])
    expected_a, expected_b = _reference(w_adapted, w_excluded, grads, nesterov)
    np.testing.assert_allclose(a.numpy(), expected_a, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(b.numpy(), expected_b, rtol=1e-5, atol=1e-7)
    # The trust ratio made the adapted step far smaller than a plain momentum step would be.
    assert np.abs(a.numpy() - w_adapted).max() < 0.01 < np.abs(b.numpy() - w_excluded).max()
    assert opt.weight_decay is None  # Keras' decoupled decay stays off


def test_lars_separate_adaptation_exclusion_and_config():
    w = np.full((2, 2), 2.0, np.float32)
    g = np.ones((2, 2), np.float32)
    var = keras.Variable(w)
    # decayed but not adapted: a momentum-SGD step on g + wd * w
    opt = optim.LARS(LR, momentum=MOMENTUM, weight_decay=WD, exclude_from_weight_decay=[],
                     exclude_from_layer_adaptation=[var])
    opt.apply_gradients([(tf.constant(g), var)])
    np.testing.assert_allclose(var.numpy(), w - LR * (g + WD * w), rtol=1e-6)
    config = opt.get_config()
    assert config['weight_decay'] == WD and config['eeta'] == EETA
    clone = optim.LARS.from_config(config)
    assert (clone.lars_weight_decay, clone.momentum, clone.use_nesterov) == (WD, MOMENTUM, False)
    assert clone.weight_decay is None


def test_lars_honours_exclusions_under_two_replicas(two_replicas):
    w_adapted, w_excluded, grads = _start()
    with two_replicas.scope():
        a, b = keras.Variable(w_adapted), keras.Variable(w_excluded)
        opt = optim.LARS(LR, momentum=MOMENTUM, weight_decay=WD,
                         exclude_from_weight_decay=[b], eeta=EETA)
        opt.build([a, b])  # Keras 3 optimizers cannot create their slots inside strategy.run

    @tf.function
    def step(ga, gb):
        two_replicas.run(lambda ga, gb: opt.apply_gradients([(ga, a), (gb, b)]), args=(ga, gb))

    for ga, gb in grads:
        # Replica r sees (r + 1) / 3 of each gradient: the all-reduced sum is the gradient itself.
        step(*[two_replicas.experimental_distribute_values_from_function(
            lambda ctx, g=g: tf.constant(g * (ctx.replica_id_in_sync_group + 1) / 3.0))
            for g in (ga, gb)])
    expected_a, expected_b = _reference(w_adapted, w_excluded, grads)
    for variable, expected in ((a, expected_a), (b, expected_b)):
        for copy in two_replicas.experimental_local_results(variable.value):
            np.testing.assert_allclose(copy.numpy(), expected, rtol=1e-5, atol=1e-7)


# --- schedule ------------------------------------------------------------------------------------

NUM_EXAMPLES = 50000


@pytest.mark.parametrize('scaling,base_lr,batch,scaled', [
    ('linear', 0.3, 512, 0.6), ('sqrt', 0.075, 4096, 4.8)])
def test_schedule_warmup_then_cosine(scaling, base_lr, batch, scaled):
    config = Config(learning_rate=base_lr, learning_rate_scaling=scaling, train_batch_size=batch,
                    warmup_epochs=10, train_epochs=100)
    assert optim.scaled_learning_rate(config) == pytest.approx(scaled)
    schedule = optim.WarmUpAndCosineDecay(base_lr, NUM_EXAMPLES, config)
    warmup = int(round(10 * NUM_EXAMPLES // batch))
    total = NUM_EXAMPLES * 100 // batch + 1
    assert (schedule.warmup_steps, schedule.total_steps) == (warmup, total)

    def lr(step):
        return float(schedule(tf.constant(step, tf.int64)))

    assert lr(0) == 0.0
    assert lr(warmup // 2) == pytest.approx(scaled * (warmup // 2) / warmup, rel=1e-5)
    assert lr(warmup) == pytest.approx(scaled, rel=1e-6)
    half = (total - warmup) // 2
    assert lr(warmup + half) == pytest.approx(
        scaled * 0.5 * (1 + math.cos(math.pi * half / (total - warmup))), rel=1e-5)
    assert lr(warmup + half) == pytest.approx(scaled / 2, rel=1e-2)
    assert 0 < lr(total - 1) < 1e-4 * scaled  # the last step the optimizer takes
    assert lr(total) == pytest.approx(0.0, abs=1e-7)


def test_schedule_without_warmup_and_explicit_form():
    config = Config(learning_rate=1.0, train_batch_size=256, warmup_epochs=0, train_steps=100)
    schedule = optim.WarmUpAndCosineDecay(1.0, NUM_EXAMPLES, config)
    assert schedule.warmup_steps == 0
    assert float(schedule(0)) == pytest.approx(1.0)
    assert float(schedule(50)) == pytest.approx(0.5, rel=1e-5)
    explicit = optim.WarmUpAndCosineDecay(scaled_lr=2.0, warmup_steps=10, total_steps=110)
    clone = optim.WarmUpAndCosineDecay.from_config(explicit.get_config())
    for step in (0, 5, 10, 60, 110):
        assert float(clone(step)) == pytest.approx(float(explicit(step)))
    assert float(explicit(5)) == pytest.approx(1.0) and float(explicit(60)) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        optim.WarmUpAndCosineDecay(scaled_lr=2.0)


def test_step_counts():
    config = Config(train_batch_size=512, train_epochs=100, eval_batch_size=256,
                    checkpoint_epochs=2, warmup_epochs=10)
    assert optim.train_steps(config, 50000) == 9766
    assert optim.train_steps(config.replace(train_steps=7), 50000) == 7
    assert optim.eval_steps(config, 10240) == 40
    assert optim.eval_steps(config, 10241) == 41
    assert optim.eval_steps(config.replace(eval_steps=3), 10000) == 3
    assert optim.checkpoint_steps(config, 50000) == 2 * 98
    assert optim.checkpoint_steps(config, 100) == 1
    assert optim.checkpoint_steps(config.replace(checkpoint_steps=5), 50000) == 5
    assert optim.warmup_steps(config, 50000) == 976
    assert optim.warmup_steps(config.replace(warmup_epochs=0.5), 50000) == 48


# --- variables by what they are, weight decay ----------------------------------------------------

class TinyModel(keras.Model):
    """Conv (bias) -> BN -> Dense (bias) -> supervised head (Dense with bias)."""

    def __init__(self, with_head=True):
        super().__init__()
        self.conv = keras.layers.Conv2D(2, 3, use_bias=True)
        self.bn = keras.layers.BatchNormalization()
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.dense = keras.layers.Dense(3)
        self.proj = keras.layers.Dense(2, use_bias=False)
        self.supervised_head = keras.layers.Dense(4) if with_head else None

    def call(self, x, training=False):
        h = self.dense(self.pool(self.bn(self.conv(x), training=training)))
        z = self.proj(h)
        return z if self.supervised_head is None else (z, self.supervised_head(h))


def _tiny_model(with_head=True):
    model = TinyModel(with_head)
    model(tf.zeros([1, 5, 5, 1]))
    for i, v in enumerate(model.trainable_variables):  # known weights: variable i is all (i + 1)
        v.assign(np.full(v.shape, i + 1.0, np.float32))
    return model


def _l2(v):
    return 0.5 * float(np.sum(np.square(v.numpy())))


def test_lars_exclusions_are_bn_biases_and_head():
    model = _tiny_model()
    expected = {id(v) for v in model.bn.variables} | {id(model.conv.bias), id(model.dense.bias)} \
        | {id(v) for v in model.supervised_head.variables}
    assert {id(v) for v in optim.lars_exclusions(model)} == expected
    assert len(model.bn.variables) == 4  # moving statistics too (harmless, never updated by LARS)
    no_head = _tiny_model(with_head=False)
    assert len(optim.lars_exclusions(no_head)) == 4 + 2


def test_weight_decay_loss_lars_vs_momentum():
    model = _tiny_model()
    config = Config(weight_decay=1e-3)
    lars = optim.weight_decay_loss(model, config.replace(optimizer='lars'))
    assert lars.dtype == tf.float32
    assert float(lars) == pytest.approx(1e-3 * _l2(model.supervised_head.kernel), rel=1e-6)

    bn = {id(v) for v in model.bn.variables}
    others = [v for v in model.trainable_variables if id(v) not in bn]
    assert len(others) == 7  # conv k+b, dense k+b, proj k, head k+b
    expected = 1e-3 * sum(_l2(v) for v in others)
    for name in ('momentum', 'adam'):
        value = float(optim.weight_decay_loss(model, config.replace(optimizer=name)))
        assert value == pytest.approx(expected, rel=1e-6)
    with_bn = expected + 1e-3 * sum(_l2(v) for v in model.bn.trainable_variables)
    assert abs(value - with_bn) > 1e-4  # BN really was left out

    no_head = _tiny_model(with_head=False)
    assert float(optim.weight_decay_loss(no_head, config)) == 0.0


def test_build_optimizer():
    model = _tiny_model()
    lars = optim.build_optimizer(Config(weight_decay=1e-4, momentum=0.8), 0.5, model)
    assert isinstance(lars, optim.LARS)
    assert (lars.lars_weight_decay, lars.momentum) == (1e-4, 0.8)
    excluded = {lars._var_key(v) for v in optim.lars_exclusions(model)}
    assert lars._no_decay_keys == lars._no_adaptation_keys == excluded
    sgd = optim.build_optimizer(Config(optimizer='momentum'), 0.5, model)
    assert isinstance(sgd, keras.optimizers.SGD) and sgd.nesterov and sgd.weight_decay is None
    adam = optim.build_optimizer(Config(optimizer='adam'), 0.5, model)
    assert isinstance(adam, keras.optimizers.Adam) and adam.weight_decay is None


def test_lars_trains_a_model_with_a_schedule():
    """End to end on a model: excluded variables take plain momentum steps, the others LARS's."""
    model = _tiny_model()
    config = Config(weight_decay=1e-4, learning_rate=0.3, train_batch_size=256, warmup_epochs=0,
                    train_steps=10)
    opt = optim.build_optimizer(config, optim.WarmUpAndCosineDecay(0.3, 1000, config), model)
    before = {id(v): v.numpy().copy() for v in model.trainable_variables}
    x = tf.random.stateless_normal([4, 5, 5, 1], seed=[1, 2])

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            z, logits = model(x, training=True)
            loss = tf.reduce_mean(tf.square(z)) + tf.reduce_mean(tf.square(logits))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return grads

    grads = step()
    for v, g in zip(model.trainable_variables, grads):
        moved = before[id(v)] - v.numpy()
        if v is model.conv.kernel:  # adapted: lr * eeta * ||w|| / ||g + wd w|| * (g + wd w)
            g = g.numpy() + 1e-4 * before[id(v)]
            trust = EETA * np.linalg.norm(before[id(v)]) / np.linalg.norm(g)
            np.testing.assert_allclose(moved, 0.3 * trust * g, rtol=1e-3, atol=1e-7)
        if v is model.supervised_head.kernel:  # excluded: plain SGD step on the first iteration
            np.testing.assert_allclose(moved, 0.3 * g.numpy(), rtol=1e-5)


def test_lars_popular_momentum_matches_numpy():
    """classic_momentum=False: the trust ratio is taken on the momentum update, lr applied after."""
    w_adapted, _, grads = _start()
    a = keras.Variable(w_adapted)
    opt = optim.LARS(LR, momentum=MOMENTUM, weight_decay=WD, classic_momentum=False, eeta=EETA)
    w, v = w_adapted.astype(np.float64), 0.0
    for g, _ in grads:
        opt.apply_gradients([(tf.constant(g), a)])
        v = MOMENTUM * v + g + WD * w
        w = w - LR * EETA * np.linalg.norm(w) / np.linalg.norm(v) * v
    np.testing.assert_allclose(a.numpy(), w, rtol=1e-5, atol=1e-7)
