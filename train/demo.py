"""The demo behind ``make demo`` / ``mobility demo``: the embedded synthetic cities through the public pipeline.

Synthesise a check-in city and a grid city as raw files, read them with the same readers real data uses, prepare them,
evaluate every baseline, train the QT-Mob location tokenizer, and write ``report.md`` with the metric tables, the row
accounts and PNG plots.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from .plots import pyplot, save_figure

__all__ = ["run_demo"]

logger = logging.getLogger(__name__)


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


def run_demo(out_dir: str | os.PathLike = "runs/demo", *, seed: int = 0, num_users: int | None = None) -> Path:
    """Run the demo into ``out_dir`` and return the path of ``report.md``."""
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

    _plot_city(city.pois, city.checkins, out / "city_map.png")
    _plot_hours(city.checkins, city.pois, out / "category_hours.png")
    _plot_baselines(checkin_report["results"], out / "baselines.png")
    _plot_grid(grid, out / "grid_density.png")

    best = max(checkin_report["results"].items(), key=lambda kv: kv[1]["mrr"])
    lines = [
        "# hf-mobility demo report",
        "",
        f"Synthetic cities (seed {seed}), generated, read back through the public readers, prepared and evaluated in "
        f"{time.time() - t0:.0f} s.",
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
        "## Files",
        "",
        f"- raw data: `{out / 'raw'}`; prepared datasets: `{data_dir}`, `{gdata_dir}` "
        "(`datasets.load_dataset(path, 'samples')`)",
        f"- location tokenizer: `{out / 'location_tokenizer' / 'tokenizer'}` "
        "(`AutoTokenizer.from_pretrained(path, trust_remote_code=True)`), RQ-VAE: "
        f"`{out / 'location_tokenizer' / 'rqvae'}`",
        "- metrics: `metrics_checkins.json`, `metrics_grid.json`",
        "",
    ]
    report = out / "report.md"
    tmp = report.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    os.replace(tmp, report)
    return report
