"""Grid trajectories (HuMob / YJMob100K) as check-ins: every check-in model and baseline on grid data.

:func:`grid_to_checkins` reads a prepared **grid** dataset (``mobility data prepare --format yjmob``,
:func:`~dataset_builders.preprocess.prepare_grid`) and writes a prepared **check-in** dataset with exactly the configs,
columns and metadata keys of :func:`~dataset_builders.preprocess.prepare_checkins` (``samples``, ``checkins``,
``locations``), so Markov-1, most-frequent, popularity, history-frequency, the nearest-location rule, MHSA, NextLocMoE
and the evaluation slices run on it unchanged, with cell centres as coordinates. ``mobility data grid-visits`` is the
command line.

Rules (all vectorised in NumPy / Arrow: time and memory are linear in the number of records, plus one sort of the
distinct cells):

- **Records.** The ``grid`` tables of the ``train``, ``validation`` and ``test`` splits are read (each sorted by ``uid,
  d, t`` if it is not already; a user in two splits is an error). Users of the ``hidden`` split (their targets are all
  ``999``) are left out and counted (reason ``hidden_split_user``); hidden cells (``999``) that reach the converter are
  dropped and counted (``hidden_cell``; ``prepare_grid`` already drops them from these splits) and never become
  visits, so the records on either side of one may merge.
- **Visits = stays.** Per user, consecutive records (sorted by ``d, t``) in the same cell merge into one visit at the
  first record's time, whatever the gap between them (unobserved slots, nights, the input/target boundary: a stay that
  begins on an input day and goes on into the target days is one visit of the input days). Merged records are counted
  (reason ``same_cell_as_previous_record``), so consecutive visits of a user are always in different cells.
- **Time.** ``timestamp = (d * slots_per_day + t) * slot_seconds`` (``slots_per_day`` from the grid metadata, 48
  half-hour slots by default: ``(d * 48 + t) * 1800``), seconds since the grid's day 0, ``tz_offset_min = 0``; the
  metadata carries ``time_reference: relative_day0`` and the grid's ``day0_weekday``, so
  :func:`~dataset_builders.preprocess.local_time_features` gives day ``d``, the slot's hour and the grid's weekday.
- **Locations.** One per cell that some visit is in: ``location_id = "x_y"`` (the grid's own cell numbers),
  latitude and longitude of the cell centre (:func:`cell_centres`), ``heldout = False``; no category, name or address
  (as ``prepare_checkins`` writes a source without them). x grows east and y grows south in cells of ``cell_size_m``
  (500 m for HuMob) from ``origin``, the north-west corner of the grid (the outer corner of cell ``(base, base)``,
  ``base`` = the grid's ``coordinate_base``). The default origin (35.0 N, 135.0 E) is **nominal**: grid data is
  anonymised, so the coordinates are right in scale and direction, not in place. The conversion is a local
  equirectangular one on the sphere of :data:`~dataset_builders.descriptions.EARTH_RADIUS_M` (the radius every distance
  of the library uses): latitude from the southward distance, longitude from the eastward distance over the cosine of
  the cell's own latitude; great-circle distances between cell centres match the grid distances to about 1e-5 at the
  scale of a 200 x 200 grid (and the WGS84 ellipsoid to about 0.3%).
- **Check-in splits** (the grid's split is by user, and kept): ``train`` = every visit of the train users plus the
  input-day visits of the validation and test users (their observed past: per-user baselines such as Markov-1 and
  most-frequent fit on the train check-ins, so the evaluation users' histories must be there); ``validation`` /
  ``test`` = the target-day visits (``d`` within the grid's ``predict_days``) of the validation / test users.
- **Samples.** ``train``: one per visit of a train user; ``validation`` / ``test``: one per target-day visit of those
  users. The history of a target is the user's earlier visits (strictly earlier timestamps) of the previous
  ``history_days`` days and of the target's own day, exactly the window of ``prepare_checkins`` (calendar days: ``d >=
  target d - history_days``); for evaluation users it spans input days and earlier target days (teacher forcing, as
  next-location evaluation does). Targets with fewer than ``max(1, min_history)`` history visits are skipped and
  counted (reason ``short_history``). Columns as ``prepare_checkins`` writes them: ``sample_id`` (consecutive over
  train, validation, test), ``user_id`` (the uid as a string), ``history_location_ids``, ``history_timestamps``,
  ``history_tz_offset_min``, ``target_location_id``, ``target_timestamp``, ``target_tz_offset_min``, ``target_seen``.
- **target_seen** is true when the target cell is visited somewhere in the ``train`` check-ins. Nothing is held out
  (this is not the inductive split), so a false value marks a cell the evaluation user goes to that no training visit
  reaches: the evaluation reports those samples as ``unseen``, as it does for the inductive split's held-out places.
- **Order.** Check-ins and samples are in grid order: users by their order in the grid's split tables (ascending uid),
  then time; locations by ``location_id`` (string order), as ``prepare_checkins`` sorts them.
- **Metadata.** The keys ``prepare_checkins`` writes (``num_users``, ``num_locations``, ``num_heldout_locations`` = 0,
  ``num_checkins``, ``day0_weekday``, ``extra_checkin_columns`` = [], ``preprocess``), plus ``source: "grid"``,
  ``source_path``, ``cell_size_m``, ``origin``, ``predict_days``, ``input_days`` and the grid's own metadata under
  ``grid``; the row account continues the grid dataset's. The dataset card describes these rules (not the check-in
  day split of ``prepare_checkins``), which is why the folder is written with
  :func:`~dataset_builders.publish.write_dataset` in the layout of :func:`~dataset_builders.publish.write_prepared`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .descriptions import EARTH_RADIUS_M
from .preprocess import PreparedCheckins
from .publish import PreparedDataset, load_prepared, write_dataset
from .schema import HIDDEN_CELL, RowAccount

__all__ = ["DEFAULT_ORIGIN", "cell_centres", "grid_to_checkins", "grid_visits"]

logger = logging.getLogger(__name__)

#: Nominal north-west corner of the grid (latitude, longitude): grid data is anonymised, so only scale and direction
#: of the coordinates are real.
DEFAULT_ORIGIN = (35.0, 135.0)
SPLITS = ("train", "validation", "test")
_MAX_ROWS = 1 << 16  # samples / check-ins per Arrow record batch
_MAX_ITEMS = 1 << 26  # history entries per record batch (int32 list offsets stay far from overflow)
_MAX_ABS_LATITUDE = 85.0  # cos(latitude) of the longitude conversion must stay well away from 0

_SAMPLE_SCHEMA = pa.schema(
    [
        ("sample_id", pa.int64()),
        ("user_id", pa.string()),
        ("history_location_ids", pa.list_(pa.string())),
        ("history_timestamps", pa.list_(pa.int64())),
        ("history_tz_offset_min", pa.list_(pa.int16())),
        ("target_location_id", pa.string()),
        ("target_timestamp", pa.int64()),
        ("target_tz_offset_min", pa.int16()),
        ("target_seen", pa.bool_()),
    ]
)
_CHECKIN_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("location_id", pa.string()),
        ("timestamp", pa.int64()),
        ("tz_offset_min", pa.int16()),
        ("latitude", pa.float64()),
        ("longitude", pa.float64()),
    ]
)


def _check_origin(origin) -> tuple[float, float]:
    try:
        lat, lon = (float(v) for v in origin)
    except (TypeError, ValueError):
        raise ValueError(f"origin must be two numbers (latitude, longitude), got {origin!r}") from None
    if not (math.isfinite(lat) and math.isfinite(lon)) or not -90 <= lat <= 90 or not -180 <= lon <= 180:
        raise ValueError(f"origin must be a latitude in [-90, 90] and a longitude in [-180, 180], got {origin!r}")
    return lat, lon


def _check_cell_size(cell_size_m) -> float:
    try:
        size = float(cell_size_m)
    except (TypeError, ValueError):
        raise ValueError(f"cell_size_m must be a positive number of metres, got {cell_size_m!r}") from None
    if not math.isfinite(size) or size <= 0:
        raise ValueError(f"cell_size_m must be a positive number of metres, got {cell_size_m!r}")
    return size


def cell_centres(
    x, y, *, cell_size_m: float = 500.0, origin: tuple[float, float] = DEFAULT_ORIGIN, coordinate_base: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Latitude and longitude (degrees) of the centres of grid cells ``(x, y)``.

    x grows east and y grows south in square cells of ``cell_size_m`` metres; ``origin`` (latitude, longitude) is the
    north-west corner of the grid, i.e. of cell ``(coordinate_base, coordinate_base)``. Local equirectangular
    conversion on the sphere of radius :data:`~dataset_builders.descriptions.EARTH_RADIUS_M`: the centre of cell
    ``(x, y)`` lies ``(x - base + 0.5) * cell_size_m`` metres east and ``(y - base + 0.5) * cell_size_m`` metres south
    of the origin; latitude follows from the southward distance, longitude from the eastward distance over the cosine
    of the cell's own latitude (so cells of one row are ``cell_size_m`` apart wherever the row is).

    Args:
        x, y (array-like of int): cell numbers (not the hidden cell ``999``).
        cell_size_m (`float`, *optional*, defaults to 500.0): cell side in metres (HuMob: 500).
        origin (`tuple`, *optional*, defaults to `(35.0, 135.0)`): the grid's north-west corner; nominal for anonymised
            grids.
        coordinate_base (`int`, *optional*, defaults to 1): number of the first cell (1 for HuMob, 0 for some files).

    Returns:
        `tuple[np.ndarray, np.ndarray]`: latitude and longitude in degrees (float64), shaped like ``x``.

    Raises:
        `ValueError`: for a bad origin or cell size, a hidden cell, or cells that fall beyond latitude +-85 or
            longitude +-180.
    """
    lat0, lon0 = _check_origin(origin)
    size = _check_cell_size(cell_size_m)
    x = np.asarray(x)
    y = np.asarray(y)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {x.shape} and {y.shape}")
    if ((x == HIDDEN_CELL) | (y == HIDDEN_CELL)).any():
        raise ValueError(f"the hidden cell {HIDDEN_CELL} has no coordinates")
    east = (x.astype(np.float64) - coordinate_base + 0.5) * size
    south = (y.astype(np.float64) - coordinate_base + 0.5) * size
    lat = lat0 - np.degrees(south / EARTH_RADIUS_M)
    if lat.size and (np.abs(lat) > _MAX_ABS_LATITUDE).any():
        worst = float(lat[np.argmax(np.abs(lat))])
        raise ValueError(
            f"origin {origin!r} with {size:g} m cells puts cells at latitude {worst:.3f}; "
            f"the grid must lie within latitude +-{_MAX_ABS_LATITUDE:g}"
        )
    lon = lon0 + np.degrees(east / (EARTH_RADIUS_M * np.cos(np.radians(lat))))
    if lon.size and ((lon < -180) | (lon > 180)).any():
        worst = float(lon[np.argmax(np.abs(lon))])
        raise ValueError(
            f"origin {origin!r} with {size:g} m cells puts cells at longitude {worst:.3f}; "
            "the grid must lie within longitude [-180, 180] (move the origin west)"
        )
    return lat, lon


