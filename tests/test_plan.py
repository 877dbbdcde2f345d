"""A run's start as one plan: for each mode and start source the plan says what the run then does
(the variables it restores, the step it starts at); `--dry_run` on the documented commands that run
on the embedded sample exits 0 and writes nothing; the refusals read the same under --dry_run as
at a real start; runs that read a model_dir take its config.json's values."""

import hashlib
import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import authors, checkpoint, data, plan, program, train
from simclr_tf import model_dir as model_dir_lib
from simclr_tf.config import Config, ConfigError

from conftest import sample_folder
from test_authors import config_of, fixture_of, write_checkpoint, write_saved_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = 'data/cifar10_sample'
TINY = dict(resnet_depth=18, width_multiplier=0.125, image_size=16, proj_out_dim=8,
            num_proj_layers=2, use_tpu=False, train_batch_size=8, train_steps=4,
            checkpoint_steps=2, eval_split='test', seed=3, steps_per_loop=1,
            knn_train_examples=0)

pytestmark = pytest.mark.usefixtures('release_locks')  # in-process runs take locks
STRATEGY = tf.distribute.get_strategy()


def _config(model_dir, **changes) -> Config:
    values = dict(TINY, dataset=os.path.join(REPO, SAMPLE), model_dir=str(model_dir))
    values.update(changes)
    return Config(**values).validate()


def _weights(model) -> dict:
    return {v.path: v.numpy() for v in model.variables}


def _saved_run(config: Config, step: int) -> Config:
    """model_dir as a run of `config` leaves it at `step` (config.json, plan.txt, ckpt-<step>),
    saved as training saves, without the cost of training steps."""
    program.prepare_model_dir(config, plan.resolve(config, STRATEGY))
    state = train.build_state(config, STRATEGY, data.dataset_info(config, need_eval=False))
    state.optimizer.iterations.assign(step)
    state.checkpointer.save(step)
    model_dir_lib.release_locks()
    return config


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory) -> Config:
    """A pretraining run with its linear head at step 2."""
    return _saved_run(_config(tmp_path_factory.mktemp('pretrained'), train_steps=2), 2)


@pytest.fixture(scope='module')
def theirs(tmp_path_factory) -> dict:
    """The authors' ResNet-18 CIFAR layout (a linear head of 10 classes) as their checkpoint and
    their SavedModel."""
    fixture, tmp = fixture_of('r18_cifar'), tmp_path_factory.mktemp('theirs')
    return dict(fixture=fixture, checkpoint=write_checkpoint(fixture, str(tmp / 'ckpt-1')),
                saved_model=write_saved_model(fixture, str(tmp / 'export' / 'saved_model' / '1')))


# ---------------------------------------------------------------- the plan, then the run
def test_scratch_plans_step_0_and_what_model_dir_receives(tmp_path):
    for mode, last in (('train', 'TensorBoard events'), ('train_then_eval', 'after training')):
        start = plan.resolve(_config(tmp_path / mode, mode=mode), STRATEGY)
        assert (start.weights.kind, start.start_step) == ('scratch', 0)
        assert start.writes[0] == 'config.json, plan.txt' and start.writes[-1].startswith(last)
        assert start.views.views == 2 and start.replicas == 1 and start.batch == 8
        assert start.learning_rate == pytest.approx(0.3 * 8 / 256)
        assert (start.total_steps, start.checkpoint_steps) == (4, 2)
        assert not (tmp_path / mode).exists()  # resolved, nothing written
    state = train.build_state(_config(tmp_path / 'train'), STRATEGY, start.data, plan=start)
    assert state.step == 0


def test_resume_plans_the_newest_checkpoint_and_the_run_starts_there(pretrained, tmp_path):
    start = plan.resolve(pretrained.replace(train_steps=4), STRATEGY)
    newest = os.path.join(pretrained.model_dir, 'ckpt-2')
    assert (start.weights.kind, start.weights.path, start.start_step) == ('resume', newest, 2)
    assert '  weights: resumes from ' + newest + ' (step 2)' in start.lines()
    assert any('steps 2 to 4' in line for line in start.lines())
    state = train.build_state(pretrained, STRATEGY, start.data, plan=start, dry_run=True)
    assert state.step == 2
    saved = tf.train.load_checkpoint(newest)
    [kernel] = [v for v in state.model.variables if v.path == 'resnet/stem/conv_0/kernel']
    np.testing.assert_array_equal(
        kernel.numpy(), saved.get_tensor('model/encoder/stem/conv_0/_kernel/.ATTRIBUTES/'
                                         'VARIABLE_VALUE'))


