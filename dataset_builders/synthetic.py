"""The embedded default data: synthetic cities that behave like real ones (DESIGN §3.3).

Two generators, both deterministic (same arguments and seed give the same frames and the same bytes on disk):

- :func:`synthesize_checkins` makes a Foursquare-like check-in city: neighbourhoods of distinct land use, POIs with
  names and categories from a Foursquare-like hierarchy (``"Food > Coffee Shop"``), and users of distinct archetypes
  (:data:`ARCHETYPES`: office workers, students, night-shift workers, visitors, remote and service workers), each with
  a home, an anchor (workplace or school; none for visitors), favourite places and the weekly routine of its
  archetype, who move by exploration and preferential return (EPR, Song et al. 2010) with distance decay.
  :meth:`SyntheticCheckins.write_tsmc` writes it in the TSMC2014 format plus a POI table and a ``users.csv`` (each
  user's archetype: ground truth for reports, read by no model).
- :func:`synthesize_grid` makes a HuMob / YJMob100K-style grid city (``uid, d, t, x, y``; 48 half-hour slots, cells
  1..``grid_size``) from the same ideas: homes, workplaces, commutes, lunch, evening and weekend outings with EPR, and
  sparse observation. :func:`write_yjmob` writes it as CSV.

The city layout is seeded by ``city_seed`` (defaults to ``seed``) and the people by ``seed``, so the same population
process can be replayed in a different city (cross-city tests) and different people in the same city.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "ARCHETYPES",
    "CATEGORY_HIERARCHY",
    "DEFAULT_ARCHETYPE_MIX",
    "LAND_USE_COLOURS",
    "LAND_USES",
    "SyntheticCheckins",
    "synthesize_checkins",
    "synthesize_grid",
    "write_yjmob",
]

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------------------
# Vocabulary: categories, activity groups, land uses
# --------------------------------------------------------------------------------------------------------------------

# (top-level, category, activity group, weight of the category inside its group)
_CATEGORY_TABLE: tuple[tuple[str, str, str, float], ...] = (
    ("Food", "Coffee Shop", "coffee", 3.0),
    ("Food", "Café", "coffee", 1.5),
    ("Food", "Bakery", "coffee", 1.0),
    ("Food", "Pizza Place", "quick", 2.0),
    ("Food", "Deli / Bodega", "quick", 2.0),
    ("Food", "Fast Food Restaurant", "quick", 1.5),
    ("Food", "Burger Joint", "quick", 1.0),
    ("Food", "American Restaurant", "restaurant", 2.0),
    ("Food", "Chinese Restaurant", "restaurant", 1.5),
    ("Food", "Italian Restaurant", "restaurant", 1.5),
    ("Food", "Mexican Restaurant", "restaurant", 1.2),
    ("Food", "Sushi Restaurant", "restaurant", 1.0),
    ("Nightlife Spot", "Bar", "nightlife", 3.0),
    ("Nightlife Spot", "Cocktail Bar", "nightlife", 1.5),
    ("Nightlife Spot", "Nightclub", "nightlife", 1.0),
    ("Nightlife Spot", "Pub", "nightlife", 1.5),
    ("Professional & Other Places", "Office", "work", 4.0),
    ("Professional & Other Places", "Coworking Space", "work", 1.0),
    ("Professional & Other Places", "Medical Center", "medical", 1.0),
    ("Residence", "Home (private)", "home", 3.0),
    ("Residence", "Residential Building (Apartment / Condo)", "home", 1.5),
    ("College & University", "University", "edu", 1.5),
    ("College & University", "College Academic Building", "edu", 2.0),
    ("College & University", "Library", "edu", 0.8),
    ("Outdoors & Recreation", "Park", "outdoors", 3.0),
    ("Outdoors & Recreation", "Playground", "outdoors", 1.0),
    ("Outdoors & Recreation", "Plaza", "outdoors", 1.0),
    ("Shops & Service", "Gym / Fitness Center", "gym", 1.0),
    ("Shops & Service", "Grocery Store", "grocery", 2.0),
    ("Shops & Service", "Drugstore / Pharmacy", "grocery", 1.0),
    ("Shops & Service", "Clothing Store", "shopping", 2.0),
    ("Shops & Service", "Mall", "shopping", 0.7),
    ("Shops & Service", "Electronics Store", "shopping", 1.0),
    ("Travel & Transport", "Subway", "transit", 4.0),
    ("Travel & Transport", "Train Station", "transit", 1.0),
    ("Travel & Transport", "Bus Station", "transit", 1.0),
    ("Arts & Entertainment", "Movie Theater", "entertainment", 1.5),
    ("Arts & Entertainment", "Museum", "entertainment", 1.0),
    ("Arts & Entertainment", "Concert Hall", "entertainment", 0.8),
)

_CATEGORIES: tuple[str, ...] = tuple(f"{top} > {leaf}" for top, leaf, _, _ in _CATEGORY_TABLE)
#: Every category of the synthetic check-in city (``"Top-level > Category"``) mapped to its top-level name.
CATEGORY_HIERARCHY: dict[str, str] = {f"{top} > {leaf}": top for top, leaf, _, _ in _CATEGORY_TABLE}


def _category_id(category: str) -> str:
    # Stable 24-hex id per category, shaped like Foursquare's ("4bf58dd8d48988d1" + 8 hex digits).
    return "4bf58dd8d48988d1" + hashlib.md5(category.encode("utf-8")).hexdigest()[:8]


_CATEGORY_IDS: tuple[str, ...] = tuple(_category_id(c) for c in _CATEGORIES)
if len(set(_CATEGORY_IDS)) != len(_CATEGORY_IDS):  # pragma: no cover - guards edits of the table
    raise RuntimeError("synthetic category ids collide; rename a category")

_GROUPS: tuple[str, ...] = (
    "home", "work", "edu", "coffee", "quick", "restaurant", "nightlife", "outdoors", "gym", "grocery", "shopping",
    "transit", "entertainment", "medical",
)
_G = {name: i for i, name in enumerate(_GROUPS)}
_CAT_GROUP = np.array([_G[g] for _, _, g, _ in _CATEGORY_TABLE], dtype=np.int64)
_CAT_WEIGHT = np.array([w for _, _, _, w in _CATEGORY_TABLE], dtype=np.float64)
_CAT_INDEX = {leaf: i for i, (_, leaf, _, _) in enumerate(_CATEGORY_TABLE)}
_WORK_ANCHOR_CATS = np.array([_CAT_INDEX["Office"], _CAT_INDEX["Coworking Space"]])

#: Land uses of the neighbourhoods of the check-in city.
LAND_USES: tuple[str, ...] = ("residential", "office", "campus", "nightlife", "parks", "shopping", "transit_hub")

# Category-group mix of the POIs of each land use (weights over _GROUPS, missing = 0).
_LAND_USE_MIX: dict[str, dict[str, float]] = {
    "residential": {"home": 8, "coffee": 1.5, "quick": 2, "restaurant": 1.5, "grocery": 2, "gym": 1, "outdoors": 0.7,
                    "transit": 0.8, "nightlife": 0.5, "shopping": 0.5, "medical": 0.3, "entertainment": 0.2,
                    "work": 0.3, "edu": 0.1},
    "office": {"work": 8, "coffee": 2.5, "quick": 2.5, "restaurant": 1.5, "gym": 1, "transit": 1, "nightlife": 0.5,
               "shopping": 0.5, "grocery": 0.3, "medical": 0.5, "home": 0.5, "outdoors": 0.3, "entertainment": 0.2,
               "edu": 0.2},
    "campus": {"edu": 7, "coffee": 2, "quick": 2, "restaurant": 0.5, "home": 2, "gym": 0.8, "outdoors": 0.8,
               "nightlife": 0.5, "transit": 0.5, "shopping": 0.3, "grocery": 0.3, "entertainment": 0.5, "work": 0.5},
    "nightlife": {"nightlife": 7, "restaurant": 3, "entertainment": 2, "quick": 1.5, "coffee": 0.8, "home": 1,
                  "shopping": 0.5, "transit": 0.5, "gym": 0.3, "grocery": 0.3},
    "parks": {"outdoors": 6, "coffee": 1, "quick": 0.8, "restaurant": 0.5, "home": 1.5, "gym": 0.8,
              "entertainment": 1, "transit": 0.3, "grocery": 0.2},
    "shopping": {"shopping": 6, "restaurant": 2, "quick": 2, "coffee": 1.5, "grocery": 1.5, "entertainment": 1.5,
                 "gym": 0.5, "home": 0.8, "transit": 0.8, "work": 0.5, "medical": 0.3},
    "transit_hub": {"transit": 5, "quick": 2.5, "coffee": 2, "work": 2, "restaurant": 1, "shopping": 1,
                    "nightlife": 0.8, "home": 0.5, "grocery": 0.5},
}
# Relative size (share of POIs) of a neighbourhood of each land use; weights of extra neighbourhoods' land uses.
_LAND_USE_SIZE = {"residential": 1.5, "office": 1.2, "campus": 0.8, "nightlife": 0.9, "parks": 0.6, "shopping": 0.9,
                  "transit_hub": 0.5}
_LAND_USE_EXTRA = {"residential": 3, "office": 2, "campus": 0.5, "nightlife": 1, "parks": 0.5, "shopping": 1,
                   "transit_hub": 0.5}

#: RGB colour of each land use in the land-use tiles (:meth:`SyntheticCheckins.land_use_tiles`), plus ``"empty"`` for
#: ground outside every neighbourhood (water, empty lots). POI markers use a darker shade of their land use's colour.
LAND_USE_COLOURS: dict[str, tuple[int, int, int]] = {
    "residential": (250, 232, 150),  # light yellow
    "office": (135, 158, 192),  # grey-blue
    "campus": (243, 156, 62),  # orange (education)
    "nightlife": (152, 92, 186),  # purple (nightlife / entertainment)
    "parks": (104, 178, 86),  # green (parks / outdoors)
    "shopping": (232, 108, 140),  # red-pink
    "transit_hub": (88, 88, 96),  # dark grey
    "empty": (222, 211, 184),  # beige (water / empty)
}
if set(LAND_USE_COLOURS) != {*LAND_USES, "empty"}:  # pragma: no cover - guards edits of the tables
    raise RuntimeError("LAND_USE_COLOURS must have exactly one colour per land use plus 'empty'")

# City box (NYC-like) in degrees; neighbourhood centres keep a margin from its edges.
_LAT_RANGE = (40.68, 40.88)
_LON_RANGE = (-74.06, -73.86)
_CENTRE_MARGIN = 0.025
_KM_PER_DEG_LAT = 110.574
_KM_PER_DEG_LON = 111.320 * np.cos(np.deg2rad(40.78))

# --------------------------------------------------------------------------------------------------------------------
# Weekly routines of the check-in city: one per user archetype
# --------------------------------------------------------------------------------------------------------------------

# Activity slots of a day, in local hours. Slots from 21:00 on (_NIGHT_SLOT) belong to the night after the day: the
# last two (00:00-03:00, 03:00-06:00) fall on the next calendar date, and all three follow the routine of the next day
# (Friday night is a night off for an office worker, Sunday night one before work).
_SLOT_HOURS: tuple[tuple[int, int], ...] = (
    (6, 8), (8, 10), (10, 12), (12, 14), (14, 17), (17, 19), (19, 21), (21, 24), (24, 27), (27, 30),
)
_NUM_SLOTS = len(_SLOT_HOURS)
_NIGHT_SLOT = 7
_NEXT_DATE_SLOT = 8  # first slot after midnight: skipped on the last day (it would spill over the window)
_RHO = 0.6  # EPR exploration: a new place with probability _RHO * S ** -_GAMMA (S distinct places so far)
_GAMMA = 0.21
_DECAY_KM = 2.0  # exploration weight exp(-distance / _DECAY_KM) from the current place


@dataclass(frozen=True)
class _Archetype:
    """The routine of one user archetype of the check-in city (one row of :data:`_ARCHETYPES`).

    ``workday`` and ``offday`` map activity groups (:data:`_GROUPS`) and ``"anchor"`` (the group of the user's anchor
    POI, e.g. ``work`` for an office, ``medical`` for a hospital) to a preference per slot; unlisted groups are 0.
    """

    description: str
    anchor: dict[str, float]  # leaf category -> weight of the anchor POI; {} = no anchor (visitors)
    anchor_land_use: dict[str, float]  # land use -> multiplier of the anchor weight (unlisted: 1)
    anchor_km: float  # anchors are picked with weight exp(-distance from home / anchor_km) + 0.05
    work_days: tuple[int, ...]  # weekdays (0 = Monday) that follow the workday routine
    workday: dict[str, tuple[float, ...]]
    offday: dict[str, tuple[float, ...]]
    rate_workday: tuple[float, ...]  # relative check-in rate per slot
    rate_offday: tuple[float, ...]
    activity: tuple[float, float] = (1.0, 6.0)  # check-ins per active day, log-uniform per user
    p_skip: tuple[float, float] = (0.05, 0.45)  # share of days without check-ins, uniform per user
    stay_days: tuple[int, int] | None = None  # present only this many consecutive days (else the whole window)
    rho: float = _RHO  # EPR exploration: a new place with probability rho * S ** -_GAMMA
    decay_km: float = _DECAY_KM  # exploration weight exp(-distance / decay_km) from the current place
    regular: float = 1.0  # multiplier of _P_REGULAR (0: no regular places)
    favourites: tuple[int, int] = (3, 8)  # favourite places known before the window (inclusive range)
    central_home: bool = False  # home = a rented apartment near the lively centre of the city


def _swap(table: dict[str, tuple[float, ...]], a: str, b: str) -> dict[str, tuple[float, ...]]:
    return {(b if k == a else a if k == b else k): v for k, v in table.items()}


# The office worker's week (the base of the others). "edu" is an occasional visit to a campus.
_OFFICE_WORKDAY: dict[str, tuple[float, ...]] = {
    "home": (7.5, 1.25, 0.5, 0.25, 0.25, 2.5, 7.5, 12.5, 12.5, 12.5),
    "anchor": (1.25, 10.0, 15.0, 1.25, 15.0, 2.5, 0.5, 0.25, 0.0, 0.0),
    "edu": (0.0, 0.1, 0.2, 0.1, 0.2, 0.1, 0.05, 0.0, 0.0, 0.0),
    "coffee": (5.0, 4.0, 1.0, 0.5, 1.5, 0.5, 0.2, 0.1, 0.0, 0.0),
    "quick": (0.5, 0.5, 0.5, 5.0, 1.0, 1.0, 1.5, 1.0, 1.5, 0.5),
    "restaurant": (0.0, 0.0, 0.2, 3.0, 0.3, 0.8, 5.0, 1.5, 0.2, 0.0),
    "nightlife": (0.0, 0.0, 0.0, 0.0, 0.1, 0.8, 1.5, 3.0, 2.0, 0.5),
    "outdoors": (0.5, 0.2, 0.2, 0.5, 0.5, 1.0, 0.3, 0.1, 0.0, 0.0),
    "gym": (3.0, 0.5, 0.2, 0.3, 0.3, 4.0, 2.0, 0.5, 0.0, 0.0),
    "grocery": (0.2, 0.2, 0.3, 0.5, 0.8, 3.0, 2.0, 1.0, 0.3, 0.0),
    "shopping": (0.0, 0.1, 0.3, 0.5, 1.0, 1.5, 0.8, 0.1, 0.0, 0.0),
    "transit": (4.0, 4.0, 0.5, 0.3, 0.8, 4.0, 1.0, 1.0, 0.5, 0.3),
    "entertainment": (0.0, 0.0, 0.1, 0.1, 0.3, 0.5, 2.0, 1.5, 0.2, 0.0),
    "medical": (0.0, 0.3, 0.5, 0.2, 0.5, 0.2, 0.0, 0.0, 0.0, 0.0),
}
_OFFICE_OFFDAY: dict[str, tuple[float, ...]] = {
    "home": (10.0, 7.5, 2.5, 1.25, 1.25, 2.5, 5.0, 7.5, 7.5, 12.5),
    "anchor": (0.0, 0.25, 0.75, 0.25, 0.75, 0.25, 0.0, 0.0, 0.0, 0.0),
    "edu": (0.0, 0.0, 0.1, 0.0, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0),
    "coffee": (1.0, 4.0, 3.0, 1.0, 1.0, 0.5, 0.2, 0.0, 0.0, 0.0),
    "quick": (0.2, 0.5, 1.0, 3.0, 1.0, 1.0, 1.5, 1.0, 2.0, 1.0),
    "restaurant": (0.0, 0.5, 2.0, 4.0, 1.0, 1.0, 5.0, 2.0, 0.3, 0.0),
    "nightlife": (0.0, 0.0, 0.0, 0.2, 0.3, 1.0, 3.0, 6.0, 6.0, 2.0),
    "outdoors": (0.5, 2.0, 4.0, 2.0, 4.0, 2.0, 0.3, 0.0, 0.0, 0.0),
    "gym": (0.5, 2.0, 2.0, 0.5, 0.5, 1.0, 0.3, 0.0, 0.0, 0.0),
    "grocery": (0.2, 1.0, 2.0, 1.0, 2.0, 1.5, 0.5, 0.2, 0.0, 0.0),
    "shopping": (0.0, 0.2, 2.0, 2.0, 4.0, 2.0, 0.5, 0.0, 0.0, 0.0),
    "transit": (0.3, 0.5, 1.0, 0.5, 1.0, 1.0, 1.0, 1.5, 1.5, 1.0),
    "entertainment": (0.0, 0.0, 0.5, 0.5, 2.0, 1.5, 3.0, 2.0, 0.5, 0.0),
    "medical": (0.0, 0.0, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
}
_OFFICE_RATE_WORKDAY = (0.5, 1.0, 0.8, 1.0, 0.9, 1.0, 0.9, 0.7, 0.12, 0.02)
_OFFICE_RATE_OFFDAY = (0.3, 0.6, 0.9, 1.0, 1.0, 0.9, 0.9, 0.9, 0.5, 0.1)
_MON_FRI = (0, 1, 2, 3, 4)

_ARCHETYPES: dict[str, _Archetype] = {
    "office_worker": _Archetype(
        description="commutes on weekdays to an office (mostly in office districts), 08:00-18:00; leisure in the "
        "evenings and at weekends",
        anchor={"Office": 1.0, "Coworking Space": 0.3},
        anchor_land_use={"office": 20.0, "transit_hub": 3.0},
        anchor_km=5.0,
        work_days=_MON_FRI,
        workday=_OFFICE_WORKDAY,
        offday=_OFFICE_OFFDAY,
        rate_workday=_OFFICE_RATE_WORKDAY,
        rate_offday=_OFFICE_RATE_OFFDAY,
    ),
    "student": _Archetype(
        description="the office week, but at a university or college building (mostly on campus)",
        anchor={"University": 1.0, "College Academic Building": 1.0},
        anchor_land_use={"campus": 10.0},
        anchor_km=5.0,
        work_days=_MON_FRI,
        workday=_swap(_OFFICE_WORKDAY, "edu", "work"),
        offday=_swap(_OFFICE_OFFDAY, "edu", "work"),
        rate_workday=_OFFICE_RATE_WORKDAY,
        rate_offday=_OFFICE_RATE_OFFDAY,
    ),
    "night_shift_worker": _Archetype(
        description="works 22:00-06:00 at a hospital, station or 24-hour place (Sunday to Thursday nights), sleeps "
        "in the morning, runs errands in the afternoon; nights off are nights out",
        anchor={"Medical Center": 3.0, "Train Station": 1.5, "Bus Station": 1.0, "Deli / Bodega": 0.5,
                "Fast Food Restaurant": 0.3},
        anchor_land_use={},
        anchor_km=4.0,
        work_days=_MON_FRI,
        workday={
            "home": (12.0, 12.0, 12.0, 12.0, 5.0, 2.0, 2.0, 0.5, 0.0, 0.0),
            "anchor": (0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 8.0, 15.0, 15.0),
            "coffee": (0.5, 0.0, 0.0, 0.0, 2.0, 2.0, 1.0, 2.0, 0.5, 0.5),
            "quick": (1.5, 0.0, 0.0, 0.5, 1.0, 1.0, 1.5, 1.0, 2.0, 2.0),
            "restaurant": (0.0, 0.0, 0.0, 0.0, 0.5, 1.5, 2.0, 0.0, 0.0, 0.0),
            "outdoors": (0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0),
            "gym": (0.0, 0.0, 0.0, 0.0, 2.0, 1.5, 0.5, 0.0, 0.0, 0.0),
            "grocery": (1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 1.0, 0.0, 0.0, 0.3),
            "shopping": (0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.3, 0.0, 0.0, 0.0),
            "transit": (3.0, 0.0, 0.0, 0.0, 0.3, 0.5, 1.5, 4.0, 0.3, 0.5),
        },
        offday={
            "home": (12.0, 12.0, 10.0, 4.0, 2.0, 2.0, 2.0, 3.0, 5.0, 10.0),
            "coffee": (0.0, 0.0, 0.5, 2.0, 2.0, 1.0, 0.5, 0.3, 0.0, 0.0),
            "quick": (0.0, 0.0, 0.2, 1.0, 1.0, 1.0, 1.0, 1.5, 2.0, 1.5),
            "restaurant": (0.0, 0.0, 0.0, 1.0, 0.5, 1.5, 3.0, 2.0, 0.5, 0.0),
            "nightlife": (0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 2.0, 6.0, 6.0, 3.0),
            "outdoors": (0.0, 0.0, 0.2, 1.0, 2.0, 1.0, 0.2, 0.0, 0.0, 0.0),
            "gym": (0.0, 0.0, 0.2, 1.0, 1.5, 1.0, 0.2, 0.0, 0.0, 0.0),
            "grocery": (0.0, 0.0, 0.2, 1.0, 1.5, 1.0, 0.5, 0.2, 0.0, 0.0),
            "shopping": (0.0, 0.0, 0.2, 1.0, 2.0, 1.0, 0.3, 0.0, 0.0, 0.0),
            "transit": (0.0, 0.0, 0.2, 0.5, 0.5, 0.5, 1.0, 1.5, 1.5, 1.5),
            "entertainment": (0.0, 0.0, 0.0, 0.2, 1.0, 1.0, 2.0, 1.5, 0.5, 0.0),
        },
        rate_workday=(0.4, 0.0, 0.0, 0.0, 0.2, 0.4, 0.5, 1.0, 1.0, 1.0),
        rate_offday=(0.0, 0.0, 0.05, 0.3, 0.5, 0.5, 0.7, 1.0, 1.0, 0.7),
        activity=(1.0, 4.0),
    ),
    "visitor": _Archetype(
        description="in town for 3-7 days, staying in a rented apartment near the centre; no work or school, no "
        "regular places; sightseeing, shops, food and nightlife, exploring many new places far and wide",
        anchor={},
        anchor_land_use={},
        anchor_km=5.0,
        work_days=(),
        workday={},
        offday={
            "home": (6.0, 2.0, 0.3, 0.2, 0.3, 0.5, 1.0, 5.0, 8.0, 12.0),
            "coffee": (4.0, 4.0, 1.5, 0.5, 1.5, 0.5, 0.2, 0.0, 0.0, 0.0),
            "quick": (0.5, 0.5, 1.0, 2.0, 1.0, 1.0, 1.0, 1.5, 2.0, 0.5),
            "restaurant": (0.0, 1.0, 1.0, 4.0, 0.5, 1.5, 5.0, 2.0, 0.2, 0.0),
            "nightlife": (0.0, 0.0, 0.0, 0.0, 0.2, 0.5, 1.5, 4.0, 4.0, 1.0),
            "outdoors": (0.5, 2.0, 3.0, 1.5, 3.0, 2.0, 0.3, 0.0, 0.0, 0.0),
            "grocery": (0.2, 0.2, 0.2, 0.2, 0.2, 0.3, 0.2, 0.2, 0.0, 0.0),
            "shopping": (0.0, 0.3, 3.0, 1.5, 4.0, 2.0, 0.5, 0.0, 0.0, 0.0),
            "transit": (1.0, 2.0, 1.5, 1.0, 1.5, 1.5, 1.0, 1.0, 0.5, 0.2),
            "entertainment": (0.0, 0.5, 4.0, 1.5, 4.0, 2.0, 3.0, 1.5, 0.2, 0.0),
        },
        rate_workday=(0.0,) * 10,
        rate_offday=(0.4, 0.9, 1.0, 1.0, 1.0, 0.9, 1.0, 0.8, 0.4, 0.05),
        activity=(5.0, 10.0),
        p_skip=(0.0, 0.05),
        stay_days=(3, 7),
        rho=0.9,
        decay_km=4.0,
        regular=0.0,
        favourites=(0, 0),
        central_home=True,
    ),
    "remote_worker": _Archetype(
        description="works from home, cafés and a coworking space near home on weekdays; hardly commutes",
        anchor={"Coworking Space": 1.0},
        anchor_land_use={},
        anchor_km=1.5,
        work_days=_MON_FRI,
        workday={
            **_OFFICE_WORKDAY,
            "home": (8.0, 6.0, 6.0, 2.0, 5.0, 3.0, 7.5, 12.5, 12.5, 12.5),
            "anchor": (0.0, 2.0, 4.0, 0.5, 4.0, 0.5, 0.0, 0.0, 0.0, 0.0),
            "coffee": (3.0, 5.0, 4.0, 1.0, 3.0, 0.5, 0.2, 0.1, 0.0, 0.0),
            "transit": (0.3, 0.3, 0.2, 0.2, 0.3, 0.5, 0.8, 0.8, 0.3, 0.2),
        },
        offday=_OFFICE_OFFDAY,
        rate_workday=(0.4, 0.8, 0.9, 1.0, 0.9, 1.0, 0.9, 0.7, 0.12, 0.02),
        rate_offday=_OFFICE_RATE_OFFDAY,
    ),
    "service_worker": _Archetype(
        description="works 12:00-21:00 in a shop, restaurant or bar (mostly in shopping and nightlife districts), "
        "Wednesday to Sunday; Monday and Tuesday off",
        anchor={"Clothing Store": 1.0, "Mall": 1.5, "Electronics Store": 1.0, "American Restaurant": 1.0,
                "Chinese Restaurant": 0.7, "Italian Restaurant": 0.7, "Mexican Restaurant": 0.7, "Sushi Restaurant": 0.7,
                "Pizza Place": 0.5, "Burger Joint": 0.5, "Coffee Shop": 0.5, "Bar": 0.7},
        anchor_land_use={"shopping": 10.0, "nightlife": 8.0},
        anchor_km=5.0,
        work_days=(2, 3, 4, 5, 6),
        workday={
            "home": (6.0, 8.0, 3.0, 0.5, 0.25, 0.25, 0.5, 6.0, 12.5, 12.5),
            "anchor": (0.0, 0.2, 2.0, 10.0, 15.0, 15.0, 10.0, 1.0, 0.0, 0.0),
            "coffee": (1.0, 3.0, 3.0, 0.5, 0.5, 0.3, 0.2, 0.1, 0.0, 0.0),
            "quick": (0.3, 0.5, 1.0, 1.0, 0.5, 0.5, 1.0, 3.0, 2.0, 0.5),
            "restaurant": (0.0, 0.2, 0.5, 0.3, 0.0, 0.0, 0.2, 1.0, 0.3, 0.0),
            "nightlife": (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.2, 3.0, 3.0, 0.5),
            "outdoors": (0.3, 0.5, 1.0, 0.2, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
            "gym": (0.5, 2.0, 1.5, 0.2, 0.0, 0.0, 0.0, 0.2, 0.0, 0.0),
            "grocery": (0.2, 1.0, 1.5, 0.3, 0.0, 0.0, 0.0, 0.5, 0.3, 0.0),
            "shopping": (0.0, 0.1, 0.3, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
            "transit": (0.3, 0.5, 1.0, 3.0, 0.3, 0.3, 0.5, 3.0, 1.0, 0.3),
            "entertainment": (0.0, 0.0, 0.2, 0.0, 0.0, 0.0, 0.0, 0.3, 0.0, 0.0),
            "medical": (0.0, 0.3, 0.3, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
        },
        offday=_OFFICE_OFFDAY,
        rate_workday=(0.2, 0.5, 0.7, 1.0, 1.0, 1.0, 1.0, 0.8, 0.4, 0.05),
        rate_offday=_OFFICE_RATE_OFFDAY,
    ),
}
#: The user archetypes of the synthetic check-in city (see :func:`synthesize_checkins`).
ARCHETYPES: tuple[str, ...] = tuple(_ARCHETYPES)
#: Default share of each archetype among the users of :func:`synthesize_checkins`.
DEFAULT_ARCHETYPE_MIX: dict[str, float] = {
    "office_worker": 0.50, "student": 0.20, "night_shift_worker": 0.10, "visitor": 0.10, "remote_worker": 0.05,
    "service_worker": 0.05,
}

# Activity chaining: the weight of the next activity group is multiplied by _CHAIN[previous group][next group]
# ("anchor" = the group of the user's anchor POI). Unlisted pairs are 1; repeats of errands are damped.
_CHAIN: dict[str, dict[str, float]] = {
    "home": {"coffee": 1.5, "transit": 1.5, "gym": 1.3},
    "anchor": {"quick": 1.5, "restaurant": 1.3, "gym": 1.5, "transit": 1.5, "nightlife": 1.3},
    "coffee": {"anchor": 2.0, "transit": 1.5, "coffee": 0.3},
    "quick": {"anchor": 2.0, "quick": 0.3},
    "restaurant": {"nightlife": 2.0, "entertainment": 2.0, "home": 1.3, "restaurant": 0.3},
    "nightlife": {"nightlife": 2.5, "quick": 1.5, "home": 1.5},
    "outdoors": {"coffee": 1.5, "restaurant": 1.3, "outdoors": 0.5},
    "gym": {"home": 2.0, "grocery": 1.5, "gym": 0.2},
    "grocery": {"home": 2.0, "grocery": 0.3},
    "shopping": {"shopping": 1.5, "restaurant": 1.5, "coffee": 1.3},
    "transit": {"anchor": 2.0, "home": 1.5, "transit": 0.5},
    "entertainment": {"restaurant": 1.5, "nightlife": 2.0, "home": 1.3, "entertainment": 0.3},
    "medical": {"grocery": 2.0, "home": 1.5, "medical": 0.2},
}

# Choice parameters (EPR's rho and exploration decay are per archetype, above).
_RETURN_DECAY_KM = 4.0  # returns weigh visits by exp(-distance / _RETURN_DECAY_KM) from the current place
_P_NEAREST_REGULAR = 0.85  # a regular activity goes to the nearer of the two regular places
_P_HOME_ANCHOR = 0.92  # a "home" activity happens at the user's home (else another residence)
_P_WORK_ANCHOR = 0.90  # an activity of the anchor's group happens at the anchor
_TZ_OFFSET_MIN = -240  # New York in summer
_USER_CHUNK = 256  # users simulated together (memory ~ chunk x num_locations)
_ROUTINE_SHAPE = 0.35  # Gamma shape of the personal routine noise (smaller = more habitual users)
_CENTRAL_HOME_KM = 1.5  # a visitor's apartment is picked with weight exp(-distance from the centre / this)
# Chance that an activity of each group happens at the user's regular place of that group (before EPR is consulted).
_P_REGULAR = np.array([0.0, 0.0, 0.0, 0.75, 0.5, 0.4, 0.5, 0.65, 0.9, 0.85, 0.4, 0.85, 0.4, 0.9])
_LIVELY_GROUPS = ("restaurant", "nightlife", "shopping", "entertainment")  # where the centre of the city is


def _slot_table(table: dict[str, tuple[float, ...]], what: str) -> np.ndarray:
    """[slot, group + "anchor"] preferences from a table of rows (unlisted rows 0)."""
    out = np.zeros((_NUM_SLOTS, len(_GROUPS) + 1))
    for key, row in table.items():
        if len(row) != _NUM_SLOTS:  # pragma: no cover - guards edits of the tables
            raise RuntimeError(f"{what}: row {key!r} has {len(row)} slots, expected {_NUM_SLOTS}")
        out[:, len(_GROUPS) if key == "anchor" else _G[key]] = row
    return out


def _week(workday: np.ndarray, offday: np.ndarray, work_days: tuple[int, ...]) -> np.ndarray:
    """[weekday 0..6, slot, ...]: the workday or off-day row of each weekday; night slots follow the next day."""
    is_work = np.isin(np.arange(7), work_days)
    out = np.where(is_work[:, None, None], workday[None], offday[None])
    night_work = np.roll(is_work, -1)
    out[:, _NIGHT_SLOT:] = np.where(night_work[:, None, None], workday[None, _NIGHT_SLOT:], offday[None, _NIGHT_SLOT:])
    return out


def _chain_matrix(anchor_group: int | None) -> np.ndarray:
    """[previous group, next group] multipliers for a user whose anchor POI is of ``anchor_group`` (None: no anchor).

    With a work anchor a visit to a campus chains like the anchor, and the other way round.
    """
    out = np.ones((len(_GROUPS), len(_GROUPS)))
    for prev, row in _CHAIN.items():
        if prev == "anchor" and anchor_group is None:
            continue
        i = anchor_group if prev == "anchor" else _G[prev]
        for nxt, factor in row.items():
            if nxt == "anchor" and anchor_group is None:
                continue
            out[i, anchor_group if nxt == "anchor" else _G[nxt]] = factor
    other = {_G["work"]: _G["edu"], _G["edu"]: _G["work"]}.get(anchor_group)
    if other is not None:
        out[other] = out[anchor_group]
    return out


@dataclass(frozen=True)
class _ArchetypeTables:
    """The archetype table as arrays indexed by archetype (and weekday, slot, group)."""

    pref: np.ndarray  # [archetype, weekday, slot, group + 1]: last column = the anchor's group
    rate: np.ndarray  # [archetype, weekday, slot], each row sums to 1
    work_day: np.ndarray  # [archetype, weekday] bool (the day's own routine; the noise of the routine follows it)
    chain: np.ndarray  # [anchor group (len(_GROUPS) = none), previous group, next group]
    anchor_cat: np.ndarray  # [archetype, category] weight of the anchor category
    anchor_land_use: list[dict[str, float]]
    anchor_km: np.ndarray
    activity: np.ndarray  # [archetype, 2]
    p_skip: np.ndarray  # [archetype, 2]
    stay: np.ndarray  # [archetype, 2]; (0, 0) = the whole window
    rho: np.ndarray
    decay_km: np.ndarray
    regular: np.ndarray
    favourites: np.ndarray  # [archetype, 2]
    central_home: np.ndarray


def _archetype_tables() -> _ArchetypeTables:
    arcs = list(_ARCHETYPES.values())
    pref, rate = [], []
    for name, a in _ARCHETYPES.items():
        pref.append(_week(_slot_table(a.workday, name), _slot_table(a.offday, name), a.work_days))
        r = _week(np.array(a.rate_workday)[:, None], np.array(a.rate_offday)[:, None], a.work_days)[..., 0]
        rate.append(r / r.sum(axis=1, keepdims=True))
    anchor_cat = np.zeros((len(arcs), len(_CATEGORY_TABLE)))
    for i, a in enumerate(arcs):
        for leaf, w in a.anchor.items():
            anchor_cat[i, _CAT_INDEX[leaf]] = w
    return _ArchetypeTables(
        pref=np.stack(pref),
        rate=np.stack(rate),
        work_day=np.array([np.isin(np.arange(7), a.work_days) for a in arcs]),
        chain=np.stack([_chain_matrix(g) for g in range(len(_GROUPS))] + [_chain_matrix(None)]),
        anchor_cat=anchor_cat,
        anchor_land_use=[a.anchor_land_use for a in arcs],
        anchor_km=np.array([a.anchor_km for a in arcs]),
        activity=np.array([a.activity for a in arcs], dtype=np.float64),
        p_skip=np.array([a.p_skip for a in arcs], dtype=np.float64),
        stay=np.array([a.stay_days or (0, 0) for a in arcs], dtype=np.int64),
        rho=np.array([a.rho for a in arcs]),
        decay_km=np.array([a.decay_km for a in arcs]),
        regular=np.array([a.regular for a in arcs]),
        favourites=np.array([a.favourites for a in arcs], dtype=np.int64),
        central_home=np.array([a.central_home for a in arcs]),
    )


_TABLES = _archetype_tables()


def _check_archetype_mix(archetype_mix) -> np.ndarray:
    """Validate ``archetype_mix`` (None = the default) into shares per archetype, in the order of ARCHETYPES."""
    if archetype_mix is None:
        archetype_mix = DEFAULT_ARCHETYPE_MIX
    if not isinstance(archetype_mix, Mapping) or not archetype_mix:
        raise ValueError(
            f"archetype_mix must be a non-empty dict of archetype -> share, got {archetype_mix!r}; archetypes: "
            f"{list(ARCHETYPES)}"
        )
    unknown = [k for k in archetype_mix if k not in _ARCHETYPES]
    if unknown:
        raise ValueError(f"archetype_mix has unknown archetype(s) {unknown}; known: {list(ARCHETYPES)}")
    shares = np.zeros(len(ARCHETYPES))
    for i, name in enumerate(ARCHETYPES):
        v = archetype_mix.get(name, 0.0)
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not np.isfinite(v) or v < 0:
            raise ValueError(f"archetype_mix[{name!r}] must be a finite number >= 0, got {v!r}")
        shares[i] = float(v)
    if not np.isclose(shares.sum(), 1.0, rtol=0, atol=1e-6):
        raise ValueError(f"archetype_mix shares must sum to 1, got {shares.sum():g} ({dict(archetype_mix)})")
    return shares / shares.sum()


def _assign_archetypes(num_users: int, shares: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Archetype index of every user: each archetype gets its share of the users (largest remainder), shuffled."""
    quota = shares * num_users
    counts = np.floor(quota).astype(np.int64)
    rest = num_users - int(counts.sum())
    if rest > 0:
        remainder = np.where(shares > 0, quota - counts, -1.0)  # an archetype with share 0 gets nobody
        order = np.argsort(-remainder, kind="stable")  # ties go to the archetype listed first
        counts[order[:rest]] += 1
    return rng.permutation(np.repeat(np.arange(len(shares)), counts))


