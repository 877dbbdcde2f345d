"""What an encoder learned, as pictures: nearest neighbours, a t-SNE map, TensorBoard's projector.

The features are `simclr_tf.features`' (eval preprocessing, any encoder source). Neighbours are
by cosine similarity, as the kNN monitor's; the t-SNE map is scikit-learn's, of L2-normalised
features (so its Euclidean distances are a function of cosine similarity); the projector's files
are TensorBoard's own format: a checkpoint of the embeddings, `metadata.tsv` and a sprite image
named in `projector_config.pbtxt`. The command is `simclr_tf.show`; the drawing, `drawing`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import numpy as np
import tensorflow as tf
from PIL import Image
from tensorboard.plugins import projector as tb_projector

from simclr_tf import data, drawing, features, probe, sources
from simclr_tf.config import Config, ConfigError



@dataclasses.dataclass(frozen=True)
class Found:
    """Eval images and their nearest train images, by each feature searched."""
    queries: np.ndarray  # [Q] indices into the eval split, ordered by class
    query_labels: np.ndarray  # [Q]
    query_images: np.ndarray  # uint8 [Q, s, s, 3]
    neighbours: dict[str, np.ndarray]  # feature name -> [Q, k] indices into the train split
    labels: dict[str, np.ndarray]  # feature name -> [Q, k] their labels
    images: dict[str, np.ndarray]  # feature name -> uint8 [Q, k, s, s, 3]
    bank_size: int  # train images searched
    centred: bool  # the train features' mean subtracted from both before the cosine

    def same_class(self, name: str) -> float:
        return float(np.mean(self.labels[name] == self.query_labels[:, None]))


def search(encoder: features.Encoder, config: Config, queries: int = 10, k: int = 8,
           seed: int = 0, pixel_size: Optional[int] = None, centred: bool = False) -> Found:
    """`queries` eval images (class-balanced, seeded) and their k nearest train images by
    cosine similarity of h and of the raw pixels (at pixel_size, default the image size up to
    64), from one pass over each split; `centred`: of the features less the train features'
    mean (as the probe's centred kNN: it matters for all-positive features such as pixels)."""
    _check(config, (config.train_split, config.eval_split))
    both = with_pixels(encoder, pixel_size or min(config.image_size, 64))
    names = (features.H, features.PIXELS)
    bank, bank_y = features.extract(both, config, config.train_split, names)
    test, test_y = features.extract(both, config, config.eval_split, names)
    chosen = pick(test_y, queries, seed)
    found = {}
    for name in names:
        train, query = bank[name], test[name][chosen]
        if centred:
            mean = train.mean(0)
            train, query = train - mean, query - mean
        found[name] = nearest(train, query, k)

    def pictured(indices: np.ndarray) -> np.ndarray:
        images = drawing.thumbnails(bank[features.PIXELS][indices.ravel()])
        return images.reshape(indices.shape + images.shape[1:])
    return Found(chosen, test_y[chosen], drawing.thumbnails(test[features.PIXELS][chosen]),
                 found, {name: bank_y[f] for name, f in found.items()},
                 {name: pictured(f) for name, f in found.items()}, len(bank_y), centred)


def neighbours(encoder: features.Encoder, config: Config, out: str, queries: int = 10,
               k: int = 8, seed: int = 0, pixel_size: Optional[int] = None, scale: int = 2,
               centred: bool = False) -> str:
    """A PNG of `search`'s queries, each followed by its neighbours by h, beside the same by
    raw pixels. Returns a summary line."""
    found = search(encoder, config, queries, k, seed, pixel_size, centred)
    picture(found, encoder.description, config.train_split, scale).save(out, optimize=True)
    return (f'wrote {out}: {len(found.queries)} {config.eval_split} images, each with its {k} '
            f'nearest {config.train_split} images; of the same class: h '
            f'{found.same_class(features.H):.3f}, pixels {found.same_class(features.PIXELS):.3f}')


def picture(found: Found, description: str, bank_name: str, scale: int = 2) -> Image.Image:
    """The neighbours by h (left) and by raw pixels (right), titled."""
    side, k = found.query_images.shape[1], found.neighbours[features.H].shape[1]
    similarity = 'cosine similarity, mean-centred' if found.centred else 'cosine similarity'
    grids = []
    for name, title in ((features.H, f'h ({features.H}) of {description}'),
                        (features.PIXELS, f'raw pixels ({side}x{side}x3)')):
        grids.append(drawing.neighbour_grid(
            found.query_images, found.query_labels, found.images[name], found.labels[name],
            f'{title}\nquery | {k} nearest of {found.bank_size} {bank_name} images by '
            f'{similarity}; green: same class ({found.same_class(name):.0%}), red: another',
            scale))
    return drawing.side_by_side(grids)


def tsne_map(encoder: features.Encoder, config: Config, out: str, examples: int = 2000,
             perplexity: float = 30.0, seed: int = 0, k: int = 200) -> str:
    """A PNG of two t-SNE panels, h and z, of `examples` eval images (class-balanced, seeded),
    each titled with its weighted kNN accuracy (k, T = 0.1, plain and mean-centred: the
    probe's) over the whole eval split against the whole train split."""
    source = _check(config, (config.train_split, config.eval_split))
    shown = min(examples, source.num_examples(config.eval_split))
    if perplexity >= shown:
        raise ConfigError(f'perplexity {perplexity:g} must be below the number of images '
                          f'mapped ({shown})')
    names = (features.H, features.Z)
    bank, bank_y = features.extract(encoder, config, config.train_split, names)
    test, test_y = features.extract(encoder, config, config.eval_split, names)
    chosen = pick(test_y, examples, seed)
    points, titles, accuracy = {}, {}, {}
    for name, label in zip(names, ('h', 'z')):
        knn = probe.knn_accuracies(bank[name], bank_y, test[name], test_y,
                                   source.num_classes, ks=(k,))
        accuracy[label] = knn[f'knn{k}_top_1_accuracy']
        titles[name] = (f'{label} ({name}, {test[name].shape[1]}-d)\nkNN top-1 '
                        f'{accuracy[label]:.3f}, mean-centred '
                        f'{knn[f"knn{k}_centred_top_1_accuracy"]:.3f}')
        points[name] = tsne(test[name][chosen], perplexity, seed)
    figure = drawing.map_figure(points, test_y[chosen], _class_names(source), titles, (
        f'{encoder.description}\nt-SNE of {len(chosen)} {config.eval_split} images (perplexity '
        f'{perplexity:g}, PCA init, seed {seed}); kNN: k = {k}, cosine, T = 0.1, all '
        f'{len(test_y)} {config.eval_split} images against all {len(bank_y)} '
        f'{config.train_split} images'))
    figure.savefig(out)
    return (f'wrote {out}: t-SNE of {len(chosen)} {config.eval_split} images; kNN top-1 '
            f'(k={k}) h {accuracy["h"]:.3f}, z {accuracy["z"]:.3f}')


def projector(encoder: features.Encoder, config: Config, logdir: str, examples: int = 1000,
              seed: int = 0, pixel_size: Optional[int] = None) -> str:
    """TensorBoard projector files of h (and z, if the encoder has it) of `examples` eval
    images (class-balanced, seeded) in `logdir`."""
    latest = tf.train.latest_checkpoint(logdir) if tf.io.gfile.isdir(logdir) else None
    if latest and not os.path.basename(latest).startswith('embeddings-'):
        raise ConfigError(f'logdir={logdir!r} holds checkpoints ({latest}); the projector '
                          'would show those: give a new directory')
    source = _check(config, (config.eval_split,))
    names = (features.H,) + ((features.Z,) if features.Z in encoder.names else ())
    size = pixel_size or min(config.image_size, 64)
    test, test_y = features.extract(with_pixels(encoder, size), config, config.eval_split,
                                    names + (features.PIXELS,))
    chosen = pick(test_y, examples, seed)
    short = {features.H: 'h', features.Z: 'z'}
    path = write_projector(
        logdir, {short[n]: test[n][chosen] for n in names}, test_y[chosen],
        _class_names(source), drawing.thumbnails(test[features.PIXELS][chosen]), chosen,
        f'{", ".join(short[n] for n in names)} of {encoder.description}: {len(chosen)} '
        f'{config.eval_split} images of {config.dataset} (seed {seed})')
    return (f'wrote {path}: {", ".join(short[n] for n in names)} of {len(chosen)} '
            f'{config.eval_split} images; see them with tensorboard --logdir={logdir}')


def _check(config: Config, splits: tuple[str, ...]):
    """The data set's source, once each split is known to have examples (before any feature is
    extracted; `features.extract` checks the encoder's outputs before it reads an image)."""
    source = sources.open_source(config.dataset, config.data_dir)
    for split in splits:
        if not source.num_examples(split):
            raise data.DataError(f'split {split!r} of {source.description} has no examples')
    return source


def _class_names(source) -> tuple[str, ...]:
    return source.class_names or tuple(str(c) for c in range(source.num_classes))


def with_pixels(encoder: features.Encoder, size: int) -> features.Encoder:
    """`encoder` with one more output, `pixels`: its input images at size x size, flattened
    (the raw-pixel baseline and the pictures' thumbnails, from the same pass)."""
    def outputs(x: tf.Tensor) -> dict:
        small = x if x.shape[1] == size else tf.image.resize(x, [size, size], 'area')
        return {**encoder.outputs(x),
                features.PIXELS: tf.reshape(small, [tf.shape(x)[0], -1])}
    return features.Encoder(tf.function(outputs), encoder.config, encoder.description,
                            encoder.names + (features.PIXELS,))


def pick(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of n examples (all, if fewer), spread evenly over the classes, seeded, ordered
    by class."""
    chosen = data.balanced_subset(labels, min(n, len(labels)) / len(labels), seed)
    return chosen[np.argsort(labels[chosen], kind='stable')]


def nearest(bank: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """[Q, k] indices into `bank` of each query's k most cosine-similar rows, most similar
    first. (The bank is not copied: a split's raw pixels can be gigabytes.)"""
    bank_norms = np.sqrt(np.maximum(np.einsum('ij,ij->i', bank, bank), 1e-24))
    unit = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    similarity = (unit @ bank.T) / bank_norms
    return np.argsort(-similarity, axis=1, kind='stable')[:, :k]


def tsne(x: np.ndarray, perplexity: float, seed: int) -> np.ndarray:
    """[N, 2] t-SNE (scikit-learn, Barnes-Hut, PCA init, seeded) of the L2-normalised rows."""
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    # One OpenMP thread, as `linear`: threads that spin while TensorFlow's (or another
    # process') hold the cores slow it many times over.
    with threadpool_limits(1):
        return TSNE(n_components=2, perplexity=perplexity, init='pca', learning_rate='auto',
                    random_state=seed).fit_transform(unit.astype(np.float32))


def write_projector(logdir: str, embeddings: dict[str, np.ndarray], labels: np.ndarray,
                    class_names: Optional[tuple[str, ...]], images: np.ndarray,
                    indices: np.ndarray, description: str) -> str:
    """TensorBoard projector files in `logdir`: the embeddings ({name: [M, d]}) as variables of
    a checkpoint, `metadata.tsv` (index in the split, label, class name), `sprite.png` of the
    uint8 [M, s, s, 3] images, `projector_config.pbtxt` naming them, and an event file holding
    `description`, so the directory is also a run of a parent --logdir. Returns the config's
    path."""
    tf.io.gfile.makedirs(logdir)
    with open(os.path.join(logdir, 'metadata.tsv'), 'w') as f:
        f.write('index\tlabel\tclass\n')
        for i, y in zip(indices, labels):
            f.write(f'{i}\t{y}\t{class_names[y] if class_names else y}\n')
    sprite, side = drawing.sprite(images)
    sprite.save(os.path.join(logdir, 'sprite.png'), optimize=True)
    variables = {name: tf.Variable(x, name=name) for name, x in embeddings.items()}
    tf.train.CheckpointManager(tf.train.Checkpoint(**variables), logdir, max_to_keep=1,
                               checkpoint_name='embeddings').save()
    config = tb_projector.ProjectorConfig()
    for name in embeddings:
        embedding = config.embeddings.add()
        embedding.tensor_name = f'{name}/.ATTRIBUTES/VARIABLE_VALUE'
        embedding.metadata_path = 'metadata.tsv'  # relative: to the config's directory
        embedding.sprite.image_path = 'sprite.png'
        embedding.sprite.single_image_dim.extend([side, side])
    tb_projector.visualize_embeddings(logdir, config)
    with tf.summary.create_file_writer(logdir).as_default():
        tf.summary.text('projector/source', description, step=0)
    return os.path.join(logdir, 'projector_config.pbtxt')


