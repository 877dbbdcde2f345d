"""train_mode=distill (SimCLRv2's third step) and train_mode=supervised: the losses against NumPy,
the teacher from each kind of source, a student learning its teacher, 2 replicas = 1 device,
resume = uninterrupted, and one clear line for a teacher that cannot be used."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import data, losses, optim, program, train, views
from simclr_tf import teacher as teacher_lib
from simclr_tf.config import Config, ConfigError
from simclr_tf.model import build_model

from test_authors import assert_outputs, fixture_of, input_of, write_checkpoint, write_saved_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _log_softmax(x):
    x = x - x.max(1, keepdims=True)
    return x - np.log(np.exp(x).sum(1, keepdims=True))


@pytest.mark.parametrize('t', [1.0, 0.5, 2.0])
def test_distillation_loss_and_its_gradient_match_numpy(t):
    rng = np.random.default_rng(0)
    teacher, student = rng.normal(size=(6, 5)) * 3, rng.normal(size=(6, 5)) * 3
    p, log_q = np.exp(_log_softmax(teacher / t)), _log_softmax(student / t)
    want = t * t * np.mean(-(p * log_q).sum(1))
    s, te = tf.constant(student, tf.float32), tf.constant(teacher, tf.float32)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([s, te])
        loss = losses.distillation_loss(te, s, t)
    np.testing.assert_allclose(loss.numpy(), want, rtol=1e-5)
    # d/ds of T^2 CE(p, s / T) is T (q - p) / N; the teacher's side is a constant.
    np.testing.assert_allclose(tape.gradient(loss, s).numpy(),
                               t * (np.exp(log_q) - p) / len(p), atol=1e-6)
    assert tape.gradient(loss, te) is None


def test_labelled_loss_averages_over_the_labelled_rows_only():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(5, 4)).astype(np.float32)
    classes = np.array([2, 0, 3, 1, 1])
    known = np.array([True, False, True, False, True])
    onehot = np.eye(4, dtype=np.float32)[classes] * known[:, None]  # unlabelled: zero rows
    ce = -_log_softmax(logits)[np.arange(5), classes]
    loss, acc = losses.labelled_loss(tf.constant(onehot), tf.constant(logits))
    np.testing.assert_allclose(loss.numpy(), ce[known].mean(), rtol=1e-5)
    np.testing.assert_allclose(acc.numpy(), np.mean(logits.argmax(1)[known] == classes[known]))
    none = losses.labelled_loss(tf.zeros([5, 4]), tf.constant(logits))
    assert [float(v) for v in none] == [0.0, 0.0]


def _config(sample_dir, model_dir, **changes) -> Config:
    values = dict(dataset=sample_dir, resnet_depth=18, width_multiplier=0.25, image_size=16,
                  proj_out_dim=16, use_tpu=False, train_batch_size=32, eval_batch_size=100,
                  eval_split='test', seed=5, warmup_epochs=0, learning_rate=1.0,
                  temperature=0.5, checkpoint_steps=10, knn_train_examples=0,
                  model_dir=str(model_dir))
    values.update(changes)
    return Config(**values).validate()


@pytest.fixture(scope='module')
def teacher_dir(tmp_path_factory, sample_dir):
    """A model_dir with a checkpoint and an export of a classifier: SimCLR pretraining with its
    linear head, then fine-tuned from it (the recipe's first two steps, tiny)."""
    root = tmp_path_factory.mktemp('teacher')
    program.run(_config(sample_dir, root / 'pretrain', train_steps=10, mode='train'))
    program.run(_config(sample_dir, root / 'finetune', train_mode='finetune', train_steps=20,
                        checkpoint=str(root / 'pretrain'), label_fraction=0.2,
                        zero_init_logits_layer=True, learning_rate=0.3,
                        mode='train_then_eval'))
    from simclr_tf import model_dir
    model_dir.release_locks()
    return root / 'finetune'


def _logits(model, images):
    return model(images, training=False)['logits_sup'].numpy()


def test_teacher_from_export_checkpoint_and_model_dir_is_the_same_network(teacher_dir,
                                                                          sample_dir):
    images = np.random.default_rng(2).uniform(size=[4, 16, 16, 3]).astype(np.float32)
    strategy = tf.distribute.get_strategy()
    outputs = []
    for path in (teacher_dir / 'saved_model' / '20', teacher_dir / 'ckpt-20', teacher_dir):
        config = _config(sample_dir, '/unused', train_mode='distill', teacher=str(path))
        model = teacher_lib.build(config, 10, strategy)
        assert not model.trainable_variables  # frozen
        outputs.append(_logits(model, images))
    loaded = tf.saved_model.load(str(teacher_dir / 'saved_model' / '20'))
    reference = loaded(images, trainable=False)['logits_sup'].numpy()
    for got in outputs:
        np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kind', ['checkpoint', 'saved_model'])
def test_teacher_from_the_authors_model_gives_their_logits(tmp_path, kind):
    fixture = fixture_of('r18_cifar')  # pretrained with a linear head: a classifier
    path = (write_checkpoint(fixture, str(tmp_path / 'ckpt-1')) if kind == 'checkpoint' else
            write_saved_model(fixture, str(tmp_path / 'saved_model' / '1')))
    config = Config(train_mode='distill', teacher=path, image_size=32, use_tpu=False)
    model = teacher_lib.build(config, 10, tf.distribute.get_strategy())
    out = model(input_of(fixture), training=False)
    assert_outputs({'logits_sup': out['logits_sup']},
                   {'logits_sup': fixture['expected_trainable_false']['logits_sup']})


def _agreement_and_kl(student, teacher, images):
    s, t = _logits(student, images), _logits(teacher, images)
    p = np.exp(_log_softmax(t))
    kl = np.mean((p * (_log_softmax(t) - _log_softmax(s))).sum(1))
    return np.mean(s.argmax(1) == t.argmax(1)), kl


def test_a_distilled_student_agrees_with_its_teacher_more_than_at_start(
        teacher_dir, sample_dir, tmp_path, release_locks):
    config = _config(sample_dir, tmp_path / 'student', train_mode='distill',
                     teacher=str(teacher_dir / 'saved_model' / '20'), train_steps=40,
                     learning_rate=0.5, checkpoint_steps=40, mode='train')
    images = np.concatenate([x.numpy() for x, _ in data.build_dataset(
        config.replace(eval_split='train'), False).take(2)])
    info = data.dataset_info(config, need_eval=False)
    program.set_up(config)
    strategy = tf.distribute.get_strategy()
    teacher = teacher_lib.build(config, 10, strategy)
    start = _agreement_and_kl(build_model(config, 10), teacher, images)
    state = train.train(config, strategy, info)
    end = _agreement_and_kl(state.model, teacher, images)
    assert state.step == 40
    assert end[1] < 0.5 * start[1], (start, end)
    assert end[0] > start[0] + 0.2, (start, end)


def _state(config, strategy, weights, teacher_weights):
    with strategy.scope():
        model = build_model(config, 10)
        model.set_weights(weights)
        teacher = build_model(config.replace(train_mode='finetune', teacher=None), 10)
        teacher.set_weights(teacher_weights)
        teacher.trainable = False
        schedule = optim.WarmUpAndCosineDecay(scaled_lr=0.5, warmup_steps=0, total_steps=10)
        optimizer = optim.build_optimizer(config, schedule, model)
        optimizer.build(model.trainable_variables)
    return train.TrainState(model, optimizer, None, schedule, 10, 10, teacher=teacher)


def test_two_replicas_equal_one_device(two_replicas):
    """One distillation step with a supervised term (the labelled rows unevenly split between
    the replicas), on 2 replicas and on one device, from the same weights."""
    config = Config(resnet_depth=18, width_multiplier=0.25, image_size=16, proj_out_dim=16,
                    train_batch_size=8, use_tpu=False, train_mode='distill', teacher='t',
                    distill_label_weight=0.5, distill_temperature=2.0, learning_rate=0.5,
                    weight_decay=1e-4, warmup_epochs=0, train_steps=10)
    plan = views.plan_views(config, True, (16, 16), False, accelerator=False)
    rng = np.random.default_rng(3)
    images = rng.uniform(size=[8, 16, 16, 3]).astype(np.float32)
    labels = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 8)]
    labels[[1, 2, 3, 6]] = 0  # 3 labelled rows on the first replica, 1 on the second
    weights = build_model(config, 10).get_weights()
    teacher_weights = [w * 3 if w.ndim == 2 else w for w in build_model(
        config.replace(train_mode='finetune', teacher=None), 10).get_weights()]

    one = _state(config, tf.distribute.get_strategy(), weights, teacher_weights)
    one_metrics = tf.function(train.make_step_fn(config, one, tf.distribute.get_strategy(),
                                                 plan))(images, labels).numpy()
    two = _state(config, two_replicas, weights, teacher_weights)
    step_fn = train.make_step_fn(config, two, two_replicas, plan)

    def shard(array):
        return two_replicas.experimental_distribute_values_from_function(
            lambda ctx: array[ctx.replica_id_in_sync_group * 4:][:4])

    @tf.function
    def step(x, y):
        return two_replicas.reduce(tf.distribute.ReduceOp.MEAN,
                                   two_replicas.run(step_fn, args=(x, y)), axis=None)

    two_metrics = step(shard(images), shard(labels)).numpy()
    names = train.metric_names(config, True)
    assert names[:4] == train.DISTILL_METRICS + train.SUPERVISED_METRICS
    np.testing.assert_allclose(two_metrics, one_metrics, atol=1e-4, err_msg=str(names))
    assert one_metrics[2] > 0  # the supervised term was computed
    for a, b in zip(one.model.variables, two.model.variables):
        np.testing.assert_allclose(b.numpy(), a.numpy(), atol=1e-4, err_msg=a.path)


