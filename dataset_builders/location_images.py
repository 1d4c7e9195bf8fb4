"""One image per location, for the image modality of M3ob (DESIGN §3.3): pure data, no torch.

Three sources, all giving a :class:`LocationImages` aligned with a locations table (one entry per row, in table order,
``None`` where a location has no image):

- **a folder** (:func:`read_image_folder`): files named by location id, ``<location_id>.png`` / ``.jpg`` / ``.jpeg`` /
  ``.webp`` (any case of the extension). This is how ``SyntheticCheckins.write_land_use_tiles`` names the synthetic
  city's land-use tiles (``<out_dir>/tiles/<location_id>.png``), so that folder is read as it is. A location id that is
  not a plain file name (only letters, digits and ``._-``, not starting with ``.``) is looked up under its
  percent-encoded name too (:func:`image_file_stem`: ``"a/b c"`` -> ``"a%2Fb%20c"``); write such files with that
  function.
- **an image column** of the locations table (:func:`read_image_column`): a ``datasets.Image`` feature, stored in
  Parquet as a struct ``{bytes, path}`` (``bytes`` wins; a relative ``path`` is resolved against the dataset folder), or
  a plain binary column of encoded images, or a string column of file paths.
- **context rasters** (:func:`context_rasters`, :func:`context_raster_images`): for real data without images, a small
  RGB picture of the POI densities around each location, rendered from a POI table (by default the locations table
  itself). Every one of the ``num_groups`` most frequent category groups gets a colour of :data:`GROUP_PALETTE`, the
  others share grey; a pixel is the count-weighted mix of the colours of the POIs around it, its brightness the log of
  their density, on black ground; the location itself is a block of its own group's colour in a white ring at the
  centre. North is up. Coordinates: each window is an equirectangular projection around its own location
  (``dx = R cos(lat0) dlon``, ``dy = R dlat``, ``R`` = :data:`~dataset_builders.descriptions.EARTH_RADIUS_M`), which is
  exact to well under a pixel for windows of a few km away from the poles; candidates come from a k-d tree over
  Earth-centred coordinates, so rendering is vectorised and 100k locations take seconds.

:func:`location_images` picks the source: a folder given by the user, else an image column of the table, else context
rasters. Missing and unreadable images are counted (:attr:`LocationImages.missing`) and logged with a warning, or stop
the call with an :class:`ImageReadError` naming the file when ``on_error="raise"``. Images are kept encoded (file
bytes) and decoded only when needed (:meth:`LocationImages.image`); :meth:`LocationImages.digests` gives the SHA-256 of
each image's bytes for caches.

Example::

    from dataset_builders.location_images import location_images

    imgs = location_images("/data/prepared", images="/data/raw/tiles")
    imgs.present.sum(), imgs.missing  # (812, {"no_file": 3})
    imgs.image(0)  # PIL.Image in RGB
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from scipy.spatial import cKDTree

from .descriptions import EARTH_RADIUS_M, _split_categories, _text_column, unit_xyz
from .schema import OnError, check_on_error
from .synthetic import _SAFE_FILE_NAME

__all__ = [
    "BACKGROUND_COLOUR",
    "GROUP_PALETTE",
    "IMAGE_EXTENSIONS",
    "OTHER_COLOUR",
    "ContextRasters",
    "ImageReadError",
    "LocationImages",
    "context_raster_images",
    "context_rasters",
    "find_image_column",
    "image_file_stem",
    "images_from_arrays",
    "location_images",
    "locations_table",
    "read_image_column",
    "read_image_folder",
]

logger = logging.getLogger(__name__)

#: File extensions read from an image folder, in order of preference when a location has several (any case).
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp")

#: Colours of the most frequent category groups in context rasters, by rank (tab10-like, grey left out).
GROUP_PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),  # blue
    (255, 127, 14),  # orange
    (44, 160, 44),  # green
    (214, 39, 40),  # red
    (148, 103, 189),  # purple
    (140, 86, 75),  # brown
    (227, 119, 194),  # pink
    (188, 189, 34),  # olive
    (23, 190, 207),  # cyan
    (255, 221, 51),  # yellow
)
#: Colour of the POIs of every other group (and of POIs without a category) in context rasters.
OTHER_COLOUR: tuple[int, int, int] = (150, 150, 150)
#: Ground without POIs in context rasters.
BACKGROUND_COLOUR: tuple[int, int, int] = (0, 0, 0)
_RING_COLOUR = np.array([255, 255, 255], dtype=np.uint8)

_SAFE_STEM = re.compile(_SAFE_FILE_NAME)
_PIXEL_BUDGET = 1 << 22  # (location, group, pixel) cells accumulated at once when rendering rasters
_QUERY_BLOCK = 4096
_MAX_LISTED = 5  # files / ids named in a warning


class ImageReadError(ValueError):
    """An image could not be read or decoded.

    Attributes:
        file (`str`): where the image came from (a file path, or ``"column 'image', row 3"``).
        location_id (`str`): the location it belongs to.
        reason (`str`): what went wrong.
    """

    def __init__(self, file: str, location_id: str, reason: str):
        self.file, self.location_id, self.reason = file, location_id, reason
        super().__init__(f"{file}: cannot read the image of location {location_id!r}: {reason}")


# --------------------------------------------------------------------------------------------------------------------
# The container
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class LocationImages:
    """One image (or none) per location, aligned with a locations table.

    Args:
        location_ids (`np.ndarray`): the table's location ids (object array of `str`), in table order.
        items (`list`): per location, the encoded image (`bytes`, e.g. PNG or JPEG file contents), a uint8 array
            ``[H, W, 3]`` (RGB) or ``[H, W]`` (grey), or `None` when the location has no image.
        origins (`list`): per location, where its image came from (a file path or ``"column 'image', row 5"``), for
            messages; `None` where there is no image.
        source (`str`): ``"folder"``, ``"column"``, ``"context_raster"`` or ``"arrays"``.
        missing (`dict[str, int]`): locations without an image, by reason (``"no_file"``, ``"null"``,
            ``"unreadable"``, ...).
        detail (`dict`): what the source was (folder, column, raster settings), for model cards.
    """

    location_ids: np.ndarray
    items: list[bytes | np.ndarray | None]
    origins: list[str | None]
    source: str
    missing: dict[str, int] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (len(self.location_ids) == len(self.items) == len(self.origins)):
            raise ValueError(
                f"location_ids, items and origins must have the same length, got {len(self.location_ids)},"
                f" {len(self.items)} and {len(self.origins)}"
            )

    def __len__(self) -> int:
        return len(self.items)

    @property
    def present(self) -> np.ndarray:
        """`np.ndarray`: bool ``[N]``, whether each location has an image."""
        return np.fromiter((it is not None for it in self.items), dtype=bool, count=len(self.items))

    def digests(self) -> np.ndarray:
        """SHA-256 hex digests of the images, ``S64`` ``[N]`` (``b""`` where there is none).

        An encoded image is hashed as its bytes; an array as its shape and pixels (prefixed, so that it never equals
        the digest of a file).
        """
        out = np.zeros(len(self.items), dtype="S64")
        for i, item in enumerate(self.items):
            if item is None:
                continue
            h = hashlib.sha256()
            if isinstance(item, bytes):
                h.update(item)
            else:
                arr = np.ascontiguousarray(item, dtype=np.uint8)
                h.update(f"uint8-array{arr.shape}:".encode())
                h.update(arr.tobytes())
            out[i] = h.hexdigest().encode("ascii")
        return out

    def image(self, index: int):
        """Decode the image of location ``index`` as a PIL image in RGB (an alpha channel is dropped).

        Raises:
            `ImageReadError`: the bytes are not a readable image (the message names the file).
            `ValueError`: the location has no image.
        """
        from PIL import Image

        item = self.items[index]
        if item is None:
            raise ValueError(f"location {self.location_ids[index]!r} (row {index}) has no image")
        if isinstance(item, bytes):
            try:
                with Image.open(io.BytesIO(item)) as im:
                    return im.convert("RGB")
            except Exception as err:  # PIL raises many kinds (UnidentifiedImageError, OSError, SyntaxError, ...)
                raise ImageReadError(str(self.origins[index]), str(self.location_ids[index]), str(err)) from err
        return Image.fromarray(np.ascontiguousarray(item, dtype=np.uint8)).convert("RGB")

    def drop(self, index: int, reason: str) -> None:
        """Forget the image of location ``index`` and count it as missing for ``reason``."""
        if self.items[index] is not None:
            self.items[index] = None
            self.origins[index] = None
            self.missing[reason] = self.missing.get(reason, 0) + 1

    def describe(self) -> dict[str, Any]:
        """`dict`: the source, its detail and the counts (for model cards and logs)."""
        present = int(self.present.sum())
        return {
            "image_source": self.source,
            **self.detail,
            "num_locations": len(self.items),
            "num_with_image": present,
            "num_without_image": len(self.items) - present,
            "missing": dict(sorted(self.missing.items())),
        }


# --------------------------------------------------------------------------------------------------------------------
# Input tables
# --------------------------------------------------------------------------------------------------------------------


def locations_table(data_or_locations) -> tuple[pd.DataFrame | pa.Table, Path | None]:
    """The locations table of a prepared dataset (a `PreparedDataset` or its folder), or a table given as it is.

    Args:
        data_or_locations (`PreparedDataset`, `str`, `os.PathLike`, `pd.DataFrame` or `pa.Table`): the data.

    Returns:
        `tuple`: ``(table, folder)``: the table (`pa.Table` or `pd.DataFrame`, as given) with a unique
        ``location_id`` column, and the dataset folder (`None` for a table), against which relative image paths are
        resolved.

    Raises:
        `ValueError`: no ``location_id`` column, duplicate ids, or a prepared dataset without locations (grid data).
        `FileNotFoundError`: the folder is not a prepared dataset.
    """
    from .publish import PreparedDataset, load_prepared

    base: Path | None = None
    if isinstance(data_or_locations, (str, os.PathLike)):
        data_or_locations = load_prepared(data_or_locations)
    if isinstance(data_or_locations, PreparedDataset):
        base = Path(data_or_locations.path)
        if "locations" not in _configs(base):
            raise ValueError(
                f"{base} has no locations table (a {data_or_locations.kind!r} dataset); images are per location, so "
                "they need a check-in dataset"
            )
        table = data_or_locations.table("locations")
    elif isinstance(data_or_locations, (pd.DataFrame, pa.Table)):
        table = data_or_locations
    else:
        raise ValueError(
            "expected a prepared dataset (folder or PreparedDataset) or a locations table (pandas or pyarrow), got "
            f"{type(data_or_locations).__name__}"
        )
    names = table.column_names if isinstance(table, pa.Table) else list(table.columns)
    if "location_id" not in names:
        raise ValueError(f"the locations table has no 'location_id' column; columns: {names}")
    ids = _location_ids(table)
    dup = pd.Series(ids).duplicated()
    if dup.any():
        raise ValueError(f"location_id values must be unique, got duplicates {pd.Series(ids)[dup].head(3).tolist()}")
    return table, base


def _configs(path: Path) -> set[str]:
    data = path / "data"
    return {p.name for p in data.iterdir() if p.is_dir()} if data.is_dir() else set()


def _location_ids(table: pd.DataFrame | pa.Table) -> np.ndarray:
    col = table.column("location_id").to_pylist() if isinstance(table, pa.Table) else table["location_id"].tolist()
    bad = [i for i, v in enumerate(col) if v is None or (isinstance(v, float) and np.isnan(v))]
    if bad:
        raise ValueError(f"location_id is missing in row(s) {bad[:_MAX_LISTED]} of the locations table")
    return np.array([str(v) for v in col], dtype=object)


def _column(table: pd.DataFrame | pa.Table, name: str) -> list:
    return table.column(name).to_pylist() if isinstance(table, pa.Table) else table[name].tolist()


def _as_frame(table: pd.DataFrame | pa.Table, columns: Sequence[str]) -> pd.DataFrame:
    names = table.column_names if isinstance(table, pa.Table) else list(table.columns)
    keep = [c for c in columns if c in names]
    if isinstance(table, pa.Table):
        return table.select(keep).to_pandas()
    return table[keep].reset_index(drop=True)


def _report(what: str, ids: list[str], total: int, errors: list[str]) -> None:
    """Warn about locations without an image and about unreadable images (counted as missing)."""
    if ids:
        listed = ", ".join(repr(i) for i in ids[:_MAX_LISTED]) + (" ..." if len(ids) > _MAX_LISTED else "")
        logger.warning("%d of %d locations have no image %s (e.g. %s)", len(ids), total, what, listed)
    if errors:
        listed = "; ".join(errors[:_MAX_LISTED]) + (" ..." if len(errors) > _MAX_LISTED else "")
        logger.warning("%d unreadable image(s) counted as missing: %s", len(errors), listed)


def _check_bytes(data: bytes) -> str | None:
    """Why ``data`` is not a readable image, or `None` (a cheap check: header and structure, no full decode)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    except Exception as err:  # noqa: BLE001 - PIL raises many kinds
        return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    return None


