"""What ``pyalign train CONFIG.yaml`` can run: a small registry of tasks.

A config's top-level ``task:`` names its task (default ``preference``). A task is a config
class (a :class:`~pyalign.train.config_fields.Section`: pydantic, every field checked, errors
naming the field), optional cross-field checks, and a runner. A module adds one by calling
:func:`register_task` when it is imported::

    from pyalign.train import (ModelConfig, PathValue, PositiveInt, Section, Task, TrainingConfig,
                               field, register_task, section)

    class MyConfig(Section):
        # (a class docstring here describes the config in its JSON Schema)

        model: ModelConfig = section(ModelConfig, "the starting model", required=True)
        output_dir: PathValue = field(doc="where everything goes")
        upto: PositiveInt = field(3, "how far to count")
        training: TrainingConfig = section(TrainingConfig, "optimisation")

    def run_mine(config, *, callback=None): ...

    register_task(Task("mine", MyConfig, run_mine, doc="what it trains"))

and by naming that module in :data:`TASK_MODULES`, so that loading a config with ``task: mine``
imports it (nothing else is imported until a task is asked for).
"""

from __future__ import annotations

import importlib
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable

import pydantic.json_schema

from pyalign.train.config import read_config_source
from pyalign.train.config_fields import ConfigError, Section, validate

DEFAULT_TASK = "preference"

# task name -> the module that registers it when imported
TASK_MODULES = {
    "preference": "pyalign.tasks.preference",
    "sft": "pyalign.tasks.sft",
    "reward_model": "pyalign.tasks.reward_model",
    "dpa": "pyalign.tasks.dpa",
}


@dataclass(frozen=True)
class Task:
    """``run(config, *, callback=None) -> result`` trains; ``check(config)`` raises ConfigError on
    values wrong together (each field is already checked alone); ``summary(result)`` gives the
    lines ``pyalign train`` prints at the end (the last one should name the main output)."""

    name: str
    config_class: type
    run: Callable[..., Any]
    check: Callable[[Any], None] | None = None
    summary: Callable[[Any], list[str]] | None = None
    doc: str = ""


_REGISTRY: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add ``task`` (re-registering the same name replaces it, e.g. on a module reload)."""
    if not isinstance(task, Task):
        raise ValueError(f"task: expected a pyalign.train.registry.Task, got {type(task).__name__}")
    _REGISTRY[task.name] = task
    return task


def _import_registering_module(name: str) -> None:
    module = TASK_MODULES.get(name)
    if module is None or name in _REGISTRY:
        return
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name != module:  # the module exists but something it imports does not
            raise
        return


def get_task(name: str) -> Task:
    if not isinstance(name, str):
        raise ConfigError(f"task: expected one of {', '.join(task_names())}, got {name!r}")
    _import_registering_module(name)
    if name not in _REGISTRY:
        known = ", ".join(task_names())
        if name in TASK_MODULES:
            raise ConfigError(f"task: {name!r} is provided by {TASK_MODULES[name]}, which is not "
                              f"installed in this copy of pyalign (available: {known})")
        raise ConfigError(f"task: expected one of {known}, got {name!r}")
    return _REGISTRY[name]


def task_names() -> list[str]:
    """Every task that can run here: the known modules that import, then any registered by hand."""
    for name in TASK_MODULES:
        _import_registering_module(name)
    return [n for n in TASK_MODULES if n in _REGISTRY] + sorted(set(_REGISTRY) - set(TASK_MODULES))


def task_of(config) -> Task:
    """The registered task whose config dataclass ``config`` is."""
    for task in _REGISTRY.values():
        if type(config) is task.config_class:
            return task
    raise ValueError(f"config: {type(config).__name__} is not the config of a registered task")


def load_config(source, task: str | None = None):
    """A YAML file path, a dict of the same shape, or a config object (returned as is).

    The top-level ``task:`` (default ``preference``) selects the task's config class and its
    cross-field checks from the registry; ``task`` overrides it."""
    if isinstance(source, Section):
        if task is not None and task_of(source).name != task:
            raise ConfigError(f"task: expected a {task} config, got a {task_of(source).name} one")
        return source
    data = read_config_source(source)
    name = data.pop("task", None)
    if task is not None:
        if name is not None and name != task:
            raise ConfigError(f"task: this runs {task!r}, the config says {name!r}")
        name = task
    spec = get_task(DEFAULT_TASK if name is None else name)
    config = validate(spec.config_class, data)
    if spec.check is not None:
        spec.check(config)
    return config


def config_to_dict(config) -> dict:
    """The resolved config as plain data, ``task`` first (loadable again by :func:`load_config`)."""
    return {"task": task_of(config).name, **config.model_dump(mode="json")}


def _sections_in(annotation) -> tuple[type[Section] | None, bool]:
    """The section class a field holds (directly, optionally, or as a list) and whether it is a list."""
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return annotation, False
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _sections_in(args[0])
    if origin is list and args:
        inner, _ = _sections_in(args[0])
        return inner, inner is not None
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            inner, is_list = _sections_in(arg)
            if inner is not None:
                return inner, is_list
    return None, False


def describe_config_class(cls: type[Section], prefix: str = "") -> list[str]:
    """One line per field of ``cls`` and its sections: name, default, meaning."""
    lines, nested = [], []
    for name, info in cls.model_fields.items():
        path = f"{prefix}{name}"
        inner, is_list = _sections_in(info.annotation)
        if inner is not None and (is_list or info.is_required() or info.default_factory is not None):
            nested.append((inner, f"{path}[]." if is_list else f"{path}."))
            continue
        default = "(required)" if info.is_required() else info.get_default(call_default_factory=True)
        lines.append(f"{path:34s} {default!s:22s} {info.description or ''}")
        if inner is not None:  # an optional section, off by default: its fields when given
            nested.append((inner, f"{path}."))
    for section_cls, section_prefix in nested:
        lines += describe_config_class(section_cls, section_prefix)
    return lines


def describe_fields(task: str | None = None) -> str:
    """The config reference as text, for ``pyalign config``: every registered task's fields
    (or one task's)."""
    names = [task] if task else task_names()
    blocks = []
    for name in names:
        spec = get_task(name)
        default = " (the default)" if name == DEFAULT_TASK else ""
        header = f"task: {name}{default} -- {spec.doc}"
        blocks.append("\n".join([header, "-" * min(len(header), 100), *describe_config_class(spec.config_class)]))
    return "\n\n".join(blocks)


def config_schema(task: str | None = None) -> dict:
    """The JSON Schema of a config file, for editors (``pyalign config --schema``): one task's,
    or, without ``task``, every task's, chosen by the file's ``task:`` (absent: the default)."""
    names = [task] if task else task_names()
    specs = [get_task(name) for name in names]
    _, definitions = pydantic.json_schema.models_json_schema(
        [(spec.config_class, "validation") for spec in specs], ref_template="#/$defs/{model}")
    defs = definitions.get("$defs", {})
    alternatives = []
    for spec in specs:
        schema = dict(defs.pop(spec.config_class.__name__))
        task_field = {"const": spec.name, "description": f"the task: {spec.doc}"}
        schema["properties"] = {"task": task_field, **schema["properties"]}
        if spec.name != DEFAULT_TASK:
            schema["required"] = ["task", *schema.get("required", [])]
        alternatives.append(schema)
    schema = alternatives[0] if len(alternatives) == 1 else {"oneOf": alternatives}
    title = f"pyalign config (task: {task})" if task else "pyalign config"
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema, "title": title,
            **({"$defs": defs} if defs else {})}