class _Crash(Exception):
    pass


def test_resume_equals_uninterrupted(teacher_dir, sample_dir, tmp_path, release_locks):
    def run(model_dir, crash_at=None):
        config = _config(sample_dir, model_dir, train_mode='distill', teacher=str(teacher_dir),
                         train_steps=4, checkpoint_steps=2, steps_per_loop=1, train_batch_size=8,
                         label_fraction=0.5, distill_label_weight=0.3, mode='train')
        program.set_up(config)

        def maybe_crash(state):
            if state.step == crash_at:
                raise _Crash()

        return train.train(config, tf.distribute.get_strategy(),
                           data.dataset_info(config, need_eval=False), on_checkpoint=maybe_crash)

    whole = run(tmp_path / 'whole')
    with pytest.raises(_Crash):
        run(tmp_path / 'resumed', crash_at=2)
    resumed = run(tmp_path / 'resumed')
    assert whole.step == resumed.step == 4
    for a, b in zip(whole.model.variables, resumed.model.variables):
        np.testing.assert_allclose(b.numpy(), a.numpy(), atol=1e-5, err_msg=a.path)


def _cli(*flags):
    return subprocess.run([sys.executable, 'run.py', '--use_tpu=False', *flags], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_a_teacher_that_cannot_be_used_is_one_clear_line(teacher_dir, sample_dir, small_folder,
                                                         tmp_path, release_locks):
    common = [f'--dataset={sample_dir}', '--image_size=16', '--resnet_depth=18',
              '--train_mode=distill', '--train_steps=1']
    proc = _cli(*common, f'--model_dir={tmp_path / "a"}', f'--teacher={tmp_path / "nowhere"}')
    errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert 'teacher=' in errors[0] and 'nowhere' in errors[0]
    assert not os.path.exists(tmp_path / 'a' / 'config.json')  # refused before the model_dir
    # A teacher of two classes for a data set of ten.
    two = str(small_folder())
    program.run(_config(two, tmp_path / 'two', train_steps=2, train_batch_size=8, mode='train',
                        eval_split='test'))
    with pytest.raises(ConfigError, match=r"teacher=.* has 2 classes; dataset=.* has 10"):
        program.run(_config(sample_dir, tmp_path / 'b', train_mode='distill',
                            teacher=str(tmp_path / 'two'), train_steps=1))
    # A pretraining run without a linear head has no classifier.
    program.run(_config(two, tmp_path / 'headless', train_steps=2, train_batch_size=8,
                        mode='train', lineareval_while_pretraining=False))
    with pytest.raises(ConfigError, match='has no classifier to distil'):
        program.run(_config(two, tmp_path / 'c', train_mode='distill',
                            teacher=str(tmp_path / 'headless'), train_steps=1,
                            train_batch_size=8))
    with pytest.raises(ConfigError, match='train_mode=distill needs --teacher'):
        _config(sample_dir, tmp_path / 'd', train_mode='distill')


def test_supervised_trains_from_scratch_and_takes_no_checkpoint(teacher_dir, sample_dir,
                                                                tmp_path, release_locks):
    with pytest.raises(ConfigError, match='train_mode=supervised trains from scratch'):
        program.run(_config(sample_dir, tmp_path / 'a', train_mode='supervised', train_steps=2,
                            checkpoint=str(teacher_dir)))
    result = program.run(_config(sample_dir, tmp_path / 'b', train_mode='supervised',
                                 train_steps=2, label_fraction=0.1, mode='train_then_eval'))
    assert 0 <= result['eval/label_top_1_accuracy'] <= 1
    assert os.path.isdir(result['saved_model'])
