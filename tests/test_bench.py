"""Smoke tests of the benchmarks (tiny shapes, CPU): the JSON they write, and that their
correctness checks and memory tracker can tell right from wrong."""

import json
import os

import pytest
import torch

from bench import common, linear, logprobs, runner
from bench.methods import Method, dpo_loss


def _load(out_dir, kind):
    files = sorted(out_dir.glob(f"{kind}_*.json"))
    assert len(files) == 1, files
    assert files[0].with_suffix(".md").exists()
    return json.loads(files[0].read_text())


def test_logprobs_bench_writes_checked_numbers(tmp_path):
    logprobs.main(["--device", "cpu", "--shapes", "2x16x100", "--dtypes", "fp32", "--repeats", "2",
                   "--warmup", "0", "--threads", "1", "--copy-mib", "8", "--methods",
                   "pyalign[cpu],eager_fp32,trl_rowloop", "--out", str(tmp_path)])
    payload = _load(tmp_path, "logprobs")
    assert payload["environment"]["torch"] == torch.__version__
    assert payload["environment"]["command"].startswith("python -m bench.logprobs")
    assert payload["memory_tracker"]["ok"], payload["memory_tracker"]
    assert payload["ceilings"]["copy"]["bytes_per_s"] > 0
    (case,) = payload["cases"]
    assert case["shape"] == [2, 16, 100] and case["floor_ms"] > 0
    rows = {row["method"]: row for row in case["methods"]}
    expected = {"eager_fp32", "trl_rowloop"}
    try:
        import pyalign

        if "cpu" in pyalign.available_backends("cpu"):
            expected |= {"pyalign[cpu]", "pyalign[cpu]+inplace"}
    except ImportError:
        pass
    assert expected <= set(rows), rows.keys()
    for name in expected:
        row = rows[name]
        assert "skipped" not in row, row
        assert row["repeats"] == 2 and row["median_ms"] > 0 and row["min_ms"] <= row["median_ms"]
        assert row["loss_abs_err"] < 1e-5 and row["grad_rel_err"] < 1e-5, row
        # 2*16*100 fp32 logits are 12.5 KiB; every method returns a gradient of that size
        # unless it writes it into the logits.
        logits_bytes = 2 * 16 * 100 * 4
        assert row["grad_bytes"] in (0, logits_bytes)
        assert row["peak_extra_bytes"] >= row["grad_bytes"]
    if "pyalign[cpu]+inplace" in rows:
        assert rows["pyalign[cpu]+inplace"]["grad_bytes"] == 0
        assert rows["pyalign[cpu]"]["grad_bytes"] == 2 * 16 * 100 * 4
    assert rows["eager_fp32"]["speedup_vs_eager"] == pytest.approx(1.0)
    assert all(row["minor_faults_per_call"] >= 0 for row in rows.values())
    if "pyalign[cpu]" in rows:  # the kernels alone, against the same floor
        (kernel,) = case["kernels"]
        assert kernel["backend"] == "cpu" and "skipped" not in kernel, kernel
        assert kernel["total_ms"] == pytest.approx(kernel["forward_ms"] + kernel["backward_ms"])
        assert kernel["x_floor"] == pytest.approx(kernel["total_ms"] / case["floor_ms"])


def test_page_faults_per_call_see_fresh_memory():
    """A call that writes a fresh 64 MiB tensor faults once per 4 KiB page (glibc maps blocks
    this big anew and unmaps them on free); one that rewrites a kept buffer does not."""
    if os.environ.get("THP_MEM_ALLOC_ENABLE"):
        pytest.skip("THP_MEM_ALLOC_ENABLE is set: torch backs big tensors with 2 MiB pages here")
    kept = torch.empty(16 << 20)
    kept.fill_(0.0)
    fresh, reused = common.time_interleaved(
        [(lambda: torch.empty(16 << 20).fill_(1.0), lambda: None), (lambda: kept.fill_(1.0), lambda: None)],
        torch.device("cpu"), repeats=3)
    pages = (64 << 20) // 4096
    assert fresh["minor_faults_per_call"] >= 0.9 * pages
    assert reused["minor_faults_per_call"] < 0.01 * pages


