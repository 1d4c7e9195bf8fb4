"""One evaluation path: rank or generate on the same prepared samples, score with :mod:`train.metrics`.

For check-in data every ranking metric of DESIGN §4 (Acc@1/5/10/20, MRR, NDCG@5/10) over the chosen split, plus the
same metrics on the samples whose target is an unseen (held-out) location when the split has any, and on slices of the
samples (:func:`sample_slices`, "abnormal scenarios"): long-tail targets always, and one slice per value of each
check-in column named by ``slice_by`` (e.g. ``weather``). For grid data GEO-BLEU (N = 5, and N = 3 for HuMob'23/'24
comparisons) and DTW over the target days.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
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
    "LONG_TAIL_FRACTION",
    "MAX_SLICE_VALUES",
    "MISSING_VALUE",
    "RANKING_COLUMNS",
    "TRAJECTORY_COLUMNS",
    "evaluate_baselines",
    "format_results_table",
    "grid_targets",
    "long_tail_locations",
    "sample_slices",
    "slice_metrics",
    "write_json_atomic",
    "write_text_atomic",
]

logger = logging.getLogger(__name__)

RANKING_COLUMNS = ("acc@1", "acc@5", "acc@10", "acc@20", "mrr", "ndcg@5", "ndcg@10")
TRAJECTORY_COLUMNS = ("geobleu@5", "geobleu@3", "dtw")
_HEADERS = {"acc@1": "Acc@1", "acc@5": "Acc@5", "acc@10": "Acc@10", "acc@20": "Acc@20", "mrr": "MRR",
            "ndcg@5": "NDCG@5", "ndcg@10": "NDCG@10"}

#: Share of the location table that forms the long tail (see :func:`long_tail_locations`).
LONG_TAIL_FRACTION = 0.2
#: The value slice of samples without a value: no target check-in matched, or an empty cell.
MISSING_VALUE = "missing"
#: Most value slices per ``slice_by`` column; the rarer values are grouped into ``COLUMN=(other)``.
MAX_SLICE_VALUES = 20
_OTHER_VALUE = "(other)"
_JOIN_KEYS = ("user_id", "location_id", "timestamp")
_NOT_SLICEABLE = ("latitude", "longitude")  # continuous: one slice per coordinate would mean nothing


def grid_targets(data: PreparedDataset, split: str):
    """The reference (uid, d, t, x, y) rows of the target days of ``split``, as a DataFrame."""

    return explode_grid_samples(data.table("samples", split), "target")


def long_tail_locations(data: PreparedDataset, fraction: float = LONG_TAIL_FRACTION) -> pd.Series:
    """The long-tail locations of a prepared check-in dataset, with their training visit counts.

    Every location of the ``locations`` table gets its number of check-ins in the ``train`` split of ``checkins`` (0
    when it has none: held-out locations of the inductive split, or places seen only after the training days). The
    locations are sorted by that count, ascending, ties broken by location id (ascending), and the first
    ``ceil(fraction * number of locations)`` of them (at least one) form the long tail: exactly the bottom 20% of the
    location table by default, however many locations share a count (when many locations have the same, lowest count,
    the ones with the smallest ids are taken; every tail location has at most as many training visits as any location
    outside it).

    Args:
        data (`PreparedDataset`): a prepared check-in dataset.
        fraction (`float`, *optional*, defaults to `LONG_TAIL_FRACTION` (0.2)): the share of the location table in
            the tail, in (0, 1].

    Returns:
        `pd.Series`: training visit counts (`int64`) indexed by the tail's location ids, in tail order.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"the long-tail fraction must be in (0, 1], got {fraction}")
    ids = pd.Index(data.table("locations").column("location_id").to_pandas().astype(str), name="location_id")
    if len(ids) == 0:
        raise ValueError(f"{data.path}: the location table is empty")
    train_ids = data.table("checkins", "train").column("location_id").to_pandas().astype(str)
    counts = train_ids.value_counts().reindex(ids, fill_value=0).astype("int64")
    order = np.lexsort((ids.to_numpy(dtype=object), counts.to_numpy()))
    size = max(1, int(np.ceil(fraction * len(ids) - 1e-9)))
    return counts.iloc[order[:size]]


def _slice_columns(slice_by: str | Sequence[str] | None) -> list[str]:
    if slice_by is None:
        return []
    columns = [slice_by] if isinstance(slice_by, str) else list(slice_by)
    for col in columns:
        if not isinstance(col, str) or not col.strip():
            raise ValueError(f"slice_by must name columns (non-empty strings), got {slice_by!r}")
    return list(dict.fromkeys(c.strip() for c in columns))


