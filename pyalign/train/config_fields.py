"""Building blocks of configs: ConfigError, field checks, sections."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import field
from pathlib import Path
from typing import Any, Callable


class ConfigError(ValueError):
    """A config value is wrong; the message starts with the field's path."""


def _fail(path: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"{path}: expected {expected}, got {value!r}")


def _number(path: str, value: Any, expected: str) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise _fail(path, expected, value) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(path, expected, value)
    return float(value)


def positive_float(path, value):
    number = _number(path, value, "a positive float")
    if number <= 0:
        raise _fail(path, "a positive float", value)
    return number


def non_negative_float(path, value):
    number = _number(path, value, "a non-negative float")
    if number < 0:
        raise _fail(path, "a non-negative float", value)
    return number


def fraction(path, value):
    """A float in [0, 1)."""
    number = _number(path, value, "a float in [0, 1)")
    if not 0 <= number < 1:
        raise _fail(path, "a float in [0, 1)", value)
    return number


def unit_interval(path, value):
    """A float in [0, 1]."""
    number = _number(path, value, "a float in [0, 1]")
    if not 0 <= number <= 1:
        raise _fail(path, "a float in [0, 1]", value)
    return number


def integer(path, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(path, "an integer", value)
    return value


def positive_int(path, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _fail(path, "a positive integer", value)
    return value


def non_negative_int(path, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(path, "a non-negative integer", value)
    return value


def boolean(path, value):
    if not isinstance(value, bool):
        raise _fail(path, "true or false", value)
    return value


def choice(*options: str) -> Callable:
    def check(path, value):
        if value not in options:
            raise _fail(path, "one of " + ", ".join(options), value)
        return value
    return check


def fused_choice(path, value):
    if value not in ("auto", True, False):
        raise _fail(path, "auto, true or false", value)
    return value


def text(path, value):
    if not isinstance(value, str) or not value.strip():
        raise _fail(path, "a non-empty string", value)
    return value


def path_value(path, value):
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise _fail(path, "a path", value)
    return str(Path(value).expanduser().resolve())


def optional(check: Callable) -> Callable:
    def check_optional(path, value):
        return None if value is None else check(path, value)
    return check_optional


def list_of(check: Callable, *, non_empty: bool = True) -> Callable:
    def check_list(path, value):
        if not isinstance(value, (list, tuple)) or (non_empty and not value):
            raise _fail(path, "a non-empty list" if non_empty else "a list", value)
        return [check(f"{path}[{i}]", item) for i, item in enumerate(value)]
    return check_list


def device_name(path, value):
    if not isinstance(value, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise _fail(path, "auto, cpu, cuda or cuda:N", value)
    return value


def target_modules(path, value):
    if value == "all-linear":
        return value
    return list_of(text)(path, value)


def _field(default=dataclasses.MISSING, check: Callable = None, doc: str = "", **metadata):
    """A dataclass field with its check and one-line documentation."""
    kwargs = {"metadata": {"check": check, "doc": doc, **metadata}}
    if isinstance(default, type):  # a section: its own defaults
        kwargs["default_factory"] = default
    elif isinstance(default, list):
        kwargs["default_factory"] = lambda d=default: list(d)
    elif default is not dataclasses.MISSING:
        kwargs["default"] = default
    return field(**kwargs)


def section(cls, doc: str = "", *, required: bool = False):
    """A field holding the nested dataclass ``cls`` (built from its own defaults when the
    config leaves it out, unless ``required``)."""
    def check(path, value):
        return _build(cls, {} if value is None else value, path)
    return _field(dataclasses.MISSING if required else cls, check, doc, section=cls)


def section_list(cls, doc: str = ""):
    """A required, non-empty list of ``cls`` dataclasses (e.g. ``rounds``)."""
    def check(path, value):
        if not isinstance(value, list) or not value:
            names = ", ".join(f.name for f in dataclasses.fields(cls))
            raise _fail(path, f"a non-empty list of {{{names}}}", value)
        return [_build(cls, item, f"{path}[{i}]") for i, item in enumerate(value)]
    return _field(check=check, doc=doc, items=cls)


def _build(cls, data: Any, path: str):
    """Instantiate dataclass ``cls`` from ``data`` checking every field; ``path`` prefixes errors."""
    if not isinstance(data, dict):
        raise _fail(path or "config", "a mapping of fields", data)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise ConfigError(f"{path}.{key}: unknown field (known: {', '.join(fields)})".lstrip("."))
    values = {}
    for name, spec in fields.items():
        where = f"{path}.{name}".lstrip(".")
        if name not in data:
            if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}: required field is missing")
            continue
        check = spec.metadata.get("check")
        values[name] = check(where, data[name]) if check else data[name]
    return cls(**values)
