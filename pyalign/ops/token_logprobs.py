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
from pyalign.reference import IGNORE_INDEX, output_dtype, validate_logit_transform
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
    check_ignore_index(ignore_index)


def check_ignore_index(ignore_index) -> None:
    """An int, not a bool (True would silently mean label 1)."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index: expected an int, got {type(ignore_index).__name__} {ignore_index!r}")


def check_flag(name: str, value) -> None:
    """A boolean option must be True or False: 0, 1, "yes" or a tensor would be read as one."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected True or False, got {type(value).__name__} {value!r}")


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


def _run_forward(chosen: Backend, logits: Tensor, labels: Tensor, ignore_index: int,
                 logit_scale: float, softcap: float | None):
    """(logp [...], norm [..., 2]): the backend's forward on a 3-D view."""
    if labels_checked_on_host(labels, chosen.name):
        validate_label_values(labels, logits.shape[-1], ignore_index)
    logits3, _ = as_3d(logits)
    labels2 = labels.reshape(logits3.shape[:2]).to(torch.int64).contiguous()
    logp2, norm2 = chosen.forward(logits3, labels2, ignore_index, logit_scale, softcap)
    return logp2.view(labels.shape), norm2.view(*labels.shape, 2)


def _run_backward(
    chosen: Backend, grad: Tensor, logits: Tensor, labels: Tensor, norm: Tensor,
    ignore_index: int, inplace: bool, logit_scale: float, softcap: float | None,
) -> Tensor:
    """The gradient w.r.t. ``logits``: written into the logits themselves when ``inplace`` and
    the logits did not have to be copied to reach the kernel, else into a new tensor."""
    logits3, copied = as_3d(logits)
    shape2 = logits3.shape[:2]
    labels2 = labels.reshape(shape2).to(torch.int64).contiguous()
    grad2 = grad.reshape(shape2).to(output_dtype(logits.dtype)).contiguous()
    norm2 = norm.reshape(*shape2, 2).contiguous()
    if inplace and not copied:
        result, grad_out3 = logits, logits3
    else:
        result = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        grad_out3 = result.view(logits3.shape)
    chosen.backward(logits3, labels2, norm2, grad2, ignore_index, grad_out3, logit_scale, softcap)
    return result


# The ops are defined with torch.library's low-level API (define / impl / register_fake /
# register_autograd) rather than @torch.library.custom_op: custom_op wraps each implementation in
# torch._disable_dynamo, whose first call imports torch._dynamo and with it sympy and ~900
# modules (~2 s, ~150 MB) in a process that never compiles anything. Dynamo never traces into an
# operator's implementation anyway: under torch.compile the op is one opaque node whose shapes
# come from the fake implementation.
# The second output, ``norm [..., 2]``, is each row's normaliser (maximum, log-sum) of the
# backend contract: saved for the backward, never differentiated.
torch.library.define(
    "pyalign::token_logprobs_fwd",
    "(Tensor logits, Tensor labels, int ignore_index, str backend, float logit_scale, float? softcap)"
    " -> (Tensor, Tensor)",
)
torch.library.define(
    "pyalign::token_logprobs_bwd",
    "(Tensor grad, Tensor logits, Tensor labels, Tensor norm, int ignore_index, str backend,"
    " float logit_scale, float? softcap) -> Tensor",
)


@torch.library.impl("pyalign::token_logprobs_fwd", "CompositeExplicitAutograd")
def _token_logprobs_fwd_impl(logits: Tensor, labels: Tensor, ignore_index: int, backend: str,
                             logit_scale: float, softcap: float | None) -> tuple[Tensor, Tensor]:
    chosen = resolve_backend(backend, logits)
    return _run_forward(chosen, logits, labels, ignore_index, logit_scale, softcap)


@torch.library.register_fake("pyalign::token_logprobs_fwd")
def _(logits, labels, ignore_index, backend, logit_scale, softcap):
    dtype = output_dtype(logits.dtype)
    return labels.new_empty(labels.shape, dtype=dtype), labels.new_empty((*labels.shape, 2), dtype=dtype)


@torch.library.impl("pyalign::token_logprobs_bwd", "CompositeExplicitAutograd")
def _token_logprobs_bwd_impl(grad: Tensor, logits: Tensor, labels: Tensor, norm: Tensor,
                             ignore_index: int, backend: str, logit_scale: float,
                             softcap: float | None) -> Tensor:
    chosen = resolve_backend(backend, logits)
    return _run_backward(chosen, grad, logits, labels, norm, ignore_index, False, logit_scale, softcap)


@torch.library.register_fake("pyalign::token_logprobs_bwd")
def _(grad, logits, labels, norm, ignore_index, backend, logit_scale, softcap):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


