"""Input pipelines: a source (`sources`) -> per-replica batches of (images, labels), in four
stages: read (this pipeline's examples, in each epoch's order), decode, views (the plan's host
ops: `views.ViewPlan`), batch.

Images are float32 in [0, 1]; in pretraining the two views of each image are concatenated on the
channel axis ([b, S, S, 6]), as the authors do; labels are one-hot. The ops the plan leaves to the
training step (blur, and the colour distortion where it runs there) are applied by
`views.step_views`, not here.

Reproducibility: the training stream is a function of (config.seed, element index). Each epoch
is shuffled with a seed derived from (seed, input pipeline, epoch) — an image folder's list or a
cached set permuted whole, a TFDS split's files read in that epoch's own random order before a
shuffle buffer — and the views are drawn by stateless ops seeded from (seed, input pipeline,
index of the batch's first element; image by image, of each image's own index), so a run resumed
at `start_step` yields exactly the batches an uninterrupted run would (only the current epoch is
skipped through, never the ones before it).
"""

from __future__ import annotations

import dataclasses
import functools
import random
from typing import Callable, Optional

import numpy as np
import tensorflow as tf
from absl import logging

from simclr_tf import augment, sources, views
from simclr_tf.config import Config
from simclr_tf.sources import DataError  # noqa: F401  (raised by this module's functions too)

AUTOTUNE = tf.data.AUTOTUNE
_GRAPH_SEED = 87654321  # TF's graph seed when none is set
_EPOCHS = 2**62  # "repeat forever", as a range the epochs are numbered from


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    num_train_examples: int  # of config.train_split
    num_eval_examples: Optional[int]  # of config.eval_split; None when not asked for
    class_names: Optional[tuple[str, ...]]


# ---------------------------------------------------------------- label subsets
def balanced_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of round(fraction * N) examples (at least one), spread over the classes
    as evenly as their sizes allow; which examples, and which classes get the remainder, is a
    function of `seed` alone. The semi-supervised protocol of the paper (1 % / 10 % of labels)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    classes = rng.permutation(np.unique(labels))  # seeded order: who gets the remainder
    members = {c: rng.permutation(np.flatnonzero(labels == c)) for c in classes}
    quota = dict.fromkeys(classes, 0)
    remaining = max(1, round(fraction * len(labels)))
    open_ = list(classes)
    while remaining > 0 and open_:  # water-filling: small classes give their surplus to others
        share, extra = divmod(remaining, len(open_))
        for rank, c in enumerate(open_):
            take = min(share + (rank < extra), len(members[c]) - quota[c])
            quota[c] += take
            remaining -= take
        open_ = [c for c in open_ if quota[c] < len(members[c])]
    return np.sort(np.concatenate([members[c][:quota[c]] for c in classes]))


