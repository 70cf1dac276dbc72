"""The fused lm_head under FSDP2 (SPEC 3.9), with two real gloo processes on the CPU.

- the vocabulary-parallel op alone (``pyalign.ops.vocab_parallel_logprobs``): values and gradients
  (hidden states, the weight's rows of every process put together, bias) against the float64
  reference and the unsharded fused op, in float64 and float32, for a weight given as plain local
  rows or as a DTensor, an odd vocabulary (uneven shards), a vocabulary smaller than the number of
  processes (an empty shard), ignored labels, and a process whose tokens are all ignored;
- bad use: a clear ValueError on *every* process (never one process waiting in a collective);
- a frozen weight (LoRA): the forward forms the hidden gradient and keeps nothing else;
- a tiny Llama under ``fully_shard`` (each decoder layer and the root; the lm_head in the root's
  group, in its own group, grouped with the final norm; tied and untied embeddings; LoRA on top;
  FSDP told to sum instead of average; HSDP's 2-D mesh): sequence log-probs, the DPO loss and the
  gathered gradients of the lm_head, embedding, final norm and a layer against the same model
  unsharded, for ``sharded_head`` "gather", "vocab_parallel" and "auto", with which way each call
  went (vocabulary-parallel op called or not, the lm_head's own FSDP group all-gathered or not);
- ``python -m bench.sharded_head`` at a tiny size.

Each test spawns its two processes with a join deadline and fails, naming the scenario, if they do
not finish (a collective waiting forever); inside, gloo's own timeout backs that up.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pyalign.ops.linear_token_logprobs import linear_token_logprobs
from pyalign.reference import IGNORE_INDEX, reference_token_logprobs

WORLD = 2
JOIN_TIMEOUT_S = 150  # a hang guard: every test here takes a fraction of that (2 cores, shared)
COLLECTIVE_TIMEOUT_S = 60
HIDDEN = 16
sys.path.insert(0, str(Path(__file__).resolve().parent))  # helpers_tiny_lm, in the spawned processes too

from helpers_processes import run_gloo  # noqa: E402


def run_two(tmp_path, scenario: str, *args) -> list:
    """``SCENARIOS[scenario](rank, *args)`` in two gloo processes; their results, by rank."""
    return run_gloo(tmp_path, SCENARIOS[scenario], *args, world=WORLD, join_timeout_s=JOIN_TIMEOUT_S,
                    collective_timeout_s=COLLECTIVE_TIMEOUT_S)


# ----------------------------------------------------------------------------- the op alone


def op_inputs(dtype: torch.dtype, vocab: int, idle_rank: bool, seed: int = 0):
    """Every process's inputs (the same on all of them and in the test): weight [V, H], bias [V],
    hidden [2, 5, H] and labels [2, 5] per rank, upstream gradients; rank 0 has ignored labels, and
    with ``idle_rank`` every label of rank 1 is ignored."""
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(vocab, HIDDEN, generator=gen, dtype=torch.float64) * 0.7).to(dtype)
    bias = torch.randn(vocab, generator=gen, dtype=torch.float64).to(dtype)
    hidden = [torch.randn(2, 5, HIDDEN, generator=gen, dtype=torch.float64).to(dtype) for _ in range(WORLD)]
    labels = [torch.randint(0, vocab, (2, 5), generator=gen) for _ in range(WORLD)]
    labels[0][0, :2] = IGNORE_INDEX
    labels[0][1, 4] = IGNORE_INDEX
    if idle_rank:
        labels[1][:] = IGNORE_INDEX
    grads = [torch.randn(2, 5, generator=gen, dtype=torch.float64) for _ in range(WORLD)]
    return weight, bias, hidden, labels, grads


OP_CASES = [  # (dtype, vocab, weight kind, bias, idle rank, weight_grad_scale, frozen weight, mode)
    (torch.float64, 37, "plain", True, False, 1.0, False, "default"),
    (torch.float64, 37, "dtensor", False, True, 1.0, False, "default"),
    (torch.float64, 37, "dtensor", True, False, 0.5, False, "low_memory"),
    (torch.float64, 1, "plain", False, False, 1.0, False, "default"),   # V < processes: rank 1 holds no row
    (torch.float32, 37, "plain", False, True, 1.0, False, "default"),
    (torch.float32, 37, "dtensor", True, False, 1.0, False, "default"),
    # A frozen weight and bias (LoRA): the default mode forms each process's share of the hidden
    # gradient in the forward; low_memory recomputes it in the backward.
    (torch.float64, 37, "dtensor", True, True, 1.0, True, "default"),
    (torch.float64, 37, "plain", True, False, 1.0, True, "low_memory"),
    (torch.float32, 37, "plain", False, False, 1.0, True, "default"),
]


def _op_scenario(rank: int) -> list[dict]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from pyalign.ops.vocab_parallel_logprobs import shard_range, vocab_parallel_token_logprobs

    mesh = init_device_mesh("cpu", (WORLD,))
    results = []
    for dtype, vocab, kind, with_bias, idle, scale, frozen, mode in OP_CASES:
        weight, bias, hidden, labels, grads = op_inputs(dtype, vocab, idle)
        start, end = shard_range(vocab, rank, WORLD)
        h = hidden[rank].clone().requires_grad_(True)
        if kind == "plain":
            w = weight[start:end].clone().requires_grad_(not frozen)
            b = bias[start:end].clone().requires_grad_(not frozen) if with_bias else None
            extra = dict(vocab_start=start, vocab_size=vocab)
        else:
            w = distribute_tensor(weight.clone(), mesh, [Shard(0)]).requires_grad_(not frozen)
            b = distribute_tensor(bias.clone(), mesh, [Shard(0)]).requires_grad_(not frozen) if with_bias else None
            extra = {}
        # chunk_size=3: several chunks in the forward and several vocabulary blocks in the backward.
        logp = vocab_parallel_token_logprobs(h, w, labels[rank], bias=b, chunk_size=3, mode=mode,
                                             weight_grad_scale=scale, **extra)
        (logp.double() * grads[rank]).sum().backward()
        with torch.no_grad():  # the same values without autograd
            again = vocab_parallel_token_logprobs(hidden[rank], w.detach(), labels[rank],
                                                  bias=None if b is None else b.detach(), chunk_size=3, **extra)
        result = dict(logp=logp.detach(), no_grad_logp=again, grad_hidden=h.grad, local_rows=(start, end),
                      weight_grad_is_none=w.grad is None, bias_grad_is_none=b is None or b.grad is None)
        if not frozen:
            if kind == "dtensor":
                result["grad_weight"] = w.grad.full_tensor()
                result["grad_bias"] = b.grad.full_tensor() if with_bias else None
                result["grad_type"] = type(w.grad).__name__
                result["local_grad_rows"] = w.grad.to_local().shape[0]
            else:
                result["grad_weight"] = _gather_rows(w.grad)
                result["grad_bias"] = _gather_rows(b.grad) if with_bias else None
                result["grad_type"], result["local_grad_rows"] = "Tensor", w.grad.shape[0]
        results.append(result)
    return results


def _gather_rows(local: torch.Tensor) -> torch.Tensor:
    """The ranks' row blocks (``torch.chunk`` layout, possibly empty) put back together."""
    sizes = [torch.zeros((), dtype=torch.int64) for _ in range(WORLD)]
    dist.all_gather(sizes, torch.tensor(local.shape[0]))
    longest = max(int(s) for s in sizes)
    padded = local.new_zeros((longest, *local.shape[1:]))
    padded[: local.shape[0]] = local
    blocks = [torch.empty_like(padded) for _ in range(WORLD)]
    dist.all_gather(blocks, padded)
    return torch.cat([block[: int(size)] for block, size in zip(blocks, sizes)])


