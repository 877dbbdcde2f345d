"""Checkpoints: save and resume a run, and start fine-tuning from another run's weights.

Where a training run's weights come from (`Start`: resume, `--checkpoint` of this project or of
the authors, scratch) is decided once, before anything is built (`resolve_start`, read by the
start plan); restoring then does what it says.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import time
from typing import Optional

import tensorflow as tf
from google.protobuf.message import DecodeError
from tensorflow.core.protobuf import trackable_object_graph_pb2

from simclr_tf import authors, authors_layout, faults, optim
from simclr_tf import model_dir as model_dir_lib
from simclr_tf.config import Config, ConfigError
from simclr_tf.heads import HeadMismatch
from simclr_tf.model import has_supervised_head, supervised_input_dim
from simclr_tf.model_dir import list_checkpoints  # noqa: F401  (its home is model_dir.py)

# The model's parts, and the root of their variables' paths.
PARTS = {'encoder': 'resnet/', 'projection_head': 'head_contrastive/',
         'supervised_head': 'head_supervised/'}


def resolve_checkpoint(path: str) -> str:
    """A checkpoint prefix from a prefix or a directory (its latest checkpoint)."""
    if tf.io.gfile.isdir(path):
        latest = latest_in(path)
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


def latest_in(directory: str) -> Optional[str]:
    """A directory's latest checkpoint: as its `checkpoint` state file says, else the newest
    `ckpt-<N>` there (a state file that is not text is ignored, as TensorFlow ignores one it
    cannot parse)."""
    try:
        latest = tf.train.latest_checkpoint(directory)
    except UnicodeDecodeError:
        latest = None
    if latest is not None:
        return latest
    found = list_checkpoints(directory)  # listed only when the state file names none
    return found[-1][1] if found else None


def check_start(path: str) -> None:
    """Fails early, with a clear message, when `--checkpoint` names nothing to start from: a
    checkpoint (prefix or directory) or one of the authors' SavedModel exports."""
    if tf.io.gfile.isdir(path) and latest_in(path) is None:
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
    model_dir, newest first, sets aside (renames, never deletes) any whose files are damaged, and
    rewrites the state file to what it found. A checkpoint it may not read (permissions) or of
    another model stops the run instead. On a non-chief worker of a multi-worker run every
    worker must take part in the save; those write to a scratch directory that is removed.
    """

    def __init__(self, config: Config, model: tf.Module, optimizer: tf.Module, chief: bool = True,
                 task_id: int = 0):
        self.config = config
        self.chief = chief
        self._model, self._optimizer = model, optimizer
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer_state(optimizer),
                                              **loss_scale_state(optimizer))
        self._loss_scale = loss_scale_state(optimizer)
        self._scratch = None
        self._directory = config.model_dir
        if not chief:
            self._scratch = os.path.join(config.model_dir, f'.worker_{task_id}_scratch')
            self._directory = self._scratch
        self._manager = None  # made at the first save: it reads the state file

    @property
    def manager(self) -> tf.train.CheckpointManager:
        if self._manager is None:
            self._manager = self._new_manager()
        return self._manager

    def _new_manager(self) -> tf.train.CheckpointManager:
        try:
            return tf.train.CheckpointManager(self.checkpoint, directory=self._directory,
                                              max_to_keep=self.config.keep_checkpoint_max)
        except UnicodeDecodeError:  # TensorFlow ignores a state file it cannot parse, not this
            state = os.path.join(self._directory, 'checkpoint')
            found = list_checkpoints(self._directory)
            logging.warning('%s is not text; written again from the checkpoints found', state)
            if found:
                write_state_file(self._directory, found[-1][1], [p for _, p in found])
            else:  # it names no checkpoint there: the next save writes it
                tf.io.gfile.remove(state)
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

    def restore(self, model: tf.keras.Model, start: Optional[Start] = None,
                dry_run: bool = False) -> str:
        """Restores what `start` says (default: `resolve_start` now); says what it did.

        A resume tries model_dir's checkpoints newest first and sets aside (renames) those whose
        files are damaged; `dry_run` only reads (nothing renamed, no state file written).
        """
        if start is None:
            found = list_checkpoints(self.config.model_dir)
            start = resolve_start(self.config, found, getattr(model, 'num_classes', None))
        if start.kind == 'resume':
            return self._resume(start, dry_run)
        if start.kind == 'scratch':
            return 'started from scratch'
        return start_from(model, start, self.config)

    def _resume(self, start: Start, dry_run: bool) -> str:
        model_dir = self.config.model_dir
        resumed, set_aside = self._restore_newest_readable(start.checkpoints,
                                                           self.chief and not dry_run)
        if resumed is None:
            moved = '' if dry_run else ' and were set aside'
            raise ConfigError(
                f'no readable checkpoint in model_dir={model_dir!r}: '
                f'{", ".join(set_aside)} could not be read{moved}. Pass --start_over to train '
                'from scratch (other files are moved aside too), or use another --model_dir')
        if self.chief and not dry_run:
            paths = [p for _, p in start.checkpoints]  # those newer than `resumed` were set aside
            write_state_file(model_dir, resumed, paths[:paths.index(resumed) + 1])
            self._manager = None  # made again: it reads the state file when made
        return f'resumed from {resumed}'

    def _root(self, prefix: str) -> tf.train.Checkpoint:
        """A new tf.train.Checkpoint of the model and optimizer for restoring `prefix`.

        New for each attempt: a restore that fails leaves a deferred restoration of the root's
        `save_counter` (created only after a restore succeeds) pointing at the checkpoint that
        failed. A later restore through the same root creates `save_counter`, runs that stale
        restoration (reading the failed, by then renamed, checkpoint: NotFoundError) and fails,
        and the one after finds `save_counter` unmatched, taken for another model. Checkpoints
        written before model variables were keyed by name need the optimizer's object graph."""
        if is_legacy(prefix):
            return tf.train.Checkpoint(model=self._model, optimizer=self._optimizer)
        return tf.train.Checkpoint(model=self._model, optimizer=optimizer_state(self._optimizer))

    def _restore_newest_readable(self, found: tuple[tuple[int, str], ...], rename: bool
                                 ) -> tuple[Optional[str], list[str]]:
        """(the prefix restored, the damaged prefixes with their damage), trying the newest
        first; `rename`: set the damaged ones aside. Stops (ConfigError) at a checkpoint it may
        not read or of another model: those are not damaged, and are never renamed."""
        set_aside = []
        for _, prefix in reversed(found):
            damage = read_problem(prefix)
            if damage is None:
                damage = self._restore_into_model(prefix)
            if damage is None:
                if self._loss_scale:  # float16: its scale if saved, else it starts afresh
                    tf.train.Checkpoint(**self._loss_scale).restore(prefix).expect_partial()
                return prefix, set_aside
            if rename:
                logging.warning('checkpoint %s is damaged (%s): set aside as %s; trying the one '
                                'before', prefix, damage, set_aside_checkpoint(prefix))
            else:
                logging.warning('checkpoint %s is damaged (%s); trying the one before', prefix,
                                damage)
            set_aside.append(f'{prefix} ({damage})')
        return None, set_aside

    def _restore_into_model(self, prefix: str) -> Optional[str]:
        """Restores `prefix` (its files read whole already); None if that worked, else its
        damage (its files changed since they were read)."""
        try:
            self._root(prefix).restore(prefix).assert_existing_objects_matched()
        except (AssertionError, ValueError) as e:  # variables missing or of other shapes
            raise ConfigError(f'checkpoint {prefix} does not hold this model ({MISMATCH}: '
                              f'{first_line(e)}); were its flags different? (see '
                              'model_dir/config.json)') from e
        except READ_ERRORS as e:
            return damage_or_stop(prefix, e)
        return None


