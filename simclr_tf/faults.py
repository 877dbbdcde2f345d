"""Faults explained: an error that stops a run -> one line naming the cause in the user's terms
(the path, the worker or the flag) and what rerunning will do, and the exit status.

The one place that reads TensorFlow's error types and messages (ResourceExhausted with ENOSPC or
OOM, Unavailable/Aborted from a peer, PermissionDenied, NotFound, DataLoss) for the command line.
Every fault keeps what was complete: checkpoints are written to a temporary name and renamed,
exports likewise, so the line can say where a rerun resumes.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import re
import shutil
import struct
import time
from typing import Optional

from simclr_tf.config import Config

FIX_FIRST = 2  # something must change before a rerun (space, permissions, data, a flag)
RETRY = 75  # EX_TEMPFAIL: rerunning the same command resumes (a lost worker, a signal)

_REASONS = {errno.ENOSPC: 'No space left on device', errno.EDQUOT: 'Disk quota exceeded',
            errno.EROFS: 'Read-only file system', errno.EACCES: 'Permission denied',
            errno.EPERM: 'Operation not permitted', errno.ENOENT: 'No such file or directory'}
# "<path>; <strerror>", as TensorFlow's file systems report a failed call.
_PATH = re.compile(r'(?:^|[\s:\'"])((?:/|[a-z][a-z0-9+.-]*://)[^;\n\'"]*?)(?:\'|"|); ?('
                   + '|'.join(map(re.escape, _REASONS.values())) + ')')
_TASK = re.compile(r'/job:(\w+)(?:/replica:\d+)?/task:(\d+)')
# What a surviving worker's error says about the lost one -> the words for the user.
_PEER_SIGNS = (('stopped sending heartbeats', 'it stopped sending heartbeats (its process ended '
                'or hangs)'),
               ('Connection reset by peer', 'its connection was reset (its process ended)'),
               ('Socket closed', 'its connection closed (its process ended)'),
               ('Connection refused', 'it refuses connections (its process ended)'),
               ('failed to connect', 'it cannot be reached'))
_OOM = re.compile(r'OOM when allocating tensor with shape\s*(\[[\d,\s]*\])|Out of memory while '
                  r'trying to allocate ([\d.]+\s*\w+)|(Failed to allocate memory for the batch)')


@dataclasses.dataclass(frozen=True)
class Explained:
    """What the command line prints (`error: <message>`) and its exit status."""
    message: str
    status: int = FIX_FIRST


class Unreadable(Exception):
    """A file a flag names (e.g. --checkpoint) cannot be read; `explain` says what to do."""

    def __init__(self, flag: str, path: str, cause: BaseException):
        self.flag, self.path, self.cause = flag, path, cause
        super().__init__(f'--{flag}={path} cannot be read ({_first_line(cause)})')


def explain(error: BaseException, config: Config) -> Optional[Explained]:
    """The line and status for `error`, or None when it is none of the faults known here (or
    looking at model_dir to say more fails: the original error is then shown as it is)."""
    try:
        return _explain(error, config)
    except Exception:  # noqa: BLE001 - never hide the fault behind an error of explaining it
        logging.debug('could not explain %s', type(error).__name__, exc_info=True)
        return None


def _explain(error: BaseException, config: Config) -> Optional[Explained]:
    import tensorflow as tf
    text = str(error)
    path, reason = _path_and_reason(error, text)
    if isinstance(error, Unreadable):
        return Explained(_unreadable_flag(error, config))
    if isinstance(error, MemoryError) or (isinstance(error, tf.errors.ResourceExhaustedError)
                                          and _OOM.search(text)):
        return Explained(_out_of_memory(text, config))
    if reason in ('No space left on device', 'Disk quota exceeded'):
        return Explained(_disk_full(path, reason, config))
    peer = _lost_peer(error, text, config)
    if peer:
        return Explained(peer, RETRY)
    if reason in ('Read-only file system', 'Permission denied', 'Operation not permitted'):
        return Explained(_cannot_write(path, reason, config))
    if reason == 'No such file or directory' and path:
        return Explained(_gone(path, config))
    if isinstance(error, tf.errors.DataLossError):
        return Explained(_damaged_data(text, config))
    if isinstance(error, OSError):
        return Explained(f'{error.filename + ": " if error.filename else ""}'
                         f'{error.strerror or error}')
    if isinstance(error, (tf.errors.PermissionDeniedError, tf.errors.NotFoundError,
                          tf.errors.AlreadyExistsError, tf.errors.FailedPreconditionError,
                          tf.errors.ResourceExhaustedError)):
        return Explained(f'{_first_line(error)} ({type(error).__name__})')
    return None


# ---------------------------------------------------------------- the faults
def _disk_full(path: Optional[str], reason: str, config: Config) -> str:
    where = path or config.model_dir
    what = _what_was_written(where, config)
    need = _checkpoint_bytes(config.model_dir)
    free = _free_bytes(where)
    sizes = ', '.join(s for s in (f'a checkpoint takes {_mb(need)}' if need else '',
                                  f'{_mb(free)} free' if free is not None else '') if s)
    return (f'disk full ({reason.lower()}) writing {what}{f" ({sizes})" if sizes else ""}. '
            f'Free space there or move model_dir to a larger disk (copy it whole), then '
            f'{_rerun(config)}')


def _cannot_write(path: Optional[str], reason: str, config: Config) -> str:
    where = path or config.model_dir
    if _under(where, config.model_dir):
        return (f'cannot write {_what_was_written(where, config)}: {reason.lower()} ({where}). '
                f'Make model_dir writable (or copy it whole to a writable --model_dir), then '
                f'{_rerun(config)}')
    return (f'cannot read or write {where}: {reason.lower()}{_flag_of(where, config)}. Fix its '
            f'permissions, then {_rerun(config)}')


def _gone(path: str, config: Config) -> str:
    if _under(path, config.dataset):
        return (f'dataset file {path} is gone: --dataset={config.dataset} was moved or removed '
                f'while the run read it. Put it back, then {_rerun(config)}')
    if _under(path, config.model_dir):
        return (f'{path} was removed from model_dir={config.model_dir} while the run used it. '
                f'{_rerun(config, capital=True)}')
    return f'{path}: no such file or directory{_flag_of(path, config)}'


def _damaged_data(text: str, config: Config) -> str:
    """A TFDS dataset's record file that fails its length or checksum test."""
    detail = _first_line(text)
    try:
        from simclr_tf import sources
        source = sources.open_source(config.dataset, config.data_dir)
    except Exception:  # noqa: BLE001 - the line is still worth printing without the source
        source = None
    builder = getattr(source, 'builder', None)
    if builder is None:
        return f'data loss reading --dataset={config.dataset}: {detail}. {_rerun(config, True)}'
    shard = damaged_shard(builder, [config.train_split, config.eval_split])
    what = f'{shard} is truncated' if shard else 'one of its record files is damaged'
    return (f'TFDS dataset {config.dataset!r} is damaged: {what} ({detail}). Rebuild it (remove '
            f'{builder.data_dir} and run `tfds build {config.dataset} --data_dir='
            f'{config.data_dir or os.path.dirname(os.path.dirname(builder.data_dir))}`) or copy it '
            f'again, then {_rerun(config)}')


