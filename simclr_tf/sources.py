"""Where examples come from: an image folder or a TFDS builder, read as (encoded image, label);
decoding, and what happens to an image that cannot be decoded.

Image folders (`<root>/<split>/<class>/<image>`, the `tfds.ImageFolder` layout and class order)
are listed here rather than read through `tfds.ImageFolder`: its decoding stops the run at the
first corrupt file, whereas here unreadable files (and whatever else a class folder holds that
is no image file: other files, dangling links, folders) are found when the split is listed, logged
with their path and reason, counted and left out, so the example counts used for epochs and
resumption are exact. A split's files are put in one fixed pseudo-random order, so slices such as
`train[:10%]` take a sample of every class.

Besides TFDS's slices, both kinds of source take `<split>[validation]` and `<split>[fit]`: a
fixed, stratified fifth of the split held out (`held_out`: every class gives a fifth of its
examples) and the rest, for data sets that have no validation split of their own.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import os
import random
import re
import threading
from typing import Any, Callable, Optional

import numpy as np
import PIL.Image
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

AUTOTUNE = tf.data.AUTOTUNE
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.gif', '.bmp')
_SIZE_SAMPLE = 32  # images whose headers are read to see whether a folder has one image size


class DataError(ValueError):
    """The dataset, directory, split or file cannot be used; the message names it."""


# ---------------------------------------------------------------- image folders
def _unreadable(path: str) -> Optional[str]:
    """Why the file cannot be an image, from its signature and ending; None if it looks whole.
    Cheap (two small reads), so a whole split is checked when it is listed."""
    try:
        with open(path, 'rb') as f:
            head = f.read(16)
            size = f.seek(0, os.SEEK_END)
            f.seek(max(size - 1024, 0))
            tail = f.read()
    except OSError as e:
        return f'cannot be read ({e.strerror})'
    if not size:
        return 'empty file'
    if head.startswith(b'\xff\xd8\xff'):
        return None if b'\xff\xd9' in tail else 'truncated JPEG (no end-of-image marker)'
    if head.startswith(b'\x89PNG\r\n\x1a\n'):
        return None if b'IEND' in tail else 'truncated PNG (no IEND chunk)'
    if head.startswith((b'GIF87a', b'GIF89a')):
        return None if b';' in tail else 'truncated GIF'
    if head.startswith(b'BM') and len(head) >= 6:
        return None if size >= int.from_bytes(head[2:6], 'little') else 'truncated BMP'
    return 'not a JPEG, PNG, GIF or BMP image'


def _not_a_file(entry: os.DirEntry) -> Optional[tuple[str, str]]:
    """(kind, reason) of an entry of a class folder that is no file (its images are its own
    files, links to files included); None for a file."""
    try:
        if entry.is_file():
            return None
        if entry.is_dir():
            return 'folder', 'a folder inside a class folder (its files are not read)'
    except OSError as e:  # a link to itself, no permission to look
        return 'unreadable', f'cannot be read ({e.strerror})'
    if entry.is_symlink() and not os.path.exists(entry.path):
        return ('dangling link', 'dangling symbolic link (its target '
                f'{os.readlink(entry.path)} does not exist)')
    return 'not a file', 'not a regular file'


_SPLIT_PART = re.compile(r'^(?P<name>[\w.-]+)(\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\]'
                         r'|\[(?P<part>fit|validation)\])?$')
HELD_OUT = 0.2  # <split>[validation]: this share of every class


def held_out(labels: np.ndarray, fraction: float = HELD_OUT, seed: int = 0
             ) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held out) sorted indices: `fraction` of every class held out (rounded, at least one
    of a class with two or more examples), which ones a function of `seed` alone. Each class
    keeps its share, so the held-out part has the split's class proportions."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        take = max(round(fraction * len(members)), 1) if len(members) > 1 else 0
        held.append(members[:take])
    held = np.sort(np.concatenate(held)) if held else np.zeros([0], np.int64)
    return np.setdiff1d(np.arange(len(labels)), held), held


def _part_mask(labels: np.ndarray, part: str) -> np.ndarray:
    """The mask over a split of its `part`: 'fit' or 'validation' (see `held_out`)."""
    fit, held = held_out(labels)
    mask = np.zeros([len(labels)], bool)
    mask[held if part == 'validation' else fit] = True
    return mask


def _parse_split(spec: str, available: list[str], where: str
                 ) -> list[tuple[str, Optional[str], Optional[str], Optional[str]]]:
    """'train[:10%]+test[validation]' -> [('train', None, '10%', None), ('test', None, None,
    'validation')] (TFDS syntax, and the held-out parts)."""
    parts = []
    for part in spec.split('+'):
        match = _SPLIT_PART.match(part.strip())
        if not match:
            raise DataError(f'split {spec!r} of {where}: cannot parse {part!r}; use e.g. '
                            "'train', 'train[:10%]', 'train[100:200]', 'train[validation]'")
        if match['name'] not in available:
            raise DataError(f'split {match["name"]!r} not found in {where}; it has: '
                            f'{", ".join(sorted(available)) or "no splits"}')
        parts.append((match['name'], match['start'], match['stop'], match['part']))
    return parts


def _spread(part: np.ndarray, inner: Optional[np.ndarray]) -> np.ndarray:
    """A mask over a base split from `inner`, a mask over its `part` (None: all of it)."""
    out = part.copy()
    if inner is not None:
        out[part] = inner
    return out


def _bound(text: Optional[str], n: int, default: int) -> int:
    """A slice bound ('10', '-10', '10%') as an index into n examples, TFDS's rounding."""
    if text is None:
        return default
    value = round(n * int(text[:-1]) / 100) if text.endswith('%') else int(text)
    return min(max(value + n if value < 0 else value, 0), n)


