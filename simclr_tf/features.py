"""One feature extraction for every offline evaluation: the probe, transfer, the pictures.

An `Encoder` is a network from any source `simclr_tf.encoders` reads (an export, a checkpoint or
model_dir of this project, the authors' checkpoints and SavedModels), the same architecture
randomly initialised, or the raw pixels. `extract` runs it in inference mode over every example
of a split, with the evaluation preprocessing (the central square resized to the encoder's
image size), and returns the named outputs asked for (h = `final_avg_pool`, z =
`proj_head_output`, …) with the integer labels, in the split's order.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np
import tensorflow as tf

from simclr_tf import data, encoders
from simclr_tf.config import Config, ConfigError

H, Z, PIXELS = 'final_avg_pool', 'proj_head_output', 'pixels'
Outputs = Callable[[tf.Tensor], dict]


@dataclasses.dataclass(frozen=True)
class Encoder:
    outputs: Outputs  # images [N, S, S, 3] in [0, 1] -> {name: [N, ...]}
    config: Config  # its architecture; image_size is the size it reads
    description: str  # 'checkpoint /path/ckpt-10', 'random init of …', 'pixels'
    names: tuple[str, ...]  # the outputs it has


def load(path: str, random_init: bool = False, seed: int = 0) -> Encoder:
    """The network at `path` (any source `encoders.open_source` reads); with `random_init` its
    architecture with fresh weights (seeded) instead."""
    source = encoders.open_source(path, what='model')
    if random_init:
        from simclr_tf.model import build_model
        tf.keras.utils.set_random_seed(seed)
        model = build_model(source.config, source.num_classes or 0)
        description = f'random init of {source}'
    else:
        model = encoders.build(source, what='model')
        description = str(source)
    images = tf.zeros([1, source.config.image_size, source.config.image_size, 3])
    names = tuple(sorted(model(images, training=False)))
    call = tf.function(lambda x: model(x, training=False))
    return Encoder(call, source.config, description, names)


def pixels(image_size: int) -> Encoder:
    """The raw pixels at image_size, flattened: the baseline every encoder should beat."""
    fn = tf.function(lambda x: {PIXELS: tf.reshape(x, [tf.shape(x)[0], -1])})
    return Encoder(fn, Config(image_size=image_size), 'pixels', (PIXELS,))


def data_config(encoder: Encoder, dataset: str, data_dir: Optional[str] = None,
                batch_size: int = 500, crop_proportion: float = 0.0) -> Config:
    """The Config that reads `dataset` for `encoder`: its image size, eval preprocessing."""
    return Config(use_tpu=False, dataset=dataset, data_dir=data_dir,
                  image_size=encoder.config.image_size, eval_batch_size=batch_size,
                  cache_dataset=False, eval_crop_proportion=crop_proportion)


def extract(encoder: Encoder, config: Config, split: str, names: tuple[str, ...] = (H,)
            ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({name: [N, d] float32}, [N] integer labels) over every example of `split`, in order."""
    missing = [n for n in names if n not in encoder.names]
    if missing:
        raise ConfigError(f'{encoder.description} has no output {", ".join(missing)}; it has '
                          f'{", ".join(encoder.names)}')
    dataset = data.build_dataset(config.replace(eval_split=split), is_training=False)
    found: dict[str, list[np.ndarray]] = {n: [] for n in names}
    labels = []
    for images, onehot in dataset:
        out = encoder.outputs(images)
        for n in names:
            found[n].append(np.asarray(out[n], np.float32).reshape(images.shape[0], -1))
        labels.append(np.argmax(onehot.numpy(), 1))
    if not labels:
        raise data.DataError(f'split {split!r} of {config.dataset!r} has no examples')
    return {n: np.concatenate(v) for n, v in found.items()}, np.concatenate(labels)
