"""The measuring parts of bench/: FLOP accounting and the profile reader."""

import json
import os
import sys

import keras
import tensorflow as tf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'bench'))
sys.path.insert(0, os.path.join(REPO, 'tests'))
import profile_step  # noqa: E402


def test_conv_macs_counts_output_size_times_kernel_times_input_channels():
    model = keras.Sequential([keras.Input((8, 8, 3)),
                              keras.layers.Conv2D(4, 3, padding='same', use_bias=False),
                              keras.layers.Conv2D(2, 1, strides=2, use_bias=False)])
    # 8·8 outputs × 3·3·3 per output channel × 4, then 4·4 outputs × 1·1·4 × 2
    assert profile_step.conv_macs(model, (8, 8, 6), images=5) == 5 * (64 * 27 * 4 + 16 * 4 * 2)


def test_op_times_reads_the_ops_of_a_profiled_function(tmp_path):
    x, w = tf.random.normal([2, 8, 8, 3]), tf.random.normal([3, 3, 3, 4])
    conv = tf.function(lambda x, w: tf.nn.conv2d(x, w, 1, 'SAME'))
    conv(x, w)
    tf.profiler.experimental.start(str(tmp_path))
    conv(x, w).numpy()
    tf.profiler.experimental.stop()
    types = {name.rsplit(':', 1)[1] for name in profile_step.op_times(str(tmp_path))}
    assert any(t.endswith('Conv2D') for t in types)  # Conv2D, or oneDNN's _MklNativeConv2D
    assert not any('::' in t or t == 'Run' for t in types)  # runtime events are not ops


def test_study_step_records_once_and_a_rerun_skips_what_is_done(tmp_path):
    import cifar10_study
    record, out, count = tmp_path / 'study.json', tmp_path / 'r.json', tmp_path / 'count'
    script = (f'import json, pathlib; c = pathlib.Path({str(count)!r}); '
              f'c.write_text(c.read_text() + "x" if c.exists() else "x"); '
              f'json.dump({{"top_1": 0.5}}, open({str(out)!r}, "w"))')
    argv = [sys.executable, '-c', script]
    cifar10_study.Study(str(record), '/data', str(tmp_path)).step('arm', argv, str(out))
    again = cifar10_study.Study(str(record), '/data', str(tmp_path))  # a rerun of the driver
    again.step('arm', argv, str(out))
    assert count.read_text() == 'x'  # ran once
    assert json.loads(record.read_text())['arm']['result'] == {'top_1': 0.5}
    # The record names no path of this machine: carried to another, its steps are still done.
    assert json.loads(record.read_text())['arm']['command'].startswith('python -c ')
    again.step('arm', argv + ['--changed'], str(out))  # another command is not the same step
    assert count.read_text() == 'xx'


def test_study_reruns_an_evaluation_when_the_run_it_evaluates_changed(tmp_path):
    import cifar10_study
    record, out = tmp_path / 'record.json', tmp_path / 'out.json'
    count = tmp_path / 'count'
    count.write_text('')
    script = (f'import json; open({str(count)!r}, "a").write("x"); '
              f'json.dump({{"top_1": 0.5}}, open({str(out)!r}, "w"))')
    train = [sys.executable, '-c', 'pass']
    probe = [sys.executable, '-c', script]
    study = cifar10_study.Study(str(record), '/data', str(tmp_path))
    study.step('train', train)
    study.step('probe', probe, str(out), after=('train',))
    study.step('probe', probe, str(out), after=('train',))
    assert count.read_text() == 'x'
    study.step('train', train + ['--longer'])  # the run it evaluates is another run now
    study.step('probe', probe, str(out), after=('train',))
    assert count.read_text() == 'xx'


def test_study_notes_merge_with_what_other_drivers_wrote(tmp_path):
    import cifar10_study
    record = tmp_path / 'record.json'
    one = cifar10_study.Study(str(record), '/data', str(tmp_path))
    other = cifar10_study.Study(str(record), '/data', str(tmp_path))  # another driver, same file
    one.note('arms', {'head_none': {'stage': 'head'}})
    other.note('probe_pixels', {'result': {}})
    one.note('arms', {**one.record['arms'], 'color_0.0': {'stage': 'color'}})
    assert set(json.loads(record.read_text())) == {'arms', 'probe_pixels'}
    assert set(json.loads(record.read_text())['arms']) == {'head_none', 'color_0.0'}


