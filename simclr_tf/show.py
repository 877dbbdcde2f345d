"""What an encoder learned, as pictures: `simclr-tf-show` (or `python -m simclr_tf.show`).

    simclr-tf-show neighbours --model=/tmp/simclr --dataset=/data/cifar10 --out=neighbours.png
    simclr-tf-show map --model=/tmp/simclr --dataset=/data/cifar10 --out=map.png
    simclr-tf-show projector --model=/tmp/simclr --dataset=/data/cifar10 --logdir=/tmp/proj

`neighbours`: eval images, each with its nearest train images by cosine similarity of h, beside
the same for raw pixels. `map`: t-SNE of h and of z, with their kNN accuracies. `projector`: h
and z of eval images for TensorBoard's Embedding Projector (`tensorboard --logdir=/tmp/proj`).
`--model` is any network the probe reads (a model_dir, a `ckpt-N` prefix, an export, the
authors' checkpoints and SavedModels); `--random_init` its architecture with fresh weights.
"""

from __future__ import annotations

import argparse
from typing import Optional

from simclr_tf import logs
from simclr_tf.probe import ArgumentParser


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('--model', required=True,
                        help="model_dir, checkpoint prefix or export of this project, or one of "
                             "the authors' checkpoints or SavedModels")
    common.add_argument('--random_init', action='store_true',
                        help="baseline: the model's architecture, randomly initialised")
    common.add_argument('--dataset', help='default: the one the model was trained on')
    common.add_argument('--data_dir', default=None)
    common.add_argument('--train_split', default='train')
    common.add_argument('--eval_split', default='test')
    common.add_argument('--batch_size', type=int, default=500)
    common.add_argument('--seed', type=int, default=0,
                        help='of the images picked, the t-SNE and --random_init')
    pixels = argparse.ArgumentParser(add_help=False)
    pixels.add_argument('--pixel_size', type=_positive,
                        help='side of the raw pixels (the baseline and the thumbnails); '
                             "default: the model's image size, at most 64")
    parser = ArgumentParser(prog='simclr-tf-show', description=__doc__.split('\n')[0])
    commands = parser.add_subparsers(dest='command', required=True)
    shown = commands.add_parser('neighbours', parents=[common, pixels],
                                help='nearest train images of eval images: h beside pixels')
    shown.add_argument('--out', default='neighbours.png')
    shown.add_argument('--queries', type=_positive, default=10,
                       help='eval images (class-balanced: one a class for 10 classes)')
    shown.add_argument('--k', type=_positive, default=8, help='neighbours of each')
    shown.add_argument('--scale', type=_positive, default=2, help='pixel magnification')
    shown.add_argument('--centred', action='store_true',
                       help="cosine similarity of the features less the train features' mean "
                            '(as the probe\'s centred kNN)')
    mapped = commands.add_parser('map', parents=[common], help='t-SNE of h and z, with kNN')
    mapped.add_argument('--out', default='map.png')
    mapped.add_argument('--examples', type=_positive, default=2000,
                        help='eval images mapped (class-balanced)')
    mapped.add_argument('--perplexity', type=float, default=30.0)
    mapped.add_argument('--knn_k', type=_positive, default=200)
    projected = commands.add_parser('projector', parents=[common, pixels],
                                    help="files for TensorBoard's Embedding Projector")
    projected.add_argument('--logdir', required=True, help='a new directory')
    projected.add_argument('--examples', type=_positive, default=1000,
                           help='eval images (class-balanced)')
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'{text} is not a positive integer')
    return value


def main(argv: Optional[list[str]] = None) -> None:
    args = _parser().parse_args(argv)
    logs.setup()  # before TensorFlow is imported: no start-up notices
    from simclr_tf import embeddings, features, probe
    with probe.cli_errors():
        encoder = features.load(args.model, args.random_init, args.seed)
        config = features.data_config(
            encoder, args.dataset or encoder.config.dataset,
            args.data_dir or encoder.config.data_dir, args.batch_size).replace(
            train_split=args.train_split, eval_split=args.eval_split)
        if args.command == 'neighbours':
            line = embeddings.neighbours(encoder, config, args.out, args.queries, args.k,
                                         args.seed, args.pixel_size, args.scale, args.centred)
        elif args.command == 'map':
            line = embeddings.tsne_map(encoder, config, args.out, args.examples,
                                       args.perplexity, args.seed, args.knn_k)
        else:
            line = embeddings.projector(encoder, config, args.logdir, args.examples, args.seed,
                                        args.pixel_size)
    print(line)


if __name__ == '__main__':
    main()
