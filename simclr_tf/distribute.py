"""Choosing the tf.distribute strategy: TPU, multi-worker, GPUs, CPU replicas, or one device."""

from __future__ import annotations

import json
import os

import tensorflow as tf

from simclr_tf.config import Config, ConfigError


def configure_cpu_replicas(n: int) -> None:
    """Splits the CPU into `n` logical devices; must run before TensorFlow touches a device."""
    cpus = tf.config.list_physical_devices('CPU')
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(n)])
    except RuntimeError as e:  # the runtime is already initialised
        existing = len(tf.config.list_logical_devices('CPU'))
        if existing != n:
            raise ConfigError(f'cpu_replicas={n}: cannot split the CPU after TensorFlow started '
                              f'({existing} logical CPU devices exist): {e}') from e


def configure_threads(config: Config) -> None:
    """TensorFlow's inter-/intra-op thread pools (0 keeps its default); before it starts.

    On a small CPU one inter-op thread trains as fast as more and lowers the peak memory
    (docs/benchmarks.md): fewer ops run at once, so fewer of their buffers are alive together."""
    if config.inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(config.inter_op_threads)
    if config.intra_op_threads:
        tf.config.threading.set_intra_op_parallelism_threads(config.intra_op_threads)


def _num_workers_in_tf_config() -> int:
    spec = json.loads(os.environ.get('TF_CONFIG', '{}') or '{}')
    cluster = spec.get('cluster', {})
    return len(cluster.get('worker', [])) + len(cluster.get('chief', []))


def build_strategy(config: Config) -> tf.distribute.Strategy:
    """The strategy the config and the machine call for, in the order TPU > multi-worker > GPUs > CPUs."""
    if config.use_tpu:
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
                tpu=config.tpu_name or config.master, zone=config.tpu_zone, project=config.gcp_project)
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, tf.errors.OpError, RuntimeError) as e:
            raise ConfigError(
                f'use_tpu=True (the original\'s default) but no TPU could be reached '
                f'(tpu_name={config.tpu_name!r}, tpu_zone={config.tpu_zone!r}): {e}. '
                'Pass --use_tpu=False to train on CPUs or GPUs.') from e
        return tf.distribute.TPUStrategy(resolver)
    if _num_workers_in_tf_config() > 1:
        if config.cpu_replicas > 1:
            raise ConfigError('cpu_replicas > 1 cannot be combined with a multi-worker TF_CONFIG')
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices('GPU')
    if config.cpu_replicas > 1:
        configure_cpu_replicas(config.cpu_replicas)
        devices = [d.name for d in tf.config.list_logical_devices('CPU')][:config.cpu_replicas]
        return tf.distribute.MirroredStrategy(devices)
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    if len(gpus) == 1:
        return tf.distribute.OneDeviceStrategy(gpus[0].name)
    return tf.distribute.get_strategy()  # the default strategy: one device, no replication


def check_strategy(config: Config, strategy: tf.distribute.Strategy) -> list[str]:
    """Rejects what this strategy cannot run, naming the flags, before anything is built;
    returns warnings about what it can run but should not."""
    replicas = strategy.num_replicas_in_sync
    for field in ('train_batch_size', 'eval_batch_size'):
        batch = getattr(config, field)
        if batch % replicas:
            raise ConfigError(f'{field}={batch} is not divisible by the {replicas} replicas in sync')
    if config.jit_compile and replicas > 1 and not isinstance(strategy, tf.distribute.TPUStrategy):
        if not tf.config.list_logical_devices('GPU'):
            raise ConfigError(
                f'jit_compile=True is not supported with {replicas} CPU replicas (XLA cannot compile '
                'the cross-replica step on CPU); use one replica or drop --jit_compile')
    if config.mixed_precision == 'float16' and not tf.config.list_logical_devices('GPU'):
        return ['mixed_precision=float16 on CPU is slow; bfloat16 is the CPU/TPU choice']
    return []


def describe(strategy: tf.distribute.Strategy) -> str:
    """'1 replica (one device: CPU)', '2 replicas (MirroredStrategy)', ..."""
    n = strategy.num_replicas_in_sync
    replicas = f'{n} replica{"" if n == 1 else "s"}'
    if isinstance(strategy, (tf.distribute.TPUStrategy, tf.distribute.MirroredStrategy,
                             tf.distribute.MultiWorkerMirroredStrategy)):
        return f'{replicas} ({type(strategy).__name__})'
    if isinstance(strategy, tf.distribute.OneDeviceStrategy):
        return f'{replicas} ({strategy.extended.worker_devices[0]})'
    return f'{replicas} (one device: {"GPU" if tf.config.list_logical_devices("GPU") else "CPU"})'


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes summaries, results and exports (worker 0 / the chief)."""
    resolver = getattr(strategy, 'cluster_resolver', None)
    if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type in (None, 'chief') or (task_type == 'worker' and task_id == 0
                                             and 'chief' not in resolver.cluster_spec().as_dict())
