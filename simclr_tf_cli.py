"""SimCLR command line: the authors' TF2 run.py flags -> Config -> strategy -> train/eval/export.

The program's one module of absl flags, outside the `simclr_tf` package, which reads no flags:
`run.py` in a checkout, the `simclr-tf` command once installed.

    python run.py --flagfile=flags/quickstart.cfg
    python run.py --train_mode=pretrain --train_batch_size=512 --train_epochs=1000 \\
      --learning_rate=1.0 --weight_decay=1e-4 --temperature=0.5 --dataset=cifar10 \\
      --image_size=32 --eval_split=test --resnet_depth=18 --use_blur=False \\
      --color_jitter_strength=0.5 --model_dir=/tmp/simclr_test --use_tpu=False
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import typing
from typing import Optional

from absl import app, flags, logging

from simclr_tf.config import Config, ConfigError


def _define_flags() -> None:
    """One flag per Config field: its default, and the help text and choices it declares."""
    types = typing.get_type_hints(Config)
    for field in dataclasses.fields(Config):
        name, default, meta = field.name, field.default, field.metadata
        if meta['choices'] and types[name] is str:  # absl enums are strings (not resnet_depth)
            flags.DEFINE_enum(name, default, list(meta['choices']), meta['help'])
        elif types[name] is bool:
            flags.DEFINE_bool(name, default, meta['help'])
        elif types[name] in (int, Optional[int]):
            flags.DEFINE_integer(name, default, meta['help'])
        elif types[name] is float:
            flags.DEFINE_float(name, default, meta['help'])
        else:
            flags.DEFINE_string(name, default, meta['help'])


_define_flags()
FLAGS = flags.FLAGS


def config_from_flags(model_dir_defaults: bool = False) -> Config:
    """The Config of the parsed flags. `model_dir_defaults`: a run that reads a model_dir
    (--mode=eval or export) whose config.json is there takes its values for the flags not given
    (`model_dir.with_saved_defaults`); the program's own run does, tests that parse commands
    do not."""
    values = {f.name: FLAGS[f.name].value for f in dataclasses.fields(Config)}
    if model_dir_defaults:
        from simclr_tf import model_dir
        values = model_dir.with_saved_defaults(values, {k for k in values if FLAGS[k].present})
    return Config(**values).validate()


def _fail(message: str, status: int = 2, at_once: bool = False) -> None:
    """Prints `error: <message>` (one line, the only one: not logged as well) and exits with
    `status`; `at_once` skips the interpreter's shutdown, whose wait for TensorFlow's threads (an
    input pipeline finishing its batch, a barrier with a lost worker) can take a minute: what a
    fault keeps is on disk."""
    message = ' '.join(message.split())  # one line, whatever the error's text held
    print(f'error: {message}', file=sys.stderr)
    if at_once:
        logging.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


_VALUE_ERRORS = ((r"invalid literal for int\(\) with base 10: ('.*')", r'\1 is not an integer'),
                 (r"could not convert string to float: ('.*')", r'\1 is not a number'),
                 (r"\('Non-boolean argument to boolean flag', ('.*')\)",
                  r'\1 is not true or false'))


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing (app.run's `flags_parser`), but a bad command line ends in one `error:`
    line and status 2, before TensorFlow is imported: absl's own parser exits 1 with `FATAL Flags
    parsing error` and a second line. An unknown flag keeps absl's "Did you mean" and names the
    flagfile that sets it."""
    try:
        rest = FLAGS(argv)
    except flags.CantOpenFlagFileError as e:
        # absl: "ERROR:: Unable to open flagfile: [Errno 2] No such file or directory: 'f.cfg'"
        found = re.search(r"\[Errno \d+\] (.+): '(.+)'$", str(e))
        _fail(f'cannot read flagfile {found[2]}: {found[1]}' if found
              else str(e).removeprefix('ERROR:: '))
    except flags.UnrecognizedFlagError as e:
        where = _flagfile_setting(e.flagname, argv[1:])
        quoted = f"'{e.flagname}'"
        _fail(str(e).replace(quoted, f'{quoted} (in flagfile {where})', 1) if where else str(e))
    except flags.Error as e:  # a bad value: Python's wording of the parsers made plain
        message = str(e)
        for python, plain in _VALUE_ERRORS:
            message = re.sub(python, plain, message)
        _fail(message)
    if len(rest) > 1:
        _fail(f'unexpected arguments: {" ".join(rest[1:])} (flags are written --name=value)')
    return rest


