"""Transfer (simclr_tf.transfer): the presets, the two protocols from every encoder source, the
record and its resumption, significance, and the refusals of bad input."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from simclr_tf import export, features, sources, transfer
from simclr_tf.config import Config, ConfigError
from simclr_tf.model import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import sample_folder  # noqa: E402
from test_authors import fixture_of, write_checkpoint, write_saved_model  # noqa: E402

ENCODER = Config(resnet_depth=18, width_multiplier=0.125, image_size=16, proj_out_dim=8,
                 lineareval_while_pretraining=True, use_tpu=False)


@pytest.fixture(scope='module')
def sources_of(tmp_path_factory, sample_dir):
    """One tiny encoder as a model_dir (a checkpoint and config.json), a checkpoint prefix and an
    export; the authors' r18_cifar as their checkpoint and SavedModel; and a target folder."""
    root = tmp_path_factory.mktemp('transfer')
    model_dir = root / 'run'
    config = ENCODER.replace(dataset=sample_dir, model_dir=str(model_dir))
    tf.keras.utils.set_random_seed(3)
    model = build_model(config, 10)
    os.makedirs(model_dir)
    prefix = tf.train.Checkpoint(model=model).save(str(model_dir / 'ckpt'))
    (model_dir / 'config.json').write_text(config.to_json())
    saved = export.export_saved_model(model, config, 1)
    fixture = fixture_of('r18_cifar')
    theirs = write_checkpoint(fixture, str(root / 'theirs' / 'ckpt-1'))
    their_export = write_saved_model(fixture, str(root / 'theirs_export' / 'saved_model' / '1'))
    target = sample_folder(root / 'target', ('airplane', 'cat', 'ship'), 12, 4)
    return dict(model_dir=str(model_dir), prefix=prefix, export=saved, theirs=theirs,
                their_export=their_export, target=target, root=root)


def test_every_preset_names_a_tfds_builder_with_its_classes_or_a_folder_layout():
    assert len(transfer.PRESETS) == 12
    for p in transfer.PRESETS.values():
        assert p.metric in (transfer.TOP1, transfer.PER_CLASS, transfer.MAP), p
        for split in (p.validation or 'train[validation]', p.test):
            assert sources._SPLIT_PART.match(split), (p.name, split)
        if p.tfds is None:
            assert '<root>/' in p.layout and 'test' in p.layout, p
            continue
        info = tfds.builder(p.tfds, data_dir='/nonexistent', try_gcs=False).info  # offline
        if p.multi_label:
            label = info.features['objects']['label'] if 'objects' in info.features else None
            assert label is not None and label.num_classes == p.classes
            continue
        keys = info.supervised_keys or sources.image_label_keys(info.features)
        assert keys, p.name
        assert info.features[keys[1]].num_classes == p.classes, p.name
    paper = {'food101', 'cifar10', 'cifar100', 'birdsnap', 'sun397', 'stanford_cars',
             'fgvc_aircraft', 'voc2007', 'dtd', 'oxford_iiit_pet', 'caltech101',
             'oxford_flowers102'}
    assert set(transfer.PRESETS) == paper
    per_class = {n for n, p in transfer.PRESETS.items() if p.metric == transfer.PER_CLASS}
    assert per_class == {'fgvc_aircraft', 'oxford_iiit_pet', 'caltech101', 'oxford_flowers102'}


def test_a_folder_without_validation_holds_out_a_fifth_of_each_class(sources_of):
    target = transfer.resolve_target(sources_of['target'])
    assert (target.fit, target.validation, target.train, target.test) == (
        'train[fit]', 'train[validation]', 'train', 'test')
    assert target.sizes == {'train[fit]': 30, 'train[validation]': 6, 'test': 12}  # 12 a class
    flowers = transfer.resolve_target(sources_of['target'], preset='oxford_flowers102')
    assert flowers.metric == transfer.PER_CLASS


@pytest.mark.parametrize('source', ['model_dir', 'prefix', 'export', 'theirs', 'their_export',
                                    'random_init'])
def test_linear_protocol_from_every_encoder_source(sources_of, source):
    path = sources_of['model_dir' if source == 'random_init' else source]
    target = transfer.resolve_target(sources_of['target'])
    record = transfer.linear_transfer(path, target, random_init=source == 'random_init',
                                      grid=(1e-3, 1.0, 1e3))
    assert record['l2'] in (1e-3, 1.0, 1e3) and record['grid_size'] == 3
    assert record['value'] == record['top_1_accuracy'] and 0 <= record['value'] <= 1
    assert len(record['predictions']) == len(record['labels']) == 12
    assert record['image_size'] == (32 if source.startswith('their') else 16)
    # The same weights give the same features, whichever way they are read.
    if source in ('prefix', 'export'):
        again = transfer.linear_transfer(sources_of['model_dir'], target, grid=(1e-3, 1.0, 1e3))
        assert record['predictions'] == again['predictions']


