"""Input pipelines: shapes, splits, seeded and resumable streams, replicas, bad input."""

import logging
import os
import re
import shutil

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from simclr_tf import data, sources
from simclr_tf.config import Config

B = 8  # per-replica batch everywhere: the compiled augmentations are built once per shape


@pytest.fixture(scope='module')
def config(sample_dir) -> Config:
    return Config(dataset=sample_dir, train_split='train', eval_split='test', image_size=32,
                  train_batch_size=B, eval_batch_size=B, seed=3, use_tpu=False)


def batches(dataset: tf.data.Dataset, n: int) -> list[np.ndarray]:
    return [images.numpy() for images, _ in dataset.take(n)]


def test_dataset_info_and_split_slicing(config):
    info = data.dataset_info(config)
    assert info == data.DatasetInfo(10, 1000, 200, ('airplane', 'automobile', 'bird', 'cat',
                                                    'deer', 'dog', 'frog', 'horse', 'ship',
                                                    'truck'))
    for split, n in (('train[:10%]', 100), ('train[10:20]', 10), ('train[-5%:]', 50),
                     ('train[:1%]+test[:1%]', 12)):
        assert data.dataset_info(config.replace(train_split=split), need_eval=False
                                 ).num_train_examples == n
    # A slice samples every class, not the first files of the first class.
    labels = [int(y) for _, y in data.examples(config, 'train[:5%]')]
    assert len(set(labels)) == 10


def test_pretraining_batches(config):
    images, labels = next(iter(data.build_dataset(config.replace(cache_dataset=True), True)))
    assert images.shape == (B, 32, 32, 6) and images.dtype == tf.float32
    assert 0 <= float(tf.reduce_min(images)) and float(tf.reduce_max(images)) <= 1
    assert labels.shape == (B, 10) and labels.dtype == tf.float32
    np.testing.assert_array_equal(tf.reduce_sum(labels, 1), 1)
    first, second = np.split(images.numpy(), 2, axis=-1)
    assert np.abs(first - second).mean(axis=(1, 2, 3)).min() > 0.01  # two different views


def test_finetune_and_eval_batches(config):
    images, _ = next(iter(data.build_dataset(config.replace(train_mode='finetune'), True)))
    assert images.shape == (B, 32, 32, 3)
    evaluation = data.build_dataset(config.replace(eval_batch_size=48), False)
    sizes = [int(images.shape[0]) for images, _ in evaluation]
    assert sizes == [48] * 4 + [8]  # one pass, last batch kept
    first = next(iter(evaluation))[0].numpy()
    np.testing.assert_array_equal(first, next(iter(evaluation))[0].numpy())  # no shuffling
    image = next(iter(data.examples(config, 'test')))[0]
    np.testing.assert_allclose(first[0], image.numpy() / 255, atol=1e-6)  # CIFAR: as is


def test_a_seed_fixes_the_stream_and_a_resumed_stream_continues_it(config):
    small = config.replace(train_split='train[:10%]')  # 100 images: an epoch is 12.5 batches
    stream = batches(data.build_dataset(small, True), 16)
    tf.random.set_seed(1234)  # TF's global seed plays no part
    resumed = batches(data.build_dataset(small, True, start_step=13), 3)
    for k in range(3):  # across the first epoch boundary
        np.testing.assert_array_equal(resumed[k], stream[13 + k])
    other = batches(data.build_dataset(small.replace(seed=4), True), 1)
    assert not np.allclose(other[0], stream[0])


def _epochs(cfg: Config, n: int, start_step: int = 0, epochs: int = 2) -> list[list[bytes]]:
    """The examples of whole epochs of n examples as the stream yields them (one view each,
    made by the deterministic Sobel op, so equal bytes are the same example)."""
    steps = epochs * n // B - start_step
    rows = [row.tobytes() for batch in batches(data.build_dataset(cfg, True, start_step=start_step),
                                               steps) for row in batch]
    return [rows[k:k + n] for k in range(0, len(rows), n)]


