"""The Config holds the original flags' defaults and rejects bad combinations by name."""

import dataclasses
import os
import subprocess
import sys

import pytest

from simclr_tf.config import Config, ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The authors' TF2 run.py defaults, flag by flag.
ORIGINAL_DEFAULTS = dict(
    learning_rate=0.3, learning_rate_scaling='linear', warmup_epochs=10, weight_decay=1e-6,
    batch_norm_decay=0.9, train_batch_size=512, train_split='train', train_epochs=100,
    train_steps=0, eval_steps=0, eval_batch_size=256, checkpoint_epochs=1, checkpoint_steps=0,
    eval_split='validation', dataset='imagenet2012', cache_dataset=False, mode='train',
    train_mode='pretrain', lineareval_while_pretraining=True, checkpoint=None,
    zero_init_logits_layer=False, fine_tune_after_block=-1, master=None, model_dir=None,
    data_dir=None, use_tpu=True, tpu_name=None, tpu_zone=None, gcp_project=None,
    optimizer='lars', momentum=0.9, eval_name=None, keep_checkpoint_max=5,
    keep_hub_module_max=1, temperature=0.1, hidden_norm=True, proj_head_mode='nonlinear',
    proj_out_dim=128, num_proj_layers=3, ft_proj_selector=0, global_bn=True,
    width_multiplier=1, resnet_depth=50, sk_ratio=0.0, se_ratio=0.0, image_size=224,
    color_jitter_strength=1.0, use_blur=True, train_summary_steps=100,
    # The TF1 default '?!global_step' does not compile as a regex; ours is its evident meaning.
    variable_schema='(?!global_step)')


def test_defaults_are_the_originals():
    config = Config()
    for name, value in ORIGINAL_DEFAULTS.items():
        assert getattr(config, name) == value, name
    config.validate()


@pytest.mark.parametrize('changes, words', [
    (dict(resnet_depth=42), ['resnet_depth=42']),
    (dict(train_mode='pretrain', fine_tune_after_block=4), ['fine_tune_after_block=4', 'pretrain']),
    (dict(proj_head_mode='nonlinear', num_proj_layers=2, ft_proj_selector=3),
     ['ft_proj_selector=3', 'out of range', '[-3, 2]']),
    (dict(proj_head_mode='linear', ft_proj_selector=2), ['ft_proj_selector=2', '[-2, 1]']),
    (dict(augmentations='crop,warp'), ['augmentations', 'warp']),
    (dict(temperature=0.0), ['temperature=0.0']),
    (dict(width_multiplier=0.0), ['width_multiplier=0.0']),
    (dict(use_tpu=True, cpu_replicas=2), ['use_tpu', 'cpu_replicas']),
    (dict(variable_schema='(unclosed'), ['variable_schema']),
    (dict(train_steps=0, train_epochs=0), ['train_steps', 'train_epochs']),
])
def test_validate_names_the_fields(changes, words):
    with pytest.raises(ConfigError) as e:
        Config(**changes).validate()
    for word in words:
        assert word in str(e.value)


def test_from_dict_round_trip_and_unknown_fields():
    config = Config(resnet_depth=18, seed=3)
    assert Config.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match='bogus'):
        Config.from_dict({'bogus': 1})


def test_every_field_is_a_flag():
    """run.py defines one flag per Config field, with the Config's default."""
    sys.path.insert(0, REPO)
    import run  # noqa: F401 - defines the flags
    from absl import flags
    for field in dataclasses.fields(Config):
        assert flags.FLAGS[field.name].default == getattr(Config(), field.name), field.name


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, 'run.py', *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize('args, message', [
    (['--fine_tune_after_block=2'], 'fine_tune_after_block=2 only applies to train_mode=finetune'),
    (['--num_proj_layers=2', '--ft_proj_selector=5'], 'ft_proj_selector=5 is out of range'),
    (['--train_mode=finetune', '--mode=train'], 'train_mode=finetune needs --checkpoint'),
    (['--checkpoint=/nonexistent/ckpt', '--train_mode=finetune'],
     "checkpoint='/nonexistent/ckpt' is neither a checkpoint prefix nor a directory"),
    (['--cpu_replicas=3', '--train_batch_size=16'],
     'train_batch_size=16 is not divisible by the 3 replicas'),
])
def test_run_rejects_bad_flag_combinations(tmp_path, sample_dir, args, message):
    result = _run(f'--model_dir={tmp_path}', f'--dataset={sample_dir}', '--use_tpu=False',
                  '--eval_split=test', '--image_size=32', *args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert not os.path.exists(os.path.join(tmp_path, 'checkpoint'))
