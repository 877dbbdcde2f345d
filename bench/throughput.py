"""Training throughput: end to end from an image folder vs. the model-only bound, and peak RSS.

    python bench/throughput.py --flagfile=flags/cifar10_pretrain.cfg --dataset=/tmp/cifar10 \\
        --train_batch_size=256 --inter_op_threads=1 [--bench_steps=2 --bench_windows=2]

Takes run.py's flags (a flag set is a run's flag set). Builds the model, optimizer and training
loop exactly as run.py does, then alternates timed windows of `--bench_steps` steps fed
(a) by the real input pipeline (decode, cache, shuffle, two augmented views, the step's share of
the augmentations as the run's view plan places them: `--augment_placement`) and (b) by one
synthetic batch of ready views held in memory, the step doing no augmentation (the model-only
bound: the same model, loss and update, no input or augmentation work). Compilation and the
cache fill are excluded by `--bench_warmup_steps`. `--other_placements` and `--authors_code` add
kinds timed in the same windows: other placements of the augmentations, and the authors' input.
Each window of a stream starts on a fresh iterator and one untimed step (a stream left waiting
would make batches while another kind is timed). Prints one JSON line: median and best pairs/s
of each kind, the process's CPU ms a pair (a CPU-only run's cost, robust to other load), their
ratios, the plan, peak RSS, the config and command.
"""

import json
import os
import resource
import shlex
import statistics
import sys
import tarfile
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

import run  # noqa: E402  (defines run.py's flags)

flags.DEFINE_integer('bench_steps', 4, 'Training steps per timed window.')
flags.DEFINE_integer('bench_windows', 2, 'Timed windows of each kind (median reported).')
flags.DEFINE_integer('bench_warmup_steps', 2, 'Untimed steps of each kind first (compile).')
flags.DEFINE_string('extract', None, 'tar.gz to extract into --dataset first if it is missing.')
flags.DEFINE_integer('program_steps', 0, 'Also run run.py itself for this many steps, seeded and '
                     'unseeded (bench/program_runs.py); 0: skip.')
flags.DEFINE_integer('program_rounds', 2, 'Alternating seeded/unseeded run.py runs of each kind.')
flags.DEFINE_list('other_placements', [], "Also time end to end, in the same process and the same "
                  "windows, the step and stream of these --augment_placement values (host, step, "
                  "auto): placements compared as ratios of one run.")
flags.DEFINE_string('authors_code', None, "The authors' tf2/ directory: also time the same step fed "
                    "by their input pipeline (bench/input_pipeline.py's, from an image folder), "
                    "blur in the step as theirs: their placement end to end.")
flags.DEFINE_boolean('program_concurrent', False, 'Run the seeded and unseeded run.py at the same '
                     'time, each pinned to half of the cores (robust to other load; '
                     'bench/program_runs.py).')
FLAGS = flags.FLAGS


