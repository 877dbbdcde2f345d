"""The fault matrix: every fault that stops a run ends in one final `error:` line naming the cause
(path, worker or flag) and the remedy, with a known exit status, and loses nothing: earlier
checkpoints and exports stay readable, and a rerun resumes from the newest readable checkpoint.

Full and read-only disks are real: a small tmpfs mounted for the test (as root; without `mount`
the end-to-end disk test injects TensorFlow's ENOSPC error instead, and the in-process rows are
skipped). The faults already handled before (kill -9 inside saves, SIGTERM, the state file lost,
a busy model_dir, corrupt JPEGs) are in tests/test_faults.py and tests/test_program.py.
"""

import json
import logging
import os
import re
import resource
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from simclr_tf import checkpoint, data, export, faults, plan, program, train
from simclr_tf import model_dir as model_dir_lib
from simclr_tf.config import Config, ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', PYTHONUNBUFFERED='1', PYTHONPATH=REPO)
TINY = ['--resnet_depth=18', '--width_multiplier=0.25', '--image_size=16', '--proj_out_dim=16',
        '--use_tpu=False', '--eval_split=test', '--train_batch_size=8', '--steps_per_loop=1',
        '--checkpoint_steps=1', '--seed=7']


def _config(model_dir, dataset, **changes):
    values = dict(dataset=str(dataset), resnet_depth=18, width_multiplier=0.25, image_size=16,
                  proj_out_dim=16, use_tpu=False, train_batch_size=8, train_steps=3,
                  checkpoint_steps=1, eval_split='test', seed=7, model_dir=str(model_dir),
                  steps_per_loop=1)
    values.update(changes)
    return Config(**values).validate()


pytestmark = pytest.mark.usefixtures('release_locks')  # in-process runs take locks


