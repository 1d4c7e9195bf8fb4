"""Evaluation metrics of hf-mobility: ranking metrics for next-location prediction and trajectory metrics for HuMob grids.

Two families live here.

**Ranking metrics** (one relevant item per sample). Everything starts from ``ranks``: the 1-based rank of the true next
location in the model's ranking, ``np.inf`` when the model's (truncated) ranking does not contain it. Use
[`ranks_from_topk`] for a list of top-k predictions and [`ranks_from_scores`] for a dense score matrix, then
[`ranking_metrics`] (or the single metrics [`accuracy_at_k`], [`mrr`], [`ndcg_at_k`]). Values are fractions in
``[0, 1]``, not percentages.

**Trajectory metrics** for HuMob-style generation (500 m grid cells, 48 half-hour slots a day): GEO-BLEU ([`geobleu`])
and dynamic time warping ([`dtw`]). Both are computed per user and per day, averaged over the user's days, then over
users. They are vectorised across days (days of similar length are padded into ``[B, L, L]`` batches), and give the
same values as the straightforward single-day definitions [`geobleu_day`] and [`dtw_day`], which are kept as the
readable reference.

- *GEO-BLEU*: the point proximity of a generated point ``g`` and a reference point ``r`` is ``exp(-beta * |g - r|)``
  (Euclidean distance in cells); an n-gram's proximity is the product of its aligned point proximities. For each
  ``n`` up to ``min(max_n, day length)``, generated and reference n-grams are matched one-to-one greedily in
  descending proximity, ties broken by (generated index, reference index); ``p_n`` is the matched proximity mass over
  the number of generated n-grams. The day's score is the brevity penalty times the geometric mean of the ``p_n``.
  The greedy matching is computed exactly with a parallel deferred-acceptance (Gale-Shapley) procedure: under a
  strict total order of the pairs, the stable matching is unique and equals the greedy one.
- *DTW*: the classic recurrence ``D[i, j] = c(i, j) + min(D[i-1, j], D[i, j-1], D[i-1, j-1])`` with local cost
  ``c = |g - r| / scale``, computed by anti-diagonal wavefronts over a batch of days.

Point proximities are computed with numpy's ``exp`` (as the HuMob reference scorer does); with integer cells, many
n-gram proximities are equal or differ only in the last bit, so every implementation here shares that exact
computation to order such pairs identically.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "STEP_COLUMNS",
    "accuracy_at_k",
    "dtw",
    "dtw_day",
    "geobleu",
    "geobleu_day",
    "mrr",
    "ndcg_at_k",
    "ranking_metrics",
    "ranks_from_scores",
    "ranks_from_topk",
]

logger = logging.getLogger(__name__)

STEP_COLUMNS = ("uid", "d", "t", "x", "y")

# Cells per padded batch of days ([B, L, L] arrays of float64): bounds the memory of the vectorised trajectory
# metrics to a few tens of MB per temporary array while keeping numpy calls large.
_MAX_BATCH_CELLS = 1 << 20
# Elements per chunk of the dense [N, L] comparisons of `ranks_from_scores`.
_MAX_RANK_CHUNK = 1 << 24


# ----------------------------------------------------------------------------------------------------------------------
# Ranking metrics
# ----------------------------------------------------------------------------------------------------------------------


def _check_k(k: Any, name: str = "k") -> int:
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"{name} must be a positive integer, got {k!r}")
    if k < 1:
        raise ValueError(f"{name} must be a positive integer, got {k}")
    return int(k)


def _as_ranks(ranks: Any) -> np.ndarray:
    try:
        arr = np.asarray(ranks, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"ranks must be numeric, got {type(ranks).__name__}: {err}") from err
    if arr.ndim != 1:
        raise ValueError(f"ranks must be a 1-D array, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("ranks is empty: ranking metrics need at least one sample")
    if np.isnan(arr).any():
        raise ValueError("ranks contains NaN; use np.inf for a target missing from the ranking")
    if (arr < 1).any():
        bad = arr[arr < 1][0]
        raise ValueError(f"ranks are 1-based and must be >= 1 (or np.inf), got {bad}")
    return arr


def accuracy_at_k(ranks: Any, k: int) -> float:
    """Fraction of samples whose target is ranked within the first `k` (Acc@k, also called Hit@k or Recall@k).

    Args:
        ranks (`array-like` of shape `(N,)`):
            1-based rank of the target of each sample; `np.inf` when the target is not in the returned ranking.
        k (`int`):
            Cut-off, at least 1.

    Returns:
        `float`: mean of `rank <= k`, in `[0, 1]`.

    Raises:
        `ValueError`: if `ranks` is empty, not 1-D, contains NaN or values below 1, or `k` is not a positive integer.
    """
    arr = _as_ranks(ranks)
    k = _check_k(k)
    return float(np.mean(arr <= k))


def mrr(ranks: Any) -> float:
    """Mean reciprocal rank.

    Args:
        ranks (`array-like` of shape `(N,)`):
            1-based rank of the target of each sample; `np.inf` (a miss) contributes 0.

    Returns:
        `float`: mean of `1 / rank`, in `[0, 1]`.

    Raises:
        `ValueError`: if `ranks` is empty, not 1-D, or contains NaN or values below 1.
    """
    arr = _as_ranks(ranks)
    return float(np.mean(1.0 / arr))


def ndcg_at_k(ranks: Any, k: int) -> float:
    """Normalised discounted cumulative gain at `k` with a single relevant item per sample.

    With one relevant item the ideal DCG is 1, so each sample scores `1 / log2(rank + 1)` if `rank <= k` and 0 otherwise.

    Args:
        ranks (`array-like` of shape `(N,)`):
            1-based rank of the target of each sample; `np.inf` when the target is not in the returned ranking.
        k (`int`):
            Cut-off, at least 1.

    Returns:
        `float`: mean gain, in `[0, 1]`.

    Raises:
        `ValueError`: if `ranks` is empty, not 1-D, contains NaN or values below 1, or `k` is not a positive integer.
    """
    arr = _as_ranks(ranks)
    k = _check_k(k)
    hit = arr <= k
    gains = np.zeros_like(arr)
    gains[hit] = 1.0 / np.log2(arr[hit] + 1.0)
    return float(np.mean(gains))


def ranking_metrics(
    ranks: Any, ks: Sequence[int] = (1, 5, 10, 20), ndcg_ks: Sequence[int] = (5, 10)
) -> dict[str, float]:
    """All ranking metrics at once.

    Args:
        ranks (`array-like` of shape `(N,)`):
            1-based rank of the target of each sample; `np.inf` when the target is not in the returned ranking.
        ks (`Sequence[int]`, *optional*, defaults to `(1, 5, 10, 20)`):
            Cut-offs of Acc@k.
        ndcg_ks (`Sequence[int]`, *optional*, defaults to `(5, 10)`):
            Cut-offs of NDCG@k.

    Returns:
        `dict[str, float]`: `"acc@{k}"` for each `k` in `ks`, `"mrr"`, `"ndcg@{k}"` for each `k` in `ndcg_ks`, and
        `"num_samples"` (an `int`). Metric values are fractions in `[0, 1]`.

    Raises:
        `ValueError`: if `ranks` is empty or malformed, or a cut-off is not a positive integer.

    Example:

    ```python
    >>> import numpy as np
    >>> ranking_metrics(np.array([1, 3, np.inf]), ks=(1, 5), ndcg_ks=(5,))["acc@5"]
    0.6666666666666666
    ```
    """
    arr = _as_ranks(ranks)
    ks = [_check_k(k, "ks") for k in ks]
    ndcg_ks = [_check_k(k, "ndcg_ks") for k in ndcg_ks]
    out: dict[str, float] = {}
    for k in ks:
        out[f"acc@{k}"] = float(np.mean(arr <= k))
    out["mrr"] = float(np.mean(1.0 / arr))
    for k in ndcg_ks:
        out[f"ndcg@{k}"] = ndcg_at_k(arr, k)
    out["num_samples"] = int(arr.size)
    return out


def ranks_from_topk(topk: Any, targets: Any) -> np.ndarray:
    """Rank of each target in a matrix of ranked top-k predictions.

    Args:
        topk (`array-like` of shape `(N, K)`):
            Row `i` holds the predictions for sample `i`, best first (location ids as strings, ints, or objects).
            Padding may be any value that never equals a target (e.g. `None` or `-1`).
        targets (`array-like` of shape `(N,)`):
            The true next location of each sample.

    Returns:
        `np.ndarray` of shape `(N,)`, `float64`: 1-based position of the first occurrence of the target in its row,
        `np.inf` when it does not occur.

    Raises:
        `ValueError`: if `topk` is not 2-D or `targets` is not 1-D with one entry per row.
    """
    top = np.asarray(topk)
    tgt = np.asarray(targets)
    if top.ndim != 2:
        raise ValueError(f"topk must be a 2-D array [N, K], got shape {top.shape}")
    if tgt.ndim != 1:
        raise ValueError(f"targets must be a 1-D array [N], got shape {tgt.shape}")
    if tgt.shape[0] != top.shape[0]:
        raise ValueError(f"topk has {top.shape[0]} rows but targets has {tgt.shape[0]} entries")
    numeric = "biuf"
    if top.dtype.kind != tgt.dtype.kind and not (top.dtype.kind in numeric and tgt.dtype.kind in numeric):
        # e.g. string predictions against integer targets, or padding with None: compare as Python objects.
        top = top.astype(object)
        tgt = tgt.astype(object)
    match = np.asarray(top == tgt[:, None], dtype=bool)
    if match.shape != top.shape:
        raise ValueError("topk and targets could not be compared element-wise")
    hit = match.any(axis=1)
    first = match.argmax(axis=1)
    return np.where(hit, first + 1.0, np.inf)


def ranks_from_scores(scores: Any, target_index: Any) -> np.ndarray:
    """Rank of each target in a dense score matrix (higher score = better), ties broken by column index.

    The rank of target column `c` in row `i` is `1 + #(scores[i] > s) + #(scores[i] == s and column < c)` with
    `s = scores[i, c]`: a tie is resolved in favour of the lower column index (i.e. location order), the same
    ordering as a stable descending sort.

    Args:
        scores (`array-like` of shape `(N, L)`):
            Scores of every candidate location; must not contain NaN (`±inf` is allowed).
        target_index (`array-like` of int, shape `(N,)`):
            Column of the true location of each sample, in `[0, L)`.

    Returns:
        `np.ndarray` of shape `(N,)`, `float64`: the 1-based rank of each target.

    Raises:
        `ValueError`: on shape mismatches, NaN scores, non-integer or out-of-range target indices.
    """
    try:
        sc = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"scores must be numeric: {err}") from err
    ti = np.asarray(target_index)
    if sc.ndim != 2:
        raise ValueError(f"scores must be a 2-D array [N, L], got shape {sc.shape}")
    if ti.ndim != 1 or ti.shape[0] != sc.shape[0]:
        raise ValueError(
            f"target_index must be a 1-D array with one entry per row of scores ({sc.shape[0]}), got shape {ti.shape}"
        )
    if ti.size and ti.dtype.kind not in "iu":
        raise ValueError(f"target_index must hold integers, got dtype {ti.dtype}")
    ti = ti.astype(np.int64, copy=False)
    n, num_cols = sc.shape
    if n and (ti.min() < 0 or ti.max() >= num_cols):
        bad = ti[(ti < 0) | (ti >= num_cols)][0]
        raise ValueError(f"target_index {bad} is out of range for {num_cols} score columns")
    if np.isnan(sc).any():
        raise ValueError("scores contains NaN")
    out = np.empty(n, dtype=np.float64)
    cols = np.arange(num_cols)
    step = max(1, _MAX_RANK_CHUNK // max(num_cols, 1))
    for lo in range(0, n, step):
        block = sc[lo : lo + step]
        t = ti[lo : lo + step]
        target_score = block[np.arange(block.shape[0]), t][:, None]
        better = np.count_nonzero(block > target_score, axis=1)
        tied_before = np.count_nonzero((block == target_score) & (cols[None, :] < t[:, None]), axis=1)
        out[lo : lo + step] = 1.0 + better + tied_before
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Trajectory metrics: input handling
# ----------------------------------------------------------------------------------------------------------------------


class _AlignedDays:
    """Generated and reference steps sorted by (uid, d, t), sharing their keys, cut into user-days."""

    def __init__(self, generated: Any, reference: Any):
        keys_g, xy_g = _as_steps(generated, "generated")
        keys_r, xy_r = _as_steps(reference, "reference")
        keys_g, xy_g = _sort_and_check_unique(keys_g, xy_g, "generated")
        keys_r, xy_r = _sort_and_check_unique(keys_r, xy_r, "reference")
        _check_same_keys(keys_g, keys_r)
        self.gen_xy = xy_g
        self.ref_xy = xy_r
        change = np.ones(len(keys_g), dtype=bool)
        change[1:] = (keys_g[1:, 0] != keys_g[:-1, 0]) | (keys_g[1:, 1] != keys_g[:-1, 1])
        self.day_starts = np.flatnonzero(change)
        self.day_lengths = np.diff(np.append(self.day_starts, len(keys_g)))
        self.day_uid = keys_g[self.day_starts, 0]

    def aggregate(
        self, day_values: np.ndarray, name: str, return_per_user: bool
    ) -> float | tuple[float, pd.DataFrame]:
        user_change = np.ones(len(self.day_uid), dtype=bool)
        user_change[1:] = self.day_uid[1:] != self.day_uid[:-1]
        user_starts = np.flatnonzero(user_change)
        num_days = np.diff(np.append(user_starts, len(self.day_uid)))
        per_user = np.add.reduceat(day_values, user_starts) / num_days
        value = float(np.mean(per_user))
        if not return_per_user:
            return value
        frame = pd.DataFrame({"uid": self.day_uid[user_starts], name: per_user, "num_days": num_days})
        return value, frame


def _as_steps(obj: Any, side: str) -> tuple[np.ndarray, np.ndarray]:
    """(uid, d, t) as an int64 [M, 3] array and (x, y) as a float64 [M, 2] array."""
    if isinstance(obj, pd.DataFrame):
        missing = [c for c in STEP_COLUMNS if c not in obj.columns]
        if missing:
            raise ValueError(f"{side} DataFrame lacks column(s) {missing}; expected {list(STEP_COLUMNS)}")
        keys = obj[["uid", "d", "t"]].to_numpy()
        xy = obj[["x", "y"]].to_numpy()
    else:
        arr = np.asarray(obj)
        if arr.ndim != 2 or arr.shape[1] != 5:
            raise ValueError(
                f"{side} must be a DataFrame with columns {list(STEP_COLUMNS)} or an array of "
                f"shape [M, 5] in that column order, got shape {arr.shape}"
            )
        keys, xy = arr[:, :3], arr[:, 3:]
    if len(keys) == 0:
        raise ValueError(f"{side} trajectory has no steps")
    try:
        keys_f = np.asarray(keys, dtype=np.float64)
        xy = np.asarray(xy, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{side}: uid, d, t, x, y must be numeric: {err}") from err
    if np.asarray(keys).dtype.kind in "iu":
        keys_i = np.asarray(keys, dtype=np.int64)
    else:
        if not np.isfinite(keys_f).all() or (keys_f != np.round(keys_f)).any():
            raise ValueError(f"{side}: uid, d and t must be integers")
        keys_i = keys_f.astype(np.int64)
    if not np.isfinite(xy).all():
        raise ValueError(f"{side}: x and y must be finite numbers")
    return keys_i, xy


def _sort_and_check_unique(keys: np.ndarray, xy: np.ndarray, side: str) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((keys[:, 2], keys[:, 1], keys[:, 0]))
    keys, xy = keys[order], xy[order]
    dup = np.flatnonzero((keys[1:] == keys[:-1]).all(axis=1))
    if dup.size:
        uid, d, t = keys[dup[0]]
        raise ValueError(f"{side} trajectory has duplicate steps: (uid={uid}, d={d}, t={t}) occurs more than once")
    return keys, xy


def _check_same_keys(keys_g: np.ndarray, keys_r: np.ndarray) -> None:
    if keys_g.shape == keys_r.shape and np.array_equal(keys_g, keys_r):
        return
    uniq, inverse = np.unique(np.concatenate([keys_g, keys_r]), axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    in_gen = np.zeros(len(uniq), dtype=bool)
    in_ref = np.zeros(len(uniq), dtype=bool)
    in_gen[inverse[: len(keys_g)]] = True
    in_ref[inverse[len(keys_g) :]] = True
    first = int(np.argmax(in_gen != in_ref))  # np.unique sorts rows lexicographically: the first (uid, d, t)
    uid, d, t = uniq[first]
    present, absent = ("generated", "reference") if in_gen[first] else ("reference", "generated")
    raise ValueError(
        f"generated and reference steps must share (uid, d, t) exactly: (uid={uid}, d={d}, t={t}) is in the {present} "
        f"trajectory but missing from the {absent} one ({len(keys_g)} generated vs {len(keys_r)} reference steps)"
    )


def _day_batches(lengths: np.ndarray) -> Iterator[np.ndarray]:
    """Indices of days, sorted by length and cut into groups small enough for one padded [B, L, L] batch."""
    order = np.argsort(lengths, kind="stable")
    sorted_len = lengths[order].astype(np.int64)
    lo = 0
    while lo < len(order):
        # A batch [lo, hi) is padded to its last (longest) day: grow it while (hi - lo) * L_max^2 fits the budget.
        window = max(1, _MAX_BATCH_CELLS // int(sorted_len[lo]) ** 2)
        tail = sorted_len[lo : lo + window]
        cells = np.arange(1, len(tail) + 1) * tail**2
        hi = lo + max(1, int(np.searchsorted(cells, _MAX_BATCH_CELLS, side="right")))
        yield order[lo:hi]
        lo = hi


def _padded(xy: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """[B, Lmax, 2] array of each day's points; padding repeats the day's first point (it is masked out later)."""
    width = int(lengths.max())
    offsets = np.arange(width)
    idx = starts[:, None] + np.where(offsets[None, :] < lengths[:, None], offsets[None, :], 0)
    return xy[idx]


def _cell_distance(gen: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Euclidean distances between the points of two batches: [B, G, 2] x [B, R, 2] -> [B, G, R]."""
    dx = gen[:, :, None, 0] - ref[:, None, :, 0]
    dy = gen[:, :, None, 1] - ref[:, None, :, 1]
    dx *= dx
    dy *= dy
    dx += dy
    return np.sqrt(dx, out=dx)