# --------------------------------------------------------------------------------------------------------------------
# Folder
# --------------------------------------------------------------------------------------------------------------------


def image_file_stem(location_id: str) -> str:
    """The file name (without extension) of a location's image in an image folder.

    A location id made of letters, digits and ``._-`` (not starting with ``.``) is its own name, as in
    ``SyntheticCheckins.write_land_use_tiles``; any other id is percent-encoded (``urllib.parse.quote`` keeping only
    letters, digits and ``_.-``; a leading ``.`` becomes ``%2E``), so that it is a single, visible file name on every
    system.

    Args:
        location_id (`str`): the location id.

    Returns:
        `str`: e.g. ``"4a60ba17d1f05c08c118d7ce"``, ``"a%2Fb%20c"`` for ``"a/b c"``.
    """
    location_id = str(location_id)
    if _SAFE_STEM.fullmatch(location_id):
        return location_id
    stem = urllib.parse.quote(location_id, safe="-_.")
    return "%2E" + stem[1:] if stem.startswith(".") else stem


def _legal_name(stem: str) -> bool:
    return bool(stem) and stem not in (".", "..") and not any(c in stem for c in "/\\\0")


def read_image_folder(
    locations, folder: str | os.PathLike, *, on_error: OnError = "drop"
) -> LocationImages:
    """Read one image per location from a folder of files named by location id.

    A location's file is ``<id>.<ext>`` with ``ext`` one of :data:`IMAGE_EXTENSIONS` in any case, ``id`` the location id
    itself or its :func:`image_file_stem` (the percent-encoded id, for ids that are no plain file names). When there are
    several, the first extension of :data:`IMAGE_EXTENSIONS` wins. Sub-folders and other files are ignored. Every file
    is checked to be an image (its header and structure; a full decode comes later, in
    :meth:`LocationImages.image`).

    Args:
        locations (`PreparedDataset`, `str`, `os.PathLike`, `pd.DataFrame` or `pa.Table`): the locations table or a
            prepared dataset (see :func:`locations_table`).
        folder (`str` or `os.PathLike`): the image folder.
        on_error (`str`, *optional*, defaults to ``"drop"``): an unreadable file is counted as missing
            (``"unreadable"``) with a warning naming it (``"drop"``), or raises an :class:`ImageReadError`
            (``"raise"``). Locations without a file are always counted (``"no_file"``) and logged with a warning.

    Returns:
        `LocationImages`: with ``source="folder"``.

    Raises:
        `NotADirectoryError`: ``folder`` is not a folder.
        `ImageReadError`: an unreadable file with ``on_error="raise"``.
    """
    check_on_error(on_error)
    table, _ = locations_table(locations)
    ids = _location_ids(table)
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise NotADirectoryError(f"image folder {root} does not exist or is not a folder")
    t0 = time.perf_counter()
    rank = {ext: k for k, ext in enumerate(IMAGE_EXTENSIONS)}
    files: dict[str, tuple[int, str]] = {}  # stem -> (extension rank, file name)
    several = 0
    with os.scandir(root) as entries:
        for entry in entries:
            stem, dot, ext = entry.name.rpartition(".")
            k = rank.get("." + ext.lower()) if dot else None
            if k is None or not stem or not entry.is_file():
                continue
            if stem in files:
                several += 1
                if k >= files[stem][0]:
                    continue
            files[stem] = (k, entry.name)
    if several:
        logger.warning(
            "%s: %d location(s) have several image files; taking the first extension of %s", root, several,
            list(IMAGE_EXTENSIONS),
        )
    items: list[bytes | np.ndarray | None] = [None] * len(ids)
    origins: list[str | None] = [None] * len(ids)
    missing: dict[str, int] = {}
    no_file: list[str] = []
    errors: list[str] = []
    for i, location_id in enumerate(ids):
        hit = files.get(location_id) if _legal_name(location_id) else None
        if hit is None:
            hit = files.get(image_file_stem(location_id))
        if hit is None:
            no_file.append(location_id)
            continue
        path = root / hit[1]
        try:
            data = path.read_bytes()
        except OSError as err:
            reason = f"{type(err).__name__}: {err.strerror or err}"
        else:
            reason = _check_bytes(data)
        if reason is not None:
            if on_error == "raise":
                raise ImageReadError(str(path), location_id, reason)
            errors.append(f"{path} ({reason})")
            continue
        items[i] = data
        origins[i] = str(path)
    if no_file:
        missing["no_file"] = len(no_file)
    if errors:
        missing["unreadable"] = len(errors)
    _report(f"file in {root}", no_file, len(ids), errors)
    logger.info(
        "read %d images from %s for %d locations in %.2fs", sum(it is not None for it in items), root, len(ids),
        time.perf_counter() - t0,
    )
    return LocationImages(
        location_ids=ids, items=items, origins=origins, source="folder", missing=missing,
        detail={"folder": str(root.resolve())},
    )