# --------------------------------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------------------------------

_ADJ = ("Blue", "Golden", "Little", "Red", "Green", "Silver", "Old", "Happy", "Lucky", "Urban", "Wild", "Corner",
        "Bright", "Quiet", "Copper", "Royal", "Sunny", "Black", "White", "Hidden", "Brass", "Crooked", "Velvet")
_NOUN = ("Fern", "Oak", "Sparrow", "Harbor", "Bridge", "Lantern", "Anchor", "Maple", "Fox", "Crow", "Pine", "Stone",
         "River", "Garden", "Owl", "Rose", "Elm", "Willow", "Falcon", "Beacon", "Tide", "Meadow", "Ember", "Hive")
_STREET = ("Hudson", "Bleecker", "Spring", "Mercer", "Grand", "Canal", "Orchard", "Houston", "Bowery", "Lexington",
           "Madison", "Amsterdam", "Columbus", "Broadway", "Greenwich", "Delancey", "Prince", "Ludlow", "Chambers",
           "Fulton", "Bedford", "Atlantic", "Franklin", "Christopher", "Lafayette", "Mott", "Essex", "Clinton")
_PERSON = ("Tony", "Mario", "Lucy", "Sam", "Rosa", "Joe", "Nina", "Frank", "Maya", "Leo", "Ana", "Ray", "Kim",
           "Vito", "Eddie", "Grace", "Omar", "Iris", "Hank", "Sofia")
