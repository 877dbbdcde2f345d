"""The documentation's promises: every preset and every command line in README.md, CHANGELOG.md
and docs/*.md parses against the program it runs (run.py's flags give a valid Config), every
relative link resolves to a file of the repository, no command needs a path outside it, and the
README stays a short user's guide. Nothing here trains: arguments are parsed, never run."""

import glob
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ['README.md', 'CHANGELOG.md'] + sorted(
    os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, 'docs', '*.md')))
README_MAX_LINES = 300
# The two set-up commands a newcomer runs on a fresh machine (.ci/run runs the second's tests).
SETUP_COMMANDS = [
    'python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.txt . && '
    'python run.py --flagfile=flags/quickstart.cfg --model_dir=/tmp/simclr_quickstart',
    'python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements-dev.txt . && '
    'python -m pytest -q',
]
# Paths of the machines the figures were measured on, which users do not have.
NOT_USERS_PATHS = ['../shared', '/work/', 'authors_simclr']

ABSL_BENCH = {'bench/throughput.py', 'bench/profile_step.py'}  # take run.py's flags
MODULES = {'simclr_tf.probe', 'simclr_tf.convert', 'simclr_tf.picture'}  # argparse
COMMANDS = {'simclr-tf-probe': 'simclr_tf.probe', 'simclr-tf-augment': 'simclr_tf.picture'}
OPTIONAL = ['matplotlib']  # what the documented command installs first (bench/plots.py)
NOT_CHECKED = [['python3', '-m', 'venv'], ['python', '-m', 'pytest'], ['python', '-m', 'pip'],
               ['pip']]
_STARTS_A_COMMAND = re.compile(r'(^|&&\s*)([A-Z_][A-Z0-9_]*=\S*\s+)*(python3?|simclr-tf)(\s|$|-)')
_FENCE = re.compile(r'^```(\w*)\s*$')


def read(page: str) -> str:
    with open(os.path.join(REPO, page), encoding='utf-8') as f:
        return f.read()


def code_blocks(text: str):
    """(language, first line number, lines) of every fenced block."""
    lines, block, start, lang = text.splitlines(), None, 0, ''
    for number, line in enumerate(lines, 1):
        fence = _FENCE.match(line)
        if fence and block is None:
            block, start, lang = [], number + 1, fence.group(1)
        elif line.startswith('```') and block is not None:
            yield lang, start, block
            block = None
        elif block is not None:
            block.append(line)


def prose(text: str) -> str:
    """The text outside fenced blocks and inline code."""
    kept, inside = [], False
    for line in text.splitlines():
        if line.startswith('```'):
            inside = not inside
        elif not inside:
            kept.append(re.sub(r'`[^`]*`', '', line))
    return '\n'.join(kept)


def command_lines(page: str):
    """(where, argv) of every command in the page's shell blocks: lines joined across trailing
    backslashes, comments dropped, `a && b` split, leading VAR=value assignments dropped."""
    for lang, start, lines in code_blocks(read(page)):
        if lang not in ('', 'bash', 'sh', 'shell'):
            continue
        joined, first = '', None
        for offset, line in enumerate(lines):
            if first is None:
                first = start + offset
            if line.rstrip().endswith('\\'):
                joined += line.rstrip()[:-1] + ' '
                continue
            joined += line
            text, where, joined, first = joined.strip(), f'{page}:{first}', '', None
            if not _STARTS_A_COMMAND.search(text):
                continue
            tokens = shlex.split(text, comments=True)
            parts, current = [], []
            for token in tokens + ['&&']:
                if token == '&&':
                    parts.append(current)
                    current = []
                else:
                    current.append(token)
            for argv in parts:
                while argv and re.match(r'^[A-Z_][A-Z0-9_]*=', argv[0]):
                    argv = argv[1:]
                if argv and argv[0] not in ('.', 'export', 'cd', 'git', 'mkdir'):
                    yield where, argv


