"""The SPO paper's Table 2 as an experiment: what round 2 keeps of dimension 1 and learns of
dimension 2, as alpha grows; and where adaptive alpha lands.

    python -m pyalign.demo.spo_alpha_sweep [--quick] [--out DIR] [--config YAML] [--threads N]

Two dimensions of :mod:`pyalign.demo.spo_data` (30% of dimension 2's pairs prefer the response
WITHOUT dimension 1's marker: the paper's "modified" data, where the two preferences conflict).
Round 1 (DPO from pi_0) is trained once, in ``<out>/round1``; every run below reuses it by
fingerprint (``reuse_rounds_from``; round 1's fingerprint holds no alpha of a later round) and
shares its cached frozen log-probs. Round 2 is then trained with SPO for every alpha in
``alphas`` (0 = S-DPO) and once with adaptive alpha (``adaptive_alpha``: dual ascent on alpha_1
from dimension 1's held-out margin, starting at ``adaptive_alpha.alpha``). Every round-2 model,
and round 1's, is scored per dimension: teacher-forced held-out margin ``beta*log(pi/pi_0)``
(w - l) and preference accuracy, and marker presence in generations. Printed as a markdown
table, written as JSON (its path printed last) and drawn as a PNG (``alpha_sweep.png``).

The paper (Llama-2 7B, helpfulness then harmlessness, reward-model scores): as alpha grows from
0 to 0.7, helpfulness (dimension 1) is kept better (1.42 -> 7.13) and harmlessness (dimension
2) is learned less (2.29 -> -1.42). docs/demo.md has what this experiment measured.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pyalign.demo.evaluate import metric_table, presence_table, write_json
from pyalign.demo.runner import Clock, demo_main
from pyalign.demo.spo_experiment import (
    COMMON, QUICK_OVERRIDES, Evaluator, build_data, describe_offsets, generation_row, load_settings, log,
    merge_settings, prepare_base_model, run_method, slug, source_model, spo_offsets, training_config,
    warmup_model,
)
from pyalign.demo.spo_plots import plot_alpha_sweep
from pyalign.tasks.preference.adaptive_alpha import LOG_FILE

DEFAULTS: dict = merge_settings(COMMON, {"data": {"num_dimensions": 2}, "training": {"epochs": 2}}) | {
    "alphas": [0.0, 0.1, 0.3, 0.5, 0.7],
    # null: no adaptive run. alpha: where alpha_1 starts; the rest: pyalign.tasks.preference.adaptive_alpha
    "adaptive_alpha": {"alpha": 0.1, "keep": 0.7, "every": 1, "step_size": 1.0, "max_pairs": 32},
}
QUICK: dict = merge_settings(DEFAULTS, QUICK_OVERRIDES)
PAPER_TABLE2 = {  # alpha: (helpfulness reward, harmlessness reward) after round 2, Llama-2 7B
    0.0: (1.42, 2.29), 0.05: (6.53, 1.30), 0.1: (6.82, 1.18), 0.3: (6.93, 0.22), 0.5: (7.05, -0.74), 0.7: (7.13, -1.42),
}


def method_name(alpha: float) -> str:
    return "S-DPO (alpha=0)" if alpha == 0 else f"SPO alpha={alpha:g}"


def run_sweep(settings: dict, out: str | Path) -> Path:
    """The whole sweep; returns the path of the results JSON."""
    clock = Clock()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if settings["data"]["num_dimensions"] != 2:
        raise ValueError(f"data.num_dimensions: the alpha sweep has 2 dimensions, got {settings['data']['num_dimensions']}")
    alphas = [float(a) for a in settings["alphas"]]
    if not alphas or any(not 0 <= a <= 1 for a in alphas):
        raise ValueError(f"alphas: expected a non-empty list of values in [0, 1], got {settings['alphas']!r}")
    adaptive = settings.get("adaptive_alpha")

    source = source_model(settings, out)
    base_model, marker_ids, skip_ids = prepare_base_model(source, out, 2)
    clock.lap("model")
    rounds, eval_prompts = build_data(settings, source, out)
    clock.lap("data")
    base_model = warmup_model(settings, base_model, source, out)  # pi_0 (after the SFT warm-up, if any)
    clock.lap("sft warm-up")

    token_ids = marker_ids + skip_ids
    shared_cache = out / "logprob_cache"  # pi_0 and pi_1 are the same in every run
    round1 = run_method(training_config(settings, base_model, token_ids, rounds[:1], out / "round1", alpha=0.0,
                                        cache_dir=shared_cache), out, "round1")[0]
    clock.lap("round 1 (once)")
    runs = {}  # name -> (alpha, adaptive settings or None, run dir)
    for alpha in alphas:
        runs[method_name(alpha)] = (alpha, None, out / "runs" / slug(method_name(alpha)))
    if adaptive:
        adaptive = dict(adaptive)
        start = float(adaptive.pop("alpha"))
        name = f"SPO adaptive (keep {adaptive.get('keep', 0.9):g}, from alpha={start:g})"
        settings_slug = "_".join(f"{key}{value:g}" for key, value in sorted(adaptive.items()))
        runs[name] = (start, adaptive, out / "runs" / f"adaptive_from{start:g}_{settings_slug}")
    round2 = {}
    for name, (alpha, adaptive_settings, run_dir) in runs.items():
        config = training_config(settings, base_model, token_ids, rounds, run_dir, alpha=alpha,
                                 adaptive=adaptive_settings, reuse_from=out / "round1", cache_dir=shared_cache)
        log.info("round 2 of %s", name)
        round2[name] = run_method(config, out, name)[1]
        clock.lap("round 2 (all)")

    evaluate = Evaluator(settings, base_model, rounds, eval_prompts, marker_ids, skip_ids)
    base_result = evaluate(base_model, "pi_0")
    round1_result = evaluate(round1, "round 1")
    results = {name: evaluate(model_dir, name) for name, model_dir in round2.items()}
    clock.lap("evaluation")

    entries = []
    trajectory, adaptive_summary = None, None
    for name, (alpha, adaptive_settings, run_dir) in runs.items():
        entry = {"method": name, "alpha": alpha}
        if adaptive_settings:
            log_data = json.loads((run_dir / "round_2_dim2" / LOG_FILE).read_text(encoding="utf-8"))
            trajectory = log_data["history"]
            final_alpha = trajectory[-1]["alphas"][0] if trajectory else alpha
            entry.update(alpha=final_alpha, alpha_start=alpha, adaptive=adaptive_settings,
                         threshold=log_data["thresholds"][0], alpha_trajectory=[e["alphas"][0] for e in trajectory])
            adaptive_summary = {**results[name], "alpha": final_alpha, "threshold": log_data["thresholds"][0]}
        entries.append({**entry, "round": 1, "dimensions": round1_result["dimensions"], "pareto": round1_result["pareto"],
                        "format": round1_result["format"], "empty": round1_result["empty"],
                        "first": round1_result["first"]})
        entries.append({**entry, "round": 2, "dimensions": results[name]["dimensions"],
                        "pareto": results[name]["pareto"], "format": results[name]["format"],
                        "empty": results[name]["empty"], "first": results[name]["first"]})

    fixed = [(alpha, results[method_name(alpha)]) for alpha in alphas]
    png = plot_alpha_sweep(out / "alpha_sweep.png", fixed, round1=round1_result, adaptive=adaptive_summary,
                           trajectory=trajectory,
                           title=f"SPO round 2 vs alpha ({settings['model']}, "
                                 f"{settings['data']['conflict_rate']:.0%} of dim-2 pairs conflict with dim 1)")
    beta = settings["method"]["beta"]
    payload = {
        "rounds": entries,
        "wall_time_s": clock.total(),
        "base_model": base_result,
        "round1": round1_result,
        "offsets": {name: spo_offsets(shared_cache, rounds, alpha, beta) for name, (alpha, a, _) in runs.items()
                    if alpha and not a},
        "paper_table2": {str(a): {"dim1": v[0], "dim2": v[1]} for a, v in PAPER_TABLE2.items()},
        "settings": settings,
        "timings": clock.summary(),
        "plot": str(png),
    }
    json_path = write_json(out / "alpha_sweep.json", payload)
    print_report(payload, results, round1_result, settings)
    return json_path


def print_report(payload: dict, results: dict, round1_result: dict, settings: dict) -> None:
    rows = {"after round 1 (shared)": round1_result["dimensions"]}
    rows.update({f"round 2, {name}": r["dimensions"] for name, r in results.items()})
    print(f"\n## SPO round 2 vs alpha ({settings['model']}, {settings['data']['conflict_rate']:.0%} of dimension 2's "
          "pairs conflict with dimension 1)\n")
    print("Teacher-forced on held-out pairs: margin beta*log(pi/pi_0) (w - l) and preference accuracy:\n")
    print(metric_table(rows, 2))
    print("\nGeneration on held-out prompts:\n")
    generation = {"after round 1 (shared)": generation_row(round1_result)}
    generation.update({f"round 2, {name}": generation_row(r) for name, r in results.items()})
    print(presence_table(generation, 2))
    for entry in payload["rounds"]:
        if entry.get("alpha_trajectory") and entry["round"] == 2:
            path = " -> ".join(f"{a:.2f}" for a in [entry["alpha_start"]] + entry["alpha_trajectory"])
            print(f"\nadaptive alpha_1 (threshold {entry['threshold']:+.2f} on dim 1's margin): {path}")
    for name, rows_ in payload["offsets"].items():
        for o in rows_:
            print(f"{name}, {describe_offsets(o)}")
    phases = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in payload["timings"]["wall_s"].items())
    print(f"\nwall time {payload['wall_time_s']:.0f} s ({phases}; {payload['timings']['torch_threads']} threads)")
    print(f"plot: {payload['plot']}")


def main(argv=None) -> int:
    return demo_main(argv, prog="python -m pyalign.demo.spo_alpha_sweep", description=__doc__, default_out="outputs/spo_alpha_sweep",
                     settings_for=lambda quick, config: load_settings(DEFAULTS, QUICK_OVERRIDES, quick, config),
                     run=run_sweep)


if __name__ == "__main__":
    sys.exit(main())
