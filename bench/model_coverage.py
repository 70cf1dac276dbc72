"""Which causal-LM families of the installed transformers the fused lm_head computes exactly.

    python -m bench.model_coverage                       # the table on stdout
    python -m bench.model_coverage --write docs/models.md
    python -m bench.model_coverage --types llama,gemma2  # a few families

For every type of transformers' causal-LM registry (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``) a tiny
random model is built from its config class (:data:`SMALL`, a few per-family :data:`OVERRIDES`;
hidden 32, 2 layers, vocabulary 128, 4 experts), on the CPU in float32, and run both ways:
:func:`pyalign.models.fused_head.causal_lm_token_logprobs` with ``fused=True`` where
``fused_head_or_reason`` accepts the model, and the model's own logits through
``pyalign.token_logprobs``. Token log-probs (ignored labels and right padding included) and the
gradients w.r.t. the lm_head weight and the decoder's last hidden state must agree to 1e-5;
anything else is reported as WRONG (tests/test_model_families.py fails then). Each family ends
as "fused" (exact), "refused" (with ``fused_head_or_reason``'s reason) or "not buildable" (the
generic small config cannot build it: encoder-decoder, multimodal, missing packages; the reason).

"Before" is the rule this replaced (pyalign 0.2: a hand-kept list of 14 model types, refused when
one of three config fields was set): counted as the families it accepted whose identity fused path
(decoder alone, then the lm_head) is measured exact here.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import logging
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

VOCAB = 128
SMALL = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_layers=2, n_layer=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128, n_embd=32,
    n_head=4, d_model=32, ffn_hidden_size=64,
    # mixture of experts
    num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
    shared_expert_intermediate_size=32, n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=1,
    zero_expert_num=2,
    # multi-head latent attention, sparse-attention indexers, linear attention
    q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, qk_head_dim=8, v_head_dim=8,
    index_head_dim=8, index_topk=4, linear_head_dim=8, swa_head_dim=8,
    rotary_dim=4,
    # state-space layers
    mamba_n_heads=8, mamba_d_head=8, mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=8,
    # a padded vocabulary (inkling): the lm_head has more rows than the model returns
    unpadded_vocab_size=VOCAB - 8,
    shape_vocab_size=64, shape_embed_dim=16, pronunciation_vocab_size=32, pronunciation_embed_dim=16,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
    # logit transforms at values that matter for logits of a few units (set where the family has the field)
    final_logit_softcapping=3.0, logits_soft_cap=3.0, output_logit_soft_cap=3.0, logits_scaling=4.0,
    logit_scale=0.5, lm_head_multiplier=0.5, output_multiplier=0.5,
)
OVERRIDES = {
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], num_layers=2),
    "mamba2": dict(num_heads=8, head_dim=8, n_groups=1, state_size=8, chunk_size=8),
    "zaya": dict(num_experts_per_tok=1),
    "zamba": dict(attn_layer_period=2, attn_layer_offset=1, layers_block_type=["mamba", "hybrid"]),
    "zamba2": dict(layers_block_type=["mamba", "hybrid"]),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=1),
    "gemma3n_text": dict(num_kv_shared_layers=0, vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=8,
                         laurel_rank=8, altup_num_inputs=2),
    "falcon_h1": dict(mamba_d_head="auto", mamba_d_ssm=64, mamba_n_heads=8),
    "reformer": dict(is_decoder=True, axial_pos_shape=[8, 16], axial_pos_embds_dim=[16, 16],
                     attn_layers=["local", "lsh"], num_hidden_layers=2, hidden_size=32),
}
MAX_PARAMETERS = 4_000_000  # above this the generic small settings did not reach every size field
TOKENS = 10

# pyalign 0.2's rule, kept here only to measure "before": a hand-kept list of model types.
LEGACY_FUSED_MODEL_TYPES = {
    "llama", "mistral", "ministral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe",
    "phi3", "gemma", "smollm3", "olmo2", "starcoder2", "glm4",
}
LEGACY_FIELDS = ("final_logit_softcapping", "logit_scale", "logits_scaling")

# Widely used decoder families (issue 17): 11 ran fused under the list, 21 did not.
WIDELY_USED = {
    "llama": "Llama", "mistral": "Mistral", "mixtral": "Mixtral", "qwen2": "Qwen2", "qwen2_moe": "Qwen2-MoE",
    "qwen3": "Qwen3", "qwen3_moe": "Qwen3-MoE", "phi3": "Phi-3", "gemma": "Gemma", "olmo2": "OLMo 2",
    "starcoder2": "StarCoder2", "gemma2": "Gemma 2", "gemma3_text": "Gemma 3", "cohere": "Cohere",
    "cohere2": "Cohere 2", "granite": "Granite", "granitemoe": "Granite-MoE", "olmo3": "OLMo 3", "phi": "Phi",
    "gpt_neox": "GPT-NeoX", "stablelm": "StableLM", "falcon": "Falcon", "deepseek_v3": "DeepSeek-V3",
    "gpt_oss": "gpt-oss", "glm4_moe": "GLM-4-MoE", "exaone4": "EXAONE 4", "ernie4_5": "ERNIE 4.5",
    "seed_oss": "Seed-OSS", "apertus": "Apertus", "helium": "Helium", "qwen3_next": "Qwen3-Next",
    "llama4_text": "Llama 4",
}

FUSED, REFUSED, NOT_BUILDABLE, WRONG = "fused", "refused", "not buildable", "WRONG"


@dataclass
class Family:
    model_type: str
    class_name: str
    status: str
    detail: str = ""       # the transform (fused), the reason (refused, not buildable) or the errors (WRONG)
    legacy: bool = False   # the old list rule fused it, exactly
    seconds: float = 0.0


def causal_lm_types() -> list[tuple[str, str]]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # noqa: PLC0415

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items())


def _settable(config, name: str) -> bool:
    try:
        present = hasattr(config, name)
    except Exception:  # noqa: BLE001  (per-layer attributes raise their own error on a global read)
        return False
    prop = getattr(type(config), name, None)
    return present and not (isinstance(prop, property) and prop.fset is None)


@contextlib.contextmanager
def quiet():
    """transformers' and torch's warnings about tiny random configs say nothing here."""
    import transformers  # noqa: PLC0415

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)


def build(model_type: str, class_name: str, seed: int = 0):
    """``(model, "")`` in eval mode, or ``(None, reason)``."""
    import transformers  # noqa: PLC0415
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # noqa: PLC0415

    model_class = getattr(transformers, class_name, None)
    if model_class is None:
        return None, f"transformers has no {class_name}"
    try:
        config_class = CONFIG_MAPPING[model_type]
        default = config_class()
        if getattr(default, "is_encoder_decoder", False):
            return None, "encoder-decoder"
        settings = dict(SMALL)
        if _settable(default, "kv_lora_rank"):  # latent attention: one key/value head per query head,
            settings["num_key_value_heads"] = settings["num_attention_heads"]  # rotary on qk_rope_head_dim
            settings["head_dim"] = settings["qk_rope_head_dim"]
        settings.update(OVERRIDES.get(model_type, {}))
        config = config_class(**{k: v for k, v in settings.items()
                                 if k in OVERRIDES.get(model_type, {}) or _settable(default, k)})
        with torch.device("meta"):
            parameters = sum(p.numel() for p in model_class(config).parameters())
        if parameters > MAX_PARAMETERS:
            subs = sorted(getattr(config_class, "sub_configs", None) or {})
            why = f"sub-configs {', '.join(subs)}" if subs else "size fields the generic small settings do not set"
            return None, f"{parameters / 1e6:.0f}M parameters at the small settings ({why})"
        torch.manual_seed(seed)
        model = model_class(config).eval()
        with torch.no_grad():  # logits of a few units (past the soft-caps), not the init's ~0.1
            model.get_output_embeddings().weight.mul_(8.0)
        # The model's own forward on the comparison's batch (some families fail only there).
        input_ids, attention_mask, _, _ = batch()
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except Exception as err:  # noqa: BLE001  (any failure is this family's "not buildable" reason)
        message = " ".join(str(err).split())
        return None, f"{type(err).__name__}: {message[:160]}"
    return model, ""


def batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB - 8, (2, TOKENS), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -2:] = 0  # right padding
    labels = input_ids.clone()
    labels[:, :3] = -100        # the prompt
    labels[attention_mask == 0] = -100
    row_weights = torch.rand(2, TOKENS - 1, generator=gen) + 0.5
    return input_ids, attention_mask, labels, row_weights


def _hidden_leaves(decoder, head, leaf: dict):
    """Hooks making the decoder's last hidden state a leaf (its gradient is compared); where the
    model's forward calls a submodule of the decoder instead (OPT), the lm_head's input."""

    def on_decoder(module, args, output):
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        leaf["h"] = hidden.detach().requires_grad_(True)
        if hasattr(output, "last_hidden_state"):
            output.last_hidden_state = leaf["h"]
            return output
        return (leaf["h"], *output[1:])

    def on_head(module, args):
        if "h" in leaf:
            return None
        leaf["h"] = args[0].detach().requires_grad_(True)
        return (leaf["h"], *args[1:])

    return [decoder.register_forward_hook(on_decoder), head.register_forward_pre_hook(on_head)]


def run(model, decoder, how: str, data):
    """Token log-probs ``[B, T-1]`` and the gradients (lm_head weight, last hidden state) of their
    weighted sum; ``how``: "fused" (pyalign's path), "logits" (the model's own) or "legacy" (the
    old rule's computation: decoder alone, then the lm_head, no transform)."""
    from pyalign.models import fused_head as hf  # noqa: PLC0415
    from pyalign.ops.linear_token_logprobs import linear_token_logprobs  # noqa: PLC0415

    input_ids, attention_mask, labels, row_weights = data
    head = model.get_output_embeddings()
    leaf = {}
    model.zero_grad(set_to_none=True)
    # Not on the lm_head for pyalign's path: a hooked lm_head is (rightly) refused.
    handles = _hidden_leaves(decoder, torch.nn.Identity() if how == "fused" else head, leaf)
    try:
        if how == "legacy":
            hidden = hf.causal_lm_hidden_states(model, input_ids, attention_mask,
                                                head=hf.FusedHead(decoder, head.weight, head.bias))
            logps = linear_token_logprobs(hidden, head.weight, hf.shift_labels(labels), bias=head.bias)[:, :-1]
        else:
            logps = hf.causal_lm_token_logprobs(model, input_ids, attention_mask, labels, fused=how == "fused")
    finally:
        for handle in handles:
            handle.remove()
    (logps * row_weights).sum().backward()
    return logps.detach(), head.weight.grad, leaf["h"].grad


def differences(got, expected) -> list[str]:
    """What differs beyond float32 rounding: ``[]`` when the runs agree."""
    names = ("log-probs", "lm_head weight gradient", "hidden-state gradient")
    problems = []
    for name, a, b in zip(names, got, expected):
        if (a is None) != (b is None):
            problems.append(f"{name}: {'missing' if a is None else 'unexpected'}")
            continue
        if a is None:
            continue
        scale = max(1.0, b.abs().max().item())
        error = (a - b).abs().max().item()
        if a.shape != b.shape or error > 1e-5 * scale:
            problems.append(f"{name}: max error {error:.2e} (scale {scale:.2g})")
    return problems


def measure(model_type: str, class_name: str) -> Family:
    from pyalign.models import fused_head as hf  # noqa: PLC0415
    from pyalign.models.head_eligibility import decoder_of  # noqa: PLC0415

    start = time.perf_counter()
    with quiet():
        model, reason = build(model_type, class_name)
        if model is None:
            return Family(model_type, class_name, NOT_BUILDABLE, reason, seconds=time.perf_counter() - start)
        data = batch()
        head, reason = hf.fused_head_or_reason(model)
        decoder = decoder_of(model)
        expected = run(model, decoder, "logits", data) if decoder is not None else None
        legacy = False
        config = model.config
        if (model_type in LEGACY_FUSED_MODEL_TYPES and expected is not None
                and type(model.get_output_embeddings()) is torch.nn.Linear
                and all(getattr(config, name, None) in (None, 1, 1.0) for name in LEGACY_FIELDS)):
            legacy = not differences(run(model, decoder, "legacy", data), expected)
        if head is None:
            family = Family(model_type, class_name, REFUSED, reason, legacy)
        else:
            try:
                problems = differences(run(model, decoder, "fused", data), expected)
            except Exception as err:  # noqa: BLE001  (an accepted model must run: a failure is reported)
                problems = [f"the fused path raised {type(err).__name__}: {err}"]
            family = Family(model_type, class_name, WRONG if problems else FUSED,
                            "; ".join(problems) or str(head.transform), legacy)
    family.seconds = time.perf_counter() - start
    return family


def measure_all(types: list[str] | None = None, progress=None) -> list[Family]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add synchronisation
    logging.getLogger("pyalign.models.fused_head").setLevel(logging.ERROR)
    try:
        families = []
        for model_type, class_name in causal_lm_types():
            if types and model_type not in types:
                continue
            families.append(measure(model_type, class_name))
            if progress is not None:
                progress(families[-1])
        return families
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- the table


def counts(families: list[Family]) -> dict[str, int]:
    out = {status: sum(f.status == status for f in families) for status in (FUSED, REFUSED, NOT_BUILDABLE, WRONG)}
    out["types"] = len(families)
    out["before"] = sum(f.legacy for f in families)
    widely = [f for f in families if f.model_type in WIDELY_USED]
    out["widely used"] = len(widely)
    out["widely used fused"] = sum(f.status == FUSED for f in widely)
    out["widely used before"] = sum(f.legacy for f in widely)
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(families: list[Family], command: str) -> str:
    import transformers  # noqa: PLC0415

    from pyalign.models.head_recipes import op_takes_transform  # noqa: PLC0415

    n = counts(families)
    today = datetime.date.today().isoformat()
    caveat = "" if op_takes_transform() else (
        " (this pyalign's op took no logit_scale / softcap: scaled and soft-capped families are refused)")
    lines = [
        "# Models: which causal LMs the fused lm_head computes",
        "",
        f"Generated by `{command}` on {today}, transformers {transformers.__version__}, torch "
        f"{torch.__version__.split('+')[0]}{caveat}.",
        "",
        "pyalign decides from the model itself whether its fused lm_head computes exactly what the model's own",
        "logits give (`pyalign.models.head_eligibility`, docs/fused_linear.md): the lm_head must be a linear map",
        "whose weight pyalign can form (a `torch.nn.Linear`, or peft LoRA / `modules_to_save` / trainable tokens",
        "on one), and one check of the model's forward on a few tokens must show that its logits are",
        "`transform(lm_head(last hidden state))`, the transform a scale and/or a soft-cap its config names.",
        "Anything else is refused with the reason, and the model's own logits are used.",
        "",
        "Each family below is a tiny random model built from its config class (hidden 32, 2 layers, vocabulary",
        "128, 4 experts; `bench/model_coverage.py`), run through the fused path and through its own logits:",
        "token log-probs and the gradients w.r.t. the lm_head weight and the last hidden state agree to 1e-5",
        "(float32, ignored labels and padding included) for every family marked fused.",
        "`tests/test_model_families.py` runs the same comparison in `make test`. A transform in parentheses is",
        "the one the check found at the small config's values (soft-caps 3, `logits_scaling` 4, `logit_scale` 0.5);",
        "a real checkpoint's values are read the same way. \"Before\" is the rule this replaced: a hand-kept list",
        "of 14 model types (refused when one of three config fields was set), counted where its computation",
        "(decoder, then the lm_head, no transform) is measured exact here. \"Not buildable\" means the generic",
        "small config cannot build the family here (encoder-decoder, multimodal, a missing package): pyalign's",
        "check decides for such a model when it is used, as for any other.",
        "",
        "## Coverage",
        "",
        "| | families | fused exactly | refused (reason) | not buildable | wrong |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| causal-LM registry, now | {n['types']} | **{n[FUSED]}** | {n[REFUSED]} | {n[NOT_BUILDABLE]} | {n[WRONG]} |",
        f"| causal-LM registry, before (the list of 14 types) | {n['types']} | {n['before']} | | | |",
        f"| widely used decoder families (issue 17), now | {n['widely used']} | **{n['widely used fused']}** | | | |",
        f"| widely used decoder families, before | {n['widely used']} | {n['widely used before']} | | | |",
        "",
        "## Widely used decoder families",
        "",
        "| family | model type | now | before |",
        "| --- | --- | --- | --- |",
    ]
    by_type = {f.model_type: f for f in families}
    for model_type, name in WIDELY_USED.items():
        f = by_type.get(model_type)
        if f is None:
            continue
        lines.append(f"| {name} | `{model_type}` | {_result(f)} | {'fused' if f.legacy else '-'} |")
    lines += ["", "## Every causal-LM type of the registry", "",
              "| model type | class | result | before |", "| --- | --- | --- | --- |"]
    for f in families:
        lines.append(f"| `{f.model_type}` | {f.class_name} | {_result(f)} | {'fused' if f.legacy else '-'} |")
    return "\n".join(lines) + "\n"


def _result(f: Family) -> str:
    if f.status == FUSED:
        return "fused" + ("" if f.detail == "identity" else f" ({_cell(f.detail)})")
    return f"{f.status}: {_cell(f.detail)}"


def text_table(families: list[Family]) -> str:
    n = counts(families)
    rows = [f"{f.model_type:26s} {f.status:13s} {f.seconds:5.2f}s  {f.detail[:110]}" for f in families]
    rows.append(f"fused exactly {n[FUSED]} / refused {n[REFUSED]} / not buildable {n[NOT_BUILDABLE]} / wrong "
                f"{n[WRONG]} of {n['types']} types; before: {n['before']}; widely used: "
                f"{n['widely used fused']} of {n['widely used']} (before {n['widely used before']})")
    return "\n".join(rows)


def main(argv=None) -> list[Family]:
    parser = argparse.ArgumentParser(prog="python -m bench.model_coverage", description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", type=Path, help="write the markdown table to this file (docs/models.md)")
    parser.add_argument("--types", default="", help="comma-separated model types (default: the whole registry)")
    args = parser.parse_args(argv)
    types = [t for t in args.types.split(",") if t] or None
    families = measure_all(types, progress=lambda f: print(
        f"{f.model_type:26s} {f.status:13s} {f.seconds:5.2f}s  {f.detail[:110]}", flush=True))
    print(text_table(families).splitlines()[-1])
    if args.write:
        command = "python -m bench.model_coverage --write " + str(args.write)
        args.write.write_text(markdown(families, command), encoding="utf-8")
        print(f"wrote {args.write}")
    return families


if __name__ == "__main__":
    main(sys.argv[1:])
