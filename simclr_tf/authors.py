"""The authors' model zoo: their TF2 training checkpoints and SavedModels as weights of this model.

Their variables are placed by structure, never by their names: `authors_layout` generates the
layout of their model for an `Architecture` (inferred here from the source's shapes). A training
checkpoint is then read by key; a SavedModel export by order (its `model/<part>/variables/<i>`
lists, which follow tf-keras' weight order; the names in it carry per-process layer counters and
serve only in messages).

Their sync-BN and plain-BN layers hold the same four variables under the same keys, so the
statistics land in this model's BN layers whatever `global_bn` is.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import tensorflow as tf

from simclr_tf.authors_layout import (
    DEFAULT_SK_RATIO, PARTS, SK_MIN_DIM, SUFFIX, Architecture, Builder, Entry, Layer, all_weights,
    layout, trainable_weights)
from simclr_tf.config import Config, ConfigError
from simclr_tf.heads import HeadMismatch
from simclr_tf.model import has_supervised_head
from simclr_tf.resnet import ARCHITECTURES, channels

# The authors' part -> this model's attribute.
OUR_PARTS = {'resnet_model': 'encoder', '_projection_head': 'projection_head',
             'supervised_head': 'supervised_head'}


class AuthorsLayoutError(ConfigError):
    """The source is not one of the authors' layouts this module knows, or does not fit."""


# ------------------------------------------------------------------ reading their files
@dataclass
class Source:
    """One of the authors' checkpoints or SavedModels: their variables under their checkpoint keys
    (`values` reads one; SavedModel variables are given those keys once their order is placed)."""
    path: str
    kind: str  # 'checkpoint' | 'saved_model'
    shapes: dict[str, tuple[int, ...]]
    read: Callable[[str], np.ndarray]
    step: int = 0
    # SavedModel only: per part, its `variables` list as (bundle key, shape, trainable, name)
    ordered: Optional[dict[str, list[tuple[str, tuple, bool, str]]]] = None


def find_saved_model(path: str) -> Optional[str]:
    """`path` if it is a SavedModel directory; its newest numbered export if it holds
    `<step>/saved_model.pb` (the authors' `.../saved_model/`) or `saved_model/<step>/`."""
    if not tf.io.gfile.isdir(path):
        return None
    if tf.io.gfile.exists(os.path.join(path, 'saved_model.pb')):
        return path
    for root in (path, os.path.join(path, 'saved_model')):
        if not tf.io.gfile.isdir(root):
            continue
        steps = sorted((int(d.rstrip('/')) for d in tf.io.gfile.listdir(root)
                        if d.rstrip('/').isdigit()), reverse=True)
        for step in steps:
            candidate = os.path.join(root, str(step))
            if tf.io.gfile.exists(os.path.join(candidate, 'saved_model.pb')):
                return candidate
    return None


def _is_authors_key(key: str) -> bool:
    """A model variable of theirs (not an optimizer slot, which TF2 keys under its variable)."""
    return (key.endswith(SUFFIX) and '/.OPTIMIZER_SLOT/' not in key
            and any(key.startswith(f'model/{part}/') for part in PARTS))


def is_authors_checkpoint(prefix: str) -> bool:
    """Whether a checkpoint prefix holds the authors' model (their Keras attribute names)."""
    return any(k.startswith('model/resnet_model/') for k, _ in tf.train.list_variables(prefix))


def open_checkpoint(prefix: str) -> Source:
    reader = tf.train.load_checkpoint(prefix)
    shapes = {k: tuple(s) for k, s in reader.get_variable_to_shape_map().items()
              if _is_authors_key(k)}
    if not any(k.startswith('model/resnet_model/') for k in shapes):
        raise AuthorsLayoutError(f'{prefix} has no model/resnet_model/... variables: it is not one '
                                 "of the authors' SimCLR TF2 checkpoints")
    step_key = 'global_step' + SUFFIX
    step = int(reader.get_tensor(step_key)) if reader.has_tensor(step_key) else 0
    return Source(prefix, 'checkpoint', shapes, reader.get_tensor, step)


def _saved_model_names(path: str) -> dict[int, str]:
    """Node id -> variable name, from saved_model.pb (only for messages)."""
    from tensorflow.core.protobuf import saved_model_pb2
    try:
        with tf.io.gfile.GFile(os.path.join(path, 'saved_model.pb'), 'rb') as f:
            proto = saved_model_pb2.SavedModel.FromString(f.read())
        nodes = proto.meta_graphs[0].object_graph_def.nodes
        return {i: n.variable.name for i, n in enumerate(nodes)
                if n.WhichOneof('kind') == 'variable'}
    except Exception as e:  # names are a nicety; the order and shapes are what count
        logging.info('variable names of %s not read: %s', path, e)
        return {}


