"""Offline evaluation of frozen features: kNN (k = 200 and 20) and the linear classifier of record.

    python -m simclr_tf.probe --model=/tmp/simclr/model_dir --dataset=/data/cifar10
    python -m simclr_tf.probe --model=/tmp/simclr/model_dir/saved_model/1000 --dataset=...
    python -m simclr_tf.probe --model=/tmp/simclr/model_dir --random_init ...   # baseline
    python -m simclr_tf.probe --pixels --image_size=32 --dataset=...             # baseline

The features are `--output` (h, `final_avg_pool`, by default) of eval-preprocessed images of
`--train_split` and `--eval_split`, from any network `simclr_tf.encoders` reads (a model_dir or a
`ckpt-N` prefix whose model_dir holds the run's config.json, an export, the authors' checkpoints
and SavedModels), the same architecture randomly initialised, or the raw pixels; the image size is
the network's own. The linear classifier is `simclr_tf.linear`'s (L-BFGS logistic regression, ℓ2
chosen on a class-balanced fifth of the train features held out, then refitted on all of them).
Prints one JSON line; `--out` also writes it to a file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from typing import TYPE_CHECKING, NoReturn, Optional

import numpy as np

from simclr_tf import linear
from simclr_tf.config import Config, ConfigError

if TYPE_CHECKING:
    from simclr_tf import features

# TensorFlow (through data, evaluate and features) is imported inside the functions, so that the
# command imports it only after `logs.setup`, which hides its start-up notices.


def knn_accuracies(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                   test_y: np.ndarray, num_classes: int, temperature: float = 0.1,
                   ks: tuple[int, ...] = (200, 20)) -> dict[str, float]:
    """Weighted cosine kNN top-1 for each k, on the features as they are and mean-centred.

    Centring (subtracting the train features' mean from both sets) matters for features that
    are all positive, such as raw pixels or post-ReLU h: uncentred, every pair of them has a high
    cosine similarity, which blunts the neighbour ranking."""
    from simclr_tf import evaluate
    mean = train_x.mean(0, keepdims=True)
    result = {}
    for name, (train, test) in {'': (train_x, test_x),
                                '_centred': (train_x - mean, test_x - mean)}.items():
        for k in ks:
            predicted = evaluate.knn_classify(train, train_y, test, num_classes, k, temperature)
            result[f'knn{k}{name}_top_1_accuracy'] = float(np.mean(predicted == test_y))
    return result


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                 test_y: np.ndarray, num_classes: int, grid: tuple[float, ...] = linear.PAPER_GRID
                 ) -> dict:
    """`linear.evaluate` with a class-balanced fifth of the train features as validation."""
    fit, held = linear.validation_split(train_y)
    return linear.evaluate((train_x[fit], train_y[fit]), (train_x[held], train_y[held]),
                           (test_x, test_y), num_classes, grid)


def probe(encoder: features.Encoder, config: Config, output: str = 'final_avg_pool',
          grid: tuple[float, ...] = linear.PAPER_GRID) -> dict:
    """kNN and linear accuracies on eval_split of features fitted on train_split."""
    from simclr_tf import data, features
    num_classes = data.dataset_info(config).num_classes
    t0 = time.time()
    train, train_y = features.extract(encoder, config, config.train_split, (output,))
    test, test_y = features.extract(encoder, config, config.eval_split, (output,))
    train_x, test_x = train[output], test[output]
    result = {'num_train_examples': len(train_y), 'num_eval_examples': len(test_y),
              'feature_dim': int(train_x.shape[1]), 'feature_seconds': time.time() - t0}
    result.update(knn_accuracies(train_x, train_y, test_x, test_y, num_classes))
    t0 = time.time()
    fitted = linear_probe(train_x, train_y, test_x, test_y, num_classes, grid)
    result.update({'linear_top_1_accuracy': fitted['top_1_accuracy'],
                   'linear_mean_per_class_accuracy': fitted['mean_per_class_accuracy'],
                   'linear_l2': fitted['l2'],
                   'linear_validation_top_1_accuracy': fitted['validation']['top_1_accuracy'],
                   'linear_grid_size': fitted['grid_size'],
                   'linear_seconds': time.time() - t0})
    return result


def _main(argv: Optional[list[str]] = None) -> None:
    parser = ArgumentParser(prog='python -m simclr_tf.probe',
                            description=__doc__.split('\n')[0])
    parser.add_argument('--model', help='model_dir, checkpoint prefix or export of this project, '
                        "or one of the authors' checkpoints or SavedModels")
    parser.add_argument('--random_init', action='store_true',
                        help="baseline: the model's architecture, randomly initialised")
    parser.add_argument('--pixels', action='store_true', help='baseline: raw pixels as features')
    parser.add_argument('--dataset', help="default: the one the model was trained on")
    parser.add_argument('--data_dir', default=None)
    parser.add_argument('--train_split', default='train')
    parser.add_argument('--eval_split', default='test')
    parser.add_argument('--image_size', type=int,
                        help="default: the model's own (required with --pixels)")
    parser.add_argument('--batch_size', type=int, default=500)
    parser.add_argument('--l2_values', type=int, default=len(linear.PAPER_GRID),
                        help='size of the log-spaced l2 grid from 1e-6 to 1e5 of the linear '
                        "classifier (default 45, the paper's)")
    parser.add_argument('--seed', type=int, default=0, help='of --random_init')
    parser.add_argument('--output', default='final_avg_pool',
                        help='which named output to probe: final_avg_pool (h, default) or '
                             'proj_head_output (z), or any other the model returns')
    parser.add_argument('--out', help='also write the JSON result here')
    args = parser.parse_args(argv)
    if args.pixels == bool(args.model):
        parser.error('give either --model or --pixels')
    if args.pixels and not (args.dataset and args.image_size):
        parser.error('--dataset and --image_size are required with --pixels')
    from simclr_tf import logs  # after parsing: a bad option stops before TensorFlow loads
    logs.setup()  # as quiet as the program (takes effect once TensorFlow is imported after it)
    with cli_errors():
        from simclr_tf import features
        if args.pixels:
            encoder, output = features.pixels(args.image_size), features.PIXELS
        else:
            encoder = features.load(args.model, args.random_init, args.seed)
            output = args.output
        own = encoder.config
        config = features.data_config(encoder, args.dataset or own.dataset,
                                      args.data_dir or own.data_dir, args.batch_size).replace(
            train_split=args.train_split, eval_split=args.eval_split,
            image_size=args.image_size or own.image_size)
        grid = tuple(float(v) for v in np.logspace(-6, 5, args.l2_values))
        measured = probe(encoder, config, output, grid)
    result = {'features': encoder.description, 'output': output, 'dataset': config.dataset,
              'image_size': config.image_size, **measured}
    line = json.dumps(result)
    print(line)
    if args.out:
        with open(args.out, 'w') as f:
            f.write(line + '\n')


class ArgumentParser(argparse.ArgumentParser):
    """The console commands' parser: a bad option ends as the program's do, in one `error:` line
    with status 2 (argparse's own prints its usage block before the line)."""

    def error(self, message: str) -> NoReturn:
        print(f'error: {message} ({self.prog} --help lists the options)', file=sys.stderr)
        sys.exit(2)


@contextlib.contextmanager
def cli_errors():
    """Bad input to a console command: `error: <one line>` and status 2, no traceback."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - bad input in one line, anything else as it is
        from simclr_tf.sources import DataError
        if not isinstance(e, (ConfigError, DataError)):
            raise
        print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    _main()
