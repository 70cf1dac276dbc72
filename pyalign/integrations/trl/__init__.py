"""TRL integration: ``from pyalign.integrations.trl import DPOTrainer``, a drop-in for TRL's.

Supported TRL versions: :data:`SUPPORTED_TRL` (the extra ``pip install "pyalign[trl]"`` pins
them). The drop-in replaces a TRL internal (the forward ``add_fused_lm_head`` installs), which
changes between minor versions, so any other version is refused at import with an ImportError.
See docs/integrations.md.
"""

from __future__ import annotations

SUPPORTED_TRL = ">=1.16,<1.17"
_MIN, _MAX = (1, 16), (1, 17)


def _check_trl() -> None:
    try:
        import trl  # noqa: PLC0415
    except ImportError as err:
        raise ImportError(
            f"pyalign.integrations.trl needs TRL {SUPPORTED_TRL}: pip install \"pyalign[trl]\"") from err
    from packaging.version import Version  # noqa: PLC0415

    version = Version(trl.__version__)
    if not (Version(".".join(map(str, _MIN))) <= Version(version.base_version) < Version(".".join(map(str, _MAX)))):
        raise ImportError(
            f"pyalign.integrations.trl supports trl{SUPPORTED_TRL}, found trl {trl.__version__}: it replaces "
            "the fused-lm_head forward that TRL's DPOTrainer installs (trl.trainer.utils.add_fused_lm_head), an "
            f"internal that changes between minor versions. Install \"trl{SUPPORTED_TRL}\" (pip install "
            "\"pyalign[trl]\") or use trl.DPOTrainer itself.")


_check_trl()

from pyalign.integrations.trl.dpo_trainer import (  # noqa: E402
    PYALIGN_LOSS_TYPES,
    SHARED_LOSS_TYPES,
    SPO_CHAIN_COLUMNS,
    TRL_LOSS_TYPES,
    DPOTrainer,
)

__all__ = ["DPOTrainer", "SUPPORTED_TRL", "TRL_LOSS_TYPES", "PYALIGN_LOSS_TYPES", "SHARED_LOSS_TYPES",
           "SPO_CHAIN_COLUMNS"]
