"""Evaluation: supervised-head accuracy, the kNN monitor, and the original's result files."""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

import numpy as np
import tensorflow as tf

from simclr_tf import data, linear, optim
from simclr_tf.config import Config


def knn_classify(train_features: np.ndarray, train_labels: np.ndarray, features: np.ndarray,
                 num_classes: int, k: int = 200, temperature: float = 0.1,
                 chunk: int = 1024) -> np.ndarray:
    """Weighted kNN on cosine similarity (Wu et al. 2018): votes exp(sim / T) from the k nearest.

    Labels are integer class ids; returns the predicted class of each row of `features`.
    """
    train = tf.math.l2_normalize(tf.constant(train_features, tf.float32), axis=1)
    onehot = tf.one_hot(train_labels, num_classes)
    k = min(k, train_features.shape[0])
    predictions = []
    for start in range(0, features.shape[0], chunk):
        query = tf.math.l2_normalize(tf.constant(features[start:start + chunk], tf.float32), axis=1)
        sims, idx = tf.math.top_k(tf.matmul(query, train, transpose_b=True), k=k)
        weights = tf.exp(sims / temperature)
        votes = tf.reduce_sum(tf.gather(onehot, idx) * weights[..., None], axis=1)
        predictions.append(tf.argmax(votes, axis=1).numpy())
    return np.concatenate(predictions) if predictions else np.zeros([0], np.int64)


def extract_features(model: tf.keras.Model, strategy: tf.distribute.Strategy, config: Config,
                     split: str, max_examples: Optional[int] = None,
                     output: str = 'final_avg_pool', labelled_only: bool = False
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features, integer labels, supervised logits or empty) of a split, eval preprocessing;
    `labelled_only`: of train_split, only the label_fraction subset."""
    cfg = config.replace(eval_split=split)
    steps = None
    if max_examples:
        steps = -(-max_examples // config.eval_batch_size)
    dataset = data.build_distributed_dataset(strategy, cfg, False, labelled_only=labelled_only)

    @tf.function
    def step(images, labels):
        def replica_fn(images, labels):
            out = model(images, training=False)
            logits = out.get('logits_sup', tf.zeros([tf.shape(images)[0], 0]))
            return out[output], tf.argmax(labels, 1), logits
        per_replica = strategy.run(replica_fn, args=(images, labels))
        return [strategy.gather(t, axis=0) for t in per_replica]

    feats, labels, logits = [], [], []
    for i, (images, y) in enumerate(dataset):
        if steps is not None and i >= steps:
            break
        f, l, z = step(images, y)
        feats.append(f.numpy()), labels.append(l.numpy()), logits.append(z.numpy())
    if not feats:
        raise data.DataError(f'split {split!r} of {config.dataset!r} gave no examples to evaluate')
    return np.concatenate(feats), np.concatenate(labels), np.concatenate(logits)


def evaluate(config: Config, strategy: tf.distribute.Strategy, model: tf.keras.Model,
             info: data.DatasetInfo, step: int) -> dict[str, float]:
    """The original's eval metrics on `eval_split` (+ the kNN monitor), as a flat dict."""
    steps = optim.eval_steps(config, info.num_eval_examples)
    feats, labels, logits = extract_features(
        model, strategy, config, config.eval_split, steps * config.eval_batch_size)
    result = {'eval/regularization_loss': float(optim.weight_decay_loss(model, config))}
    if logits.shape[1]:
        top5 = np.argsort(-logits, axis=1)[:, :5]
        result['eval/label_top_1_accuracy'] = float(np.mean(top5[:, 0] == labels))
        # The transfer protocol's metric of four of its data sets (Aircraft, Pets, Caltech-101,
        # Flowers): the mean over classes of each class's top-1.
        result['eval/label_mean_per_class_accuracy'] = linear.accuracies(
            labels, top5[:, 0], logits.shape[1])['mean_per_class_accuracy']
        result['eval/label_top_5_accuracy'] = float(np.mean(np.any(top5 == labels[:, None], 1)))
    if config.knn_train_examples:
        # A semi-supervised run's monitor may use only the labels it trains with.
        train_feats, train_labels, _ = extract_features(
            model, strategy, config, config.train_split, config.knn_train_examples,
            labelled_only=True)
        predicted = knn_classify(train_feats, train_labels, feats, info.num_classes,
                                 config.knn_k, config.knn_temperature)
        result['eval/knn_top_1_accuracy'] = float(np.mean(predicted == labels))
        result['eval/knn_num_train_examples'] = int(train_labels.shape[0])
        subset = (f' (the label_fraction={config.label_fraction:g} subset)'
                  if config.trains_classifier and config.label_fraction < 1 else '')
        logging.info('kNN monitor: %d labelled %s examples%s', train_labels.shape[0],
                     config.train_split, subset)
    result['global_step'] = step
    result['eval/num_examples'] = int(labels.shape[0])
    return result


def write_results(config: Config, result: dict[str, float], flags: Optional[dict[str, Any]] = None
                  ) -> None:
    """result.json, result_<step>.json and flags.json in model_dir, as the original writes them."""
    step = int(result['global_step'])
    serialisable = {k: float(v) for k, v in result.items()}
    for name in ('result.json', f'result_{step}.json'):
        _write_json(os.path.join(config.model_dir, name), serialisable)
    _write_json(os.path.join(config.model_dir, 'flags.json'),
                {k: v for k, v in (flags or config.to_dict()).items() if _json_ok(v)})
    writer = tf.summary.create_file_writer(
        os.path.join(config.model_dir, config.eval_name) if config.eval_name else config.model_dir)
    with writer.as_default():
        for k, v in result.items():
            if k.startswith('eval/'):
                tf.summary.scalar(k, v, step=step)
    writer.flush()
    logging.info('eval at step %d: %s', step, serialisable)


def _json_ok(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def _write_json(path: str, value: dict) -> None:
    tmp = path + '.tmp'
    with tf.io.gfile.GFile(tmp, 'w') as f:
        json.dump(value, f, indent=2, sort_keys=True)
    tf.io.gfile.rename(tmp, path, overwrite=True)
