"""Preference losses, from sequence log-probs, from logits, or from hidden states and the lm_head.

- :mod:`pyalign.losses.pairwise`: the formulas on sequence log-probs (``dpo``, ``ipo``, ``hinge``,
  ``robust``, ``apo_zero``, ``apo_down``, ``kto_pair``, ``spo``, ``nll``), :class:`LossOutput`,
  :func:`spo_coefficients` (docs/training.md; SPEC 3.2-3.3);
- :mod:`pyalign.losses.preference_loss`: :class:`PreferenceLoss`, one call from logits (or hidden
  states and the lm_head weight) to the loss, rows chosen-then-rejected;
- :mod:`pyalign.losses.linear_preference_loss`: the fused lm_head path behind
  ``PreferenceLoss(...)(hidden=..., weight=...)`` (docs/fused_linear.md).

``pyalign.losses.dpo(...)`` etc. are the formulas themselves (plain torch, O(B)).
"""

from pyalign.losses.pairwise import (
    LOSSES, PAIRWISE_LOSSES, SMOOTHING_RANGES, LossOutput, apo_down, apo_zero, check_loss_options, check_nll_weight,
    dpo, get_loss, hinge, ipo, kto_kl_estimate, kto_pair, nll, robust, spo, spo_coefficients, spo_rewards,
)
from pyalign.losses.preference_loss import PreferenceLoss, split_pairs

__all__ = [
    "LOSSES", "PAIRWISE_LOSSES", "SMOOTHING_RANGES", "LossOutput", "PreferenceLoss", "apo_down", "apo_zero",
    "check_loss_options", "check_nll_weight", "dpo", "get_loss", "hinge", "ipo", "kto_kl_estimate", "kto_pair",
    "nll", "robust", "spo", "spo_coefficients", "spo_rewards", "split_pairs",
]
