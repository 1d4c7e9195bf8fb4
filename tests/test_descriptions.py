"""Location descriptions: exact neighbourhoods on a hand-made street, formatting rules, and the synthetic city."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from dataset_builders.descriptions import EARTH_RADIUS_M, build_descriptions, format_distance
from dataset_builders.synthetic import synthesize_checkins

LAT0, LON0 = 40.0, -74.0


def _north(metres: float) -> float:
    """Latitude ``metres`` north of LAT0 along the meridian (great-circle distance on the sphere)."""
    return LAT0 + math.degrees(metres / EARTH_RADIUS_M)


@pytest.fixture
def street() -> pd.DataFrame:
    """Six places on one meridian, at 0, 100, 300, 450, 2010 and 5000 m north of the first."""
    return pd.DataFrame(
        {
            "location_id": ["a", "b", "c", "d", "e", "f"],
            "latitude": [_north(m) for m in (0, 100, 300, 450, 2010, 5000)],
            "longitude": [LON0] * 6,
            "name": ["Alpha Cafe", "Bravo Office", None, "  ", "Echo Park", "Foxtrot Bar"],
            "category": ["Coffee Shop", "Office", "Coffee Shop", None, "Park", "Bar"],
            "category_group": ["Food", "Professional", "Food", None, "Outdoors", "Nightlife"],
        }
    )


def _by_id(out: pd.DataFrame) -> dict[str, str]:
    return dict(zip(out["location_id"], out["description"]))


def test_columns_order_and_join(street):
    shuffled = street.iloc[[3, 0, 5, 1, 4, 2]].reset_index(drop=True)
    out = build_descriptions(shuffled)
    assert list(out.columns) == ["location_id", "intrinsic", "contextual", "description"]
    assert len(out) == len(shuffled)
    assert out["location_id"].tolist() == shuffled["location_id"].tolist()
    assert (out["description"] == out["intrinsic"] + "\n" + out["contextual"]).all()
    # Same text whatever the row order.
    assert _by_id(out) == _by_id(build_descriptions(street))


def test_exact_neighbourhoods(street):
    d = _by_id(build_descriptions(street))
    assert d["a"] == (
        "Name: Alpha Cafe\nCategory: Food > Coffee Shop\nLocated at 40.0000, -74.0000.\n"
        "Within 500 m: 3 places — 1 Coffee Shop, 1 Office, 1 other.\n"
        "Nearest named places: Bravo Office (100 m), Echo Park (2.0 km), Foxtrot Bar (5.0 km)."
    )
    assert "Within 500 m: 3 places — 2 Coffee Shop, 1 other." in d["b"]
    assert "Within 500 m: 3 places — 1 Coffee Shop, 1 Office, 1 other." in d["c"]
    assert "Within 500 m: 3 places — 2 Coffee Shop, 1 Office." in d["d"]
    assert "Nearest named places: Bravo Office (200 m), Alpha Cafe (300 m), Echo Park (1.7 km)." in d["c"]
    assert "Nearest named places: Bravo Office (350 m), Alpha Cafe (450 m), Echo Park (1.6 km)." in d["d"]
    assert "Within 500 m: no other places." in d["e"]
    assert "Nearest named places: Bravo Office (1.9 km), Alpha Cafe (2.0 km), Foxtrot Bar (3.0 km)." in d["e"]
    assert "Within 500 m: no other places." in d["f"]
    assert "Nearest named places: Echo Park (3.0 km), Bravo Office (4.9 km), Alpha Cafe (5.0 km)." in d["f"]


def test_no_self_in_context(street):
    out = build_descriptions(street)
    for name, contextual in zip(street["name"], out["contextual"]):
        if isinstance(name, str) and name.strip():
            assert name not in contextual


def test_location_without_name_or_category(street):
    out = build_descriptions(street).set_index("location_id")
    # "d" has a blank name and no category: coordinates and both context lines remain.
    assert out.loc["d", "intrinsic"] == f"Located at {_north(450):.4f}, -74.0000."
    assert "Name:" not in out.loc["d", "description"]
    assert "Category:" not in out.loc["d", "description"]
    assert out.loc["d", "contextual"].startswith("Within 500 m: 3 places")
    assert "Nearest named places:" in out.loc["d", "contextual"]
    # "c" has no name but a category.
    assert out.loc["c", "intrinsic"].startswith("Category: Food > Coffee Shop\nLocated at")
    # Unnamed places never appear as nearest named places.
    assert not out["contextual"].str.contains("None").any()


def test_empty_names_are_missing():
    df = pd.DataFrame(
        {
            "location_id": ["x", "y", "z"],
            "latitude": [LAT0, _north(50), _north(80)],
            "longitude": [LON0] * 3,
            "name": ["", "Yankee Deli", "   "],
            "category": ["", None, "Deli"],
        }
    )
    out = build_descriptions(df).set_index("location_id")
    assert out.loc["x", "intrinsic"] == "Located at 40.0000, -74.0000."
    assert (
        out.loc["x", "contextual"]
        == "Within 500 m: 2 places — 1 Deli, 1 other.\nNearest named places: Yankee Deli (50 m)."
    )
    assert out.loc["y", "contextual"].endswith("Nearest named places: none.")
    assert "Name: " not in out.loc["z", "intrinsic"]


def test_hierarchical_category_address_and_options(street):
    df = street.drop(columns=["category_group"]).assign(
        category=["Food > Coffee Shop", "Professional > Office", "Food > Coffee Shop", None, "Park", "Bar"],
        address=["1 Main St", None, "", None, None, None],
    )
    out = build_descriptions(df, radius_m=250, num_nearest=1, max_categories=1).set_index("location_id")
    assert out.loc["a", "intrinsic"] == (
        "Name: Alpha Cafe\nCategory: Food > Coffee Shop\nAddress: 1 Main St\nLocated at 40.0000, -74.0000."
    )
    assert (
        out.loc["a", "contextual"] == "Within 250 m: 1 place — 1 Office.\nNearest named places: Bravo Office (100 m)."
    )
    assert out.loc["b", "contextual"].startswith("Within 250 m: 2 places — 2 Coffee Shop.")
    assert out.loc["c", "contextual"].startswith("Within 250 m: 2 places — 1 Office, 1 other.")
    assert "Address" not in out.loc["c", "intrinsic"]
    assert out.loc["e", "intrinsic"] == f"Name: Echo Park\nCategory: Park\nLocated at {_north(2010):.4f}, -74.0000."
    counts_only = build_descriptions(df, radius_m=1000, num_nearest=0, max_categories=0).set_index("location_id")
    assert counts_only.loc["a", "contextual"] == "Within 1 km: 3 places."


def test_distances_match_haversine():
    rng = np.random.default_rng(0)
    n = 400
    lat = rng.uniform(-60, 60, n)
    lon = rng.uniform(-179, 179, n)
    df = pd.DataFrame({"location_id": [str(i) for i in range(n)], "latitude": lat, "longitude": lon})
    df["name"] = [f"P{i}" for i in range(n)]
    out = build_descriptions(df, radius_m=1_000_000, num_nearest=1)
    phi, lam = np.radians(lat), np.radians(lon)
    a = (
        np.sin((phi[:, None] - phi[None]) / 2) ** 2
        + np.cos(phi[:, None]) * np.cos(phi[None]) * np.sin((lam[:, None] - lam[None]) / 2) ** 2
    )
    hav = 2 * EARTH_RADIUS_M * np.arcsin(np.sqrt(a))
    np.fill_diagonal(hav, np.inf)
    nearest = hav.argmin(1)
    within = (hav <= 1_000_000).sum(1)
    for i in range(n):
        text = out["contextual"][i]
        assert f"Nearest named places: P{nearest[i]} ({format_distance(hav[i, nearest[i]])})." in text
        if within[i]:
            assert f": {within[i]} place" in text


def test_pyarrow_and_empty_input(street):
    out = build_descriptions(pa.Table.from_pandas(street))
    assert out["location_id"].tolist() == list("abcdef")
    empty = build_descriptions(street.iloc[:0])
    assert list(empty.columns) == ["location_id", "intrinsic", "contextual", "description"]
    assert len(empty) == 0
    single = build_descriptions(street.iloc[:1])
    assert single["contextual"][0] == "Within 500 m: no other places.\nNearest named places: none."


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"radius_m": 0}, "radius_m"),
        ({"radius_m": float("nan")}, "radius_m"),
        ({"num_nearest": -1}, "num_nearest"),
        ({"max_categories": 1.5}, "max_categories"),
    ],
)
def test_bad_arguments(street, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_descriptions(street, **kwargs)


def test_bad_tables(street):
    with pytest.raises(ValueError, match="missing column"):
        build_descriptions(street.drop(columns=["latitude"]))
    with pytest.raises(ValueError, match="latitude"):
        build_descriptions(street.assign(latitude=[np.nan, 0, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="longitude"):
        build_descriptions(street.assign(longitude=[0, 0, 0, 0, 0, 190.0]))
    with pytest.raises(ValueError, match="repeated location_id"):
        build_descriptions(street.assign(location_id=list("aabcde")))
    with pytest.raises(ValueError, match="DataFrame"):
        build_descriptions([1, 2, 3])


def test_synthetic_city_descriptions_are_distinct():
    city = synthesize_checkins(num_users=20, num_locations=120, num_days=20)
    out = build_descriptions(city.pois)
    assert len(out) == len(city.pois)
    assert out["description"].nunique() >= 0.95 * len(out)
    # The synthetic categories are hierarchical ("Food > Coffee Shop"): neighbours are counted by leaf category.
    assert out["description"].str.contains("Category: ").mean() > 0.99
    assert not out["contextual"].str.contains(" > ").any()
    assert out["description"].str.len().max() < 600
    # Deterministic.
    assert build_descriptions(city.pois).equals(out)


def test_great_circle_m_known_values():
    from dataset_builders.descriptions import EARTH_RADIUS_M, great_circle_m

    d = great_circle_m([0.0, 40.0, 10.0], [0.0, -74.0, 20.0], [1.0, 40.0, 10.0], [0.0, -74.0, 20.0])
    assert d[0] == pytest.approx(EARTH_RADIUS_M * np.pi / 180, rel=1e-9)  # one degree of latitude
    assert d[1] == 0.0 and d[2] == 0.0
    # a quarter of the equator
    assert great_circle_m([0.0], [0.0], [0.0], [90.0])[0] == pytest.approx(EARTH_RADIUS_M * np.pi / 2, rel=1e-9)
