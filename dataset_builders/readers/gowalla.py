"""Gowalla SNAP check-ins (``loc-gowalla_totalCheckins.txt``).

Tab-separated, no header: ``user, check-in time (ISO 8601, UTC), latitude, longitude, location id``. The source has no
time-zone offsets, so ``tz_offset_min`` is 0 and local-time features are UTC-based (the dataset card says so).
"""

from __future__ import annotations

import os

import pandas as pd

from ..schema import OnError, RowAccount
from .base import DEFAULT_CHUNKSIZE, LoadedCheckins, read_checkin_file, to_epoch_seconds

__all__ = ["GOWALLA_COLUMNS", "read_gowalla"]

GOWALLA_COLUMNS = ["user", "check_in_time", "latitude", "longitude", "location_id"]


def _parse(raw: pd.DataFrame) -> pd.DataFrame:
    dt = pd.to_datetime(raw["check_in_time"].str.strip(), format="ISO8601", errors="coerce", utc=True)
    return pd.DataFrame(
        {
            "user_id": raw["user"].str.strip(),
            "location_id": raw["location_id"].str.strip(),
            "latitude": pd.to_numeric(raw["latitude"], errors="coerce"),
            "longitude": pd.to_numeric(raw["longitude"], errors="coerce"),
            "timestamp": to_epoch_seconds(dt),
        },
        index=raw.index,
    )


def read_gowalla(
    path: str | os.PathLike,
    *,
    on_error: OnError = "drop",
    encoding: str | None = None,
    locations: pd.DataFrame | None = None,
    chunksize: int = DEFAULT_CHUNKSIZE,
    coord_tolerance: float = 1e-5,
    account: RowAccount | None = None,
) -> LoadedCheckins:
    """Read a Gowalla SNAP check-in file (gzip allowed) into canonical check-ins and locations."""
    account = account if account is not None else RowAccount()
    checkins, locs = read_checkin_file(
        path, _parse, step_name=f"read gowalla {os.path.basename(path)}", sep="\t", header=False,
        names=GOWALLA_COLUMNS, on_error=on_error, encoding=encoding, locations=locations, chunksize=chunksize,
        coord_tolerance=coord_tolerance, account=account,
        source_columns={"user_id": "user", "timestamp": "check_in_time"},
    )
    meta = {"format": "gowalla", "source_files": [str(path)], "time_reference": "utc_epoch",
            "local_time": "UTC (the source has no time-zone offsets)"}
    return LoadedCheckins(checkins, locs, account, meta)
