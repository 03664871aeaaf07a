"""Hyperparameters as dataclasses whose fields are also the command-line flags.

A model's configuration is one dataclass. Each field is made with `option(default, help, ...)`,
and that one line is the whole hyperparameter: `add_flags` turns the fields into argparse flags
(`batch_size` -> `--batch-size`, with the field's default, help and type), `from_args` builds the
dataclass back from the parsed flags, `dataclasses.asdict` writes it to config.json and the
checkpoint, and `from_dict` reads it back. A field whose default is itself a config dataclass
(`nested`) gets its own group of flags.

`resume_config` decides what a resumed run trains with: the settings it was started with, except
the fields marked `resume="flag"` (where and how to run: device, data folder) or `"extend"`
(how long to train), which the command line may change. Which flags the command line gave
(`given_fields`) is read from the command line itself, not guessed from values: a flag given at
its default value is given.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import Field, field, fields, replace
from typing import Any

from common.cli import UserError

RESUME_RULES = ("keep", "flag", "extend")


def option(
    default: Any,
    help: str,
    type: Callable[[str], Any] | None = None,
    choices: tuple[str, ...] | None = None,
    cli: bool = True,
    resume: str = "keep",
) -> Any:
    """A config field with its flag: default, help text, argparse `type` (inferred from an int, float
    or str default) or `choices`. cli=False: a field with no flag (fixed by the data, e.g. the image
    size). resume: 'keep' (a resumed run keeps the saved value; another one is refused), 'flag' (the
    command line's value) or 'extend' (the command line's value where given, else the saved one)."""
    assert resume in RESUME_RULES, resume
    return field(default=default, metadata={"help": help, "type": type, "choices": choices, "cli": cli,
                                            "resume": resume})  # fmt: skip


def nested(cls: type) -> Any:
    """A field holding another config dataclass (its fields become a group of flags)."""
    return field(default_factory=cls, metadata={"nested": cls})


def _flag(f: Field) -> str:
    return "--" + f.name.replace("_", "-")


def add_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    defaults: Any = None,
    exclude: tuple[str, ...] = (),
) -> None:
    """Add one flag per field of the config dataclass `cls` (defaults from `defaults`, an instance,
    else the field's own); fields in `exclude` and those with cli=False get none."""
    defaults = defaults if defaults is not None else cls()
    for f in fields(cls):
        if f.name in exclude or not f.metadata.get("cli", True):
            continue
        if "nested" in f.metadata:
            group = parser.add_argument_group(f.metadata["nested"].__name__)
            add_flags(group, f.metadata["nested"], getattr(defaults, f.name), exclude)
            continue
        default = getattr(defaults, f.name)
        kwargs: dict[str, Any] = {"default": default, "help": f.metadata["help"]}
        if isinstance(f.default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.metadata["choices"]:
            kwargs["choices"] = f.metadata["choices"]
        else:
            kwargs["type"] = f.metadata["type"] or type(f.default)
        parser.add_argument(_flag(f), **kwargs)


def from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """The config dataclass `cls` from parsed flags (fields without a flag keep their defaults);
    a value the config itself rejects (its __post_init__) becomes a one-line UserError."""
    values: dict[str, Any] = {}
    for f in fields(cls):
        if "nested" in f.metadata:
            values[f.name] = from_args(f.metadata["nested"], args)
        elif hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    try:
        return cls(**{**values, **overrides})
    except ValueError as e:
        raise UserError(str(e)) from None


def from_dict(cls: type, d: dict[str, Any], missing: dict[str, Any] | None = None) -> Any:
    """The config dataclass `cls` from `asdict` output (JSON lists back to tuples, nested configs
    rebuilt). Keys the class does not know are dropped; fields the dict lacks take `missing[name]`
    if given (what runs saved before that field existed were trained with), else the default."""
    values = dict(missing or {})
    for f in fields(cls):
        if f.name not in d:
            continue
        v = d[f.name]
        if "nested" in f.metadata:
            nested_cls = f.metadata["nested"]
            v = nested_cls.from_dict(v) if hasattr(nested_cls, "from_dict") else from_dict(nested_cls, v)
        elif isinstance(v, list):
            v = tuple(v)
        values[f.name] = v
    return cls(**{k: v for k, v in values.items() if k in {f.name for f in fields(cls)}})


def _field_names(cls: type) -> list[str]:
    """The names of the fields of config `cls` and of its nested configs (one flag namespace)."""
    names = []
    for f in fields(cls):
        names += _field_names(f.metadata["nested"]) if "nested" in f.metadata else [f.name]
    return names


def given_fields(parser: argparse.ArgumentParser, cls: type, argv: list[str] | None) -> frozenset[str]:
    """The fields of config `cls` (nested ones included) whose flags the command line `argv` (None:
    sys.argv) sets, even to their default value. argparse fills in a default only where the
    namespace lacks the name, so every field starts as a marker that only a given flag replaces."""
    unset = object()
    names = _field_names(cls)
    args = parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(names, unset)))
    return frozenset(name for name in names if getattr(args, name) is not unset)


def resume_config(saved: Any, given: Any, flags: frozenset[str]) -> Any:
    """What a resumed run trains with: `saved` (the run's config), with each field's resume rule
    applied to `given` (the command line's config) and `flags` (the fields it set, `given_fields`):
    'flag' fields from `given`, 'extend' fields from `given` where set, 'keep' fields from `saved`,
    and a 'keep' field set to another value than the saved one is a UserError that names its flag."""
    values = {}
    for f in fields(saved):
        old, new = getattr(saved, f.name), getattr(given, f.name)
        if "nested" in f.metadata:
            values[f.name] = resume_config(old, new, flags)
            continue
        rule = f.metadata.get("resume", "keep")
        if rule == "flag" or (rule == "extend" and f.name in flags):
            values[f.name] = new
        elif rule == "keep" and f.name in flags and new != old:
            raise UserError(
                f"--resume keeps the run's settings: it was trained with {_flag(f)} {_show(old)}, "
                f"not {_show(new)}; drop the flag or start a new run"
            )
    return replace(saved, **values)


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)
