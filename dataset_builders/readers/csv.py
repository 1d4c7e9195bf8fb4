"""Generic CSV / TSV / Parquet check-ins with a column mapping.

The mapping names, for each canonical column, the source column: ``user_id``, ``location_id``, and either
``timestamp`` (epoch seconds or milliseconds, or date-time strings) or ``day`` + ``minute`` (a relative day number and
the minute of the day, for sources without calendar dates), plus optional ``latitude``, ``longitude`` (else taken from
a location table), ``tz_offset_min``, ``weekday`` (0 = Monday; only with ``day``), ``category``, ``name``,
``address``. Date-time strings without a time zone are taken as local clock time (``tz_offset_min`` 0).

Every other column of the file (an unmapped one, e.g. ``weather``; by position ``"5"``, ... without a header) is kept in
the check-in table as a string column after the canonical ones, and carried by preprocessing into the prepared
``checkins`` config, where ``mobility evaluate --slice-by COLUMN`` reads it. Columns without a name (pandas'
``Unnamed: N``, e.g. from a trailing delimiter or a written index) and columns named like a canonical output column
that the mapping does not use are not kept.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..schema import DataValidationError, OnError, RowAccount
from .base import (
    CHECKIN_COLUMNS,
    DEFAULT_CHUNKSIZE,
    LoadedCheckins,
    default_sep,
    positional_names,
    read_checkin_file,
    to_epoch_seconds,
)

__all__ = ["CSV_MAPPABLE", "parse_column_mapping", "read_csv_checkins"]

CSV_MAPPABLE = (
    "user_id",
    "location_id",
    "timestamp",
    "day",
    "minute",
    "latitude",
    "longitude",
    "tz_offset_min",
    "weekday",
    "category",
    "name",
    "address",
)
logger = logging.getLogger(__name__)

EPOCH_DAY0_WEEKDAY = 3  # 1970-01-01 was a Thursday (Monday = 0)


def parse_column_mapping(spec: str | dict[str, str] | None) -> dict[str, str]:
    """``"user_id=userId,location_id=venue"`` (or a dict) to ``{canonical: source}``, checking the canonical names."""
    if spec is None or spec == "":
        return {}
    if isinstance(spec, dict):
        mapping = dict(spec)
    else:
        mapping = {}
        for item in spec.split(","):
            item = item.strip()
            if not item:
                continue
            if "=" not in item:
                raise ValueError(f"bad column mapping item {item!r}: expected canonical=source, e.g. user_id=userId")
            key, value = (s.strip() for s in item.split("=", 1))
            if not key or not value:
                raise ValueError(f"bad column mapping item {item!r}: expected canonical=source, e.g. user_id=userId")
            mapping[key] = value
    unknown = sorted(set(mapping) - set(CSV_MAPPABLE))
    if unknown:
        raise ValueError(f"unknown canonical column(s) {unknown} in the column mapping; allowed: {list(CSV_MAPPABLE)}")
    return mapping


def read_csv_checkins(
    path: str | os.PathLike,
    *,
    columns: str | dict[str, str] | None = None,
    on_error: OnError = "drop",
    encoding: str | None = None,
    sep: str | None = None,
    timestamp_format: str | None = None,
    locations: pd.DataFrame | None = None,
    chunksize: int = DEFAULT_CHUNKSIZE,
    coord_tolerance: float = 1e-5,
    header: bool = True,
    account: RowAccount | None = None,
) -> LoadedCheckins:
    """Read check-ins from any CSV/TSV (gzip allowed) or Parquet file with a column mapping.

    Args:
        columns (`str` or `dict`, *optional*): canonical=source pairs; columns already named canonically need no
            entry.
        timestamp_format (`str`, *optional*): a ``strftime`` format for string timestamps; by default ISO 8601, then
            pandas' mixed-format parser.
        sep (`str`, *optional*): the delimiter; by default tab for ``.tsv``/``.txt``, else comma.
        header (`bool`, *optional*, defaults to `True`): whether the first line names the columns; without one the
            columns are named by position, ``"0"``, ``"1"``, ... (e.g. the Foursquare global-scale TIST2015 files:
            ``--columns user_id=0,location_id=1,timestamp=2,tz_offset_min=3``).

    The file's other columns are kept in ``checkins`` as string columns (see the module docstring) and listed in the
    metadata's ``extra_checkin_columns``.
    """
    path = Path(path)
    mapping = parse_column_mapping(columns)
    account = account if account is not None else RowAccount()
    sep = sep if sep is not None else default_sep(path)
    is_parquet = path.suffix.lower() in (".parquet", ".pq")
    names = None if header or is_parquet else positional_names(path, sep, encoding)
    header = header or is_parquet
    state: dict = {"relative": None, "timestamp_unit": None, "weekday_offsets": [], "has_tz": False, "extra": None}

    def parse(raw: pd.DataFrame) -> pd.DataFrame:
        src = {canon: mapping.get(canon, canon) for canon in CSV_MAPPABLE}
        present = {canon: col for canon, col in src.items() if col in raw.columns}
        need = ["user_id", "location_id"]
        relative = "timestamp" not in present
        if relative:
            need += ["day", "minute"]
        missing = [c for c in need if c not in present]
        if missing:
            hint = "" if not relative or "day" in present else " (or timestamp)"
            raise DataValidationError(
                f"{path}: missing column(s) {[src[c] for c in missing]} for {missing}{hint}; the file has "
                f"{list(raw.columns)}. Map them with --columns canonical=source (e.g. user_id=userId).",
                file=str(path),
                column=src[missing[0]],
            )
        state["relative"] = relative
        state["has_tz"] = "tz_offset_min" in present
        out = pd.DataFrame(index=raw.index)
        out["user_id"] = raw[present["user_id"]].astype("string").str.strip()
        out["location_id"] = raw[present["location_id"]].astype("string").str.strip()
        if relative:
            day = pd.to_numeric(raw[present["day"]], errors="coerce")
            minute = pd.to_numeric(raw[present["minute"]], errors="coerce")
            bad = day.isna() | minute.isna() | (day < 0) | (minute < 0) | (minute >= 1440)
            ts = (day * 86400 + minute * 60).where(~bad)
            out["timestamp"] = pd.array(np.floor(ts.to_numpy(dtype="float64", na_value=np.nan)), dtype="Int64")
            if "weekday" in present:
                wd = pd.to_numeric(raw[present["weekday"]], errors="coerce")
                ok = wd.notna() & day.notna()
                state["weekday_offsets"].append(((wd[ok] - day[ok]) % 7).astype("int64").to_numpy())
        else:
            out["timestamp"] = _parse_timestamps(raw[present["timestamp"]], timestamp_format, state)
        for canon in ("latitude", "longitude", "tz_offset_min"):
            if canon in present:
                out[canon] = pd.to_numeric(raw[present[canon]], errors="coerce")
        for canon in ("category", "name", "address"):
            if canon in present:
                out[canon] = raw[present[canon]].astype("string")
        for col in _extra_columns(raw.columns, set(present.values()), state):
            out[col] = raw[col].astype("string")
        return out

    checkins, locs = read_checkin_file(
        path, parse, step_name=f"read csv {path.name}", sep=sep, header=header, names=names, on_error=on_error,
        encoding=encoding, locations=locations, chunksize=chunksize, coord_tolerance=coord_tolerance,
        account=account, source_columns={canon: mapping.get(canon, canon) for canon in CSV_MAPPABLE},
        keep_extra=True,
    )
    meta: dict = {"format": "csv", "source_files": [str(path)], "column_mapping": mapping,
                  "extra_checkin_columns": [str(c) for c in state["extra"] or []]}
    if state["relative"]:
        offsets = np.concatenate(state["weekday_offsets"]) if state["weekday_offsets"] else np.array([], dtype=int)
        day0 = int(np.bincount(offsets, minlength=7).argmax()) if offsets.size else 0
        meta.update(
            time_reference="relative_day0",
            day0_weekday=day0,
            local_time="timestamp = day * 86400 + minute * 60 (relative days; weekday = (day + day0_weekday) % 7)",
        )
    else:
        meta.update(time_reference="utc_epoch", day0_weekday=EPOCH_DAY0_WEEKDAY, timestamp_unit=state["timestamp_unit"])
        meta["local_time"] = (
            "timestamp + tz_offset_min" if state["has_tz"] else
            "timestamps as given (strings without a zone are local clock time)"
        )
    return LoadedCheckins(checkins, locs, account, meta)


def _extra_columns(columns, used: set[str], state: dict) -> list[str]:
    """The file columns kept as extra check-in columns: not named by the mapping (nor canonically named), with a
    name, and not clashing with a canonical output column (decided on the first chunk, logged once)."""
    if state["extra"] is not None:
        return state["extra"]
    reserved = set(CHECKIN_COLUMNS) | {"category", "name", "address", "_line"}
    extra, skipped = [], []
    for col in columns:
        if col in used:
            continue
        name = str(col)
        if name in reserved or name.startswith("Unnamed: ") or not name.strip():
            skipped.append(name)
        else:
            extra.append(col)
    if extra:
        logger.info("keeping extra check-in column(s) %s", [str(c) for c in extra])
    if skipped:
        logger.info("not keeping unmapped column(s) %s (no name, or the name of a canonical column)", skipped)
    state["extra"] = extra
    return extra


def _parse_timestamps(values: pd.Series, fmt: str | None, state: dict) -> pd.Series:
    numeric = pd.to_numeric(values, errors="coerce")
    nonnull = values.notna()
    unit = "datetime" if fmt is not None else state["timestamp_unit"]
    if unit is None and nonnull.any():
        # decided once, on the first chunk with values, so that every chunk is read the same way and a few bad values
        # do not turn a column of epoch numbers into (unparsable) date strings
        if numeric[nonnull].notna().mean() > 0.5:
            # numbers: epoch seconds, or milliseconds when the magnitudes say so (after 1973 in ms > 1e11)
            unit = "ms" if numeric.abs().max() > 1e11 else "s"
        else:
            unit = "datetime"
        state["timestamp_unit"] = unit
    if unit in ("s", "ms"):
        secs = numeric / 1000 if unit == "ms" else numeric
        return pd.Series(pd.array(np.floor(secs.to_numpy(dtype="float64", na_value=np.nan)), dtype="Int64"),
                         index=values.index)
    if unit is not None:  # None: a chunk with no values at all, which decides nothing
        state["timestamp_unit"] = unit
    strings = values.astype("string").str.strip()
    if fmt is not None:
        dt = pd.to_datetime(strings, format=fmt, errors="coerce", utc=True)
    else:
        dt = pd.to_datetime(strings, format="ISO8601", errors="coerce", utc=True)
        if dt.isna().sum() > strings.isna().sum():
            retry = dt.isna() & strings.notna()
            dt = dt.copy()
            dt[retry] = pd.to_datetime(strings[retry], format="mixed", errors="coerce", utc=True)
    return to_epoch_seconds(dt)