# --------------------------------------------------------------------------------------------------------------------
# Image column
# --------------------------------------------------------------------------------------------------------------------


def _is_image_struct(dtype: pa.DataType) -> bool:
    return pa.types.is_struct(dtype) and {"bytes", "path"} <= {dtype.field(k).name for k in range(dtype.num_fields)}


def find_image_column(locations) -> str | None:
    """The image column of a locations table: a ``datasets.Image`` feature (a struct ``{bytes, path}``), or a column
    the table's ``datasets`` features metadata declares an ``Image``.

    Args:
        locations (`pd.DataFrame` or `pa.Table`): the table (a prepared dataset is accepted too).

    Returns:
        `str` or `None`: the column, ``"image"`` when several qualify and one is called so, `None` when there is none.

    Raises:
        `ValueError`: several image columns and none called ``"image"`` (pass ``image_column``).
    """
    if not isinstance(locations, (pd.DataFrame, pa.Table)):
        locations, _ = locations_table(locations)
    found: list[str] = []
    if isinstance(locations, pa.Table):
        declared = _declared_image_columns(locations.schema)
        for f in locations.schema:
            if _is_image_struct(f.type) or f.name in declared:
                found.append(f.name)
    else:
        for name in locations.columns:
            values = locations[name].dropna()
            if len(values) and isinstance(values.iloc[0], dict) and {"bytes", "path"} <= set(values.iloc[0]):
                found.append(str(name))
    if not found:
        return None
    if len(found) == 1:
        return found[0]
    if "image" in found:
        return "image"
    raise ValueError(f"the locations table has several image columns {found}; pass image_column to pick one")


