"""What `run.py --mode=…` does: train, eval (continuous), train_then_eval, export."""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any, Optional

import keras
import tensorflow as tf

from simclr_tf import checkpoint, data, distribute, evaluate, interrupt, sources, train
from simclr_tf import model_dir as model_dir_lib
from simclr_tf import plan as plan_lib
from simclr_tf.config import Config, ConfigError
from simclr_tf.model import build_model

WAIT_LOG_SECS = 60  # mode=eval: how often to say it is still waiting for a checkpoint
DRY_RUN_BATCH = 64  # --dry_run reads at most this many images of each split


def set_up(config: Config) -> None:
    """Process-wide settings: seed, mixed precision policy (float32 for 'none', also when an
    earlier run of the process set another)."""
    if config.seed is not None:
        keras.utils.set_random_seed(config.seed)
    keras.mixed_precision.set_global_policy(
        'float32' if config.mixed_precision == 'none' else f'mixed_{config.mixed_precision}')


def run(config: Config, flags: Optional[dict[str, Any]] = None) -> Optional[dict[str, float]]:
    """Runs `config.mode` as its start plan says; returns the last eval result, if any. Each
    phase tells `interrupt` what a signal there keeps and what a rerun does; once the run's
    results are written, signals are ignored (`interrupt.finish`)."""
    config.validate()
    # The strategy comes first: multi-worker collectives must be set up before other TF work.
    strategy = distribute.build_strategy(config)
    start = plan_lib.resolve(config, strategy)  # every start-up check; nothing written yet
    latest = start.checkpoints[-1][1] if start.checkpoints else None
    interrupt.set_phase('during start-up', f'latest checkpoint {latest}' if latest
                        else 'no checkpoint yet', 'rerunning the same command ' + (
                            'resumes from it' if latest and start.training else 'starts it again'))
    set_up(config)
    start.log()
    if config.dry_run:
        dry_run(config, strategy, start)
        interrupt.finish()
        return None
    chief = distribute.is_chief(strategy)
    if config.mode == 'eval':  # claims model_dir once a checkpoint is there
        result = continuous_eval(config, strategy, start, flags)
        interrupt.finish()
        return result
    if chief:
        prepare_model_dir(config, start)
    if config.mode == 'export':
        model, step = restore_newest(config, strategy, start)
        interrupt.set_phase(f'during the export of step {step}',
                            'checkpoints kept, no partial export',
                            'rerunning the same command exports it')
        export_model(config, model, step)
        interrupt.finish()
        return None
    return train_then_eval(config, strategy, start, chief, flags)


def train_then_eval(config: Config, strategy: tf.distribute.Strategy,
                    start: plan_lib.StartPlan, chief: bool, flags: Optional[dict[str, Any]]
                    ) -> Optional[dict[str, float]]:
    """Trains as `start` says; with mode=train_then_eval then evaluates and exports."""
    task_id = getattr(getattr(strategy, 'cluster_resolver', None), 'task_id', 0) or 0
    state = train.train(config, strategy, start.data, chief=chief, task_id=task_id, plan=start)
    replaced = sources.undecodable_count()
    if replaced:
        logging.warning('%d training images could not be decoded and were replaced by grey ones '
                        '(their paths are logged above)', replaced)
    if state.stopped:
        raise train.Preempted(state.stopped, state.step, state.checkpointer.latest)
    if config.mode == 'train':
        interrupt.finish()
        return None
    # A signal from here on: the checkpoint is kept, no result.json is written and no export
    # half-written (the export comes first, the results last), and a rerun does both again.
    step, kept = state.step, f'checkpoint {state.checkpointer.latest} kept'
    again = 'rerunning the same command evaluates and exports it'
    interrupt.set_phase(f'during the evaluation of step {step}', f'{kept}, no result.json written',
                        again)
    result = evaluate.evaluate(config, strategy, state.model, start.data, step)
    if chief:
        interrupt.set_phase(f'during the export of step {step}',
                            f'{kept}, no partial export, no result.json written', again)
        path = export_model(config, state.model, step)
        write_results(config, result, flags, final=True)
        result['saved_model'] = path
    else:
        interrupt.finish()
    if replaced:
        result['undecodable_images'] = replaced
    return result


