"""YJMob100K / HuMob grid trajectories: ``uid,d,t,x,y`` (header optional, gzip or plain).

Cells are 500 m on a 200 x 200 grid; the 2023/2024 releases use 1..200, the GIS Cup 2025 files 1..200 too, some
derived files 0..199 — the reader records which (``coordinate_base``). ``999`` marks a hidden cell (the challenge's
prediction targets); such rows are kept and counted.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..schema import HIDDEN_CELL, DataValidationError, OnError, RowAccount, check_on_error, validate_grid
from .base import DEFAULT_CHUNKSIZE, LoadedGrid, _is_gzip, blank_rows, iter_table_chunks, resolve_encoding

__all__ = ["read_yjmob", "sorted_by_user_day_slot"]

logger = logging.getLogger(__name__)

_NAMES = ["uid", "d", "t", "x", "y"]
_DTYPES = {"uid": np.int64, "d": np.int16, "t": np.int8, "x": np.int16, "y": np.int16}


def _has_header(path: Path, encoding: str) -> bool:
    import gzip

    opener = gzip.open if _is_gzip(path) else open
    with opener(path, "rt", encoding=encoding, errors="replace") as f:
        first = f.readline()
    fields = [s.strip().lower() for s in first.replace("\t", ",").split(",")]
    return not all(s.lstrip("-").isdigit() for s in fields if s)


def _read_clean_numeric(
    path: Path, *, sep: str, header: bool, encoding: str, grid_size: int, slots_per_day: int
) -> pd.DataFrame | None:
    """Fast path for well-formed files (the usual case at 100M rows): pyarrow's multi-threaded CSV reader straight
    into integer columns, no string materialisation. Returns ``None`` at the first irregularity (a non-integer
    field, a wrong field count, a blank line, a value out of range), and the robust reader then reads the file with
    exact line numbers and counted drops."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    if encoding not in ("utf-8", "utf-8-sig", "latin-1", "ascii"):
        return None
    read_opts = pacsv.ReadOptions(
        block_size=16 << 20,
        use_threads=False,
        column_names=None if header else _NAMES,
        encoding="utf8" if encoding.startswith("utf") else encoding,
    )
    parse_opts = pacsv.ParseOptions(delimiter=sep, ignore_empty_lines=False)
    types = {c: pa.int64() for c in _NAMES}
    try:
        reader = pacsv.open_csv(path, read_options=read_opts, parse_options=parse_opts,
                                convert_options=pacsv.ConvertOptions(column_types=types))
        if [c.strip().lower() for c in reader.schema.names] != _NAMES:
            return None
        parts: dict[str, list[np.ndarray]] = {name: [] for name in _NAMES}
        for batch in reader:
            cols = {name: batch.column(i).to_numpy(zero_copy_only=False) for i, name in enumerate(_NAMES)}
            if any(batch.column(i).null_count for i in range(len(_NAMES))):
                return None
            x, y = cols["x"], cols["y"]
            hidden_x, hidden_y = x == HIDDEN_CELL, y == HIDDEN_CELL
            ok = (
                (cols["uid"] >= 0).all() and (cols["d"] >= 0).all() and (cols["d"] < 2**15).all()
                and ((cols["t"] >= 0) & (cols["t"] < slots_per_day)).all()
                and (hidden_x == hidden_y).all()
                and (((x >= 0) & (x <= grid_size)) | hidden_x).all()
                and (((y >= 0) & (y <= grid_size)) | hidden_y).all()
            )
            if not ok:  # the same rules as validate_grid, on integers; the robust reader reports or counts the rows
                return None
            for name, dtype in _DTYPES.items():
                parts[name].append(cols[name].astype(dtype))
    except (pa.ArrowInvalid, UnicodeDecodeError, ValueError) as err:
        logger.info("%s: not a clean integer table (%s); using the line-exact reader", path, str(err)[:200])
        return None
    if not parts["uid"]:
        return None
    # one column at a time: the transient copy is one column, not the table
    return pd.DataFrame({name: np.concatenate(parts.pop(name)) for name in _NAMES}, copy=False)


def sorted_by_user_day_slot(grid: pd.DataFrame, block: int = 1 << 22) -> pd.DataFrame:
    """Stable sort by (uid, d, t), skipped when the file is already in that order (the usual case). The order check
    runs in blocks, so its temporaries stay small next to the table."""
    uid, d, t = grid["uid"].to_numpy(), grid["d"].to_numpy(), grid["t"].to_numpy()
    in_order = True
    for lo in range(0, max(len(grid) - 1, 0), block):
        hi = min(len(grid), lo + block + 1)
        step_u = np.diff(uid[lo:hi])
        step_d = np.diff(d[lo:hi].astype(np.int32))
        step_t = np.diff(t[lo:hi].astype(np.int16))
        if not ((step_u > 0) | ((step_u == 0) & ((step_d > 0) | ((step_d == 0) & (step_t >= 0))))).all():
            in_order = False
            break
    if in_order:
        return grid.reset_index(drop=True)
    order = np.lexsort((t, d, uid))
    return grid.take(order).reset_index(drop=True)


