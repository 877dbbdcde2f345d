"""Nothing lost, ever: the model_dir under damaged checkpoints, a second run, other flags, kills
inside a save, leftovers, corrupt images in training, preemption signals and eval with nothing
to evaluate."""

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import checkpoint, data, export, program, sources, train
from simclr_tf import model_dir as model_dir_lib
from simclr_tf.config import Config, ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', PYTHONUNBUFFERED='1', PYTHONPATH=REPO)


def _config(model_dir, dataset, **changes):
    values = dict(dataset=str(dataset), resnet_depth=18, width_multiplier=0.25, image_size=16,
                  proj_out_dim=16, use_tpu=False, train_batch_size=8, train_steps=3,
                  checkpoint_steps=1, eval_split='test', seed=7, warmup_epochs=0.01,
                  model_dir=str(model_dir), steps_per_loop=1, keep_checkpoint_max=5)
    values.update(changes)
    return Config(**values).validate()


pytestmark = pytest.mark.usefixtures('release_locks')  # in-process runs take locks


def _state(config):
    info = data.dataset_info(config, need_eval=False)
    return train.build_state(config, tf.distribute.get_strategy(), info)


@pytest.fixture(scope='module')
def trained(tmp_path_factory, sample_dir):
    """A model_dir with ckpt-1, ckpt-2, ckpt-3 of a tiny model and its optimizer (copied by the
    tests that damage it). Saved as training saves them, without the cost of training steps."""
    config = _config(tmp_path_factory.mktemp('trained'), sample_dir)
    program.prepare_model_dir(config)
    state = _state(config)
    for step in (1, 2, 3):
        state.optimizer.iterations.assign(step)
        state.checkpointer.save(step)
    model_dir_lib.release_locks()
    assert [s for s, _ in checkpoint.list_checkpoints(config.model_dir)] == [1, 2, 3]
    return config


def _copy(trained, tmp_path):
    config = trained
    target = tmp_path / 'model_dir'
    shutil.copytree(config.model_dir, target)
    return config.replace(model_dir=str(target)), target


def _truncate(path):
    with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)


# ------------------------------------------------------------------ resume
def test_resume_ignores_the_state_file_and_sets_aside_unreadable_checkpoints(trained, tmp_path,
                                                                             caplog):
    config, _ = _copy(trained, tmp_path)
    d = config.model_dir
    os.remove(os.path.join(d, 'checkpoint'))  # as when only ckpt-* are copied elsewhere
    _truncate(os.path.join(d, 'ckpt-3.data-00000-of-00001'))  # TF: "IndexError: Read less bytes"
    with caplog.at_level(logging.WARNING):
        state = _state(config)
    assert state.step == 2
    assert f'checkpoint {d}/ckpt-3 is damaged (a file of it is cut short): set aside as ' \
        f'{d}/unreadable-ckpt-3; trying the one before' in caplog.text
    assert os.path.exists(os.path.join(d, 'unreadable-ckpt-3.index'))
    assert os.path.exists(os.path.join(d, 'unreadable-ckpt-3.data-00000-of-00001'))  # kept
    assert tf.train.latest_checkpoint(d) == os.path.join(d, 'ckpt-2')  # state file rewritten

    os.remove(os.path.join(d, 'ckpt-2.index'))  # newest index gone: the one before
    assert _state(config).step == 1

    # A shard missing beside its index: damage too, named.
    config, target = _copy(trained, tmp_path / 'shard')
    os.remove(target / 'ckpt-3.data-00000-of-00001')
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert _state(config).step == 2
    assert 'ckpt-3 is damaged (ckpt-3.data-00000-of-00001 is missing): set aside' in caplog.text
    assert (target / 'unreadable-ckpt-3.index').exists() and (target / 'ckpt-2.index').exists()