def open_saved_model(path: str) -> Source:
    """The authors' export: `model/<part>/variables` lists from the variables bundle's object graph
    (the same graph `tf.saved_model.load` restores), trainability from
    `trainable_variables_list`."""
    from tensorflow.core.protobuf import trackable_object_graph_pb2
    bundle = os.path.join(path, 'variables', 'variables')
    try:
        reader = tf.train.load_checkpoint(bundle)
        graph = trackable_object_graph_pb2.TrackableObjectGraph.FromString(
            reader.get_tensor('_CHECKPOINTABLE_OBJECT_GRAPH'))
    except (tf.errors.OpError, ValueError) as e:
        raise AuthorsLayoutError(f'{path}: cannot read the SavedModel variables ({e})') from e

    def child(node: Optional[int], name: str) -> Optional[int]:
        if node is None:
            return None
        for c in graph.nodes[node].children:
            if c.local_name == name:
                return c.node_id
        return None

    def listed(node: Optional[int]) -> list[int]:
        if node is None:
            return []
        items = [(int(c.local_name), c.node_id) for c in graph.nodes[node].children
                 if c.local_name.isdigit()]
        return [n for _, n in sorted(items)]

    names = _saved_model_names(path)
    trainable = set(listed(child(0, 'trainable_variables_list')))
    model = child(0, 'model')
    ordered = {}
    shapes = reader.get_variable_to_shape_map()
    for part in PARTS:
        nodes = listed(child(child(model, part), 'variables'))
        entries = []
        for n in nodes:
            attrs = [a.checkpoint_key for a in graph.nodes[n].attributes]
            if not attrs:
                continue
            entries.append((attrs[0], tuple(shapes[attrs[0]]), n in trainable,
                            names.get(n, attrs[0])))
        if entries:
            ordered[part] = entries
    if 'resnet_model' not in ordered:
        raise AuthorsLayoutError(f'{path} has no model/resnet_model/variables: it is not one of '
                                 "the authors' SimCLR TF2 SavedModels")
    step = os.path.basename(os.path.normpath(path))
    return Source(path, 'saved_model', {}, reader.get_tensor,
                  int(step) if step.isdigit() else 0, ordered)


def latest_prefix(directory: str) -> Optional[str]:
    """The newest checkpoint in `directory`: by its `checkpoint` file, else (that file may name
    the paths of the machine that wrote it) the highest-numbered `*.index` in it."""
    prefix = tf.train.latest_checkpoint(directory)
    if prefix is not None:
        return prefix
    found = []
    for name in tf.io.gfile.listdir(directory):
        if m := re.fullmatch(r'(.*?)-(\d+)\.index', name):
            found.append((int(m.group(2)), os.path.join(directory, name[:-len('.index')])))
    return max(found)[1] if found else None


def open_source(path: str) -> Optional[Source]:
    """The authors' checkpoint or SavedModel at `path` (prefix or directory), or None when `path`
    is a checkpoint that is not theirs (e.g. this project's)."""
    saved = find_saved_model(path)
    if tf.io.gfile.isdir(path):
        prefix = latest_prefix(path)
        if prefix is None and saved is None:
            raise ConfigError(f'{path!r} holds neither a checkpoint nor a SavedModel')
        if prefix is None:
            return open_saved_model(saved)
    else:
        prefix = path
        if not tf.io.gfile.exists(prefix + '.index'):
            raise ConfigError(f'{path!r} is neither a checkpoint prefix nor a directory')
    if not is_authors_checkpoint(prefix):
        return None
    return open_checkpoint(prefix)


# ------------------------------------------------------------------ inferring the architecture
def _solve_ratio(observed: dict[int, int], floor: int, preferred: float) -> float:
    """A ratio r with max(int(f * r), floor) == d for every (f, d) observed."""
    for r in [preferred] + sorted({d / f for f, d in observed.items()}):
        if all(max(int(f * r + 1e-9), floor) == d for f, d in observed.items()):
            return r
    raise AuthorsLayoutError(f'no single ratio gives the reduced widths {observed}')


