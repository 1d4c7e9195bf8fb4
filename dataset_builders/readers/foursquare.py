"""Foursquare TSMC2014 check-ins (``dataset_TSMC2014_NYC.txt`` / ``_TKY.txt``).

Tab-separated, no header: ``userId, venueId, venueCategoryId, venueCategory, latitude, longitude, timezoneOffset,
utcTimestamp``; the timestamp looks like ``Tue Apr 03 18:00:09 +0000 2012``; the files in the wild are Latin-1.
"""

from __future__ import annotations

import os

import pandas as pd

from ..schema import OnError, RowAccount
from .base import DEFAULT_CHUNKSIZE, LoadedCheckins, read_checkin_file, to_epoch_seconds

__all__ = ["TSMC_COLUMNS", "parse_tsmc_timestamps", "read_foursquare"]

TSMC_COLUMNS = [
    "userId",
    "venueId",
    "venueCategoryId",
    "venueCategory",
    "latitude",
    "longitude",
    "timezoneOffset",
    "utcTimestamp",
]
_MONTHS = {m: f"{i:02d}" for i, m in enumerate(
    ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"], start=1)}
_TSMC_PATTERN = r"^\s*[A-Za-z]{3} ([A-Za-z]{3}) +(\d{1,2}) (\d{2}:\d{2}:\d{2}) ([+-]\d{4}) (\d{4})\s*$"


def parse_tsmc_timestamps(values: pd.Series) -> pd.Series:
    """``Tue Apr 03 18:00:09 +0000 2012`` strings to nullable int64 UTC epoch seconds (NA when unparsable).

    Month names are matched in English whatever the process locale is.
    """
    parts = values.astype("string").str.extract(_TSMC_PATTERN)
    month = parts[0].str.title().map(_MONTHS)
    iso = parts[4] + "-" + month + "-" + parts[1].str.zfill(2) + "T" + parts[2] + parts[3]
    dt = pd.to_datetime(iso, format="%Y-%m-%dT%H:%M:%S%z", errors="coerce", utc=True)
    return to_epoch_seconds(dt)


def _parse(raw: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": raw["userId"].str.strip(),
            "location_id": raw["venueId"].str.strip(),
            "category": raw["venueCategory"],
            "category_id": raw["venueCategoryId"],
            "latitude": pd.to_numeric(raw["latitude"], errors="coerce"),
            "longitude": pd.to_numeric(raw["longitude"], errors="coerce"),
            "tz_offset_min": pd.to_numeric(raw["timezoneOffset"], errors="coerce"),
            "timestamp": parse_tsmc_timestamps(raw["utcTimestamp"]),
        },
        index=raw.index,
    )


def read_foursquare(
    path: str | os.PathLike,
    *,
    on_error: OnError = "drop",
    encoding: str | None = None,
    locations: pd.DataFrame | None = None,
    chunksize: int = DEFAULT_CHUNKSIZE,
    coord_tolerance: float = 1e-5,
    account: RowAccount | None = None,
) -> LoadedCheckins:
    """Read a TSMC2014 file into canonical check-ins and locations (category from ``venueCategory``).

    Args:
        path (`str` or `os.PathLike`): the ``.txt`` file (gzip allowed).
        on_error (`str`, *optional*, defaults to `"drop"`): ``"drop"`` counts and drops bad rows, ``"raise"`` stops at
            the first with an error naming file, line and column.
        encoding (`str`, *optional*): detected when left out (UTF-8 if valid, else Latin-1).
        locations (`pd.DataFrame`, *optional*): a location table (names, addresses) merged into the derived one.
    """
    account = account if account is not None else RowAccount()
    checkins, locs = read_checkin_file(
        path, _parse, step_name=f"read foursquare {os.path.basename(path)}", sep="\t", header=False,
        names=TSMC_COLUMNS, on_error=on_error, encoding=encoding, locations=locations, chunksize=chunksize,
        coord_tolerance=coord_tolerance, account=account,
        source_columns={"user_id": "userId", "location_id": "venueId", "timestamp": "utcTimestamp",
                        "tz_offset_min": "timezoneOffset"},
    )
    meta = {"format": "foursquare", "source_files": [str(path)], "time_reference": "utc_epoch",
            "local_time": "timestamp + tz_offset_min (from timezoneOffset)"}
    return LoadedCheckins(checkins, locs, account, meta)
