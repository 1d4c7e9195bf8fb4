"""Readers of real check-in and grid formats into the canonical tables (DESIGN §3.2).

```python
from dataset_builders.readers import read_dataset

loaded = read_dataset("foursquare", "dataset_TSMC2014_NYC.txt")
loaded.checkins, loaded.locations, loaded.account
loaded.users  # the optional user table (a users.csv beside the check-ins), else None
```
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

from ..schema import DataValidationError, OnError, RowAccount
from .base import DEFAULT_CHUNKSIZE, LoadedCheckins, LoadedGrid, read_location_table, read_user_table
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
    "read_user_table",
    "read_yjmob",
]

logger = logging.getLogger(__name__)

FORMATS = ("foursquare", "gowalla", "yjmob", "csv")
#: The user table looked for beside the check-in file (``users_path="auto"``), as written by the synthetic city.
USERS_FILE = "users.csv"


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
    users_path: str | os.PathLike | Literal["auto"] | None = "auto",
) -> LoadedCheckins | LoadedGrid:
    """Read ``path`` in ``format`` (one of :data:`FORMATS`) into canonical tables with a row account.

    ``locations_path`` names an optional location/POI table (names, categories, addresses, or the coordinates when the
    check-ins have none); ``columns`` maps canonical names to source columns for the ``csv`` format and the location
    table (``location_columns`` maps the location table separately). ``header=False`` reads csv check-ins and the
    location table without a header line, naming columns by position (``"0"``, ``"1"``, ...);
    ``timestamp_format`` is a ``strftime`` format for csv time strings.

    ``users_path`` names an optional user table for check-in formats: ``user_id`` plus any columns, e.g. the
    ``archetype`` of the synthetic city's users (see :func:`read_user_table`). By default (``"auto"``) a
    ``users.csv`` in the folder of ``path`` is read when there is one with a ``user_id`` column; ``None`` reads none.
    Its ids must be the check-ins' canonical user ids: rows of unknown users are dropped and counted in the account
    (``unknown_user``). It lands in ``loaded.users`` and, through preprocessing, in the prepared dataset's ``users``
    table; it is descriptive only (reports group results by it) and no model or baseline reads it.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    account = RowAccount()
    mapping = parse_column_mapping(columns)
    if format == "yjmob":
        if locations_path is not None:
            raise ValueError("--locations does not apply to the yjmob grid format")
        if users_path not in ("auto", None):
            raise ValueError("a user table does not apply to the yjmob grid format")
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
    auto = isinstance(users_path, str) and users_path == "auto"
    users_file = Path(path).parent / USERS_FILE if auto else (None if users_path is None else Path(users_path))
    if users_file is not None and auto and (not users_file.is_file() or users_file.resolve() == Path(path).resolve()):
        users_file = None
    if users_file is not None:
        try:
            loaded.users = read_user_table(users_file, known_users=loaded.checkins["user_id"], on_error=on_error,
                                           account=account)
        except DataValidationError as err:
            if not (auto and err.column == "user_id" and err.line is None):
                raise
            logger.warning("%s has no user_id column; it is not read as the user table (%s)", users_file, err)
        else:
            loaded.metadata["source_files"].append(str(users_file))
    return loaded
