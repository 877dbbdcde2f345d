"""What a run prints: its own lines and real warnings by default, TensorFlow's chatter on request.

Left alone, TensorFlow prints on a CPU-only machine: its C++ start-up notices (the oneDNN notice
and "could not find cuda drivers", twice, once per TensorFlow library, each after absl's "All log
messages before absl::InitializeLog()"), a failed `cuInit` at device discovery, and INFO lines
from its Python code at every checkpoint ("Sharding callback duration") and export (a list of
renamed input names). `setup` hides those unless the user asks for them:

- `verbosity >= 1` (absl's `--verbosity`/`-v`): nothing is hidden; TensorFlow's C++ log level
  defaults to INFO.
- `TF_CPP_MIN_LOG_LEVEL` set by the user: TensorFlow's C++ output is left as the user set it.
- otherwise: C++ INFO and WARNING lines are off (`TF_CPP_MIN_LOG_LEVEL=2`; errors stay), the
  start-up notices above are dropped (they are printed before that level takes effect), and INFO
  lines that TensorFlow's, Keras' and TFDS' Python code logs are dropped. Warnings and errors of
  every library stay, as do all lines of this program.

Call `setup` before anything imports TensorFlow: it imports TensorFlow and discovers the devices
itself, with the start-up notices filtered out of stderr. Every console command calls it first:
the program (`simclr_tf_cli`, after absl parsed `--verbosity`), `simclr-tf-probe` and
`simclr-tf-augment` (whose modules therefore import TensorFlow only after it). The test session
imports TensorFlow through `import_tensorflow_quietly` (tests/conftest.py), the same without the
filter on Python INFO records, which tests of logging read.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import tempfile
from typing import Callable, Iterator

# TensorFlow's start-up notices, by the text or C++ source file that prints them. The cuInit
# failure is dropped only together with the notice that no CUDA driver is installed, i.e. when
# failing is all it can do; on a machine with a driver a failure is a real error and shows.
_NO_DRIVER = 'Could not find cuda drivers on your machine'
_NOTICES = (
    'WARNING: All log messages before absl::InitializeLog() is called are written to STDERR',
    _NO_DRIVER,                                # cudart_stub.cc
    'oneDNN custom operations are on',         # port.cc
    'cpu_feature_guard.cc',                    # "This TensorFlow binary is optimized to use ..."
    'To enable the following instructions:',   # ... its second line
)
_CUINIT = 'failed call to cuInit'


def setup(verbosity: int = 0) -> None:
    """Sets TensorFlow's logging as described in the module docstring, then imports TensorFlow."""
    if verbosity >= 1:
        os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '0')
        _import_tensorflow()
        return
    from absl import logging as absl_logging
    handler = absl_logging.get_absl_handler()
    if not any(isinstance(f, _LibraryInfo) for f in handler.filters):  # once a process
        handler.addFilter(_LibraryInfo())
    import_tensorflow_quietly()


def import_tensorflow_quietly() -> None:
    """Imports TensorFlow and discovers the devices with C++ INFO and WARNING lines off and the
    start-up notices dropped; a `TF_CPP_MIN_LOG_LEVEL` the user set is left as it is, unfiltered.
    """
    if 'TF_CPP_MIN_LOG_LEVEL' in os.environ:
        _import_tensorflow()
        return
    os.environ['TF_CPP_MIN_LOG_LEVEL'] = '2'
    with _filtered_stderr(_drop_notices):
        _import_tensorflow()


def _import_tensorflow() -> None:
    # oneDNN kernels: TensorFlow turns them on by itself only on some Intel CPUs; on AMD CPUs they
    # train and extract features much faster than its default kernels (docs/benchmarks.md). Every
    # command imports TensorFlow here first; TF_ENABLE_ONEDNN_OPTS=0 turns them off.
    os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '1')
    import tensorflow as tf
    tf.config.list_physical_devices()  # device discovery: where the cuInit failure is logged


class _LibraryInfo(logging.Filter):
    """Drops records below WARNING that TensorFlow's, Keras' or TFDS' own code logs (through
    absl's logger, which this program shares, or `tf.get_logger()`: both reach absl's handler);
    recognised by the file that logs them."""

    def __init__(self) -> None:
        super().__init__()
        roots = []
        for name in ('tensorflow', 'keras', 'tf_keras', 'tensorflow_datasets'):
            spec = importlib.util.find_spec(name)  # finds, does not import
            if spec is not None and spec.submodule_search_locations:
                roots += [os.path.join(path, '') for path in spec.submodule_search_locations]
        self.roots = tuple(roots)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.pathname.startswith(self.roots)


def _drop_notices(lines: list[str]) -> list[str]:
    no_driver = any(_NO_DRIVER in line for line in lines)
    return [line for line in lines
            if not any(notice in line for notice in _NOTICES)
            and not (no_driver and _CUINIT in line)]


@contextlib.contextmanager
def _filtered_stderr(keep: Callable[[list[str]], list[str]]) -> Iterator[None]:
    """Collects everything written to file descriptor 2 (C++ logging writes there directly, not
    through sys.stderr) into a temporary file, then writes back the lines `keep` returns. An
    exception inside writes everything back unfiltered."""
    sys.stderr.flush()
    saved = os.dup(2)
    failed = False
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors='replace').splitlines(keepends=True)
            sys.stderr.write(''.join(lines if failed else keep(lines)))
            sys.stderr.flush()