def _declared_image_columns(schema: pa.Schema) -> set[str]:
    import json

    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return set()
    try:
        features = json.loads(meta).get("info", {}).get("features", {})
    except (ValueError, AttributeError):
        return set()
    return {k for k, v in features.items() if isinstance(v, dict) and v.get("_type") == "Image"}


def read_image_column(
    locations,
    column: str | None = None,
    *,
    base_dir: str | os.PathLike | None = None,
    on_error: OnError = "drop",
) -> LocationImages:
    """Read one image per location from a column of the locations table.

    The column may be a ``datasets.Image`` feature (struct ``{bytes, path}``: the bytes when present, else the file at
    ``path``), a binary column of encoded images, or a string column of file paths. Relative paths are resolved
    against ``base_dir`` (defaults to the dataset folder when ``locations`` is a prepared dataset, else the current
    folder). Null values are missing images (``"null"``).

    Args:
        locations (`PreparedDataset`, `str`, `os.PathLike`, `pd.DataFrame` or `pa.Table`): the locations table or a
            prepared dataset.
        column (`str`, *optional*): the column; defaults to :func:`find_image_column`.
        base_dir (`str` or `os.PathLike`, *optional*): folder of relative paths.
        on_error (`str`, *optional*, defaults to ``"drop"``): an unreadable image is counted as missing
            (``"unreadable"``) with a warning naming its row (``"drop"``), or raises an :class:`ImageReadError`
            (``"raise"``).

    Returns:
        `LocationImages`: with ``source="column"``.

    Raises:
        `ValueError`: no such column, or a column of another type.
        `ImageReadError`: an unreadable image with ``on_error="raise"``.
    """
    check_on_error(on_error)
    table, dataset_dir = locations_table(locations)
    ids = _location_ids(table)
    names = table.column_names if isinstance(table, pa.Table) else [str(c) for c in table.columns]
    if column is None:
        column = find_image_column(table)
        if column is None:
            raise ValueError(f"the locations table has no image column (a datasets.Image struct); columns: {names}")
    if column not in names:
        raise ValueError(f"the locations table has no column {column!r}; columns: {names}")
    base = Path(base_dir).expanduser() if base_dir is not None else dataset_dir
    values = _column(table, column)
    items: list[bytes | np.ndarray | None] = [None] * len(ids)
    origins: list[str | None] = [None] * len(ids)
    nulls: list[str] = []
    errors: list[str] = []
    for i, (location_id, value) in enumerate(zip(ids, values)):
        where = f"column {column!r}, row {i}"
        data, path, reason = None, None, None
        if isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
        elif isinstance(value, (bytes, bytearray, memoryview)):
            data = value
        elif isinstance(value, (str, os.PathLike)):
            path = value
        elif value is not None and not (isinstance(value, float) and np.isnan(value)):
            raise ValueError(
                f"{where}: expected an image (a {{bytes, path}} struct, bytes or a path), got {type(value).__name__}"
            )
        if data is not None:
            data = bytes(data)
        elif path is not None and str(path).strip():
            file = Path(os.fspath(path)).expanduser()
            if not file.is_absolute() and base is not None:
                file = base / file
            where = f"{file} ({where})"
            try:
                data = file.read_bytes()
            except OSError as err:
                reason = f"{type(err).__name__}: {err.strerror or err}"
        else:
            nulls.append(location_id)
            continue
        if reason is None:
            reason = _check_bytes(data)
        if reason is not None:
            if on_error == "raise":
                raise ImageReadError(where, location_id, reason)
            errors.append(f"{where} ({reason})")
            continue
        items[i] = data
        origins[i] = where
    missing: dict[str, int] = {}
    if nulls:
        missing["null"] = len(nulls)
    if errors:
        missing["unreadable"] = len(errors)
    _report(f"in column {column!r}", nulls, len(ids), errors)
    return LocationImages(
        location_ids=ids, items=items, origins=origins, source="column", missing=missing, detail={"column": column}
    )


