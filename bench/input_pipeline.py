"""Input-pipeline throughput: source images/s (two augmented views each) of the pretraining stream,
and in the same run the rate of plain JPEG decoding of the same files, as a reference.

    python bench/input_pipeline.py --data=/tmp/cifar10 \\
        [--extract=../shared/data/cifar10-jpg.tar.gz] [--batch=256] [--windows=5]
    python bench/input_pipeline.py --data=/tmp/imagenet_sample --no-cache --image_size=224 \\
        --batch=64 --steps=30 [--extract=../shared/data/imagenet-sample-250.tar.gz] \\
        [--authors_code=/work/authors_simclr/tf2] [--floor]

Reads the image folder's train split with train_mode pretrain, colour strength 1.0, the
default augmentations, seed 0 (cache_dataset unless --no-cache; with the cache, the first epoch,
which decodes and fills it, is warm-up). Then it alternates timed windows of `--steps` batches
(each on a fresh iterator, after `--window_warmup` untimed ones) of (a) the pretraining stream,
(b) `tf.io.decode_jpeg` of the same files (tf.data, AUTOTUNE map, nothing else; `decode_image`
where a file is not a JPEG) and, with --authors_code, (c) the authors' augmentation (their
`data_util.preprocess_image` twice per image, their shuffle / map / batch / prefetch, files
read and decoded in place of TFDS) and, with --floor, (d) the per-image path's work without its
colour distortion and decode-failure handling (header, crop draw, decode, two flipped bicubic
crops, batch) and (e) TF's kernels alone (header, crop draw, decode, two bicubic resizes, one
pixel a view kept): what a faithful pipeline on TF's kernels must run. Machine load hits all
alike. At 224 px time windows of --steps=30 or more: a fresh iterator starts with work in
flight, which a short window counts. The stream's views are made as the view plan for
`--placement` says (default step: the colour distortion left to the training step, as on an
accelerator; host: the authors' placement); `in_training_step` times the step's share of the
augmentations, without blur, on one of the stream's batches on this CPU: the work moved off
the host. Prints one JSON line: the plan, best and median images/s of each stream, the medians'
ratios, the process's CPU time per wall second and per source image, the command.
"""

import argparse
import json
import os
import resource
import shlex
import statistics
import sys
import tarfile
import time
from typing import Callable

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf  # noqa: E402

from simclr_tf import augment, data, sources, views  # noqa: E402
from simclr_tf.config import Config  # noqa: E402


def decode_only(paths: list, batch: int) -> tuple[tf.data.Dataset, str]:
    """Each file read and decoded to uint8 RGB, nothing else; batches of their shapes."""
    jpeg = all(_head(p) == b'\xff\xd8\xff' for p in paths)
    decode = ((lambda b: tf.io.decode_jpeg(b, channels=3)) if jpeg else
              (lambda b: tf.io.decode_image(b, channels=3, expand_animations=False)))
    return (tf.data.Dataset.from_tensor_slices(paths).repeat()
            .map(lambda p: tf.shape(decode(tf.io.read_file(p))),
                 num_parallel_calls=tf.data.AUTOTUNE)
            .batch(batch).prefetch(tf.data.AUTOTUNE)), 'decode_jpeg' if jpeg else 'decode_image'


def crops_only(paths: list, batch: int, size: int) -> tf.data.Dataset:
    """The per-image path's crops alone: header, both views' boxes, decode, two flipped bicubic
    crops in [0, 1] (augment.finish_views), batched; no colour, no decode-failure catch."""
    return _resized_crops(paths, batch, size, True, lambda crops, flips: augment.finish_views(
        crops, (), None, (), 255.0, flips))


def kernels_only(paths: list, batch: int, size: int) -> tf.data.Dataset:
    """TF's kernels that any faithful pipeline runs, and nothing else: header, both views' boxes,
    decode and two bicubic resizes, of which one pixel a view is kept (nothing is finished,
    concatenated or batched but scalars). The rate no arrangement of the rest can pass."""
    # One pixel of each output keeps the whole resize: the kernel writes all of it.
    return _resized_crops(paths, batch, size, False,
                          lambda crops, _: tf.stack([c[0, 0, 0] for c in crops]))


