"""Hub-style SavedModel: the trained encoder and heads as downstream code loads them.

A drop-in for code written against the authors' TF2 SavedModels, without their faults:

    m = tf.saved_model.load(path)            # or tensorflow_hub.load(path)
    out = m(images, trainable=False)         # float32 [N, H, W, 3] in [0, 1]; any N, H, W
    out['final_avg_pool']                    # h, the representation

`out` is the model's own output dict (`initial_conv`, `initial_max_pool`, `block_group1..4`,
`final_avg_pool`, `proj_head_input`, `proj_head_output`, and `logits_sup` with a supervised head),
not tensors looked up by graph name. `trainable=True` runs BN in training mode (batch statistics,
moving averages updated). The call also takes Keras' `training=` in place of `trainable=`, because
`hub.KerasLayer` passes `training` only to callables whose signature has it. The root carries
`variables`, `trainable_variables` (those the trained model had, so `hub.KerasLayer(path,
trainable=True)` fine-tunes the encoder) and `regularization_losses`, and a `serving_default`
signature (inference mode) returns the same named outputs for TF Serving and
`keras.layers.TFSMLayer`. Two more endpoints serve Keras 3, `call_inference` and `call_training`
(`images` -> the output dict, in inference or training mode), for `TFSMLayer`'s `call_endpoint`
and `call_training_endpoint`; `examples/finetune_keras3.py` fine-tunes an export with `model.fit`.

`trainable=True` updates the loaded object's BN moving averages in place (as training does):
one call on an odd batch changes every later `trainable=False` output of that loaded object.
Reload the export to get its saved statistics back. Images with values outside [0, 1] (beyond
`RANGE_MARGIN`: [0, 255] or [-1, 1] images) or NaN are refused before the model runs, by an
assertion in the graph: an error wherever the export is called (eagerly, in a tf.function, in
tf.data, in Keras' `fit`). XLA drops assertions, so a jit-compiled caller is not checked.

`regularization_losses` holds one callable: the L2 weight decay as the training code adds it
to the loss for a non-LARS optimizer (`optim.weight_decay_loss`: `weight_decay` × Σ ||w||²/2 over
the trainable variables except BN's), i.e. what a fine-tuner with SGD or Adam adds to keep the
decay the model was trained with (`hub.KerasLayer(..., trainable=True)` adds it to the losses).
The authors exported an empty list. LARS decays inside its update, which a SavedModel cannot
carry; the loss form is the nearest equivalent. With `weight_decay=0` the list is empty.

The run's `Config` is written alongside, to `assets.extra/config.json` (image size, depth, …).
An export is written to a hidden temporary directory next to `saved_model/<step>` and renamed into
place, so a crash never leaves a half-written `saved_model/<step>` (renaming is atomic on local
and POSIX file systems; object stores such as GCS copy). Replacing an export of the same step
swaps the two directories in one atomic `renameat2(RENAME_EXCHANGE)` on Linux, so the step is
visible at every moment; elsewhere it takes two renames, and a kill between them is repaired by
the next export (the `.old-*` directory is renamed back). A process killed outright leaves its
`.tmp-*` directory; the next export removes it. Exports into one `saved_model/` take turns
(a file lock), so one never removes another's temporary directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import uuid

import keras
import tensorflow as tf

from simclr_tf import interrupt, optim
from simclr_tf.config import Config

EXPORT_DIR = 'saved_model'
SIGNATURE = 'serving_default'
# Wrong dtypes a caller is likely to pass (raw uint8 pixels, other floats): traced as functions
# that fail with a message saying what to do, instead of TensorFlow's "no matching function".
_WRONG_DTYPES = (tf.uint8, tf.int32, tf.int64, tf.float16, tf.bfloat16, tf.float64)
# How far outside [0, 1] an image may reach: resizing overshoots (tf.image.resize of [0, 1]
# pixel noise to 224 px reaches -0.19 to 1.15 bicubic, -0.43 to 1.49 lanczos5; a sharp edge
# 0.07 and 0.13 past the ends). [0, 255] and [-1, 1] images are refused.
RANGE_MARGIN = 0.5
# The call forms a loaded export accepts: the authors' `trainable`, or Keras' `training`.
_CALL_MODES = ({'trainable': False}, {'trainable': True}, {'training': False}, {'training': True})


def _check_images(images: tf.Tensor) -> tf.Tensor:
    """Fails with a clear message unless images are [N, H, W, 3] with values in [0, 1] (give or
    take RANGE_MARGIN); returns them with that shape.

    The checks run at call time (any rank is traced), before the model: a `trainable=True` call
    on images of another scale would already have moved the BN statistics. The images then pass
    through a `tf.cond` whose other branch has another shape: static shape inference of a loaded
    function called with a wrong shape then sees an unknown shape, instead of failing before the
    check with a message about an internal op. (The asserts stay outside the cond: a stateful op
    inside its branches makes grappler warn on every call.)
    """
    shape = tf.shape(images)
    ok = tf.logical_and(tf.equal(tf.rank(images), 4), tf.reduce_all(tf.equal(shape[-1:], 3)))
    message = 'images must be float32 [N, H, W, 3] (RGB, values in [0, 1]); got shape'
    with tf.control_dependencies([tf.debugging.Assert(ok, [message, shape])]):
        low, high = tf.reduce_min(images), tf.reduce_max(images)
    in_range = tf.logical_or(tf.equal(tf.size(images), 0), tf.logical_and(
        low >= -RANGE_MARGIN, high <= 1 + RANGE_MARGIN))  # NaN is out of range too
    range_message = ('images must have values in [0, 1] (float32 RGB; [0, 255] images divided '
                     'by 255, [-1, 1] images mapped by (x + 1) / 2); got values from')
    with tf.control_dependencies([tf.debugging.Assert(in_range, [range_message, low, 'to', high])]):
        images = tf.cond(ok, lambda: tf.identity(images), lambda: tf.zeros([1, 1, 1, 3]))
    return tf.ensure_shape(images, [None, None, None, 3])


def _wrong_dtype(images: tf.Tensor) -> dict[str, tf.Tensor]:
    """A function body that always fails, for a traced wrong input dtype."""
    message = (f'images must be float32 in [0, 1], got {images.dtype.name}; convert with '
               'tf.image.convert_image_dtype(images, tf.float32)')
    with tf.control_dependencies([tf.debugging.Assert(False, [message])]):
        return {'images': tf.identity(images)}


@contextlib.contextmanager
def single_replica_batch_norm(model: keras.Model):
    """Traces synchronised (global) BN as plain BN, which it is on the one replica a SavedModel
    runs on. The cross-replica all-reduce would otherwise be saved with its custom gradient, whose
    own gradient is not saved: loading then warns once per BN layer about "unsaved custom
    gradients" (first-order gradients work; second-order ones would fail)."""
    layers = [layer for layer in model._flatten_layers(include_self=True, recursive=True)
              if isinstance(layer, keras.layers.BatchNormalization) and layer.synchronized]
    for layer in layers:
        layer.synchronized = False
    try:
        yield
    finally:
        for layer in layers:
            layer.synchronized = True


