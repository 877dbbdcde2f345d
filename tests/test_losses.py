"""The contrastive objectives against NumPy written from the formulas, on 1 and 2 replicas."""

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import losses
from simclr_tf.config import Config

N, DIM = 8, 16  # global batch of N examples (2N views)


# --- NumPy references: loop over anchors, from the definitions ---------------------------------

def _prepare(z, hidden_norm):
    z = np.asarray(z, np.float64)
    if hidden_norm:
        z = z / np.linalg.norm(z, axis=1, keepdims=True)
    return z, z @ z.T, len(z) // 2


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_nt_xent(z, temperature, hidden_norm):
    """Sum over all 2N anchors of l(i, j) = -log exp(s_ij/T) / sum_{k != i} exp(s_ik/T), over N."""
    z, s, n = _prepare(z, hidden_norm)
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        others = [s[i, k] / temperature for k in range(2 * n) if k != i]
        total += -(s[i, j] / temperature - np.logaddexp.reduce(others))
    return total / n  # mean over examples of l(i, j) + l(j, i): 2x the paper's L


def _pairs(z, hidden_norm):
    """(s_pos, [s_neg...]) for each of the 2N anchors; negatives are the 2N-2 other views."""
    z, s, n = _prepare(z, hidden_norm)
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        yield s[i, j], [s[i, k] for k in range(2 * n) if k not in (i, j)]


