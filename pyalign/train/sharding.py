"""Sharding the trained model over processes with torch's FSDP2 (``training.sharding: fsdp``).

    model = shard_model(model, training, device)     # fully_shard on each decoder layer, then the root

What is sharded: every parameter of the model, trainable or frozen (the base weights under a LoRA
too), split along its first dimension over one device mesh of every process; each process keeps
1/p of the parameters, of their gradients and of the optimizer state. A decoder layer's weights are
all-gathered for its forward (and again for its backward) and freed after; the gradients are
reduce-scattered (summed: the trainer weights each micro-batch by its share of the step's units, so
a step's gradient is a sum over processes, see :mod:`pyalign.train.trainer`). The decoder layers
are the classes transformers names in ``model._no_split_modules`` (what accelerate's FSDP
auto-wrap uses too); an untied lm_head is a group of its own (so that the fused log-prob op works
on its vocabulary shards); the root group holds the rest: embeddings, final norm, and a tied
lm_head (tied input and output embeddings are one parameter, in that one group).

- Mixed precision on CUDA (``training.mixed_precision`` auto or bf16): FSDP2's
  ``MixedPrecisionPolicy`` all-gathers the parameters in bf16 for compute and reduce-scatters the
  gradients in fp32 (the sharded fp32 parameters stay the optimizer's); the trainer's autocast
  stays on over it, so the ops autocast keeps in fp32 (softmax, norms, the fused log-prob op's
  accumulation) compute as they do without sharding.
- ``training.cpu_offload``: parameters, gradients and optimizer state live on the CPU between uses
  (FSDP2's ``CPUOffloadPolicy``), for CUDA runs.
- Activation checkpointing (``training.gradient_checkpointing``) is set on the layers before they
  are sharded and composes with it.
- One process: nothing to shard; ``sharding: fsdp`` then trains exactly as ``none`` (the
  checkpoints are still written with torch.distributed.checkpoint, so a later run under several
  processes resumes them).

The frozen models (reference, SPO chain) are not trained and stay log-prob caches
(:mod:`pyalign.train.logprob_cache`).
"""

from __future__ import annotations

import logging

import torch

from pyalign import distributed
from pyalign.models import uses_autocast

logger = logging.getLogger("pyalign.train")
SHARDINGS = ("none", "fsdp")


def sharding_active(training) -> bool:
    """Whether this run shards its model: ``sharding: fsdp`` with more than one process."""
    return getattr(training, "sharding", "none") == "fsdp" and distributed.world_size() > 1


def _inner_model(model):
    """The transformers model inside peft wrappers (for ``_no_split_modules``)."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "_no_split_modules") and model._no_split_modules is not None:
            return model
        for name in ("base_model", "model", "backbone"):
            inner = getattr(model, name, None)
            if isinstance(inner, torch.nn.Module) and inner is not model:
                model = inner
                break
    return model


def _untied_output_head(model) -> torch.nn.Module | None:
    """The lm_head when it is a plain Linear with a weight of its own (not tied to the input
    embeddings), else None. Its own FSDP group keeps its weight sharded up to the head, where the
    fused log-prob op computes over the vocabulary shards without gathering it ("vocab_parallel",
    :mod:`pyalign.models.fused_head`; measured faster and smaller than gathering it with the root
    by ``python -m bench.sharded_head``). A tied weight stays in the root group with the embeddings."""
    get_output = getattr(model, "get_output_embeddings", None)
    get_input = getattr(model, "get_input_embeddings", None)
    head = get_output() if callable(get_output) else None
    embeddings = get_input() if callable(get_input) else None
    if type(head) is not torch.nn.Linear or embeddings is None:
        return None
    return None if head.weight is getattr(embeddings, "weight", None) else head


def decoder_layers(model) -> list[torch.nn.Module]:
    """The modules FSDP2 shards one by one: instances of the classes transformers lists in the
    model's ``_no_split_modules`` (its decoder layers). Raises ValueError naming what is missing."""
    inner = _inner_model(model)
    names = set(getattr(inner, "_no_split_modules", None) or ())
    if not names:
        raise ValueError(
            f"training.sharding: fsdp shards a transformers model layer by layer and finds its layers by "
            f"the classes in _no_split_modules; {type(inner).__name__} lists none (shard it yourself with "
            "torch.distributed.fsdp.fully_shard, or use sharding: none)")
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"training.sharding: fsdp found no module of the classes {sorted(names)} "
            f"({type(inner).__name__}._no_split_modules) in the model")
    return layers


