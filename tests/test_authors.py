"""The authors' model zoo: their checkpoints and SavedModels, with exactly the keys, names and
order their code writes (tests/data/authors_layouts, made by running it), give this model the
outputs their export gives, through --checkpoint and through the converter; bad layouts fail
with messages that name what is wrong."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import authors, authors_layout, convert
from simclr_tf.checkpoint import Checkpointer
from simclr_tf.config import Config
from simclr_tf.model import build_model

# Layouts, weights formula and outputs made by running the authors' code (see its README).
LAYOUTS = os.path.join(os.path.dirname(__file__), 'data', 'authors_layouts')
NAMES = ('r18_cifar', 'r50_1x_sk0_pretrain', 'r50_1x_sk0_finetune', 'r50_2x_sk1_pretrain')
NUM_CLASSES = 10


def fixture_of(name: str) -> dict:
    with open(os.path.join(LAYOUTS, f'{name}.json')) as f:
        return json.load(f)


def value_of(key: str, shape: list, k: int) -> np.ndarray:
    """The fixture's formula for the variable of rank k in checkpoint_keys."""
    n = int(np.prod(shape)) if shape else 1
    base = np.sin(0.37 * (k + 1) + 0.011 * np.arange(n)).reshape(shape)
    leaf = key.split('/.ATTRIBUTES')[0].split('/')[-1]
    if len(shape) >= 2:
        value = base / np.sqrt(np.prod(shape[:-1]))
    elif leaf == 'gamma':
        value = 1 + 0.1 * base
    elif leaf == 'moving_variance':
        value = 1 + 0.5 * np.abs(base)
    else:
        value = 0.1 * base
    return value.astype(np.float32)


def input_of(fixture: dict) -> np.ndarray:
    s = fixture['image_size']
    return (0.5 + 0.5 * np.sin(0.001 * np.arange(2 * s * s * 3))).reshape(2, s, s, 3).astype(
        np.float32)


def config_of(fixture: dict, **changes) -> Config:
    """The fixture's flags as a Config of this project."""
    flags = dict(f[2:].split('=', 1) for f in fixture['flags'])
    config = Config(
        resnet_depth=int(flags['resnet_depth']), image_size=int(flags['image_size']),
        width_multiplier=float(flags.get('width_multiplier', 1)),
        sk_ratio=float(flags.get('sk_ratio', 0)), train_mode=flags['train_mode'],
        lineareval_while_pretraining=flags.get('lineareval_while_pretraining') == 'True',
        fine_tune_after_block=int(flags.get('fine_tune_after_block', -1)), use_tpu=False)
    return config.replace(**changes)


_VALUES = {}


def values_of(fixture: dict) -> list[np.ndarray]:
    """The values of checkpoint_keys, computed once per fixture."""
    name = ' '.join(fixture['flags'])
    if name not in _VALUES:
        _VALUES[name] = [value_of(key, shape, k)
                         for k, (key, shape) in enumerate(fixture['checkpoint_keys'])]
    return _VALUES[name]


def write_checkpoint(fixture: dict, prefix: str, extra: bool = True,
                     change=lambda key, value: value) -> str:
    """A checkpoint with exactly the fixture's keys and values (plus, with `extra`, the counters
    and, for the stem, an optimizer slot, as a real one has), written by key with SaveV2 (no
    object graph)."""
    names, tensors = [], []
    for (key, shape), value in zip(fixture['checkpoint_keys'], values_of(fixture)):
        value = change(key, value)
        if value is None:
            continue
        names.append(key)
        tensors.append(value)
        if extra and 'initial_conv_relu_max_pool/0/' in key:  # TF2 keys slots under the variable
            names.append(key.replace('/.ATTRIBUTES/', '/.OPTIMIZER_SLOT/optimizer/momentum/'
                                     '.ATTRIBUTES/'))
            tensors.append(np.zeros(shape, np.float32))
    if extra:
        names += [f'{counter}/.ATTRIBUTES/VARIABLE_VALUE' for counter in ('global_step',
                                                                         'save_counter')]
        tensors += [np.int64(12345), np.int64(3)]
    tf.io.gfile.makedirs(os.path.dirname(prefix))
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[''] * len(names),
                      tensors=tensors)
    return prefix


