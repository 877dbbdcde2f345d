"""The pictures of what an encoder learned: neighbours equal a brute-force cosine search, the
t-SNE map has its two panels, TensorBoard's projector reads the files back, the command runs on
the sample from a model_dir, an export and random init, and bad input ends in one error line."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from simclr_tf import drawing, embeddings, export, features, logs, show
from simclr_tf.config import Config
from simclr_tf.model import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = Config(resnet_depth=18, width_multiplier=0.25, image_size=32, proj_out_dim=16,
              use_tpu=False)
SPLITS = {'train_split': 'train[:300]', 'eval_split': 'test[:100]'}  # 10 classes in each


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory, sample_dir) -> str:
    """A model_dir of a tiny randomly initialised network: config.json, ckpt-1, saved_model/1."""
    root = tmp_path_factory.mktemp('model_dir')
    config = TINY.replace(dataset=sample_dir, model_dir=str(root))
    keras.utils.set_random_seed(0)
    model = build_model(config, 0)
    model(tf.zeros([1, 32, 32, 3]), training=False)
    (root / 'config.json').write_text(config.to_json())
    tf.train.CheckpointManager(tf.train.Checkpoint(model=model), str(root), 1).save()
    export.export_saved_model(model, config, 1)
    return str(root)


def sample_config(encoder: features.Encoder, sample_dir: str) -> Config:
    return features.data_config(encoder, sample_dir, batch_size=100).replace(**SPLITS)


def brute_force(bank: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Every pair's cosine similarity, one at a time, then sorted."""
    found = []
    for q in queries.astype(np.float64):
        sims = [float(q @ b) / (np.linalg.norm(q) * np.linalg.norm(b)) for b in bank]
        found.append(sorted(range(len(bank)), key=lambda i: -sims[i])[:k])
    return np.array(found)


def test_nearest_is_the_brute_force_cosine_search():
    rng = np.random.default_rng(0)
    bank = (rng.normal(size=[200, 12]) + 0.5).astype(np.float32)
    queries = rng.normal(size=[15, 12]).astype(np.float32)
    np.testing.assert_array_equal(embeddings.nearest(bank, queries, 7),
                                  brute_force(bank, queries, 7))
    # Cosine, not Euclidean: a rescaled row is as near as the row itself.
    scaled = np.concatenate([bank, 10 * bank[:1]])
    assert set(embeddings.nearest(scaled, bank[:1], 2)[0]) == {0, 200}


def test_neighbours_of_h_and_pixels_are_the_brute_force_ones(model_dir, sample_dir, tmp_path):
    encoder = features.load(model_dir)
    config = sample_config(encoder, sample_dir)
    found = embeddings.search(encoder, config, queries=10, k=5, seed=3)
    centred = embeddings.search(encoder, config, queries=10, k=5, seed=3, centred=True)
    # One query a class, ordered by class.
    np.testing.assert_array_equal(found.query_labels, np.arange(10))
    for name, source in ((features.H, encoder), (features.PIXELS, features.pixels(32))):
        bank, bank_y = features.extract(source, config, config.train_split, (name,))
        test, test_y = features.extract(source, config, config.eval_split, (name,))
        queries = test[name][found.queries]
        expected = brute_force(bank[name], queries, 5)
        np.testing.assert_array_equal(found.neighbours[name], expected)
        np.testing.assert_array_equal(found.labels[name], bank_y[expected])
        assert found.bank_size == len(bank_y) == 300
        mean = bank[name].mean(0)
        np.testing.assert_array_equal(centred.neighbours[name],
                                      brute_force(bank[name] - mean, queries - mean, 5))
    assert not np.array_equal(centred.neighbours[features.PIXELS],
                              found.neighbours[features.PIXELS])
    pixels, _ = features.extract(features.pixels(32), config, config.train_split,
                                 (features.PIXELS,))
    shown = np.round(pixels[features.PIXELS] * 255).reshape(-1, 32, 32, 3)
    np.testing.assert_array_equal(found.images[features.H], shown[found.neighbours[features.H]])
    assert not np.array_equal(found.neighbours[features.H], found.neighbours[features.PIXELS])

    # The picture: two grids of 10 rows of query + 5 neighbours, each neighbour framed green
    # (same class) or red (another), 2 * scale px of frame around a 32 * scale px image.
    image = np.asarray(embeddings.picture(found, encoder.description, 'train', scale=2))
    cell, gap = 32 * 2 + 2 * 4, 3 * 2
    assert image.shape[1:] == (2 * 6 * (cell + gap) + 24, 3)
    assert 0 < image.shape[0] - (10 * cell + 9 * gap) < 120  # the titles above
    frame = cell ** 2 - 64 ** 2
    same = sum(int(np.sum(found.labels[n] == found.query_labels[:, None]))
               for n in (features.H, features.PIXELS))
    assert np.all(image == drawing.SAME, axis=2).sum() == same * frame
    assert np.all(image == drawing.OTHER, axis=2).sum() == (2 * 10 * 5 - same) * frame


