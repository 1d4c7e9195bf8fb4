"""Shared machinery of the readers: encoding detection, chunked reading with exact line numbers, error translation,
and assembly of the canonical check-in and location tables from validated chunks."""

from __future__ import annotations

import codecs
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..schema import (
    DataValidationError,
    OnError,
    RowAccount,
    check_on_error,
    validate_checkins,
    validate_locations,
    validate_users,
)

__all__ = [
    "CHECKIN_COLUMNS",
    "DEFAULT_CHUNKSIZE",
    "LoadedCheckins",
    "LoadedGrid",
    "assemble_checkins",
    "iter_table_chunks",
    "default_sep",
    "positional_names",
    "read_checkin_file",
    "read_location_table",
    "read_user_table",
    "resolve_encoding",
    "to_epoch_seconds",
]

logger = logging.getLogger(__name__)

DEFAULT_CHUNKSIZE = 500_000
#: The canonical check-in columns, in table order; extra columns of a source (``keep_extra``) follow them.
CHECKIN_COLUMNS = ("user_id", "location_id", "timestamp", "tz_offset_min", "latitude", "longitude")
#: Descriptive columns a check-in source may carry that belong to the location table, not to the check-ins.
_LOCATION_INFO = ("category", "name", "address")
_SAMPLE_BYTES = 1 << 20
_EPOCH = pd.Timestamp("1970-01-01", tz="UTC")


@dataclass
class LoadedCheckins:
    """Canonical check-ins and locations read from a source, with the row account and provenance metadata.

    ``users`` is the optional user table (``user_id`` plus free columns, e.g. the synthetic city's ``archetype``;
    :func:`read_user_table`), restricted to users of ``checkins``; ``None`` when the source has none. It is descriptive
    only: preprocessing carries it into the prepared dataset, and no model or baseline reads it.
    """

    checkins: pd.DataFrame
    locations: pd.DataFrame
    account: RowAccount
    metadata: dict[str, Any] = field(default_factory=dict)
    users: pd.DataFrame | None = None

    kind = "checkins"


@dataclass
class LoadedGrid:
    """A canonical grid table (uid, d, t, x, y) with the row account and metadata (coordinate base, grid size)."""

    grid: pd.DataFrame
    account: RowAccount
    metadata: dict[str, Any] = field(default_factory=dict)

    kind = "grid"


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def resolve_encoding(path: str | os.PathLike, encoding: str | None) -> str:
    """Pick the text encoding of ``path``.

    ``encoding=None`` (auto) looks at the first MiB: a UTF-16 byte-order mark gives ``utf-16``, a UTF-8 one
    ``utf-8-sig``, NUL bytes without a mark are an error (UTF-16 without BOM or a binary file), valid UTF-8 gives
    ``utf-8``, anything else ``latin-1`` (what the Foursquare TSMC2014 files use). Compressed files are sampled after
    decompression.
    """
    path = Path(path)
    if encoding is not None:
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise ValueError(f"unknown encoding {encoding!r} for {path}") from None
        return encoding
    if _is_gzip(path):
        import gzip

        with gzip.open(path, "rb") as f:
            sample = f.read(_SAMPLE_BYTES)
    else:
        with open(path, "rb") as f:
            sample = f.read(_SAMPLE_BYTES)
    if sample.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    if sample.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if b"\x00" in sample:
        raise DataValidationError(
            f"{path}: contains NUL bytes; it is not a UTF-8 or Latin-1 text file (UTF-16 without a byte-order mark, or "
            "a binary file?). Convert it to UTF-8, or pass the encoding explicitly (--encoding).",
            file=str(path),
            expected="a UTF-8 or Latin-1 text file",
        )
    try:
        sample.decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError as err:
        if err.start >= len(sample) - 4:  # a multi-byte character cut by the sample boundary
            return "utf-8"
        logger.info("%s is not valid UTF-8 (byte %d); reading it as latin-1", path, err.start)
        return "latin-1"


