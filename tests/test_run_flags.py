"""Flag values users pass: the authors' README command lines (TF1 and TF2), the presets, and
flags whose values change behaviour (train_summary_steps=0, keep_hub_module_max=0, jit_compile)."""

import glob
import os
import shlex
import sys

import pytest
import tensorflow as tf

from simclr_tf import data, train
from simclr_tf.config import Config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The command lines of google-research/simclr README.md (TF1) and tf2/README.md, as printed there
# (the TF2 README repeats the first two). Environment variables stand for the user's paths.
PRETRAIN_CIFAR = """python run.py --train_mode=pretrain \
  --train_batch_size=512 --train_epochs=1000 \
  --learning_rate=1.0 --weight_decay=1e-4 --temperature=0.5 \
  --dataset=cifar10 --image_size=32 --eval_split=test --resnet_depth=18 \
  --use_blur=False --color_jitter_strength=0.5 \
  --model_dir=/tmp/simclr_test --use_tpu=False"""
PRETRAIN_IMAGENET = """python run.py --train_mode=pretrain \
  --train_batch_size=4096 --train_epochs=100 --temperature=0.1 \
  --learning_rate=0.075 --learning_rate_scaling=sqrt --weight_decay=1e-4 \
  --dataset=imagenet2012 --image_size=224 --eval_split=validation \
  --data_dir=$DATA_DIR --model_dir=$MODEL_DIR \
  --use_tpu=True --tpu_name=$TPU_NAME --train_summary_steps=0"""
LINEAR_EVAL_CIFAR = """python run.py --mode=train_then_eval --train_mode=finetune \
  --fine_tune_after_block=4 --zero_init_logits_layer=True \
  --variable_schema='(?!global_step|(?:.*/|^)Momentum|head)' \
  --global_bn=False --optimizer=momentum --learning_rate=0.1 --weight_decay=0.0 \
  --train_epochs=100 --train_batch_size=512 --warmup_epochs=0 \
  --dataset=cifar10 --image_size=32 --eval_split=test --resnet_depth=18 \
  --checkpoint=/tmp/simclr_test --model_dir=/tmp/simclr_test_ft --use_tpu=False"""
LINEAR_EVAL_IMAGENET = """python run.py --mode=train_then_eval --train_mode=finetune \
  --fine_tune_after_block=4 --zero_init_logits_layer=True \
  --variable_schema='(?!global_step|(?:.*/|^)Momentum|head)' \
  --global_bn=False --optimizer=momentum --learning_rate=0.1 --weight_decay=1e-6 \
  --train_epochs=90 --train_batch_size=4096 --warmup_epochs=0 \
  --dataset=imagenet2012 --image_size=224 --eval_split=validation \
  --data_dir=$DATA_DIR --model_dir=$MODEL_DIR --checkpoint=$CHKPT_DIR \
  --use_tpu=True --tpu_name=$TPU_NAME --train_summary_steps=0"""
FINETUNE_1PCT = """python run.py --mode=train_then_eval --train_mode=finetune \
  --fine_tune_after_block=-1 --zero_init_logits_layer=True \
  --variable_schema='(?!global_step|(?:.*/|^)Momentum|head_supervised)' \
  --global_bn=True --optimizer=lars --learning_rate=0.005 \
  --learning_rate_scaling=sqrt --weight_decay=0 \
  --train_epochs=60 --train_batch_size=1024 --warmup_epochs=0 \
  --dataset=imagenet2012_subset/1pct --image_size=224 --eval_split=validation \
  --data_dir=$DATA_DIR --model_dir=$MODEL_DIR --checkpoint=$CHKPT_DIR \
  --use_tpu=True --tpu_name=$TPU_NAME --train_summary_steps=0 \
  --num_proj_layers=3 --ft_proj_selector=1"""
ENV = {'$DATA_DIR': '/data/tfds', '$MODEL_DIR': '/tmp/model', '$TPU_NAME': 'tpu-0',
       '$CHKPT_DIR': '/tmp/pretrained'}


