"""pyalign's TRL ``DPOTrainer`` drop-in with a sharded lm_head, against TRL's own trainer, in two real
gloo processes on the CPU (docs/integrations.md, "Sharded models: FSDP2 and DeepSpeed ZeRO-3").

- **FSDP2.** accelerate 1.16 does not run FSDP on CPU processes: ``Accelerator(cpu=True)`` under an
  FSDP config becomes ``MULTI_CPU`` (DDP) without a word, and ``cpu=False`` on a machine without an
  accelerator ``NO`` (``test_accelerate_runs_no_fsdp_on_cpu_processes`` pins that down; when it
  fails, accelerate changed and a real ``accelerate launch`` can replace what follows). So each
  process builds TRL's trainer and the drop-in on the same weights and shards their models with
  accelerate's and TRL's own FSDP2 functions (``fsdp2_prepare_model`` for the policy,
  ``trl.models.utils.prepare_fsdp`` for the reference: what an FSDP2 launch runs in ``train()`` and
  ``__init__``), or by hand with the lm_head its own FSDP group (its weight still a DTensor at the
  head); then three optimizer steps of TRL's ``compute_loss`` (its loss, metrics and gathering
  across processes), clipping and AdamW. Logged numbers, gradient norms and final weights must be
  TRL's, and every fused forward of the drop-in must have gone through pyalign's FSDP2 route. With
  the lm_head in a group of its own, TRL 1.16's own head is not the reference (it all-gathers the
  weight with ``DTensor.full_tensor()`` outside FSDP's hooks, so the lm_head's gradient is never
  reduced across processes): there the drop-in must log what it logs under accelerate's layout,
  and both must match the same steps run unsharded on the whole batch in one process.
- **DeepSpeed ZeRO-3.** A real ``accelerate launch`` with a ZeRO-3 config on 2 CPU processes
  (DeepSpeed's CPU accelerator, gloo), TRL's trainer and the drop-in in the same launch, each
  through ``trainer.train()``: the logged numbers must be TRL's and the drop-in's route ZeRO-3's.
  Skipped, with the reason, when deepspeed is not importable.
- **What stays handed back** to TRL is named: FSDP1 (auto-wrapped units, or an FSDP launch that is
  not FSDP2) and a DTensor lm_head no FSDP2 module manages (tensor parallelism), with TRL's
  numbers, and ``strict=True`` raises.

Every multi-process run has a deadline (the processes are killed and the test fails, naming it),
and gloo's own timeout backs that up inside.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl", reason="trl is not installed (pip install 'pyalign[trl]')")
peft = pytest.importorskip("peft", reason="peft is not installed")

import torch.distributed as dist  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # helpers_tiny_lm, in the spawned and launched processes too

from helpers_processes import free_port, run_gloo  # noqa: E402

WORLD = 2
STEPS = 3
PER_RANK = 2          # pairs per process and step
LR = 1e-3
JOIN_TIMEOUT_S = 400  # hang guard; the FSDP2 run takes ~1 min on 2 shared cores
COLLECTIVE_TIMEOUT_S = 120
ZERO3_TIMEOUT_S = 600  # the whole launch (DeepSpeed's shm op is compiled once, on first use)
LOG_KEYS_SKIPPED = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "epoch")


def pairs_dataset():
    from datasets import Dataset  # noqa: PLC0415
    from helpers_tiny_lm import make_pairs  # noqa: PLC0415

    return Dataset.from_list(make_pairs(PER_RANK * WORLD * STEPS, seed=3))


def dpo_config(output_dir: str, **overrides):
    settings = dict(output_dir=output_dir, use_cpu=True, bf16=False, fp16=False, per_device_train_batch_size=PER_RANK,
                    max_steps=STEPS, learning_rate=LR, report_to=[], logging_steps=1, save_strategy="no", seed=0,
                    disable_tqdm=True, max_length=32, beta=0.1, dataloader_num_workers=0,
                    gradient_checkpointing=False)
    settings.update(overrides)
    return trl.DPOConfig(**settings)


def assert_same_logs(ours: list[dict], theirs: list[dict], label: str) -> None:
    """Every logged number of every step: TRL's, to float32 rounding (sums in another order)."""
    assert len(ours) == len(theirs) == STEPS, (label, len(ours), len(theirs))
    for step, (mine, reference) in enumerate(zip(ours, theirs), start=1):
        mine = {k: v for k, v in mine.items() if k not in LOG_KEYS_SKIPPED}
        reference = {k: v for k, v in reference.items() if k not in LOG_KEYS_SKIPPED}
        assert mine.keys() == reference.keys(), (label, step, sorted(mine.keys() ^ reference.keys()))
        for key, value in reference.items():
            assert mine[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (label, step, key, mine[key], value)


def assert_close_to_scale(actual, expected, rel=2e-5, msg=""):
    error = (actual - expected).abs().max().item()
    assert error <= rel * expected.abs().max().item() + 1e-8, f"{msg}: max error {error:.3g}"


# ----------------------------------------------------------------------------- two spawned processes


def run_two(tmp_path, scenario: str, *args) -> list:
    """``SCENARIOS[scenario](rank, *args)`` in two gloo processes; their results, by rank."""
    return run_gloo(tmp_path, SCENARIOS[scenario], *args, world=WORLD, join_timeout_s=JOIN_TIMEOUT_S,
                    collective_timeout_s=COLLECTIVE_TIMEOUT_S,
                    env={"TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"})


# ----------------------------------------------------------------------------- FSDP2

# (name, model, lm_head layout): "accelerate" is accelerate 1.16's fsdp2_prepare_model (each decoder
# layer, the input embedding, the final norm + lm_head as one group kept unsharded between forward
# and backward, the root; tied: norm + embedding + lm_head), the reference through TRL's
# prepare_fsdp (one root group); "own" puts the lm_head in an FSDP group of its own, so that its
# weight is still a DTensor when the model's forward reaches it (the drop-in alone: see the module
# docstring); "none" is the unsharded reference, each process running the whole global batch.
FSDP2_SCENARIOS = (
    ("full_fine_tuning", "untied", "accelerate"),
    ("lora_tied", "tied", "accelerate"),
    ("full_fine_tuning_own_head_group", "untied", "own"),
    ("unsharded_reference", "untied", "none"),
)
# Logged numbers that are means over pairs (the same whether each process averages its pairs and
# the means are averaged, or one process averages every pair); the token means (entropy,
# mean_token_accuracy, logits/*) are not, so the unsharded reference is compared on these only.
PAIR_MEAN_KEYS = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins",
                  "rewards/accuracies", "logps/chosen", "logps/rejected")