def test_every_epoch_is_a_fresh_permutation_of_a_folder_and_resumes_exactly(config):
    cfg = config.replace(train_split='train[:4%]', augmentations='sobel')  # 40: 5 batches
    first, second = _epochs(cfg, 40)
    assert sorted(first) == sorted(second) and len(set(first)) == 40
    assert first != second
    # A full permutation, not a window: epoch 2's first batch comes from all over epoch 1.
    positions = sorted(first.index(x) for x in second[:B])
    assert positions[-1] - positions[0] > 2 * B
    np.testing.assert_array_equal(_epochs(cfg, 40, start_step=3, epochs=2)[0][:B],
                                  (first + second)[3 * B:4 * B])


def test_two_replicas_partition_the_global_batch(config, two_replicas):
    global_batch = config.replace(train_batch_size=2 * B, eval_batch_size=2 * B,
                                  train_split='train[:20%]')
    context = tf.distribute.InputContext(num_input_pipelines=1, input_pipeline_id=0,
                                         num_replicas_in_sync=2)
    single = {}
    for training in (True, False):
        single[training] = batches(data.build_dataset(global_batch, training, context), 4)
        distributed = data.build_distributed_dataset(two_replicas, global_batch, training)
        iterator = iter(distributed)
        for step in range(2):
            images, _ = next(iterator)
            rows = [two_replicas.experimental_local_results(images)[r].numpy() for r in (0, 1)]
            assert rows[0].shape[0] == rows[1].shape[0] == B
            # Replica r's batch is the pipeline's batch 2 step + r: together, the global batch.
            np.testing.assert_array_equal(np.concatenate(rows),
                                          np.concatenate(single[training][2 * step:2 * step + 2]))
            flat = np.concatenate(rows).reshape(2 * B, -1)
            assert len(np.unique(flat, axis=0)) == 2 * B  # no image twice
    _assert_pipelines_split_the_examples(config, 200)
    # Resuming with two replicas skips two per-replica batches per step.
    resumed = data.build_distributed_dataset(two_replicas, global_batch, True, start_step=1)
    images, _ = next(iter(resumed))
    np.testing.assert_array_equal(two_replicas.experimental_local_results(images)[0].numpy(),
                                  single[True][2])


# ---------------------------------------------------------------- bad input
def _folder(root, split='train', classes=('a', 'b'), per_class=3, source=None) -> str:
    for c in classes:
        os.makedirs(os.path.join(root, split, c), exist_ok=True)
        for i in range(per_class):
            shutil.copy(source, os.path.join(root, split, c, f'{i}.jpg'))
    return str(root)


@pytest.fixture()
def jpeg(sample_dir) -> str:
    return os.path.join(sample_dir, 'train', 'cat', '0000.jpg')


def test_missing_directory_and_split(config, tmp_path, jpeg):
    with pytest.raises(data.DataError, match=r'directory .*no_such_dir does not exist'):
        data.dataset_info(config.replace(dataset=str(tmp_path / 'no_such_dir')))
    root = _folder(tmp_path / 'ds', source=jpeg)
    with pytest.raises(data.DataError, match=r"split 'test' not found in image folder .*ds; "
                                             r'it has: train'):
        data.dataset_info(config.replace(dataset=root))
    assert data.dataset_info(config.replace(dataset=root), need_eval=False).num_eval_examples \
        is None
    with pytest.raises(data.DataError, match='cannot parse'):
        data.dataset_info(config.replace(dataset=root, train_split='train[::2]'), False)


def test_empty_class_folder_and_no_images(config, tmp_path, jpeg):
    root = _folder(tmp_path / 'ds', source=jpeg)
    os.makedirs(tmp_path / 'ds' / 'train' / 'c')
    with pytest.raises(data.DataError, match=r'class folder .*train/c has no images'):
        data.dataset_info(config.replace(dataset=root), need_eval=False)
    os.makedirs(tmp_path / 'empty' / 'train')
    with pytest.raises(data.DataError, match=r'no images in .*empty/train'):
        data.dataset_info(config.replace(dataset=str(tmp_path / 'empty')), need_eval=False)
    os.makedirs(tmp_path / 'bare')
    with pytest.raises(data.DataError, match=r'no images in .*bare: expected split folders'):
        data.dataset_info(config.replace(dataset=str(tmp_path / 'bare')), need_eval=False)