def test_never_starts_from_scratch_over_a_previous_run(trained, tmp_path):
    config, target = _copy(trained, tmp_path)
    for step in (1, 2, 3):
        _truncate(os.path.join(config.model_dir, f'ckpt-{step}.index'))
    with pytest.raises(ConfigError, match='no readable checkpoint.*--start_over'):
        _state(config)
    assert sorted(p.name for p in target.glob('unreadable-*.index')) == [
        'unreadable-ckpt-1.index', 'unreadable-ckpt-2.index', 'unreadable-ckpt-3.index']

    # Only an export (and results) left: still no silent start from scratch.
    only_export = tmp_path / 'only_export'
    (only_export / 'saved_model' / '40').mkdir(parents=True)
    (only_export / 'result.json').write_text('{}')
    with pytest.raises(ConfigError, match=r'saved_model/40.*result.json.*--start_over'):
        _state(config.replace(model_dir=str(only_export)))

    # --start_over moves everything aside (nothing deleted) and starts from scratch.
    over = config.replace(model_dir=str(only_export), start_over=True)
    program.prepare_model_dir(over)
    assert _state(over).step == 0
    previous = [p for p in only_export.iterdir() if p.name.startswith('previous-')]
    assert len(previous) == 1 and (previous[0] / 'saved_model' / '40').is_dir()
    assert (previous[0] / 'result.json').exists()


# ------------------------------------------------------------------ one run per model_dir
LOCK_HOLDER = textwrap.dedent('''
    import sys, time
    from simclr_tf import model_dir
    model_dir.lock(sys.argv[1], 'train')
    print('locked', flush=True)
    time.sleep(600)
''')


