"""This project's checkpoints key every model variable by its place in the model
(model/encoder/..., model/projection_head/..., model/supervised_head/...), resume exactly, and
still read checkpoints written before (trainable weights under optimizer/_trainable_variables)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import optim
from simclr_tf.checkpoint import Checkpointer, is_legacy
from simclr_tf.config import Config
from simclr_tf.model import build_model

TINY = Config(resnet_depth=18, width_multiplier=0.125, image_size=32, proj_out_dim=8,
              num_proj_layers=2, lineareval_while_pretraining=True, use_tpu=False,
              optimizer='lars', train_batch_size=8, keep_checkpoint_max=2)
PARTS = {'encoder': 'encoder', 'projection_head': 'projection_head',
         'supervised_head': 'supervised_head'}


def trained_state(config: Config):
    """Model and optimizer after one step (so slots and the step counter are non-trivial)."""
    model = build_model(config, 10)
    schedule = optim.WarmUpAndCosineDecay(config.learning_rate, 1000, config)
    optimizer = optim.build_optimizer(config, schedule, model)
    optimizer.build(model.trainable_variables)
    x = tf.random.stateless_uniform([4, 32, 32, 3], seed=[1, 2])
    with tf.GradientTape() as tape:
        out = model(x, training=True)
        loss = tf.reduce_sum(out['proj_head_output'] ** 2) + tf.reduce_sum(out['logits_sup'])
    variables = model.trainable_variables
    optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
    return model, optimizer


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
    config = TINY.replace(model_dir=str(tmp_path_factory.mktemp('keys')))
    model, optimizer = trained_state(config)
    path = Checkpointer(config, model, optimizer).save(1)
    return config, model, optimizer, path


def test_every_model_variable_is_keyed_by_name(saved):
    config, model, optimizer, path = saved
    keys = {k for k, _ in tf.train.list_variables(path)}
    assert not any(k.startswith('optimizer/_trainable_variables') for k in keys)
    for part, attribute in PARTS.items():
        layer = getattr(model, attribute)
        n = len(layer.variables)
        assert sum(k.startswith(f'model/{part}/') for k in keys) == n, part
    assert 'model/encoder/stem/conv_0/_kernel/.ATTRIBUTES/VARIABLE_VALUE' in keys
    assert 'model/projection_head/nl_0/dense/_kernel/.ATTRIBUTES/VARIABLE_VALUE' in keys
    assert 'model/supervised_head/linear_layer/dense/bias/.ATTRIBUTES/VARIABLE_VALUE' in keys
    # The optimizer's own state: its step and one slot per trainable variable.
    assert sum(k.startswith('optimizer/variables/') for k in keys) == len(optimizer.variables)


def assert_same_state(a, b):
    (model_a, opt_a), (model_b, opt_b) = a, b
    for va, vb in zip(model_a.variables, model_b.variables):
        np.testing.assert_array_equal(va.numpy(), vb.numpy(), err_msg=va.path)
    for va, vb in zip(opt_a.variables, opt_b.variables):
        np.testing.assert_array_equal(va.numpy(), vb.numpy(), err_msg=va.path)
    assert int(opt_b.iterations.numpy()) == 1


@pytest.mark.parametrize('legacy', [False, True])
def test_resumes_model_and_optimizer_from_new_and_legacy_checkpoints(saved, tmp_path, legacy):
    config, model, optimizer, path = saved
    if legacy:  # as this project wrote them before: the Keras optimizer itself
        config = config.replace(model_dir=str(tmp_path))
        manager = tf.train.CheckpointManager(
            tf.train.Checkpoint(model=model, optimizer=optimizer), str(tmp_path), max_to_keep=1)
        path = manager.save(checkpoint_number=1)
        assert is_legacy(path)
    else:
        assert not is_legacy(path)
    fresh_model = build_model(config, 10)
    fresh_opt = optim.build_optimizer(
        config, optim.WarmUpAndCosineDecay(config.learning_rate, 1000, config), fresh_model)
    fresh_opt.build(fresh_model.trainable_variables)
    message = Checkpointer(config, fresh_model, fresh_opt).restore(fresh_model)
    assert message.startswith('resumed from')
    assert_same_state((model, optimizer), (fresh_model, fresh_opt))


def test_fine_tuning_start_reads_weights_by_name(saved, tmp_path):
    """--checkpoint=<a run of this project>: weights only, step 0."""
    config, model, optimizer, path = saved
    run = config.replace(model_dir=str(tmp_path), checkpoint=path, train_mode='finetune')
    fresh = build_model(run, 10)
    opt = keras.optimizers.SGD(0.1, momentum=0.9)
    opt.build(fresh.trainable_variables)
    Checkpointer(run, fresh, opt).restore(fresh)
    for va, vb in zip(model.variables, fresh.variables):
        np.testing.assert_array_equal(va.numpy(), vb.numpy(), err_msg=va.path)
    assert int(opt.iterations.numpy()) == 0