# ----------------------------------------------------------------------------------------------------------------------
# GEO-BLEU
# ----------------------------------------------------------------------------------------------------------------------


def _greedy_matched_sums(
    prox: np.ndarray, num_rows: np.ndarray, num_cols: np.ndarray, row_leader: np.ndarray
) -> np.ndarray:
    """Sum of the proximities matched by greedy one-to-one matching, for a batch of proximity matrices.

    The greedy procedure takes pairs in descending proximity, ties broken by (row, column), and keeps a pair when its
    row and column are both free. This is a strict total order on pairs, so the greedy matching is the unique stable
    matching (rows and columns both prefer higher pairs), which deferred acceptance (Gale-Shapley) finds with rows
    proposing, in any proposal order. Here all free rows of all days propose at once, each round:

    - a row skips every column whose current holder ranks above it there (such a column rejects it now and later,
      since holders only improve) and proposes to its best remaining column;
    - rows with identical n-grams have identical proximity rows, and the lower one always wins their contests. The free
      rows of such a class therefore propose together: the lowest one to its best available column, the next one to
      the second best of the same list, and so on (each skipped column receives a proposal from a member that beats
      it); a member past the end of the list can never be matched;
    - each column keeps the best of its proposers (highest proximity, then lowest row) if it beats the current holder.

    Args:
        prox (`np.ndarray` of shape `(B, G, R)`): proximities; entries outside each day's valid block are ignored.
        num_rows (`np.ndarray` of shape `(B,)`): number of valid rows (generated n-grams) of each day.
        num_cols (`np.ndarray` of shape `(B,)`): number of valid columns (reference n-grams) of each day.
        row_leader (`np.ndarray` of shape `(B, G)`): for each row, the lowest row of the same day whose proximity row
            is known to be identical (itself when there is none).

    Returns:
        `np.ndarray` of shape `(B,)`: the matched proximity mass of each day.
    """
    batch, height, width = prox.shape
    col_ok = np.arange(width)[None, :] < num_cols[:, None]
    # The value of a column's holder: -1 when free (proximities are >= 0), +inf for padding so it is never available.
    hold_val = np.where(col_ok, -1.0, np.inf)
    hold_row = np.full((batch, width), -1, dtype=np.int64)
    if col_ok.all():
        flat = np.ascontiguousarray(prox).reshape(batch * height, width)
    else:
        flat = np.where(col_ok[:, None, :], prox, -np.inf).reshape(batch * height, width)
    # The valid rows in class order (by class label, then row): each class is a contiguous segment.
    valid_b, valid_i = np.nonzero(np.arange(height)[None, :] < num_rows[:, None])
    label = valid_b * height + row_leader[valid_b, valid_i]
    by_class = np.argsort(label * height + valid_i)
    valid_b, valid_i, label = valid_b[by_class], valid_i[by_class], label[by_class]
    segment_start = np.ones(label.size, dtype=bool)
    segment_start[1:] = label[1:] != label[:-1]
    segment_of = np.cumsum(segment_start) - 1
    position = np.empty(batch * height, dtype=np.int64)
    position[valid_b * height + valid_i] = np.arange(label.size)
    is_free = np.ones(label.size, dtype=bool)
    first_round = True
    first_choice = flat.argmax(axis=1)
    # Each round either gives a day that still has free rows a new (row, column) win or drops all its free rows, and a
    # row never wins the same column twice: at most height * width + 1 rounds (plus the final check).
    for _ in range(height * width + 2):
        # The free rows in class order, the lowest free row of each class (its leader) and each free row's rank.
        free_pos = np.flatnonzero(is_free)
        count = free_pos.size
        if count == 0:
            break
        free_b, free_i = valid_b[free_pos], valid_i[free_pos]
        seg = segment_of[free_pos]
        new_class = np.ones(count, dtype=bool)
        new_class[1:] = seg[1:] != seg[:-1]
        leader = np.flatnonzero(new_class)
        class_of = np.cumsum(new_class) - 1
        class_size = np.diff(np.append(leader, count))
        # Each leader's available columns are those where it beats the current holder (all, in the first round).
        lb, li = free_b[leader], free_i[leader]
        leader_row = lb * height + li
        if first_round:
            rows = None
            leader_col = first_choice[leader_row]
            col = leader_col[class_of]
            val = flat[leader_row[class_of], col]
            first_round = False
        else:
            rows = np.take(flat, leader_row, axis=0)
            held = np.take(hold_val, lb, axis=0)
            taken = rows < held
            tie_r, tie_c = np.divmod(np.flatnonzero(rows == held), width)  # equal proximity: the lower row wins
            taken[tie_r, tie_c] = li[tie_r] > hold_row[lb[tie_r], tie_c]
            np.copyto(rows, -np.inf, where=taken)
            leader_col = rows.argmax(axis=1)
            col = leader_col[class_of]
            val = rows[class_of, col]
        # Members of larger classes take the next columns of their leader's list, in preference order (proximity
        # desc, then column asc): repeatedly knock out the last pick and take the arg-max again.
        multi = np.flatnonzero(class_size > 1)
        if multi.size:
            sub = np.take(flat, leader_row[multi], axis=0) if rows is None else rows[multi]
            pick = leader_col[multi]
            for step in range(1, int(class_size.max())):
                sub[np.arange(multi.size), pick] = -np.inf
                left = class_size[multi] > step
                multi, sub = multi[left], sub[left]
                pick = sub.argmax(axis=1)
                member = leader[multi] + step
                col[member] = pick
                val[member] = sub[np.arange(multi.size), pick]
        # Members past the end of their class's list (and leaders with nothing available) are never matched.
        keep = val > -np.inf
        pb, pi, pj, pv = free_b[keep], free_i[keep], col[keep], val[keep]
        # Each (day, column) takes its best proposer (highest proximity, then lowest row) if it beats the holder.
        group = pb * width + pj
        best_val = np.full(batch * width, -np.inf)
        np.maximum.at(best_val, group, pv)
        tied = np.flatnonzero(pv == best_val[group])
        best_row = np.full(batch * width, height)
        np.minimum.at(best_row, group[tied], pi[tied])
        cand = tied[pi[tied] == best_row[group[tied]]]
        cb, cj, ci, cv = pb[cand], pj[cand], pi[cand], pv[cand]
        holder = hold_row[cb, cj]
        holder_val = hold_val[cb, cj]
        beats = (cv > holder_val) | ((cv == holder_val) & (ci < holder))
        wb, wj, displaced = cb[beats], cj[beats], holder[beats]
        hold_row[wb, wj] = ci[beats]
        hold_val[wb, wj] = cv[beats]
        # Winners leave the free rows, displaced holders rejoin them; dropped rows leave for good.
        is_free[free_pos[~keep]] = False
        is_free[position[wb * height + ci[beats]]] = False
        was_held = displaced >= 0
        is_free[position[wb[was_held] * height + displaced[was_held]]] = True
    else:
        raise RuntimeError("greedy matching did not converge; this is a bug in train.metrics")
    return np.where(hold_row >= 0, hold_val, 0.0).sum(axis=1)


