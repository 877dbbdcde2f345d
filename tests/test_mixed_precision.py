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
from test_train_step import CONFIG, GLOBAL_PAIRS, PLAN, _batch, _one_device

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


# --- a step under mixed precision against float32 ----------------------------------------------

def _state(config, strategy, weights, loss_scale=2.0 ** 8):
    """test_train_step's state, with float16's loss scale set where this tiny model's first
    gradients fit (Keras' 2^15 overflows them: the step would be skipped)."""
    state = _state_of(config, strategy, weights)
    if state.loss_scaled:
        state.optimizer.dynamic_scale.assign(loss_scale)
    return state


def _state_of(config, strategy, weights):
    import test_train_step
    return test_train_step._state(config, strategy, weights)


def _update(state, weights):
    initial = dict(zip([v.path for v in state.model.weights], weights))
    return np.concatenate([(v.numpy() - initial[v.path]).ravel()
                           for v in state.model.trainable_variables])


def _relative(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope='module')
def weights():
    keras.utils.set_random_seed(0)  # one initialisation, whatever ran before in this process
    return build_model(CONFIG, 10).get_weights()


@pytest.fixture(scope='module')
def float32_step(weights):
    return _one_device(CONFIG, weights)


def _step(config, weights, strategy=None, batch=_batch):
    strategy = strategy or tf.distribute.get_strategy()
    with precision(config.mixed_precision):
        state = _state(config, strategy, weights)
        step_fn = train.make_step_fn(config, state, strategy, PLAN)
        images, labels = batch()
        if strategy.num_replicas_in_sync > 1:
            images, labels = _per_replica(strategy, images), _per_replica(strategy, labels)

        @tf.function
        def step(x, y):
            return strategy.reduce(tf.distribute.ReduceOp.MEAN, strategy.run(step_fn, (x, y)),
                                   axis=None)

        metrics = step(images, labels)
    assert metrics.dtype == tf.float32  # the summaries' values
    return metrics.numpy(), state


def test_a_bfloat16_step_matches_float32_within_bfloat16_rounding(weights, float32_step):
    """Same weights and batch. bf16 keeps 8 significant bits, so each rounding moves a value by
    up to 2^-9; the loss (float32 from bf16 features) agrees within 1 %. The update (LARS
    normalises each layer's step, so its direction is what changes) moves ~25 % at this
    initialisation, through 18 layers of rounded backward passes; a different batch of the same
    data moves it by > 100 %: bf16 must change the step by less than a third of what the
    minibatch noise does."""
    metrics32, state32 = float32_step
    metrics16, state16 = _step(CONFIG.replace(mixed_precision='bfloat16'), weights)
    names = train.metric_names(CONFIG, True)
    loss = names.index('train/total_loss')
    assert metrics16[loss] == pytest.approx(metrics32[loss], rel=1e-2)
    other = np.random.default_rng(1).uniform(size=_batch()[0].shape).astype(np.float32)
    other_batch = _step(CONFIG, weights, batch=lambda: (other, _batch()[1]))[1]
    update32 = _update(state32, weights)
    by_precision = _relative(_update(state16, weights), update32)
    by_batch = _relative(_update(other_batch, weights), update32)
    assert by_precision < 0.4 and by_precision < by_batch / 3, (by_precision, by_batch)
    for kind in ('moving_mean', 'moving_variance'):
        got, want = ([v.numpy() for v in s.model.non_trainable_variables if kind in v.path]
                     for s in (state16, state32))
        assert _relative(np.concatenate([g.ravel() for g in got]),
                         np.concatenate([w.ravel() for w in want])) < 1e-2, kind


def test_two_replicas_equal_one_device_under_mixed_precision(weights, two_replicas):
    """Global BN and the cross-replica NT-Xent stay exact (float32), so two replicas and one device
    differ only in where bfloat16 rounds (each replica's half batch): metrics within 5e-3, the
    update within 20 % (measured 1-17 % over five initialisations, 13 % at this one; float32
    alone: 1e-5, test_train_step), against the > 100 % another batch moves it. (float16 on two
    replicas: the overflow test below.)"""
    config = CONFIG.replace(mixed_precision='bfloat16')
    one_metrics, one = _step(config, weights)
    two_metrics, two = _step(config, weights, two_replicas)
    np.testing.assert_allclose(two_metrics, one_metrics, rtol=5e-3, atol=5e-3)
    assert _relative(_update(two, weights), _update(one, weights)) < 0.2
    for a, b in zip(one.model.non_trainable_variables, two.model.non_trainable_variables):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-2, atol=1e-3, err_msg=a.path)


# --- float16: an overflow skips the step, halves the scale, and training goes on ----------------