def test_study_arms_equal_to_the_recipe_are_one_run():
    import cifar10_study
    recipe = {'--temperature': '0.5', '--proj_head_mode': 'nonlinear'}
    assert cifar10_study.arm_run(['--temperature=0.5'], recipe) == ([], 'arm_recipe')
    assert cifar10_study.arm_run(['--proj_head_mode=nonlinear'], recipe) == ([], 'arm_recipe')
    assert cifar10_study.arm_run(['--contrastive_loss=nt_logistic', '--temperature=0.5'],
                                 recipe) == (['--contrastive_loss=nt_logistic'],
                                             'arm_contrastive_loss_nt_logistic')
    names = {cifar10_study.arm_run(extra, cifar10_study.flagfile_values(
        os.path.join(REPO, 'flags', 'cifar10_study.cfg')))[1]
        for arms in cifar10_study.ABLATIONS.values() for _, extra, _ in arms}
    # 26 arms (the seed and precision stages too), 18 distinct runs under the recipe
    assert len(names) == 18
    assert 'arm_seed_1' in names  # another seed is a run of its own
    assert 'arm_mixed_precision_bfloat16' in names  # float32 is the recipe's run


def test_program_runs_reads_progress_lines_after_the_first():
    import program_runs
    log = ('I1123 train.py:241] step 20/60 | loss 1.0 | 66.8 img/s | ETA 00:01:54\n'
           'I1123 train.py:241] step 40/60 | loss 1.0 | 168.0 img/s | ETA 00:00:53\n'
           'I1123 train.py:241] step 60/60 | loss 1.0 | 138.6 img/s | ETA 00:00:00\n')
    assert program_runs.loop_rates(log) == [168.0, 138.6]
    from simclr_tf.config import Config
    lines = program_runs.flag_lines(Config(seed=3, model_dir='/x'), train_steps=7)
    assert '--train_steps=7' in lines and not any(
        line.startswith(('--seed', '--model_dir', '--checkpoint=')) for line in lines)


def test_input_pipeline_bench_prints_every_stream_and_its_floors(mixed_folder):
    """The 224 px benchmark's command on a small folder of mixed sizes: one JSON line with the
    pipeline, decode-only and both floors (rates > 0, CPU ms per image)."""
    import subprocess
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, 'bench', 'input_pipeline.py'), f'--data={mixed_folder}',
         '--no-cache', '--image_size=24', '--batch=4', '--steps=2', '--windows=1',
         '--window_warmup=0', '--warmup_steps=1', '--floor'],
        capture_output=True, text=True, timeout=300, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result['batch_shape'] == [4, 24, 24, 6]
    assert result['best'] > 0 and result['decode_only']['median'] > 0
    for floor in ('crops_only', 'kernels_only'):
        assert result[floor]['median'] > 0 and result[f'{floor}_ratio_to_decode_only'] > 0
    assert set(result['cpu_ms_per_image']) == {'pipeline', 'decode_only', 'crops_only',
                                               'kernels_only'}
    assert result['in_training_step']['ops'] == 'color'


def test_findings_arms_set_their_knobs_and_equal_arms_are_one_run():
    import findings
    from test_run_flags import config_of
    names = {}
    for stage, arms in findings.STAGES.items():
        for a in arms:
            names.setdefault(findings.name(a), set()).add(tuple(sorted(a.items())))
            flagfile = 'cifar10_supervised' if a['supervised'] else 'cifar10_main'
            config = config_of(f'python run.py --flagfile={REPO}/flags/{flagfile}.cfg '
                               + ' '.join(findings.flags(a, supervised_lr=0.3)))
            assert (config.train_epochs, config.width_multiplier, config.seed) == (
                a['epochs'], a['width'], a['seed'])
            assert config.warmup_epochs == a['epochs'] / 10
            if a['supervised']:
                assert (config.train_mode, config.learning_rate) == ('supervised', 0.3)
                continue
            head = {'none': ('none', 0), 'linear': ('linear', 1), 'nonlinear2': ('nonlinear', 2),
                    'nonlinear3': ('nonlinear', 3)}[a['head']]
            assert (config.proj_head_mode, config.num_proj_outputs) == head
            assert (config.train_batch_size, config.color_jitter_strength, config.mode) == (
                a['batch'], a['color'], 'train')
    assert all(len(knobs) == 1 for knobs in names.values())  # one name, one setting
    recipe = findings.name(findings.arm())
    assert {s for s, arms in findings.STAGES.items()
            if recipe in map(findings.name, arms)} == set(findings.STAGES)