def infer_architecture(shapes: dict[str, tuple], ft_proj_selector: Optional[int] = None
                       ) -> Architecture:
    """The Architecture of the authors' checkpoint keys and shapes (verified with `layout`)."""
    r = 'model/resnet_model/'
    stem_key = r + r'initial_conv_relu_max_pool/(\d+)/conv2d/kernel' + SUFFIX
    stem = sorted((int(m.group(1)), k) for k in shapes if (m := re.fullmatch(stem_key, k)))
    if not stem:
        raise AuthorsLayoutError('no stem convolution (model/resnet_model/'
                                 'initial_conv_relu_max_pool/0/conv2d/kernel) found')
    first, last = shapes[stem[0][1]], shapes[stem[-1][1]]
    deep = len(stem) == 3
    cifar = not deep and first[0] == 3
    width = last[-1] / 64
    blocks: dict[int, dict[int, set]] = {}
    for k in shapes:
        if m := re.match(r + r'block_groups/(\d+)/layers/(\d+)/(\w+)/', k):
            group = blocks.setdefault(int(m.group(1)), {})
            group.setdefault(int(m.group(2)), set()).add(m.group(3))
    counts = tuple(len(blocks.get(g, {})) for g in range(4))
    lists = {name for group in blocks.values() for names in group.values() for name in names}
    kind = 'bottleneck' if 'conv_relu_dropblock_layers' in lists else 'basic'
    depth = next((d for d, spec in ARCHITECTURES.items() if spec == (kind, counts)), None)
    if depth is None:
        raise AuthorsLayoutError(f'{kind} blocks per group {counts} match no ResNet depth '
                                 f'({", ".join(map(str, ARCHITECTURES))})')
    sk_mid, se_mid = {}, {}
    expansion = 4 if kind == 'bottleneck' else 1
    for k, s in shapes.items():
        m = re.match(r + r'block_groups/(\d+)/', k)
        if not m:
            continue
        f = channels(64 * 2**int(m.group(1)), width)
        if k.endswith('/conv2d_0/kernel' + SUFFIX):
            sk_mid[f] = s[-1]
        elif k.endswith('/se_reduce/kernel' + SUFFIX):
            se_mid[f] = s[-1]
    resnet_d = any(k.startswith(r + 'block_groups/1/layers/0/') and
                   re.search(r'(projection|shortcut)_layers/2/', k) for k in shapes)
    sk_ratio = 0.0
    if sk_mid:
        sk_ratio = _solve_ratio(sk_mid, SK_MIN_DIM, DEFAULT_SK_RATIO)
    elif deep or resnet_d:  # ResNet-D without SK convs (basic blocks): the ratio is not stored
        sk_ratio = DEFAULT_SK_RATIO
    se_ratio = _solve_ratio(se_mid, 1, 0.25) if se_mid else 0.0
    proj = sorted((int(m.group(1)), s) for k, s in shapes.items() if (m := re.fullmatch(
        r'model/_projection_head/linear_layers/(\d+)/dense/kernel' + SUFFIX, k)))
    n = len(proj)
    h = expansion * channels(512, width)
    out_dim = proj[-1][1][-1] if proj else 128
    sup = shapes.get('model/supervised_head/linear_layer/dense/kernel' + SUFFIX)
    if ft_proj_selector is None:  # only "h or a hidden layer" vs "z" is in the shapes
        ft_proj_selector = n if sup and n and sup[0] == out_dim != h else 0
    return Architecture(depth, width, cifar, sk_ratio, se_ratio, 'nonlinear' if n else 'none',
                        n, out_dim, sup[-1] if sup else None, ft_proj_selector)


def place_saved_model(source: Source, ft_proj_selector: Optional[int] = None) -> Architecture:
    """Gives a SavedModel's variables the authors' checkpoint keys: finds the structure whose
    tf-keras order reproduces every part's list of shapes and trainability, then sets
    `source.shapes` and `source.read` by key. Returns the architecture."""
    ordered = source.ordered
    res = ordered['resnet_model']
    kernels = [s for _, s, _, _ in res if len(s) == 4 and s[2] == 3]
    if len(kernels) != 1:
        raise AuthorsLayoutError(f'{source.path}: expected one 3-channel stem kernel, '
                                 f'found {kernels}')
    k0 = kernels[0]
    stems = ([(False, False, k0[-1] / 64)] if k0[0] == 7 else
             [(True, False, k0[-1] / 64), (True, True, k0[-1] / 64), (False, True, k0[-1] / 32)])
    proj = ordered.get('_projection_head', [])
    n = sum(len(s) == 2 for _, s, _, _ in proj)
    out_dim = next((s[-1] for _, s, _, _ in reversed(proj) if len(s) == 2), 128)
    sup = [s for _, s, _, _ in ordered.get('supervised_head', []) if len(s) == 2]
    observed = [(s, t) for _, s, t, _ in res]
    for depth in ARCHITECTURES:
        for cifar, sk, width in stems:
            for se in (False, True):
                for frozen in range(-1, 5):
                    arch = Architecture(depth, width, cifar, DEFAULT_SK_RATIO if sk else 0.0,
                                        0.25 if se else 0.0, 'nonlinear' if n else 'none', n,
                                        out_dim, sup[0][-1] if sup else None,
                                        ft_proj_selector or 0)
                    parts = Builder(arch, frozen).parts()
                    resnet = parts['resnet_model']
                    entries = all_weights(resnet)
                    if len(entries) != len(res):
                        break  # the count does not depend on `frozen`
                    train = {id(e) for e in trainable_weights(resnet)}
                    if all(len(e.shape) == len(s) and (id(e) in train) == t and
                           (e.shape == s or e.free) for e, (s, t) in zip(entries, observed)):
                        return _assign_keys(source, parts, ft_proj_selector)
    raise AuthorsLayoutError(
        f'{source.path}: the order and shapes of model/resnet_model/variables match no ResNet of '
        f'the authors (depths {sorted(ARCHITECTURES)}, with/without SK, SE, CIFAR stem). '
        f'First variables: {[name for *_, name in res[:4]]}')