def _geobleu_batch(
    gen: np.ndarray, ref: np.ndarray, gen_len: np.ndarray, ref_len: np.ndarray, max_n: int, beta: float
) -> np.ndarray:
    """GEO-BLEU of a padded batch of days: gen [B, G, 2], ref [B, R, 2] with valid lengths gen_len, ref_len."""
    batch, height = gen.shape[:2]
    point = np.exp(-beta * _cell_distance(gen, ref))
    # same[b, i, k]: generated n-grams i and k of day b are identical (so are their proximity rows).
    point_same = (gen[:, :, None, 0] == gen[:, None, :, 0]) & (gen[:, :, None, 1] == gen[:, None, :, 1])
    same = point_same
    num_n = np.minimum(np.minimum(gen_len, ref_len), max_n)
    log_sum = np.zeros(batch)
    zero = num_n == 0
    ngram = point
    for n in range(1, int(num_n.max()) + 1):
        if n > 1:
            # Product of aligned point proximities, accumulated left to right.
            ngram = ngram[:, :-1, :-1] * point[:, n - 1 :, n - 1 :]
            same = same[:, :-1, :-1] & point_same[:, n - 1 :, n - 1 :]
        leader = same.argmax(axis=2)  # the first identical n-gram of the day
        idx = np.flatnonzero(num_n >= n)
        if idx.size == 0:
            break
        rows = gen_len[idx] - n + 1
        if idx.size < batch:
            sums = _greedy_matched_sums(ngram[idx], rows, ref_len[idx] - n + 1, leader[idx])
        else:
            sums = _greedy_matched_sums(ngram, rows, ref_len[idx] - n + 1, leader)
        p_n = sums / rows
        zero[idx] |= p_n <= 0.0
        with np.errstate(divide="ignore"):
            log_sum[idx] += np.log(p_n)
    safe_n = np.maximum(num_n, 1)
    safe_gen = np.maximum(gen_len, 1)
    brevity = np.where(gen_len > ref_len, 1.0, np.exp(1.0 - ref_len / safe_gen))
    score = brevity * np.exp(log_sum / safe_n)
    return np.where(zero, 0.0, score)


