"""The training loop: `steps_per_loop` steps per tf.function call, then summaries, progress,
checkpoint."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import tensorflow as tf

from simclr_tf import data, interrupt, losses, optim, views
from simclr_tf import teacher as teacher_lib
from simclr_tf.checkpoint import Checkpointer
from simclr_tf.config import Config
from simclr_tf.model import SimCLRModel, build_model

if TYPE_CHECKING:  # plan.py reads no training code; only its type is named here
    from simclr_tf.plan import StartPlan

# The original's scalar names (metrics.py), in the order a step produces them.
PRETRAIN_METRICS = ('train/contrast_loss', 'train/contrast_acc', 'train/contrast_entropy')
SUPERVISED_METRICS = ('train/supervised_loss', 'train/supervised_acc')
# distill: the loss, how often the student's top class is the teacher's; then SUPERVISED_METRICS
# over the batch's labelled examples.
DISTILL_METRICS = ('train/distill_loss', 'train/teacher_agreement')
COMMON_METRICS = ('train/weight_decay', 'train/total_loss')


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


# Exit status of a run stopped by SIGTERM/SIGINT after saving its checkpoint: EX_TEMPFAIL of
# sysexits.h, "temporary failure, try again", so a scheduler or `&&` chain does not take it for
# a finished run. A second signal ends the process at once with 128 + the signal's number.
PREEMPTED_EXIT_CODE = interrupt.STATUS


class Preempted(Exception):
    """Training stopped by a signal after saving a checkpoint; rerunning resumes it."""

    def __init__(self, signum: int, step: int, checkpoint: Optional[str]):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        saved = f'latest checkpoint {checkpoint}' if checkpoint else 'no checkpoint yet'
        super().__init__(interrupt.line(signum, f'at step {step}', saved,
                                        'resume by rerunning the same command'))


@dataclasses.dataclass
class TrainState:
    model: SimCLRModel
    optimizer: tf.keras.optimizers.Optimizer
    checkpointer: Checkpointer
    schedule: optim.WarmUpAndCosineDecay
    total_steps: int
    checkpoint_steps: int
    stopped: int = 0  # the signal (SIGTERM/SIGINT) that stopped training before total_steps
    teacher: Optional[SimCLRModel] = None  # train_mode=distill: frozen, in inference mode

    @property
    def step(self) -> int:
        return int(self.optimizer.iterations.numpy())

    @property
    def loss_scaled(self) -> bool:
        return isinstance(self.optimizer, optim.LossScaleOptimizer)


def metric_names(config: Config, has_supervised_head: bool) -> tuple[str, ...]:
    names = {'pretrain': PRETRAIN_METRICS, 'distill': DISTILL_METRICS}.get(config.train_mode, ())
    return names + (SUPERVISED_METRICS if has_supervised_head else ()) + COMMON_METRICS


def build_state(config: Config, strategy: tf.distribute.Strategy, info: data.DatasetInfo,
                chief: bool = True, task_id: int = 0, plan: Optional[StartPlan] = None,
                dry_run: bool = False) -> TrainState:
    """Model, optimizer and checkpoint for `config`, restored as the start `plan` says (default:
    decided now): from `model_dir`, `--checkpoint` or scratch; `dry_run`: reading only."""
    total = optim.train_steps(config, info.num_train_examples)
    with strategy.scope():
        model = build_model(config, info.num_classes)
        schedule = optim.WarmUpAndCosineDecay(config.learning_rate, info.num_train_examples, config)
        optimizer = optim.build_optimizer(config, schedule, model)  # loss-scaled for float16
        # Keras 3 creates slots lazily; build them now so a checkpoint restores into them.
        optimizer.build(model.trainable_variables)
        checkpointer = Checkpointer(config, model, optimizer, chief=chief, task_id=task_id)
        with interrupt.deferred():  # a resume may set damaged checkpoints aside (renames)
            logging.info('%s', checkpointer.restore(model, plan.weights if plan else None,
                                                    dry_run))
    teacher = None
    if config.train_mode == 'distill':
        teacher = teacher_lib.build(config, info.num_classes, strategy,
                                    plan.teacher if plan else None)
        logging.info('teacher: %s', config.teacher)
    return TrainState(model, optimizer, checkpointer, schedule, total,
                      optim.checkpoint_steps(config, info.num_train_examples), teacher=teacher)


def steps_per_loop(config: Config, checkpoint_steps: int) -> int:
    """Steps per tf.function call: `steps_per_loop`, else up to the next summary or checkpoint."""
    if config.steps_per_loop:
        return config.steps_per_loop
    if config.train_summary_steps > 0:
        return min(checkpoint_steps, config.train_summary_steps)
    return checkpoint_steps


def two_views_to_batch(images: tf.Tensor, plan: views.ViewPlan, config: Config, seed=None
                       ) -> tf.Tensor:
    """[b, S, S, 6] (two views on channels) -> [2b, S, S, 3]: first views, then second views,
    finished by the plan's ops of the training step (`views.step_views`)."""
    return tf.concat(views.step_views(tf.split(images, 2, axis=-1), plan, config, seed), 0)


