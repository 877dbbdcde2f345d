"""The program as users meet it: `pip install .` gives an importable package and its commands;
a run prints its own lines and real warnings, and TensorFlow's chatter only on request."""

import importlib
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
from absl import logging as absl_logging

from simclr_tf import logs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = {'simclr-tf': 'simclr_tf_cli:cli', 'simclr-tf-probe': 'simclr_tf.probe:_main',
            'simclr-tf-augment': 'simclr_tf.picture:main', 'simclr-tf-show': 'simclr_tf.show:main'}
# What a CPU-only run printed before (C++ start-up notices, checkpoint and export INFO lines).
CHATTER = ['absl::InitializeLog', 'cudart_stub', 'Could not find cuda drivers', 'cuInit',
           'oneDNN custom operations', 'cpu_feature_guard', 'Sharding callback duration',
           'contains input name(s)', 'Assets written to', 'Writing fingerprint']


def test_quickstart_prints_its_own_lines_and_no_tensorflow_chatter(tmp_path):
    """The README's quickstart command, cut to two steps, from a shell where the user set no
    TensorFlow logging variable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith('TF_CPP_')}
    run = subprocess.run(
        [sys.executable, 'run.py', '--flagfile=flags/quickstart.cfg', f'--model_dir={tmp_path}',
         '--train_steps=2', '--checkpoint_steps=1', '--eval_steps=1', '--knn_train_examples=100'],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    for chatter in CHATTER:
        assert chatter not in run.stdout + run.stderr, chatter
    for own in ('start plan: mode=train_then_eval, train_mode=pretrain', 'weights: from scratch',
                'data: data/cifar10_sample: 1000 train / 200 eval examples',
                'devices: 1 replica (one device: CPU), precision float32',
                'views: 2 views of each image', 'started from scratch',
                'step 1/2 |', 'step 2/2 |', 'eval at step 2:',
                f'exported SavedModel to {tmp_path}/saved_model/2'):
        assert own in run.stderr, own
    assert 'replicas' not in run.stderr  # one replica
    assert 'start plan: mode=train_then_eval' in (tmp_path / 'plan.txt').read_text()
    assert 'step 2: linear head top-1' in run.stdout
    assert f'SavedModel: {tmp_path}/saved_model/2' in run.stdout
    # Every INFO line is the program's own (warnings would show, from any library).
    ours = {name for name in os.listdir(os.path.join(REPO, 'simclr_tf')) if name.endswith('.py')}
    sources = {m.group(1) for m in re.finditer(r'^I\d{4} [\d:.]+ +\d+ (\S+):\d+\]', run.stderr,
                                               re.MULTILINE)}
    assert sources and sources <= ours, sources - ours


# What the tools and the test run must not print either: C++ log lines (start-up notices, XLA's
# INFO lines) and TensorFlow's retracing warning.
_CPP_LINE = re.compile(r'^[IWEF]\d{4} [\d:.]+ +\d+ \S+:\d+\]', re.MULTILINE)
RETRACING = 'triggered tf.function retracing'


def _users_environment() -> dict:
    """This environment as a user's shell has it: no TensorFlow logging variable set, nothing of
    the pytest run this test is part of."""
    return {k: v for k, v in os.environ.items() if not k.startswith(('TF_CPP_', 'PYTEST_'))}


def _assert_quiet(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert not [c for c in CHATTER + [RETRACING] if c in output], output[-3000:]
    assert not _CPP_LINE.findall(output), output[-3000:]


# The console commands other than the program, each with a short job, and a line of its output.
TOOLS = {
    'simclr-tf-augment': (['-m', 'simclr_tf.picture', '--n=2', '--columns=2',
                           '--out={tmp}/views.png'], 'wrote {tmp}/views.png: 2 images'),
    'simclr-tf-probe': (['-m', 'simclr_tf.probe', '--pixels', '--image_size=32',
                         '--train_split=train[:100]', '--eval_split=test[:40]',
                         '--l2_values=3'], '"features": "pixels"'),
}


@pytest.mark.parametrize('tool', [
    'simclr-tf-augment',
    'simclr-tf-probe',
])
def test_every_console_command_is_as_quiet_as_the_program(tool, sample_dir, tmp_path):
    args, expected = TOOLS[tool]
    done = subprocess.run(
        [sys.executable, *[a.format(tmp=tmp_path) for a in args], f'--dataset={sample_dir}'],
        cwd=REPO, env=_users_environment(), capture_output=True, text=True, timeout=600)
    assert expected.format(tmp=tmp_path) in done.stdout, done.stdout + done.stderr[-3000:]
    _assert_quiet(done)


def test_the_test_run_ends_with_pytests_summary():
    """The README's test command cut to one quick test on one worker: as with pytest.ini's two,
    a controller process imports TensorFlow (tests/conftest.py) and runs no test, and pytest
    writes what it caught of its stderr after the summary."""
    done = subprocess.run(
        [sys.executable, '-m', 'pytest', '-q', '-n', '1', '-p', 'no:cacheprovider',
         'tests/test_config.py::test_defaults_are_the_originals'],
        cwd=REPO, env=_users_environment(), capture_output=True, text=True, timeout=600)
    _assert_quiet(done)
    assert re.match(r'^1 passed in ', done.stdout.strip().splitlines()[-1]), done.stdout
    assert not done.stderr.strip(), done.stderr[-3000:]


def test_notices_are_dropped_and_everything_else_kept():
    lines = [
        'WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n',
        'I0000 00:00:17.2 5537 port.cc:153] oneDNN custom operations are on. You may see ...\n',
        'I0000 00:00:17.2 5537 cudart_stub.cc:31] Could not find cuda drivers on your machine, '
        'GPU will not be used.\n',
        'E0000 00:00:17.3 5537 cuda_platform.cc:52] failed call to cuInit: INTERNAL: ...\n',
        'I0000 00:00:17.4 5537 cpu_feature_guard.cc:227] This TensorFlow binary is optimized ...\n',
        'To enable the following instructions: AVX2 FMA, in other operations, rebuild ...\n',
        'W0000 00:00:17.5 5537 allocator.cc:1] Allocation of 1 exceeds 10% of free memory.\n',
        'UserWarning: something real\n']
    assert logs._drop_notices(lines) == lines[-2:]
    # With a CUDA driver installed, a failing cuInit is a real error: it stays.
    assert logs._drop_notices(lines[3:4]) == lines[3:4]


def test_stderr_filter_sees_what_cpp_code_writes(capfd):
    """C++ logging writes to file descriptor 2 directly, past sys.stderr."""
    with logs._filtered_stderr(lambda lines: [line for line in lines if 'drop' not in line]):
        os.write(2, b'keep 1\ndrop this\nkeep 2\n')
    assert capfd.readouterr().err == 'keep 1\nkeep 2\n'


@pytest.fixture
def absl_handler_filters():
    """absl's handler without filters during the test (an in-process command may have added
    one), with its filters back after it."""
    handler = absl_logging.get_absl_handler()
    before = list(handler.filters)
    handler.filters[:] = []
    yield handler
    handler.filters[:] = before


@pytest.mark.parametrize('env, verbosity, level, filtered', [
    ({}, 0, '2', True),              # default: quiet
    ({}, 1, '0', False),             # --verbosity=1: everything
    ({'TF_CPP_MIN_LOG_LEVEL': '1'}, 0, '1', True),  # the user's level wins; no fd filter
])
def test_loud_on_request(monkeypatch, absl_handler_filters, env, verbosity, level, filtered):
    monkeypatch.delenv('TF_CPP_MIN_LOG_LEVEL', raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    used = []
    monkeypatch.setattr(logs, '_filtered_stderr', lambda keep: used.append(1) or _nothing())
    logs.setup(verbosity)
    assert os.environ['TF_CPP_MIN_LOG_LEVEL'] == level
    assert bool(used) == (filtered and not env)
    # An INFO record that TensorFlow's code logs, and a warning: only the warning always passes.
    tensorflow_file = os.path.join(os.path.dirname(importlib.util.find_spec('tensorflow').origin),
                                   'python', 'x.py')
    info, warning = (logging.LogRecord('absl', level, tensorflow_file, 1, 'chatter', None, None)
                     for level in (logging.INFO, logging.WARNING))
    assert all(f.filter(info) for f in absl_handler_filters.filters) == (not filtered)
    assert all(f.filter(warning) for f in absl_handler_filters.filters)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_pip_install_gives_the_package_and_commands_outside_the_checkout(tmp_path):
    """Builds the wheel from the files `pip install .` uses, installs it into a directory, and
    imports and runs it from elsewhere, with the checkout off the path."""
    source = tmp_path / 'source'
    source.mkdir()
    for name in ('pyproject.toml', 'requirements.txt', 'README.md', 'simclr_tf_cli.py'):
        shutil.copy(os.path.join(REPO, name), source / name)
    shutil.copytree(os.path.join(REPO, 'simclr_tf'), source / 'simclr_tf',
                    ignore=shutil.ignore_patterns('__pycache__'))
    isolation = [] if importlib.util.find_spec('setuptools') is None else ['--no-build-isolation']
    pip = [sys.executable, '-m', 'pip', '-q']
    subprocess.run([*pip, 'wheel', '--no-deps', *isolation, '-w', str(tmp_path / 'dist'),
                    str(source)], check=True, capture_output=True, timeout=600)
    [wheel] = os.listdir(tmp_path / 'dist')
    with zipfile.ZipFile(tmp_path / 'dist' / wheel) as archive:
        names = archive.namelist()
        [entry_points] = [n for n in names if n.endswith('.dist-info/entry_points.txt')]
        scripts = archive.read(entry_points).decode()
    assert 'simclr_tf_cli.py' in names and 'simclr_tf/export.py' in names
    assert not [n for n in names if n.startswith(('tests/', 'bench/', 'run.py'))]
    for command, target in COMMANDS.items():
        assert re.search(rf'^{command} = {re.escape(target)}$', scripts, re.MULTILINE), command

    site = tmp_path / 'site'
    subprocess.run([*pip, 'install', '--no-deps', '--no-index', '--target', str(site),
                    str(tmp_path / 'dist' / wheel)], check=True, capture_output=True, timeout=600)
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    env['PYTHONPATH'] = str(site)
    where = subprocess.run(
        [sys.executable, '-c', 'import simclr_tf.config, simclr_tf_cli; '
         'print(simclr_tf.config.__file__); print(simclr_tf_cli.__file__)'],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr
    assert all(line.startswith(str(site)) for line in where.stdout.split()), where.stdout
    helpfull = subprocess.run([str(site / 'bin' / 'simclr-tf'), '--helpfull'], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=120)
    assert '--train_mode' in helpfull.stdout and '--flagfile' in helpfull.stdout, helpfull.stderr
    for target in COMMANDS.values():  # the tools' functions exist (run as `python -m` here)
        module, function = target.split(':')
        assert callable(getattr(importlib.import_module(module), function))


# ---------------------------------------------------------------- a bad command line
def _flagfiles(tmp_path) -> dict:
    """A flagfile with a misspelt flag, and one that names it (nested flagfiles)."""
    inner, outer = tmp_path / 'inner.cfg', tmp_path / 'outer.cfg'
    inner.write_text('# a preset\n--train_mode=pretrain\n--train_batch_sise=64\n')
    outer.write_text(f'--flagfile={inner}\n')
    return {'inner': inner, 'outer': outer, 'missing': tmp_path / 'missing.cfg'}


@pytest.mark.parametrize('args, line', [
    (['--flagfile={missing}'], 'cannot read flagfile {missing}: No such file or directory'),
    (['--train_batch_sise=64'],
     "Unknown command line flag 'train_batch_sise'. Did you mean: train_batch_size ?"),
    (['--flagfile={outer}', '--model_dir=/tmp/x'],
     "Unknown command line flag 'train_batch_sise' (in flagfile {inner}). "
     'Did you mean: train_batch_size ?'),
    (['--train_batch_size=abc'], "flag --train_batch_size=abc: 'abc' is not an integer"),
    (['--use_tpu=maybe'], "flag --use_tpu=maybe: 'maybe' is not true or false"),
    (['--mode=evaluate'],
     'flag --mode=evaluate: value should be one of <train|eval|train_then_eval|export>'),
    (['--model_dir=/tmp/x', 'extra'],
     'unexpected arguments: extra (flags are written --name=value)'),
])
def test_a_bad_flag_ends_in_one_error_line_and_status_2(tmp_path, args, line):
    """absl's own parser exits 1 with `FATAL Flags parsing error` and a second line."""
    files = _flagfiles(tmp_path)
    done = subprocess.run([sys.executable, 'run.py', *[a.format(**files) for a in args]],
                          cwd=REPO, env=_users_environment(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [f'error: {line.format(**files)}'], done.stderr
    assert not done.stdout


def test_an_error_of_the_run_is_printed_once(tmp_path):
    """A refusal after parsing: its `error:` line only, not also as an absl `E…` log line."""
    done = subprocess.run([sys.executable, 'run.py', '--train_steps=1'], cwd=REPO,
                          env=_users_environment(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == ['error: --model_dir is required'], done.stderr


@pytest.mark.parametrize('target, argv, line', [
    ('simclr_tf.probe:_main', ['--bogus'], 'unrecognized arguments: --bogus '
     '(python -m simclr_tf.probe --help lists the options)'),
    ('simclr_tf.picture:main', ['--dataset=d', '--n=x'],
     "argument --n: invalid int value: 'x' (simclr-tf-augment --help lists the options)"),
    ('simclr_tf.show:main', ['map', '--model=m', '--examples=0'],
     'argument --examples: 0 is not a positive integer '
     '(simclr-tf-show map --help lists the options)'),
    ('simclr_tf.transfer:_main', ['--dataset=d'], 'the following arguments are required: '
     '--out (python -m simclr_tf.transfer --help lists the options)'),
])
def test_every_tools_bad_option_ends_in_one_error_line_and_status_2(capsys, target, argv, line):
    """Not argparse's usage block before the line: as the program does."""
    module, function = target.split(':')
    with pytest.raises(SystemExit) as done:
        getattr(importlib.import_module(module), function)(argv)
    assert done.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f'error: {line}'] and not captured.out