# --------------------------------------------------------------------------------------------------------------------
# Arrays (e.g. the synthetic city's land-use tiles)
# --------------------------------------------------------------------------------------------------------------------


def images_from_arrays(
    locations, location_ids: Sequence[str], arrays: np.ndarray, *, source: str = "arrays",
    detail: dict[str, Any] | None = None,
) -> LocationImages:
    """Images given as arrays for some location ids, aligned with a locations table.

    For instance the synthetic city's tiles: ``images_from_arrays(data, city.pois["location_id"],
    city.land_use_tiles(), source="land_use_tiles")``.

    Args:
        locations (`PreparedDataset`, `str`, `os.PathLike`, `pd.DataFrame` or `pa.Table`): the table to align to.
        location_ids (`Sequence[str]`): the id of each array row (unique).
        arrays (`np.ndarray`): uint8 ``[M, H, W, 3]`` (or ``[M, H, W]``), one image per id.
        source (`str`, *optional*, defaults to ``"arrays"``): the name of the source, for model cards.
        detail (`dict`, *optional*): more about the source, for model cards.

    Returns:
        `LocationImages`: locations of the table without an array are missing (``"no_array"``).
    """
    table, _ = locations_table(locations)
    ids = _location_ids(table)
    arrays = np.asarray(arrays)
    given = [str(v) for v in location_ids]
    if arrays.dtype != np.uint8 or arrays.ndim not in (3, 4) or len(arrays) != len(given):
        raise ValueError(
            f"arrays must be uint8 [M, H, W, 3] or [M, H, W] with one row per location id ({len(given)}), got "
            f"{arrays.dtype} {arrays.shape}"
        )
    if len(set(given)) != len(given):
        raise ValueError("location_ids of the arrays must be unique")
    row = {v: k for k, v in enumerate(given)}
    items: list[bytes | np.ndarray | None] = [None] * len(ids)
    origins: list[str | None] = [None] * len(ids)
    absent: list[str] = []
    for i, location_id in enumerate(ids):
        k = row.get(location_id)
        if k is None:
            absent.append(location_id)
            continue
        items[i] = arrays[k]
        origins[i] = f"{source}[{k}]"
    _report(f"among the {len(given)} arrays", absent, len(ids), [])
    return LocationImages(
        location_ids=ids, items=items, origins=origins, source=source,
        missing={"no_array": len(absent)} if absent else {}, detail=dict(detail or {}),
    )


