"""The training program end to end: the authors' command lines, resume, signals, result files."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import checkpoint, data, train
from simclr_tf.config import Config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--resnet_depth=18', '--width_multiplier=0.25', '--image_size=16', '--proj_out_dim=16',
        '--use_tpu=False', '--eval_split=test', '--knn_train_examples=64']


def run_py(*args, timeout=600, **kwargs):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', PYTHONUNBUFFERED='1')
    return subprocess.run([sys.executable, 'run.py', *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env, **kwargs)


def test_authors_readme_commands_run_unchanged(tmp_path, sample_dir):
    """tf2/README's CIFAR-10 pretraining then linear-eval command lines, data pointed at a folder."""
    pretrain_dir, ft_dir = tmp_path / 'simclr_test', tmp_path / 'simclr_test_ft'
    extra = ['--train_steps=2', '--train_batch_size=16', '--eval_steps=2']
    pretrain = run_py(
        '--train_mode=pretrain', '--train_batch_size=512', '--train_epochs=1000',
        '--learning_rate=1.0', '--weight_decay=1e-4', '--temperature=0.5',
        f'--dataset={sample_dir}', '--image_size=32', '--eval_split=test', '--resnet_depth=18',
        '--use_blur=False', '--color_jitter_strength=0.5', f'--model_dir={pretrain_dir}',
        '--use_tpu=False', *extra)
    assert pretrain.returncode == 0, pretrain.stderr[-3000:]
    assert tf.train.latest_checkpoint(str(pretrain_dir)).endswith('ckpt-2')
    # The start plan, one block at the start, its view plan one line (CPU only, one image size).
    assert 'start plan: mode=train, train_mode=pretrain' in pretrain.stderr
    plan = [line for line in pretrain.stderr.splitlines() if 'views: 2 views of each image' in line]
    assert len(plan) == 1 and 'crop: random crops of whole batches' in plan[0]
    assert '(auto: CPU only, images of one size)' in plan[0]

    linear = run_py(
        '--mode=train_then_eval', '--train_mode=finetune', '--fine_tune_after_block=4',
        '--zero_init_logits_layer=True',
        '--variable_schema=(?!global_step|(?:.*/|^)Momentum|head)', '--global_bn=False',
        '--optimizer=momentum', '--learning_rate=0.1', '--weight_decay=0.0',
        '--train_epochs=100', '--train_batch_size=512', '--warmup_epochs=0',
        f'--dataset={sample_dir}', '--image_size=32', '--eval_split=test', '--resnet_depth=18',
        f'--checkpoint={pretrain_dir}', f'--model_dir={ft_dir}', '--use_tpu=False', *extra)
    assert linear.returncode == 0, linear.stderr[-3000:]
    assert 'initialised' in linear.stderr and 'supervised head zero-initialised' in linear.stderr
    # The plan said it before the model was built: the encoder from the checkpoint, the heads new.
    planned = re.search(r'weights: (initialised (\d+) variables from .*)', linear.stderr)
    assert planned.group(1) == (
        f'initialised {planned.group(2)} variables from {pretrain_dir}/ckpt-2; projection_head, '
        'supervised_head not selected by --variable_schema; new (freshly initialised): '
        'projection_head, supervised_head (supervised head zero-initialised)')
    assert f'restored {planned.group(2)} variables from {pretrain_dir}/ckpt-2' in linear.stderr
    result = json.loads((ft_dir / 'result.json').read_text())
    assert result['global_step'] == 2
    assert 0.0 <= result['eval/label_top_1_accuracy'] <= 1.0
    assert json.loads((ft_dir / 'result_2.json').read_text()) == result
    flags = json.loads((ft_dir / 'flags.json').read_text())
    assert flags['fine_tune_after_block'] == 4 and flags['checkpoint'] == str(pretrain_dir)
    assert (ft_dir / 'saved_model' / '2' / 'saved_model.pb').exists()

    # The linear head trained on a frozen encoder: encoder weights equal the pretrained ones; its
    # BN moving statistics were re-estimated on the fine-tuning data (frozen_bn=batch, as the
    # authors' code).
    pre = _encoder_weights(pretrain_dir, train_mode='pretrain')
    ft = _encoder_weights(ft_dir, train_mode='finetune', fine_tune_after_block=4)
    assert len(pre) > 100 and pre.keys() == ft.keys()
    for path in pre:
        if 'moving_' not in path:
            np.testing.assert_array_equal(ft[path], pre[path], err_msg=path)
    assert any(not np.array_equal(ft[p], pre[p]) for p in pre if 'moving_' in p)