def _resized_crops(paths: list, batch: int, size: int, flip_coins: bool,
                   out: Callable[[list, tf.Tensor], tf.Tensor]) -> tf.data.Dataset:
    """Endless batches of out(crops, coins) for each file: both views' boxes (and, with
    flip_coins, their flips) drawn from the header's size, the file decoded for them
    (sources.decode_crops) and each box resized to size (bicubic, left in [0, 255])."""
    draw = tf.function(augment.sample_crops, jit_compile=True, autograph=False)
    key = tf.constant([0, 1], tf.int64)

    def one(index, path):
        seed = tf.random.experimental.stateless_fold_in(key, index)
        pixels, boxes, coins = sources.decode_crops(tf.io.read_file(path), lambda h, w: (
            draw(h, w, 2, seed), augment.flip_coins(2, seed) if flip_coins else ()))
        return out([augment.resized_crop(pixels, boxes[v], size, rescale=False)
                    for v in range(2)], coins)

    return (tf.data.Dataset.from_tensor_slices(paths).repeat().enumerate()
            .map(one, num_parallel_calls=tf.data.AUTOTUNE)
            .batch(batch).prefetch(tf.data.AUTOTUNE))


def _head(path: str) -> bytes:
    with open(path, 'rb') as f:
        return f.read(3)


def authors(code_dir: str, paths: list, batch: int, size: int, strength: float
            ) -> tf.data.Dataset:
    """The authors' pretraining input (tf2/data.py's build_input_fn) on files instead of TFDS."""
    sys.path.insert(0, code_dir)
    import data_util  # the authors' module, imported from their tree at run time

    def map_fn(image):
        return tf.concat([data_util.preprocess_image(image, size, size, is_training=True,
                                                     color_jitter_strength=strength)
                          for _ in range(2)], -1)

    options = tf.data.Options()
    options.deterministic = False
    options.experimental_slack = True
    decode = (lambda p: tf.io.decode_image(tf.io.read_file(p), channels=3,
                                           expand_animations=False))
    return (tf.data.Dataset.from_tensor_slices(paths).map(decode, tf.data.AUTOTUNE)
            .with_options(options).shuffle(batch * (50 if size <= 32 else 10)).repeat(-1)
            .map(map_fn, tf.data.AUTOTUNE).batch(batch, drop_remainder=True)
            .prefetch(tf.data.AUTOTUNE))


