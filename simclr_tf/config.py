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


class ConfigError(ValueError):
    """A bad value or combination of hyperparameters; the message names the fields."""


@dataclasses.dataclass(frozen=True)
class Config:
    # --- optimisation (original flags) ---
    learning_rate: float = 0.3
    learning_rate_scaling: str = 'linear'  # linear: lr*B/256; sqrt: lr*sqrt(B)
    warmup_epochs: float = 10.0
    weight_decay: float = 1e-6
    batch_norm_decay: float = 0.9
    train_batch_size: int = 512
    train_split: str = 'train'
    train_epochs: int = 100
    train_steps: int = 0
    eval_steps: int = 0
    eval_batch_size: int = 256
    checkpoint_epochs: int = 1
    checkpoint_steps: int = 0
    eval_split: str = 'validation'
    dataset: str = 'imagenet2012'
    cache_dataset: bool = False
    mode: str = 'train'  # train | eval | train_then_eval (| export: new)
    train_mode: str = 'pretrain'  # pretrain | finetune
    lineareval_while_pretraining: bool = True
    checkpoint: Optional[str] = None
    zero_init_logits_layer: bool = False
    fine_tune_after_block: int = -1
    master: Optional[str] = None
    model_dir: Optional[str] = None
    data_dir: Optional[str] = None
    use_tpu: bool = True
    tpu_name: Optional[str] = None
    tpu_zone: Optional[str] = None
    gcp_project: Optional[str] = None
    optimizer: str = 'lars'  # lars | momentum | adam
    momentum: float = 0.9
    eval_name: Optional[str] = None
    keep_checkpoint_max: int = 5
    keep_hub_module_max: int = 1  # 0 keeps every export, as the authors' code
    # --- loss and heads ---
    temperature: float = 0.1
    hidden_norm: bool = True
    proj_head_mode: str = 'nonlinear'  # none | linear | nonlinear
    proj_out_dim: int = 128
    num_proj_layers: int = 3
    ft_proj_selector: int = 0
    # --- encoder ---
    global_bn: bool = True
    width_multiplier: float = 1.0
    resnet_depth: int = 50
    sk_ratio: float = 0.0
    se_ratio: float = 0.0
    image_size: int = 224
    # --- augmentation ---
    color_jitter_strength: float = 1.0
    use_blur: bool = True
    # --- from the TF1 version ---
    train_summary_steps: int = 100  # 0: no step summaries, as the TF1 flag
    # The TF1 default '?!global_step' is not a valid regex (re.compile raises); its evident
    # meaning, every variable but the global step, is written out here.
    variable_schema: str = '(?!global_step)'
    # --- new ---
    contrastive_loss: str = 'nt_xent'
    margin: float = 0.5  # margin triplet
    semi_hard: bool = False  # margin triplet with semi-hard negative mining
    augmentations: str = 'crop,flip,color,blur'
    brightness: str = 'multiplicative'  # multiplicative (SimCLRv2) | additive (v1)
    seed: Optional[int] = None
    cpu_replicas: int = 0
    jit_compile: bool = False
    mixed_precision: str = 'none'  # none | bfloat16 | float16
    steps_per_loop: int = 0  # 0: min(checkpoint steps, train_summary_steps if > 0)
    knn_k: int = 200
    knn_temperature: float = 0.1
    knn_train_examples: int = 100_000  # train examples the kNN monitor uses; 0 turns it off
    eval_timeout: int = 0  # mode=eval: seconds to wait for a new checkpoint; 0 = until the last
    label_fraction: float = 1.0  # fine-tuning on a balanced, seeded share of train_split's labels
    inter_op_threads: int = 0  # TensorFlow's thread pools; 0 = its default (one per core)
    intra_op_threads: int = 0
    label_seed: int = 0  # which label subset (independent of `seed`, so runs can share one)
    frozen_bn: str = 'batch'  # see FROZEN_BN_MODES
    start_over: bool = False  # train from scratch in a used model_dir (its files moved aside)

    # ------------------------------------------------------------------
    @property
    def augmentation_list(self) -> tuple[str, ...]:
        return tuple(a.strip() for a in self.augmentations.split(',') if a.strip())

    @property
    def cifar_stem(self) -> bool:
        """3x3 stride-1 first conv and no max pool, as the paper's CIFAR-10 setup."""
        return self.image_size <= 32

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

        def choice(field: str, allowed: tuple) -> None:
            value = getattr(self, field)
            check(value in allowed, f'{field}={value!r} must be one of {", ".join(map(str, allowed))}')

        choice('learning_rate_scaling', ('linear', 'sqrt'))
        choice('mode', ('train', 'eval', 'train_then_eval', 'export'))
        choice('train_mode', ('pretrain', 'finetune'))
        choice('optimizer', ('lars', 'momentum', 'adam'))
        choice('proj_head_mode', ('none', 'linear', 'nonlinear'))
        choice('resnet_depth', RESNET_DEPTHS)
        choice('contrastive_loss', CONTRASTIVE_LOSSES)
        choice('brightness', ('multiplicative', 'additive'))
        choice('mixed_precision', ('none', 'bfloat16', 'float16'))
        choice('frozen_bn', FROZEN_BN_MODES)

        for field in ('train_batch_size', 'eval_batch_size', 'image_size', 'proj_out_dim',
                      'keep_checkpoint_max', 'knn_k'):
            check(getattr(self, field) > 0, f'{field}={getattr(self, field)} must be > 0')
        for field in ('train_steps', 'eval_steps', 'checkpoint_steps', 'train_epochs',
                      'checkpoint_epochs', 'cpu_replicas', 'steps_per_loop', 'warmup_epochs',
                      'weight_decay', 'learning_rate', 'knn_train_examples', 'eval_timeout',
                      'inter_op_threads', 'intra_op_threads', 'keep_hub_module_max',
                      'train_summary_steps'):
            check(getattr(self, field) >= 0, f'{field}={getattr(self, field)} must be >= 0')
        check(self.train_steps > 0 or self.train_epochs > 0,
              'one of train_steps or train_epochs must be > 0')
        check(self.checkpoint_steps > 0 or self.checkpoint_epochs > 0,
              'one of checkpoint_steps or checkpoint_epochs must be > 0')
        check(self.temperature > 0, f'temperature={self.temperature} must be > 0')
        check(self.knn_temperature > 0, f'knn_temperature={self.knn_temperature} must be > 0')
        check(0 <= self.momentum < 1, f'momentum={self.momentum} must be in [0, 1)')
        check(0 < self.batch_norm_decay < 1,
              f'batch_norm_decay={self.batch_norm_decay} must be in (0, 1)')
        check(self.width_multiplier > 0 and round(64 * self.width_multiplier) >= 1,
              f'width_multiplier={self.width_multiplier} must be > 0 (and give >= 1 channel)')
        check(0 <= self.sk_ratio < 1, f'sk_ratio={self.sk_ratio} must be in [0, 1)')
        check(0 <= self.se_ratio < 1, f'se_ratio={self.se_ratio} must be in [0, 1)')
        check(self.color_jitter_strength >= 0,
              f'color_jitter_strength={self.color_jitter_strength} must be >= 0')
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
        check(-1 <= self.fine_tune_after_block <= 4,
              f'fine_tune_after_block={self.fine_tune_after_block} must be in [-1, 4]')
        check(not (self.train_mode == 'pretrain' and self.fine_tune_after_block != -1),
              f'fine_tune_after_block={self.fine_tune_after_block} only applies to '
              'train_mode=finetune; it must be -1 with train_mode=pretrain')
        check(self.margin >= 0, f'margin={self.margin} must be >= 0')
        check(0 < self.label_fraction <= 1,
              f'label_fraction={self.label_fraction} must be in (0, 1]')
        check(self.label_fraction == 1 or self.train_mode == 'finetune',
              f'label_fraction={self.label_fraction} applies to train_mode=finetune (pretraining '
              'uses every image); it must be 1 with train_mode=pretrain')
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
