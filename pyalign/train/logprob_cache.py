"""On-disk cache of the frozen models' sequence log-probs.

SPO round n needs log pi_i(y) for i = 0..n-1 on round n's pairs, but only trains pi_n. Each frozen
model pi_i is run once, right after it is formed, on the data of every later round that needs it;
the results are stored here, so round n never holds pi_0..pi_{n-2} in memory.

One file per (model i, round r, split): ``model_<i>/round_<r>_<split>.pt`` holding the chosen and
rejected log-probs ``[N]`` (row = pair index in the JSONL file) and the KEY they were computed
under: model fingerprint, data fingerprint (hash of the file), tokenisation fingerprint
(tokenizer, chat template, lengths, recipe version) and log-prob settings (length-averaged or not,
autocast). A file whose key differs from the one expected now is STALE: it is refused with an
error naming what changed, or recomputed when ``recompute_stale=True``. Files are written to a
temporary name and renamed, so a killed run never leaves a half-written entry. Each entry carries
the sha256 of its key and values, checked on every load: an entry whose bytes changed or that
cannot be read is DAMAGED, refused (:class:`~pyalign.failures.DamagedFileError`) or recomputed
like a stale one; entries of versions without the checksum are read unchecked.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from pyalign.data import PreferenceDataset, check_token_ids
from pyalign.failures import DamagedFileError
from pyalign.io import torch_save_atomic
from pyalign.models import autocast_context, policy_sequence_logprobs


logger = logging.getLogger("pyalign.train")


class StaleLogprobCacheError(RuntimeError):
    """A cached entry was computed under a different model, data or tokenisation."""


def _entry_checksum(key: dict, chosen: Tensor, rejected: Tensor) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode())
    for values in (chosen, rejected):
        # a fresh tensor: a one-element view keeps a stride that view(uint8) refuses
        values = torch.empty(values.shape, dtype=values.dtype).copy_(values.detach())
        digest.update(f"{values.dtype}{tuple(values.shape)}".encode())
        digest.update(values.view(torch.uint8).numpy().tobytes() if values.numel() else b"")
    return digest.hexdigest()


@dataclass(frozen=True)
class CacheKey:
    model_index: int  # i of pi_i
    model_fingerprint: str
    round_index: int  # 1-based round whose data this is
    split: str  # "train" or "eval"
    data_fingerprint: str
    tokenization: dict
    average: bool  # length-averaged log-probs (ipo)
    precision: str  # "fp32" or "bf16-autocast"

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class FrozenLogprobs:
    """Log-probs of the frozen chain pi_0..pi_{n-1} (or a subset) on one data set: ``[n, N]``."""

    chosen: Tensor
    rejected: Tensor

    def rows(self, index: Tensor) -> Tensor:
        """Chain log-probs ``[n, 2B]`` for the pairs ``index`` in the collated layout."""
        return torch.cat([self.chosen[:, index], self.rejected[:, index]], dim=1)


class PairsWithFrozenLogprobs:
    """Preference pairs whose batches carry the frozen models' log-probs as a column:
    ``batch(indices)`` is :func:`pyalign.data.collate_pairs`'s dict plus ``chain_logps``
    ``[n, 2B]`` (the rows of ``chain`` for those pairs, in the same chosen-then-rejected layout)."""

    def __init__(self, pairs: PreferenceDataset, chain: FrozenLogprobs):
        self.pairs = pairs
        self.chain = chain

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def source(self) -> str | None:
        return getattr(self.pairs, "source", None)

    def batch(self, indices) -> dict[str, Tensor]:
        batch = self.pairs.batch(indices)
        batch["chain_logps"] = self.chain.rows(batch["index"])
        return batch


def _differences(stored: dict, expected: dict, prefix: str = "") -> list[str]:
    changes = []
    for name in sorted(set(stored) | set(expected)):
        old, new = stored.get(name), expected.get(name)
        if isinstance(old, dict) and isinstance(new, dict):
            changes += _differences(old, new, f"{prefix}{name}.")
        elif old != new:
            changes.append(f"{prefix}{name} (cached {old!r}, now {new!r})")
    return changes


class LogprobCache:
    def __init__(self, directory: str | Path, *, recompute_stale: bool = False):
        self.directory = Path(directory)
        self.recompute_stale = recompute_stale

    def path(self, key: CacheKey) -> Path:
        return self.directory / f"model_{key.model_index}" / f"round_{key.round_index}_{key.split}.pt"

    def load(self, key: CacheKey) -> tuple[Tensor, Tensor] | None:
        """The cached (chosen, rejected) for ``key``; None when absent (or stale and
        ``recompute_stale``); raises :class:`StaleLogprobCacheError` when stale."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            entry = self._read(path)
        except DamagedFileError as error:
            if self.recompute_stale:
                logger.warning("%s; recomputing it", str(error).split("; ")[0])
                return None
            raise
        changes = _differences(entry["key"], key.as_dict())
        if changes:
            if self.recompute_stale:
                return None
            raise StaleLogprobCacheError(
                f"{path}: stale log-prob cache; changed since it was written: {'; '.join(changes)}. "
                "Delete the file (or the output directory), or rerun with --recompute-stale-cache "
                "(config: recompute_stale_cache: true) to recompute it."
            )
        return entry["chosen"], entry["rejected"]

    @staticmethod
    def _read(path: Path) -> dict:
        remedy = ("delete it to have it recomputed (or rerun with --recompute-stale-cache, config: "
                  "recompute_stale_cache: true)")
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - a cut or damaged file raises EOFError, RuntimeError, ...
            raise DamagedFileError(f"{path}: damaged: cannot be loaded ({type(error).__name__}: "
                                   f"{str(error)[:200]}); {remedy}") from None
        if not isinstance(entry, dict) or not {"key", "chosen", "rejected"} <= set(entry):
            raise DamagedFileError(f"{path}: damaged: not a log-prob cache entry; {remedy}")
        stored = entry.get("sha256")
        if stored is not None and stored != _entry_checksum(entry["key"], entry["chosen"], entry["rejected"]):
            raise DamagedFileError(f"{path}: damaged: its values differ from the checksum written with them; "
                                   f"{remedy}")
        return entry

    def save(self, key: CacheKey, chosen: Tensor, rejected: Tensor) -> Path:
        chosen, rejected = chosen.cpu(), rejected.cpu()
        return torch_save_atomic({"key": key.as_dict(), "chosen": chosen, "rejected": rejected,
                                  "sha256": _entry_checksum(key.as_dict(), chosen, rejected)}, self.path(key))


