"""The SPO paper's demonstrative experiment (Table 4) on a design where SPO can act: ``make demo``.

    python -m pyalign.demo.spo_markers [--quick] [--out DIR] [--config YAML] [--threads N]

1. pi_0: SmolLM2-135M-Instruct (``--quick``: a tiny random chat model) plus the slot tokens
   ``[Token_i]``/``[Skip_i]``, i = 1..4, after an SFT warm-up on slotted responses of the training
   prompts (``sft_warmup``), so that pi_0 writes the slot layout.
2. Data (:mod:`pyalign.demo.spo_data`): one response per prompt sampled from pi_0; dimension i
   prefers ``[Token_i]`` over ``[Skip_i]`` in slot i (every dimension has its own slot, so a
   response can have all four); 50% of each later dimension's pairs prefer the response without
   the earlier markers over the one with them (conflict); held-out pairs without conflicts.
3. SPO (alpha 0.5) and S-DPO (alpha 0), four rounds each (round 1 is the same DPO round for both:
   trained once, reused by fingerprint).
4. Every round's model, per dimension: the teacher-forced held-out preference accuracy and margin
   ``beta*log(pi/pi_0)`` (w - l), and, from generations on held-out prompts, each marker's
   presence and the Pareto rate (all four present). Printed as markdown tables, written as JSON
   (its path printed last) and drawn as a PNG.

Settings: :data:`DEFAULTS` / ``--quick`` (mirrored in ``configs/spo_demo.yaml`` and
``configs/spo_demo_quick.yaml``); ``--config`` overrides any of them. Re-running with the same
``--out`` reuses finished rounds, cached log-probs and samples. docs/demo.md explains the design
and the measured results.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pyalign.demo.evaluate import metric_table, presence_table, write_json
from pyalign.demo.runner import Clock, demo_main
from pyalign.demo.spo_experiment import (
    COMMON, QUICK_OVERRIDES, Evaluator, build_data, describe_offsets, generation_row, load_settings, log,
    merge_settings, prepare_base_model, run_method, slug, source_model, spo_offsets, training_config,
    warmup_model,
)
from pyalign.demo.spo_plots import plot_table4

# docs/demo.md ("Issue 20") measured these against the alternatives: pi_0 = SmolLM2 after an SFT
# warm-up on slotted responses (without it pi_0 never writes the slot layout), lr 5e-4 (at 2e-3 the
# rounds raise the newest marker at every position and the layout collapses), 40% conflicting pairs
# (at 30% S-DPO keeps every marker too, at 50% it loses the slot layout with them), SPO alpha 0.5 (at
# the paper's 0.1 SPO's offset is too small next to the conflicting pairs' push at this scale).
DEFAULTS: dict = merge_settings(COMMON, {
    "data": {"conflict_rate": 0.4},
    "training": {"lr": 5.0e-4},
    "sft_warmup": {"examples_per_prompt": 2, "lr": 1.0e-3, "epochs": 2},
}) | {"methods": {"SPO": 0.5, "S-DPO": 0.0}}  # name: alpha
QUICK: dict = merge_settings(DEFAULTS, QUICK_OVERRIDES)
# The SPO paper's Table 4 (Llama-2 7B, 10k augmented pairs per dimension, 1 epoch), for comparison.
PAPER_TABLE4 = {
    "SPO": {"presence": [0.98, 0.777, 0.647, 0.833], "pareto": 0.503},
    "S-DPO": {"presence": [0.107, 0.013, 0.0, 0.997], "pareto": 0.0},
}


def run_demo(settings: dict, out: str | Path) -> Path:
    """The whole experiment; returns the path of the results JSON."""
    clock = Clock()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    k = settings["data"]["num_dimensions"]
    methods = settings["methods"]
    if not methods:
        raise ValueError("methods: expected at least one {name: alpha}")

    source = source_model(settings, out)
    base_model, marker_ids, skip_ids = prepare_base_model(source, out, k)
    clock.lap("model")
    rounds, eval_prompts = build_data(settings, source, out)
    clock.lap("data")
    base_model = warmup_model(settings, base_model, source, out)  # pi_0 (after the SFT warm-up, if any)
    clock.lap("sft warm-up")

    run_dirs, model_dirs = {}, {}
    for name, alpha in methods.items():
        run_dirs[name] = out / "runs" / slug(name)
        first = next(iter(run_dirs.values()))  # round 1 is DPO from pi_0 for every method: trained once
        config = training_config(settings, base_model, marker_ids + skip_ids, rounds, run_dirs[name], alpha=alpha,
                                 reuse_from=first if first != run_dirs[name] else None)
        log.info("training %s (alpha=%s): %d rounds", name, alpha, k)
        model_dirs[name] = run_method(config, out, name)
        clock.lap(f"train {name}")

    evaluate = Evaluator(settings, base_model, rounds, eval_prompts, marker_ids, skip_ids)
    base_result = evaluate(base_model, "pi_0")
    per_round = {name: [evaluate(d, f"{name} round {i}") for i, d in enumerate(dirs, start=1)]
                 for name, dirs in model_dirs.items()}
    clock.lap("evaluation")

    title = (f"SPO demonstrative experiment ({settings['model']}, {k} dimensions, "
             f"{settings['data']['conflict_rate']:.0%} conflicting pairs)")
    png = plot_table4(out / "table4.png", per_round, k, title=title, paper=PAPER_TABLE4)
    beta = settings["method"]["beta"]
    offsets = {name: spo_offsets(run_dirs[name] / "logprob_cache", rounds, alpha, beta)
               for name, alpha in methods.items() if alpha}
    payload = {
        "rounds": [{"method": name, "alpha": methods[name], "round": i, "dimensions": r["dimensions"],
                    "pareto": r["pareto"], "format": r["format"], "empty": r["empty"], "first": r["first"]}
                   for name, results in per_round.items() for i, r in enumerate(results, start=1)],
        "pareto": {name: results[-1]["pareto"] for name, results in per_round.items()},
        "wall_time_s": clock.total(),
        "base_model": base_result,
        "base_model_dir": str(base_model),  # pi_0: the SFT warm-up's merged model when sft_warmup is set
        "offsets": offsets,
        "examples": {name: results[-1]["examples"] for name, results in per_round.items()},
        "paper_table4": PAPER_TABLE4,
        "settings": settings,
        "timings": clock.summary(),
        "plot": str(png),
    }
    json_path = write_json(out / "table4.json", payload)
    print_report(payload, base_result, per_round, k, title)
    return json_path


def print_report(payload: dict, base_result: dict, per_round: dict, k: int, title: str) -> None:
    pi_0 = "pi_0 (SFT warm-up)" if payload["settings"].get("sft_warmup") else "pi_0 (no training)"
    final = {pi_0: generation_row(base_result)}
    final.update({name: generation_row(results[-1]) for name, results in per_round.items()})
    presence = {f"{name} after round {i}": generation_row(r)
                for name, results in per_round.items() for i, r in enumerate(results, start=1)}
    metrics = {f"{name} after round {i}": r["dimensions"]
               for name, results in per_round.items() for i, r in enumerate(results, start=1)}
    print(f"\n## {title}\n")
    print("Generation on held-out prompts after the last round (presence of each marker, all four = Opt.):\n")
    print(presence_table(final, k))
    print("\nPresence round by round:\n")
    print(presence_table(presence, k))
    print("\nTeacher-forced, round by round: held-out margin beta*log(pi/pi_0) (w - l) and preference accuracy:\n")
    print(metric_table(metrics, k))
    for name, rows in payload["offsets"].items():
        print(f"\n{name}'s offset sum_k kappa_k*(Delta_k(y_w) - Delta_k(y_l)) on its training pairs:")
        for o in rows:
            print(f"  {describe_offsets(o)}")
    pareto = ", ".join(f"{name} {100 * rate:.0f}%" for name, rate in payload["pareto"].items())
    print(f"\nPareto rate (all {k} markers generated): {pareto}")
    phases = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in payload["timings"]["wall_s"].items())
    print(f"wall time {payload['wall_time_s']:.0f} s ({phases}; {payload['timings']['torch_threads']} threads)")
    print(f"plot: {payload['plot']}")


def main(argv=None) -> int:
    return demo_main(argv, prog="python -m pyalign.demo.spo_markers", description=__doc__, default_out="outputs/spo_demo",
                     settings_for=lambda quick, config: load_settings(DEFAULTS, QUICK_OVERRIDES, quick, config),
                     run=run_demo)


if __name__ == "__main__":
    sys.exit(main())
