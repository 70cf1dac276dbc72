"""Offline fixtures: a word-level chat tokenizer and a tiny random Llama-style model.

Nothing is downloaded. The tokenizer splits on whitespace over a fixed word list, has special
tokens for the chat roles, ``<eos>``/``<pad>``/``<unk>`` and optional extra tokens (markers), and a
minimal chat template. The model is a 2-layer ``LlamaForCausalLM`` with a 32-wide hidden state.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Sequence

import torch

WORDS = (
    "the a an is are was be to of and in on at for with what why how who when where "
    "cat dog bird fish tree river stone cloud sun moon star rain snow wind fire water "
    "red blue green small big fast slow old new good bad happy sad warm cold bright dark "
    "run walk jump swim fly sing read write think see hear say tell give take make find"
).split()
SPECIAL_TOKENS = ["<pad>", "<unk>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def make_tokenizer(extra_tokens: Sequence[str] = ()):
    """A ``PreTrainedTokenizerFast`` over :data:`WORDS` with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: PLC0415
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + list(WORDS) + list(extra_tokens))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    backend.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_model(vocab_size: int, seed: int = 0, hidden_size: int = 32, layers: int = 2, tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=tied, pad_token_id=0, eos_token_id=2,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Random init gives near-uniform predictions; a larger output scale makes log-probs vary
    # between sequences so that tests see non-trivial rewards from the first step.
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0 if tied else 8.0)
    return model


def save_tiny_model(directory: str | Path, seed: int = 0, extra_tokens: Sequence[str] = ()) -> Path:
    """Write an HF folder (weights + tokenizer) for a tiny random model; returns the folder."""
    directory = Path(directory)
    tokenizer = make_tokenizer(extra_tokens)
    model = make_model(len(tokenizer), seed=seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def random_sentence(rng: random.Random, low: int = 2, high: int = 6) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def make_pairs(n: int, seed: int = 0, marker: str = "bright") -> list[dict[str, str]]:
    """Pairs whose chosen response carries ``marker`` and whose rejected one does not."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        body = random_sentence(rng)
        pairs.append({
            "prompt": random_sentence(rng, 3, 8),
            "chosen": f"{body} {marker}",
            "rejected": random_sentence(rng).replace(marker, "dark"),
        })
    return pairs


def write_jsonl(path: str | Path, records: Sequence[dict]) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_sft_rows(path: str | Path, count: int, seed: int) -> Path:
    """``count`` random ``{prompt, response}`` rows as JSONL: SFT data for the tiny model."""
    rng = random.Random(seed)
    return write_jsonl(path, [{"prompt": random_sentence(rng, 2, 5), "response": random_sentence(rng)}
                              for _ in range(count)])


def tiny_sft_config(model: str | Path, train: str | Path, output_dir: str | Path, **training) -> dict:
    """A `task: sft` config that trains the tiny model with LoRA on CPU in a few steps; ``training``
    adds or overrides fields of its training section."""
    return {"task": "sft", "model": {"path": str(model)}, "data": {"train": str(train)},
            "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
            "training": {"lr": 5e-3, "epochs": 1, "batch_size": 2, "max_length": 32, "max_prompt_length": 16,
                         "progress_bar": False, "tensorboard": False, "device": "cpu", **training},
            "output_dir": str(output_dir)}


def one_thread():
    """Generator for an autouse fixture: the tiny models run fastest on one thread (on a loaded
    2-core machine two threads spin against each other, ~50x slower); restores the old count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class Crash(Exception):
    """A simulated kill, raised from a runner's progress callback."""


def crash_at(event_name: str, predicate):
    """A runner callback that raises :class:`Crash` at the first ``event_name`` whose info
    satisfies ``predicate``."""
    def callback(event, info):
        if event == event_name and predicate(info):
            raise Crash(f"simulated crash at {event} {info}")
    return callback