def test_tsne_separates_clusters_and_is_seeded():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 50)
    x = np.eye(8)[labels] + rng.normal(0, 0.1, [200, 8])
    points = embeddings.tsne(x, perplexity=20, seed=1)
    assert points.shape == (200, 2)
    np.testing.assert_array_equal(points, embeddings.tsne(x, perplexity=20, seed=1))
    centres = np.stack([points[labels == c].mean(0) for c in range(4)])
    closest = np.argmin(((points[:, None] - centres[None]) ** 2).sum(-1), axis=1)
    assert np.mean(closest == labels) > 0.95


def test_map_is_two_panels_with_a_legend_of_class_names():
    labels = np.arange(30) % 3
    figure = drawing.map_figure(
        {'h': np.random.default_rng(0).normal(size=[30, 2]), 'z': np.zeros([30, 2])}, labels,
        ('cat', 'dog', 'ship'), {'h': 'h: kNN 0.5', 'z': 'z: kNN 0.4'}, 'an encoder')
    assert len(figure.axes) == 2
    assert [ax.get_title() for ax in figure.axes] == ['h: kNN 0.5', 'z: kNN 0.4']
    assert [t.get_text() for t in figure.legends[0].get_texts()] == ['cat', 'dog', 'ship']


def test_map_of_an_export_and_projector_of_random_init(model_dir, sample_dir, tmp_path):
    export_path = os.path.join(model_dir, 'saved_model', '1')
    encoder = features.load(export_path)
    out = tmp_path / 'map.png'
    line = embeddings.tsne_map(encoder, sample_config(encoder, sample_dir), str(out),
                               examples=60, perplexity=10, seed=0, k=20)
    assert line.startswith(f'wrote {out}: t-SNE of 60 test[:100] images; kNN top-1 (k=20) h ')
    assert Image.open(out).size == (1200, 660)  # two 600-px panels, the legend below

    random = features.load(model_dir, random_init=True, seed=1)
    logdir = tmp_path / 'runs' / 'projector'
    embeddings.projector(random, sample_config(random, sample_dir), str(logdir), examples=50)
    h, y = features.extract(random, sample_config(random, sample_dir), 'test[:100]')
    for root, run in ((logdir, '.'), (logdir.parent, 'projector')):  # alone, or a parent's run
        served = projector_routes(str(root))
        assert json.loads(served('/runs').get_data()) == [run]
        info = json.loads(served('/info', run=run).get_data())
        shapes = {e['tensorName']: e['tensorShape'] for e in info['embeddings']}
        assert shapes == {'h/.ATTRIBUTES/VARIABLE_VALUE': [50, 128],
                          'z/.ATTRIBUTES/VARIABLE_VALUE': [50, 16]}
        name = 'h/.ATTRIBUTES/VARIABLE_VALUE'
        rows = served('/metadata', run=run, name=name).get_data(as_text=True).splitlines()
        assert rows[0] == 'index\tlabel\tclass' and len(rows) == 51
        index, label = (np.array([int(r.split('\t')[i]) for r in rows[1:]]) for i in (0, 1))
        np.testing.assert_array_equal(label, y[index])
        assert np.all(np.bincount(label, minlength=10) == 5)  # class-balanced
        tensor = np.frombuffer(served('/tensor', run=run, name=name).get_data(), np.float32)
        np.testing.assert_allclose(tensor.reshape(50, 128), h[features.H][index], atol=1e-5)
        sprite = served('/sprite_image', run=run, name=name)
        assert sprite.status_code == 200 and sprite.mimetype == 'image/png'
    assert Image.open(logdir / 'sprite.png').size == (8 * 32, 8 * 32)  # ceil(sqrt(50)) a side


