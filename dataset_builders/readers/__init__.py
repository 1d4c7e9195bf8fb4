"""Readers of real check-in and grid formats into the canonical tables (DESIGN §3.2).

```python
from dataset_builders.readers import read_dataset

loaded = read_dataset("foursquare", "dataset_TSMC2014_NYC.txt")
loaded.checkins, loaded.locations, loaded.account
```
"""

from __future__ import annotations

import os
from pathlib import Path

from ..schema import OnError, RowAccount
from .base import DEFAULT_CHUNKSIZE, LoadedCheckins, LoadedGrid, read_location_table
from .csv import parse_column_mapping, read_csv_checkins
from .foursquare import read_foursquare
from .gowalla import read_gowalla
from .yjmob import read_yjmob

__all__ = [
    "FORMATS",
    "LoadedCheckins",
    "LoadedGrid",
    "parse_column_mapping",
    "read_csv_checkins",
    "read_dataset",
    "read_foursquare",
    "read_gowalla",
    "read_location_table",
    "read_yjmob",
]

FORMATS = ("foursquare", "gowalla", "yjmob", "csv")


def read_dataset(
    format: str,
    path: str | os.PathLike,
    *,
    columns: str | dict[str, str] | None = None,
    locations_path: str | os.PathLike | None = None,
    on_error: OnError = "drop",
    encoding: str | None = None,
    chunksize: int | None = None,
    grid_size: int = 200,
    header: bool = True,
    location_columns: str | dict[str, str] | None = None,
    timestamp_format: str | None = None,
) -> LoadedCheckins | LoadedGrid:
    """Read ``path`` in ``format`` (one of :data:`FORMATS`) into canonical tables with a row account.

    ``locations_path`` names an optional location/POI table (names, categories, addresses, or the coordinates when the
    check-ins have none); ``columns`` maps canonical names to source columns for the ``csv`` format and the location
    table (``location_columns`` maps the location table separately). ``header=False`` reads csv check-ins and the
    location table without a header line, naming columns by position (``"0"``, ``"1"``, ...);
    ``timestamp_format`` is a ``strftime`` format for csv time strings.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    account = RowAccount()
    mapping = parse_column_mapping(columns)
    if format == "yjmob":
        if locations_path is not None:
            raise ValueError("--locations does not apply to the yjmob grid format")
        sized = {} if chunksize is None else {"chunksize": chunksize}  # else the grid reader's larger default
        return read_yjmob(path, on_error=on_error, encoding=encoding, grid_size=grid_size, account=account, **sized)
    if format != "csv" and (not header or timestamp_format):
        raise ValueError(f"--no-header and --timestamp-format apply to the csv format, not to {format!r}")
    if columns and format != "csv" and locations_path is None:
        raise ValueError(f"--columns applies to the csv format and to location tables, not to {format!r} alone")
    locations = None
    if locations_path is not None:
        loc_mapping = parse_column_mapping(location_columns) if location_columns else mapping
        locations = read_location_table(
            locations_path, columns=loc_mapping, encoding=None, on_error=on_error, header=header, account=account
        )
    kwargs = dict(on_error=on_error, encoding=encoding, locations=locations, account=account,
                  chunksize=DEFAULT_CHUNKSIZE if chunksize is None else chunksize)
    if format == "foursquare":
        loaded = read_foursquare(path, **kwargs)
    elif format == "gowalla":
        loaded = read_gowalla(path, **kwargs)
    else:
        loaded = read_csv_checkins(path, columns=mapping, header=header, timestamp_format=timestamp_format, **kwargs)
    if locations_path is not None:
        loaded.metadata["source_files"].append(str(Path(locations_path)))
    return loaded
