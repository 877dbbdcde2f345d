"""What `run.py --mode=…` does: train, eval (continuous), train_then_eval, export."""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Optional

import keras
import tensorflow as tf

from simclr_tf import checkpoint, data, distribute, evaluate, train
from simclr_tf.config import Config, ConfigError
from simclr_tf.model import build_model


def check_start(config: Config) -> None:
    """Rejects a run that cannot start, before data or model are built."""
    has_own = tf.train.latest_checkpoint(config.model_dir) is not None
    if config.mode in ('train', 'train_then_eval') and config.train_mode == 'finetune':
        if not config.checkpoint and not has_own:
            raise ConfigError(
                'train_mode=finetune needs --checkpoint (a pretrained checkpoint or its model_dir) '
                f'or an existing checkpoint in model_dir={config.model_dir!r}')
        if config.checkpoint and not has_own:
            checkpoint.check_start(config.checkpoint)
    if config.mode == 'export' and not has_own:
        raise ConfigError(f'mode=export needs a checkpoint in model_dir={config.model_dir!r}')


def set_up(config: Config) -> None:
    """Process-wide settings: seed, mixed precision policy."""
    if config.seed is not None:
        keras.utils.set_random_seed(config.seed)
    if config.mixed_precision != 'none':
        keras.mixed_precision.set_global_policy(f'mixed_{config.mixed_precision}')


def run(config: Config, flags: Optional[dict[str, Any]] = None) -> Optional[dict[str, float]]:
    """Runs `config.mode`; returns the last eval result, if any."""
    config.validate()
    check_start(config)
    # The strategy comes first: multi-worker collectives must be set up before other TF work.
    strategy = distribute.build_strategy(config)
    distribute.check_strategy(config, strategy)
    info = data.dataset_info(config, need_eval=config.mode != 'train')
    chief = distribute.is_chief(strategy)
    set_up(config)
    tf.io.gfile.makedirs(config.model_dir)
    if chief:
        with tf.io.gfile.GFile(os.path.join(config.model_dir, 'config.json'), 'w') as f:
            f.write(config.to_json())
    logging.info('%s: %s train / %s eval examples, %s classes, %d replicas', config.dataset,
                 info.num_train_examples, info.num_eval_examples, info.num_classes,
                 strategy.num_replicas_in_sync)

    if config.mode == 'eval':
        return continuous_eval(config, strategy, info, flags)
    if config.mode == 'export':
        model, step = restore_for_inference(config, strategy, info,
                                            tf.train.latest_checkpoint(config.model_dir))
        export_model(config, model, step)
        return None
    task_id = getattr(getattr(strategy, 'cluster_resolver', None), 'task_id', 0) or 0
    state = train.train(config, strategy, info, chief=chief, task_id=task_id)
    if config.mode == 'train' or state.stopped:
        return None
    result = evaluate.evaluate(config, strategy, state.model, info, state.step)
    if chief:
        evaluate.write_results(config, result, flags)
        result['saved_model'] = export_model(config, state.model, state.step)
    return result


def export_model(config: Config, model: keras.Model, step: int) -> str:
    from simclr_tf import export  # only the programs that export need it
    path = export.export_saved_model(model, config, step)
    logging.info('exported SavedModel to %s', path)
    return path


def restore_for_inference(config: Config, strategy: tf.distribute.Strategy,
                          info: data.DatasetInfo, path: str) -> tuple[keras.Model, int]:
    """The model of a training checkpoint, and its step (the `ckpt-<step>` number)."""
    with strategy.scope():
        model = build_model(config, info.num_classes)
    tf.train.Checkpoint(model=model).restore(path).expect_partial().assert_existing_objects_matched()
    return model, _step_of(path)


def continuous_eval(config: Config, strategy: tf.distribute.Strategy, info: data.DatasetInfo,
                    flags: Optional[dict[str, Any]] = None) -> Optional[dict[str, float]]:
    """Evaluates every kept checkpoint not yet evaluated, then each new one, until the last step."""
    from simclr_tf import optim
    last_step = optim.train_steps(config, info.num_train_examples)
    result = None
    for _ in tf.train.checkpoints_iterator(config.model_dir, min_interval_secs=1,
                                           timeout=config.eval_timeout or None):
        for path in _unevaluated(config.model_dir):
            model, step = restore_for_inference(config, strategy, info, path)
            result = evaluate.evaluate(config, strategy, model, info, step)
            evaluate.write_results(config, result, flags)
            export_model(config, model, step)
            if step >= last_step:
                return result
        if _step_of(tf.train.latest_checkpoint(config.model_dir) or '') >= last_step:
            return result  # the last step's checkpoint was evaluated before (e.g. by training)
    return result


def _unevaluated(model_dir: str) -> list[str]:
    """Checkpoints of model_dir, oldest first, that have no result_<step>.json yet."""
    state = tf.train.get_checkpoint_state(model_dir)
    paths = list(state.all_model_checkpoint_paths) if state else []
    return [p for p in paths if not tf.io.gfile.exists(
        os.path.join(model_dir, f'result_{_step_of(p)}.json'))]


def _step_of(path: str) -> int:
    match = re.search(r'-(\d+)$', path)
    return int(match.group(1)) if match else 0
