"""Location descriptions for semantic encoding (QT-Mob, DESIGN §5.1 step 1).

Every location gets a short English text made of

- **intrinsic** lines: its name (when it has one), its category (with the category group when known), its address
  when known, and always its coordinates::

      Name: Ana's Coffee
      Category: Food > Coffee Shop
      Located at 40.7003, -73.9336.

- **contextual** lines: what lies around it: the number of *other* locations within ``radius_m`` and their most
  frequent categories, and the nearest *other* named locations with their distances::

      Within 500 m: 12 places — 4 Coffee Shop, 3 Office, 2 Bar, 1 Park, 1 Pub, 1 other.
      Nearest named places: Owl Pizzeria (85 m), Patel Hall (140 m), Rose Capital (212 m).

Neighbourhoods are computed with a scipy k-d tree over Earth-centred (ECEF) coordinates on a sphere of the mean
Earth radius, so straight-line (chord) distances convert exactly to great-circle distances: the distances in the text
agree with the haversine formula. No pairwise Python loops: a radius query per block of locations, then vectorised
counting of (location, neighbour category) pairs. 100,000 locations take a few seconds.

The wording is deterministic (ties between categories of equal count are broken alphabetically) and short, since the
texts are meant for encoders with a 256-token window (all-MiniLM-L6-v2) or an LLM.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

__all__ = ["EARTH_RADIUS_M", "build_descriptions", "format_distance", "great_circle_m", "unit_xyz"]

logger = logging.getLogger(__name__)

EARTH_RADIUS_M = 6_371_008.8
"""Mean Earth radius in metres (IUGG), the sphere on which distances are measured."""

_REQUIRED = ("location_id", "latitude", "longitude")
_QUERY_BLOCK = 8192
_HIERARCHY_SEPARATOR = " > "
_OUTPUT_COLUMNS = ("location_id", "intrinsic", "contextual", "description")


def format_distance(metres: float) -> str:
    """Format a distance for a description: whole metres below 1 km (``"120 m"``), else km with one decimal.

    Args:
        metres (`float`): a non-negative distance in metres.

    Returns:
        `str`: e.g. ``"85 m"``, ``"1.2 km"``.
    """
    rounded = int(round(float(metres)))
    if rounded < 1000:
        return f"{rounded} m"
    return f"{metres / 1000.0:.1f} km"


def _format_radius(radius_m: float) -> str:
    if radius_m < 1000:
        return f"{radius_m:g} m"
    return f"{radius_m / 1000.0:g} km"


def _check_count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _text_column(df: pd.DataFrame, column: str) -> np.ndarray:
    """Object array of stripped strings, with ``None`` for missing values and empty or blank strings."""
    n = len(df)
    if column not in df.columns:
        return np.full(n, None, dtype=object)
    values = df[column]
    missing = values.isna().to_numpy()
    out = np.full(n, None, dtype=object)
    present = ~missing
    if present.any():
        stripped = values[present].astype(str).str.strip().to_numpy(dtype=object)
        stripped[stripped == ""] = None
        out[present] = stripped
    return out


def unit_xyz(lat_deg: np.ndarray, lon_deg: np.ndarray) -> np.ndarray:
    """[N, 3] ECEF coordinates in metres on a sphere of radius :data:`EARTH_RADIUS_M`."""
    lat = np.radians(lat_deg)
    lon = np.radians(lon_deg)
    cos_lat = np.cos(lat)
    return EARTH_RADIUS_M * np.column_stack([cos_lat * np.cos(lon), cos_lat * np.sin(lon), np.sin(lat)])


def _chord_to_arc(chord: np.ndarray) -> np.ndarray:
    """Great-circle distance (metres) from the straight-line distance between two points on the sphere."""
    return 2.0 * EARTH_RADIUS_M * np.arcsin(np.clip(chord / (2.0 * EARTH_RADIUS_M), 0.0, 1.0))


def great_circle_m(lat1_deg, lon1_deg, lat2_deg, lon2_deg) -> np.ndarray:
    """Great-circle distance in metres between paired points (degrees), elementwise."""
    chord = np.linalg.norm(unit_xyz(np.asarray(lat1_deg, dtype=np.float64), np.asarray(lon1_deg, dtype=np.float64))
                           - unit_xyz(np.asarray(lat2_deg, dtype=np.float64), np.asarray(lon2_deg, dtype=np.float64)),
                           axis=1)
    return _chord_to_arc(chord)


def _arc_to_chord(arc: float) -> float:
    return 2.0 * EARTH_RADIUS_M * math.sin(min(arc, math.pi * EARTH_RADIUS_M) / (2.0 * EARTH_RADIUS_M))


def _split_categories(category: np.ndarray, group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Leaf category and group; a hierarchical category ``"Food > Coffee Shop"`` gives the group when none is set."""
    leaf = category.copy()
    group = group.copy()
    for i in np.flatnonzero([c is not None and _HIERARCHY_SEPARATOR in c for c in category]):
        parts = [p.strip() for p in category[i].split(_HIERARCHY_SEPARATOR.strip())]
        parts = [p for p in parts if p]
        if not parts:
            leaf[i] = None
            continue
        leaf[i] = parts[-1]
        if group[i] is None and len(parts) > 1:
            group[i] = parts[0]
    return leaf, group