def label_subset(config: Config) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(train_split's labels, the indices that keep theirs) under label_fraction < 1, as training
    reads them; None when every example keeps its label (or none is used)."""
    source = sources.open_source(config.dataset, config.data_dir)
    subset = _label_subset(source, config, config.train_split)
    return None if subset is None else (source.labels(config.train_split), subset)


def _label_subset(source, config: Config, split: str) -> Optional[np.ndarray]:
    """The indices of `split` that keep their labels with label_fraction < 1, else None."""
    if not config.trains_classifier or config.label_fraction >= 1:
        return None
    return _cached_subset(source, split, config.label_fraction, config.label_seed)


@functools.lru_cache(maxsize=4)
def _cached_subset(source, split: str, fraction: float, seed: int) -> np.ndarray:
    # Sized by dataset_info, read by every input pipeline: one draw (and pass over labels) each.
    subset = balanced_subset(source.labels(split), fraction, seed)
    logging.info('label_fraction=%g of %s: %d examples (label_seed %d)', fraction, split,
                 len(subset), seed)
    return subset


def _read_train(source, config: Config, pipelines: int, pipeline: int,
                order: Optional[tf.Tensor] = None, training: bool = True
                ) -> tuple[tf.data.Dataset, int]:
    """train_split's (item, label) for one input pipeline. Fine-tuning reads only the label
    subset, and so does every labelled use of train_split (the kNN bank); distillation's
    training reads every example, with label -1 (a zero one-hot) outside the subset."""
    split = config.train_split
    subset = _label_subset(source, config, split)
    if subset is None:
        return source.read(split, pipelines, pipeline, None, order)
    labelled = np.zeros([source.num_examples(split)], bool)
    labelled[subset] = True
    if training and config.train_mode == 'distill':
        return source.read(split, pipelines, pipeline, order=order, labelled=labelled)
    return source.read(split, pipelines, pipeline, labelled, order)


# ---------------------------------------------------------------- public API
def dataset_info(config: Config, need_eval: bool = True) -> DatasetInfo:
    """Checks the source and the splits (before any model is built) and sizes them."""
    source = sources.open_source(config.dataset, config.data_dir)
    subset = _label_subset(source, config, config.train_split)
    return DatasetInfo(
        num_classes=source.num_classes,
        num_train_examples=(len(subset) if subset is not None and config.train_mode != 'distill'
                            else source.num_examples(config.train_split)),
        num_eval_examples=source.num_examples(config.eval_split) if need_eval else None,
        class_names=source.class_names)


def examples(config: Config, split: str) -> tf.data.Dataset:
    """The split's decoded examples (uint8 [h, w, 3] image, int label), unshuffled."""
    source = sources.open_source(config.dataset, config.data_dir)
    dataset, _ = source.read(split, 1, 0)
    size = source.common_size(split)
    return dataset.map(lambda x, y: (sources.decode_or_replace(source, x, size), y),
                       num_parallel_calls=AUTOTUNE)


def view_plan(config: Config, is_training: bool, accelerator: Optional[bool] = None
              ) -> views.ViewPlan:
    """Where the views of `config`'s training (or eval) stream are made (`views.plan_views`)
    for its source's images; `accelerator` None: whether this process sees a GPU or TPU."""
    source = sources.open_source(config.dataset, config.data_dir)
    split = config.train_split if is_training else config.eval_split
    return views.plan_views(config, is_training, source.common_size(split), source.stores_files,
                            views.has_accelerator() if accelerator is None else accelerator)


def first_batch(config: Config, split: str, is_training: bool, most: int, replicas: int = 1,
                plan: Optional[views.ViewPlan] = None) -> tuple[tf.Tensor, tf.Tensor]:
    """The first batch of `split` as a run reads it (the training stream, with `plan`'s views, or
    the eval stream; `train_split` read for eval: its labelled examples), of the run's batch size
    but at most `most` images (a multiple of `replicas`): proof that the split can be read."""
    batch = config.train_batch_size if is_training else config.eval_batch_size
    batch = max(replicas, min(batch, most) // replicas * replicas)
    config = config.replace(train_batch_size=batch, eval_batch_size=batch,
                            **({} if is_training else {'eval_split': split}))
    labelled = not is_training and split == config.train_split
    return next(iter(build_dataset(config, is_training, labelled_only=labelled, plan=plan)))


@dataclasses.dataclass(frozen=True)
class _Shard:
    """This input pipeline's share of a global batch."""
    batch: int  # examples per replica
    pipelines: int
    pipeline: int
    replicas: int

    @classmethod
    def of(cls, global_batch: int, context: Optional[tf.distribute.InputContext]) -> '_Shard':
        if context is None:
            return cls(global_batch, 1, 0, 1)
        return cls(context.get_per_replica_batch_size(global_batch), context.num_input_pipelines,
                   context.input_pipeline_id, context.num_replicas_in_sync)


def build_dataset(config: Config, is_training: bool,
                  input_context: Optional[tf.distribute.InputContext] = None,
                  start_step: int = 0, labelled_only: bool = False,
                  plan: Optional[views.ViewPlan] = None) -> tf.data.Dataset:
    """Per-replica batches of (images [b, S, S, 3V] float32 in [0, 1], one-hot labels), the
    views made as far as `plan` (default: `view_plan`) puts them on the host. `labelled_only`
    (eval of train_split, e.g. the kNN monitor's bank): only the label_fraction subset, as
    training reads it."""
    source = sources.open_source(config.dataset, config.data_dir)
    split = config.train_split if is_training else config.eval_split
    shard = _Shard.of(config.train_batch_size if is_training else config.eval_batch_size,
                      input_context)
    plan = plan or view_plan(config, is_training)
    seed = config.seed if config.seed is not None else random.SystemRandom().randrange(2**31)
    # Independent streams of seeds for: the epochs' shuffles, per-image ops, per-batch ops.
    epoch_key, image_key, batch_key = (tf.constant([seed, 3 * shard.pipeline + i], tf.int64)
                                       for i in range(3))
    decode = _decoder(source, source.common_size(split))
    train_split = is_training or (labelled_only and split == config.train_split)
    examples, decode = _read(config, source, split, shard, train_split, is_training, start_step,
                             epoch_key, decode)
    one = _image_views(plan, config, source, decode, image_key)
    if plan.batched:
        if decode is not None:
            examples = examples.map(one, num_parallel_calls=AUTOTUNE)
        batches = examples.batch(shard.batch, drop_remainder=is_training)
    else:  # two batches in the making at once, each image by image on all cores
        batches = examples.batch(shard.batch, drop_remainder=is_training).map(
            lambda index, item: _made_image_by_image(one, index, item), num_parallel_calls=2)
    return batches.map(_batch_views(plan, config, batch_key, source.num_classes),
                       num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)


def _read(config: Config, source, split: str, shard: _Shard, train_split: bool, training: bool,
          start_step: int, key: tf.Tensor, decode: Callable
          ) -> tuple[tf.data.Dataset, Optional[Callable]]:
    """(index, (item, label)) of this pipeline's examples (`train_split`: those training reads,
    the label subset), in training endless epochs each in its own order from `start_step` on;
    with cache_dataset the items decoded once, into the cache (as the original caches TFDS's
    output), and no decode left to do (None)."""
    def read(order: Optional[tf.Tensor] = None) -> tuple[tf.data.Dataset, int]:
        if train_split:
            return _read_train(source, config, shard.pipelines, shard.pipeline, order, training)
        return source.read(split, shard.pipelines, shard.pipeline, order=order)

    items, n = read()
    if not n:
        raise DataError(f'split {split!r} of {source.description} has no examples for input '
                        f'pipeline {shard.pipeline} of {shard.pipelines}')
    if config.cache_dataset:
        items = items.map(lambda x, y: (decode(x), y), num_parallel_calls=AUTOTUNE).cache()
        decode = None
    if not training:
        return items.enumerate(), decode
    # One global step takes a per-replica batch for each replica this pipeline feeds.
    start = start_step * shard.batch * max(shard.replicas // shard.pipelines, 1)
    if decode is None or source.full_shuffle:  # in memory, or a list of files: permute it all
        return _shuffled_epochs(lambda order: items, n, n, key, start), decode
    buffer = (50 if config.image_size <= 32 else 10) * shard.batch  # the authors' buffer
    return _shuffled_epochs(lambda order: read(order)[0], n, buffer, key, start), decode


def _decoder(source, size: Optional[tuple[int, int]]) -> Callable[..., tf.Tensor]:
    """decode(x, caught=True): uint8 [h, w, 3] of an item; caught, a failed decode gives the
    grey stand-in (`sources.decode_or_replace`). In a source of one size a stray odd-sized image
    is resized to that size."""
    def decode(x: tf.Tensor, caught: bool = True) -> tf.Tensor:
        image = sources.decode_or_replace(source, x, size) if caught else source.decode(x)
        if size is None:
            return image
        return tf.cond(tf.reduce_all(tf.shape(image)[:2] == size), lambda: image,
                       lambda: tf.cast(tf.clip_by_value(tf.round(
                           tf.image.resize(image, size, 'bicubic')), 0, 255), tf.uint8))
    return decode


def _image_views(plan: views.ViewPlan, config: Config, source, decode: Optional[Callable],
                 key: tf.Tensor) -> Callable:
    """one(index, (item, label), caught=True) -> (index, (x, label)): an example decoded (unless
    `decode` is None: cached) and, where the plan makes views image by image, its views on
    channels [S, S, 3V]: the ops up to the crop on the image, the rest on the resized crop."""
    crop_at = plan.host.index('crop') + 1 if 'crop' in plan.host else 0
    head, tail = plan.host[:crop_at], plan.host[crop_at:]
    window = _window_crops(plan, config, source, tail) if plan.crop == 'window' else None

    def one(index, item, caught: bool = True):
        x, label = item
        if plan.batched:
            return index, (decode(x, caught), label)
        seeds = tf.random.experimental.stateless_split(
            tf.random.experimental.stateless_fold_in(key, index), plan.views)
        if window:
            crops, rest, scale, flips = window(x, seeds, caught)
        else:
            image = x if decode is None else decode(x, caught)
            crops = [augment.view(image, head, config, seeds[v]) for v in range(plan.views)]
            rest, scale, flips = tail, 1.0, None
        return index, (augment.finish_views(crops, rest, config, tf.unstack(seeds), scale, flips),
                       label)

    return one


def _window_crops(plan: views.ViewPlan, config: Config, source, tail: tuple[str, ...]
                  ) -> Callable:
    """window(x, seeds, caught) -> (crops, rest, scale, flips): a file's views' crops, the
    JPEG decoded only in their window (`sources.decode_crops`), resized, left in [0, 255] and
    unflipped (`augment.finish_views` flips and scales them in its pass), and what is left."""
    flip = tail[:1] == ('flip',)  # a flip right after the crop: its coins drawn with the boxes
    # The ~100 small ops of the crop draw (and the flips' coins) as one compiled program.
    draw = tf.function(augment.sample_crops, jit_compile=True, autograph=False)
    draw_views = tf.function(augment.sample_views, jit_compile=True, autograph=False)
    stand_in = tf.fill(list(sources.STAND_IN_SIZE) + [3], tf.constant(128, tf.uint8))

    def window(x, seeds, caught: bool):
        op_seeds = [augment.op_seeds(seeds[v]) for v in range(plan.views)]

        def plan_crops(h, w):  # every view's boxes (and flip coins) in one draw
            if flip:
                return draw_views(h, w, op_seeds[0]['crop'],
                                  tf.stack([s['flip'] for s in op_seeds]))
            return draw(h, w, plan.views, op_seeds[0]['crop']), tf.zeros([plan.views], tf.bool)

        def crops(x):
            return sources.decode_crops(source.encoded(x), plan_crops)

        pixels, boxes, flips = (sources.or_replace(source, x, crops, lambda: (stand_in,) + tuple(
            plan_crops(*sources.STAND_IN_SIZE))) if caught else crops(x))
        resized = [augment.resized_crop(pixels, boxes[v], config.image_size, rescale=False)
                   for v in range(plan.views)]
        return resized, (tail[1:] if flip else tail), 255.0, (flips if flip else None)

    return window


def _made_image_by_image(one: Callable, index: tf.Tensor, item) -> tuple:
    """A batch's examples made by `one` image by image, in parallel, their decodes unguarded;
    only if one fails is the batch made again with each decode caught: catching costs a
    one-element dataset an image, so it is paid once a batch, not once an image."""
    n = tf.size(index, out_type=tf.int64)

    def made(caught: bool) -> tf.data.Dataset:
        return (tf.data.Dataset.from_tensor_slices((index, item))
                .map(lambda i, x: one(i, x, caught), num_parallel_calls=AUTOTUNE)
                .batch(n, drop_remainder=True))  # a failure mid-batch leaves none

    return sources.first_made(made(False), made(True))


def _batch_views(plan: views.ViewPlan, config: Config, key: tf.Tensor, num_classes: int
                 ) -> Callable:
    """(index, (images, labels)) -> (images, one-hot labels): where the plan batches the host's
    ops, each view of the whole batch made here, on channels."""
    def finish(index, item):
        images, labels = item
        if plan.batched:
            seeds = tf.random.experimental.stateless_split(
                tf.random.experimental.stateless_fold_in(key, index[0]), plan.views)
            images = tf.concat([augment.view(images, plan.host, config, seeds[v], jit=True)
                                for v in range(plan.views)], axis=-1)
        return images, tf.one_hot(labels, num_classes)
    return finish


def _shuffled_epochs(items: Callable[[tf.Tensor], tf.data.Dataset], n: int, buffer: int,
                     key: tf.Tensor, start: int) -> tf.data.Dataset:
    """(index, item) from element `start` on of endless epochs of n items. Epoch e reads
    `items(order seed of e)` through a shuffle buffer seeded by e: with buffer >= n a uniformly
    random permutation of the items. Only the current epoch is read through to get to `start`,
    and a resumed stream is the uninterrupted one from `start` on."""
    first_epoch, offset = divmod(start, n)

    def epoch(e: tf.Tensor) -> tf.data.Dataset:
        # shuffle() pairs its seed with the graph-level seed, which inside this traced function
        # is TF's global seed; pinning it (in this function's graph only) to TF's default makes
        # the order a function of config.seed alone.
        assert not tf.executing_eagerly()
        tf.compat.v1.set_random_seed(_GRAPH_SEED)
        shuffle_seed, order_seed = tf.unstack(tf.random.experimental.stateless_split(
            tf.random.experimental.stateless_fold_in(key, e), 2))
        return items(order_seed).shuffle(min(buffer, n), seed=shuffle_seed[0])

    return (tf.data.Dataset.range(first_epoch, _EPOCHS).flat_map(epoch)
            .skip(offset).enumerate(start))


def build_distributed_dataset(strategy: tf.distribute.Strategy, config: Config,
                              is_training: bool, start_step: int = 0,
                              labelled_only: bool = False,
                              plan: Optional[views.ViewPlan] = None):
    """A distributed dataset of per-replica batches, one input pipeline per worker."""
    return strategy.distribute_datasets_from_function(
        lambda context: build_dataset(config, is_training, context, start_step, labelled_only,
                                      plan))
