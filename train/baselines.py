"""Simple baselines that rank every candidate location, so every ranking metric applies (DESIGN §4).

Each check-in baseline ranks candidates by a chain of keys, each one backing off to the next where the previous ties,
and finally by location id (the order of the location table):

- ``popularity``: training visits of the location.
- ``most-frequent``: the user's training visits, then popularity.
- ``history-frequency``: visits in the sample's own history, then the user's training visits, then popularity — on
  real check-in data the rule to beat on Acc@5/Acc@10/MRR.
- ``markov``: the user's training transitions from the last history location, then the global transitions from it,
  then the user's visits, then popularity (per-user Markov-1 with back-off).

``nearest_location_ranks`` is the distance-only rule (rank candidates by great-circle distance from the last visited
location); the MHSA evaluation reports it, also restricted to the places never seen in training (inductive split).

For grids, ``slot-mode`` predicts for each target (d, t) the user's most visited cell at that slot on the same day type
(weekday/weekend) during the input days, backed off to the user's most visited cell, then the global one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp
from tqdm.auto import tqdm

from dataset_builders.descriptions import unit_xyz
from dataset_builders.schema import HIDDEN_CELL

__all__ = [
    "CHECKIN_BASELINES",
    "GRID_BASELINES",
    "CheckinBaseline",
    "explode_grid_samples",
    "fit_checkin_baseline",
    "nearest_location_ranks",
    "slot_mode_from_records",
    "slot_mode_predictions",
]

logger = logging.getLogger(__name__)

CHECKIN_BASELINES = ("popularity", "most-frequent", "history-frequency", "markov")
GRID_BASELINES = ("slot-mode",)
_BATCH = 4096


def _csr(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    data = np.ones(len(rows), dtype=np.float64)
    m = sp.coo_matrix((data, (rows, cols)), shape=shape).tocsr()
    m.sum_duplicates()
    return m


class CheckinBaseline:
    """A fitted check-in baseline. Build it with :func:`fit_checkin_baseline`.

    ``rank(samples)`` gives the 1-based rank of every sample's target among all candidate locations; ``topk(samples,
    k)`` the k best location ids per sample. Both are vectorised over batches of samples.
    """

    def __init__(self, name: str, location_ids: np.ndarray, popularity: np.ndarray, user_index: dict[str, int],
                 user_visits: sp.csr_matrix, global_transitions: sp.csr_matrix, user_transitions: sp.csr_matrix,
                 pair_keys: np.ndarray):
        self.name = name
        self.location_ids = location_ids
        self.location_index = pd.Index(location_ids)
        self.popularity = popularity
        self.user_index = user_index
        self.user_visits = user_visits
        self.global_transitions = global_transitions
        self.user_transitions = user_transitions
        self.pair_keys = pair_keys  # sorted user_code * L + from_code, one per row of user_transitions

    @property
    def num_locations(self) -> int:
        return len(self.location_ids)

    def _codes(self, values) -> np.ndarray:
        return self.location_index.get_indexer(values)

    def _global_order(self) -> tuple[np.ndarray, np.ndarray]:
        """Candidates ordered by (popularity desc, location order asc), and each candidate's position in it."""
        order = np.lexsort((np.arange(self.num_locations), -self.popularity))
        position = np.empty_like(order)
        position[order] = np.arange(len(order))
        return order, position

    def _batches(self, samples: pa.Table) -> Iterator[tuple[int, int, list[sp.csr_matrix]]]:
        """Yield (start, stop, keys): the per-sample keys before popularity, as sparse [B, L] matrices, most
        important first. Every candidate outside their support ties at zero on all of them."""
        users = samples.column("user_id").to_numpy(zero_copy_only=False)
        hist = samples.column("history_location_ids").combine_chunks()
        offsets = hist.offsets.to_numpy()
        flat = self._codes(hist.flatten().to_numpy(zero_copy_only=False))
        n = samples.num_rows
        L = self.num_locations
        for lo in tqdm(range(0, n, _BATCH), desc=f"ranking ({self.name})", unit=" batch", disable=None, leave=False):
            hi = min(n, lo + _BATCH)
            b = hi - lo
            ucodes = np.array([self.user_index.get(u, -1) for u in users[lo:hi]], dtype=np.int64)

            def rows_of(matrix: sp.csr_matrix, index: np.ndarray) -> sp.csr_matrix:
                """Row ``index[i]`` of ``matrix`` for each sample, an empty row where ``index[i] < 0``."""
                picked = matrix[np.maximum(index, 0)]
                return sp.diags((index >= 0).astype(np.float64)) @ picked

            if self.name == "popularity":
                keys = []
            elif self.name == "most-frequent":
                keys = [rows_of(self.user_visits, ucodes)]
            elif self.name == "history-frequency":
                codes = flat[offsets[lo] : offsets[hi]]
                row = np.repeat(np.arange(b), np.diff(offsets[lo : hi + 1]))
                ok = codes >= 0
                keys = [_csr(row[ok], codes[ok], (b, L)), rows_of(self.user_visits, ucodes)]
            elif self.name == "markov":
                has_hist = offsets[lo + 1 : hi + 1] > offsets[lo:hi]
                last = np.where(has_hist, flat[np.maximum(offsets[lo + 1 : hi + 1] - 1, 0)], -1)
                key = ucodes * L + last
                pos = np.searchsorted(self.pair_keys, key)
                found = (ucodes >= 0) & (last >= 0) & (pos < len(self.pair_keys))
                found[found] &= self.pair_keys[pos[found]] == key[found]
                keys = [
                    rows_of(self.user_transitions, np.where(found, pos, -1)),
                    rows_of(self.global_transitions, last),
                    rows_of(self.user_visits, ucodes),
                ]
            else:  # pragma: no cover - guarded in fit_checkin_baseline
                raise ValueError(self.name)
            for k in keys:
                k.eliminate_zeros()
            yield lo, hi, keys

    @staticmethod
    def _support(keys: list[sp.csr_matrix], b: int, L: int) -> tuple[np.ndarray, np.ndarray]:
        """(row, column) pairs where any key is non-zero, sorted by row then column."""
        if not keys:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        union = sum((abs(k) for k in keys), sp.csr_matrix((b, L))).tocsr()
        union.sum_duplicates()
        union.eliminate_zeros()
        rows = np.repeat(np.arange(b), np.diff(union.indptr))
        return rows, union.indices.astype(np.int64)

    @staticmethod
    def _values(key: sp.csr_matrix, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        if len(rows) == 0:
            return np.zeros(0)
        return np.asarray(key[rows, cols]).ravel()

    def rank(self, samples: pa.Table) -> np.ndarray:
        """1-based rank of each sample's target (``np.inf`` when the target is not a candidate location).

        Sparse: only candidates with a non-zero per-sample key are compared one by one; all others are ordered by
        popularity then location order, which a precomputed global order answers.
        """
        target = self._codes(samples.column("target_location_id").to_numpy(zero_copy_only=False))
        ranks = np.full(samples.num_rows, np.inf)
        _, position = self._global_order()
        L = self.num_locations
        for lo, hi, keys in self._batches(samples):
            b = hi - lo
            t = target[lo:hi]
            ok = t >= 0
            tt = np.where(ok, t, 0)
            rows, cols = self._support(keys, b, L)
            sample_rows = np.arange(b)
            t_keys = [self._values(k, sample_rows, tt) for k in keys]
            t_in_support = np.zeros(b, dtype=bool)
            for v in t_keys:
                t_in_support |= v != 0
            # candidates in the support vs the target, lexicographically: keys, then the global order
            better = np.zeros(len(rows), dtype=bool)
            equal = np.ones(len(rows), dtype=bool)
            for k, tv in zip(keys, t_keys):
                cv = self._values(k, rows, cols)
                better |= equal & (cv > tv[rows])
                equal &= cv == tv[rows]
            better |= equal & (position[cols] < position[tt][rows])
            n_better_in_support = np.bincount(rows, weights=better, minlength=b)
            support_size = np.bincount(rows, minlength=b)
            # a target outside the support is beaten by the whole support and by the outside candidates ahead of
            # it in the global order
            ahead_in_support = np.bincount(rows, weights=position[cols] < position[tt][rows], minlength=b)
            outside = 1 + support_size + position[tt] - ahead_in_support
            r = np.where(t_in_support, 1 + n_better_in_support, outside)
            ranks[lo:hi] = np.where(ok, r, np.inf)
        return ranks

    def topk(self, samples: pa.Table, k: int = 20) -> np.ndarray:
        """The ``k`` best location ids per sample, as an [N, k] object array."""
        k = min(k, self.num_locations)
        out = np.empty((samples.num_rows, k), dtype=object)
        order, position = self._global_order()
        L = self.num_locations
        for lo, hi, keys in self._batches(samples):
            b = hi - lo
            rows, cols = self._support(keys, b, L)
            values = [self._values(key, rows, cols) for key in keys]
            # lexsort: the last key is the primary one -> rows, then each key descending, then the global order
            within = np.lexsort([position[cols]] + [-v for v in reversed(values)] + [rows])
            rows, cols = rows[within], cols[within]
            starts = np.searchsorted(rows, np.arange(b + 1))
            for i in range(b):
                head = cols[starts[i] : starts[i + 1]][:k]
                if len(head) < k:
                    fill = order[: k + len(head)]
                    fill = fill[~np.isin(fill, head)][: k - len(head)]
                    head = np.concatenate([head, fill])
                out[lo + i] = self.location_ids[head]
        return out


def nearest_location_ranks(
    last_index, target_index, latitude, longitude, candidates=None, *, batch_size: int = 256
) -> np.ndarray:
    """1-based rank of each target among the candidates ordered by great-circle distance from the sample's last
    visited location (nearest first; equal distances in location-table order); ``np.inf`` when the target is not a
    candidate.

    Args:
        last_index (array-like of int ``(N,)``): location-table row of each sample's last history visit.
        target_index (array-like of int ``(N,)``): location-table row of each target.
        latitude, longitude (array-like of float ``(L,)``): coordinates of the location table, in degrees.
        candidates (array-like of bool ``(L,)``, *optional*): the locations that may be ranked (default: all).
        batch_size (``int``, *optional*, defaults to 256): samples per dense ``(batch, L)`` distance block.
    """
    last = np.asarray(last_index, dtype=np.int64)
    target = np.asarray(target_index, dtype=np.int64)
    xyz = unit_xyz(np.asarray(latitude, dtype=np.float64), np.asarray(longitude, dtype=np.float64))
    num = len(xyz)
    if last.shape != target.shape or last.ndim != 1:
        raise ValueError(f"last_index and target_index must be 1-D of equal length, got {last.shape}, {target.shape}")
    for name, idx in (("last_index", last), ("target_index", target)):
        if len(idx) and (idx.min() < 0 or idx.max() >= num):
            raise ValueError(f"{name} must hold location-table rows in [0, {num})")
    allowed = np.ones(num, dtype=bool) if candidates is None else np.asarray(candidates, dtype=bool)
    if allowed.shape != (num,):
        raise ValueError(f"candidates must be a bool array of shape ({num},), got shape {allowed.shape}")
    cand_rows = np.flatnonzero(allowed)
    cand_xyz = xyz[cand_rows]
    ranks = np.full(len(target), np.inf)
    for lo in range(0, len(target), batch_size):
        hi = min(lo + batch_size, len(target))
        ok = allowed[target[lo:hi]]
        if not ok.any():
            continue
        rows = np.arange(lo, hi)[ok]
        dist = ((xyz[last[rows]][:, None, :] - cand_xyz[None, :, :]) ** 2).sum(-1)  # squared chords (B, C)
        d_target = ((xyz[last[rows]] - xyz[target[rows]]) ** 2).sum(-1)[:, None]
        ahead = (dist < d_target) | ((dist == d_target) & (cand_rows[None, :] < target[rows][:, None]))
        ranks[rows] = 1 + ahead.sum(1)
    return ranks


def fit_checkin_baseline(name: str, train_checkins: pd.DataFrame, location_ids) -> CheckinBaseline:
    """Fit baseline ``name`` on training check-ins (columns user_id, location_id, timestamp) over the candidate
    ``location_ids`` (the order breaks the last ties)."""
    if name not in CHECKIN_BASELINES:
        raise ValueError(f"unknown check-in baseline {name!r}; expected one of {', '.join(CHECKIN_BASELINES)}")
    location_ids = np.asarray(location_ids, dtype=object)
    loc_index = pd.Index(location_ids)
    if not loc_index.is_unique:
        raise ValueError("location_ids must be unique")
    df = train_checkins.sort_values(["user_id", "timestamp"], kind="stable")
    codes = loc_index.get_indexer(df["location_id"].to_numpy(dtype=object))
    keep = codes >= 0
    if not keep.all():
        logger.warning("%d training check-ins at locations outside the candidate set are ignored", int((~keep).sum()))
    users = df["user_id"].to_numpy(dtype=object)[keep]
    codes = codes[keep]
    ucodes, uniq_users = pd.factorize(users)
    L = len(location_ids)
    U = max(1, len(uniq_users))
    popularity = np.bincount(codes, minlength=L).astype(np.float64)
    user_visits = _csr(ucodes, codes, (U, L))
    same_user = np.r_[False, ucodes[1:] == ucodes[:-1]] if len(codes) else np.zeros(0, dtype=bool)
    src, dst, tu = codes[:-1][same_user[1:]], codes[1:][same_user[1:]], ucodes[1:][same_user[1:]]
    global_transitions = _csr(src, dst, (L, L))
    pair_keys, pair_rows = np.unique(tu.astype(np.int64) * L + src, return_inverse=True)
    user_transitions = _csr(pair_rows, dst, (max(1, len(pair_keys)), L))
    user_index = {u: i for i, u in enumerate(uniq_users)}
    return CheckinBaseline(name, location_ids, popularity, user_index, user_visits, global_transitions,
                           user_transitions, pair_keys)


def explode_grid_samples(samples: pa.Table, prefix: str) -> pd.DataFrame:
    """The ``input`` or ``target`` lists of grid samples as flat rows uid, d, t, x, y."""
    cols = {}
    lens = None
    for c in ("d", "t", "x", "y"):
        col = samples.column(f"{prefix}_{c}").combine_chunks()
        cols[c] = col.flatten().to_numpy()
        lens = np.diff(col.offsets.to_numpy())
    uid = np.repeat(samples.column("uid").to_numpy(), lens)
    return pd.DataFrame({"uid": uid, **cols})


def slot_mode_predictions(samples: pa.Table, *, day0_weekday: int = 0,
                          input_days: tuple[int, int] | None = None) -> pd.DataFrame:
    """Per-user slot-mode predictions for every target (d, t) of grid ``samples``: columns uid, d, t, x, y.

    The mode is taken over the user's input rows at the same slot and day type (weekday/weekend); ties go to the
    lower (x, y). Back-off: the user's most visited cell, then the most visited cell of all users. ``input_days``
    ``(first, last)`` keeps only the input rows of those days (e.g. the window a Q&A prompt shows a model).
    """
    inputs = explode_grid_samples(samples, "input")
    inputs = inputs[inputs["x"] != HIDDEN_CELL]
    if input_days is not None:
        first, last = (int(v) for v in input_days)
        if first > last:
            raise ValueError(f"input_days must be (first, last) with first <= last, got {input_days!r}")
        inputs = inputs[(inputs["d"] >= first) & (inputs["d"] <= last)]
    targets = explode_grid_samples(samples, "target")[["uid", "d", "t"]]
    if len(inputs) == 0:
        days = "" if input_days is None else f" in days {input_days[0]}-{input_days[1]}"
        raise ValueError(f"no input rows{days} to fit the slot-mode baseline")
    return slot_mode_from_records(inputs, targets, day0_weekday=day0_weekday)


def slot_mode_from_records(records: pd.DataFrame, targets: pd.DataFrame, *, day0_weekday: int = 0) -> pd.DataFrame:
    """The slot-mode cell of every ``targets`` row (columns uid, d, t) fitted on ``records`` (uid, d, t, x, y; real
    cells only), with the back-offs of :func:`slot_mode_predictions`: columns uid, d, t, x, y in ``targets`` order."""
    if len(records) == 0:
        raise ValueError("no records to fit the slot-mode baseline")
    inputs = records.assign(we=((records["d"].astype(np.int64) + day0_weekday) % 7 >= 5))
    targets = targets[["uid", "d", "t"]].assign(we=((targets["d"].astype(np.int64) + day0_weekday) % 7 >= 5))

    def mode(frame: pd.DataFrame, by: list[str]) -> pd.DataFrame:
        counts = frame.groupby(by + ["x", "y"], sort=False).size().rename("n").reset_index()
        counts = counts.sort_values(by + ["n", "x", "y"], ascending=[True] * len(by) + [False, True, True],
                                    kind="stable")
        return counts.drop_duplicates(by, keep="first").drop(columns="n")

    slot = mode(inputs, ["uid", "we", "t"])
    user = mode(inputs, ["uid"]).rename(columns={"x": "ux", "y": "uy"})
    glob = mode(inputs.assign(k=0), ["k"])
    out = targets.merge(slot, on=["uid", "we", "t"], how="left").merge(user, on="uid", how="left")
    out["x"] = out["x"].fillna(out["ux"]).fillna(glob["x"].iloc[0]).astype(np.int16)
    out["y"] = out["y"].fillna(out["uy"]).fillna(glob["y"].iloc[0]).astype(np.int16)
    return out[["uid", "d", "t", "x", "y"]].reset_index(drop=True)
