"""Checkpoints: save and resume a run, and start fine-tuning from another run's weights."""

from __future__ import annotations

import logging
import os
import re
import shutil
from typing import Optional

import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

from simclr_tf import authors, faults, optim
from simclr_tf import model_dir as model_dir_lib
from simclr_tf.config import Config, ConfigError
from simclr_tf.heads import HeadMismatch
from simclr_tf.model import has_supervised_head, supervised_input_dim


def resolve_checkpoint(path: str) -> str:
    """A checkpoint prefix from a prefix or a directory (its latest checkpoint)."""
    if tf.io.gfile.isdir(path):
        found = list_checkpoints(path)
        latest = tf.train.latest_checkpoint(path) or (found[-1][1] if found else None)
        if latest is None:
            raise ConfigError(f'checkpoint={path!r} is a directory with no checkpoint in it')
        return latest
    if not tf.io.gfile.exists(path + '.index') and tf.io.gfile.exists(path + '_temp'):
        raise ConfigError(f'checkpoint={path!r} is still being written ({path}_temp exists, no '
                          f'{os.path.basename(path)}.index yet): wait for that save to finish, or '
                          'pass its directory to start from its newest complete checkpoint')
    if not tf.io.gfile.exists(path + '.index'):
        raise ConfigError(f'checkpoint={path!r} is neither a checkpoint prefix nor a directory')
    return path


def check_start(path: str) -> None:
    """Fails early, with a clear message, when `--checkpoint` names nothing to start from: a
    checkpoint (prefix or directory) or one of the authors' SavedModel exports."""
    if tf.io.gfile.isdir(path) and tf.train.latest_checkpoint(path) is None:
        if authors.find_saved_model(path) is None:
            raise ConfigError(f'checkpoint={path!r} is a directory with neither a checkpoint nor '
                              'a SavedModel in it')
        return
    resolve_checkpoint(path)


def optimizer_state(optimizer: tf.Module) -> tf.Module:
    """The optimizer's own variables (step, slots), as `optimizer/variables/<i>`.

    Checkpointing the Keras optimizer itself would key every trainable weight
    `optimizer/_trainable_variables/<i>` (its list of them is the shortest path to each), leaving
    `model/...` keys only to BN statistics. Without that list, every model variable is keyed by
    its place in the model: `model/encoder/stem/conv_0/_kernel`, `model/projection_head/...`,
    `model/supervised_head/...`.

    Under float16 these are the loss-scaled optimizer's inner optimizer's, so checkpoints of every
    precision share one layout (a run resumes across precisions); the loss scale is apart
    (`loss_scale_state`).
    """
    state = tf.__internal__.tracking.AutoTrackable()
    state.variables = list(optim.inner_optimizer(optimizer).variables)
    return state


def loss_scale_state(optimizer: tf.Module) -> dict:
    """float16's loss scale, its growth counter and the skipped steps, as
    `loss_scale/variables/<i>` ({} without loss scaling). A run resumed from a checkpoint without
    them (another precision) starts them afresh."""
    if not hasattr(optimizer, 'loss_scale_variables'):
        return {}
    state = tf.__internal__.tracking.AutoTrackable()
    state.variables = list(optimizer.loss_scale_variables)
    return {'loss_scale': state}


def is_legacy(path: str) -> bool:
    """A checkpoint of this project written before model variables were keyed by name."""
    return any(k.startswith('optimizer/_iterations/') for k, _ in tf.train.list_variables(path))