def build_hub_module(model: keras.Model, config: Config
                     ) -> tuple[tf.__internal__.tracking.AutoTrackable,
                                tf.types.experimental.PolymorphicFunction]:
    """The object `tf.saved_model.save` writes, and its serving signature.

    Only the model's variables and functions are tracked, not the Keras objects, so loading needs
    nothing of this package. (A plain trackable, as Keras' own export uses: `tf.Module` reserves
    `variables` and `trainable_variables` for properties, which are not saved.) Build and save
    inside `single_replica_batch_norm(model)`: saving traces the functions again.
    """
    module = tf.__internal__.tracking.AutoTrackable()
    module.variables = list(model.variables)
    module.trainable_variables = list(model.trainable_variables)

    @tf.function
    def forward(images, training):
        return dict(model(images, training=training))

    # Every call form is a thin function around one of the two traces of `forward`, so the model's
    # graph is traced and stored twice (inference and training mode), not once per form.
    @tf.function
    def call(images, trainable=False, training=None):
        if images.dtype != tf.float32:
            return _wrong_dtype(images)
        return forward(_check_images(images), trainable if training is None else training)

    images = tf.TensorSpec(None, tf.float32, name='images')  # any rank: checked inside
    for mode in _CALL_MODES:
        call.get_concrete_function(images, **mode)
        for dtype in _WRONG_DTYPES:
            call.get_concrete_function(tf.TensorSpec(None, dtype, name='images'), **mode)
    module.__call__ = call

    regularization = []
    decay_config = config.replace(optimizer='momentum')  # the L2 of a non-LARS optimizer
    if config.weight_decay > 0:
        regularization.append(tf.function(lambda: optim.weight_decay_loss(model, decay_config),
                                          input_signature=[]))
    module.regularization_losses = regularization

    # A tf.function (not a concrete function), so saving traces it in its save context, which a
    # model built under a distribution strategy needs. Any shape: a wrong rank or channel count
    # gets `_check_images`' message. The dtype is checked by TensorFlow before any of this graph
    # runs, and its message names the function: hence the function's name.
    def images_must_be_float32_in_0_1(images):
        return call(images, trainable=False)

    serve = tf.function(images_must_be_float32_in_0_1,
                        input_signature=[tf.TensorSpec(None, tf.float32, name='images')])
    # Keras 3 endpoints, under the names Keras' own export gives them: `keras.layers.TFSMLayer(
    # path, call_endpoint='call_inference', call_training_endpoint='call_training')` runs BN on
    # batch statistics in `fit` and on the moving averages in `predict` (`serving_default` alone
    # would serve both in inference mode).
    spec = [tf.TensorSpec([None, None, None, 3], tf.float32, name='images')]
    module.call_inference = tf.function(lambda images: call(images, trainable=False),
                                        input_signature=spec)
    module.call_training = tf.function(lambda images: call(images, trainable=True),
                                       input_signature=spec)
    return module, serve


