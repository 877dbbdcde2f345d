"""SimCLR command line: the authors' TF2 run.py flags -> Config -> strategy -> train / eval / export.

The program's one module of absl flags, outside the `simclr_tf` package, which reads no flags:
`run.py` in a checkout, the `simclr-tf` command once installed.

    python run.py --flagfile=flags/quickstart.cfg
    python run.py --train_mode=pretrain --train_batch_size=512 --train_epochs=1000 \\
      --learning_rate=1.0 --weight_decay=1e-4 --temperature=0.5 --dataset=cifar10 \\
      --image_size=32 --eval_split=test --resnet_depth=18 --use_blur=False \\
      --color_jitter_strength=0.5 --model_dir=/tmp/simclr_test --use_tpu=False
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from absl import app, flags, logging

# oneDNN kernels: TensorFlow turns them on by itself only on some Intel CPUs; on the 2-core AMD
# machines here they train a ResNet-18 1.5x faster (bench/throughput.py: 9.2 vs 5.9 pairs/s).
# Set TF_ENABLE_ONEDNN_OPTS=0 to turn them off. Must be set before TensorFlow is imported.
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '1')

from simclr_tf.config import CONTRASTIVE_LOSSES, FROZEN_BN_MODES, Config, ConfigError

_DEFAULTS = Config()
_HELP = {
    'learning_rate': 'Initial learning rate per batch size of 256 (see learning_rate_scaling).',
    'learning_rate_scaling': 'How to scale the learning rate as a function of batch size.',
    'warmup_epochs': 'Number of epochs of linear warmup.',
    'weight_decay': 'Amount of weight decay to use.',
    'batch_norm_decay': 'Batch norm decay (moving-average momentum).',
    'train_batch_size': 'Global batch size for training.',
    'train_split': 'Split for training.',
    'train_epochs': 'Number of epochs to train for.',
    'train_steps': 'Number of steps to train for. If provided, overrides train_epochs.',
    'eval_steps': 'Number of steps to eval for. If not provided, evals over the entire split.',
    'eval_batch_size': 'Global batch size for eval.',
    'checkpoint_epochs': 'Number of epochs between checkpoints/summaries.',
    'checkpoint_steps': 'Number of steps between checkpoints/summaries. If provided, overrides '
                        'checkpoint_epochs.',
    'eval_split': 'Split for evaluation.',
    'dataset': 'A TFDS name (cifar10, imagenet2012_subset/1pct) or a directory laid out '
               '<split>/<class>/<image file>.',
    'cache_dataset': 'Whether to cache the entire dataset in memory.',
    'mode': 'Whether to train, evaluate, train then evaluate, or (new) export the latest '
            'checkpoint as a SavedModel.',
    'train_mode': 'The train mode controls different objectives and trainable components.',
    'lineareval_while_pretraining': 'Whether to finetune a linear head on top of the frozen encoder '
                                    'while pretraining (behind a stop-gradient).',
    'checkpoint': 'Checkpoint prefix or directory to start from (fine-tuning), if model_dir has '
                  'none: one of this project, or one of the authors\' TF2 checkpoints or '
                  'SavedModels (their model zoo, local or gs://; see the README).',
    'zero_init_logits_layer': 'If True, zero-initialise the supervised head after restoring from '
                              '--checkpoint (a run without one keeps N(0, 0.01)).',
    'fine_tune_after_block': 'Freeze the encoder up to this block when fine-tuning: -1 none, '
                             '0 the stem, 1..4 block groups (4 = linear evaluation).',
    'master': 'Address/name of the TensorFlow master to use (TPU). By default, local.',
    'model_dir': 'Model directory for checkpoints, summaries, results and exports.',
    'data_dir': 'Directory where TFDS data is stored.',
    'use_tpu': 'Whether to run on TPU (the original\'s default is True: pass --use_tpu=False on '
               'CPUs and GPUs).',
    'tpu_name': 'The Cloud TPU to use for training.',
    'tpu_zone': 'GCE zone of the Cloud TPU.',
    'gcp_project': 'Project name of the Cloud TPU-enabled project.',
    'optimizer': 'Optimizer to use.',
    'momentum': 'Momentum parameter.',
    'eval_name': 'Name for eval (summaries go to model_dir/eval_name).',
    'keep_checkpoint_max': 'Maximum number of checkpoints to keep.',
    'keep_hub_module_max': 'Maximum number of SavedModel exports to keep (0: keep every one).',
    'temperature': 'Temperature parameter for the contrastive loss.',
    'hidden_norm': 'Temperature parameter for contrastive loss: l2-normalise the projection '
                   'output.',
    'proj_head_mode': 'How the head projection is done.',
    'proj_out_dim': 'Number of head projection dimension.',
    'num_proj_layers': 'Number of non-linear head layers.',
    'ft_proj_selector': 'Which layer of the projection head to use during fine-tuning: 0 means '
                        'no projection head, -1 the final layer.',
    'global_bn': 'Whether to aggregate BN statistics across distributed cores.',
    'width_multiplier': 'Multiplier to change width of network (fractions such as 0.25 allowed).',
    'resnet_depth': 'Depth of ResNet.',
    'sk_ratio': 'If it is bigger than 0, it will enable SK. Recommendation: 0.0625.',
    'se_ratio': 'If it is bigger than 0, it will enable SE.',
    'image_size': 'Input image size.',
    'color_jitter_strength': 'The strength of color jittering.',
    'use_blur': 'Whether or not to use Gaussian blur for augmentation during pretraining.',
    'train_summary_steps': 'Steps between training summaries (TF1 flag; 0: no step summaries); '
                           'also bounds steps per loop.',
    'variable_schema': 'Regex (re.match on variable paths) of checkpoint variables to restore '
                       'when starting from --checkpoint (TF1 flag).',
    'contrastive_loss': 'New. The contrastive objective (paper Table 2).',
    'margin': 'New. Margin of the margin triplet loss.',
    'semi_hard': 'New. Semi-hard negative mining for the margin triplet loss.',
    'augmentations': 'New. Ordered, comma-separated augmentation operators of a pretraining view: '
                     'crop, flip, color, blur, cutout, sobel, noise, rotate.',
    'brightness': 'New. Brightness jitter: multiplicative (SimCLRv2) or additive (v1).',
    'seed': 'New. Seed for initialisation, data order and augmentations (reproducible runs).',
    'cpu_replicas': 'New. Split the CPU into N logical devices and mirror across them.',
    'jit_compile': 'New. Compile the training step with XLA (one replica, or TPU).',
    'mixed_precision': 'New. Mixed precision policy: none, bfloat16 or float16.',
    'steps_per_loop': 'New. Steps per tf.function call (0: min(checkpoint steps, '
                      'train_summary_steps if > 0)).',
    'knn_k': 'New. Neighbours of the kNN monitor at eval.',
    'knn_temperature': 'New. Temperature of the kNN monitor\'s weighted vote.',
    'knn_train_examples': 'New. Train examples the kNN monitor uses (0 turns it off).',
    'eval_timeout': 'New. mode=eval: seconds to wait for a new checkpoint before giving up '
                    '(0: wait until the last step\'s checkpoint, as the original).',
    'label_fraction': 'New. Fine-tune on a class-balanced, seeded fraction of train_split '
                      '(0.01, 0.1: the paper\'s semi-supervised protocol on any dataset).',
    'inter_op_threads': 'New. TensorFlow inter-op threads (0: its default). 1 lowers peak memory '
                        'on small CPUs at no cost in speed.',
    'intra_op_threads': 'New. TensorFlow intra-op threads (0: its default, one per core).',
    'label_seed': 'New. Seed of the label_fraction subset (apart from --seed, so runs with '
                  'different seeds can share one subset).',
    'frozen_bn': 'New. BN of the layers fine_tune_after_block (and ft_proj_selector) freeze, in a '
                 'training step: batch (the authors\' code) normalises with batch statistics and '
                 'updates the moving averages; inference keeps the pretrained statistics. Their '
                 'weights are never trained in either mode.',
    'start_over': 'New. Train from scratch in a model_dir that holds checkpoints, an export or '
                  'another run\'s config.json: its files are first moved (not deleted) to '
                  'model_dir/previous-<UTC time>/. Without it such a run stops and says what it '
                  'found. Pass it once, not in a command a scheduler reruns.',
}
_ENUMS = {
    'learning_rate_scaling': ['linear', 'sqrt'],
    'mode': ['train', 'eval', 'train_then_eval', 'export'],
    'train_mode': ['pretrain', 'finetune'],
    'optimizer': ['momentum', 'adam', 'lars'],
    'proj_head_mode': ['none', 'linear', 'nonlinear'],
    'contrastive_loss': list(CONTRASTIVE_LOSSES),
    'brightness': ['multiplicative', 'additive'],
    'mixed_precision': ['none', 'bfloat16', 'float16'],
    'frozen_bn': list(FROZEN_BN_MODES),
}


def _define_flags() -> None:
    for field in dataclasses.fields(Config):
        name, default, help_ = field.name, getattr(_DEFAULTS, field.name), _HELP[field.name]
        if name in _ENUMS:
            flags.DEFINE_enum(name, default, _ENUMS[name], help_)
        elif isinstance(default, bool):
            flags.DEFINE_bool(name, default, help_)
        elif isinstance(default, int) or name == 'seed':
            flags.DEFINE_integer(name, default, help_)
        elif isinstance(default, float):
            flags.DEFINE_float(name, default, help_)
        else:
            flags.DEFINE_string(name, default, help_)


_define_flags()
FLAGS = flags.FLAGS


def config_from_flags() -> Config:
    return Config(**{f.name: FLAGS[f.name].value for f in dataclasses.fields(Config)}).validate()


def _fail(message: str) -> None:
    logging.error('%s', message)
    print(f'error: {message}', file=sys.stderr)
    sys.exit(2)


def summary(result: dict) -> str:
    """The closing lines: what was measured, on how many examples, and where the export is."""
    names = {'eval/label_top_1_accuracy': 'linear head top-1',
             'eval/label_top_5_accuracy': 'top-5', 'eval/knn_top_1_accuracy': 'kNN top-1'}
    parts = [f'{label} {result[k]:.3f}' for k, label in names.items() if k in result]
    if 'eval/knn_num_train_examples' in result:
        parts[-1] += f' ({int(result["eval/knn_num_train_examples"])} labelled train examples)'
    lines = [f'step {int(result["global_step"])}: ' + ', '.join(parts)
             + f' on {int(result["eval/num_examples"])} {FLAGS.eval_split} examples']
    if result.get('saved_model'):
        lines.append(f'SavedModel: {result["saved_model"]}')
    if result.get('undecodable_images'):
        lines.append(f'{result["undecodable_images"]} images could not be decoded and were '
                     'replaced by grey ones (their paths are in the log)')
    return '\n'.join(lines)


def _fs_error(e: Exception) -> str | None:
    """One line for a file-system error (the path and the problem), None for anything else."""
    import tensorflow as tf
    if isinstance(e, OSError):
        where = f'{e.filename}: ' if getattr(e, 'filename', None) else ''
        return f'{where}{e.strerror or e}'
    fs_errors = (tf.errors.PermissionDeniedError, tf.errors.NotFoundError,
                 tf.errors.AlreadyExistsError, tf.errors.FailedPreconditionError,
                 tf.errors.DataLossError, tf.errors.ResourceExhaustedError)
    if isinstance(e, fs_errors):
        text = (e.message or str(e)).strip().splitlines()
        return f'{text[0] if text else type(e).__name__} ({type(e).__name__})'
    return None


def main(argv) -> None:
    if len(argv) > 1:
        _fail(f'unexpected arguments: {" ".join(argv[1:])}')
    try:
        config = config_from_flags()
        if not config.model_dir:
            raise ConfigError('--model_dir is required')
        from simclr_tf import distribute  # before TensorFlow touches a device:
        distribute.configure_threads(config)
        if config.cpu_replicas > 1:
            distribute.configure_cpu_replicas(config.cpu_replicas)
        from simclr_tf import program
        result = program.run(config, flags={k: FLAGS[k].value for k in FLAGS})
        if result:
            print(summary(result))
    except ConfigError as e:
        _fail(str(e))
    except Exception as e:  # noqa: BLE001 - clear message for bad input, full trace in the log
        from simclr_tf.data import DataError
        from simclr_tf.train import PREEMPTED_EXIT_CODE, Preempted
        if isinstance(e, Preempted):
            logging.warning('%s', e)
            print(f'stopped: {e}', file=sys.stderr)
            sys.exit(PREEMPTED_EXIT_CODE)
        if isinstance(e, DataError):
            _fail(str(e))
        message = _fs_error(e)
        if message is not None:
            logging.debug('file-system error', exc_info=True)
            _fail(message)
        raise


def cli() -> None:
    """The program: `python run.py`, the `simclr-tf` command, `python -m simclr_tf_cli`."""
    for flag in FLAGS.get_key_flags_for_module(__name__):  # --help lists them, whatever the script
        FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    from simclr_tf import logs
    # After flag parsing (--verbosity), before anything imports TensorFlow.
    app.call_after_init(lambda: logs.setup(FLAGS.verbosity))
    app.run(main)


if __name__ == '__main__':
    cli()
