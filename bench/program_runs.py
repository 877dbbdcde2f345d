"""Training speed of run.py itself, seeded and unseeded: the program as users run it.

The in-process windows of throughput.py time the training loop alone. This runs `run.py` in
subprocesses with the benchmark's own flag set (same mode, same flags), once with the flag set's
`--seed` (0 if it has none) and once without a seed, and reads the pairs/s of the program's own
progress lines. The first loop of each run (tracing, cache fill) is left out.

Two designs. Sequential: the two runs one after the other, in the order AB, BA, AB, ... so
that neither always goes first; each has the whole machine, but drift between runs (another
job starting) lands on one of them. Concurrent: both at the same time, each pinned to its own
half of the cores (swapped every round) with that many threads, so whatever else the machine
does hits both alike; the rates are those of half a machine, the ratio is the robust figure.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PROGRESS = re.compile(r'step (\d+)/(\d+) \|.*\| ([\d.]+) img/s')


def flag_lines(config: Any, **overrides: Any) -> list[str]:
    """A flagfile's lines for `config` (a Config), every field but `seed` unless overridden."""
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    values.pop('seed')
    values.pop('model_dir')
    values.update(overrides)
    return [f'--{name}={value}' for name, value in values.items() if value is not None]


def loop_rates(log: str) -> list[float]:
    """pairs/s of each progress line after the first (which carries tracing and warm-up)."""
    return [float(m.group(3)) for m in _PROGRESS.finditer(log)][1:]


def run_once(lines: list[str], work: str, cores: Optional[list[int]] = None) -> dict:
    """One run.py run with these flag lines in a fresh model_dir (on `cores` only, if given);
    its loop rates and wall time."""
    model_dir = tempfile.mkdtemp(prefix='run_', dir=work)
    flagfile = os.path.join(model_dir + '.cfg')
    with open(flagfile, 'w') as f:
        f.write('\n'.join(lines + [f'--model_dir={model_dir}']) + '\n')
    t0 = time.perf_counter()
    pin = ['taskset', '-c', ','.join(map(str, cores))] if cores else []
    proc = subprocess.run(pin + [sys.executable, os.path.join(REPO, 'run.py'),
                                 f'--flagfile={flagfile}'], capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    shutil.rmtree(model_dir, ignore_errors=True)
    if proc.returncode:
        raise RuntimeError(f'run.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}')
    return {'rates': loop_rates(proc.stderr), 'wall_s': round(wall, 1)}


def compare_seeding(config: Any, steps: int, per_loop: int, rounds: int,
                    concurrent: bool = False) -> dict:
    """Median pairs/s of run.py with and without --seed over `rounds` rounds (see the module
    docstring for the two designs)."""
    seed = config.seed if config.seed is not None else 0
    common = {'train_steps': steps, 'train_summary_steps': per_loop, 'steps_per_loop': 0}
    halves = None
    if concurrent:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            raise ValueError('a concurrent comparison needs at least 2 cores')
        halves = [cpus[:len(cpus) // 2], cpus[len(cpus) // 2:2 * (len(cpus) // 2)]]
        common.update(intra_op_threads=len(halves[0]), inter_op_threads=1)
    variants = {'seeded': flag_lines(config, seed=seed, **common),
                'unseeded': flag_lines(config, **common)}
    results = {name: [] for name in variants}
    work = tempfile.mkdtemp(prefix='simclr_program_runs_')

    def one(name: str, cores: Optional[list[int]]) -> None:
        results[name].append(run_once(variants[name], work, cores))
        print(f'program run ({name}{f", cores {cores}" if cores else ""}): '
              f'{results[name][-1]}', file=sys.stderr)

    try:
        for r in range(rounds):
            names = list(variants)[::(-1) ** r]  # AB, BA, ...: neither always first
            if concurrent:
                threads = [threading.Thread(target=one, args=(n, halves[i]))
                           for i, n in enumerate(names)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                if any(len(results[n]) <= r for n in names):
                    raise RuntimeError('a concurrent run.py run failed (see above)')
            else:
                for name in names:
                    one(name, None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = {}
    for name, runs in results.items():
        rates = [r for run in runs for r in run['rates']]
        out[name] = {'pairs_per_s': round(statistics.median(rates), 2) if rates else None,
                     'loops': [round(r, 1) for r in rates]}
    if out['seeded']['pairs_per_s'] and out['unseeded']['pairs_per_s']:
        out['seeded_over_unseeded'] = round(
            out['seeded']['pairs_per_s'] / out['unseeded']['pairs_per_s'], 3)
    out.update(mode=config.mode, steps=steps, steps_per_loop=per_loop, rounds=rounds, seed=seed,
               design='concurrent, one half of the cores each' if concurrent else
               'sequential, order alternating')
    return out
