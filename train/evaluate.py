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
import pandas as pd

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
    "write_text_atomic",
]

logger = logging.getLogger(__name__)

RANKING_COLUMNS = ("acc@1", "acc@5", "acc@10", "acc@20", "mrr", "ndcg@5", "ndcg@10")
TRAJECTORY_COLUMNS = ("geobleu@5", "geobleu@3", "dtw")
_HEADERS = {"acc@1": "Acc@1", "acc@5": "Acc@5", "acc@10": "Acc@10", "acc@20": "Acc@20", "mrr": "MRR",
            "ndcg@5": "NDCG@5", "ndcg@10": "NDCG@10"}


def grid_targets(data: PreparedDataset, split: str):
    """The reference (uid, d, t, x, y) rows of the target days of ``split``, as a DataFrame."""

    return explode_grid_samples(data.table("samples", split), "target")


def _checkin_results(
    data: PreparedDataset, names: list[str], split: str, sample_ids=None
) -> dict[str, dict[str, Any]]:
    samples = data.table("samples", split)
    if sample_ids is not None:
        samples = _select_samples(samples, sample_ids, data.path, split)
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


def _select_samples(samples, sample_ids, path, split):
    """The rows of ``samples`` with the given ``sample_id``s, in that order (an unknown id is an error)."""
    import pyarrow as pa

    index = pd.Index(samples.column("sample_id").to_numpy())
    pos = index.get_indexer(np.asarray(sample_ids))
    if (pos < 0).any():
        missing = np.asarray(sample_ids)[pos < 0][:5].tolist()
        raise ValueError(f"{path}: sample ids {missing} are not in the {split!r} split")
    return samples.take(pa.array(pos))


def _grid_results(data: PreparedDataset, names: list[str], split: str, sample_ids=None) -> dict[str, dict[str, Any]]:
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


def evaluate_baselines(
    data: str | os.PathLike | PreparedDataset, baselines="all", split: str = "test", sample_ids=None
) -> dict:
    """Evaluate baselines on a prepared dataset; returns ``{"data", "split", "kind", "results": {name: metrics}}``.

    ``baselines`` is a name, a list of names, or ``"all"`` (every baseline that applies to the data kind);
    ``sample_ids`` restricts check-in evaluation to those samples (the ones a model was scored on).
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
    if sample_ids is not None and data.kind != "checkins":
        raise ValueError("sample_ids applies to check-in data only")
    fn = _checkin_results if data.kind == "checkins" else _grid_results
    return {"data": str(data.path), "split": split, "kind": data.kind, "results": fn(data, names, split, sample_ids)}


def format_results_table(report: dict) -> str:
    """A Markdown table of ``evaluate_baselines`` (or model) results; ranking metrics shown x100."""
    results = report["results"]
    if report["kind"] == "checkins":
        cols = RANKING_COLUMNS
        lines = ["| model | " + " | ".join(_HEADERS[c] for c in cols) + " | samples |"]
        lines.append("|---|" + "---:|" * (len(cols) + 1))
        for name, res in results.items():
            lines.append(f"| {name} | " + " | ".join(f"{100 * res[c]:.2f}" for c in cols) + f" | {res['num_samples']:,} |")
        parts = (("unseen", "Samples whose target is an unseen (held-out) location, every location a candidate:"),
                 ("unseen_candidates", "The same samples, only the unseen (held-out) locations as candidates:"))
        for key, title in parts:
            subset = {n: r[key] for n, r in results.items() if key in r}
            if not subset:
                continue
            lines += ["", title, "", "| model | " + " | ".join(_HEADERS[c] for c in cols) + " | samples |",
                      "|---|" + "---:|" * (len(cols) + 1)]
            for name, res in subset.items():
                lines.append(f"| {name} | " + " | ".join(f"{100 * res[c]:.2f}" for c in cols) +
                             f" | {res['num_samples']:,} |")
        return "\n".join(lines)
    lines = ["| model | GEO-BLEU (N=5) | GEO-BLEU (N=3) | DTW | users |", "|---|---:|---:|---:|---:|"]
    for name, res in results.items():
        lines.append(f"| {name} | {res['geobleu@5']:.4f} | {res['geobleu@3']:.4f} | {res['dtw']:.2f} | "
                     f"{res['num_users']:,} |")
    return "\n".join(lines)


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file beside it and a rename; creates the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON (numpy scalars as numbers, other objects as strings), atomically."""
    text = json.dumps(obj, indent=2, default=lambda o: o.item() if isinstance(o, np.generic) else str(o))
    return write_text_atomic(text, path)