def _locate_decode_error(path: Path, encoding: str) -> DataValidationError:
    """Find the first line of ``path`` that does not decode with ``encoding`` and describe it."""
    import gzip

    opener = gzip.open if _is_gzip(path) else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                raw.decode(encoding)
            except UnicodeDecodeError as err:
                bad = raw[max(0, err.start - 10) : err.end + 10]
                return DataValidationError(
                    f"{path}, line {lineno}: bytes {bad!r} are not valid {encoding}; expected a {encoding} file. "
                    "If the file is Latin-1 (as the Foursquare TSMC2014 files are), pass --encoding latin-1 "
                    "(encoding='latin-1'); leave the encoding out to detect it.",
                    file=str(path),
                    line=lineno,
                    value=bad,
                    expected=f"{encoding} text",
                )
    return DataValidationError(f"{path}: not valid {encoding}", file=str(path), expected=f"{encoding} text")


def iter_table_chunks(
    path: str | os.PathLike,
    *,
    sep: str | None = ",",
    names: list[str] | None = None,
    header: bool = True,
    encoding: str | None = None,
    chunksize: int = DEFAULT_CHUNKSIZE,
    on_error: OnError = "raise",
    account_dropped: dict[str, int] | None = None,
) -> Iterator[tuple[pd.DataFrame, np.ndarray]]:
    """Yield ``(chunk, lines)`` pairs of string columns from a delimited text file or a Parquet file.

    ``lines`` holds the 1-based file line (text) or row number (Parquet) of every row, so validation errors can name
    it. Blank lines are kept as empty rows, so line numbers stay exact; they are dropped and counted by the caller
    (reason ``blank_line``). A line with too many fields is an error naming the line (``on_error="raise"``) or a
    counted drop (reason ``wrong_field_count``, added to ``account_dropped``).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input file not found: {path}")
    if path.is_dir():
        raise ValueError(f"expected a file, got the directory {path}")
    if path.stat().st_size == 0:
        raise DataValidationError(f"{path}: the file is empty", file=str(path), expected="at least one data row")
    if path.suffix.lower() in (".parquet", ".pq"):
        yield from _iter_parquet(path, names, chunksize)
        return
    enc = resolve_encoding(path, encoding)
    kwargs: dict[str, Any] = dict(
        sep=sep,
        dtype=str,
        keep_default_na=False,
        na_values=[""],
        skip_blank_lines=False,
        encoding=enc,
        chunksize=chunksize,
        compression="infer",
    )
    if header:
        kwargs["header"] = 0
    else:
        kwargs["header"] = None
        kwargs["names"] = names
    offset = 2 if header else 1
    # pandas silently turns the extra leading fields of a too-long FIRST data line into an index (shifting every
    # column of every row), so leading too-long lines are found here and reported, or skipped and counted
    long_lines, n_fields = _leading_long_lines(path, enc, sep, names, header)
    if long_lines:
        if on_error == "raise":
            line = long_lines[0] + 1
            raise DataValidationError(
                f"{path}, line {line}: too many fields (expected {n_fields} fields per line)",
                file=str(path), line=line, expected=f"{n_fields} fields per line",
            )
        kwargs["skiprows"] = long_lines
        offset += len(long_lines)
        if account_dropped is not None:
            account_dropped["wrong_field_count"] = account_dropped.get("wrong_field_count", 0) + len(long_lines)
    start = offset
    try:
        reader = pd.read_csv(path, **kwargs)
        for chunk in reader:
            lines = np.arange(offset, offset + len(chunk), dtype=np.int64)
            offset += len(chunk)
            yield chunk, lines
    except UnicodeDecodeError:
        raise _locate_decode_error(path, enc) from None
    except pd.errors.EmptyDataError:
        raise DataValidationError(f"{path}: the file has no data rows", file=str(path), expected="data rows") from None
    except pd.errors.ParserError as err:
        if on_error == "raise":
            found = re.search(r"in line (\d+)", str(err))
            raise DataValidationError(
                f"{path}: {err}".strip(), file=str(path), line=int(found.group(1)) if found else None,
                expected=f"{len(names) if names else 'a fixed number of'} fields per line"
            ) from None
        yield from _iter_tolerant(path, kwargs, start, offset, account_dropped)


def _leading_long_lines(
    path: Path, encoding: str, sep: str | None, names: list[str] | None, header: bool
) -> tuple[list[int], int]:
    """0-based indices of the data lines at the start of the file that have more fields than the header (or
    ``names``), up to the first line that does not, and the expected number of fields."""
    import csv
    import gzip

    if sep is None or len(sep) != 1:
        return [], 0
    opener = gzip.open if _is_gzip(path) else open
    out: list[int] = []
    try:
        with opener(path, "rt", encoding=encoding, newline="") as f:
            rows = csv.reader(f, delimiter=sep)
            if header:
                first = next(rows, None)
                expected = len(first) if first else 0
            else:
                expected = len(names or [])
            for row in rows:
                if len(row) <= expected:
                    break
                out.append(rows.line_num - 1)
    except (UnicodeDecodeError, csv.Error):
        return [], 0  # left to the main parser, which reports it
    return out, expected


def _iter_tolerant(path: Path, kwargs: dict, first: int, offset: int, account_dropped: dict[str, int] | None):
    """Re-read from the start with the Python engine, skipping (and counting) lines with too many fields.

    Used only in ``on_error="drop"`` mode after a malformed line; line numbers after a skipped line are shifted, which
    does not matter because drop mode never reports lines.
    """
    logger.warning("%s has lines with too many fields; re-reading it with the tolerant parser", path)
    bad = [0]

    def on_bad(_fields):
        bad[0] += 1
        return None

    kwargs = dict(kwargs, engine="python", on_bad_lines=on_bad)
    kwargs.pop("low_memory", None)
    # the chunks before the failure were already yielded: skip that many rows again
    already = offset - first
    seen = 0
    line = first
    for chunk in pd.read_csv(path, **kwargs):
        lines = np.arange(line, line + len(chunk), dtype=np.int64)
        line += len(chunk)
        if seen + len(chunk) <= already:
            seen += len(chunk)
            continue
        if seen < already:
            cut = already - seen
            chunk, lines = chunk.iloc[cut:], lines[cut:]
            seen = already
        yield chunk, lines
    if account_dropped is not None and bad[0]:
        account_dropped["wrong_field_count"] = account_dropped.get("wrong_field_count", 0) + bad[0]


def _iter_parquet(path: Path, names: list[str] | None, chunksize: int):
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid for non-Parquet bytes
        raise DataValidationError(f"{path}: not a readable Parquet file ({err})", file=str(path)) from None
    row = 1
    for batch in pf.iter_batches(batch_size=chunksize):
        chunk = batch.to_pandas()
        lines = np.arange(row, row + len(chunk), dtype=np.int64)
        row += len(chunk)
        yield chunk, lines


def blank_rows(chunk: pd.DataFrame) -> np.ndarray:
    """Rows where every field is missing (blank lines in a text file)."""
    return chunk.isna().all(axis=1).to_numpy()


def to_epoch_seconds(values: pd.Series) -> pd.Series:
    """Timezone-aware datetimes (NaT allowed) to nullable int64 seconds since the Unix epoch."""
    out = pd.Series(pd.array([pd.NA] * len(values), dtype="Int64"), index=values.index)
    ok = values.notna().to_numpy()
    if ok.any():
        secs = (values[ok] - _EPOCH) // pd.Timedelta(seconds=1)
        out[ok] = secs.astype("int64").to_numpy()
    return out


def positional_names(path: str | os.PathLike, sep: str, encoding: str | None) -> list[str]:
    """Column names ``"0", "1", ...`` for a file without a header, from the field count of its first non-blank line
    (map them with ``--columns user_id=0,...``)."""
    import csv
    import gzip

    path = Path(path)
    enc = resolve_encoding(path, encoding)
    opener = gzip.open if _is_gzip(path) else open
    with opener(path, "rt", encoding=enc, newline="") as f:
        for row in csv.reader(f, delimiter=sep):
            if row:
                return [str(i) for i in range(len(row))]
    raise DataValidationError(f"{path}: the file has no data rows", file=str(path), expected="data rows")


def default_sep(path: str | os.PathLike) -> str:
    """Tab for ``.tsv``/``.txt`` files (gzip or not), comma otherwise."""
    name = Path(path).name.lower().removesuffix(".gz")
    return "\t" if name.endswith((".tsv", ".txt")) else ","


def read_location_table(
    path: str | os.PathLike,
    *,
    columns: dict[str, str] | None = None,
    encoding: str | None = None,
    on_error: OnError = "drop",
    coord_tolerance: float = 1e-5,
    header: bool = True,
    account: RowAccount | None = None,
) -> pd.DataFrame:
    """Read a POI / location table (CSV, TSV or Parquet) with canonical column names (or mapped by ``columns``:
    canonical name -> source name; positions ``"0", "1", ...`` for a file without a header). Only ``location_id`` is
    required; extra columns are kept."""
    path = Path(path)
    rename = {src: canon for canon, src in (columns or {}).items()}
    sep = default_sep(path)
    names = None if header or path.suffix.lower() in (".parquet", ".pq") else positional_names(path, sep, encoding)
    frames = []
    dropped: dict[str, int] = {}
    rows_in = 0
    for chunk, lines in iter_table_chunks(path, sep=sep, header=names is None, names=names, encoding=encoding,
                                          on_error=on_error, account_dropped=dropped):
        rows_in += len(chunk)
        chunk = chunk.rename(columns=rename)
        blank = blank_rows(chunk)
        if blank.any():
            dropped["blank_line"] = dropped.get("blank_line", 0) + int(blank.sum())
            chunk, lines = chunk.loc[~blank], lines[~blank]
        chunk, d = validate_locations(chunk, on_error=on_error, file=str(path), lines=lines)
        for k, v in d.items():
            dropped[k] = dropped.get(k, 0) + v
        frames.append(chunk)
    rows_in += dropped.get("wrong_field_count", 0)  # lines the tolerant parser skipped were never yielded
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["location_id"])
    for col in ("latitude", "longitude"):
        if col in table.columns:
            table[col] = pd.to_numeric(table[col], errors="coerce").astype("float64")
    table["location_id"] = table["location_id"].astype("string")
    # duplicate ids: identical rows collapse; differing coordinates follow the merge rule (first row wins)
    dup = table["location_id"].duplicated(keep="first")
    notes: dict[str, Any] = {}
    if dup.any():
        first = table.loc[~dup].set_index("location_id")
        if {"latitude", "longitude"} <= set(table.columns):
            d_rows = table.loc[dup]
            ref = first.loc[d_rows["location_id"], ["latitude", "longitude"]].to_numpy()
            diff = np.abs(d_rows[["latitude", "longitude"]].to_numpy() - ref).max(axis=1) > coord_tolerance
            if diff.any():
                if on_error == "raise":
                    pos = int(np.flatnonzero(diff)[0])
                    row = d_rows.iloc[pos]
                    raise DataValidationError(
                        f"{path}: location id {row['location_id']!r} appears with coordinates "
                        f"({row['latitude']}, {row['longitude']}) and ({ref[pos][0]}, {ref[pos][1]}); expected one "
                        "coordinate per location id (use on_error='drop' to keep the first and count the merge)",
                        file=str(path),
                        column="location_id",
                        value=row["location_id"],
                        expected="one coordinate per location id",
                    )
                notes["coordinate_conflict_locations_merged"] = int(d_rows.loc[diff, "location_id"].nunique())
        dropped["duplicate_location_id"] = int(dup.sum())
        table = table.loc[~dup].reset_index(drop=True)
    if account is not None:
        account.add(f"read locations {path.name}", rows_in, len(table), dropped, notes)
    return table


def read_user_table(
    path: str | os.PathLike,
    *,
    known_users: pd.Series | np.ndarray | None = None,
    encoding: str | None = None,
    on_error: OnError = "drop",
    account: RowAccount | None = None,
) -> pd.DataFrame:
    """Read an optional user table (CSV, TSV or Parquet with a header): ``user_id`` plus any columns, e.g. the
    ``users.csv`` of the synthetic city (``archetype``, ``home_location_id``, ...).

    Ids are stripped strings, matched exactly against the canonical ``user_id`` of the check-ins (``known_users``).
    Rows are dropped and counted in the account step ``read users <file>``: blank lines (``blank_line``), rows without
    an id (``missing_user_id``; an error with ``on_error="raise"``), repeated ids (``duplicate_user_id``, the first row
    wins; an error with ``on_error="raise"``) and, in both modes, ids that are not among ``known_users``
    (``unknown_user``, logged with examples). Check-in users without a row are counted in the notes
    (``checkin_users_without_row``). Columns other than ``user_id`` whose every value is a number become ``Int64``
    (all integers) or ``float64``, unless their name ends in ``_id``; the others are strings (missing values: NA).

    Returns:
        `pd.DataFrame`: the kept rows, in file order, with ``user_id`` first.
    """
    check_on_error(on_error)
    path = Path(path)
    frames = []
    dropped: dict[str, int] = {}
    rows_in = 0
    for chunk, lines in iter_table_chunks(path, sep=default_sep(path), header=True, encoding=encoding,
                                          on_error=on_error, account_dropped=dropped):
        rows_in += len(chunk)
        blank = blank_rows(chunk)
        if blank.any():
            dropped["blank_line"] = dropped.get("blank_line", 0) + int(blank.sum())
            chunk, lines = chunk.loc[~blank], lines[~blank]
        if "user_id" not in chunk.columns:
            raise DataValidationError(
                f"{path}: missing column 'user_id'; have {list(chunk.columns)}", file=str(path), column="user_id",
                expected="a header with a user_id column",
            )
        chunk = chunk.assign(user_id=chunk["user_id"].astype("string").str.strip(), _line=lines)
        chunk, d = validate_users(chunk, on_error=on_error, file=str(path), lines=lines)
        for k, v in d.items():
            dropped[k] = dropped.get(k, 0) + v
        frames.append(chunk)
    rows_in += dropped.get("wrong_field_count", 0)  # lines the tolerant parser skipped were never yielded
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["user_id", "_line"])
    table["user_id"] = table["user_id"].astype("string")
    dup = table["user_id"].duplicated(keep="first").to_numpy()
    if dup.any():
        if on_error == "raise":
            pos = int(np.flatnonzero(dup)[0])
            raise DataValidationError(
                f"{path}, line {int(table['_line'].iloc[pos])}: user id {table['user_id'].iloc[pos]!r} appears twice; "
                "expected one row per user (use on_error='drop' to keep the first and count the rest)",
                file=str(path), line=int(table["_line"].iloc[pos]), column="user_id", value=table["user_id"].iloc[pos],
                expected="one row per user id",
            )
        dropped["duplicate_user_id"] = int(dup.sum())
        table = table.loc[~dup]
    notes: dict[str, Any] = {}
    if known_users is not None:
        known = pd.Index(pd.unique(pd.Series(np.asarray(known_users, dtype=object)).astype("string")))
        unknown = ~table["user_id"].isin(known).to_numpy()
        if unknown.any():
            examples = table.loc[unknown, "user_id"].head(3).tolist()
            logger.warning("%s: %d user id(s) have no check-ins (e.g. %s); they are left out of the user table",
                           path, int(unknown.sum()), examples)
            dropped["unknown_user"] = int(unknown.sum())
            table = table.loc[~unknown]
        notes["checkin_users_without_row"] = int((~known.isin(table["user_id"])).sum())
    table = table.drop(columns="_line").reset_index(drop=True)
    for col in table.columns:
        if col == "user_id":
            continue
        if col.endswith("_id") or pd.api.types.is_numeric_dtype(table[col]):
            table[col] = table[col] if pd.api.types.is_numeric_dtype(table[col]) else table[col].astype("string")
            continue
        values = table[col]
        numbers = pd.to_numeric(values, errors="coerce")
        if values.notna().any() and numbers.notna().sum() == values.notna().sum():
            whole = numbers.dropna()
            table[col] = numbers.astype("Int64") if (whole == np.floor(whole)).all() else numbers.astype("float64")
        else:
            table[col] = values.astype("string")
    table = table[["user_id", *[c for c in table.columns if c != "user_id"]]]
    if account is not None:
        account.add(f"read users {path.name}", rows_in, len(table), dropped, notes)
    return table


def assemble_checkins(
    chunks: Iterator[tuple[pd.DataFrame, np.ndarray]],
    parse: Callable[[pd.DataFrame], pd.DataFrame],
    *,
    file: str,
    on_error: OnError,
    step_name: str,
    account: RowAccount,
    coord_tolerance: float = 1e-5,
    locations: pd.DataFrame | None = None,
    pre_dropped: dict[str, int] | None = None,
    source_columns: dict[str, str] | None = None,
    keep_extra: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Validate parsed chunks into the canonical check-in table and derive the location table from it.

    ``parse`` maps a raw string chunk to canonical columns (``timestamp`` as nullable Int64; unparsable values as NA),
    keeping the raw index; ``source_columns`` (canonical -> file column) lets errors quote the raw value.
    With ``keep_extra=True`` every other column ``parse`` returns (not a canonical one, nor ``category``, ``name``,
    ``address``, which go to the location table) is kept in the check-in table as a string column after the canonical
    ones (:data:`CHECKIN_COLUMNS`), e.g. the ``weather`` of a CSV source; the fixed-format readers leave it off.
    If the check-ins carry no coordinates, they come from ``locations`` (rows whose location has none are dropped with
    reason ``location_without_coordinates``). A location id seen with several coordinates (beyond
    ``coord_tolerance`` degrees) is an error with ``on_error="raise"``; with ``"drop"`` the first coordinate is kept for
    every row of that location and the merge is counted in the account's notes.
    """
    check_on_error(on_error)
    dropped: dict[str, int] = pre_dropped if pre_dropped is not None else {}
    kept_frames: list[pd.DataFrame] = []
    rows_in = 0
    has_coords: bool | None = None
    wrong_before = dropped.get("wrong_field_count", 0)
    progress = tqdm(desc=f"reading {Path(file).name}", unit=" rows", unit_scale=True, disable=None, leave=False)
    for raw, lines in chunks:
        rows_in += len(raw)
        progress.update(len(raw))
        blank = blank_rows(raw)
        if blank.any():
            dropped["blank_line"] = dropped.get("blank_line", 0) + int(blank.sum())
            raw, lines = raw.loc[~blank], lines[~blank]
        df = parse(raw)
        if has_coords is None:
            has_coords = "latitude" in df.columns
        if not has_coords:
            if locations is None or not {"latitude", "longitude"} <= set(locations.columns):
                raise DataValidationError(
                    f"{file}: the check-ins have no latitude/longitude columns and no location table with coordinates "
                    "was given; map the coordinate columns (--columns latitude=...,longitude=...) or pass a location "
                    "table (--locations)",
                    file=file,
                    column="latitude",
                )
            coords = locations.set_index("location_id")[["latitude", "longitude"]]
            joined = coords.reindex(df["location_id"].astype("string"))
            df = df.assign(latitude=joined["latitude"].to_numpy(), longitude=joined["longitude"].to_numpy())
            missing = df["latitude"].isna().to_numpy() & df["location_id"].notna().to_numpy()
            if missing.any():
                if on_error == "raise":
                    pos = int(np.flatnonzero(missing)[0])
                    raise DataValidationError(
                        file=file,
                        line=int(lines[pos]),
                        column="location_id",
                        value=df["location_id"].iloc[pos],
                        expected="a location id present in the location table with coordinates",
                    )
                dropped["location_without_coordinates"] = dropped.get("location_without_coordinates", 0) + int(
                    missing.sum()
                )
                df, raw, lines = df.loc[~missing], raw.loc[~missing], lines[~missing]
        df, d = validate_checkins(
            df, on_error=on_error, file=file, lines=lines, source=raw, source_columns=source_columns
        )
        for k, v in d.items():
            dropped[k] = dropped.get(k, 0) + v
        out = pd.DataFrame(
            {
                "user_id": df["user_id"].astype("string"),
                "location_id": df["location_id"].astype("string"),
                "timestamp": df["timestamp"].astype("int64"),
                "tz_offset_min": (
                    pd.to_numeric(df["tz_offset_min"]).astype("int16")
                    if "tz_offset_min" in df.columns
                    else np.zeros(len(df), dtype=np.int16)
                ),
                "latitude": pd.to_numeric(df["latitude"]).astype("float64"),
                "longitude": pd.to_numeric(df["longitude"]).astype("float64"),
            }
        )
        if keep_extra:
            for extra in df.columns:
                if extra not in out.columns and extra not in _LOCATION_INFO and extra != "_line":
                    out[extra] = df[extra].astype("string")
        for extra in _LOCATION_INFO:
            if extra in df.columns:
                out[extra] = df[extra].astype("string")
        out["_line"] = _lines_of(df, raw_index=raw.index, lines=lines)
        kept_frames.append(out.reset_index(drop=True))
    progress.close()
    # lines with too many fields, skipped by the tolerant parser (drop mode), were never yielded but are rows in
    rows_in += dropped.get("wrong_field_count", 0) - wrong_before
    if rows_in == 0:
        raise DataValidationError(f"{file}: the file has no data rows", file=file, expected="data rows")
    checkins = pd.concat(kept_frames, ignore_index=True) if kept_frames else None
    if checkins is None or len(checkins) == 0:
        account.add(step_name, rows_in, 0, dropped)
        raise DataValidationError(
            f"{file}: no valid rows left after validation (dropped: {dropped})", file=file, expected="valid rows"
        )
    notes: dict[str, Any] = {}
    checkins, merged = _merge_location_coordinates(checkins, file=file, on_error=on_error, tol=coord_tolerance)
    if merged:
        notes.update(merged)
    # the location table: first coordinate per id, plus category/name when the check-ins carry them
    first = checkins.drop_duplicates("location_id", keep="first")
    loc_cols = ["location_id", "latitude", "longitude"] + [c for c in _LOCATION_INFO if c in first]
    derived = first[loc_cols].reset_index(drop=True)
    if locations is not None:
        # the table's names, categories and extra columns win over what the check-ins carry; coordinates stay the
        # check-ins' (the ones every model sees)
        info_cols = [c for c in locations.columns if c not in ("latitude", "longitude")]
        info = locations[info_cols].drop_duplicates("location_id").set_index("location_id")
        merged_tab = derived.set_index("location_id")
        for col in info.columns:
            values = info[col].reindex(merged_tab.index)
            if col in merged_tab.columns:
                merged_tab[col] = values.where(values.notna(), merged_tab[col])
            else:
                merged_tab[col] = values
        derived = merged_tab.reset_index()
    checkins = checkins.drop(columns=[c for c in (*_LOCATION_INFO, "_line") if c in checkins.columns])
    account.add(step_name, rows_in, len(checkins), dropped, notes)
    return checkins, derived


