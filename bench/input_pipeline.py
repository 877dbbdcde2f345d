"""Input-pipeline throughput: source images/s (two augmented views each) of the pretraining stream.

    python bench/input_pipeline.py --data=/tmp/cifar10 \
        [--extract=../shared/data/cifar10-jpg.tar.gz] [--batch=256] [--windows=5]

Reads the CIFAR-10 image folder with cache_dataset, image_size 32 and train_mode pretrain; the
first epoch (which decodes and fills the cache) is warm-up. Then it times `--windows` windows of
`--steps` batches and prints one JSON line with the best and median images/s and the command.
"""

import argparse
import json
import os
import shlex
import statistics
import sys
import tarfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from simclr_tf import data  # noqa: E402
from simclr_tf.config import Config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--data', default='/tmp/cifar10', help='<split>/<class>/<image> folder')
    parser.add_argument('--extract', default=None,
                        help='tar.gz to extract into --data first, if --data does not exist')
    parser.add_argument('--batch', type=int, default=256)
    parser.add_argument('--image_size', type=int, default=32)
    parser.add_argument('--steps', type=int, default=100, help='batches per timed window')
    parser.add_argument('--windows', type=int, default=5)
    parser.add_argument('--warmup_steps', type=int, default=0,
                        help='default: one epoch plus 20 batches (fills the cache)')
    args = parser.parse_args()

    if args.extract and not os.path.isdir(args.data):
        os.makedirs(args.data)
        with tarfile.open(args.extract) as tar:
            tar.extractall(args.data, filter='data')
    config = Config(dataset=args.data, train_split='train', cache_dataset=True,
                    image_size=args.image_size, train_batch_size=args.batch,
                    train_mode='pretrain', seed=0, use_tpu=False).validate()
    info = data.dataset_info(config, need_eval=False)
    iterator = iter(data.build_dataset(config, is_training=True))
    warmup = args.warmup_steps or info.num_train_examples // args.batch + 20
    start = time.perf_counter()
    for _ in range(warmup):
        next(iterator)
    warmup_s = time.perf_counter() - start
    rates = []
    for _ in range(args.windows):
        start = time.perf_counter()
        for _ in range(args.steps):
            images, _ = next(iterator)
        rates.append(args.steps * args.batch / (time.perf_counter() - start))
    print(json.dumps({
        'metric': 'source_images_per_s (two views each)',
        'best': round(max(rates)), 'median': round(statistics.median(rates)),
        'windows': [round(r) for r in rates], 'batch_shape': images.shape.as_list(),
        'warmup_s': round(warmup_s, 1), 'train_examples': info.num_train_examples,
        'cpus': os.cpu_count(),
        'command': shlex.join(['python'] + sys.argv)}))


if __name__ == '__main__':
    main()
