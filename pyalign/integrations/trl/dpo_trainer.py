"""``DPOTrainer``: TRL's DPOTrainer with its log-probs computed by pyalign, plus kto_pair and spo.

Override point (docs/integrations.md, "How it plugs in"): TRL 1.16's ``DPOTrainer.__init__`` calls
``add_fused_lm_head`` on the policy and reference models, and every log-prob it reads afterwards
(policy, reference, ``precompute_ref_log_probs``, evaluation) comes from
``model(..., labels=labels, fused_lm_head=True)``. For the duration of ``__init__`` this subclass
hands TRL :func:`pyalign.integrations.trl.fused_head.add_fused_lm_head` under that name, which
answers those calls with pyalign's fused lm_head. TRL's loss code, metrics, logging, gradient
accumulation, PEFT handling and reference precomputation run unchanged on top, so TRL's loss
types give TRL's numbers.

pyalign's losses that TRL lacks are added as loss types (alone or mixed with TRL's through
``loss_weights``):

- ``"kto_pair"`` (:func:`pyalign.losses.kto_pair`): reference point ``kto_kl`` or, by default,
  the batch estimate;
- ``"spo"`` (:func:`pyalign.losses.spo`): round n of Sequential Preference Optimization, with
  ``spo_alphas`` (n-1 weights) and the frozen models pi_0..pi_{n-2} given as dataset columns
  :data:`SPO_CHAIN_COLUMNS` (one list of n-1 sequence log-probs per pair), or computed once at
  start from ``spo_chain_models``. pi_{n-1} is TRL's reference model as usual.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from collections.abc import Sequence

import torch
import trl
from accelerate.utils import is_peft_model
from tqdm.auto import tqdm

from pyalign import losses
from pyalign.data import IGNORE_INDEX
from pyalign.models import fused_head as hf
from pyalign.integrations.trl import fused_head

# TRL 1.16's loss types (DPOTrainer._compute_loss); computed by TRL's own code on pyalign's log-probs.
TRL_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)
# pyalign's losses TRL lacks, computed here by pyalign.losses.
PYALIGN_LOSS_TYPES = ("kto_pair", "spo")
# TRL loss types pyalign also implements (same value, see tests/test_trl_integration.py), and TRL's
# conventions: "sigmoid" ignores label_smoothing; "ipo" divides each log-ratio by the completion length.
SHARED_LOSS_TYPES = {
    "sigmoid": "dpo", "hinge": "hinge", "ipo": "ipo", "robust": "robust",
    "apo_zero": "apo_zero", "apo_down": "apo_down",
}
SPO_CHAIN_COLUMNS = ("spo_chain_chosen_logps", "spo_chain_rejected_logps")

_INSTALL_LOCK = threading.RLock()


@contextlib.contextmanager
def _pyalign_heads_installed(settings: fused_head.HeadSettings):
    """TRL's DPOTrainer module sees pyalign's ``add_fused_lm_head`` while the block runs."""
    dpo_module = trl.trainer.dpo_trainer
    with _INSTALL_LOCK:
        trl_add = dpo_module.add_fused_lm_head
        dpo_module.add_fused_lm_head = functools.partial(
            fused_head.add_fused_lm_head, trl_add_fused_lm_head=trl_add, settings=settings)
        try:
            yield
        finally:
            dpo_module.add_fused_lm_head = trl_add


def check_loss_options(args, spo_alphas, kto_kl, spo_chain_models) -> None:
    """ValueError naming the field for a loss configuration the trainer would fail on later."""
    loss_types = [args.loss_type] if isinstance(args.loss_type, str) else list(args.loss_type)
    for name in loss_types:
        if name not in TRL_LOSS_TYPES + PYALIGN_LOSS_TYPES:
            raise ValueError(f"args.loss_type: unknown loss type {name!r}; expected TRL's "
                             f"{list(TRL_LOSS_TYPES)} or pyalign's {list(PYALIGN_LOSS_TYPES)}")
    ours = [name for name in loss_types if name in PYALIGN_LOSS_TYPES]
    if "spo" in ours:
        if spo_alphas is None:
            raise ValueError("spo_alphas: the spo loss needs the weights alpha_1..alpha_{n-1} of the earlier "
                             "dimensions (one per frozen model before the reference; [] for round 1)")
        losses.spo_coefficients(spo_alphas, args.beta)  # checks each alpha in [0, 1] and beta
    elif spo_alphas is not None or spo_chain_models is not None:
        raise ValueError("spo_alphas / spo_chain_models: only used by the 'spo' loss type, which "
                         f"args.loss_type={loss_types} does not contain")
    if kto_kl is not None and "kto_pair" not in ours:
        raise ValueError(f"kto_kl: only used by the 'kto_pair' loss type, not in args.loss_type={loss_types}")
    if isinstance(kto_kl, (int, float)) and not kto_kl >= 0:
        raise ValueError(f"kto_kl: expected None (batch estimate) or a non-negative number, got {kto_kl!r}")
    if ours and args.ld_alpha is not None:
        raise ValueError(f"args.ld_alpha: LD-DPO weighting is TRL's, not applied to pyalign's {ours}; unset it")
    if ours and args.use_weighting:
        raise ValueError(f"args.use_weighting: WPO weighting is TRL's, not applied to pyalign's {ours}; unset it")


class _SpoChainCollator:
    """Adds the frozen chain's columns to the batches of the wrapped collator: ``[B, n-1]`` each."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples):
        batch = self.collator(examples)
        for column in SPO_CHAIN_COLUMNS:
            if column not in examples[0]:
                raise ValueError(f"dataset: the spo loss needs the column {column} in every dataset it sees; add "
                                 "the columns with DPOTrainer.add_spo_chain_columns(dataset, chain_models)")
            batch[column] = torch.tensor([list(example[column]) for example in examples], dtype=torch.float32)
        return batch