def _target_values(data: PreparedDataset, split: str, samples, columns: list[str]) -> pd.DataFrame:
    """One string column per name in ``columns``: the value of the sample's target check-in (the row of the split's
    ``checkins`` with the same user, location and timestamp), or of its target location when only the location table
    has the column; ``MISSING_VALUE`` for no match or an empty cell."""
    checkins = data.table("checkins", split)
    locations = data.table("locations")
    from_checkins = [c for c in checkins.column_names if c not in _JOIN_KEYS and c not in _NOT_SLICEABLE]
    from_locations = [c for c in locations.column_names
                      if c != "location_id" and c not in _NOT_SLICEABLE and c not in from_checkins]
    unknown = [c for c in columns if c not in from_checkins and c not in from_locations]
    if unknown:
        raise ValueError(
            f"{data.path}: no column {unknown[0]!r} to slice by. The {split!r} check-ins have: "
            f"{', '.join(from_checkins) or '(none)'}; the locations (the target's) have: "
            f"{', '.join(from_locations) or '(none)'}. Extra check-in columns (e.g. weather) come from a CSV source: "
            "prepare it with `mobility data prepare --format csv`, which keeps the file's unmapped columns."
        )
    keys = pd.DataFrame({
        "user_id": samples.column("user_id").to_pandas().astype(str),
        "location_id": samples.column("target_location_id").to_pandas().astype(str),
        "timestamp": samples.column("target_timestamp").to_pandas().astype("int64"),
    })
    out = pd.DataFrame(index=keys.index)
    ck_cols = [c for c in columns if c in from_checkins]
    if ck_cols:
        table = checkins.select([*_JOIN_KEYS, *ck_cols]).to_pandas()
        table["user_id"] = table["user_id"].astype(str)
        table["location_id"] = table["location_id"].astype(str)
        table["timestamp"] = table["timestamp"].astype("int64")
        table = table.drop_duplicates(list(_JOIN_KEYS), keep="first")
        merged = keys.merge(table, on=list(_JOIN_KEYS), how="left", validate="many_to_one", indicator=True)
        unmatched = int((merged["_merge"] == "left_only").sum())
        if unmatched:
            logger.warning("%s: %d of %d %s samples have no target check-in row; their %s value is %r", data.path,
                           unmatched, len(keys), split, ", ".join(ck_cols), MISSING_VALUE)
        for col in ck_cols:
            out[col] = _as_labels(merged[col])
    loc_cols = [c for c in columns if c not in from_checkins]
    if loc_cols:
        table = locations.select(["location_id", *loc_cols]).to_pandas()
        table["location_id"] = table["location_id"].astype(str)
        table = table.drop_duplicates("location_id").set_index("location_id")
        for col in loc_cols:
            out[col] = _as_labels(table[col].reindex(keys["location_id"]).reset_index(drop=True))
    return out[columns]


def _as_labels(values: pd.Series) -> np.ndarray:
    """Values as strings; missing ones (NA, NaN, empty) as ``MISSING_VALUE``."""
    values = values.reset_index(drop=True)
    if pd.api.types.is_float_dtype(values):
        whole = values.dropna()
        if (whole == np.floor(whole)).all():  # integers that a left join turned into floats: label them "3", not "3.0"
            values = values.astype("Int64")
    missing = values.isna().to_numpy()
    labels = values.astype(object).where(~missing, MISSING_VALUE).astype(str).to_numpy(dtype=object)
    labels[labels == ""] = MISSING_VALUE
    return labels


def _value_masks(column: str, labels: np.ndarray) -> dict[str, np.ndarray]:
    """``{"COLUMN=value": mask}``, most frequent value first (ties by value), ``missing`` last; beyond
    ``MAX_SLICE_VALUES`` values the rarest are grouped into ``COLUMN=(other)``."""
    codes, uniques = pd.factorize(pd.Series(labels, dtype=object), sort=True)
    counts = np.bincount(codes, minlength=len(uniques))
    uniques = np.asarray(uniques, dtype=object)
    is_missing = uniques == MISSING_VALUE
    order = [int(i) for i in np.lexsort((np.arange(len(uniques)), -counts)) if not is_missing[i]]
    keep, rest = order, []
    if len(order) > MAX_SLICE_VALUES:
        keep, rest = order[: MAX_SLICE_VALUES - 1], order[MAX_SLICE_VALUES - 1:]
        logger.info("%s has %d values: the %d rarest (%d samples) are grouped into %s=%s", column, len(order),
                    len(rest), int(counts[rest].sum()), column, _OTHER_VALUE)
    masks = {f"{column}={uniques[i]}": codes == i for i in keep}
    if rest:
        masks[f"{column}={_OTHER_VALUE}"] = np.isin(codes, rest)
    if is_missing.any():
        masks[f"{column}={MISSING_VALUE}"] = codes == int(np.flatnonzero(is_missing)[0])
    return masks


