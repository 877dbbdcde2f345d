"""The model_dir belongs to one run: path checks, its checkpoints, a lock, the config check (and its
config as the defaults of runs that read it), leftovers, start over.

Nothing here deletes a checkpoint or an export: what looks damaged or is replaced is renamed or
moved aside, only our own temporary files are removed.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import re
import socket
import sys
from typing import Any, Optional

import tensorflow as tf

from simclr_tf.config import Config, ConfigError

# Fields that may differ between the run that wrote model_dir/config.json and a rerun in the same
# model_dir, as each field declares (config._flag's `resumable`).
RESUMABLE_FIELDS = frozenset(
    f.name for f in dataclasses.fields(Config) if f.metadata['resumable'])
# Fields of one invocation, never taken from a model_dir's config.json (`with_saved_defaults`).
_INVOCATION_FIELDS = frozenset({'mode', 'model_dir', 'start_over', 'dry_run'})
_CKPT_INDEX = re.compile(r'^ckpt-(\d+)\.index$')
_LOCKS: dict[str, Any] = {}  # '<model_dir>:<role>' -> its open lock file, held until exit


def is_local(path: str) -> bool:
    return '://' not in path


def check_path(model_dir: str, create: bool) -> None:
    """Fails with one line naming the problem if model_dir cannot be used as a directory (a file,
    below a file, not writable). Local paths only; remote file systems report when written."""
    if not is_local(model_dir):
        return
    path = os.path.abspath(model_dir)
    probe = path
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        where = 'is a file' if probe == path else f'is below {probe}, which is a file'
        raise ConfigError(f'model_dir={model_dir!r} {where}, not a directory')
    if create and not os.access(probe, os.W_OK | os.X_OK):
        what = 'is' if probe == path else f'cannot be created: {probe} is'
        raise ConfigError(f'model_dir={model_dir!r} {what} not writable (permission denied)')


def lock(model_dir: str, role: str) -> None:
    """Takes model_dir's `role` lock ('train' or 'eval') for the rest of the process, or fails
    naming the process that holds it.

    An exclusive `fcntl.flock` on `model_dir/.<role>.lock`: the kernel releases it when its
    process ends in any way (kill -9 included), so a crash never leaves it held; it works across
    processes on a local disk (and on NFS, where Linux maps it to a byte-range lock). Object stores
    (gs://, s3://) have no locks: there a warning is logged and nothing is locked.
    """
    key = f'{os.path.abspath(model_dir) if is_local(model_dir) else model_dir}:{role}'
    if key in _LOCKS:
        return
    if not is_local(model_dir):
        logging.warning('no lock on %s: file locks need a local or NFS path; make sure only one '
                        'run writes to this model_dir', model_dir)
        return
    import fcntl
    path = os.path.join(model_dir, f'.{role}.lock')
    f = open(path, 'a+')
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or 'unknown process'
        f.close()
        raise ConfigError(f'model_dir={model_dir!r} is in use by another {role} run ({holder}); '
                          'wait for it to end or use another --model_dir') from None
    f.seek(0)
    f.truncate()
    f.write(f'pid {os.getpid()} on {socket.gethostname()} since '
            f'{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M:%S} UTC: '
            f'{" ".join(sys.argv)[:300]}\n')
    f.flush()
    _LOCKS[key] = f


def release_locks() -> None:
    """Releases the locks this process holds (tests; a process's locks go with it)."""
    for f in _LOCKS.values():
        f.close()
    _LOCKS.clear()


def list_checkpoints(model_dir: Optional[str]) -> list[tuple[int, str]]:
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


def check_config(config: Config, saved: Optional[dict[str, Any]]) -> None:
    """Fails, listing the flags, if the model_dir's config.json (`saved`, None: none) differs from
    `config` in a field that must stay fixed for the life of a run (all but RESUMABLE_FIELDS)."""
    if saved is None:
        return
    current = config.to_dict()
    differing = [f'--{k}={current[k]!r} (model_dir has {saved[k]!r})'
                 for k in sorted(current) if k in saved and k not in RESUMABLE_FIELDS
                 and _normalise(saved[k]) != _normalise(current[k])]
    if not differing:
        return
    ways = ('pass --start_over to move its files aside and train from scratch'
            if config.mode in ('train', 'train_then_eval')
            else "drop those flags: mode=eval and export take the model_dir's values")
    raise ConfigError(
        f'model_dir={config.model_dir!r} holds a run with other hyperparameters; this run differs '
        f'in: {", ".join(differing)}. Rerun with the model_dir\'s values, use another '
        f'--model_dir, or {ways}')


def with_saved_defaults(values: dict[str, Any], passed: set[str]) -> dict[str, Any]:
    """The field values of a run that reads a model_dir (mode=eval or export) holding config.json:
    its values, but those of the flags the user passed (`passed`: on the command line or in a
    flagfile) where a run may change them (RESUMABLE_FIELDS: eval split and batch, devices, ...).
    A passed flag that would describe another model, objective or data (architecture, dataset)
    is refused by name. Other modes, and model_dirs without config.json, keep `values`."""
    if values.get('mode') not in ('eval', 'export') or not values.get('model_dir'):
        return values
    saved = read_config(values['model_dir'])
    if saved is None:
        return values
    taken = {k: v for k, v in saved.items()
             if k in values and k not in passed and k not in _INVOCATION_FIELDS}
    refused = [f'--{k}={values[k]!r} (model_dir has {saved[k]!r})' for k in sorted(passed)
               if k in saved and k in values and k not in RESUMABLE_FIELDS
               and _normalise(saved[k]) != _normalise(values[k])]
    if refused:
        raise ConfigError(
            f'mode={values["mode"]} reads the run in model_dir={values["model_dir"]!r} with the '
            f'hyperparameters of its config.json; these flags would describe another model: '
            f'{", ".join(refused)}. Drop them (the model_dir\'s values are the defaults), or use '
            'the model_dir of a run with those values')
    return {**values, **taken}


def read_config(model_dir: str) -> Optional[dict[str, Any]]:
    """model_dir's config.json as written by `write_config`; None when there is none."""
    path = os.path.join(model_dir, 'config.json')
    if not tf.io.gfile.exists(path):
        return None
    try:
        with tf.io.gfile.GFile(path) as f:
            return json.load(f)
    except (ValueError, tf.errors.OpError) as e:
        raise ConfigError(f'{path} is not readable JSON ({e}); move it away to go on') from None


def _normalise(value: Any) -> Any:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if numeric else value


def write_config(config: Config) -> None:
    with tf.io.gfile.GFile(os.path.join(config.model_dir, 'config.json'), 'w') as f:
        f.write(config.to_json())


def clean_leftovers(model_dir: str) -> list[str]:
    """Removes what a killed save leaves behind: `ckpt-<N>_temp/` directories and the state
    file's `checkpoint.tmp*`. Call only while holding the train lock. Returns what it removed."""
    removed = []
    for pattern in ('ckpt-*_temp', 'checkpoint.tmp*'):
        for path in tf.io.gfile.glob(os.path.join(model_dir, pattern)):
            if tf.io.gfile.isdir(path):
                tf.io.gfile.rmtree(path)
            else:
                tf.io.gfile.remove(path)
            removed.append(path)
    for path in removed:
        logging.warning('removed %s, left by a save that was interrupted', path)
    return removed


def contents(model_dir: Optional[str]) -> list[str]:
    """What in model_dir is worth keeping: checkpoints, exports, results (for messages)."""
    if not model_dir or not tf.io.gfile.isdir(model_dir):
        return []
    found = sorted(os.path.basename(p) for pattern in ('ckpt-*.index', 'unreadable-*.index')
                   for p in tf.io.gfile.glob(os.path.join(model_dir, pattern)))
    exports = os.path.join(model_dir, 'saved_model')
    if tf.io.gfile.isdir(exports):
        found += [f'saved_model/{n.rstrip("/")}' for n in sorted(tf.io.gfile.listdir(exports))
                  if n.rstrip('/').isdigit()]
    found += sorted(os.path.basename(p)
                    for p in tf.io.gfile.glob(os.path.join(model_dir, 'result*.json')))
    return found


def move_aside(model_dir: str) -> Optional[str]:
    """--start_over: moves every file of model_dir (but locks and earlier `previous-*` folders)
    into `model_dir/previous-<UTC time>/`; returns that folder, or None if there was nothing."""
    if not tf.io.gfile.isdir(model_dir):
        return None
    names = [n.rstrip('/') for n in tf.io.gfile.listdir(model_dir)]
    names = [n for n in names if not (n.endswith('.lock') or n.startswith('previous-'))]
    if not names:
        return None
    target = os.path.join(model_dir, 'previous-' + datetime.datetime.now(
        datetime.timezone.utc).strftime('%Y%m%d-%H%M%S'))
    tf.io.gfile.makedirs(target)
    for name in names:
        tf.io.gfile.rename(os.path.join(model_dir, name), os.path.join(target, name))
    logging.warning('--start_over: moved %d entries of %s to %s', len(names), model_dir, target)
    return target
