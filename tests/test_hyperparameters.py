"""A hyperparameter is declared in one place, its Config field: its flag, its help text, its own
check and whether it may change on resume all follow from there, so a new field is covered here
without another edit."""

import dataclasses
import os
import re
import sys
import typing

import pytest
from absl import flags

from simclr_tf import model_dir
from simclr_tf.config import Bound, Config, ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = dataclasses.fields(Config)
TYPES = typing.get_type_hints(Config)
CHOICES = [f for f in FIELDS if f.metadata['choices']]
BOUNDED = [f for f in FIELDS if f.metadata['bound'] is not None]


@pytest.fixture(scope='module')
def cli_flags():
    sys.path.insert(0, REPO)
    import simclr_tf_cli  # noqa: F401 - defines the flags
    return flags.FLAGS


def _ids(fields):
    return [f.name for f in fields]


@pytest.mark.parametrize('field', FIELDS, ids=_ids(FIELDS))
def test_every_field_declares_help_and_resumability(field):
    assert field.metadata['help'].strip()
    assert isinstance(field.metadata['resumable'], bool)


@pytest.mark.parametrize('field', FIELDS, ids=_ids(FIELDS))
def test_every_field_is_a_flag_with_its_help_and_default(cli_flags, field):
    flag, help_, choices = cli_flags[field.name], field.metadata['help'], field.metadata['choices']
    enum = choices and TYPES[field.name] is str  # absl prints an enum's choices before its help
    assert flag.help == (f'<{"|".join(choices)}>: {help_}' if enum else help_)
    assert flag.default == field.default


@pytest.mark.parametrize('field', CHOICES, ids=_ids(CHOICES))
def test_string_choices_become_an_enum_flag_with_exactly_those_choices(cli_flags, field):
    parser = cli_flags[field.name].parser
    if TYPES[field.name] is str:
        assert list(parser.enum_values) == list(field.metadata['choices'])
    else:  # absl enums are strings: resnet_depth stays an integer flag, Config checks it
        assert not hasattr(parser, 'enum_values')


@pytest.mark.parametrize('field', CHOICES, ids=_ids(CHOICES))
def test_validate_rejects_a_value_outside_the_choices(field):
    bad = 'bogus' if TYPES[field.name] is str else -7
    with pytest.raises(ConfigError, match=re.escape(f'{field.name}={bad!r} must be one of ')):
        Config(**{field.name: bad}).validate()


def _outside(bound: Bound) -> list[float]:
    """Values just outside the bound: below it, at an open end, above a finite upper end."""
    values = [bound.low - 1] + ([] if bound.low_closed else [bound.low])
    if bound.high != float('inf'):
        values += [bound.high + 1] + ([] if bound.high_closed else [bound.high])
    return values


@pytest.mark.parametrize('field', BOUNDED, ids=_ids(BOUNDED))
def test_validate_rejects_values_outside_the_bound(field):
    bound, kind = field.metadata['bound'], TYPES[field.name]
    for value in map(kind, _outside(bound)):
        with pytest.raises(ConfigError) as e:
            Config(**{field.name: value}).validate()
        assert bound.error(field.name, value) in str(e.value)


@pytest.mark.parametrize('message, changes', [
    ('train_batch_size=0 must be > 0', dict(train_batch_size=0)),
    ('weight_decay=-1.0 must be >= 0', dict(weight_decay=-1.0)),
    ('momentum=1.0 must be in [0, 1)', dict(momentum=1.0)),
    ('batch_norm_decay=0.0 must be in (0, 1)', dict(batch_norm_decay=0.0)),
    ('fine_tune_after_block=5 must be in [-1, 4]', dict(fine_tune_after_block=5)),
    ('label_fraction=0 must be in (0, 1]', dict(label_fraction=0)),
    ("mode='x' must be one of train, eval, train_then_eval, export", dict(mode='x')),
    ('resnet_depth=42 must be one of 18, 34, 50, 101, 152, 200', dict(resnet_depth=42)),
])
def test_messages_read_as_before(message, changes):
    with pytest.raises(ConfigError) as e:
        Config(**changes).validate()
    assert f'  {message}' in str(e.value).splitlines()  # one line of the error, word for word


def test_resumable_fields_are_the_declared_ones():
    declared = {f.name for f in FIELDS if f.metadata['resumable']}
    assert model_dir.RESUMABLE_FIELDS == declared
    assert {'train_steps', 'mode', 'eval_split', 'checkpoint', 'augment_placement'} <= declared
    assert not {'temperature', 'learning_rate', 'resnet_depth', 'seed', 'dataset'} & declared


@pytest.mark.parametrize('text, inside, outside', [
    ('> 0', [1e-9, 5], [0, -1]),
    ('>= 0', [0, 5], [-1e-9]),
    ('[0, 1)', [0, 0.5], [1, -0.1]),
    ('(0, 1]', [1, 0.5], [0, 1.1]),
    ('[-1, 4]', [-1, 4], [-2, 5]),
])
def test_bounds_read_as_written(text, inside, outside):
    bound = Bound.parse(text)
    assert all(bound.admits(v) for v in inside)
    assert not any(bound.admits(v) for v in outside)
    with pytest.raises(ValueError):
        Bound.parse('0 < x')
