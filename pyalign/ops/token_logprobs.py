"""``token_logprobs`` / ``sequence_logprobs``: the fused log-softmax + gather op (SPEC 3.1).

The op is registered as two torch operators (``pyalign::token_logprobs_fwd`` and
``pyalign::token_logprobs_bwd``, torch.library's define / impl) with fake implementations and an
autograd formula, so code that calls it compiles under ``torch.compile`` without a graph break,
and a process that never compiles never imports the compiler stack. The in-place backward (gradient
written into the logits' own storage) is a separate eager-only autograd Function, because a custom
op may not hand back one of its inputs as its output.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from pyalign.ops.backends import Backend, resolve_backend
from pyalign.reference import IGNORE_INDEX, output_dtype
from pyalign.tensor_checks import has_self_overlap

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
CHECK_LABELS_ENV = "PYALIGN_CHECK_LABELS"


# --------------------------------------------------------------------------- validation


def validate_logits_labels(logits: Tensor, labels: Tensor, ignore_index: int) -> None:
    """Raise ValueError naming the argument for anything a kernel must never see."""
    if not isinstance(logits, Tensor):
        raise ValueError(f"logits: expected a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(labels, Tensor):
        raise ValueError(f"labels: expected a torch.Tensor, got {type(labels).__name__}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"logits: expected a floating dtype (float32, bfloat16, float16, float64), got {logits.dtype}"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels: expected an integer dtype (int64), got {labels.dtype}")
    if logits.dim() < 1:
        raise ValueError("logits: expected at least 1 dimension [..., V], got a scalar")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"labels: expected shape {tuple(logits.shape[:-1])} (logits' shape without the "
            f"vocabulary dimension), got {tuple(labels.shape)}"
        )
    if labels.device != logits.device:
        raise ValueError(f"labels: expected device {logits.device} like logits, got {labels.device}")
    if not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")


def labels_checked_on_host(labels: Tensor, backend_name: str) -> bool:
    """Whether label values are checked here, on the host, with a ValueError.

    CPU tensors: always (no device to wait for). CUDA tensors: only with the float64 reference
    backend ("torch": its gather would fail on the device) or when PYALIGN_CHECK_LABELS=1 asks for
    it (debugging): the check reads a value back, which synchronises the stream every call and
    breaks CUDA-graph capture. Unchecked, the triton and cuda kernels give a label outside
    [0, V) that is not ignore_index a NaN log-prob and a NaN gradient row (never a stray read):
    the contract in docs/DESIGN.md.
    """
    if labels.device.type == "cpu" or backend_name == "torch":
        return True
    return os.environ.get(CHECK_LABELS_ENV, "0") not in ("", "0")


def validate_label_values(labels: Tensor, vocab: int, ignore_index: int) -> None:
    """Labels in [0, V) or ignore_index. Data-dependent (one device sync on a GPU), so it runs
    inside the custom op, where torch.compile treats it as opaque, and only where
    :func:`labels_checked_on_host` says so."""
    if labels.numel() == 0:
        return
    if vocab == 0:
        raise ValueError("logits: the vocabulary dimension is empty (V == 0) but labels are not")
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if bool(bad.any()):
        first = labels[bad].flatten()[0].item()
        raise ValueError(
            f"labels: every label must be in [0, {vocab}) or equal ignore_index={ignore_index}; "
            f"found {first} ({int(bad.sum())} out-of-range labels)"
        )


def as_3d(logits: Tensor) -> tuple[Tensor, bool]:
    """A [B, T, V] view of [..., T, V] logits with unit vocabulary stride, and whether it is a copy.

    Rows of ``logits[:, :-1]`` are not uniformly strided, which is why kernels take two row
    strides (batch and time) instead of one; only stranger layouts are copied.
    """
    copied = False
    if logits.stride(-1) != 1 and logits.shape[-1] > 1:
        logits, copied = logits.contiguous(), True
    vocab = logits.shape[-1]
    if logits.dim() == 1:
        return logits.view(1, 1, vocab), copied
    if logits.dim() == 2:
        return logits.unsqueeze(0), copied
    time = logits.shape[-2]
    try:
        return logits.view(-1, time, vocab), copied
    except RuntimeError:
        return logits.reshape(-1, time, vocab), True


# --------------------------------------------------------------------------- custom ops


def _run_forward(chosen: Backend, logits: Tensor, labels: Tensor, ignore_index: int):
    if labels_checked_on_host(labels, chosen.name):
        validate_label_values(labels, logits.shape[-1], ignore_index)
    logits3, _ = as_3d(logits)
    labels2 = labels.reshape(logits3.shape[:2]).to(torch.int64).contiguous()
    logp2, lse2 = chosen.forward(logits3, labels2, ignore_index)
    return logp2.view(labels.shape), lse2.view(labels.shape)


def _run_backward(
    chosen: Backend, grad: Tensor, logits: Tensor, labels: Tensor, lse: Tensor,
    ignore_index: int, inplace: bool,
) -> Tensor:
    """The gradient w.r.t. ``logits``: written into the logits themselves when ``inplace`` and
    the logits did not have to be copied to reach the kernel, else into a new tensor."""
    logits3, copied = as_3d(logits)
    shape2 = logits3.shape[:2]
    labels2 = labels.reshape(shape2).to(torch.int64).contiguous()
    grad2 = grad.reshape(shape2).to(output_dtype(logits.dtype)).contiguous()
    lse2 = lse.reshape(shape2).contiguous()
    if inplace and not copied:
        result, grad_out3 = logits, logits3
    else:
        result = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        grad_out3 = result.view(logits3.shape)
    chosen.backward(logits3, labels2, lse2, grad2, ignore_index, grad_out3)
    return result


# The ops are defined with torch.library's low-level API (define / impl / register_fake /
# register_autograd) rather than @torch.library.custom_op: custom_op wraps each implementation in
# torch._disable_dynamo, whose first call imports torch._dynamo and with it sympy and ~900
# modules (~2 s, ~150 MB) in a process that never compiles anything. Dynamo never traces into an
# operator's implementation anyway: under torch.compile the op is one opaque node whose shapes
# come from the fake implementation.
torch.library.define(
    "pyalign::token_logprobs_fwd",
    "(Tensor logits, Tensor labels, int ignore_index, str backend) -> (Tensor, Tensor)",
)
torch.library.define(
    "pyalign::token_logprobs_bwd",
    "(Tensor grad, Tensor logits, Tensor labels, Tensor lse, int ignore_index, str backend) -> Tensor",
)


@torch.library.impl("pyalign::token_logprobs_fwd", "CompositeExplicitAutograd")
def _token_logprobs_fwd_impl(logits: Tensor, labels: Tensor, ignore_index: int,
                             backend: str) -> tuple[Tensor, Tensor]:
    chosen = resolve_backend(backend, logits)
    return _run_forward(chosen, logits, labels, ignore_index)


@torch.library.register_fake("pyalign::token_logprobs_fwd")
def _(logits, labels, ignore_index, backend):
    dtype = output_dtype(logits.dtype)
    return labels.new_empty(labels.shape, dtype=dtype), labels.new_empty(labels.shape, dtype=dtype)


@torch.library.impl("pyalign::token_logprobs_bwd", "CompositeExplicitAutograd")
def _token_logprobs_bwd_impl(grad: Tensor, logits: Tensor, labels: Tensor, lse: Tensor,
                             ignore_index: int, backend: str) -> Tensor:
    chosen = resolve_backend(backend, logits)
    return _run_backward(chosen, grad, logits, labels, lse, ignore_index, inplace=False)


@torch.library.register_fake("pyalign::token_logprobs_bwd")
def _(grad, logits, labels, lse, ignore_index, backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


token_logprobs_fwd = torch.ops.pyalign.token_logprobs_fwd.default
token_logprobs_bwd = torch.ops.pyalign.token_logprobs_bwd.default


def _setup_context(ctx, inputs, output):
    logits, labels, ignore_index, backend = inputs
    _, lse = output
    ctx.save_for_backward(logits, labels, lse)
    ctx.ignore_index = ignore_index
    ctx.backend = backend


def _backward(ctx, grad_logp, grad_lse):
    logits, labels, lse = ctx.saved_tensors
    grad_logits = token_logprobs_bwd(grad_logp, logits, labels, lse, ctx.ignore_index, ctx.backend)
    return grad_logits, None, None, None


torch.library.register_autograd("pyalign::token_logprobs_fwd", _backward, setup_context=_setup_context)


class _InplaceBackwardTokenLogprobs(torch.autograd.Function):
    """Eager path whose backward overwrites the logits with their gradient (saves N*V memory)."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index, backend):
        chosen = resolve_backend(backend, logits)
        logp, lse = _run_forward(chosen, logits, labels, ignore_index)
        ctx.save_for_backward(labels, lse)
        ctx.logits = logits  # saved raw on purpose: it is overwritten in backward
        ctx.chosen = chosen
        ctx.ignore_index = ignore_index
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        labels, lse = ctx.saved_tensors
        logits = ctx.logits
        del ctx.logits
        with torch.no_grad():
            grad_logits = _run_backward(
                ctx.chosen, grad_logp, logits, labels, lse, ctx.ignore_index, inplace=True
            )
        if grad_logits is logits:
            # Whoever saved these logits for its own backward must now see that they changed.
            torch.autograd.graph.increment_version(logits)
        return grad_logits, None, None, None