def _build(cls, rank: int, work_dir: str, model_dir: str, kind: str):
    if kind == "tied":  # LoRA; the reference is the policy with its adapter disabled
        from helpers_tiny_lm import make_model, make_tokenizer  # noqa: PLC0415

        tokenizer = make_tokenizer()
        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        trainer = cls(model=make_model(len(tokenizer), seed=0, tied=True),
                      args=dpo_config(os.path.join(work_dir, f"{cls.__module__}-{rank}")),
                      train_dataset=pairs_dataset(), processing_class=tokenizer, peft_config=lora)
        # LoRA's B starts at zero (policy == reference): move it, the same way in both trainers.
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in trainer.model.named_parameters():
                if "lora_B" in name:
                    param.copy_(0.5 * torch.randn(param.shape, generator=gen))
        return trainer
    from transformers import AutoTokenizer  # noqa: PLC0415

    # A path: TRL loads the policy and, for full fine-tuning, its reference model from it.
    return cls(model=model_dir, args=dpo_config(os.path.join(work_dir, f"{cls.__module__}-{rank}")),
               train_dataset=pairs_dataset(), processing_class=AutoTokenizer.from_pretrained(model_dir))


def _shard(trainer, layout: str) -> None:
    from accelerate.utils import FullyShardedDataParallelPlugin  # noqa: PLC0415
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model  # noqa: PLC0415
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415
    from trl.models.utils import prepare_fsdp  # noqa: PLC0415

    if layout == "none":
        return
    # What an FSDP2 accelerate config (fsdp_version: 2, TRANSFORMER_BASED_WRAP) gives the state;
    # accelerate's and TRL's sharding functions read it from there.
    trainer.accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True,
        state_dict_type="SHARDED_STATE_DICT", cpu_ram_efficient_loading=False)
    if layout == "accelerate":
        fsdp2_prepare_model(trainer.accelerator, trainer.model)
    else:
        base = trainer.model
        for layer in base.model.layers:
            fully_shard(layer)
        fully_shard(base.lm_head)
        fully_shard(base)
    if trainer.ref_model is not None:
        prepare_fsdp(trainer.ref_model, trainer.accelerator)