def np_nt_logistic(z, temperature, hidden_norm):
    total = 0.0
    for pos, negs in _pairs(z, hidden_norm):
        total += -_log_sigmoid(pos / temperature)
        total += -np.mean([_log_sigmoid(-neg / temperature) for neg in negs])
    return total / (len(z) // 2)


def np_margin_triplet(z, margin, hidden_norm, semi_hard, stats=None):
    total = 0.0
    for pos, negs in _pairs(z, hidden_norm):
        chosen = negs
        if semi_hard:
            chosen = [neg for neg in negs if pos - margin < neg < pos]
            if stats is not None:
                stats['fallback' if not chosen else 'semi_hard'] += 1
            chosen = chosen or negs
        total += np.mean([max(neg - pos + margin, 0.0) for neg in chosen])
    return total / (len(z) // 2)


# --- helpers -------------------------------------------------------------------------------------

def _random_z(seed, n=N, dim=DIM, scale=0.5):
    return (np.random.default_rng(seed).normal(size=(2 * n, dim)) * scale).astype(np.float32)


def _paired_z(seed=1, n=N, dim=4):
    """Views of half the examples close to each other, of the other half far apart: with a small
    dimension this mixes easy, semi-hard and hard negatives, and anchors without semi-hard ones."""
    rng = np.random.default_rng(seed)
    view1 = rng.normal(size=(n, dim))
    noise = np.where(np.arange(n)[:, None] < n // 2, 0.1, 1.5) * rng.normal(size=(n, dim))
    return np.concatenate([view1, view1 + noise]).astype(np.float32)


def _per_replica(strategy, z):
    """Replica r gets [view1 rows r*n:(r+1)*n; view2 rows r*n:(r+1)*n]."""
    view1, view2 = np.split(z, 2)
    k = strategy.num_replicas_in_sync
    shards = [np.concatenate([a, b]) for a, b in zip(np.split(view1, k), np.split(view2, k))]
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(shards[ctx.replica_id_in_sync_group]))


LOSSES = {
    'nt_xent': (lambda z, t, norm: losses.nt_xent(z, t, norm), np_nt_xent),
    'nt_logistic': (lambda z, t, norm: losses.nt_logistic(z, t, norm), np_nt_logistic),
    # the "temperature" argument doubles as the margin here
    'margin_triplet': (lambda z, m, norm: losses.margin_triplet(z, m, norm),
                       lambda z, m, norm: np_margin_triplet(z, m, norm, False)),
    'margin_triplet_sh': (lambda z, m, norm: losses.margin_triplet(z, m, norm, semi_hard=True),
                          lambda z, m, norm: np_margin_triplet(z, m, norm, True)),
}


# --- one device ----------------------------------------------------------------------------------

@pytest.mark.parametrize('hidden_norm', [True, False])
@pytest.mark.parametrize('temperature', [0.1, 0.5])
def test_nt_xent_matches_numpy(hidden_norm, temperature):
    z = _random_z(0)
    loss, logits_ab, labels = losses.nt_xent(tf.constant(z), temperature, hidden_norm)
    np.testing.assert_allclose(loss.numpy(), np_nt_xent(z, temperature, hidden_norm), rtol=1e-5)
    assert logits_ab.shape == (N, N) and labels.shape == (N, 2 * N)
    np.testing.assert_array_equal(np.argmax(labels, 1), np.arange(N))


@pytest.mark.parametrize('hidden_norm', [True, False])
@pytest.mark.parametrize('temperature', [0.2, 1.0])
def test_nt_logistic_matches_numpy(hidden_norm, temperature):
    z = _random_z(1)
    loss, _, _ = losses.nt_logistic(tf.constant(z), temperature, hidden_norm)
    np.testing.assert_allclose(loss.numpy(), np_nt_logistic(z, temperature, hidden_norm),
                               rtol=1e-5)


@pytest.mark.parametrize('hidden_norm', [True, False])
@pytest.mark.parametrize('semi_hard', [False, True])
def test_margin_triplet_matches_numpy(hidden_norm, semi_hard):
    z = _paired_z()
    margin = 0.3
    stats = {'semi_hard': 0, 'fallback': 0}
    expected = np_margin_triplet(z, margin, hidden_norm, semi_hard, stats)
    loss, _, _ = losses.margin_triplet(tf.constant(z), margin, hidden_norm, semi_hard)
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5, atol=1e-6)
    if semi_hard:  # both the mined and the fall-back branch were exercised
        assert stats['semi_hard'] > 0 and stats['fallback'] > 0, stats
        assert not np.isclose(expected, np_margin_triplet(z, margin, hidden_norm, False))


@pytest.mark.parametrize('semi_hard', [False, True])
def test_margin_triplet_zero_when_positives_far_closer(semi_hard):
    views = np.eye(N, DIM, dtype=np.float32) * 3.0  # s+ = 1, s- = 0 after normalisation
    z = np.concatenate([views, views])
    loss, _, _ = losses.margin_triplet(tf.constant(z), 0.5, True, semi_hard)
    assert loss.numpy() == pytest.approx(0.0, abs=1e-7)
    loss, _, _ = losses.margin_triplet(tf.constant(z), 1.5, True, semi_hard)  # margin > gap
    assert loss.numpy() == pytest.approx(2 * 0.5, abs=1e-6)


def test_contrastive_loss_dispatches_on_config():
    z = tf.constant(_random_z(3))
    base = Config(temperature=0.3, hidden_norm=True, margin=0.4)
    cases = [(base, losses.nt_xent(z, 0.3, True)),
             (base.replace(contrastive_loss='nt_logistic'), losses.nt_logistic(z, 0.3, True)),
             (base.replace(contrastive_loss='margin_triplet', semi_hard=True),
              losses.margin_triplet(z, 0.4, True, True))]
    values = set()
    for config, (expected, _, _) in cases:
        loss, _, _ = losses.contrastive_loss(z, config)
        assert loss.numpy() == pytest.approx(expected.numpy(), rel=1e-6)
        values.add(round(float(loss), 5))
    assert len(values) == 3


def test_metrics_accuracy_one_for_identical_separated_views():
    views = np.eye(N, DIM, dtype=np.float32) * 5.0
    _, logits_ab, labels = losses.nt_xent(tf.constant(np.concatenate([views, views])), 0.1)
    accuracy, entropy = losses.contrastive_metrics(logits_ab, labels)
    assert accuracy.numpy() == 1.0
    assert entropy.numpy() < 1e-2  # the positive takes nearly all the probability


def test_metrics_match_numpy():
    z = _random_z(4, scale=1.0)
    _, logits_ab, labels = losses.nt_xent(tf.constant(z), 0.5)
    accuracy, entropy = losses.contrastive_metrics(logits_ab, labels)
    logits = logits_ab.numpy().astype(np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert entropy.numpy() == pytest.approx(np.mean(-np.sum(p * np.log(p), 1)), rel=1e-5)
    assert accuracy.numpy() == pytest.approx(np.mean(np.argmax(logits, 1) == np.arange(N)))
    assert 0 < accuracy.numpy() < 1  # a random batch: neither trivially right nor wrong


def test_supervised_loss_matches_numpy():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(6, 10)).astype(np.float32)
    labels = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 6)]
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    expected = -np.mean(np.sum(labels * log_p, 1))
    loss = losses.supervised_loss(tf.constant(labels), tf.constant(logits, tf.bfloat16))
    assert loss.dtype == tf.float32
    assert loss.numpy() == pytest.approx(expected, rel=2e-2)
    assert losses.supervised_loss(labels, logits).numpy() == pytest.approx(expected, rel=1e-5)