def _out_of_memory(text: str, config: Config) -> str:
    match = _OOM.search(text)
    detail = ''
    if match and match.group(1):
        detail = f' (a tensor of shape {"".join(match.group(1).split())})'
    elif match and match.group(2):
        detail = f' (allocating {match.group(2)})'
    elif match and match.group(3):
        detail = ' (for a batch of the input pipeline)'
    if config.mode == 'export':  # traced for one image at a time: no batch flag to lower
        remedies = []
    elif config.mode == 'eval':
        remedies = [f'lower --eval_batch_size (now {config.eval_batch_size})']
    else:
        remedies = [f'lower --train_batch_size (now {config.train_batch_size}; a run keeps its '
                    'batch size, so in a new --model_dir or with --start_over)']
    if config.cache_dataset:  # resumable: the first thing to try
        remedies.insert(0, 'set --cache_dataset=False (the decoded images are kept in memory)')
    remedies.append(f'give the process more memory and {_rerun(config)}')
    first = ', or '.join(remedies)
    return f'out of memory{detail}. {first[0].upper()}{first[1:]}'


def _lost_peer(error: BaseException, text: str, config: Config) -> Optional[str]:
    """A multi-worker run whose peer stopped answering: the worker, and restart them all."""
    import tensorflow as tf
    if not isinstance(error, (tf.errors.UnavailableError, tf.errors.AbortedError,
                              tf.errors.CancelledError, tf.errors.DeadlineExceededError,
                              tf.errors.InternalError, tf.errors.UnknownError)):
        return None
    spec = json.loads(os.environ.get('TF_CONFIG', '{}') or '{}')
    cluster, task = spec.get('cluster', {}), spec.get('task', {})
    size = sum(len(v) for k, v in cluster.items() if k in ('chief', 'worker'))
    if size < 2:
        return None
    me = (task.get('type'), int(task.get('index', 0)))
    others = [(job, int(i)) for job, i in _TASK.findall(text) if (job, int(i)) != me
              and job in cluster]
    if others:
        job, i = others[0]
        who = f'{job} {i} ({cluster[job][i]})' if i < len(cluster[job]) else f'{job} {i}'
    else:
        who = 'another worker'
    reason = next((words for sign, words in _PEER_SIGNS if sign.lower() in text.lower()),
                  f'it stopped answering ({type(error).__name__})')
    return (f'lost {who}: {reason}. A multi-worker run cannot go on '
            f'without it: start all {size} workers again with the same command; they '
            f'{_resume_phrase(config)}')