# --------------------------------------------------------------------------------------------------------------------
# Context rasters
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class ContextRasters:
    """Context rasters of a locations table (:func:`context_rasters`).

    Args:
        images (`np.ndarray`): uint8 ``[N, size, size, 3]`` (RGB, row 0 the northern edge), in table order.
        groups (`list[str]`): the category groups with a colour, in colour order (``colours[k]`` is ``groups[k]``'s).
        colours (`np.ndarray`): uint8 ``[len(groups) + 1, 3]``; the last row is :data:`OTHER_COLOUR`.
        size (`int`): pixels per side.
        radius_m (`float`): half the side of a window, in metres.
        saturation (`float`): the density (POIs per pixel, after smoothing) shown at full brightness.
    """

    images: np.ndarray
    groups: list[str]
    colours: np.ndarray
    size: int
    radius_m: float
    saturation: float

    def describe(self) -> dict[str, Any]:
        return {
            "raster_size": self.size,
            "raster_radius_m": self.radius_m,
            "raster_saturation": self.saturation,
            "raster_groups": list(self.groups),
        }


def _coordinates(frame: pd.DataFrame, what: str) -> tuple[np.ndarray, np.ndarray]:
    for c in ("latitude", "longitude"):
        if c not in frame.columns:
            raise ValueError(f"the {what} table has no {c!r} column; columns: {list(frame.columns)}")
    lat = pd.to_numeric(frame["latitude"], errors="coerce").to_numpy(dtype=np.float64)
    lon = pd.to_numeric(frame["longitude"], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~(np.isfinite(lat) & np.isfinite(lon) & (np.abs(lat) <= 90) & (np.abs(lon) <= 180))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"the {what} table has {int(bad.sum())} row(s) without valid coordinates, e.g. row {i}: latitude "
            f"{frame['latitude'].iloc[i]!r}, longitude {frame['longitude'].iloc[i]!r} (degrees expected)"
        )
    return lat, lon


def _groups_of(frame: pd.DataFrame) -> np.ndarray:
    """Category group per row: ``category_group``, else the top level of a hierarchical ``category``
    (``"Food > Coffee Shop"``), else the category itself; `None` without any."""
    leaf, group = _split_categories(_text_column(frame, "category"), _text_column(frame, "category_group"))
    return np.where(pd.isna(group), leaf, group)


def _check_number(name: str, value, minimum: float, *, integer: bool = False, maximum: float | None = None):
    ok_types = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    if isinstance(value, bool) or not isinstance(value, ok_types) or not np.isfinite(value) or value < minimum or (
        maximum is not None and value > maximum
    ):
        kind = "an integer" if integer else "a number"
        rng = f">= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
        raise ValueError(f"{name} must be {kind} {rng}, got {value!r}")
    return int(value) if integer else float(value)