def test_op_matches_reference_and_unsharded_op(tmp_path):
    results = run_two(tmp_path, "op")
    for case, (dtype, vocab, kind, with_bias, idle, scale, frozen, mode) in enumerate(OP_CASES):
        weight, bias, hidden, labels, grads = op_inputs(dtype, vocab, idle)
        name = f"{dtype} V={vocab} {kind} bias={with_bias} idle={idle} scale={scale} frozen={frozen} {mode}"
        # The float64 reference on the whole batch: every process's tokens against the whole weight.
        # (copies: .double() of a float64 tensor is the tensor itself, and the inputs are reused below)
        h64 = torch.cat(hidden).double().clone().requires_grad_(True)
        w64 = weight.double().clone().requires_grad_(True)
        b64 = bias.double().clone().requires_grad_(True)
        logits = h64 @ w64.T + (b64 if with_bias else 0)
        ref = reference_token_logprobs(logits, torch.cat(labels))
        (ref * torch.cat(grads)).sum().backward()
        # The unsharded fused op, same dtype: what a single process computes.
        hu = torch.cat(hidden).clone().requires_grad_(True)
        wu = weight.clone().requires_grad_(True)
        bu = bias.clone().requires_grad_(True) if with_bias else None
        unsharded = linear_token_logprobs(hu, wu, torch.cat(labels), bias=bu)
        (unsharded.double() * torch.cat(grads)).sum().backward()
        tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
        for rank, result in enumerate(results):
            got = result[case]
            rows = slice(2 * rank, 2 * rank + 2)
            assert got["logp"].dtype == (torch.float64 if dtype == torch.float64 else torch.float32), name
            torch.testing.assert_close(got["logp"].double(), ref[rows].detach(), **tol, msg=name)
            torch.testing.assert_close(got["logp"], unsharded[rows].detach(), **tol, msg=name)
            torch.testing.assert_close(got["no_grad_logp"], got["logp"], atol=0, rtol=0, msg=name)
            assert (got["logp"][labels[rank] == IGNORE_INDEX] == 0).all(), name
            torch.testing.assert_close(got["grad_hidden"].double(), h64.grad[rows], **tol, msg=name)
            torch.testing.assert_close(got["grad_hidden"], hu.grad[rows], **tol, msg=name)
            if frozen:
                assert got["weight_grad_is_none"] and got["bias_grad_is_none"], name
                continue
            # Every process's tokens reach every row of the weight gradient, times the scale.
            torch.testing.assert_close(got["grad_weight"].double(), scale * w64.grad, **tol, msg=name)
            torch.testing.assert_close(got["grad_weight"], scale * wu.grad, **tol, msg=name)
            if with_bias:
                torch.testing.assert_close(got["grad_bias"].double(), scale * b64.grad, **tol, msg=name)
            start, end = got["local_rows"]
            assert got["local_grad_rows"] == end - start, name
            if kind == "dtensor":
                assert got["grad_type"] == "DTensor", name  # FSDP's layout: the shard's gradient
        if idle:
            assert (results[1][case]["grad_hidden"] == 0).all() and (results[1][case]["logp"] == 0).all()
    # The uneven split FSDP2 and DTensor use: 19 + 18 rows of 37, and 1 + 0 of 1.
    assert results[0][0]["local_rows"] == (0, 19) and results[1][0]["local_rows"] == (19, 37)
    assert results[1][3]["local_rows"] == (1, 1)