def classify(argv):
    """('run', args) for the program; ('absl', script, args) for benchmarks on run.py's flags;
    ('argparse', target, args) for scripts and modules with their own parser; None for commands
    this test leaves alone (venv, pip, pytest). Anything else is an error."""
    if any(argv[:len(prefix)] == prefix for prefix in NOT_CHECKED):
        return None
    if argv[0] == 'simclr-tf':
        return ('run', argv[1:])
    if argv[0] in COMMANDS:
        return ('argparse', COMMANDS[argv[0]], argv[1:])
    if argv[0] in ('python', 'python3') and len(argv) > 1:
        if argv[1] in ('run.py', 'simclr_tf_cli.py'):
            return ('run', argv[2:])
        if argv[1] == '-m' and len(argv) > 2:
            if argv[2] == 'simclr_tf_cli':
                return ('run', argv[3:])
            if argv[2] in MODULES:
                return ('argparse', argv[2], argv[3:])
        if argv[1] in ABSL_BENCH:
            return ('absl', argv[1], argv[2:])
        if argv[1].endswith('.py') and argv[1].split('/')[0] in ('bench', 'examples'):
            return ('argparse', argv[1], argv[2:])
    raise AssertionError(f'a command this test does not know how to check: {shlex.join(argv)}')


ALL = [(where, argv, classify(argv)) for page in PAGES for where, argv in command_lines(page)]
RUN = [(where, kind[1]) for where, _, kind in ALL if kind and kind[0] == 'run']
OTHER = [(where, kind) for where, _, kind in ALL if kind and kind[0] != 'run']


# --------------------------------------------------------------------------- the program's flags

def config_of(args):
    """The Config run.py builds from these arguments (absl parsing + Config.validate)."""
    sys.path.insert(0, REPO)  # the checkout's program, not an installed copy
    import simclr_tf_cli
    from absl import flags
    flags.FLAGS.unparse_flags()
    try:
        flags.FLAGS(['run.py', *args])
        return simclr_tf_cli.config_from_flags()
    finally:
        flags.FLAGS.unparse_flags()


@pytest.mark.parametrize('preset', sorted(os.listdir(os.path.join(REPO, 'flags'))))
def test_every_preset_parses_and_validates(preset, monkeypatch):
    monkeypatch.chdir(REPO)
    config_of([f'--flagfile=flags/{preset}'])


def test_the_documented_commands_are_found():
    readme = read('README.md')
    assert [line for line in readme.splitlines() if 'python3 -m venv' in line] == SETUP_COMMANDS
    assert len(RUN) >= 20 and len(OTHER) >= 10, (len(RUN), len(OTHER))
    found = {shlex.join(args) for _, args in RUN}
    assert '--flagfile=flags/quickstart.cfg --model_dir=/tmp/simclr_quickstart' in found


@pytest.mark.parametrize('where,args', RUN, ids=[where for where, _ in RUN])
def test_every_documented_program_command_gives_a_valid_config(where, args, monkeypatch):
    monkeypatch.chdir(REPO)  # flagfiles and the sample are named relative to the checkout
    config = config_of(args)
    if '--helpfull' in args or '--help' in args:
        return
    assert config.model_dir, f'{where}: the program needs --model_dir'
    if config.mode in ('eval', 'export'):
        return  # the model_dir's config.json gives the flags not passed
    assert not config.use_tpu or config.tpu_name or config.master, (
        f'{where}: --use_tpu=True (the default) without --tpu_name stops on GPUs and CPUs; '
        'add --use_tpu=False')
    if config.train_mode == 'finetune':
        assert config.checkpoint, f'{where}: fine-tuning needs --checkpoint'


# ------------------------------------------------------------------- other programs' arguments

_ARGPARSE_CHECK = r'''
import argparse, io, json, runpy, sys, warnings
warnings.simplefilter('ignore')

class Parsed(BaseException):
    pass

original = argparse.ArgumentParser.parse_args
def parse_args(self, args=None, namespace=None):
    original(self, args, namespace)
    raise Parsed()
argparse.ArgumentParser.parse_args = parse_args

results = {}
for key, target, args in json.loads(sys.argv[1]):
    sys.argv, sys.stderr = [target, *args], io.StringIO()  # argparse's message, this job's only
    try:
        if target.endswith('.py'):
            runpy.run_path(target, run_name='__main__')
        else:
            runpy.run_module(target, run_name='__main__', alter_sys=True)
        results[key] = 'it ran without parsing arguments'
    except Parsed:
        results[key] = None
    except ModuleNotFoundError as e:
        results[key] = f'missing module {e.name}'
    except SystemExit as e:
        results[key] = f'exit status {e.code}'
    except Exception as e:
        results[key] = f'{type(e).__name__}: {e}'
    if results[key]:
        results[key] += '\n' + sys.stderr.getvalue()[-2000:]
    sys.stderr = sys.__stderr__
print('RESULTS ' + json.dumps(results))
'''

