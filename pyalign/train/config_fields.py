"""The pieces every pyalign config is built from, on pydantic v2: checked field types, sections,
and the one error a config raises.

A config is a tree of :class:`Section` models (a pydantic ``BaseModel``): each field has a type
from here (or any pydantic type) and a one-line ``doc``, a nested section is a field whose type is
a :class:`Section`. What users see is pydantic's validation with pyalign's messages:

- every error is a :class:`ConfigError` naming the field by its path, list items by index:
  ``training.lr: expected a positive float, got -1``, ``rounds[0].name: ...`` (the first error,
  in field order; unknown fields are reported before values);
- unknown fields are refused by name, with the known ones listed;
- floats accept YAML strings such as ``1e-5`` (YAML 1.1 reads that as a string; ``1.0e-5`` is a
  float); integers and booleans are strict (``2.0``, ``"2"`` and ``yes`` are refused);
- a section left out of the file gets its defaults, unless it is required;
- paths are resolved against the working directory when the config is read, stored absolute.

Each field type pairs pydantic's constraints (so the JSON Schema of ``pyalign config --schema``
carries them) with :func:`expect`, which turns any failure of the value itself into
``expected <what>, got <value>``; items of a list keep their own index and message.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel, BeforeValidator, ConfigDict, Field, Strict, TypeAdapter, ValidationError, WithJsonSchema,
    WrapValidator, model_validator,
)
from pydantic_core import PydanticCustomError


class ConfigError(ValueError):
    """A config value is wrong; the message starts with the field's path."""


# ----------------------------------------------------------------------------- errors

# A check written for a path (``check(path, value)``, as CLI options and data sources use) runs
# inside a field with this stand-in for the path; what its message puts after it (``.dimension``,
# ``[1]``) is the location inside the field.
_HERE = "\x00"


def expected_error(expected: str, value: Any, where: str = "") -> PydanticCustomError:
    return PydanticCustomError("pyalign", "{message}", {"message": f"expected {expected}, got {value!r}",
                                                        "where": where})


def expect(expected: str) -> WrapValidator:
    """Any failure of the value itself reads ``expected <expected>, got <value>``; errors of list
    items or section fields pass through with their own location."""
    def validate(value, handler):
        try:
            return handler(value)
        except ValidationError as error:
            if any(item["loc"] for item in error.errors()):
                raise
            raise expected_error(expected, value) from None
    return WrapValidator(validate)


def checked(check: Callable[[str, Any], Any]) -> BeforeValidator:
    """A validator from ``check(path, value) -> value`` that raises ``ValueError("<path>...: message")``
    (data sources, objective names, CLI values: checks that also run outside a config)."""
    def validate(value):
        try:
            return check(_HERE, value)
        except ValueError as error:
            text = str(error)
            if not text.startswith(_HERE):
                raise PydanticCustomError("pyalign", "{message}", {"message": text, "where": ""}) from None
            where, _, message = text[len(_HERE):].partition(": ")
            raise PydanticCustomError("pyalign", "{message}", {"message": message, "where": where}) from None
    return BeforeValidator(validate)


def location(loc: Sequence[str | int], prefix: str = "") -> str:
    """``("rounds", 0, "name")`` -> ``rounds[0].name``."""
    text = prefix
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text.lstrip(".")


def config_error(error: ValidationError, prefix: str = "") -> ConfigError:
    """The first error of a pydantic validation, as pyalign reports it."""
    first = error.errors(include_url=False)[0]
    context = first.get("ctx") or {}
    where = location(first["loc"], prefix) + context.get("where", "")
    message = context.get("message") or {
        "missing": "required field is missing",
    }.get(first["type"], first["msg"])
    return ConfigError(f"{where.lstrip('.') or 'config'}: {message}")


def validate(model: type[BaseModel], data: Any, prefix: str = "") -> BaseModel:
    """``model`` from ``data``, or a :class:`ConfigError` naming the field (paths start with
    ``prefix``, e.g. ``method.adaptive_alpha``)."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise config_error(error, prefix) from None


def check_value(kind: Any, value: Any, name: str) -> Any:
    """``value`` checked and normalised as a field of type ``kind`` would be, errors naming
    ``name`` (a CLI option, e.g. ``--num-threads: expected a positive integer, got 0``)."""
    try:
        return TypeAdapter(kind).validate_python(value)
    except ValidationError as error:
        raise config_error(error, name) from None


# ----------------------------------------------------------------------------- sections

class Section(BaseModel):
    """A config section: fields with defaults and docs, unknown fields refused by name. Its
    class docstring is the section's description in ``pyalign config --schema``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=False)

    @model_validator(mode="before")
    @classmethod
    def _a_mapping_of_known_fields(cls, data: Any) -> Any:
        if isinstance(data, BaseModel):
            return data
        if data is None:  # ``section: null`` in YAML: the section's defaults, as when left out
            return {}
        if not isinstance(data, dict):
            raise expected_error("a mapping of fields", data)
        for key in data:
            if key not in cls.model_fields:
                raise PydanticCustomError("pyalign", "{message}", {
                    "message": f"unknown field (known: {', '.join(cls.model_fields)})", "where": f".{key}"})
        return data