def dry_run(config: Config, strategy: tf.distribute.Strategy, start: plan_lib.StartPlan) -> None:
    """What a start does up to its first step, writing nothing: builds the model, restores its
    start (model_dir's checkpoint, --checkpoint) and the teacher into it, and reads one batch (at
    most DRY_RUN_BATCH images) of each split the run uses."""
    if start.training:
        train.build_state(config, strategy, start.data, plan=start, dry_run=True)
    elif start.checkpoints:  # (mode=eval before any checkpoint: nothing to restore yet)
        _, step = restore_newest(config, strategy, start)
        logging.info('dry run: restored the checkpoint of step %d', step)
    splits = ([config.train_split] if start.training else []) + (
        [config.eval_split] if start.mode in ('eval', 'train_then_eval') else [])
    if start.mode == 'eval' and config.knn_train_examples:
        splits.append(config.train_split)  # the kNN monitor's labelled examples
    for i, split in enumerate(splits):
        training = start.training and i == 0
        images, _ = data.first_batch(config, split, training, DRY_RUN_BATCH, start.replicas,
                                     start.views if training else None)
        logging.info('dry run: read a batch of %s: %s', split, 'x'.join(map(str, images.shape)))
    logging.info('dry run: the run can start; nothing was written to %s', config.model_dir)


def write_results(config: Config, result: dict[str, float], flags: Optional[dict[str, Any]],
                  final: bool = False) -> None:
    """The result files, after the export they describe; a signal waits for them. `final`: the
    run is then complete, signals are ignored from then on."""
    with interrupt.deferred():
        evaluate.write_results(config, result, flags)
        if final:
            interrupt.finish()


def prepare_model_dir(config: Config, start: Optional[plan_lib.StartPlan] = None) -> None:
    """Claims model_dir for this run (the chief's job): creates it and takes the lock of its role
    (`.train.lock` for training, `.eval.lock` for eval and export). Training then moves an old run
    aside (--start_over) or removes an interrupted save's leftovers, and writes config.json and
    the start plan (plan.txt). The config check is the plan's (and, for mode=eval, checked again
    once a checkpoint is there: the training run may have written config.json since). A signal
    waits for it to finish."""
    with interrupt.deferred():
        _prepare_model_dir(config, start)


def _prepare_model_dir(config: Config, start: Optional[plan_lib.StartPlan]) -> None:
    tf.io.gfile.makedirs(config.model_dir)
    training = config.mode in plan_lib.TRAINING
    model_dir_lib.lock(config.model_dir, 'train' if training else 'eval')
    if config.mode == 'eval':  # started before training wrote config.json: check it now
        model_dir_lib.check_config(config, model_dir_lib.read_config(config.model_dir))
    if not training:
        return
    if config.start_over:
        model_dir_lib.move_aside(config.model_dir)
    else:
        model_dir_lib.clean_leftovers(config.model_dir)
        from simclr_tf import export
        export.repair(config.model_dir)
    model_dir_lib.write_config(config)
    if start is not None:
        start.write()


def export_model(config: Config, model: keras.Model, step: int) -> str:
    from simclr_tf import export  # only the programs that export need it
    path = export.export_saved_model(model, config, step)
    logging.info('exported SavedModel to %s', path)
    return path


def restore_for_inference(config: Config, strategy: tf.distribute.Strategy, num_classes: int,
                          path: str) -> tuple[keras.Model, int]:
    """The model of a training checkpoint, and its step (the `ckpt-<step>` number); raises
    checkpoint.Damaged if its files are damaged."""
    with strategy.scope():
        model = build_model(config, num_classes)
    checkpoint.restore_model(model, path)
    return model, _step_of(path)


def restore_newest(config: Config, strategy: tf.distribute.Strategy, start: plan_lib.StartPlan
                   ) -> tuple[keras.Model, int]:
    """The newest of model_dir's checkpoints (as the plan found them) that can be read; older
    ones are tried when the newest cannot be read, with a warning."""
    problems = []
    for _, path in reversed(start.checkpoints):
        try:
            return restore_for_inference(config, strategy, start.num_classes, path)
        except checkpoint.Damaged as e:
            logging.warning('%s; trying the one before', e)
            problems.append(path)
    raise ConfigError(f'no readable checkpoint in model_dir={config.model_dir!r}'
                      + (f' ({", ".join(problems)} cannot be read)' if problems else ''))


