"""linear_token_logprobs against ``hidden @ weight.T + bias`` and the float64 reference: values,
the three gradients, both modes, chunk boundaries, ignored labels, precision of the weight-gradient
accumulation, the approximate gradient filter, the chunk buffer size, and bad input. GPU tests
(N*V > 2^31, peak memory) skip without CUDA."""

import pytest
import torch

import pyalign
from pyalign.ops import linear_chunks
from pyalign.ops import linear_token_logprobs as lin
from pyalign.ops.backends import available_backends
from pyalign.reference import reference_token_logprobs, reference_token_stats
from tests.backends_under_test import DEVICE, backends_for_device

MODES = ["default", "low_memory"]
BACKENDS = backends_for_device()


def make_case(rows=2, time=13, width=16, vocab=50, dtype=torch.float32, *, seed=0, bias=True,
              ignore_fraction=0.25, scale=1.0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, time, width, generator=gen)
    weight = torch.randn(vocab, width, generator=gen) * scale / width ** 0.5 * 3
    bias_t = torch.randn(vocab, generator=gen) if bias else None
    labels = torch.randint(0, vocab, (rows, time), generator=gen)
    labels[torch.rand(rows, time, generator=gen) < ignore_fraction] = -100
    labels[-1] = -100  # a fully ignored row
    upstream = torch.randn(rows, time, generator=gen)
    move = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return move(hidden), move(weight), move(bias_t), labels.to(device), upstream.to(device)


def run_fused(hidden, weight, bias, labels, upstream, *, requires=(True, True, True), **kwargs):
    leaves = [t.detach().clone().requires_grad_(r) if t is not None else None
              for t, r in zip((hidden, weight, bias), requires)]
    out = pyalign.linear_token_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], **kwargs)
    (out.double() * upstream.double()).sum().backward()
    return out, [None if t is None or not t.requires_grad else t.grad for t in leaves]


def run_reference(hidden, weight, bias, labels, upstream, *, requires=(True, True, True)):
    """Materialised logits in the inputs' dtype, then the float64 reference op."""
    leaves = [t.detach().clone().requires_grad_(r) if t is not None else None
              for t, r in zip((hidden, weight, bias), requires)]
    logits = leaves[0] @ leaves[1].T
    if leaves[2] is not None:
        logits = logits + leaves[2]
    out = reference_token_logprobs(logits, labels)
    (out.double() * upstream.double()).sum().backward()
    return out, [None if t is None or not t.requires_grad else t.grad for t in leaves]


def assert_matches(fused, reference, atol, rtol):
    out, grads = fused
    ref_out, ref_grads = reference
    torch.testing.assert_close(out.double(), ref_out.double(), atol=atol, rtol=rtol)
    for name, grad, ref_grad in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert (grad is None) == (ref_grad is None), name
        if grad is not None:
            assert grad.dtype == ref_grad.dtype, name
            torch.testing.assert_close(grad.double(), ref_grad.double(), atol=atol, rtol=rtol,
                                       msg=lambda m, n=name: f"grad of {n}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk_size", [None, 1, 5, 7, 64])