def _without_chain(inputs: dict) -> dict:
    return {key: value for key, value in inputs.items() if key not in SPO_CHAIN_COLUMNS}


class DPOTrainer(trl.DPOTrainer):
    """TRL's ``DPOTrainer`` (same arguments, same ``DPOConfig``) with pyalign computing the log-probs.

    pyalign's own keyword arguments:

    - ``fused``: ``"auto"`` (fused lm_head where :mod:`pyalign.models.fused_head` allows it, else the
      fused op on the model's logits, reason logged once), ``True`` (fused lm_head or ValueError),
      ``False`` (always the logits);
    - ``strict``: raise ValueError instead of handing a forward back to TRL's own fused head (MoE
      auxiliary loss, context-parallel ``shift_labels``, temperature, an lm_head sharded by FSDP1
      or split by tensor parallelism; FSDP2 and DeepSpeed ZeRO-3 are computed by pyalign);
    - ``spo_alphas``, ``spo_chain_models`` for ``loss_type="spo"``; ``kto_kl`` for ``"kto_pair"``.

    ``pyalign_routes`` lists the route of the latest fused forwards: ``(model class, route, reason)``
    with route ``"fused lm_head"``, ``"fused lm_head (FSDP2 gather)"``, ``"fused lm_head (ZeRO-3
    gather)"``, ``"logits"`` or ``"trl"`` (:mod:`pyalign.integrations.trl.fused_head`).
    """

    def __init__(self, model, ref_model=None, args=None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, compute_metrics=None, callbacks=None,
                 optimizers=(None, None), quantization_config=None, peft_config=None, *,
                 fused: bool | str = "auto", strict: bool = False, spo_alphas: Sequence[float] | None = None,
                 spo_chain_models: Sequence | None = None, kto_kl: float | None = None):
        if fused not in hf.FUSED_CHOICES:
            raise ValueError(f"fused: expected one of {hf.FUSED_CHOICES}, got {fused!r}")
        if not isinstance(strict, bool):
            raise ValueError(f"strict: expected True or False, got {strict!r}")
        if args is not None:
            check_loss_options(args, spo_alphas, kto_kl, spo_chain_models)
        elif spo_alphas is not None or spo_chain_models is not None or kto_kl is not None:
            raise ValueError("args: pass a DPOConfig whose loss_type names 'spo' / 'kto_pair' to use "
                             "spo_alphas, spo_chain_models or kto_kl")
        self.spo_alphas = None if spo_alphas is None else [float(a) for a in spo_alphas]
        self.kto_kl = kto_kl
        self._pyalign_head = fused_head.HeadSettings(fused=fused, strict=strict, trainer=weakref.ref(self))
        with _pyalign_heads_installed(self._pyalign_head):
            super().__init__(
                model, ref_model=ref_model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                eval_dataset=eval_dataset, processing_class=processing_class, compute_metrics=compute_metrics,
                callbacks=callbacks, optimizers=optimizers, quantization_config=quantization_config,
                peft_config=peft_config)
        policy = self.model.get_base_model() if is_peft_model(self.model) else self.model
        if getattr(policy, "_pyalign_fused_head", None) is not self._pyalign_head:
            raise RuntimeError(
                f"trl {trl.__version__}: DPOTrainer did not install its fused lm_head through "
                "add_fused_lm_head, the point pyalign replaces; this TRL version is not supported")
        if "spo" in self.loss_types:
            self._prepare_spo_chain(spo_chain_models)

    @property
    def pyalign_routes(self) -> list[tuple[str, str, str]]:
        return list(self._pyalign_head.routes)

    # ------------------------------------------------------------------ SPO's frozen chain

    def _prepare_spo_chain(self, chain_models) -> None:
        """Check (or compute) the frozen chain's columns in every dataset and batch them."""
        if not self.spo_alphas:  # round 1: the chain is the reference alone
            return
        if chain_models is not None:
            from trl.trainer.utils import create_model_from_path  # noqa: PLC0415

            if len(chain_models) != len(self.spo_alphas):
                raise ValueError(f"spo_chain_models: expected {len(self.spo_alphas)} frozen models (one per "
                                 f"alpha), got {len(chain_models)}")
            chain_models = [create_model_from_path(m, dtype=self.model.dtype) if isinstance(m, str) else m
                            for m in chain_models]
        self.train_dataset = self._with_spo_chain(self.train_dataset, chain_models, "train_dataset")
        if isinstance(self.eval_dataset, dict):
            self.eval_dataset = {name: self._with_spo_chain(ds, chain_models, f"eval_dataset[{name!r}]")
                                 for name, ds in self.eval_dataset.items()}
        elif self.eval_dataset is not None:
            self.eval_dataset = self._with_spo_chain(self.eval_dataset, chain_models, "eval_dataset")
        self.data_collator = _SpoChainCollator(self.data_collator)

    def _with_spo_chain(self, dataset, chain_models, label: str):
        if not all(column in (getattr(dataset, "column_names", None) or []) for column in SPO_CHAIN_COLUMNS):
            if chain_models is None:
                raise ValueError(
                    f"{label}: the spo loss needs the columns {list(SPO_CHAIN_COLUMNS)} (sequence log-probs "
                    "of the frozen models pi_0..pi_{n-2}, one list per pair), or spo_chain_models= to "
                    "compute them")
            dataset = self.add_spo_chain_columns(dataset, chain_models, desc=label)
        first = dataset[0]
        for column in SPO_CHAIN_COLUMNS:
            if len(first[column]) != len(self.spo_alphas):
                raise ValueError(
                    f"{label}: column {column} holds {len(first[column])} log-probs per pair, but "
                    f"spo_alphas has {len(self.spo_alphas)} weights (one per frozen model before the reference)")
        return dataset

    @torch.no_grad()
    def sequence_log_probs(self, model, dataset, *, desc: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        """Completion log-probs ``(chosen [N], rejected [N])`` of a frozen ``model`` on a dataset
        prepared by this trainer, summed over the same tokens as TRL's ``logps``."""
        device = self.accelerator.device
        model = model.to(device).eval()
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.args.per_device_eval_batch_size,
                                             collate_fn=self.data_collator, shuffle=False)
        chosen, rejected = [], []
        for batch in tqdm(loader, desc=f"Frozen log-probs ({desc or type(model).__name__})"):
            input_ids = batch["input_ids"].to(device)
            labels = input_ids.masked_fill(batch["completion_mask"].to(device) == 0, IGNORE_INDEX)
            with self.accelerator.autocast():
                logps = hf.causal_lm_sequence_logprobs(model, input_ids, batch["attention_mask"].to(device), labels,
                                                       fused=self._pyalign_head.fused)
            c, r = logps.float().chunk(2)
            chosen.append(c.cpu())
            rejected.append(r.cpu())
        return torch.cat(chosen), torch.cat(rejected)

    def add_spo_chain_columns(self, dataset, chain_models, *, desc: str = ""):
        """``dataset`` (prepared by this trainer) with :data:`SPO_CHAIN_COLUMNS` computed from
        ``chain_models`` (pi_0..pi_{n-2}); save it (``dataset.save_to_disk``) to reuse them."""
        per_model = [self.sequence_log_probs(frozen, dataset, desc=f"{desc} pi_{k}")
                     for k, frozen in enumerate(chain_models)]
        for column, side in zip(SPO_CHAIN_COLUMNS, (0, 1)):
            values = torch.stack([logps[side] for logps in per_model], dim=1)
            if column in dataset.column_names:
                dataset = dataset.remove_columns(column)
            dataset = dataset.add_column(column, values.tolist())
        return dataset

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if "spo" in self.loss_types:
            self._signature_columns = list(self._signature_columns) + [
                c for c in SPO_CHAIN_COLUMNS if c not in self._signature_columns]

    # ------------------------------------------------------------------ log-probs and loss

    def compute_ref_log_probs(self, model, inputs):
        return super().compute_ref_log_probs(model, _without_chain(inputs))

    def _compute_loss(self, model, inputs, return_outputs):
        if not any(name in PYALIGN_LOSS_TYPES for name in self.loss_types):
            return super()._compute_loss(model, inputs, return_outputs)
        return self._compute_loss_with_pyalign_losses(model, inputs, return_outputs)

    def _compute_loss_with_pyalign_losses(self, model, inputs, return_outputs):
        """TRL's ``_compute_loss`` for TRL's loss types (0 when there are none) and its metrics,
        plus pyalign's losses on the log-probs of the same forwards."""
        mode = "train" if self.model.training else "eval"
        weighted = list(zip(self.loss_types, self.loss_weights, strict=True))
        if "spo" in self.loss_types and self.spo_alphas is None:
            raise ValueError("spo_alphas: the spo loss needs them; pass spo_alphas= to the trainer")
        trl_losses = [(n, w) for n, w in weighted if n not in PYALIGN_LOSS_TYPES]
        pyalign_losses = [(n, w) for n, w in weighted if n in PYALIGN_LOSS_TYPES]
        saved = self.loss_types, self.loss_weights
        self.loss_types, self.loss_weights = [n for n, _ in trl_losses], [w for _, w in trl_losses]
        self._pyalign_head.recording = forwards = []
        try:
            result = super()._compute_loss(model, _without_chain(inputs), return_outputs)
        finally:
            self.loss_types, self.loss_weights = saved
            self._pyalign_head.recording = None
        loss, outputs = result if return_outputs else (result, None)

        # TRL's fused forwards in order: the policy's, then the reference's unless precomputed.
        expected = 1 if self.precompute_ref_logps else 2
        if len(forwards) != expected:
            raise RuntimeError(f"trl {trl.__version__}: DPOTrainer._compute_loss made {len(forwards)} fused "
                               f"forwards, {expected} expected; this TRL version is not supported")
        seq_len = inputs["completion_mask"].shape[1] - 1
        policy = forwards[0].log_probs[:, -seq_len:].sum(1)
        if self.precompute_ref_logps:
            ref = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]]).to(policy)
        else:
            ref = forwards[1].log_probs[:, -seq_len:].sum(1).to(policy)
        policy_chosen, policy_rejected = policy.chunk(2)
        ref_chosen, ref_rejected = ref.chunk(2)
        for name, weight in pyalign_losses:
            if name == "kto_pair":
                out = losses.kto_pair(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                                      beta=self.beta, kl=self.kto_kl)
                kl = self.accelerator.gather(out.extra["kl"].reshape(1))
                self._metrics[mode]["kto_pair/kl"].append(kl.mean().item())
            else:
                # [n, B]: the frozen pi_0..pi_{n-2} from the columns, then the reference pi_{n-1}.
                chain_chosen, chain_rejected = (
                    torch.cat([inputs[column].to(policy).t(), ref_side.unsqueeze(0)]) if self.spo_alphas
                    else ref_side.unsqueeze(0)
                    for column, ref_side in zip(SPO_CHAIN_COLUMNS, (ref_chosen, ref_rejected)))
                out = losses.spo(policy_chosen, policy_rejected, chain_chosen, chain_rejected,
                                 alphas=self.spo_alphas, beta=self.beta)
                self._log_spo_rewards(mode, out)
            loss = loss + weight * out.loss
        return (loss, outputs) if return_outputs else loss

    def _log_spo_rewards(self, mode: str, out) -> None:
        chosen = self.accelerator.gather(out.chosen_rewards)
        rejected = self.accelerator.gather(out.rejected_rewards)
        metrics = self._metrics[mode]
        metrics["spo/rewards/chosen"].append(chosen.mean().item())
        metrics["spo/rewards/rejected"].append(rejected.mean().item())
        metrics["spo/rewards/accuracies"].append((chosen > rejected).float().mean().item())
        metrics["spo/rewards/margins"].append((chosen - rejected).mean().item())