def test_corrupt_and_non_image_files_are_skipped_counted_and_logged(config, tmp_path, jpeg,
                                                                      caplog):
    root = _folder(tmp_path / 'ds', source=jpeg)
    bad = {tmp_path / 'ds' / 'train' / 'a' / 'text.jpg': b'not an image',
           tmp_path / 'ds' / 'train' / 'a' / 'cut.jpg': open(jpeg, 'rb').read()[:300],
           tmp_path / 'ds' / 'train' / 'b' / 'empty.png': b'',
           tmp_path / 'ds' / 'train' / 'b' / 'notes.txt': b'hello'}
    for path, content in bad.items():
        path.write_bytes(content)
    with caplog.at_level(logging.WARNING):
        info = data.dataset_info(config.replace(dataset=root), need_eval=False)
    assert info.num_train_examples == 6
    for path in bad:
        assert str(path) in caplog.text
    assert re.search(r'skipped 4 entries of .*/train that are not readable images '
                     r'\(1 non-image name, 3 unreadable\); using 6 images', caplog.text)
    assert 'truncated JPEG' in caplog.text
    images, _ = next(iter(data.build_dataset(config.replace(dataset=root), True)))
    assert images.shape == (B, 32, 32, 6)  # the run goes on


def test_dangling_links_and_folders_in_a_class_folder_are_named_and_counted(config, tmp_path,
                                                                            jpeg, caplog):
    """Not dropped without a word: each is named with its reason and counted; a link to an
    image is an image."""
    root = _folder(tmp_path / 'ds', source=jpeg)
    a = tmp_path / 'ds' / 'train' / 'a'
    (a / 'gone.jpg').symlink_to(tmp_path / 'moved.jpg')
    (a / 'loop.jpg').symlink_to(a / 'loop.jpg')
    (a / 'linked.jpg').symlink_to(jpeg)
    os.makedirs(a / 'more')
    shutil.copy(jpeg, a / 'more' / 'deeper.jpg')
    with caplog.at_level(logging.WARNING):
        info = data.dataset_info(config.replace(dataset=root), need_eval=False)
    assert info.num_train_examples == 7  # 3 + 3 copies and the working link
    named = {line.split(': ', 1)[0].split('skipping ')[-1]: line.split(': ', 1)[1]
             for line in caplog.messages if line.startswith('skipping ')}
    assert named == {
        str(a / 'gone.jpg'): f'dangling symbolic link (its target {tmp_path}/moved.jpg does '
                             'not exist)',
        str(a / 'loop.jpg'): 'cannot be read (Too many levels of symbolic links)',
        str(a / 'more'): 'a folder inside a class folder (its files are not read)'}
    assert re.search(r'skipped 3 entries of .*/train that are not readable images '
                     r'\(1 dangling link, 1 unreadable, 1 folder\); using 7 images', caplog.text)


def test_grey_rgba_and_odd_sizes_are_converted(config, tmp_path, jpeg, monkeypatch):
    rgb = np.asarray(Image.open(jpeg))
    root = tmp_path / 'ds'
    for split in ('train', 'test'):
        os.makedirs(root / split / 'x')
        os.makedirs(root / split / 'y')
        Image.fromarray(rgb).convert('L').save(root / split / 'x' / 'grey.png')
        Image.fromarray(rgb).convert('RGBA').save(root / split / 'x' / 'rgba.png')
        Image.fromarray(rgb).resize((45, 27)).save(root / split / 'y' / 'odd.jpg')
        Image.fromarray(rgb).resize((40, 30)).convert('CMYK').save(root / split / 'y' / 'cmyk.jpg')
        Image.fromarray(rgb).resize((36, 48)).convert('L').save(root / split / 'x' / 'grey.jpg')
        Image.fromarray(rgb).save(root / split / 'y' / 'rgb.jpg')
    cfg = config.replace(dataset=str(root))
    for training in (True, False):
        images, _ = next(iter(data.build_dataset(cfg, training)))
        assert images.shape == ((B, 32, 32, 6) if training else (6, 32, 32, 3))
    grey = next(iter(data.examples(cfg, 'test')))  # decoded as RGB
    assert grey[0].shape[-1] == 3
    # A folder taken for one size (from a sample of headers) resizes a stray odd image.
    monkeypatch.setattr(sources, '_SIZE_SAMPLE', 1)
    sources.open_source.cache_clear()
    images, _ = next(iter(data.build_dataset(cfg.replace(cache_dataset=True), False)))
    assert images.shape == (6, 32, 32, 3)  # the split's 6 images