def projector_routes(logdir: str):
    """TensorBoard's projector plugin on `logdir`, as `tensorboard --logdir` serves it."""
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.projector import projector_plugin
    from werkzeug.test import Client
    runs = plugin_event_multiplexer.EventMultiplexer()
    runs.AddRunsFromDirectory(logdir)
    runs.Reload()
    plugin = projector_plugin.ProjectorPlugin(base_plugin.TBContext(
        logdir=logdir, data_provider=data_provider.MultiplexerDataProvider(runs, logdir)))
    apps = plugin.get_plugin_apps()
    return lambda route, **query: Client(apps[route]).get('/', query_string=query)


def test_command_draws_neighbours_quietly_and_refuses_an_empty_split(model_dir, tmp_path):
    out = tmp_path / 'neighbours.png'
    args = [sys.executable, '-m', 'simclr_tf.show', 'neighbours', f'--model={model_dir}',
            '--train_split=train[:300]', '--k=4', '--scale=1']
    env = {k: v for k, v in os.environ.items() if k != 'TF_CPP_MIN_LOG_LEVEL'}
    run = subprocess.run(args + ['--eval_split=test[:100]', f'--out={out}'], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stderr == ''  # no TensorFlow start-up lines
    assert run.stdout.startswith(f'wrote {out}: 10 test[:100] images, each with its 4 nearest')
    cell, gap = 32 + 2 * 2, 3
    width, height = Image.open(out).size
    assert width == 2 * 5 * (cell + gap) + 24 and 0 < height - (10 * cell + 9 * gap) < 200
    bad = subprocess.run(args + ['--eval_split=test[0:0]'], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert bad.stderr == (f"error: split 'test[0:0]' of image folder {bad_dataset(model_dir)} "
                          'has no examples\n')


def bad_dataset(model_dir: str) -> str:
    with open(os.path.join(model_dir, 'config.json')) as f:
        return json.load(f)['dataset']


def without(missing: str, dataset: str):
    """An encoder lacking one output, which fails the test if it is ever run."""
    def outputs(images):
        raise AssertionError('features extracted before the missing output was noticed')
    names = tuple(n for n in (features.H, features.Z) if n != missing)
    config = TINY.replace(dataset=dataset)
    return lambda *args, **kwargs: features.Encoder(outputs, config, 'export /x', names)


@pytest.mark.parametrize('argv, missing, message', [
    (['map'], features.Z, 'error: export /x has no output proj_head_output; it has '
     'final_avg_pool'),
    (['neighbours'], features.H, 'error: export /x has no output final_avg_pool'),
    (['projector', '--logdir=LOGDIR'], features.H, 'error: export /x has no output '
     'final_avg_pool'),
    (['map', '--eval_split=test[0:0]'], None, "error: split 'test[0:0]' of image folder"),
    (['neighbours', '--train_split=validation'], None,
     "error: split 'validation' not found in image folder"),
    (['projector', '--logdir=MODEL_DIR'], None, 'error: logdir='),
    (['map', '--model=MODEL_DIR/none'], None, "error: model='"),
])
def test_bad_input_is_one_error_line(argv, missing, message, model_dir, sample_dir, tmp_path,
                                     capsys, monkeypatch):
    # Quiet start-up is the subprocess test's; here it would filter later tests' logging.
    monkeypatch.setattr(logs, 'setup', lambda verbosity=0: None)
    if missing:
        monkeypatch.setattr(features, 'load', without(missing, sample_dir))
    argv = [a.replace('LOGDIR', str(tmp_path / 'p')).replace('MODEL_DIR', model_dir)
            for a in argv]
    if not any(a.startswith('--model') for a in argv):
        argv.append(f'--model={model_dir}')
    with pytest.raises(SystemExit) as exit_:
        show.main(argv + [f'--out={tmp_path / "x.png"}'] * (argv[0] != 'projector'))
    lines = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and lines[0].startswith(message), lines
    assert not os.listdir(tmp_path)  # nothing written
