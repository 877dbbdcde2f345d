"""The hub-style export: loadable without this package, equal to the model, fine-tunable through
the loaded variables, hub.KerasLayer and TFSMLayer, servable, with clear errors, and crash-safe."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import export, optim
from simclr_tf.config import Config
from simclr_tf.model import build_model

NUM_CLASSES = 10
TINY = Config(resnet_depth=18, width_multiplier=0.25, image_size=32, proj_out_dim=16,
              lineareval_while_pretraining=True, weight_decay=1e-4, use_tpu=False)
STEP = 5
# Inputs of the equality checks: two batch sizes, and an image size other than training's.
# (Batches of 4+: training-mode BN over 2 examples divides by near-zero variances.)
INPUTS = {'x4': (4, 32), 'x7': (7, 32), 'x40': (4, 40)}


def sample_images(sample_dir: str, n: int, size: int, offset: int = 0) -> np.ndarray:
    """n real test images (one class each): noise images all look alike to the encoder, and
    training-mode BN over a batch of near-identical features is numerically ill-conditioned."""
    classes = sorted(os.listdir(os.path.join(sample_dir, 'test')))
    batch = []
    for i in range(n):
        name = os.path.join(sample_dir, 'test', classes[i % len(classes)], f'{offset:04d}.jpg')
        image = tf.image.convert_image_dtype(tf.io.decode_jpeg(tf.io.read_file(name)), tf.float32)
        batch.append(tf.image.resize(image, [size, size]).numpy().clip(0, 1))
    return np.stack(batch)


def perturb(model: keras.Model) -> None:
    """Random weights and BN statistics (fresh ones are 0/1, and the zero-initialised BN scales
    would hide the residual branches), so that both BN modes and every stage are exercised."""
    rng = np.random.default_rng(0)
    for v in model.trainable_variables:
        v.assign(v + rng.normal(0, 0.1, v.shape).astype(np.float32))
    for v in model.non_trainable_variables:  # BN moving means and variances
        v.assign(rng.uniform(0.5, 1.5, v.shape).astype(np.float32))


@pytest.fixture(scope='module')
def exported(tmp_path_factory, sample_dir, two_replicas):
    """(config, model, export path, expected outputs) — one export shared by the tests. The model
    is built as the program builds it, under a strategy: here two replicas, so its variables are
    mirrored, which saving must handle."""
    config = TINY.replace(model_dir=str(tmp_path_factory.mktemp('model_dir')))
    keras.utils.set_random_seed(0)
    with two_replicas.scope():
        model = build_model(config, NUM_CLASSES)
    perturb(model)
    path = export.export_saved_model(model, config, STEP)
    # The reference is the model run as the export runs it: as a graph, with global BN as the
    # plain BN it is on one replica. Rounding alone separates it from an eager run, or from global
    # BN's one-pass variance (E[x^2] - E[x]^2), by up to ~1e-4 in training-mode BN over a few
    # examples: the projection head's BN divides by variances near its epsilon.
    spec = [tf.TensorSpec([None, None, None, 3], tf.float32)]
    forward = {mode: tf.function(lambda x, mode=mode: model(x, training=mode), input_signature=spec)
               for mode in (False, True)}
    expected = {}
    with export.single_replica_batch_norm(model):
        for trainable in (False, True):  # inference first: training mode moves BN statistics
            for offset, (key, (n, size)) in enumerate(INPUTS.items()):
                x = sample_images(sample_dir, n, size, offset)
                expected[key] = x
                for name, value in forward[trainable](x).items():
                    expected[f'{key}/{trainable}/{name}'] = value.numpy()
    return config, model, path, expected


@pytest.fixture(scope='module')
def loaded(exported):
    return export.load_saved_model(exported[2])


def test_export_directory_holds_only_the_step(exported):
    config, model, path, _ = exported
    assert path == os.path.join(config.model_dir, 'saved_model', str(STEP))
    assert os.listdir(os.path.dirname(path)) == [str(STEP)]  # no temporaries left
    assert isinstance(model.variables[0].value, tf.distribute.DistributedValues)
    assert os.path.isfile(os.path.join(path, 'saved_model.pb'))
    with open(os.path.join(path, 'assets.extra', 'config.json')) as f:
        assert Config.from_dict(json.load(f)) == config


FRESH_PROCESS = textwrap.dedent('''
    import sys
    # simclr_tf unimportable, even where it is installed: loading must not need it.
    sys.modules['simclr_tf'] = None
    import numpy as np
    import tensorflow as tf
    path, inputs, outputs = sys.argv[1:]
    m = tf.saved_model.load(path)
    data = np.load(inputs)
    serving = m.signatures['serving_default'](images=tf.constant(data['x7']))
    result = {f'serving/{name}': value.numpy() for name, value in serving.items()}
    for trainable in (False, True):  # inference first: training mode moves the BN statistics
        for key in ('x4', 'x7', 'x40'):
            for name, value in m(tf.constant(data[key]), trainable=trainable).items():
                result[f'{key}/{trainable}/{name}'] = value.numpy()
    np.savez(outputs, **result)
''')


def test_fresh_process_without_the_package_reproduces_the_model(exported, tmp_path):
    _, model, path, expected = exported
    np.savez(tmp_path / 'inputs.npz', **{k: expected[k] for k in INPUTS})
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    run = subprocess.run(
        [sys.executable, '-c', FRESH_PROCESS, path, str(tmp_path / 'inputs.npz'),
         str(tmp_path / 'outputs.npz')], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    got = dict(np.load(tmp_path / 'outputs.npz'))
    names = {k.split('/')[-1] for k in expected if '/' in k}
    assert names == {'initial_conv', 'initial_max_pool', 'block_group1', 'block_group2',
                     'block_group3', 'block_group4', 'final_avg_pool', 'proj_head_input',
                     'proj_head_output', 'logits_sup'}
    # Float32 in another process: oneDNN may pick other kernels, so sums run in another order
    # (2.4e-5 apart in the projection head after training-mode BN on 4 images, on an AVX-512 Xeon).
    tolerance = dict(rtol=1e-4, atol=1e-4)
    for key, value in expected.items():
        if '/' in key:
            np.testing.assert_allclose(got[key], value, **tolerance, err_msg=key)
    # Training mode really differs (batch statistics), so the comparison above tells them apart.
    assert not np.allclose(expected['x7/True/final_avg_pool'], expected['x7/False/final_avg_pool'],
                           **tolerance)
    for name in names:
        np.testing.assert_allclose(got[f'serving/{name}'], expected[f'x7/False/{name}'],
                                   **tolerance, err_msg=name)


def test_no_custom_gradients_are_saved(exported):
    """Global BN's all-reduce carries a custom gradient whose own gradient a SavedModel does not
    keep; loading such an export warns per BN layer. Ours is traced as the plain BN it is on one
    replica (the model here has global_bn=True)."""
    from tensorflow.core.protobuf import saved_model_pb2
    assert exported[0].global_bn
    saved = saved_model_pb2.SavedModel()
    with open(os.path.join(exported[2], 'saved_model.pb'), 'rb') as f:
        saved.ParseFromString(f.read())
    functions = saved.meta_graphs[0].graph_def.library.function
    assert len(functions) > 0
    assert not [node.name for function in functions for node in function.node_def
                if '_gradient_op_type' in node.attr]
    assert all(layer.synchronized for layer in exported[1]._flatten_layers()
               if isinstance(layer, keras.layers.BatchNormalization))  # restored after export


def test_root_carries_variables_and_weight_decay(exported, loaded):
    config, model, _, _ = exported
    assert len(loaded.variables) == len(model.variables)
    assert len(loaded.trainable_variables) == len(model.trainable_variables)
    assert [v.shape for v in loaded.trainable_variables] == [v.shape for v in
                                                             model.trainable_variables]
    assert len(loaded.regularization_losses) == 1
    want = optim.weight_decay_loss(model, config.replace(optimizer='momentum'))
    np.testing.assert_allclose(loaded.regularization_losses[0](), want, rtol=1e-6)
    assert float(want) > 0


def test_gradients_reach_the_loaded_encoder(exported, loaded):
    _, model, _, expected = exported
    with tf.GradientTape() as tape:
        out = loaded(tf.constant(expected['x7']), trainable=True)
        loss = tf.reduce_sum(tf.square(out['final_avg_pool']))
    grads = tape.gradient(loss, loaded.trainable_variables)
    # The loaded trainable_variables are the model's, in its order. Through a loaded function
    # the heads, which h does not depend on, get zeros rather than None.
    encoder = {id(v) for v in model.encoder.trainable_variables}
    own = [g for g, v in zip(grads, model.trainable_variables) if id(v) in encoder]
    rest = [g for g, v in zip(grads, model.trainable_variables) if id(v) not in encoder]
    assert len(own) == len(encoder) > 0 and all(g is not None for g in own)
    assert all(bool(tf.reduce_all(tf.math.is_finite(g))) for g in own)
    assert all(float(tf.reduce_max(tf.abs(g))) > 0 for g in own)
    assert all(g is None or float(tf.reduce_max(tf.abs(g))) == 0 for g in rest)


def test_keras_training_argument_is_accepted(exported, loaded):
    """hub.KerasLayer passes `training=` (only) when the callable's signature has it; it means
    what `trainable=` means."""
    x = tf.constant(exported[3]['x7'])
    out = {}
    for mode in (False, True):  # inference first: training mode moves the BN statistics
        out[mode] = loaded(x, training=mode)['final_avg_pool']
        np.testing.assert_allclose(out[mode], loaded(x, trainable=mode)['final_avg_pool'],
                                   rtol=1e-5, atol=1e-5)
    assert not np.allclose(out[False], out[True])
    from tensorflow_hub import keras_layer
    assert keras_layer.func_has_training_argument(loaded)


@pytest.mark.parametrize('bad, message', [
    (np.zeros((2, 32, 32, 3), np.uint8), 'must be float32 in \\[0, 1\\], got uint8'),
    (np.zeros((2, 32, 32, 3), np.float64), 'got float64'),
    (np.zeros((32, 32, 3), np.float32), r'must be float32 \[N, H, W, 3\]'),
    (np.zeros((2, 32, 32, 1), np.float32), r'must be float32 \[N, H, W, 3\]'),
])
def test_bad_input_is_named(loaded, bad, message):
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        loaded(tf.constant(bad), trainable=False)


@pytest.mark.parametrize('bad, message', [
    (np.zeros((32, 32, 3), np.float32), r'must be float32 \[N, H, W, 3\]'),
    (np.zeros((2, 32, 32, 1), np.float32), r'must be float32 \[N, H, W, 3\]'),
    (np.zeros((2, 32, 32, 3), np.uint8), 'images_must_be_float32_in_0_1.*float.*uint8'),
])
def test_serving_signature_names_bad_input(loaded, bad, message):
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        loaded.signatures['serving_default'](images=tf.constant(bad))


def _out_of_range(images: np.ndarray) -> dict[str, np.ndarray]:
    nan = images.copy()
    nan[0, 0, 0, 0] = np.nan
    return {'[0, 255]': images * 255, '[-1, 1]': images * 2 - 1, 'NaN': nan}


@pytest.mark.parametrize('scale', ['[0, 255]', '[-1, 1]', 'NaN'])
def test_images_outside_0_1_are_refused_wherever_the_export_runs(exported, loaded, scale):
    """Eagerly, inside the caller's tf.function (graph mode), through serving_default, and in
    training mode before BN's moving statistics move."""
    bad = tf.constant(_out_of_range(exported[3]['x4'])[scale])
    message = r'images must have values in \[0, 1\]'
    graph = tf.function(lambda x: loaded(x, trainable=False)['final_avg_pool'])
    statistics = [v.numpy() for v in loaded.variables if not v.trainable]
    for call in (lambda x: loaded(x, trainable=False), graph,
                 lambda x: loaded.signatures['serving_default'](images=x),
                 lambda x: loaded(x, trainable=True)):
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            call(bad)
    assert statistics and all(np.array_equal(v.numpy(), s) for v, s in
                              zip([v for v in loaded.variables if not v.trainable], statistics))


