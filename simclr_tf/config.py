"""Every hyperparameter of a run, in one frozen dataclass.

Field names, defaults and meanings are those of the authors' TF2 `run.py` flags (plus the TF1
version's `train_summary_steps` and `variable_schema`); fields marked *new* are additions. Library
code receives a `Config`; only the program (`simclr_tf_cli.py`, run by `run.py`) turns absl flags
into one.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Optional

RESNET_DEPTHS = (18, 34, 50, 101, 152, 200)
AUGMENTATIONS = ('crop', 'flip', 'color', 'blur', 'cutout', 'sobel', 'noise', 'rotate')
CONTRASTIVE_LOSSES = ('nt_xent', 'nt_logistic', 'margin_triplet')
# BN of frozen layers in a training step: 'batch' (the authors') normalises with batch statistics
# and updates the moving averages; 'inference' uses the pretrained moving statistics, untouched.
FROZEN_BN_MODES = ('batch', 'inference')
# pretrain and finetune are the authors'; supervised (a classifier trained from scratch on the
# labels: the paper's baselines) and distill (SimCLRv2's third step) are new.
TRAIN_MODES = ('pretrain', 'finetune', 'supervised', 'distill')
AUGMENT_PLACEMENTS = ('auto', 'host', 'step')


class ConfigError(ValueError):
    """A bad value or combination of hyperparameters; the message names the fields."""


_BOUND = re.compile(r'(>=?) (\S+)|([\[(])(\S+), (\S+)([\])])')


@dataclasses.dataclass(frozen=True)
class Bound:
    """A field's allowed values, written as its error message prints them: '> 0', '>= 0',
    '[0, 1)', '(0, 1]', '[-1, 4]'."""
    text: str
    low: float
    high: float  # inf for '> x' and '>= x'
    low_closed: bool
    high_closed: bool

    @classmethod
    def parse(cls, text: str) -> 'Bound':
        m = _BOUND.fullmatch(text)
        if not m:
            raise ValueError(f'bound {text!r} is neither "> x", ">= x" nor an interval "[a, b)"')
        if m[1]:
            return cls(text, float(m[2]), float('inf'), m[1] == '>=', False)
        return cls(text, float(m[4]), float(m[5]), m[3] == '[', m[6] == ']')

    def admits(self, value: float) -> bool:
        above = self.low <= value if self.low_closed else self.low < value
        below = value <= self.high if self.high_closed else value < self.high
        return above and below

    def error(self, name: str, value: float) -> str:
        return f'{name}={value} must be {"" if self.text[0] == ">" else "in "}{self.text}'


def _flag(default: Any, help: str, *, resumable: bool, choices: tuple = (),
          bound: Optional[str] = None) -> Any:
    """A field declared once: its default, its flag's help text, its own check (one of `choices`,
    or within `bound`) and whether it may change when a run resumes in its model_dir.

    Resumable fields are how long to train, what to do, evaluation, resources and bookkeeping;
    every other field changes the model, the objective or the data stream, so resuming under
    another value would silently mix two experiments (model_dir.check_config refuses it).
    """
    return dataclasses.field(default=default, metadata=dict(
        help=help, resumable=resumable, choices=tuple(choices),
        bound=Bound.parse(bound) if bound else None))


@dataclasses.dataclass(frozen=True)
class Config:
    """Every field is a flag of run.py; its metadata (see `_flag`) holds the flag's help text,
    the field's own check and whether it is resumable. Checks across fields are in `validate`."""

    # --- optimisation (original flags) ---
    learning_rate: float = _flag(
        0.3, 'Initial learning rate per batch size of 256 (see learning_rate_scaling).',
        bound='>= 0', resumable=False)
    learning_rate_scaling: str = _flag(  # linear: lr*B/256; sqrt: lr*sqrt(B)
        'linear', 'How to scale the learning rate as a function of batch size.',
        choices=('linear', 'sqrt'), resumable=False)
    warmup_epochs: float = _flag(
        10.0, 'Number of epochs of linear warmup.', bound='>= 0', resumable=False)
    weight_decay: float = _flag(
        1e-6, 'Amount of weight decay to use.', bound='>= 0', resumable=False)
    batch_norm_decay: float = _flag(
        0.9, 'Batch norm decay (moving-average momentum).', bound='(0, 1)', resumable=False)
    train_batch_size: int = _flag(
        512, 'Global batch size for training.', bound='> 0', resumable=False)
    train_split: str = _flag('train', 'Split for training.', resumable=False)
    train_epochs: int = _flag(
        100, 'Number of epochs to train for.', bound='>= 0', resumable=True)
    train_steps: int = _flag(
        0, 'Number of steps to train for. If provided, overrides train_epochs.',
        bound='>= 0', resumable=True)
    eval_steps: int = _flag(
        0, 'Number of steps to eval for. If not provided, evals over the entire split.',
        bound='>= 0', resumable=True)
    eval_batch_size: int = _flag(
        256, 'Global batch size for eval.', bound='> 0', resumable=True)
    checkpoint_epochs: int = _flag(
        1, 'Number of epochs between checkpoints/summaries.', bound='>= 0', resumable=True)
    checkpoint_steps: int = _flag(
        0, 'Number of steps between checkpoints/summaries. If provided, overrides '
        'checkpoint_epochs.', bound='>= 0', resumable=True)
    eval_split: str = _flag('validation', 'Split for evaluation.', resumable=True)
    dataset: str = _flag(
        'imagenet2012', 'A TFDS name (cifar10, imagenet2012_subset/1pct) or a directory laid out '
        '<split>/<class>/<image file>.', resumable=False)
    cache_dataset: bool = _flag(
        False, 'Whether to cache the entire dataset in memory.', resumable=True)
    mode: str = _flag(
        'train', 'Whether to train, evaluate, train then evaluate, or (new) export the latest '
        'checkpoint as a SavedModel.',
        choices=('train', 'eval', 'train_then_eval', 'export'), resumable=True)
    train_mode: str = _flag(
        'pretrain', 'The train mode controls different objectives and trainable components: '
        'pretrain, finetune (from --checkpoint), and new: supervised (the finetune objective from '
        'scratch, the paper\'s supervised baseline), distill (a student trained on --teacher\'s '
        'softmax over every train image, SimCLRv2).', choices=TRAIN_MODES, resumable=False)
    lineareval_while_pretraining: bool = _flag(
        True, 'Whether to finetune a linear head on top of the frozen encoder while pretraining '
        '(behind a stop-gradient).', resumable=False)
    # checkpoint, variable_schema, zero_init_logits_layer: only read when a run starts without a
    # checkpoint of its own (fine-tuning's initial weights), hence resumable.
    checkpoint: Optional[str] = _flag(
        None, 'Checkpoint prefix or directory to start from (fine-tuning), if model_dir has none: '
        'one of this project, or one of the authors\' TF2 checkpoints or SavedModels (their model '
        'zoo, local or gs://; see the README).', resumable=True)
    zero_init_logits_layer: bool = _flag(
        False, 'If True, zero-initialise the supervised head after restoring from --checkpoint '
        '(a run without one keeps N(0, 0.01)).', resumable=True)
    fine_tune_after_block: int = _flag(
        -1, 'Freeze the encoder up to this block when fine-tuning: -1 none, 0 the stem, 1..4 '
        'block groups (4 = linear evaluation).', bound='[-1, 4]', resumable=False)
    master: Optional[str] = _flag(
        None, 'Address/name of the TensorFlow master to use (TPU). By default, local.',
        resumable=True)
    model_dir: Optional[str] = _flag(
        None, 'Model directory for checkpoints, summaries, results and exports.', resumable=True)
    data_dir: Optional[str] = _flag(
        None, 'Directory where TFDS data is stored.', resumable=True)
    use_tpu: bool = _flag(
        True, 'Whether to run on TPU (the original\'s default is True: pass --use_tpu=False on '
        'CPUs and GPUs).', resumable=True)
    tpu_name: Optional[str] = _flag(
        None, 'The Cloud TPU to use for training.', resumable=True)
    tpu_zone: Optional[str] = _flag(None, 'GCE zone of the Cloud TPU.', resumable=True)
    gcp_project: Optional[str] = _flag(
        None, 'Project name of the Cloud TPU-enabled project.', resumable=True)
    optimizer: str = _flag(
        'lars', 'Optimizer to use.', choices=('momentum', 'adam', 'lars'),  # the authors' order
        resumable=False)
    momentum: float = _flag(0.9, 'Momentum parameter.', bound='[0, 1)', resumable=False)
    eval_name: Optional[str] = _flag(
        None, 'Name for eval (summaries go to model_dir/eval_name).', resumable=True)
    keep_checkpoint_max: int = _flag(
        5, 'Maximum number of checkpoints to keep.', bound='> 0', resumable=True)
    keep_hub_module_max: int = _flag(
        1, 'Maximum number of SavedModel exports to keep (0: keep every one).',
        bound='>= 0', resumable=True)
    # --- loss and heads ---
    temperature: float = _flag(
        0.1, 'Temperature parameter for the contrastive loss.', bound='> 0', resumable=False)
    hidden_norm: bool = _flag(
        True, 'Temperature parameter for contrastive loss: l2-normalise the projection output.',
        resumable=False)
    proj_head_mode: str = _flag(
        'nonlinear', 'How the head projection is done.',
        choices=('none', 'linear', 'nonlinear'), resumable=False)
    proj_out_dim: int = _flag(
        128, 'Number of head projection dimension.', bound='> 0', resumable=False)
    num_proj_layers: int = _flag(3, 'Number of non-linear head layers.', resumable=False)
    ft_proj_selector: int = _flag(
        0, 'Which layer of the projection head to use during fine-tuning: 0 means no projection '
        'head, -1 the final layer.', resumable=False)
    # --- encoder ---
    global_bn: bool = _flag(
        True, 'Whether to aggregate BN statistics across distributed cores.', resumable=False)
    width_multiplier: float = _flag(  # checked in validate: it must also give >= 1 channel
        1.0, 'Multiplier to change width of network (fractions such as 0.25 allowed).',
        resumable=False)
    resnet_depth: int = _flag(
        50, 'Depth of ResNet.', choices=RESNET_DEPTHS, resumable=False)
    sk_ratio: float = _flag(
        0.0, 'If it is bigger than 0, it will enable SK. Recommendation: 0.0625.',
        bound='[0, 1)', resumable=False)
    se_ratio: float = _flag(
        0.0, 'If it is bigger than 0, it will enable SE.', bound='[0, 1)', resumable=False)
    image_size: int = _flag(224, 'Input image size.', bound='> 0', resumable=False)
    # --- augmentation ---
    color_jitter_strength: float = _flag(
        1.0, 'The strength of color jittering.', bound='>= 0', resumable=False)
    use_blur: bool = _flag(
        True, 'Whether or not to use Gaussian blur for augmentation during pretraining.',
        resumable=False)
    # --- from the TF1 version ---
    train_summary_steps: int = _flag(
        100, 'Steps between training summaries (TF1 flag; 0: no step summaries); also bounds '
        'steps per loop.', bound='>= 0', resumable=True)
    # The TF1 default '?!global_step' is not a valid regex (re.compile raises); its evident
    # meaning, every variable but the global step, is written out here.
    variable_schema: str = _flag(
        '(?!global_step)', 'Regex (re.match on variable paths) of checkpoint variables to restore '
        'when starting from --checkpoint (TF1 flag).', resumable=True)
    # --- new ---
    contrastive_loss: str = _flag(
        'nt_xent', 'New. The contrastive objective (paper Table 2).',
        choices=CONTRASTIVE_LOSSES, resumable=False)
    margin: float = _flag(
        0.5, 'New. Margin of the margin triplet loss.', bound='>= 0', resumable=False)
    semi_hard: bool = _flag(
        False, 'New. Semi-hard negative mining for the margin triplet loss.', resumable=False)
    augmentations: str = _flag(
        'crop,flip,color,blur', 'New. Ordered, comma-separated augmentation operators of a '
        'pretraining view: crop, flip, color, blur, cutout, sobel, noise, rotate.',
        resumable=False)
    brightness: str = _flag(
        'multiplicative', 'New. Brightness jitter: multiplicative (SimCLRv2) or additive (v1).',
        choices=('multiplicative', 'additive'), resumable=False)
    # Resumable: every placement draws from the same distributions, so a resumed run's stream of
    # augmented views is the same experiment.
    augment_placement: str = _flag(
        'auto', 'New. Where the colour distortion runs: host (in the input pipeline, image by '
        'image or batch by batch: the authors\' placement), step (on whole batches inside the '
        'training step, compiled), auto (step on a GPU or TPU; on a CPU-only run the placement '
        'measured faster there). Crop and flip always run in the input pipeline and blur in the '
        'training step, as in the authors\' code; every placement draws from the same '
        'distributions.', choices=AUGMENT_PLACEMENTS, resumable=True)
    seed: Optional[int] = _flag(
        None, 'New. Seed for initialisation, data order and augmentations (reproducible runs).',
        resumable=False)
    cpu_replicas: int = _flag(
        0, 'New. Split the CPU into N logical devices and mirror across them.',
        bound='>= 0', resumable=True)
    jit_compile: bool = _flag(
        False, 'New. Compile the training step with XLA (one replica, or TPU).', resumable=True)
    # Resumable: variables, optimizer state and checkpoints are float32 under every policy, so a
    # run may resume (or fine-tune) under another precision, as under another device.
    mixed_precision: str = _flag(
        'none', 'New. Mixed precision: none (float32), bfloat16 (TPUs, GPUs from Ampere on, CPUs '
        'with bf16 units) or float16 (older GPUs; dynamic loss scaling). The encoder computes in '
        'it; variables, BN statistics, the heads, the losses and LARS stay float32.',
        choices=('none', 'bfloat16', 'float16'), resumable=True)
    steps_per_loop: int = _flag(
        0, 'New. Steps per tf.function call (0: min(checkpoint steps, train_summary_steps if > '
        '0)).', bound='>= 0', resumable=True)
    knn_k: int = _flag(
        200, 'New. Neighbours of the kNN monitor at eval.', bound='> 0', resumable=True)
    knn_temperature: float = _flag(
        0.1, 'New. Temperature of the kNN monitor\'s weighted vote.', bound='> 0',
        resumable=True)
    knn_train_examples: int = _flag(
        100_000, 'New. Train examples the kNN monitor uses (0 turns it off).', bound='>= 0',
        resumable=True)
    eval_crop_proportion: float = _flag(
        0.0, 'New. The test view: the central square of this share of the shorter side, resized '
        'to image_size (bicubic). 0: the authors\' (0.875 above 32 px, i.e. 256 -> 224; at <= 32 '
        'px the image whole, as their CIFAR evaluation). The transfer protocol\'s linear '
        'evaluation takes 1.0 (shorter side resized, then the centre crop).', bound='[0, 1]',
        resumable=True)
    eval_timeout: int = _flag(
        0, 'New. mode=eval: seconds to wait for a new checkpoint before giving up (0: wait until '
        'the last step\'s checkpoint, as the original).', bound='>= 0', resumable=True)
    label_fraction: float = _flag(
        1.0, 'New. Fine-tune on a class-balanced, seeded fraction of train_split (0.01, 0.1: the '
        'paper\'s semi-supervised protocol on any dataset).', bound='(0, 1]', resumable=False)
    inter_op_threads: int = _flag(
        0, 'New. TensorFlow inter-op threads (0: its default). 1 lowers peak memory on small '
        'CPUs at no cost in speed.', bound='>= 0', resumable=True)
    intra_op_threads: int = _flag(
        0, 'New. TensorFlow intra-op threads (0: its default, one per core).', bound='>= 0',
        resumable=True)
    label_seed: int = _flag(
        0, 'New. Seed of the label_fraction subset (apart from --seed, so runs with different '
        'seeds can share one subset).', resumable=False)
    frozen_bn: str = _flag(
        'batch', 'New. BN of the layers fine_tune_after_block (and ft_proj_selector) freeze, in a '
        'training step: batch (the authors\' code) normalises with batch statistics and updates '
        'the moving averages; inference keeps the pretrained statistics. Their weights are never '
        'trained in either mode.', choices=FROZEN_BN_MODES, resumable=False)
    teacher: Optional[str] = _flag(
        None, 'New. train_mode=distill: the frozen teacher, an export (model_dir/saved_model/'
        '<step>), a checkpoint of this project (prefix or model_dir), or one of the authors\' TF2 '
        'checkpoints or SavedModels; it reads the same augmented view as the student, in '
        'inference mode.', resumable=False)
    distill_temperature: float = _flag(
        1.0, 'New. Temperature of the distillation loss (SimCLRv2): the cross-entropy between '
        'softmax(teacher logits / T) and softmax(student logits / T), times T^2 as the authors\' '
        'colab.', bound='> 0', resumable=False)
    distill_label_weight: float = _flag(
        0.0, 'New. Weight w of the supervised term on the labelled examples (the label_fraction '
        'subset) of train_mode=distill: loss = (1 - w) distillation + w cross-entropy with the '
        'labels (SimCLRv2\'s weighting, alpha = 1 - w; 0: distillation alone, as the authors\' '
        'colab).', bound='[0, 1]', resumable=False)
    start_over: bool = _flag(
        False, 'New. Train from scratch in a model_dir that holds checkpoints, an export or '
        'another run\'s config.json: its files are first moved (not deleted) to '
        'model_dir/previous-<UTC time>/. Without it such a run stops and says what it found. '
        'Pass it once, not in a command a scheduler reruns.', resumable=True)
    dry_run: bool = _flag(
        False, 'New. Check a command before a costly run: resolve and print its start plan (where '
        'the weights come from, teacher, data, views, devices, batch, schedule), build the model '
        'and restore --checkpoint (or the model_dir\'s checkpoint) and the teacher into it, read '
        'one batch of each split the run uses, then exit 0 without writing to model_dir; bad '
        'input stops with the error a real start gives.', resumable=True)

    # ------------------------------------------------------------------
    @property
    def augmentation_list(self) -> tuple[str, ...]:
        return tuple(a.strip() for a in self.augmentations.split(',') if a.strip())

    @property
    def cifar_stem(self) -> bool:
        """3x3 stride-1 first conv and no max pool, as the paper's CIFAR-10 setup."""
        return self.image_size <= 32

    @property
    def trains_classifier(self) -> bool:
        """A mode whose objective is the supervised head's (all but pretrain): the classifier
        sits on hiddens[ft_proj_selector], layers past it are frozen, label_fraction applies."""
        return self.train_mode != 'pretrain'

    @property
    def num_proj_outputs(self) -> int:
        """How many tensors the projection head exposes after h (ft_proj_selector's range)."""
        return {'none': 0, 'linear': 1, 'nonlinear': self.num_proj_layers}[self.proj_head_mode]

    @property
    def ft_proj_index(self) -> int:
        """ft_proj_selector as an index >= 0 into hiddens = [h, g_1, ..., z]: negative selectors
        count from the end (-1 is z), as the authors' Python indexing of that list."""
        return self.ft_proj_selector % (self.num_proj_outputs + 1)

    def replace(self, **changes: Any) -> 'Config':
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> 'Config':
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f'unknown config fields: {", ".join(unknown)}')
        return cls(**values)

    # ------------------------------------------------------------------
    def validate(self) -> 'Config':
        """Raises ConfigError naming the offending fields; returns self for chaining."""
        errors = []

        def check(ok: bool, message: str) -> None:
            if not ok:
                errors.append(message)

        for field in dataclasses.fields(self):  # each field's own check, from its declaration
            value, choices, bound = (getattr(self, field.name), field.metadata['choices'],
                                     field.metadata['bound'])
            if choices and value not in choices:
                errors.append(f'{field.name}={value!r} must be one of '
                              f'{", ".join(map(str, choices))}')
            if bound is not None and not bound.admits(value):
                errors.append(bound.error(field.name, value))
        check(self.train_steps > 0 or self.train_epochs > 0,
              'one of train_steps or train_epochs must be > 0')
        check(self.checkpoint_steps > 0 or self.checkpoint_epochs > 0,
              'one of checkpoint_steps or checkpoint_epochs must be > 0')
        check(self.width_multiplier > 0 and round(64 * self.width_multiplier) >= 1,
              f'width_multiplier={self.width_multiplier} must be > 0 (and give >= 1 channel)')
        check(self.proj_head_mode != 'nonlinear' or self.num_proj_layers >= 1,
              f'num_proj_layers={self.num_proj_layers} must be >= 1 with proj_head_mode=nonlinear')
        if self.proj_head_mode in ('none', 'linear', 'nonlinear'):
            # Python indexing into hiddens = [h, g_1, ..., z], as the authors' code.
            last = self.num_proj_outputs
            check(-(last + 1) <= self.ft_proj_selector <= last,
                  f'ft_proj_selector={self.ft_proj_selector} is out of range: with '
                  f'proj_head_mode={self.proj_head_mode} and num_proj_layers={self.num_proj_layers}'
                  f' it indexes [h, ...] of {last + 1} tensors, so it must be in '
                  f'[{-(last + 1)}, {last}]')
        check(self.trains_classifier or self.fine_tune_after_block == -1,
              f'fine_tune_after_block={self.fine_tune_after_block} only applies to '
              'train_mode=finetune; it must be -1 with train_mode=pretrain')
        check(self.label_fraction == 1 or self.trains_classifier,
              f'label_fraction={self.label_fraction} applies to train_mode=finetune (pretraining '
              'uses every image); it must be 1 with train_mode=pretrain')
        check(bool(self.teacher) == (self.train_mode == 'distill'),
              f'teacher={self.teacher!r}: train_mode=distill needs --teacher, and only it reads '
              f'one (train_mode={self.train_mode})')
        bad = [a for a in self.augmentation_list if a not in AUGMENTATIONS]
        check(not bad, f'augmentations={self.augmentations!r}: unknown {", ".join(bad)}; '
                       f'known: {", ".join(AUGMENTATIONS)}')
        check(len(set(self.augmentation_list)) == len(self.augmentation_list),
              f'augmentations={self.augmentations!r} lists an operator twice')
        check(not (self.use_tpu and self.cpu_replicas),
              'use_tpu=True and cpu_replicas > 0 exclude each other')
        try:
            re.compile(self.variable_schema)
        except re.error as e:
            errors.append(f'variable_schema={self.variable_schema!r} is not a regex: {e}')
        if errors:
            raise ConfigError('invalid configuration:\n  ' + '\n  '.join(errors))
        return self