def _floor(name: str, rates: list, median: dict) -> dict:
    """A floor stream's figures: best and median, and its median over decode-only's and the
    authors'."""
    return {name: {'best': round(max(rates)), 'median': round(median[name])},
            f'{name}_ratio_to_decode_only': round(median[name] / median['decode_only'], 3),
            **({f'{name}_over_authors': round(median[name] / median['authors'], 2)}
               if 'authors' in median else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--data', default='/tmp/cifar10', help='<split>/<class>/<image> folder')
    parser.add_argument('--extract', default=None,
                        help='tar.gz to extract into --data first, if --data does not exist')
    parser.add_argument('--batch', type=int, default=256)
    parser.add_argument('--image_size', type=int, default=32)
    parser.add_argument('--no-cache', dest='cache', action='store_false',
                        help='decode every epoch (cache_dataset=False)')
    parser.add_argument('--color_jitter_strength', type=float, default=1.0)
    parser.add_argument('--steps', type=int, default=100, help='batches per timed window')
    parser.add_argument('--windows', type=int, default=5)
    parser.add_argument('--warmup_steps', type=int, default=0,
                        help='default: one epoch plus 20 batches with the cache, else 4')
    parser.add_argument('--window_warmup', type=int, default=2,
                        help='untimed batches at the start of every window')
    parser.add_argument('--authors_code', default=None,
                        help="the authors' tf2/ directory: also time their pipeline")
    parser.add_argument('--floor', action='store_true',
                        help='also time the crops alone (image folders of mixed sizes)')
    parser.add_argument('--placement', default='step', choices=('auto', 'host', 'step'),
                        help="where the colour distortion runs (run.py's --augment_placement)")
    args = parser.parse_args()

    if args.extract and not os.path.isdir(args.data):
        os.makedirs(args.data)
        with tarfile.open(args.extract) as tar:
            tar.extractall(args.data, filter='data')
        # The sample's archive may hold one top folder: use the folder with the splits.
        entries = os.listdir(args.data)
        if len(entries) == 1 and os.path.isdir(os.path.join(args.data, entries[0], 'train')):
            args.data = os.path.join(args.data, entries[0])
    config = Config(dataset=args.data, train_split='train', cache_dataset=args.cache,
                    image_size=args.image_size, train_batch_size=args.batch,
                    color_jitter_strength=args.color_jitter_strength,
                    train_mode='pretrain', seed=0, use_tpu=False,
                    augment_placement=args.placement).validate()
    info = data.dataset_info(config, need_eval=False)
    paths = [p.decode() for p, _ in sources.open_source(args.data, None).read('train', 1, 0)[0]
             .as_numpy_iterator()]
    plan = data.view_plan(config, True)
    streams = {'pipeline': data.build_dataset(config, is_training=True, plan=plan)}
    reference, reference_name = decode_only(paths, args.batch)
    streams['decode_only'] = reference
    if args.floor:
        streams['crops_only'] = crops_only(paths, args.batch, args.image_size)
        streams['kernels_only'] = kernels_only(paths, args.batch, args.image_size)
    if args.authors_code:
        streams['authors'] = authors(args.authors_code, paths, args.batch, args.image_size,
                                     args.color_jitter_strength)
    # A fresh iterator for every window, dropped after it: a stream left waiting would fill
    # its buffers while another is timed.
    warmup = args.warmup_steps or (info.num_train_examples // args.batch + 20 if args.cache
                                   else 4)
    start = time.perf_counter()
    iterator = iter(streams['pipeline'])  # compiles, and fills the cache
    for _ in range(warmup):
        next(iterator)
    del iterator
    warmup_s = time.perf_counter() - start
    rates = {name: [] for name in streams}
    cpu = {name: [] for name in streams}
    for _ in range(args.windows):
        for name, stream in streams.items():
            iterator = iter(stream)
            for _ in range(args.window_warmup):
                next(iterator)
            start, used = time.perf_counter(), _cpu_s()
            for _ in range(args.steps):
                out = next(iterator)
            wall = time.perf_counter() - start
            del iterator
            rates[name].append(args.steps * args.batch / wall)
            cpu[name].append((_cpu_s() - used) / wall)
            if name == 'pipeline':
                images = out[0]
                shape = images.shape.as_list()
    median = {name: statistics.median(r) for name, r in rates.items()}
    moved = _step_share(config, plan, images)
    print(json.dumps({
        'metric': 'source_images_per_s (two views each)', 'plan': plan.line(),
        'best': round(max(rates['pipeline'])), 'median': round(median['pipeline']),
        'windows': [round(r) for r in rates['pipeline']], 'batch_shape': shape,
        'reference': reference_name,
        'decode_only': {'best': round(max(rates['decode_only'])),
                        'median': round(median['decode_only'])},
        'ratio_to_decode_only': round(median['pipeline'] / median['decode_only'], 3),
        **({'authors': {'best': round(max(rates['authors'])), 'median': round(median['authors'])},
            'ratio_to_authors': round(median['pipeline'] / median['authors'], 2),
            'authors_ratio_to_decode_only': round(median['authors'] / median['decode_only'], 3)}
           if 'authors' in rates else {}),
        **{key: value for name in ('crops_only', 'kernels_only') if name in rates
           for key, value in _floor(name, rates[name], median).items()},
        'cpu_per_wall_s': {name: round(statistics.median(c), 2) for name, c in cpu.items()},
        'cpu_ms_per_image': {name: round(1e3 * statistics.median(c) / median[name], 2)
                             for name, c in cpu.items()},
        **moved,
        'cache': args.cache, 'image_size': args.image_size,
        'warmup_s': round(warmup_s, 1), 'train_examples': info.num_train_examples,
        'cpus': os.cpu_count(), 'load_avg_1min': round(os.getloadavg()[0], 2),
        'command': shlex.join(['python'] + sys.argv)}))


def _step_share(config: Config, plan: views.ViewPlan, images: tf.Tensor) -> dict:
    """What the stream leaves to the training step but blur (the colour distortion, where the
    plan puts it there) timed on one of its batches with the step's compiled program on this
    CPU: the work moved, not removed (on an accelerator it runs there)."""
    if plan.color != 'step':
        return {}
    colour = tf.function(lambda x, seed: views.step_views(
        tf.split(x, 2, axis=-1), plan, config.replace(use_blur=False), seed))
    colour(images, tf.constant([0, 0], tf.int64))  # compiles
    times = []
    for i in range(7):  # the best: the streams' threads may still be winding down (which is
        start = time.perf_counter()  # also why no CPU time: the process's includes theirs)
        colour(images, tf.constant([0, i], tf.int64))[0].numpy()
        times.append(time.perf_counter() - start)
    return {'in_training_step': {'ops': 'color', 'best_ms_per_batch': round(1000 * min(times), 1),
                                 'best_ms_per_source_image': round(1000 * min(times) / len(images),
                                                                   2)}}


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


if __name__ == '__main__':
    main()
