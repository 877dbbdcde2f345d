"""SIGTERM/SIGINT in each phase of a run (`simclr_tf/interrupt.py`): one `stopped:` line and
status 75 saying what is kept and what a rerun does, no result.json without its export, no
`.tmp-*` export left, no traceback; a finished run exits 0.

Each phase is hit deterministically: the program runs under a small launcher that wraps one
function of that phase (a test-only hook, nothing in the package) to print `HOOK <name>` and
wait; the test sends the signal once it reads that line. Training itself (SIGTERM after a step,
two signals) is tested in test_program.py and test_faults.py.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap

from simclr_tf import checkpoint, interrupt, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--resnet_depth=18', '--width_multiplier=0.25', '--image_size=16', '--proj_out_dim=16',
        '--use_tpu=False', '--eval_split=test', '--knn_train_examples=16', '--eval_steps=1',
        '--eval_batch_size=16', '--train_batch_size=8', '--train_steps=2', '--steps_per_loop=2',
        '--train_summary_steps=0']

LAUNCHER = textwrap.dedent('''
    import atexit, os, sys, time
    sys.path.insert(0, os.environ['SIMCLR_REPO'])  # the checkout's code, not an installed one
    hook = os.environ['SIGNAL_HOOK']

    def wait(*_):
        from simclr_tf import interrupt
        print(f'HOOK {hook}', file=sys.stderr, flush=True)
        end = time.time() + (5 if hook == 'exit' else 120)  # (after finishing: ignored)
        hold = os.environ.get('SIGNAL_HOLD')  # else a deferred signal lets the write end
        while time.time() < end and (hold or not interrupt.signalled()):
            time.sleep(0.05)

    def wrap(module, name, after=False):
        original = getattr(module, name)
        def wrapped(*args, **kwargs):
            if not after:
                wait()
            value = original(*args, **kwargs)
            if after:
                wait()
            return value
        setattr(module, name, wrapped)

    import simclr_tf_cli
    from simclr_tf import logs
    logs.setup()  # TensorFlow imported, so its modules can be wrapped
    import tensorflow as tf
    from simclr_tf import evaluate, model_dir, train
    if hook == 'write_config':  # start-up, inside the section that claims model_dir
        wrap(model_dir, 'write_config')
    elif hook == 'trace':  # the first loop call (worker thread): tracing, before any step
        make = train.make_loop_fn
        def make_loop_fn(*args, **kwargs):
            loop = make(*args, **kwargs)
            def slow(*a):
                wait()
                return loop(*a)
            return slow
        train.make_loop_fn = make_loop_fn
    elif hook == 'evaluate':
        wrap(evaluate, 'evaluate')
    elif hook == 'export':  # the SavedModel is in its temporary directory
        wrap(tf.saved_model, 'save', after=True)
    elif hook == 'exit':  # the run has finished and printed its last line
        atexit.register(wait)
    sys.argv = ['run.py'] + sys.argv[1:]
    simclr_tf_cli.cli()
''')


def _run(tmp_path, hook, signum, args, again=None):
    """Runs the program with `hook`, sends `signum` once the hook waits, and again once a line
    holds `again`; (status, stderr, stdout)."""
    launcher = tmp_path / 'launcher.py'
    launcher.write_text(LAUNCHER)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', PYTHONUNBUFFERED='1', SIGNAL_HOOK=hook,
               SIMCLR_REPO=REPO, SIGNAL_HOLD='1' if again else '')
    proc = subprocess.Popen([sys.executable, str(launcher), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith(f'HOOK {hook}'):
            proc.send_signal(signum)
            if not again:
                break
        if again and again in line:
            proc.send_signal(signum)
            break
    try:
        out, rest = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, ''.join(seen) + rest, out


def _stopped_line(log):
    lines = [line for line in log.splitlines() if line.startswith('stopped: ')]
    assert len(lines) == 1 and log.rstrip().endswith(lines[0]), log[-3000:]
    assert 'Traceback' not in log and 'KeyboardInterrupt' not in log, log[-3000:]
    return lines[0]


def _left(model_dir):
    """What a signal must not leave: result files, a temporary export, export steps."""
    exports = model_dir / 'saved_model'
    return (sorted(p.name for p in model_dir.glob('result*.json')),
            sorted(p.name for p in exports.iterdir()) if exports.is_dir() else [])


def _args(sample_dir, model_dir):
    return [f'--dataset={sample_dir}', f'--model_dir={model_dir}', '--mode=train_then_eval',
            *TINY]


def test_start_up_stops_at_once_after_the_write_under_way(tmp_path, sample_dir):
    model_dir = tmp_path / 'run'
    args = _args(sample_dir, model_dir)
    assert interrupt.STATUS == train.PREEMPTED_EXIT_CODE == 75

    # A second signal while the first waits for a write: at once, 128 + its number.
    status, log, _ = _run(tmp_path, 'write_config', signal.SIGTERM, args,
                          again='received SIGTERM: stopping once the current write is done')
    assert status == 128 + signal.SIGTERM, log[-3000:]
    assert 'second signal (SIGTERM): stopping now' in log and 'stopped: ' not in log

    # Start-up, while model_dir is claimed: the claim ends (config.json whole), then the stop.
    status, log, _ = _run(tmp_path, 'write_config', signal.SIGTERM, args)
    assert status == 75, log[-3000:]
    assert _stopped_line(log) == ('stopped: preempted by SIGTERM during start-up (no checkpoint '
                                  'yet), rerunning the same command starts it again')
    assert json.loads((model_dir / 'config.json').read_text())['train_steps'] == 2
    assert 'training from step' not in log

    # Start-up, while the first loop is traced in its thread: at once, not after the tracing.
    status, log, _ = _run(tmp_path, 'trace', signal.SIGINT, args)
    assert status == 75, log[-3000:]
    assert _stopped_line(log) == ('stopped: preempted by SIGINT during start-up, before step 1 '
                                  '(no checkpoint yet), rerunning the same command starts it '
                                  'again')
    assert checkpoint.list_checkpoints(str(model_dir)) == []
    assert _left(model_dir) == ([], [])


def test_evaluation_and_export_keep_the_checkpoint_and_a_finished_run_exits_0(tmp_path,
                                                                              sample_dir):
    model_dir = tmp_path / 'run'
    args = _args(sample_dir, model_dir)

    # Evaluation: training's checkpoint is kept; no result.json, no export.
    status, log, _ = _run(tmp_path, 'evaluate', signal.SIGTERM, args)
    ckpt = f'{model_dir}/ckpt-2'
    assert status == 75, log[-3000:]
    assert _stopped_line(log) == (f'stopped: preempted by SIGTERM during the evaluation of step 2 '
                                  f'(checkpoint {ckpt} kept, no result.json written), rerunning '
                                  'the same command evaluates and exports it')
    assert checkpoint.list_checkpoints(str(model_dir))[-1][1] == ckpt
    assert _left(model_dir) == ([], [])

    # Export (the rerun evaluated again): its temporary directory is removed, no result.json.
    status, log, _ = _run(tmp_path, 'export', signal.SIGINT, args)
    assert status == 75, log[-3000:]
    assert 'already trained to step 2' in log
    assert _stopped_line(log) == (f'stopped: preempted by SIGINT during the export of step 2 '
                                  f'(checkpoint {ckpt} kept, no partial export, no result.json '
                                  'written), rerunning the same command evaluates and exports it')
    assert _left(model_dir) == ([], [])

    # Finished: a signal while the process shuts down changes nothing, status 0.
    status, log, out = _run(tmp_path, 'exit', signal.SIGTERM, args)
    assert status == 0, log[-3000:]
    assert out.splitlines()[-1] == f'SavedModel: {model_dir}/saved_model/2'
    assert 'stopped' not in log and 'Traceback' not in log
    assert _left(model_dir) == (['result.json', 'result_2.json'], ['2'])

    # --mode=export replacing that export: stopped in the save, the old export stays whole.
    status, log, _ = _run(tmp_path, 'export', signal.SIGTERM,
                          ['--mode=export', f'--model_dir={model_dir}'])
    assert status == 75, log[-3000:]
    assert _stopped_line(log) == ('stopped: preempted by SIGTERM during the export of step 2 '
                                  '(checkpoints kept, no partial export), rerunning the same '
                                  'command exports it')
    assert _left(model_dir) == (['result.json', 'result_2.json'], ['2'])
    assert (model_dir / 'saved_model' / '2' / 'saved_model.pb').is_file()

    # --mode=eval on a checkpoint without its result file: none is written.
    (model_dir / 'result_2.json').unlink()
    status, log, _ = _run(tmp_path, 'evaluate', signal.SIGINT,
                          ['--mode=eval', f'--model_dir={model_dir}'])
    assert status == 75, log[-3000:]
    assert _stopped_line(log) == (f'stopped: preempted by SIGINT during the evaluation of {ckpt} '
                                  '(the results written so far, no partial export), rerunning '
                                  'the same command evaluates the checkpoints not evaluated yet')
    assert _left(model_dir) == (['result.json'], ['2'])
