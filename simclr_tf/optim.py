"""Optimisation as in the paper's default setup: LARS, linear warmup then cosine decay, the
learning rate scaled with the batch size, and the authors' weight-decay policy.

Under `mixed_precision=float16` the optimizer is wrapped in `LossScaleOptimizer` (dynamic loss
scaling): LARS then sees unscaled float32 gradients, so its weight decay and trust ratios are
those of a float32 run.

Weight decay follows the authors' code: with LARS, decay (and the trust ratio) is applied inside
the optimizer to every variable except BN variables, biases and the supervised head; the
supervised head instead gets an L2 term in the loss (`weight_decay_loss`). With momentum or Adam,
the L2 term in the loss covers every trainable non-BN variable.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import keras
import tensorflow as tf

from simclr_tf.config import Config

EETA_DEFAULT = 0.001
# float16: below this loss scale even unscaled gradients overflow, and the run has diverged.
MIN_LOSS_SCALE = 1.0


# --- learning rate and step counts ----------------------------------------------------------

def scaled_learning_rate(config: Config) -> float:
    """The base learning rate scaled with the batch size B: lr * B / 256 or lr * sqrt(B)."""
    batch = config.train_batch_size
    if config.learning_rate_scaling == 'linear':
        return config.learning_rate * batch / 256.
    if config.learning_rate_scaling == 'sqrt':
        return config.learning_rate * math.sqrt(batch)
    raise ValueError(f'unknown learning_rate_scaling {config.learning_rate_scaling!r}')


def train_steps(config: Config, num_train_examples: int) -> int:
    """config.train_steps, else train_epochs worth of batches (+1, as the original)."""
    return config.train_steps or (
        num_train_examples * config.train_epochs // config.train_batch_size + 1)


def eval_steps(config: Config, num_eval_examples: int) -> int:
    """config.eval_steps, else enough batches to see every eval example once."""
    return config.eval_steps or int(math.ceil(num_eval_examples / config.eval_batch_size))


def checkpoint_steps(config: Config, num_train_examples: int) -> int:
    """config.checkpoint_steps, else checkpoint_epochs worth of batches (at least 1)."""
    epoch_steps = int(round(num_train_examples / config.train_batch_size))
    return config.checkpoint_steps or max(1, config.checkpoint_epochs * epoch_steps)


def warmup_steps(config: Config, num_train_examples: int) -> int:
    """warmup_epochs worth of batches (the original's expression, floor then round)."""
    return int(round(config.warmup_epochs * num_train_examples // config.train_batch_size))


_warmup_steps = warmup_steps  # the schedule's keyword argument of the same name shadows it


class WarmUpAndCosineDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from 0 to the scaled lr, then cosine decay to 0 without restarts.

    Either `WarmUpAndCosineDecay(base_learning_rate, num_examples, config)` (the original's
    arguments; the scaling, warmup and total steps come from config) or
    `WarmUpAndCosineDecay(scaled_lr=..., warmup_steps=..., total_steps=...)`.
    """

    def __init__(self, base_learning_rate: Optional[float] = None,
                 num_examples: Optional[int] = None, config: Optional[Config] = None, *,
                 scaled_lr: Optional[float] = None, warmup_steps: Optional[int] = None,
                 total_steps: Optional[int] = None, name: Optional[str] = None):
        super().__init__()
        if config is not None:
            if None in (base_learning_rate, num_examples):
                raise ValueError('with config, give base_learning_rate and num_examples')
            scaled_lr = scaled_learning_rate(config.replace(learning_rate=base_learning_rate))
            warmup_steps = _warmup_steps(config, num_examples)
            total_steps = train_steps(config, num_examples)
        if None in (scaled_lr, warmup_steps, total_steps):
            raise ValueError('give (base_learning_rate, num_examples, config) or '
                             '(scaled_lr, warmup_steps, total_steps)')
        self.scaled_lr = float(scaled_lr)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.name = name

    def __call__(self, step):
        with tf.name_scope(self.name or 'WarmUpAndCosineDecay'):
            step = tf.cast(step, tf.float32)
            warmup = float(self.warmup_steps)
            if self.warmup_steps:
                warmup_lr = step / warmup * self.scaled_lr
            else:
                warmup_lr = tf.constant(self.scaled_lr)
            decay_steps = float(max(1, self.total_steps - self.warmup_steps))
            progress = tf.clip_by_value((step - warmup) / decay_steps, 0., 1.)
            cosine_lr = 0.5 * self.scaled_lr * (1. + tf.cos(math.pi * progress))
            return tf.where(step < warmup, warmup_lr, cosine_lr)

    def get_config(self):
        return {'scaled_lr': self.scaled_lr, 'warmup_steps': self.warmup_steps,
                'total_steps': self.total_steps, 'name': self.name}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


# --- LARS -----------------------------------------------------------------------------------

class LARS(keras.optimizers.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You, Gitman & Ginsburg 2017), as the authors' optimizer.

    Per variable w with gradient g (classic momentum):
        g <- g + weight_decay * w                      unless w is excluded from weight decay
        trust = eeta * ||w|| / ||g|| if both > 0 else 1   (1 if excluded from layer adaptation)
        v <- momentum * v + lr * trust * g;   w <- w - v
    (nesterov: w <- w - (momentum * v + lr * trust * g)). With classic_momentum=False the trust
    ratio is computed on the momentum update instead, and the learning rate applied after it.

    Exclusions are lists of variables, matched by identity (the optimizer's own variable key, so
    the per-device copies a tf.distribute strategy hands to update_step match too);
    exclude_from_layer_adaptation=None means the same as exclude_from_weight_decay. They are not
    part of get_config. The decay is L2 added to the gradient, not Keras' decoupled decay, so
    weight_decay is kept here and not passed to the base class.
    """

    def __init__(self, learning_rate, momentum: float = 0.9, use_nesterov: bool = False,
                 weight_decay: float = 0.0,
                 exclude_from_weight_decay: Optional[Iterable] = None,
                 exclude_from_layer_adaptation: Optional[Iterable] = None,
                 classic_momentum: bool = True, eeta: float = EETA_DEFAULT,
                 name: str = 'LARS', **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.momentum = float(momentum)
        self.use_nesterov = bool(use_nesterov)
        self.lars_weight_decay = float(weight_decay or 0.0)
        self.classic_momentum = bool(classic_momentum)
        self.eeta = float(eeta)
        no_decay = list(exclude_from_weight_decay or [])
        no_adaptation = (no_decay if exclude_from_layer_adaptation is None
                         else list(exclude_from_layer_adaptation))
        self._no_decay_keys = frozenset(self._var_key(v) for v in no_decay)
        self._no_adaptation_keys = frozenset(self._var_key(v) for v in no_adaptation)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.momentums = self.add_optimizer_variables(variables, 'momentum')

    def _trust_ratio(self, w_norm, u_norm):
        ratio = tf.math.divide_no_nan(self.eeta * w_norm, u_norm)
        return tf.where((w_norm > 0) & (u_norm > 0), ratio, tf.ones_like(ratio))

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        lr = tf.cast(learning_rate, dtype)
        grad = tf.cast(tf.convert_to_tensor(gradient), dtype)
        param = tf.convert_to_tensor(variable)
        key = self._var_key(variable)
        adapt = key not in self._no_adaptation_keys
        velocity = self.momentums[self._get_variable_index(variable)]
        momentum = tf.cast(self.momentum, dtype)

        if self.lars_weight_decay and key not in self._no_decay_keys:
            grad += tf.cast(self.lars_weight_decay, dtype) * param
        w_norm = tf.norm(param)

        if self.classic_momentum:
            scaled_lr = lr * self._trust_ratio(w_norm, tf.norm(grad)) if adapt else lr
            next_v = momentum * velocity + scaled_lr * grad
            update = momentum * next_v + scaled_lr * grad if self.use_nesterov else next_v
        else:
            next_v = momentum * velocity + grad
            update = momentum * next_v + grad if self.use_nesterov else next_v
            scaled_lr = lr * self._trust_ratio(w_norm, tf.norm(update)) if adapt else lr
            update = scaled_lr * update

        self.assign(velocity, next_v)
        self.assign_sub(variable, update)

    def get_config(self):
        config = super().get_config()
        config.update({
            'momentum': self.momentum,
            'use_nesterov': self.use_nesterov,
            'weight_decay': self.lars_weight_decay,
            'classic_momentum': self.classic_momentum,
            'eeta': self.eeta,
        })
        return config


# --- float16 loss scaling -------------------------------------------------------------------

class LossScaleOptimizer(keras.optimizers.LossScaleOptimizer):
    """Keras' dynamic loss scaling (halve the scale and skip the step on a non-finite gradient,
    double it after `dynamic_growth_steps` finite ones; the inner optimizer gets the gradients
    divided by the scale), made fit for a distributed custom loop:

    - every replica takes the same decision: finiteness is all-reduced over the replicas (Keras
      alone looks at replica 0's own gradients, before they are summed, so an overflow on
      another replica would reach the weights);
    - a skipped step still counts as a step (`iterations` advances), so the learning-rate
      schedule, the data position, the per-step augmentation seeds and the checkpoint numbers stay
      those of a float32 run, and resuming stays exact;
    - skipped steps are counted in `skipped_steps` (summarised as `train/skipped_steps`).
    """

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self.skipped_steps = self.add_variable(
            shape=(), dtype='int', initializer=keras.initializers.Zeros(), aggregation='none',
            name='skipped_steps')

    @property
    def loss_scale_variables(self) -> list:
        """The scale's own state, apart from the inner optimizer's (checkpointed apart, so a
        run resumes across precisions)."""
        return [self.dynamic_scale, self.step_counter, self.skipped_steps]

    def check_finite(self, grads):
        finite = super().check_finite(grads)
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            overflowed = context.all_reduce(tf.distribute.ReduceOp.SUM,
                                            1.0 - tf.cast(finite, tf.float32))
            finite = tf.equal(overflowed, 0.0)
        return finite

    def _stateful_handle_non_finite_grads(self):
        super()._stateful_handle_non_finite_grads()
        self.skipped_steps.assign_add(1)
        self.inner_optimizer.iterations.assign_add(1)


def inner_optimizer(optimizer: keras.optimizers.Optimizer) -> keras.optimizers.Optimizer:
    """The optimizer that updates the weights (itself, unless loss-scaled)."""
    return getattr(optimizer, 'inner_optimizer', optimizer)


# --- choosing variables by what they are ----------------------------------------------------

def _layers(layer) -> list:
    return layer._flatten_layers(include_self=True, recursive=True)


def _biases(layer) -> list:
    """The `bias` variables of layer and all its sublayers."""
    found = []
    for sub in _layers(layer):
        bias = getattr(sub, 'bias', None)  # Dense/Conv expose .bias (None without one)
        if isinstance(bias, keras.Variable):
            found.append(bias)
    return found


def batch_norm_variables(model) -> list:
    """Every variable of the model's BN layers (γ, β and the moving statistics)."""
    return [v for layer in _layers(model)
            if isinstance(layer, keras.layers.BatchNormalization) for v in layer.variables]


def _supervised_head(model):
    # Models without the attribute (plain Keras models) simply have no supervised head.
    return getattr(model, 'supervised_head', None)


def _unique(variables) -> list:
    seen, unique = set(), []
    for v in variables:
        if id(v) not in seen:
            seen.add(id(v))
            unique.append(v)
    return unique


def lars_exclusions(model) -> list:
    """Variables LARS neither decays nor adapts: BN variables, biases, the supervised head.

    The original excluded by the name substrings 'batch_normalization', 'bias' and
    'head_supervised'; here they are chosen by what they are. The model must be built.
    """
    excluded = batch_norm_variables(model) + _biases(model)
    head = _supervised_head(model)
    if head is not None:
        excluded += list(head.variables)
    return _unique(excluded)


def build_optimizer(config: Config, learning_rate, model) -> keras.optimizers.Optimizer:
    """The optimizer named by config.optimizer.

    Create it under the strategy's scope, and build it there (`opt.build(variables)`) before the
    first distributed step: Keras 3 optimizers cannot create their slots inside strategy.run
    within a tf.function. The model must be built (LARS's exclusions are its variables).
    Under mixed_precision=float16 it is wrapped in `LossScaleOptimizer`.
    """
    if config.optimizer == 'lars':
        optimizer = LARS(learning_rate, momentum=config.momentum,
                         weight_decay=config.weight_decay,
                         exclude_from_weight_decay=lars_exclusions(model))
    elif config.optimizer == 'momentum':
        optimizer = keras.optimizers.SGD(learning_rate, momentum=float(config.momentum),
                                         nesterov=True)
    elif config.optimizer == 'adam':
        optimizer = keras.optimizers.Adam(learning_rate)
    else:
        raise ValueError(f'unknown optimizer {config.optimizer!r}')
    if config.mixed_precision == 'float16':
        optimizer = LossScaleOptimizer(optimizer)
    return optimizer


def weight_decay_loss(model, config: Config) -> tf.Tensor:
    """The L2 term added to the loss (the authors' add_weight_decay, adjust_per_optimizer=True).

    lars: weight_decay * sum of l2_loss (||w||^2 / 2) over the supervised head's trainable
    non-bias variables (LARS decays everything else it should itself). momentum/adam: over all
    trainable variables except BN's (biases included, as the original).
    """
    if config.optimizer == 'lars':
        head = _supervised_head(model)
        if head is None:
            return tf.constant(0.0)
        skip = {id(v) for v in _biases(head)}
        variables = head.trainable_variables
    else:
        skip = {id(v) for v in batch_norm_variables(model)}
        variables = model.trainable_variables
    l2 = [tf.nn.l2_loss(tf.cast(v, tf.float32)) for v in variables if id(v) not in skip]
    if not l2:
        return tf.constant(0.0)
    return config.weight_decay * tf.add_n(l2)