UNREADABLE = 'unreadable-'  # prefix of a checkpoint's files once set aside
MISMATCH = 'structure mismatch'
# What reading a checkpoint's files raises: TensorFlow's errors (its reader raises the base
# OpError for most), IndexError past the end of a short file, protobuf's DecodeError.
READ_ERRORS = (tf.errors.OpError, IndexError, OSError, DecodeError)


class Damaged(Exception):
    """A checkpoint whose files are damaged (checksum mismatch, cut short, a file missing, a
    garbled index)."""

    def __init__(self, prefix: str, damage: str):
        self.prefix, self.damage = prefix, damage
        super().__init__(f'checkpoint {prefix} is damaged ({damage})')


def write_state_file(model_dir: str, latest: str, paths: list[str]) -> None:
    """The `checkpoint` state file CheckpointManager reads, naming the checkpoints found (written
    to a temporary file, then renamed over the old one).

    Each checkpoint gets its timestamp (its index file's time) and the file a preserved time
    before them all: CheckpointManager keeps forever every checkpoint whose timestamp is not later
    than `last_preserved_timestamp`, so without them `keep_checkpoint_max` would never delete the
    checkpoints from before a resume."""
    now = time.time()
    stamps = [min(_written_at(p + '.index', now), now) for p in paths]
    lines = [f'model_checkpoint_path: "{os.path.basename(latest)}"']
    lines += [f'all_model_checkpoint_paths: "{os.path.basename(p)}"' for p in paths]
    lines += [f'all_model_checkpoint_timestamps: {t!r}' for t in stamps]
    lines += [f'last_preserved_timestamp: {min(stamps, default=now) - 1.0!r}']
    path = os.path.join(model_dir, 'checkpoint')
    with tf.io.gfile.GFile(path + '.tmp-resume', 'w') as f:
        f.write('\n'.join(lines) + '\n')
    tf.io.gfile.rename(path + '.tmp-resume', path, overwrite=True)