class _FolderSource:
    """<root>/<split>/<class>/<image>; labels are indices into the sorted union of classes."""

    def __init__(self, root: str):
        self.root = root
        self.splits = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not self.splits:
            raise DataError(f'no images in {root}: expected split folders laid out '
                            f'{root}/<split>/<class>/<image>')
        self.class_names = tuple(sorted({e.name for s in self.splits
                                         for e in os.scandir(os.path.join(root, s))
                                         if e.is_dir()}))
        self.num_classes = len(self.class_names)
        self.description = f'image folder {root}'
        self._listed: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {}

    def _files(self, split: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """The split's readable images and labels in a fixed pseudo-random order (listed and
        checked once per process)."""
        if split not in self._listed:
            self._listed[split] = self._list(split)
        return self._listed[split]

    def _list(self, split: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
        split_dir = os.path.join(self.root, split)
        files, skipped = [], []  # skipped: (path, kind, reason)
        for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
            if not entry.is_dir():
                if not entry.name.startswith('.'):
                    skipped.append((entry.path, 'outside a class folder',
                                    'not inside a class folder'))
                continue
            names = []
            for f in sorted(os.scandir(entry.path), key=lambda f: f.name):
                if f.name.startswith('.'):
                    continue
                kind = _not_a_file(f)
                if kind:
                    skipped.append((f.path, *kind))
                elif f.name.lower().endswith(IMAGE_EXTENSIONS):
                    names.append(f.name)
                else:
                    skipped.append((f.path, 'non-image name', 'not an image file name '
                                    f'({", ".join(IMAGE_EXTENSIONS)})'))
            images = [os.path.join(entry.path, f) for f in names]
            if not images:
                raise DataError(f'class folder {entry.path} has no images')
            files.append((entry.name, images))
        if not files:
            raise DataError(f'no images in {split_dir}: expected {split_dir}/<class>/<image>')

        paths, labels = [], []
        for class_name, images in files:
            readable = []
            for path in images:
                reason = _unreadable(path)
                if reason:
                    skipped.append((path, 'unreadable', reason))
                else:
                    readable.append(path)
            if not readable:
                raise DataError(f'class folder {os.path.join(split_dir, class_name)} has no '
                                f'readable images ({len(images)} unreadable files)')
            paths += readable
            labels += [self.class_names.index(class_name)] * len(readable)
        for path, _, reason in skipped:
            logging.warning('skipping %s: %s', path, reason)
        if skipped:
            kinds = collections.Counter(kind for _, kind, _ in skipped)
            logging.warning('skipped %d entries of %s that are not readable images (%s); using '
                            '%d images', len(skipped), split_dir,
                            ', '.join(f'{n} {kind}' for kind, n in kinds.items()), len(paths))
        order = list(range(len(paths)))
        random.Random(0).shuffle(order)
        return tuple(paths[i] for i in order), tuple(labels[i] for i in order)

    def _select(self, split: str) -> tuple[list[str], list[int]]:
        paths, labels = [], []
        for name, start, stop, part in _parse_split(split, self.splits, self.description):
            split_paths, split_labels = self._files(name)
            n = len(split_paths)
            if part:
                mask = _part_mask(np.asarray(split_labels), part)
                paths += [p for p, k in zip(split_paths, mask) if k]
                labels += [y for y, k in zip(split_labels, mask) if k]
                continue
            chosen = slice(_bound(start, n, 0), _bound(stop, n, n))
            paths += split_paths[chosen]
            labels += split_labels[chosen]
        return paths, labels

    def num_examples(self, split: str) -> int:
        return len(self._select(split)[0])

    def labels(self, split: str) -> np.ndarray:
        return np.asarray(self._select(split)[1], np.int64)

    # Every epoch is a full permutation of the list (a shuffle buffer of the whole split).
    full_shuffle = True
    stores_files = True

    def read(self, split: str, num_shards: int, index: int, keep: Optional[np.ndarray] = None,
             order: Optional[tf.Tensor] = None, labelled: Optional[np.ndarray] = None
             ) -> tuple[tf.data.Dataset, int]:
        """(path, label) of the split's examples where `keep` (a mask over the split), every
        num_shards-th from `index` on; label -1 where `labelled` (a mask) is False. `order`
        plays no part: the caller permutes the list."""
        del order
        paths, labels = self._select(split)
        if labelled is not None:
            labels = [y if k else -1 for y, k in zip(labels, labelled)]
        if keep is not None:
            paths = [p for p, k in zip(paths, keep) if k]
            labels = [y for y, k in zip(labels, keep) if k]
        paths, labels = paths[index::num_shards], labels[index::num_shards]
        return tf.data.Dataset.from_tensor_slices((paths, labels)), len(paths)

    def common_size(self, split: str) -> Optional[tuple[int, int]]:
        """(height, width) when a sample of the split's images (headers only) all agree."""
        paths = self._select(split)[0]
        sizes = set()
        for path in paths[::max(len(paths) // _SIZE_SAMPLE, 1)][:_SIZE_SAMPLE]:
            try:
                with PIL.Image.open(path) as image:
                    sizes.add(image.size[::-1])
            except (OSError, ValueError):
                return None
        return sizes.pop() if len(sizes) == 1 else None

    @staticmethod
    def encoded(path: tf.Tensor) -> tf.Tensor:
        return tf.io.read_file(path)

    def decode(self, path: tf.Tensor) -> tf.Tensor:
        return decode_image(self.encoded(path))


# ---------------------------------------------------------------- TFDS
class _TfdsSource:
    def __init__(self, name: str, data_dir: Optional[str]):
        try:
            self.builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError as e:
            raise DataError(f'dataset {name!r} is neither a directory nor a TFDS dataset '
                            f'({str(e).splitlines()[0]})') from None
        self.description = f'TFDS dataset {name!r} (data_dir {self.builder.data_dir})'
        if not self.builder.is_prepared():
            raise DataError(f'TFDS dataset {name!r} is not prepared: nothing found in '
                            f'{self.builder.data_dir}. Without network access it cannot be '
                            'downloaded; prepare it elsewhere (tfds build) and pass its --data_dir')
        info = self.builder.info
        keys = info.supervised_keys or image_label_keys(info.features)
        if not keys:
            raise DataError(f'{self.description} has no (image, label) supervised keys')
        self.image_key, self.label_key = keys[:2]
        labels = info.features[self.label_key]
        self.num_classes = labels.num_classes
        self.class_names = tuple(labels.names) if labels.names else None
        self._image_feature = info.features[self.image_key]
        # Whether the image feature holds image files (PNG / JPEG bytes), not raw pixels.
        self.stores_files = (isinstance(self._image_feature, tfds.features.Image)
                             and getattr(self._image_feature, '_encoding_format', None) != 'none')

    def _derived(self, split: str) -> Optional[tuple[str, np.ndarray]]:
        """(base split, mask over it) of `<base>[fit]` / `<base>[validation]`, else None."""
        if not isinstance(split, str):  # a TFDS split object (tfds.even_splits)
            return None
        match = _SPLIT_PART.match(split.strip())
        if match and match['part']:
            return match['name'], _part_mask(self.labels(match['name']), match['part'])
        if re.search(r'\[(fit|validation)\]', split):
            raise DataError(f'split {split!r} of {self.description}: [fit] and [validation] '
                            'take a whole TFDS split, not a part of a combination')
        return None

    def num_examples(self, split: str) -> int:
        derived = self._derived(split)
        if derived:
            return int(derived[1].sum())
        try:
            return self.builder.info.splits[split].num_examples
        except (KeyError, ValueError) as e:
            raise DataError(f'split {split!r} not usable in {self.description}: {e}; it has: '
                            f'{", ".join(sorted(self.builder.info.splits))}') from None

    @functools.lru_cache(maxsize=4)
    def labels(self, split: str) -> np.ndarray:
        # One pass over the split without decoding images: for the label_fraction subset.
        derived = self._derived(split)
        if derived:
            return self.labels(derived[0])[derived[1]]
        dataset = self.builder.as_dataset(split=split, shuffle_files=False,
                                          decoders={self.image_key: tfds.decode.SkipDecoding()})
        return np.fromiter((int(x[self.label_key]) for x in tfds.as_numpy(dataset)), np.int64)

    # Too big to permute whole: each epoch reads the files in its own order, then a buffer.
    full_shuffle = False

    def read(self, split: str, num_shards: int, index: int, keep: Optional[np.ndarray] = None,
             order: Optional[tf.Tensor] = None, labelled: Optional[np.ndarray] = None
             ) -> tuple[tf.data.Dataset, int]:
        """(encoded image, label) of the split's examples where `keep` (a mask over the split),
        for input pipeline `index` of num_shards; label -1 where `labelled` (a mask) is False.
        With `order` (a stateless seed) the split's files are read in that seed's random order,
        16 at a time interleaved (TFDS's shuffle_files, but seeded per epoch); without it in the
        split's order."""
        derived = self._derived(split)
        if derived:  # the part's masks, spread over its base split
            split, part = derived
            keep = _spread(part, keep)
            labelled = None if labelled is None else _spread(part, labelled)
        if labelled is not None and keep is None:  # the masks need each example's index
            keep = np.ones_like(labelled)
        if keep is None and num_shards > 1:  # exact even ranges: each pipeline knows its length
            split = tfds.even_splits(split, n=num_shards)[index]
        if keep is None:
            n = self.num_examples(split)
        else:  # shards by example index, whatever the files' order
            n = int(np.sum(keep[index::num_shards]))
        if self.builder.info.file_format != tfds.core.FileFormat.TFRECORD:
            dataset = self.builder.as_dataset(
                split=split, shuffle_files=False,
                decoders={self.image_key: tfds.decode.SkipDecoding()},
                read_config=tfds.ReadConfig(try_autocache=False))
            dataset = dataset.enumerate().map(
                lambda i, x: (i, x[self.image_key], x[self.label_key]))
        else:
            dataset = self._records(split, order)
        if keep is not None:
            mask = tf.constant(keep)
            dataset = dataset.filter(lambda i, x, y: tf.gather(mask, i)
                                     & (i % num_shards == index))
        if labelled is not None:
            known = tf.constant(labelled)
            return dataset.map(lambda i, x, y: (x, tf.where(tf.gather(known, i), y,
                                                            tf.constant(-1, y.dtype)))), n
        return dataset.map(lambda i, x, y: (x, y)), n

    def _records(self, split: str, order: Optional[tf.Tensor]) -> tf.data.Dataset:
        """(index in split, encoded image, label) read from the split's TFRecord files."""
        files, skips, takes, firsts = [], [], [], []
        for instruction in self.builder.info.splits[split].file_instructions:
            files.append(instruction.filename)
            skips.append(instruction.skip)
            takes.append(instruction.take)
            firsts.append(sum(takes[:-1]))
        columns = (tf.constant(files), tf.constant(skips, tf.int64), tf.constant(takes, tf.int64),
                   tf.constant(firsts, tf.int64))
        if order is not None:
            permutation = tf.argsort(tf.random.stateless_uniform([len(files)], order))
            columns = tuple(tf.gather(c, permutation) for c in columns)
        decoders = {self.image_key: tfds.decode.SkipDecoding()}

        def parse(index, record):
            example = self.builder.info.features.deserialize_example(record, decoders=decoders)
            return index, example[self.image_key], example[self.label_key]

        return tf.data.Dataset.from_tensor_slices(columns).interleave(
            lambda f, skip, take, first: tf.data.TFRecordDataset(f).skip(skip).take(take)
            .enumerate(first),
            **(dict(cycle_length=1) if order is None else dict(
                cycle_length=min(16, len(files)), num_parallel_calls=AUTOTUNE,
                deterministic=True))
        ).map(parse, num_parallel_calls=AUTOTUNE)

    def common_size(self, split: str) -> Optional[tuple[int, int]]:
        height, width = self._image_feature.shape[:2]
        return (height, width) if height and width else None

    def encoded(self, encoded: tf.Tensor) -> tf.Tensor:
        return encoded  # the image file's bytes (when stores_files)

    def decode(self, encoded: tf.Tensor) -> tf.Tensor:
        image = self._image_feature.decode_example(encoded)
        channels = image.shape[-1]
        if channels == 1:
            image = tf.image.grayscale_to_rgb(image)
        elif channels == 4:
            image = image[..., :3]
        return tf.ensure_shape(image, [None, None, 3])


# ---------------------------------------------------------------- decoding
def decode_image(encoded: tf.Tensor) -> tf.Tensor:
    """uint8 [h, w, 3] from an image file's bytes: the format read from the bytes, grey, RGBA
    and CMYK made RGB."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    return tf.ensure_shape(image, [None, None, 3])


def decode_crops(encoded: tf.Tensor, draw: Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, Any]]
                 ) -> tuple[tf.Tensor, tf.Tensor, Any]:
    """Decodes what random crops of an image file need: (uint8 pixels, [n, 4] boxes in them,
    extra). `draw(height, width)` draws, for the image's size, the boxes (top, left, height,
    width) and anything else of the views (`extra`, e.g. their flips), in one call. A JPEG's size
    is read from its header and, where the window holding all boxes is under half the image, only
    that window is decoded (libjpeg skips the rest); other formats are decoded whole."""
    def jpeg():
        size = tf.io.extract_jpeg_shape(encoded)
        boxes, extra = draw(size[0], size[1])
        top_left = tf.reduce_min(boxes[:, :2], axis=0)
        bottom_right = tf.reduce_max(boxes[:, :2] + boxes[:, 2:], axis=0)
        window = tf.concat([top_left, bottom_right - top_left], 0)
        # A window decode pays off only where it skips much of the image: a whole photograph
        # decodes faster than a window of most of it (docs/benchmarks.md).
        small = 2 * window[2] * window[3] < size[0] * size[1]
        pixels, origin = tf.cond(
            small, lambda: (tf.io.decode_and_crop_jpeg(encoded, window, channels=3), top_left),
            lambda: (tf.io.decode_jpeg(encoded, channels=3), tf.zeros([2], tf.int32)))
        return pixels, boxes - tf.concat([origin, [0, 0]], 0)[None], extra

    def other():
        pixels = decode_image(encoded)
        shape = tf.shape(pixels)
        return (pixels,) + tuple(draw(shape[0], shape[1]))

    pixels, boxes, extra = tf.cond(tf.strings.substr(encoded, 0, 3) == b'\xff\xd8\xff', jpeg,
                                   other)
    return tf.ensure_shape(pixels, [None, None, 3]), boxes, extra


def image_label_keys(features) -> Optional[tuple[str, str]]:
    """('image', 'label') for a TFDS builder that declares no supervised keys (DTD, SUN397) but
    has an image and a single class label under those names; else None."""
    names = set(features.keys())
    if ({'image', 'label'} <= names and isinstance(features['image'], tfds.features.Image)
            and isinstance(features['label'], tfds.features.ClassLabel)):
        return 'image', 'label'
    return None


@functools.lru_cache(maxsize=16)
def open_source(dataset: str, data_dir: Optional[str]):
    """The source `--dataset` names: an image folder (a directory) or a TFDS builder, checked;
    one object a process."""
    if os.path.isdir(dataset):
        return _FolderSource(dataset)
    if os.path.exists(dataset):
        raise DataError(f'dataset {dataset} is a file, not a directory laid out '
                        '<split>/<class>/<image file> (nor a TFDS name)')
    parent = os.path.dirname(dataset.rstrip('/'))
    if dataset.startswith(('/', '.', '~')) or (parent and os.path.isdir(parent)):
        raise DataError(f'dataset directory {dataset} does not exist')
    return _TfdsSource(dataset, data_dir)


# ---------------------------------------------------------------- undecodable images
# A file can pass the listing's check (signature, end marker) and still fail to decode: garbage in
# its middle, a header that says height 0. Decoding such a file stops a tf.data pipeline, and so
# the run, at the same place on every rerun. `decode_or_replace` decodes each image inside a
# one-element dataset whose errors are ignored; when nothing comes out, a mid-grey stand-in of the
# same size takes its place (the label stays), the file is logged with the reason and counted.
# The element count is unchanged, so batches and resumption stay exact. Exact resumption
# is why the image is replaced rather than dropped: a dropped element would shift every later
# batch by one, differently in a run that resumed past it.
_UNDECODABLE = {'files': set(), 'lock': threading.Lock()}
STAND_IN_SIZE = (32, 32)  # when the source's images have no common size (crops resize it)


def undecodable_count() -> int:
    """Distinct images this process could not decode (and replaced each time they came up)."""
    return len(_UNDECODABLE['files'])


def _report_undecodable(x: tf.Tensor, is_path: bool) -> bool:
    value = x.numpy()
    key = value if is_path else hashlib.sha1(value).hexdigest()
    with _UNDECODABLE['lock']:
        first = key not in _UNDECODABLE['files']
        _UNDECODABLE['files'].add(key)
    if not first:  # logged when first met; every epoch meets it again
        return True
    if is_path:
        what = value.decode(errors='replace')
        try:
            tf.io.decode_image(tf.io.read_file(what), channels=3, expand_animations=False)
            why = 'decoding failed'
        except (tf.errors.OpError, ValueError) as e:
            why = str(e).split('[Op:')[0].split('}}')[-1].strip() or type(e).__name__
    else:
        what, why = f'an encoded image of {len(value)} bytes (sha1 {key[:12]})', 'decoding failed'
    logging.warning('cannot decode %s (%s): replaced by a grey image wherever it comes up, '
                    'training goes on', what, why)
    return True


def decode_or_replace(source, x: tf.Tensor, size: Optional[tuple[int, int]]) -> tf.Tensor:
    """source.decode(x), or (logged and counted) a mid-grey uint8 image if that fails."""
    shape = list(size or STAND_IN_SIZE) + [3]
    return or_replace(source, x, source.decode, lambda: tf.fill(shape, tf.constant(128, tf.uint8)))


def or_replace(source, x: tf.Tensor, decode: Callable, stand_in: Callable) -> Any:
    """decode(x), or (logged and counted) stand_in() of the same structure if decoding fails."""
    is_path = isinstance(source, _FolderSource)

    def replace(x):
        # A file that cannot be read (gone with its folder, no permission) is no bad image: read
        # it again, unguarded, so its NotFound / PermissionDenied error stops the run. (Its bytes
        # go into the call: a read wanted only as a control dependency is pruned by tf.data.)
        inputs = [x, tf.strings.length(tf.io.read_file(x))] if is_path else [x]
        reported = tf.py_function(lambda v, *_: _report_undecodable(v, is_path), inputs, tf.bool)
        with tf.control_dependencies([reported]):
            return tf.nest.map_structure(tf.identity, stand_in())

    one = tf.data.Dataset.from_tensors(x)
    return first_made(one.map(decode), one.map(replace))


def first_made(attempt: tf.data.Dataset, fallback: tf.data.Dataset) -> Any:
    """The element `attempt` makes, or `fallback`'s if making it raised. The one place a failed
    decode is caught: a graph has no try, but a dataset's errors can be ignored."""
    return (attempt.ignore_errors(log_warning=False).concatenate(fallback).take(1)
            .get_single_element())