def make_step_fn(config: Config, state: TrainState, strategy: tf.distribute.Strategy,
                 plan: views.ViewPlan) -> Callable:
    """One replica's step, finishing the views as `plan` says; returns its metrics, in
    `metric_names` order, as a float32 vector."""
    model, optimizer, teacher = state.model, state.optimizer, state.teacher
    pretrain = config.train_mode == 'pretrain'
    replicas = strategy.num_replicas_in_sync
    # float16: a step skipped for an overflow in the forward pass must not leave inf/NaN in the
    # BN moving statistics it updated on the way (they are small: 2 numbers a channel).
    statistics = ([v for v in optim.batch_norm_variables(model) if not v.trainable]
                  if state.loss_scaled else [])

    def step_fn(images: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        if pretrain:
            seed = None
            if config.seed is not None:  # draws keyed by (seed, step, replica): resumable
                replica = tf.distribute.get_replica_context().replica_id_in_sync_group
                seed = tf.stack([tf.constant(config.seed, tf.int64),
                                 optimizer.iterations * replicas + tf.cast(replica, tf.int64)])
            images = two_views_to_batch(images, plan, config, seed=seed)
        if statistics:
            kept = [tf.identity(v) for v in statistics]
            skipped = tf.identity(optimizer.skipped_steps)
        if teacher is not None:  # the same view as the student's; no gradient
            teacher_logits = tf.stop_gradient(teacher(images, training=False)['logits_sup'])
        with tf.GradientTape() as tape:
            outputs = model(images, training=True)
            metrics, loss = [], tf.constant(0.0)
            if teacher is not None:
                loss, metrics = _distillation(config, teacher_logits, outputs['logits_sup'],
                                              labels)
            elif pretrain:
                con_loss, logits_ab, con_labels = losses.contrastive_loss(
                    outputs['proj_head_output'], config)
                acc, entropy = losses.contrastive_metrics(logits_ab, con_labels)
                metrics += [con_loss, acc, entropy]
                loss += con_loss
            if 'logits_sup' in outputs and teacher is None:
                sup_labels = tf.concat([labels, labels], 0) if pretrain else labels
                sup_loss = losses.supervised_loss(sup_labels, outputs['logits_sup'])
                sup_acc = tf.reduce_mean(tf.cast(tf.equal(
                    tf.argmax(sup_labels, 1), tf.argmax(outputs['logits_sup'], 1)), tf.float32))
                metrics += [sup_loss, sup_acc]
                loss += sup_loss
            decay = optim.weight_decay_loss(model, config)
            loss += decay
            metrics += [decay, loss]
            # Gradients are summed over replicas, so each replica's share is loss / replicas.
            scaled = loss / replicas
            if state.loss_scaled:
                scaled = optimizer.scale_loss(scaled)  # unscaled again before the update
        variables = model.trainable_variables
        grads = tape.gradient(scaled, variables)
        optimizer.apply_gradients(zip(grads, variables))
        if statistics:
            was_skipped = tf.not_equal(optimizer.skipped_steps, skipped)
            for v, value in zip(statistics, kept):
                v.assign(tf.where(was_skipped, value, v))
        return tf.stack([tf.cast(m, tf.float32) for m in metrics])

    return step_fn


def _distillation(config: Config, teacher_logits: tf.Tensor, logits: tf.Tensor,
                  labels: tf.Tensor) -> tuple[tf.Tensor, list[tf.Tensor]]:
    """(loss, DISTILL_METRICS + SUPERVISED_METRICS values) of a distillation step: (1 - w) x
    the distillation loss + w x the cross-entropy on the labelled examples."""
    distill = losses.distillation_loss(teacher_logits, logits, config.distill_temperature)
    agreement = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(teacher_logits, 1),
                                                tf.argmax(logits, 1)), tf.float32))
    sup_loss, sup_acc = losses.labelled_loss(labels, logits)
    w = config.distill_label_weight
    loss = (1 - w) * distill + (w * sup_loss if w else 0.0)
    return loss, [distill, agreement, sup_loss, sup_acc]


