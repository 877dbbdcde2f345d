"""Training speed of run.py itself, seeded and unseeded: the program as users run it.

The in-process windows of throughput.py time the training loop alone. This runs `run.py` in
subprocesses with the benchmark's own flag set (same mode, same flags), once with the flag set's
`--seed` (0 if it has none) and once without a seed, alternating, and reads the pairs/s of the
program's own progress lines. The first loop of each run (tracing, cache fill) is left out.
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
import time
from typing import Any

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


def run_once(lines: list[str], work: str) -> dict:
    """One run.py run with these flag lines in a fresh model_dir; its loop rates and CPU time."""
    model_dir = tempfile.mkdtemp(prefix='run_', dir=work)
    flagfile = os.path.join(model_dir + '.cfg')
    with open(flagfile, 'w') as f:
        f.write('\n'.join(lines + [f'--model_dir={model_dir}']) + '\n')
    before = os.times()
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.join(REPO, 'run.py'), f'--flagfile={flagfile}'],
                          capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    after = os.times()
    shutil.rmtree(model_dir, ignore_errors=True)
    if proc.returncode:
        raise RuntimeError(f'run.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}')
    return {'rates': loop_rates(proc.stderr), 'wall_s': wall,
            'cpu_s': (after.children_user - before.children_user)
            + (after.children_system - before.children_system)}


def compare_seeding(config: Any, steps: int, per_loop: int, rounds: int) -> dict:
    """Median pairs/s of run.py with and without --seed over `rounds` alternating runs."""
    seed = config.seed if config.seed is not None else 0
    common = {'train_steps': steps, 'train_summary_steps': per_loop, 'steps_per_loop': 0}
    variants = {'seeded': flag_lines(config, seed=seed, **common),
                'unseeded': flag_lines(config, **common)}
    results = {name: [] for name in variants}
    work = tempfile.mkdtemp(prefix='simclr_program_runs_')
    try:
        for _ in range(rounds):  # alternate, so drift on a shared machine hits both alike
            for name, lines in variants.items():
                results[name].append(run_once(lines, work))
                print(f'program run ({name}): {results[name][-1]}', file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = {}
    for name, runs in results.items():
        rates = [r for run in runs for r in run['rates']]
        out[name] = {'pairs_per_s': round(statistics.median(rates), 2) if rates else None,
                     'loops': [round(r, 1) for r in rates],
                     'cpu_s_per_run': [round(run['cpu_s'], 1) for run in runs]}
    if out['seeded']['pairs_per_s'] and out['unseeded']['pairs_per_s']:
        out['seeded_over_unseeded'] = round(
            out['seeded']['pairs_per_s'] / out['unseeded']['pairs_per_s'], 3)
    out.update(mode=config.mode, steps=steps, steps_per_loop=per_loop, rounds=rounds, seed=seed)
    return out