def context_rasters(
    locations,
    pois=None,
    *,
    size: int = 32,
    radius_m: float = 400.0,
    num_groups: int = 8,
    groups: Sequence[str] | None = None,
    saturation: float = 3.0,
) -> ContextRasters:
    """Render a small RGB picture of the POIs around every location, for an image encoder (a ViT).

    Every window is the square within ``radius_m`` metres (east-west and north-south) of its location, north up,
    ``size`` pixels per side, in an equirectangular projection around the location. Each POI of ``pois`` in the window
    adds a soft 3 x 3 pixel blob (weights 1 at its pixel, 1/2 beside, 1/4 diagonally) to the density of its group;
    a pixel's colour is the density-weighted mix of the group colours, at brightness
    ``min(1, log(1 + density) / log(1 + saturation))`` over black ground. Groups are ``category_group``, else the top
    level of a hierarchical ``category`` (``"Food > Coffee Shop"``), else the category; the ``num_groups`` most frequent
    among ``pois`` (ties alphabetical) get the colours of :data:`GROUP_PALETTE` in that order, all others (and POIs
    without a category) :data:`OTHER_COLOUR`. The location itself is a block of ``max(2, size // 16)`` pixels in its
    group's colour inside a 1-pixel white ring at the centre. Colours are assigned per call; pass ``groups`` to keep
    them the same across datasets (e.g. a second city). Deterministic: the same input gives the same bytes.

    Args:
        locations (`PreparedDataset`, `str`, `os.PathLike`, `pd.DataFrame` or `pa.Table`): the locations (with
            ``latitude``, ``longitude`` in degrees, and optionally ``category`` / ``category_group``).
        pois (`pd.DataFrame` or `pa.Table`, *optional*): the POIs drawn (same columns); defaults to the locations
            themselves. A prepared dataset keeps only the visited locations, so passing the full POI table of the
            source (e.g. the Foursquare venues) gives richer pictures.
        size (`int`, *optional*, defaults to 32): pixels per side, 8 to 256.
        radius_m (`float`, *optional*, defaults to 400.0): half the side of a window in metres (> 0, at most 50 km).
        num_groups (`int`, *optional*, defaults to 8): groups with their own colour, 0 to ``len(GROUP_PALETTE)``
            (ignored when ``groups`` is given).
        groups (`Sequence[str]`, *optional*): the groups with their own colour, in colour order.
        saturation (`float`, *optional*, defaults to 3.0): the smoothed density (POIs per pixel) shown at full
            brightness (> 0).

    Returns:
        `ContextRasters`: the images (uint8 ``[N, size, size, 3]``, table order) and the colour legend.
    """
    size = _check_number("size", size, 8, integer=True, maximum=256)
    radius_m = _check_number("radius_m", radius_m, 1e-9, maximum=50_000.0)
    saturation = _check_number("saturation", saturation, 1e-9)
    table, _ = locations_table(locations)
    loc = _as_frame(table, ("location_id", "latitude", "longitude", "category", "category_group"))
    if pois is None:
        poi = loc
    elif isinstance(pois, (pd.DataFrame, pa.Table)):
        poi = _as_frame(pois, ("latitude", "longitude", "category", "category_group"))
    else:
        raise ValueError(f"pois must be a pandas DataFrame or a pyarrow Table, got {type(pois).__name__}")
    lat, lon = _coordinates(loc, "locations")
    plat, plon = _coordinates(poi, "pois")
    poi_group = _groups_of(poi)
    loc_group = _groups_of(loc)
    if groups is None:
        num_groups = _check_number("num_groups", num_groups, 0, integer=True, maximum=len(GROUP_PALETTE))
        known = pd.Series([g for g in poi_group if g is not None], dtype=object)
        counts = known.value_counts()
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))
        groups = [str(g) for g, _ in ranked[:num_groups]]
    else:
        if isinstance(groups, str) or len(set(groups)) != len(groups) or len(groups) > len(GROUP_PALETTE):
            raise ValueError(f"groups must be a list of at most {len(GROUP_PALETTE)} distinct names, got {groups!r}")
        groups = [str(g) for g in groups]
    colours = np.array([*GROUP_PALETTE[: len(groups)], OTHER_COLOUR], dtype=np.uint8)
    code_of = {g: k for k, g in enumerate(groups)}
    other = len(groups)
    poi_code = np.array([code_of.get(g, other) for g in poi_group], dtype=np.int64)
    loc_code = np.array([code_of.get(g, other) for g in loc_group], dtype=np.int64)
    t0 = time.perf_counter()
    images = _render(lat, lon, plat, plon, poi_code, loc_code, colours, size, radius_m, saturation)
    logger.info(
        "rendered %d context rasters of %dx%d (+-%g m, %d POIs) in %.2fs", len(images), size, size, radius_m,
        len(plat), time.perf_counter() - t0,
    )
    return ContextRasters(
        images=images, groups=groups, colours=colours, size=size, radius_m=radius_m, saturation=saturation
    )


