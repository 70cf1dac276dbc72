"""Every causal-LM family of the installed transformers through the fused lm_head (issue 17).

For each type of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` a tiny random model is built from its config
class (``bench.model_coverage``: hidden 32, 2 layers, vocabulary 128, 4 experts, float32) and run
through ``causal_lm_token_logprobs(fused=True)`` where ``fused_head_or_reason`` accepts it, and
through its own logits: token log-probs and the gradients w.r.t. the lm_head weight and the last
hidden state must agree (1e-5), ignored labels and right padding included. A family is fused
exactly, refused with a reason, or not buildable from the generic small config (with the reason);
never wrong. The coverage table is printed (``python -m bench.model_coverage --write docs/models.md``
writes it to docs/models.md).
"""

from __future__ import annotations

import time

import pytest
import torch

pytest.importorskip("transformers")

from bench import model_coverage as coverage  # noqa: E402
from pyalign.models.head_recipes import op_takes_transform  # noqa: E402

# Refused for a reason of the model, not of pyalign: recorded here so that a change shows.
TRANSFORMED = {"gemma2", "gemma3_text", "cohere", "cohere2", "granite", "granitemoe"}


@pytest.fixture(scope="module")
def families():
    start = time.perf_counter()
    results = coverage.measure_all()
    return results, time.perf_counter() - start


def test_coverage_table(families, capsys):
    results, seconds = families
    with capsys.disabled():
        print(f"\n{coverage.text_table(results)}\n({seconds:.0f} s for {len(results)} types)")
    n = coverage.counts(results)
    assert n["types"] == len(coverage.causal_lm_types()) > 100
    assert n[coverage.FUSED] > n["before"]


def test_no_family_is_ever_wrong(families):
    wrong = [(f.model_type, f.detail) for f in families[0] if f.status == coverage.WRONG]
    assert not wrong


def test_widely_used_families_run_fused_and_exact(families):
    by_type = {f.model_type: f for f in families[0]}
    missing = set(coverage.WIDELY_USED) - set(by_type)
    assert not missing, f"not in this transformers' causal-LM registry: {missing}"
    expected = set(coverage.WIDELY_USED) - (set() if op_takes_transform() else TRANSFORMED)
    not_fused = {t: f"{by_type[t].status}: {by_type[t].detail}" for t in expected
                 if by_type[t].status != coverage.FUSED}
    assert not not_fused
    fused = sum(by_type[t].status == coverage.FUSED for t in coverage.WIDELY_USED)
    assert fused >= (30 if op_takes_transform() else 26)


def test_the_transform_is_read_from_the_model(families):
    """The transforms the check found are those the families' forwards apply at the small
    config's values (soft-cap 3, Granite's 1 / logits_scaling, Cohere's logit_scale)."""
    if not op_takes_transform():
        pytest.skip("this pyalign's fused op takes no logit_scale / softcap")
    by_type = {f.model_type: f for f in families[0]}
    assert by_type["gemma2"].detail == "soft-cap 3"
    assert by_type["gemma3_text"].detail == "soft-cap 3"
    assert by_type["granite"].detail == "scale 0.25"
    assert by_type["cohere"].detail == "scale 0.5"
    assert by_type["llama"].detail == "identity"


def test_every_refusal_names_its_reason(families):
    for f in families[0]:
        if f.status in (coverage.REFUSED, coverage.NOT_BUILDABLE):
            assert len(f.detail) > 10, (f.model_type, f.status, f.detail)


def test_a_padded_vocabulary_is_refused():
    """inkling returns ``logits[..., :unpadded_vocab_size]``: the fused op would normalise over the
    padded rows too, so the check refuses it (the returned shape differs from the lm_head's)."""
    family = coverage.measure("inkling_text", "InklingForCausalLM")
    if family.status == coverage.NOT_BUILDABLE:
        pytest.skip(family.detail)
    assert family.status == coverage.REFUSED and "sliced or reshaped after the lm_head" in family.detail


def test_the_threads_are_restored(families):
    assert torch.get_num_threads() >= 1  # measure_all ran with one thread and gave the setting back