def test_linear_bench_writes_checked_numbers(tmp_path):
    linear.main(["--device", "cpu", "--shapes", "2x8x16x50", "--dtypes", "fp32", "--repeats", "1",
                 "--warmup", "0", "--threads", "1", "--matmul-size", "64", "--methods", "eager,pyalign,trl",
                 "--out", str(tmp_path)])
    payload = _load(tmp_path, "linear")
    (case,) = payload["cases"]
    assert case["tokens"] == 16 and case["kept_tokens"] == 2 * (8 - 8 // 4)
    rows = {row["method"]: row for row in case["methods"]}
    assert {"eager", "eager_rowloop"} <= set(rows)
    assert {"trl_chunked", "trl_chunked[dpo-outputs]"} <= set(rows)  # TRL 1.16's fused lm_head, CPU path
    for row in rows.values():
        if row.get("skipped", "").startswith(("pyalign's fused-linear op not importable",
                                              "trl's chunked log-prob not importable")):
            continue
        assert "skipped" not in row, row
        assert row["loss_abs_err"] < 1e-5, row
        assert row["grad_hidden_rel_err"] < 1e-5 and row["grad_weight_rel_err"] < 1e-5, row


def test_reference_grad_check_catches_a_wrong_gradient():
    case = logprobs.LogitsCase((2, 8, 50), torch.float32, torch.device("cpu"), 1.0, seed=3)
    reference = logprobs.Reference(case)
    case.ref_logps = reference.sequence.float() + 1.0
    x = case.logits.view_as(case.logits)
    loss = dpo_loss(torch.log_softmax(x, -1).gather(-1, case.safe_labels[..., None])[..., 0]
                    .mul(case.mask).sum(-1), case.ref_logps)
    (grad,) = torch.autograd.grad(loss, x)
    _, dsequence = reference.loss_and_dsequence(case.ref_logps)
    assert reference.grad_errors(grad, dsequence)["grad_rel_err"] < 1e-6
    wrong = grad.clone()
    wrong[0, -1, 7] += 1e-3  # one element off
    assert reference.grad_errors(wrong, dsequence)["grad_max_abs_err"] == pytest.approx(1e-3, rel=1e-3)


def test_logits_regenerate_bit_for_bit():
    case = logprobs.LogitsCase((2, 4, 30), torch.bfloat16, torch.device("cpu"), 1.0, seed=5)
    before = case.logits.detach().clone()
    with torch.no_grad():
        case.logits.zero_()
    case.dirty = True
    case.restore()
    assert torch.equal(case.logits.detach(), before)


def test_cpu_tracker_sees_a_known_allocation():
    check = common.verify_cpu_tracker()
    assert check["ok"], check
    peak, _ = common.cpu_tensor_peak(lambda: torch.ones(1 << 20).sum())  # 4 MiB, then freed
    assert 4 << 20 <= peak < 5 << 20


def test_local_dpo_matches_pyalign_dpo():
    losses = pytest.importorskip("pyalign.losses")
    gen = torch.Generator().manual_seed(0)
    policy, ref = torch.randn(8, generator=gen) * 5, torch.randn(8, generator=gen) * 5
    expected = losses.dpo(policy[:4], policy[4:], ref[:4], ref[4:], beta=0.1).loss
    assert dpo_loss(policy, ref, beta=0.1).item() == pytest.approx(expected.item(), rel=1e-6)


def test_shapes_and_dtypes_are_validated():
    assert common.parse_shapes("8x256x32000, 2x3x4", rank=3) == [(8, 256, 32000), (2, 3, 4)]
    with pytest.raises(ValueError, match="--shapes"):
        common.parse_shapes("8x256", rank=3)
    with pytest.raises(ValueError, match="--dtypes"):
        common.parse_dtypes("fp8")
    with pytest.raises(ValueError, match="--shapes"):
        logprobs.LogitsCase((3, 4, 5), torch.float32, torch.device("cpu"), 1.0, seed=0)


def test_a_failing_or_missing_method_is_skipped_with_its_reason():
    cpu = torch.device("cpu")

    def broken_check(row):
        raise RuntimeError("kernel exploded\nsecond line")

    def no_bytes(*_):
        return 0

    row, entry = runner.guarded_prepare(Method("broken", lambda x, case: x.sum(), no_bytes), cpu, 0, broken_check)
    assert entry is None and row == {"method": "broken", "skipped": "failed: RuntimeError: kernel exploded"}
    row, entry = runner.guarded_prepare(Method("absent", None, no_bytes, note="not installed"), cpu, 0, broken_check)
    assert entry is None and row == {"method": "absent", "skipped": "not installed"}
    row, entry = runner.guarded_prepare(Method("huge", lambda x, case: x.sum(), no_bytes), cpu, 1 << 60, broken_check)
    assert entry is None and row["skipped"].startswith("would need ~")
    timed = (lambda: (), lambda: None)
    row, entry = runner.guarded_prepare(Method("fine", lambda x, case: x.sum(), no_bytes, note="n"), cpu, 0,
                                        lambda row: timed)
    assert entry is timed and row == {"method": "fine", "note": "n"}


def test_repeats_must_be_positive():
    with pytest.raises(SystemExit):
        logprobs.parse_args(["--device", "cpu", "--repeats", "0"])
    args, device = linear.parse_args(["--device", "cpu", "--logit-std", "flat"])
    assert device.type == "cpu" and args.logit_std == 1.0 and args.repeats == linear.DEFAULTS["cpu"]["repeats"]


def test_kernel_sweep_suggests_one_line_from_its_timings():
    """The auto table changes only where the other kernel is faster by more than 3 %, and the
    best Triton settings are those with the least total time over the sweep's cases."""
    from bench import kernel_sweep
    from pyalign.ops.backends import AUTO_CUDA

    kinds = [{"kind": "aligned/many_rows", "triton_ms": 1.00, "cuda_ms": 0.99},   # within noise: keep
             {"kind": "unaligned/few_rows", "triton_ms": 1.00, "cuda_ms": 0.80}]  # clearly faster
    sweep = [{"num_stages": s, "block_v": 4096, "num_warps": 8, "forward_ms": f, "backward_ms": 1.0}
             for s, f in ((1, 2.0), (3, 1.5))] + [{"num_stages": 2, "block_v": 2048, "num_warps": 4,
                                                   "skipped": "OutOfResources"}]
    suggested = kernel_sweep.suggestions(sweep, kinds)
    expected = {**AUTO_CUDA, "aligned/many_rows": AUTO_CUDA["aligned/many_rows"]}
    if AUTO_CUDA["unaligned/few_rows"] == "triton":
        expected["unaligned/few_rows"] = "cuda"
    assert suggested["AUTO_CUDA"] == expected
    assert suggested["auto_line"].startswith("AUTO_CUDA = {")
    assert suggested["best_settings"]["num_stages"] == 3