def write_saved_model(fixture: dict, path: str) -> str:
    """A SavedModel whose variables bundle has the authors' structure: `model/<part>/variables`
    lists in their order, with their variable names, and `trainable_variables_list`."""
    keys, values = fixture['checkpoint_keys'], values_of(fixture)
    trainable = set(fixture['saved_model_trainable_variables_list'])
    made = {}
    for name, shape, k in fixture['saved_model_variables']:
        made[name] = tf.Variable(values[k], name=name.split(':')[0], trainable=name in trainable)
    # Their bundle: each part's variables list (the loaded listing of one part is its order).
    root, model = tf.__internal__.tracking.AutoTrackable(), tf.__internal__.tracking.AutoTrackable()
    for part in authors.PARTS:
        listed = [made[name] for name, _, k in fixture['saved_model_variables']
                  if keys[k][0].startswith(f'model/{part}/')]
        if listed:
            holder = tf.__internal__.tracking.AutoTrackable()
            holder.variables = listed
            setattr(model, part, holder)
    root.model = model
    root.trainable_variables_list = [
        made[n] for n in fixture['saved_model_trainable_variables_list'] if n in made]
    tf.saved_model.save(root, path)
    return path


def assert_outputs(outputs: dict, expected: dict) -> None:
    """Every output the fixture keeps, within 1e-4 relative: sums relative to the sum of absolute
    values (block outputs are ReLU'd, initial_conv has both signs), values relative to the
    largest value."""
    for name, want in expected.items():
        got = np.asarray(outputs[name], np.float64)
        assert list(got.shape) == want['shape'], name
        scale = want['abs_sum']
        assert abs(got.sum() - want['sum']) <= 1e-4 * scale, (name, got.sum(), want['sum'])
        assert abs(np.abs(got).sum() - scale) <= 1e-4 * scale, (name, np.abs(got).sum(), scale)
        if 'values' in want:
            values = np.asarray(want['values']).reshape(want['shape'])
            np.testing.assert_allclose(got, values, rtol=1e-4,
                                       atol=1e-4 * np.abs(values).max(), err_msg=name)


@pytest.fixture(scope='module')
def cases(tmp_path_factory):
    """name -> one fixture, its checkpoint and SavedModel, and this project's model for it, each
    made once per module."""
    made = {}

    def get(name: str) -> dict:
        if name not in made:
            fixture = fixture_of(name)
            tmp = tmp_path_factory.mktemp(name)
            prefix = write_checkpoint(fixture, str(tmp / 'theirs' / 'ckpt-1'))
            saved = write_saved_model(fixture, str(tmp / 'theirs_export' / 'saved_model' / '1'))
            config = config_of(fixture)
            made[name] = dict(name=name, fixture=fixture, prefix=prefix, saved=saved,
                              config=config, model=build_model(config, NUM_CLASSES), tmp=tmp)
        return made[name]

    yield get
    made.clear()


def scramble(model: keras.Model) -> None:
    for v in model.variables:
        v.assign(tf.fill(v.shape, tf.constant(0.5, v.dtype)))


def import_through_checkpointer(case: dict, source: str, global_bn: bool = True) -> str:
    """--checkpoint=<source> as a fine-tuning run's start (Checkpointer.restore)."""
    model = case['model']
    scramble(model)
    model_dir = str(case['tmp'] / f'run_{len(os.listdir(case["tmp"]))}')
    config = case['config'].replace(checkpoint=source, model_dir=model_dir, global_bn=global_bn)
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    optimizer.build(model.trainable_variables)
    message = Checkpointer(config, model, optimizer).restore(model)
    assert int(optimizer.iterations.numpy()) == 0  # a fine-tuning run starts at step 0
    return message


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('kind', ['checkpoint', 'saved_model'])
def test_authors_source_through_checkpoint_flag_gives_their_outputs(cases, name, kind):
    case = cases(name)
    source = case['prefix'] if kind == 'checkpoint' else os.path.dirname(case['saved'])
    message = import_through_checkpointer(case, source)
    n = len(case['fixture']['checkpoint_keys'])
    assert f'initialised {n} variables' in message, message
    outputs = case['model'](input_of(case['fixture']), training=False)
    assert_outputs(outputs, case['fixture']['expected_trainable_false'])