def _unreadable_flag(error: Unreadable, config: Config) -> str:
    writing = os.path.exists(error.path + '_temp') or _recently_written(error.path)
    likely = ('another run is still writing it' if writing
              else 'it is damaged, or another run is still writing it')
    return (f'--{error.flag}={error.path} cannot be read ({_first_line(error.cause)}): {likely}. '
            f'Wait for that save to finish, or pass its directory to start from its newest '
            f'complete checkpoint; model_dir={config.model_dir} holds no checkpoint yet, so '
            f'rerunning starts from --{error.flag} again')


# ---------------------------------------------------------------- a checkpoint's files
# What TensorFlow says when a checkpoint's files are damaged -> the words for the user. The
# reader checks every tensor against the checksum its index holds, so damage anywhere in the data
# (random bytes, a zeroed block, one flipped byte) says "Checksum does not match".
_DAMAGE_SIGNS = (('Checksum does not match', 'its data fails its checksum'),
                 ('Read less bytes than requested', 'a file of it is cut short'),
                 ('Failed to find any matching files', 'a file of it is missing'),
                 ('No such file or directory', 'a file of it is missing'),
                 ('not an sstable', 'its index is damaged'),
                 ('too short to be an sstable', 'its index is damaged'),
                 ('Unable to read file', 'its index is damaged'),
                 ('Error parsing message', 'its object graph is damaged'))


def checkpoint_damage(error: BaseException) -> Optional[str]:
    """What is damaged in a checkpoint, in words, if `error` (from reading it) says its files are
    damaged: checksum mismatch, cut short, a shard missing, a garbled index. None for any other
    error (permission denied, ...): then the checkpoint may well be intact."""
    if isinstance(error, IndexError):  # TensorFlow's reader past the end of a short file
        return 'a file of it is cut short'
    text = str(error)
    words = next((w for sign, w in _DAMAGE_SIGNS if sign.lower() in text.lower()), None)
    if words is None and type(error).__name__ == 'DecodeError':  # protobuf's, on the graph
        words = 'its object graph is damaged'
    if words == 'a file of it is missing':
        path, _ = _path_and_reason(error, text)
        return f'{os.path.basename(path)} is missing' if path else words
    return words


def permission_denied(error: BaseException) -> Optional[str]:
    """The path (or '' when TensorFlow's text names none) that `error` says may not be read or
    written for lack of permission; None for any other error."""
    import tensorflow as tf
    path, reason = _path_and_reason(error, str(error))
    if reason in ('Permission denied', 'Operation not permitted') or isinstance(
            error, (PermissionError, tf.errors.PermissionDeniedError)):
        return path or getattr(error, 'filename', None) or ''
    return None


def first_line(error) -> str:
    """An error's first line without TensorFlow's internal text ("{{function_node …}}",
    "[Op:…]"), for one-line messages."""
    return _first_line(error)


# ---------------------------------------------------------------- helpers
def _first_line(error) -> str:
    text = str(error).strip()
    text = re.sub(r'\{\{[^}]*\}\}\s*', '', text)  # TensorFlow's "{{function_node …}}" prefix
    text = re.sub(r'\s*\[Op:\w+\].*', '', text).replace("' failed with ", ': ')  # TFRecord's
    return (text.splitlines() or [type(error).__name__])[0][:200]


def _path_and_reason(error: BaseException, text: str) -> tuple[Optional[str], Optional[str]]:
    if isinstance(error, OSError) and error.errno in _REASONS:
        return error.filename, _REASONS[error.errno]
    match = _PATH.search(text)
    if match:
        return match.group(1), match.group(2)
    reason = next((r for r in _REASONS.values() if r in text), None)
    return None, reason


