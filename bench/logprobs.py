"""Forward + backward of a DPO loss from logits: pyalign's backends against eager PyTorch (both
styles), torch.compile and Liger-Kernel, in one process, on the same inputs (SPEC section 4).

    python -m bench.logprobs                      # CPU: 8x256x32000 fp32
    python -m bench.logprobs --device cuda        # the three SPEC shapes, bf16 and fp32

Workload: 4 pairs (8 sequences, chosen rows first), labels ignored (-100) on the first quarter of
positions, logits a random normal tensor requiring grad, fixed random reference log-probs. Every
method's loss value and logits gradient are checked against a float64 computation on the same
logits. Prints one table per case; writes JSON, markdown and a PNG chart under ``--out``.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch

from bench import common, report, runner
from bench.methods import IGNORE_INDEX, Method, dpo_loss, logits_methods, masked_labels

DEFAULTS = {
    "cpu": {"shapes": "8x256x32000", "dtypes": "fp32", "repeats": 5, "warmup": 1, "copy_mib": 256},
    "cuda": {"shapes": "8x1024x32000,8x1024x128256,8x4096x152064", "dtypes": "bf16,fp32",
             "repeats": 20, "warmup": 3, "copy_mib": 2048},
}
REFERENCE_CHUNK_BYTES = 256 * common.MIB


class LogitsCase:
    """The inputs of one (shape, dtype): logits [seqs, T, V] requiring grad, labels, reference
    log-probs. The logits can be regenerated bit for bit from the seed, which is how methods that
    overwrite them (in-place gradients) get fresh inputs without a second logits-sized copy."""

    def __init__(self, shape, dtype, device, logit_std: float, seed: int):
        seqs, time, vocab = shape
        if seqs % 2:
            raise ValueError(f"--shapes: the number of sequences must be even (pairs), got {seqs}")
        self.shape, self.dtype, self.device = shape, dtype, device
        self.logit_std, self.seed = logit_std, seed
        self.logits = torch.empty(shape, dtype=dtype, device=device, requires_grad=True)
        self._fill()
        self._fingerprint = self._take_fingerprint()
        self.dirty = False
        labels_gen = torch.Generator().manual_seed(seed + 1)
        labels = torch.randint(0, vocab, (seqs, time), generator=labels_gen)
        labels[:, : time // 4] = IGNORE_INDEX
        self.labels = labels.to(device)
        self.safe_labels, self.mask = masked_labels(self.labels)
        self.ref_logps = None  # set from the float64 reference (see main)

    @property
    def logits_bytes(self) -> int:
        return self.logits.numel() * self.logits.element_size()

    def _fill(self) -> None:
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        with torch.no_grad():
            self.logits.normal_(0.0, self.logit_std, generator=generator)

    def _take_fingerprint(self):
        """An integer sum of the logits' bit patterns (exact and independent of the reduction
        order, unlike a float sum; taken in 8M-element pieces, since a whole-tensor sum with an
        int64 dtype would cast a full copy first) and a strided sample of the logits."""
        bits = self.logits.detach().view(-1).view({2: torch.int16, 4: torch.int32, 8: torch.int64}
                                                  [self.logits.element_size()])
        step = 8 * common.MIB
        total = sum(int(bits[start:start + step].sum(dtype=torch.int64))
                    for start in range(0, bits.numel(), step))
        return total, self.logits.detach().view(-1)[:: 7919].clone()

    def restore(self) -> None:
        """Regenerate the logits if a method overwrote them, and prove they are the same."""
        if not self.dirty:
            return
        self._fill()
        total, sample = self._take_fingerprint()
        if total != self._fingerprint[0] or not torch.equal(sample, self._fingerprint[1]):
            raise RuntimeError("regenerating the logits from the seed gave different values")
        self.dirty = False


class Reference:
    """Float64 log-sum-exp per row, sequence log-probs, and the DPO loss and its gradient, computed
    chunk by chunk (never a float64 copy of all the logits)."""

    def __init__(self, case: LogitsCase):
        vocab = case.shape[-1]
        self.case = case
        self.rows_per_chunk = max(1, REFERENCE_CHUNK_BYTES // (vocab * 8))
        flat = case.logits.detach().view(-1, vocab)
        labels = case.safe_labels.view(-1, 1)
        mask = case.mask.view(-1)
        self.lse = torch.empty(flat.shape[0], dtype=torch.float64, device=case.device)
        token = torch.empty_like(self.lse)
        for start in range(0, flat.shape[0], self.rows_per_chunk):
            rows = slice(start, start + self.rows_per_chunk)
            x = flat[rows].double()
            self.lse[rows] = torch.logsumexp(x, dim=-1)
            token[rows] = (x.gather(1, labels[rows]).squeeze(1) - self.lse[rows]) * mask[rows]
            del x
        self.sequence = token.view(case.shape[:2]).sum(-1)

    def loss_and_dsequence(self, ref_logps: torch.Tensor) -> tuple[float, torch.Tensor]:
        sequence = self.sequence.clone().requires_grad_(True)
        loss = dpo_loss(sequence, ref_logps.double())
        (dsequence,) = torch.autograd.grad(loss, sequence)
        return loss.item(), dsequence

    def grad_errors(self, grad: torch.Tensor, dsequence: torch.Tensor) -> dict:
        """max |grad - ref| and ||grad - ref|| / ||ref|| over all logits (the case's logits must
        be the original ones again)."""
        seqs, time, vocab = self.case.shape
        flat = self.case.logits.detach().view(-1, vocab)
        grad_flat = grad.reshape(-1, vocab)
        labels = self.case.safe_labels.view(-1, 1)
        # Upstream gradient per position: d loss / d sequence log-prob, zero where ignored.
        coef = (dsequence.view(seqs, 1).expand(seqs, time).reshape(-1)
                * self.case.mask.view(-1).double())
        max_abs = diff_sq = ref_sq = 0.0
        finite = True
        for start in range(0, flat.shape[0], self.rows_per_chunk):
            rows = slice(start, start + self.rows_per_chunk)
            expected = torch.exp(flat[rows].double() - self.lse[rows, None])
            expected.mul_(-coef[rows, None])
            expected.scatter_add_(1, labels[rows], coef[rows, None])
            got = grad_flat[rows].double()
            finite = finite and bool(torch.isfinite(got).all())
            got.sub_(expected)
            max_abs = max(max_abs, got.abs().max().item())
            diff_sq += got.square().sum().item()
            ref_sq += expected.square().sum().item()
            del expected, got
        rel = (diff_sq**0.5) / ref_sq**0.5 if ref_sq > 0 else float("nan")
        return {"grad_max_abs_err": max_abs if finite else float("nan"),
                "grad_rel_err": rel if finite else float("nan")}


def prepare_method(case: LogitsCase, reference: Reference, method: Method, args):
    """Check the method against the reference, measure its peak memory, warm it up. Returns the
    result row and, when it ran, the ``(run_once, before_each)`` pair to time."""
    last_loss: list = []

    def run_once():
        x = case.logits.view_as(case.logits)  # a non-leaf view (no copy) that the loss sees
        loss = method.loss(x, case)
        (grad,) = torch.autograd.grad(loss, x)
        if method.overwrites_logits:
            case.dirty = True
        last_loss[:] = [loss.detach()]
        return (grad,)

    def check(row: dict):
        try:
            case.restore()
            (grad,) = run_once()  # also the first warm-up: compiles and autotunes happen here
            loss_value = last_loss[0].item()
            if grad.untyped_storage().data_ptr() == case.logits.untyped_storage().data_ptr():
                grad = grad.clone()  # the gradient sits in the logits' storage: keep it, then restore
            case.restore()
            ref_loss, dsequence = reference.loss_and_dsequence(case.ref_logps)
            row["loss"] = loss_value
            row["loss_abs_err"] = abs(loss_value - ref_loss)
            row.update(reference.grad_errors(grad, dsequence))
            del grad
            row.update(common.measure_peak(run_once, case.restore, case.device, [case.logits]))
            common.warm_up(run_once, case.restore, case.device, args.warmup)
            return run_once, case.restore
        finally:
            last_loss.clear()

    margin = 4 * REFERENCE_CHUNK_BYTES + 256 * common.MIB
    return runner.guarded_prepare(method, case.device, method.extra_bytes(case.logits) + margin, check)


def kernel_backends(device: torch.device) -> list[str]:
    """pyalign's compiled backends on this device (the float64 reference is no contender)."""
    try:
        import pyalign  # noqa: PLC0415
    except ImportError:
        return []
    wanted = ("cpu",) if device.type == "cpu" else ("triton", "cuda")
    return [name for name in pyalign.available_backends(device) if name in wanted]