def test_finetune_runs_follow_the_protocol(sources_of):
    target = transfer.resolve_target(sources_of['target'])
    schedule = transfer.Schedule(steps=100, batch_size=8, search_steps=10)
    encoder = features.load(sources_of['model_dir']).config
    search = transfer.finetune_config(encoder, '/init/ckpt-1', target, schedule, 0.01, 1e-4, 0,
                                      False, '/tmp/x', 16)
    assert (search.train_split, search.eval_split, search.train_steps) == (
        'train[fit]', 'train[validation]', 10)
    assert search.weight_decay == pytest.approx(1e-4 / 0.01)  # divided by the learning rate
    assert search.batch_norm_decay == 0.9  # 30 / 8 -> 4 steps an epoch: max(1 - 10/4, 0.9)
    big = dataclasses.replace(target, sizes={**target.sizes, 'train[fit]': 25600})
    assert transfer.finetune_config(encoder, None, big, schedule, 0.01, 0, 0, False, '/tmp/z',
                                    16).batch_norm_decay == pytest.approx(1 - 10 / 3200)
    assert (search.optimizer, search.momentum, search.fine_tune_after_block) == ('momentum', 0.9, -1)
    assert (search.train_mode, search.checkpoint, search.zero_init_logits_layer) == (
        'finetune', '/init/ckpt-1', True)
    final = transfer.finetune_config(encoder, None, target, schedule.__class__(
        steps=100, batch_size=2), 0.1, 0.0, 1, True, '/tmp/y', 16)
    assert (final.train_split, final.eval_split, final.train_steps, final.seed) == (
        'train', 'test', 100, 1)
    assert (final.train_mode, final.checkpoint) == ('supervised', None)  # random init: scratch
    assert final.eval_crop_proportion == 1.0  # shorter side, centre crop (<= 32 px)


def test_command_writes_one_record_per_protocol_and_a_rerun_skips_them(sources_of, tmp_path):
    out = tmp_path / 'out'
    argv = [sys.executable, '-m', 'simclr_tf.transfer', f'--model={sources_of["export"]}',
            f'--dataset={sources_of["target"]}', f'--out={out}', '--l2_values=3', '--steps=4',
            '--search_steps=2', '--batch_size=8', '--learning_rates=0.01,0.1',
            '--weight_decays=0', '--seeds=0,1']
    users = {k: v for k, v in os.environ.items() if not k.startswith(('TF_CPP_', 'PYTEST_'))}
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900, env=users)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.strip() == '', done.stderr[-3000:]  # as quiet as run.py
    linear, finetune = (json.loads((out / f'{p}.json').read_text())
                        for p in ('linear', 'finetune'))
    assert linear['protocol'] == 'linear' and linear['target']['sizes']['test'] == 12
    assert finetune['grid_size'] == 2 and len(finetune['values']) == 2
    assert set(finetune['runs']) == {'search_lr0.01_wd0_s0', 'search_lr0.1_wd0_s0',
                                     f'final_lr{finetune["learning_rate"]:.3g}_wd0_s0',
                                     f'final_lr{finetune["learning_rate"]:.3g}_wd0_s1'}
    chosen = max(('search_lr0.01_wd0_s0', 'search_lr0.1_wd0_s0'),
                 key=lambda k: finetune['runs'][k]['top_1_accuracy'])
    assert finetune['validation'] == finetune['runs'][chosen]['top_1_accuracy']
    assert finetune['runs'][chosen]['evaluated_on'] == 'train[validation]'
    again = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and 'linear: done' in again.stdout
    assert 'finetune: done' in again.stdout


@pytest.mark.parametrize('case', ['one_class', 'unseen_test_class', 'image_size', 'no_split'])
def test_bad_input_ends_in_one_error_line_and_writes_nothing(case, sources_of, sample_dir,
                                                             tmp_path, capsys):
    target, extra = sources_of['target'], []
    if case == 'one_class':
        target = sample_folder(tmp_path / 'one', ('cat',))
    elif case == 'unseen_test_class':
        target = sample_folder(tmp_path / 'other', test_classes=('airplane', 'dog'))
    elif case == 'image_size':
        extra = ['--image_size=64']  # a CIFAR-stem encoder at 64 px
    else:
        target = sample_folder(tmp_path / 'nosplit')
        shutil.rmtree(os.path.join(target, 'test'))
    out = tmp_path / 'out'
    with pytest.raises(SystemExit) as exit_:
        transfer._main([f'--model={sources_of["model_dir"]}', f'--dataset={target}',
                        f'--out={out}', *extra])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), lines
    expected = {'one_class': 'has 1 class', 'unseen_test_class': 'classes that train has not: dog',
                'image_size': 'image_size=64 does not fit', 'no_split': "split 'test' not found"}
    assert expected[case] in lines[0]
    assert not out.exists()


def test_voc2007_is_refused_as_multi_label():
    with pytest.raises(ConfigError, match='multi-label'):
        transfer.resolve_target('voc2007')


def test_permutation_test_equals_exact_enumeration():
    rng = np.random.default_rng(0)
    a = rng.uniform(size=40) < 0.7
    b = np.where(rng.uniform(size=40) < 0.5, a, rng.uniform(size=40) < 0.5)
    d = (a.astype(int) - b.astype(int))[a != b]
    observed = abs(d.sum())
    signs = np.array(np.meshgrid(*[[-1, 1]] * len(d))).reshape(len(d), -1).T
    exact = np.mean(np.abs(signs @ d) >= observed)
    assert 6 <= len(d) <= 20  # a real test, and small enough to enumerate
    assert transfer.permutation_test(a, b, samples=20000) == pytest.approx(exact, abs=0.015)
    assert transfer.permutation_test(a, a) == 1.0
    sure = np.ones(200, bool)
    assert transfer.permutation_test(sure, ~sure, samples=2000) < 0.001