def test_an_injected_float16_overflow_is_skipped_counted_and_training_continues(weights,
                                                                                two_replicas):
    """Three steps on two replicas; in the second, one pixel of replica 1's images is 1e5, beyond
    float16's 65504: inf in the forward pass, so non-finite gradients on that replica only. Both
    replicas skip that step (the weights do not move, the scale halves), it still counts as a
    step, its NaN metrics stay out of the averages (the NaN guard sees finite ones), and the
    third step trains."""
    config = CONFIG.replace(mixed_precision='float16')
    images, labels = _batch()
    batches = np.stack([images] * 3)
    batches[1, -1, 0, 0, 0] = 1e5  # the last example: replica 1's half
    with precision('float16'):
        state = _state(config, two_replicas, weights)
        dataset = tf.data.Dataset.from_tensor_slices((batches, np.stack([labels] * 3)))
        iterator = iter(two_replicas.experimental_distribute_dataset(dataset))
        loop = train.make_loop_fn(config, state, two_replicas, PLAN)
        seen = []
        for _ in range(3):
            before = [v.numpy() for v in state.model.trainable_variables]
            seen.append((loop(iterator, tf.constant(1)).numpy(),
                         float(state.optimizer.dynamic_scale.numpy()),
                         [not np.array_equal(b, v.numpy())
                          for b, v in zip(before, state.model.trainable_variables)]))
    (m1, scale1, moved1), (m2, scale2, moved2), (m3, scale3, moved3) = seen
    assert scale1 == 2.0 ** 8 and scale2 == 2.0 ** 7 == scale3
    assert any(moved1) and not any(moved2) and any(moved3)
    assert int(state.optimizer.skipped_steps.numpy()) == 1 and state.step == 3
    assert np.all(np.isfinite(m3)) and not np.any(m2)  # no step of that loop gave metrics
    assert all(np.all(np.isfinite(v.numpy())) for v in state.model.variables)


def test_the_nan_guard_stops_float16_when_even_unscaled_gradients_overflow(weights):
    config = CONFIG.replace(mixed_precision='float16')
    with precision('float16'):
        state = _state(config, tf.distribute.get_strategy(), weights, loss_scale=0.5)
    state.checkpointer = type('NoCheckpoint', (), {'latest': None})()
    with pytest.raises(train.TrainingDiverged, match='loss scale 0.5'):
        train._check_loss_scale(state, 7, 0)


def test_a_loop_of_only_skipped_float16_steps_shows_no_loss(tmp_path, sample_dir, monkeypatch,
                                                            caplog):
    """A loss scale of 2^40 overflows every step of a 2-step run: the progress lines say so
    rather than show the zeros of a loop that gave no metrics as `loss 0.0000`."""
    class Overflowing(optim.LossScaleOptimizer):
        def __init__(self, inner, **kwargs):
            super().__init__(inner, initial_scale=2.0 ** 40, **kwargs)

    monkeypatch.setattr(optim, 'LossScaleOptimizer', Overflowing)
    with caplog.at_level('INFO'):
        state = _train_run(tmp_path / 'run', sample_dir, 'float16', 2)
    assert state.step == 2 and int(state.optimizer.skipped_steps.numpy()) == 2
    progress = [m for m in caplog.messages if m.startswith('step ') and ' | ' in m]
    assert [line.split(' | ')[:2] for line in progress] == [
        [f'step {i}/2', 'every step skipped (float16 overflow): no loss, the weights did not '
                        'change'] for i in (1, 2)], progress
    assert not any('loss 0.0000' in m for m in caplog.messages)
    assert train._progress_line(3, 4, {'train/total_loss': 0.5}, 1.0, 1.0).startswith(
        'step 3/4 | loss 0.5000 | ')  # a loop with a step applied shows its loss


# --- checkpoints, fine-tuning, the authors' models and exports across precisions ---------------

def _train_run(model_dir, sample_dir, name, steps, **changes):
    from test_program import _config
    from simclr_tf import data, model_dir as model_dir_lib, program
    config = _config(model_dir, sample_dir, train_steps=steps, mixed_precision=name, **changes)
    try:
        program.set_up(config)
        os.makedirs(config.model_dir, exist_ok=True)
        model_dir_lib.check_config(config, model_dir_lib.read_config(config.model_dir))  # resumable
        model_dir_lib.write_config(config)
        info = data.dataset_info(config, need_eval=False)
        return train.train(config, tf.distribute.get_strategy(), info)
    finally:
        keras.mixed_precision.set_global_policy('float32')


@pytest.mark.parametrize('first, then, finetune', [('float16', 'none', 'bfloat16'),
                                                   ('none', 'float16', 'none')])
