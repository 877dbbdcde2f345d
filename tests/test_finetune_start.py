"""Starting a fine-tuning run from --checkpoint: what comes from it, what is new, head zeroing."""

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.checkpoint import Checkpointer
from simclr_tf.config import Config
from simclr_tf.model import build_model

TINY = Config(resnet_depth=18, width_multiplier=0.125, image_size=16, proj_out_dim=8,
              num_proj_layers=2, global_bn=False, use_tpu=False)


@pytest.fixture(scope='module')
def pretrained_without_head(tmp_path_factory):
    """A checkpoint of a pretraining run without lineareval_while_pretraining: no supervised
    head."""
    model = build_model(TINY.replace(lineareval_while_pretraining=False), 10)
    assert model.supervised_head is None
    path = tf.train.Checkpoint(model=model).save(str(tmp_path_factory.mktemp('pre') / 'ckpt'))
    return model, path


def _start(config, tmp_path):
    model = build_model(config.replace(model_dir=str(tmp_path)), 10)
    message = Checkpointer(config.replace(model_dir=str(tmp_path)), model,
                           tf.keras.optimizers.SGD()).restore(model)
    return model, message


def test_default_schema_starts_the_missing_supervised_head_fresh(pretrained_without_head,
                                                                  tmp_path):
    source, path = pretrained_without_head
    config = TINY.replace(train_mode='finetune', checkpoint=path)  # default variable_schema
    model, message = _start(config, tmp_path)
    # The encoder and projection head come from the checkpoint; the head is new, and said so.
    assert 'new (freshly initialised): supervised_head' in message
    for a, b in zip(source.encoder.variables + source.projection_head.variables,
                    model.encoder.variables + model.projection_head.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=b.path)
    kernel = model.supervised_head.linear_layer.dense.kernel.numpy()
    assert 0.005 < kernel.std() < 0.02  # N(0, 0.01), not zeros


def test_zero_init_logits_layer_zeroes_the_head_only_from_a_checkpoint(pretrained_without_head,
                                                                       tmp_path):
    _, path = pretrained_without_head
    config = TINY.replace(train_mode='finetune', zero_init_logits_layer=True)
    scratch = build_model(config, 10)  # no --checkpoint: the head keeps N(0, 0.01)
    assert 0.005 < scratch.supervised_head.linear_layer.dense.kernel.numpy().std() < 0.02
    model, message = _start(config.replace(checkpoint=path), tmp_path)
    assert 'zero-initialised' in message
    assert not any(np.any(v.numpy()) for v in model.supervised_head.trainable_variables)


def test_a_checkpoint_of_another_model_is_rejected(tmp_path):
    from simclr_tf.config import ConfigError
    path = tf.train.Checkpoint(other=tf.Variable(1.0)).save(str(tmp_path / 'other' / 'ckpt'))
    with pytest.raises(ConfigError, match='holds none of this model'):
        _start(TINY.replace(train_mode='finetune', checkpoint=path), tmp_path)
