"""One round of preference training on a transformers causal LM with a LoRA adapter.

Read top to bottom: the pieces are the data order, one optimizer step (gradient accumulation over
micro-batches), evaluation, checkpoints, and the loop that ties them together.

The frozen models' log-probs (the reference pi_{n-1}, and for SPO the whole chain pi_0..pi_{n-1})
come precomputed (:mod:`pyalign.train.logprob_cache`): the trainer runs only the policy. Where the
data is in an epoch is a function of the step (the order of epoch e is a permutation seeded by
``seed`` and ``e``), so a checkpoint needs only the step, the weights being trained, the optimizer,
the scheduler and the RNG states to continue exactly where the run stopped.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from pyalign.data import PreferenceDataset
from pyalign.io import write_json_atomic
from pyalign.preference_loss import PreferenceLoss
from pyalign.train.checkpoint import (
    latest_step, load_latest_checkpoint, restore_rng_states, rng_states, save_checkpoint,
)
from pyalign.train.config import MethodConfig, TrainingConfig
from pyalign.train.logprob_cache import FrozenLogprobs
from pyalign.train.modeling import (
    autocast_context, policy_sequence_logprobs, response_token_counts, trainable_parameters,
)

logger = logging.getLogger("pyalign.train")
METRIC_NAMES = ("loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward")


class Objective:
    """The round's loss on sequence log-probs: the configured pyalign loss against the frozen
    chain. For spo the chain is pi_0..pi_{n-1} and the alphas are the round's; with every alpha
    zero (S-DPO) only pi_{n-1} is needed and the loss is spo with n=1, i.e. DPO from pi_{n-1}.
    For the other losses the reference is the last model of the chain."""

    def __init__(self, method: MethodConfig, alphas: list[float]):
        self.method = method
        self.is_spo = method.loss == "spo"
        kwargs = {}
        if self.is_spo:
            kwargs["alphas"] = list(alphas)
        elif method.loss in ("dpo", "robust"):
            kwargs["label_smoothing"] = method.label_smoothing
        self.loss = PreferenceLoss(method.loss, beta=method.beta, nll_weight=method.nll_weight, **kwargs)
        self.average = self.loss.average  # length-averaged log-probs (ipo)
        self.chain_length = len(alphas) + 1 if self.is_spo else 1

    def __call__(self, policy_logps: Tensor, chain_logps: Tensor, num_tokens: Tensor):
        """``policy_logps`` ``[2B]``; ``chain_logps`` ``[n, 2B]`` (n = ``chain_length``)."""
        if self.is_spo:
            return self.loss.loss_from_sequence_logprobs(policy_logps, chain_logps=chain_logps, num_tokens=num_tokens)
        return self.loss.loss_from_sequence_logprobs(policy_logps, ref_logps=chain_logps[-1], num_tokens=num_tokens)


@dataclass
class RoundData:
    train: PreferenceDataset
    train_chain: FrozenLogprobs
    eval: PreferenceDataset | None = None
    eval_chain: FrozenLogprobs | None = None


class _Averages:
    """Pair-weighted running means of the loss metrics."""

    def __init__(self):
        self.sums, self.pairs = {}, 0

    def add(self, out, pairs: int) -> None:
        values = {"loss": out.loss.item(), **out.metrics}
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + value * pairs
        self.pairs += pairs

    def means(self) -> dict[str, float]:
        return {name: total / self.pairs for name, total in self.sums.items()} if self.pairs else {}


class PreferenceTrainer:
    """Trains ``model`` (a peft model: only its trainable parameters move) for one round on
    ``data`` with ``objective``; checkpoints and logs go under ``round_dir``."""

    def __init__(
        self,
        model,
        data: RoundData,
        objective: Objective,
        training: TrainingConfig,
        round_dir: str | Path,
        *,
        fingerprint: dict | None = None,
        callback: Callable[[str, dict], None] | None = None,
        name: str = "round",
        round_number: int = 1,
    ):
        self.model = model
        self.data = data
        self.objective = objective
        self.cfg = training
        self.round_dir = Path(round_dir)
        self.fingerprint = fingerprint or {}
        self.callback = callback or (lambda event, info: None)
        self.name = name
        self.round_number = round_number
        self.device = next(model.parameters()).device
        self.params = trainable_parameters(model)
        if not self.params:
            raise ValueError("model: has no trainable parameters (is the LoRA adapter applied?)")
        for split, dataset, chain in (("train", data.train, data.train_chain), ("eval", data.eval, data.eval_chain)):
            if dataset is None:
                continue
            expected = (objective.chain_length, len(dataset))
            if chain is None or tuple(chain.chosen.shape) != expected or tuple(chain.rejected.shape) != expected:
                got = None if chain is None else tuple(chain.chosen.shape)
                raise ValueError(f"data.{split}_chain: expected frozen log-probs of shape {expected} "
                                 f"(models x pairs), got {got}")

        micro_batches = math.ceil(len(data.train) / training.batch_size)
        self.steps_per_epoch = math.ceil(micro_batches / training.grad_accum)
        self.total_steps = self.steps_per_epoch * training.epochs
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=training.lr, weight_decay=training.weight_decay)
        self.scheduler = _make_scheduler(self.optimizer, training, self.total_steps)
        self.step = 0
        self.history: list[dict] = []  # logged training metrics, kept across resumes

    # ------------------------------------------------------------------ data order
    def epoch_order(self, epoch: int) -> Tensor:
        generator = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
        return torch.randperm(len(self.data.train), generator=generator)

    def micro_batches_of_step(self, step: int) -> list[Tensor]:
        """The pair indices of each micro-batch of optimizer step ``step`` (0-based)."""
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        size, accum = self.cfg.batch_size, self.cfg.grad_accum
        first = step_in_epoch * accum * size
        return [order[i : i + size] for i in range(first, min(first + accum * size, len(order)), size)]

    # ------------------------------------------------------------------ one step
    def _to_device(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {name: value.to(self.device) for name, value in batch.items()}

    def loss_on_batch(self, batch: dict[str, Tensor], chain: FrozenLogprobs):
        """Forward the policy on a collated batch and return the LossOutput."""
        batch = self._to_device(batch)
        with autocast_context(self.device, self.cfg.mixed_precision):
            policy = policy_sequence_logprobs(self.model, batch, average=self.objective.average,
                                              fused=self.cfg.fused_lm_head)
        chain_logps = chain.rows(batch["index"].cpu()).to(self.device)
        return self.objective(policy.float(), chain_logps, response_token_counts(batch))

    def optimizer_step(self, micro_batches: list[Tensor]) -> dict[str, float]:
        """Accumulate gradients over the micro-batches, weighting each by its share of the pairs
        (the step equals one step on their union), clip, step, schedule."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        pairs = sum(len(indices) for indices in micro_batches)
        averages = _Averages()
        for indices in micro_batches:
            out = self.loss_on_batch(self.data.train.batch(indices.tolist()), self.data.train_chain)
            (out.loss * (len(indices) / pairs)).backward()
            averages.add(out, len(indices))
        metrics = averages.means()
        if self.cfg.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.cfg.max_grad_norm)
            metrics["grad_norm"] = float(norm)
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        return metrics

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss, reward accuracy, margin and chosen/rejected rewards on the eval pairs (all at once)."""
        data, chain = self.data.eval, self.data.eval_chain
        if data is None:
            return {}
        self.model.eval()
        policy, chains, tokens = [], [], []
        batch_size = self.cfg.eval_batch_size or self.cfg.batch_size
        for start in range(0, len(data), batch_size):
            batch = self._to_device(data.batch(range(start, min(start + batch_size, len(data)))))
            with autocast_context(self.device, self.cfg.mixed_precision):
                logps = policy_sequence_logprobs(self.model, batch, average=self.objective.average,
                                                 fused=self.cfg.fused_lm_head).float()
            half = logps.shape[0] // 2
            policy.append(logps.view(2, half))
            chains.append(chain.rows(batch["index"].cpu()).view(-1, 2, half))
            tokens.append(response_token_counts(batch).view(2, half))
        self.model.train()
        policy_all = torch.cat(policy, 1).reshape(-1)
        chain_all = torch.cat(chains, 2).reshape(chains[0].shape[0], -1).to(self.device)
        out = self.objective(policy_all, chain_all, torch.cat(tokens, 1).reshape(-1))
        return {"loss": out.loss.item(), **out.metrics}

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        return self.round_dir / "checkpoints"

    def save(self) -> None:
        epoch = min(self.step, self.total_steps - 1) // self.steps_per_epoch
        state = {
            "step": self.step,
            "fingerprint": self.fingerprint,
            "trainable": {name: p.detach().cpu().clone() for name, p in self.params.items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_states(),
            "data_order": self.epoch_order(epoch),  # recomputable; stored to check and inspect
            "history": self.history,
        }
        save_checkpoint(self.checkpoint_dir, self.step, state, keep=self.cfg.keep_checkpoints)

    def restore(self) -> bool:
        state = load_latest_checkpoint(self.checkpoint_dir)
        if state is None:
            return False
        if state["fingerprint"] != self.fingerprint:
            raise RuntimeError(
                f"{self.checkpoint_dir}: checkpoint written under different settings "
                f"(model, data, tokenisation or training config changed); use a new output_dir "
                f"or delete {self.round_dir}"
            )
        epoch = min(state["step"], self.total_steps - 1) // self.steps_per_epoch
        if not torch.equal(state["data_order"], self.epoch_order(epoch)):
            raise RuntimeError(f"{self.checkpoint_dir}: data order differs from the checkpoint's")
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(state["trainable"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        restore_rng_states(state["rng"])
        self.step = state["step"]
        self.history = state["history"]
        logger.info("%s: resumed from the checkpoint at step %d/%d", self.name, self.step, self.total_steps)
        return True

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        """Train to the end of the round (resuming from the last checkpoint if any); returns
        ``{"train": last logged means, "eval": final eval metrics, "history": [...]}``."""
        from tqdm.auto import tqdm  # noqa: PLC0415
        from tqdm.contrib.logging import logging_redirect_tqdm  # noqa: PLC0415

        self.restore()
        writer = self._summary_writer()
        progress = tqdm(total=self.total_steps, initial=self.step, desc=self.name,
                        disable=not self.cfg.progress_bar, dynamic_ncols=True)
        window = []
        with logging_redirect_tqdm():
            while self.step < self.total_steps:
                metrics = self.optimizer_step(self.micro_batches_of_step(self.step))
                self.step += 1
                window.append(metrics)
                progress.update(1)
                progress.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics.get('reward_accuracy', 0):.2f}")
                if self.step % self.cfg.log_every == 0 or self.step == self.total_steps:
                    self._log("train", _mean_of(window), writer)
                    window = []
                if self.cfg.eval_every and self.step % self.cfg.eval_every == 0 and self.step < self.total_steps:
                    self._log("eval", self.evaluate(), writer)
                if self.cfg.save_every and self.step % self.cfg.save_every == 0 and self.step < self.total_steps:
                    self.save()
                self.callback("step", {"round": self.round_number, "step": self.step,
                                       "total_steps": self.total_steps, "metrics": metrics})
            progress.close()
            if latest_step(self.checkpoint_dir) != self.step:
                self.save()  # the finished round's state: a crash while merging resumes here
            final_eval = self.evaluate()
            self._log("eval", final_eval, writer)
        if writer is not None:
            writer.close()
        result = {"train": self.history[-1] if self.history else {}, "eval": final_eval, "history": self.history}
        write_json_atomic(self.round_dir / "metrics.json", result)
        return result

    def _summary_writer(self):
        if not self.cfg.tensorboard:
            return None
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415

        # purge_step drops events a killed run logged after its last checkpoint.
        return SummaryWriter(str(self.round_dir / "tensorboard"), purge_step=self.step + 1)

    def _log(self, split: str, metrics: dict[str, float], writer) -> None:
        if not metrics:
            return
        if split == "train":
            self.history.append({"step": self.step, **metrics})
        if writer is not None:
            for name, value in metrics.items():
                writer.add_scalar(f"{split}/{name}", value, self.step)
        shown = " ".join(f"{k}={metrics[k]:.4g}" for k in METRIC_NAMES + ("nll", "lr") if k in metrics)
        logger.info("%s step %d/%d %s: %s", self.name, self.step, self.total_steps, split, shown)


def _mean_of(window: list[dict[str, float]]) -> dict[str, float]:
    names = set().union(*window)
    return {n: sum(m[n] for m in window if n in m) / sum(1 for m in window if n in m) for n in sorted(names)}


def _make_scheduler(optimizer, training: TrainingConfig, total_steps: int):
    from transformers import get_scheduler  # noqa: PLC0415

    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[training.lr_scheduler]
    warmup = round(training.warmup_ratio * total_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