@pytest.mark.parametrize('name', NAMES)
def test_stand_in_export_has_their_bundle_keys(cases, name):
    """The SavedModel these tests write holds exactly the keys and shapes of theirs."""
    case = cases(name)
    bundle = os.path.join(case['saved'], 'variables', 'variables')
    keys = sorted([k, s] for k, s in tf.train.list_variables(bundle)
                  if k != '_CHECKPOINTABLE_OBJECT_GRAPH')
    assert keys == sorted(case['fixture']['saved_model_variable_keys'])


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('kind', ['checkpoint', 'saved_model'])
def test_converter_finds_the_architecture(cases, name, kind):
    """What the converter builds for each layout: the fixture's flags, every variable placed."""
    case = cases(name)
    source = authors.open_source(case['prefix'] if kind == 'checkpoint' else case['saved'])
    arch = authors.source_architecture(source)
    config = authors.config_for(arch, image_size=case['config'].image_size)
    for field in ('resnet_depth', 'width_multiplier', 'sk_ratio', 'se_ratio', 'image_size',
                  'proj_head_mode', 'num_proj_layers', 'proj_out_dim', 'ft_proj_selector'):
        assert getattr(config, field) == getattr(case['config'], field), field
    assert arch.num_classes == NUM_CLASSES and arch.cifar_stem == case['config'].cifar_stem
    pairs, notes = authors.plan(case['model'], config, source)
    assert len(pairs) == len(case['model'].variables) == len(source.shapes) and not notes


# The full conversion (checkpoint and export written, export loaded and run) of the smallest
# layout, from a checkpoint here and from a SavedModel below. For the ResNet-50 layouts the test
# above covers what differs (architecture, placement); their export would add minutes to the suite.
def test_converter_writes_a_checkpoint_and_export_with_their_outputs(cases, capsys):
    case = cases('r18_cifar')
    out = str(case['tmp'] / 'converted')
    assert convert.main([f'--source={case["prefix"]}', f'--out={out}']) == 0
    printed = capsys.readouterr().out
    config = case['config']
    assert f'ResNet-{config.resnet_depth} {config.width_multiplier:g}x' in printed
    assert f'--sk_ratio={config.sk_ratio:g}' in printed
    fixture = case['fixture']
    loaded = tf.saved_model.load(os.path.join(out, 'saved_model', '12345'))
    assert_outputs(loaded(input_of(fixture), trainable=False), fixture['expected_trainable_false'])
    assert len(loaded.trainable_variables) > 0  # fine-tunable, unlike their export
    # This project's checkpoint, by name (and loadable through --checkpoint).
    keys = [k for k, _ in tf.train.list_variables(tf.train.latest_checkpoint(out))]
    assert 'model/encoder/stem/conv_0/_kernel/.ATTRIBUTES/VARIABLE_VALUE' in keys
    message = import_through_checkpointer(case, out)
    assert f'initialised {len(fixture["checkpoint_keys"])} variables' in message
    assert_outputs(case['model'](input_of(fixture), training=False),
                   fixture['expected_trainable_false'])


# ---------------------------------------------------------------- one configuration, more paths
@pytest.fixture(scope='module')
def r18(cases):
    return cases('r18_cifar')