def _assign_keys(source: Source, parts: dict[str, Layer], ft_proj_selector) -> Architecture:
    bundle, shapes, unplaced = {}, {}, []
    for name, entries in source.ordered.items():
        ours = all_weights(parts[name]) if name in parts else []
        if len(ours) != len(entries):
            unplaced += [f'{label} {shape}' for _, shape, _, label in entries[len(ours):]]
        for e, (bkey, shape, _, _) in zip(ours, entries):
            bundle[e.key + SUFFIX] = bkey
            shapes[e.key + SUFFIX] = shape
    if unplaced:
        raise AuthorsLayoutError(f'{source.path}: could not place {len(unplaced)} variables: '
                                 + ', '.join(unplaced[:10]))
    source.shapes = shapes
    reader = source.read
    source.read = lambda key: reader(bundle[key])
    return infer_architecture(shapes, ft_proj_selector)


# ------------------------------------------------------------------ checking and placing
def _compare(expected: list[Entry], shapes: dict[str, tuple]) -> list[str]:
    """Problems between the keys/shapes `expected` and those of the source (same part)."""
    keys = {e.key + SUFFIX: e for e in expected}
    unplaced = sorted(set(shapes) - set(keys))
    missing = sorted(set(keys) - set(shapes))
    wrong = [f'{k} has shape {list(shapes[k])}, expected {list(e.shape)}'
             for k, e in keys.items() if k in shapes and tuple(shapes[k]) != e.shape]
    problems = []
    if unplaced:
        problems.append(f'could not place {len(unplaced)} variables: {", ".join(unplaced[:8])}'
                        + (' ...' if len(unplaced) > 8 else ''))
    if missing:
        problems.append(f'{len(missing)} variables missing: {", ".join(missing[:8])}'
                        + (' ...' if len(missing) > 8 else ''))
    if wrong:
        problems.append('shape mismatch: ' + '; '.join(wrong[:8]))
    return problems


def _part(key: str) -> str:
    return key.split('/')[1]


def source_architecture(source: Source, ft_proj_selector: Optional[int] = None) -> Architecture:
    """Infers the source's architecture and checks that it places every variable of the source."""
    if source.kind == 'saved_model' and not source.shapes:
        place_saved_model(source, ft_proj_selector)
    arch = infer_architecture(source.shapes, ft_proj_selector)
    problems = _compare([e for p in layout(arch).values() for e in p], source.shapes)
    if problems:
        raise AuthorsLayoutError(f'{source.path} ({source.kind}, nearest layout: '
                                 f'{arch.describe()}): ' + '; '.join(problems))
    return arch