@pytest.mark.parametrize('schema, new', [('(?!global_step)', []),
                                         ('(?!head_supervised)', ['supervised_head'])])
def test_our_checkpoint_plans_the_variables_the_run_restores(pretrained, tmp_path, schema, new):
    config = _config(tmp_path / 'ft', train_mode='finetune', checkpoint=pretrained.model_dir,
                     variable_schema=schema)
    start = plan.resolve(config, STRATEGY)
    assert start.weights.kind == 'checkpoint' and start.start_step == 0
    state = train.build_state(config, STRATEGY, start.data, plan=start)
    paths = {v.path for v in state.model.variables}
    assert set(start.weights.restored) <= paths
    assert state.step == 0
    source = tf.train.load_checkpoint(start.weights.path)
    key = 'model/supervised_head/linear_layer/dense/_kernel/.ATTRIBUTES/VARIABLE_VALUE'
    head = state.model.supervised_head.linear_layer.dense.kernel.numpy()
    assert np.array_equal(head, source.get_tensor(key)) == (not new)
    line = start.lines()[1]
    assert line == f'  weights: {start.weights.describe()}'
    assert line.endswith(f'new (freshly initialised): {new[0]}' if new else pretrained.model_dir
                         + '/ckpt-2')
    n = sum(1 for p in paths if not (new and p.startswith('head_supervised/')))
    assert len(start.weights.restored) == n


@pytest.mark.parametrize('kind', ['checkpoint', 'saved_model'])
def test_the_authors_model_plans_every_variable_and_the_run_takes_them(theirs, tmp_path, kind):
    path = theirs[kind] if kind == 'checkpoint' else os.path.dirname(theirs[kind])
    config = config_of(theirs['fixture'], train_mode='finetune', checkpoint=path,
                       dataset=os.path.join(REPO, SAMPLE), model_dir=str(tmp_path),
                       train_batch_size=8, train_steps=4, eval_split='test')
    start = plan.resolve(config, STRATEGY)
    keys = theirs['fixture']['checkpoint_keys']
    assert start.weights.kind == 'authors' and len(start.weights.restored) == len(keys)
    model = train.build_state(config, STRATEGY, start.data, plan=start).model
    assert sorted(start.weights.restored) == sorted(v.path for v in model.variables)
    source = start.weights.source  # opened once, by the plan
    pairs, _ = authors.plan(model, config, source)
    for v, key in pairs[:5] + pairs[-5:]:
        np.testing.assert_allclose(v.numpy(), source.read(key), err_msg=v.path)


def test_distillation_plans_its_teacher_and_the_run_builds_it_from_the_plan(theirs, tmp_path,
                                                                           monkeypatch):
    config = _config(tmp_path, image_size=32, train_mode='distill',
                     teacher=theirs['checkpoint'])
    start = plan.resolve(config, STRATEGY)
    assert (start.teacher.kind, start.teacher.num_classes) == ('authors checkpoint', 10)
    assert f'  teacher: authors checkpoint {theirs["checkpoint"]} (10 classes)' in start.lines()
    from simclr_tf import teacher as teacher_lib
    monkeypatch.setattr(teacher_lib, 'open_source', lambda path: pytest.fail('opened again'))
    state = train.build_state(config, STRATEGY, start.data, plan=start)
    assert state.teacher is not None and not state.teacher.trainable_variables
    assert state.step == 0 and start.weights.kind == 'scratch'


def test_eval_and_export_plan_the_model_dirs_checkpoints(pretrained):
    for mode in ('eval', 'export'):
        start = plan.resolve(pretrained.replace(mode=mode), STRATEGY)
        assert start.weights is None
        assert [s for s, _ in start.checkpoints] == [2]
    assert start.writes == ('saved_model/2/',)
    assert start.data is None and start.num_classes == 10  # export reads no data
    model, step = program.restore_newest(pretrained, STRATEGY, start)
    assert step == 2 and model.supervised_head.num_classes == 10
    before = _digest(pretrained.model_dir)
    program.run(pretrained.replace(mode='eval', dry_run=True, knn_train_examples=10))
    assert _digest(pretrained.model_dir) == before


