"""Augmented pairs as a PNG grid, to see what the network is shown: `simclr-tf-augment` (or
`python -m simclr_tf.picture`). Every op runs here as one view's ops, whatever the run's
placement (`views`): the placement changes where, not what."""

from __future__ import annotations

from typing import Optional

from simclr_tf import logs
from simclr_tf.config import Config
from simclr_tf.probe import ArgumentParser


def main(argv: Optional[list[str]] = None) -> None:
    """Renders augmented pairs as a PNG grid: each cell is source | view 1 | view 2."""
    parser = ArgumentParser(prog='simclr-tf-augment', description=main.__doc__)
    parser.add_argument('--dataset', required=True, help='TFDS name or <split>/<class>/<image> dir')
    parser.add_argument('--data_dir', default=None)
    parser.add_argument('--split', default='train')
    parser.add_argument('--out', default='views.png')
    parser.add_argument('--n', type=int, default=12, help='number of source images')
    parser.add_argument('--columns', type=int, default=3, help='pairs per row of the grid')
    parser.add_argument('--image_size', type=int, default=32)
    parser.add_argument('--scale', type=int, default=3, help='pixel magnification in the PNG')
    parser.add_argument('--color_jitter_strength', type=float, default=0.5)
    parser.add_argument('--augmentations', default=Config.augmentations)
    parser.add_argument('--use_blur', type=lambda s: s.lower() in ('1', 'true', 'yes'),
                        default=True)
    parser.add_argument('--brightness', default='multiplicative')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    logs.setup()  # as quiet as the program: before anything imports TensorFlow
    config = Config(dataset=args.dataset, data_dir=args.data_dir, image_size=args.image_size,
                    color_jitter_strength=args.color_jitter_strength, use_blur=args.use_blur,
                    augmentations=args.augmentations, brightness=args.brightness,
                    seed=args.seed, train_split=args.split, use_tpu=False).validate()
    count = write_grid(config, args.split, args.n, args.columns, args.scale, args.out)
    print(f'wrote {args.out}: {count} images, each source | view 1 | view 2; '
          f'augmentations={config.augmentations} use_blur={config.use_blur} '
          f'color_jitter_strength={config.color_jitter_strength} seed={config.seed}')


def write_grid(config: Config, split: str, n: int, columns: int, scale: int, out: str) -> int:
    """Up to n source images of `split` and two views of each (seeded by config.seed) as a PNG
    grid of `columns` pairs a row; returns how many sources it shows. TensorFlow is imported
    here, after `logs.setup`: it prints its start-up notices at import."""
    import numpy as np
    import tensorflow as tf
    from PIL import Image

    from simclr_tf import augment, data

    # Spread the picks over the split rather than taking the first files.
    total = data.dataset_info(config, need_eval=False).num_train_examples
    picks = data.examples(config, split).shard(max(total // n, 1), 0).take(n)
    sources = [image for image, _ in picks]
    seeds = tf.random.experimental.stateless_split(tf.constant([config.seed, 0], tf.int64),
                                                   2 * len(sources) + 1)
    views = [tf.stack([augment.preprocess_for_pretrain(x, config, seeds[2 * i + v])
                       for i, x in enumerate(sources)]) for v in (0, 1)]
    views = augment.batch_random_blur(views, config, seeds[-1])
    cells = []
    for i, source in enumerate(sources):
        row = [augment.preprocess_for_eval(source, config), views[0][i], views[1][i]]
        cells.append(np.concatenate([np.pad(r.numpy(), [[1, 1], [1, 1], [0, 0]], constant_values=1)
                                     for r in row], axis=1))
    cells += [np.ones_like(cells[0])] * (-len(cells) % columns)
    gap = np.ones_like(cells[0][:, :4])
    rows = [np.concatenate(sum(([c, gap] for c in cells[r:r + columns]), [])[:-1], axis=1)
            for r in range(0, len(cells), columns)]
    grid = np.concatenate(sum(([r, np.ones_like(r[:4])] for r in rows), [])[:-1], axis=0)
    grid = np.kron(grid, np.ones([scale, scale, 1]))
    Image.fromarray(np.round(grid * 255).astype(np.uint8)).save(out, optimize=True)
    return len(sources)


if __name__ == '__main__':
    main()
