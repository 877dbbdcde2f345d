"""The documentation's promises: every preset and every command line in README.md, CHANGELOG.md
and docs/*.md parses against the program it runs (run.py's flags give a valid Config) and writes
outside the checkout, every relative link resolves to a file of the repository, no command needs
a path outside it, and the README stays a short user's guide. Figures agree with their home:
every number of the README's results table is on the page its row links to, and every machine is
named by one label of docs/benchmarks.md. What a page says the program refuses or ignores is
what the program does. Nothing here trains: arguments are parsed, never run."""

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
MODULES = {'simclr_tf.probe', 'simclr_tf.convert', 'simclr_tf.picture', 'simclr_tf.show',
           'simclr_tf.transfer'}
COMMANDS = {'simclr-tf-probe': 'simclr_tf.probe', 'simclr-tf-augment': 'simclr_tf.picture',
            'simclr-tf-show': 'simclr_tf.show', 'simclr-tf-transfer': 'simclr_tf.transfer'}
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

# The options by which argparse programs (the tools, bench/) name what they write.
WRITTEN_OPTIONS = ('out', 'work')
_ARGPARSE_CHECK = r'''
import argparse, io, json, runpy, sys, warnings
warnings.simplefilter('ignore')

class Parsed(BaseException):
    pass

WRITTEN = {written}
original = argparse.ArgumentParser.parse_args
def parse_args(self, args=None, namespace=None):
    parsed = vars(original(self, args, namespace))
    raise Parsed({{k: parsed[k] for k in WRITTEN if isinstance(parsed.get(k), str)}})
argparse.ArgumentParser.parse_args = parse_args

results, writes = {{}}, {{}}
for key, target, args in json.loads(sys.argv[1]):
    sys.argv, sys.stderr = [target, *args], io.StringIO()  # argparse's message, this job's only
    try:
        if target.endswith('.py'):
            runpy.run_path(target, run_name='__main__')
        else:
            runpy.run_module(target, run_name='__main__', alter_sys=True)
        results[key] = 'it ran without parsing arguments'
    except Parsed as parsed:
        results[key], writes[key] = None, parsed.args[0]
    except ModuleNotFoundError as e:
        results[key] = f'missing module {{e.name}}'
    except SystemExit as e:
        results[key] = f'exit status {{e.code}}'
    except Exception as e:
        results[key] = f'{{type(e).__name__}}: {{e}}'
    if results[key]:
        results[key] += '\n' + sys.stderr.getvalue()[-2000:]
    sys.stderr = sys.__stderr__
print('RESULTS ' + json.dumps({{'problems': results, 'writes': writes}}))
'''