def _check_int(name: str, value, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``concat(arange(s, s + n) for s, n in zip(starts, lengths))`` without a Python loop."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    firsts = np.cumsum(lengths) - lengths
    return np.arange(total, dtype=np.int64) + np.repeat(starts - firsts, lengths)


def _list(values: pa.Array, lengths: np.ndarray) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    offsets[1:] = np.cumsum(lengths)
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def _batches(lengths: np.ndarray) -> Iterator[tuple[int, int]]:
    """Row ranges of at most ``_MAX_ROWS`` rows and (one row at least) ``_MAX_ITEMS`` list entries."""
    n = len(lengths)
    cum = np.cumsum(lengths, dtype=np.int64)
    lo = 0
    while lo < n:
        base = int(cum[lo - 1]) if lo else 0
        hi = min(n, lo + _MAX_ROWS, int(np.searchsorted(cum, base + _MAX_ITEMS, side="right")))
        hi = max(hi, lo + 1)
        yield lo, hi
        lo = hi


def _table(batches: list[pa.RecordBatch], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_batches(batches, schema=schema) if batches else schema.empty_table()


def _read_split(data: PreparedDataset, split: str, slots_per_day: int) -> dict[str, np.ndarray]:
    """The records of one grid split as numpy columns, sorted by (uid, d, t)."""
    table = data.table("grid", split)
    missing = [c for c in ("uid", "d", "t", "x", "y") if c not in table.column_names]
    if missing:
        raise ValueError(
            f"{data.path}: the grid split {split!r} lacks column(s) {missing}; it has {table.column_names}"
        )
    cols = {
        "uid": table.column("uid").to_numpy().astype(np.int64, copy=False),
        "d": table.column("d").to_numpy().astype(np.int32),
        "t": table.column("t").to_numpy().astype(np.int32),
        "x": table.column("x").to_numpy().astype(np.int32),
        "y": table.column("y").to_numpy().astype(np.int32),
    }
    if len(cols["uid"]) and ((cols["t"] < 0) | (cols["t"] >= slots_per_day) | (cols["d"] < 0)).any():
        raise ValueError(f"{data.path}: the grid split {split!r} has days < 0 or slots outside 0..{slots_per_day - 1}")
    cols["slot"] = cols["d"].astype(np.int64) * slots_per_day + cols.pop("t")
    uid, slot = cols["uid"], cols["slot"]
    ordered = bool(np.all((uid[1:] > uid[:-1]) | ((uid[1:] == uid[:-1]) & (slot[1:] >= slot[:-1]))))
    if not ordered:
        logger.info("%s: sorting the %s grid rows by uid, d, t", data.path, split)
        order = np.lexsort((slot, uid))
        cols = {k: v[order] for k, v in cols.items()}
    return cols


def _user_starts(uid: np.ndarray) -> np.ndarray:
    change = np.empty(len(uid), dtype=bool)
    change[:1] = True
    np.not_equal(uid[1:], uid[:-1], out=change[1:])
    return change


def _cell_ids(x: np.ndarray, y: np.ndarray) -> pa.Array:
    """``"x_y"`` strings of cells."""
    return pc.binary_join_element_wise(pa.array(x).cast(pa.string()), pa.array(y).cast(pa.string()), "_")


def _cell_codes(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes of the distinct cells (x, y) of the visits, and the cells; codes follow the string order of "x_y"."""
    if len(x) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int32)
    x0, y0 = int(x.min()), int(y.min())
    width = int(y.max()) - y0 + 1
    key = (x - x0).astype(np.int64) * width + (y - y0)
    span = (int(x.max()) - x0 + 1) * width
    if span <= 4 * len(key) + (1 << 20):  # a dense table of cells: linear time
        present = np.bincount(key, minlength=span) > 0
        cells = np.flatnonzero(present)
        dense = np.cumsum(present) - 1
        codes = dense[key]
    else:
        cells, codes = np.unique(key, return_inverse=True)
    cx = (cells // width + x0).astype(np.int32)
    cy = (cells % width + y0).astype(np.int32)
    order = pc.sort_indices(_cell_ids(cx, cy)).to_numpy()
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return rank[codes], cx[order], cy[order]


def grid_visits(
    grid_dir: str | os.PathLike,
    *,
    cell_size_m: float = 500.0,
    origin: tuple[float, float] = DEFAULT_ORIGIN,
    history_days: int = 7,
    min_history: int = 1,
) -> PreparedCheckins:
    """Convert a prepared grid dataset into check-ins, locations and next-location samples, in memory.

    The rules are in the module docstring; :func:`grid_to_checkins` writes the result.

    Args:
        grid_dir (`str` or `os.PathLike`): a grid dataset folder from ``mobility data prepare --format yjmob``.
        cell_size_m (`float`, *optional*, defaults to 500.0): cell side in metres.
        origin (`tuple`, *optional*, defaults to `(35.0, 135.0)`): nominal north-west corner of the grid (lat, lon).
        history_days (`int`, *optional*, defaults to 7): history window in days (the target's own day included).
        min_history (`int`, *optional*, defaults to 1): targets with fewer history visits (at least 1) are skipped.

    Returns:
        `PreparedCheckins`: ``samples`` and ``checkins`` per split (train, validation, test), ``locations``, the row
        account (the grid dataset's steps, then the conversion's) and the metadata.

    Raises:
        `ValueError`: when the folder is not a grid dataset, an option is out of range, or no visit is left.
        `FileNotFoundError`: when the folder is not a prepared dataset.
    """
    origin = _check_origin(origin)
    cell_size_m = _check_cell_size(cell_size_m)
    history_days = _check_int("history_days", history_days)
    min_history = _check_int("min_history", min_history)
    need = max(1, min_history)
    data = load_prepared(grid_dir)
    if data.kind != "grid":
        raise ValueError(
            f"{data.path} is a {data.kind!r} dataset, not a grid dataset; grid-visits converts the output of "
            "`mobility data prepare --format yjmob`"
        )
    meta = data.metadata
    if "predict_days" not in meta:
        raise ValueError(f"{data.path}: the grid metadata has no predict_days; prepare the grid again")
    first_target = int(meta["predict_days"][0])
    slots_per_day = int(meta.get("slots_per_day") or 48)
    if slots_per_day < 1 or 86400 % slots_per_day:
        raise ValueError(f"{data.path}: slots_per_day {slots_per_day} does not divide a day into whole seconds")
    slot_seconds = 86400 // slots_per_day
    base = int(meta.get("coordinate_base", 1))
    day0_weekday = int(meta.get("day0_weekday", 0))
    account = RowAccount(list(data.account.steps))

    # records of the train/validation/test users, each split sorted by (uid, d, t); the hidden split is counted only
    available = data.splits("grid")
    missing = [s for s in SPLITS if s not in available]
    if missing:
        raise ValueError(f"{data.path}: the grid config has no split(s) {missing}; it has {available}")
    parts = [_read_split(data, s, slots_per_day) for s in SPLITS]
    hidden_records = hidden_users = 0
    if "hidden" in available:
        hidden = data.table("grid", "hidden")
        hidden_records = hidden.num_rows
        hidden_users = len(pc.unique(hidden.column("uid"))) if hidden_records else 0
    users_per_split = [p["uid"][_user_starts(p["uid"])] for p in parts]
    all_users = np.concatenate(users_per_split)
    if len(np.unique(all_users)) != len(all_users):
        raise ValueError(f"{data.path}: a user is in several grid splits; the grid split must be by user")
    cols = {k: np.concatenate([p[k] for p in parts]) for k in ("uid", "d", "slot", "x", "y")}
    rec_split = np.repeat(np.arange(len(SPLITS), dtype=np.int8), [len(p["uid"]) for p in parts])
    del parts
    n_records = len(cols["uid"])
    hidden_cell = (cols["x"] == HIDDEN_CELL) | (cols["y"] == HIDDEN_CELL)
    n_hidden_cells = int(hidden_cell.sum())
    if n_hidden_cells:
        keep = ~hidden_cell
        cols = {k: v[keep] for k, v in cols.items()}
        rec_split = rec_split[keep]
    account.add(
        "grid records of the train/validation/test users (hidden split left out)",
        n_records + hidden_records,
        len(cols["uid"]),
        {"hidden_split_user": hidden_records, "hidden_cell": n_hidden_cells},
        {"hidden_split_users": hidden_users, **{f"{s}_users": len(u) for s, u in zip(SPLITS, users_per_split)}},
    )

    # stays: a visit starts at a user's first record and wherever the cell changes
    uid, x, y = cols["uid"], cols["x"], cols["y"]
    new_user = _user_starts(uid)
    starts = new_user.copy()
    starts[1:] |= (x[1:] != x[:-1]) | (y[1:] != y[:-1])
    n_kept = len(uid)
    ucode_rec = np.cumsum(new_user, dtype=np.int64) - 1
    users = uid[new_user]
    user_split = rec_split[new_user]
    v_user = ucode_rec[starts]
    v_d = cols["d"][starts]
    v_slot = cols["slot"][starts]
    v_x, v_y = x[starts], y[starts]
    del cols, uid, x, y, ucode_rec, rec_split
    n_visits = len(v_user)
    account.add(
        "stays: consecutive records of a user in the same cell merge into one visit (at the first record's time)",
        n_kept,
        n_visits,
        {"same_cell_as_previous_record": n_kept - n_visits},
    )
    if n_visits == 0:
        raise ValueError(f"{data.path}: no visits left (no observed cell of a train, validation or test user)")
    v_ts = v_slot * slot_seconds
    v_usplit = user_split[v_user]
    target_day = v_d >= first_target
    v_split = np.where((v_usplit == 0) | ~target_day, 0, v_usplit).astype(np.int8)  # check-in split of each visit

    # locations: the cells of the visits, sorted by "x_y"
    v_loc, cell_x, cell_y = _cell_codes(v_x, v_y)
    del v_x, v_y
    lat, lon = cell_centres(cell_x, cell_y, cell_size_m=cell_size_m, origin=origin, coordinate_base=base)
    loc_ids = _cell_ids(cell_x, cell_y)
    user_ids = pa.array(users).cast(pa.string())
    seen = np.zeros(len(cell_x), dtype=bool)
    seen[v_loc[v_split == 0]] = True

    # history windows: the user's visits with d >= target d - history_days and a strictly earlier timestamp
    d_span = int(v_d.max()) + history_days + 2
    d_key = v_user * d_span + v_d.astype(np.int64)
    start = np.searchsorted(d_key, d_key - history_days, side="left")
    s_key = v_user * (int(v_slot.max()) + 2) + v_slot
    end = np.searchsorted(s_key, s_key, side="left")
    hist_len = end - start
    del d_key, s_key
    candidate = (v_usplit == 0) | target_day
    short = candidate & (hist_len < need)

    samples: dict[str, pa.Table] = {}
    next_id = 0
    for s, name in enumerate(SPLITS):
        idx = np.flatnonzero(candidate & (v_split == s) & ~short)
        lengths = hist_len[idx]
        batches = []
        for lo, hi in _batches(lengths):
            rows, lens = idx[lo:hi], lengths[lo:hi]
            flat = _ranges(start[rows], lens)
            batches.append(pa.record_batch(
                [
                    pa.array(np.arange(next_id + lo, next_id + hi, dtype=np.int64)),
                    user_ids.take(pa.array(v_user[rows])),
                    _list(loc_ids.take(pa.array(v_loc[flat])), lens),
                    _list(pa.array(v_ts[flat]), lens),
                    _list(pa.array(np.zeros(len(flat), dtype=np.int16)), lens),
                    loc_ids.take(pa.array(v_loc[rows])),
                    pa.array(v_ts[rows]),
                    pa.array(np.zeros(len(rows), dtype=np.int16)),
                    pa.array(seen[v_loc[rows]]),
                ],
                schema=_SAMPLE_SCHEMA,
            ))
        samples[name] = _table(batches, _SAMPLE_SCHEMA)
        next_id += len(idx)
    n_candidates = int(candidate.sum())
    account.add(
        f"build samples (history = the previous {history_days} days, at least {need} visit(s); evaluation users: "
        "target-day visits)",
        n_candidates,
        next_id,
        {"short_history": int(short.sum())},
        {
            "history_only_visits": int(n_visits - n_candidates),
            **{f"{name}_samples": samples[name].num_rows for name in SPLITS},
            **{f"{name}_short_history": int((short & (v_split == s)).sum()) for s, name in enumerate(SPLITS)},
        },
    )

    checkins: dict[str, pa.Table] = {}
    lat_arrow, lon_arrow = pa.array(lat), pa.array(lon)
    for s, name in enumerate(SPLITS):
        idx = np.flatnonzero(v_split == s)
        batches = []
        for lo, hi in _batches(np.zeros(len(idx), dtype=np.int64)):
            rows = idx[lo:hi]
            loc = pa.array(v_loc[rows])
            batches.append(pa.record_batch(
                [user_ids.take(pa.array(v_user[rows])), loc_ids.take(loc), pa.array(v_ts[rows]),
                 pa.array(np.zeros(len(rows), dtype=np.int16)), lat_arrow.take(loc), lon_arrow.take(loc)],
                schema=_CHECKIN_SCHEMA,
            ))
        checkins[name] = _table(batches, _CHECKIN_SCHEMA)

    locations = pa.table(
        {"location_id": loc_ids, "latitude": lat_arrow, "longitude": lon_arrow,
         "heldout": pa.array(np.zeros(len(cell_x), dtype=bool))}
    )
    grid_meta = {k: v for k, v in meta.items() if k not in ("kind", "row_account")}
    metadata: dict[str, Any] = {
        "format": meta.get("format"),
        "source_files": list(meta.get("source_files", [])),
        "source": "grid",
        "source_path": str(data.path),
        "time_reference": "relative_day0",
        "local_time": f"timestamp = (d * {slots_per_day} + t) * {slot_seconds} s since grid day 0, no time zone; "
        "weekday = (day + day0_weekday) % 7",
        "cell_size_m": cell_size_m,
        "origin": list(origin),
        "origin_note": "nominal north-west corner of the grid: grid data is anonymised",
        "coordinate_base": base,
        "grid_size": meta.get("grid_size"),
        "slots_per_day": slots_per_day,
        "predict_days": list(meta["predict_days"]),
        "input_days": list(meta.get("input_days", [])),
        "grid": grid_meta,
        "preprocess": {
            "converter": "grid_visits",
            "history_days": history_days,
            "min_history": min_history,
            "max_history": None,
            "inductive_fraction": 0.0,
            "cell_size_m": cell_size_m,
            "origin": list(origin),
        },
        "num_users": int(len(users)),
        "num_locations": int(len(cell_x)),
        "num_heldout_locations": 0,
        "num_checkins": int(n_visits),
        "day0_weekday": day0_weekday,
        "extra_checkin_columns": [],
        "grid_conversion": {
            "records": int(n_records),
            "merged_records": int(n_kept - n_visits),
            "visits": int(n_visits),
            "hidden_split_users": int(hidden_users),
            "hidden_split_records": int(hidden_records),
            "hidden_cells": n_hidden_cells,
            "short_history": int(short.sum()),
            "users": {s: int(len(u)) for s, u in zip(SPLITS, users_per_split)},
            "checkins": {name: checkins[name].num_rows for name in SPLITS},
            "samples": {name: samples[name].num_rows for name in SPLITS},
        },
    }
    return PreparedCheckins(samples=samples, checkins=checkins, locations=locations, account=account,
                            metadata=metadata)


def _card(prepared: PreparedCheckins, title: str) -> str:
    meta = prepared.metadata
    conv = meta["grid_conversion"]
    pp = meta["preprocess"]
    first, last = meta["predict_days"]
    lines = [
        f"# {title}",
        "",
        "Converted by hf-mobility (`mobility data grid-visits`) from the prepared grid dataset "
        f"`{meta['source_path']}` (format `{meta.get('format')}`): grid records became check-ins at cell centres, "
        "so every check-in model and baseline runs on it.",
        "",
        "## Visits, time and locations",
        "",
        f"- {conv['records']:,} records; per user, consecutive records in the same cell merge into one visit at the "
        f"first record's time ({conv['merged_records']:,} merged): {conv['visits']:,} visits.",
        f"- `timestamp` = (d x {meta['slots_per_day']} + t) x {86400 // meta['slots_per_day']} s since grid day 0 "
        f"(`time_reference` relative_day0, no time zone); weekday of day 0: {meta['day0_weekday']} (0 = Monday).",
        f"- `location_id` = `x_y`; coordinates are cell centres: x east, y south, {meta['cell_size_m']:g} m cells "
        f"from the north-west corner {tuple(meta['origin'])} (nominal: grid data is anonymised; distances are right, "
        "places are not).",
        "",
        "## Splits and samples",
        "",
        f"- The grid's user split is kept ({conv['users']['train']:,} / {conv['users']['validation']:,} / "
        f"{conv['users']['test']:,} users); the {conv['hidden_split_users']:,} users of the hidden split are left "
        "out.",
        "- `checkins` train: every visit of the train users plus the input-day visits of the validation and test "
        f"users; validation / test: the target-day visits (days {first}-{last}) of those users.",
        f"- A sample is (user, the visits of the previous {pp['history_days']} days and of the target's own day "
        f"before it, target visit): every visit of a train user, every target-day visit of a validation or test user "
        f"(histories include earlier target days: teacher forcing); targets with fewer than "
        f"{max(1, pp['min_history'])} history visits are skipped ({conv['short_history']:,}).",
        "- `target_seen` is false when no train check-in visits the target cell.",
        "",
        f"{meta['num_users']:,} users, {meta['num_locations']:,} locations, {meta['num_checkins']:,} check-ins.",
        "",
        "## Configs",
        "",
        "- `samples`: next-location samples (`load_dataset(path, 'samples')`).",
        "- `checkins`: the visits, split as above.",
        "- `locations`: one row per cell with a visit (`location_id`, cell-centre coordinates, `heldout` = false).",
        "",
        "| split | samples | check-ins |",
        "|---|---:|---:|",
        *[f"| {s} | {prepared.samples[s].num_rows:,} | {prepared.checkins[s].num_rows:,} |" for s in SPLITS],
        "",
        "## Row account",
        "",
        prepared.account.to_markdown(),
        "",
    ]
    return "\n".join(lines)


def grid_to_checkins(
    grid_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    cell_size_m: float = 500.0,
    origin: tuple[float, float] = DEFAULT_ORIGIN,
    history_days: int = 7,
    min_history: int = 1,
) -> Path:
    """Write a prepared grid dataset as a prepared check-in dataset (see the module docstring for the rules).

    Args:
        grid_dir (`str` or `os.PathLike`): a grid dataset folder from ``mobility data prepare --format yjmob``.
        out_dir (`str` or `os.PathLike`): the check-in dataset folder to write (replaced atomically when it is ours).
        cell_size_m (`float`, *optional*, defaults to 500.0): cell side in metres.
        origin (`tuple`, *optional*, defaults to `(35.0, 135.0)`): nominal north-west corner of the grid (lat, lon).
        history_days (`int`, *optional*, defaults to 7): history window in days (the target's own day included).
        min_history (`int`, *optional*, defaults to 1): targets with fewer history visits (at least 1) are skipped.

    Returns:
        `Path`: the written folder; ``load_prepared(path)`` gives its row account and metadata (``grid_conversion``
        holds the counts), ``datasets.load_dataset(path, "samples")`` its samples.
    """
    if Path(out_dir).resolve() == Path(grid_dir).resolve():
        raise ValueError(f"--out {out_dir} is the grid dataset itself; write the check-ins to another folder")
    prepared = grid_visits(grid_dir, cell_size_m=cell_size_m, origin=origin, history_days=history_days,
                           min_history=min_history)
    title = f"hf-mobility check-in dataset from the grid {Path(grid_dir).resolve().name}"
    configs = {"samples": prepared.samples, "checkins": prepared.checkins, "locations": {"train": prepared.locations}}
    metadata = {"kind": prepared.kind, "row_account": prepared.account.to_dict(), **prepared.metadata}
    return write_dataset(out_dir, configs, card_body=_card(prepared, title), metadata=metadata, pretty_name=title)
