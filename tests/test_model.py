"""Encoder + heads: what each head sees, what gets gradients, names, distribution."""

import re

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.config import Config
from simclr_tf.model import SimCLRModel, build_model

NUM_CLASSES = 10
H_DIM = 128  # ResNet-18 at width 0.25
# Distinct from H_DIM so shapes tell the layers apart.
TINY = Config(resnet_depth=18, width_multiplier=0.25, image_size=32, proj_out_dim=16,
              num_proj_layers=2)  # global_bn=True, as the default: SyncBN off-strategy too
# The authors' README linear-eval variable_schema, matched with re.match against variable paths.
README_SCHEMA = re.compile('(?!global_step|(?:.*/|^)Momentum|head)')


def images(n: int = 4, seed: int = 0) -> tf.Tensor:
    return tf.random.stateless_uniform([n, 32, 32, 3], seed=[seed, 0])


def ids(variables) -> set:
    return {id(v) for v in variables}


def gradients(model: SimCLRModel, output: str, *variable_lists) -> list:
    """Gradients of a loss on one output of a training-mode forward pass."""
    with tf.GradientTape(persistent=True) as tape:
        loss = tf.reduce_sum(tf.square(model(images(), training=True)[output]))
    return [tape.gradient(loss, variables) for variables in variable_lists]


@pytest.fixture(scope='module')
def pretrain_model() -> SimCLRModel:
    return build_model(TINY, NUM_CLASSES)


@pytest.mark.parametrize('mode,selector', [('none', 0), ('linear', 0), ('linear', 1),
                                           ('nonlinear', 0), ('nonlinear', 1), ('nonlinear', 2)])
def test_heads_have_the_right_shapes_for_every_mode_and_selector(mode, selector):
    # train_mode=finetune picks the supervised head's input the same way (tests below).
    config = TINY.replace(proj_head_mode=mode, ft_proj_selector=selector)
    model = build_model(config, NUM_CLASSES)
    out = model(images(2), training=False)
    assert out['proj_head_output'] is not None
    assert out['proj_head_output'].shape == (2, H_DIM if mode == 'none' else 16)
    assert out['logits_sup'].shape == (2, NUM_CLASSES)
    np.testing.assert_array_equal(out['proj_head_input'], out['final_avg_pool'])
    # The supervised head reads hiddens[selector] = [h, hidden layer (width of h)..., z][selector].
    last = selector == config.num_proj_outputs and selector > 0
    assert model.supervised_head.linear_layer.dense.kernel.shape == (16 if last else H_DIM,
                                                                      NUM_CLASSES)
    _, hiddens = model.projection_head(out['final_avg_pool'])
    assert len(hiddens) == config.num_proj_outputs + 1


def test_no_supervised_head_without_linear_eval():
    model = build_model(TINY.replace(lineareval_while_pretraining=False), NUM_CLASSES)
    assert model.supervised_head is None
    assert 'logits_sup' not in model(images(2), training=False)


def test_linear_eval_while_pretraining_does_not_touch_the_encoder(pretrain_model):
    model = pretrain_model
    encoder_vars = model.encoder.trainable_variables
    assert encoder_vars  # pretraining trains the encoder...
    to_encoder, to_head = gradients(model, 'logits_sup', encoder_vars,
                                    model.supervised_head.trainable_variables)
    assert all(g is None for g in to_encoder)  # ...but not through the labels
    assert all(g is not None for g in to_head)
    [contrastive] = gradients(model, 'proj_head_output', encoder_vars)
    assert all(g is not None for g in contrastive)


def test_variable_paths_start_with_part_names_and_match_the_readme_schema(pretrain_model):
    model = pretrain_model
    parts = {'resnet/': model.encoder, 'head_contrastive/': model.projection_head,
             'head_supervised/': model.supervised_head}
    for prefix, part in parts.items():
        assert part.variables
        assert all(v.path.startswith(prefix) for v in part.variables), prefix
        matched = [bool(README_SCHEMA.match(v.path)) for v in part.variables]
        assert all(matched) if prefix == 'resnet/' else not any(matched)
    assert len(model.variables) == sum(len(p.variables) for p in parts.values())


def test_linear_eval_after_pretraining_freezes_the_whole_encoder():
    config = TINY.replace(train_mode='finetune', fine_tune_after_block=4,
                          lineareval_while_pretraining=False)
    model = build_model(config, NUM_CLASSES)
    assert not any(v.trainable for v in model.encoder.variables)
    trainable = model.trainable_variables
    assert ids(trainable) == ids(model.supervised_head.variables)  # head g unused past selector 0
    assert all(g is not None for g in gradients(model, 'logits_sup', trainable)[0])