def config_of(command: str, *extra: str) -> Config:
    """The Config run.py builds from a shell command line (absl parsing + Config.validate)."""
    sys.path.insert(0, REPO)
    import run
    from absl import flags
    for name, value in ENV.items():
        command = command.replace(name, value)
    argv = shlex.split(command)[1:] + list(extra)  # drop 'python'
    flags.FLAGS.unparse_flags()
    try:
        flags.FLAGS(argv)
        return run.config_from_flags()
    finally:
        flags.FLAGS.unparse_flags()


@pytest.mark.parametrize('command', [PRETRAIN_CIFAR, PRETRAIN_IMAGENET, LINEAR_EVAL_CIFAR,
                                     LINEAR_EVAL_IMAGENET, FINETUNE_1PCT])
def test_authors_readme_command_lines_are_accepted(command):
    config = config_of(command, '--train_steps=1')  # a tiny budget; parsing is the point
    assert config.train_steps == 1
    if '--train_summary_steps=0' in command:
        assert config.train_summary_steps == 0


def test_semi_supervised_command_reads_the_first_projection_layer():
    config = config_of(FINETUNE_1PCT)
    assert (config.num_proj_layers, config.ft_proj_selector, config.ft_proj_index) == (3, 1, 1)


def test_keep_hub_module_max_0_keeps_every_export(tmp_path):
    from simclr_tf import export
    Config(keep_hub_module_max=0).validate()
    for step in (1, 2, 3):
        (tmp_path / str(step)).mkdir()
    export._keep_newest(str(tmp_path), 0, keep=3)
    assert sorted(os.listdir(tmp_path)) == ['1', '2', '3']
    export._keep_newest(str(tmp_path), 1, keep=3)
    assert sorted(os.listdir(tmp_path)) == ['3']


def test_train_summary_steps_0_writes_no_step_summaries(tmp_path, sample_dir):
    config = Config(dataset=sample_dir, eval_split='test', image_size=16, resnet_depth=18,
                    width_multiplier=0.125, proj_out_dim=8, train_batch_size=8, train_steps=2,
                    checkpoint_steps=2, use_tpu=False, use_blur=False, warmup_epochs=0,
                    train_summary_steps=0, model_dir=str(tmp_path),
                    train_mode='supervised').validate()
    assert train.steps_per_loop(config, 2) == 2 and train.steps_per_loop(Config(), 500) == 100
    strategy = tf.distribute.get_strategy()
    state = train.train(config, strategy, data.dataset_info(config))
    assert state.step == 2 and tf.train.latest_checkpoint(str(tmp_path)).endswith('ckpt-2')
    tags = set()
    for path in glob.glob(str(tmp_path / 'events.out.tfevents.*')):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags |= {v.tag for v in event.summary.value}
    assert not tags, tags


@pytest.mark.parametrize('preset', sorted(os.listdir(os.path.join(REPO, 'flags'))))
def test_every_preset_parses_and_validates(preset):
    path = os.path.join(REPO, 'flags', preset)
    config_of(f'python run.py --flagfile={path}', '--train_steps=1')
    header = [line for line in open(path) if line.startswith('#')]
    assert header, f'{preset} states no source'


@pytest.mark.parametrize('preset,layers,brightness,source', [
    ('imagenet_pretrain_r50_v1.cfg', 2, 'additive', 'SimCLR (v1) as the paper'),
    ('imagenet_pretrain_r50_v2.cfg', 3, 'multiplicative', 'SimCLRv2 pretraining as its paper'),
    ('imagenet_pretrain_r50.cfg', 3, 'multiplicative', "The authors' README ImageNet")])
def test_imagenet_presets_have_their_sources_heads(preset, layers, brightness, source):
    path = os.path.join(REPO, 'flags', preset)
    config = config_of(f'python run.py --flagfile={path}')
    assert (config.num_proj_layers, config.brightness) == (layers, brightness)
    assert source in open(path).read()


def test_jit_compile_with_several_replicas_warns_why_it_is_ignored(two_replicas, caplog):
    config = Config(jit_compile=True, use_tpu=False)
    with caplog.at_level('WARNING'):
        assert train.use_jit(config, tf.distribute.get_strategy())
        assert not caplog.records
        assert not train.use_jit(config, two_replicas)
    assert '--jit_compile is ignored with 2 replicas' in caplog.text
    assert 'XLA' in caplog.text and "other replicas' devices" in caplog.text