token_logprobs_fwd = torch.ops.pyalign.token_logprobs_fwd.default
token_logprobs_bwd = torch.ops.pyalign.token_logprobs_bwd.default


def _setup_context(ctx, inputs, output):
    logits, labels, ignore_index, backend, logit_scale, softcap = inputs
    _, norm = output
    ctx.save_for_backward(logits, labels, norm)
    ctx.options = (ignore_index, backend, logit_scale, softcap)


def _backward(ctx, grad_logp, grad_norm):
    logits, labels, norm = ctx.saved_tensors
    ignore_index, backend, logit_scale, softcap = ctx.options
    grad_logits = token_logprobs_bwd(grad_logp, logits, labels, norm, ignore_index, backend, logit_scale, softcap)
    return grad_logits, None, None, None, None, None


torch.library.register_autograd("pyalign::token_logprobs_fwd", _backward, setup_context=_setup_context)


class _InplaceBackwardTokenLogprobs(torch.autograd.Function):
    """Eager path whose backward overwrites the logits with their gradient (saves N*V memory)."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index, backend, logit_scale, softcap):
        chosen = resolve_backend(backend, logits)
        logp, norm = _run_forward(chosen, logits, labels, ignore_index, logit_scale, softcap)
        ctx.save_for_backward(labels, norm)
        ctx.logits = logits  # saved raw on purpose: it is overwritten in backward
        ctx.chosen = chosen
        ctx.options = (ignore_index, logit_scale, softcap)
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        labels, norm = ctx.saved_tensors
        logits = ctx.logits
        del ctx.logits
        ignore_index, logit_scale, softcap = ctx.options
        with torch.no_grad():
            grad_logits = _run_backward(ctx.chosen, grad_logp, logits, labels, norm, ignore_index, True,
                                        logit_scale, softcap)
        if grad_logits is logits:
            # Whoever saved these logits for its own backward must now see that they changed.
            torch.autograd.graph.increment_version(logits)
        return grad_logits, None, None, None, None, None


# --------------------------------------------------------------------------- public API


def token_logprobs(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    backend: str = "auto",
    inplace_backward: bool = False,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> Tensor:
    """Per-token ``log p(label | logits)``: logits [..., T, V], labels [..., T] -> float32 [..., T].

    Labels are aligned with the logits (``labels[t]`` is the token ``logits[t]`` predicts; shift
    beforehand, e.g. ``logits[:, :-1]`` with ``labels[:, 1:]``). Positions whose label equals
    ``ignore_index`` give 0.0 and no gradient. Float64 logits give float64 results.

    ``backend``: "auto" (CPU -> the C++ kernel, CUDA -> Triton or the CUDA kernel; the
    PYALIGN_BACKEND environment variable overrides it), "cpu", "triton", "cuda" or "torch"
    (the float64 eager reference). ``inplace_backward=True`` writes the gradient into the
    logits' own storage: use it only when nothing else needs the logits after this op.

    Logit transforms, applied inside the kernels (no transformed copy of the logits):
    ``z = logit_scale * logits``, then with ``softcap``, ``z = softcap * tanh(z / softcap)``; the
    result is ``log_softmax(z)[label]`` and the gradient flows through the transform. Cohere:
    ``logit_scale=config.logit_scale``; Granite: ``logit_scale=1 / config.logits_scaling``;
    Gemma 2/3: ``softcap=config.final_logit_softcapping``.
    """
    validate_logits_labels(logits, labels, ignore_index)
    check_flag("inplace_backward", inplace_backward)
    logit_scale, softcap = validate_logit_transform(logit_scale, softcap)
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
        return _InplaceBackwardTokenLogprobs.apply(logits, labels, ignore_index, backend, logit_scale, softcap)
    logp, _ = token_logprobs_fwd(logits, labels, ignore_index, backend, logit_scale, softcap)
    return logp


def sequence_logprobs(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    average: bool = False,
    backend: str = "auto",
    inplace_backward: bool = False,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> Tensor:
    """Sum over T of :func:`token_logprobs` (``average=True``: mean over non-ignored tokens).

    A sequence whose labels are all ignored gives 0.0 (and zero gradient), not NaN.
    ``logit_scale`` and ``softcap``: as for :func:`token_logprobs`.
    """
    check_flag("average", average)
    logp = token_logprobs(
        logits, labels, ignore_index=ignore_index, backend=backend, inplace_backward=inplace_backward,
        logit_scale=logit_scale, softcap=softcap,
    )
    total = logp.sum(-1)
    if not average:
        return total
    count = (labels != ignore_index).sum(-1).clamp(min=1)
    return total / count.to(total.dtype)
