"""What `run.py --mode=…` does: train, eval (continuous), train_then_eval, export."""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any, Optional

import keras
import tensorflow as tf

from simclr_tf import checkpoint, data, distribute, evaluate, sources, train
from simclr_tf import model_dir as model_dir_lib
from simclr_tf.config import Config, ConfigError
from simclr_tf.model import build_model

WAIT_LOG_SECS = 60  # mode=eval: how often to say it is still waiting for a checkpoint


def check_start(config: Config) -> None:
    """Rejects a run that cannot start, before data or model are built."""
    model_dir_lib.check_path(config.model_dir, create=True)
    has_own = bool(checkpoint.list_checkpoints(config.model_dir))
    training = config.mode in ('train', 'train_then_eval')
    if training and config.train_mode == 'finetune' and not config.checkpoint and not has_own:
        raise ConfigError(
            'train_mode=finetune needs --checkpoint (a pretrained checkpoint or its model_dir) '
            f'or an existing checkpoint in model_dir={config.model_dir!r}; '
            '--train_mode=supervised trains the classifier from scratch')
    if training and config.train_mode == 'supervised' and config.checkpoint:
        raise ConfigError(f'train_mode=supervised trains from scratch: it takes no --checkpoint '
                          f'({config.checkpoint!r}); --train_mode=finetune starts from one')
    if starts_from_checkpoint(config):
        checkpoint.check_start(config.checkpoint)
        checkpoint.check_head(config)  # its input width; the class count once data is known
    if config.mode == 'export' and not has_own:
        raise ConfigError(f'mode=export needs a checkpoint in model_dir={config.model_dir!r}')


def starts_from_checkpoint(config: Config) -> bool:
    """A training run that starts from --checkpoint: model_dir has no checkpoint of its own."""
    return (config.mode in ('train', 'train_then_eval') and bool(config.checkpoint)
            and not checkpoint.list_checkpoints(config.model_dir))


def set_up(config: Config) -> None:
    """Process-wide settings: seed, mixed precision policy (float32 for 'none', also when an
    earlier run of the process set another)."""
    if config.seed is not None:
        keras.utils.set_random_seed(config.seed)
    keras.mixed_precision.set_global_policy(
        'float32' if config.mixed_precision == 'none' else f'mixed_{config.mixed_precision}')


def run(config: Config, flags: Optional[dict[str, Any]] = None) -> Optional[dict[str, float]]:
    """Runs `config.mode`; returns the last eval result, if any."""
    config.validate()
    check_start(config)
    # The strategy comes first: multi-worker collectives must be set up before other TF work.
    strategy = distribute.build_strategy(config)
    distribute.check_strategy(config, strategy)
    info = data.dataset_info(config, need_eval=config.mode != 'train')
    if starts_from_checkpoint(config):
        checkpoint.check_head(config, info.num_classes)
    chief = distribute.is_chief(strategy)
    set_up(config)
    logging.info('%s: %s train / %s eval examples, %s classes, %d replicas', config.dataset,
                 info.num_train_examples, info.num_eval_examples, info.num_classes,
                 strategy.num_replicas_in_sync)

    if config.mode == 'eval':  # creates nothing before a checkpoint appears
        return continuous_eval(config, strategy, info, flags)
    if config.mode == 'export':
        if chief:
            prepare_model_dir(config, 'eval')
        model, step = restore_newest(config, strategy, info)
        export_model(config, model, step)
        return None
    plan = data.view_plan(config, True)  # before the model_dir is touched: it may refuse
    if config.train_mode == 'distill':
        from simclr_tf import teacher
        teacher.check(config, info.num_classes)
    if chief:
        prepare_model_dir(config, 'train')
    task_id = getattr(getattr(strategy, 'cluster_resolver', None), 'task_id', 0) or 0
    state = train.train(config, strategy, info, chief=chief, task_id=task_id, plan=plan)
    replaced = sources.undecodable_count()
    if replaced:
        logging.warning('%d training images could not be decoded and were replaced by grey ones '
                        '(their paths are logged above)', replaced)
    if state.stopped:
        raise train.Preempted(state.stopped, state.step, state.checkpointer.latest)
    if config.mode == 'train':
        return None
    result = evaluate.evaluate(config, strategy, state.model, info, state.step)
    if chief:
        evaluate.write_results(config, result, flags)
        result['saved_model'] = export_model(config, state.model, state.step)
    if replaced:
        result['undecodable_images'] = replaced
    return result