def _flagfile_setting(name: str, args: list[str], seen: frozenset = frozenset()
                      ) -> Optional[str]:
    """The flagfile named in `args` (nested ones too) with a line setting --`name`; None if
    `args` set it themselves or no readable flagfile does."""
    def sets(arg: str) -> bool:
        return arg.startswith('-') and arg.lstrip('-').split('=', 1)[0] == name

    if any(sets(arg) for arg in args):
        return None
    for i, arg in enumerate(args):
        key, _, value = arg.lstrip('-').partition('=')
        path = value if arg.startswith('-') and key == 'flagfile' and value else (
            args[i + 1] if arg in ('--flagfile', '-flagfile') and i + 1 < len(args) else None)
        if path is None or path in seen:
            continue
        try:
            with open(os.path.expanduser(path)) as f:
                lines = [line.strip() for line in f]
        except OSError:
            continue
        lines = [line for line in lines if line and not line.startswith(('#', '//'))]
        if any(sets(line) for line in lines):
            return path
        nested = _flagfile_setting(name, lines, seen | {path})
        if nested:
            return nested
    return None


def summary(result: dict) -> str:
    """The closing lines: what was measured, on how many examples, and where the export is."""
    names = {'eval/label_top_1_accuracy': 'linear head top-1',
             'eval/label_top_5_accuracy': 'top-5', 'eval/knn_top_1_accuracy': 'kNN top-1'}
    parts = [f'{label} {result[k]:.3f}' for k, label in names.items() if k in result]
    if 'eval/knn_num_train_examples' in result:
        parts[-1] += f' ({int(result["eval/knn_num_train_examples"])} labelled train examples)'
    lines = [f'step {int(result["global_step"])}: ' + ', '.join(parts)
             + f' on {int(result["eval/num_examples"])} {FLAGS.eval_split} examples'
             + (f' ({result["older_than"]})' if result.get('older_than') else '')]
    if result.get('saved_model'):
        lines.append(f'SavedModel: {result["saved_model"]}')
    if result.get('undecodable_images'):
        lines.append(f'{result["undecodable_images"]} images could not be decoded and were '
                     'replaced by grey ones (their paths are in the log)')
    return '\n'.join(lines)


def main(argv) -> None:
    if len(argv) > 1:  # parse_flags stops first when run by cli()
        _fail(f'unexpected arguments: {" ".join(argv[1:])}')
    config = None
    try:
        config = config_from_flags(model_dir_defaults=True)
        if not config.model_dir:
            raise ConfigError('--model_dir is required')
        from simclr_tf import distribute  # before TensorFlow touches a device:
        distribute.configure_threads(config)
        if config.cpu_replicas > 1:
            distribute.configure_cpu_replicas(config.cpu_replicas)
        from simclr_tf import program
        # flags.json: the flags as given, with the values the run took from model_dir.
        result = program.run(config, flags={**{k: FLAGS[k].value for k in FLAGS},
                                            **config.to_dict()})
        if result:
            print(summary(result))
    except ConfigError as e:
        _fail(str(e))
    except Exception as e:  # noqa: BLE001 - clear message for bad input, full trace in the log
        from simclr_tf.data import DataError
        from simclr_tf.train import Preempted
        if isinstance(e, Preempted):
            from simclr_tf import interrupt
            interrupt.exit_now(str(e))  # `stopped: <e>`, status 75
        if isinstance(e, DataError):
            _fail(str(e))
        from simclr_tf import faults
        explained = faults.explain(e, config) if config is not None else None
        if explained is not None:
            # The original error and its traceback, for --verbosity=1.
            logging.debug('%s: %s', type(e).__name__, e, exc_info=True)
            _fail(explained.message, explained.status, at_once=True)
        raise


def cli() -> None:
    """The program: `python run.py`, the `simclr-tf` command, `python -m simclr_tf_cli`."""
    from simclr_tf import interrupt  # SIGTERM/SIGINT: one handling, from the very start
    interrupt.install()
    for flag in FLAGS.get_key_flags_for_module(__name__):  # --help lists them, whatever the script
        FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    from simclr_tf import logs
    # After flag parsing (--verbosity), before anything imports TensorFlow.
    app.call_after_init(lambda: logs.setup(FLAGS.verbosity))
    app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
    cli()
