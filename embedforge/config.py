"""Typed configuration: pydantic models that refuse unknown keys, YAML loading that names the file
and key of every error, and `--set a.b=c` overrides.

Every stage declares its config as a `StrictModel`; recipes are YAML documents of those models.
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from embedforge.errors import ConfigError, InputError
from embedforge.io import read_text_file

T = TypeVar("T", bound=BaseModel)


class StrictModel(BaseModel):
    """A config section: unknown keys are errors (a typo must never be silently ignored).

    Built directly from Python, a bad value raises `ConfigError` naming the class and the key, as
    the same value read from YAML or flags does (`validate` names the file)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, type(self).__name__)) from None

    # pydantic's own model_validate must not go through the __init__ above: `validate` formats its
    # errors with the file the values came from.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per bad key: `source: a.b.c: message`."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        lines.append(f"{source}: {loc}: {msg}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=5e-5` -> (["train", "lr"], 5e-05); the value is parsed as YAML (numbers, lists, bools)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. train.lr=5e-5")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply `--set` overrides in order; a numeric key indexes a list (`data.0.num_negatives=2`)."""
    for text in overrides or []:
        keys, value = parse_override(text)
        node: Any = data
        for depth, k in enumerate(keys):
            last = depth == len(keys) - 1
            if isinstance(node, list):
                if not k.lstrip("-").isdigit():
                    raise ConfigError(f"--set {text!r}: {'.'.join(keys[:depth]) or k!r} is a list; "
                                      f"index it with a number, e.g. {'.'.join(keys[:depth])}.0")
                index = int(k)
                if not -len(node) <= index < len(node):
                    raise ConfigError(f"--set {text!r}: index {index} out of range "
                                      f"({'.'.join(keys[:depth])} has {len(node)} item(s))")
                if last:
                    node[index] = value
                else:
                    node = node[index]
                continue
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: {'.'.join(keys[:depth])!r} is not a section")
            if last:
                node[k] = value
                continue
            if node.get(k) is None:
                node[k] = {}
            node = node[k]
    return data


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = str(path)
    if not os.path.exists(path):
        raise ConfigError(f"{path}: file not found")
    try:
        text = read_text_file(path)
    except InputError as exc:  # bad bytes, located by line
        raise ConfigError(str(exc)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        if isinstance(exc, yaml.reader.ReaderError):  # a control character: located by offset
            line = text.count("\n", 0, exc.position) + 1
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}{f':{line}' if line else ''}: invalid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def validate(model_cls: type[T], data: dict[str, Any], source: str = "config") -> T:
    """Build `model_cls` from a dict; errors list every bad key as `source: a.b.c: message`."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def load_config(model_cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> T:
    """YAML file (optional) + dict of defaults/flags + `--set` overrides -> a validated config."""
    data = dict(base or {})
    if path is not None:
        data = _deep_merge(load_yaml(path), data)
    data = apply_overrides(data, overrides)
    return validate(model_cls, data, source=str(path) if path else "config")


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """b wins; nested sections merge key by key."""
    out = dict(a)
    for key, value in b.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# --- command-line flags generated from a config model ---------------------------------------------
# A stage's options are declared once, on its config model; its CLI flags are derived from the fields,
# so a new option never needs a hand-written flag. Nested sections and dicts are set with
# `--set a.b=c` or a `--config` YAML file.

_NONE_WORDS = {"none", "null", "off"}


def _flag_kind(annotation: Any) -> tuple[str, Any]:
    """('bool' | 'scalar' | 'list' | 'skip', choices) for a field's annotation."""
    import types
    import typing

    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        if len(args) == 1:
            return _flag_kind(args[0])
        if all(a in (str, int, float) for a in args):
            return "scalar", None
        if any(typing.get_origin(a) is list for a in args):
            inner = next(a for a in args if typing.get_origin(a) is list)
            return _flag_kind(inner)
        return "skip", None
    if annotation is bool:
        return "bool", None
    if annotation in (str, int, float):
        return "scalar", None
    if origin is typing.Literal:
        return "scalar", [str(a) for a in typing.get_args(annotation)]
    if origin is list:
        (inner,) = typing.get_args(annotation) or (str,)
        kind, choices = _flag_kind(inner)
        return ("list", choices) if kind == "scalar" else ("skip", None)
    return "skip", None


def add_config_flags(parser, model_cls: type[BaseModel], *, required: tuple[str, ...] = (),
                     skip: tuple[str, ...] = (), config_file: bool = True) -> None:
    """One `--field-name` flag per scalar, literal, bool and list field of `model_cls`.

    Flags that are not given leave no trace (argparse.SUPPRESS), so the layering is always
    `--config` YAML < flags < `--set`. `none`/`null`/`off` set an optional field to null.
    """
    import argparse

    for name, field in model_cls.model_fields.items():
        if name in skip:
            continue
        kind, choices = _flag_kind(field.annotation)
        if kind == "skip":
            continue
        flag = "--" + name.replace("_", "-")
        text = (field.description or "").strip()
        if not field.is_required() and name not in required:
            default = field.get_default(call_default_factory=True)
            text = f"{text} (default: {default})" if text else f"default: {default}"
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": text}
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if choices:
            kwargs["choices"] = choices + sorted(_NONE_WORDS if _is_optional(field.annotation) else [])
            kwargs["metavar"] = "{" + ",".join(choices) + "}"
        if kind == "list":
            kwargs["nargs"] = "+"
        if name in required:
            kwargs["required"] = True
        parser.add_argument(flag, **kwargs)
    if config_file:
        parser.add_argument("--config", default=None, metavar="YAML", help="YAML file with the stage's settings")
        parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                            help="override any setting, nested ones too (a.b=c, data.0.path=x); repeatable")


def _is_optional(annotation: Any) -> bool:
    import typing

    return type(None) in typing.get_args(annotation)


def flags_given(model_cls: type[BaseModel], args: Any) -> dict[str, Any]:
    """The config keys the user gave as flags; `none`/`null`/`off` become None."""
    out: dict[str, Any] = {}
    for name in model_cls.model_fields:
        if not hasattr(args, name):
            continue
        value = getattr(args, name)
        if isinstance(value, str) and value.lower() in _NONE_WORDS:
            value = None
        out[name] = value
    return out


def config_from_args(model_cls: type[T], args: Any, *, extra: dict[str, Any] | None = None) -> T:
    """`--config` YAML < `extra` (values the command computed) < flags < `--set`, validated."""
    base = _deep_merge(extra or {}, flags_given(model_cls, args))
    return load_config(model_cls, getattr(args, "config", None), getattr(args, "overrides", None), base=base)
