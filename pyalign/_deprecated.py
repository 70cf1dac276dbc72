"""Import paths that moved in pyalign 0.2 (docs/DESIGN.md, "Where to find what"), kept for one
release with a DeprecationWarning.

- :data:`MOVED_MODULES`: an old module path -> the module that replaced it. No file stays at the
  old path: :class:`MovedModuleFinder` (installed on ``sys.meta_path`` by ``import pyalign``,
  after the ordinary finders) answers for it, warns, and hands back the new module itself
  (``sys.modules`` holds it under both names), so every attribute, private or not, and every
  monkeypatch is shared; ``python -m <old path>`` runs the new module.
- :data:`MOVED_NAMES`: ``(module, name)`` -> the module that holds the name now, for modules
  that still exist but lost names; the module's ``__getattr__`` calls :func:`moved_attribute`.

tests/test_layers.py imports every entry of both tables and checks the warning and the object.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

REMOVED_IN = "0.3"

MOVED_MODULES = {
    "pyalign.preference_loss": "pyalign.losses.preference_loss",
    "pyalign.ops.linear_preference_loss": "pyalign.losses.linear_preference_loss",
    "pyalign.integrations.hf": "pyalign.models.fused_head",
    "pyalign.generation_hf": "pyalign.generation.hf",
    "pyalign.generation_vllm": "pyalign.generation.vllm",
    "pyalign.generation_measure": "pyalign.generation.measure",
    "pyalign.train.modeling": "pyalign.models",
    "pyalign.train.tasks": "pyalign.train.registry",
    "pyalign.train.sequential": "pyalign.tasks.preference.rounds",
    "pyalign.train.adaptive_alpha": "pyalign.tasks.preference.adaptive_alpha",
    "pyalign.train.evaluate": "pyalign.tasks.preference.evaluate",
    "pyalign.train.sft": "pyalign.tasks.sft.run",
    "pyalign.train.sft_data": "pyalign.tasks.sft.data",
    "pyalign.train.dpa": "pyalign.tasks.dpa.loop",
    "pyalign.train.dpa_config": "pyalign.tasks.dpa.config",
    "pyalign.train.dpa_data": "pyalign.tasks.dpa.data",
    "pyalign.train.dpa_eval": "pyalign.tasks.dpa.evaluate",
    "pyalign.reward_model.task": "pyalign.tasks.reward_model.run",
}

_TRAIN_CONFIG_TO_PREFERENCE = ("LOSSES", "SMOOTHED_LOSSES", "MethodConfig", "RoundConfig", "SequentialConfig",
                               "check_sequential")
_TRAIN_CONFIG_TO_REGISTRY = ("load_config", "config_to_dict", "describe_fields", "describe_config_class")

MOVED_NAMES = {
    **{("pyalign.train", name): "pyalign.tasks.preference" for name in (
        "SequentialConfig", "SequentialResult", "run_sequential")},
    **{("pyalign.train", name): "pyalign.tasks.sft" for name in ("SFTConfig", "SFTResult", "run_sft")},
    **{("pyalign.train.config", name): "pyalign.tasks.preference.config" for name in _TRAIN_CONFIG_TO_PREFERENCE},
    **{("pyalign.train.config", name): "pyalign.train.registry" for name in _TRAIN_CONFIG_TO_REGISTRY},
    **{("pyalign.reward_model", name): "pyalign.tasks.reward_model" for name in (
        "RewardRegressionObjective", "RewardModelConfig", "RewardModelResult", "run_reward_model")},
}


def _warn(old: str, new: str, *, stacklevel: int = 3) -> None:
    # The default stacklevel points past this function and its caller at the importing code;
    # the import machinery's own frames are skipped by the warnings module.
    warnings.warn(f"{old} moved to {new}; the old path is removed in pyalign {REMOVED_IN}",
                  DeprecationWarning, stacklevel=stacklevel)


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old paths of :data:`MOVED_MODULES` (only those) and loads them as their new module."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = MOVED_MODULES[spec.name]
        _warn(spec.name, new, stacklevel=4)
        return importlib.import_module(new)

    def exec_module(self, module):
        """The new module ran when it was imported."""

    def get_code(self, fullname):
        """``python -m <old path>``: the new module's code (runpy asks for it)."""
        new = MOVED_MODULES[fullname]
        _warn(fullname, new, stacklevel=4)
        return importlib.util.find_spec(new).loader.get_code(new)


def install() -> None:
    """Put the finder on ``sys.meta_path`` once (after the finders of real modules)."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())


def moved_attribute(module: str, name: str):
    """The value of ``module.name`` after it moved (for a module's ``__getattr__``)."""
    new = MOVED_NAMES.get((module, name))
    if new is None:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    _warn(f"{module}.{name}", f"{new}.{name}")
    return getattr(importlib.import_module(new), name)
