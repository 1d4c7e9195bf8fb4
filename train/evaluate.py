"""One evaluation path: rank or generate on the same prepared samples, score with :mod:`train.metrics`.

For check-in data every ranking metric of DESIGN §4 (Acc@1/5/10/20, MRR, NDCG@5/10) over the chosen split, plus the
same metrics on the samples whose target is an unseen (held-out) location when the split has any. For grid data
GEO-BLEU (N = 5, and N = 3 for HuMob'23/'24 comparisons) and DTW over the target days.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from dataset_builders.publish import PreparedDataset, load_prepared

from .baselines import (
    CHECKIN_BASELINES,
    GRID_BASELINES,
    explode_grid_samples,
    fit_checkin_baseline,
    slot_mode_predictions,
)
from .metrics import dtw, geobleu, ranking_metrics

__all__ = [
    "RANKING_COLUMNS",
    "TRAJECTORY_COLUMNS",
    "evaluate_baselines",
    "format_results_table",
    "grid_targets",
    "write_json_atomic",
]

logger = logging.getLogger(__name__)

RANKING_COLUMNS = ("acc@1", "acc@5", "acc@10", "acc@20", "mrr", "ndcg@5", "ndcg@10")
TRAJECTORY_COLUMNS = ("geobleu@5", "geobleu@3", "dtw")
_HEADERS = {"acc@1": "Acc@1", "acc@5": "Acc@5", "acc@10": "Acc@10", "acc@20": "Acc@20", "mrr": "MRR",
            "ndcg@5": "NDCG@5", "ndcg@10": "NDCG@10"}


def grid_targets(data: PreparedDataset, split: str):
    """The reference (uid, d, t, x, y) rows of the target days of ``split``, as a DataFrame."""

    return explode_grid_samples(data.table("samples", split), "target")


def _checkin_results(data: PreparedDataset, names: list[str], split: str) -> dict[str, dict[str, Any]]:
    samples = data.table("samples", split)
    if samples.num_rows == 0:
        raise ValueError(f"{data.path}: split {split!r} has no samples")
    train = data.table("checkins", "train").to_pandas()
    locations = data.table("locations").column("location_id").to_numpy(zero_copy_only=False)
    seen = samples.column("target_seen").to_numpy(zero_copy_only=False).astype(bool)
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        model = fit_checkin_baseline(name, train, locations)
        ranks = model.rank(samples)
        res = ranking_metrics(ranks)
        if (~seen).any():
            res["unseen"] = ranking_metrics(ranks[~seen])
        results[name] = res
        logger.info("%s: acc@1 %.4f, mrr %.4f over %d samples", name, res["acc@1"], res["mrr"], len(ranks))
    return results


def _grid_results(data: PreparedDataset, names: list[str], split: str) -> dict[str, dict[str, Any]]:
    samples = data.table("samples", split)
    if samples.num_rows == 0:
        raise ValueError(f"{data.path}: split {split!r} has no users")
    reference = grid_targets(data, split)
    results = {}
    for name in names:
        pred = slot_mode_predictions(samples, day0_weekday=int(data.metadata.get("day0_weekday", 0)))
        results[name] = {
            "geobleu@5": geobleu(pred, reference, max_n=5),
            "geobleu@3": geobleu(pred, reference, max_n=3),
            "dtw": dtw(pred, reference),
            "num_users": int(samples.num_rows),
            "num_points": int(len(reference)),
        }
    return results


def evaluate_baselines(data: str | os.PathLike | PreparedDataset, baselines="all", split: str = "test") -> dict:
    """Evaluate baselines on a prepared dataset; returns ``{"data", "split", "kind", "results": {name: metrics}}``.

    ``baselines`` is a name, a list of names, or ``"all"`` (every baseline that applies to the data kind).
    """
    data = data if isinstance(data, PreparedDataset) else load_prepared(data)
    allowed = CHECKIN_BASELINES if data.kind == "checkins" else GRID_BASELINES
    names = list(allowed) if baselines == "all" else ([baselines] if isinstance(baselines, str) else list(baselines))
    wrong = [n for n in names if n not in allowed]
    if wrong:
        raise ValueError(
            f"baseline(s) {wrong} do not apply to {data.kind} data; choose from {', '.join(allowed)} (or all)"
        )
    if split == "hidden":
        raise ValueError("the hidden split has no reference cells (its targets are 999): there is nothing to score")
    if split not in data.splits("samples"):
        raise ValueError(f"{data.path}: no split {split!r}; available: {data.splits('samples')}")
    fn = _checkin_results if data.kind == "checkins" else _grid_results
    return {"data": str(data.path), "split": split, "kind": data.kind, "results": fn(data, names, split)}


def format_results_table(report: dict) -> str:
    """A Markdown table of ``evaluate_baselines`` (or model) results; ranking metrics shown x100."""
    results = report["results"]
    if report["kind"] == "checkins":
        cols = RANKING_COLUMNS
        lines = ["| model | " + " | ".join(_HEADERS[c] for c in cols) + " | samples |"]
        lines.append("|---|" + "---:|" * (len(cols) + 1))
        for name, res in results.items():
            lines.append(f"| {name} | " + " | ".join(f"{100 * res[c]:.2f}" for c in cols) + f" | {res['num_samples']:,} |")
        unseen = {n: r["unseen"] for n, r in results.items() if "unseen" in r}
        if unseen:
            lines += ["", "Samples whose target is an unseen (held-out) location:", "",
                      "| model | " + " | ".join(_HEADERS[c] for c in cols) + " | samples |",
                      "|---|" + "---:|" * (len(cols) + 1)]
            for name, res in unseen.items():
                lines.append(f"| {name} | " + " | ".join(f"{100 * res[c]:.2f}" for c in cols) +
                             f" | {res['num_samples']:,} |")
        return "\n".join(lines)
    lines = ["| model | GEO-BLEU (N=5) | GEO-BLEU (N=3) | DTW | users |", "|---|---:|---:|---:|---:|"]
    for name, res in results.items():
        lines.append(f"| {name} | {res['geobleu@5']:.4f} | {res['geobleu@3']:.4f} | {res['dtw']:.2f} | "
                     f"{res['num_users']:,} |")
    return "\n".join(lines)


def write_json_atomic(obj: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, default=lambda o: o.item() if isinstance(o, np.generic) else str(o))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