def _encoder_weights(model_dir, **changes):
    from simclr_tf.model import build_model
    model = build_model(Config(resnet_depth=18, image_size=32, use_tpu=False, **changes), 10)
    tf.train.Checkpoint(model=model).restore(
        tf.train.latest_checkpoint(str(model_dir))).expect_partial()
    return {v.path: v.numpy() for v in model.encoder.variables}


def _config(model_dir, sample_dir, **changes):
    values = dict(dataset=sample_dir, resnet_depth=18, width_multiplier=0.25, image_size=16,
                  proj_out_dim=16, use_tpu=False, train_batch_size=8, train_steps=4,
                  checkpoint_steps=2, eval_split='test', seed=7, warmup_epochs=0.01,
                  learning_rate=0.5, model_dir=str(model_dir), steps_per_loop=1)
    values.update(changes)
    return Config(**values).validate()


class _Crash(Exception):
    pass


def _train(config, crash_at=None):
    from simclr_tf import program
    program.set_up(config)  # seed, mixed-precision policy
    info = data.dataset_info(config, need_eval=False)

    def maybe_crash(state):
        if state.step == crash_at:
            raise _Crash()

    return train.train(config, tf.distribute.get_strategy(), info, on_checkpoint=maybe_crash)


@pytest.mark.parametrize('placement', ['host', 'step'])
def test_resume_equals_uninterrupted(tmp_path, sample_dir, placement):
    """4 steps in one run == 2 steps, a crash after the checkpoint, and a rerun (with --seed),
    the colour distortion in the stream or in the step."""
    whole = _train(_config(tmp_path / 'whole', sample_dir, augment_placement=placement))
    resumed_config = _config(tmp_path / 'resumed', sample_dir, augment_placement=placement)
    with pytest.raises(_Crash):
        _train(resumed_config, crash_at=2)
    assert tf.train.latest_checkpoint(str(tmp_path / 'resumed')).endswith('ckpt-2')
    resumed = _train(resumed_config)
    assert whole.step == resumed.step == 4
    for a, b in zip(whole.model.variables, resumed.model.variables):
        np.testing.assert_allclose(b.numpy(), a.numpy(), atol=1e-5, err_msg=a.path)


def test_sigterm_checkpoints_exits_75_and_resumes_and_a_second_signal_stops_at_once(
        tmp_path, sample_dir):
    args = [f'--dataset={sample_dir}', f'--model_dir={tmp_path}', '--train_steps=40',
            '--train_batch_size=8', '--steps_per_loop=5', '--checkpoint_steps=1000', *TINY]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', PYTHONUNBUFFERED='1')

    def start_and_wait_for(pattern):
        proc = subprocess.Popen([sys.executable, 'run.py', *args], cwd=REPO, env=env,
                                stderr=subprocess.PIPE, text=True)
        seen, deadline = [], time.time() + 300
        for line in proc.stderr:
            seen.append(line)
            if re.search(pattern, line) or time.time() > deadline:
                break
        return proc, seen

    proc, seen = start_and_wait_for(r'step 5/40')  # the first loop of 5 steps is done
    proc.send_signal(signal.SIGTERM)  # in the second loop, or before its first step
    _, rest = proc.communicate(timeout=120)
    log = ''.join(seen) + rest
    assert proc.returncode == train.PREEMPTED_EXIT_CODE == 75, log[-3000:]
    assert 'preempted by SIGTERM' in log and 'resume by rerunning' in log
    stopped_at = int(re.search(r'stopped by SIGTERM at step (\d+)', log).group(1))
    assert 5 <= stopped_at < 40
    assert checkpoint.list_checkpoints(str(tmp_path))[-1][0] == stopped_at
    assert not (tmp_path / 'result.json').exists()

    # The rerun resumes; Ctrl-C before its first step ends it at once (nothing new to save),
    # without a KeyboardInterrupt. (A second signal: tests/test_signals.py.)
    proc, seen = start_and_wait_for(r'resumed from')
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=60)
    log = ''.join(seen) + rest
    assert f'resumed from {tmp_path}/ckpt-{stopped_at}' in log, log[-3000:]
    assert f'weights: resumes from {tmp_path}/ckpt-{stopped_at} (step {stopped_at})' in log
    assert f'steps {stopped_at} to 40' in log  # the plan's schedule starts where it stopped
    assert proc.returncode == 75, log[-3000:]
    last = log.rstrip().splitlines()[-1]  # before or while the loop is traced
    kept = re.escape(f'{tmp_path}/ckpt-{stopped_at}')
    assert re.fullmatch(rf'stopped: preempted by SIGINT during start-up(, before step '
                        rf'{stopped_at + 1})? \(latest checkpoint {kept}\), '
                        'rerunning the same command resumes from it', last), last
    assert 'Traceback' not in log and 'KeyboardInterrupt' not in log
    assert checkpoint.list_checkpoints(str(tmp_path))[-1][0] == stopped_at