_ABSL_CHECK = r'''
import json, runpy, sys
from absl import flags
script = sys.argv[1]
runpy.run_path(script, run_name='flags_of_' + script.replace('/', '_'))  # defines the flags
import run
results, writes = {}, {}
for key, args in json.loads(sys.argv[2]):
    flags.FLAGS.unparse_flags()
    try:
        flags.FLAGS([script, *args])
        model_dir = run.config_from_flags().model_dir
        results[key], writes[key] = None, {'model_dir': model_dir} if model_dir else {}
    except BaseException as e:
        results[key] = f'{type(e).__name__}: {e}'
print('RESULTS ' + json.dumps({'problems': results, 'writes': writes}))
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
    for all argparse programs, one per absl benchmark, whose flags can be defined once):
    {'problems': {where: None or what went wrong}, 'writes': {where: {option: path}}}."""
    results = {'problems': {}, 'writes': {}}
    argparse_jobs = [[where, kind[1], kind[2]] for where, kind in OTHER if kind[0] == 'argparse']
    jobs = []
    if argparse_jobs:
        jobs.append([sys.executable, '-c',
                     _ARGPARSE_CHECK.format(written=repr(WRITTEN_OPTIONS)),
                     json.dumps(argparse_jobs)])
    for script in sorted({kind[1] for _, kind in OTHER if kind[0] == 'absl'}):
        absl_jobs = [[where, kind[2]] for where, kind in OTHER
                     if kind[0] == 'absl' and kind[1] == script]
        jobs.append([sys.executable, '-c', _ABSL_CHECK, script, json.dumps(absl_jobs)])
    for command in jobs:
        for name, values in _results(command).items():
            results[name].update(values)
    return results


@pytest.mark.parametrize('where,kind', OTHER, ids=[where for where, _ in OTHER])
def test_every_documented_script_command_parses(where, kind, parsed):
    target = kind[1]
    if target.endswith('.py'):
        assert os.path.isfile(os.path.join(REPO, target)), f'{where}: no {target}'
    problem = parsed['problems'][where] or ''
    if any(problem.split('\n')[0] == f'missing module {name}' for name in OPTIONAL):
        pytest.skip(f'{target} needs {problem.split()[2]}, which its documented command installs')
    assert not problem, f'{where}: {shlex.join(kind[2])}\n{problem}'


def _inside_the_checkout(path: str) -> bool:
    """Whether a command run from the checkout writes `path` inside it (placeholders and
    remote paths are not paths of it)."""
    if '://' in path or path.strip('.') == '' or path.startswith('/path/to/'):
        return False
    resolved = os.path.realpath(os.path.join(REPO, path))
    return resolved == REPO or resolved.startswith(REPO + os.sep)


def inline_commands(page: str):
    """(where, argv) of inline-code commands with options (`python run.py --mode=export ...`)."""
    for number, line in enumerate(read(page).splitlines(), 1):
        for code in re.findall(r'`([^`]+)`', line):
            if re.match(r'(python3? |simclr-tf)\S* .*--', code):
                yield f'{page}:{number}', shlex.split(code)


def _written(argv) -> dict:
    """{option: value} of the options this command writes to, as given on its command line."""
    options = ('model_dir',) + WRITTEN_OPTIONS if classify(argv)[0] == 'run' else WRITTEN_OPTIONS
    found = {}
    for arg in argv:
        name, _, value = arg.lstrip('-').partition('=')
        if arg.startswith('--') and name in options and value:
            found[name] = value
    return found


def test_documented_commands_write_outside_the_checkout(parsed):
    """A user following the docs never overwrites a file of the checkout (as `--out=docs/...`
    did): what each command writes, given or by its default, is outside the repository."""
    commands = [(where, argv) for where, argv, kind in ALL if kind] + [
        (where, argv) for page in PAGES for where, argv in inline_commands(page)]
    problems = []
    for where, argv in commands:
        written = {**_written(argv), **parsed['writes'].get(where, {})}
        problems += [f'{where}: --{k}={v}' for k, v in written.items() if _inside_the_checkout(v)]
    assert len(commands) > 50
    assert not problems, 'writes into the checkout:\n  ' + '\n  '.join(problems)


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


# --------------------------------------------------------------- figures and their home pages

_NUMBER = re.compile(r'(?<![\w.,])\d+(?:[.,]\d+)*')


def numbers(text: str) -> set:
    """The numbers a text writes (0.608, 15,000, 1.67 of 1.67–2.15x, 18 of ResNet-18)."""
    return set(_NUMBER.findall(text))


def flat(text: str) -> str:
    """Text with runs of white space as one space: a phrase may break across lines."""
    return re.sub(r'\s+', ' ', text)


def table_rows(page: str, heading: str) -> list[list[str]]:
    """The cells of each body row of the first table under `## heading`."""
    section = read(page).split(f'\n## {heading}\n', 1)[1].split('\n## ', 1)[0]
    rows = [line for line in section.splitlines() if line.startswith('|')]
    return [[cell.strip() for cell in row.strip().strip('|').split('|')] for row in rows[2:]]


def machine_labels() -> list[str]:
    """The machines' labels, from docs/benchmarks.md's table of them."""
    return [re.fullmatch(r'\*\*(.+)\*\*', row[0]).group(1)
            for row in table_rows('docs/benchmarks.md', 'Machines')]


README_RESULTS = table_rows('README.md', 'Results at a glance')


def test_the_readme_results_table_is_found():
    header = read('README.md').split('\n## Results at a glance\n', 1)[1].split('\n|---', 1)[0]
    assert header.strip().splitlines()[-1] == '| what | result | machine | page |'
    assert len(README_RESULTS) >= 8 and all(len(row) == 4 for row in README_RESULTS)


@pytest.mark.parametrize('row', README_RESULTS, ids=[row[0][:40] for row in README_RESULTS])
def test_every_number_of_the_readme_results_table_is_on_its_page(row):
    """Each row quotes its figures' home: its numbers (what, result) and its machines' labels
    appear on the page it links to."""
    what, result, machine, page = row
    targets = re.findall(r'\]\(([^)#]+)', page)
    assert targets, f'{what}: no page linked'
    home = flat(''.join(read(target) for target in targets))
    missing = sorted(numbers(what + ' ' + result) - numbers(home))
    assert not missing, f'{what}: {missing} not on {targets}'
    labels = [label for label in machine_labels() if label in flat(machine)]
    assert labels, f'{what}: {machine!r} names no machine label of docs/benchmarks.md'
    assert all(label in home for label in labels), (what, labels, targets)


def test_machine_labels_are_distinguishable():
    assert len(set(machine_labels())) == len(machine_labels()) >= 3
    assert all(re.fullmatch(r'2-core .+ \(.+\)', label) for label in machine_labels())


@pytest.mark.parametrize('page', PAGES)
def test_every_machine_is_named_by_its_label(page):
    """A 2-core AMD EPYC or Intel Xeon named anywhere is named by one of the machines' labels
    (a label may go on inside its parentheses: "(Zen 5, AVX-512; 1 min 18 s ...)"), so figures
    of different machines never share a name."""
    text = flat(read(page))
    stems = [label[:-1] for label in machine_labels()]  # without the closing parenthesis
    unlabelled = [text[m.start():m.start() + 40] for m in
                  re.finditer(r'2-core (AMD EPYC|Intel Xeon)', text)
                  if not any(text.startswith(stem, m.start()) for stem in stems)]
    assert not unlabelled, f'{page}: {unlabelled}'


# ----------------------------------------------- what a page says the program refuses or ignores

_VERDICT = re.compile(r'\b(ignored|refused|refuses|rejected|rejects|not supported)\b')
_VERDICTS = {'ignored': 'ignored', 'refused': 'refused', 'refuses': 'refused',
             'rejected': 'refused', 'rejects': 'refused', 'not supported': 'refused'}
_FLAG = re.compile(r'`--([a-z0-9_]+)')


def clauses(page: str):
    """The prose of a page as clauses (split at sentence ends and semicolons); a table row's
    cells each as clauses led by the row's first cell, the row's subject."""
    found, paragraph, inside = [], [], False

    def end_paragraph():
        found.extend(re.split(r'(?<=[.;])\s+', ' '.join(paragraph)) if paragraph else [])
        paragraph.clear()

    for line in read(page).splitlines():
        if line.startswith('```'):
            inside = not inside
            end_paragraph()
        elif inside:
            continue
        elif line.startswith('|'):
            end_paragraph()
            cells = [cell.strip() for cell in line.strip().strip('|').split('|')]
            found += [f'{cells[0]} {part}' for cell in cells[1:] for part in cell.split(';')]
        elif not line.strip() or line.startswith('#'):
            end_paragraph()
        else:
            paragraph.append(line.strip())
    end_paragraph()
    return found


def _config(tmp_path, *args):
    return config_of([f'--model_dir={tmp_path}', '--dataset=data/cifar10_sample',
                      '--use_tpu=False', '--image_size=32', '--train_steps=1', *args])


def _jit_compile_on_cpu_replicas(tmp_path, two_replicas, monkeypatch):
    """The run stops at start."""
    from simclr_tf import program
    from simclr_tf.config import ConfigError
    with pytest.raises(ConfigError, match='jit_compile=True is not supported with 2 CPU'):
        program.run(_config(tmp_path, '--jit_compile=True', '--cpu_replicas=2'))


def _jit_compile_on_gpus(tmp_path, two_replicas, monkeypatch, caplog):
    """Where the replicas are GPUs (faked: TensorFlow lists one), the strategy is accepted and
    the step runs uncompiled, with a warning."""
    import tensorflow as tf
    from simclr_tf import distribute, train
    config = _config(tmp_path, '--jit_compile=True')
    listed = tf.config.list_logical_devices
    monkeypatch.setattr(tf.config, 'list_logical_devices',
                        lambda kind=None: ['/gpu:0'] if kind == 'GPU' else listed(kind))
    distribute.check_strategy(config, two_replicas)
    with caplog.at_level('WARNING'):
        assert not train.use_jit(config, two_replicas)
    assert '--jit_compile is ignored with 2 replicas' in caplog.text


def _use_tpu_with_cpu_replicas(tmp_path, two_replicas, monkeypatch):
    from simclr_tf.config import ConfigError
    with pytest.raises(ConfigError, match='use_tpu=True and cpu_replicas > 0 exclude each other'):
        _config(tmp_path, '--use_tpu=True', '--cpu_replicas=2')


def _checkpoint_with_supervised_training(tmp_path, two_replicas, monkeypatch):
    from simclr_tf import program
    from simclr_tf.config import ConfigError
    with pytest.raises(ConfigError, match='train_mode=supervised trains from scratch'):
        program.run(_config(tmp_path, '--train_mode=supervised', f'--checkpoint={tmp_path}/x'))


def _other_hyperparameters_on_resume(tmp_path, two_replicas, monkeypatch):
    """A rerun in a model_dir whose config.json has other fixed hyperparameters stops."""
    from simclr_tf import model_dir
    from simclr_tf.config import ConfigError
    saved = _config(tmp_path, '--temperature=0.5').to_dict()
    with pytest.raises(ConfigError, match=r'other hyperparameters.*--temperature=0.1.*start_over'):
        model_dir.check_config(_config(tmp_path, '--temperature=0.1'), saved)


def _architecture_flag_on_export(tmp_path, two_replicas, monkeypatch):
    """mode=export takes the model_dir's config.json; an architecture flag that differs stops."""
    from simclr_tf import model_dir
    from simclr_tf.config import ConfigError
    (tmp_path / 'config.json').write_text(_config(tmp_path).to_json())
    values = _config(tmp_path, '--mode=export', '--resnet_depth=34').to_dict()
    with pytest.raises(ConfigError, match=r'mode=export reads .* --resnet_depth=34'):
        model_dir.with_saved_defaults(values, {'resnet_depth', 'mode', 'model_dir'})


# Each case a page may call a flag refused or ignored in: (the flag, words that name the case,
# the verdict, the check of the program in that case). A statement of a case not here fails
# below: add it here with its check, or say it in the one place that already does.
CLAIMS = [
    ('jit_compile', r'CPU replicas', 'refused', _jit_compile_on_cpu_replicas),
    ('jit_compile', r'GPUs', 'ignored', _jit_compile_on_gpus),
    ('use_tpu', r'`--cpu_replicas`', 'refused', _use_tpu_with_cpu_replicas),
    ('checkpoint', r'supervised', 'refused', _checkpoint_with_supervised_training),
    ('start_over', r'other hyperparameters', 'refused', _other_hyperparameters_on_resume),
    ('resnet_depth', r'mode=export', 'refused', _architecture_flag_on_export),
]
# Pages describing the program as it is (CHANGELOG.md also tells what it did before).
CURRENT = [page for page in PAGES if page != 'CHANGELOG.md']


def statements():
    """(page, clause, flags, verdicts) of every clause naming a flag and a verdict."""
    for page in CURRENT:
        for clause in clauses(page):
            flags, verdicts = set(_FLAG.findall(clause)), set(_VERDICT.findall(clause))
            if flags and verdicts:
                yield page, clause, flags, {_VERDICTS[v] for v in verdicts}


@pytest.mark.parametrize('page', CURRENT)
def test_what_pages_call_refused_or_ignored_is_a_checked_case(page):
    """Every clause saying a flag is refused or ignored names one case of CLAIMS and says that
    case's verdict (a clause of two cases is split in two). This is how "--jit_compile is
    ignored with more than one replica" next to a table saying it is refused on CPU replicas,
    as the program does, is caught."""
    problems = []
    for _, clause, flags, verdicts in (s for s in statements() if s[0] == page):
        cases = [c for c in CLAIMS if c[0] in flags and re.search(c[1], clause)]
        if len(cases) != 1:
            problems.append(f'{len(cases)} known cases in: {clause}')
        elif verdicts != {cases[0][2]}:
            problems.append(f'says {sorted(verdicts)}, the program: {cases[0][2]}: {clause}')
    assert not problems, f'{page}:\n  ' + '\n  '.join(problems)


def test_every_checked_case_is_stated_somewhere():
    stated = {id(c) for _, clause, flags, _ in statements() for c in CLAIMS
              if c[0] in flags and re.search(c[1], clause)}
    assert stated == {id(c) for c in CLAIMS}, [c[:3] for c in CLAIMS if id(c) not in stated]


@pytest.mark.parametrize('claim', CLAIMS, ids=[f'{c[0]}-{c[2]}-{c[1]}' for c in CLAIMS])
def test_the_program_does_what_the_pages_say(claim, tmp_path, two_replicas, monkeypatch, caplog,
                                             release_locks):
    monkeypatch.chdir(REPO)
    check = claim[3]
    if 'caplog' in check.__code__.co_varnames:
        check(tmp_path, two_replicas, monkeypatch, caplog)
    else:
        check(tmp_path, two_replicas, monkeypatch)
