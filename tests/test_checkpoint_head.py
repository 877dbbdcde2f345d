"""Fine-tuning from a checkpoint whose supervised head this run's cannot take (another input width:
another ft_proj_selector; another class count: another dataset): with zero_init_logits_layer the
head starts fresh and the log says why; without, the run refuses at start in one line naming both
selectors. The encoder and projection head are restored either way."""

import logging
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import sample_folder
from simclr_tf import checkpoint, data, program, train
from simclr_tf.checkpoint import Checkpointer
from simclr_tf.config import Config, ConfigError
from simclr_tf.model import build_model, supervised_input_dim

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRESH = 'it starts fresh (zero_init_logits_layer zeroes it anyway)'
# ResNet-18 at width 1/8: h has 64 dims, z 8 (the 256 and 128 at width 1/2, smaller).
TINY = dict(resnet_depth=18, width_multiplier=0.125, image_size=16, proj_out_dim=8,
            num_proj_layers=2, use_tpu=False, train_batch_size=8, train_steps=1,
            checkpoint_steps=1, eval_split='test', seed=7, warmup_epochs=0.01, steps_per_loop=1)
FLAGS = [f'--{k}={v}' for k, v in TINY.items() if k not in ('seed', 'steps_per_loop')]

pytestmark = pytest.mark.usefixtures('release_locks')  # in-process runs take locks


@pytest.fixture(scope='module')
def folders(tmp_path_factory, sample_dir) -> dict[int, str]:
    """Image folders of 2 and 3 classes."""
    root = tmp_path_factory.mktemp('folders')
    return {2: sample_folder(root / 'two', ('airplane', 'cat')),
            3: sample_folder(root / 'three', ('airplane', 'cat', 'ship'))}


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory, folders) -> Config:
    """The issue's pretraining run: a linear head on z (ft_proj_selector=-1), 2 classes."""
    config = Config(**TINY, dataset=folders[2], ft_proj_selector=-1,
                    lineareval_while_pretraining=True,
                    model_dir=str(tmp_path_factory.mktemp('pretrain'))).validate()
    program.run(config)
    from simclr_tf import model_dir
    model_dir.release_locks()
    assert checkpoint.saved_head_shape(checkpoint.resolve_checkpoint(config.model_dir)) == (8, 2)
    return config


def _finetune(pretrained: Config, model_dir, **changes) -> Config:
    values = dict(TINY, dataset=pretrained.dataset, train_mode='finetune',
                  checkpoint=pretrained.model_dir, model_dir=str(model_dir))
    values.update(changes)
    return Config(**values).validate()


def _prefix(pretrained: Config) -> str:
    return checkpoint.resolve_checkpoint(pretrained.model_dir)


def _refused(config: Config, model_dir) -> str:
    """program.run's one-line ConfigError, raised before model_dir gets anything."""
    with pytest.raises(ConfigError) as error:
        program.run(config)
    message = str(error.value)
    assert '\n' not in message
    assert not os.path.exists(model_dir) or not os.listdir(model_dir)  # no checkpoint, config
    return message


# ------------------------------------------------------------------ another input width
def test_zero_init_starts_a_head_of_another_width_fresh_and_restores_the_rest(pretrained,
                                                                            tmp_path, caplog):
    config = _finetune(pretrained, tmp_path / 'ft', zero_init_logits_layer=True)
    assert supervised_input_dim(config) == 64 != pretrained.proj_out_dim
    with caplog.at_level(logging.INFO):
        program.run(config)  # the run: it trains
    assert checkpoint.list_checkpoints(config.model_dir)[-1][0] == 1
    assert (f"checkpoint {_prefix(pretrained)}'s supervised head reads 8 inputs "
            "(ft_proj_selector=-1 there) and this model's 64 (ft_proj_selector=0): "
            f'{FRESH}') in caplog.text
    assert 'supervised head zero-initialised' in caplog.text

    # At the start: the head is zero, the encoder and projection head the checkpoint's.
    start = config.replace(model_dir=str(tmp_path / 'start'))
    state = train.build_state(start, tf.distribute.get_strategy(),
                              data.dataset_info(start, need_eval=False))
    assert not any(np.any(v.numpy()) for v in state.model.supervised_head.variables)
    source = build_model(pretrained, 2)
    tf.train.Checkpoint(model=source).restore(_prefix(pretrained)).expect_partial()
    for a, b in zip(source.encoder.variables + source.projection_head.variables,
                    state.model.encoder.variables + state.model.projection_head.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=b.path)


