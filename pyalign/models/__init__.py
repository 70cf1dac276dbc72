"""Models: loading, LoRA and merging, fingerprints, devices, and the fused lm_head glue.

- :mod:`pyalign.models.loading`: a model folder -> model and tokenizer (``load_model`` for training,
  ``load_model_and_tokenizer`` for inference), the dtype names;
- :mod:`pyalign.models.smollm2`: SmolLM2-135M-Instruct from its offline GGUF file, converted once;
- :mod:`pyalign.models.marker_tokens`: new special tokens with sensible embedding rows;
- :mod:`pyalign.models.lora`: peft LoRA, activation checkpointing, merging into an HF folder;
- :mod:`pyalign.models.fingerprint`: a model folder's identity (what caches key on);
- :mod:`pyalign.models.device`: the device a config names and bf16 autocast;
- :mod:`pyalign.models.fused_head`: sequence log-probs of a transformers causal LM through the
  fused lm_head (hidden states x lm_head weight, never the ``[B, T, V]`` logits) or its logits.
"""

from pyalign.models.device import autocast_context, resolve_device, uses_autocast
from pyalign.models.fingerprint import WEIGHT_SUFFIXES, model_fingerprint
from pyalign.models.fused_head import (
    FUSED_CHOICES, FusedHead, causal_lm_hidden_states, causal_lm_preference_loss, causal_lm_sequence_logprobs,
    fused_head_or_reason, policy_sequence_logprobs, response_token_counts, shift_labels,
)
from pyalign.models.loading import load_model, load_model_and_tokenizer, load_tokenizer, resolve_dtype
from pyalign.models.lora import apply_lora, enable_activation_checkpointing, save_merged_model, trainable_parameters
from pyalign.models.marker_tokens import add_marker_tokens
from pyalign.models.smollm2 import (
    INSTALL_HINT, SMOLLM2_CACHE_NAME, SMOLLM2_GGUF_FILE, SMOLLM2_PACKAGE, models_cache_dir, smollm2_gguf_file,
    smollm2_path,
)

__all__ = [
    "FUSED_CHOICES", "INSTALL_HINT", "SMOLLM2_CACHE_NAME", "SMOLLM2_GGUF_FILE", "SMOLLM2_PACKAGE", "WEIGHT_SUFFIXES", "FusedHead", "add_marker_tokens", "apply_lora",
    "autocast_context", "causal_lm_hidden_states", "causal_lm_preference_loss", "causal_lm_sequence_logprobs",
    "enable_activation_checkpointing", "fused_head_or_reason", "load_model", "load_model_and_tokenizer",
    "load_tokenizer", "model_fingerprint", "models_cache_dir", "policy_sequence_logprobs", "resolve_device",
    "resolve_dtype", "response_token_counts", "save_merged_model", "shift_labels", "smollm2_gguf_file",
    "smollm2_path", "trainable_parameters", "uses_autocast",
]