def test_tfds_errors(config, tmp_path):
    with pytest.raises(data.DataError, match=r"TFDS dataset 'cifar10' is not prepared: nothing "
                                             rf'found in {tmp_path}'):
        data.dataset_info(config.replace(dataset='cifar10', data_dir=str(tmp_path)))
    with pytest.raises(data.DataError, match="'no_such_dataset_xyz' is neither a directory nor"):
        data.dataset_info(config.replace(dataset='no_such_dataset_xyz'))


class TinyGreyImages(tfds.core.GeneratorBasedBuilder):
    """12x12 grey images of 3 classes, made here: a real TFDS dataset without a download."""
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(12, 12, 1)),
                'label': tfds.features.ClassLabel(names=['p', 'q', 'r'])}),
            supervised_keys=('image', 'label'))

    def _split_generators(self, dl_manager):
        return {'train': self._generate_examples(40), 'test': self._generate_examples(10)}

    def _generate_examples(self, n):
        rng = np.random.default_rng(n)
        for i in range(n):
            yield i, {'image': rng.integers(0, 255, (12, 12, 1), np.uint8), 'label': i % 3}


def test_a_tfds_dataset(config, tmp_path):
    TinyGreyImages(data_dir=str(tmp_path)).download_and_prepare(
        download_config=tfds.download.DownloadConfig(num_shards=4))
    cfg = config.replace(dataset='tiny_grey_images', data_dir=str(tmp_path), train_split='train')
    assert data.dataset_info(cfg) == data.DatasetInfo(3, 40, 10, ('p', 'q', 'r'))
    half = data.dataset_info(cfg.replace(train_split='train[:50%]'), need_eval=False)
    assert half.num_train_examples == 20
    with pytest.raises(data.DataError, match=r"split 'validation' not usable .* it has: test, "
                                             'train'):
        data.dataset_info(cfg.replace(eval_split='validation'))
    images, labels = next(iter(data.build_dataset(cfg, True)))
    assert images.shape == (B, 32, 32, 6) and labels.shape == (B, 3)
    first, second = np.split(images.numpy(), 2, axis=-1)
    assert np.all(first[..., :1] == first)  # grey source, grey views
    sizes = [int(x.shape[0]) for x, _ in data.build_dataset(cfg, False)]
    assert sizes == [8, 2]
    _assert_pipelines_split_the_examples(cfg, 10)
    # Each epoch reads the 4 files in a fresh order, seeded: resumption sees the same batches.
    ordered = cfg.replace(augmentations='sobel')
    first, second = _epochs(ordered, 40)
    assert sorted(first) == sorted(second) and len(set(first)) == 40 and first != second
    resumed = [row.tobytes() for batch in batches(
        data.build_dataset(ordered, True, start_step=6), 2) for row in batch]
    assert resumed == second[8:24]
    # The natural order (eval) is the split's, as TFDS reads it.
    ours = [x.numpy().tobytes() for x, _ in data.examples(cfg, 'train')]
    theirs = [np.repeat(x.numpy(), 3, axis=-1).tobytes() for x, _ in tfds.load(
        'tiny_grey_images', data_dir=str(tmp_path), split='train', as_supervised=True)]
    assert ours == theirs
    # The held-out parts: a fifth of each class, as the folder's, read through the masks.
    from simclr_tf import linear
    labels = np.array([y for _, y in theirs_labels(tmp_path)])
    fit, held = linear.validation_split(labels)
    held_cfg = cfg.replace(eval_split='train[validation]', train_split='train[fit]')
    assert data.dataset_info(held_cfg) == data.DatasetInfo(3, len(fit), len(held), ('p', 'q', 'r'))
    read = [x.numpy().tobytes() for x, _ in data.examples(cfg, 'train[validation]')]
    assert read == [ours[i] for i in held]
    with pytest.raises(data.DataError, match=r'take a whole TFDS split'):
        data.dataset_info(cfg.replace(eval_split='train[validation]+test'))