_SURNAME = ("Morgan", "Wallace", "Chen", "Rossi", "Garcia", "Kaplan", "Murphy", "Nguyen", "Park", "Levine", "Russo",
            "Patel", "Kowalski", "Baker", "Fischer", "Ortiz", "Bennett", "Sato", "Hughes", "Romano")
_FIELD = ("Natural History", "Modern Art", "the City", "Science", "Design", "the Moving Image", "Photography")
_LINE = ("1", "2", "3", "4", "5", "6", "A", "C", "E", "F", "L", "N", "Q", "R")

_NAME_TEMPLATES: dict[str, tuple[str, ...]] = {
    "Coffee Shop": ("{adj} {noun} Coffee", "{street} Coffee", "{noun} Coffee Roasters", "{person}'s Coffee",
                    "{adj} Cup Espresso"),
    "Café": ("Cafe {noun}", "{adj} {noun} Cafe", "{street} Cafe", "{person}'s Cafe"),
    "Bakery": ("{noun} Bakery", "{person}'s Bakeshop", "{street} Bread Co.", "{adj} Crumb Bakery"),
    "Pizza Place": ("{street} Street Pizza", "{person}'s Pizza", "{adj} Slice", "{noun} Pizzeria"),
    "Deli / Bodega": ("{street} Deli", "{adj} {noun} Deli & Grocery", "{person}'s Bodega", "{num} {street} Market"),
    "Fast Food Restaurant": ("{adj} Chicken", "{noun} Express", "{person}'s Grab & Go", "{street} Fried Chicken"),
    "Burger Joint": ("{adj} {noun} Burgers", "{person}'s Burger Shack", "{street} Burger Bar"),
    "American Restaurant": ("{adj} {noun} Kitchen", "{street} Diner", "{person}'s Grill", "The {adj} {noun}"),
    "Chinese Restaurant": ("{adj} Dragon", "{noun} Garden", "{street} Dumpling House", "Golden {noun} Noodle Bar"),
    "Italian Restaurant": ("Trattoria {surname}", "{person}'s Osteria", "Ristorante {surname}", "{street} Pasta Bar"),
    "Mexican Restaurant": ("Taqueria {surname}", "{adj} Cactus Cantina", "{street} Tacos", "El {noun} Mexican Grill"),
    "Sushi Restaurant": ("Sushi {surname}", "{noun} Sushi Bar", "{street} Izakaya", "{adj} Wave Sushi"),
    "Bar": ("{adj} {noun} Bar", "The {noun} Tap Room", "{street} Saloon", "{person}'s Bar"),
    "Cocktail Bar": ("The {adj} {noun}", "{noun} Lounge", "{street} Cocktail Club", "Bar {surname}"),
    "Nightclub": ("Club {noun}", "{adj} Room", "{street} Ballroom", "{noun} Nightclub"),
    "Pub": ("The {adj} {noun} Pub", "{surname}'s Ale House", "{street} Tavern", "The {noun} & {noun2}"),
    "Office": ("{num} {street} Street", "{street} Plaza Offices", "{noun} Capital", "{surname} & {surname2} LLP",
               "{adj} {noun} Media"),
    "Coworking Space": ("{noun} Works", "{street} Coworking", "The {adj} Desk", "{noun} Labs"),
    "Medical Center": ("{street} Medical Center", "{surname} Family Clinic", "{noun} Health", "{street} Urgent Care"),
    "Home (private)": ("Home", "Home", "Home sweet home", "My Apartment", "{person}'s Place", "Home on {street}"),
    "Residential Building (Apartment / Condo)": ("The {street}", "{num} {street} Street", "{noun} Towers",
                                                 "{adj} {noun} Apartments"),
    "University": ("{street} University", "{surname} University", "University of {street}"),
    "College Academic Building": ("{surname} Hall", "{surname} Science Center", "{street} College {surname} Building"),
    "Library": ("{street} Public Library", "{surname} Library", "{noun} Branch Library"),
    "Park": ("{noun} Park", "{street} Square Park", "{surname} Park", "{adj} {noun} Park"),
    "Playground": ("{noun} Playground", "{street} Playground", "{surname} Playground"),
    "Plaza": ("{street} Plaza", "{surname} Square", "{noun} Plaza"),
    "Gym / Fitness Center": ("{adj} Fitness", "{noun} Gym", "{street} CrossFit", "{person}'s Boxing Club",
                             "{noun} Yoga"),
    "Grocery Store": ("{adj} {noun} Market", "{street} Grocery", "{surname}'s Food Market", "{noun} Foods"),
    "Drugstore / Pharmacy": ("{street} Pharmacy", "{adj} Cross Drugs", "{surname} Chemists"),
    "Clothing Store": ("{adj} {noun} Boutique", "{surname} & Co.", "{street} Outfitters", "{noun} Apparel"),
    "Mall": ("{street} Center", "{noun} Mall", "The Shops at {street}"),
    "Electronics Store": ("{noun} Electronics", "{street} Tech", "{adj} Circuit"),
    "Subway": ("{street} St Station", "{num} St - {street} Av", "{street} St ({line} train)"),
    "Train Station": ("{street} Station", "{street} Terminal"),
    "Bus Station": ("{street} Bus Terminal", "{street} St & {street2} Av Bus Stop"),
    "Movie Theater": ("{street} Cinemas", "{adj} Screen", "{noun} Theater"),
    "Museum": ("Museum of {field}", "{surname} Museum", "{street} Gallery"),
    "Concert Hall": ("{surname} Hall", "{noun} Music Hall", "{street} Arena"),
}
_P_EMPTY_NAME = 0.05