def use_jit(config: Config, strategy: tf.distribute.Strategy) -> bool:
    """Whether to XLA-compile the replica step: --jit_compile with one replica (says why not)."""
    replicas = strategy.num_replicas_in_sync
    if config.jit_compile and replicas > 1:
        # Measured (2 CPU replicas, MirroredStrategy): XLA refuses to run the step, "Trying to
        # access resource .../replica_1 located in device CPU:1 from device CPU:0".
        logging.warning(
            '--jit_compile is ignored with %d replicas: an XLA-compiled replica step cannot reach '
            'the mirrored variables and cross-replica reductions that live on the other replicas\' '
            'devices (tensorflow.org/xla/known_issues); training runs uncompiled. (On TPU, '
            'TPUStrategy compiles the step with XLA anyway.)', replicas)
    return config.jit_compile and replicas == 1


def make_loop_fn(config: Config, state: TrainState, strategy: tf.distribute.Strategy,
                 plan: views.ViewPlan, stop: Optional[tf.Variable] = None) -> Callable:
    """`loop(iterator, n)`: up to n steps inside one tf.function; the metrics averaged over the
    steps run (under float16, over the steps not skipped for a non-finite gradient: those count
    in `optimizer.skipped_steps` instead). Before each step it reads `stop` (a bool variable a
    signal handler sets), so a stop request ends the loop after the current step, not after n."""
    step_fn = make_step_fn(config, state, strategy, plan)
    jit = use_jit(config, strategy)
    if stop is None:
        stop = tf.Variable(False, trainable=False)

    def skipped_steps() -> tf.Tensor:
        if not state.loss_scaled:
            return tf.constant(0, tf.int64)
        return tf.identity(state.optimizer.skipped_steps.value)

    # XLA compiles the step, not the loop: the iterator cannot live inside an XLA cluster.
    replica_step = tf.function(step_fn, jit_compile=True) if jit else step_fn

    @tf.function
    def loop(iterator, n: tf.Tensor) -> tf.Tensor:
        total = tf.zeros([len(metric_names(config, state.model.supervised_head is not None))])
        done = tf.constant(0.0)
        for _ in tf.range(n):
            if stop.read_value():
                break
            skipped = skipped_steps()
            per_replica = strategy.run(replica_step, args=next(iterator))
            metrics = strategy.reduce(tf.distribute.ReduceOp.MEAN, per_replica, axis=None)
            # A skipped step's metrics may be non-finite; its weights did not change.
            applied = tf.cast(tf.equal(skipped_steps(), skipped), tf.float32)
            total += tf.where(applied > 0, metrics, tf.zeros_like(metrics))
            done += applied
        return total / tf.maximum(done, 1.0)

    return loop


class _StopRequest:
    """SIGTERM/SIGINT (`interrupt`) ask training to checkpoint after the current step and stop;
    a second signal ends the process at once (exit status 128 + signal number), without saving.

    Python runs signal handlers only in the main thread between bytecodes, never while it waits in
    a TensorFlow call; so the loop runs in a worker thread (`call`) while the main thread waits
    interruptibly, and sets `variable` once a signal came; the loop reads it before every step.
    """

    def __init__(self):
        self.variable = tf.Variable(False, trainable=False)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='train_loop')
        self._main = threading.current_thread() is threading.main_thread()

    @property
    def signal(self) -> int:
        return interrupt.signalled()

    def call(self, fn: Callable, started: Callable[[], bool], startup: tuple[str, str, str]):
        """fn() in the worker thread; the main thread stays free to run signal handlers. A signal
        before `started()` (the run's first step done, e.g. while the loop is traced) stops the
        program at once with the `startup` line: there is nothing new to save."""
        if not self._main:
            return fn()
        future = self._pool.submit(fn)
        while True:
            if self.signal and not bool(self.variable.numpy()):
                if not started():
                    interrupt.stop(startup)  # returns in a library call: stop before a step
                self.variable.assign(True)
            try:
                return future.result(timeout=0.1)
            except concurrent.futures.TimeoutError:
                continue

    def close(self) -> None:
        self._pool.shutdown(wait=False)