def _under(path: Optional[str], root: Optional[str]) -> bool:
    if not path or not root:
        return False
    path, root = os.path.abspath(path), os.path.abspath(root)
    return path == root or path.startswith(root.rstrip('/') + '/')


def _flag_of(path: str, config: Config) -> str:
    for flag in ('dataset', 'data_dir', 'checkpoint', 'model_dir'):
        if _under(path, getattr(config, flag)):
            return f' (--{flag}={getattr(config, flag)})'
    return ''


def _what_was_written(path: str, config: Config) -> str:
    name = os.path.relpath(path, config.model_dir) if _under(path, config.model_dir) else path
    where = f'in model_dir={config.model_dir}'
    ckpt = re.search(r'(?:^|/)(ckpt-\d+)(?:_temp|\.)', name + '.')
    export = re.search(r'saved_model/\.(?:tmp|old)-(\d+)-|saved_model/(\d+)', name)
    if ckpt:
        return f'checkpoint {ckpt.group(1)} {where}'
    if export:
        return f'the export saved_model/{export.group(1) or export.group(2)} {where}'
    if 'events.out.tfevents' in name:
        return f'TensorBoard summaries ({os.path.basename(name)}) {where}'
    return f'{name} {where}' if name != path else path


def _checkpoint_bytes(model_dir: str) -> int:
    """The size of model_dir's newest checkpoint (0 if none)."""
    import tensorflow as tf
    from simclr_tf.model_dir import list_checkpoints
    found = list_checkpoints(model_dir)
    if not found:
        return 0
    return sum(tf.io.gfile.stat(p).length for p in tf.io.gfile.glob(found[-1][1] + '.*'))


def _free_bytes(path: str) -> Optional[int]:
    """Free bytes on the local file system holding `path` (None for remote ones)."""
    if '://' in path:
        return None
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path or '.').free
    except OSError:
        return None


def _mb(n: int) -> str:
    return f'{n / 2**20:.1f} MB'


def _recently_written(path: str) -> bool:
    try:
        return time.time() - os.path.getmtime(path + '.index') < 60
    except OSError:
        return False


def _newest(model_dir: str) -> Optional[str]:
    """model_dir's newest checkpoint whose index reads (what a rerun resumes from), or None."""
    import tensorflow as tf
    from simclr_tf.model_dir import list_checkpoints
    for _, prefix in reversed(list_checkpoints(model_dir)):
        try:
            tf.train.load_checkpoint(prefix)
            return prefix
        except (tf.errors.OpError, ValueError, OSError):
            continue
    return None


def _resume_phrase(config: Config, s: str = '') -> str:
    """'resume from <newest checkpoint>' or where a run without one starts; `s`: 's' for 'it'."""
    newest = _newest(config.model_dir)
    if newest:
        return f'resume{s} from {newest}'
    return f'start{s} from --checkpoint={config.checkpoint}' if config.checkpoint else \
        f'start{s} from scratch'


def _rerun(config: Config, capital: bool = False) -> str:
    """What rerunning the same command does, for this config's mode and model_dir."""
    if config.mode == 'eval':
        what = 'rerun the same command: it evaluates the checkpoints not evaluated yet'
    elif config.mode == 'export':
        what = 'rerun the same command: it exports again'
    else:
        what = f'rerun the same command: it {_resume_phrase(config, "s")}'
    return what[0].upper() + what[1:] if capital else what


def damaged_shard(builder, splits: list[str], seconds: float = 10) -> Optional[str]:
    """The first of the splits' local TFRecord files whose record framing runs past its end (a
    truncated copy or write), else None; reads 8 bytes a record, gives up after `seconds`."""
    deadline = time.time() + seconds
    for split in splits:
        try:
            files = [i.filename for i in builder.info.splits[split.split('[')[0]].file_instructions]
        except (KeyError, ValueError, AttributeError):
            continue
        for path in files:
            if time.time() > deadline:
                return None
            if _truncated(path):
                return path
    return None


def _truncated(path: str) -> bool:
    """Whether a TFRecord file's records (length: 8 bytes, its CRC: 4, data, the data's CRC: 4)
    run past its end."""
    try:
        size = os.path.getsize(path)
        with open(path, 'rb') as f:
            offset = 0
            while offset < size:
                header = f.read(8)
                if len(header) < 8:
                    return True
                length = struct.unpack('<Q', header)[0]
                offset += 8 + 4 + length + 4
                if offset > size:
                    return True
                f.seek(offset)
    except OSError:
        return False
    return False