def _written_at(path: str, default: float) -> float:
    try:  # tf.io.gfile: model_dir may be a bucket
        return tf.io.gfile.stat(path).mtime_nsec / 1e9
    except tf.errors.OpError:
        return default


def read_problem(prefix: str) -> Optional[str]:
    """None if every tensor of checkpoint `prefix` reads, each checked against the checksum in
    its index; else what is damaged, in words. Read before restoring, so a damaged checkpoint is
    found before any variable is assigned and leaves nothing behind (nor TensorFlow's warnings
    about values left unrestored). Raises ConfigError when the files may not be read, or fail in
    a way that does not say damage: the checkpoint may be intact, and is left in place."""
    try:
        reader = tf.train.load_checkpoint(prefix)
        for key in reader.get_variable_to_shape_map():
            reader.get_tensor(key)
        _object_graph(reader)
    except READ_ERRORS as e:
        return damage_or_stop(prefix, e)
    return None


def damage_or_stop(prefix: str, error: BaseException) -> str:
    """The damage `error` (from reading checkpoint `prefix`) shows, or ConfigError."""
    denied = faults.permission_denied(error)
    if denied is not None:
        raise ConfigError(f'checkpoint {prefix} cannot be read: permission denied '
                          f'({denied or prefix + ".*"}). Fix the permissions of its files, then '
                          'rerun the same command') from error
    damage = faults.checkpoint_damage(error)
    if damage is None:
        raise ConfigError(f'checkpoint {prefix} cannot be read ({faults.first_line(error)}); it '
                          'was left in place. Fix the cause, or move its files aside to go on '
                          'from the one before, then rerun the same command') from error
    return damage


def restore_model(model: tf.Module, prefix: str) -> None:
    """Restores the model's variables from checkpoint `prefix` of a training run (its optimizer's
    are not read): raises Damaged if its files are damaged, ConfigError if they may not be read."""
    damage = read_problem(prefix)
    if damage is None:
        try:
            tf.train.Checkpoint(model=model).restore(prefix).expect_partial() \
                .assert_existing_objects_matched()
            return
        except READ_ERRORS as e:  # its files changed since they were read
            damage = damage_or_stop(prefix, e)
    raise Damaged(prefix, damage)


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


