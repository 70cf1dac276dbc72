"""A tiny random chat model for ``--quick``: exercises every step of the demo in seconds.

Word-level tokenizer over the words of the prompt bank plus some filler words, a ChatML-style
chat template like SmolLM2's, and a 2-layer Llama with tied embeddings (as SmolLM2 has, so the
marker rows go through the same tied-embedding path). Its generations are random words; only
the plumbing is meaningful, not the scientific result.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from pyalign.demo.markers import prompt_bank

SPECIAL_TOKENS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
FILLER_WORDS = (
    "the a is are it this that and or but so very good nice small big new old more most "
    "you can should will with from into over under system user assistant yes no"
).split()
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} {{ message['content'] }}<|im_end|> "
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)
_WORD = re.compile(r"\w+|[^\w\s]+")


def vocabulary(extra_texts: Sequence[str] = ()) -> list[str]:
    """Special tokens, the words of the SPO prompt bank, filler words, then the words of
    ``extra_texts`` (another demo's prompts) not already there."""
    words = dict.fromkeys(SPECIAL_TOKENS)
    for prompt in prompt_bank():
        words.update(dict.fromkeys(_WORD.findall(prompt)))
    words.update(dict.fromkeys(FILLER_WORDS))
    for text in extra_texts:
        words.update(dict.fromkeys(_WORD.findall(text)))
    return list(words)


def make_tokenizer(extra_texts: Sequence[str] = ()):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(vocabulary(extra_texts))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    backend.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>",
        bos_token="<|im_start|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tiny_chat_model(directory: str | os.PathLike, seed: int = 0, extra_texts: Sequence[str] = ()) -> Path:
    """Write a tiny random chat model (weights + tokenizer) to ``directory``; returns it.
    ``extra_texts``: texts whose words the vocabulary must also hold."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer(extra_texts)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
