"""Forward + backward of a DPO loss from hidden states and the lm_head weight (SPEC section 4,
second table): materialised logits (eager, eager row-loop) against pyalign's fused-linear paths,
Cut Cross-Entropy and Liger-Kernel's fused-linear DPO, in one process, on the same inputs.

    python -m bench.linear                          # CPU: 8x64 tokens, H=256, V=8000, bf16
    python -m bench.linear --device cuda            # 8x1024 tokens, H=4096, V=32000 and 128256

Inputs: hidden [seqs, T, H] and weight [V, H] requiring grad, hidden ~ N(0, 1) and weight
~ N(0, std^2 / H) so that the logits have standard deviation ``--logit-std`` (4: like a trained
model; ``flat`` = 1.0, which flatters Cut Cross-Entropy's gradient filtering). Labels ignored on
the first quarter of positions; 4 pairs, chosen rows first. Gradients for hidden and weight are
checked against a float64 computation. Floor: 6*N*H*V flops at the measured matmul rate.
"""

from __future__ import annotations

import argparse
import functools
import inspect
from pathlib import Path

import torch

from bench import common, report, runner
from bench.methods import (
    BETA, IGNORE_INDEX, Method, dpo_loss, eager_sequence_logps, masked_labels, trl_token_logps,
)

DEFAULTS = {
    "cpu": {"shapes": "8x64x256x8000", "dtypes": "bf16", "repeats": 5, "warmup": 1, "matmul_size": 1024},
    "cuda": {"shapes": "8x1024x4096x32000,8x1024x4096x128256", "dtypes": "bf16",
             "repeats": 10, "warmup": 2, "matmul_size": 8192},
}
LOGIT_STD_PRESETS = {"realistic": 4.0, "flat": 1.0}
REFERENCE_CHUNK_BYTES = 256 * common.MIB


