"""Evaluation: the kNN monitor of a semi-supervised run uses only the labels it trains with."""

import numpy as np
import tensorflow as tf

from simclr_tf import data, evaluate
from simclr_tf.config import Config
from simclr_tf.model import build_model


def test_knn_monitor_uses_only_the_label_fraction_subset(sample_dir):
    config = Config(dataset=sample_dir, train_split='train', eval_split='test', image_size=16,
                    resnet_depth=18, width_multiplier=0.125, proj_out_dim=8, use_tpu=False,
                    train_mode='finetune', label_fraction=0.05, label_seed=4, eval_batch_size=50,
                    eval_steps=1, knn_train_examples=1000, global_bn=False).validate()
    strategy = tf.distribute.get_strategy()
    info = data.dataset_info(config)
    model = build_model(config, info.num_classes)
    _, labels, _ = evaluate.extract_features(model, strategy, config, config.train_split,
                                             1000, labelled_only=True)
    assert np.all(np.bincount(labels, minlength=10) == 5)  # the 50 labelled examples, 5 a class
    result = evaluate.evaluate(config, strategy, model, info, step=0)
    # Not the 1,000 labels of the whole train split; the result says how many it used.
    assert result['eval/knn_num_train_examples'] == 50 == info.num_train_examples
    assert result['eval/num_examples'] == 50


def test_eval_results_hold_mean_per_class_accuracy_beside_top_1(sample_dir):
    """On an eval split whose classes are unequal, the mean of each class's top-1 differs from
    top-1; both are what NumPy computes from the model's own predictions."""
    config = Config(dataset=sample_dir, train_split='train', eval_split='test[:37]',
                    image_size=16, resnet_depth=18, width_multiplier=0.125, proj_out_dim=8,
                    use_tpu=False, train_mode='finetune', eval_batch_size=37,
                    knn_train_examples=0, global_bn=False).validate()
    strategy = tf.distribute.get_strategy()
    info = data.dataset_info(config)
    tf.keras.utils.set_random_seed(1)
    model = build_model(config, info.num_classes)
    head = model.supervised_head.linear_layer.dense
    head.kernel.assign(tf.random.normal(head.kernel.shape, stddev=3.0))
    _, labels, logits = evaluate.extract_features(model, strategy, config, 'test[:37]')
    predicted = np.argmax(logits, 1)
    result = evaluate.evaluate(config, strategy, model, info, step=0)
    present = np.unique(labels)
    per_class = np.mean([np.mean(predicted[labels == c] == c) for c in present])
    assert result['eval/label_top_1_accuracy'] == np.mean(predicted == labels)
    assert abs(result['eval/label_mean_per_class_accuracy'] - per_class) < 1e-9
    assert len(set(np.bincount(labels, minlength=10))) > 1  # unequal classes: the two can differ
