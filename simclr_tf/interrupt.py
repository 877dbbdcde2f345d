"""One handling of SIGTERM/SIGINT for the whole run: start-up, training, evaluation, export, end.

The program (`simclr_tf_cli`) calls `install()` first thing; the run then says which phase it is
in (`phase`), and a signal ends that phase in one line, `stopped: preempted by SIGTERM <where>
(<what is kept>), <what a rerun does>`, with status STATUS (75, EX_TEMPFAIL):

- a phase that writes nothing (start-up, evaluation, export, waiting) stops at once, from the
  handler: nothing on disk is half written there. The `deferred()` sections that write (claiming
  model_dir, a restore that sets checkpoints aside, an export's rename, result files) hold the stop
  until they end; `cleanup()` registers what to remove first (an export's temporary directory).
- training (`phase(..., at_once=False)`) only records the signal: the loop saves a checkpoint
  after the current step and stops (`train.Preempted`); before its first step is done (the loop
  still being traced) the main thread's wait stops at once instead (`stop(where)`).
- after `finish()` (the results and export are written) signals are ignored: status 0.

A second signal stops at once with 128 + its number, without saving. The handler touches no
TensorFlow and raises nothing, so no traceback (no KeyboardInterrupt) and no half-run op.
Without `install()` (library calls, tests in one process) `handling()` installs the handler for
training only, and nothing ever exits the process: training records and stops as above.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from typing import Callable, Iterator, Optional

STATUS = 75  # EX_TEMPFAIL of sysexits.h: "temporary failure, try again" (faults.RETRY)
SIGNALS = (signal.SIGTERM, signal.SIGINT)
STARTUP = ('during start-up', 'nothing written yet',
           'rerunning the same command starts it again')


class _State:
    def __init__(self):
        self.signum = 0  # the first signal received; 0: none
        self.program = False  # installed by the program for the whole run: may exit the process
        self.installed = False
        self.finished = False
        self.where: tuple[str, str, str] = STARTUP  # (where, what is kept, what a rerun does)
        self.at_once = True  # the phase stops at once (else it only records)
        self.deferred = 0  # depth of deferred() sections
        self.cleanups: list[Callable[[], None]] = []


_state = _State()


def name(signum: int) -> str:
    return signal.Signals(signum).name


def line(signum: int, where: str, kept: str, rerun: str) -> str:
    """The documented stop line, without its `stopped: ` prefix."""
    return f'preempted by {name(signum)} {where} ({kept}), {rerun}'


def install() -> None:
    """The program's handling, for the rest of the process (main thread only)."""
    _state.program = True
    _install()


def _install() -> None:
    if not _state.installed:
        for s in SIGNALS:
            signal.signal(s, _handle)
        _state.installed = True


@contextlib.contextmanager
def handling() -> Iterator[bool]:
    """Within it the handler is installed (if the program has not, and in the main thread: only
    there can Python set handlers). Yields whether a handler is in place."""
    if _state.installed or threading.current_thread() is not threading.main_thread():
        yield _state.installed
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    _install()
    try:
        yield True
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _state.installed, _state.signum = False, 0


def signalled() -> int:
    """The signal received (0: none)."""
    return _state.signum


@contextlib.contextmanager
def phase(where: str, kept: str, rerun: str, at_once: bool = True) -> Iterator[None]:
    """What the run is doing, for the stop line; `at_once=False`: record only (training)."""
    before = (_state.where, _state.at_once)
    _state.where, _state.at_once = (where, kept, rerun), at_once
    try:
        yield
    finally:
        _state.where, _state.at_once = before


def set_phase(where: str, kept: str, rerun: str) -> None:
    """As `phase`, for the rest of the run (start-up, once the plan says what a rerun does)."""
    _state.where, _state.at_once = (where, kept, rerun), True


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A section that writes: a signal within it stops once it ends, not in it."""
    _state.deferred += 1
    try:
        yield
    finally:
        _state.deferred -= 1
    if _state.signum and _state.at_once and not _state.deferred and not _state.finished:
        stop()


@contextlib.contextmanager
def cleanup(fn: Callable[[], None]) -> Iterator[None]:
    """`fn` runs before a stop within this section (e.g. removes a temporary directory)."""
    _state.cleanups.append(fn)
    try:
        yield
    finally:
        _state.cleanups.remove(fn)


def finish() -> None:
    """The run is complete (results and export written): signals are ignored from now on, also
    while the interpreter shuts down (which would restore the default handlers: status 143)."""
    if not _state.program:
        return
    _state.finished = True
    if threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)


def stop(where: Optional[tuple[str, str, str]] = None) -> None:
    """Ends the phase now (or the one `where` describes): runs the cleanups, prints the stop
    line, exits STATUS. Only the program's run exits; in a library call the signal stays
    recorded (training then stops after the current step)."""
    if not _state.program or not _state.signum:
        return
    for fn in list(reversed(_state.cleanups)):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - the stop line must still come
            logging.warning('cleaning up after %s: %s', name(_state.signum), e)
    exit_now(line(_state.signum, *(where or _state.where)))


def exit_now(message: str, status: int = STATUS) -> None:
    """Prints `stopped: <message>` and exits at once: what the run keeps is on disk, and the
    interpreter's shutdown would wait for TensorFlow's threads (a loop still tracing)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (RuntimeError, OSError, ValueError):  # a write the signal interrupted
            pass
    os.write(2, f'stopped: {message}\n'.encode())
    os._exit(status)


def _handle(signum: int, frame) -> None:
    if _state.finished:
        logging.info('received %s after the run finished: ignored', name(signum))
        return
    if _state.signum:
        logging.error('second signal (%s): stopping now, without a checkpoint', name(signum))
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os._exit(128 + signum)
    _state.signum = signum
    if _state.program and _state.at_once and not _state.deferred:
        stop()
    elif _state.at_once and _state.program:
        logging.warning('received %s: stopping once the current write is done (a second signal '
                        'stops at once)', name(signum))
    else:
        logging.warning('received %s: checkpointing after the current step, then stopping '
                        '(a second signal stops at once)', name(signum))