def _progress_line(step: int, total: int, values: Optional[dict], images_per_s: float,
                   eta_s: float) -> str:
    """`values` None: float16 skipped every step of the loop, which gave no metrics (its zeros
    are no loss of 0)."""
    shown = {'loss': 'train/total_loss', 'con_acc': 'train/contrast_acc',
             'sup_acc': 'train/supervised_acc', 'agree': 'train/teacher_agreement'}
    parts = [f'step {step}/{total}']
    if values is None:
        parts.append('every step skipped (float16 overflow): no loss, the weights did not change')
    else:
        parts += [f'{k} {values[v]:.4f}' for k, v in shown.items() if v in values]
    parts += [f'{images_per_s:.1f} img/s', f'ETA {time.strftime("%H:%M:%S", time.gmtime(eta_s))}']
    return ' | '.join(parts)


def _check_finite(state: TrainState, step: int) -> None:
    """Never lets a checkpoint with NaN/Inf weights become the latest."""
    bad = [v.path for v in state.model.trainable_variables
           if not bool(tf.reduce_all(tf.math.is_finite(v)))]
    if bad:
        raise TrainingDiverged(
            f'non-finite training metrics: weights became NaN/Inf by step {step} ({bad[0]}, …); '
            f'stopped without saving, the last good checkpoint is {state.checkpointer.latest}. '
            'Lower the learning rate or check the input data.')


def _check_loss_scale(state: TrainState, step: int, skipped_before: int) -> int:
    """float16: the steps of the last loop skipped for a non-finite gradient (logged); raises
    TrainingDiverged once the loss scale falls below optim.MIN_LOSS_SCALE, where gradients
    overflow even unscaled and skipping would go on for ever."""
    skipped = int(state.optimizer.skipped_steps.numpy()) - skipped_before
    scale = float(state.optimizer.dynamic_scale.numpy())
    if skipped:
        logging.warning('step %d: %d step(s) skipped for a non-finite float16 gradient (%d in '
                        'all); loss scale now %g', step, skipped, skipped_before + skipped, scale)
    if scale < optim.MIN_LOSS_SCALE:
        raise TrainingDiverged(
            f'float16 gradients non-finite even at loss scale {scale:g} (step {step}, '
            f'{skipped_before + skipped} steps skipped); stopped without saving, the last good '
            f'checkpoint is {state.checkpointer.latest}. Lower the learning rate, check the input '
            'data, or use --mixed_precision=bfloat16 (float32\'s range).')
    return skipped


def _write_image_summary(config: Config, plan: views.ViewPlan, writer, step: int) -> None:
    """The augmented views the network sees (after blur), first view above the second."""
    if config.train_mode != 'pretrain':
        return
    images, _ = next(iter(data.build_dataset(config.replace(train_batch_size=8), True,
                                             plan=plan)))
    pair = tf.concat(tf.split(two_views_to_batch(images, plan, config), 2, 0), axis=1)
    with writer.as_default():
        tf.summary.image('train/augmented_views', pair, step=step, max_outputs=8)


def train(config: Config, strategy: tf.distribute.Strategy, info: data.DatasetInfo,
          chief: bool = True, task_id: int = 0,
          on_checkpoint: Optional[Callable[[TrainState], None]] = None,
          plan: Optional[StartPlan] = None) -> TrainState:
    """Trains until `total_steps` as the start `plan` says (default: decided now, the view plan
    printed): resuming from `model_dir` or starting from `--checkpoint` or scratch; returns the
    final state (with `stopped` set if SIGTERM/SIGINT came, from the start of this call on)."""
    if plan is None:
        views_plan = data.view_plan(config, True)
        logging.info('%s', views_plan.line())
    else:
        views_plan = plan.views
    with interrupt.handling():
        stop = _StopRequest()
        try:
            return _train(config, strategy, info, chief, task_id, on_checkpoint, stop,
                          views_plan, plan)
        finally:
            stop.close()