def sample_slices(
    data: str | os.PathLike | PreparedDataset,
    split: str,
    sample_ids=None,
    slice_by: str | Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Boolean masks over the samples of ``split`` that define the evaluation slices ("abnormal scenarios").

    - ``"long_tail"`` (always): the sample's target is a long-tail location, i.e. one of the bottom
      `LONG_TAIL_FRACTION` (20%) of the location table by training visit count, ties broken by location id
      (:func:`long_tail_locations`; locations never visited in training count 0 and come first).
    - ``"COLUMN=value"`` for each value of each ``slice_by`` column: the value of that column in the sample's target
      check-in, the row of the split's ``checkins`` table with the same ``user_id``, ``location_id`` (the target) and
      ``timestamp`` (the target's); found with one vectorised join. A column only the ``locations`` table has (e.g.
      ``category``) is read from the target location instead. Samples without a matching row, or with an empty value,
      get the value ``"missing"`` (a slice of its own, last). Values are ordered by sample count, most frequent first;
      when a column has more than `MAX_SLICE_VALUES` (20) values the rarest are grouped into ``COLUMN=(other)``, so
      every sample is in exactly one slice of each column.

    Args:
        data (`str`, `os.PathLike` or `PreparedDataset`): a prepared check-in dataset.
        split (`str`): the split of the samples.
        sample_ids (array-like, *optional*): the ``sample_id`` of the scored samples, in the order of their ranks;
            by default every sample of the split, in table order.
        slice_by (`str` or `Sequence[str]`, *optional*): column(s) to slice by, e.g. ``"weather"``.

    Returns:
        `dict[str, np.ndarray]`: boolean masks aligned to ``sample_ids`` (or the split's samples); a mask may be all
        false (e.g. no long-tail target in a small split).

    Raises:
        `ValueError`: for grid data, an unknown split or sample id, or a ``slice_by`` column neither table has (the
            message lists the available columns).
    """
    data = data if isinstance(data, PreparedDataset) else load_prepared(data)
    if data.kind != "checkins":
        raise ValueError(f"{data.path}: slices apply to check-in data, got {data.kind!r} data")
    columns = _slice_columns(slice_by)
    if split not in data.splits("samples"):
        raise ValueError(f"{data.path}: no split {split!r}; available: {data.splits('samples')}")
    samples = data.table("samples", split)
    if sample_ids is not None:
        samples = _select_samples(samples, sample_ids, data.path, split)
    targets = samples.column("target_location_id").to_pandas().astype(str)
    tail = long_tail_locations(data)
    masks: dict[str, np.ndarray] = {"long_tail": targets.isin(tail.index).to_numpy()}
    if columns:
        values = _target_values(data, split, samples, columns)
        for col in columns:
            masks.update(_value_masks(col, values[col].to_numpy(dtype=object)))
    return masks


def slice_metrics(ranks: np.ndarray, slices: dict[str, np.ndarray]) -> dict[str, dict]:
    """Ranking metrics of every non-empty slice.

    Args:
        ranks (`np.ndarray` of shape `(N,)`): 1-based ranks of the targets (`np.inf` for a miss), as for
            :func:`train.metrics.ranking_metrics`.
        slices (`dict[str, np.ndarray]`): boolean masks of shape `(N,)`, e.g. from :func:`sample_slices`.

    Returns:
        `dict[str, dict]`: ``{slice_name: ranking_metrics(ranks[mask])}`` (with ``num_samples``) for every slice with
        at least one sample, in the order of ``slices``.
    """
    ranks = np.asarray(ranks, dtype=np.float64)
    out: dict[str, dict] = {}
    for name, mask in slices.items():
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != ranks.shape:
            raise ValueError(f"slice {name!r} has {mask.shape} entries for {ranks.shape} ranks")
        if mask.any():
            out[name] = ranking_metrics(ranks[mask])
    return out


def _long_tail_info(data: PreparedDataset) -> dict[str, Any]:
    tail = long_tail_locations(data)
    return {"fraction": LONG_TAIL_FRACTION, "num_locations": int(len(tail)),
            "of_locations": int(data.table("locations").num_rows), "max_train_visits": int(tail.max())}


def _checkin_results(
    data: PreparedDataset, names: list[str], split: str, sample_ids=None, slice_by=None
) -> dict[str, dict[str, Any]]:
    samples = data.table("samples", split)
    if sample_ids is not None:
        samples = _select_samples(samples, sample_ids, data.path, split)
    if samples.num_rows == 0:
        raise ValueError(f"{data.path}: split {split!r} has no samples")
    masks = sample_slices(data, split, sample_ids, slice_by)
    train = data.table("checkins", "train").select(list(_JOIN_KEYS)).to_pandas()  # not the extra columns
    locations = data.table("locations").column("location_id").to_numpy(zero_copy_only=False)
    seen = samples.column("target_seen").to_numpy(zero_copy_only=False).astype(bool)
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        model = fit_checkin_baseline(name, train, locations)
        ranks = model.rank(samples)
        res = ranking_metrics(ranks)
        if (~seen).any():
            res["unseen"] = ranking_metrics(ranks[~seen])
        res["slices"] = slice_metrics(ranks, masks)
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
        results[name] = grid_metrics(pred, reference, samples.num_rows)
    return results


def grid_metrics(predictions: pd.DataFrame, reference: pd.DataFrame, num_users: int) -> dict[str, Any]:
    """The metrics of a grid result: `geobleu@5`, `geobleu@3`, `dtw` of `predictions` against `reference` (rows
    uid, d, t, x, y with the same keys), `num_users` and `num_points` (the reference rows)."""
    return {
        "geobleu@5": geobleu(predictions, reference, max_n=5),
        "geobleu@3": geobleu(predictions, reference, max_n=3),
        "dtw": dtw(predictions, reference),
        "num_users": int(num_users),
        "num_points": int(len(reference)),
    }


def evaluate_baselines(
    data: str | os.PathLike | PreparedDataset, baselines="all", split: str = "test", sample_ids=None,
    slice_by: str | Sequence[str] | None = None,
) -> dict:
    """Evaluate baselines on a prepared dataset; returns ``{"data", "split", "kind", "results": {name: metrics}}``.

    ``baselines`` is a name, a list of names, or ``"all"`` (every baseline that applies to the data kind);
    ``sample_ids`` restricts check-in evaluation to those samples (the ones a model was scored on). For check-in data
    each result has ``"slices"`` (:func:`slice_metrics` over :func:`sample_slices`: ``"long_tail"`` always, plus
    ``"COLUMN=value"`` for each value of each ``slice_by`` column), and the report has ``"slice_info"``: the long-tail
    definition in numbers (``fraction``, ``num_locations`` of ``of_locations``, ``max_train_visits``) and ``slice_by``.
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
    if slice_by is not None and data.kind != "checkins":
        raise ValueError("slice_by (--slice-by) applies to check-in data only: grid samples have no check-in columns")
    report = {"data": str(data.path), "split": split, "kind": data.kind}
    if data.kind == "checkins":
        report["results"] = _checkin_results(data, names, split, sample_ids, slice_by)
        report["slice_info"] = {"long_tail": _long_tail_info(data), "slice_by": _slice_columns(slice_by)}
    else:
        report["results"] = _grid_results(data, names, split, sample_ids)
    return report


def _slice_title(name: str, info: dict) -> str:
    if name == "long_tail":
        tail = info.get("long_tail") or {}
        frac = tail.get("fraction", LONG_TAIL_FRACTION)
        detail = ""
        if tail:
            visits = tail["max_train_visits"]
            detail = (f"; {tail['num_locations']:,} of {tail['of_locations']:,} locations, at most {visits:,} training "
                      f"visit{'' if visits == 1 else 's'} each")
        return (f"Long-tail targets (bottom {frac:.0%} of locations by training visits, ties by location id{detail}), "
                "every location a candidate:")
    column, _, value = name.partition("=")
    if value == MISSING_VALUE:
        return f"Samples with {name} (no {column} value, or no matching target check-in):"
    if value == _OTHER_VALUE:
        return f"Samples with {name} (the rarer {column} values, grouped):"
    return f"Samples with {name}:"


def format_results_table(report: dict, *, min_slice_samples: int = 1) -> str:
    """A Markdown table of ``evaluate_baselines`` (or model) results; ranking metrics shown x100.

    For check-ins, after the main table (and the unseen-target tables when there are unseen targets), one table per
    slice (``"slices"`` of the results, :func:`sample_slices`): the long-tail targets, then each ``COLUMN=value``, each
    with the results that have it. A slice with fewer than ``min_slice_samples`` samples gets one line instead of a
    table (its metrics stay in the report).
    """
    results = report["results"]
    if report["kind"] == "checkins":
        cols = RANKING_COLUMNS
        lines = ["| model | " + " | ".join(_HEADERS[c] for c in cols) + " | samples |"]
        lines.append("|---|" + "---:|" * (len(cols) + 1))
        for name, res in results.items():
            lines.append(f"| {name} | " + " | ".join(f"{100 * res[c]:.2f}" for c in cols) + f" | {res['num_samples']:,} |")
        parts = [("unseen", "Samples whose target is an unseen (held-out) location, every location a candidate:",
                  {n: r["unseen"] for n, r in results.items() if "unseen" in r}),
                 ("unseen_candidates", "The same samples, only the unseen (held-out) locations as candidates:",
                  {n: r["unseen_candidates"] for n, r in results.items() if "unseen_candidates" in r})]
        slice_names = list(dict.fromkeys(k for r in results.values() for k in (r.get("slices") or {})))
        info = report.get("slice_info") or {}
        for name in slice_names:
            parts.append((name, _slice_title(name, info),
                          {n: r["slices"][name] for n, r in results.items() if name in (r.get("slices") or {})}))
        for key, title, subset in parts:
            if not subset:
                continue
            size = max(r["num_samples"] for r in subset.values())
            if key not in ("unseen", "unseen_candidates") and size < min_slice_samples:
                lines += ["", f"{title.rstrip(':')}: {size:,} sample(s), too few for a table (their metrics are "
                          "in the JSON report)."]
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
    slice_by: str | Sequence[str] | None = None,
    write: bool = True,
) -> dict:
    """Score a fine-tuned QT-Mob run on the next-location samples of ``split``, with the baselines beside it.

    The prompts come from the run's instruction dataset (config ``next``; one row per prepared sample, template 0),
    the ranking from deterministic beam search constrained to valid location codes
    (``decoder="cached"``: :func:`tokenization_mobility.rank_locations_cached`, each prompt encoded once; or
    ``"vectorised"`` / ``"prefix_fn"``: ``generate`` with that constraint; all rank alike); Acc@k / MRR / NDCG@k are
    computed over the returned ranking
    (a target outside the ``num_beams`` returned locations counts as a miss). The baselines are scored on exactly the
    same samples. Model and baselines get ``"slices"`` (:func:`sample_slices`: long-tail targets, and each value of
    each ``slice_by`` check-in column). Returns the report (also written to ``metrics.json`` and the model card's
    table, unless ``write=False``).
    """
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tokenization_mobility
    from dataset_builders.publish import load_dataset_folder

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
    rows = load_dataset_folder(instructions, "next", split=split)
    if max_samples is not None:
        rows = rows.select(range(min(max_samples, len(rows))))
    slices = sample_slices(data, split, rows["sample_id"], slice_by)  # before the model: a bad column fails fast
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
    report = evaluate_baselines(data, "all", split=split, sample_ids=rows["sample_id"], slice_by=slice_by)
    samples = load_prepared(data).table("samples", split)
    seen_by_id = dict(zip(samples.column("sample_id").to_pylist(), samples.column("target_seen").to_pylist()))
    seen = np.array([seen_by_id[s] for s in rows["sample_id"]], dtype=bool)
    if (~seen).any():
        model_res["unseen"] = ranking_metrics(ranks[~seen])
    model_res["slices"] = slice_metrics(ranks, slices)
    name = info.get("name", "qtmob")
    report["results"] = {name: model_res, **report["results"]}
    report.update(run=str(run), num_beams=num_beams, instructions=str(instructions), decoder=decoder)
    if not write:  # e.g. a second, smaller evaluation that must not replace the run's own metrics and card
        return report
    write_json_atomic(report, run / "metrics.json")
    if (run / "README.md").is_file():  # refresh the run's model card with the metrics table
        from .push import _find_rqvae, build_model_card

        recipe = (run / "recipe.yaml").read_text(encoding="utf-8") if (run / "recipe.yaml").is_file() else None
        card = build_model_card(info, metrics=report, recipe=recipe, has_rqvae=_find_rqvae(info, run) is not None,
                                run_dir=run)
        write_text_atomic(card, run / "README.md")
    return report
