"""Canonical tables of hf-mobility, their validation, and the row account every load and preprocessing step keeps.

Three tables (DESIGN §3.1), plus an optional fourth:

- **checkins**: ``user_id: string``, ``location_id: string``, ``timestamp: int64`` (seconds; UTC epoch, or seconds since
  the dataset's day 0 when the source only has relative days), ``tz_offset_min: int16``, ``latitude: float64``,
  ``longitude: float64``.
- **locations**: ``location_id: string`` (unique), ``latitude``, ``longitude``, ``category``, ``name``, ``address``
  (all optional but the coordinates), free extra columns kept.
- **grid** (HuMob / YJMob100K): ``uid: int64``, ``d: int16``, ``t: int8`` (0..47 half-hour slot), ``x, y: int16``
  (``999`` marks a hidden cell).
- **users** (optional): ``user_id: string`` (unique, one of the check-ins' user ids) plus free columns, e.g. the
  synthetic city's ``archetype``. Descriptive only: reports group results by it; no model or baseline reads it.

Bad rows are either dropped with a counted reason or stop the load with a :class:`DataValidationError` that names file,
line, column, value and what was expected; the caller picks with ``on_error="drop"|"raise"``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

__all__ = [
    "CHECKIN_COLUMNS",
    "GRID_COLUMNS",
    "HIDDEN_CELL",
    "LOCATION_COLUMNS",
    "USER_COLUMNS",
    "DataValidationError",
    "OnError",
    "RowAccount",
    "check_on_error",
    "validate_checkins",
    "validate_grid",
    "validate_locations",
    "validate_users",
]

logger = logging.getLogger(__name__)

OnError = Literal["drop", "raise"]

CHECKIN_COLUMNS = {
    "user_id": "string",
    "location_id": "string",
    "timestamp": "int64",
    "tz_offset_min": "int16",
    "latitude": "float64",
    "longitude": "float64",
}
LOCATION_COLUMNS = {
    "location_id": "string",
    "latitude": "float64",
    "longitude": "float64",
    "category": "string",
    "name": "string",
    "address": "string",
}
USER_COLUMNS = {"user_id": "string"}
GRID_COLUMNS = {"uid": "int64", "d": "int16", "t": "int8", "x": "int16", "y": "int16"}
HIDDEN_CELL = 999


class DataValidationError(ValueError):
    """A row of an input file does not satisfy the canonical schema.

    Attributes name where and what: ``file``, ``line`` (1-based line in the file, ``None`` when unknown), ``column``,
    ``value`` and ``expected``.
    """

    def __init__(
        self,
        message: str | None = None,
        *,
        file: str | None = None,
        line: int | None = None,
        column: str | None = None,
        value: Any = None,
        expected: str | None = None,
    ):
        self.file, self.line, self.column, self.value, self.expected = file, line, column, value, expected
        if message is None:
            where = str(file) if file is not None else "<data>"
            if line is not None:
                where += f", line {line}"
            if column is not None:
                where += f", column '{column}'"
            message = f"{where}: got {value!r}"
            if expected:
                message += f"; expected {expected}"
        super().__init__(message)


def check_on_error(on_error: str) -> None:
    if on_error not in ("drop", "raise"):
        raise ValueError(f"on_error must be 'drop' or 'raise', got {on_error!r}")


@dataclass
class _Step:
    name: str
    rows_in: int
    rows_kept: int
    dropped: dict[str, int] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)


class RowAccount:
    """What happened to the rows: per step, rows in, rows kept and rows dropped per reason.

    Every reader and preprocessing step appends a step; the account is returned to the caller, logged, and written into
    the dataset card, so nothing disappears silently. ``notes`` carry counted events that did not drop rows (for
    example coordinates merged for a location id that appeared with several coordinates).

    Example:

    ```python
    >>> account = RowAccount()
    >>> account.add("read checkins.txt", rows_in=10, rows_kept=8, dropped={"unparsable_timestamp": 2})
    >>> account.total_dropped()
    {'unparsable_timestamp': 2}
    ```
    """

    def __init__(self, steps: list[_Step] | None = None):
        self.steps: list[_Step] = list(steps or [])

    def add(
        self,
        name: str,
        rows_in: int,
        rows_kept: int,
        dropped: dict[str, int] | None = None,
        notes: dict[str, Any] | None = None,
    ) -> _Step:
        dropped = {k: int(v) for k, v in (dropped or {}).items() if int(v) > 0}
        if int(rows_in) - int(rows_kept) != sum(dropped.values()):
            raise ValueError(
                f"row account of step {name!r} does not add up: {rows_in} in, {rows_kept} kept, "
                f"{sum(dropped.values())} dropped ({dropped})"
            )
        step = _Step(name, int(rows_in), int(rows_kept), dropped, dict(notes or {}))
        self.steps.append(step)
        msg = f"{name}: {rows_in:,} rows in, {rows_kept:,} kept"
        if dropped:
            msg += ", dropped " + ", ".join(f"{k}={v:,}" for k, v in dropped.items())
        if step.notes:
            msg += ", " + ", ".join(f"{k}={v}" for k, v in step.notes.items())
        logger.info(msg)
        return step

    def extend(self, other: RowAccount) -> RowAccount:
        self.steps.extend(other.steps)
        return self

    def total_dropped(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for step in self.steps:
            for k, v in step.dropped.items():
                out[k] = out.get(k, 0) + v
        return out

    def step(self, name: str) -> _Step:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(f"no step named {name!r}; steps: {[s.name for s in self.steps]}")

    def to_dict(self) -> list[dict[str, Any]]:
        return [
            {"step": s.name, "rows_in": s.rows_in, "rows_kept": s.rows_kept, "dropped": s.dropped, "notes": s.notes}
            for s in self.steps
        ]

    @classmethod
    def from_dict(cls, steps: list[dict[str, Any]]) -> RowAccount:
        return cls(
            [_Step(s["step"], s["rows_in"], s["rows_kept"], dict(s.get("dropped", {})), dict(s.get("notes", {})))
             for s in steps]
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def to_markdown(self) -> str:
        lines = ["| step | rows in | rows kept | dropped (reason: rows) | notes |", "|---|---:|---:|---|---|"]
        for s in self.steps:
            dropped = ", ".join(f"{k}: {v:,}" for k, v in s.dropped.items()) or "-"
            notes = ", ".join(f"{k}: {v}" for k, v in s.notes.items()) or "-"
            lines.append(f"| {s.name} | {s.rows_in:,} | {s.rows_kept:,} | {dropped} | {notes} |")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"RowAccount({self.to_dict()!r})"


def _first_bad(mask: np.ndarray, lines: np.ndarray | None) -> tuple[int, int | None]:
    pos = int(np.flatnonzero(mask)[0])
    return pos, (int(lines[pos]) if lines is not None else None)


def _apply_rules(
    df: pd.DataFrame,
    rules: list[tuple[str, str, np.ndarray, str]],
    *,
    on_error: OnError,
    file: str | None,
    lines: np.ndarray | None,
    source: pd.DataFrame | None = None,
    source_columns: dict[str, str] | None = None,
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Apply (reason, column, bad_mask, expected) rules in order; a row is counted under the first rule it breaks.

    Errors name the column and value as they are in the file when ``source`` (the raw rows, same index) and
    ``source_columns`` (canonical -> file column) are given."""
    check_on_error(on_error)
    dropped: dict[str, int] = {}
    if on_error == "raise":
        # report the first bad row of the file (not the first row of the first rule broken); ties go to rule order
        first = None
        for _reason, column, bad, expected in rules:
            bad = np.asarray(bad, dtype=bool)
            if bad.any() and (first is None or int(np.flatnonzero(bad)[0]) < first[0]):
                first = (int(np.flatnonzero(bad)[0]), column, bad, expected)
        if first is not None:
            _, column, bad, expected = first
            pos, line = _first_bad(bad, lines)
            name = (source_columns or {}).get(column, column)
            if source is not None and name in source.columns:
                value = source.loc[df.index[pos], name]
            else:
                name, value = column, df[column].iloc[pos]
            raise DataValidationError(file=file, line=line, column=name, value=value, expected=expected)
        return df, dropped
    bad_any = np.zeros(len(df), dtype=bool)
    for reason, _column, bad, _expected in rules:
        bad = np.asarray(bad, dtype=bool) & ~bad_any
        n = int(bad.sum())
        if n == 0:
            continue
        dropped[reason] = dropped.get(reason, 0) + n
        bad_any |= bad
    if bad_any.any():
        df = df.loc[~bad_any]
    return df, dropped