class Checkpointer:
    """Model, optimizer (and so the global step, `optimizer.iterations`) in `model_dir`.

    Resuming does not trust the `checkpoint` state file: it tries the `ckpt-<N>` files found in
    model_dir, newest first, sets aside (renames, never deletes) any that cannot be read, and
    rewrites the state file to what it found. On a non-chief worker of a multi-worker run every
    worker must take part in the save; those write to a scratch directory that is removed.
    """

    def __init__(self, config: Config, model: tf.Module, optimizer: tf.Module, chief: bool = True,
                 task_id: int = 0):
        self.config = config
        self.chief = chief
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer_state(optimizer),
                                              **loss_scale_state(optimizer))
        # What a resume must find (float16's loss scale may be missing: another precision's run).
        self._required = tf.train.Checkpoint(model=model, optimizer=optimizer_state(optimizer))
        self._loss_scale = loss_scale_state(optimizer)
        self._legacy = tf.train.Checkpoint(model=model, optimizer=optimizer)  # reads older ones
        self._scratch = None
        self._directory = config.model_dir
        if not chief:
            self._scratch = os.path.join(config.model_dir, f'.worker_{task_id}_scratch')
            self._directory = self._scratch
        self.manager = self._new_manager()

    def _new_manager(self) -> tf.train.CheckpointManager:
        return tf.train.CheckpointManager(self.checkpoint, directory=self._directory,
                                          max_to_keep=self.config.keep_checkpoint_max)

    @property
    def latest(self) -> Optional[str]:
        found = list_checkpoints(self.config.model_dir)
        return found[-1][1] if found else None

    def save(self, step: int) -> str:
        path = self.manager.save(checkpoint_number=step)
        if self._scratch:
            shutil.rmtree(self._scratch, ignore_errors=True)
        return path

    def restore(self, model: tf.keras.Model) -> str:
        """Resumes from `model_dir`, else starts from `config.checkpoint`; says which it did.

        Never starts from scratch in a model_dir that holds checkpoints or an export: raises
        ConfigError saying what is there (`--start_over` moves it aside first, in program.py).
        """
        model_dir = self.config.model_dir
        found = list_checkpoints(model_dir)
        if found:
            resumed, set_aside = self._restore_newest_readable(found)
            if resumed is None:
                raise ConfigError(
                    f'no readable checkpoint in model_dir={model_dir!r}: '
                    f'{", ".join(set_aside)} could not be read and were set aside. Pass '
                    '--start_over to train from scratch (other files are moved aside too), or '
                    'use another --model_dir')
            if self.chief:
                write_state_file(model_dir, resumed, [p for _, p in list_checkpoints(model_dir)])
                self.manager = self._new_manager()  # it read the state file when created
            return f'resumed from {resumed}'
        kept = model_dir_contents(model_dir)
        if kept:
            raise ConfigError(
                f'model_dir={model_dir!r} holds no checkpoint to resume from but {", ".join(kept)}'
                ' of an earlier run; training would start from scratch and overwrite them. Pass '
                '--start_over to move them aside and train from scratch, or use another '
                '--model_dir')
        if self.config.checkpoint:
            theirs = authors.open_source(self.config.checkpoint)
            if theirs is not None:  # the authors' TF2 checkpoint or SavedModel (their model zoo)
                source = f"the authors' {theirs.kind} {theirs.path}"
                restored, notes = authors.restore(model, self.config, theirs,
                                                  self.config.variable_schema)
            else:
                source = resolve_checkpoint(self.config.checkpoint)
                try:
                    restored, notes = restore_matching(model, source, self.config)
                except (tf.errors.OpError, IndexError, OSError) as e:  # half-written, damaged
                    raise faults.Unreadable('checkpoint', source, e) from e
            message = f'initialised {len(restored)} variables from {source}'
            message += ''.join(f'; {note}' for note in notes)
            new = new_parts(model, restored)
            if new:
                message += f'; new (freshly initialised): {", ".join(new)}'
            if self.config.zero_init_logits_layer and model.supervised_head is not None:
                for v in model.supervised_head.trainable_variables:
                    v.assign(tf.zeros_like(v))
                message += ' (supervised head zero-initialised)'
            return message
        return 'started from scratch'

    def _checkpoint_for(self, prefix: str) -> tf.train.Checkpoint:
        """What reads `prefix`: checkpoints written before model variables were keyed by name
        need the optimizer's own object graph."""
        try:
            return self._legacy if is_legacy(prefix) else self._required
        except (tf.errors.OpError, IndexError, OSError):  # unreadable: restore_problem says why
            return self._required

    def _restore_newest_readable(self, found: list[tuple[int, str]]
                                 ) -> tuple[Optional[str], list[str]]:
        """(the prefix restored, the prefixes set aside), trying the newest first."""
        set_aside = []
        for _, prefix in reversed(found):
            problem = restore_problem(self._checkpoint_for(prefix), prefix)
            if problem is None:
                if self._loss_scale:  # float16: its scale if saved, else it starts afresh
                    tf.train.Checkpoint(**self._loss_scale).restore(prefix).expect_partial()
                if set_aside:
                    logging.warning('resuming from %s, the newest readable checkpoint', prefix)
                return prefix, set_aside
            if problem.startswith(MISMATCH):
                raise ConfigError(f'checkpoint {prefix} does not hold this model ({problem}); '
                                  'were its flags different? (see model_dir/config.json)')
            moved = set_aside_checkpoint(prefix) if self.chief else prefix
            logging.warning('checkpoint %s cannot be read (%s); set aside as %s, trying the '
                            'one before', prefix, problem, moved)
            set_aside.append(f'{prefix} ({problem})')
        return None, set_aside