# --- two replicas --------------------------------------------------------------------------------

def test_cross_replica_concat_orders_replicas(two_replicas):
    values = two_replicas.experimental_distribute_values_from_function(
        lambda ctx: tf.fill([2, 3], float(ctx.replica_id_in_sync_group)))
    out = tf.function(lambda v: two_replicas.run(losses.cross_replica_concat, args=(v,)))(values)
    for gathered in two_replicas.experimental_local_results(out):
        np.testing.assert_array_equal(gathered.numpy()[:, 0], [0, 0, 1, 1])
    single = tf.ones([2, 3])
    assert losses.cross_replica_concat(single) is single


@pytest.mark.parametrize('name,scale,hidden_norm', [
    ('nt_xent', 0.1, True), ('nt_xent', 0.5, False), ('nt_logistic', 0.2, True),
    ('margin_triplet', 0.3, True), ('margin_triplet_sh', 0.3, True)])
def test_two_replicas_equal_global_batch(two_replicas, name, scale, hidden_norm):
    fn, reference = LOSSES[name]
    z = _paired_z() if name.startswith('margin') else _random_z(6)

    @tf.function  # as a training step: one function around strategy.run
    def step(per_replica_z):
        return two_replicas.run(lambda local_z: fn(local_z, scale, hidden_norm),
                                args=(per_replica_z,))

    loss, logits_ab, labels = step(_per_replica(two_replicas, z))
    per_replica = [l.numpy() for l in two_replicas.experimental_local_results(loss)]
    np.testing.assert_allclose(np.mean(per_replica), reference(z, scale, hidden_norm),
                               rtol=1e-5, atol=1e-6)
    n = N // 2
    for r, (lg, lb) in enumerate(zip(two_replicas.experimental_local_results(logits_ab),
                                     two_replicas.experimental_local_results(labels))):
        assert lg.shape == (n, N) and lb.shape == (n, 2 * N)
        np.testing.assert_array_equal(np.argmax(lb, 1), r * n + np.arange(n))


@pytest.mark.parametrize('hidden_norm', [True, False])
def test_two_replicas_gradients_equal_single_device(two_replicas, hidden_norm):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2 * N, 6)).astype(np.float32)
    w0 = (rng.normal(size=(6, DIM)) * 0.3).astype(np.float32)
    temperature = 0.2

    w = tf.Variable(w0)
    with tf.GradientTape() as tape:
        loss, _, _ = losses.nt_xent(tf.matmul(x, w), temperature, hidden_norm)
    expected = tape.gradient(loss, w).numpy()

    with two_replicas.scope():
        w_mirrored = tf.Variable(w0)

    def replica_step(local_x):
        with tf.GradientTape() as tape:
            local_loss, _, _ = losses.nt_xent(tf.matmul(local_x, w_mirrored), temperature,
                                              hidden_norm)
            scaled = local_loss / two_replicas.num_replicas_in_sync
        return tape.gradient(scaled, w_mirrored)

    step = tf.function(lambda per_replica_x: two_replicas.run(replica_step, args=(per_replica_x,)))
    grads = step(_per_replica(two_replicas, x))
    total = two_replicas.reduce(tf.distribute.ReduceOp.SUM, grads, axis=None).numpy()
    # Holds only if the gradient flows back through the gathered keys to their own replica.
    np.testing.assert_allclose(total, expected, rtol=1e-4, atol=1e-6)
