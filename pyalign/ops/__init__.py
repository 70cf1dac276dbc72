"""pyalign's ops: the fused token log-prob op and its fused-linear variant."""

from pyalign.ops.token_logprobs import sequence_logprobs, token_logprobs

__all__ = ["token_logprobs", "sequence_logprobs"]