# ----------------------------------------------------------------------------- bad use


def _errors_scenario(rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from pyalign.ops.vocab_parallel_logprobs import shard_range, vocab_parallel_token_logprobs

    mesh = init_device_mesh("cpu", (WORLD,))
    own_group, _ = dist.new_subgroups(group_size=1)  # this process alone: not the weight's mesh
    weight, _, hidden, labels, grads = op_inputs(torch.float64, 37, False)
    start, end = shard_range(37, rank, WORLD)
    messages = {}

    def attempt(name, call):
        try:
            call()
        except ValueError as err:
            messages[name] = str(err)
        else:
            messages[name] = None

    attempt("shard1", lambda: vocab_parallel_token_logprobs(
        hidden[rank], distribute_tensor(weight, mesh, [Shard(1)]), labels[rank]))
    attempt("replicate", lambda: vocab_parallel_token_logprobs(
        hidden[rank], distribute_tensor(weight, mesh, [Replicate()]), labels[rank]))
    attempt("group_mismatch", lambda: vocab_parallel_token_logprobs(
        hidden[rank], distribute_tensor(weight, mesh, [Shard(0)]), labels[rank], group=own_group))
    attempt("missing_vocab_start", lambda: vocab_parallel_token_logprobs(
        hidden[rank], weight[start:end], labels[rank]))
    bad_labels = labels[rank].clone()
    if rank == 1:
        bad_labels[0, 0] = 37  # out of range on one process only
    attempt("bad_label_one_rank", lambda: vocab_parallel_token_logprobs(
        hidden[rank], weight[start:end], bad_labels, vocab_start=start, vocab_size=37))
    attempt("not_tiling", lambda: vocab_parallel_token_logprobs(  # rank 1 overlaps rank 0 by a row
        hidden[rank], weight[start:end], labels[rank], vocab_start=start - rank, vocab_size=37))
    attempt("rows_outside_one_rank", lambda: vocab_parallel_token_logprobs(
        hidden[rank], weight[start:end], labels[rank], vocab_start=start + rank, vocab_size=37))
    attempt("wrong_hidden_size_one_rank", lambda: vocab_parallel_token_logprobs(
        hidden[rank][..., : HIDDEN - rank], weight[start:end, : HIDDEN - rank], labels[rank],
        vocab_start=start, vocab_size=37))
    # Both want a gradient, but only rank 0's hidden states need one: the backward's
    # reduce-scatter of the hidden gradient would run on one process only.
    attempt("grad_on_one_rank", lambda: vocab_parallel_token_logprobs(
        hidden[rank].clone().requires_grad_(rank == 0), weight[start:end].clone().requires_grad_(rank == 1),
        labels[rank], vocab_start=start, vocab_size=37))
    # After all that, the processes are still in step: a valid call and its backward work.
    h = hidden[rank].clone().requires_grad_(True)
    logp = vocab_parallel_token_logprobs(h, distribute_tensor(weight, mesh, [Shard(0)]), labels[rank])
    (logp * grads[rank]).sum().backward()
    return {"messages": messages, "logp": logp.detach()}


def test_bad_use_raises_on_every_process(tmp_path):
    results = run_two(tmp_path, "errors")
    expected = {
        "shard1": r"weight: expected a DTensor sharded along the vocabulary \(dim 0\)",
        "replicate": r"weight: expected a DTensor sharded along the vocabulary",
        "group_mismatch": r"group: ranks \[\d\] differ from the ranks \[0, 1\] of the weight's device mesh",
        "missing_vocab_start": r"vocab_start, vocab_size: required",
        "not_tiling": r"weight: the vocabulary shards must tile \[0, V\) in rank order",
        "grad_on_one_rank": r"the ranks disagree on the hidden.requires_grad",
    }
    for rank, result in enumerate(results):
        messages = result["messages"]
        for case, pattern in expected.items():
            assert messages[case] is not None, f"rank {rank}: {case} raised nothing"
            assert re.search(pattern, messages[case]), (case, messages[case])
    # Data that is wrong on one process only: that process names it, the other names that process.
    assert "labels: every label must be in [0, 37)" in results[1]["messages"]["bad_label_one_rank"]
    assert "rank(s) [1] of the group got invalid inputs" in results[0]["messages"]["bad_label_one_rank"]
    assert "vocab_start: rows [20, 38) of weight lie outside the vocabulary [0, 37)" in \
        results[1]["messages"]["rows_outside_one_rank"]
    assert "rank(s) [1] of the group got invalid inputs" in results[0]["messages"]["rows_outside_one_rank"]
    for rank in range(WORLD):
        assert "the ranks disagree on the hidden size H: [16, 15]" in results[rank]["messages"]["wrong_hidden_size_one_rank"]
    weight, _, hidden, labels, _ = op_inputs(torch.float64, 37, False)
    ref = reference_token_logprobs(torch.cat(hidden) @ weight.T, torch.cat(labels))
    for rank, result in enumerate(results):
        torch.testing.assert_close(result["logp"], ref[2 * rank: 2 * rank + 2], atol=1e-12, rtol=1e-12)


def test_bad_arguments_without_processes():
    from pyalign.models import fused_head as hf
    from pyalign.ops.vocab_parallel_logprobs import shard_range, vocab_parallel_token_logprobs

    hidden = torch.randn(3, HIDDEN)
    with pytest.raises(ValueError, match="sharded_head: expected one of"):
        hf.causal_lm_sequence_logprobs(torch.nn.Linear(2, 2), None, None, None, sharded_head="shard")
    with pytest.raises(ValueError, match="group: given, but no process group is initialised"):
        vocab_parallel_token_logprobs(hidden, torch.randn(5, HIDDEN), torch.zeros(3, dtype=torch.long), group=object())
    with pytest.raises(ValueError, match="weight_grad_scale: expected a positive number"):
        vocab_parallel_token_logprobs(hidden, torch.randn(5, HIDDEN), torch.zeros(3, dtype=torch.long),
                                      weight_grad_scale=0)
    with pytest.raises(ValueError, match=r"labels: every label must be in \[0, 5\)"):
        vocab_parallel_token_logprobs(hidden, torch.randn(5, HIDDEN), torch.full((3,), 5))
    with pytest.raises(ValueError, match=r"vocab_start: rows \[3, 8\) of weight lie outside"):
        vocab_parallel_token_logprobs(hidden, torch.randn(5, HIDDEN), torch.zeros(3, dtype=torch.long),
                                      vocab_start=3, vocab_size=6)
    assert [shard_range(10, r, 4) for r in range(4)] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert [shard_range(5, r, 4) for r in range(4)] == [(0, 2), (2, 4), (4, 5), (5, 5)]


def test_frozen_weight_forward_forms_the_hidden_gradient():
    """A frozen weight in the default mode: the forward keeps only this process's share of
    ``(onehot - softmax) @ W`` per token (the backward scales it), not the weight or the hidden
    states; low_memory keeps the inputs and recomputes. Same values and gradients either way (one
    process here; two in test_op_matches_reference_and_unsharded_op)."""
    from pyalign.ops.vocab_parallel_logprobs import vocab_parallel_token_logprobs

    weight, _, hidden, labels, grads = op_inputs(torch.float64, 37, False)
    results = {}
    for mode in ("default", "low_memory"):
        shapes = []
        h = hidden[0].clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t, shapes=shapes: shapes.append(tuple(t.shape)) or t,
                                                      lambda t: t):
            logp = vocab_parallel_token_logprobs(h, weight, labels[0], mode=mode)
        (logp * grads[0]).sum().backward()
        results[mode] = (logp.detach(), h.grad, shapes)
    assert (37, HIDDEN) not in results["default"][2] and (37, HIDDEN) in results["low_memory"][2]
    torch.testing.assert_close(results["default"][0], results["low_memory"][0], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(results["default"][1], results["low_memory"][1], atol=1e-12, rtol=1e-12)


# ----------------------------------------------------------------------------- a tiny Llama under FSDP2

VOCAB = 67  # odd: FSDP2 splits the lm_head 34 + 33 rows
STRATEGIES = ("gather", "vocab_parallel", "auto")


def model_batch(idle_rank: bool = False, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (2 * WORLD, 9), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    labels = input_ids.clone()
    labels[:, :3] = IGNORE_INDEX
    labels[attention_mask == 0] = IGNORE_INDEX
    if idle_rank:
        labels[2:] = IGNORE_INDEX  # rank 1's micro-batch: nothing scored
    return input_ids, attention_mask, labels


ROW_WEIGHTS = torch.tensor([1.0, -0.5, 0.75, 2.0])  # the "loss" is a weighted sum of sequence log-probs


def build_model(tied: bool, dtype: torch.dtype, lora: bool = False):
    from helpers_tiny_lm import make_model

    model = make_model(VOCAB, seed=0, tied=tied).to(dtype)
    if lora:
        import peft

        config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                 task_type="CAUSAL_LM")
        torch.manual_seed(1)
        model = peft.get_peft_model(model, config)
        with torch.no_grad():  # LoRA B starts at zero; make the adapters matter
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.1)
    return model