# ---------------------------------------------------------------- dry runs of documented commands
def _digest(path) -> dict:
    """Every file under `path` and its bytes' hash (None: `path` does not exist)."""
    if not os.path.exists(path):
        return None
    found = {}
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), 'rb') as f:
                found[os.path.relpath(os.path.join(root, name), path)] = hashlib.sha256(
                    f.read()).hexdigest()
    return found


def _program_config(args) -> Config:
    """run.py's Config of `args`, with the model_dir's config.json as defaults (as the program)."""
    sys.path.insert(0, REPO)
    import simclr_tf_cli
    from absl import flags
    flags.FLAGS.unparse_flags()
    try:
        flags.FLAGS(['run.py', *args])
        return simclr_tf_cli.config_from_flags(model_dir_defaults=True)
    finally:
        flags.FLAGS.unparse_flags()


def _documented_sample_commands() -> tuple[list, list, set]:
    """The documented program commands that run on the embedded sample: (where, args, config) of
    those that read nothing another writes, of those that read a model_dir such a command writes
    (eval, export, --checkpoint), and the model_dirs the training ones write."""
    import test_docs
    parsed = [(where, args, test_docs.config_of(args)) for where, args in test_docs.RUN
              if '--helpfull' not in args]
    written = {c.model_dir for _, _, c in parsed
               if c.dataset == SAMPLE and c.mode in plan.TRAINING}
    alone, readers = [], []
    for where, args, c in parsed:
        if c.mode in ('eval', 'export') and c.model_dir in written:
            readers.append((where, args, c))
        elif c.dataset == SAMPLE:
            (readers if {c.checkpoint, c.teacher} & written else alone).append((where, args, c))
    return alone, readers, written


def _in(dirs: dict, args: list) -> list:
    """`args` with each documented model_dir (a flag's whole value) replaced by its test dir."""
    out = []
    for arg in args:
        flag, _, value = arg.partition('=')
        out.append(f'{flag}={dirs[value]}' if value in dirs else arg)
    return out


def test_dry_run_of_every_documented_sample_command_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    alone, readers, written = _documented_sample_commands()
    assert len(alone) >= 2 and len(readers) >= 2, (alone, readers)
    dirs = {d: str(tmp_path / f'run{i}') for i, d in enumerate(sorted(written))}
    for args in {tuple(args): where for where, args, _ in alone}:  # each command once
        assert program.run(_program_config(_in(dirs, list(args)) + ['--dry_run'])) is None
    assert not any(os.path.exists(d) for d in dirs.values())  # not even created
    # The readers (eval, export, --checkpoint) of the quickstart's model_dir, saved here.
    assert {c.model_dir if c.mode in ('eval', 'export') else c.checkpoint
            for _, _, c in readers} == {'/tmp/simclr_quickstart'}, readers
    target = dirs['/tmp/simclr_quickstart']
    _saved_run(_program_config(['--flagfile=flags/quickstart.cfg', f'--model_dir={target}']), 1)
    before = _digest(target)
    for where, args, _ in readers:
        config = _program_config(_in(dirs, args) + ['--dry_run'])
        assert (config.use_tpu, config.dataset) == (False, SAMPLE), where
        program.run(config)
        assert _digest(target) == before, where  # byte for byte
        assert config.model_dir == target or not os.path.exists(config.model_dir), where
    # And for real: the README's export of the quickstart's model_dir.
    program.run(_program_config(['--mode=export', f'--model_dir={target}']))
    assert os.path.exists(os.path.join(target, 'saved_model', '1', 'saved_model.pb'))