def evaluate_run(
    run_dir: str | os.PathLike,
    data: str | os.PathLike,
    *,
    split: str = "test",
    num_beams: int = 20,
    batch_size: int = 32,
    instructions: str | os.PathLike | None = None,
    max_samples: int | None = None,
    decoder: str = "cached",
    progress: bool = True,
) -> dict:
    """Score a fine-tuned QT-Mob run on the next-location samples of ``split``, with the baselines beside it.

    The prompts come from the run's instruction dataset (config ``next``; one row per prepared sample, template 0),
    the ranking from deterministic beam search constrained to valid location codes
    (``decoder="cached"``: :func:`tokenization_mobility.rank_locations_cached`, each prompt encoded once; or
    ``"vectorised"`` / ``"prefix_fn"``: ``generate`` with that constraint; all rank alike); Acc@k / MRR / NDCG@k are
    computed over the returned ranking
    (a target outside the ``num_beams`` returned locations counts as a miss). The baselines are scored on exactly the
    same samples. Returns the report (also the content of ``metrics.json``).
    """
    import json

    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tokenization_mobility

    from .metrics import ranks_from_topk

    if decoder not in ("cached", "vectorised", "prefix_fn"):
        raise ValueError(f"decoder must be 'cached', 'vectorised' or 'prefix_fn', got {decoder!r}")

    run = Path(run_dir)
    info_file = run / "run_info.json"
    if not info_file.exists():
        raise FileNotFoundError(f"{run} is not a training run (no run_info.json); train one with `mobility train sft`")
    info = json.loads(info_file.read_text(encoding="utf-8"))
    if instructions is None and (run / "instructions" / "README.md").is_file():
        instructions = run / "instructions"  # the run's own copy of its instruction dataset
    instructions = instructions or info.get("instructions")
    if not instructions:
        raise ValueError(f"{info_file} names no instruction dataset; pass --instructions")
    rows = load_dataset(str(instructions), "next", split=split)
    if max_samples is not None:
        rows = rows.select(range(min(max_samples, len(rows))))
    prompts = rows["prompt"]
    tokenizer = AutoTokenizer.from_pretrained(run / "tokenizer", trust_remote_code=True)
    if prompts and not isinstance(prompts[0], str):  # chat format: render with the tokenizer's chat template
        prompts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    model = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    with torch.inference_mode():
        if decoder == "cached":
            ranked = tokenization_mobility.rank_locations_cached(model, tokenizer, prompts, num_beams=num_beams,
                                                                 batch_size=batch_size, progress=progress)
        else:
            ranked = tokenization_mobility.rank_locations(model, tokenizer, prompts, num_beams=num_beams,
                                                          batch_size=batch_size, processor=decoder, progress=progress)
    topk = np.full((len(ranked), num_beams), None, dtype=object)
    for i, locs in enumerate(ranked):
        topk[i, : len(locs)] = locs
    targets = np.asarray(rows["target_location_id"], dtype=object)
    ranks = ranks_from_topk(topk, targets)
    model_res = ranking_metrics(ranks)
    report = evaluate_baselines(data, "all", split=split, sample_ids=rows["sample_id"])
    samples = load_prepared(data).table("samples", split)
    seen_by_id = dict(zip(samples.column("sample_id").to_pylist(), samples.column("target_seen").to_pylist()))
    seen = np.array([seen_by_id[s] for s in rows["sample_id"]], dtype=bool)
    if (~seen).any():
        model_res["unseen"] = ranking_metrics(ranks[~seen])
    name = info.get("name", "qtmob")
    report["results"] = {name: model_res, **report["results"]}
    report.update(run=str(run), num_beams=num_beams, instructions=str(instructions), decoder=decoder)
    write_json_atomic(report, run / "metrics.json")
    if (run / "README.md").is_file():  # refresh the run's model card with the metrics table
        from .push import _find_rqvae, build_model_card

        recipe = (run / "recipe.yaml").read_text(encoding="utf-8") if (run / "recipe.yaml").is_file() else None
        card = build_model_card(info, metrics=report, recipe=recipe, has_rqvae=_find_rqvae(info, run) is not None,
                                run_dir=run)
        write_text_atomic(card, run / "README.md")
    return report