def test_converter_reads_their_saved_model(r18, capsys):
    out = str(r18['tmp'] / 'from_saved_model')
    assert convert.main([f'--source={os.path.dirname(r18["saved"])}', f'--out={out}']) == 0
    assert 'ResNet-18 1x' in capsys.readouterr().out
    loaded = tf.saved_model.load(os.path.join(out, 'saved_model', '1'))
    assert_outputs(loaded(input_of(r18['fixture']), trainable=False),
                   r18['fixture']['expected_trainable_false'])


def test_statistics_land_in_plain_batch_norm_too(r18):
    """Their sync-BN statistics, imported by a run with global_bn=False."""
    config = config_of(r18['fixture'], global_bn=False, checkpoint=r18['prefix'],
                       model_dir=str(r18['tmp'] / 'plain_bn'))
    model = build_model(config, NUM_CLASSES)
    assert not any(getattr(l, 'synchronized', False) for l in model._flatten_layers())
    optimizer = keras.optimizers.SGD(0.1)
    optimizer.build(model.trainable_variables)
    Checkpointer(config, model, optimizer).restore(model)
    assert_outputs(model(input_of(r18['fixture']), training=False),
                   r18['fixture']['expected_trainable_false'])


def test_variable_schema_and_zero_init_logits_keep_their_meaning(r18):
    config = config_of(r18['fixture'], checkpoint=r18['prefix'], zero_init_logits_layer=True,
                       variable_schema='(?!head_contrastive)', model_dir=str(r18['tmp'] / 'schema'))
    model = build_model(config, NUM_CLASSES)
    before = {v.path: v.numpy() for v in model.projection_head.variables}
    optimizer = keras.optimizers.SGD(0.1)
    optimizer.build(model.trainable_variables)
    message = Checkpointer(config, model, optimizer).restore(model)
    assert 'supervised head zero-initialised' in message
    assert all(np.array_equal(v.numpy(), before[v.path]) for v in model.projection_head.variables)
    assert all(not np.any(v.numpy()) for v in model.supervised_head.trainable_variables)
    outputs = model(input_of(r18['fixture']), training=False)
    expected = r18['fixture']['expected_trainable_false']
    assert_outputs({'final_avg_pool': outputs['final_avg_pool']},
                   {'final_avg_pool': expected['final_avg_pool']})


# ---------------------------------------------------------------- failures
def converter_error(source: str, out: str, capsys) -> str:
    assert convert.main([f'--source={source}', f'--out={out}']) == 1
    assert not os.path.exists(out)  # nothing written
    return capsys.readouterr().err


def test_truncated_layout_names_the_missing_variables(r18, capsys):
    gone = 'model/resnet_model/block_groups/3/layers/1/conv2d_bn_layers/3/bn/moving_variance'
    prefix = write_checkpoint(r18['fixture'], str(r18['tmp'] / 'truncated' / 'ckpt-1'),
                              change=lambda key, v: None if key.startswith(gone) else v)
    err = converter_error(prefix, str(r18['tmp'] / 'out_truncated'), capsys)
    assert '1 variables missing' in err and gone in err, err


def test_truncated_saved_model_is_refused(r18, capsys):
    fixture = dict(r18['fixture'])
    keys = fixture['checkpoint_keys']
    # Their export without the last block: the list no longer fits any ResNet.
    fixture['saved_model_variables'] = [
        v for v in fixture['saved_model_variables']
        if 'block_groups/3/layers/1/' not in keys[v[2]][0]]
    saved = write_saved_model(fixture, str(r18['tmp'] / 'cut' / 'saved_model' / '1'))
    err = converter_error(saved, str(r18['tmp'] / 'out_cut'), capsys)
    assert 'match no ResNet' in err, err


def test_wrong_shape_names_the_variable_and_both_shapes(r18, capsys):
    bad = 'model/resnet_model/block_groups/2/layers/1/conv2d_bn_layers/2/conv2d/kernel'
    prefix = write_checkpoint(r18['fixture'], str(r18['tmp'] / 'wrong' / 'ckpt-1'),
                              change=lambda key, v: v[:, :, :, :7] if key.startswith(bad) else v)
    err = converter_error(prefix, str(r18['tmp'] / 'out_wrong'), capsys)
    assert bad in err and '[3, 3, 256, 7]' in err and '[3, 3, 256, 256]' in err, err


