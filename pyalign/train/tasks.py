"""What ``pyalign train CONFIG.yaml`` can run: a small registry of tasks.

A config's top-level ``task:`` names its task (default ``preference``). A task is a config
dataclass (built and checked field by field by :mod:`pyalign.train.config`), optional cross-field
checks, and a runner. A module adds one by calling :func:`register_task` when it is imported::

    from pyalign.train.config import ModelConfig, LoraConfig, TrainingConfig, _field, path_value, section
    from pyalign.train.tasks import Task, register_task

    @dataclass
    class MyConfig:
        model: ModelConfig = section(ModelConfig, "the starting model", required=True)
        output_dir: str = _field(check=path_value, doc="where everything goes")
        training: TrainingConfig = section(TrainingConfig, "optimisation")

    def run_mine(config, *, callback=None): ...

    register_task(Task("mine", MyConfig, run_mine, doc="what it trains"))

and by naming that module in :data:`TASK_MODULES`, so that loading a config with ``task: mine``
imports it (nothing else is imported until a task is asked for).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

DEFAULT_TASK = "preference"

# task name -> the module that registers it when imported
TASK_MODULES = {
    "preference": "pyalign.train.sequential",
    "sft": "pyalign.train.sft",
    "reward_model": "pyalign.reward_model",
    "dpa": "pyalign.train.dpa",
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
        raise ValueError(f"task: expected a pyalign.train.tasks.Task, got {type(task).__name__}")
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
    from pyalign.train.config import ConfigError  # noqa: PLC0415

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