def _full(tensor):
    return tensor.full_tensor() if type(tensor).__name__ == "DTensor" else tensor


def _train_steps(trainer, rank: int, whole_batch: bool = False) -> tuple[list[dict], dict]:
    """STEPS optimizer steps of TRL's compute_loss on this process's PER_RANK pairs per step (every
    process's pairs with ``whole_batch``); the numbers TRL's Trainer logs (metrics gathered across
    processes by TRL, the loss averaged over processes, the clipped gradient norm) and the final
    trainable weights."""
    model = trainer.model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    logs = []
    for step in range(STEPS):
        start = (step * WORLD + (0 if whole_batch else rank)) * PER_RANK
        rows = range(start, start + PER_RANK * (WORLD if whole_batch else 1))
        batch = trainer.data_collator([trainer.train_dataset[i] for i in rows])
        batch = trainer._prepare_inputs(batch)
        model.train()
        trainer._metrics["train"].clear()
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        grad_norm = _full(torch.nn.utils.clip_grad_norm_(params, trainer.args.max_grad_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        entry = {key: values[-1] for key, values in trainer._metrics["train"].items()}
        entry["loss"] = trainer.accelerator.gather(loss.detach().reshape(1)).mean().item()
        entry["grad_norm"] = grad_norm.item()
        logs.append(entry)
    weights = {name: _full(p.detach()).clone() for name, p in model.named_parameters() if p.requires_grad}
    return logs, weights


def _fsdp2_scenario(rank: int, work_dir: str, model_dir: str) -> dict:
    from torch.distributed.fsdp import FSDPModule  # noqa: PLC0415

    from pyalign.integrations.trl import DPOTrainer  # noqa: PLC0415

    results = {}
    for name, kind, layout in FSDP2_SCENARIOS:
        trainers = {"accelerate": (("trl", trl.DPOTrainer), ("pyalign", DPOTrainer)),
                    "own": (("pyalign", DPOTrainer),), "none": (("trl", trl.DPOTrainer),)}[layout]
        for label, cls in trainers:
            torch.manual_seed(0)
            trainer = _build(cls, rank, work_dir, model_dir, kind)
            _shard(trainer, layout)
            inner = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
            layout_seen = {"root_is_fsdp": isinstance(trainer.model, FSDPModule),
                           "lm_head_is_fsdp": isinstance(inner.lm_head, FSDPModule),
                           "lm_head_weight": type(inner.lm_head.weight).__name__}
            logs, weights = _train_steps(trainer, rank, whole_batch=layout == "none")
            results[(name, label)] = {"logs": logs, "weights": weights, "layout": layout_seen,
                                      "routes": list(getattr(trainer, "pyalign_routes", []))}
    return results


# ----------------------------------------------------------------------------- what stays handed back


def _hooks_scenario(rank: int) -> dict:
    """The drop-in's hook on sharded models, one forward each: FSDP1 units (accelerate's
    TRANSFORMER_BASED_WRAP with fsdp_version 1) and a tensor-parallel lm_head (a DTensor no FSDP2
    module owns) are handed to TRL's own forward, whose log-probs it returns, and strict=True
    raises; a bf16 model under FSDP2 with TRL's cast_lm_head_to_fp32 takes pyalign's route with the
    head in float32."""
    from helpers_tiny_lm import make_model  # noqa: PLC0415
    from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard  # noqa: PLC0415
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy  # noqa: PLC0415
    from torch.distributed.tensor import Replicate  # noqa: PLC0415
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module  # noqa: PLC0415
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer  # noqa: PLC0415

    from pyalign.integrations.trl import fused_head  # noqa: PLC0415

    vocab = 67
    gen = torch.Generator().manual_seed(rank)
    input_ids = torch.randint(0, vocab, (2, 9), generator=gen)
    labels = input_ids.masked_fill(torch.arange(9) < 3, -100)
    outputs = ("log_probs", "entropy", "mean_logits", "is_top1")

    def hooked(model, strict=False):
        settings = fused_head.HeadSettings(strict=strict)
        fused_head.add_fused_lm_head(model, outputs=outputs, trl_add_fused_lm_head=trl.trainer.utils.add_fused_lm_head,
                                     settings=settings)
        return settings

    def plain_trl(seed):
        model = make_model(vocab, seed=seed)
        trl.trainer.utils.add_fused_lm_head(model, outputs=outputs)
        with torch.no_grad():
            out = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
        return {"log_probs": out.log_probs, "entropy": out.entropy}

    result = {}
    # FSDP1 with decoder layers auto-wrapped, as accelerate's FSDP1 plugin does.
    model = make_model(vocab, seed=0)
    settings = hooked(model)
    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer})
    wrapped = FullyShardedDataParallel(model, auto_wrap_policy=policy, device_id=torch.device("cpu"),
                                       use_orig_params=True)
    with torch.no_grad():
        out = wrapped(input_ids=input_ids, labels=labels, fused_lm_head=True)
    result["fsdp1"] = {"routes": list(settings.routes), "log_probs": out.log_probs, "entropy": out.entropy,
                       "expected": plain_trl(0)}
    strict_model = make_model(vocab, seed=0)
    hooked(strict_model, strict=True)
    strict_wrapped = FullyShardedDataParallel(strict_model, auto_wrap_policy=policy, device_id=torch.device("cpu"),
                                              use_orig_params=True)
    try:
        with torch.no_grad():
            strict_wrapped(input_ids=input_ids, labels=labels, fused_lm_head=True)
        result["fsdp1_strict"] = ""
    except ValueError as err:
        result["fsdp1_strict"] = str(err)

    # Tensor parallelism on the lm_head: a DTensor weight, split by vocabulary, no FSDP.
    model = make_model(vocab, seed=1)
    settings = hooked(model)
    parallelize_module(model.lm_head, init_device_mesh("cpu", (WORLD,)), ColwiseParallel(output_layouts=Replicate()))
    with torch.no_grad():
        out = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
    result["tensor_parallel"] = {"routes": list(settings.routes), "log_probs": out.log_probs,
                                 "entropy": out.entropy, "expected": plain_trl(1)}

    # bf16 under FSDP2 (the lm_head its own group), the head cast to float32 as TRL's option asks.
    model = make_model(vocab, seed=2).to(torch.bfloat16)
    settings = fused_head.HeadSettings()
    fused_head.add_fused_lm_head(model, cast_lm_head_to_fp32=True, outputs=outputs,
                                 trl_add_fused_lm_head=trl.trainer.utils.add_fused_lm_head, settings=settings)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model.lm_head)
    fully_shard(model)
    with torch.no_grad():  # input_ids positional: the hook names it for the model's own forward
        out = model(input_ids, labels=labels, fused_lm_head=True)
    reference = make_model(vocab, seed=2).to(torch.bfloat16)
    trl.trainer.utils.add_fused_lm_head(reference, cast_lm_head_to_fp32=True, outputs=outputs)
    with torch.no_grad():
        expected = reference(input_ids=input_ids, labels=labels, fused_lm_head=True)
    result["fsdp2_fp32_head"] = {"routes": list(settings.routes), "log_probs": out.log_probs, "entropy": out.entropy,
                                 "expected": {"log_probs": expected.log_probs, "entropy": expected.entropy}}
    return result