# ------------------------------------------------------------------ where a run starts
@dataclasses.dataclass(frozen=True)
class Start:
    """Where a training run's weights come from, decided before anything is built."""
    kind: str  # 'resume' (model_dir's newest checkpoint), 'checkpoint' (--checkpoint, ours),
    # 'authors' (--checkpoint, one of the authors' checkpoints or SavedModels), 'scratch'
    path: Optional[str] = None  # the checkpoint prefix (or the authors' source) read
    step: int = 0  # the step training starts at
    restored: tuple[str, ...] = ()  # the .path of every variable taken from `path`
    notes: tuple[str, ...] = ()  # parts left as initialised, and why
    zero_head: bool = False  # zero_init_logits_layer: the supervised head zeroed after restoring
    checkpoints: tuple[tuple[int, str], ...] = ()  # resume: model_dir's, oldest first
    source: Optional[authors.Source] = dataclasses.field(default=None, compare=False, repr=False)

    def describe(self, parts: tuple[str, ...] = tuple(PARTS)) -> str:
        """One line, as the run logs it once restored (`parts`: the model's)."""
        if self.kind == 'resume':
            return f'resumes from {self.path} (step {self.step})'
        if self.kind == 'scratch':
            return 'from scratch'
        label = (self.path if self.kind == 'checkpoint'
                 else f"the authors' {self.source.kind} {self.path}")
        return started_from(label, self.restored, self.notes, parts, self.zero_head)


def started_from(label: str, restored, notes, parts, zero_head: bool) -> str:
    """'initialised N variables from <label>; <notes>; new (freshly initialised): <parts>'."""
    message = f'initialised {len(restored)} variables from {label}'
    message += ''.join(f'; {note}' for note in notes)
    new = [p for p in parts if not any(r.startswith(PARTS[p]) for r in restored)]
    if new:
        message += f'; new (freshly initialised): {", ".join(new)}'
    if zero_head and 'supervised_head' in parts:
        message += ' (supervised head zero-initialised)'
    return message


def resolve_start(config: Config, found: list[tuple[int, str]], num_classes: Optional[int]
                  ) -> Start:
    """Where a training run of `config` starts, given model_dir's checkpoints `found` (oldest
    first) and the data's class count. Raises ConfigError (or faults.Unreadable) for a start that
    cannot work: a model_dir of an earlier run with nothing to resume, fine-tuning from nothing,
    a --checkpoint that is missing, of another model or whose supervised head this run's cannot
    take. --start_over moves model_dir's files aside first: its checkpoints do not count."""
    if config.train_mode == 'supervised' and config.checkpoint:
        raise ConfigError(f'train_mode=supervised trains from scratch: it takes no --checkpoint '
                          f'({config.checkpoint!r}); --train_mode=finetune starts from one')
    if found and not config.start_over:
        return Start('resume', found[-1][1], found[-1][0], checkpoints=tuple(found))
    kept = [] if config.start_over else model_dir_lib.contents(config.model_dir)
    if kept:
        raise ConfigError(
            f'model_dir={config.model_dir!r} holds no checkpoint to resume from but '
            f'{", ".join(kept)} of an earlier run; training would start from scratch and overwrite '
            'them. Pass --start_over to move them aside and train from scratch, or use another '
            '--model_dir')
    if not config.checkpoint:
        if config.train_mode == 'finetune':
            raise ConfigError(
                'train_mode=finetune needs --checkpoint (a pretrained checkpoint or its model_dir) '
                f'or an existing checkpoint in model_dir={config.model_dir!r}; '
                '--train_mode=supervised trains the classifier from scratch')
        return Start('scratch')
    check_start(config.checkpoint)
    zero_head = config.zero_init_logits_layer and has_supervised_head(config)
    theirs = authors.open_source(config.checkpoint)
    if theirs is not None:  # the authors' TF2 checkpoint or SavedModel (their model zoo)
        entries, notes = authors.placement(config, num_classes, theirs, config.variable_schema)
        return Start('authors', theirs.path, 0, tuple(e.ours for e, _ in entries), tuple(notes),
                     zero_head, source=theirs)
    prefix = resolve_checkpoint(config.checkpoint)
    try:
        restored, notes = _selection(config, prefix, num_classes)
    except (tf.errors.OpError, IndexError, OSError) as e:  # half-written, damaged
        raise faults.Unreadable('checkpoint', prefix, e) from e
    return Start('checkpoint', prefix, 0, restored, notes, zero_head)