_CKPT_INDEX = re.compile(r'^ckpt-(\d+)\.index$')
UNREADABLE = 'unreadable-'  # prefix of a checkpoint's files once set aside
MISMATCH = 'structure mismatch'


def list_checkpoints(model_dir: str) -> list[tuple[int, str]]:
    """(step, prefix) of every `ckpt-<step>.index` in model_dir, oldest first, whatever the
    `checkpoint` state file says (it may be missing, stale or copied from elsewhere)."""
    if not model_dir or not tf.io.gfile.isdir(model_dir):
        return []
    found = []
    for name in tf.io.gfile.listdir(model_dir):
        match = _CKPT_INDEX.match(name)
        if match:
            found.append((int(match.group(1)), os.path.join(model_dir, name[:-len('.index')])))
    return sorted(found)


def write_state_file(model_dir: str, latest: str, paths: list[str]) -> None:
    """The `checkpoint` state file CheckpointManager reads, naming the checkpoints found (written
    to a temporary file, then renamed over the old one)."""
    lines = [f'model_checkpoint_path: "{os.path.basename(latest)}"']
    lines += [f'all_model_checkpoint_paths: "{os.path.basename(p)}"' for p in paths]
    path = os.path.join(model_dir, 'checkpoint')
    with tf.io.gfile.GFile(path + '.tmp-resume', 'w') as f:
        f.write('\n'.join(lines) + '\n')
    tf.io.gfile.rename(path + '.tmp-resume', path, overwrite=True)


def restore_problem(checkpoint: tf.train.Checkpoint, prefix: str) -> Optional[str]:
    """Restores `prefix` into `checkpoint`; None if that worked, else what went wrong. A read
    failure (truncated or damaged file: TensorFlow raises IndexError, DataLossError, …) is told
    apart from a checkpoint of another model (MISMATCH)."""
    try:
        checkpoint.restore(prefix).assert_existing_objects_matched()
    except (tf.errors.OpError, IndexError, OSError) as e:  # the files
        text = str(e).strip()
        return f'{type(e).__name__}: {text.splitlines()[0][:300] if text else "unreadable"}'
    except (AssertionError, ValueError) as e:  # the content: variables missing or of other shapes
        text = str(e).strip()
        return f'{MISMATCH}: {text.splitlines()[0][:300] if text else type(e).__name__}'
    return None


def set_aside_checkpoint(prefix: str) -> str:
    """Renames prefix.index and prefix.data-* to `unreadable-<name>…` (kept for inspection, no
    longer seen as a checkpoint); returns the new prefix."""
    directory, name = os.path.split(prefix)
    target = os.path.join(directory, UNREADABLE + name)
    n = 1
    while tf.io.gfile.glob(target + '.*'):
        n += 1
        target = os.path.join(directory, f'{UNREADABLE}{n}-{name}')
    for path in tf.io.gfile.glob(prefix + '.*'):
        tf.io.gfile.rename(path, target + path[len(prefix):])
    return target