def test_the_quickstart_dry_run_exits_0_prints_the_plan_and_creates_nothing(tmp_path):
    from test_program import run_py
    target = tmp_path / 'quickstart'
    done = run_py('--flagfile=flags/quickstart.cfg', f'--model_dir={target}', '--dry_run')
    assert done.returncode == 0, done.stderr[-3000:]
    for line in ('start plan: mode=train_then_eval, train_mode=pretrain',
                 'weights: from scratch', 'data: data/cifar10_sample: 1000 train / 200 eval',
                 'views: 2 views of each image', 'devices: 1 replica (one device: CPU)',
                 'schedule: global batch 64, learning rate 0.25 (1 x 64/256), warmup 15 steps, '
                 'steps 0 to 188, a checkpoint every 64 steps',
                 'dry run: read a batch of train: 64x32x32x6', 'dry run: the run can start'):
        assert line in done.stderr, line
    assert not target.exists()


# ---------------------------------------------------------------- the refusals, dry or not
def _cli(args, capsys) -> tuple[int, list[str]]:
    """The program in this process: (exit status, its `error:` lines)."""
    sys.path.insert(0, REPO)
    import simclr_tf_cli
    from absl import flags
    flags.FLAGS.unparse_flags()
    try:
        flags.FLAGS(['run.py', *args])
        with pytest.raises(SystemExit) as done:
            simclr_tf_cli.main(['run.py'])
    finally:
        flags.FLAGS.unparse_flags()
    return done.value.code, [line for line in capsys.readouterr().err.splitlines()
                             if line.startswith('error:')]


@pytest.fixture(scope='module')
def head_on_z(tmp_path_factory) -> str:
    """A model_dir whose checkpoint's supervised head reads z (ft_proj_selector=-1), unrun."""
    config = _config(tmp_path_factory.mktemp('head_on_z'), ft_proj_selector=-1)
    model = train.build_model(config, 10)
    optimizer = keras.optimizers.SGD()
    optimizer.build(model.trainable_variables)
    checkpoint.Checkpointer(config, model, optimizer).save(1)
    model_dir_lib.write_config(config)
    return config.model_dir


def test_refusals_give_the_same_line_and_status_under_dry_run(tmp_path, capsys, theirs,
                                                              head_on_z, small_folder):
    tiny = [f'--{k}={v}' for k, v in TINY.items() if k not in ('seed', 'steps_per_loop')]
    other = tmp_path / 'other'
    model_dir_lib.tf.io.gfile.makedirs(str(other))
    model_dir_lib.write_config(_config(other, temperature=0.2))
    cases = {
        'head width': ['--train_mode=finetune', f'--checkpoint={head_on_z}'],
        'teacher classes': ['--train_mode=distill', f'--teacher={theirs["checkpoint"]}',
                            f'--dataset={small_folder()}', '--image_size=32'],
        'another run': [f'--model_dir={other}'],
        'missing split': ['--mode=train_then_eval', '--eval_split=validation'],
        'use_tpu': ['--use_tpu=True'],
    }
    expected = {'head width': "supervised head reads 8 inputs (ft_proj_selector=-1 there) and "
                              "this model's 64", 'teacher classes': 'has 10 classes; dataset=',
                'another run': '--temperature=0.1 (model_dir has 0.2)',
                'missing split': "split 'validation' not found",
                'use_tpu': 'use_tpu=True (the original\'s default) but no TPU could be reached'}
    for name, extra in cases.items():
        args = tiny + [f'--dataset={os.path.join(REPO, SAMPLE)}',
                       f'--model_dir={tmp_path / name}'] + extra
        real, dry = _cli(args, capsys), _cli(args + ['--dry_run'], capsys)
        assert real == dry, name
        status, errors = real
        assert status == 2 and len(errors) == 1 and expected[name] in errors[0], (name, errors)
        assert not (tmp_path / name).exists(), name
    assert sorted(os.listdir(other)) == ['config.json']


