"""Mixed precision: the encoder computes in bfloat16 or float16, everything that accumulates or
decides stays float32 (losses, BN moments, LARS, heads, metrics), float16 is loss-scaled with
skipped steps counted, and results, checkpoints and exports agree with float32."""

import contextlib
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import checkpoint, losses, optim, train
from simclr_tf.config import Config
from simclr_tf.model import build_model
from test_losses import np_nt_xent
from test_train_step import CONFIG, GLOBAL_PAIRS, PLAN, _batch, _one_device, _two_replicas

POLICIES = {'none': 'float32', 'bfloat16': 'mixed_bfloat16', 'float16': 'mixed_float16'}


@contextlib.contextmanager
def precision(name: str):
    """Keras' global policy as `set_up` sets it for --mixed_precision=name, float32 after."""
    keras.mixed_precision.set_global_policy(POLICIES[name])
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy('float32')


def _per_replica(strategy, array):
    half = len(array) // 2
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: array[ctx.replica_id_in_sync_group * half:][:half])


# --- numerics kept in float32 ---------------------------------------------------------------------

def test_nt_xent_gathers_and_computes_in_float32_across_replicas(two_replicas):
    """bfloat16 embeddings: the gather, logits, softmax and loss are float32, equal to float64
    NumPy on the same (bf16-rounded) values to float32 precision, not bf16's 2^-8."""
    z = np.random.default_rng(0).normal(size=(2 * GLOBAL_PAIRS, 16)).astype(np.float32)
    z16 = tf.cast(z, tf.bfloat16)
    views = np.concatenate([np.split(z16.numpy(), 2)[0].reshape(2, -1, 16),
                            np.split(z16.numpy(), 2)[1].reshape(2, -1, 16)], 1)  # per replica

    def loss(local):
        value, logits, _ = losses.nt_xent(local, 0.1)
        return value, logits

    values, logits = tf.function(lambda x: two_replicas.run(loss, args=(x,)))(
        _per_replica(two_replicas, tf.constant(views.reshape(-1, 16), tf.bfloat16)))
    expected = np_nt_xent(tf.cast(z16, tf.float32).numpy(), 0.1, True)
    for value, logit in zip(two_replicas.experimental_local_results(values),
                            two_replicas.experimental_local_results(logits)):
        assert value.dtype == logit.dtype == tf.float32
        assert logit.shape == (GLOBAL_PAIRS // 2, GLOBAL_PAIRS)  # keys from both replicas
    mean = np.mean([v.numpy() for v in two_replicas.experimental_local_results(values)])
    assert mean == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize('synchronized', [False, True])
def test_batch_norm_moments_and_moving_averages_are_float32(two_replicas, synchronized):
    """bfloat16 inputs around 100 (bf16 spacing 0.5 there): the moving mean and variance equal the
    float64 moments of the same values to float32 precision; with synchronised BN on two
    replicas, those of the global batch."""
    x = (100 + np.random.default_rng(1).normal(size=(8, 4, 4, 3))).astype(np.float32)
    x16 = tf.cast(x, tf.bfloat16)
    values = tf.cast(x16, tf.float64).numpy()
    with precision('bfloat16'):
        strategy = two_replicas if synchronized else tf.distribute.get_strategy()
        with strategy.scope():
            bn = keras.layers.BatchNormalization(momentum=0.0, synchronized=synchronized)
            bn.build(x.shape)
        assert bn.compute_dtype == 'bfloat16'
        call = tf.function(lambda v: strategy.run(lambda u: bn(u, training=True), args=(v,)))
        out = call(_per_replica(strategy, x16) if synchronized else x16)
    for result in strategy.experimental_local_results(out):
        assert result.dtype == tf.bfloat16
    assert bn.moving_mean.dtype == bn.moving_variance.dtype == 'float32'
    np.testing.assert_allclose(bn.moving_mean.numpy(), values.mean((0, 1, 2)), rtol=1e-6)
    # Synchronised BN's one-pass E[x^2] - E[x]^2 cancels ~1e4 to leave ~1: float32's 2^-24
    # relative to 1e4 is ~1e-3 absolute.
    np.testing.assert_allclose(bn.moving_variance.numpy(), values.var((0, 1, 2)),
                               atol=2e-3 if synchronized else 1e-5)


def test_lars_works_on_float32_with_a_low_precision_gradient():
    """A bfloat16 gradient on a float32 variable: decay, norms, trust ratio and update in
    float32, equal to float64 from the formulas."""
    rng = np.random.default_rng(2)
    w0 = rng.normal(size=(5, 7)).astype(np.float32)
    g = tf.cast(rng.normal(size=(5, 7)), tf.bfloat16)
    w = keras.Variable(w0)
    opt = optim.LARS(0.5, momentum=0.9, weight_decay=1e-2)
    opt.build([w])
    opt.apply([g], [w])
    g64 = tf.cast(g, tf.float64).numpy() + 1e-2 * w0.astype(np.float64)
    trust = optim.EETA_DEFAULT * np.linalg.norm(w0.astype(np.float64)) / np.linalg.norm(g64)
    assert w.dtype == opt.momentums[0].dtype == 'float32'
    np.testing.assert_allclose(w.numpy(), w0 - 0.5 * trust * g64, rtol=1e-6, atol=1e-7)


def test_loss_scaled_lars_sees_the_unscaled_gradient():
    """LARS under float16's loss scale S, given S * g, updates exactly as LARS given g: the
    decayed gradient, trust ratio and the unadapted (bias) update are those of float32."""
    rng = np.random.default_rng(3)
    values = [rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)]
    grads = [rng.normal(size=v.shape).astype(np.float32) for v in values]

    def run(scaled: bool):
        ws = [keras.Variable(v) for v in values]
        lars = optim.LARS(0.3, weight_decay=1e-2, exclude_from_weight_decay=[ws[1]])
        opt = optim.LossScaleOptimizer(lars, initial_scale=2.0 ** 10) if scaled else lars
        opt.build(ws)
        for _ in range(2):
            opt.apply([g * (2.0 ** 10 if scaled else 1) for g in grads], ws)
        return [w.numpy() for w in ws] + [m.numpy() for m in lars.momentums]

    for got, want in zip(run(True), run(False)):
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_heads_and_their_logits_are_float32_under_mixed_precision():
    with precision('bfloat16'):
        model = build_model(CONFIG, 10)
        outputs = model(tf.random.uniform([4, 16, 16, 3]), training=True)
    assert model.encoder.stem.convs[0].compute_dtype == 'bfloat16'
    for head in (model.projection_head, model.supervised_head):
        for layer in head._flatten_layers(include_self=True, recursive=True):
            assert layer.compute_dtype == 'float32', layer.path
    assert all(v.dtype == 'float32' for v in model.variables)
    assert all(v.dtype == tf.float32 for v in outputs.values())
    head = model.supervised_head.linear_layer.dense
    h = outputs['proj_head_input'].numpy().astype(np.float64)
    np.testing.assert_allclose(outputs['logits_sup'].numpy(),
                               h @ head.kernel.numpy() + head.bias.numpy(), rtol=1e-5, atol=1e-6)
    sup = losses.supervised_loss(tf.one_hot([1, 2, 3, 4], 10), outputs['logits_sup'])
    assert sup.dtype == tf.float32


def test_set_up_sets_float32_for_none_after_another_precision():
    from simclr_tf import program
    try:
        program.set_up(Config(mixed_precision='float16'))
        assert keras.mixed_precision.global_policy().name == 'mixed_float16'
        program.set_up(Config())
        assert keras.mixed_precision.global_policy().name == 'float32'
    finally:
        keras.mixed_precision.set_global_policy('float32')
