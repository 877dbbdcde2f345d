"""Fine-tuning an exported SimCLR model in Keras 3 with `model.fit` and any optimizer.

    python examples/finetune_keras3.py /tmp/qs_export/saved_model/<step>

`ExportLayer` (below; copy it into your code) is the export as a Keras 3 layer: `fit` calls it with
`training=True` (BN on batch statistics, its moving averages updated), `predict` and `evaluate`
with `training=False`, and it adds the export's weight decay (`regularization_losses`) to the
model's losses. It needs only TensorFlow and Keras, not simclr_tf or tf-keras, and works on every
export of this project, old ones included (it uses the export's `m(images, training=...)`,
`variables`, `trainable_variables`, `regularization_losses`).

Why not `keras.layers.TFSMLayer(path, trainable=True)` directly: in Keras 3.15 it names each weight
after its TensorFlow variable (`.../kernel:0`), optimizers with slot variables (SGD with momentum,
Adam, ...) name theirs after it, and TensorFlow rejects the `:` (`'...kernel:0_momentum' is not a
valid scope name`); no export can avoid that, since a loaded TensorFlow variable's name always ends
in `:0`. `TFSMLayer(path, call_endpoint='call_inference', call_training_endpoint='call_training',
trainable=True)` does run BN in the right mode, and fine-tunes with optimizers without slots
(plain SGD). `ExportLayer` names its weights so that every optimizer accepts them.
"""

import argparse
import json
import os
import re
import time

import keras
import numpy as np
import tensorflow as tf

SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'data', 'cifar10_sample')


class ExportLayer(keras.layers.Layer):
    """A SimCLR SavedModel export as a Keras 3 layer that `model.fit` fine-tunes.

    Args:
      path: the export, `model_dir/saved_model/<step>`.
      output_key: which output to return (`final_avg_pool` is h, the representation); None
        returns the whole dict (`block_group1..4`, `proj_head_output`, ...).
    With `trainable=False` the layer is a frozen feature extractor (BN in inference mode always).
    """

    def __init__(self, path: str, output_key: str | None = 'final_avg_pool', **kwargs):
        super().__init__(**kwargs)
        self.export_path, self.output_key = path, output_key
        self.saved_model = tf.saved_model.load(path)
        trainable = {id(v) for v in self.saved_model.trainable_variables}
        # Keras weights over the export's own variables (wrapped, not copied: the export's
        # functions read these). Named without '/' and ':', which Keras and the optimizers'
        # slot variable names reject.
        self.export_weights = [
            keras.Variable(v, trainable=id(v) in trainable,
                           name=re.sub(r'[^A-Za-z0-9_.-]', '_', v.name))
            for v in self.saved_model.variables]
        if any(w.value is not v for w, v in zip(self.export_weights,
                                                 self.saved_model.variables)):
            raise RuntimeError('this Keras version copies variables given as initializer; '
                               'training would not reach the export')

    def call(self, images, training=False):
        training = bool(training) and self.trainable
        outputs = self.saved_model(images, training=training)
        if self.trainable:
            for loss in self.saved_model.regularization_losses:  # the run's L2 weight decay
                self.add_loss(loss())
        return outputs if self.output_key is None else outputs[self.output_key]

    def get_config(self):
        return {**super().get_config(), 'path': self.export_path, 'output_key': self.output_key}


def image_size(export: str, default: int) -> int:
    """The size the model was trained at, from the config the export carries (if any)."""
    path = os.path.join(export, 'assets.extra', 'config.json')
    if not tf.io.gfile.exists(path):
        return default
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)['image_size']


def image_folder(directory: str, size: int, batch_size: int, train: bool) -> tf.data.Dataset:
    """(images float32 [0, 1], integer labels); shuffled and flipped when training."""
    dataset = keras.utils.image_dataset_from_directory(
        directory, image_size=(size, size), batch_size=batch_size, shuffle=train, seed=0,
        label_mode='int', verbose=False)
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
    keras.utils.set_random_seed(0)
    start = time.time()

    size = image_size(args.export, default=32)
    train = image_folder(os.path.join(args.data, 'train'), size, args.batch_size, train=True)
    test = image_folder(os.path.join(args.data, 'test'), size, 100, train=False)
    num_classes = len(tf.io.gfile.listdir(os.path.join(args.data, 'train')))

    # The whole encoder is trained with a new linear classifier on h. (The export's heads get no
    # gradient from a loss on h, only the weight decay.)
    encoder = ExportLayer(args.export)
    model = keras.Sequential([keras.Input((size, size, 3)), encoder,
                              keras.layers.Dense(num_classes)])
    model.compile(keras.optimizers.SGD(args.learning_rate, momentum=0.9, nesterov=True),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=['accuracy'])
    print(f'{len(encoder.trainable_weights)} trainable variables from the export')

    before = [w.numpy() for w in encoder.trainable_weights]
    model.fit(train, epochs=args.epochs, shuffle=False, verbose=2)  # the dataset shuffles
    _, accuracy = model.evaluate(test, verbose=0)
    changes = [np.linalg.norm(w.numpy() - b) / (np.linalg.norm(b) + 1e-12)
               for b, w in zip(before, encoder.trainable_weights)]
    moved = sum(c > 0 for c in changes)
    print(f'fine-tuned {args.epochs} epoch(s): test accuracy {accuracy:.1%}; {moved} of '
          f'{len(changes)} trainable variables of the export changed (median relative change '
          f'{np.median(changes):.1e}) ({time.time() - start:.0f} s)')


if __name__ == '__main__':
    main()