_ABSL_CHECK = r'''
import json, runpy, sys
from absl import flags
script = sys.argv[1]
runpy.run_path(script, run_name='flags_of_' + script.replace('/', '_'))  # defines the flags
import run
results = {}
for key, args in json.loads(sys.argv[2]):
    flags.FLAGS.unparse_flags()
    try:
        flags.FLAGS([script, *args])
        run.config_from_flags()
        results[key] = None
    except BaseException as e:
        results[key] = f'{type(e).__name__}: {e}'
print('RESULTS ' + json.dumps(results))
'''


def _results(command) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', CUDA_VISIBLE_DEVICES='')
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith('RESULTS ')]
    assert lines, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(lines[-1][len('RESULTS '):])


@pytest.fixture(scope='module')
def parsed():
    """Every non-program command's arguments parsed by its own parser, in a few processes (one
    for all argparse programs, one per absl benchmark, whose flags can be defined once)."""
    results = {}
    argparse_jobs = [[where, kind[1], kind[2]] for where, kind in OTHER if kind[0] == 'argparse']
    if argparse_jobs:
        results.update(_results([sys.executable, '-c', _ARGPARSE_CHECK,
                                 json.dumps(argparse_jobs)]))
    for script in sorted({kind[1] for _, kind in OTHER if kind[0] == 'absl'}):
        jobs = [[where, kind[2]] for where, kind in OTHER if kind[0] == 'absl' and kind[1] == script]
        results.update(_results([sys.executable, '-c', _ABSL_CHECK, script, json.dumps(jobs)]))
    return results


@pytest.mark.parametrize('where,kind', OTHER, ids=[where for where, _ in OTHER])
def test_every_documented_script_command_parses(where, kind, parsed):
    target = kind[1]
    if target.endswith('.py'):
        assert os.path.isfile(os.path.join(REPO, target)), f'{where}: no {target}'
    problem = parsed[where] or ''
    if any(problem.split('\n')[0] == f'missing module {name}' for name in OPTIONAL):
        pytest.skip(f'{target} needs {problem.split()[2]}, which its documented command installs')
    assert parsed[where] is None, f'{where}: {shlex.join(kind[2])}\n{parsed[where]}'


# ------------------------------------------------------------------------------- links and paths

def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r'`', '', heading.strip().lower())
    return re.sub(r'[^\w\- ]', '', text).replace(' ', '-')


def anchors(page: str) -> set:
    seen, found = {}, set()
    for line in prose(read(page)).splitlines():
        heading = re.match(r'^#{1,6}\s+(.*)$', line)
        if heading:
            slug = _slug(heading.group(1))
            found.add(slug if slug not in seen else f'{slug}-{seen[slug]}')
            seen[slug] = seen.get(slug, 0) + 1
    return found


def links(page: str):
    text = read(page)
    kept, inside = [], False
    for line in text.splitlines():  # headings' anchors come from prose(); links keep inline code
        if line.startswith('```'):
            inside = not inside
        elif not inside:
            kept.append(line)
    return re.findall(r'\]\(([^)\s]+)\)', '\n'.join(kept))


@pytest.mark.parametrize('page', PAGES)
def test_every_relative_link_resolves_to_a_file_of_the_repository(page):
    problems = []
    for target in links(page):
        if re.match(r'^[a-z]+:', target):  # https:, mailto:
            continue
        path, _, anchor = target.partition('#')
        resolved = os.path.normpath(os.path.join(REPO, os.path.dirname(page), path)) if path \
            else os.path.join(REPO, page)
        if not resolved.startswith(REPO + os.sep) or not os.path.exists(resolved):
            problems.append(f'{target}: no such file in the repository')
        elif anchor and resolved.endswith('.md') and anchor not in anchors(
                os.path.relpath(resolved, REPO)):
            problems.append(f'{target}: no heading with the anchor #{anchor}')
    assert not problems, f'{page}:\n  ' + '\n  '.join(problems)


@pytest.mark.parametrize('page', PAGES)
def test_no_path_a_user_does_not_have(page):
    text = read(page)
    found = [p for p in NOT_USERS_PATHS if p in text]
    assert not found, f'{page} names {found}'


def test_readme_is_a_short_users_guide():
    lines = read('README.md').splitlines()
    assert len(lines) <= README_MAX_LINES, len(lines)