def continuous_eval(config: Config, strategy: tf.distribute.Strategy,
                    start: plan_lib.StartPlan, flags: Optional[dict[str, Any]] = None,
                    wait_log_secs: Optional[float] = None) -> Optional[dict[str, float]]:
    """Evaluates every kept checkpoint not yet evaluated, then each new one, until the last step.

    Says at once when model_dir has no checkpoint and then, while waiting, logs "waiting for
    checkpoints in …" every WAIT_LOG_SECS. Creates nothing in model_dir before a checkpoint is
    there. With eval_timeout > 0 it gives up after that many seconds without a new checkpoint;
    having seen none at all is then an error.
    """
    wait_log_secs = WAIT_LOG_SECS if wait_log_secs is None else wait_log_secs
    model_dir, last_step = config.model_dir, start.total_steps
    if not start.checkpoints:
        where = '' if tf.io.gfile.isdir(model_dir) else ' (the directory does not exist yet)'
        logging.warning('no checkpoint in %s%s; waiting for checkpoints (%s)', model_dir, where,
                        f'eval_timeout={config.eval_timeout}s' if config.eval_timeout
                        else f'until step {last_step}; --eval_timeout sets a limit')
    result, claimed, skipped = None, False, set()
    last_new = last_log = time.time()
    rerun = 'rerunning the same command evaluates the checkpoints not evaluated yet'
    while True:
        interrupt.set_phase('while waiting for checkpoints', 'the results written so far', rerun)
        pending = [p for p in _unevaluated(model_dir) if p not in skipped]
        if pending and not claimed:
            prepare_model_dir(config)
            claimed = True
        for path in pending:
            interrupt.set_phase(f'during the evaluation of {path}',
                                'the results written so far, no partial export', rerun)
            try:
                model, step = restore_for_inference(config, strategy, start.num_classes, path)
            except checkpoint.Damaged as e:
                # Damaged, or deleted by training's keep_checkpoint_max while read.
                logging.warning('skipping checkpoint %s: %s', path, e.damage)
                skipped.add(path)
                continue
            result = evaluate.evaluate(config, strategy, model, start.data, step)
            # The export first: a step with a result file is not evaluated again.
            export_model(config, model, step)
            write_results(config, result, flags)
            last_new = time.time()
            if step >= last_step:
                return result
        found = model_dir_lib.list_checkpoints(model_dir)
        if found and found[-1][0] >= last_step and not pending:
            # the last step's checkpoint was evaluated before (e.g. by training), or skipped
            return _noting_skipped(result, skipped)
        now = time.time()
        if config.eval_timeout and now - last_new > config.eval_timeout:
            if not found:
                raise ConfigError(f'no checkpoint appeared in model_dir={model_dir!r} within '
                                  f'eval_timeout={config.eval_timeout}s')
            logging.info('no new checkpoint in %s for %ds; stopping', model_dir,
                         config.eval_timeout)
            return _noting_skipped(result, skipped)
        if now - last_log >= wait_log_secs:
            logging.info('waiting for checkpoints in %s (newest: %s)', model_dir,
                         found[-1][1] if found else 'none')
            last_log = now
        time.sleep(1)


def _noting_skipped(result: Optional[dict], skipped: set[str]) -> Optional[dict]:
    """`result`, with `older_than` naming the newer checkpoints skipped as damaged (the final
    line says its step is not the newest)."""
    newer = sorted((p for p in skipped if result and _step_of(p) > result['global_step']),
                   key=_step_of)
    if newer:
        result['older_than'] = (f'not the newest: {", ".join(newer)} could not be read and '
                                f'{"was" if len(newer) == 1 else "were"} skipped')
    return result


def _unevaluated(model_dir: str) -> list[str]:
    """Checkpoints of model_dir, oldest first, that have no result_<step>.json yet."""
    return [p for step, p in model_dir_lib.list_checkpoints(model_dir) if not tf.io.gfile.exists(
        os.path.join(model_dir, f'result_{step}.json'))]


def _step_of(path: str) -> int:
    match = re.search(r'-(\d+)$', path)
    return int(match.group(1)) if match else 0