@torch.no_grad()
def dataset_logprobs(
    model, dataset: PreferenceDataset, *, batch_size: int, device: torch.device,
    mixed_precision: str, average: bool, progress: str | None = None, fused: bool | str = "auto",
    indices: list[int] | None = None, min_batches: int = 0,
) -> tuple[Tensor, Tensor]:
    """Sequence log-probs (chosen ``[N]``, rejected ``[N]``, float32, CPU) of every pair under
    ``model`` (or of the pairs ``indices``, in that order), computed exactly as the trainer
    computes the policy's (same function, same autocast). ``progress``: a tqdm bar label.
    ``min_batches``: run at least this many forwards, the extra ones on the first pair and
    thrown away (an FSDP-sharded model gathers weights in every forward, so every process must
    run as many as the busiest one)."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    check_token_ids(dataset, model, "frozen log-prob")
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    rows = list(range(len(dataset))) if indices is None else list(indices)
    starts = list(range(0, len(rows), batch_size))
    padding = max(0, min_batches - len(starts))
    for i in tqdm(range(len(starts) + padding), desc=progress, disable=progress is None, leave=False,
                  dynamic_ncols=True):
        chunk = rows[starts[i] : starts[i] + batch_size] if i < len(starts) else [0]
        batch = {k: v.to(device) for k, v in dataset.batch(chunk).items()}
        with autocast_context(device, mixed_precision):
            logps = policy_sequence_logprobs(model, batch, average=average, fused=fused).float().cpu()
        if i >= len(starts):
            continue
        half = logps.shape[0] // 2
        chosen.append(logps[:half])
        rejected.append(logps[half:])
    model.train(was_training)
    empty = torch.zeros(0)
    return (torch.cat(chosen), torch.cat(rejected)) if chosen else (empty, empty.clone())