def check_sharding(training, device: torch.device) -> None:
    """Adopt what the launcher asked for and refuse settings that cannot work together, before
    any model is loaded. ``accelerate launch`` with an FSDP config (ACCELERATE_USE_FSDP,
    FSDP_OFFLOAD_PARAMS) means ``sharding: fsdp`` (and ``cpu_offload``), whatever the file says."""
    if distributed.launcher_shards() and training.sharding != "fsdp":
        if distributed.is_main():
            logger.info("accelerate launched with an FSDP config: training.sharding fsdp")
        training.sharding = "fsdp"
    if distributed.launcher_offloads() and not training.cpu_offload:
        if distributed.is_main():
            logger.info("accelerate's FSDP config offloads parameters: training.cpu_offload true")
        training.cpu_offload = True
    if getattr(training, "cpu_offload", False):
        if getattr(training, "sharding", "none") != "fsdp":
            raise ValueError("training.cpu_offload: offloads sharded parameters and optimizer state; it needs "
                             "training.sharding: fsdp")
        if device.type != "cuda":
            raise ValueError(f"training.cpu_offload: moves parameters between a GPU and the CPU; this run's device "
                             f"is {device.type}, where they already are (set cpu_offload: false)")


def shard_model(model, training, device: torch.device):
    """``fully_shard`` on each decoder layer and the root over a mesh of every process (a no-op
    in one process). The model must be on ``device`` (or on the CPU with ``cpu_offload``)."""
    check_sharding(training, device)
    if not sharding_active(training):
        return model
    from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard  # noqa: PLC0415

    mesh = init_device_mesh(device.type, (distributed.world_size(),))
    options = {"mesh": mesh}
    if device.type == "cuda" and uses_autocast(device, training.mixed_precision):
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if training.cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, **options)
    head = _untied_output_head(model)
    if head is not None:
        fully_shard(head, **options)
    fully_shard(model, **options)
    for module in model.modules():
        if hasattr(module, "set_gradient_divide_factor"):
            # The trainer weights each micro-batch's loss by its share of the step's units on every
            # process, so the step's gradient is the SUM over processes (FSDP would average). A plain
            # SUM reduction (not NCCL's PreMulSum, which gloo lacks) with a post-division by 1.
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    if distributed.is_main():
        logger.info("fsdp: %d decoder layers%s + root sharded over %d processes%s", len(layers),
                    " + lm_head" if head is not None else "", distributed.world_size(),
                    ", parameters offloaded to the CPU" if training.cpu_offload else "")
    return model


def is_sharded(model) -> bool:
    """Whether FSDP2 sharded ``model`` (its parameters are DTensors)."""
    from torch.distributed.tensor import DTensor  # noqa: PLC0415

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model, *, trainable_only: bool = False) -> dict[str, torch.Tensor] | None:
    """The whole (unsharded) state dict on process 0's CPU, None on the others; the plain state
    dict for a model that is not sharded. Every process must call it (it gathers)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: PLC0415

    if not is_sharded(model):
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        if trainable_only:
            trainable = {name for name, p in model.named_parameters() if p.requires_grad}
            state = {k: v for k, v in state.items() if k in trainable}
        return state if distributed.is_main() else None
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    state = get_model_state_dict(model, options=options)
    return state if distributed.is_main() else None