def _render(
    lat: np.ndarray,
    lon: np.ndarray,
    plat: np.ndarray,
    plon: np.ndarray,
    poi_code: np.ndarray,
    loc_code: np.ndarray,
    colours: np.ndarray,
    size: int,
    radius_m: float,
    saturation: float,
) -> np.ndarray:
    n, num_codes = len(lat), len(colours)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    images[:] = np.array(BACKGROUND_COLOUR, dtype=np.uint8)
    pixel = 2.0 * radius_m / size
    marker = max(2, size // 16)
    c0 = (size - marker) // 2
    palette = colours.astype(np.float32)
    background = np.array(BACKGROUND_COLOUR, dtype=np.float32)
    scale = np.float32(1.0 / np.log1p(saturation))
    if n:
        tree = cKDTree(unit_xyz(plat, plon)) if len(plat) else None
        # Candidates within the window's corner distance (chord <= arc), with a margin for the projection.
        chord = float(radius_m * np.sqrt(2.0) * 1.01 + 1.0)
        xyz = unit_xyz(lat, lon)
        block = max(1, min(_QUERY_BLOCK, _PIXEL_BUDGET // (num_codes * size * size)))
        deg = np.pi / 180.0 * EARTH_RADIUS_M
        for start in range(0, n, block):
            stop = min(n, start + block)
            m = stop - start
            density = np.zeros(m * num_codes * size * size, dtype=np.float64)
            if tree is not None:
                pairs = cKDTree(xyz[start:stop]).sparse_distance_matrix(tree, chord, output_type="ndarray")
                i = pairs["i"].astype(np.int64)
                j = pairs["j"].astype(np.int64)
                g = i + start
                dlon = (plon[j] - lon[g] + 180.0) % 360.0 - 180.0
                dx = dlon * deg * np.cos(np.radians(lat[g]))
                dy = (plat[j] - lat[g]) * deg
                col = np.floor((dx + radius_m) / pixel).astype(np.int64)
                row = np.floor((radius_m - dy) / pixel).astype(np.int64)
                inside = (col >= 0) & (col < size) & (row >= 0) & (row < size)
                i, j, col, row = i[inside], j[inside], col[inside], row[inside]
                cell = ((i * num_codes + poi_code[j]) * size + row) * size + col
                density = np.bincount(cell, minlength=len(density)).astype(np.float32)
            density = density.reshape(m, num_codes, size, size).astype(np.float32, copy=False)
            density = _blur(density)
            total = density.sum(axis=1)  # [m, size, size]
            mix = np.einsum("mkhw,kc->mhwc", density, palette) / np.maximum(total, 1e-12)[..., None]
            alpha = np.minimum(np.log1p(total) * scale, 1.0)[..., None]
            out = background + (mix - background) * alpha
            images[start:stop] = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    # The location itself, at the centre, in a white ring.
    images[:, c0 - 1 : c0 + marker + 1, c0 - 1 : c0 + marker + 1] = _RING_COLOUR
    images[:, c0 : c0 + marker, c0 : c0 + marker] = colours[loc_code][:, None, None, :]
    return images


def _blur(x: np.ndarray) -> np.ndarray:
    """Separable [1/2, 1, 1/2] smoothing over the last two axes (a soft 3 x 3 blob per POI, peak 1)."""
    y = x.copy()
    y[..., 1:, :] += 0.5 * x[..., :-1, :]
    y[..., :-1, :] += 0.5 * x[..., 1:, :]
    z = y.copy()
    z[..., :, 1:] += 0.5 * y[..., :, :-1]
    z[..., :, :-1] += 0.5 * y[..., :, 1:]
    return z


def context_raster_images(locations, pois=None, **kwargs) -> LocationImages:
    """:func:`context_rasters` as a :class:`LocationImages` (``source="context_raster"``, every location present).

    Args:
        locations: as for :func:`context_rasters`.
        pois: as for :func:`context_rasters`.
        **kwargs: ``size``, ``radius_m``, ``num_groups``, ``groups``, ``saturation`` of :func:`context_rasters`.
    """
    table, _ = locations_table(locations)
    rasters = context_rasters(table, pois, **kwargs)
    ids = _location_ids(table)
    return LocationImages(
        location_ids=ids,
        items=list(rasters.images),
        origins=[f"context raster of {v!r}" for v in ids],
        source="context_raster",
        detail={**rasters.describe(), "raster_pois": "locations" if pois is None else f"{len(pois)} POIs"},
    )


# --------------------------------------------------------------------------------------------------------------------
# Source selection
# --------------------------------------------------------------------------------------------------------------------


def location_images(
    data_or_locations,
    *,
    images: str | os.PathLike | LocationImages | None = None,
    image_column: str | None = None,
    pois=None,
    on_error: OnError = "drop",
) -> LocationImages:
    """One image per location, from the first source that applies: the folder ``images``, else the image column of
    the table (``image_column``, or the one :func:`find_image_column` finds), else context rasters rendered from
    ``pois`` (defaults to the locations themselves; settings of :func:`context_rasters`'s defaults).

    Args:
        data_or_locations (`PreparedDataset`, `str`, `os.PathLike`, `pd.DataFrame` or `pa.Table`): a prepared dataset
            (folder) or a locations table.
        images (`str`, `os.PathLike` or `LocationImages`, *optional*): an image folder (:func:`read_image_folder`), or
            images already built (e.g. :func:`context_raster_images` with other settings), which must be aligned with
            the table.
        image_column (`str`, *optional*): the image column to read when no folder is given.
        pois (`pd.DataFrame` or `pa.Table`, *optional*): POIs drawn into context rasters.
        on_error (`str`, *optional*, defaults to ``"drop"``): unreadable images are counted as missing with a warning
            (``"drop"``) or raise an :class:`ImageReadError` (``"raise"``).

    Returns:
        `LocationImages`: aligned with the locations table.
    """
    check_on_error(on_error)
    table, base = locations_table(data_or_locations)
    if isinstance(images, LocationImages):
        ids = _location_ids(table)
        if len(images) != len(ids) or not np.array_equal(images.location_ids.astype(str), ids.astype(str)):
            raise ValueError("the LocationImages given as images are not aligned with the locations table")
        return images
    if images is not None:
        if not isinstance(images, (str, os.PathLike)):
            raise ValueError(f"images must be a folder or a LocationImages, got {type(images).__name__}")
        return read_image_folder(table, images, on_error=on_error)
    column = image_column if image_column is not None else find_image_column(table)
    if column is not None:
        return read_image_column(table, column, base_dir=base, on_error=on_error)
    return context_raster_images(table, pois)