def test_nan_loss_stops_with_message_and_keeps_checkpoint(tmp_path, sample_dir):
    config = _config(tmp_path, sample_dir, learning_rate=1e30, optimizer='momentum',
                     train_steps=6)
    with pytest.raises(train.TrainingDiverged, match='non-finite training metrics'):
        _train(config)
    latest = tf.train.latest_checkpoint(str(tmp_path))
    assert latest is None or int(latest.rsplit('-', 1)[1]) < 6


def test_continuous_eval_evaluates_each_checkpoint(tmp_path, sample_dir):
    from simclr_tf import program
    config = _config(tmp_path, sample_dir, train_steps=2, checkpoint_steps=1, mode='train',
                     eval_batch_size=50, eval_steps=1, knn_train_examples=50,
                     keep_hub_module_max=2)
    program.run(config)
    result = program.run(config.replace(mode='eval', eval_timeout=3))
    assert result['global_step'] == 2  # it stops after the last step's checkpoint
    for step in (1, 2):
        saved = json.loads((tmp_path / f'result_{step}.json').read_text())
        assert saved['global_step'] == step and saved['eval/num_examples'] == 50
        assert 0 <= saved['eval/knn_top_1_accuracy'] <= 1
    assert sorted(os.listdir(tmp_path / 'saved_model')) == ['1', '2']

    # Everything evaluated already (as after train_then_eval): without a timeout it must still
    # return at once rather than wait for a checkpoint that never comes.
    import threading
    again = threading.Thread(target=program.run, args=(config.replace(mode='eval'),), daemon=True)
    again.start()
    again.join(timeout=120)
    assert not again.is_alive(), 'mode=eval waited although the last checkpoint was evaluated'


@pytest.mark.parametrize('changes', [dict(jit_compile=True), dict(mixed_precision='bfloat16')])
def test_xla_and_mixed_precision_train(tmp_path, sample_dir, changes):
    import keras
    try:
        state = _train(_config(tmp_path, sample_dir, train_steps=1, use_blur=True, **changes))
    finally:
        keras.mixed_precision.set_global_policy('float32')
    assert state.step == 1
    assert all(np.all(np.isfinite(v.numpy())) for v in state.model.trainable_variables)


def _free_ports(n):
    import socket
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(('127.0.0.1', 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _losses(log):
    return [float(x) for x in re.findall(r'step \d+/2 \| loss ([0-9.]+)', log)]


def test_two_workers_match_one_process(tmp_path, small_folder):
    """Two worker processes on 127.0.0.1 (TF_CONFIG) report the one-process loss, step by step.

    The same global batch in both set-ups: the data set is exactly one global batch of 16 and
    the views are the images themselves (no random augmentation), so each worker's shard and
    the single process's batch hold the same images; NT-Xent, global BN and the supervised loss
    do not depend on their order.
    """
    folder = small_folder()
    args = [f'--dataset={folder}', '--train_steps=2', '--train_batch_size=16', '--seed=3',
            '--steps_per_loop=1', '--augmentations=', '--knn_train_examples=0', *TINY]
    single = run_py(*args, f'--model_dir={tmp_path / "single"}')
    assert single.returncode == 0, single.stderr[-3000:]
    expected = _losses(single.stderr)
    assert len(expected) == 2

    ports = _free_ports(2)
    cluster = {'worker': [f'127.0.0.1:{p}' for p in ports]}
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', PYTHONUNBUFFERED='1')
    workers = [subprocess.Popen(
        [sys.executable, 'run.py', *args, f'--model_dir={tmp_path / "multi"}'], cwd=REPO,
        stderr=subprocess.PIPE, text=True,
        env=dict(env, TF_CONFIG=json.dumps({'cluster': cluster,
                                            'task': {'type': 'worker', 'index': i}})))
        for i in range(2)]
    logs = [w.communicate(timeout=600)[1] for w in workers]
    for w, log in zip(workers, logs):
        assert w.returncode == 0, log[-3000:]
        assert '2 replicas' in log
        np.testing.assert_allclose(_losses(log), expected, rtol=1e-4)
    assert tf.train.latest_checkpoint(str(tmp_path / 'multi')).endswith('ckpt-2')
    assert not [p for p in os.listdir(tmp_path / 'multi') if p.startswith('.worker')]
