"""The multi-objective reward model: a transformers backbone and a k-output linear head.

    r(x, y) = offset + spread * (W h + b)        [k], on the 0-100 scale

``h``: the backbone's final hidden state (after its final norm) at the last non-padding token of
the chat-templated prompt + response (the EOS that ends the response). ``W`` ``[k, H]`` and
``b`` ``[k]`` are the head, fully trained, in float32 whatever the backbone's dtype; the
backbone is trained through a LoRA. ``offset`` and ``spread`` are fixed per-objective constants,
the mean and standard deviation of the training targets: the head starts at zero, so the
untrained model predicts the training mean, and it learns in standardised units, which keeps
one learning rate right for the head and the LoRA whatever the ratings' spread. The loss is
still the paper's MSE on the 0-100 scale.

Saved as a folder (:meth:`RewardModel.save`, atomically through
:func:`pyalign.io.atomic_directory`)::

    reward_model.json    format, objectives with their input scales, lengths, training facts
    head.safetensors     weight [k, H], bias [k], offset [k], spread [k] (float32)
    backbone/            the backbone with the LoRA merged in + the tokenizer (ordinary HF folder)
    checksums.json       sha256 of every file above, checked by :meth:`RewardModel.load`

Why merged rather than an adapter: the folder stands alone (it does not need the base model's
folder to still exist, unchanged, where it was), loads without peft, and scores without the LoRA's
extra matmuls; the cost is disk (a full backbone per reward model, e.g. ~0.5 GB for SmolLM2-135M
in float32). The training run also keeps the LoRA alone (``adapter/``) for whoever wants it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from pyalign import distributed
from pyalign.data import pad_token_id
from pyalign.io import atomic_directory, file_fingerprint, has_manifest, read_json, verify_manifest, write_json_atomic
from pyalign.models import model_fingerprint, resolve_dtype
from pyalign.reward_model.data import ObjectiveScale, TokenizedRated, collate_rated, encode_prompt_response

FORMAT = "pyalign-reward-model"
FORMAT_VERSION = 1
CONFIG_FILE = "reward_model.json"
HEAD_FILE = "head.safetensors"
BACKBONE_DIR = "backbone"


def last_non_padding_index(attention_mask: Tensor) -> Tensor:
    """``[B]`` position of each row's last attended token (works for left or right padding)."""
    positions = torch.arange(1, attention_mask.shape[-1] + 1, device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(-1)


def load_backbone(path: str | os.PathLike, dtype: str | torch.dtype = "float32"):
    """The decoder of a causal LM folder without its lm_head (``AutoModel``): what the head reads."""
    from transformers import AutoModel  # noqa: PLC0415
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    # A causal LM checkpoint has an lm_head the base model does not use: not worth a warning.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoModel.from_pretrained(str(path), dtype=resolve_dtype(dtype))
    finally:
        hf_logging.set_verbosity(verbosity)


def apply_backbone_lora(backbone, lora, *, seed: int):
    """:func:`pyalign.models.apply_lora` on the backbone (``lora``: the config's ``lora``
    section; peft task type FEATURE_EXTRACTION: a base model, not a causal LM)."""
    from pyalign.models import apply_lora  # noqa: PLC0415

    return apply_lora(backbone, lora, seed=seed, task_type="FEATURE_EXTRACTION")


class RewardModel(torch.nn.Module):
    """``forward(input_ids, attention_mask) -> [B, k]`` ratings on the 0-100 scale; :meth:`score`
    for text. Build one for training with :meth:`from_backbone`, load a saved one with
    :meth:`load`."""

    def __init__(self, backbone, scales: Sequence[ObjectiveScale], *, tokenizer=None,
                 offset: Sequence[float] | Tensor | None = None, spread: Sequence[float] | Tensor | None = None,
                 max_length: int = 512, max_prompt_length: int = 256, info: dict | None = None):
        super().__init__()
        scales = list(scales)
        if not scales:
            raise ValueError("objectives: a reward model needs at least one objective")
        names = [s.name for s in scales]
        if len(set(names)) != len(names):
            raise ValueError(f"objectives: names must be distinct, got {names}")
        self.backbone = backbone
        self.scales = scales
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.info = dict(info or {})
        k = len(scales)
        device = next(backbone.parameters()).device
        self.head = torch.nn.Linear(backbone.config.hidden_size, k, dtype=torch.float32, device=device)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)
        offset = torch.full((k,), 50.0) if offset is None else torch.as_tensor(offset, dtype=torch.float32)
        spread = torch.ones(k) if spread is None else torch.as_tensor(spread, dtype=torch.float32)
        if offset.shape != (k,) or spread.shape != (k,) or not bool((spread > 0).all()):
            raise ValueError(f"offset/spread: expected {k} values each, spread > 0; got {offset.tolist()}, {spread.tolist()}")
        self.register_buffer("offset", offset.to(device))
        self.register_buffer("spread", spread.to(device))

    @property
    def objectives(self) -> list[str]:
        return [s.name for s in self.scales]

    @classmethod
    def from_backbone(cls, path: str | os.PathLike, scales: Sequence[ObjectiveScale], *, tokenizer=None,
                      dtype: str = "float32", device: str | torch.device = "cpu", **kwargs) -> "RewardModel":
        """A fresh reward model on the backbone of the causal LM in ``path`` (head at zero)."""
        if tokenizer is None:
            tokenizer = _load_tokenizer(path)
        backbone = load_backbone(path, dtype).to(device)
        return cls(backbone, scales, tokenizer=tokenizer, **kwargs)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        # batch -> backbone -> final hidden state at the last non-padding token -> head -> 0-100
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        pooled = hidden[rows, last_non_padding_index(attention_mask)].float()
        with torch.autocast(device_type=pooled.device.type, enabled=False):
            standardised = self.head(pooled)
        return self.offset + self.spread * standardised

    def check_objectives(self, expected: Sequence[str], where: str = "objectives") -> None:
        """Raise ValueError unless the model predicts exactly ``expected``, in that order (the
        order gives each component of a preference direction its meaning)."""
        if list(expected) != self.objectives:
            source = self.info.get("path", "the reward model")
            raise ValueError(f"{where}: expected the reward model's objectives {self.objectives} "
                             f"({source}), got {list(expected)}")

    @torch.no_grad()
    def score(self, prompts: Sequence, responses: Sequence[str], *,
              system: str | None | Sequence[str | None] = None, batch_size: int = 16,
              progress: str | None = None) -> Tensor:
        """Ratings ``[n, k]`` (float32, CPU, 0-100 scale) of each (prompt, response) pair, read
        like the training data (chat template, optional system prompt, the same truncation). A
        prompt is a text or a conversation (chat messages ending with the user's turn, checked
        as :func:`pyalign.generation.generate` checks them).
        Batches hold similar lengths; under ``torchrun`` each process scores a strided shard
        and every process gets all rows (a collective call)."""
        from pyalign.generation import check_prompts, check_texts  # noqa: PLC0415

        if self.tokenizer is None:
            raise ValueError("tokenizer: this reward model has none; pass tokenizer= when building it")
        prompts, systems = check_prompts(prompts, system)
        responses = check_texts(responses, "responses")
        if len(responses) != len(prompts):
            raise ValueError(f"responses: expected one per prompt ({len(prompts)}), got {len(responses)}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
        from tqdm.auto import tqdm  # noqa: PLC0415

        mine = distributed.shard_indices(len(prompts))
        encoded = {i: encode_prompt_response(self.tokenizer, prompts[i], responses[i], systems[i],
                                             self.max_length, self.max_prompt_length) for i in mine}
        order = sorted(mine, key=lambda i: (-len(encoded[i]), i))
        device = next(self.parameters()).device
        pad = pad_token_id(self.tokenizer)
        scores: dict[int, list[float]] = {}
        was_training = self.training
        self.eval()
        try:
            with tqdm(total=len(order), desc=progress, unit="response", leave=False,
                      disable=progress is None or not distributed.is_main()) as bar:
                for start in range(0, len(order), batch_size):
                    chunk = order[start:start + batch_size]
                    batch = collate_rated([TokenizedRated(encoded[i], [], 0) for i in chunk], pad)
                    out = self(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().cpu()
                    scores.update(zip(chunk, out.tolist()))
                    bar.update(len(chunk))
        finally:
            self.train(was_training)
        gathered = distributed.gather_in_order([scores[i] for i in mine])
        return torch.tensor(gathered, dtype=torch.float32).reshape(len(prompts), len(self.scales))

    # ------------------------------------------------------------------ save / load
    def merged_backbone(self):
        """The backbone with any LoRA merged in (merging changes this model's backbone in place:
        afterwards it is a plain transformers model computing the same function)."""
        try:
            import peft  # noqa: PLC0415
        except ImportError:
            return self.backbone
        if isinstance(self.backbone, peft.PeftModel):
            self.backbone = self.backbone.merge_and_unload()
        return self.backbone

    def save(self, directory: str | os.PathLike, *, extra: dict | None = None) -> Path:
        """Write the folder described in the module docstring (complete or not at all). Merges
        the LoRA into the backbone first (see :meth:`merged_backbone`)."""
        from safetensors.torch import save_file  # noqa: PLC0415

        if self.tokenizer is None:
            raise ValueError("tokenizer: a reward model is saved with its tokenizer; this one has none")
        backbone = self.merged_backbone()
        with atomic_directory(directory, manifest=True) as partial:
            backbone.save_pretrained(partial / BACKBONE_DIR)
            self.tokenizer.save_pretrained(partial / BACKBONE_DIR)
            save_file({"weight": self.head.weight.detach().float().cpu().contiguous(),
                       "bias": self.head.bias.detach().float().cpu().contiguous(),
                       "offset": self.offset.detach().cpu().contiguous(),
                       "spread": self.spread.detach().cpu().contiguous()}, str(partial / HEAD_FILE))
            write_json_atomic(partial / CONFIG_FILE, {
                "format": FORMAT, "version": FORMAT_VERSION,
                "objectives": [{"name": s.name, "low": s.low, "high": s.high} for s in self.scales],
                "scale": "0-100: y = 100 * (rating - low) / (high - low)",
                "pooling": "last non-padding token",
                "max_length": self.max_length, "max_prompt_length": self.max_prompt_length,
                "hidden_size": self.head.in_features,
                **(extra or {}),
            })
        return Path(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike, *, device: str | torch.device = "cpu",
             dtype: str = "float32") -> "RewardModel":
        """A saved reward model, in eval mode, on ``device``; the backbone in ``dtype`` (the head
        stays float32)."""
        from safetensors.torch import load_file  # noqa: PLC0415

        directory = Path(directory)
        meta_file = directory / CONFIG_FILE
        if not meta_file.is_file():
            raise ValueError(f"reward_model: {directory} is not a pyalign reward model folder (no {CONFIG_FILE})")
        if has_manifest(directory):  # folders of earlier versions have none: loaded unchecked
            verify_manifest(directory, remedy="the reward model folder changed since it was saved: train it "
                                              "again, or restore the folder from a copy")
        meta = read_json(meta_file)
        if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{meta_file}: expected format {FORMAT!r} version {FORMAT_VERSION}, "
                             f"got {meta.get('format')!r} version {meta.get('version')!r}")
        scales = [ObjectiveScale(o["name"], o["low"], o["high"]) for o in meta["objectives"]]
        backbone = load_backbone(directory / BACKBONE_DIR, dtype).to(device)
        head = load_file(str(directory / HEAD_FILE))
        model = cls(backbone, scales, tokenizer=_load_tokenizer(directory / BACKBONE_DIR),
                    offset=head["offset"], spread=head["spread"], max_length=meta["max_length"],
                    max_prompt_length=meta["max_prompt_length"], info={**meta, "path": str(directory)})
        if tuple(head["weight"].shape) != tuple(model.head.weight.shape):
            raise ValueError(f"{directory / HEAD_FILE}: head weight has shape {tuple(head['weight'].shape)}, "
                             f"the backbone and objectives need {tuple(model.head.weight.shape)}")
        with torch.no_grad():
            model.head.weight.copy_(head["weight"])
            model.head.bias.copy_(head["bias"])
        return model.eval()


def reward_model_fingerprint(folder: str | os.PathLike) -> str:
    """A reward model folder's identity: its metadata, head and backbone weights."""
    folder = Path(folder)
    digest = hashlib.blake2b(digest_size=20)
    for name in (CONFIG_FILE, HEAD_FILE):
        digest.update(name.encode() + b"\0" + file_fingerprint(folder / name).encode())
    digest.update(model_fingerprint(folder / BACKBONE_DIR).encode())
    return digest.hexdigest()


def _load_tokenizer(path):
    from transformers import AutoTokenizer  # noqa: PLC0415

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_reward_model(directory: str | os.PathLike, *, objectives: Sequence[str] | None = None,
                      device: str | torch.device = "cpu", dtype: str = "float32") -> RewardModel:
    """:meth:`RewardModel.load`, checking its objectives against ``objectives`` (e.g. a DPA
    config's) when given."""
    model = RewardModel.load(directory, device=device, dtype=dtype)
    if objectives is not None:
        model.check_objectives(objectives)
    return model