def main(argv) -> None:
    del argv
    import tensorflow as tf

    import training_step
    from simclr_tf import data

    if FLAGS.extract and not os.path.isdir(FLAGS.dataset):
        with tarfile.open(FLAGS.extract) as tar:
            tar.extractall(os.path.dirname(FLAGS.dataset.rstrip('/')) or '.', filter='data')
    model_dir = FLAGS.model_dir or tempfile.mkdtemp(prefix='simclr_bench_')
    config = run.config_from_flags().replace(model_dir=model_dir)
    program = None
    if FLAGS.program_steps:  # before this process builds a model, so the runs have the machine
        import program_runs
        program = program_runs.compare_seeding(config, FLAGS.program_steps, FLAGS.bench_steps,
                                               FLAGS.program_rounds, FLAGS.program_concurrent)
    config = config.replace(mode='train')
    step = training_step.build(config)
    print(step.plan.line(), file=sys.stderr)
    real = data.build_distributed_dataset(step.strategy, config, True, plan=step.plan)

    def timed(loop, iterator, steps: int) -> tuple[float, float]:
        """pairs/s and the process's CPU ms a pair over `steps` steps."""
        t0, cpu = time.perf_counter(), _cpu_s()
        loop(iterator, tf.constant(steps)).numpy()
        pairs = config.train_batch_size * steps
        return pairs / (time.perf_counter() - t0), 1e3 * (_cpu_s() - cpu) / pairs

    # Each kind: (loop, a new iterator). A stream gets a fresh iterator every window, dropped
    # after it: one left waiting would make batches while another kind is timed.
    kinds = {'model_only': (step.model_loop, lambda: step.synthetic),
             'end_to_end': (step.loop, lambda: iter(real))}
    for placement in FLAGS.other_placements:
        kinds[f'end_to_end_{placement}'] = _placement(config, step, placement)
    if FLAGS.authors_code:
        kinds['authors_end_to_end'] = _authors(config, step)
    for loop, fresh in kinds.values():
        timed(loop, fresh(), FLAGS.bench_warmup_steps)
    rates = {kind: [] for kind in kinds}
    cpu_ms = {kind: [] for kind in kinds}
    for _ in range(FLAGS.bench_windows):  # alternate, so drift hits all alike
        for kind, (loop, fresh) in kinds.items():
            iterator = fresh()
            timed(loop, iterator, 1)  # untimed: the stream's first batch, then steady state
            rate, cpu = timed(loop, iterator, FLAGS.bench_steps)
            rates[kind].append(rate)
            cpu_ms[kind].append(cpu)
            del iterator
        print('window: ' + ', '.join(f'{k} {v[-1]:.2f}' for k, v in rates.items()) + ' pairs/s',
              file=sys.stderr)
    e2e, bound = (statistics.median(rates[k]) for k in ('end_to_end', 'model_only'))
    authors = ({'authors_pairs_per_s': round(statistics.median(rates['authors_end_to_end']), 2),
                'over_authors': round(e2e / statistics.median(rates['authors_end_to_end']), 3)}
               if FLAGS.authors_code else {})
    others = {p: {'pairs_per_s': round(statistics.median(rates[f'end_to_end_{p}']), 2),
                  'over_this': round(statistics.median(rates[f'end_to_end_{p}']) / e2e, 3)}
              for p in FLAGS.other_placements}
    if others:
        authors['other_placements'] = others
    keys = ('resnet_depth', 'width_multiplier', 'image_size', 'train_batch_size', 'optimizer',
            'jit_compile', 'mixed_precision', 'cpu_replicas', 'use_blur', 'augmentations',
            'cache_dataset', 'dataset', 'augment_placement')
    print(json.dumps({
        'pairs_per_s': round(e2e, 2), 'model_only_pairs_per_s': round(bound, 2),
        'efficiency': round(e2e / bound, 3), **authors,
        'peak_rss_gb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        'windows': {k: [round(r, 2) for r in v] for k, v in rates.items()},
        'best': {k: round(max(v), 2) for k, v in rates.items()},
        'cpu_ms_per_pair': {k: round(statistics.median(v)) for k, v in cpu_ms.items()},
        'plan': step.plan.line(),
        'steps_per_window': FLAGS.bench_steps, 'cpus': os.cpu_count(),
        'onednn': _onednn_enabled(),
        'threads': {'inter_op': config.inter_op_threads, 'intra_op': config.intra_op_threads},
        'config': {k: getattr(config, k) for k in keys},
        'seed': config.seed, 'program': program,
        'command': 'python ' + ' '.join(map(shlex.quote, sys.argv)),
    }))


def _placement(config, step, placement: str) -> tuple:
    """(loop, iterator): the same model and optimizer, the views made as `placement` plans."""
    from simclr_tf import data, train
    other = config.replace(augment_placement=placement)
    plan = data.view_plan(other, True)
    print(f'{placement}: {plan.line()}', file=sys.stderr)
    stream = data.build_distributed_dataset(step.strategy, other, True, plan=plan)
    return train.make_loop_fn(other, step.state, step.strategy, plan), lambda: iter(stream)


def _authors(config, step) -> tuple:
    """(loop, iterator): the step with blur only (theirs: in the model's call) fed by the
    authors' pretraining input, colour and all on the host, from the folder's train split."""
    import dataclasses

    import input_pipeline
    import tensorflow as tf
    from simclr_tf import sources, train

    plan = dataclasses.replace(step.plan, in_step=tuple(o for o in step.plan.in_step
                                                        if o == 'blur'))
    loop = train.make_loop_fn(config, step.state, step.strategy, plan)
    paths = [p.decode() for p, _ in sources.open_source(config.dataset, None).read(
        config.train_split, 1, 0)[0].as_numpy_iterator()]
    labels = tf.one_hot(tf.zeros([step.per_replica], tf.int32), step.info.num_classes)
    stream = input_pipeline.authors(FLAGS.authors_code, paths, step.per_replica,
                                    config.image_size, config.color_jitter_strength)
    batches = step.strategy.distribute_datasets_from_function(
        lambda _: stream.map(lambda x: (x, labels)))
    return loop, lambda: iter(batches)


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _onednn_enabled() -> bool:
    try:
        from tensorflow.python.util import _pywrap_util_port
        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        return False


if __name__ == '__main__':
    app.run(main)