def _neighbour_categories(
    xyz: np.ndarray, tree: cKDTree, codes: np.ndarray, num_categories: int, chord: float, max_categories: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Counts of other locations within ``chord`` and their top categories.

    Returns ``total`` [N] (other locations in the radius), and three aligned arrays over the kept (location,
    category) pairs, sorted by location, then count descending, then category code: ``loc``, ``code``, ``count``.
    """
    n = len(xyz)
    total = np.zeros(n, dtype=np.int64)
    width = np.int64(num_categories + 1)  # code -1 (uncategorised) -> column 0
    kept_loc, kept_code, kept_count = [], [], []
    for start in range(0, n, _QUERY_BLOCK):
        stop = min(n, start + _QUERY_BLOCK)
        block = cKDTree(xyz[start:stop])
        pairs = block.sparse_distance_matrix(tree, chord, output_type="ndarray")
        i = pairs["i"].astype(np.int64)  # local index in the block
        j = pairs["j"].astype(np.int64)  # global index of the neighbour
        other = j != i + start
        i, j = i[other], j[other]
        total[start:stop] = np.bincount(i, minlength=stop - start)
        if max_categories == 0 or len(i) == 0:
            continue
        key = i * width + (codes[j] + 1)
        key, count = np.unique(key, return_counts=True)
        loc = key // width
        code = key % width - 1
        categorised = code >= 0
        loc, code, count = loc[categorised], code[categorised], count[categorised]
        order = np.lexsort((code, -count, loc))
        loc, code, count = loc[order], code[order], count[order]
        first = np.r_[0, np.flatnonzero(np.diff(loc)) + 1]
        rank = np.arange(len(loc)) - np.repeat(first, np.diff(np.r_[first, len(loc)]))
        top = rank < max_categories
        kept_loc.append(loc[top] + start)
        kept_code.append(code[top])
        kept_count.append(count[top])
    if kept_loc:
        return total, np.concatenate(kept_loc), np.concatenate(kept_code), np.concatenate(kept_count)
    empty = np.zeros(0, dtype=np.int64)
    return total, empty, empty, empty


def build_descriptions(
    locations: pd.DataFrame, *, radius_m: float = 500.0, num_nearest: int = 3, max_categories: int = 5
) -> pd.DataFrame:
    """Describe every location by its intrinsic attributes and its surroundings.

    Args:
        locations (`pd.DataFrame`):
            The canonical locations table (a `pyarrow.Table` is accepted too): ``location_id`` (unique),
            ``latitude``, ``longitude`` (degrees), and optionally ``name``, ``category``, ``category_group`` and
            ``address``. Missing, null, empty or blank values are treated alike, as absent. A hierarchical category
            such as ``"Food > Coffee Shop"`` is read as the category ``"Coffee Shop"`` of the group ``"Food"``
            (unless ``category_group`` is set). Other columns are ignored.
        radius_m (`float`, *optional*, defaults to 500.0):
            Radius in metres of the neighbourhood summarised in the contextual line (great-circle distance).
        num_nearest (`int`, *optional*, defaults to 3):
            How many of the nearest other named locations to list (0 leaves that line out).
        max_categories (`int`, *optional*, defaults to 5):
            How many of the most frequent categories within ``radius_m`` to list; the remaining neighbours (and the
            uncategorised ones) are summed up as ``"N other"``. 0 gives the count only.

    Returns:
        `pd.DataFrame`: one row per input location, in the input order, with the columns ``location_id``,
        ``intrinsic``, ``contextual`` and ``description`` (``intrinsic + "\\n" + contextual``).

    Raises:
        ValueError: a required column is missing, coordinates are NaN or out of range, location ids repeat, or an
            argument is out of range.
    """
    if not isinstance(locations, pd.DataFrame):
        if hasattr(locations, "to_pandas"):
            locations = locations.to_pandas()
        else:
            raise ValueError(
                f"locations must be a pandas DataFrame or a pyarrow Table, got {type(locations).__name__}"
            )
    missing = [c for c in _REQUIRED if c not in locations.columns]
    if missing:
        raise ValueError(f"locations is missing column(s) {missing}; it has {list(locations.columns)}")
    if (
        isinstance(radius_m, bool)
        or not isinstance(radius_m, (int, float, np.number))
        or not (math.isfinite(radius_m) and radius_m > 0)
    ):
        raise ValueError(f"radius_m must be a finite number > 0 (metres), got {radius_m!r}")
    radius_m = float(radius_m)
    num_nearest = _check_count("num_nearest", num_nearest, 0)
    max_categories = _check_count("max_categories", max_categories, 0)

    t0 = time.perf_counter()
    n = len(locations)
    ids = locations["location_id"].astype(str).to_numpy(dtype=object)
    if n and pd.Series(ids).duplicated().any():
        dup = pd.Series(ids)[pd.Series(ids).duplicated()].iloc[0]
        raise ValueError(f"locations has repeated location_id values (e.g. {dup!r}); one row per location is needed")
    lat = pd.to_numeric(locations["latitude"], errors="coerce").to_numpy(dtype=np.float64)
    lon = pd.to_numeric(locations["longitude"], errors="coerce").to_numpy(dtype=np.float64)
    for column, values, bound in (("latitude", lat, 90.0), ("longitude", lon, 180.0)):
        bad = ~(np.abs(values) <= bound)  # NaN is bad too
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"locations has {int(bad.sum())} bad {column} value(s) (must be in [-{bound:g}, {bound:g}]); first at"
                f" row {k} (location_id {ids[k]!r}): {locations[column].iloc[k]!r}"
            )
    if n == 0:
        return pd.DataFrame({c: pd.Series([], dtype="str") for c in _OUTPUT_COLUMNS})

    name = _text_column(locations, "name")
    address = _text_column(locations, "address")
    category, group = _split_categories(_text_column(locations, "category"), _text_column(locations, "category_group"))

    # Category codes in alphabetical order, so that ties between equal counts break alphabetically.
    has_category = np.array([c is not None for c in category])
    category_names = np.array(sorted(set(category[has_category])), dtype=object)
    codes = np.full(n, -1, dtype=np.int64)
    if len(category_names):
        codes[has_category] = np.searchsorted(category_names, category[has_category])

    xyz = unit_xyz(lat, lon)
    tree = cKDTree(xyz)
    total, top_loc, top_code, top_count = _neighbour_categories(
        xyz, tree, codes, len(category_names), _arc_to_chord(radius_m), max_categories
    )
    bounds = np.searchsorted(top_loc, np.arange(n + 1))
    pieces = [f"{c} {category_names[k]}" for c, k in zip(top_count.tolist(), top_code.tolist())]
    listed = (
        np.bincount(top_loc, weights=top_count, minlength=n).astype(np.int64) if len(top_loc) else np.zeros(n, int)
    )

    # Nearest other named locations.
    named = np.flatnonzero([x is not None for x in name])
    near_idx = np.zeros((n, 0), dtype=np.int64)
    near_dist = np.zeros((n, 0), dtype=np.float64)
    if num_nearest and len(named):
        k = min(num_nearest + 1, len(named))
        dist, idx = cKDTree(xyz[named]).query(xyz, k=k)
        dist = np.asarray(dist, dtype=np.float64).reshape(n, k)
        idx = named[np.asarray(idx, dtype=np.int64).reshape(n, k)]
        # Move the location itself (at most once per row) to the end, keep the first num_nearest, mask it if left.
        rows = np.arange(n)[:, None]
        order = np.argsort(idx == rows, axis=1, kind="stable")[:, :num_nearest]
        near_idx = np.take_along_axis(idx, order, axis=1)
        near_dist = _chord_to_arc(np.take_along_axis(dist, order, axis=1))
        near_idx[near_idx == rows] = -1

    radius_text = _format_radius(radius_m)
    intrinsic, contextual, description = [], [], []
    for r in range(n):
        lines = []
        if name[r] is not None:
            lines.append(f"Name: {name[r]}")
        if category[r] is not None:
            prefix = f"{group[r]} > " if group[r] is not None and group[r] != category[r] else ""
            lines.append(f"Category: {prefix}{category[r]}")
        elif group[r] is not None:
            lines.append(f"Category: {group[r]}")
        if address[r] is not None:
            lines.append(f"Address: {address[r]}")
        lines.append(f"Located at {round(lat[r], 4) + 0.0:.4f}, {round(lon[r], 4) + 0.0:.4f}.")  # no "-0.0000"
        intrinsic_text = "\n".join(lines)

        count = int(total[r])
        if count == 0:
            around = f"Within {radius_text}: no other places."
        else:
            around = f"Within {radius_text}: {count} place{'s' if count != 1 else ''}"
            parts = pieces[bounds[r] : bounds[r + 1]]
            rest = count - int(listed[r])
            if parts:
                if rest:
                    parts = [*parts, f"{rest} other"]
                around += " — " + ", ".join(parts)
            around += "."
        context_lines = [around]
        if num_nearest:
            near = [
                f"{name[j]} ({format_distance(d)})"
                for j, d in zip(near_idx[r].tolist(), near_dist[r].tolist())
                if j >= 0
            ]
            context_lines.append("Nearest named places: " + (", ".join(near) if near else "none") + ".")
        contextual_text = "\n".join(context_lines)
        intrinsic.append(intrinsic_text)
        contextual.append(contextual_text)
        description.append(intrinsic_text + "\n" + contextual_text)

    logger.info(
        "described %d locations (radius %s, %d pairs within it) in %.2fs",
        n,
        radius_text,
        int(total.sum()),
        time.perf_counter() - t0,
    )
    columns = (ids, intrinsic, contextual, description)
    return pd.DataFrame({c: pd.Series(v, dtype="str") for c, v in zip(_OUTPUT_COLUMNS, columns)})