# --------------------------------------------------------------------------- public API


def token_logprobs(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    backend: str = "auto",
    inplace_backward: bool = False,
) -> Tensor:
    """Per-token ``log p(label | logits)``: logits [..., T, V], labels [..., T] -> float32 [..., T].

    Labels are aligned with the logits (``labels[t]`` is the token ``logits[t]`` predicts; shift
    beforehand, e.g. ``logits[:, :-1]`` with ``labels[:, 1:]``). Positions whose label equals
    ``ignore_index`` give 0.0 and no gradient. Float64 logits give float64 results.

    ``backend``: "auto" (CPU -> the C++ kernel, CUDA -> Triton or the CUDA kernel; the
    PYALIGN_BACKEND environment variable overrides it), "cpu", "triton", "cuda" or "torch"
    (the float64 eager reference). ``inplace_backward=True`` writes the gradient into the
    logits' own storage: use it only when nothing else needs the logits after this op.
    """
    validate_logits_labels(logits, labels, ignore_index)
    if not torch.compiler.is_compiling():
        resolve_backend(backend, logits)  # fail here, with the user's argument names
    if labels.numel() == 0:
        # Still connected to the graph so that .backward() through an empty batch works.
        return (logits.sum(-1) * 0).to(output_dtype(logits.dtype))
    if inplace_backward and logits.requires_grad:
        if logits.is_leaf:
            raise ValueError(
                "inplace_backward: the logits are a leaf tensor; their storage would become "
                "their own .grad — pass inplace_backward=False"
            )
        if has_self_overlap(logits):
            raise ValueError(
                "inplace_backward: the logits have elements that share memory (an expanded or "
                f"overlapping view, strides {tuple(logits.stride())}); one gradient element per "
                "logit cannot be written into them — pass inplace_backward=False"
            )
        return _InplaceBackwardTokenLogprobs.apply(logits, labels, ignore_index, backend)
    logp, _ = token_logprobs_fwd(logits, labels, ignore_index, backend)
    return logp


def sequence_logprobs(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    average: bool = False,
    backend: str = "auto",
    inplace_backward: bool = False,
) -> Tensor:
    """Sum over T of :func:`token_logprobs` (``average=True``: mean over non-ignored tokens).

    A sequence whose labels are all ignored gives 0.0 (and zero gradient), not NaN.
    """
    logp = token_logprobs(
        logits, labels, ignore_index=ignore_index, backend=backend, inplace_backward=inplace_backward
    )
    total = logp.sum(-1)
    if not average:
        return total
    count = (labels != ignore_index).sum(-1).clamp(min=1)
    return total / count.to(total.dtype)