def _check_geobleu_args(max_n: Any, beta: Any) -> tuple[int, float]:
    max_n = _check_k(max_n, "max_n")
    if isinstance(beta, bool) or not isinstance(beta, (int, float, np.integer, np.floating)) or not beta > 0:
        raise ValueError(f"beta must be a positive number, got {beta!r}")
    if not math.isfinite(beta):
        raise ValueError(f"beta must be finite, got {beta!r}")
    return max_n, float(beta)


def _as_day_xy(xy: Any, side: str) -> np.ndarray:
    try:
        arr = np.asarray(xy, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{side} must be an [n, 2] array of (x, y): {err}") from err
    if arr.size == 0:
        return arr.reshape(0, 2)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{side} must be an [n, 2] array of (x, y), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{side}: x and y must be finite numbers")
    return arr


def geobleu_day(gen_xy: Any, ref_xy: Any, max_n: int = 5, beta: float = 0.5) -> float:
    """GEO-BLEU of one day: the straightforward single-day definition, kept as the readable reference.

    For each `n = 1..N` with `N = min(max_n, len(gen_xy), len(ref_xy))`, all generated n-gram / reference n-gram pairs
    are sorted by descending proximity (a stable sort, so ties keep (generated index, reference index) order) and
    matched greedily one-to-one; `p_n` is the matched proximity mass divided by the number of generated n-grams. The
    score is `BP * exp(mean(log p_n))`, 0 if any `p_n` is 0, with brevity penalty `BP = 1` if the generated day is
    longer than the reference one and `exp(1 - len(ref) / len(gen))` otherwise.

    Args:
        gen_xy (`array-like` of shape `(n, 2)`):
            Generated (x, y) cells of the day, in time order.
        ref_xy (`array-like` of shape `(m, 2)`):
            Reference (x, y) cells of the day, in time order. The lengths may differ.
        max_n (`int`, *optional*, defaults to 5):
            Largest n-gram size (HuMob'25 uses 5; capped at the shorter length).
        beta (`float`, *optional*, defaults to 0.5):
            Decay of the point proximity `exp(-beta * distance)`, distance in cells.

    Returns:
        `float`: the day's GEO-BLEU in `[0, 1]`; 0.0 when either sequence is empty.

    Raises:
        `ValueError`: on malformed coordinates or a non-positive `max_n` / `beta`.
    """
    max_n, beta = _check_geobleu_args(max_n, beta)
    gen = _as_day_xy(gen_xy, "gen_xy")
    ref = _as_day_xy(ref_xy, "ref_xy")
    n_gen, n_ref = len(gen), len(ref)
    if n_gen == 0 or n_ref == 0:
        return 0.0
    point = np.exp(-beta * _cell_distance(gen[None], ref[None])[0]).tolist()
    num_n = min(max_n, n_gen, n_ref)
    log_sum = 0.0
    for n in range(1, num_n + 1):
        pairs = []
        for i in range(n_gen - n + 1):
            for j in range(n_ref - n + 1):
                value = point[i][j]
                for k in range(1, n):
                    value *= point[i + k][j + k]
                pairs.append((value, i, j))
        pairs.sort(key=lambda pair: -pair[0])  # stable: ties stay in (i, j) order
        used_gen: set[int] = set()
        used_ref: set[int] = set()
        total = 0.0
        for value, i, j in pairs:
            if i not in used_gen and j not in used_ref:
                used_gen.add(i)
                used_ref.add(j)
                total += value
        p_n = total / (n_gen - n + 1)
        if p_n <= 0.0:
            return 0.0
        log_sum += math.log(p_n)
    brevity = 1.0 if n_gen > n_ref else math.exp(1.0 - n_ref / n_gen)
    return brevity * math.exp(log_sum / num_n)


def geobleu(
    generated: Any, reference: Any, max_n: int = 5, beta: float = 0.5, return_per_user: bool = False
) -> float | tuple[float, pd.DataFrame]:
    """GEO-BLEU of generated against reference trajectories, per user and day, averaged over days then users.

    See [`geobleu_day`] for the per-day definition; this function computes the same values vectorised across days.

    Args:
        generated (`pd.DataFrame` or `np.ndarray`):
            Generated steps: a DataFrame with columns `uid, d, t, x, y` or an `[M, 5]` array in that column order.
        reference (`pd.DataFrame` or `np.ndarray`):
            Reference steps in the same format. Generated and reference must contain exactly the same (uid, d, t)
            keys; row order does not matter (each day is read in `t` order).
        max_n (`int`, *optional*, defaults to 5):
            Largest n-gram size (capped at each day's length).
        beta (`float`, *optional*, defaults to 0.5):
            Decay of the point proximity `exp(-beta * distance)`, distance in cells.
        return_per_user (`bool`, *optional*, defaults to `False`):
            Also return a DataFrame with columns `uid, geobleu, num_days`.

    Returns:
        `float` (the mean over users of each user's mean over days), or `(float, pd.DataFrame)` when
        `return_per_user=True`.

    Raises:
        `ValueError`: on missing columns, non-numeric or non-finite values, duplicate (uid, d, t) on either side, or
        (uid, d, t) keys present on one side only (the message names the first such key and the side missing it).
    """
    max_n, beta = _check_geobleu_args(max_n, beta)
    days = _AlignedDays(generated, reference)
    scores = np.empty(len(days.day_starts))
    for batch in _day_batches(days.day_lengths):
        starts, lengths = days.day_starts[batch], days.day_lengths[batch]
        gen = _padded(days.gen_xy, starts, lengths)
        ref = _padded(days.ref_xy, starts, lengths)
        scores[batch] = _geobleu_batch(gen, ref, lengths, lengths, max_n, beta)
    logger.debug("GEO-BLEU (max_n=%d) over %d user-days", max_n, len(scores))
    return days.aggregate(scores, "geobleu", return_per_user)


# ----------------------------------------------------------------------------------------------------------------------
# DTW
# ----------------------------------------------------------------------------------------------------------------------


def _dtw_batch(
    gen: np.ndarray, ref: np.ndarray, gen_len: np.ndarray, ref_len: np.ndarray, scale: float, old_first_row: bool
) -> np.ndarray:
    """DTW of a padded batch of days by anti-diagonal wavefronts over the (G+1) x (R+1) table.

    Diagonal `s` holds the cells `(i, s - i)`, stored at position `i`. Cell `(i, j)` needs `(i-1, j)` and `(i, j-1)`
    from diagonal `s-1` (positions `i-1` and `i`) and `(i-1, j-1)` from diagonal `s-2` (position `i-1`). Padding cells
    lie at `i > gen_len` or `j > ref_len` and never feed the cells a day reads, so one sweep serves all days.
    """
    batch, height, width = gen.shape[0], gen.shape[1], ref.shape[1]
    cost = _cell_distance(gen, ref)
    cost /= scale
    target_diag = gen_len + ref_len
    out = np.empty(batch)
    prev2 = np.full((batch, height + 1), np.inf)
    prev1 = np.full((batch, height + 1), np.inf)
    prev1[:, 0] = 0.0  # diagonal 0: D[0, 0] = 0
    for s in range(1, height + width + 1):
        cur = np.full((batch, height + 1), np.inf)
        if old_first_row and s <= width:
            cur[:, 0] = 0.0  # D[0, j] = 0: a prefix of the reference may be skipped for free
        lo, hi = max(1, s - width), min(height, s - 1)
        if lo <= hi:
            i = np.arange(lo, hi + 1)
            best = np.minimum(prev1[:, lo - 1 : hi], prev1[:, lo : hi + 1])
            np.minimum(best, prev2[:, lo - 1 : hi], out=best)
            cur[:, lo : hi + 1] = cost[:, i - 1, s - i - 1] + best
        done = np.flatnonzero(target_diag == s)
        if done.size:
            out[done] = cur[done, gen_len[done]]
        prev2, prev1 = prev1, cur
    return out


def _check_scale(scale: Any) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)):
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    return float(scale)


