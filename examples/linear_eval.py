"""Linear evaluation of an exported SimCLR model in Keras 3 (paper §4: a linear classifier on the
frozen representation h = `final_avg_pool`).

    python examples/linear_eval.py /tmp/qs_export/saved_model/<step>

The export is used through `keras.layers.TFSMLayer` (its `serving_default` signature, inference
mode); only TensorFlow and Keras are needed, not simclr_tf. Images are read from an image folder
laid out `<split>/<class>/<image>` (default: the repository's embedded CIFAR-10 sample).
"""

import argparse
import json
import os
import time

import keras
import numpy as np
import tensorflow as tf

SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'data', 'cifar10_sample')


def image_size(export: str, default: int) -> int:
    """The size the model was trained at, from the config the export carries (if any)."""
    path = os.path.join(export, 'assets.extra', 'config.json')
    if not tf.io.gfile.exists(path):
        return default
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)['image_size']


def image_folder(directory: str, size: int, batch_size: int = 100) -> tf.data.Dataset:
    """(images float32 [0, 1], integer labels) in file order; classes sorted by name."""
    dataset = keras.utils.image_dataset_from_directory(
        directory, image_size=(size, size), batch_size=batch_size, shuffle=False,
        label_mode='int', verbose=False)
    return dataset.map(lambda x, y: (x / 255.0, y))  # the model expects [0, 1], not [0, 255]


def features(extractor: keras.Model, dataset: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    h = extractor.predict(dataset.map(lambda x, y: x), verbose=0)
    labels = np.concatenate([y.numpy() for _, y in dataset])
    return h, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('export', help='an export directory, model_dir/saved_model/<step>')
    parser.add_argument('--data', default=SAMPLE, help='image folder with train/ and test/')
    parser.add_argument('--epochs', type=int, default=100)
    parser.add_argument('--learning_rate', type=float, default=0.01)
    args = parser.parse_args()
    keras.utils.set_random_seed(0)
    start = time.time()

    size = image_size(args.export, default=32)
    inputs = keras.Input((size, size, 3))
    outputs = keras.layers.TFSMLayer(args.export, call_endpoint='serving_default',
                                     trainable=False)(inputs)
    extractor = keras.Model(inputs, outputs['final_avg_pool'])  # h, frozen
    train_h, train_y = features(extractor, image_folder(os.path.join(args.data, 'train'), size))
    test_h, test_y = features(extractor, image_folder(os.path.join(args.data, 'test'), size))
    num_classes = int(train_y.max()) + 1
    print(f'features: {train_h.shape[1]}-d, {len(train_h)} train / {len(test_h)} test images, '
          f'{num_classes} classes')

    # Standardising h with training-set statistics is part of the linear map (it folds into the
    # weights); it only makes the optimisation well conditioned.
    mean, std = train_h.mean(0), train_h.std(0) + 1e-6
    classifier = keras.Sequential([keras.Input(train_h.shape[1:]),
                                   keras.layers.Dense(num_classes)])
    classifier.compile(keras.optimizers.Adam(args.learning_rate),
                       keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                       metrics=['accuracy'])
    classifier.fit((train_h - mean) / std, train_y, batch_size=100, epochs=args.epochs, verbose=0)
    _, train_accuracy = classifier.evaluate((train_h - mean) / std, train_y, verbose=0)
    _, test_accuracy = classifier.evaluate((test_h - mean) / std, test_y, verbose=0)
    print(f'linear eval: train accuracy {train_accuracy:.1%}, test accuracy {test_accuracy:.1%} '
          f'({time.time() - start:.0f} s)')


if __name__ == '__main__':
    main()