def inner(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def shard_model(model, layout: str, divide_factor: float | None = None):
    """fully_shard on each decoder layer, on the lm_head as the layout says, then on the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    base = inner(model)
    mesh = None
    if layout == "hsdp":  # HSDP: 2-D mesh (replicate x shard)
        mesh = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("replicate", "shard"))
    for layer in base.model.layers:
        fully_shard(layer, mesh=mesh)
    if layout in ("own", "hsdp"):
        fully_shard(base.lm_head, mesh=mesh)
    elif layout == "grouped":  # transformers' own plan: final norm and lm_head as one group, kept whole
        fully_shard([base.model.norm, base.lm_head], reshard_after_forward=False)
    fully_shard(model, mesh=mesh)
    if divide_factor is not None:
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(divide_factor)
                module.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
    return model


def tracked_grads(model) -> dict[str, torch.Tensor]:
    """Full gradients of the parameters the tests compare (DTensor gradients gathered)."""
    out = {}
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        key = name.replace("base_model.model.", "")
        if not (key.startswith("lm_head") or "embed_tokens" in key or "layers.0.self_attn.q_proj" in key
                or key == "model.norm.weight"):
            continue
        grad = param.grad
        out[key] = grad.full_tensor() if type(grad).__name__ == "DTensor" else grad.clone()
    return out


class PathRecorder:
    """Which way each call went, observed from outside: calls of the vocabulary-parallel op made by
    the fused-head glue, and the FSDP modules whose parameter group was all-gathered (test-only
    instrumentation of FSDP2's FSDPParamGroup.unshard)."""

    def __init__(self):
        from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

        import pyalign.models.fused_head as glue

        self.vp_calls = 0
        self.unsharded: set[str] = set()
        recorder = self
        original_op, original_unshard = glue.vocab_parallel_token_logprobs, FSDPParamGroup.unshard

        def counted_op(*args, **kwargs):
            recorder.vp_calls += 1
            return original_op(*args, **kwargs)

        def recorded_unshard(group, *args, **kwargs):
            if not group.is_unsharded:
                recorder.unsharded.add(group._module_fqn)
            return original_unshard(group, *args, **kwargs)

        glue.vocab_parallel_token_logprobs = counted_op
        FSDPParamGroup.unshard = recorded_unshard

    def reset(self):
        self.vp_calls = 0
        self.unsharded = set()


def _model_scenario(rank: int, configs: list[dict]) -> list[dict]:
    from pyalign.models.fused_head import causal_lm_preference_loss, causal_lm_sequence_logprobs, fused_head_or_reason

    recorder = PathRecorder()
    results = []
    for config in configs:
        recorder.reset()
        model = shard_model(build_model(config["tied"], config["dtype"], config.get("lora", False)),
                            config["layout"], config.get("divide_factor"))
        input_ids, attention_mask, labels = model_batch(config.get("idle", False))
        rows = slice(2 * rank, 2 * rank + 2)
        head, reason = fused_head_or_reason(model, sharded=True)
        assert head is not None and head.sharded, reason
        # A caller that would run the decoder alone (e.g. the TRL drop-in) is told why not.
        plain_head, plain_reason = fused_head_or_reason(model)
        assert plain_head is None and "FSDP2 manages the lm_head" in plain_reason
        out = {"config": config}
        try:
            with torch.no_grad():  # first a call without gradient (it leaves the root's group unsharded)
                out["no_grad"] = causal_lm_sequence_logprobs(model, input_ids[rows], attention_mask[rows],
                                                             labels[rows], fused=True,
                                                             sharded_head=config["strategy"])
            if config.get("loss"):
                ref_logps = torch.tensor([-20.0, -22.0], dtype=torch.float32)
                result = causal_lm_preference_loss(model, input_ids[rows], attention_mask[rows], labels[rows],
                                                   "dpo", beta=0.1, ref_logps=ref_logps, fused=True,
                                                   sharded_head=config["strategy"])
                result.loss.backward()
                out["value"] = result.loss.detach()
            else:
                logps = causal_lm_sequence_logprobs(model, input_ids[rows], attention_mask[rows], labels[rows],
                                                    fused=True, sharded_head=config["strategy"])
                (logps * ROW_WEIGHTS[rows].to(logps.dtype)).sum().backward()
                out["value"] = logps.detach()
            out["grads"] = tracked_grads(model)
            out["lm_head_grad_is_none"] = inner(model).lm_head.weight.grad is None
        except ValueError as err:
            out["error"] = str(err)
        out["vp_calls"], out["unsharded"] = recorder.vp_calls, sorted(recorder.unsharded)
        results.append(out)
    return results


def reference_run(config: dict) -> dict:
    """The same model unsharded, on every process's rows at once: FSDP averages the processes'
    gradients (or divides by ``divide_factor``), hence the division of the summed objective."""
    from pyalign.models.fused_head import causal_lm_preference_loss, causal_lm_sequence_logprobs

    model = build_model(config["tied"], config["dtype"], config.get("lora", False))
    input_ids, attention_mask, labels = model_batch(config.get("idle", False))
    divide = config.get("divide_factor") or WORLD
    if config.get("loss"):
        values = []
        total = 0
        for rank in range(WORLD):
            rows = slice(2 * rank, 2 * rank + 2)
            result = causal_lm_preference_loss(model, input_ids[rows], attention_mask[rows], labels[rows], "dpo",
                                               beta=0.1, ref_logps=torch.tensor([-20.0, -22.0]), fused=False)
            values.append(result.loss.detach())
            total = total + result.loss
        (total / divide).backward()
    else:
        logps = causal_lm_sequence_logprobs(model, input_ids, attention_mask, labels, fused=False)
        (logps * ROW_WEIGHTS.to(logps.dtype)).sum().div(divide).backward()
        values = [logps.detach()[2 * rank: 2 * rank + 2] for rank in range(WORLD)]
    return {"values": values, "grads": tracked_grads(model)}


def expected_path(config: dict) -> tuple[int, bool | None]:
    """(calls of the vocabulary-parallel op, whether the lm_head's own FSDP group is all-gathered;
    None where it has no group of its own) for the no-gradient call and the gradient call."""
    strategy, layout = config["strategy"], config["layout"]
    # "auto": vocabulary-parallel where the weight stays sharded (its own group, 1-D mesh); where
    # FSDP all-gathers it anyway (root group, grouped with the norm, tied), the whole weight.
    vocabulary_parallel = strategy == "vocab_parallel" or (strategy == "auto" and layout == "own")
    return (2 if vocabulary_parallel else 0), (not vocabulary_parallel if layout in ("own", "hsdp") else None)


def check_against_reference(results: list[list[dict]], configs: list[dict]) -> None:
    for index, config in enumerate(configs):
        calls, head_gathered = expected_path(config)
        for rank in range(WORLD):
            got = results[rank][index]
            assert got["vp_calls"] == calls, (config, got["vp_calls"])
            if head_gathered is not None:
                gathered = any(name.split(".")[-1] == "lm_head" for name in got["unsharded"])
                assert gathered == head_gathered, (config, got["unsharded"])
        ref = reference_run(config)
        fp64 = config["dtype"] == torch.float64
        tol = dict(atol=1e-10, rtol=1e-10) if fp64 else dict(atol=3e-5, rtol=3e-5)
        for rank in range(WORLD):
            got = results[rank][index]
            assert "error" not in got, (config, got.get("error"))
            torch.testing.assert_close(got["value"].to(ref["values"][rank].dtype), ref["values"][rank], **tol,
                                       msg=str(config))
            if not config.get("loss"):
                torch.testing.assert_close(got["no_grad"], got["value"], atol=0, rtol=0, msg=str(config))
            assert got["grads"].keys() == ref["grads"].keys(), (config, sorted(got["grads"]), sorted(ref["grads"]))
            for name, grad in ref["grads"].items():
                torch.testing.assert_close(got["grads"][name], grad, **tol, msg=f"{config} {name}")


ROOT_CONFIGS = [dict(layout="root", tied=tied, dtype=torch.float64, strategy=strategy)
                for tied in (False, True) for strategy in STRATEGIES]
ROOT_CONFIGS += [
    dict(layout="root", tied=False, dtype=torch.float32, strategy="vocab_parallel"),
    dict(layout="root", tied=False, dtype=torch.float64, strategy="vocab_parallel", idle=True),
    dict(layout="root", tied=False, dtype=torch.float64, strategy="gather", idle=True),
    dict(layout="root", tied=True, dtype=torch.float64, strategy="vocab_parallel", loss=True),
]


def test_llama_lm_head_in_root_group_tied_and_untied(tmp_path):
    results = run_two(tmp_path, "model", ROOT_CONFIGS)
    check_against_reference(results, ROOT_CONFIGS)
    for rank in range(WORLD):
        for got in results[rank]:
            assert not got["lm_head_grad_is_none"]


HEAD_GROUP_CONFIGS = [dict(layout=layout, tied=False, dtype=torch.float64, strategy=strategy)
                      for layout in ("own", "grouped") for strategy in STRATEGIES]
HEAD_GROUP_CONFIGS += [
    dict(layout="own", tied=False, dtype=torch.float32, strategy="auto"),
    dict(layout="own", tied=False, dtype=torch.float64, strategy="vocab_parallel", idle=True),
    # FSDP told to sum instead of average: the vocabulary-parallel gradient (written into the
    # DTensor directly, not reduce-scattered by FSDP) must follow.
    dict(layout="own", tied=False, dtype=torch.float64, strategy="vocab_parallel", divide_factor=1.0),
    dict(layout="own", tied=False, dtype=torch.float64, strategy="gather", divide_factor=1.0),
    dict(layout="own", tied=False, dtype=torch.float64, strategy="auto", loss=True),
]


def test_llama_lm_head_in_its_own_group_and_grouped_with_norm(tmp_path):
    results = run_two(tmp_path, "model", HEAD_GROUP_CONFIGS)
    check_against_reference(results, HEAD_GROUP_CONFIGS)


LORA_CONFIGS = [dict(layout=layout, tied=tied, dtype=torch.float64, strategy=strategy, lora=True)
                for layout, tied in (("root", False), ("own", False), ("root", True)) for strategy in STRATEGIES]


def test_lora_on_a_sharded_llama_leaves_the_frozen_head_without_gradient(tmp_path):
    results = run_two(tmp_path, "model", LORA_CONFIGS)
    check_against_reference(results, LORA_CONFIGS)
    for rank in range(WORLD):
        for got in results[rank]:
            assert got["lm_head_grad_is_none"], got["config"]
            # Only the adapters train, and they got their gradient through the fused head.
            assert got["grads"] and all("lora_" in name for name in got["grads"]), sorted(got["grads"])


HSDP_CONFIGS = [dict(layout="hsdp", tied=False, dtype=torch.float64, strategy=strategy)
                for strategy in ("vocab_parallel", "auto")]


def test_hsdp_mesh_vocab_parallel_refused_auto_gathers(tmp_path):
    results = run_two(tmp_path, "model", HSDP_CONFIGS)
    for rank in range(WORLD):
        refused, auto = results[rank]
        assert "sharded_head: 'vocab_parallel' needs the lm_head weight sharded along the vocabulary" in refused["error"]
        assert "2-D mesh" in refused["error"] and "Use sharded_head='gather'" in refused["error"]
        assert "error" not in auto, auto.get("error")
    check_against_reference([[results[rank][1]] for rank in range(WORLD)], HSDP_CONFIGS[1:])


def test_bench_writes_a_checked_table(tmp_path):
    """``python -m bench.sharded_head`` at a tiny size: every layout x strategy measured, the token
    log-probs agree with gather's, and the vocabulary-parallel head in its own group allocates less
    than gathering its weight (1 MiB here) does."""
    from bench import sharded_head

    payload = sharded_head.main(["--tokens", "32", "--vocab", "4096", "--hidden", "64", "--repeats", "2",
                                 "--warmup", "0", "--timeout", str(JOIN_TIMEOUT_S), "--out", str(tmp_path)])
    rows = {(row["layout"], row["strategy"]): row for row in payload["rows"]}
    assert set(rows) == {(layout, strategy) for layout in sharded_head.LAYOUTS for strategy in sharded_head.STRATEGIES}
    for row in rows.values():
        assert len(row["times_s"]) == 2 and row["median_s"] > 0 and row["alloc_peak_mib_max"] > 0, row
        assert row["logp_max_abs_diff_vs_gather"] < 1e-4, row
    assert rows[("own", "vocab_parallel")]["alloc_peak_mib_max"] < rows[("own", "gather")]["alloc_peak_mib_max"]
    env = payload["environment"]
    assert env["command"].startswith("python -m bench.sharded_head") and env["aten_cpu_capability"]
    assert env["torch_threads"] == 1 and env["torch"] == torch.__version__
    (json_file,) = tmp_path.glob("sharded_head_*.json")
    assert json_file.with_suffix(".md").read_text().count("\n| own |") == 3


SCENARIOS = {"op": _op_scenario, "errors": _errors_scenario, "model": _model_scenario}