class LinearCase:
    def __init__(self, shape, dtype, device, logit_std: float, seed: int):
        seqs, time, width, vocab = shape
        if seqs % 2:
            raise ValueError(f"--shapes: the number of sequences must be even (pairs), got {seqs}")
        self.shape, self.dtype, self.device = shape, dtype, device
        gen = torch.Generator(device=device).manual_seed(seed)
        hidden = torch.randn(seqs, time, width, generator=gen, device=device)
        weight = torch.randn(vocab, width, generator=gen, device=device) * (logit_std / width**0.5)
        self.hidden = hidden.to(dtype).requires_grad_(True)
        self.weight = weight.to(dtype).requires_grad_(True)
        del hidden, weight
        labels = torch.randint(0, vocab, (seqs, time), generator=torch.Generator().manual_seed(seed + 1))
        labels[:, : time // 4] = IGNORE_INDEX
        self.labels = labels.to(device)
        self.safe_labels, self.mask = masked_labels(self.labels)
        self.ref_logps = None

    def inputs(self):
        return [self.hidden, self.weight]


class LinearReference:
    """Float64 sequence log-probs, DPO loss and the hidden / weight gradients, chunked over tokens."""

    def __init__(self, case: LinearCase):
        seqs, time, width, vocab = case.shape
        self.case = case
        self.rows = max(1, REFERENCE_CHUNK_BYTES // (vocab * 8))
        self.hidden = case.hidden.detach().reshape(-1, width)
        self.weight = case.weight.detach().double()
        labels, mask = case.safe_labels.view(-1, 1), case.mask.view(-1)
        self.lse = torch.empty(self.hidden.shape[0], dtype=torch.float64, device=case.device)
        token = torch.empty_like(self.lse)
        for start in range(0, self.hidden.shape[0], self.rows):
            rows = slice(start, start + self.rows)
            logits = self.hidden[rows].double() @ self.weight.T
            self.lse[rows] = torch.logsumexp(logits, dim=-1)
            token[rows] = (logits.gather(1, labels[rows]).squeeze(1) - self.lse[rows]) * mask[rows]
        self.sequence = token.view(seqs, time).sum(-1)
        self._grads: dict = {}

    def loss_and_grads(self, ref_logps: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
        """(loss, d hidden, d weight) in float32 (computed in float64) for these reference log-probs."""
        key = tuple(ref_logps.tolist())
        if key in self._grads:
            return self._grads[key]
        seqs, time, width, vocab = self.case.shape
        sequence = self.sequence.clone().requires_grad_(True)
        loss = dpo_loss(sequence, ref_logps.double())
        (dsequence,) = torch.autograd.grad(loss, sequence)
        coef = dsequence.view(seqs, 1).expand(seqs, time).reshape(-1) * self.case.mask.view(-1).double()
        labels = self.case.safe_labels.view(-1, 1)
        grad_hidden = torch.empty(self.hidden.shape, dtype=torch.float32, device=self.hidden.device)
        grad_weight = torch.zeros_like(self.weight)
        for start in range(0, self.hidden.shape[0], self.rows):
            rows = slice(start, start + self.rows)
            hidden = self.hidden[rows].double()
            d_logits = torch.exp(hidden @ self.weight.T - self.lse[rows, None])
            d_logits.mul_(-coef[rows, None]).scatter_add_(1, labels[rows], coef[rows, None])
            grad_hidden[rows] = (d_logits @ self.weight).float()
            grad_weight.addmm_(d_logits.T, hidden)
        result = (loss.item(), grad_hidden.view(self.case.hidden.shape), grad_weight.float())
        self._grads[key] = result
        return result


def _errors(got: torch.Tensor, expected: torch.Tensor, name: str) -> dict:
    """max |got - expected| and ||got - expected|| / ||expected||, in float64, 16M elements at a
    time (a weight gradient in float64 would be 4 GiB at V = 128256)."""
    got, expected = got.reshape(-1), expected.reshape(-1)
    max_abs = diff_sq = ref_sq = 0.0
    finite = True
    for start in range(0, got.numel(), 16 * common.MIB):
        piece, ref = got[start:start + 16 * common.MIB].double(), expected[start:start + 16 * common.MIB].double()
        finite = finite and bool(torch.isfinite(piece).all())
        piece.sub_(ref)
        max_abs = max(max_abs, piece.abs().max().item())
        diff_sq += piece.square().sum().item()
        ref_sq += ref.square().sum().item()
    if not finite:
        return {f"{name}_max_abs_err": float("nan"), f"{name}_rel_err": float("nan")}
    return {f"{name}_max_abs_err": max_abs,
            f"{name}_rel_err": diff_sq**0.5 / ref_sq**0.5 if ref_sq else float("nan")}


# --------------------------------------------------------------------------- contenders


def linear_methods(device: torch.device, only=()) -> list[Method]:
    def eager(hidden, weight, case):
        logits = hidden @ weight.T  # [seqs, T, V] in the input dtype, as an lm_head gives them
        return dpo_loss(eager_sequence_logps(logits, case.safe_labels, case.mask), case.ref_logps)

    def rowloop(hidden, weight, case):
        logits = hidden @ weight.T
        return dpo_loss((trl_token_logps(logits, case.safe_labels) * case.mask).sum(-1), case.ref_logps)

    methods = [Method("eager", eager, _eager_extra, note="hidden @ weight.T, log_softmax(.float()).gather"),
               Method("eager_rowloop", rowloop, _rowloop_extra, note="hidden @ weight.T, TRL row loop")]
    methods += _pyalign_methods()
    methods += _trl_chunked_methods()
    if device.type == "cuda":
        methods += _cce_methods() + [_liger_method()]
    if only:
        methods = [m for m in methods if any(m.name.startswith(prefix) for prefix in only)]
    return methods


def _pyalign_methods() -> list[Method]:
    try:
        import pyalign  # noqa: PLC0415

        from pyalign.losses.linear_preference_loss import linear_preference_loss  # noqa: PLC0415
    except ImportError as err:
        return [Method("pyalign.linear", None, _grads_only, note=f"pyalign's fused-linear op not importable: {err}")]
    methods = []
    for mode in ("default", "low_memory"):
        def op(hidden, weight, case, mode=mode):
            logps = pyalign.linear_token_logprobs(hidden, weight, case.labels, mode=mode)
            return dpo_loss(logps.sum(-1), case.ref_logps)

        def fused(hidden, weight, case, mode=mode, loss_fn=pyalign.PreferenceLoss("dpo", beta=BETA)):
            return loss_fn(labels=case.labels, ref_logps=case.ref_logps, hidden=hidden, weight=weight,
                           mode=mode).loss

        def fused_wgrad(hidden, weight, case, mode=mode, dtype=None, loss_fn=pyalign.PreferenceLoss("dpo", beta=BETA)):
            return loss_fn(labels=case.labels, ref_logps=case.ref_logps, hidden=hidden, weight=weight,
                           mode=mode, weight_grad_dtype=dtype or weight.dtype).loss

        def op_stats(hidden, weight, case, mode=mode):
            logps, _ = pyalign.linear_token_logprobs(hidden, weight, case.labels, mode=mode, return_stats=True)
            return dpo_loss(logps.sum(-1), case.ref_logps)

        methods.append(Method(f"pyalign.linear_token_logprobs[{mode}]", op, _fused_extra))
        if mode == "default":
            methods.append(Method(f"pyalign.linear_token_logprobs[{mode},stats]", op_stats, _fused_extra,
                                  note="+ entropy, mean logit, log sum p^2, argmax (return_stats)"))
        methods.append(Method(f"pyalign.PreferenceLoss(hidden)[{mode}]", fused, _fused_extra,
                              note="metrics synchronise"))
        if mode == "default" and "weight_grad_dtype" in inspect.signature(linear_preference_loss).parameters:
            methods.append(Method(f"pyalign.PreferenceLoss(hidden)[{mode},wgrad-fp32]",
                                  functools.partial(fused_wgrad, dtype=torch.float32), _fused_fp32_extra,
                                  note="pair groups (6NHV), [V, H] float32 weight-gradient accumulator"))
            methods.append(Method(f"pyalign.PreferenceLoss(hidden)[{mode},wgrad-in-weight-dtype]",
                                  fused_wgrad, _fused_extra,
                                  note="pair groups (6NHV), weight gradient summed in its own dtype"))
    return methods


# The per-token outputs TRL 1.16's DPOTrainer asks its fused lm_head for (dpo_trainer.py).
TRL_DPO_OUTPUTS = ("entropy", "mean_logits", "is_top1")


def _trl_chunked_methods() -> list[Method]:
    """TRL 1.16's fused lm_head (``trl.kernels.ChunkedLogProbFunction``), called as its
    ``add_fused_lm_head`` calls it: 32768 vocabulary columns per tile, fp32 gradient accumulators;
    on a Triton device only the kept positions, elsewhere every position (its torch tile path)."""
    try:
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction  # noqa: PLC0415
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk  # noqa: PLC0415
    except ImportError as err:
        return [Method("trl_chunked", None, _grads_only, note=f"trl's chunked log-prob not importable: {err}")]

    def make(outputs):
        def loss(hidden, weight, case):
            mask = case.mask
            if hidden.is_cuda:  # TRL's compact path: the kept positions only
                per_token = ChunkedLogProbFunction.apply(hidden[mask], weight, None, case.labels[mask], 1.0,
                                                         chunk, None, 1.0, outputs)
                logps = per_token[0].new_zeros(mask.shape).masked_scatter(mask, per_token[0])
            else:
                per_token = ChunkedLogProbFunction.apply(hidden.reshape(-1, hidden.shape[-1]), weight, None,
                                                         case.safe_labels.reshape(-1), 1.0, chunk, None, 1.0,
                                                         outputs)
                logps = per_token[0].view(mask.shape).masked_fill(~mask, 0)
            return dpo_loss(logps.sum(-1), case.ref_logps)
        return loss

    return [Method("trl_chunked", make(()), _trl_extra, note="ChunkedLogProbFunction, log-probs only"),
            Method("trl_chunked[dpo-outputs]", make(TRL_DPO_OUTPUTS), _trl_extra,
                   note="+ entropy, mean logit, is_top1, as TRL's DPOTrainer asks")]


def _cce_methods() -> list[Method]:
    try:
        from cut_cross_entropy import linear_cross_entropy  # noqa: PLC0415
    except ImportError as err:
        return [Method("cce", None, _grads_only, note=f"cut-cross-entropy not importable: {err}")]

    def make(filter_eps):
        def loss(hidden, weight, case):
            kwargs = {} if filter_eps == "default" else {"filter_eps": filter_eps}
            nll = linear_cross_entropy(hidden, weight, case.labels, ignore_index=IGNORE_INDEX,
                                       reduction="none", **kwargs)
            return dpo_loss((-nll.float() * case.mask).sum(-1), case.ref_logps)
        return loss

    return [Method("cce", make("default"), _grads_only, note="linear_cross_entropy, default gradient filter"),
            Method("cce_exact", make(None), _grads_only, note="filter_eps=None")]


def _liger_method() -> Method:
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss  # noqa: PLC0415
    except ImportError as err:
        return Method("liger_fused_dpo", None, _grads_only, note=f"liger-kernel not importable: {err}")
    loss_fn = LigerFusedLinearDPOLoss(beta=BETA, ignore_index=IGNORE_INDEX, use_ref_model=False)

    def loss(hidden, weight, case):
        out = loss_fn(weight, hidden, case.labels)
        return out[0] if isinstance(out, tuple) else out

    return Method("liger_fused_dpo", loss, _liger_extra, note="use_ref_model=False: reference log-probs 0")


# Estimated peak memory beyond the inputs (bytes), for the fits check.
def _dims(hidden, weight):
    """(logits cells, gradient bytes, weight cells)."""
    tokens = hidden.numel() // hidden.shape[-1]
    grads = (hidden.numel() + weight.numel()) * hidden.element_size()
    return tokens * weight.shape[0], grads, weight.numel()


def _grads_only(hidden, weight):
    return _dims(hidden, weight)[1]


def _eager_extra(hidden, weight):
    cells, grads, _ = _dims(hidden, weight)
    return 2 * cells * hidden.element_size() + 3 * cells * 4 + grads


def _rowloop_extra(hidden, weight):
    cells, grads, _ = _dims(hidden, weight)
    return 3 * cells * hidden.element_size() + grads


def _fused_extra(hidden, weight):
    _, grads, _ = _dims(hidden, weight)
    # a chunk or group of logits, the kept hidden rows and their float32 gradient accumulator
    return grads + 768 * common.MIB + hidden.numel() * (hidden.element_size() + 4)


def _fused_fp32_extra(hidden, weight):
    return _fused_extra(hidden, weight) + 4 * _dims(hidden, weight)[2]  # [V, H] float32 accumulator


def _trl_extra(hidden, weight):
    _, grads, weight_cells = _dims(hidden, weight)
    tile = 4096 * 32768 * hidden.element_size()
    # fp32 accumulators of both gradients, one tile, the cast of each accumulator at the end
    return grads + 4 * (weight_cells + hidden.numel()) + tile + grads


def _liger_extra(hidden, weight):
    _, grads, weight_cells = _dims(hidden, weight)
    return grads + 4 * weight_cells + 1024 * common.MIB


# --------------------------------------------------------------------------- running


def prepare_method(case: LinearCase, reference: LinearReference, method: Method, args):
    """Check the method against the reference, measure its peak memory, warm it up. Returns the
    result row and, when it ran, the ``(run_once, before_each)`` pair to time."""
    last_loss: list = []

    def run_once():
        loss = method.loss(case.hidden, case.weight, case)
        grads = torch.autograd.grad(loss, [case.hidden, case.weight])
        last_loss[:] = [loss.detach()]
        return grads

    def check(row: dict):
        try:
            grad_hidden, grad_weight = run_once()
            ref = torch.zeros_like(case.ref_logps) if method.name == "liger_fused_dpo" else case.ref_logps
            ref_loss, ref_hidden, ref_weight = reference.loss_and_grads(ref)
            row["loss"] = last_loss[0].item()
            row["loss_abs_err"] = abs(row["loss"] - ref_loss)
            row.update(_errors(grad_hidden, ref_hidden, "grad_hidden"))
            row.update(_errors(grad_weight, ref_weight, "grad_weight"))
            del grad_hidden, grad_weight
            row.update(common.measure_peak(run_once, lambda: None, case.device, case.inputs()))
            common.warm_up(run_once, lambda: None, case.device, args.warmup)
            return run_once, lambda: None
        finally:
            last_loss.clear()

    need = method.extra_bytes(case.hidden, case.weight) + 4 * REFERENCE_CHUNK_BYTES
    return runner.guarded_prepare(method, case.device, need, check)


def measure_ceilings(args, device, dtypes) -> dict:
    return {"matmul": common.matmul_rate(device, dtypes[0], args.matmul_size)}


def run_case(shape, dtype, device, methods_filter, args, ceilings) -> dict:
    seqs, time, width, vocab = shape
    case = LinearCase(shape, dtype, device, args.logit_std, args.seed)
    reference = LinearReference(case)
    noise = torch.randn(seqs, generator=torch.Generator().manual_seed(args.seed + 2))
    case.ref_logps = (reference.sequence.cpu() + noise.double()).float().to(device)
    tokens, kept = seqs * time, int(case.mask.sum())
    floor_ms = 6 * tokens * width * vocab / ceilings["matmul"]["flop_per_s"] * 1e3
    label = f"{seqs}x{time} tokens H={width} V={vocab} {common.dtype_name(dtype)} std={args.logit_std:g}"
    rows = runner.check_and_time_methods(
        linear_methods(device, methods_filter),
        lambda method: prepare_method(case, reference, method, args), device, args.repeats, label)
    eager = next((r for r in rows if r["method"] == "eager" and "median_ms" in r), None)
    for row in rows:
        if "median_ms" in row:
            row["x_floor"] = row["median_ms"] / floor_ms
            if eager:
                row["speedup_vs_eager"] = eager["median_ms"] / row["median_ms"]
    del case, reference
    common.release_memory(device)
    return {"label": label, "shape": list(shape), "dtype": common.dtype_name(dtype), "logit_std": args.logit_std,
            "tokens": tokens, "kept_tokens": kept, "floor_flops": 6 * tokens * width * vocab,
            "floor_ms": floor_ms, "floor_kept_ms": floor_ms * kept / tokens, "methods": rows}


COLUMNS = [
    ("method", "method", ""), ("median ms", "median_ms", ".3f"), ("IQR ms", "iqr_ms", ".3f"),
    ("x floor", "x_floor", ".2f"), ("vs eager", "speedup_vs_eager", ".2f"),
    ("peak extra GiB", "peak_extra_gib", ".3f"), ("grads GiB", "grad_gib", ".3f"),
    ("extra beyond grads GiB", "extra_beyond_grad_gib", ".3f"), ("|loss err|", "loss_abs_err", ".1e"),
    ("d hidden rel err", "grad_hidden_rel_err", ".1e"), ("d weight rel err", "grad_weight_rel_err", ".1e"),
    ("skipped / note", "status", ""),
]


def render_markdown(payload: dict) -> str:
    env, rate = payload["environment"], payload["ceilings"]["matmul"]
    lines = [f"# DPO loss from hidden states + lm_head, forward + backward: {env['device']}", "",
             f"`{env['command']}`  ",
             report.versions_line(env, "liger_kernel", "cut_cross_entropy"),
             f"matmul {rate['flop_per_s'] / 1e12:.1f} TFLOP/s ({rate['dtype']}, {rate['size']}^3); floor = 6*N*H*V "
             f"flops at that rate (N = all tokens; ignored tokens need no work, see floor_kept_ms); median of "
             f"{payload['settings']['repeats']}; errors against float64 on the same inputs", ""]
    for case in payload["cases"]:
        lines += [f"## {case['label']} (floor {case['floor_ms']:.3f} ms)", "",
                  report.markdown_table(runner.with_status(case["methods"]), COLUMNS), ""]
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.linear", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", help="seqs x T x H x V, comma separated")
    parser.add_argument("--dtypes", help="bf16 (default), fp16, fp32")
    parser.add_argument("--logit-std", default="realistic",
                        help="standard deviation of the logits: a number, 'realistic' (4) or 'flat' (1)")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--methods", default="", help="only methods whose name starts with one of these")
    parser.add_argument("--matmul-size", type=int, help="size of the square matmul that measures the rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    args, device = runner.finish_args(parser, argv, DEFAULTS)
    try:
        args.logit_std = LOGIT_STD_PRESETS.get(args.logit_std) or float(args.logit_std)
    except ValueError:
        parser.error(f"--logit-std: expected a number, 'realistic' or 'flat', got {args.logit_std!r}")
    return args, device


def main(argv=None) -> dict:
    return runner.run_benchmark(
        "linear", argv, parse_args=parse_args, shape_rank=4, measure_ceilings=measure_ceilings,
        run_case=run_case, columns=COLUMNS, render_markdown=render_markdown,
        title="DPO loss from hidden states, fwd+bwd")


if __name__ == "__main__":
    main()