def theirs_labels(data_dir):
    return tfds.as_numpy(tfds.load('tiny_grey_images', data_dir=str(data_dir), split='train',
                                   as_supervised=True))


def _assert_pipelines_split_the_examples(cfg: Config, total: int):
    """Two input pipelines (workers) read disjoint shards that together make the split."""
    rows = []
    for pipeline in (0, 1):
        context = tf.distribute.InputContext(2, pipeline, 2)
        rows += [x.numpy().reshape(x.shape[0], -1) for x, _ in
                 data.build_dataset(cfg.replace(eval_batch_size=2 * B), False, context)]
    rows = np.concatenate(rows)
    assert len(rows) == total and len(np.unique(rows, axis=0)) == total


def test_a_quarter_turn_before_the_crop_of_non_square_images(config, tmp_path, jpeg):
    wide = tmp_path / 'wide.jpg'
    Image.open(jpeg).resize((40, 24)).save(wide)
    root = _folder(tmp_path / 'ds', source=wide)
    cfg = config.replace(dataset=root, augmentations='rotate,crop,color')
    images, _ = next(iter(data.build_dataset(cfg, True)))
    assert images.shape == (B, 32, 32, 6)


@pytest.mark.parametrize('boxes', [[[10, 20, 40, 50], [30, 5, 20, 60]],  # window < half: cut
                                   [[0, 0, 120, 150], [100, 100, 80, 90]]])  # whole decode
def test_crops_decoded_from_a_jpeg_window_are_the_crops_of_the_whole_image(jpeg, tmp_path,
                                                                            boxes):
    path = tmp_path / 'big.jpg'
    Image.open(jpeg).resize((200, 180)).save(path, quality=95)
    encoded = tf.io.read_file(str(path))
    whole = sources.decode_image(encoded).numpy().astype(int)
    asked = []

    def draw(height, width):
        asked.append((int(height), int(width)))
        return tf.constant(boxes), tf.constant([True, False])

    pixels, shifted, extra = sources.decode_crops(encoded, draw)
    np.testing.assert_array_equal(extra, [True, False])  # what draw drew besides the boxes
    assert asked == [(180, 200)]  # from the header
    for (t, left, h, w), (t2, l2, h2, w2) in zip(boxes, shifted.numpy()):
        assert (h2, w2) == (h, w)
        cut = pixels.numpy()[t2:t2 + h, l2:l2 + w].astype(int)
        assert np.abs(cut - whole[t:t + h, left:left + w]).max() <= 3  # libjpeg's edge upsampling
    png = tmp_path / 'big.png'
    Image.open(path).save(png)
    pixels, same, _ = sources.decode_crops(tf.io.read_file(str(png)), draw)
    np.testing.assert_array_equal(same, boxes)
    assert pixels.shape == (180, 200, 3)


@pytest.mark.parametrize('mixed', [False, True])
def test_the_stream_leaves_a_trailing_colour_distortion_to_the_step(config, mixed_folder,
                                                                    mixed):
    # Each op draws from its name's seed, so the views the step is to colour are exactly the
    # crop + flip views; colour elsewhere in the list, or placed on the host, stays in the stream.
    cfg = config.replace(color_jitter_strength=1.0, augment_placement='step')
    if mixed:
        cfg = cfg.replace(dataset=mixed_folder)
    default = batches(data.build_dataset(cfg, True), 2)
    plain = batches(data.build_dataset(cfg.replace(augmentations='crop,flip'), True), 2)
    for a, b in zip(default, plain):
        np.testing.assert_array_equal(a, b)
    for other in (cfg.replace(augmentations='crop,color,flip', augment_placement='auto'),
                  cfg.replace(augment_placement='host')):
        coloured = batches(data.build_dataset(other, True), 1)
        assert np.abs(coloured[0] - plain[0]).max() > 0.1


