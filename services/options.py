"""Dataclass fields that carry their command-line help. Every command's options dataclass
(BuildOptions, ServeOptions; TrainOptions, EvalOptions, FeatureOptions in clients) declares its
fields with these, and `actserve.cli.add_dataclass_flags` makes one flag per field from them, so a
default and its help are written once, beside the field. Metadata the CLI reads: `flag` (the flag's
name when it is not the field's), `choices`, `metavar`, and `repeat` (a tuple given by repeating
the flag rather than as a comma list).
"""
from __future__ import annotations

from dataclasses import field


def option(default, help: str, **metadata):
    """A field with a default and its --help text."""
    if isinstance(default, dict):  # dataclasses refuse a mutable default: each instance gets a copy
        return field(default_factory=lambda: dict(default), metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


def required(help: str, **metadata):
    """A field without a default: a required flag."""
    return field(metadata={"help": help, **metadata})