def final_error(stderr: str) -> str:
    """The one `error:` line, which must be the last line printed."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith('error:')]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr[-3000:]
    print(errors[0])
    return errors[0]


# ---------------------------------------------------------------- a small disk
class Disk:
    """A tmpfs of `mb` MB at `path`: fill() takes its free space, read_only() remounts it."""

    def __init__(self, path, mb):
        self.path, self.filler = str(path), os.path.join(str(path), '.filler')
        os.makedirs(self.path)
        subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={mb}m', 'tmpfs', self.path],
                       check=True, capture_output=True)

    def fill(self):
        fill(self.filler)

    def free(self):
        if os.path.exists(self.filler):
            os.remove(self.filler)

    def read_only(self, on=True):
        subprocess.run(['mount', '-o', f'remount,{"ro" if on else "rw"}', self.path], check=True)

    def unmount(self):
        subprocess.run(['umount', '-l', self.path], capture_output=True)


def fill(filler):
    """Writes `filler` until the file system is full (a real ENOSPC for the next writer)."""
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for size in (1 << 20, 4096):  # then the last bytes: not even a small file fits
            try:
                while True:
                    os.write(fd, b'\0' * size)
            except OSError:
                pass
    finally:
        os.close(fd)


def _can_mount() -> bool:
    if os.geteuid() != 0 or not shutil.which('mount'):
        return False
    probe = f'/tmp/.fault_matrix_probe_{os.getpid()}'
    os.makedirs(probe, exist_ok=True)
    ok = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', probe],
                        capture_output=True).returncode == 0
    if ok:
        subprocess.run(['umount', '-l', probe], capture_output=True)
    os.rmdir(probe)
    return ok


CAN_MOUNT = _can_mount()


@pytest.fixture
def disk(tmp_path):
    if not CAN_MOUNT:
        pytest.skip('mount is not permitted here: no small file system to fill')
    d = Disk(tmp_path / 'disk', 48)
    try:
        yield d
    finally:
        d.unmount()


# ---------------------------------------------------------------- rows run in this process
@pytest.fixture(scope='module')
def tiny_state(tmp_path_factory, sample_dir):
    """A tiny model and optimizer, built once; each row gives it a Checkpointer of its own."""
    config = _config(tmp_path_factory.mktemp('state'), sample_dir)
    info = data.dataset_info(config, need_eval=False)
    return train.build_state(config, tf.distribute.get_strategy(), info)


def _run_with_checkpoints(tiny_state, config, steps=(1, 2)):
    """model_dir as a run leaves it after saving `steps`, plus an earlier export (saved_model/1)."""
    program.prepare_model_dir(config)
    saver = checkpoint.Checkpointer(config, tiny_state.model, tiny_state.optimizer)
    for step in steps:
        tiny_state.optimizer.iterations.assign(step)
        saver.save(step)
    exported = os.path.join(config.model_dir, 'saved_model', '1')
    os.makedirs(exported)
    with open(os.path.join(exported, 'saved_model.pb'), 'w') as f:
        f.write('the export of step 1')
    return saver


def _write_summaries(config, state):
    writer = tf.summary.create_file_writer(config.model_dir)
    with writer.as_default():
        for step in range(3, 200):
            tf.summary.scalar('train/total_loss', 1.0, step=step)
            tf.summary.text('notes', 'x' * 4096, step=step)
    writer.flush()


WRITES = {
    'checkpoint': lambda config, state, saver: saver.save(3),
    'export': lambda config, state, saver: export.export_saved_model(state.model, config, 3),
    'summary': lambda config, state, saver: _write_summaries(config, state),
}


@pytest.mark.parametrize('fault,write,expected', [
    ('full', 'checkpoint', r'disk full \(no space left on device\) writing checkpoint ckpt-3 in '
     r'model_dir={d} \(a checkpoint takes 5\.\d MB, 0\.\d MB free\)\. Free space there or move '
     r'model_dir to a larger disk \(copy it whole\), then rerun the same command: it resumes '
     r'from {d}/ckpt-2'),
    ('full', 'export', r'disk full \(no space left on device\) writing the export saved_model/3 '
     r'in model_dir={d} \(a checkpoint takes .*\)\. Free space there .* it resumes from '
     r'{d}/ckpt-2'),
    ('full', 'summary', r'disk full \(no space left on device\) writing TensorBoard summaries '
     r'\(events\.out\.tfevents\.[^)]+\) in model_dir={d} .* it resumes from {d}/ckpt-2'),
    ('read-only', 'checkpoint', r'cannot write checkpoint ckpt-3 in model_dir={d}: read-only file '
     r'system \({d}/ckpt-3_temp\)\. Make model_dir writable \(or copy it whole to a writable '
     r'--model_dir\), then rerun the same command: it resumes from {d}/ckpt-2'),
])
def test_a_write_that_fails_keeps_what_was_complete(disk, tiny_state, sample_dir, fault, write,
                                                    expected):
    config = _config(disk.path, sample_dir)
    saver = _run_with_checkpoints(tiny_state, config)
    model_dir_lib.release_locks()  # a file open for writing keeps a remount from taking
    disk.fill() if fault == 'full' else disk.read_only()
    with pytest.raises(Exception) as raised:
        WRITES[write](config, tiny_state, saver)
    explained = faults.explain(raised.value, config)
    print(explained.message)
    assert explained.status == 2
    assert re.fullmatch(expected.format(d=re.escape(disk.path)), explained.message), \
        explained.message
    disk.free() if fault == 'full' else disk.read_only(False)
    # Nothing lost: the export and both checkpoints stay; a rerun resumes from the newer.
    exports = os.path.join(disk.path, 'saved_model')
    assert sorted(n for n in os.listdir(exports) if not n.startswith('.')) == ['1']
    assert open(os.path.join(exports, '1', 'saved_model.pb')).read() == 'the export of step 1'
    model_dir_lib.release_locks()
    program.prepare_model_dir(config)  # cleans the failed save's leftovers
    assert not [n for n in os.listdir(disk.path) if n.endswith('_temp')]
    assert not [n for n in os.listdir(exports) if n.startswith('.tmp')]
    resumed = checkpoint.Checkpointer(config, tiny_state.model, tiny_state.optimizer)
    assert resumed.restore(tiny_state.model) == f'resumed from {disk.path}/ckpt-2'
    assert int(tiny_state.optimizer.iterations.numpy()) == 2


def test_a_checkpoint_being_written_by_another_run_is_named_with_what_to_do(
        tiny_state, sample_dir, tmp_path):
    other = tmp_path / 'other'
    _run_with_checkpoints(tiny_state, _config(other, sample_dir))
    model_dir_lib.release_locks()
    # The other run is between writing ckpt-2's data and renaming its files into place.
    for name in os.listdir(other):
        if name.startswith('ckpt-2.'):
            os.remove(other / name)
    (other / 'ckpt-2_temp').mkdir()
    config = _config(tmp_path / 'ft', sample_dir, train_mode='finetune',
                     checkpoint=str(other / 'ckpt-2'))
    strategy = tf.distribute.get_strategy()
    with pytest.raises(ConfigError, match=r'checkpoint=.*ckpt-2.* is still being written '
                                          r'\(.*ckpt-2_temp exists.*wait for that save'):
        plan.resolve(config, strategy)  # before model_dir is touched
    assert not (tmp_path / 'ft').exists()

    # Its files there, the data half written: the start plan cannot read it.
    shutil.copy(other / 'ckpt-1.index', other / 'ckpt-2.index')
    with open(other / 'ckpt-2.data-00000-of-00001', 'wb') as f, \
            open(other / 'ckpt-1.data-00000-of-00001', 'rb') as g:
        f.write(g.read()[:1000])
    with pytest.raises(faults.Unreadable) as raised:
        plan.resolve(config, strategy)
    assert not (tmp_path / 'ft').exists()
    message = faults.explain(raised.value, config).message
    print(message)
    assert message == (
        f'--checkpoint={other}/ckpt-2 cannot be read (Read less bytes than requested): another run '
        'is still writing it. Wait for that save to finish, or pass its directory to start from '
        f'its newest complete checkpoint; model_dir={tmp_path}/ft holds no checkpoint yet, so '
        'rerunning starts from --checkpoint again')
    assert checkpoint.list_checkpoints(str(tmp_path / 'ft')) == []
    assert os.path.getsize(other / 'ckpt-1.data-00000-of-00001') > 1000  # the source untouched


class TinyRecords(tfds.core.GeneratorBasedBuilder):
    """12x12 grey images of 2 classes in 2 record files, made here (no download)."""
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(12, 12, 1)),
                'label': tfds.features.ClassLabel(names=['p', 'q'])}),
            supervised_keys=('image', 'label'))

    def _split_generators(self, dl_manager):
        return {'train': self._generate_examples(64), 'test': self._generate_examples(8)}

    def _generate_examples(self, n):
        rng = np.random.default_rng(n)
        for i in range(n):
            yield i, {'image': rng.integers(0, 255, (12, 12, 1), np.uint8), 'label': i % 2}


def test_a_truncated_tfds_shard_is_named(tmp_path, sample_dir):
    TinyRecords(data_dir=str(tmp_path)).download_and_prepare(
        download_config=tfds.download.DownloadConfig(num_shards=2))
    config = _config(tmp_path / 'run', 'tiny_records', data_dir=str(tmp_path),
                     augmentations='crop')
    shards = sorted(tf.io.gfile.glob(str(tmp_path / 'tiny_records' / '1.0.0' / '*train*')))
    with open(shards[1], 'r+b') as f:  # as a copy cut short
        f.truncate(os.path.getsize(shards[1]) - 100)
    with pytest.raises(tf.errors.DataLossError) as raised:
        for _ in data.build_dataset(config, True).take(40):
            pass
    message = faults.explain(raised.value, config).message
    print(message)
    record = re.search(r'truncated record at \d+', str(raised.value)).group(0)
    assert message == (
        f"TFDS dataset 'tiny_records' is damaged: {shards[1]} is truncated ({record}: Read less "
        f'bytes than requested). Rebuild it (remove {tmp_path}/tiny_records/1.0.0 and run '
        f'`tfds build tiny_records --data_dir={tmp_path}`) or copy it again, then rerun the '
        'same command: it starts from scratch')


@pytest.mark.parametrize('error,expected', [
    # A peer's process killed: what worker 0 of a loopback TF_CONFIG pair got (issue 27).
    (tf.errors.UnavailableError(None, None, 'Collective ops is aborted by: failed to connect to '
     'all addresses\nAdditional GRPC error information from remote target /job:worker/replica:0/'
     'task:1 ... recvmsg:Connection reset by peer\nThe error could be from a previous operation. '
     'Restart your program to reset.'),
     r'lost worker 1 \(127\.0\.0\.1:2223\): its connection was reset \(its process ended\)\. '
     r'A multi-worker run cannot go on without it: start all 2 workers again with the same '
     r'command; they start from scratch'),
    (tf.errors.AbortedError(None, None, '[_Derived_]Collective ops is aborted by: Socket closed'),
     r'lost another worker: its connection closed \(its process ended\)\..*all 2 workers.*'),
    # What it got here (TF 2.21): the coordination service's verdict after ~20 s.
    (tf.errors.UnavailableError(None, None, 'Collective ops is aborted by: Error reported from '
     '/job:worker/task:1: The following tasks are unhealthy (stopped sending heartbeats):\n'
     '/job:worker/replica:0/task:1\nThe tasks have crashed.'),
     r'lost worker 1 \(127\.0\.0\.1:2223\): it stopped sending heartbeats \(its process ended or '
     r'hangs\)\. .*'),
    (MemoryError(), r'out of memory\. Lower --train_batch_size \(now 8; a run keeps its batch '
     r'size, so in a new --model_dir or with --start_over\), or give the process more memory and '
     r'rerun the same command: it starts from scratch'),
    (tf.errors.ResourceExhaustedError(None, None, 'OOM when allocating tensor with shape[16,16,'
     '16,64] and type float on /job:localhost/replica:0/task:0/device:CPU:0'),
     r'out of memory \(a tensor of shape \[16,16,16,64\]\)\. Lower --train_batch_size .*'),
    # Permissions that deny (tests run as root, whom they do not stop): as TensorFlow says it.
    (tf.errors.PermissionDeniedError(None, None, '{{function_node __wrapped__ReadFile}} '
     '{sample}/train/cat/0001.jpg; Permission denied [Op:ReadFile]'),
     r'cannot read or write {sample}/train/cat/0001\.jpg: permission denied '
     r'\(--dataset={sample}\)\. Fix its permissions, then rerun the same command: it starts '
     r'from scratch'),
    (tf.errors.PermissionDeniedError(None, None, '{tmp}/ckpt-4_temp; Permission denied'),
     r'cannot write checkpoint ckpt-4 in model_dir={tmp}: permission denied \({tmp}/ckpt-4_temp\)'
     r'\. Make model_dir writable .*'),
])
def test_messages_from_error_texts(tmp_path, sample_dir, monkeypatch, error, expected):
    monkeypatch.setenv('TF_CONFIG', json.dumps({
        'cluster': {'worker': ['127.0.0.1:2222', '127.0.0.1:2223']},
        'task': {'type': 'worker', 'index': 0}}))
    if isinstance(error, tf.errors.OpError):  # the test's own paths in the text
        error = type(error)(None, None, error.message.format(sample=sample_dir, tmp=tmp_path))
        expected = expected.format(sample=re.escape(sample_dir), tmp=re.escape(str(tmp_path)))
    explained = faults.explain(error, _config(tmp_path, sample_dir))
    assert re.fullmatch(expected, explained.message), explained.message
    assert explained.status == (faults.RETRY if 'lost' in expected else faults.FIX_FIRST)
    assert faults.RETRY == train.PREEMPTED_EXIT_CODE  # one status for "rerun as is"
    with_cache = faults.explain(error, _config(tmp_path, sample_dir, cache_dataset=True))
    if 'memory' in expected:
        assert '--cache_dataset=False (the decoded images are kept in memory)' in \
            with_cache.message


# ---------------------------------------------------------------- rows run as a user runs them
# run.py with a fault injected at a chosen checkpoint save: the dataset folder moved away after
# it (mid-epoch), or the disk filled before it (for real on a tmpfs, else TensorFlow's error).
INJECT = textwrap.dedent('''
    import os, sys
    os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '1')
    fault, at, target = sys.argv.pop(1), int(sys.argv.pop(1)), sys.argv.pop(1)
    sys.path.insert(0, os.getcwd())
    from simclr_tf import checkpoint
    save = checkpoint.Checkpointer.save
    calls = []

    def save_with_fault(self, step):
        calls.append(step)
        if fault == 'fill' and len(calls) == at:
            if os.path.ismount(os.path.dirname(target)):
                sys.path.insert(0, os.path.join(os.getcwd(), 'tests'))
                from test_fault_matrix import fill
                fill(target)
            else:
                import tensorflow as tf
                raise tf.errors.ResourceExhaustedError(None, None, (
                    f'{self._directory}/ckpt-{step}_temp/part-00000-of-00001.data-00000-of-'
                    '00001.tempstate1; No space left on device [Op:SaveV2]'))
        path = save(self, step)
        if fault == 'move' and len(calls) == at:
            os.rename(target, target + '.moved')
        return path

    checkpoint.Checkpointer.save = save_with_fault
    import simclr_tf_cli
    sys.argv[0] = 'run.py'
    simclr_tf_cli.cli()
''')


def run_with(fault, at, target, *args, timeout=300):
    return subprocess.run([sys.executable, '-c', INJECT, fault, str(at), str(target), *args],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def test_dataset_gone_then_disk_full(tmp_path, small_folder):
    """One model_dir through two faults, as a user meets them: each run stops with its line and
    status 2, keeps every checkpoint, and the rerun resumes from the newest. (Resuming after a
    full disk is the in-process row above.)"""
    folder = small_folder()
    disk = Disk(tmp_path / 'disk', 48) if CAN_MOUNT else None
    model_dir = disk.path if disk else str(tmp_path / 'run')
    args = [f'--dataset={folder}', f'--model_dir={model_dir}', *TINY]
    try:
        # The dataset folder moves away after ckpt-1, mid-epoch (2 steps an epoch).
        gone = run_with('move', 1, folder, *args, '--train_steps=30')
        assert gone.returncode == 2, gone.stderr[-3000:]
        newest = checkpoint.list_checkpoints(model_dir)[-1][0]
        line = final_error(gone.stderr)
        assert re.fullmatch(
            rf'error: dataset file {folder}/train/(airplane|cat)/\d+\.jpg is gone: '
            rf'--dataset={folder} was moved or removed while the run read it\. Put it back, then '
            rf'rerun the same command: it resumes from {model_dir}/ckpt-{newest}', line), line
        assert 'cannot decode' not in gone.stderr  # not taken for a bad image
        os.rename(f'{folder}.moved', folder)

        # The disk fills before the rerun's first checkpoint; --verbosity=1 shows the traceback.
        full = run_with('fill', 1, os.path.join(model_dir, '.filler'), *args,
                        '--train_steps=30', '--verbosity=1')
        assert full.returncode == 2, full.stderr[-3000:]
        assert f'resumed from {model_dir}/ckpt-{newest}' in full.stderr
        assert 'Traceback (most recent call last)' in full.stderr
        assert 'ResourceExhaustedError' in full.stderr
        line = final_error(full.stderr)
        sizes = r' \(a checkpoint takes 5\.\d MB, 0\.\d MB free\)' if disk else r' \(.*\)'
        assert re.fullmatch(
            rf'error: disk full \(no space left on device\) writing checkpoint ckpt-{newest + 1} '
            rf'in model_dir={model_dir}{sizes}\. Free space there or move model_dir to a larger '
            r'disk \(copy it whole\), then rerun the same command: it resumes from '
            rf'{model_dir}/ckpt-{newest}', line), line
        kept = checkpoint.list_checkpoints(model_dir)
        assert [s for s, _ in kept] == list(range(max(1, newest - 4), newest + 1))
        for _, prefix in kept:  # every one complete
            tf.train.load_checkpoint(prefix).get_tensor('_CHECKPOINTABLE_OBJECT_GRAPH')
    finally:
        if disk:
            disk.unmount()


def _big_images(root, size=1024):
    """A folder of a few 1024 x 1024 pictures of one size, as BMP (decoding is a copy): a batch
    of 1024 of them takes 3 GB."""
    from PIL import Image
    ramp = np.linspace(0, 255, size).astype(np.uint8)
    for split, n in (('train', 4), ('test', 1)):
        for c, cls in enumerate(('a', 'b')):
            os.makedirs(root / split / cls)
            for i in range(n):
                image = np.stack([np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)),
                                  np.full((size, size), 50 * i + c, np.uint8)], -1)
                Image.fromarray(image).save(root / split / cls / f'{i}.bmp')
    return root


def test_out_of_memory_names_the_flag_to_lower(tmp_path):
    """A 3 GB address-space limit (RLIMIT_AS) and a batch (3 GB) that cannot fit under it, so
    the batch's allocation is what fails, whatever the process held before. (A limit met by
    many small allocations can end in an abort inside TensorFlow's C++ code, std::bad_alloc,
    which no program can turn into a line.)"""
    folder = _big_images(tmp_path / 'data')

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    started = time.time()
    result = subprocess.run(
        [sys.executable, 'run.py', f'--dataset={folder}', f'--model_dir={tmp_path / "run"}',
         '--train_steps=2', '--train_batch_size=1024', '--augmentations=crop',
         '--image_size=16', '--resnet_depth=18', '--width_multiplier=0.25', '--use_tpu=False'],
        cwd=REPO, capture_output=True, text=True, timeout=300, preexec_fn=limit,
        env=dict(ENV, MALLOC_ARENA_MAX='2'))  # glibc's per-thread arenas reserve 64 MB each
    assert result.returncode == 2, result.stderr[-3000:]
    line = final_error(result.stderr)
    assert line == (
        'error: out of memory (for a batch of the input pipeline). Lower --train_batch_size (now '
        '1024; a run keeps its batch size, so in a new --model_dir or with --start_over), or give '
        'the process more memory and rerun the same command: it starts from scratch')
    assert not checkpoint.list_checkpoints(str(tmp_path / 'run'))
    assert not [n for n in os.listdir(tmp_path / 'run') if n.endswith('_temp')]
    print(f'out of memory reported after {time.time() - started:.0f} s')


def _free_ports(n):
    import socket
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(('127.0.0.1', 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_a_lost_worker_is_named_and_all_workers_resume(tmp_path, small_folder):
    """Two workers on loopback; worker 1 is killed (-9) after a checkpoint: worker 0 stops (once
    TensorFlow's coordination service misses its heartbeats), naming worker 1, status 75; both
    started again resume from that checkpoint."""
    folder = small_folder()
    model_dir = tmp_path / 'run'
    cluster = {'worker': [f'127.0.0.1:{p}' for p in _free_ports(2)]}

    def start(steps):
        return [subprocess.Popen(
            [sys.executable, 'run.py', f'--dataset={folder}', f'--model_dir={model_dir}',
             *TINY[:6], '--train_batch_size=16', '--checkpoint_steps=2', '--steps_per_loop=1',
             '--augmentations=', f'--train_steps={steps}'], cwd=REPO, stderr=subprocess.PIPE,
            text=True, env=dict(ENV, TF_CONFIG=json.dumps(
                {'cluster': cluster, 'task': {'type': 'worker', 'index': i}})))
            for i in range(2)]

    workers = start(200)
    try:
        seen, deadline = [], time.time() + 240
        for line in workers[0].stderr:  # until ckpt-2 is written and training goes on
            seen.append(line)
            if re.search(r'step [3-9]/200', line) or time.time() > deadline:
                break
        assert checkpoint.list_checkpoints(str(model_dir)), ''.join(seen)[-3000:]
        workers[1].kill()
        killed = time.time()
        rest = workers[0].communicate(timeout=60)[1]
        stopped_in = time.time() - killed
    finally:
        for w in workers:
            w.kill()
            w.wait()
    log = ''.join(seen) + rest
    print(f'worker 0 stopped {stopped_in:.1f} s after worker 1 was killed')
    assert workers[0].returncode == faults.RETRY == 75, log[-3000:]
    assert stopped_in < 60, stopped_in  # TensorFlow's heartbeat timeout: ~20 s here
    newest = checkpoint.list_checkpoints(str(model_dir))[-1][0]
    line = final_error(log)
    assert re.fullmatch(
        rf'error: lost worker 1 \({cluster["worker"][1]}\): .+\. A '
        r'multi-worker run cannot go on without it: start all 2 workers again with the same '
        rf'command; they resume from {model_dir}/ckpt-\d+', line), line
    assert int(line.rsplit('-', 1)[1]) == newest

    # Both started again resume from it (to that step: no training step to pay for here).
    workers = start(newest)
    logs = [w.communicate(timeout=300)[1] for w in workers]
    for w, log in zip(workers, logs):
        assert w.returncode == 0, log[-3000:]
        assert f'resumed from {model_dir}/ckpt-{newest}' in log
        assert f'already trained to step {newest} of {newest}' in log


# ---------------------------------------------------------------- damaged checkpoints
# A run of 4 steps, a checkpoint each, stopped after step 3 (ckpt-4 removed); then one fault in
# its files. Every row: the intact checkpoints keep their names and bytes, and the resumed run's
# losses are the uninterrupted run's.
def _recording(record):
    """train.make_loop_fn whose loops put each step's metrics in `record` (steps_per_loop=1)."""
    make = train.make_loop_fn

    def make_loop_fn(config, state, strategy, plan, stop=None):
        loop = make(config, state, strategy, plan, stop)

        def recorded(iterator, n):
            values = loop(iterator, n)
            record[int(state.optimizer.iterations.numpy())] = values.numpy()
            return values
        return recorded
    return make_loop_fn


def _train_recording(config):
    """(the final state, {step: its metrics}) of train.train(config)."""
    record = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, 'make_loop_fn', _recording(record))
        program.set_up(config)
        state = train.train(config, tf.distribute.get_strategy(),
                            data.dataset_info(config, need_eval=False))
    return state, record


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, sample_dir):
    """(config, {step: metrics}) of a run of 4 steps with a checkpoint each, uninterrupted."""
    config = _config(tmp_path_factory.mktemp('whole'), sample_dir, train_steps=4,
                     keep_checkpoint_max=5)
    state, record = _train_recording(config)
    model_dir_lib.release_locks()
    assert state.step == 4 and sorted(record) == [1, 2, 3, 4]
    return config, record