def _make_names(cat_index: np.ndarray, rng: np.random.Generator) -> list[str]:
    leaves = [leaf for _, leaf, _, _ in _CATEGORY_TABLE]
    n = len(cat_index)
    picks = {
        "adj": rng.integers(0, len(_ADJ), n), "noun": rng.integers(0, len(_NOUN), n),
        "noun2": rng.integers(0, len(_NOUN), n), "street": rng.integers(0, len(_STREET), n),
        "street2": rng.integers(0, len(_STREET), n), "person": rng.integers(0, len(_PERSON), n),
        "surname": rng.integers(0, len(_SURNAME), n), "surname2": rng.integers(0, len(_SURNAME), n),
        "field": rng.integers(0, len(_FIELD), n), "line": rng.integers(0, len(_LINE), n),
        "num": rng.integers(1, 300, n),
    }
    template_pick = rng.random(n)
    empty = rng.random(n) < _P_EMPTY_NAME
    words = {"adj": _ADJ, "noun": _NOUN, "noun2": _NOUN, "street": _STREET, "street2": _STREET, "person": _PERSON,
             "surname": _SURNAME, "surname2": _SURNAME, "field": _FIELD, "line": _LINE}
    names = []
    for i in range(n):
        if empty[i]:
            names.append("")
            continue
        templates = _NAME_TEMPLATES[leaves[cat_index[i]]]
        template = templates[int(template_pick[i] * len(templates))]
        fields = {k: words[k][picks[k][i]] for k in words}
        fields["num"] = str(picks["num"][i])
        names.append(template.format(**fields))
    return names


# --------------------------------------------------------------------------------------------------------------------
# Argument checks and small helpers
# --------------------------------------------------------------------------------------------------------------------


def _check_int(name: str, value, minimum: int, maximum: int | None = None) -> int:
    allowed = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer {allowed}, got {value!r} ({type(value).__name__})")
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be an integer {allowed}, got {value}")
    return int(value)


def _check_seeds(seed, city_seed) -> tuple[int, int]:
    seed = _check_int("seed", seed, 0)
    city_seed = seed if city_seed is None else _check_int("city_seed", city_seed, 0)
    return seed, city_seed


def _rng(seed: int, stream: int, *more: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, stream, *more]))