def read_checkin_file(
    path: str | os.PathLike,
    parse: Callable[[pd.DataFrame], pd.DataFrame],
    *,
    step_name: str,
    sep: str | None,
    header: bool,
    names: list[str] | None = None,
    source_columns: dict[str, str] | None = None,
    on_error: OnError,
    encoding: str | None,
    locations: pd.DataFrame | None,
    chunksize: int,
    coord_tolerance: float,
    account: RowAccount,
    keep_extra: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Chunked reading (:func:`iter_table_chunks`) plus validation and assembly (:func:`assemble_checkins`) of one
    delimited or Parquet check-in file; the readers differ only in their columns and ``parse`` (and ``keep_extra``:
    whether the extra columns ``parse`` returns are kept, see :func:`assemble_checkins`)."""
    dropped: dict[str, int] = {}
    chunks = iter_table_chunks(
        path, sep=sep, names=names, header=header, encoding=encoding, chunksize=chunksize, on_error=on_error,
        account_dropped=dropped,
    )
    return assemble_checkins(
        chunks, parse, file=str(path), on_error=on_error, step_name=step_name, account=account,
        coord_tolerance=coord_tolerance, locations=locations, pre_dropped=dropped, source_columns=source_columns,
        keep_extra=keep_extra,
    )


def _lines_of(df: pd.DataFrame, raw_index: pd.Index, lines: np.ndarray) -> np.ndarray:
    pos = raw_index.get_indexer(df.index)
    return lines[pos]


def _merge_location_coordinates(checkins: pd.DataFrame, *, file: str, on_error: OnError, tol: float):
    codes, uniques = pd.factorize(checkins["location_id"])
    first_pos = np.full(len(uniques), -1, dtype=np.int64)
    # first occurrence of each code: positions sorted by code, stable
    order = np.argsort(codes, kind="stable")
    starts = np.r_[0, np.flatnonzero(np.diff(codes[order])) + 1]
    first_pos[codes[order][starts]] = order[starts]
    lat = checkins["latitude"].to_numpy()
    lon = checkins["longitude"].to_numpy()
    ref_lat, ref_lon = lat[first_pos[codes]], lon[first_pos[codes]]
    conflict = (np.abs(lat - ref_lat) > tol) | (np.abs(lon - ref_lon) > tol)
    if not conflict.any():
        return checkins, {}
    pos = int(np.flatnonzero(conflict)[0])
    if on_error == "raise":
        first_line = int(checkins["_line"].iloc[first_pos[codes[pos]]])
        raise DataValidationError(
            f"{file}, line {int(checkins['_line'].iloc[pos])}: location id {checkins['location_id'].iloc[pos]!r} has "
            f"coordinates ({lat[pos]}, {lon[pos]}) but ({ref_lat[pos]}, {ref_lon[pos]}) at line {first_line}; expected "
            "one coordinate per location id (on_error='drop' keeps the first coordinate and counts the merge)",
            file=file,
            line=int(checkins["_line"].iloc[pos]),
            column="latitude",
            value=(lat[pos], lon[pos]),
            expected="one coordinate per location id",
        )
    n_locs = int(np.unique(codes[conflict]).size)
    n_rows = int(conflict.sum())
    logger.warning(
        "%s: %d location id(s) appear with several coordinates (%d rows); the first coordinate is kept", file, n_locs,
        n_rows,
    )
    checkins = checkins.copy()
    checkins["latitude"] = ref_lat
    checkins["longitude"] = ref_lon
    return checkins, {"coordinate_conflict_locations_merged": n_locs, "coordinate_conflict_rows_moved": n_rows}