def part_paths(config: Config, num_classes: Optional[int]) -> dict[str, list[str]]:
    """The .path of every variable of each part of `config`'s model, without building it (the
    authors' layout of the same architecture names them)."""
    head = num_classes if has_supervised_head(config) else None
    arch = authors_layout.Architecture.of(config, head)
    return {authors.OUR_PARTS[part]: [e.ours for e in entries]
            for part, entries in authors_layout.layout(arch).items()}


def _selection(config: Config, prefix: str, num_classes: Optional[int]
               ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the variables a start from checkpoint `prefix` of this project restores, notes on parts
    left as initialised): those whose `.path` matches `config.variable_schema` (re.match), in the
    parts the checkpoint holds.

    The authors' linear-eval recipe passes `(?!global_step|(?:.*/|^)Momentum|head)`: every encoder
    variable, no head. A part the checkpoint does not hold (the supervised head of a run
    pretrained without lineareval_while_pretraining) starts fresh, as the authors'
    restore(...).expect_partial(). A selected supervised head of another shape starts fresh
    under zero_init_logits_layer, else the run is refused.
    """
    pattern = re.compile(config.variable_schema)
    paths = part_paths(config, num_classes)
    selected = {part: [p for p in ps if pattern.match(p)] for part, ps in paths.items() if ps}
    saved = read_saved(prefix)
    if selected and not saved.parts & set(selected):
        raise ConfigError(f'checkpoint={prefix!r} holds none of this model\'s parts '
                          f'({", ".join(selected)})')
    unselected = [p for p in selected if not selected[p]]
    notes = [f'{", ".join(unselected)} not selected by --variable_schema'] if unselected else []
    for part in [p for p in selected if selected[p] and p not in saved.parts]:
        notes.append(f'no {part} in the checkpoint')
        selected[part] = []
    if selected.get('supervised_head'):
        mismatch = _head_mismatch(prefix, saved.head, (supervised_input_dim(config), num_classes),
                                  config.ft_proj_selector)
        if mismatch and not config.zero_init_logits_layer:
            raise ConfigError(mismatch.refusal())
        if mismatch:
            notes.append(mismatch.fresh())
            selected['supervised_head'] = []
    return tuple(p for ps in selected.values() for p in ps), tuple(notes)


def start_from(model: tf.keras.Model, start: Start, config: Config) -> str:
    """Restores `start`'s variables (a --checkpoint of ours or the authors') into `model`, reading
    only; zeroes the supervised head under zero_init_logits_layer. Says what it did."""
    if start.kind == 'authors':
        restored, notes = authors.restore(model, config, start.source, config.variable_schema)
        label = f"the authors' {start.source.kind} {start.path}"
    else:
        try:
            restored = restore_parts(model, start.path, start.restored)
        except (tf.errors.OpError, IndexError, OSError) as e:  # half-written, damaged
            raise faults.Unreadable('checkpoint', start.path, e) from e
        notes, label = start.notes, start.path
    if start.zero_head and model.supervised_head is not None:
        for v in model.supervised_head.trainable_variables:
            v.assign(tf.zeros_like(v))
    return started_from(label, restored, notes, tuple(_parts(model)), start.zero_head)


def restore_parts(model: tf.keras.Model, source: str, paths: tuple[str, ...]) -> list[str]:
    """Restores the variables named `paths` from checkpoint `source` (of this project); returns
    the paths restored. Only the parts holding one of them are read; the other variables of those
    parts are put back as they were."""
    wanted = {name: layer for name, layer in _parts(model).items()
              if any(v.path in paths for v in layer.variables)}
    keep = {id(v): v.numpy() for v in model.variables if v.path not in paths}
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
    for v in model.variables:  # parts restored whole: put the unselected variables back
        if id(v) in keep:
            v.assign(keep[id(v)])
    restored = [v.path for v in model.variables if v.path in paths]
    logging.info('restored %d variables from %s: %s', len(restored), source,
                 ', '.join(f'{name} {sum(p.startswith(PARTS[name]) for p in restored)}'
                           for name in _parts(model)))
    return restored


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


# Where the supervised head's kernel sits in the object graph (Keras 3 names it `_kernel`).
HEAD_KERNEL = ('model', 'supervised_head', 'linear_layer', 'dense')
KERNEL_NAMES = ('_kernel', 'kernel')


@dataclasses.dataclass(frozen=True)
class Saved:
    """What a checkpoint of this project holds, as a start reads it."""
    parts: frozenset[str]  # the model parts it holds
    head: Optional[tuple[int, ...]]  # [inputs, classes] of its supervised head's kernel


def read_saved(source: str) -> Saved:
    """The parts and the supervised head's shape of a checkpoint of this project, read once
    through its object graph (older checkpoints key head weights under the optimizer, so their
    key names do not tell)."""
    reader = tf.train.load_checkpoint(source)
    shapes = reader.get_variable_to_shape_map()
    graph = _object_graph(reader)
    if graph is None:  # written by key: the keys tell
        parts = {name.split('/')[1] for name in shapes
                 if name.startswith('model/') and name.count('/') > 1}
        keys = ['/'.join(HEAD_KERNEL + (name,)) + authors.SUFFIX for name in KERNEL_NAMES]
    else:
        model = _child(graph, 0, ('model',))
        parts = {c.local_name for c in graph.nodes[model].children} if model is not None else set()
        node = 0
        for name in HEAD_KERNEL:
            node = _child(graph, node, (name,))
        node = _child(graph, node, KERNEL_NAMES)
        keys = [a.checkpoint_key for a in graph.nodes[node].attributes] if node is not None else []
    return Saved(frozenset(parts), next((tuple(shapes[k]) for k in keys if k in shapes), None))


def saved_parts(source: str) -> set[str]:
    """The model parts a checkpoint of this project holds."""
    return set(read_saved(source).parts)


def saved_head_shape(source: str) -> Optional[tuple[int, ...]]:
    """[inputs, classes] of the supervised head's kernel in a checkpoint of this project; None if
    it has none."""
    return read_saved(source).head


def _head_mismatch(source: str, theirs: Optional[tuple[int, ...]],
                   ours: tuple[int, Optional[int]], selector: int) -> Optional[HeadMismatch]:
    """How the supervised head of checkpoint `source` ([inputs, classes] `theirs`) differs from
    this run's (`ours`, classes None: inputs only; `selector` this run's ft_proj_selector), None
    if it fits or the checkpoint holds no head. The checkpoint's selector comes from config.json
    beside it."""
    if theirs is None or (theirs[0] == ours[0] and ours[1] in (None, theirs[1])):
        return None
    try:
        written = model_dir_lib.read_config(os.path.dirname(source)) or {}
    except ConfigError:  # unreadable: the message names the widths only
        written = {}
    return HeadMismatch(f'checkpoint {source}', theirs, ours, written.get('ft_proj_selector'),
                        selector)


def _parts(model: tf.keras.Model) -> dict:
    return {name: getattr(model, name) for name in PARTS if getattr(model, name) is not None}