def test_fine_tuning_after_block_2_trains_block_groups_3_and_4_only():
    config = TINY.replace(train_mode='finetune', fine_tune_after_block=2, ft_proj_selector=1)
    model = build_model(config, NUM_CLASSES)
    encoder = model.encoder
    frozen = [encoder.stem, *encoder.block_groups[:2]]
    tuned = encoder.block_groups[2:]
    assert all(not v.trainable for stage in frozen for v in stage.variables)
    trainable = ids(model.trainable_variables)
    assert all(id(v) not in trainable for stage in frozen for v in stage.variables)
    tuned_vars = [v for stage in tuned for v in stage.trainable_variables]
    assert tuned_vars and ids(tuned_vars) <= trainable
    assert all(g is not None for g in gradients(model, 'logits_sup', tuned_vars)[0])
    # With ft_proj_selector=1 the first projection layer is fine-tuned, the last one is not.
    first, last = model.projection_head.linear_layers
    assert ids(first.trainable_variables) <= trainable and first.trainable_variables
    assert not last.trainable_variables


def _one_finetune_step(frozen_bn: str):
    """(model, variable values before, after) of one real training step (train.make_step_fn):
    fine-tuning after block 2 with ft_proj_selector=1, momentum SGD and weight decay 0.01."""
    from simclr_tf import optim, train, views
    config = TINY.replace(train_mode='finetune', fine_tune_after_block=2, ft_proj_selector=1,
                          frozen_bn=frozen_bn, optimizer='momentum', weight_decay=1e-2,
                          global_bn=False, train_batch_size=8)
    model = build_model(config, NUM_CLASSES)
    schedule = optim.WarmUpAndCosineDecay(scaled_lr=0.5, warmup_steps=0, total_steps=10)
    optimizer = optim.build_optimizer(config, schedule, model)
    optimizer.build(model.trainable_variables)
    state = train.TrainState(model, optimizer, None, schedule, 10, 10)
    plan = views.plan_views(config, True, None, False, accelerator=False)
    step = tf.function(train.make_step_fn(config, state, tf.distribute.get_strategy(), plan))
    labels = tf.one_hot(tf.range(8) % NUM_CLASSES, NUM_CLASSES)
    before = {v.path: v.numpy() for v in model.variables}
    step(images(8) * 4.0 + 1.0, labels)  # far from the initial moving statistics (0, 1)
    return model, before, {v.path: v.numpy() for v in model.variables}


def _changed(variables, before, after) -> set:
    return {v.path for v in variables if not np.array_equal(before[v.path], after[v.path])}


@pytest.mark.parametrize('frozen_bn', ['batch', 'inference'])
def test_what_a_fine_tuning_step_changes_in_frozen_blocks(frozen_bn):
    model, before, after = _one_finetune_step(frozen_bn)
    encoder = model.encoder
    frozen = [v for stage in encoder.frozen_stages for v in stage.variables]
    moving = [v for v in frozen if 'moving_' in v.path]
    weights = [v for v in frozen if 'moving_' not in v.path]  # kernels, gamma, beta
    assert moving and weights
    # Kernels, gamma and beta of frozen blocks are never trained nor decayed.
    assert not _changed(weights, before, after)
    assert not ids(weights) & ids(model.trainable_variables)
    # The authors' default: BN of frozen blocks normalises with batch statistics and so updates
    # its moving averages in the step; with --frozen_bn=inference they keep the pretrained ones.
    changed = _changed(moving, before, after)
    assert changed == ({v.path for v in moving} if frozen_bn == 'batch' else set())
    # The tuned blocks and the first projection layer train; the last one (past the selector)
    # is frozen like the encoder stages.
    tuned = [v for g in encoder.block_groups[2:] for v in g.variables if 'kernel' in v.path]
    assert _changed(tuned, before, after) == {v.path for v in tuned}
    first, last = model.projection_head.linear_layers
    assert _changed(first.trainable_variables, before, after)
    last_moving = [v for v in last.variables if 'moving_' in v.path]
    assert not _changed([v for v in last.variables if 'moving_' not in v.path], before, after)
    assert bool(_changed(last_moving, before, after)) == (frozen_bn == 'batch')