def test_a_jit_compiled_caller_is_not_checked(exported, loaded):
    """What docs/evaluation.md says: XLA drops assertions, so under jit_compile the export runs
    on whatever it is given."""
    bad = tf.constant(_out_of_range(exported[3]['x4'])['[0, 255]'])
    compiled = tf.function(lambda x: loaded(x, trainable=False)['final_avg_pool'],
                           jit_compile=True)
    assert compiled(bad).shape[0] == 4


def test_resized_images_a_little_outside_0_1_are_taken(exported, loaded):
    """Resizing overshoots [0, 1] (bicubic: about 0.07 past the ends at a sharp edge): such
    images are the model's input as they are, not refused."""
    images = tf.image.resize(exported[3]['x4'], [48, 48], method='bicubic')
    low, high = float(tf.reduce_min(images)), float(tf.reduce_max(images))
    assert low < 0 or high > 1  # the resize did overshoot
    assert -export.RANGE_MARGIN < low and high < 1 + export.RANGE_MARGIN
    h = loaded(images, trainable=False)['final_avg_pool']
    assert h.shape[0] == 4 and bool(tf.reduce_all(tf.math.is_finite(h)))


def test_load_rejects_what_is_not_an_export(exported, tmp_path):
    config = exported[0]
    with pytest.raises(FileNotFoundError, match='does not exist'):
        export.load_saved_model(str(tmp_path / 'missing'))
    with pytest.raises(ValueError, match='not a SavedModel export'):
        export.load_saved_model(str(tmp_path))
    (tmp_path / 'weights.h5').write_bytes(b'')
    with pytest.raises(ValueError, match='not a SavedModel export'):
        export.load_saved_model(str(tmp_path / 'weights.h5'))
    # The model_dir itself: the error points at the export in it.
    with pytest.raises(ValueError, match=os.path.join('saved_model', str(STEP))):
        export.load_saved_model(config.model_dir)


