"""The training loop, for any objective (:mod:`pyalign.train.objectives`): preference pairs, SFT,
reward-model regression.

Read top to bottom: the data order, one optimizer step (micro-batches, gradient accumulation,
processes), evaluation, checkpoints, and the loop that ties them together.

- **Data order** is a function of the step: epoch e's order is a permutation seeded by ``seed``
  and e, and step s takes the next ``grad_accum`` micro-batches of ``batch_size`` examples. So a
  checkpoint needs only the step, the trained weights, the optimizer and the scheduler to continue
  exactly where a run stopped; dropout masks are seeded by (seed, round, step, process) too.
- **Processes** (``torchrun`` / ``accelerate launch``, :mod:`pyalign.distributed`): the global
  micro-batches are the same as in one process; process r of w takes examples r, r + w, ... of
  each. Each micro-batch's loss is weighted by its units (pairs, tokens, ...) over the step's
  units summed over every micro-batch and process, and the trainable parameters' gradients are
  summed over processes once per step. A step is thus one step on the union of its micro-batches
  whatever the number of processes, and a checkpoint resumes under any number of them. Only
  process 0 writes checkpoints, metrics, the experiment trackers' logs (``training.report_to``:
  tensorboard, wandb, mlflow; :mod:`pyalign.train.tracking`) and shows a progress bar.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from pyalign import distributed
from pyalign.data import check_token_ids
from pyalign.io import write_json_atomic
from pyalign.models import autocast_context, trainable_parameters
from pyalign.train import preemption, tracking
from pyalign.train.checkpoint import (
    find_checkpoint_everywhere, latest_step, load_sharded_checkpoint, save_checkpoint, save_sharded_checkpoint,
)
from pyalign.train.config import TrainingConfig
from pyalign.train.objectives import Objective
from pyalign.train.sharding import is_sharded

logger = logging.getLogger("pyalign.train")
SHOWN_METRICS = ("loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "nll",
                 "perplexity", "lr")


def step_seed(seed: int, round_number: int, step: int, rank: int) -> int:
    """The torch seed of one optimizer step on one process (dropout masks)."""
    digest = hashlib.blake2b(f"{seed}/{round_number}/{step}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class Trainer:
    """Trains ``model`` (only its trainable parameters move, e.g. a peft LoRA) on ``train`` with
    ``objective``; checkpoints and logs go under ``run_dir``.

    ``train`` / ``eval``: datasets with ``len()`` and ``batch(indices) -> dict of tensors``.
    ``callback(event, info)`` is called after every optimizer step with ``event == "step"`` and
    ``info`` = ``{"round", "step", "total_steps", "metrics", "trainer"}``; it may change the
    objective between steps (e.g. ``info["trainer"].objective.set_alphas([...])``: the
    objective's state is saved in checkpoints, so a resumed run continues with it).
    """

    def __init__(
        self,
        model,
        objective: Objective,
        train,
        training: TrainingConfig,
        run_dir: str | Path,
        *,
        eval=None,
        fingerprint: dict | None = None,
        callback: Callable[[str, dict], None] | None = None,
        name: str = "train",
        round_number: int = 1,
    ):
        self.model = model
        self.objective = objective
        self.train_data = train
        self.eval_data = eval
        self.cfg = training
        self.run_dir = Path(run_dir)
        self.fingerprint = fingerprint or {}
        self.callback = callback or (lambda event, info: None)
        self.name = name
        self.round_number = round_number
        self.device = _compute_device(model)
        self.params = trainable_parameters(model)
        # Under FSDP2 the parameters are DTensor shards: FSDP reduce-scatters (sums) their gradients,
        # and every process must run the same forwards and backwards, since each one gathers weights.
        self.sharded = is_sharded(model)
        # torch.distributed.checkpoint when sharding is asked for, even in one process, so that a run
        # resumes under any number of processes.
        self.sharded_checkpoints = getattr(training, "sharding", "none") == "fsdp"
        if not self.params:
            raise ValueError("model: has no trainable parameters (is the LoRA adapter applied?)")
        if len(train) == 0:
            raise ValueError("train: the training data set is empty")
        objective.check_data(train, "train")
        if eval is not None:
            objective.check_data(eval, "eval")
        for split, data in (("train", train), ("eval", eval)):
            if data is not None:
                check_token_ids(data, model, split)
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.is_main = self.rank == 0
        # checked on every process, so a missing tracker client stops them all with one message
        self.report_to = tracking.report_to_of(training)

        micro_batches = math.ceil(len(train) / training.batch_size)
        self.steps_per_epoch = math.ceil(micro_batches / training.grad_accum)
        self.total_steps = self.steps_per_epoch * training.epochs
        if self.total_steps > training.step_limit:
            raise ValueError(
                f"training.epochs: {training.epochs} epochs x {self.steps_per_epoch} optimizer steps per epoch = "
                f"{self.total_steps} steps, above training.step_limit ({training.step_limit}); if that many is "
                "meant, raise training.step_limit")
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=training.lr, weight_decay=training.weight_decay)
        self.scheduler = _make_scheduler(self.optimizer, training, self.total_steps)
        self.step = 0
        self.history: list[dict] = []  # logged training metrics, kept across resumes
        self._stop: str | None = None  # a stop signal every process has seen by the last step

    # ------------------------------------------------------------------ data order
    def epoch_order(self, epoch: int) -> Tensor:
        generator = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
        return torch.randperm(len(self.train_data), generator=generator)

    def micro_batches_of_step(self, step: int) -> list[Tensor]:
        """The example indices of each micro-batch of optimizer step ``step`` (0-based), over
        all processes together."""
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        size, accum = self.cfg.batch_size, self.cfg.grad_accum
        first = step_in_epoch * accum * size
        return [order[i : i + size] for i in range(first, min(first + accum * size, len(order)), size)]

    def this_process(self, indices: Tensor) -> Tensor:
        """This process's share of a micro-batch (strided, as :func:`pyalign.distributed.shard`)."""
        return indices[self.rank :: self.world]

    # ------------------------------------------------------------------ one step
    def _to_device(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {name: value.to(self.device) for name, value in batch.items()}

    def loss_on_batch(self, batch: dict[str, Tensor]):
        """The objective's output on one collated batch (moved to the device, under autocast)."""
        batch = self._to_device(batch)
        with autocast_context(self.device, self.cfg.mixed_precision):
            return self.objective.loss(self.model, batch)

    def optimizer_step(self, step: int) -> dict[str, float]:
        """Optimizer step ``step``: its micro-batches (this process's share of each), each loss
        weighted by its share of the step's units on every process, gradients summed over
        processes, clipped, stepped, scheduled. Returns the step's metrics (unit-weighted means
        over every micro-batch and process)."""
        started = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        torch.manual_seed(step_seed(self.cfg.seed, self.round_number, step, self.rank))
        # batch: this process's examples of each micro-batch, and the step's units on every process
        batches, units = [], []
        for indices in self.micro_batches_of_step(step):
            mine = self.this_process(indices)
            if len(mine):
                batches.append(self.train_data.batch(mine.tolist()))
                units.append(self.objective.units(batches[-1]))
            elif self.sharded:  # no example here: a forward and backward with weight 0 keeps FSDP's
                batches.append(self.train_data.batch(indices[:1].tolist()))  # gathers in step
                units.append(0)
        step_units = int(distributed.all_reduce_sum(torch.tensor([float(sum(units))], dtype=torch.float64)).item())
        sums: dict[str, float] = {}
        for batch, batch_units in zip(batches, units):
            # batch -> objective (model -> fused op -> sequence log-probs -> loss) -> backward
            out = self.loss_on_batch(batch)
            (out.loss * (batch_units / max(step_units, 1))).backward()
            for name, value in out.metrics.items():
                sums[name] = sums.get(name, 0.0) + value * batch_units
        # -> gradients summed over processes (FSDP reduce-scattered them already) -> clip -> optimizer
        if not self.sharded:
            distributed.all_reduce_gradients(list(self.params.values()))
        # the stop requests ride on the gather every step makes anyway: every process sees them all
        # at the same step, so all stop together (the checkpoint needs every one of them)
        gathered = distributed.gather_objects((sums, sum(units), preemption.requested()))
        metrics = _weighted_means([(process_sums, n) for process_sums, n, _ in gathered])
        self._stop = preemption.first_request([request for _, _, request in gathered])
        if self.cfg.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.cfg.max_grad_norm)
            metrics["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        if step_units:
            self.optimizer.step()
            self.scheduler.step()
        else:  # nothing to learn from anywhere: no update (AdamW would still decay and move momentum)
            logger.warning("%s step %d: no %s in the step's batches on any process; no update",
                           self.name, step + 1, self.objective.unit)
            with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": on purpose
                warnings.simplefilter("ignore", UserWarning)
                self.scheduler.step()
        metrics["step_s"] = time.perf_counter() - started  # this process's wall time of the step
        return metrics

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The objective's metrics on the eval set; batches are split over the processes and
        their rows gathered in data order."""
        data = self.eval_data
        if data is None:
            return {}
        self.model.eval()
        batch_size = self.cfg.eval_batch_size or self.cfg.batch_size
        starts = list(range(0, len(data), batch_size))
        mine = distributed.shard(starts)
        # Sharded: every process runs as many forwards as the busiest one (FSDP gathers weights in
        # each); the extra ones repeat the first batch and are dropped.
        rounds = -(-len(starts) // self.world) if self.sharded else len(mine)
        local = []
        for i in range(rounds):
            start = mine[i] if i < len(mine) else starts[0]
            batch = self._to_device(data.batch(list(range(start, min(start + batch_size, len(data))))))
            with autocast_context(self.device, self.cfg.mixed_precision):
                rows = self.objective.eval_rows(self.model, batch)
            if i < len(mine):
                local.append({name: value.detach().cpu() for name, value in rows.items()})
        self.model.train()
        gathered = distributed.gather_in_order(local)
        if not gathered:
            return {}
        rows = {name: torch.cat([part[name] for part in gathered]) for name in gathered[0]}
        return self.objective.eval_metrics(rows)

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def _progress_state(self) -> dict:
        """Everything a checkpoint holds besides the trained weights and the optimizer state."""
        epoch = min(self.step, self.total_steps - 1) // self.steps_per_epoch
        return {
            "step": self.step,
            "fingerprint": self.fingerprint,
            "scheduler": self.scheduler.state_dict(),
            "objective": self.objective.state_dict(),
            "data_order": self.epoch_order(epoch),  # recomputable; stored to check and inspect
            "history": self.history,
            "world_size": self.world,  # informative: any number of processes may resume
        }

    def save(self) -> None:
        """Write a checkpoint of the current step. Every process calls it: with sharding each
        writes its shards (torch.distributed.checkpoint); without, process 0 writes one file
        (every process holds the same weights and optimizer state)."""
        if self.sharded_checkpoints:
            save_sharded_checkpoint(self.checkpoint_dir, self.step, self.model, self.optimizer,
                                    self._progress_state(), keep=self.cfg.keep_checkpoints)
            return
        if not self.is_main:
            return
        state = {**self._progress_state(),
                 "trainable": {name: p.detach().cpu().clone() for name, p in self.params.items()},
                 "optimizer": self.optimizer.state_dict()}
        save_checkpoint(self.checkpoint_dir, self.step, state, keep=self.cfg.keep_checkpoints)

    def _check_checkpoint(self, state: dict) -> None:
        if state["fingerprint"] != self.fingerprint:
            raise RuntimeError(
                f"{self.checkpoint_dir}: checkpoint written under different settings "
                f"(model, data, tokenisation or training config changed); use a new output_dir "
                f"or delete {self.run_dir}"
            )
        epoch = min(state["step"], self.total_steps - 1) // self.steps_per_epoch
        if not torch.equal(state["data_order"], self.epoch_order(epoch)):
            raise RuntimeError(f"{self.checkpoint_dir}: data order differs from the checkpoint's")

    def restore(self) -> bool:
        """Load the newest checkpoint that checks out, if any (every process calls it; process 0
        verifies the files and falls back past damaged ones, :mod:`pyalign.train.checkpoint`). A
        sharded checkpoint loads under any number of processes, sharded or not; a single-file one
        into an unsharded model."""
        found = find_checkpoint_everywhere(self.checkpoint_dir)
        if found is None:
            return False
        checkpoint, state = found
        if checkpoint.format == "dcp":
            self._check_checkpoint(state)  # before any weight is touched
            load_sharded_checkpoint(checkpoint.folder, self.model, self.optimizer)
        else:
            if self.sharded:
                raise RuntimeError(
                    f"{self.checkpoint_dir}: a checkpoint written by an unsharded run (training.sharding none); "
                    "a sharded run resumes torch.distributed.checkpoint checkpoints only. Resume with "
                    f"sharding: none, or delete {self.checkpoint_dir} to start the stage over")
            self._check_checkpoint(state)
            with torch.no_grad():
                for name, param in self.params.items():
                    param.copy_(state["trainable"][name])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.objective.load_state_dict(state.get("objective", {}))
        self.step = state["step"]
        self.history = state["history"]
        if self.is_main:
            logger.info("%s: resumed from the checkpoint at step %d/%d", self.name, self.step, self.total_steps)
        return True

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        """Train to the end (resuming from the last checkpoint if any); returns
        ``{"train": last logged means, "eval": final eval metrics, "history": [...]}``."""
        from tqdm.auto import tqdm  # noqa: PLC0415
        from tqdm.contrib.logging import logging_redirect_tqdm  # noqa: PLC0415

        self.restore()
        progress = tqdm(total=self.total_steps, initial=self.step, desc=self.name,
                        disable=not (self.cfg.progress_bar and self.is_main), dynamic_ncols=True)
        window = []
        # the trackers are closed on the way out, the run marked failed when training raised
        with self._trackers() as trackers, logging_redirect_tqdm():
            while self.step < self.total_steps:
                metrics = self.optimizer_step(self.step)
                self.step += 1
                window.append(metrics)
                progress.update(1)
                shown = {"loss": f"{metrics.get('loss', float('nan')):.4f}"}
                shown.update({k: f"{metrics[k]:.3g}" for k in self.objective.progress_metrics if k in metrics})
                progress.set_postfix(shown)
                if self.step % self.cfg.log_every == 0 or self.step == self.total_steps:
                    self._log("train", _mean_of(window), trackers)
                    window = []
                if self.cfg.eval_every and self.step % self.cfg.eval_every == 0 and self.step < self.total_steps:
                    self._log("eval", self.evaluate(), trackers)
                # before the checkpoint: what the callback changes (e.g. spo alphas) is saved with this step
                self.callback("step", {"round": self.round_number, "step": self.step,
                                       "total_steps": self.total_steps, "metrics": metrics, "trainer": self})
                due = self.cfg.save_every and self.step % self.cfg.save_every == 0
                stop = preemption.requested() if self.world == 1 else self._stop
                if (due or stop) and self.step < self.total_steps:
                    self.save()
                if stop and self.step < self.total_steps:
                    progress.close()
                    raise preemption.Preempted(stop, f"at {self.name} step {self.step}/{self.total_steps}",
                                               str(self.checkpoint_dir / f"step_{self.step:06d}"))
            progress.close()
            if latest_step(self.checkpoint_dir) != self.step:
                self.save()  # the finished run's state: a crash while saving its outputs resumes here
            final_eval = self.evaluate()
            self._log("eval", final_eval, trackers)
        result = {"train": self.history[-1] if self.history else {}, "eval": final_eval, "history": self.history}
        if self.is_main:
            write_json_atomic(self.run_dir / "metrics.json", result)
        return result

    def _trackers(self) -> tracking.Trackers:
        """The experiment trackers of ``training.report_to``, from the step the run starts at
        (process 0 only: the other processes log nowhere)."""
        config = {"training": tracking.plain(self.cfg), "name": self.name, "round": self.round_number,
                  "total_steps": self.total_steps, "processes": self.world}
        return tracking.open_trackers(self.report_to if self.is_main else [], self.run_dir, run_name=self.name,
                                      config=config, fingerprint=self.fingerprint, start_step=self.step)

    def _log(self, split: str, metrics: dict[str, float], trackers: tracking.Trackers) -> None:
        if not metrics:
            return
        if split == "train":
            self.history.append({"step": self.step, **metrics})
        trackers.log(split, self.step, metrics)
        if self.is_main:
            shown = " ".join(f"{k}={metrics[k]:.4g}" for k in SHOWN_METRICS if k in metrics)
            logger.info("%s step %d/%d %s: %s", self.name, self.step, self.total_steps, split, shown)


def _weighted_means(per_process: list[tuple[dict[str, float], int]]) -> dict[str, float]:
    """Unit-weighted means of the metrics summed on each process."""
    sums: dict[str, float] = {}
    for process_sums, _ in per_process:
        for name, value in process_sums.items():
            sums[name] = sums.get(name, 0.0) + value
    units = sum(process_units for _, process_units in per_process)
    return {name: total / units for name, total in sums.items()} if units else {}


def _mean_of(window: list[dict[str, float]]) -> dict[str, float]:
    names = set().union(*window)
    return {n: sum(m[n] for m in window if n in m) / sum(1 for m in window if n in m) for n in sorted(names)}


def _make_scheduler(optimizer, training: TrainingConfig, total_steps: int):
    from transformers import get_scheduler  # noqa: PLC0415

    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[training.lr_scheduler]
    warmup = round(training.warmup_ratio * total_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def _compute_device(model) -> torch.device:
    """Where the model computes: its parameters' device, or the sharded parameters' mesh device
    (parameters offloaded to the CPU under FSDP2 still compute on the GPU)."""
    parameter = next(model.parameters())
    mesh = getattr(parameter, "device_mesh", None)
    if mesh is not None and mesh.device_type != "cpu":
        return torch.device(mesh.device_type, torch.cuda.current_device())
    return parameter.device