def test_a_run_resumes_and_is_fine_tuned_under_another_precision(tmp_path, sample_dir, first,
                                                                 then, finetune):
    """Resume: the optimizer's state (step, LARS momenta) comes back whole in either direction;
    float16's loss scale is kept apart, and summarised with the skipped steps. Fine-tuning from
    the result under a third setting starts from its exact weights."""
    done = _train_run(tmp_path / 'pre', sample_dir, first, 2, train_summary_steps=1)
    saved = [v.numpy() for v in optim.inner_optimizer(done.optimizer).variables]
    resumed = _train_run(tmp_path / 'pre', sample_dir, then, 3)
    assert resumed.step == 3
    reader = tf.train.load_checkpoint(str(tmp_path / 'pre' / 'ckpt-2'))
    for i, value in enumerate(saved):
        np.testing.assert_array_equal(
            reader.get_tensor(f'optimizer/variables/{i}/.ATTRIBUTES/VARIABLE_VALUE'), value)
    assert len(optim.inner_optimizer(resumed.optimizer).variables) == len(saved)
    has_scale = any(k.startswith('loss_scale/') for k, _ in tf.train.list_variables(
        str(tmp_path / 'pre' / 'ckpt-2')))
    assert has_scale == (first == 'float16')
    assert all(np.all(np.isfinite(v.numpy())) for v in resumed.model.variables)
    if first == 'float16':
        events = tf.io.gfile.glob(str(tmp_path / 'pre' / 'events.out.tfevents.*'))
        tags = {v.tag for e in events for ev in tf.compat.v1.train.summary_iterator(e)
                for v in ev.summary.value}
        assert {'train/skipped_steps', 'train/loss_scale', 'train/contrast_loss'} <= tags

    finetuned = _train_run(tmp_path / 'ft', sample_dir, finetune, 1, train_mode='finetune',
                           checkpoint=str(tmp_path / 'pre'), fine_tune_after_block=4,
                           lineareval_while_pretraining=False)
    encoder = {v.path: v.numpy() for v in resumed.model.encoder.variables}
    for v in finetuned.model.encoder.variables:
        if 'moving_' not in v.path:  # re-estimated in the step (frozen_bn=batch)
            np.testing.assert_array_equal(v.numpy(), encoder[v.path], v.path)


@pytest.mark.parametrize('name', ['bfloat16', 'float16'])
def test_the_authors_checkpoint_loads_under_every_precision(tmp_path, name):
    """Their r18 CIFAR checkpoint: the same float32 variables under every policy, and outputs
    within the policy's rounding of theirs."""
    from test_authors import assert_outputs, config_of, fixture_of, input_of, write_checkpoint
    fixture = fixture_of('r18_cifar')
    prefix = write_checkpoint(fixture, str(tmp_path / 'theirs' / 'ckpt-1'))
    loaded = {}
    for policy in ('none', name):
        config = config_of(fixture, checkpoint=prefix, model_dir=str(tmp_path / policy),
                           mixed_precision=policy)
        with precision(policy):
            model = build_model(config, 10)
            optimizer = optim.build_optimizer(config, 0.1, model)
            optimizer.build(model.trainable_variables)
            checkpoint.Checkpointer(config, model, optimizer).restore(model)
            outputs = model(input_of(fixture), training=False)
        loaded[policy] = ({v.path: v.numpy() for v in model.variables}, outputs)
    assert_outputs(loaded['none'][1], fixture['expected_trainable_false'])
    assert loaded['none'][0].keys() == loaded[name][0].keys()
    for path, value in loaded['none'][0].items():
        np.testing.assert_array_equal(loaded[name][0][path], value, path)
    for key, value in loaded['none'][1].items():
        got = loaded[name][1][key].numpy()
        assert got.dtype == np.float32
        assert _relative(got, value.numpy()) < 5e-2, key  # 18 layers of 2^-9 (bf16) roundings


CONSUMER = """
import sys
sys.modules['simclr_tf'] = None  # loading must not need it
import numpy as np
import tensorflow as tf
images = np.load(sys.argv[1])
result = {}
for i, path in enumerate(sys.argv[3:]):
    m = tf.saved_model.load(path)
    for name, value in m(tf.constant(images), trainable=False).items():
        result[f'{i}/{name}'] = value.numpy()
    served = m.signatures['serving_default'](images=tf.constant(images))
    result.update({f'{i}/serving/{name}': value.numpy() for name, value in served.items()})
np.savez(sys.argv[2], **result)
"""


def test_exports_of_mixed_precision_runs_take_and_return_float32(tmp_path, sample_dir):
    """bfloat16 and float16 runs' exports, loaded in a process without simclr_tf: float32 in,
    float32 out, equal to the model within its precision's rounding."""
    from simclr_tf import export
    from test_export import TINY, sample_images
    images = sample_images(sample_dir, 7, 32)
    paths, expected = [], []
    for name in ('bfloat16', 'float16'):
        config = TINY.replace(model_dir=str(tmp_path / name), mixed_precision=name)
        with precision(name):
            model = build_model(config, 10)
            paths.append(export.export_saved_model(model, config, 1))
            expected.append(model(images, training=False))
    np.save(tmp_path / 'images.npy', images)
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    run = subprocess.run([sys.executable, '-c', CONSUMER, str(tmp_path / 'images.npy'),
                          str(tmp_path / 'out.npz'), *paths], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    got = dict(np.load(tmp_path / 'out.npz'))
    assert len(got) > 20 and all(v.dtype == np.float32 for v in got.values())
    for i, outputs in enumerate(expected):
        for key in ('final_avg_pool', 'proj_head_output', 'logits_sup'):
            for where in (f'{i}/{key}', f'{i}/serving/{key}'):
                np.testing.assert_allclose(got[where], outputs[key].numpy(), rtol=1e-2,
                                           atol=1e-2, err_msg=where)