def export_saved_model(model: keras.Model, config: Config, step: int) -> str:
    """Writes `model_dir/saved_model/<step>/`, keeps the newest `keep_hub_module_max` exports,
    returns the export's path. An existing export of the same step is replaced (new one written
    first, then swapped in)."""
    root = os.path.join(config.model_dir, EXPORT_DIR)
    final = os.path.join(root, str(int(step)))
    tf.io.gfile.makedirs(root)
    tag = f'{int(step)}-{uuid.uuid4().hex[:8]}'
    temporary = os.path.join(root, f'.tmp-{tag}')
    # A signal (`interrupt`) during the save removes the temporary directory before the process
    # stops; the leftovers' repair, the rename and the pruning finish first.
    with _exclusive(root), interrupt.cleanup(lambda: _remove(temporary)):
        with interrupt.deferred():
            clean_leftovers(root)
        try:
            with single_replica_batch_norm(model):
                module, serve = build_hub_module(model, config)
                tf.saved_model.save(module, temporary, signatures={SIGNATURE: serve})
            tf.io.gfile.makedirs(os.path.join(temporary, 'assets.extra'))
            with tf.io.gfile.GFile(os.path.join(temporary, 'assets.extra', 'config.json'),
                                   'w') as f:
                f.write(config.to_json())
            with interrupt.deferred():
                if tf.io.gfile.exists(final):
                    _replace(temporary, final, os.path.join(root, f'.old-{tag}'))
                else:
                    tf.io.gfile.rename(temporary, final)
                _keep_newest(root, config.keep_hub_module_max, keep=int(step))
        finally:
            _remove(temporary)
    return final


def _remove(path: str) -> None:
    if tf.io.gfile.exists(path):
        tf.io.gfile.rmtree(path)