def prepare_model_dir(config: Config, role: str) -> None:
    """Claims model_dir for this run (the chief's job): creates it, takes the `role` lock, checks
    config.json against `config`; for training also moves an old run aside (--start_over) or
    removes an interrupted save's leftovers, and writes config.json."""
    tf.io.gfile.makedirs(config.model_dir)
    model_dir_lib.lock(config.model_dir, role)
    if role != 'train':
        model_dir_lib.check_config(config, config.model_dir)
        return
    if config.start_over:
        model_dir_lib.move_aside(config.model_dir)
    else:
        model_dir_lib.check_config(config, config.model_dir)
        model_dir_lib.clean_leftovers(config.model_dir)
        from simclr_tf import export
        export.repair(config.model_dir)
    model_dir_lib.write_config(config)


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


def restore_newest(config: Config, strategy: tf.distribute.Strategy, info: data.DatasetInfo
                   ) -> tuple[keras.Model, int]:
    """The newest checkpoint of model_dir that can be read (mode=export); older ones are tried
    when the newest cannot be read, with a warning."""
    problems = []
    for _, path in reversed(checkpoint.list_checkpoints(config.model_dir)):
        try:
            return restore_for_inference(config, strategy, info, path)
        except (tf.errors.OpError, IndexError, OSError) as e:
            logging.warning('checkpoint %s cannot be read (%s: %s); trying the one before', path,
                            type(e).__name__, str(e).strip()[:200])
            problems.append(path)
    raise ConfigError(f'no readable checkpoint in model_dir={config.model_dir!r}'
                      + (f' ({", ".join(problems)} cannot be read)' if problems else ''))


def continuous_eval(config: Config, strategy: tf.distribute.Strategy, info: data.DatasetInfo,
                    flags: Optional[dict[str, Any]] = None,
                    wait_log_secs: Optional[float] = None) -> Optional[dict[str, float]]:
    """Evaluates every kept checkpoint not yet evaluated, then each new one, until the last step.

    Says at once when model_dir has no checkpoint and then, while waiting, logs "waiting for
    checkpoints in …" every WAIT_LOG_SECS. Creates nothing in model_dir before a checkpoint is
    there. With eval_timeout > 0 it gives up after that many seconds without a new checkpoint;
    having seen none at all is then an error.
    """
    from simclr_tf import optim
    wait_log_secs = WAIT_LOG_SECS if wait_log_secs is None else wait_log_secs
    model_dir = config.model_dir
    last_step = optim.train_steps(config, info.num_train_examples)
    if not checkpoint.list_checkpoints(model_dir):
        where = '' if tf.io.gfile.isdir(model_dir) else ' (the directory does not exist yet)'
        logging.warning('no checkpoint in %s%s; waiting for checkpoints (%s)', model_dir, where,
                        f'eval_timeout={config.eval_timeout}s' if config.eval_timeout
                        else f'until step {last_step}; --eval_timeout sets a limit')
    result, claimed, skipped = None, False, set()
    last_new = last_log = time.time()
    while True:
        pending = [p for p in _unevaluated(model_dir) if p not in skipped]
        if pending and not claimed:
            prepare_model_dir(config, 'eval')
            claimed = True
        for path in pending:
            try:
                model, step = restore_for_inference(config, strategy, info, path)
            except (tf.errors.OpError, IndexError, OSError) as e:
                # Deleted by training's keep_checkpoint_max while read, or damaged.
                logging.warning('skipping checkpoint %s: %s: %s', path, type(e).__name__,
                                str(e).strip()[:200])
                skipped.add(path)
                continue
            result = evaluate.evaluate(config, strategy, model, info, step)
            evaluate.write_results(config, result, flags)
            export_model(config, model, step)
            last_new = time.time()
            if step >= last_step:
                return result
        found = checkpoint.list_checkpoints(model_dir)
        if found and found[-1][0] >= last_step and not pending:
            return result  # the last step's checkpoint was evaluated before (e.g. by training)
        now = time.time()
        if config.eval_timeout and now - last_new > config.eval_timeout:
            if not found:
                raise ConfigError(f'no checkpoint appeared in model_dir={model_dir!r} within '
                                  f'eval_timeout={config.eval_timeout}s')
            logging.info('no new checkpoint in %s for %ds; stopping', model_dir,
                         config.eval_timeout)
            return result
        if now - last_log >= wait_log_secs:
            logging.info('waiting for checkpoints in %s (newest: %s)', model_dir,
                         found[-1][1] if found else 'none')
            last_log = now
        time.sleep(1)


def _unevaluated(model_dir: str) -> list[str]:
    """Checkpoints of model_dir, oldest first, that have no result_<step>.json yet."""
    return [p for step, p in checkpoint.list_checkpoints(model_dir) if not tf.io.gfile.exists(
        os.path.join(model_dir, f'result_{step}.json'))]


def _step_of(path: str) -> int:
    match = re.search(r'-(\d+)$', path)
    return int(match.group(1)) if match else 0