def validate_checkins(
    df: pd.DataFrame,
    *,
    on_error: OnError = "raise",
    file: str | None = None,
    lines: np.ndarray | None = None,
    source: pd.DataFrame | None = None,
    source_columns: dict[str, str] | None = None,
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Check canonical check-in columns; return the kept rows and the drop counts per reason.

    ``lines`` (optional) gives the file line of every row, so errors can name it; ``source``/``source_columns`` let
    errors show the file's own column name and raw value.
    """
    missing = [c for c in ("user_id", "location_id", "timestamp", "latitude", "longitude") if c not in df.columns]
    if missing:
        raise DataValidationError(
            f"{file or '<data>'}: missing column(s) {missing}; have {list(df.columns)}", file=file, column=missing[0]
        )
    lat = pd.to_numeric(df["latitude"], errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
    lon = pd.to_numeric(df["longitude"], errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
    uid = df["user_id"].isna().to_numpy() | (df["user_id"].astype("string").str.len() == 0).fillna(True).to_numpy()
    lid = df["location_id"].isna().to_numpy() | (df["location_id"].astype("string").str.len() == 0).fillna(True).to_numpy()
    rules = [
        ("missing_user_id", "user_id", uid, "a non-empty user id"),
        ("missing_location_id", "location_id", lid, "a non-empty location id"),
        ("unparsable_timestamp", "timestamp", df["timestamp"].isna().to_numpy(), "a parseable timestamp"),
        ("missing_coordinates", "latitude", np.isnan(lat), "a latitude number"),
        ("missing_coordinates", "longitude", np.isnan(lon), "a longitude number"),
        ("latitude_out_of_range", "latitude", ~np.isnan(lat) & ((lat < -90) | (lat > 90)), "latitude in [-90, 90]"),
        (
            "longitude_out_of_range",
            "longitude",
            ~np.isnan(lon) & ((lon < -180) | (lon > 180)),
            "longitude in [-180, 180]",
        ),
    ]
    if "tz_offset_min" in df.columns:
        tz = pd.to_numeric(df["tz_offset_min"], errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
        rules.append(
            (
                "bad_tz_offset",
                "tz_offset_min",
                np.isnan(tz) | (np.abs(tz) > 14 * 60),
                "a time-zone offset in minutes within [-840, 840]",
            )
        )
    return _apply_rules(
        df, rules, on_error=on_error, file=file, lines=lines, source=source, source_columns=source_columns
    )


def validate_locations(
    df: pd.DataFrame, *, on_error: OnError = "raise", file: str | None = None, lines: np.ndarray | None = None
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Check a location table: ids present, coordinates in range (missing coordinates allowed only when the check-ins
    provide them, which the caller decides)."""
    if "location_id" not in df.columns:
        raise DataValidationError(
            f"{file or '<data>'}: missing column 'location_id'; have {list(df.columns)}", file=file, column="location_id"
        )
    rules = [
        (
            "missing_location_id",
            "location_id",
            df["location_id"].isna().to_numpy()
            | (df["location_id"].astype("string").str.len() == 0).fillna(True).to_numpy(),
            "a non-empty location id",
        )
    ]
    for col, lo, hi in (("latitude", -90, 90), ("longitude", -180, 180)):
        if col in df.columns:
            v = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
            rules.append((f"{col}_out_of_range", col, ~np.isnan(v) & ((v < lo) | (v > hi)), f"{col} in [{lo}, {hi}]"))
    return _apply_rules(df, rules, on_error=on_error, file=file, lines=lines)


def validate_users(
    df: pd.DataFrame, *, on_error: OnError = "raise", file: str | None = None, lines: np.ndarray | None = None
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Check a user table: a ``user_id`` column with a non-empty id in every row (other columns are free)."""
    if "user_id" not in df.columns:
        raise DataValidationError(
            f"{file or '<data>'}: missing column 'user_id'; have {list(df.columns)}", file=file, column="user_id"
        )
    missing = df["user_id"].isna().to_numpy() | (df["user_id"].astype("string").str.len() == 0).fillna(True).to_numpy()
    rules = [("missing_user_id", "user_id", missing, "a non-empty user id")]
    return _apply_rules(df, rules, on_error=on_error, file=file, lines=lines)


def validate_grid(
    df: pd.DataFrame,
    *,
    on_error: OnError = "raise",
    file: str | None = None,
    lines: np.ndarray | None = None,
    grid_size: int = 200,
    slots_per_day: int = 48,
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Check grid rows: integer uid/d/t/x/y, d >= 0, t in [0, slots_per_day), x and y in [0, grid_size] or 999."""
    missing = [c for c in GRID_COLUMNS if c not in df.columns]
    if missing:
        raise DataValidationError(
            f"{file or '<data>'}: missing column(s) {missing}; have {list(df.columns)}", file=file, column=missing[0]
        )
    num = {c: pd.to_numeric(df[c], errors="coerce").to_numpy(dtype="float64", na_value=np.nan) for c in GRID_COLUMNS}
    rules = []
    for c in GRID_COLUMNS:
        v = num[c]
        rules.append((f"unparsable_{c}", c, np.isnan(v) | (v != np.floor(v)), "an integer"))
    rules.append(("negative_uid", "uid", num["uid"] < 0, "uid >= 0"))
    rules.append(("day_out_of_range", "d", num["d"] < 0, "d >= 0"))
    rules.append(("slot_out_of_range", "t", (num["t"] < 0) | (num["t"] >= slots_per_day), f"t in [0, {slots_per_day - 1}]"))
    for c in ("x", "y"):
        v = num[c]
        rules.append(
            (
                "cell_out_of_range",
                c,
                ((v < 0) | (v > grid_size)) & (v != HIDDEN_CELL),
                f"{c} in [0, {grid_size}] or {HIDDEN_CELL} (hidden)",
            )
        )
    hidden_mismatch = (num["x"] == HIDDEN_CELL) != (num["y"] == HIDDEN_CELL)
    rules.append(("half_hidden_cell", "x", hidden_mismatch, f"x and y both {HIDDEN_CELL} or both real cells"))
    return _apply_rules(df, rules, on_error=on_error, file=file, lines=lines)