def test_hub_keras_layer_fine_tunes_the_encoder(exported):
    hub = pytest.importorskip('tensorflow_hub')
    tf_keras = pytest.importorskip('tf_keras')
    _, model, path, _ = exported
    layer = hub.KerasLayer(path, trainable=True, output_key='final_avg_pool')
    classifier = tf_keras.Sequential([tf_keras.Input((32, 32, 3)), layer,
                                      tf_keras.layers.Dense(NUM_CLASSES)])
    classifier.compile(tf_keras.optimizers.SGD(0.1),
                       tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert len(classifier.losses) == 1  # the exported weight decay
    before = [v.numpy() for v in layer.trainable_weights]
    statistics = [v.numpy() for v in layer.non_trainable_weights]
    x = np.concatenate([exported[3]['x7'], exported[3]['x4']])
    y = np.arange(len(x)) % NUM_CLASSES
    classifier.fit(x, y, batch_size=len(x), epochs=1, verbose=0)
    # The layer's weights are the export's trainable_variables, in the model's order.
    encoder = {id(v) for v in model.encoder.trainable_variables}
    changed = [not np.array_equal(b, v.numpy())
               for b, v, own in zip(before, layer.trainable_weights, model.trainable_variables)
               if id(own) in encoder]
    assert len(changed) == len(encoder) and all(changed)
    # BN ran in training mode: its moving statistics moved.
    assert any(not np.array_equal(s, v.numpy())
               for s, v in zip(statistics, layer.non_trainable_weights))


def test_tfsm_layer_runs_in_a_keras3_model(exported):
    _, model, path, expected = exported
    inputs = keras.Input((32, 32, 3))
    features = keras.layers.TFSMLayer(path, call_endpoint='serving_default',
                                      trainable=False)(inputs)['final_avg_pool']
    classifier = keras.Model(inputs, [features, keras.layers.Dense(NUM_CLASSES)(features)])
    h, logits = classifier(expected['x7'])
    assert logits.shape == (7, NUM_CLASSES)
    np.testing.assert_allclose(h, expected['x7/False/final_avg_pool'], rtol=1e-5, atol=1e-5)


def test_tfsm_layer_endpoints_run_bn_in_both_modes(exported):
    """TFSMLayer's training endpoint: BN on batch statistics under `training=True` (as `fit`
    calls it), on the moving averages otherwise (as `predict`)."""
    _, _, path, expected = exported
    layer = keras.layers.TFSMLayer(path, call_endpoint='call_inference',
                                   call_training_endpoint='call_training', trainable=True)
    x = tf.constant(expected['x7'])
    for mode in (False, True):  # inference first: training mode moves the BN statistics
        np.testing.assert_allclose(layer(x, training=mode)['final_avg_pool'],
                                   expected[f'x7/{mode}/final_avg_pool'], rtol=1e-5, atol=1e-5)


def example(name: str):
    """A module of examples/, imported from its file, as a user copies it."""
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(os.path.dirname(os.path.dirname(__file__)), 'examples', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize('optimizer', ['sgd_momentum', 'adam'])
def test_keras3_fit_fine_tunes_the_export(exported, optimizer):
    """examples/finetune_keras3.py's layer in a Keras 3 model: two steps of `fit` with an
    optimizer that keeps slot variables train the encoder and move the BN statistics; `predict`
    is deterministic and leaves them alone."""
    _, model, path, expected = exported
    layer = example('finetune_keras3').ExportLayer(path)
    classifier = keras.Sequential([keras.Input((32, 32, 3)), layer,
                                   keras.layers.Dense(NUM_CLASSES)])
    make = {'sgd_momentum': lambda: keras.optimizers.SGD(0.01, momentum=0.9),
            'adam': lambda: keras.optimizers.Adam(1e-3)}[optimizer]
    classifier.compile(make(), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    # The export's variables, which its functions read (the layer wraps them, no copies): the
    # loaded trainable_variables are the model's, in its order.
    encoder_ids = {id(v) for v in model.encoder.trainable_variables}
    loaded = layer.saved_model
    encoder = [v for v, own in zip(loaded.trainable_variables, model.trainable_variables)
               if id(own) in encoder_ids]
    trainable_ids = {id(v) for v in loaded.trainable_variables}
    statistics = [v for v in loaded.variables if id(v) not in trainable_ids]
    assert len(layer.trainable_weights) == len(loaded.trainable_variables)
    assert len(layer.non_trainable_weights) == len(statistics) > 0

    x = np.concatenate([expected['x7'], expected['x4']])
    y = np.arange(len(x)) % NUM_CLASSES
    encoder_before = [v.numpy() for v in encoder]
    statistics_before = [v.numpy() for v in statistics]
    history = classifier.fit(x, y, batch_size=6, epochs=1, shuffle=False, verbose=0)
    assert np.isfinite(history.history['loss'][0])
    assert len(encoder) > 0 and all(not np.array_equal(b, v.numpy())
                                    for b, v in zip(encoder_before, encoder))
    assert any(not np.array_equal(b, v.numpy()) for b, v in zip(statistics_before, statistics))
    layer(x[:4], training=True)
    assert len(layer.losses) == 1  # the export's weight decay

    statistics_before = [v.numpy() for v in statistics]
    first, second = classifier.predict(x, verbose=0), classifier.predict(x, verbose=0)
    np.testing.assert_array_equal(first, second)
    assert all(np.array_equal(b, v.numpy()) for b, v in zip(statistics_before, statistics))


# ---------------------------------------------------------------------------------------------
# The directory: temporary then rename; crash-safe; replacement; keep_hub_module_max.

class DiskFull(Exception):
    pass


def crashing_save(obj, export_dir, **kwargs):
    """Writes part of an export, then fails, like a full disk or a killed job."""
    tf.io.gfile.makedirs(os.path.join(export_dir, 'variables'))
    with open(os.path.join(export_dir, 'saved_model.pb'), 'wb') as f:
        f.write(b'half')
    raise DiskFull('no space left on device')


def test_a_crash_mid_export_leaves_no_step_directory(exported, monkeypatch):
    config, model, path, _ = exported
    with open(os.path.join(path, 'saved_model.pb'), 'rb') as f:
        original = f.read()
    monkeypatch.setattr(tf.saved_model, 'save', crashing_save)
    monkeypatch.setattr(export, 'build_hub_module', lambda model, config: (None, None))
    with pytest.raises(DiskFull):
        export.export_saved_model(model, config, STEP + 1)
    root = os.path.dirname(path)
    assert os.listdir(root) == [str(STEP)]
    # Replacing an existing export: a crash keeps the old one whole.
    with pytest.raises(DiskFull):
        export.export_saved_model(model, config, STEP)
    assert os.listdir(root) == [str(STEP)]
    with open(os.path.join(path, 'saved_model.pb'), 'rb') as f:
        assert f.read() == original


def fake_save(obj, export_dir, **kwargs):
    """Writes a stand-in export that records which call wrote it."""
    fake_save.calls += 1
    tf.io.gfile.makedirs(export_dir)
    with open(os.path.join(export_dir, 'saved_model.pb'), 'w') as f:
        f.write(str(fake_save.calls))


def test_replacement_and_keeping_the_newest(exported, tmp_path, monkeypatch):
    fake_save.calls = 0
    monkeypatch.setattr(tf.saved_model, 'save', fake_save)
    monkeypatch.setattr(export, 'build_hub_module', lambda model, config: (None, None))
    config = TINY.replace(model_dir=str(tmp_path), keep_hub_module_max=2)
    model, root = exported[1], tmp_path / 'saved_model'

    def written(step):
        return (root / str(step) / 'saved_model.pb').read_text()

    for step in (10, 20, 30):
        export.export_saved_model(model, config, step)
    assert sorted(os.listdir(root)) == ['20', '30']
    path = export.export_saved_model(model, config, 30)  # same step again: replaced
    assert path == str(root / '30') and written(30) == '4'
    assert sorted(os.listdir(root)) == ['20', '30']
    export.export_saved_model(model, config, 5)  # older than both: kept, being the one asked for
    assert sorted(os.listdir(root)) == ['20', '30', '5']
    export.export_saved_model(model, config, 40)
    assert sorted(os.listdir(root)) == ['30', '40']


def test_features_read_exports_and_checkpoints(exported, sample_dir):
    """simclr_tf.features' encoders give the model's h from an export, a checkpoint and its
    model_dir; random_init gives other features; the export's image size is the model's."""
    from simclr_tf import features
    config, model, path, expected = exported
    x, h = expected['x4'], expected['x4/False/final_avg_pool']
    from_export = features.load(path)
    np.testing.assert_allclose(from_export.outputs(x)['final_avg_pool'].numpy(), h, atol=1e-5)
    assert from_export.config.image_size == config.image_size and 'export' in from_export.description
    with open(os.path.join(config.model_dir, 'config.json'), 'w') as f:
        f.write(config.replace(dataset=sample_dir).to_json())
    prefix = tf.train.Checkpoint(model=model).write(os.path.join(config.model_dir, 'ckpt-5'))
    # The fixture's training-mode calls moved the BN statistics since `h`: compare to now.
    h = model(x, training=False)['final_avg_pool'].numpy()
    for source in (prefix, config.model_dir):
        encoder = features.load(source)
        assert encoder.config.width_multiplier == config.width_multiplier
        np.testing.assert_allclose(encoder.outputs(x)['final_avg_pool'].numpy(), h, atol=1e-5)
    random = features.load(prefix, random_init=True)
    assert np.abs(random.outputs(x)['final_avg_pool'].numpy() - h).max() > 1e-2