def test_one_undecodable_image_of_a_batch_leaves_the_others_as_they_were(config, mixed_folder,
                                                                          caplog):
    # The batch is made again with each decode caught: the other images are the same views.
    # (Colour in the step, so the stand-in's views in the stream are its grey.)
    root = mixed_folder
    cfg = config.replace(dataset=root, augment_placement='step')
    good = batches(data.build_dataset(cfg, True), 1)[0]
    bad = os.path.join(root, 'train', 'c0', '04.jpg')
    with open(bad, 'r+b') as f:  # a header that says height 0 (passes the listing's check)
        b = bytearray(f.read())
        sof = b.find(b'\xff\xc0')
        b[sof + 5:sof + 7] = b'\x00\x00'
        f.seek(0)
        f.write(b)
    with caplog.at_level(logging.WARNING):
        replaced = batches(data.build_dataset(cfg, True), 1)[0]
    changed = [i for i in range(B) if not np.array_equal(good[i], replaced[i])]
    assert len(changed) == 1 and f'cannot decode {bad}' in caplog.text
    assert np.allclose(replaced[changed[0]], 128 / 255, atol=1e-6)  # the grey stand-in


@pytest.mark.parametrize('kind', ['folder', 'tfds'])
def test_distillation_reads_every_example_with_labels_only_in_the_subset(config, tmp_path, kind):
    """train_mode=distill streams the whole train split; outside the label_fraction subset a
    label is a zero one-hot row. The kNN bank and the sizes keep to the subset's labels."""
    cfg = config.replace(train_mode='distill', teacher='t', label_fraction=0.25, label_seed=1,
                         train_batch_size=10)
    if kind == 'tfds':
        TinyGreyImages(data_dir=str(tmp_path)).download_and_prepare(
            download_config=tfds.download.DownloadConfig(num_shards=4))
        cfg = cfg.replace(dataset='tiny_grey_images', data_dir=str(tmp_path))
    source = sources.open_source(cfg.dataset, cfg.data_dir)
    n, labels = source.num_examples('train'), source.labels('train')
    subset = data.balanced_subset(labels, 0.25, 1)
    assert data.dataset_info(cfg, need_eval=False).num_train_examples == n
    rows = np.concatenate([y.numpy() for _, y in data.build_dataset(
        cfg.replace(augmentations='sobel'), True).take(n // 10)])  # one epoch
    assert rows.shape == (n, source.num_classes)
    assert rows.sum() == len(subset) and set(rows.sum(1)) == {0.0, 1.0}
    assert sorted(rows.argmax(1)[rows.sum(1) > 0]) == sorted(labels[subset])
    bank = np.concatenate([y.numpy() for _, y in data.build_dataset(
        cfg.replace(eval_split='train'), False, labelled_only=True)])
    assert len(bank) == len(subset) and bank.sum() == len(subset)


def test_held_out_parts_of_a_folder_split_are_the_linear_protocols_validation(sample_dir):
    from simclr_tf import linear, sources
    source = sources.open_source(sample_dir, None)
    labels = source.labels('train')
    fit, held = linear.validation_split(labels)
    np.testing.assert_array_equal(source.labels('train[validation]'), labels[held])
    np.testing.assert_array_equal(source.labels('train[fit]'), labels[fit])
    assert source.num_examples('train[validation]') == 200  # a fifth of each class of 100
    assert np.all(np.bincount(source.labels('train[validation]')) == 20)
    paths = lambda split: {p.numpy() for p, _ in source.read(split, 1, 0)[0]}  # noqa: E731
    assert not paths('train[fit]') & paths('train[validation]')
    assert paths('train[fit]') | paths('train[validation]') == paths('train')
    with pytest.raises(sources.DataError, match=r"cannot parse 'train\[heldout\]'"):
        source.num_examples('train[heldout]')