def test_non_simclr_checkpoint_is_refused(r18, capsys):
    dense = keras.layers.Dense(3)
    dense.build((None, 4))
    prefix = tf.train.Checkpoint(model=dense).save(str(r18['tmp'] / 'other' / 'ckpt'))
    err = converter_error(prefix, str(r18['tmp'] / 'out_other'), capsys)
    assert "not one of the authors' SimCLR TF2 checkpoints" in err, err


def test_run_configured_for_another_architecture_is_told_which(r18):
    config = config_of(r18['fixture'], checkpoint=r18['prefix'], width_multiplier=0.5,
                       model_dir=str(r18['tmp'] / 'other_width'))
    model = build_model(config, NUM_CLASSES)
    optimizer = keras.optimizers.SGD(0.1)
    optimizer.build(model.trainable_variables)
    with pytest.raises(authors.AuthorsLayoutError, match=r'holds ResNet-18 1x.*configured for '
                                                         r'ResNet-18 0.5x'):
        Checkpointer(config, model, optimizer).restore(model)



HEAD_KERNEL = 'model/supervised_head/linear_layer/dense/kernel' + authors.SUFFIX


def _start(config: Config) -> tuple[keras.Model, str]:
    model = build_model(config, NUM_CLASSES)
    optimizer = keras.optimizers.SGD(0.1)
    optimizer.build(model.trainable_variables)
    return model, Checkpointer(config, model, optimizer).restore(model)


def test_a_head_of_another_width_starts_fresh_with_zero_init_and_is_refused_without(r18):
    """Their head reads h (512 wide); this run's reads z (ft_proj_selector=-1, 128)."""
    config = config_of(r18['fixture'], checkpoint=r18['prefix'], train_mode='finetune',
                       ft_proj_selector=-1, model_dir=str(r18['tmp'] / 'head_on_z'))
    what = (f"the authors' checkpoint {r18['prefix']}'s supervised head reads 512 inputs "
            "(ft_proj_selector=0 there) and this model's 128 (ft_proj_selector=-1)")
    with pytest.raises(authors.AuthorsLayoutError) as error:
        _start(config)
    assert str(error.value) == (
        f'{what}: pass --zero_init_logits_layer=True to start the head fresh, '
        "--ft_proj_selector=0 to match it, or --variable_schema='(?!head_supervised)' to leave "
        'it out')
    model, message = _start(config.replace(zero_init_logits_layer=True))
    assert f'{what}: it starts fresh (zero_init_logits_layer zeroes it anyway)' in message
    assert not any(np.any(v.numpy()) for v in model.supervised_head.variables)
    assert_outputs({'final_avg_pool': model(input_of(r18['fixture']))['final_avg_pool']},
                   {'final_avg_pool': r18['fixture']['expected_trainable_false']['final_avg_pool']})


def test_their_head_on_z_lands_in_a_run_whose_head_reads_z(r18):
    """Their run pretrained with ft_proj_selector=-1 (head on z, 128 wide): fine-tuning with
    --ft_proj_selector=-1 restores that head (-1 counts from z in their layout too)."""
    fixture = dict(r18['fixture'], flags=r18['fixture']['flags'] + ['--ft_proj_selector=-1'])
    fixture['checkpoint_keys'] = [[k, [128, s[1]] if k == HEAD_KERNEL else s]
                                  for k, s in fixture['checkpoint_keys']]
    prefix = write_checkpoint(fixture, str(r18['tmp'] / 'theirs_on_z' / 'ckpt-1'))
    config = config_of(fixture, checkpoint=prefix, train_mode='finetune', ft_proj_selector=-1,
                       model_dir=str(r18['tmp'] / 'on_z'))
    model, message = _start(config)
    assert 'new' not in message
    np.testing.assert_array_equal(model.supervised_head.linear_layer.dense.kernel.numpy(),
                                  tf.train.load_checkpoint(prefix).get_tensor(HEAD_KERNEL))