# ---------------------------------------------------------------- a model_dir's config as defaults
def test_eval_and_export_take_the_model_dirs_config_and_refuse_architecture_by_name(pretrained):
    d = pretrained.model_dir
    config = _program_config(['--mode=eval', f'--model_dir={d}', '--eval_batch_size=10',
                              '--use_tpu=False'])
    assert config.eval_batch_size == 10 and config.resnet_depth == 18
    assert (config.width_multiplier, config.image_size, config.dataset) == (0.125, 16,
                                                                            pretrained.dataset)
    assert config.mode == 'eval' and not config.start_over
    assert _program_config(['--mode=export', f'--model_dir={d}', '--resnet_depth=18']).use_tpu \
        is False  # the same value as the model_dir's: accepted
    with pytest.raises(ConfigError) as error:
        _program_config(['--mode=export', f'--model_dir={d}', '--resnet_depth=50',
                         '--temperature=0.5', '--eval_split=train'])
    message = str(error.value)
    assert '--resnet_depth=50 (model_dir has 18)' in message
    assert '--temperature=0.5 (model_dir has 0.1)' in message
    assert 'eval_split' not in message and 'start_over' not in message
    # Training keeps its flags: the model_dir's values are checked, not taken.
    assert _program_config([f'--model_dir={d}', '--use_tpu=False']).resnet_depth == 50


# ---------------------------------------------------------------- the structure the issue asked for
def test_program_run_reads_top_to_bottom_and_faults_does_not_import_checkpoint():
    import ast
    import inspect
    from simclr_tf import faults
    source = inspect.getsource(program.run)
    assert len(source.splitlines()) <= 40
    order = [source.index(s) for s in ('plan_lib.resolve(', 'dry_run(', 'prepare_model_dir(',
                                       'restore_newest(', 'train_then_eval(')]
    assert order == sorted(order)
    tree = ast.parse(inspect.getsource(faults))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
        for a in n.names}
    assert not {'checkpoint', 'simclr_tf.checkpoint'} & imported, imported


# ---------------------------------------------------------------- set-ups that learn little
def _warnings(tmp_path, **changes) -> tuple[str, ...]:
    return plan.resolve(_config(tmp_path / 'run', **changes), STRATEGY).warnings


def test_fine_tuning_on_one_class_is_warned_not_refused(pretrained, tmp_path):
    one = sample_folder(tmp_path / 'one', classes=('cat',))
    [warning] = _warnings(tmp_path, train_mode='finetune', checkpoint=pretrained.model_dir,
                          variable_schema='(?!head_supervised)', dataset=one)
    assert warning == (f'dataset {one} has one class (cat): train_mode=finetune trains a '
                       'classifier with nothing to tell apart (loss 0 and top-1 accuracy 1.000 '
                       'from the first step); it needs two classes or more')
    assert not _warnings(tmp_path, dataset=one)  # pretraining on it learns something


def test_a_label_fraction_that_leaves_classes_unlabelled_is_warned(tmp_path):
    """The sample: 1000 train examples of 10 classes; 0.5 % labels 5 of them."""
    labels, batch = _warnings(tmp_path, train_mode='supervised', label_fraction=0.005)
    assert labels.startswith('label_fraction=0.005 labels 5 of the 1000 examples of train, which '
                             'has 10 classes: 5 of them have no labelled example (')
    assert labels.endswith(') and the classifier never learns them; --label_fraction=0.01 or '
                           'more labels an example of each')
    assert batch.startswith('train_batch_size=8 is larger than the 5 labelled examples of train')
    config = _config(tmp_path / 'run', train_mode='supervised', label_fraction=0.01)
    assert len(set(data.label_subset(config)[0][data.label_subset(config)[1]])) == 10
    assert not plan.resolve(config, STRATEGY).warnings  # 0.01, as suggested: one of each


def test_a_batch_larger_than_the_data_set_is_warned_in_the_plan_and_the_dry_run(tmp_path, caplog):
    small = sample_folder(tmp_path / 'small', train=3)  # 6 train images
    config = _config(tmp_path / 'run', dataset=small, dry_run=True)
    start = plan.resolve(config, STRATEGY)
    warning = ('train_batch_size=8 is larger than the 6 examples of train: every batch holds some '
               'images more than once (and the contrastive loss takes copies of an image for '
               'negatives); --train_batch_size=6 or less draws each once')
    assert start.warnings == (warning,) and start.lines()[-1] == f'  warning: {warning}'
    with caplog.at_level('INFO'):
        program.run(config)
    assert [r.getMessage() for r in caplog.records if r.levelname == 'WARNING'] == [warning]
    assert 'dry run: the run can start' in caplog.text
    assert not (tmp_path / 'run').exists()
    assert not _warnings(tmp_path, dataset=small, train_batch_size=6)