def model_dir_contents(model_dir: str) -> list[str]:
    """Exports and results in model_dir that a run from scratch would overwrite."""
    return model_dir_lib.contents(model_dir)


def restore_matching(model: tf.keras.Model, source: str, config: Config
                     ) -> tuple[list[str], list[str]]:
    """Restores the variables whose `.path` matches `config.variable_schema` (re.match) from a
    checkpoint; returns their paths and notes on parts left as initialised.

    The authors' linear-eval recipe passes `(?!global_step|(?:.*/|^)Momentum|head)`: every encoder
    variable, no head. Only the parts that hold a selected variable are read, so a checkpoint whose
    supervised head has another shape can still seed the encoder. A selected head of another shape
    (`head_mismatch`) starts fresh under zero_init_logits_layer, else raises ConfigError.
    """
    pattern = re.compile(config.variable_schema)
    parts = _parts(model)
    selected = {name: [v for v in layer.variables if pattern.match(v.path)]
                for name, layer in parts.items()}
    # A part the checkpoint does not hold at all (the supervised head of a run pretrained without
    # lineareval_while_pretraining) starts fresh, as the authors' restore(...).expect_partial().
    saved = saved_parts(source)
    if selected and not saved & set(parts):
        raise ConfigError(f'checkpoint={source!r} holds none of this model\'s parts '
                          f'({", ".join(parts)})')
    for name in [n for n in selected if selected[n] and n not in saved]:
        logging.info('checkpoint %s holds no %s: it starts freshly initialised', source, name)
        selected[name] = []
    notes = []
    if selected.get('supervised_head'):
        kernel = model.supervised_head.linear_layer.dense.kernel
        mismatch = head_mismatch(source, tuple(kernel.shape), config.ft_proj_selector)
        if mismatch and not config.zero_init_logits_layer:
            raise ConfigError(mismatch.refusal())
        if mismatch:
            notes.append(mismatch.fresh())
            selected['supervised_head'] = []
    wanted = {name: layer for name, layer in parts.items() if selected[name]}
    keep = {id(v): v.numpy() for v in model.variables if not pattern.match(v.path)}
    if wanted:
        try:
            status = tf.train.Checkpoint(model=tf.train.Checkpoint(**wanted)).restore(source)
        except ValueError as e:  # a variable of another shape: never TensorFlow's raw error
            raise ConfigError(f'checkpoint {source} does not fit this model ({first_line(e)}); '
                              'were its flags different? (see the config.json beside it)') from e
        status.expect_partial()
        try:
            status.assert_existing_objects_matched()
        except AssertionError as e:
            raise ConfigError(f'checkpoint={source!r} does not hold this model\'s '
                              f'{", ".join(wanted)} variables: {e}') from e
    # Parts restored whole may include unselected variables: put those back.
    for v in model.variables:
        if id(v) in keep:
            v.assign(keep[id(v)])
    restored = [v.path for vs in selected.values() for v in vs]
    logging.info('restored %d variables matching %r from %s: %s', len(restored),
                 config.variable_schema, source,
                 ', '.join(f'{n} {len(vs)}' for n, vs in selected.items()))
    return restored, notes


def first_line(error: BaseException) -> str:
    """An error's first line (at most 300 characters), for one-line messages."""
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def _object_graph(reader) -> Optional[trackable_object_graph_pb2.TrackableObjectGraph]:
    if not reader.has_tensor('_CHECKPOINTABLE_OBJECT_GRAPH'):  # written without objects
        return None
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor('_CHECKPOINTABLE_OBJECT_GRAPH'))
    return graph


def _child(graph, node: Optional[int], names: tuple[str, ...]) -> Optional[int]:
    """The node id of `node`'s child named one of `names` (None if there is none)."""
    if node is None:
        return None
    return next((c.node_id for c in graph.nodes[node].children if c.local_name in names), None)


