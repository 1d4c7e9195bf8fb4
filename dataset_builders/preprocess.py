"""Filtering, splits and next-location samples (DESIGN §3.4), vectorised on NumPy/Arrow; every step is counted.

Defaults follow the mie-lab protocol used by CaLLiPer and LLM-Mob:

- iterative filters: users with at least 10 check-ins and locations with at least 10 visits, repeated until stable;
- per-user split by tracked day: ``day < 0.6 * max_day`` -> train, ``< 0.8 * max_day`` -> validation, else test;
- a sample = (user, the visits of the previous 7 days before the target, the target visit); empty histories are dropped
  and counted;
- optional inductive hold-out of a fraction of the training locations (seedable): train/validation lose every sample
  that touches one, the test set keeps only samples that do;
- an optional user table (``loaded.users``, e.g. the synthetic city's archetypes) is cut to the users that survive the
  filters and carried along as ``users``; it is descriptive only (for reports) and no model or baseline reads it.

For grids (HuMob), each user's days are split into input days and target days (``predict_days``), and users into
train/validation/test by seeded fractions; users whose target cells are all hidden (``999``) form the ``hidden`` split.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from .readers.base import CHECKIN_COLUMNS, LoadedCheckins, LoadedGrid
from .readers.yjmob import sorted_by_user_day_slot
from .schema import HIDDEN_CELL, RowAccount

__all__ = [
    "CheckinPreprocessConfig",
    "GridPreprocessConfig",
    "PreparedCheckins",
    "PreparedGrid",
    "local_time_features",
    "prepare_checkins",
    "prepare_grid",
]

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
# check-in columns that are not carried into the prepared ``checkins`` tables (location attributes, reader internals)
_NOT_CARRIED = ("category", "name", "address", "_line")


def local_time_features(timestamp: np.ndarray, tz_offset_min: np.ndarray | int = 0, day0_weekday: int = 3):
    """Local day index, hour, minute of day and weekday (0 = Monday) from canonical timestamps.

    ``day0_weekday`` is the weekday of day 0: 3 for Unix-epoch timestamps (1970-01-01 was a Thursday), the recorded
    value for relative-day sources.
    """
    local = np.asarray(timestamp, dtype=np.int64) + np.asarray(tz_offset_min, dtype=np.int64) * 60
    day = np.floor_divide(local, 86400)
    sec = local - day * 86400
    minute = sec // 60
    return day, minute // 60, minute, (day + day0_weekday) % 7


@dataclass
class CheckinPreprocessConfig:
    """Preprocessing of check-ins into next-location samples.

    Args:
        min_user_visits (`int`, *optional*, defaults to 10): users with fewer check-ins are dropped (iterated).
        min_location_visits (`int`, *optional*, defaults to 10): locations with fewer visits are dropped (iterated).
        max_filter_iterations (`int`, *optional*, defaults to 100): bound on the filter loop.
        split_fractions (`tuple`, *optional*, defaults to `(0.6, 0.8)`): tracked-day cut points of train and
            validation, per user.
        history_days (`int`, *optional*, defaults to 7): the history of a target = the user's visits in the previous
            ``history_days`` days (same day before the target included).
        min_history (`int`, *optional*, defaults to 1): samples with a shorter history are dropped and counted.
        max_history (`int`, *optional*): keep only the most recent visits of a history (QT-Mob uses 20).
        inductive_fraction (`float`, *optional*, defaults to 0.0): fraction of training locations held out.
        seed (`int`, *optional*, defaults to 0): seed of the inductive hold-out.
        drop_duplicates (`bool`, *optional*, defaults to `True`): drop exact repeats of (user, location, timestamp).
    """

    min_user_visits: int = 10
    min_location_visits: int = 10
    max_filter_iterations: int = 100
    split_fractions: tuple[float, float] = (0.6, 0.8)
    history_days: int = 7
    min_history: int = 1
    max_history: int | None = None
    inductive_fraction: float = 0.0
    seed: int = 0
    drop_duplicates: bool = True

    def __post_init__(self):
        a, b = self.split_fractions
        if not 0 < a <= b <= 1:
            raise ValueError(f"split_fractions must satisfy 0 < train <= validation <= 1, got {self.split_fractions}")
        if not 0 <= self.inductive_fraction < 1:
            raise ValueError(f"inductive_fraction must be in [0, 1), got {self.inductive_fraction}")
        for name in ("min_user_visits", "min_location_visits", "history_days", "min_history"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_history is not None and self.max_history < max(1, self.min_history):
            raise ValueError(f"max_history must be >= max(1, min_history), got {self.max_history}")


@dataclass
class PreparedCheckins:
    """The output of :func:`prepare_checkins`: Arrow tables per split plus the location table and the account.

    ``users`` is the optional user table (``user_id`` plus the source's columns, e.g. ``archetype``), one row per user
    of the prepared check-ins that has one, sorted by ``user_id``; ``None`` when the source has no user table.
    Published as the ``users`` config (split ``train``); no model or baseline reads it.
    """

    samples: dict[str, pa.Table]
    checkins: dict[str, pa.Table]
    locations: pa.Table
    account: RowAccount
    metadata: dict[str, Any] = field(default_factory=dict)
    users: pa.Table | None = None

    kind = "checkins"


def _filter_iteratively(df: pd.DataFrame, cfg: CheckinPreprocessConfig, account: RowAccount) -> pd.DataFrame:
    rows_in = len(df)
    dropped = {"user_below_min_visits": 0, "location_below_min_visits": 0}
    iterations = 0
    for iterations in range(1, cfg.max_filter_iterations + 1):  # noqa: B007 (used after the loop)
        loc_counts = df["location_id"].map(df["location_id"].value_counts())
        bad_loc = (loc_counts < cfg.min_location_visits).to_numpy()
        dropped["location_below_min_visits"] += int(bad_loc.sum())
        df = df.loc[~bad_loc]
        user_counts = df["user_id"].map(df["user_id"].value_counts())
        bad_user = (user_counts < cfg.min_user_visits).to_numpy()
        dropped["user_below_min_visits"] += int(bad_user.sum())
        df = df.loc[~bad_user]
        if not bad_loc.any() and not bad_user.any():
            break
    else:
        logger.warning("filters did not converge in %d iterations", cfg.max_filter_iterations)
    account.add(
        f"filter users >= {cfg.min_user_visits} and locations >= {cfg.min_location_visits} visits",
        rows_in,
        len(df),
        dropped,
        {"iterations": iterations},
    )
    return df


def _concat_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Indices of ``[starts[i], starts[i] + lengths[i])`` for all i, concatenated (no Python loop)."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.cumsum(lengths) - lengths
    return np.arange(total, dtype=np.int64) - np.repeat(offsets, lengths) + np.repeat(starts, lengths)


def _list_array(values: pa.Array, lengths: np.ndarray) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return pa.LargeListArray.from_arrays(pa.array(offsets), values).cast(pa.list_(values.type))


def _arrow(df: pd.DataFrame) -> pa.Table:
    """pandas -> Arrow with plain ``string`` columns (pandas' pyarrow strings arrive as ``large_string``)."""
    table = pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False)
    fields = [pa.field(f.name, pa.string()) if pa.types.is_large_string(f.type) else f for f in table.schema]
    return table.cast(pa.schema(fields))


def prepare_checkins(loaded: LoadedCheckins, config: CheckinPreprocessConfig | None = None) -> PreparedCheckins:
    """Filter, split and window canonical check-ins into next-location samples (see the module docstring).

    Sample rows: ``sample_id``, ``user_id``, ``history_location_ids``, ``history_timestamps``,
    ``history_tz_offset_min``, ``target_location_id``, ``target_timestamp``, ``target_tz_offset_min``,
    ``target_seen`` (false when the target was held out by the inductive split).

    The prepared ``checkins`` tables hold the canonical columns, then every other column of ``loaded.checkins`` (the
    extra columns a CSV source keeps, e.g. ``weather``; recorded in the metadata's ``extra_checkin_columns``) as it is.

    When ``loaded.users`` is set, its rows of users that the filters removed are dropped and counted (step ``users
    table``, reason ``user_filtered_out``; users of the prepared check-ins without a row are counted in its notes),
    and the rest become :attr:`PreparedCheckins.users`.
    """
    cfg = config or CheckinPreprocessConfig()
    account = RowAccount(list(loaded.account.steps))
    day0_weekday = int(loaded.metadata.get("day0_weekday", 3))
    df = loaded.checkins
    if cfg.drop_duplicates:
        dup = df.duplicated(["user_id", "location_id", "timestamp"], keep="first").to_numpy()
        account.add("drop exact duplicate check-ins", len(df), int((~dup).sum()), {"duplicate_checkin": int(dup.sum())})
        df = df.loc[~dup]
    df = _filter_iteratively(df, cfg, account)
    if len(df) == 0:
        raise ValueError(
            "no check-ins left after the filters (users >= "
            f"{cfg.min_user_visits}, locations >= {cfg.min_location_visits} visits); lower --min-user-visits / "
            "--min-location-visits"
        )
    df = df.sort_values(["user_id", "timestamp"], kind="stable", ignore_index=True)

    # per-user tracked days and the day split
    user_codes, user_ids = pd.factorize(df["user_id"], sort=False)
    ts = df["timestamp"].to_numpy(dtype=np.int64)
    tz = df["tz_offset_min"].to_numpy(dtype=np.int64)
    local_day, _, _, _ = local_time_features(ts, tz, day0_weekday)
    first_day = pd.Series(local_day).groupby(user_codes).transform("min").to_numpy()
    user_day = local_day - first_day
    max_day = pd.Series(user_day).groupby(user_codes).transform("max").to_numpy()
    a, b = cfg.split_fractions
    split = np.where(user_day < a * max_day, 0, np.where(user_day < b * max_day, 1, 2)).astype(np.int8)

    # locations that survive, sorted by id: codes index the location table
    loc_codes, loc_ids = pd.factorize(df["location_id"], sort=True)
    locations = loaded.locations.set_index("location_id").reindex(loc_ids).reset_index()
    locations = locations.rename(columns={"index": "location_id"})

    heldout = np.zeros(len(loc_ids), dtype=bool)
    if cfg.inductive_fraction > 0:
        train_locs = np.unique(loc_codes[split == 0])
        k = int(round(cfg.inductive_fraction * len(train_locs)))
        if k == 0:
            raise ValueError(
                f"inductive_fraction={cfg.inductive_fraction} holds out no location of {len(train_locs)} training "
                "locations; raise it"
            )
        rng = np.random.default_rng(cfg.seed)
        heldout[rng.choice(train_locs, size=k, replace=False)] = True
    locations["heldout"] = heldout

    # history windows: previous rows of the same user with user_day >= day - history_days
    n = len(df)
    span = int(user_day.max()) + cfg.history_days + 2
    key = user_codes.astype(np.int64) * span + user_day
    start = np.searchsorted(key, key - cfg.history_days, side="left")
    end = np.arange(n, dtype=np.int64)
    if cfg.max_history is not None:
        start = np.maximum(start, end - cfg.max_history)
    hist_len = end - start
    has_history = hist_len >= max(1, cfg.min_history)

    # inductive: does a sample touch a held-out location (history or target)?
    touches = np.zeros(n, dtype=bool)
    if heldout.any():
        is_held = heldout[loc_codes].astype(np.int64)
        csum = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(is_held, out=csum[1:])
        touches = (csum[end] - csum[start] > 0) | heldout[loc_codes]

    rows_in = n
    samples: dict[str, pa.Table] = {}
    loc_id_arrow = pa.array(np.asarray(loc_ids, dtype=object), type=pa.string())
    user_arrow = pa.array(np.asarray(user_ids, dtype=object), type=pa.string())
    sample_dropped = {"empty_history": int((~has_history).sum())}
    kept_total = 0
    next_id = 0
    for s, name in enumerate(SPLITS):
        sel = (split == s) & has_history
        if heldout.any():
            if name == "test":
                miss = sel & ~touches
                sample_dropped["inductive_test_without_heldout"] = int(miss.sum())
            else:
                miss = sel & touches
                sample_dropped[f"inductive_heldout_in_{name}"] = int(miss.sum())
            sel &= ~miss
        idx = np.flatnonzero(sel)
        lens = hist_len[idx]
        flat = _concat_ranges(start[idx], lens)
        table = pa.table(
            {
                "sample_id": pa.array(np.arange(next_id, next_id + len(idx), dtype=np.int64)),
                "user_id": user_arrow.take(pa.array(user_codes[idx])),
                "history_location_ids": _list_array(loc_id_arrow.take(pa.array(loc_codes[flat])), lens),
                "history_timestamps": _list_array(pa.array(ts[flat]), lens),
                "history_tz_offset_min": _list_array(pa.array(tz[flat].astype(np.int16)), lens),
                "target_location_id": loc_id_arrow.take(pa.array(loc_codes[idx])),
                "target_timestamp": pa.array(ts[idx]),
                "target_tz_offset_min": pa.array(tz[idx].astype(np.int16)),
                "target_seen": pa.array(~heldout[loc_codes[idx]]),
            }
        )
        next_id += len(idx)
        kept_total += len(idx)
        samples[name] = table
    sample_dropped = {k: v for k, v in sample_dropped.items() if v}
    account.add(
        f"build samples (history = previous {cfg.history_days} days"
        + (f", at most {cfg.max_history}" if cfg.max_history else "")
        + ")",
        rows_in,
        kept_total,
        sample_dropped,
        {f"{name}_samples": samples[name].num_rows for name in SPLITS},
    )

    # check-in tables per split (canonical columns, then the source's extra ones, e.g. a CSV's weather); in the
    # inductive setting, held-out locations vanish from train and validation
    extra_columns = [c for c in df.columns if c not in CHECKIN_COLUMNS and c not in _NOT_CARRIED]
    checkin_tables: dict[str, pa.Table] = {}
    held_row = heldout[loc_codes]
    removed = 0
    for s, name in enumerate(SPLITS):
        sel = split == s
        if heldout.any() and name != "test":
            removed += int((sel & held_row).sum())
            sel &= ~held_row
        sub = df.loc[sel, [*CHECKIN_COLUMNS, *extra_columns]]
        checkin_tables[name] = _arrow(sub)
    if heldout.any():
        account.add("inductive: remove held-out check-ins from train/validation", n, n - removed,
                    {"inductive_heldout_checkin": removed})

    users = None
    if loaded.users is not None:
        table = loaded.users
        if "user_id" not in table.columns:
            raise ValueError(f"the user table has no user_id column; it has {list(table.columns)}")
        repeated = table["user_id"][table["user_id"].duplicated()]
        if len(repeated):
            raise ValueError(f"the user table repeats user ids, e.g. {repeated.head(3).tolist()}; expected one row each")
        keep = table["user_id"].astype("string").isin(pd.Index(user_ids)).to_numpy()
        kept_users = table.loc[keep].sort_values("user_id", kind="stable")
        account.add(
            "users table: users of the prepared check-ins",
            len(table),
            int(keep.sum()),
            {"user_filtered_out": int((~keep).sum())},
            {"prepared_users_without_row": int(len(user_ids) - keep.sum())},
        )
        users = _arrow(kept_users)

    metadata = dict(loaded.metadata)
    metadata.update(
        preprocess=asdict(cfg),
        num_users=len(user_ids),
        num_locations=len(loc_ids),
        num_heldout_locations=int(heldout.sum()),
        num_checkins=n,
        day0_weekday=day0_weekday,
        extra_checkin_columns=[str(c) for c in extra_columns],
    )
    return PreparedCheckins(
        samples=samples,
        checkins=checkin_tables,
        locations=_arrow(locations),
        account=account,
        metadata=metadata,
        users=users,
    )


@dataclass
class GridPreprocessConfig:
    """Preprocessing of grid trajectories into per-user input/target samples.

    Args:
        predict_days (`tuple`, *optional*): first and last target day (inclusive); by default the last 15 days of the
            span (HuMob: days 60-74 of 0-74).
        user_fractions (`tuple`, *optional*, defaults to `(0.8, 0.1, 0.1)`): train/validation/test shares of users.
        seed (`int`, *optional*, defaults to 0): seed of the user split.
        day0_weekday (`int`, *optional*, defaults to 0): weekday of day 0 (0 = Monday) for weekday/weekend features.
    """

    predict_days: tuple[int, int] | None = None
    user_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    day0_weekday: int = 0

    def __post_init__(self):
        if len(self.user_fractions) != 3 or any(f < 0 for f in self.user_fractions) or not np.isclose(
            sum(self.user_fractions), 1.0
        ):
            raise ValueError(f"user_fractions must be three non-negative shares summing to 1, got {self.user_fractions}")
        if self.predict_days is not None and (self.predict_days[0] > self.predict_days[1] or self.predict_days[0] < 1):
            raise ValueError(f"predict_days must be FIRST-LAST with 1 <= FIRST <= LAST, got {self.predict_days}")
        if not 0 <= self.day0_weekday <= 6:
            raise ValueError(f"day0_weekday must be in 0..6, got {self.day0_weekday}")


@dataclass
class PreparedGrid:
    samples: dict[str, pa.Table]
    grid: dict[str, pa.Table]
    account: RowAccount
    metadata: dict[str, Any] = field(default_factory=dict)

    kind = "grid"


def prepare_grid(loaded: LoadedGrid, config: GridPreprocessConfig | None = None) -> PreparedGrid:
    """Split each user's days into input days (before ``predict_days``) and target days, and users into splits.

    Sample rows (one per user): ``uid``, ``input_d``, ``input_t``, ``input_x``, ``input_y``, ``target_d``,
    ``target_t``, ``target_x``, ``target_y`` (lists, sorted by d then t). Users without input rows or without target
    rows are dropped and counted; users whose target cells are all hidden go to the ``hidden`` split (their target
    (d, t) are what a model must fill in); hidden target rows of other users are dropped and counted.
    """
    cfg = config or GridPreprocessConfig()
    account = RowAccount(list(loaded.account.steps))
    grid = sorted_by_user_day_slot(loaded.grid)
    d_min, d_max = int(grid["d"].min()), int(grid["d"].max())
    first, last = cfg.predict_days if cfg.predict_days is not None else (max(d_min + 1, d_max - 14), d_max)
    if first <= d_min:
        raise ValueError(f"predict_days {first}-{last} leave no input days (data starts at day {d_min})")
    is_target = (grid["d"] >= first).to_numpy() & (grid["d"] <= last).to_numpy()
    beyond = (grid["d"] > last).to_numpy()
    hidden = (grid["x"] == HIDDEN_CELL).to_numpy()
    uid = grid["uid"].to_numpy()

    # sorted by uid: a user's code is the number of uid changes before its rows (no sort, no hash table)
    change = np.empty(len(uid), dtype=bool)
    change[:1] = True
    np.not_equal(uid[1:], uid[:-1], out=change[1:])
    users = uid[change]
    ucodes = np.cumsum(change, dtype=np.int64) - 1
    n_users = len(users)
    n_input = np.bincount(ucodes, weights=(~is_target & ~beyond & ~hidden), minlength=n_users)
    n_target = np.bincount(ucodes, weights=is_target, minlength=n_users)
    n_target_real = np.bincount(ucodes, weights=is_target & ~hidden, minlength=n_users)
    no_input = n_input == 0
    no_target = n_target == 0
    all_hidden = (n_target > 0) & (n_target_real == 0)

    rows_in = len(grid)
    user_bad = no_input | no_target
    # one reason per dropped row, first matching wins
    reasons = {
        "day_after_predict_days": beyond,
        "user_without_input_days": no_input[ucodes],
        "user_without_target_days": no_target[ucodes],
        "hidden_input_cell": ~is_target & hidden,
        "hidden_target_cell": is_target & hidden & ~all_hidden[ucodes],
    }
    taken = np.zeros(rows_in, dtype=bool)
    dropped = {}
    for reason, mask in reasons.items():
        mask = mask & ~taken
        dropped[reason] = int(mask.sum())
        taken |= mask
    keep_row = ~taken
    kept = int(keep_row.sum())

    good_users = np.flatnonzero(~user_bad)
    rng = np.random.default_rng(cfg.seed)
    regular = good_users[~all_hidden[good_users]]
    perm = rng.permutation(regular)
    n_tr = int(round(cfg.user_fractions[0] * len(perm)))
    n_va = int(round(cfg.user_fractions[1] * len(perm)))
    user_split = np.full(n_users, -1, dtype=np.int8)
    user_split[perm[:n_tr]] = 0
    user_split[perm[n_tr : n_tr + n_va]] = 1
    user_split[perm[n_tr + n_va :]] = 2
    user_split[good_users[all_hidden[good_users]]] = 3

    kept_grid = grid.loc[keep_row].reset_index(drop=True)
    kcodes = ucodes[keep_row]
    ktarget = is_target[keep_row]
    samples: dict[str, pa.Table] = {}
    grids: dict[str, pa.Table] = {}
    cols = {c: kept_grid[c].to_numpy() for c in ("d", "t", "x", "y")}
    for s, name in enumerate((*SPLITS, "hidden")):
        members = np.flatnonzero(user_split == s)
        row_sel = user_split[kcodes] == s
        grids[name] = _arrow(kept_grid.loc[row_sel])
        parts = {"uid": pa.array(users[members].astype(np.int64))}
        for prefix, mask in (("input", row_sel & ~ktarget), ("target", row_sel & ktarget)):
            lens = np.bincount(kcodes[mask], minlength=n_users)[members]
            for c, arr in cols.items():
                parts[f"{prefix}_{c}"] = _list_array(pa.array(arr[mask]), lens)
        samples[name] = pa.table(parts)
    account.add(
        f"split days: input < {first}, target {first}-{last}; users {cfg.user_fractions}",
        rows_in,
        kept,
        dropped,
        {f"{name}_users": samples[name].num_rows for name in samples},
    )
    metadata = dict(loaded.metadata)
    metadata.update(
        preprocess=asdict(cfg),
        predict_days=[first, last],
        input_days=[d_min, first - 1],
        day0_weekday=cfg.day0_weekday,
        num_users=int(len(good_users)),
    )
    return PreparedGrid(samples=samples, grid=grids, account=account, metadata=metadata)
