"""The contenders of ``bench.logprobs``: each turns logits [seqs, T, V] into a DPO loss through
some way of getting per-token log-probs. All use the same sync-free DPO formula on top
(:func:`dpo_loss`), so that only the log-prob part differs; ``pyalign.PreferenceLoss`` is there
too as the one-call public path (its metrics read values back, which synchronises)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

BETA = 0.1
IGNORE_INDEX = -100


@dataclass
class Method:
    name: str
    loss: Callable[[Tensor, object], Tensor]  # (logits, case) -> scalar loss
    extra_bytes: Callable[[Tensor], int]  # estimated peak beyond the inputs, for the fits check
    overwrites_logits: bool = False
    note: str = ""


def dpo_loss(policy: Tensor, ref: Tensor, beta: float = BETA) -> Tensor:
    """Sigmoid DPO on [2B] sequence log-probs, chosen rows first: pyalign.losses.dpo's formula
    without its metrics (which call .item())."""
    half = policy.shape[0] // 2
    margin = (policy[:half] - ref[:half]) - (policy[half:] - ref[half:])
    return -F.logsigmoid(beta * margin).mean()


def masked_labels(labels: Tensor) -> tuple[Tensor, Tensor]:
    """(labels with ignored positions set to 0, so gather stays in range; the keep mask)."""
    mask = labels != IGNORE_INDEX
    return torch.where(mask, labels, torch.zeros_like(labels)), mask


# --------------------------------------------------------------------------- eager styles


def eager_token_logps(logits: Tensor, safe_labels: Tensor) -> Tensor:
    """The usual DPO helper: float32 log_softmax over the vocabulary, then gather."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)


def trl_token_logps(logits: Tensor, safe_labels: Tensor) -> Tensor:
    """TRL's ``selective_log_softmax`` (trl/trainer/utils.py), written anew: float32/float64
    logits give the gathered logit minus a logsumexp taken one sequence at a time; other dtypes
    run log_softmax one sequence at a time in their own dtype, then gather (TRL's comment: a
    logsumexp in bfloat16 is unstable). The loop over sequences bounds the temporaries."""
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        return picked - lse
    rows = [F.log_softmax(row, dim=-1).gather(-1, row_labels.unsqueeze(-1)).squeeze(-1)
            for row, row_labels in zip(logits, safe_labels)]
    return torch.stack(rows)


def eager_sequence_logps(logits: Tensor, safe_labels: Tensor, mask: Tensor) -> Tensor:
    return (eager_token_logps(logits, safe_labels) * mask).sum(-1)


def compiled_sequence_logps():
    """A fresh static-shape compile of the eager function (dynamo's caches reset, so that no
    earlier case turns it into a dynamic-shape graph or fills its recompile limit)."""
    torch._dynamo.reset()
    return torch.compile(eager_sequence_logps, dynamic=False)


# --------------------------------------------------------------------------- estimates


def _sizes(logits: Tensor) -> tuple[int, int, int]:
    """(logits bytes, float32 logits bytes, one sequence's float32 bytes)."""
    numel = logits.numel()
    return numel * logits.element_size(), numel * 4, numel * 4 // logits.shape[0]


def _grad_only(logits: Tensor) -> int:
    return _sizes(logits)[0]


def _eager_extra(logits: Tensor) -> int:
    # float32 log_softmax output, gather's zero-filled gradient and log_softmax's gradient
    # live together in the backward; the cast back to the logits' dtype comes after.
    return 3 * _sizes(logits)[1]


def _trl_extra(logits: Tensor) -> int:
    # per-sequence gradients, stacked into one gradient, plus one sequence's temporaries
    logits_bytes, _, row = _sizes(logits)
    return 2 * logits_bytes + 2 * row


def _compile_extra(logits: Tensor) -> int:
    logits_bytes, fp32_bytes, _ = _sizes(logits)
    return fp32_bytes + logits_bytes


# --------------------------------------------------------------------------- the list


def _pyalign_methods(device: torch.device) -> list[Method]:
    try:
        import pyalign  # noqa: PLC0415
    except ImportError as err:
        return [Method("pyalign", None, _grad_only, note=f"pyalign not importable: {err}")]
    backends = [b for b in pyalign.available_backends(device) if not (b == "triton" and device.type == "cpu")]
    if device.type == "cuda":
        backends = [b for b in backends if b != "torch"]  # the float64 reference: not a contender
    methods = []
    for backend in backends:
        def loss(x, case, backend=backend):
            return dpo_loss(pyalign.sequence_logprobs(x, case.labels, backend=backend), case.ref_logps)

        def loss_inplace(x, case, backend=backend):
            logps = pyalign.sequence_logprobs(x, case.labels, backend=backend, inplace_backward=True)
            return dpo_loss(logps, case.ref_logps)

        methods.append(Method(f"pyalign[{backend}]", loss, _grad_only))
        if backend != "torch":
            methods.append(Method(f"pyalign[{backend}]+inplace", loss_inplace, _grad_only,
                                  overwrites_logits=True,
                                  note="gradient written into the logits' storage"))

    module = pyalign.PreferenceLoss("dpo", beta=BETA)

    def preference_loss(x, case):
        return module(x, case.labels, ref_logps=case.ref_logps).loss

    methods.append(Method("pyalign.PreferenceLoss", preference_loss, _grad_only,
                          note="public one-call path, backend auto, metrics synchronise"))
    if not backends:
        methods.append(Method("pyalign", None, _grad_only,
                              note=f"no pyalign backend available on {device.type}"))
    return methods


def _liger_method() -> Method:
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy  # noqa: PLC0415
    except ImportError as err:
        return Method("liger_ce", None, _grad_only, note=f"liger-kernel not importable: {err}")

    def loss(x, case):
        seqs, time, vocab = x.shape
        nll = liger_cross_entropy(x.view(-1, vocab), case.labels.view(-1),
                                  ignore_index=IGNORE_INDEX, reduction="none")
        return dpo_loss((-nll.float()).view(seqs, time).sum(-1), case.ref_logps)

    # Liger's forward writes the gradient into its input; the backward scales it into a new tensor.
    return Method("liger_ce", loss, _grad_only, overwrites_logits=True,
                  note="LigerCrossEntropy reduction=none, negated")


def logits_methods(device: torch.device, only: Sequence[str] = ()) -> list[Method]:
    """Every contender for ``device``; ``only``: keep names starting with one of these."""
    def eager(x, case):
        return dpo_loss(eager_sequence_logps(x, case.safe_labels, case.mask), case.ref_logps)

    def trl(x, case):
        return dpo_loss((trl_token_logps(x, case.safe_labels) * case.mask).sum(-1), case.ref_logps)

    compiled_fn = []  # compiled at the first call of this case, not when the list is built

    def compiled(x, case):
        if not compiled_fn:
            compiled_fn.append(compiled_sequence_logps())
        return dpo_loss(compiled_fn[0](x, case.safe_labels, case.mask), case.ref_logps)

    methods = _pyalign_methods(device)
    methods += [
        Method("eager_fp32", eager, _eager_extra, note="log_softmax(logits.float()).gather"),
        Method("trl_rowloop", trl, _trl_extra, note="TRL selective_log_softmax, one row at a time"),
        Method("torch_compile", compiled, _compile_extra, note="torch.compile of eager_fp32"),
    ]
    if device.type == "cuda":
        methods.append(_liger_method())
    if only:
        methods = [m for m in methods if any(m.name.startswith(prefix) for prefix in only)]
    return methods