def saved_parts(source: str) -> set[str]:
    """The model parts a checkpoint of this project holds, read from its object graph (older
    checkpoints key head weights under the optimizer, so their key names do not tell)."""
    reader = tf.train.load_checkpoint(source)
    graph = _object_graph(reader)
    if graph is None:
        return {name.split('/')[1] for name in reader.get_variable_to_shape_map()
                if name.startswith('model/') and name.count('/') > 1}
    model = _child(graph, 0, ('model',))
    return {c.local_name for c in graph.nodes[model].children} if model is not None else set()


# Where the supervised head's kernel sits in the object graph (Keras 3 names it `_kernel`), and
# the .path of the head's variables (what variable_schema matches).
HEAD_KERNEL = ('model', 'supervised_head', 'linear_layer', 'dense')
KERNEL_NAMES = ('_kernel', 'kernel')
HEAD_PATHS = tuple(f'head_supervised/linear_layer/dense/{v}' for v in ('kernel', 'bias'))


def saved_head_shape(source: str) -> Optional[tuple[int, ...]]:
    """[inputs, classes] of the supervised head's kernel in a checkpoint of this project, found
    through its object graph (older checkpoints key it under the optimizer); None if not found."""
    reader = tf.train.load_checkpoint(source)
    shapes = reader.get_variable_to_shape_map()
    graph = _object_graph(reader)
    if graph is None:
        keys = ['/'.join(HEAD_KERNEL + (name,)) + authors.SUFFIX for name in KERNEL_NAMES]
    else:
        node = 0
        for name in HEAD_KERNEL:
            node = _child(graph, node, (name,))
        node = _child(graph, node, KERNEL_NAMES)
        keys = [a.checkpoint_key for a in graph.nodes[node].attributes] if node is not None else []
    return next((tuple(shapes[k]) for k in keys if k in shapes), None)


def head_mismatch(source: str, ours: tuple[int, Optional[int]], selector: int
                  ) -> Optional[HeadMismatch]:
    """How the supervised head of checkpoint `source` differs from this run's ([inputs, classes],
    classes None: inputs only; `selector` this run's ft_proj_selector), None if it fits or the
    checkpoint holds no head. The checkpoint's selector comes from config.json beside it."""
    theirs = saved_head_shape(source)
    if theirs is None or (theirs[0] == ours[0] and ours[1] in (None, theirs[1])):
        return None
    try:
        written = model_dir_lib.read_config(os.path.dirname(source)) or {}
    except ConfigError:  # unreadable: the message names the widths only
        written = {}
    return HeadMismatch(f'checkpoint {source}', theirs, ours, written.get('ft_proj_selector'),
                        selector)


def check_head(config: Config, num_classes: Optional[int] = None) -> None:
    """Refuses, before anything is built, a start from `config.checkpoint` (one of this project's)
    whose supervised head the schema selects but this run's head cannot take: another input width
    or, once `num_classes` is known, class count. With zero_init_logits_layer it starts fresh
    instead (restore_matching); the authors' sources are placed by authors.restore."""
    schema = re.compile(config.variable_schema)
    if (config.zero_init_logits_layer or not has_supervised_head(config)
            or not any(schema.match(p) for p in HEAD_PATHS)):
        return
    try:
        if authors.open_source(config.checkpoint) is not None:
            return
        source = resolve_checkpoint(config.checkpoint)
        mismatch = head_mismatch(source, (supervised_input_dim(config), num_classes),
                                 config.ft_proj_selector)
    except (tf.errors.OpError, IndexError, OSError):  # damaged: the restore says so
        return
    if mismatch:
        raise ConfigError(mismatch.refusal())


def _parts(model: tf.keras.Model) -> dict:
    parts = {name: getattr(model, name) for name in ('encoder', 'projection_head', 'supervised_head')}
    return {name: layer for name, layer in parts.items() if layer is not None}


def new_parts(model: tf.keras.Model, restored: list[str]) -> list[str]:
    """The model's parts none of whose variables came from the checkpoint."""
    restored = set(restored)
    return [name for name, layer in _parts(model).items()
            if not any(v.path in restored for v in layer.variables)]