def _train(config: Config, strategy: tf.distribute.Strategy, info: data.DatasetInfo, chief: bool,
           task_id: int, on_checkpoint: Optional[Callable[[TrainState], None]],
           stop: '_StopRequest', plan: views.ViewPlan, start: Optional[StartPlan]) -> TrainState:
    state = build_state(config, strategy, info, chief=chief, task_id=task_id, plan=start)
    names = metric_names(config, state.model.supervised_head is not None)
    writer = (tf.summary.create_file_writer(config.model_dir) if chief
              else tf.summary.create_noop_writer())
    start = state.step
    if start >= state.total_steps:
        logging.info('already trained to step %d of %d', start, state.total_steps)
        return state
    if chief and start == 0 and config.train_summary_steps > 0:
        _write_image_summary(config, plan, writer, 0)
    dataset = data.build_distributed_dataset(strategy, config, True, start_step=start, plan=plan)
    iterator = iter(dataset)
    loop = make_loop_fn(config, state, strategy, plan, stop.variable)

    logging.info('training from step %d to %d (on SIGTERM or SIGINT: checkpoint after the '
                 'current step and stop)', start, state.total_steps)
    latest = state.checkpointer.latest
    startup = (f'during start-up, before step {start + 1}',
               f'latest checkpoint {latest}' if latest else 'no checkpoint yet',
               'rerunning the same command ' + ('resumes from it' if latest else 'starts it again'))
    with interrupt.phase(f'in training from step {start}', 'checkpoint after the current step',
                         'resume by rerunning the same command', at_once=False):
        _loop(config, state, stop, loop, iterator, writer, names, start, startup, on_checkpoint,
              chief and sys.stderr.isatty())
        writer.flush()
    return state


def _loop(config: Config, state: TrainState, stop: _StopRequest, loop: Callable, iterator,
          writer, names: tuple[str, ...], start: int, startup: tuple[str, str, str],
          on_checkpoint: Optional[Callable[[TrainState], None]], interactive: bool) -> None:
    """The loops of `steps_per_loop` steps up to total_steps, or a signal (`state.stopped`)."""
    per_loop = steps_per_loop(config, state.checkpoint_steps)
    summaries = config.train_summary_steps > 0  # 0: no step summaries, as the TF1 flag
    run_start, run_images = time.time(), 0
    while state.step < state.total_steps:
        step = state.step
        to_checkpoint = state.checkpoint_steps - step % state.checkpoint_steps
        n = min(per_loop, to_checkpoint, state.total_steps - step)
        skipped_before = int(state.optimizer.skipped_steps.numpy()) if state.loss_scaled else 0
        t0 = time.time()
        values = stop.call(lambda: loop(iterator, tf.constant(n)).numpy(),
                           lambda: state.step > start, startup)
        elapsed = time.time() - t0
        n = state.step - step  # fewer than asked if a signal came
        step = state.step
        if n == 0:  # stopped before the first step of this loop
            if step > start:  # else nothing new to save
                state.checkpointer.save(step)
            state.stopped = stop.signal
            logging.warning('stopped by %s at step %d; %s', signal.Signals(stop.signal).name,
                            step, 'checkpoint saved' if step > start else 'nothing new to save')
            break
        skipped = _check_loss_scale(state, step, skipped_before) if state.loss_scaled else 0
        if not np.all(np.isfinite(values)):
            bad = {k: float(v) for k, v in zip(names, values) if not math.isfinite(v)}
            raise TrainingDiverged(
                f'non-finite training metrics at step {step}: {bad}; stopped without saving, '
                f'the last good checkpoint is {state.checkpointer.latest}. Lower the learning '
                'rate or check the input data.')
        metrics = dict(zip(names, map(float, values)))
        lr = float(state.schedule(step - 1))
        if summaries:
            with writer.as_default():
                if skipped < n:  # else no step of this loop gave metrics
                    for k, v in metrics.items():
                        tf.summary.scalar(k, v, step=step)
                tf.summary.scalar('learning_rate', lr, step=step)
                if state.loss_scaled:
                    tf.summary.scalar('train/skipped_steps', skipped_before + skipped, step=step)
                    tf.summary.scalar('train/loss_scale',
                                      float(state.optimizer.dynamic_scale.numpy()), step=step)
        images = n * config.train_batch_size
        run_images += images
        rate = run_images / max(time.time() - run_start, 1e-9)
        eta = (state.total_steps - step) * config.train_batch_size / max(rate, 1e-9)
        line = _progress_line(step, state.total_steps, metrics if skipped < n else None,
                              images / max(elapsed, 1e-9), eta)
        if interactive:
            done = int(30 * step / state.total_steps)
            sys.stderr.write(f'\r[{"#" * done}{"." * (30 - done)}] {line}')
            sys.stderr.flush()
        logging.info('%s', line)
        if step % state.checkpoint_steps == 0 or step == state.total_steps or stop.signal:
            _check_finite(state, step)
            state.checkpointer.save(step)
            if on_checkpoint:
                on_checkpoint(state)
        if stop.signal:
            state.stopped = stop.signal
            logging.warning('stopped by %s at step %d; checkpoint saved',
                            signal.Signals(stop.signal).name, step)
            break
    if interactive:
        sys.stderr.write('\n')