@contextlib.contextmanager
def _exclusive(root: str):
    """Exports into `root` take turns: a blocking flock on model_dir/.export.lock (local paths)."""
    if '://' in root:
        yield
        return
    import fcntl
    with open(os.path.join(os.path.dirname(root), '.export.lock'), 'a') as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: str, b: str) -> bool:
    """Atomically swaps the paths a and b (Linux renameat2); False where that is unavailable."""
    if '://' in a or not hasattr(os, 'uname') or os.uname().sysname != 'Linux':
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # file system without it
        return False
    raise OSError(code, os.strerror(code), b)


def _replace(temporary: str, final: str, old: str) -> None:
    """final := temporary, an existing export of the step replaced; the old one removed."""
    if _exchange(temporary, final):
        tf.io.gfile.rmtree(temporary)  # now the old export
        return
    tf.io.gfile.rename(final, old)
    tf.io.gfile.rename(temporary, final)  # a kill before this: clean_leftovers renames old back
    tf.io.gfile.rmtree(old)


def repair(model_dir: str) -> list[str]:
    """clean_leftovers on model_dir's exports, if any (at the start of a run)."""
    root = os.path.join(model_dir, EXPORT_DIR)
    if not tf.io.gfile.isdir(root):
        return []
    with _exclusive(root):
        return clean_leftovers(root)


_LEFTOVER = re.compile(r'^\.(tmp|old)-(\d+)-[0-9a-f]+$')


def clean_leftovers(root: str) -> list[str]:
    """Repairs what killed exports left in `root` (hold `_exclusive(root)`): an `.old-<step>-*`
    whose `<step>` is missing is renamed back; other `.old-*` and `.tmp-*` are removed."""
    done = []
    for name in sorted(n.rstrip('/') for n in tf.io.gfile.listdir(root)):
        match = _LEFTOVER.match(name)
        if not match:
            continue
        path, final = os.path.join(root, name), os.path.join(root, match.group(2))
        if match.group(1) == 'old' and not tf.io.gfile.exists(final):
            tf.io.gfile.rename(path, final)
            logging.warning('restored export %s from %s, left by an interrupted export', final,
                            path)
        else:
            tf.io.gfile.rmtree(path)
            logging.warning('removed %s, left by an interrupted export', path)
        done.append(path)
    return done


def _keep_newest(root: str, count: int, keep: int) -> None:
    """Deletes all but the `count` highest-step exports under root (as the authors), sparing
    `keep`, the one just written."""
    steps = sorted(int(name.rstrip('/')) for name in tf.io.gfile.listdir(root)
                   if name.rstrip('/').isdigit())
    for step in steps[:-count]:
        if step != keep:
            logging.info('deleting old export %s', os.path.join(root, str(step)))
            tf.io.gfile.rmtree(os.path.join(root, str(step)))


def load_saved_model(path: str):
    """Loads an export (`model_dir/saved_model/<step>`) or raises an error saying what is there."""
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f'{path!r} does not exist; expected an export directory '
                                f'model_dir/{EXPORT_DIR}/<step>')
    if not tf.io.gfile.exists(os.path.join(path, 'saved_model.pb')):
        candidates = []  # the path may be a model_dir or its saved_model/: name what is inside
        for base in (path, os.path.join(path, EXPORT_DIR)):
            if tf.io.gfile.isdir(base):
                steps = sorted(int(n.rstrip('/')) for n in tf.io.gfile.listdir(base)
                               if n.rstrip('/').isdigit())
                candidates += [os.path.join(base, str(step)) for step in steps]
        hint = f'; exports found under it: {", ".join(candidates)}' if candidates else ''
        raise ValueError(f'{path!r} is not a SavedModel export (no saved_model.pb); expected '
                         f'model_dir/{EXPORT_DIR}/<step>{hint}')
    loaded = tf.saved_model.load(path)
    if not callable(loaded):
        raise ValueError(f'{path!r} is a SavedModel but not a hub-style export: it has no __call__')
    return loaded