def placement(config: Config, num_classes: Optional[int], source: Source, schema: str = ''
              ) -> tuple[list[tuple[Entry, str]], list[str]]:
    """(the layout entry of our variable, the source key it takes) for every variable of
    `config`'s model (with `num_classes`, None: no supervised head) whose .path matches `schema`
    (re.match), and notes on parts left as initialised; decided from the source's shapes alone,
    before any model is built. Raises AuthorsLayoutError when the source does not fit."""
    src = source_architecture(source)
    arch = Architecture.of(config, num_classes if has_supervised_head(config) else None)
    pattern = re.compile(schema)
    pairs, notes = [], []
    for part, expected in layout(arch).items():
        have = {k: s for k, s in source.shapes.items() if _part(k) == part}
        if not expected:
            continue
        if not have and part != 'resnet_model':
            notes.append(f'{OUR_PARTS[part]} not in the source: left as initialised')
            continue
        if part == 'supervised_head' and src.num_classes != arch.num_classes:
            notes.append(f'supervised head not restored: the source has {src.num_classes} '
                         f'classes, this run {arch.num_classes}')
            continue
        if part == 'supervised_head':
            mismatch = _head_mismatch(source, src, expected, config)
            if mismatch and not config.zero_init_logits_layer:
                raise AuthorsLayoutError(mismatch.refusal())
            if mismatch:
                notes.append(mismatch.fresh())
                continue
        problems = _compare(expected, have)
        if problems:
            raise AuthorsLayoutError(
                f'{source.path} holds {src.describe()}; this run is configured for '
                f'{arch.describe()} ({OUR_PARTS[part]}): ' + '; '.join(problems))
        pairs += [(e, e.key + SUFFIX) for e in expected if pattern.match(e.ours)]
    return pairs, notes


def plan(model, config: Config, source: Source, schema: str = ''
         ) -> tuple[list[tuple[tf.Variable, str]], list[str]]:
    """(our variable, the source key it takes) for every variable of `model` whose .path matches
    `schema` (re.match), and notes on parts left as initialised (`placement`, checked against
    the model's variables)."""
    head = getattr(model, 'supervised_head', None)
    entries, notes = placement(config, head.num_classes if head is not None else None, source,
                               schema)
    ours = {v.path: v for v in model.variables}
    pairs = []
    for e, key in entries:
        v = ours.get(e.ours)
        if v is None:
            raise AuthorsLayoutError(f"this model has no variable {e.ours} to take the "
                                     f"authors' {e.key}")
        if tuple(v.shape) != e.shape:
            raise AuthorsLayoutError(f'{e.ours} has shape {list(v.shape)}; the authors\' '
                                     f'{e.key} has {list(e.shape)}')
        pairs.append((v, key))
    return pairs, notes


def _head_mismatch(source: Source, src: Architecture, expected: list[Entry], config: Config
                   ) -> Optional[HeadMismatch]:
    """The source's supervised head if it reads another width than this run's. Their shapes tell
    only whether it reads z (ft_proj_selector=-1) or a tensor of h's width (0 stands for it)."""
    key = 'model/supervised_head/linear_layer/dense/kernel'
    theirs = source.shapes.get(key + SUFFIX)
    ours = next((e.shape for e in expected if e.key == key), None)
    if theirs is None or ours is None or theirs[0] == ours[0]:
        return None
    return HeadMismatch(f"the authors' {source.kind} {source.path}", tuple(theirs), tuple(ours),
                        -1 if src.ft_proj_selector else 0, config.ft_proj_selector)


def restore(model, config: Config, source: Source, schema: str) -> tuple[list[str], list[str]]:
    """Assigns the source's values to `model` (all read before any is assigned). Returns the
    restored variables' paths and notes."""
    pairs, notes = plan(model, config, source, schema)
    values = [(v, source.read(key)) for v, key in pairs]
    for v, value in values:
        v.assign(tf.cast(value, v.dtype))
    for note in notes:
        logging.info('%s', note)
    logging.info("restored %d variables from the authors' %s %s", len(pairs), source.kind,
                 source.path)
    return [v.path for v, _ in pairs], notes


def config_for(arch: Architecture, base: Optional[Config] = None,
               image_size: Optional[int] = None) -> Config:
    """A Config of this project for the architecture (CIFAR stem <=> image_size <= 32)."""
    base = base or Config()
    size = image_size or (32 if arch.cifar_stem else max(base.image_size, 33))
    if (size <= 32) != arch.cifar_stem:
        raise ConfigError(f'image_size={size} does not fit the source\'s '
                          f'{"CIFAR" if arch.cifar_stem else "ImageNet"} stem '
                          f'({"<= 32" if arch.cifar_stem else "> 32"} needed)')
    return base.replace(
        resnet_depth=arch.resnet_depth, width_multiplier=arch.width_multiplier,
        sk_ratio=arch.sk_ratio, se_ratio=arch.se_ratio, image_size=size,
        proj_head_mode=arch.proj_head_mode,
        num_proj_layers=arch.num_proj_layers if arch.num_proj_layers else base.num_proj_layers,
        proj_out_dim=arch.proj_out_dim, ft_proj_selector=arch.ft_proj_selector,
        train_mode='pretrain', lineareval_while_pretraining=arch.num_classes is not None)
