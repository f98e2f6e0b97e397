"""The ``fastdpo`` command's options, generated from :class:`DPOConfig`'s fields.

Each field becomes one option: its flag is the field name with dashes (plus a shorter
``metadata["flag"]`` where the field has one: ``--lr`` for ``learning_rate``), its help is the
field's help text followed by its default, so neither can drift from the config. Booleans are
``--x`` / ``--no-x``; ``X | None`` fields also take ``none``; list fields take several values;
``metadata["choices"]`` become argparse choices. Options are never given an argparse default
(``SUPPRESS``): only what the command line says overrides the run's base settings. The few options
that are not config fields (model, data, reference, ...) are written out in :mod:`fastdpo.train.cli`.
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import Field, fields
from typing import Any, Literal

from fastdpo.train.config import DPOConfig

# What `fastdpo eval` takes from the config: how the loss and the data are set up, and where it runs.
EVAL_GROUPS = ("loss", "data")
EVAL_FIELDS = ("per_device_eval_batch_size", "bf16", "fused_linear", "backend", "device")


def cli_fields(command: str = "train") -> list[Field]:
    """The config fields that are options of ``command`` (``train``: all but the reference rule)."""
    chosen = [f for f in fields(DPOConfig) if f.metadata.get("cli", True)]
    if command == "eval":
        chosen = [f for f in chosen if f.metadata["group"] in EVAL_GROUPS or f.name in EVAL_FIELDS]
    return chosen


def flags(f: Field) -> list[str]:
    """``--short`` (if the field has one) and ``--field-name``."""
    names = [f.metadata["flag"]] if "flag" in f.metadata else []
    return [f"--{name}" for name in names + [f.name.replace("_", "-")]]


def show(value: Any) -> str:
    """A default as it is typed on the command line."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "none"
    if isinstance(value, list):
        return " ".join(map(show, value))
    if value == "":
        return "''"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _members(hint: Any) -> tuple[list[Any], bool]:
    """The types of a (possibly union) annotation without None, and whether None is allowed."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    members = list(typing.get_args(hint)) if union else [hint]
    return [m for m in members if m is not type(None)], type(None) in members


def _converter(f: Field, members: list[Any], optional: bool):
    """``str -> value`` for one field: ``none`` for None, literal words, else the field's scalar type."""
    literals = [v for m in members if typing.get_origin(m) is Literal for v in typing.get_args(m)]
    scalars = [m for m in members if m in (int, float, str)]
    items = [typing.get_args(m)[0] for m in members if typing.get_origin(m) is list]
    base = (scalars or items)[0]

    def convert(text: str):
        if optional and text.lower() == "none":
            return None
        if text in literals:
            return text
        value = base(text)
        return None if f.metadata.get("zero_is_none") and value == 0 else value

    convert.__name__ = base.__name__  # argparse names it in "invalid int value: 'x'"
    return convert


def add_config_options(
    parser: argparse.ArgumentParser, command: str = "train", builtin: dict | None = None
) -> dict[str, argparse._ArgumentGroup]:
    """One option per field of ``cli_fields(command)``, in argument groups named by the field's group.

    ``builtin``: the built-in default run's own settings, shown next to each field's default.
    Returns the groups, so that command-only options can join them.
    """
    hints = typing.get_type_hints(DPOConfig)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in cli_fields(command):
        group = f.metadata["group"]
        if group not in groups:
            groups[group] = parser.add_argument_group(f"{group} options")
        default = f"default: {show(f.default)}"
        if builtin and f.name in builtin:
            default += f"; built-in default: {show(builtin[f.name])}"
        kwargs: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS)
        kwargs["help"] = f"{f.metadata['help']} ({default})".replace("%", "%%")
        members, optional = _members(hints[f.name])
        if members == [bool]:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = convert = _converter(f, members, optional)
            literals = [v for m in members if typing.get_origin(m) is Literal for v in typing.get_args(m)]
            kwargs["metavar"] = "|".join([convert.__name__.upper(), *literals])
            choices = f.metadata.get("choices")
            if choices:
                kwargs["choices"] = choices
                if len(choices) > 4:  # too many for the usage line: listed in the help instead
                    kwargs["metavar"] = "NAME"
                    kwargs["help"] = kwargs["help"][:-1] + f"; one of {', '.join(choices)})"
                else:
                    del kwargs["metavar"]  # argparse shows {a,b,c}
            if any(typing.get_origin(m) is list for m in members):
                kwargs["nargs"] = "+"
        groups[group].add_argument(*flags(f), **kwargs)
    return groups


def config_options(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields given on the command line, as ``DPOConfig`` takes them.

    A list field that also takes a single value (``loss_type``) gets the value itself when one is given.
    """
    hints = typing.get_type_hints(DPOConfig)
    options = {}
    for f in fields(DPOConfig):
        if not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        members, _ = _members(hints[f.name])
        if isinstance(value, list) and len(value) == 1 and str in members:
            value = value[0]
        options[f.name] = value
    return options


def config_from_args(args: argparse.Namespace, base: dict) -> DPOConfig:
    """``DPOConfig`` from ``base`` overridden by every option given on the command line
    (``--reference`` sets ``precompute_ref_log_probs`` / ``reference_free``)."""
    options = {**base, **config_options(args)}
    if hasattr(args, "reference"):
        options["precompute_ref_log_probs"] = args.reference == "precompute"
        options["reference_free"] = args.reference == "none"
    return DPOConfig(**options)


def builtin_flags(builtin: dict) -> str:
    """The built-in run's settings as command-line options, e.g. ``--lr 0.001 --beta 0.02``."""
    by_name = {f.name: f for f in fields(DPOConfig)}
    return " ".join(f"{flags(by_name[name])[0]} {show(value)}" for name, value in builtin.items())
