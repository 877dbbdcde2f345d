"""Fine-tuning an exported SimCLR model with `hub.KerasLayer(path, trainable=True)` in tf-keras.

    pip install tensorflow-hub tf-keras      # (requirements-dev.txt)
    python examples/finetune_hub.py /tmp/qs_export/saved_model/<step>

The whole encoder is trained together with a new linear classifier on h = `final_avg_pool`. The
layer calls the export with `training=True` during `fit` (BN on batch statistics, moving averages
updated) and `training=False` in `evaluate`, and adds the export's `regularization_losses` (its
weight decay) to the model's loss. tensorflow_hub builds on tf-keras (Keras 2), which it imports
by itself when `tf.keras` is Keras 3, so the model here is a tf-keras one. Only TensorFlow,
tensorflow-hub and tf-keras are needed, not simclr_tf.
"""

import argparse
import json
import os
import time

import numpy as np
import tensorflow as tf
import tensorflow_hub as hub
import tf_keras

SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'data', 'cifar10_sample')


def image_size(export: str, default: int) -> int:
    """The size the model was trained at, from the config the export carries (if any)."""
    path = os.path.join(export, 'assets.extra', 'config.json')
    if not tf.io.gfile.exists(path):
        return default
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)['image_size']


def image_folder(directory: str, size: int, batch_size: int, train: bool) -> tf.data.Dataset:
    """(images float32 [0, 1], integer labels); shuffled and flipped when training."""
    dataset = tf_keras.utils.image_dataset_from_directory(
        directory, image_size=(size, size), batch_size=batch_size, shuffle=train, seed=0,
        label_mode='int')
    dataset = dataset.map(lambda x, y: (x / 255.0, y))  # the model expects [0, 1]
    if train:
        dataset = dataset.map(lambda x, y: (tf.image.random_flip_left_right(x), y))
    return dataset.prefetch(tf.data.AUTOTUNE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('export', help='an export directory, model_dir/saved_model/<step>')
    parser.add_argument('--data', default=SAMPLE, help='image folder with train/ and test/')
    parser.add_argument('--epochs', type=int, default=2)
    parser.add_argument('--batch_size', type=int, default=64)
    parser.add_argument('--learning_rate', type=float, default=0.01)
    args = parser.parse_args()
    tf_keras.utils.set_random_seed(0)
    start = time.time()

    size = image_size(args.export, default=32)
    train = image_folder(os.path.join(args.data, 'train'), size, args.batch_size, train=True)
    test = image_folder(os.path.join(args.data, 'test'), size, 100, train=False)
    num_classes = len(tf.io.gfile.listdir(os.path.join(args.data, 'train')))

    # The layer holds all of the export's trainable variables (encoder and heads); only the
    # encoder's get gradients from a loss on final_avg_pool (the heads only the weight decay).
    encoder = hub.KerasLayer(args.export, trainable=True, output_key='final_avg_pool')
    model = tf_keras.Sequential([tf_keras.Input((size, size, 3)), encoder,
                                 tf_keras.layers.Dense(num_classes)])
    model.compile(tf_keras.optimizers.SGD(args.learning_rate, momentum=0.9, nesterov=True),
                  tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=['accuracy'])
    print(f'{len(encoder.trainable_weights)} trainable variables and '
          f'{len(model.losses)} regularization loss(es) from the export')

    before = [w.numpy() for w in encoder.trainable_weights]
    model.fit(train, epochs=args.epochs, verbose=2)
    _, accuracy = model.evaluate(test, verbose=0)
    changes = [np.linalg.norm(w.numpy() - b) / (np.linalg.norm(b) + 1e-12)
               for b, w in zip(before, encoder.trainable_weights)]
    moved = sum(c > 0 for c in changes)
    print(f'fine-tuned {args.epochs} epoch(s): test accuracy {accuracy:.1%}; {moved} of '
          f'{len(changes)} trainable variables of the export changed (median relative change '
          f'{np.median(changes):.1e}) ({time.time() - start:.0f} s)')


if __name__ == '__main__':
    main()