def dtw_day(gen_xy: Any, ref_xy: Any, scale: float = 2.0, old_first_row: bool = False) -> float:
    """Dynamic time warping distance of one day: the straightforward single-day definition, kept as the reference.

    Rows of the `(n+1) x (m+1)` table index the generated sequence, columns the reference one:
    `D[i, j] = c(i, j) + min(D[i-1, j], D[i, j-1], D[i-1, j-1])` with `c(i, j) = |gen[i-1] - ref[j-1]| / scale`, and
    the result is `D[n, m]`. By default only `D[0, 0] = 0` and the rest of the borders is `+inf` (the HuMob'25 scorer).
    With `old_first_row=True` the whole first row is zero, `D[0, j] = 0` for every `j`, as in the older HuMob'24 scorer:
    the generated day may then start its alignment anywhere in the reference, skipping a reference prefix at no cost.

    Args:
        gen_xy (`array-like` of shape `(n, 2)`):
            Generated (x, y) cells of the day, in time order.
        ref_xy (`array-like` of shape `(m, 2)`):
            Reference (x, y) cells of the day, in time order.
        scale (`float`, *optional*, defaults to 2.0):
            Cell distances are divided by `scale` (2 turns 500 m cells into km).
        old_first_row (`bool`, *optional*, defaults to `False`):
            Use the HuMob'24 initialisation `D[0, :] = 0`.

    Returns:
        `float`: the day's DTW distance (lower is better; 0 for identical sequences).

    Raises:
        `ValueError`: if either sequence is empty or malformed, or `scale` is not positive.
    """
    scale = _check_scale(scale)
    gen = _as_day_xy(gen_xy, "gen_xy").tolist()
    ref = _as_day_xy(ref_xy, "ref_xy").tolist()
    if not gen or not ref:
        raise ValueError("DTW is undefined for an empty sequence")
    inf = math.inf
    prev = [0.0] * (len(ref) + 1) if old_first_row else [0.0] + [inf] * len(ref)
    for gx, gy in gen:
        row = [inf] * (len(ref) + 1)
        for j, (rx, ry) in enumerate(ref, start=1):
            dx, dy = gx - rx, gy - ry
            row[j] = math.sqrt(dx * dx + dy * dy) / scale + min(prev[j], row[j - 1], prev[j - 1])
        prev = row
    return prev[-1]


