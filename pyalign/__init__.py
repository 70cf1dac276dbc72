"""pyalign: fused log-prob kernels and training loops for preference alignment (DPO, APO, SPO, DPA)."""

from pyalign import _deprecated, losses
from pyalign.losses import LossOutput, spo_coefficients
from pyalign.ops.backends import available_backends
from pyalign.ops.token_logprobs import sequence_logprobs, token_logprobs
from pyalign.losses.preference_loss import PreferenceLoss
from pyalign.reference import IGNORE_INDEX

__version__ = "0.2.0"

_deprecated.install()  # old import paths (pyalign 0.1) keep working for one release, with a warning


def linear_token_logprobs(hidden, weight, labels, *, bias=None, ignore_index=IGNORE_INDEX, **kwargs):
    """Per-token log-probs of ``logits = hidden @ weight.T (+ bias)`` without materialising
    the [N, V] logits; see :mod:`pyalign.ops.linear_token_logprobs` for the modes."""
    from pyalign.ops.linear_token_logprobs import linear_token_logprobs as _impl  # noqa: PLC0415

    return _impl(hidden, weight, labels, bias=bias, ignore_index=ignore_index, **kwargs)


__all__ = [
    "token_logprobs", "sequence_logprobs", "linear_token_logprobs", "spo_coefficients",
    "losses", "LossOutput", "PreferenceLoss", "available_backends", "__version__",
]
