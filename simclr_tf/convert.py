"""Converts one of the authors' TF2 checkpoints or SavedModels into this project's checkpoint and
hub-style export (fine-tunable: variables on the root, `hub.KerasLayer(trainable=True)`):

    python -m simclr_tf.convert \\
        --source=gs://simclr-checkpoints-tf2/simclrv2/pretrained/r50_1x_sk0 --out=/tmp/r50_1x_sk0

writes `<out>/ckpt-<step>` (+ `checkpoint`, `config.json`) and `<out>/saved_model/<step>/`, and
prints the architecture it found with the flags that describe it. The architecture is read from
the variables' shapes; the stem tells CIFAR (image_size <= 32) from ImageNet; what the shapes cannot
tell (`ft_proj_selector` when the classifier reads a hidden layer, `image_size` of an ImageNet
stem) comes from the flags. Nothing is written until every variable is placed.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import tensorflow as tf

from simclr_tf import authors, export
from simclr_tf.config import Config, ConfigError
from simclr_tf.model import build_model


def flags_of(config: Config) -> str:
    """The run.py flags that rebuild this architecture."""
    names = ('resnet_depth', 'width_multiplier', 'sk_ratio', 'se_ratio', 'image_size',
             'proj_head_mode', 'num_proj_layers', 'proj_out_dim', 'ft_proj_selector')
    return ' '.join(f'--{n}={getattr(config, n):g}' if isinstance(getattr(config, n), float)
                    else f'--{n}={getattr(config, n)}' for n in names)


def convert(source: str, out: str, image_size: Optional[int] = None,
            ft_proj_selector: Optional[int] = None) -> dict:
    """Converts `source` into `out`; returns {'architecture', 'config', 'checkpoint', 'export',
    'step'}."""
    theirs = authors.open_source(source)
    if theirs is None:
        raise authors.AuthorsLayoutError(
            f"{source} is not one of the authors' SimCLR TF2 checkpoints (no "
            'model/resnet_model/... variables); a checkpoint of this project needs no conversion')
    arch = authors.source_architecture(theirs, ft_proj_selector)
    config = authors.config_for(arch, Config(use_tpu=False, global_bn=False, model_dir=out),
                                image_size).validate()
    if tf.io.gfile.exists(out) and (tf.train.latest_checkpoint(out) or
                                    tf.io.gfile.exists(os.path.join(out, 'saved_model'))):
        raise ConfigError(f'--out={out!r} already holds a checkpoint or export; choose a new '
                          'directory')
    model = build_model(config, arch.num_classes or 1)
    restored, _ = authors.restore(model, config, theirs, '')
    if len(restored) != len(theirs.shapes) or len(restored) != len(model.variables):
        raise authors.AuthorsLayoutError(  # the layout checks make this unreachable; say so if not
            f'placed {len(restored)} of the {len(theirs.shapes)} variables of {source} into a '
            f'model of {len(model.variables)}')
    # Everything is placed: now write.
    tf.io.gfile.makedirs(out)
    with tf.io.gfile.GFile(os.path.join(out, 'config.json'), 'w') as f:
        f.write(config.to_json())
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model), out, max_to_keep=1)
    checkpoint = manager.save(checkpoint_number=theirs.step)
    path = export.export_saved_model(model, config, theirs.step)
    return {'architecture': arch, 'config': config, 'checkpoint': checkpoint, 'export': path,
            'step': theirs.step}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m simclr_tf.convert', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--source', required=True,
                        help="the authors' checkpoint (prefix or directory) or SavedModel "
                             '(.../saved_model/ or .../saved_model/<step>/), local or gs://')
    parser.add_argument('--out', required=True, help='a new directory for the results')
    parser.add_argument('--image_size', type=int,
                        help='the export config\'s image size (default 224; 32 for a CIFAR stem)')
    parser.add_argument('--ft_proj_selector', type=int,
                        help='which projection-head layer feeds the classifier, when the shapes '
                             'cannot tell (default 0, h)')
    args = parser.parse_args(argv)
    try:
        result = convert(args.source, args.out, args.image_size, args.ft_proj_selector)
    except ConfigError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    print(f'found: {result["architecture"].describe()}')
    print(f'flags: {flags_of(result["config"])}')
    print(f'checkpoint: {result["checkpoint"]}')
    print(f'export: {result["export"]}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