def _sample_rows(weights: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Inverse-CDF sample of one column per row of non-negative ``weights`` (positive row sums), ``u`` in [0, 1)."""
    cum = np.cumsum(weights, axis=1)
    target = u * cum[:, -1]
    idx = (cum <= target[:, None]).sum(axis=1)
    return np.minimum(idx, weights.shape[1] - 1)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# --------------------------------------------------------------------------------------------------------------------
# Check-in city
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _PoiCity:
    lat: np.ndarray
    lon: np.ndarray
    px: np.ndarray  # km east of the box's south-west corner
    py: np.ndarray  # km north
    cat: np.ndarray  # index into _CATEGORY_TABLE
    land_use: np.ndarray  # str
    names: list[str]
    venue_ids: np.ndarray  # str
    neighbourhoods: pd.DataFrame  # the layout: one row per neighbourhood (see SyntheticCheckins)

    @property
    def group(self) -> np.ndarray:
        return _CAT_GROUP[self.cat]


def _neighbourhood_centres(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    lat_lo, lat_hi = _LAT_RANGE[0] + _CENTRE_MARGIN, _LAT_RANGE[1] - _CENTRE_MARGIN
    lon_lo, lon_hi = _LON_RANGE[0] + _CENTRE_MARGIN, _LON_RANGE[1] - _CENTRE_MARGIN
    min_km = 3.0
    lats: list[float] = []
    lons: list[float] = []
    for _ in range(n):
        for attempt in range(200):
            la, lo = rng.uniform(lat_lo, lat_hi), rng.uniform(lon_lo, lon_hi)
            ok = all(
                np.hypot((la - a) * _KM_PER_DEG_LAT, (lo - b) * _KM_PER_DEG_LON) >= min_km * (1 - attempt / 200)
                for a, b in zip(lats, lons)
            )
            if ok:
                break
        lats.append(la)
        lons.append(lo)
    return np.array(lats), np.array(lons)


def _build_poi_city(num_locations: int, rng: np.random.Generator) -> _PoiCity:
    n_hoods = int(rng.integers(8, 13))
    extra = list(_LAND_USE_EXTRA)
    extra_w = np.array([_LAND_USE_EXTRA[k] for k in extra], dtype=np.float64)
    uses = list(rng.permutation(len(LAND_USES)))
    uses += list(rng.choice(len(extra), size=n_hoods - len(LAND_USES), p=extra_w / extra_w.sum()))
    hood_use = np.array([LAND_USES[i] if k < len(LAND_USES) else extra[i] for k, i in enumerate(uses)])
    c_lat, c_lon = _neighbourhood_centres(n_hoods, rng)
    sd_km = rng.uniform(0.5, 1.2, n_hoods)
    size = np.array([_LAND_USE_SIZE[u] for u in hood_use]) * rng.gamma(8.0, 1 / 8.0, n_hoods)
    counts = rng.multinomial(num_locations, size / size.sum())
    hood = np.repeat(np.arange(n_hoods), counts)

    lat = c_lat[hood] + rng.normal(0.0, 1.0, num_locations) * sd_km[hood] / _KM_PER_DEG_LAT
    lon = c_lon[hood] + rng.normal(0.0, 1.0, num_locations) * sd_km[hood] / _KM_PER_DEG_LON
    lat = np.round(np.clip(lat, *_LAT_RANGE), 6)
    lon = np.round(np.clip(lon, *_LON_RANGE), 6)

    mix = np.array([[_LAND_USE_MIX[u].get(g, 0.0) for g in _GROUPS] for u in hood_use])  # hood x group
    group = _sample_rows(mix[hood], rng.random(num_locations))
    within = np.where(_CAT_GROUP[None, :] == np.arange(len(_GROUPS))[:, None], _CAT_WEIGHT[None, :], 0.0)
    cat = _sample_rows(within[group], rng.random(num_locations))

    # Every city needs homes and workplaces for its people.
    home_cats = np.flatnonzero(_CAT_GROUP == _G["home"])
    order = rng.permutation(num_locations)
    if not np.isin(cat, home_cats).any():
        cat[order[0]] = _CAT_INDEX["Residential Building (Apartment / Condo)"]
    if not np.isin(cat, _WORK_ANCHOR_CATS).any():
        cat[order[1]] = _CAT_INDEX["Office"]

    names = _make_names(cat, rng)
    first = rng.integers(0x49000000, 0x50000000, num_locations, dtype=np.int64)
    rest = rng.integers(0, 2**32, (num_locations, 2), dtype=np.int64)
    venue_ids = np.array([f"{a:08x}{b:08x}{c:08x}" for a, (b, c) in zip(first, rest)], dtype=object)
    while len(set(venue_ids)) < num_locations:  # pragma: no cover - 2^-80 chance
        dup = pd.Series(venue_ids).duplicated().to_numpy()
        venue_ids[dup] = [f"{v:024x}" for v in rng.integers(0, 2**62, int(dup.sum()))]
    px = (lon - _LON_RANGE[0]) * _KM_PER_DEG_LON
    py = (lat - _LAT_RANGE[0]) * _KM_PER_DEG_LAT
    hoods = pd.DataFrame(
        {
            "neighbourhood": np.arange(n_hoods, dtype=np.int64),
            "latitude": c_lat.astype(np.float64),
            "longitude": c_lon.astype(np.float64),
            "land_use": pd.array(hood_use.astype(object), dtype="string"),
            "spread_km": sd_km.astype(np.float64),
            "num_pois": counts.astype(np.int64),
        }
    )
    return _PoiCity(lat, lon, px, py, cat, hood_use[hood], names, venue_ids, hoods)


def _anchor_pools(city: _PoiCity) -> np.ndarray:
    """[archetype, POI] weight of each POI as the anchor of a user of that archetype (all 0: no anchor).

    An archetype whose anchor categories this city lacks (a small city without a hospital) anchors at offices.
    """
    t = _TABLES
    pools = t.anchor_cat[:, city.cat].copy()
    for i, multipliers in enumerate(t.anchor_land_use):
        for use, factor in multipliers.items():
            pools[i, city.land_use == use] *= factor
    office = pools[ARCHETYPES.index("office_worker")]
    missing = (t.anchor_cat.sum(axis=1) > 0) & (pools.sum(axis=1) == 0)
    pools[missing] = office
    return pools


def _simulate_checkin_chunk(
    city: _PoiCity, arch: np.ndarray, num_days: int, start_weekday: int, rng: np.random.Generator
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], dict[str, np.ndarray]]:
    """Simulate users of archetypes ``arch`` (indices into ARCHETYPES).

    Returns (user, day, slot, location) of every check-in, in (day, slot) order, and per user its ``home`` and
    ``anchor`` POI (-1: none) and the ``first_day`` and ``last_day`` of its stay.
    """
    t = _TABLES
    n = len(arch)
    num_l = len(city.cat)
    poi_group = city.group
    num_g = len(_GROUPS)
    available = np.bincount(poi_group, minlength=num_g) > 0
    rows = np.arange(n)

    # Homes: a residence; for visitors a rented apartment near the lively centre of the city.
    homes_pool = np.flatnonzero(poi_group == _G["home"])
    home = homes_pool[rng.integers(0, len(homes_pool), n)]
    r_central = rng.random(n)
    central = t.central_home[arch]
    if central.any():
        lively = np.isin(poi_group, [_G[g] for g in _LIVELY_GROUPS])
        lively = lively if lively.any() else np.ones(num_l, dtype=bool)
        cx, cy = city.px[lively].mean(), city.py[lively].mean()
        flats = homes_pool[city.cat[homes_pool] == _CAT_INDEX["Residential Building (Apartment / Condo)"]]
        flats = flats if len(flats) else homes_pool
        w = np.exp(-np.hypot(city.px[flats] - cx, city.py[flats] - cy) / _CENTRAL_HOME_KM) + 1e-12
        home[central] = flats[_sample_rows(np.broadcast_to(w, (int(central.sum()), len(w))), r_central[central])]
    d_home = np.hypot(city.px[None, :] - city.px[home][:, None], city.py[None, :] - city.py[home][:, None])

    # Anchors: a POI of the archetype's anchor categories (weighted by land use), preferably near home.
    pools = _anchor_pools(city)
    has_anchor = pools[arch].sum(axis=1) > 0
    w = pools[arch] * (np.exp(-d_home / t.anchor_km[arch][:, None]) + 0.05) + (~has_anchor)[:, None]
    anchor = np.where(has_anchor, _sample_rows(w, rng.random(n)), -1)
    anchor_group = np.where(has_anchor, poi_group[np.maximum(anchor, 0)], -1)
    chain_row = np.where(has_anchor, anchor_group, num_g)  # index into t.chain (num_g: no anchor)
    anchor_onehot = np.zeros((n, num_g))
    anchor_onehot[rows[has_anchor], anchor_group[has_anchor]] = 1.0
    fixed = anchor_onehot > 0  # groups whose preference is the archetype's own, free of personal noise
    fixed[:, [_G["home"], _G["work"], _G["edu"]]] = True

    # Tastes, activity, presence and skipped days.
    group_taste = np.where(fixed, 1.0, np.exp(rng.normal(0.0, 0.6, (n, num_g))))
    leaf_taste = np.exp(rng.normal(0.0, 0.5, (n, len(_CATEGORIES))))
    poi_taste = leaf_taste[:, city.cat]  # n x L
    lo, hi = np.log(t.activity[arch]).T
    activity = np.exp(lo + rng.random(n) * (hi - lo))
    lo, hi = t.p_skip[arch].T
    p_skip = lo + rng.random(n) * (hi - lo)
    lo, hi = t.stay[arch].T
    stay = np.where(hi > 0, np.minimum(lo + np.floor(rng.random(n) * (hi - lo + 1)).astype(np.int64), num_days),
                    num_days)
    first_day = np.floor(rng.random(n) * (num_days - stay + 1)).astype(np.int64)
    last_day = first_day + stay - 1
    days = np.arange(num_days)
    day_active = (
        (rng.random((n, num_days)) >= p_skip[:, None]) & (days >= first_day[:, None]) & (days <= last_day[:, None])
    )

    # Preferences per user [user, weekday, slot, group] and check-in probabilities [user, weekday, slot].
    base = t.pref[arch]  # n x 7 x S x (groups + anchor)
    pref = base[..., :num_g] + base[..., num_g:] * anchor_onehot[:, None, None, :]
    # Personal routine: each user's own sharper version of its archetype's, the same every week.
    noise = rng.gamma(_ROUTINE_SHAPE, 1.0 / _ROUTINE_SHAPE, (n, 2, _NUM_SLOTS, num_g))
    routine = noise[rows[:, None], t.work_day[arch].astype(np.int64)]  # n x 7 x S x G
    routine = np.where(fixed[:, None, None, :], 1.0, routine)
    pref *= routine * group_taste[:, None, None, :] * available[None, None, None, :]
    p_slot = np.minimum(0.95, activity[:, None, None] * t.rate[arch])

    # Memory: favourites count as visited before the observation window starts.
    counts = np.zeros((n, num_l), dtype=np.float64)
    counts[rows, home] += 5
    counts[rows[has_anchor], anchor[has_anchor]] += 5
    base_place = np.where(has_anchor, anchor, home)
    d_anchor = np.hypot(city.px[None, :] - city.px[base_place][:, None],
                        city.py[None, :] - city.py[base_place][:, None])
    fav_ok = ~np.isin(poi_group, [_G["home"], _G["work"], _G["edu"]])
    fav_w = fav_ok[None, :] * group_taste[:, poi_group] * poi_taste * np.exp(-np.minimum(d_home, d_anchor) / 1.0)
    with np.errstate(divide="ignore"):
        keys = np.log(fav_w) + rng.gumbel(size=fav_w.shape)
    k_max = min(int(t.favourites[:, 1].max()), num_l)
    top = np.argsort(-keys, axis=1, kind="stable")[:, :k_max]
    lo, hi = t.favourites[arch].T
    k = lo + np.floor(rng.random(n) * (hi - lo + 1)).astype(np.int64)
    take = (np.arange(k_max)[None, :] < k[:, None]) & np.isfinite(np.take_along_axis(keys, top, axis=1))
    counts[np.repeat(rows, k_max)[take.ravel()], top.ravel()[take.ravel()]] += 2
    # Regular places: the user's own gym, coffee shop, subway station... per activity group, one near home and one
    # near the anchor (the same place when the two are close). Visitors have none.
    has_regular = t.regular[arch] > 0
    regular = np.zeros((n, 2, num_g), dtype=np.int64)
    for side, dist in enumerate((d_home, d_anchor)):
        near = np.exp(-dist / 0.7) * poi_taste
        for gi in range(3, num_g):
            if available[gi]:
                in_g = (poi_group == gi)[None, :]
                regular[:, side, gi] = _sample_rows(near * in_g + 1e-300 * in_g, rng.random(n))
                counts[rows, regular[:, side, gi]] += 2 * has_regular
    p_regular = np.clip(_P_REGULAR[None, :] * rng.uniform(0.7, 1.2, (n, 1)) * t.regular[arch][:, None], 0.0, 0.95)
    visited = (counts > 0).sum(axis=1).astype(np.float64)
    rho, decay_km = t.rho[arch], t.decay_km[arch]
    del d_home, d_anchor, fav_w, keys, near

    out_u, out_d, out_s, out_l = [], [], [], []
    for day in range(num_days):
        w = (start_weekday + day) % 7
        cur = home.copy()
        prev_g = np.full(n, _G["home"], dtype=np.int64)
        for s in range(_NUM_SLOTS):
            u_draw = rng.random(n)
            if s >= _NEXT_DATE_SLOT and day == num_days - 1:
                continue  # the last night would spill over the window
            act = np.flatnonzero(day_active[:, day] & (u_draw < p_slot[:, w, s]))
            if len(act) == 0:
                continue
            na = len(act)
            g = _sample_rows(pref[act, w, s, :] * t.chain[chain_row[act], prev_g[act]], rng.random(na))
            prev_g[act] = g
            r_anchor = rng.random(na)
            loc = np.full(na, -1, dtype=np.int64)
            at_home = (g == _G["home"]) & (r_anchor < _P_HOME_ANCHOR)
            loc[at_home] = home[act[at_home]]
            at_anchor = (g == anchor_group[act]) & (r_anchor < _P_WORK_ANCHOR)
            loc[at_anchor] = anchor[act[at_anchor]]
            at_regular = (loc < 0) & (rng.random(na) < p_regular[act, g])
            if at_regular.any():
                ua, ga = act[at_regular], g[at_regular]
                cands = regular[ua, :, ga]  # (k, 2): the home-side and the anchor-side place
                dc = np.hypot(city.px[cands] - city.px[cur[ua]][:, None], city.py[cands] - city.py[cur[ua]][:, None])
                side = (dc[:, 1] < dc[:, 0]).astype(np.int64)
                side = np.where(rng.random(len(ua)) < _P_NEAREST_REGULAR, side, 1 - side)
                loc[at_regular] = cands[np.arange(len(ua)), side]
            r_explore = rng.random(na)
            r_pick = rng.random(na)
            epr = np.flatnonzero(loc < 0)
            if len(epr):
                u = act[epr]
                in_group = poi_group[None, :] == g[epr][:, None]
                cnt = counts[u]
                taste = poi_taste[u] * in_group
                dist = np.hypot(city.px[None, :] - city.px[cur[u]][:, None],
                                city.py[None, :] - city.py[cur[u]][:, None])
                w_return = taste * cnt * np.exp(-dist / _RETURN_DECAY_KM)
                w_explore = taste * (cnt == 0) * np.exp(-dist / decay_km[u][:, None])
                p_new = rho[u] * visited[u] ** -_GAMMA
                has_new = w_explore.sum(axis=1) > 0
                has_old = w_return.sum(axis=1) > 0
                explore = has_new & ((r_explore[epr] < p_new) | ~has_old)
                weights = np.where(explore[:, None], w_explore, w_return)
                loc[epr] = _sample_rows(weights, r_pick[epr])
            new = counts[act, loc] == 0
            visited[act] += new
            counts[act, loc] += 1
            cur[act] = loc
            out_u.append(act)
            out_d.append(np.full(na, day, dtype=np.int64))
            out_s.append(np.full(na, s, dtype=np.int64))
            out_l.append(loc)
    users = {"home": home, "anchor": anchor, "first_day": first_day, "last_day": last_day}
    if not out_u:
        empty = np.zeros(0, dtype=np.int64)
        return (empty, empty, empty, empty), users
    return (np.concatenate(out_u), np.concatenate(out_d), np.concatenate(out_s), np.concatenate(out_l)), users


# --------------------------------------------------------------------------------------------------------------------
# Land-use tiles (for M3ob): a small top-down raster of the ground around each POI
# --------------------------------------------------------------------------------------------------------------------

_TILE_USES: tuple[str, ...] = (*LAND_USES, "empty")  # label order of the tile rasters
_TILE_EMPTY = len(LAND_USES)
_TILE_PALETTE = np.array([LAND_USE_COLOURS[u] for u in _TILE_USES], dtype=np.float64)
_TILE_BASE = _TILE_PALETTE.astype(np.uint8)
_TILE_DARK = np.round(_TILE_PALETTE * 0.55).astype(np.uint8)  # POI markers
_TILE_STREET = np.round(_TILE_PALETTE + (255.0 - _TILE_PALETTE) * 0.6).astype(np.uint8)  # streets: lighter shade
_TILE_OUTLINE = np.array([255, 255, 255], dtype=np.uint8)  # ring around the tile's own POI
_TILE_EMPTY_Z = 3.0  # ground farther than 3 spreads from every neighbourhood centre is empty
_STREET_SPACING_M = 250.0  # a grid of streets (paths in parks), fixed in city coordinates, not on empty ground
_STREET_HALF_WIDTH_M = 8.0
_STREET_MAX_PIXEL_M = _STREET_SPACING_M / 8  # coarser rasters show no streets
_TILE_PIXEL_BUDGET = 1 << 21  # tile pixels (and tile x POI pairs) rendered at once
_SAFE_FILE_NAME = r"[A-Za-z0-9_-][A-Za-z0-9._-]*"  # location ids usable as file names


def _land_use_labels(values, what: str) -> np.ndarray:
    index = {u: i for i, u in enumerate(_TILE_USES)}
    vals = [str(v) for v in values]
    bad = sorted({v for v in vals if v not in index})
    if bad:
        raise ValueError(f"{what} has land use(s) {bad} without a colour; known: {list(_TILE_USES)}")
    return np.array([index[v] for v in vals], dtype=np.int64)


def _render_land_use_tiles(
    x: np.ndarray,
    y: np.ndarray,
    poi_label: np.ndarray,
    hoods: pd.DataFrame,
    size: int,
    radius_m: float,
) -> np.ndarray:
    """Tiles [num_pois, size, size, 3] (uint8) centred on POIs at ``x, y`` (km east / north of the city's corner)."""
    num = len(x)
    radius = radius_m / 1000.0
    pixel = 2.0 * radius / size  # km
    offsets = (np.arange(size) + 0.5) * pixel - radius  # pixel centres, west to east (rows: north to south)
    used = hoods["num_pois"].to_numpy() > 0
    hx = ((hoods["longitude"].to_numpy(dtype=np.float64) - _LON_RANGE[0]) * _KM_PER_DEG_LON)[used]
    hy = ((hoods["latitude"].to_numpy(dtype=np.float64) - _LAT_RANGE[0]) * _KM_PER_DEG_LAT)[used]
    hsd = hoods["spread_km"].to_numpy(dtype=np.float64)[used]
    hlabel = _land_use_labels(hoods["land_use"].to_numpy()[used], "neighbourhoods")
    # Log-weight of each neighbourhood's Gaussian in the POI mixture: the ground takes the land use of the
    # neighbourhood that most likely produced a POI there.
    hlog = np.log(hoods["num_pois"].to_numpy(dtype=np.float64)[used]) - 2.0 * np.log(hsd)
    streets = pixel * 1000.0 <= _STREET_MAX_PIXEL_M
    half_width = max(_STREET_HALF_WIDTH_M, pixel * 500.0) / 1000.0
    spacing = _STREET_SPACING_M / 1000.0

    marker = max(2, size // 16)  # side of the small POI markers (2 px at the default size)
    centre = max(2, size // 8)  # side of the tile's own POI marker, inside a ring of width `ring`
    ring = max(1, size // 32)
    c0 = (size - centre) // 2
    mk = np.arange(marker) - (marker - 1) // 2

    tiles = np.empty((num, size, size, 3), dtype=np.uint8)
    chunk = max(1, min(_TILE_PIXEL_BUDGET // (size * size), _TILE_PIXEL_BUDGET // max(num, 1)))
    for start in range(0, num, chunk):
        sl = slice(start, min(start + chunk, num))
        n = sl.stop - sl.start
        gx = x[sl, None, None] + offsets[None, None, :]  # (n, 1, size)
        gy = y[sl, None, None] - offsets[None, :, None]  # (n, size, 1): row 0 is north
        best = np.full((n, size, size), -np.inf)
        nearest_z2 = np.full((n, size, size), np.inf)
        label = np.full((n, size, size), _TILE_EMPTY, dtype=np.int64)
        for k in range(len(hx)):
            z2 = ((gx - hx[k]) ** 2 + (gy - hy[k]) ** 2) / hsd[k] ** 2
            score = hlog[k] - 0.5 * z2
            win = score > best
            best = np.where(win, score, best)
            label = np.where(win, hlabel[k], label)
            nearest_z2 = np.minimum(nearest_z2, z2)
        label = np.where(nearest_z2 > _TILE_EMPTY_Z**2, _TILE_EMPTY, label)
        out = _TILE_BASE[label]
        if streets:
            def on_street(v: np.ndarray) -> np.ndarray:
                return np.abs(np.mod(v + spacing / 2, spacing) - spacing / 2) < half_width

            street = (on_street(gx) | on_street(gy)) & (label != _TILE_EMPTY)
            out = np.where(street[..., None], _TILE_STREET[label], out)

        # Markers of the other POIs inside the tile; where markers overlap, the later POI is drawn on top.
        dx = x[None, :] - x[sl, None]
        dy = y[None, :] - y[sl, None]
        inside = (np.abs(dx) < radius) & (np.abs(dy) < radius)
        inside[np.arange(n), np.arange(sl.start, sl.stop)] = False
        t, j = np.nonzero(inside)
        if len(t):
            col = np.clip(np.floor((dx[t, j] + radius) / pixel).astype(np.int64), 0, size - 1)
            row = np.clip(np.floor((radius - dy[t, j]) / pixel).astype(np.int64), 0, size - 1)
            rr = np.clip(row[:, None, None] + mk[None, :, None], 0, size - 1)
            cc = np.clip(col[:, None, None] + mk[None, None, :], 0, size - 1)
            flat = ((t[:, None, None] * size + rr) * size + cc).ravel()
            who = np.broadcast_to(j[:, None, None], rr.shape[:1] + (marker, marker)).ravel()
            order = np.lexsort((who, flat))
            flat, who = flat[order], who[order]
            top = np.r_[flat[1:] != flat[:-1], True]
            out.reshape(-1, 3)[flat[top]] = _TILE_DARK[poi_label[who[top]]]
        # The tile's own POI, at the centre.
        out[:, c0 - ring:c0 + centre + ring, c0 - ring:c0 + centre + ring] = _TILE_OUTLINE
        out[:, c0:c0 + centre, c0:c0 + centre] = _TILE_DARK[poi_label[sl]][:, None, None, :]
        tiles[sl] = out
    return tiles


@dataclass
class SyntheticCheckins:
    """A synthetic check-in city: the check-ins, the POI table and who the users are.

    Attributes:
        checkins (`pd.DataFrame`): one row per check-in, sorted by user then time, with columns ``user_id``,
            ``location_id`` (the venue id), ``category`` (``"Top-level > Category"``), ``category_id``, ``latitude``,
            ``longitude`` (exactly the POI's), ``tz_offset_min`` (int16, ``-240``) and ``timestamp`` (int64 UTC epoch
            seconds).
        pois (`pd.DataFrame`): one row per POI with ``location_id``, ``name`` (empty for about 5%), ``category``,
            ``category_id``, ``latitude``, ``longitude`` (rounded to 6 decimals) and ``land_use``.
        neighbourhoods (`pd.DataFrame`, *optional*): the city layout, one row per neighbourhood, with
            ``neighbourhood`` (int64, 0..), ``latitude``, ``longitude`` (its centre), ``land_use``, ``spread_km`` (the
            standard deviation, per axis, of its POIs around the centre) and ``num_pois`` (int64). Needed by
            :meth:`land_use_tiles`; ``None`` for a city made by hand without one.
        users (`pd.DataFrame`, *optional*): the ground truth about the people, one row per user (every user, also one
            without check-ins), in user order: ``user_id``, ``archetype`` (one of :data:`ARCHETYPES`),
            ``home_location_id`` (a visitor's rented apartment), ``anchor_location_id`` (the workplace or school;
            missing for visitors), ``first_day`` and ``last_day`` (int64, days since ``start_date``, inclusive: the
            user's stay; ``0`` and ``num_days - 1`` but for visitors). Descriptive only: it is for reports (which
            mixture-of-experts role fires for which archetype), and no model or baseline reads it.
    """

    checkins: pd.DataFrame
    pois: pd.DataFrame
    neighbourhoods: pd.DataFrame | None = None
    users: pd.DataFrame | None = None

    def land_use_tiles(self, size: int = 32, radius_m: float = 400.0) -> np.ndarray:
        """Render a small land-use raster tile around every POI (the images of M3ob, DESIGN §3.3).

        Each tile is a top-down RGB map, north up, of the square within ``radius_m`` metres (east-west and
        north-south) of its POI, in the order of :attr:`pois`. The ground takes the colour of its land use
        (:data:`LAND_USE_COLOURS`): that of the neighbourhood whose Gaussian cluster of POIs most likely produced a
        POI there, or ``"empty"`` beige farther than 3 spreads from every neighbourhood centre. A grid of streets
        every 250 m (paths in parks), fixed in city coordinates, is drawn in a lighter shade of the land use (not on
        empty ground, and only when a pixel is at most 31.25 m). Every other POI inside the tile is a small block
        (2 x 2 pixels at the default size, ``max(2, size // 16)`` in general) in a darker shade of its own land use,
        later POIs on top; the tile's own POI is a larger block (``max(2, size // 8)``) in that darker shade inside a
        white ring at the centre. Rendering is vectorised and deterministic: the same city gives the same bytes.

        Args:
            size (`int`, *optional*, defaults to 32): pixels per side, 8 to 256.
            radius_m (`float`, *optional*, defaults to 400.0): half the side of the square shown, in metres (> 0);
                a pixel is ``2 * radius_m / size`` metres.

        Returns:
            `np.ndarray`: uint8 array of shape ``[num_pois, size, size, 3]`` (RGB), row 0 the northern edge.
        """
        size = _check_int("size", size, 8, 256)
        if isinstance(radius_m, bool) or not isinstance(radius_m, (int, float, np.integer, np.floating)):
            raise ValueError(f"radius_m must be a number > 0 (metres), got {radius_m!r} ({type(radius_m).__name__})")
        radius_m = float(radius_m)
        if not np.isfinite(radius_m) or radius_m <= 0:
            raise ValueError(f"radius_m must be a finite number > 0 (metres), got {radius_m}")
        if self.neighbourhoods is None:
            raise ValueError(
                "land_use_tiles needs the city layout (neighbourhoods), which this SyntheticCheckins lacks; "
                "make the city with synthesize_checkins"
            )
        lat = self.pois["latitude"].to_numpy(dtype=np.float64)
        lon = self.pois["longitude"].to_numpy(dtype=np.float64)
        x = (lon - _LON_RANGE[0]) * _KM_PER_DEG_LON
        y = (lat - _LAT_RANGE[0]) * _KM_PER_DEG_LAT
        labels = _land_use_labels(self.pois["land_use"].to_numpy(), "pois")
        t0 = time.perf_counter()
        tiles = _render_land_use_tiles(x, y, labels, self.neighbourhoods, size, radius_m)
        logger.debug("rendered %d land-use tiles of %dx%d in %.2fs", len(tiles), size, size, time.perf_counter() - t0)
        return tiles

    def write_land_use_tiles(
        self, out_dir: str | os.PathLike, size: int = 32, radius_m: float = 400.0
    ) -> Path:
        """Write the tiles of :meth:`land_use_tiles` as PNG files ``<location_id>.png`` in ``out_dir/tiles/``.

        Each file is written atomically (a temporary name, then a rename); files already in the folder that belong
        to no POI of this city are left alone.

        Args:
            out_dir (`str` or `os.PathLike`): the parent folder (``tiles/`` is created in it when missing).
            size (`int`, *optional*, defaults to 32): pixels per side, 8 to 256.
            radius_m (`float`, *optional*, defaults to 400.0): half the side of the square shown, in metres (> 0).

        Returns:
            `Path`: the ``tiles`` folder.
        """
        from PIL import Image  # a dependency of matplotlib

        ids = self.pois["location_id"].astype(str)
        bad = ids[~ids.str.fullmatch(_SAFE_FILE_NAME)]
        if len(bad):
            raise ValueError(f"location_id values {bad.head(3).tolist()} cannot be file names (letters, digits, ._-)")
        dup = ids[ids.duplicated()]
        if len(dup):
            raise ValueError(f"location_id values must be unique, got duplicates {dup.head(3).tolist()}")
        tiles = self.land_use_tiles(size=size, radius_m=radius_m)
        folder = Path(out_dir) / "tiles"
        folder.mkdir(parents=True, exist_ok=True)
        for location_id, tile in zip(ids, tiles):
            buf = io.BytesIO()
            Image.fromarray(tile).save(buf, format="PNG")
            _atomic_write_bytes(folder / f"{location_id}.png", buf.getvalue())
        logger.info("wrote %d land-use tiles of %dx%d to %s", len(tiles), tiles.shape[1], tiles.shape[2], folder)
        return folder

    def write_tsmc(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """Write the city as raw files, atomically: ``checkins.txt`` (TSMC2014 format), ``pois.csv`` and, when the
        city has :attr:`users`, ``users.csv``.

        ``checkins.txt`` is tab-separated without header, Latin-1, with the columns ``userId, venueId, venueCategoryId,
        venueCategory, latitude, longitude, timezoneOffset, utcTimestamp`` and timestamps like
        ``Tue Apr 03 18:00:09 +0000 2012`` (English names whatever the locale); like the real files, ``venueCategory`` is
        the leaf name ("Coffee Shop"). ``pois.csv`` is UTF-8 with the header
        ``location_id,name,category,category_id,latitude,longitude,land_use,category_group`` (``category`` the leaf
        name, ``category_group`` the top level, e.g. "Food"). ``users.csv`` is UTF-8 with the header
        ``user_id,archetype,home_location_id,anchor_location_id,first_day,last_day`` (an empty field for a missing
        anchor); ``mobility data prepare`` carries it into the prepared dataset as its ``users`` table.

        Args:
            out_dir (`str` or `os.PathLike`): the folder (created when missing).

        Returns:
            `dict[str, Path]`: ``{"checkins": path of checkins.txt, "pois": path of pois.csv}``, plus ``"users"``: the
            path of users.csv when written.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        c = self.checkins
        fields = [
            c["user_id"].astype(str).tolist(),
            c["location_id"].astype(str).tolist(),
            c["category_id"].astype(str).tolist(),
            c["category"].astype(str).str.split(" > ").str[-1].tolist(),  # TSMC2014 has the leaf name only
            [repr(float(v)) for v in c["latitude"].to_numpy()],
            [repr(float(v)) for v in c["longitude"].to_numpy()],
            [str(int(v)) for v in c["tz_offset_min"].to_numpy()],
            _format_tsmc_timestamps(c["timestamp"].to_numpy(dtype=np.int64)),
        ]
        text = "".join("\t".join(row) + "\n" for row in zip(*fields))
        paths = {"checkins": out / "checkins.txt", "pois": out / "pois.csv"}
        _atomic_write_bytes(paths["checkins"], text.encode("latin-1"))
        csv = self.pois[["location_id", "name", "category", "category_id", "latitude", "longitude", "land_use"]]
        parts = csv["category"].astype(str).str.split(" > ")
        csv = csv.assign(category=parts.str[-1], category_group=parts.str[0])
        _atomic_write_bytes(paths["pois"], csv.to_csv(index=False, lineterminator="\n").encode("utf-8"))
        if self.users is not None:
            paths["users"] = out / "users.csv"
            _atomic_write_bytes(paths["users"], self.users.to_csv(index=False, lineterminator="\n").encode("utf-8"))
        logger.info("wrote %d check-ins and %d POIs to %s", len(c), len(self.pois), out)
        return paths


_DAY_NAMES = np.array(["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"])
_MONTH_NAMES = np.array(["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"])


def _format_tsmc_timestamps(ts: np.ndarray) -> list[str]:
    """UTC epoch seconds to ``Tue Apr 03 18:00:09 +0000 2012`` (English names, no locale involved)."""
    days = np.floor_divide(ts, 86400)
    secs = ts - days * 86400
    dates = days.astype("datetime64[D]")
    months = dates.astype("datetime64[M]")
    year = months.astype("datetime64[Y]").astype(np.int64) + 1970
    month = months.astype(np.int64) % 12
    mday = (dates - months.astype("datetime64[D]")).astype(np.int64) + 1
    weekday = (days + 3) % 7  # 1970-01-01 was a Thursday
    hh, mm, ss = secs // 3600, (secs // 60) % 60, secs % 60
    return [
        f"{_DAY_NAMES[a]} {_MONTH_NAMES[b]} {c:02d} {h:02d}:{m:02d}:{s:02d} +0000 {y}"
        for a, b, c, h, m, s, y in zip(weekday, month, mday, hh, mm, ss, year)
    ]


def _parse_start_date(start_date) -> pd.Timestamp:
    try:
        start = pd.Timestamp(start_date)
    except (TypeError, ValueError) as err:
        raise ValueError(f"start_date must be a date like '2012-04-02', got {start_date!r}") from err
    if start is pd.NaT or pd.isna(start):
        raise ValueError(f"start_date must be a date like '2012-04-02', got {start_date!r}")
    if start.tzinfo is not None or start != start.normalize():
        raise ValueError(f"start_date must be a calendar date without time or time zone, got {start_date!r}")
    if not pd.Timestamp("1971-01-01") <= start <= pd.Timestamp("2100-01-01"):
        raise ValueError(f"start_date must be in [1971-01-01, 2100-01-01], got {start_date!r}")
    return start


def synthesize_checkins(
    num_users: int = 150,
    num_locations: int = 500,
    num_days: int = 120,
    seed: int = 0,
    city_seed: int | None = None,
    start_date: str = "2012-04-02",
    archetype_mix: dict[str, float] | None = None,
) -> SyntheticCheckins:
    """Make a synthetic Foursquare-like check-in city.

    The city (seeded by ``city_seed``) has 8-12 neighbourhoods of distinct land use (residential, office, campus,
    nightlife, parks, shopping, transit hub), each a Gaussian cluster of POIs in a 0.2 x 0.2 degree box around New
    York. Every user (seeded by ``seed``) belongs to an archetype (:data:`ARCHETYPES`) with its own weekly routine
    (slot x weekday x category preferences and check-in rates, with activity chaining such as coffee -> work or
    restaurant -> bar), anchor and habits:

    - ``office_worker``: commutes on weekdays to an office, mostly in an office district, 08:00-18:00;
    - ``student``: the same week at a university or college building, mostly on campus;
    - ``night_shift_worker``: works 22:00-06:00 (Sunday to Thursday nights) at a hospital, a station or a 24-hour
      deli or fast-food place, sleeps in the morning, runs errands in the afternoon, goes out on nights off;
    - ``visitor``: in town for only 3-7 days, staying in a rented apartment near the lively centre, with no work
      anchor and no regular places; sightseeing, shopping, food and nightlife, exploring many new places (EPR with
      ``rho = 0.9``) farther afield (exploration decay 4 km instead of 2 km), 5-10 check-ins a day;
    - ``remote_worker``: works from home, cafés and a coworking space near home on weekdays;
    - ``service_worker``: works 12:00-21:00 in a shop, restaurant or bar, mostly in shopping and nightlife districts,
      Wednesday to Sunday.

    Residents (every archetype but visitors) have a home, favourite and regular places (one per activity near home,
    one near the anchor) and personal tastes. Each check-in picks an activity from the routine, then a place: the
    home or anchor for those activities, often the nearer regular place, else EPR: exploration of a new POI with
    probability ``rho * S ** -0.21`` (``rho = 0.6`` but for visitors; ``S`` distinct places so far; chosen by taste
    and ``exp(-distance / 2 km)`` from the current place) or a return to a visited one in proportion to its visits (and
    ``exp(-distance / 4 km)``). Residents differ in activity (about 1 to 6 check-ins per active day) and skip 5-45% of
    days. Local time is ``timestamp + tz_offset_min * 60`` and lies in ``[start_date, start_date + num_days)``. The
    archetype simulation is vectorised over chunks of users, and the same arguments give the same frames and bytes.

    Args:
        num_users (`int`, *optional*, defaults to 150): number of users, at least 1.
        num_locations (`int`, *optional*, defaults to 500): number of POIs, at least 20.
        num_days (`int`, *optional*, defaults to 120): length of the observation window in days, 1 to 36500.
        seed (`int`, *optional*, defaults to 0): seed of the users and their movements (>= 0).
        city_seed (`int`, *optional*): seed of the city layout (>= 0); defaults to ``seed``.
        start_date (`str`, *optional*, defaults to `"2012-04-02"`): local calendar date of day 0 (a Monday by
            default).
        archetype_mix (`dict[str, float]`, *optional*): share of the users of each archetype (names from
            :data:`ARCHETYPES`; a missing name has share 0), non-negative and summing to 1. Defaults to
            :data:`DEFAULT_ARCHETYPE_MIX`: office_worker 0.5, student 0.2, night_shift_worker 0.1, visitor 0.1,
            remote_worker 0.05, service_worker 0.05. Each archetype gets exactly its share of the users, rounded by
            largest remainder (ties to the archetype listed first), and users are shuffled (seeded by ``seed``).

    Returns:
        [`SyntheticCheckins`]: the check-ins, the POI table and the ``users`` table (defaults: about 30-40k check-ins,
        in about a second).

    Raises:
        `ValueError`: on a bad argument, e.g. an unknown archetype or shares that are negative or do not sum to 1.
    """
    num_users = _check_int("num_users", num_users, 1)
    num_locations = _check_int("num_locations", num_locations, 20)
    num_days = _check_int("num_days", num_days, 1, 36500)
    seed, city_seed = _check_seeds(seed, city_seed)
    start = _parse_start_date(start_date)
    shares = _check_archetype_mix(archetype_mix)
    t0 = time.perf_counter()

    city = _build_poi_city(num_locations, _rng(city_seed, 1))
    start_weekday = start.weekday()
    base_epoch = int((start - pd.Timestamp("1970-01-01")) // pd.Timedelta(seconds=1))  # local midnight of day 0
    archetype = _assign_archetypes(num_users, shares, _rng(seed, 4))

    users, days, slots, locs, infos = [], [], [], [], []
    chunks = np.random.SeedSequence([seed, 2]).spawn((num_users + _USER_CHUNK - 1) // _USER_CHUNK)
    for i, chunk_seed in enumerate(chunks):
        lo = i * _USER_CHUNK
        (u, d, s, loc), info = _simulate_checkin_chunk(
            city, archetype[lo:lo + _USER_CHUNK], num_days, start_weekday, np.random.default_rng(chunk_seed)
        )
        users.append(u + lo)
        days.append(d)
        slots.append(s)
        locs.append(loc)
        infos.append(info)
    user = np.concatenate(users)
    day = np.concatenate(days)
    slot = np.concatenate(slots)
    loc = np.concatenate(locs)
    info = {k: np.concatenate([x[k] for x in infos]) for k in infos[0]}

    time_rng = _rng(seed, 3)
    hours = np.array(_SLOT_HOURS, dtype=np.int64)
    span = (hours[slot, 1] - hours[slot, 0]) * 3600
    local = day * 86400 + hours[slot, 0] * 3600 + np.floor(time_rng.random(len(slot)) * span).astype(np.int64)
    timestamp = base_epoch + local - _TZ_OFFSET_MIN * 60
    order = np.lexsort((timestamp, user))
    user, loc, timestamp = user[order], loc[order], timestamp[order]

    width = max(4, len(str(num_users)))
    user_ids = np.array([f"u{i + 1:0{width}d}" for i in range(num_users)], dtype=object)
    categories = np.array(_CATEGORIES, dtype=object)
    category_ids = np.array(_CATEGORY_IDS, dtype=object)
    checkins = pd.DataFrame(
        {
            "user_id": pd.array(user_ids[user], dtype="string"),
            "location_id": pd.array(city.venue_ids[loc], dtype="string"),
            "category": pd.array(categories[city.cat[loc]], dtype="string"),
            "category_id": pd.array(category_ids[city.cat[loc]], dtype="string"),
            "latitude": city.lat[loc].astype(np.float64),
            "longitude": city.lon[loc].astype(np.float64),
            "tz_offset_min": np.full(len(loc), _TZ_OFFSET_MIN, dtype=np.int16),
            "timestamp": timestamp.astype(np.int64),
        }
    )
    pois = pd.DataFrame(
        {
            "location_id": pd.array(city.venue_ids, dtype="string"),
            "name": pd.array(np.array(city.names, dtype=object), dtype="string"),
            "category": pd.array(categories[city.cat], dtype="string"),
            "category_id": pd.array(category_ids[city.cat], dtype="string"),
            "latitude": city.lat.astype(np.float64),
            "longitude": city.lon.astype(np.float64),
            "land_use": pd.array(city.land_use.astype(object), dtype="string"),
        }
    )
    anchor = info["anchor"]
    users_table = pd.DataFrame(
        {
            "user_id": pd.array(user_ids, dtype="string"),
            "archetype": pd.array(np.array(ARCHETYPES, dtype=object)[archetype], dtype="string"),
            "home_location_id": pd.array(city.venue_ids[info["home"]], dtype="string"),
            "anchor_location_id": pd.array(
                np.where(anchor >= 0, city.venue_ids[np.maximum(anchor, 0)], None), dtype="string"
            ),
            "first_day": info["first_day"].astype(np.int64),
            "last_day": info["last_day"].astype(np.int64),
        }
    )
    logger.info(
        "synthesised %d check-ins of %d users (%s) at %d POIs over %d days in %.2fs",
        len(checkins), num_users, ", ".join(f"{k} {v}" for k, v in users_table["archetype"].value_counts().items()),
        num_locations, num_days, time.perf_counter() - t0,
    )
    return SyntheticCheckins(checkins=checkins, pois=pois, neighbourhoods=city.neighbourhoods, users=users_table)


# --------------------------------------------------------------------------------------------------------------------
# Grid city
# --------------------------------------------------------------------------------------------------------------------

_SLOTS_PER_DAY = 48
_GRID_USER_CHUNK = 2048
_GRID_MEMORY = 48  # leisure places remembered per user (EPR)
# Relative chance of a record in each half-hour slot (phones are used more by day).
_OBS_PROFILE = np.concatenate([np.full(12, 0.25), np.full(6, 1.0), np.full(18, 1.2), np.full(8, 1.0), np.full(4, 0.5)])


@dataclass
class _GridCity:
    res_c: np.ndarray  # (k, 2) centres
    res_sd: np.ndarray
    res_w: np.ndarray
    biz_c: np.ndarray
    biz_sd: np.ndarray
    biz_w: np.ndarray
    fun_c: np.ndarray  # leisure destinations (leisure hubs and business districts)
    fun_sd: np.ndarray
    fun_w: np.ndarray


def _build_grid_city(grid_size: int, rng: np.random.Generator) -> _GridCity:
    g = float(grid_size)
    centre = g / 2 + rng.normal(0.0, 0.05 * g, 2)

    def hubs(k: int, spread: float, sd_range: tuple[float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        c = np.clip(centre[None, :] + rng.normal(0.0, spread * g, (k, 2)), 1, g)
        return c, rng.uniform(*sd_range, k) * g, rng.gamma(4.0, 0.25, k)

    n_biz = int(rng.integers(2, 5))
    biz_c, biz_sd, biz_w = hubs(n_biz, 0.15, (0.01, 0.025))
    biz_c[0] = np.clip(centre + rng.normal(0.0, 0.02 * g, 2), 1, g)  # the central business district
    biz_w[0] = 3.0
    res_c, res_sd, res_w = hubs(int(rng.integers(6, 11)), 0.2, (0.025, 0.05))
    leis_c, leis_sd, leis_w = hubs(int(rng.integers(3, 7)), 0.18, (0.008, 0.02))
    return _GridCity(
        res_c, res_sd, res_w, biz_c, biz_sd, biz_w,
        np.concatenate([leis_c, biz_c]), np.concatenate([leis_sd, biz_sd]), np.concatenate([leis_w * 1.5, biz_w]),
    )


def _around(centres: np.ndarray, sd: np.ndarray, grid_size: int, rng: np.random.Generator) -> np.ndarray:
    cells = np.rint(centres + rng.normal(0.0, 1.0, centres.shape) * sd[:, None])
    return np.clip(cells, 1, grid_size).astype(np.int64)


def _pick_hub(w: np.ndarray, centres: np.ndarray, origin: np.ndarray, scale: float, rng) -> np.ndarray:
    d = np.hypot(centres[None, :, 0] - origin[:, None, 0], centres[None, :, 1] - origin[:, None, 1])
    return _sample_rows(w[None, :] * np.exp(-d / scale) + 1e-9, rng.random(len(origin)))


def _simulate_grid_chunk(
    city: _GridCity, n: int, num_days: int, grid_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Simulate ``n`` users; return x, y (int16, n x days x 48) and the observed mask."""
    g = float(grid_size)
    # Anchors.
    res = _sample_rows(np.broadcast_to(city.res_w, (n, len(city.res_w))), rng.random(n))
    home = _around(city.res_c[res], city.res_sd[res], grid_size, rng)
    worker = rng.random(n) < 0.85
    biz = _pick_hub(city.biz_w, city.biz_c, home, 0.25 * g, rng)
    work = _around(city.biz_c[biz], city.biz_sd[biz], grid_size, rng)
    lunch = np.clip(work[:, None, :] + rng.integers(-2, 3, (n, 2, 2)), 1, grid_size)
    commute = np.clip(np.ceil(np.hypot(*(work - home).T) / (0.08 * g)), 1, 3).astype(np.int64)
    leave_mu = rng.integers(14, 19, n)
    back_mu = rng.integers(34, 40, n)
    p_lunch = rng.uniform(0.1, 0.5, n)
    p_evening = rng.uniform(0.1, 0.4, n)
    p_out = rng.uniform(0.5, 0.95, n)
    p_jitter = rng.uniform(0.02, 0.1, n)
    per_day = rng.uniform(8.0, 20.0, n)
    p_skip = rng.uniform(0.03, 0.3, n)
    p_obs = np.minimum(1.0, per_day[:, None] * _OBS_PROFILE[None, :] / _OBS_PROFILE.sum())

    # Leisure memory (EPR): a few favourite places to start with.
    mem = np.zeros((n, _GRID_MEMORY, 2), dtype=np.int64)
    mem_c = np.zeros((n, _GRID_MEMORY))
    mem_n = rng.integers(2, 5, n)
    for j in range(4):
        hub = _pick_hub(city.fun_w, city.fun_c, home, 0.15 * g, rng)
        mem[:, j] = _around(city.fun_c[hub], city.fun_sd[hub], grid_size, rng)
        mem_c[:, j] = np.where(j < mem_n, rng.integers(1, 4, n), 0)

    def leisure(idx: np.ndarray) -> np.ndarray:
        """EPR choice of a leisure place for users ``idx``; updates the memory."""
        m = len(idx)
        s = mem_n[idx]
        full = s >= _GRID_MEMORY
        explore = (rng.random(m) < _RHO * np.maximum(s, 1) ** -_GAMMA) & ~full
        hub = _pick_hub(city.fun_w, city.fun_c, home[idx], 0.15 * g, rng)
        near_hub = _around(city.fun_c[hub], city.fun_sd[hub] * 1.5, grid_size, rng)
        angle = rng.uniform(0, 2 * np.pi, m)
        r = np.minimum(2.0 * (1.0 - rng.random(m)) ** (-1 / 1.2), g / 3)
        flight = np.clip(np.rint(home[idx] + r[:, None] * np.stack([np.cos(angle), np.sin(angle)], 1)), 1, grid_size)
        new_cell = np.where((rng.random(m) < 0.25)[:, None], flight.astype(np.int64), near_hub)
        k = _sample_rows(mem_c[idx], rng.random(m))
        cell = np.where(explore[:, None], new_cell, mem[idx, k])
        slot = np.where(explore, np.minimum(s, _GRID_MEMORY - 1), k)
        mem[idx, slot] = cell
        mem_c[idx, slot] += 1
        mem_n[idx] += explore
        return cell

    t = np.arange(_SLOTS_PER_DAY)[None, :]
    xs = np.empty((n, num_days, _SLOTS_PER_DAY), dtype=np.int16)
    ys = np.empty_like(xs)
    observed = np.empty((n, num_days, _SLOTS_PER_DAY), dtype=bool)
    for day in range(num_days):
        weekday = day % 7 < 5
        x = np.repeat(home[:, :1], _SLOTS_PER_DAY, axis=1)
        y = np.repeat(home[:, 1:], _SLOTS_PER_DAY, axis=1)
        anchored = np.ones((n, _SLOTS_PER_DAY), dtype=bool)  # at home or work: may report a neighbouring cell
        works = worker & weekday & (rng.random(n) >= 0.05)
        leave = np.clip(leave_mu + rng.integers(-1, 2, n), 10, 22)
        arrive = leave + commute
        back = np.clip(back_mu + rng.integers(-1, 3, n), arrive + 4, 43)
        home_at = back + commute
        r_lunch, r_lunch_spot, r_evening = rng.random(n), rng.random(n), rng.random(n)
        ev_len = rng.integers(2, 5, n)
        r_out, r_more = rng.random(n), rng.random((n, 2))
        trip_start, trip_len = rng.integers(18, 27, n), rng.integers(3, 9, (n, 3))
        trip_gap = rng.integers(1, 4, (n, 2))

        # Workdays: commute, office hours, lunch nearby, sometimes an evening outing.
        wk = works[:, None]
        go = wk & (t >= leave[:, None]) & (t < arrive[:, None])
        frac = (t - leave[:, None] + 1) / (commute[:, None] + 1)
        ret = wk & (t >= back[:, None]) & (t < home_at[:, None])
        frac = np.where(ret, 1 - (t - back[:, None] + 1) / (commute[:, None] + 1), frac)
        moving = go | ret
        x = np.where(moving, np.rint(home[:, :1] + frac * (work[:, :1] - home[:, :1])), x)
        y = np.where(moving, np.rint(home[:, 1:] + frac * (work[:, 1:] - home[:, 1:])), y)
        anchored &= ~moving
        office = wk & (t >= arrive[:, None]) & (t < back[:, None])
        x = np.where(office, work[:, :1], x)
        y = np.where(office, work[:, 1:], y)
        spot = lunch[np.arange(n), (r_lunch_spot >= 0.7).astype(np.int64)]
        at_lunch = office & (works & (r_lunch < p_lunch))[:, None] & (t >= 24) & (t < 26)
        x = np.where(at_lunch, spot[:, :1], x)
        y = np.where(at_lunch, spot[:, 1:], y)
        anchored &= ~at_lunch
        ev = np.flatnonzero(works & (r_evening < p_evening))
        if len(ev):
            cell = leisure(ev)
            m = (t >= home_at[ev, None]) & (t < home_at[ev, None] + ev_len[ev, None])
            x[ev] = np.where(m, cell[:, :1], x[ev])
            y[ev] = np.where(m, cell[:, 1:], y[ev])
            anchored[ev] &= ~m

        # Free days: home, then up to three outings chosen by EPR.
        n_trips = np.where(~works & (r_out < p_out), 1 + (r_more < [0.35, 0.15]).sum(axis=1), 0)
        start = trip_start.copy()
        for j in range(3):
            idx = np.flatnonzero(n_trips > j)
            if len(idx) == 0:
                break
            end = np.minimum(start + trip_len[:, j], 46)
            cell = leisure(idx)
            m = (t >= start[idx, None]) & (t < end[idx, None])
            x[idx] = np.where(m, cell[:, :1], x[idx])
            y[idx] = np.where(m, cell[:, 1:], y[idx])
            anchored[idx] &= ~m
            if j < 2:
                start = end + trip_gap[:, j]
            n_trips = np.where(start >= 44, 0, n_trips)

        # GPS-like jitter at home and work, then sparse observation.
        jitter = anchored & (rng.random((n, _SLOTS_PER_DAY)) < p_jitter[:, None])
        offset = rng.integers(-1, 2, (n, _SLOTS_PER_DAY, 2))
        x = np.where(jitter, x + offset[..., 0], x)
        y = np.where(jitter, y + offset[..., 1], y)
        xs[:, day] = np.clip(x, 1, grid_size).astype(np.int16)
        ys[:, day] = np.clip(y, 1, grid_size).astype(np.int16)
        active = rng.random(n) >= p_skip
        observed[:, day] = active[:, None] & (rng.random((n, _SLOTS_PER_DAY)) < p_obs)
    return xs, ys, observed


def synthesize_grid(
    num_users: int = 200,
    num_days: int = 75,
    grid_size: int = 200,
    seed: int = 0,
    city_seed: int | None = None,
) -> pd.DataFrame:
    """Make a synthetic HuMob / YJMob100K-style grid city.

    The city (seeded by ``city_seed``) has residential areas, business districts (one central) and leisure hubs. Each
    user (seeded by ``seed``) has a home and, for 85%, a workplace; day 0 is a Monday. Workdays: home at night, a
    commute of 1-3 slots, office hours, lunch nearby on some days, sometimes an evening outing. Free days: home, then
    up to three outings chosen by exploration and preferential return with distance decay. Home and work cells are
    occasionally reported as a neighbouring cell. Users are observed in 8-20 slots per active day on average (more by
    day than at night) and skip 3-30% of days.

    Args:
        num_users (`int`, *optional*, defaults to 200): number of users, at least 1.
        num_days (`int`, *optional*, defaults to 75): number of days, 1 to 32767.
        grid_size (`int`, *optional*, defaults to 200): cells per side, 10 to 998 (cells are 1-based).
        seed (`int`, *optional*, defaults to 0): seed of the users and their movements (>= 0).
        city_seed (`int`, *optional*): seed of the city layout (>= 0); defaults to ``seed``.

    Returns:
        `pd.DataFrame`: columns ``uid`` (int64, 0..num_users-1), ``d`` (int16), ``t`` (int8, 0..47), ``x``, ``y``
        (int16, 1..grid_size), sorted by ``uid, d, t`` with at most one row per ``(uid, d, t)``.
    """
    num_users = _check_int("num_users", num_users, 1)
    num_days = _check_int("num_days", num_days, 1, 32767)
    grid_size = _check_int("grid_size", grid_size, 10, 998)
    seed, city_seed = _check_seeds(seed, city_seed)
    t0 = time.perf_counter()

    city = _build_grid_city(grid_size, _rng(city_seed, 11))
    frames = []
    chunks = np.random.SeedSequence([seed, 12]).spawn((num_users + _GRID_USER_CHUNK - 1) // _GRID_USER_CHUNK)
    for i, chunk_seed in enumerate(chunks):
        n = min(_GRID_USER_CHUNK, num_users - i * _GRID_USER_CHUNK)
        xs, ys, observed = _simulate_grid_chunk(city, n, num_days, grid_size, np.random.default_rng(chunk_seed))
        u, d, t = np.nonzero(observed)  # C order: sorted by user, day, slot
        frames.append(
            pd.DataFrame(
                {
                    "uid": (u + i * _GRID_USER_CHUNK).astype(np.int64),
                    "d": d.astype(np.int16),
                    "t": t.astype(np.int8),
                    "x": xs[u, d, t].astype(np.int16),
                    "y": ys[u, d, t].astype(np.int16),
                }
            )
        )
    grid = pd.concat(frames, ignore_index=True)
    logger.info(
        "synthesised %d grid records of %d users over %d days on a %dx%d grid in %.2fs",
        len(grid), num_users, num_days, grid_size, grid_size, time.perf_counter() - t0,
    )
    return grid


def write_yjmob(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a grid table as YJMob100K CSV (``uid,d,t,x,y`` with header), atomically; gzip when ``path`` ends in .gz.

    Args:
        df (`pd.DataFrame`): a table with integer columns ``uid, d, t, x, y`` (e.g. from :func:`synthesize_grid`).
        path (`str` or `os.PathLike`): the output file; its folder is created when missing.

    Returns:
        `Path`: the written file.
    """
    cols = ["uid", "d", "t", "x", "y"]
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"df must be a pandas DataFrame with columns {cols}, got {type(df).__name__}")
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"df is missing column(s) {missing}; it has {list(df.columns)} and needs {cols}")
    bad = [c for c in cols if not pd.api.types.is_integer_dtype(df[c])]
    if bad:
        raise ValueError(f"df columns {bad} must be integers, got dtypes {[str(df[c].dtype) for c in bad]}")
    path = Path(path)
    data = df[cols].to_csv(index=False, lineterminator="\n").encode("ascii")
    if path.name.lower().endswith(".gz"):
        data = gzip.compress(data, compresslevel=6, mtime=0)
    _atomic_write_bytes(path, data)
    logger.info("wrote %d grid rows to %s", len(df), path)
    return path