SCENARIOS = {"fsdp2": _fsdp2_scenario, "hooks": _hooks_scenario}


# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from helpers_tiny_lm import save_tiny_model  # noqa: PLC0415

    return str(save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0))


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory):
    from helpers_tiny_lm import make_model, make_tokenizer  # noqa: PLC0415

    directory = tmp_path_factory.mktemp("tiny") / "tied"
    tokenizer = make_tokenizer()
    make_model(len(tokenizer), seed=0, tied=True).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def test_accelerate_runs_no_fsdp_on_cpu_processes(tmp_path):
    """Why the FSDP2 test shards by hand: under an FSDP launch's environment, accelerate makes CPU
    processes DDP (use_cpu) or not distributed at all. One process each (the decision is made before
    any process group starts)."""
    code = textwrap.dedent("""
        import sys
        from accelerate import Accelerator
        accelerator = Accelerator(cpu=sys.argv[1] == "cpu")
        print(accelerator.distributed_type.value, accelerator.is_fsdp2)
    """)
    env = dict(os.environ, LOCAL_RANK="0", RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), ACCELERATE_USE_FSDP="true", FSDP_VERSION="2")
    seen = {}
    for device in ("cpu", "default"):
        done = subprocess.run([sys.executable, "-c", code, device], env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        seen[device] = done.stdout.split()[-2:]
    assert seen == {"cpu": ["MULTI_CPU", "False"], "default": ["NO", "False"]}, seen


def test_fsdp2_drop_in_gives_trls_logged_numbers_through_pyalign(tmp_path, tiny_model_dir):
    work = tmp_path / "work"
    work.mkdir()
    results = run_two(tmp_path, "fsdp2", str(work), tiny_model_dir)
    for rank, result in enumerate(results):
        reference = result[("unsharded_reference", "trl")]
        assert reference["layout"] == {"root_is_fsdp": False, "lm_head_is_fsdp": False, "lm_head_weight": "Parameter"}
        for name, kind, layout in FSDP2_SCENARIOS[:3]:
            ours = result[(name, "pyalign")]
            # TRL's trainer under the same layout; with the lm_head its own group, TRL's trainer under
            # accelerate's layout (the same per-process numbers: the layout must not change them).
            theirs = result[(name if layout == "accelerate" else "full_fine_tuning", "trl")]
            assert ours["layout"]["root_is_fsdp"] and ours["layout"]["lm_head_is_fsdp"], ours["layout"]
            assert ours["layout"]["lm_head_weight"] == "DTensor"
            assert_same_logs(ours["logs"], theirs["logs"], f"{name} rank {rank}")
            logged = ours["logs"][0]
            for key in ("entropy", "logits/chosen", "mean_token_accuracy", "logps/chosen", "rewards/margins"):
                assert key in logged, (name, key)
            assert any(entry["rewards/margins"] != 0 for entry in ours["logs"]), name
            for param_name, expected in theirs["weights"].items():
                assert_close_to_scale(ours["weights"][param_name], expected, msg=f"{name} {param_name}")
            if kind == "untied":  # full fine-tuning: the same steps unsharded, on the whole batch
                for step, (mine, single) in enumerate(zip(ours["logs"], reference["logs"]), start=1):
                    for key in PAIR_MEAN_KEYS:
                        assert mine[key] == pytest.approx(single[key], rel=1e-4, abs=1e-6), (name, step, key)
                for param_name, expected in reference["weights"].items():
                    assert_close_to_scale(ours["weights"][param_name], expected, msg=f"{name} {param_name} unsharded")
            # pyalign answered every fused forward (policy, and reference: a model of its own, or the
            # policy with its adapter disabled) through FSDP's gather, never TRL's head or the logits.
            routes = {(model, route, reason) for model, route, reason in ours["routes"]}
            assert routes == {("LlamaForCausalLM", "fused lm_head (FSDP2 gather)", "")}, (name, routes)
            assert len(ours["routes"]) == 2 * STEPS, (name, len(ours["routes"]))  # policy + reference per step
            assert theirs["routes"] == []


@pytest.fixture(scope="module")
def hook_results(tmp_path_factory):
    return run_two(tmp_path_factory.mktemp("hooks"), "hooks")


def test_what_stays_handed_back_is_named(hook_results):
    for result in hook_results:
        fsdp1 = result["fsdp1"]
        assert [route[1:] for route in fsdp1["routes"]] == [(
            "trl", "FSDP shards the lm_head with FSDP1 (fsdp_version: 1, flat parameters); pyalign's fused head "
                   "handles FSDP2 (fsdp_version: 2)")]
        assert "strict: pyalign cannot compute this forward's log-probs: FSDP shards the lm_head with FSDP1" in \
            result["fsdp1_strict"]
        tensor_parallel = result["tensor_parallel"]
        assert [route[1] for route in tensor_parallel["routes"]] == ["trl"]
        assert "DTensor that no FSDP2 module of this model manages" in tensor_parallel["routes"][0][2]
        for case in (fsdp1, tensor_parallel):  # TRL's own numbers, as TRL computes them unsharded
            torch.testing.assert_close(case["log_probs"], case["expected"]["log_probs"], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(case["entropy"], case["expected"]["entropy"], rtol=1e-5, atol=1e-5)


def test_fsdp2_head_in_float32_with_cast_lm_head_to_fp32(hook_results):
    for result in hook_results:
        case = result["fsdp2_fp32_head"]
        assert {route[1] for route in case["routes"]} == {"fused lm_head (FSDP2 gather)"}
        assert case["log_probs"].dtype == torch.float32
        torch.testing.assert_close(case["log_probs"], case["expected"]["log_probs"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(case["entropy"], case["expected"]["entropy"], rtol=1e-5, atol=1e-5)


def test_sharded_token_logprobs_refuses_what_it_cannot_compute():
    """The glue's options, refused by name before any model call (one process, an unsharded model:
    the checks come first)."""
    import dataclasses  # noqa: PLC0415

    from helpers_tiny_lm import make_model  # noqa: PLC0415

    from pyalign.models import fused_head as hf  # noqa: PLC0415

    model = make_model(67)
    head, reason = hf.fused_head_or_reason(model, sharded=True, zero3=True)
    assert head is not None and not head.sharded and head.manager == "", reason
    input_ids = torch.randint(0, 67, (2, 5))
    targets = hf.shift_labels(input_ids)
    call = functools.partial(hf.sharded_token_logprobs, model, head, input_ids, None, targets)
    with pytest.raises(ValueError, match="sharded_head: 'vocab_parallel' cannot run here: return_stats=True"):
        call(sharded_head="vocab_parallel", return_stats=True)
    zero3_head = dataclasses.replace(head, sharded=True, manager="zero3")
    with pytest.raises(ValueError, match="sharded_head: 'vocab_parallel' cannot run here: DeepSpeed ZeRO-3"):
        hf.sharded_token_logprobs(model, zero3_head, input_ids, None, targets, sharded_head="vocab_parallel")
    with pytest.raises(ValueError, match="compute_dtype: only sharded_head='gather'"):
        call(sharded_head="vocab_parallel", compute_dtype=torch.float32)
    with pytest.raises(ValueError, match="compute_dtype: expected None or a floating torch.dtype"):
        call(compute_dtype=torch.int64)
    with pytest.raises(ValueError, match="return_stats: expected True or False"):
        call(return_stats=1)


def test_an_fsdp_launch_that_is_not_fsdp2_is_handed_back():
    """The trainer-level check (an accelerate FSDP launch; FSDP itself cannot run under accelerate on
    CPU processes, see above): FSDP2 goes to pyalign's route, anything else back to TRL."""
    import weakref  # noqa: PLC0415

    from helpers_tiny_lm import make_model  # noqa: PLC0415

    from pyalign.integrations.trl import fused_head  # noqa: PLC0415

    class Accelerator:
        def __init__(self, fsdp2):
            self.is_fsdp2 = fsdp2
            self.parallelism_config = None

    class Trainer:  # the two attributes transformers' Trainer and accelerate expose
        is_fsdp_enabled = True

        def __init__(self, fsdp2):
            self.accelerator = Accelerator(fsdp2)

    model = make_model(67)
    reasons = {}
    for fsdp2 in (True, False):
        trainer = Trainer(fsdp2)
        settings = fused_head.HeadSettings(trainer=weakref.ref(trainer))
        reasons[fsdp2] = fused_head.handback_reason(settings, model, temperature=1.0, outputs=("log_probs",),
                                                    shift_labels=None, model_kwargs={})
    assert reasons[True] == ""
    assert reasons[False].startswith("FSDP shards the lm_head with FSDP1 (fsdp_version: 1")


# ----------------------------------------------------------------------------- DeepSpeed ZeRO-3

DS_CONFIG = {
    "zero_optimization": {"stage": 3, "offload_param": {"device": "none"}, "offload_optimizer": {"device": "none"},
                          "stage3_gather_16bit_weights_on_model_save": True},
    "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto", "bf16": {"enabled": False}, "fp16": {"enabled": False},
}
ACCELERATE_ZERO3 = """\
compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  deepspeed_config_file: {ds_config}
  zero3_init_flag: true
  deepspeed_multinode_launcher: standard
num_machines: 1
num_processes: {world}
machine_rank: 0
main_process_port: {port}
use_cpu: true
rdzv_backend: static
same_network: true
"""


ZERO3_SETUPS = ("full", "lora_tied", "lora_precomputed")


def zero3_dataset_dir(out_dir, setup: str, label: str) -> str:
    """The pairs saved on disk, one folder per trainer: TRL caches precomputed reference log-probs
    in a file beside the dataset, keyed by (dataset fingerprint, model hash), which every process
    must see (an in-memory dataset's cache lies in a temporary folder of each process), and each
    trainer must compute its own (a saved dataset keeps its own random fingerprint)."""
    return os.path.join(out_dir, "data", f"{setup}-{label}")


def _zero3_worker(out_dir: str, model_dir: str, tied_model_dir: str) -> None:
    """One process of the ZeRO-3 launch: TRL's trainer, then the drop-in, each through train(); full
    fine-tuning (reference model loaded by TRL), LoRA on a model with tied embeddings (the reference
    is the policy with its adapter disabled; ZeRO-3 gathers the shared weight for the embedding and
    for the lm_head), and LoRA with the reference log-probs precomputed (TRL runs them through a
    DeepSpeed inference engine before training)."""
    import datasets  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled  # noqa: PLC0415

    from pyalign.integrations.trl import DPOTrainer  # noqa: PLC0415

    datasets.disable_progress_bars()
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    results = {}
    paths = {"full": model_dir, "lora_tied": tied_model_dir, "lora_precomputed": model_dir}
    for setup, (label, cls) in itertools.product(ZERO3_SETUPS, (("trl", trl.DPOTrainer), ("pyalign", DPOTrainer))):
        path = paths[setup]
        args = dpo_config(os.path.join(out_dir, setup, label), precompute_ref_log_probs=setup == "lora_precomputed")
        # After the DPOConfig: with zero3_init_flag, deepspeed.zero.Init partitions the weights as
        # they load (TRL loads the reference model from the same path, partitioned too).
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        weight = model.lm_head.weight
        lora = None if setup == "full" else peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                            lora_dropout=0.0)
        data = datasets.load_from_disk(zero3_dataset_dir(out_dir, setup, label))
        trainer = cls(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=lora)
        trainer.train()
        engine = trainer.model_wrapped
        results[f"{setup}/{label}"] = {
            "logs": [entry for entry in trainer.state.log_history if "loss" in entry],
            "routes": list(getattr(trainer, "pyalign_routes", [])),
            "zero3": is_deepspeed_zero3_enabled(), "engine": type(engine).__name__,
            "zero_stage": engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else None,
            "lm_head_partition": [int(weight.ds_tensor.numel()), int(weight.ds_numel)] if hasattr(weight, "ds_tensor")
            else None,
            "backend": dist.get_backend(), "tied": weight is model.get_input_embeddings().weight,
        }
    if rank == 0:
        Path(out_dir, "result.json").write_text(json.dumps(results))


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                    reason="deepspeed is not installed (DS_BUILD_OPS=0 pip install 'pyalign[deepspeed]')")
def test_zero3_drop_in_gives_trls_logged_numbers_through_pyalign(tmp_path, tiny_model_dir, tied_model_dir):
    ds_config = tmp_path / "ds_zero3.json"
    ds_config.write_text(json.dumps(DS_CONFIG))
    launch_config = tmp_path / "accelerate_zero3.yaml"
    launch_config.write_text(ACCELERATE_ZERO3.format(ds_config=ds_config, world=WORLD, port=free_port()))
    for setup in ZERO3_SETUPS:
        for label in ("trl", "pyalign"):
            pairs_dataset().save_to_disk(zero3_dataset_dir(tmp_path, setup, label))
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch_config),
               str(Path(__file__).resolve()), "zero3-worker", str(tmp_path), tiny_model_dir, tied_model_dir]
    # A session of its own, so that a launch past its deadline is killed with every process it started.
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=ZERO3_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the ZeRO-3 launch did not finish within {ZERO3_TIMEOUT_S} s:\n{output[-4000:]}")
    assert process.returncode == 0, output[-6000:]
    results = json.loads((tmp_path / "result.json").read_text())
    for setup in ZERO3_SETUPS:
        theirs, ours = results[f"{setup}/trl"], results[f"{setup}/pyalign"]
        for result in (theirs, ours):
            # Really ZeRO-3 over gloo, the lm_head partitioned over the two processes.
            assert result["zero3"] and result["engine"] == "DeepSpeedEngine" and result["zero_stage"] == 3, result
            assert result["backend"] == "gloo"
            assert result["lm_head_partition"][0] * WORLD == result["lm_head_partition"][1], result
            assert result["tied"] == (setup == "lora_tied")
        assert_same_logs(ours["logs"], theirs["logs"], f"zero3 {setup}")
        assert "entropy" in ours["logs"][0] and any(entry["rewards/margins"] != 0 for entry in ours["logs"])
        routes = {(model, route, reason) for model, route, reason in ours["routes"]}
        assert routes == {("LlamaForCausalLM", "fused lm_head (ZeRO-3 gather)", "")}, (setup, routes)
        if setup == "lora_precomputed":
            # The dataset holds STEPS global batches: STEPS reference forwards per process in the
            # precomputation (through TRL's DeepSpeed inference engine), then the policy's, one per step.
            assert len(ours["routes"]) == STEPS + STEPS, setup
        else:
            assert len(ours["routes"]) == 2 * STEPS, setup  # policy + reference per step
        assert theirs["routes"] == []


if __name__ == "__main__" and sys.argv[1:2] == ["zero3-worker"]:
    _zero3_worker(*sys.argv[2:5])