def _stopped_after_3(uninterrupted, tmp_path):
    """A copy of the uninterrupted run's model_dir as a run stopped after step 3 leaves it."""
    config, _ = uninterrupted
    target = tmp_path / 'run'
    shutil.copytree(config.model_dir, target,
                    ignore=shutil.ignore_patterns('ckpt-4.*', 'events.*', '*.lock'))
    return config.replace(model_dir=str(target)), target


def _digests(model_dir):
    """{name: bytes} of every checkpoint file in model_dir."""
    return {p.name: p.read_bytes() for p in sorted(model_dir.glob('*ckpt-*'))}


def _overwrite_middle(data):
    def damage(path):
        with open(path, 'r+b') as f:
            f.seek(os.path.getsize(path) // 2)
            f.write(data)
    return damage


def _flip_one_byte(path):
    b = bytearray(open(path, 'rb').read())
    b[len(b) // 2] ^= 0x01
    open(path, 'wb').write(bytes(b))


DATA = 'ckpt-3.data-00000-of-00001'
DAMAGE = {  # fault -> (file of ckpt-3, how, the words of the warning)
    'random bytes in the middle of .data': (
        DATA, _overwrite_middle(np.random.default_rng(0).integers(0, 256, 4096, np.uint8)
                                .tobytes()), 'its data fails its checksum'),
    'a zeroed block in the middle of .data': (
        DATA, _overwrite_middle(bytes(4096)), 'its data fails its checksum'),
    'one flipped byte in .data': (DATA, _flip_one_byte, 'its data fails its checksum'),
    'a garbled .index': ('ckpt-3.index', _overwrite_middle(b'\xa5' * 64),
                         'its index is damaged'),
}
TF_INTERNALS = ('{{function_node', '[Op:', 'Value in checkpoint could not be found', 'Traceback')


def _assert_resumed_as_uninterrupted(record, whole, steps):
    assert sorted(record) == steps
    for step in steps:
        np.testing.assert_allclose(record[step], whole[step], rtol=1e-5, atol=1e-6,
                                   err_msg=f'step {step}')


@pytest.mark.parametrize('fault', DAMAGE)
def test_a_damaged_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(
        uninterrupted, tmp_path, caplog, fault):
    config, d = _stopped_after_3(uninterrupted, tmp_path)
    name, damage, words = DAMAGE[fault]
    damage(str(d / name))
    before = _digests(d)
    with caplog.at_level(logging.WARNING):
        state, record = _train_recording(config)
    assert state.step == 4
    warnings = [r.getMessage() for r in caplog.records if 'ckpt-' in r.getMessage()]
    assert warnings == [f'checkpoint {d}/ckpt-3 is damaged ({words}): set aside as '
                        f'{d}/unreadable-ckpt-3; trying the one before'], warnings
    assert not [s for s in TF_INTERNALS if s in caplog.text], caplog.text[-3000:]
    after = _digests(d)
    for kept in ('ckpt-1.index', 'ckpt-1.data-00000-of-00001', 'ckpt-2.index',
                 'ckpt-2.data-00000-of-00001'):
        assert after[kept] == before[kept], kept  # intact: never renamed nor rewritten
    for suffix in ('.index', '.data-00000-of-00001'):  # the damaged one kept as it was
        assert after[f'unreadable-ckpt-3{suffix}'] == before[f'ckpt-3{suffix}']
    _assert_resumed_as_uninterrupted(record, uninterrupted[1], [3, 4])


def test_a_state_file_that_is_not_text_is_ignored(uninterrupted, tmp_path, caplog):
    """Resume does not trust the `checkpoint` state file: bytes that are not UTF-8 there are
    ignored as ASCII junk is (TensorFlow's CheckpointManager raised UnicodeDecodeError)."""
    config, d = _stopped_after_3(uninterrupted, tmp_path)
    (d / 'checkpoint').write_bytes(b'\xff\xfe model_checkpoint_path: "\x80\x81"\n')
    before = _digests(d)
    assert checkpoint.latest_in(str(d)) == f'{d}/ckpt-3'  # as --checkpoint=<this directory>
    with caplog.at_level(logging.WARNING):
        state, record = _train_recording(config)
    assert state.step == 4
    assert not [r for r in caplog.records if 'damaged' in r.getMessage()]
    assert {k: v for k, v in _digests(d).items() if k in before} == before
    assert not list(d.glob('unreadable-*'))
    assert tf.train.latest_checkpoint(str(d)) == f'{d}/ckpt-4'  # text again
    _assert_resumed_as_uninterrupted(record, uninterrupted[1], [4])

    # A run that starts from scratch beside such a file: the first save writes it again.
    empty = tmp_path / 'empty'
    empty.mkdir()
    (empty / 'checkpoint').write_bytes(b'\xff\xfe\x80')
    saver = checkpoint.Checkpointer(config.replace(model_dir=str(empty)), state.model,
                                    state.optimizer)
    assert saver.save(5) == f'{empty}/ckpt-5'
    assert tf.train.latest_checkpoint(str(empty)) == f'{empty}/ckpt-5'


def _denied(prefix):
    """tf.train.load_checkpoint raising, for checkpoint `prefix`, what TensorFlow raises for a
    file its user may not read."""
    load = tf.train.load_checkpoint

    def load_checkpoint(path):
        if path == prefix:
            raise tf.errors.OpError(None, None, f'{prefix}.data-00000-of-00001; Permission '
                                    'denied', tf.errors.UNKNOWN)
        return load(path)
    return load_checkpoint


def test_a_checkpoint_without_read_permission_stops_the_run_and_is_kept(
        uninterrupted, tmp_path, monkeypatch):
    """Tests run as root, whom chmod 000 does not stop: the read is made to fail as it does
    for a user who may not read the file. TensorFlow's checkpoint reader
    (tf.train.load_checkpoint, the first thing a resume calls on a checkpoint) then raises a plain
    OpError "<path>; Permission denied" (seen with `setpriv --bounding-set
    -dac_override,-dac_read_search` on a chmod 000 file; test_an_unreadable_checkpoint_for_real
    does that end to end where setpriv is at hand)."""
    config, d = _stopped_after_3(uninterrupted, tmp_path)
    before = _digests(d)
    monkeypatch.setattr(tf.train, 'load_checkpoint', _denied(f'{d}/ckpt-3'))
    with pytest.raises(ConfigError) as raised:
        _train_recording(config)
    assert str(raised.value) == (
        f'checkpoint {d}/ckpt-3 cannot be read: permission denied ({d}/ckpt-3.data-00000-of-'
        '00001). Fix the permissions of its files, then rerun the same command')
    assert _digests(d) == before  # nothing renamed
    model_dir_lib.release_locks()

    monkeypatch.undo()  # the permissions fixed: the rerun resumes from it
    state, record = _train_recording(config)
    assert state.step == 4
    _assert_resumed_as_uninterrupted(record, uninterrupted[1], [4])


def test_a_restore_that_fails_leaves_nothing_behind_for_the_next(tiny_state, sample_dir,
                                                                  tmp_path, monkeypatch):
    """Damage that only the restore itself meets (the files read whole before it are skipped
    here): the next attempt, from the intact checkpoint before, still restores. A failed restore
    leaves a deferred restoration of `save_counter` on its tf.train.Checkpoint, which through the
    same object made the next attempt read the damaged one and the one after fail as another
    model's."""
    config = _config(tmp_path, sample_dir)
    _run_with_checkpoints(tiny_state, config, steps=(1, 2, 3))
    model_dir_lib.release_locks()
    _overwrite_middle(bytes(4096))(str(tmp_path / DATA))
    before = _digests(tmp_path)
    monkeypatch.setattr(checkpoint, 'read_problem', lambda prefix: None)
    tiny_state.optimizer.iterations.assign(0)
    saver = checkpoint.Checkpointer(config, tiny_state.model, tiny_state.optimizer)
    assert saver.restore(tiny_state.model) == f'resumed from {tmp_path}/ckpt-2'
    assert int(tiny_state.optimizer.iterations.numpy()) == 2
    after = _digests(tmp_path)
    assert {k: after[k] for k in before if not k.startswith('ckpt-3')} == \
        {k: v for k, v in before.items() if not k.startswith('ckpt-3')}
    assert after[f'unreadable-{DATA}'] == before[DATA]


def test_eval_with_a_damaged_newest_checkpoint_says_which_step_it_reports(
        uninterrupted, tmp_path, caplog, monkeypatch):
    import types
    import simclr_tf_cli
    config, d = _stopped_after_3(uninterrupted, tmp_path)
    DAMAGE['random bytes in the middle of .data'][1](str(d / DATA))
    (d / 'result_1.json').write_text('{}')  # evaluated before: only ckpt-2 and ckpt-3 to go
    config = config.replace(mode='eval', train_steps=3, eval_steps=1, eval_batch_size=16,
                            knn_train_examples=16, eval_timeout=2)
    before = _digests(d)
    with caplog.at_level(logging.WARNING):
        result = program.run(config)
    assert result['global_step'] == 2
    warnings = [r.getMessage() for r in caplog.records if 'ckpt-3' in r.getMessage()]
    assert warnings == [f'skipping checkpoint {d}/ckpt-3: its data fails its checksum']
    assert not [s for s in TF_INTERNALS if s in caplog.text], caplog.text[-3000:]
    assert _digests(d) == before  # eval reads only: the training run sets it aside
    monkeypatch.setattr(simclr_tf_cli, 'FLAGS', types.SimpleNamespace(eval_split='test'))
    line = simclr_tf_cli.summary(result).splitlines()[0]
    assert line.startswith('step 2: ') and line.endswith(
        f'on 16 test examples (not the newest: {d}/ckpt-3 could not be read and was skipped)')


SETPRIV = shutil.which('setpriv') if os.geteuid() == 0 else None


@pytest.mark.skipif(not SETPRIV, reason='needs root and setpriv to drop the right to read all')
def test_an_unreadable_checkpoint_for_real(uninterrupted, tmp_path, sample_dir):
    """chmod 000 on the newest checkpoint's data, run.py as root without CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH (what lets root read any file): status 2, one line, nothing renamed."""
    config, d = _stopped_after_3(uninterrupted, tmp_path)
    os.chmod(d / DATA, 0)
    before = _digests(d)
    result = subprocess.run(
        [SETPRIV, '--bounding-set', '-dac_override,-dac_read_search', sys.executable, 'run.py',
         f'--dataset={sample_dir}', f'--model_dir={d}', *TINY, '--train_steps=4'],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert final_error(result.stderr) == (
        f'error: checkpoint {d}/ckpt-3 cannot be read: permission denied ({d}/{DATA}). Fix the '
        'permissions of its files, then rerun the same command')
    assert _digests(d) == before and not list(d.glob('unreadable-*'))