def time_kernels(case: LogitsCase, floor_ms: float, copy_bytes_per_s: float, args) -> list[dict]:
    """The backend kernels alone, without autograd, the loss or any allocation the size of the
    logits: forward (``logp, norm``), backward into a gradient buffer allocated once (one read +
    one write), backward in place, and a copy of the logits into that buffer (one read + one
    write), timed in interleaved rounds so that a load that drifts (a shared machine) hits all
    alike. ``x_floor`` = (forward + backward) / the 3-pass floor of the run's copy bandwidth;
    ``x_copy`` = (forward + backward) / (1.5 x the copy timed alongside): the same ratio against
    the copy measured in the same rounds, robust to drift (issue 12: the CPU kernel within 2x).
    Bytes moved count what the kernels touch: ignored rows are not read."""
    from pyalign.ops.backends import get_backend  # noqa: PLC0415

    rows = []
    x3, labels2 = case.logits.detach(), case.labels
    kept_rows = int(case.mask.sum())
    row_bytes = case.logits_bytes // (case.shape[0] * case.shape[1])
    for name in kernel_backends(case.device):
        backend = get_backend(name)
        row = {"backend": name}
        try:
            logp, norm = backend.forward(x3, labels2, IGNORE_INDEX)
            grad2 = torch.ones_like(logp)
            out = torch.empty_like(x3)

            def in_place(backend=backend, norm=norm, grad2=grad2):
                backend.backward(x3, labels2, norm, grad2, IGNORE_INDEX, x3)
                case.dirty = True

            entries = [(functools.partial(out.copy_, x3), case.restore),
                       (functools.partial(backend.forward, x3, labels2, IGNORE_INDEX), case.restore),
                       (functools.partial(backend.backward, x3, labels2, norm, grad2, IGNORE_INDEX, out),
                        case.restore),
                       (in_place, case.restore)]
            for run_once, before in entries:
                common.warm_up(run_once, before, case.device, args.warmup + 1)
            copy, forward, backward, backward_in_place = common.time_interleaved(entries, case.device,
                                                                                 args.repeats)
            out = None
            case.restore()
        except Exception as err:  # noqa: BLE001 - one failing kernel must not lose the others
            row["skipped"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            rows.append(row)
            continue
        fwd_bytes = kept_rows * row_bytes
        bwd_bytes = fwd_bytes + case.logits_bytes
        row.update({
            "forward_ms": forward["median_ms"], "forward_iqr_ms": forward["iqr_ms"],
            "backward_ms": backward["median_ms"], "backward_iqr_ms": backward["iqr_ms"],
            "backward_inplace_ms": backward_in_place["median_ms"], "copy_ms": copy["median_ms"],
            "forward_gb_per_s": fwd_bytes / forward["median_ms"] / 1e6,
            "backward_gb_per_s": bwd_bytes / backward["median_ms"] / 1e6,
            "copy_alongside_gb_per_s": 2 * case.logits_bytes / copy["median_ms"] / 1e6,
            "copy_gb_per_s": copy_bytes_per_s / 1e9,
        })
        row["total_ms"] = row["forward_ms"] + row["backward_ms"]
        row["x_floor"] = row["total_ms"] / floor_ms
        row["x_copy"] = row["total_ms"] / (1.5 * copy["median_ms"])
        row["x_floor_inplace"] = (row["forward_ms"] + row["backward_inplace_ms"]) / floor_ms
        rows.append(row)
    return rows


def measure_ceilings(args, device, dtypes) -> dict:
    return {"copy": common.copy_bandwidth(device, args.copy_mib * common.MIB)}


def run_case(shape, dtype, device, methods_filter, args, ceilings) -> dict:
    case = LogitsCase(shape, dtype, device, args.logit_std, args.seed)
    reference = Reference(case)
    noise = torch.randn(shape[0], generator=torch.Generator().manual_seed(args.seed + 2))
    case.ref_logps = (reference.sequence.cpu() + noise.double()).float().to(device)
    ref_loss, _ = reference.loss_and_dsequence(case.ref_logps)
    floor_bytes = 3 * case.logits_bytes
    floor_ms = floor_bytes / ceilings["copy"]["bytes_per_s"] * 1e3
    label = f"{'x'.join(map(str, shape))} {common.dtype_name(dtype)}"
    kernels = time_kernels(case, floor_ms, ceilings["copy"]["bytes_per_s"], args) if args.kernels else []
    if kernels:
        print(f"\n## {label}: kernels alone, floor {floor_ms:.3f} ms")
        print(report.markdown_table(kernels, KERNEL_COLUMNS), flush=True)
    rows = runner.check_and_time_methods(
        logits_methods(device, methods_filter),
        lambda method: prepare_method(case, reference, method, args), device, args.repeats, label)
    eager = next((r for r in rows if r["method"] == "eager_fp32" and "median_ms" in r), None)
    for row in rows:
        if "median_ms" not in row:
            continue
        row["x_floor"] = row["median_ms"] / floor_ms
        row["extra_beyond_grad_frac_of_logits"] = (
            (row["peak_extra_bytes"] - row["grad_bytes"]) / case.logits_bytes)
        if eager:
            row["speedup_vs_eager"] = eager["median_ms"] / row["median_ms"]
    del case, reference
    common.release_memory(device)
    return {"label": label, "shape": list(shape), "dtype": common.dtype_name(dtype),
            "logits_bytes": floor_bytes // 3, "floor_bytes": floor_bytes, "floor_ms": floor_ms,
            "reference_loss": ref_loss, "kernels": kernels, "methods": rows}


COLUMNS = [
    ("method", "method", ""), ("median ms", "median_ms", ".3f"), ("IQR ms", "iqr_ms", ".3f"),
    ("x floor", "x_floor", ".2f"), ("vs eager", "speedup_vs_eager", ".2f"),
    ("peak extra GiB", "peak_extra_gib", ".3f"), ("grad GiB", "grad_gib", ".3f"),
    ("extra beyond grad GiB", "extra_beyond_grad_gib", ".3f"),
    ("|loss err|", "loss_abs_err", ".1e"), ("grad max err", "grad_max_abs_err", ".1e"),
    ("grad rel err", "grad_rel_err", ".1e"), ("skipped / note", "status", ""),
]
KERNEL_COLUMNS = [
    ("kernel", "backend", ""), ("forward ms", "forward_ms", ".3f"), ("backward ms", "backward_ms", ".3f"),
    ("fwd + bwd ms", "total_ms", ".3f"), ("x floor", "x_floor", ".2f"),
    ("copy alongside ms", "copy_ms", ".3f"), ("x (1.5 x copy alongside)", "x_copy", ".2f"),
    ("backward in place ms", "backward_inplace_ms", ".3f"), ("x floor (in place)", "x_floor_inplace", ".2f"),
    ("forward GB/s", "forward_gb_per_s", ".1f"), ("backward GB/s", "backward_gb_per_s", ".1f"),
    ("skipped", "skipped", ""),
]


def render_markdown(payload: dict) -> str:
    env = payload["environment"]
    columns = list(COLUMNS)
    if env["device_type"] == "cpu":
        columns.insert(8, ("RSS peak GiB", "rss_peak_extra_gib", ".3f"))
        columns.insert(3, ("page faults / call", "minor_faults_per_call", ""))
    lines = [
        f"# DPO loss from logits, forward + backward: {env['device']}", "",
        f"`{env['command']}`  ",
        report.versions_line(env, "liger_kernel"),
        f"copy bandwidth {payload['ceilings']['copy']['bytes_per_s'] / 1e9:.1f} GB/s (read + write); "
        "floor = 3 x logits bytes / copy bandwidth; median of "
        f"{payload['settings']['repeats']} after {payload['settings']['warmup']} warm-up; "
        "errors against float64 on the same inputs", "",
    ]
    for case in payload["cases"]:
        rows = runner.with_status(case["methods"])
        for row in rows:
            if row.get("rss_peak_extra_bytes") is not None:
                row["rss_peak_extra_gib"] = row["rss_peak_extra_bytes"] / common.GIB
        lines += [f"## {case['label']} (logits {case['logits_bytes'] / common.GIB:.3f} GiB, "
                  f"floor {case['floor_ms']:.3f} ms)", "", report.markdown_table(rows, columns), ""]
        if case.get("kernels"):
            lines += ["Kernels alone (no autograd, no loss, gradient buffer allocated once; interleaved with "
                      "a copy of the logits, whose time x 1.5 is a 3-pass floor measured alongside; bytes "
                      "moved: kept rows read forward, kept rows read + all rows written backward):", "",
                      report.markdown_table(case["kernels"], KERNEL_COLUMNS), ""]
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.logprobs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", help="seqs x T x V, comma separated (default depends on --device)")
    parser.add_argument("--dtypes", help="fp32, bf16, fp16, comma separated")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--methods", default="",
                        help="only methods whose name starts with one of these (comma separated)")
    parser.add_argument("--logit-std", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    parser.add_argument("--copy-mib", type=int, help="buffer size of the copy-bandwidth measurement")
    parser.add_argument("--no-kernels", dest="kernels", action="store_false",
                        help="skip timing the backend kernels alone (forward, backward, in place)")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    return runner.finish_args(parser, argv, DEFAULTS)


def main(argv=None) -> dict:
    return runner.run_benchmark(
        "logprobs", argv, parse_args=parse_args, shape_rank=3, measure_ceilings=measure_ceilings,
        run_case=run_case, columns=COLUMNS, render_markdown=render_markdown,
        title="DPO loss from logits, fwd+bwd")


if __name__ == "__main__":
    main()