@pytest.mark.parametrize('selector,index', [(0, 0), (1, 1), (2, 2), (-1, 2), (-3, 0)])
def test_ft_proj_selector_indexes_h_to_z_like_python(selector, index):
    # hiddens = [h, g1, z] with num_proj_layers=2: the authors index this list with the flag.
    config = TINY.replace(train_mode='finetune', ft_proj_selector=selector).validate()
    model = build_model(config, NUM_CLASSES)
    x = images(4)
    _, hiddens = model.projection_head(model(x)['final_avg_pool'])
    out = model(x)
    expected = model.supervised_head(hiddens[index])
    np.testing.assert_allclose(out['logits_sup'], expected, rtol=1e-5, atol=1e-6)
    # Projection layers up to the one read are fine-tuned; those past it are frozen.
    layers = model.projection_head.linear_layers
    trainable = ids(model.trainable_variables)
    for j, layer in enumerate(layers):
        assert (ids(layer.variables) & trainable != set()) == (j < index), j
    tuned = [v for layer in layers[:index] for v in layer.trainable_variables]
    assert all(g is not None for g in gradients(model, 'logits_sup', tuned)[0])


@pytest.mark.parametrize('mode,layers,bad,valid', [
    ('nonlinear', 2, 3, '[-3, 2]'), ('nonlinear', 2, -4, '[-3, 2]'),
    ('nonlinear', 3, 4, '[-4, 3]'), ('linear', 2, 2, '[-2, 1]'), ('none', 2, -2, '[-1, 0]')])
def test_out_of_range_ft_proj_selector_is_rejected_with_the_valid_range(mode, layers, bad, valid):
    from simclr_tf.config import ConfigError
    config = TINY.replace(train_mode='finetune', proj_head_mode=mode, num_proj_layers=layers,
                          ft_proj_selector=bad)
    with pytest.raises(ConfigError, match=re.escape(valid)):
        config.validate()


def test_tf_function_matches_eager(pretrain_model):
    x = images()
    eager = pretrain_model(x, training=False)
    graph = tf.function(lambda t: pretrain_model(t, training=False))(x)
    for name in ('final_avg_pool', 'proj_head_output', 'logits_sup'):
        np.testing.assert_allclose(graph[name], eager[name], rtol=1e-5, atol=1e-6)


def test_global_bn_on_two_replicas_equals_one_device_with_the_global_batch(two_replicas):
    # A forward training step in a tf.function; the full train step is train.py's to test.
    config = TINY
    single = build_model(config, NUM_CLASSES)
    with two_replicas.scope():
        mirrored = build_model(config, NUM_CLASSES)
    for target, source in zip(mirrored.variables, single.variables):
        target.assign(source)

    x = images(8)
    expected = single(x, training=True)['proj_head_output']
    per_replica = two_replicas.experimental_distribute_values_from_function(
        lambda ctx: x[4 * ctx.replica_id_in_sync_group: 4 * (ctx.replica_id_in_sync_group + 1)])

    @tf.function
    def forward(batch):
        return two_replicas.run(lambda x: mirrored(x, training=True), args=(batch,))

    outputs = forward(per_replica)
    got = tf.concat(two_replicas.experimental_local_results(outputs['proj_head_output']), 0)
    # Synchronised BN normalises with the statistics of all 8 examples, as one device would.
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # ...and both replicas update the moving statistics the same way, to the single device's.
    np.testing.assert_allclose(mirrored.encoder.stem.bn.moving_mean.numpy(),
                               single.encoder.stem.bn.moving_mean.numpy(), rtol=1e-4, atol=1e-6)


def test_get_config_round_trip(pretrain_model):
    clone = SimCLRModel.from_config(pretrain_model.get_config())
    assert clone.config == pretrain_model.config and clone.num_classes == NUM_CLASSES


def test_checkpoint_holds_every_variable_and_restores_into_a_finetune_model(pretrain_model,
                                                                            tmp_path):
    # Keras 3 lists of layers are invisible to tf.train.Checkpoint; the model must not use them.
    path = tf.train.Checkpoint(model=pretrain_model).save(str(tmp_path / 'ckpt'))
    saved = [name for name, _ in tf.train.list_variables(path) if name.startswith('model/')]
    assert len(saved) == len(pretrain_model.variables)
    finetune = build_model(TINY.replace(train_mode='finetune', fine_tune_after_block=4),
                           NUM_CLASSES)
    tf.train.Checkpoint(model=finetune).restore(path).assert_existing_objects_matched()
    x = images(2)
    np.testing.assert_array_equal(finetune(x)['final_avg_pool'],
                                  pretrain_model(x)['final_avg_pool'])