def test_without_zero_init_the_run_refuses_at_start_naming_both_selectors(pretrained, tmp_path):
    ft_dir = tmp_path / 'ft'
    message = _refused(_finetune(pretrained, ft_dir), ft_dir)
    expected = (f"checkpoint {_prefix(pretrained)}'s supervised head reads 8 inputs "
                "(ft_proj_selector=-1 there) and this model's 64 (ft_proj_selector=0): pass "
                '--zero_init_logits_layer=True to start the head fresh, --ft_proj_selector=-1 '
                "to match it, or --variable_schema='(?!head_supervised)' to leave it out")
    assert message == expected

    # The command line: one `error:` line, status 2, nothing written.
    result = subprocess.run(
        [sys.executable, 'run.py', *FLAGS, f'--dataset={pretrained.dataset}',
         '--train_mode=finetune', f'--checkpoint={pretrained.model_dir}',
         f'--model_dir={ft_dir}'], cwd=REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', PYTHONUNBUFFERED='1'))
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert errors == [f'error: {expected}'], result.stderr[-3000:]
    assert 'Traceback' not in result.stderr
    assert not ft_dir.exists() or not os.listdir(ft_dir)


def test_the_matching_selector_restores_the_head(pretrained, tmp_path):
    config = _finetune(pretrained, tmp_path / 'ft', ft_proj_selector=-1)
    start = checkpoint.resolve_start(config, [], 2)
    model = build_model(config, 2)
    message = Checkpointer(config, model, keras.optimizers.SGD()).restore(model, start)
    assert 'new' not in message and 'fresh' not in message
    assert message == start.describe()  # the start plan said what the restore did


# ------------------------------------------------------------------ another class count
def test_another_class_count_starts_fresh_with_zero_init_and_is_refused_without(
        pretrained, folders, tmp_path, caplog):
    # ft_proj_selector=-1 as in pretraining: the widths agree, the classes (2 -> 3) do not.
    config = _finetune(pretrained, tmp_path / 'ft', dataset=folders[3], ft_proj_selector=-1,
                       zero_init_logits_layer=True)
    with caplog.at_level(logging.INFO):
        program.run(config)
    assert (f"checkpoint {_prefix(pretrained)}'s supervised head has 2 classes and this "
            f"model's 3: {FRESH}") in caplog.text
    assert checkpoint.list_checkpoints(config.model_dir)

    ft_dir = tmp_path / 'refused'
    message = _refused(config.replace(zero_init_logits_layer=False, model_dir=str(ft_dir)), ft_dir)
    assert message == (f"checkpoint {_prefix(pretrained)}'s supervised head has 2 classes and "
                       "this model's 3: pass --zero_init_logits_layer=True to start the head "
                       "fresh, or --variable_schema='(?!head_supervised)' to leave it out")


# ------------------------------------------------------------------ the schema decides
@pytest.mark.parametrize('schema', ['(?!head_supervised)',
                                    '(?!global_step|(?:.*/|^)Momentum|head)'])
def test_a_schema_without_the_head_is_not_refused(pretrained, folders, tmp_path, schema):
    for dataset in folders.values():  # another width; another width and class count
        config = _finetune(pretrained, tmp_path / 'ft', dataset=dataset, variable_schema=schema)
        classes = len(os.listdir(os.path.join(dataset, 'train')))
        start = checkpoint.resolve_start(config, [], classes)
    model = build_model(config, 3)
    message = Checkpointer(config, model, keras.optimizers.SGD()).restore(model)
    assert message == start.describe()
    assert re.search(r'new \(freshly initialised\): .*supervised_head', message)
    assert FRESH not in message


def test_a_schema_without_the_head_trains(pretrained, tmp_path, caplog):
    config = _finetune(pretrained, tmp_path / 'ft', variable_schema='(?!head_supervised)')
    with caplog.at_level(logging.INFO):
        program.run(config)
    assert checkpoint.list_checkpoints(config.model_dir)
    assert 'new (freshly initialised): supervised_head' in caplog.text


# ------------------------------------------------------------------ restore itself
def test_restore_never_lets_the_raw_shape_error_out(pretrained, tmp_path):
    """Checkpointer.restore without program's start check: the same one line."""
    config = _finetune(pretrained, tmp_path / 'ft')
    model = build_model(config, 2)
    with pytest.raises(ConfigError, match=r"reads 8 inputs \(ft_proj_selector=-1 there\) and this "
                                          r"model's 64 \(ft_proj_selector=0\): pass"):
        Checkpointer(config, model, keras.optimizers.SGD()).restore(model)
    # Another part of another shape (the encoder at another width): one line too.
    wider = _finetune(pretrained, tmp_path / 'wider', width_multiplier=0.25,
                      variable_schema='(?!head)')
    model = build_model(wider, 2)
    with pytest.raises(ConfigError) as error:
        Checkpointer(wider, model, keras.optimizers.SGD()).restore(model)
    assert 'does not fit this model (Received incompatible tensor' in str(error.value)
    assert '\n' not in str(error.value)


def test_legacy_checkpoints_key_the_head_under_the_optimizer_and_are_checked_too(tmp_path):
    config = Config(**TINY, ft_proj_selector=-1)
    model = build_model(config, 10)
    optimizer = keras.optimizers.SGD()
    optimizer.build(model.trainable_variables)
    path = tf.train.Checkpoint(model=model, optimizer=optimizer).save(str(tmp_path / 'ckpt'))
    assert checkpoint.is_legacy(path)
    assert not any(k.startswith('model/supervised_head/linear_layer/dense/')
                   for k, _ in tf.train.list_variables(path))
    assert checkpoint.saved_head_shape(path) == (8, 10)
    finetune = config.replace(train_mode='finetune', ft_proj_selector=0, checkpoint=path)
    with pytest.raises(ConfigError, match="reads 8 inputs and this model's 64"):
        checkpoint.resolve_start(finetune, [], 10)  # no config.json beside it: the widths only
    # Written by key, without an object graph: found by its key.
    key = 'model/supervised_head/linear_layer/dense/_kernel/.ATTRIBUTES/VARIABLE_VALUE'
    by_key = str(tmp_path / 'by_key' / 'ckpt-1')
    tf.raw_ops.SaveV2(prefix=by_key, tensor_names=[key], shape_and_slices=[''],
                      tensors=[np.zeros([8, 3], np.float32)])
    assert checkpoint.saved_head_shape(by_key) == (8, 3)