def test_a_second_run_sees_the_lock_and_a_killed_run_leaves_none(tmp_path):
    holder = subprocess.Popen([sys.executable, '-c', LOCK_HOLDER, str(tmp_path)], env=ENV,
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        with pytest.raises(ConfigError, match=rf'in use by another train run \(pid {holder.pid}'):
            model_dir_lib.lock(str(tmp_path), 'train')
        model_dir_lib.lock(str(tmp_path), 'eval')  # a continuous eval job may run alongside
    finally:
        holder.kill()  # kill -9: the kernel releases the lock with the process
        holder.wait()
    model_dir_lib.lock(str(tmp_path), 'train')


def test_a_rerun_with_other_hyperparameters_stops_naming_them(tmp_path, sample_dir):
    from simclr_tf import plan
    config = _config(tmp_path, sample_dir)
    program.prepare_model_dir(config)
    written = (tmp_path / 'config.json').read_text()
    model_dir_lib.release_locks()
    other = config.replace(seed=1, temperature=0.2)
    with pytest.raises(ConfigError) as error:
        plan.resolve(other, tf.distribute.get_strategy())  # the start plan's check
    message = str(error.value)
    assert '--seed=1 (model_dir has 7)' in message
    assert '--temperature=0.2 (model_dir has 0.1)' in message
    assert 'learning_rate' not in message and '--start_over' in message
    assert (tmp_path / 'config.json').read_text() == written  # not rewritten
    # A run that does not train is never told to start over.
    with pytest.raises(ConfigError) as error:
        plan.resolve(other.replace(mode='eval'), tf.distribute.get_strategy())
    assert '--seed=1 (model_dir has 7)' in str(error.value)
    assert 'start_over' not in str(error.value)
    # What may change on resume: longer training, other mode, eval and resource flags.
    longer = config.replace(train_steps=10, mode='train_then_eval', eval_steps=2,
                            keep_checkpoint_max=2, intra_op_threads=1)
    program.prepare_model_dir(longer, plan.resolve(longer, tf.distribute.get_strategy()))
    assert json.loads((tmp_path / 'config.json').read_text())['train_steps'] == 10
    assert 'start plan: mode=train_then_eval' in (tmp_path / 'plan.txt').read_text()


# ------------------------------------------------------------------ kill -9 inside a save
# A parent process imports TensorFlow once (running no op, so it starts no thread pools) and forks
# one saver after another, killing each with SIGKILL at a random moment: many kills in seconds.
KILLER = textwrap.dedent('''
    import json, os, random, select, signal, sys, time, traceback
    import numpy as np
    import tensorflow as tf
    from simclr_tf import checkpoint, model_dir
    from simclr_tf.config import Config
    directory, kills = sys.argv[1], int(sys.argv[2])

    def saver(out, saves):
        model_dir.clean_leftovers(directory)  # as a training run does at its start
        config = Config(model_dir=directory, keep_checkpoint_max=2)
        model, opt = tf.Module(), tf.Module()
        model.big = tf.Variable(np.zeros([512, 1024], np.float32))  # 2 MB: saves take a while
        model.step = tf.Variable(0, dtype=tf.int64)
        opt.slot = tf.Variable(np.zeros([512, 1024], np.float32))
        ckpt = checkpoint.Checkpointer(config, model, opt)
        message = ckpt.restore(model)
        step = int(model.step.numpy())
        # ckpt-N must hold step N in every variable: no mix of two saves.
        assert 'scratch' in message or ((model.big.numpy() == step).all()
                                        and (opt.slot.numpy() == -step).all()), step
        os.write(out, f'resumed {step}\\n'.encode())
        for _ in range(saves):
            step += 1
            model.step.assign(step)
            model.big.assign(tf.fill([512, 1024], float(step)))
            opt.slot.assign(tf.fill([512, 1024], float(-step)))
            ckpt.save(step)
            os.write(out, f'saved {step}\\n'.encode())

    rng, confirmed, resumed, errors = random.Random(0), 0, [], []
    for i in range(kills + 1):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                saver(w, 10**9 if i < kills else 0)
            except BaseException:
                traceback.print_exc()
                os._exit(3)
            os._exit(0)
        os.close(w)
        # Even savers are killed at a random moment from their start (a restore, a save); odd ones
        # at a random moment after their restore, so that most kills land in saves and deletions
        # however slow a loaded machine makes start-up.
        delay = rng.uniform(0.05, 0.6)
        after_restore = i < kills and i % 2 == 1
        deadline = time.time() + (delay if i < kills and not after_restore else 120)
        text = b''
        while time.time() < deadline:
            ready, _, _ = select.select([r], [], [], max(deadline - time.time(), 0))
            if not ready:
                break
            chunk = os.read(r, 4096)
            if not chunk:
                break
            text += chunk
            if after_restore and b'resumed' in text:
                after_restore, deadline = False, time.time() + delay
        if i < kills:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        while True:
            chunk = os.read(r, 4096)
            if not chunk:
                break
            text += chunk
        os.close(r)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        if not (killed or (i == kills and os.WEXITSTATUS(status) == 0)):
            errors.append(f'saver {i} ended with status {status}')
        for line in text.decode().splitlines():
            word, step = line.split()
            if word == 'resumed':
                resumed.append(int(step))
                if int(step) < confirmed:
                    errors.append(f'saver {i} resumed from {step} after {confirmed} was saved')
            confirmed = max(confirmed, int(step))
    print(json.dumps(dict(confirmed=confirmed, resumed=resumed, errors=errors)))
''')


def test_kill_9_at_random_points_inside_saves_loses_nothing(tmp_path):
    """40 savers killed at random moments (in a save, a deletion of an old checkpoint, a resume):
    each next one resumes from a checkpoint at least as new as the last one reported saved, whose
    contents match its step, and no leftovers accumulate."""
    started = time.time()
    result = subprocess.run([sys.executable, '-c', KILLER, str(tmp_path), '40'], env=ENV,
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert not report['errors'], (report['errors'], result.stderr[-3000:])
    assert len(report['resumed']) >= 20  # most savers got past their restore before the kill
    assert report['resumed'][-1] == report['confirmed'] >= 20
    names = os.listdir(tmp_path)
    assert not [n for n in names if n.endswith('_temp') or n.startswith('checkpoint.tmp')], names
    set_aside = [n for n in names if n.startswith('unreadable-') and n.endswith('.index')]
    print(f'40 kills, {report["confirmed"]} saves confirmed, {len(report["resumed"])} resumes '
          f'checked, {len(set_aside)} checkpoints set aside, in {time.time() - started:.0f} s')


# ------------------------------------------------------------------ leftovers
def test_leftovers_are_removed_and_an_export_cut_between_renames_is_restored(tmp_path,
                                                                             sample_dir):
    (tmp_path / 'ckpt-5_temp').mkdir()
    (tmp_path / 'ckpt-5_temp' / 'part-00000-of-00001.data-00000-of-00001').write_bytes(b'x')
    (tmp_path / 'checkpoint.tmp0123abcd').write_text('half')
    exports = tmp_path / 'saved_model'
    (exports / '.tmp-7-0123abcd' / 'variables').mkdir(parents=True)
    (exports / '.old-4-89abcdef').mkdir()  # killed between the two renames: 4 not visible
    (exports / '.old-4-89abcdef' / 'saved_model.pb').write_text('the export of step 4')
    (exports / '3').mkdir()
    (exports / '.old-3-01234567').mkdir()  # replaced already: this one is litter
    program.prepare_model_dir(_config(tmp_path, sample_dir))
    assert not (tmp_path / 'ckpt-5_temp').exists()
    assert not (tmp_path / 'checkpoint.tmp0123abcd').exists()
    assert sorted(os.listdir(exports)) == ['3', '4']
    assert (exports / '4' / 'saved_model.pb').read_text() == 'the export of step 4'


def test_replacing_an_export_swaps_atomically(tmp_path):
    root = tmp_path / 'saved_model'
    (root / '5').mkdir(parents=True)
    (root / '5' / 'saved_model.pb').write_text('old')
    (root / '.tmp-5-aa').mkdir()
    (root / '.tmp-5-aa' / 'saved_model.pb').write_text('new')
    assert export._exchange(str(root / '.tmp-5-aa'), str(root / '5'))  # Linux renameat2
    assert (root / '5' / 'saved_model.pb').read_text() == 'new'
    assert (root / '.tmp-5-aa' / 'saved_model.pb').read_text() == 'old'


# ------------------------------------------------------------------ corrupt images
def _corrupt_folder(root, sample_dir):
    """2 classes x 8 train images (one batch of 8 per step), two of them corrupt in ways the
    listing's check (signature, end marker) cannot see."""
    for split, n in (('train', 8), ('test', 2)):
        for cls in ('airplane', 'cat'):
            os.makedirs(root / split / cls)
            for name in sorted(os.listdir(os.path.join(sample_dir, split, cls)))[:n]:
                shutil.copy(os.path.join(sample_dir, split, cls, name), root / split / cls / name)
    zero_height = root / 'train' / 'cat' / '0000.jpg'
    b = bytearray(zero_height.read_bytes())
    sof = b.find(b'\xff\xc0')
    b[sof + 5:sof + 7] = b'\x00\x00'  # SOF0: length(2) precision(1) height(2)
    zero_height.write_bytes(bytes(b))
    garbage = root / 'train' / 'airplane' / '0001.jpg'
    b = bytearray(garbage.read_bytes())
    start = b.find(b'\xff\xda') + 20
    rng = random.Random(0)
    while True:  # garbage in the middle of the scan, the end marker intact, that fails decoding
        c = bytearray(b)
        middle = start + (len(c) - start) // 2
        c[middle:middle + 60] = bytes(rng.randrange(256) for _ in range(60))
        try:
            tf.io.decode_jpeg(bytes(c))
        except tf.errors.InvalidArgumentError:
            break
    assert c.endswith(b'\xff\xd9')
    garbage.write_bytes(bytes(c))
    return root, [str(zero_height), str(garbage)]


def test_corrupt_jpegs_in_training_are_named_counted_replaced_and_resumption_stays_exact(
        tmp_path, sample_dir, caplog):
    folder, bad = _corrupt_folder(tmp_path / 'data', sample_dir)
    config = _config(tmp_path / 'run', folder, train_steps=2, checkpoint_steps=2,
                     augmentations='crop,flip')
    before = sources.undecodable_count()
    assert data.dataset_info(config, need_eval=False).num_train_examples == 16  # passed listing
    with caplog.at_level(logging.WARNING):
        state = train.train(config, tf.distribute.get_strategy(),
                            data.dataset_info(config, need_eval=False))
    assert state.step == 2 and not state.stopped  # one epoch: every image seen once
    assert sources.undecodable_count() - before == 2  # distinct files, however often met
    for path in bad:
        assert caplog.text.count(f'cannot decode {path}') == 1
    assert 'jpeg::Uncompress failed' in caplog.text
    # Exact resumption: the stream resumed at step 1 is the uninterrupted stream's step 1 on.
    whole = [x.numpy() for x, _ in data.build_dataset(config, True).take(3)]
    resumed = [x.numpy() for x, _ in data.build_dataset(config, True, start_step=1).take(2)]
    for a, b in zip(whole[1:], resumed):
        np.testing.assert_array_equal(a, b)


def test_corrupt_jpegs_among_photographs_of_mixed_sizes_are_replaced_too(tmp_path, sample_dir,
                                                                         caplog):
    # Images of mixed sizes take the per-image path that decodes only the crops' window (so the
    # file with garbage mid-scan fails only when a window reaches the garbage).
    folder, bad = _corrupt_folder(tmp_path / 'data', sample_dir)
    for path in sorted((folder / 'train' / 'cat').glob('*.jpg'))[1:]:  # keep the corrupt 0000
        image = tf.image.resize(tf.io.decode_jpeg(path.read_bytes()), (48, 40))
        path.write_bytes(tf.io.encode_jpeg(tf.cast(image, tf.uint8)).numpy())
    config = _config(tmp_path / 'run', folder, train_steps=2, checkpoint_steps=2)
    assert sources.open_source(str(folder), None).common_size('train') is None
    before = sources.undecodable_count()
    with caplog.at_level(logging.WARNING):
        batches = [x.numpy() for x, _ in data.build_dataset(config, True).take(2)]
    assert sources.undecodable_count() - before >= 1
    assert caplog.text.count(f'cannot decode {bad[0]}') == 1  # the height-0 header
    assert all(b.shape == (8, 16, 16, 6) and np.isfinite(b).all() for b in batches)


# ------------------------------------------------------------------ signals
def test_sigterm_stops_within_one_step_of_a_long_loop(tmp_path, sample_dir, monkeypatch):
    """Steps of 1 s, 30 steps in one loop: SIGTERM mid-loop saves and returns after about one
    step, not after the 30-step loop."""
    step_s = 1.0
    make_step_fn = train.make_step_fn

    def slow_step_fn(config, state, strategy, plan):
        step_fn = make_step_fn(config, state, strategy, plan)

        def slow(images, labels):
            metrics = step_fn(images, labels)
            with tf.control_dependencies([metrics]):
                done = tf.py_function(lambda: time.sleep(step_s) or True, [], tf.bool)
            with tf.control_dependencies([done]):
                return tf.identity(metrics)
        return slow

    monkeypatch.setattr(train, 'make_step_fn', slow_step_fn)
    config = _config(tmp_path, sample_dir, train_steps=30, steps_per_loop=30,
                     checkpoint_steps=1000, train_summary_steps=1000)
    info = data.dataset_info(config, need_eval=False)
    sent = {}

    def send_when_training():
        while not state_box or state_box[0].step < 2:
            time.sleep(0.05)
        sent['at'] = time.time()
        os.kill(os.getpid(), signal.SIGTERM)

    state_box = []
    original_build = train.build_state

    def build_and_watch(*args, **kwargs):
        state_box.append(original_build(*args, **kwargs))
        threading.Thread(target=send_when_training, daemon=True).start()
        return state_box[0]

    monkeypatch.setattr(train, 'build_state', build_and_watch)
    saved = {}
    state = train.train(config, tf.distribute.get_strategy(), info,
                        on_checkpoint=lambda s: saved.setdefault('at', time.time()))
    latency = saved['at'] - sent['at']
    assert state.stopped == signal.SIGTERM
    assert 2 <= state.step <= 4, state.step  # the step under way when the signal came, at most
    assert latency < 3 * step_s + 2, latency  # the rest of the loop would take ~25 s
    assert checkpoint.list_checkpoints(str(tmp_path))[-1][0] == state.step
    print(f'signal to checkpoint: {latency:.2f} s with {step_s:.1f} s steps')


# ------------------------------------------------------------------ eval with nothing there
def test_eval_without_checkpoints_says_so_waits_and_creates_nothing(tmp_path, sample_dir,
                                                                    monkeypatch, caplog):
    missing = tmp_path / 'typo'
    config = _config(missing, sample_dir, mode='eval', eval_timeout=3)
    monkeypatch.setattr(program, 'WAIT_LOG_SECS', 0.5)
    with caplog.at_level(logging.INFO):
        with pytest.raises(ConfigError, match='no checkpoint appeared .* within eval_timeout=3s'):
            program.run(config)
    assert f'no checkpoint in {missing} (the directory does not exist yet)' in caplog.text
    assert caplog.text.count(f'waiting for checkpoints in {missing}') >= 2
    assert not missing.exists()


# ------------------------------------------------------------------ file-system errors
def test_filesystem_problems_are_one_error_line(tmp_path, sample_dir, monkeypatch):
    a_file = tmp_path / 'a_file'
    a_file.write_text('')
    with pytest.raises(ConfigError, match='is a file, not a directory'):
        model_dir_lib.check_path(str(a_file), create=True)
    with pytest.raises(ConfigError, match=f'is below {a_file}, which is a file'):
        model_dir_lib.check_path(str(a_file / 'run'), create=True)
    with pytest.raises(data.DataError, match='is a file, not a directory'):
        data.dataset_info(_config(tmp_path, a_file))
    # Write permission: checked with os.access (these tests run as root, who may write anyway).
    monkeypatch.setattr(os, 'access', lambda path, mode: False)
    with pytest.raises(ConfigError, match='not writable'):
        model_dir_lib.check_path(str(tmp_path), create=True)
    monkeypatch.undo()

    # End to end: one `error:` line, status 2, before any model is built.
    result = subprocess.run(
        [sys.executable, 'run.py', f'--dataset={sample_dir}', f'--model_dir={a_file}/run',
         '--use_tpu=False', '--train_steps=1'], cwd=REPO, env=ENV, capture_output=True,
        text=True, timeout=300)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert errors == [f"error: model_dir='{a_file}/run' is below {a_file}, which is a file, "
                      'not a directory'], result.stderr[-2000:]


def test_keep_checkpoint_max_holds_across_a_resume(tmp_path):
    """Resuming rewrites the state file; the checkpoints from before the resume still count
    against keep_checkpoint_max and are deleted as newer ones are saved (without their timestamps
    in that file, CheckpointManager would keep them forever)."""
    config = Config(model_dir=str(tmp_path), keep_checkpoint_max=2)

    def saver():
        model, opt = tf.Module(), tf.Module()
        model.w = tf.Variable(0.0)
        opt.slot = tf.Variable(0.0)
        return model, checkpoint.Checkpointer(config, model, opt)

    model, ckpt = saver()
    for step in (1, 2, 3):
        ckpt.save(step)
    assert [s for s, _ in checkpoint.list_checkpoints(str(tmp_path))] == [2, 3]
    model, ckpt = saver()  # a rerun: resumes from ckpt-3, writing the state file anew
    assert 'resumed from' in ckpt.restore(model)
    for step in (4, 5):
        ckpt.save(step)
    assert [s for s, _ in checkpoint.list_checkpoints(str(tmp_path))] == [4, 5]