def dtw(
    generated: Any, reference: Any, scale: float = 2.0, old_first_row: bool = False, return_per_user: bool = False
) -> float | tuple[float, pd.DataFrame]:
    """DTW distance of generated against reference trajectories, per user and day, averaged over days then users.

    See [`dtw_day`] for the per-day definition (rows = generated, columns = reference); this function computes the
    same values vectorised across days.

    Args:
        generated (`pd.DataFrame` or `np.ndarray`):
            Generated steps: a DataFrame with columns `uid, d, t, x, y` or an `[M, 5]` array in that column order.
        reference (`pd.DataFrame` or `np.ndarray`):
            Reference steps in the same format, with exactly the same (uid, d, t) keys.
        scale (`float`, *optional*, defaults to 2.0):
            Cell distances are divided by `scale` (2 turns 500 m cells into km).
        old_first_row (`bool`, *optional*, defaults to `False`):
            Use the HuMob'24 initialisation `D[0, :] = 0` instead of `D[0, 0] = 0` only.
        return_per_user (`bool`, *optional*, defaults to `False`):
            Also return a DataFrame with columns `uid, dtw, num_days`.

    Returns:
        `float` (the mean over users of each user's mean over days), or `(float, pd.DataFrame)` when
        `return_per_user=True`.

    Raises:
        `ValueError`: as [`geobleu`], or if `scale` is not positive.
    """
    scale = _check_scale(scale)
    days = _AlignedDays(generated, reference)
    values = np.empty(len(days.day_starts))
    for batch in _day_batches(days.day_lengths):
        starts, lengths = days.day_starts[batch], days.day_lengths[batch]
        gen = _padded(days.gen_xy, starts, lengths)
        ref = _padded(days.ref_xy, starts, lengths)
        values[batch] = _dtw_batch(gen, ref, lengths, lengths, scale, old_first_row)
    logger.debug("DTW over %d user-days", len(values))
    return days.aggregate(values, "dtw", return_per_user)
