"""Offline evaluation of frozen features: kNN (k = 200 and 20) and a linear classifier.

    python -m simclr_tf.probe --model=/tmp/simclr/model_dir --dataset=/data/cifar10
    python -m simclr_tf.probe --model=/tmp/simclr/model_dir/saved_model/1000 --dataset=... \\
        --image_size=32
    python -m simclr_tf.probe --model=/tmp/simclr/model_dir --random_init ...   # baseline
    python -m simclr_tf.probe --pixels --image_size=32 --dataset=...             # baseline

The features are `final_avg_pool` (h) of eval-preprocessed images of `--train_split` and
`--eval_split`, from a training checkpoint (a model_dir or a `ckpt-N` prefix, whose model_dir
holds the run's config.json), a SavedModel export, the same architecture randomly initialised,
or the raw pixels. Prints one JSON line; `--out` also writes it to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Callable, Optional

import numpy as np
import tensorflow as tf

from simclr_tf import data, evaluate
from simclr_tf.config import Config, ConfigError

FeatureFn = Callable[[tf.Tensor], tf.Tensor]


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                 test_y: np.ndarray, num_classes: int, epochs: int = 100, batch_size: int = 1024,
                 weight_decays: tuple[float, ...] = (0.0, 1e-4, 1e-3, 1e-2), seed: int = 0,
                 min_steps: int = 1000) -> dict[str, float]:
    """Multinomial logistic regression on standardised frozen features (Adam, cosine decay).

    The L2 weight decay is chosen on a held-out 10 % of the training features, then the
    classifier is refitted on all of them. Small sets train for more epochs, so that every fit
    takes at least `min_steps` steps. Returns test top-1 and the chosen weight decay.
    """
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    order = np.random.default_rng(seed).permutation(len(train_x))
    held, fit = order[:len(order) // 10], order[len(order) // 10:]
    epochs = max(epochs, -(-min_steps // max(len(fit) // batch_size, 1)))
    scores = {wd: _accuracy(_fit_softmax(train_x[fit], train_y[fit], num_classes, epochs,
                                         batch_size, wd, seed), train_x[held], train_y[held])
              for wd in weight_decays}
    best = max(weight_decays, key=lambda wd: (scores[wd], -wd))
    weights = _fit_softmax(train_x, train_y, num_classes, epochs, batch_size, best, seed)
    return {'top_1_accuracy': _accuracy(weights, test_x, test_y), 'weight_decay': best,
            'held_out_accuracy': scores[best]}


def _fit_softmax(x: np.ndarray, y: np.ndarray, num_classes: int, epochs: int, batch_size: int,
                 weight_decay: float, seed: int) -> tuple[tf.Variable, tf.Variable]:
    tf.random.set_seed(seed)
    x, y = tf.constant(x, tf.float32), tf.constant(y, tf.int64)
    n, dim = x.shape
    w = tf.Variable(tf.zeros([dim, num_classes]))
    b = tf.Variable(tf.zeros([num_classes]))
    steps_per_epoch = max(n // batch_size, 1)
    schedule = tf.keras.optimizers.schedules.CosineDecay(1e-3, epochs * steps_per_epoch)
    optimizer = tf.keras.optimizers.Adam(schedule)

    @tf.function
    def fit() -> None:  # every epoch in one call: no Python per step
        for _ in tf.range(epochs):
            order = tf.random.shuffle(tf.range(n))
            for i in tf.range(steps_per_epoch):
                idx = order[i * batch_size:(i + 1) * batch_size]
                with tf.GradientTape() as tape:
                    logits = tf.matmul(tf.gather(x, idx), w) + b
                    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                        tf.gather(y, idx), logits)) + weight_decay * tf.reduce_sum(tf.square(w))
                optimizer.apply_gradients(zip(tape.gradient(loss, [w, b]), [w, b]))

    fit()
    return w, b


def _accuracy(weights: tuple[tf.Variable, tf.Variable], x: np.ndarray, y: np.ndarray) -> float:
    w, b = weights
    predicted = tf.argmax(tf.matmul(tf.constant(x, tf.float32), w) + b, axis=1).numpy()
    return float(np.mean(predicted == y))


def knn_accuracies(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                   test_y: np.ndarray, num_classes: int, temperature: float = 0.1,
                   ks: tuple[int, ...] = (200, 20)) -> dict[str, float]:
    """Weighted cosine kNN top-1 for each k, on the features as they are and mean-centred.

    Centring (subtracting the train features' mean from both sets) matters for features that
    are all positive, such as raw pixels or post-ReLU h: uncentred, every pair of them has a high
    cosine similarity, which blunts the neighbour ranking."""
    mean = train_x.mean(0, keepdims=True)
    result = {}
    for name, (train, test) in {'': (train_x, test_x),
                                '_centred': (train_x - mean, test_x - mean)}.items():
        for k in ks:
            predicted = evaluate.knn_classify(train, train_y, test, num_classes, k, temperature)
            result[f'knn{k}{name}_top_1_accuracy'] = float(np.mean(predicted == test_y))
    return result


# ---------------------------------------------------------------- feature sources
def checkpoint_features(path: str, random_init: bool = False, seed: int = 0,
                        output: str = 'final_avg_pool') -> tuple[FeatureFn, Config]:
    """`output` (h by default) of a training checkpoint (model_dir or prefix) and the run's
    config; with `random_init` the same architecture with fresh weights instead."""
    from simclr_tf import checkpoint
    from simclr_tf.model import build_model
    prefix = checkpoint.resolve_checkpoint(path)
    config_path = os.path.join(os.path.dirname(prefix), 'config.json')
    if not tf.io.gfile.exists(config_path):
        raise ConfigError(f'{config_path} not found: --model must be a model_dir written by '
                          'run.py (or a checkpoint in one), or a SavedModel')
    with tf.io.gfile.GFile(config_path) as f:
        config = Config.from_dict(json.load(f))
    tf.keras.utils.set_random_seed(seed)
    info = data.dataset_info(config, need_eval=False)
    model = build_model(config, info.num_classes)
    if not random_init:
        tf.train.Checkpoint(model=model).restore(prefix).expect_partial()
    return tf.function(lambda x: _output(model(x, training=False), output)), config


def saved_model_features(path: str, output: str = 'final_avg_pool') -> FeatureFn:
    """`output` (h by default) of an export (`saved_model/<step>`), loaded with TensorFlow alone."""
    from simclr_tf.export import load_saved_model
    module = load_saved_model(path)
    return tf.function(lambda x: _output(module(x, trainable=False), output))


def _output(outputs: dict, name: str) -> tf.Tensor:
    if name not in outputs:
        raise ConfigError(f'--output={name!r}: the model has no such output; it has '
                          f'{", ".join(sorted(outputs))}')
    return outputs[name]


def pixel_features(images: tf.Tensor) -> tf.Tensor:
    return tf.reshape(images, [tf.shape(images)[0], -1])


def features(fn: FeatureFn, config: Config, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(features, integer labels) of every example of `split`, eval preprocessing."""
    dataset = data.build_dataset(config.replace(eval_split=split), is_training=False)
    xs, ys = [], []
    for images, labels in dataset:
        xs.append(fn(images).numpy())
        ys.append(np.argmax(labels.numpy(), 1))
    if not xs:
        raise data.DataError(f'split {split!r} of {config.dataset!r} has no examples')
    return np.concatenate(xs), np.concatenate(ys)


def probe(fn: FeatureFn, config: Config, linear_epochs: int = 100, linear_min_steps: int = 1000
          ) -> dict[str, float]:
    """kNN and linear top-1 on eval_split of features fitted on train_split."""
    info = data.dataset_info(config)
    t0 = time.time()
    train_x, train_y = features(fn, config, config.train_split)
    test_x, test_y = features(fn, config, config.eval_split)
    result = {'num_train_examples': len(train_y), 'num_eval_examples': len(test_y),
              'feature_dim': int(train_x.shape[1]), 'feature_seconds': time.time() - t0}
    result.update(knn_accuracies(train_x, train_y, test_x, test_y, info.num_classes))
    linear = linear_probe(train_x, train_y, test_x, test_y, info.num_classes, linear_epochs,
                          min_steps=linear_min_steps)
    result.update({f'linear_{k}': v for k, v in linear.items()})
    return result


def _main(argv: Optional[list[str]] = None) -> None:
    from simclr_tf import logs
    logs.setup()  # as quiet as the program (takes effect once TensorFlow is imported after it)
    parser = argparse.ArgumentParser(prog='python -m simclr_tf.probe',
                                     description=__doc__.split('\n')[0])
    parser.add_argument('--model', help='model_dir, checkpoint prefix or SavedModel directory')
    parser.add_argument('--random_init', action='store_true',
                        help="baseline: the checkpoint's architecture, randomly initialised")
    parser.add_argument('--pixels', action='store_true', help='baseline: raw pixels as features')
    parser.add_argument('--dataset', help="default: the checkpoint's")
    parser.add_argument('--data_dir', default=None)
    parser.add_argument('--train_split', default='train')
    parser.add_argument('--eval_split', default='test')
    parser.add_argument('--image_size', type=int, help="default: the checkpoint's")
    parser.add_argument('--batch_size', type=int, default=500)
    parser.add_argument('--linear_epochs', type=int, default=100)
    parser.add_argument('--linear_min_steps', type=int, default=1000,
                        help='more epochs on small sets, so that each fit has this many steps')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--output', default='final_avg_pool',
                        help='which named output to probe: final_avg_pool (h, default) or '
                             'proj_head_output (z), or any other the model returns')
    parser.add_argument('--out', help='also write the JSON result here')
    args = parser.parse_args(argv)
    if args.pixels == bool(args.model):
        parser.error('give either --model or --pixels')
    if (args.pixels or tf.io.gfile.exists(os.path.join(args.model, 'saved_model.pb'))) and not (
            args.dataset and args.image_size):
        parser.error('--dataset and --image_size are required with --pixels or a SavedModel')

    config = Config(use_tpu=False)
    if args.pixels:
        fn, source = pixel_features, 'pixels'
    elif tf.io.gfile.exists(os.path.join(args.model, 'saved_model.pb')):
        fn, source = saved_model_features(args.model, args.output), f'saved_model {args.model}'
    else:
        fn, config = checkpoint_features(args.model, args.random_init, args.seed, args.output)
        source = f'{"random init of " if args.random_init else ""}checkpoint {args.model}'
    changes = {k: getattr(args, k) for k in ('dataset', 'data_dir', 'image_size')
               if getattr(args, k) is not None}
    config = config.replace(**changes, train_split=args.train_split, eval_split=args.eval_split,
                            eval_batch_size=args.batch_size, cache_dataset=False)
    measured = probe(fn, config, args.linear_epochs, args.linear_min_steps)
    output = 'pixels' if args.pixels else args.output
    result = {'features': source, 'output': output, 'dataset': config.dataset, **measured}
    line = json.dumps(result)
    print(line)
    if args.out:
        with tf.io.gfile.GFile(args.out, 'w') as f:
            f.write(line + '\n')


if __name__ == '__main__':
    _main()