def test_fp32_values_and_three_grads(backend, mode, chunk_size):
    if backend not in available_backends(DEVICE):
        pytest.skip(f"backend {backend} is not available here")
    case = make_case()
    fused = run_fused(*case, mode=mode, chunk_size=chunk_size, backend=backend)
    assert fused[0].dtype == torch.float32 and fused[0].shape == case[3].shape
    assert torch.all(fused[0][case[3] == -100] == 0)
    assert torch.all(fused[1][0][-1] == 0)  # the fully ignored row gets no gradient
    assert_matches(fused, run_reference(*case), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("requires", [(True, False, False), (True, False, True), (False, True, False),
                                      (True, True, False)])
def test_any_subset_of_grads(mode, requires):
    """The frozen-weight path (grad_hidden formed in the forward) and the recompute path agree."""
    case = make_case(seed=3)
    assert_matches(run_fused(*case, requires=requires, mode=mode, chunk_size=4),
                   run_reference(*case, requires=requires), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("mode", MODES)
def test_without_bias_and_other_layouts(mode):
    hidden, weight, _, labels, upstream = make_case(seed=1, bias=False)
    assert_matches(run_fused(hidden, weight, None, labels, upstream, mode=mode, chunk_size=6),
                   run_reference(hidden, weight, None, labels, upstream), atol=2e-5, rtol=2e-5)
    # [N, H] with labels [N], and a non-contiguous hidden (a shifted view).
    flat = (hidden.reshape(-1, hidden.shape[-1]), weight, None, labels.reshape(-1), upstream.reshape(-1))
    assert_matches(run_fused(*flat, mode=mode), run_reference(*flat), atol=2e-5, rtol=2e-5)
    shifted = (hidden[:, :-1], weight, None, labels[:, 1:], upstream[:, 1:])
    assert_matches(run_fused(*shifted, mode=mode, chunk_size=3), run_reference(*shifted),
                   atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_against_materialised_logits(mode, dtype):
    """Logits in the input dtype, like ``hidden @ weight.T``: against the float64 truth the fused
    op is about as close as the materialised half-precision path (one rounding of the logits, one
    of d_logits, fp32 accumulation), and within 2% of each quantity's largest magnitude."""
    case = make_case(time=24, vocab=70, dtype=dtype, seed=2, scale=4.0)
    fused = run_fused(*case, mode=mode, chunk_size=8)
    assert fused[0].dtype == torch.float32 and all(g.dtype == dtype for g in fused[1])
    materialised = run_reference(*case)
    as_double = [None if t is None else (t.double() if t.is_floating_point() else t) for t in case]
    truth = run_reference(*as_double)
    pairs = [(fused[0], materialised[0], truth[0])] + list(zip(fused[1], materialised[1], truth[1]))
    for ours, eager, exact in pairs:
        ours_err = (ours.double() - exact).abs().max().item()
        eager_err = (eager.double() - exact).abs().max().item()
        assert ours_err <= 2 * eager_err + 1e-6
        assert ours_err <= 0.02 * exact.abs().max().item()


def test_float64_gradcheck():
    hidden, weight, bias, labels, _ = make_case(rows=2, time=3, width=4, vocab=6, dtype=torch.float64, seed=4)
    for mode in MODES:
        for requires in [(True, True, True), (True, False, False)]:
            inputs = [t.detach().clone().requires_grad_(r) for t, r in zip((hidden, weight, bias), requires)]

            def fn(h, w, b, mode=mode):
                return pyalign.linear_token_logprobs(h, w, labels, bias=b, mode=mode, chunk_size=2)

            assert torch.autograd.gradcheck(fn, inputs)


def test_weight_gradient_is_rounded_once():
    """Many bf16 chunks of tokens: the weight gradient is formed one vocabulary block at a time,
    each block one matmul over all tokens (fp32 inside, one rounding), so it stays within about
    one bf16 rounding of the exact one, closer than a bf16 running sum over token chunks; and
    weight_grad_dtype, which only matters where gradients are summed over chunks, changes nothing."""
    case = make_case(rows=1, time=256, width=8, vocab=16, dtype=torch.bfloat16, seed=5, ignore_fraction=0)
    hidden, weight, _, labels, upstream = case
    labels = torch.randint(0, 16, labels.shape, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    _, (_, grad_weight, _) = run_fused(hidden, weight, None, labels, upstream,
                                       requires=(False, True, False), chunk_size=4)
    exact = run_reference(hidden.double(), weight.double(), None, labels, upstream,
                          requires=(False, True, False))[1][1]
    # The same chunk products summed in bf16, as a plain running sum would.
    logits = hidden.reshape(-1, 8) @ weight.T
    d = (torch.nn.functional.one_hot(labels.reshape(-1), 16) - logits.float().softmax(-1))
    d = (d * upstream.reshape(-1, 1)).to(torch.bfloat16)
    running = torch.zeros_like(weight)
    for start in range(0, 256, 4):
        running += d[start:start + 4].T @ hidden.reshape(-1, 8)[start:start + 4]
    ours = (grad_weight.double() - exact).abs().max().item()
    naive = (running.double() - exact).abs().max().item()
    assert ours <= exact.abs().max().item() * 2 ** -7
    assert ours < naive
    _, (_, same, _) = run_fused(hidden, weight, None, labels, upstream, requires=(False, True, False),
                                chunk_size=4, weight_grad_dtype=torch.bfloat16)
    assert torch.equal(same, grad_weight)


def test_gradient_filter_is_off_by_default_and_bounded_when_on():
    case = make_case(time=32, width=8, vocab=3 * lin.FILTER_BLOCK + 5, seed=7, scale=6.0)
    exact = run_fused(*case, chunk_size=16)
    same = run_fused(*case, chunk_size=16, grad_filter=1e-12)  # keeps every block here
    assert_matches(same, exact, atol=1e-6, rtol=1e-5)
    filtered = run_fused(*case, chunk_size=16, grad_filter=0.5, mode="low_memory")
    torch.testing.assert_close(filtered[0], exact[0])  # the filter never touches values
    hidden = case[0]
    # Each dropped element of d_logits is below 0.5 * max|g|, so the hidden gradient moves by at
    # most 0.5 * max|g| * sum_v |W_v| per token.
    bound = 0.5 * case[4].abs().max() * case[1].abs().sum(0).max()
    assert (filtered[1][0] - exact[1][0]).abs().max() <= bound
    assert filtered[1][0].shape == hidden.shape


def test_kept_vocab_runs_skips_small_blocks_and_merges_neighbours():
    block = lin.FILTER_BLOCK
    d = torch.zeros(3, 4 * block + 10)
    d[1, 5] = 0.9            # block 0
    d[0, block + 7] = -0.8   # block 1 (negative: |d| counts)
    d[2, 3 * block + 1] = 1e-4  # block 3: below the limit
    d[1, 4 * block + 3] = 0.7   # the tail
    assert lin.kept_vocab_runs(d, None, 1.0) == [(0, d.shape[1])]
    assert lin.kept_vocab_runs(d, 0.01, 1.0) == [(0, 2 * block), (4 * block, 4 * block + 10)]
    assert lin.kept_vocab_runs(d, 0.01, 100.0) == []


def test_chunk_buffer_respects_the_memory_budget(monkeypatch):
    """Every logits buffer the op allocates holds at most ``memory_budget`` bytes: chunks of
    tokens forward, blocks of vocabulary columns over all kept tokens backward."""
    seen = []
    original = lin.linear_into

    def recording(out, hidden_rows, weight, bias):
        seen.append(out.numel() * out.element_size())
        return original(out, hidden_rows, weight, bias)

    monkeypatch.setattr(lin, "linear_into", recording)
    monkeypatch.setattr(linear_chunks, "linear_into", recording)
    case = make_case(rows=3, time=40, vocab=200, seed=8, ignore_fraction=0)
    budget = 7 * 200 * 4  # seven rows of fp32 logits
    for mode in MODES:
        seen.clear()
        run_fused(*case, mode=mode, memory_budget=budget)
        assert seen and max(seen) <= budget
        columns = budget // (80 * 4)  # 17 columns of the 80 kept tokens
        assert len(seen) == -(-80 // 7) + -(-200 // columns)
    assert lin.rows_for_budget(256 * lin.MIB, 128256, torch.bfloat16, 10 ** 6) == 1024
    assert lin.rows_for_budget(32 * lin.MIB, 128256, torch.bfloat16, 10 ** 6) == 128
    assert lin.rows_for_budget(1, 128256, torch.bfloat16, 10 ** 6) == 1
    assert lin.rows_for_budget(256 * lin.MIB, 32000, torch.bfloat16, 100) == 100


def test_ignored_tokens_cost_no_matmul(monkeypatch):
    rows_seen = []
    original = lin.linear_into
    monkeypatch.setattr(lin, "linear_into",
                        lambda out, h, w, b: rows_seen.append(h.shape[0]) or original(out, h, w, b))
    hidden, weight, bias, labels, upstream = make_case(seed=9)
    run_fused(hidden, weight, bias, labels, upstream, requires=(True, False, False))
    assert sum(rows_seen) == int((labels != -100).sum())  # one forward pass, no recompute


def test_no_grad_empty_and_all_ignored():
    hidden, weight, bias, labels, _ = make_case(seed=10)
    with torch.no_grad():
        out = pyalign.linear_token_logprobs(hidden.requires_grad_(), weight, labels, bias=bias)
    assert out.grad_fn is None
    ref = reference_token_logprobs(hidden @ weight.T + bias, labels)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)

    empty = hidden[:, :0].detach().requires_grad_()
    out = pyalign.linear_token_logprobs(empty, weight, labels[:, :0])
    assert out.shape == (2, 0)
    out.sum().backward()

    ignored = torch.full_like(labels, -100)
    leaf = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    out = pyalign.linear_token_logprobs(leaf, w, ignored)
    assert torch.all(out == 0)
    out.sum().backward()
    assert torch.all(leaf.grad == 0) and torch.all(w.grad == 0)


def test_custom_ignore_index():
    hidden, weight, bias, labels, upstream = make_case(seed=11)
    labels = torch.where(labels == -100, torch.full_like(labels, 7), labels)
    fused = pyalign.linear_token_logprobs(hidden, weight, labels, bias=bias, ignore_index=7)
    ref = reference_token_logprobs(hidden @ weight.T + bias, labels, ignore_index=7)
    torch.testing.assert_close(fused, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("bad, message", [
    (dict(weight=torch.randn(50, 15)), "weight: expected \\[V, 16\\]"),
    (dict(weight=torch.randn(50)), "weight: expected shape \\[V, H\\]"),
    (dict(weight=torch.randn(50, 16, dtype=torch.float64)), "weight: expected dtype"),
    (dict(bias=torch.randn(49)), "bias: expected shape \\[50\\]"),
    (dict(bias=torch.randn(50, dtype=torch.float64)), "bias: expected dtype"),
    (dict(labels=torch.zeros(2, 12, dtype=torch.long)), "labels: expected shape"),
    (dict(labels=torch.zeros(2, 13)), "labels: expected an integer dtype"),
    (dict(labels=torch.full((2, 13), 50)), "labels: every label must be in \\[0, 50\\)"),
    (dict(hidden=torch.zeros(2, 13, 16, dtype=torch.long)), "hidden: expected float32"),
    (dict(mode="fast"), "mode: expected one of"),
    (dict(chunk_size=0), "chunk_size: expected a positive int"),
    (dict(memory_budget=-5), "memory_budget: expected a positive number"),
    (dict(grad_filter=1.5), "grad_filter: expected None or a threshold"),
    (dict(backend="nope"), "backend: expected one of"),
    (dict(ignore_index=None), "ignore_index: expected an int"),
    (dict(ignore_index=False), "ignore_index: expected an int, got bool False"),
    (dict(ignore_index=-100.0), "ignore_index: expected an int, got float"),
    (dict(return_stats=1), "return_stats: expected True or False, got int 1"),
    (dict(chunk_size=True), "chunk_size: expected a positive int"),
    (dict(memory_budget=True), "memory_budget: expected a positive number"),
    (dict(grad_filter=True), "grad_filter: expected None or a threshold"),
    (dict(mode=["default"]), "mode: expected one of"),
    (dict(logit_scale=0.0), "logit_scale: expected a finite positive float"),
    (dict(softcap=True), "softcap: expected None or a finite positive float"),
    (dict(weight_grad_dtype=torch.float16), "weight_grad_dtype: expected None, torch.float32"),
])
def test_bad_input_names_the_argument(bad, message):
    hidden, weight, bias, labels, _ = make_case(device="cpu")
    args = dict(hidden=hidden, weight=weight, labels=labels, bias=bias)
    args.update(bad)
    kwargs = {k: v for k, v in args.items() if k not in ("hidden", "weight", "labels")}
    with pytest.raises(ValueError, match=message):
        pyalign.linear_token_logprobs(args["hidden"], args["weight"], args["labels"], **kwargs)


def test_weight_gradient_with_an_ignore_index_inside_the_vocabulary():
    """The vocabulary-major backward hands the kernels block-local labels: an ignore_index that
    is a valid token id elsewhere (7 here) must not silence any row of any block."""
    hidden, weight, bias, labels, upstream = make_case(seed=16, vocab=40)
    labels = torch.where(labels == -100, torch.full_like(labels, 7), labels)
    labels[0, :3] = torch.tensor([8, 0, 39])  # a label right after the ignore index, and both ends
    for chunk_size in (None, 3):
        leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
        out = pyalign.linear_token_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], ignore_index=7,
                                            chunk_size=chunk_size)
        (out.double() * upstream.double()).sum().backward()
        ref_leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
        ref = reference_token_logprobs(ref_leaves[0] @ ref_leaves[1].T + ref_leaves[2], labels, ignore_index=7)
        (ref.double() * upstream.double()).sum().backward()
        for leaf, ref_leaf in zip(leaves, ref_leaves):
            torch.testing.assert_close(leaf.grad, ref_leaf.grad, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("mode", MODES)
def test_no_float32_weight_gradient_buffer(mode):
    """Peak CPU memory of forward + backward with a trainable bf16 lm_head, from the profiler's
    allocation events: the gradients, one logits block within the budget, the kept hidden rows
    and their float32 gradient accumulator, and nothing the size of the weight in float32 (the
    [V, H] accumulator summed over token chunks that the vocabulary-major backward removed)."""
    from bench.common import cpu_tensor_peak

    tokens, width, vocab, budget = 96, 64, 8192, 96 * 1024 * 2  # budget: 1024 bf16 columns of 96 tokens
    gen = torch.Generator().manual_seed(17)
    hidden = torch.randn(tokens, width, generator=gen).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(vocab, width, generator=gen) * 0.3).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=gen)

    def step():
        out = pyalign.linear_token_logprobs(hidden, weight, labels, mode=mode, memory_budget=budget)
        return torch.autograd.grad(out.sum(), [hidden, weight])

    step()
    peak, grads = cpu_tensor_peak(step)
    grad_bytes = sum(g.numel() * g.element_size() for g in grads)
    hidden_rows = tokens * width * (2 + 4)  # gathered kept rows (bf16) + float32 accumulator
    # 2 x budget: the block, and the float32 product a CPU bf16 matmul forms before rounding.
    assert peak <= grad_bytes + 2 * budget + hidden_rows + 256 * 1024, (peak, grad_bytes)
    assert peak < grad_bytes + vocab * width * 4  # the old float32 accumulator alone would exceed this


# --------------------------------------------------------------------------- per-token statistics


def _assert_stats_match(stats, ref, labels, atol, rtol, exact_argmax=True):
    assert set(stats) == set(lin.STAT_NAMES)
    for name in ("entropy", "mean_logits", "log_sum_sq_probs"):
        assert stats[name].dtype == ref[name].dtype and stats[name].shape == labels.shape, name
        assert not stats[name].requires_grad, name
        torch.testing.assert_close(stats[name], ref[name], atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")
    assert stats["argmax"].dtype == torch.int64 and stats["is_top1"].dtype == torch.bool
    ignored = labels == -100
    assert torch.all(stats["argmax"][ignored] == -1) and not stats["is_top1"][ignored].any()
    for name in ("entropy", "mean_logits", "log_sum_sq_probs"):
        assert torch.all(stats[name][ignored] == 0), name
    if exact_argmax:
        assert torch.equal(stats["argmax"], ref["argmax"]) and torch.equal(stats["is_top1"], ref["is_top1"])
    assert torch.equal(stats["is_top1"], (stats["argmax"] == labels) & ~ignored)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("requires", [None, (True, False, False), (True, True, True)])
def test_stats_against_the_reference(backend, requires):
    """Entropy, mean logit, log sum p^2, argmax and is_top1 from the chunks of the forward, with
    and without gradients (the frozen-weight path overwrites each chunk after reading it)."""
    if backend not in available_backends(DEVICE):
        pytest.skip(f"backend {backend} is not available here")
    hidden, weight, bias, labels, upstream = make_case(seed=12, scale=3.0)
    labels[0, :4] = torch.tensor([0, 1, 2, 3])  # some labels that are the argmax below
    with torch.no_grad():
        logits = hidden @ weight.T + bias
        labels[0, :4] = logits[0, :4].argmax(-1)
    ref = reference_token_stats(logits, labels)
    for chunk_size in (None, 5):
        if requires is None:
            with torch.no_grad():
                out, stats = pyalign.linear_token_logprobs(hidden, weight, labels, bias=bias, backend=backend,
                                                           chunk_size=chunk_size, return_stats=True)
        else:
            leaves = [t.detach().clone().requires_grad_(r) for t, r in zip((hidden, weight, bias), requires)]
            out, stats = pyalign.linear_token_logprobs(*leaves[:2], labels, bias=leaves[2], backend=backend,
                                                       chunk_size=chunk_size, return_stats=True)
            (out.double() * upstream.double()).sum().backward()
            ref_grads = run_reference(hidden, weight, bias, labels, upstream, requires=requires)[1]
            for leaf, ref_grad in zip(leaves, ref_grads):
                if leaf.requires_grad:
                    torch.testing.assert_close(leaf.grad.double(), ref_grad.double(), atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(out, reference_token_logprobs(logits, labels), atol=2e-5, rtol=2e-5)
        _assert_stats_match(stats, ref, labels, atol=2e-5, rtol=2e-5)
        assert stats["is_top1"][0, :4].all()


def test_stats_half_precision_and_ties():
    """bf16: against the float64 truth, the statistics are about as close as those of the
    materialised bf16 logits (one rounding of each logit); ties: the first maximal index is the
    argmax, so a label tied with an earlier token is not top-1."""
    hidden, weight, bias, labels, _ = make_case(time=24, vocab=70, dtype=torch.bfloat16, seed=13, scale=4.0)
    _, stats = pyalign.linear_token_logprobs(hidden, weight, labels, bias=bias, chunk_size=7, return_stats=True)
    eager = reference_token_stats(hidden @ weight.T + bias, labels)
    truth = reference_token_stats(hidden.double() @ weight.double().T + bias.double(), labels)
    _assert_stats_match(stats, eager, labels, atol=0.1, rtol=0.05, exact_argmax=False)
    for name in ("entropy", "mean_logits", "log_sum_sq_probs"):
        ours = (stats[name].double() - truth[name].double()).abs().max().item()
        materialised = (eager[name].double() - truth[name].double()).abs().max().item()
        assert ours <= 2 * materialised + 1e-6, name
    assert (stats["argmax"] == truth["argmax"]).float().mean() > 0.9  # bf16 rounding may break near-ties

    weight = torch.zeros(5, 2)
    weight[1] = weight[3] = torch.tensor([1.0, 0.0])  # tokens 1 and 3 always tie
    hidden = torch.tensor([[[2.0, 0.0], [2.0, 0.0], [-1.0, 0.0]]])
    labels = torch.tensor([[1, 3, -100]])
    _, stats = pyalign.linear_token_logprobs(hidden, weight, labels, return_stats=True)
    assert stats["argmax"].tolist() == [[1, 1, -1]] and stats["is_top1"].tolist() == [[True, False, False]]


def test_stats_match_trl_chunked_logprob():
    """The same definitions as TRL 1.16's ChunkedLogProbFunction (its torch tile path on the CPU),
    which TRL's DPOTrainer logs: on the kept positions, with zeros where the label is ignored."""
    chunked = pytest.importorskip("trl.kernels.chunked_logprob")
    hidden, weight, bias, labels, _ = make_case(rows=3, time=11, vocab=40, seed=14, scale=3.0, device="cpu")
    mask = labels != -100
    outputs = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    with torch.no_grad():
        trl_logp, trl_entropy, trl_sq, trl_mean, trl_top1 = chunked.ChunkedLogProbFunction.apply(
            hidden[mask], weight, bias, labels[mask], 1.0, 16, None, 1.0, outputs)
        logp, stats = pyalign.linear_token_logprobs(hidden, weight, labels, bias=bias, return_stats=True)
    torch.testing.assert_close(logp[mask], trl_logp, atol=1e-5, rtol=1e-5)
    for ours, theirs in ((stats["entropy"], trl_entropy), (stats["log_sum_sq_probs"], trl_sq),
                         (stats["mean_logits"], trl_mean)):
        torch.testing.assert_close(ours[mask], theirs, atol=1e-5, rtol=1e-5)
    assert torch.equal(stats["is_top1"][mask], trl_top1)


def test_stats_of_empty_and_fully_ignored_batches():
    hidden, weight, bias, labels, _ = make_case(seed=15)
    for labels_case, hidden_case in ((labels[:, :0], hidden[:, :0]), (torch.full_like(labels, -100), hidden)):
        logp, stats = pyalign.linear_token_logprobs(hidden_case, weight, labels_case, bias=bias, return_stats=True)
        assert logp.shape == labels_case.shape and set(stats) == set(lin.STAT_NAMES)
        assert all(v.shape == labels_case.shape for v in stats.values())
        assert torch.all(stats["argmax"] == -1) and torch.all(stats["entropy"] == 0)
    with pytest.raises(ValueError, match="return_stats: expected True or False"):
        pyalign.linear_token_logprobs(hidden, weight, labels, return_stats="yes")


# --------------------------------------------------------------------------- GPU suite


def _peak_extra_bytes(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@pytest.mark.gpu
@pytest.mark.parametrize("mode, budget", [("default", 256 * lin.MIB), ("low_memory", 32 * lin.MIB)])
@pytest.mark.parametrize("train_weight", [False, True])
def test_peak_memory_within_the_budget_gpu(mode, budget, train_weight):
    """Peak memory above the inputs: the chunk budget plus what the gradients themselves take
    (grad_hidden, the weight gradient), plus, with a trainable weight, the vocabulary-major
    backward's [N, H] rows (gathered bf16 hidden, float32 accumulator, its bf16 cast), plus 32 MiB
    of small buffers. No [V, H] float32 accumulator (0.5 GiB here, 2 GiB at H=4096)."""
    n, width, vocab = 8192, 1024, 128256
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, width, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    weight = (torch.randn(vocab, width, device="cuda", generator=gen) * 0.05).to(torch.bfloat16)
    weight.requires_grad_(train_weight)
    labels = torch.randint(0, vocab, (n,), device="cuda", generator=gen)
    upstream = torch.randn(n, device="cuda", generator=gen)

    def step():
        out = pyalign.linear_token_logprobs(hidden, weight, labels, mode=mode)
        (out * upstream).sum().backward()

    step()  # warm-up: Triton compilation, cuBLAS workspaces
    hidden.grad = None
    weight.grad = None
    extra = _peak_extra_bytes(step)
    grads = hidden.numel() * 2 + (weight.numel() * 2 if train_weight else 0)
    saved = hidden.numel() * 2 if (mode == "default" and not train_weight) else 0  # unscaled grad_hidden
    vocab_major = hidden.numel() * (2 + 4 + 2) if train_weight else 0
    assert extra <= budget + grads + saved + vocab_major + 32 * lin.MIB, extra / lin.MIB


@pytest.mark.gpu
@pytest.mark.large
def test_large_n_times_v_gpu():
    """N*V > 2^31 (fp32, so that both sides round the logits alike) against the float64
    reference, computed slice by slice."""
    n, width, vocab = 17000, 256, 128256
    assert n * vocab > 2 ** 31
    gen = torch.Generator(device="cuda").manual_seed(1)
    hidden = torch.randn(n, width, device="cuda", generator=gen).requires_grad_()
    weight = (torch.randn(vocab, width, device="cuda", generator=gen) * 0.25).requires_grad_()
    labels = torch.randint(0, vocab, (n,), device="cuda", generator=gen)
    labels[::5] = -100
    upstream = torch.randn(n, device="cuda", generator=gen)
    out = pyalign.linear_token_logprobs(hidden, weight, labels)
    (out * upstream).sum().backward()
    grad_weight_ref = torch.zeros(vocab, width, device="cuda", dtype=torch.float64)
    for start in range(0, n, 1024):
        rows = slice(start, start + 1024)
        h = hidden[rows].detach().double().requires_grad_()
        w = weight.detach().double().requires_grad_()
        ref = reference_token_logprobs(h @ w.T, labels[rows])
        torch.testing.assert_close(out[rows].double(), ref, atol=1e-3, rtol=1e-4)
        (ref * upstream[rows].double()).sum().backward()
        torch.testing.assert_close(hidden.grad[rows].double(), h.grad, atol=1e-3, rtol=1e-3)
        grad_weight_ref += w.grad
    torch.testing.assert_close(weight.grad.double(), grad_weight_ref, atol=1e-3, rtol=1e-3)