# ---------------------------------------------------------------- more of their layouts
EXTRA = os.path.join(os.path.dirname(__file__), 'data', 'authors_layouts_extra')


@pytest.mark.parametrize('name', ['r18se', 'r34sk', 'r50skse'])
def test_generated_layout_is_theirs_for_se_resnet_d_frozen_stages_and_other_heads(name):
    """Keys, shapes, each part's variables order (with frozen stages) and trainability as their
    code makes them; a SavedModel listing them in that order is placed and its architecture
    found."""
    with open(os.path.join(EXTRA, f'{name}.json')) as f:
        theirs = json.load(f)
    keys = [k for k, _ in theirs['keys']]
    shapes = {k: tuple(s) for k, s in theirs['keys']}
    flags = dict(f[2:].split('=', 1) for f in theirs['flags'])
    arch = authors.infer_architecture(shapes)
    assert arch.resnet_depth == int(flags['resnet_depth'])
    assert arch.se_ratio == float(flags.get('se_ratio', 0))
    assert arch.sk_ratio == float(flags.get('sk_ratio', 0))
    assert arch.cifar_stem == (int(flags['image_size']) <= 32)
    assert arch.ft_proj_selector == int(flags.get('ft_proj_selector', 0))
    assert {k: e.shape for k, e in authors_layout.checkpoint_layout(arch).items()} == shapes
    finetune = flags['train_mode'] == 'finetune'
    frozen = int(flags.get('fine_tune_after_block', -1)) if finetune else -1
    generated = authors.layout(arch, frozen)
    assert {p: [e.key + authors.SUFFIX for e in entries] for p, entries in generated.items()} == {
        p: [keys[i] for i in order] for p, order in theirs['parts'].items()}
    trainable = {keys[i] for i in theirs['trainable']}
    ordered = {p: [(keys[i], shapes[keys[i]], keys[i] in trainable, keys[i]) for i in order]
               for p, order in theirs['parts'].items()}
    source = authors.Source('their_export', 'saved_model', {}, lambda key: key, 0, ordered)
    assert authors.source_architecture(source) == arch
    assert all(source.read(k) == k for k in keys)  # every variable read from its own place


def test_se_blocks_land_in_this_models_se_layers():
    with open(os.path.join(EXTRA, 'r18se.json')) as f:
        theirs = json.load(f)
    shapes = {k: tuple(s) for k, s in theirs['keys']}
    source = authors.Source('theirs', 'checkpoint', shapes, lambda key: None)
    config = Config(resnet_depth=18, image_size=32, se_ratio=0.25, train_mode='finetune',
                    fine_tune_after_block=2, use_tpu=False)
    model = build_model(config, NUM_CLASSES)
    pairs, notes = authors.plan(model, config, source)
    assert len(pairs) == len(model.variables) == len(shapes) and not notes
    assert sum('/se/' in v.path for v, _ in pairs) == 4 * 8  # 2 convs + 2 biases in 8 blocks


def test_directory_sources_resolve(r18):
    """A checkpoint directory without a `checkpoint` state file (or with one naming the paths of
    another machine) gives its newest ckpt-N; SavedModel roots give their newest export."""
    from simclr_tf import checkpoint
    theirs = os.path.dirname(r18['prefix'])
    assert authors.latest_prefix(theirs) == r18['prefix']
    assert authors.open_source(theirs).kind == 'checkpoint'
    export_root = os.path.dirname(os.path.dirname(r18['saved']))  # .../theirs_export
    assert authors.find_saved_model(export_root) == r18['saved']
    checkpoint.check_start(export_root)  # accepted at start-up
    empty = r18['tmp'] / 'empty'
    empty.mkdir(exist_ok=True)
    with pytest.raises(ValueError, match='neither a checkpoint nor a SavedModel'):
        checkpoint.check_start(str(empty))