def field(default: Any = ..., doc: str = "", **kwargs) -> Any:
    """A field with its default (``...``: required) and one-line documentation (pydantic copies a
    list default for each config)."""
    return Field(default, description=doc, **kwargs)


def section(cls: type[Section], doc: str = "", *, required: bool = False) -> Any:
    """A field holding the section ``cls``: its own defaults when the config leaves it out (or
    says ``null``), unless ``required``."""
    if required:
        return Field(..., description=doc)
    return Field(default_factory=cls, description=doc)


# ----------------------------------------------------------------------------- field types

def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):  # True would pass as 1 / 1.0
        raise ValueError("a boolean")
    return value


def float_type(expected: str, **bounds) -> Any:
    """A finite float within ``bounds`` (pydantic's gt/ge/lt/le); a YAML string like ``1e-5`` is
    read as its number, a boolean is refused."""
    return Annotated[float, Field(allow_inf_nan=False, **bounds), BeforeValidator(_not_bool), expect(expected)]


def int_type(expected: str, **bounds) -> Any:
    """A strict integer within ``bounds`` (``2.0``, ``"2"`` and booleans are refused)."""
    return Annotated[int, Strict(), Field(**bounds), expect(expected)]


PositiveFloat = float_type("a positive float", gt=0)
NonNegativeFloat = float_type("a non-negative float", ge=0)
Fraction = float_type("a float in [0, 1)", ge=0, lt=1)  # e.g. warm-up ratio, dropout
UnitInterval = float_type("a float in [0, 1]", ge=0, le=1)
Integer = int_type("an integer")
# torch, numpy and Python's random all take seeds of 32 bits; the trainer derives others from it
Seed = int_type("an integer in [0, 2**32)", ge=0, lt=2**32)
PositiveInt = int_type("a positive integer", gt=0)
NonNegativeInt = int_type("a non-negative integer", ge=0)
Boolean = Annotated[bool, Strict(), expect("true or false")]
String = Annotated[str, Strict(), expect("a string")]
Text = Annotated[str, Strict(), Field(pattern=r"\S"), expect("a non-empty string")]


def one_of(*options: Any) -> Any:
    """One of ``options`` (strings, or also booleans), e.g. ``one_of("linear", "cosine")``."""
    names = ", ".join(str(o).lower() if isinstance(o, bool) else str(o) for o in options)
    return Annotated[Literal[options], expect(f"one of {names}")]


def non_empty_list(item: Any, expected: str = "a non-empty list") -> Any:
    return Annotated[list[item], Field(min_length=1), expect(expected)]


def one_or_list(item: Any) -> Any:
    """One value for all, or a list of them (each item checked with its index)."""
    one, many = TypeAdapter(item), TypeAdapter(list[item])

    def validate(value):
        return many.validate_python(value) if isinstance(value, (list, tuple)) else one.validate_python(value)
    return Annotated[Any, BeforeValidator(validate), WithJsonSchema({"anyOf": [one.json_schema(), many.json_schema()]})]


def _path(path: str, value: Any) -> str:
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise ValueError(f"{path}: expected a path, got {value!r}")
    return str(Path(value).expanduser().resolve())


PathValue = Annotated[str, checked(_path), WithJsonSchema({"type": "string", "description": "a file or folder path"})]


def _device(path: str, value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise ValueError(f"{path}: expected auto, cpu, cuda or cuda:N, got {value!r}")
    return value


DeviceName = Annotated[str, checked(_device), WithJsonSchema({"type": "string", "pattern": r"^(auto|cpu|cuda(:\d+)?)$"})]


FusedChoice = Annotated[Literal["auto", True, False], expect("auto, true or false")]


def _target_modules(path: str, value: Any) -> Any:
    if value == "all-linear":
        return value
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{path}: expected a non-empty list of module names, or all-linear, got {value!r}")
    for i, name in enumerate(value):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{path}[{i}]: expected a non-empty string, got {name!r}")
    return list(value)


TargetModules = Annotated[Any, checked(_target_modules), WithJsonSchema({"anyOf": [
    {"const": "all-linear"}, {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1}]})]


def path_value(path: str, value: Any) -> str:
    """``value`` as an absolute path, errors naming ``path`` (CLI options)."""
    return check_value(PathValue, value, path)


def positive_int(path: str, value: Any) -> int:
    return check_value(PositiveInt, value, path)


def device_name(path: str, value: Any) -> str:
    return check_value(DeviceName, value, path)