def read_yjmob(
    path: str | os.PathLike,
    *,
    on_error: OnError = "drop",
    encoding: str | None = None,
    grid_size: int = 200,
    slots_per_day: int = 48,
    chunksize: int = DEFAULT_CHUNKSIZE * 4,
    account: RowAccount | None = None,
) -> LoadedGrid:
    """Read a HuMob grid file into the canonical grid table (uid int64, d int16, t int8, x/y int16).

    Duplicate (uid, d, t) rows keep the first and are counted (``duplicate_slot``).
    """
    check_on_error(on_error)
    path = Path(path)
    account = account if account is not None else RowAccount()
    if not path.exists():
        raise FileNotFoundError(f"input file not found: {path}")
    if path.stat().st_size == 0:
        raise DataValidationError(f"{path}: the file is empty", file=str(path), expected="uid,d,t,x,y rows")
    enc = resolve_encoding(path, encoding)
    header = _has_header(path, enc)
    sep = "\t" if path.name.lower().removesuffix(".gz").endswith((".tsv", ".txt")) else ","
    fast = _read_clean_numeric(path, sep=sep, header=header, encoding=enc, grid_size=grid_size,
                               slots_per_day=slots_per_day)
    dropped: dict[str, int] = {}
    frames = []
    rows_in = 0
    progress = tqdm(desc=f"reading {path.name}", unit=" rows", unit_scale=True, disable=None, leave=False)
    chunks = iter(()) if fast is not None else iter_table_chunks(
        path, sep=sep, names=_NAMES, header=header, encoding=enc, chunksize=chunksize, on_error=on_error,
        account_dropped=dropped)
    if fast is not None:
        frames, rows_in = [fast], len(fast)
    for raw, lines in chunks:  # the robust path: strings, exact line numbers, every bad row counted or reported
        rows_in += len(raw)
        progress.update(len(raw))
        if header:
            cols = [c.strip().lower() for c in raw.columns]
            if cols != _NAMES:
                missing = [c for c in _NAMES if c not in cols]
                if missing:
                    raise DataValidationError(
                        f"{path}: missing column(s) {missing}; the header has {list(raw.columns)} (expected "
                        "uid,d,t,x,y)", file=str(path), column=missing[0])
            raw = raw.set_axis(cols, axis=1)[_NAMES]
        blank = blank_rows(raw)
        if blank.any():
            dropped["blank_line"] = dropped.get("blank_line", 0) + int(blank.sum())
            raw, lines = raw.loc[~blank], lines[~blank]
        good, d = validate_grid(raw, on_error=on_error, file=str(path), lines=lines, grid_size=grid_size,
                                slots_per_day=slots_per_day)
        for k, v in d.items():
            dropped[k] = dropped.get(k, 0) + v
        frames.append(pd.DataFrame({
            "uid": pd.to_numeric(good["uid"]).astype("int64"),
            "d": pd.to_numeric(good["d"]).astype("int16"),
            "t": pd.to_numeric(good["t"]).astype("int8"),
            "x": pd.to_numeric(good["x"]).astype("int16"),
            "y": pd.to_numeric(good["y"]).astype("int16"),
        }))
    rows_in += dropped.get("wrong_field_count", 0)  # lines the tolerant parser skipped were never yielded
    progress.close()
    if rows_in == 0:
        raise DataValidationError(f"{path}: the file has no data rows", file=str(path), expected="uid,d,t,x,y rows")
    grid = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=_NAMES)
    if len(grid) == 0:
        account.add(f"read yjmob {path.name}", rows_in, 0, dropped)
        raise DataValidationError(f"{path}: no valid rows (dropped: {dropped})", file=str(path))
    grid = sorted_by_user_day_slot(grid)
    uid_a, d_a, t_a = grid["uid"].to_numpy(), grid["d"].to_numpy(), grid["t"].to_numpy()
    dup = np.zeros(len(grid), dtype=bool)  # sorted: a repeated (uid, d, t) follows its first row
    dup[1:] = (uid_a[1:] == uid_a[:-1]) & (d_a[1:] == d_a[:-1]) & (t_a[1:] == t_a[:-1])
    if dup.any():
        if on_error == "raise":
            row = grid.loc[dup].iloc[0]
            raise DataValidationError(
                f"{path}: user {row['uid']} has several rows for day {row['d']} slot {row['t']}; expected at most one "
                "row per (uid, d, t)", file=str(path), column="t", value=(int(row["uid"]), int(row["d"]), int(row["t"])),
                expected="one row per (uid, d, t)")
        dropped["duplicate_slot"] = int(dup.sum())
        grid = grid.loc[~dup].reset_index(drop=True)
    real = (grid["x"] != HIDDEN_CELL).to_numpy()
    xs, ys = grid["x"].to_numpy()[real], grid["y"].to_numpy()[real]
    has_zero = bool(real.any() and (min(xs.min(), ys.min()) == 0))
    has_max = bool(real.any() and (max(xs.max(), ys.max()) == grid_size))
    if has_zero and has_max:
        raise DataValidationError(
            f"{path}: cells use both 0 and {grid_size}; expected 1..{grid_size} or 0..{grid_size - 1}",
            file=str(path), column="x", expected=f"1..{grid_size} or 0..{grid_size - 1}")
    base = 0 if has_zero else 1
    notes = {"hidden_rows": int((~real).sum())}
    account.add(f"read yjmob {path.name}", rows_in, len(grid), dropped, notes)
    meta = {
        "format": "yjmob",
        "source_files": [str(path)],
        "coordinate_base": base,
        "grid_size": grid_size,
        "slots_per_day": slots_per_day,
        "num_users": int(grid["uid"].nunique()),
        "day_range": [int(grid["d"].min()), int(grid["d"].max())],
        "hidden_cell": HIDDEN_CELL,
        "time_reference": "relative_day0",
    }
    return LoadedGrid(grid, account, meta)
