"""Tests of the synthetic cities (dataset_builders/synthetic.py): determinism, schema, file formats and structure."""

from __future__ import annotations

import gzip

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from dataset_builders.synthetic import (
    ARCHETYPES,
    CATEGORY_HIERARCHY,
    DEFAULT_ARCHETYPE_MIX,
    LAND_USE_COLOURS,
    LAND_USES,
    SyntheticCheckins,
    synthesize_checkins,
    synthesize_grid,
    write_yjmob,
)

SMALL = {"num_users": 20, "num_locations": 120, "num_days": 21}
SMALL_GRID = {"num_users": 30, "num_days": 14}
TSMC_FORMAT = "%a %b %d %H:%M:%S %z %Y"


@pytest.fixture(scope="module")
def city() -> SyntheticCheckins:
    return synthesize_checkins()


@pytest.fixture(scope="module")
def grid() -> pd.DataFrame:
    return synthesize_grid()


def _local_hours(checkins: pd.DataFrame) -> np.ndarray:
    local = checkins["timestamp"].to_numpy() + checkins["tz_offset_min"].to_numpy().astype(np.int64) * 60
    return (local % 86400) // 3600


# ------------------------------------------------------------------------------------------------------------------
# Check-in city
# ------------------------------------------------------------------------------------------------------------------


def test_checkin_columns_and_dtypes(city):
    c, p = city.checkins, city.pois
    assert list(c.columns) == [
        "user_id", "location_id", "category", "category_id", "latitude", "longitude", "tz_offset_min", "timestamp",
    ]
    assert list(p.columns) == ["location_id", "name", "category", "category_id", "latitude", "longitude", "land_use"]
    for col in ("user_id", "location_id", "category", "category_id"):
        assert isinstance(c[col].dtype, pd.StringDtype), col
    assert c["timestamp"].dtype == np.int64
    assert c["tz_offset_min"].dtype == np.int16
    assert c["latitude"].dtype == np.float64 and c["longitude"].dtype == np.float64
    assert not c.isna().any().any()
    assert not p.isna().any().any()


def test_default_sizes_and_ranges(city):
    c, p = city.checkins, city.pois
    assert 25_000 <= len(c) <= 45_000
    assert c["user_id"].nunique() == 150
    assert len(p) == 500
    assert c["latitude"].between(40.6, 40.95).all() and c["longitude"].between(-74.1, -73.8).all()
    assert (c["tz_offset_min"] == -240).all()
    start = pd.Timestamp("2012-04-02")
    local = pd.to_datetime(c["timestamp"] + c["tz_offset_min"].astype(np.int64) * 60, unit="s")
    assert local.min() >= start and local.max() < start + pd.Timedelta(days=120)
    # Sorted by user then time, one check-in per user and second at most.
    assert c["user_id"].is_monotonic_increasing
    assert (c.groupby("user_id", sort=False)["timestamp"].diff().dropna() > 0).all()
    # Users differ in activity.
    per_day = c.groupby("user_id").size() / 120
    assert per_day.min() < 1.0 and per_day.max() > 3.5


def test_checkins_agree_with_pois(city):
    c, p = city.checkins, city.pois.set_index("location_id")
    assert p.index.is_unique
    assert c["location_id"].isin(p.index).all()
    joined = p.loc[c["location_id"]]
    np.testing.assert_array_equal(c["latitude"].to_numpy(), joined["latitude"].to_numpy())
    np.testing.assert_array_equal(c["longitude"].to_numpy(), joined["longitude"].to_numpy())
    assert (c["category"].to_numpy() == joined["category"].to_numpy()).all()
    assert (c["category_id"].to_numpy() == joined["category_id"].to_numpy()).all()
    assert (np.round(p["latitude"], 6) == p["latitude"]).all()


def test_poi_table(city):
    p = city.pois
    hex24 = r"^[0-9a-f]{24}$"
    assert p["location_id"].str.match(hex24).all() and p["category_id"].str.match(hex24).all()
    # One stable id per category.
    assert (p.groupby("category")["category_id"].nunique() == 1).all()
    assert (p.groupby("category_id")["category"].nunique() == 1).all()
    assert p["category"].isin(list(CATEGORY_HIERARCHY)).all()
    assert 25 <= p["category"].nunique() <= 40
    assert p["category"].str.contains(" > ", regex=False).all()
    assert set(p["land_use"]) == set(LAND_USES)
    empty = (p["name"] == "").mean()
    assert 0.01 <= empty <= 0.10
    named = p.loc[p["name"] != "", "name"]
    assert named.str.len().min() >= 3 and named.nunique() > 0.6 * len(named)
    assert all(name.isascii() for name in named)
    # Land use shapes the category mix.
    top = p["category"].map(CATEGORY_HIERARCHY)
    assert (top[p["land_use"] == "residential"] == "Residence").mean() > 0.3
    assert (top[p["land_use"] == "nightlife"] == "Nightlife Spot").mean() > 0.3


def test_checkins_deterministic(tmp_path):
    a, b = synthesize_checkins(**SMALL, seed=3), synthesize_checkins(**SMALL, seed=3)
    pd.testing.assert_frame_equal(a.checkins, b.checkins)
    pd.testing.assert_frame_equal(a.pois, b.pois)
    pd.testing.assert_frame_equal(a.users, b.users)
    pa, pb = a.write_tsmc(tmp_path / "a"), b.write_tsmc(tmp_path / "b")
    assert set(pa) == {"checkins", "pois", "users"}
    for key in pa:
        assert pa[key].read_bytes() == pb[key].read_bytes()
    assert not list(tmp_path.glob("*/*.tmp"))

    other = synthesize_checkins(**SMALL, seed=4)
    assert not a.checkins.equals(other.checkins)
    assert not a.users["archetype"].equals(other.users["archetype"])  # the seed also deals the archetypes
    pd.testing.assert_frame_equal(a.pois, synthesize_checkins(**SMALL, seed=4, city_seed=3).pois)


def test_city_seed_changes_layout():
    a = synthesize_checkins(**SMALL, seed=0)
    b = synthesize_checkins(**SMALL, seed=0, city_seed=1)
    assert not np.array_equal(a.pois["latitude"].to_numpy(), b.pois["latitude"].to_numpy())
    assert set(a.pois["location_id"]).isdisjoint(set(b.pois["location_id"]))


def test_tsmc_file_format(city, tmp_path):
    paths = city.write_tsmc(tmp_path / "raw")
    raw = paths["checkins"].read_bytes()
    assert b"Caf\xe9" in raw  # "Food > Café" in Latin-1
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")
    lines = raw.decode("latin-1").split("\n")
    assert lines[-1] == ""
    rows = [line.split("\t") for line in lines[:-1]]
    assert len(rows) == len(city.checkins)
    assert {len(r) for r in rows} == {8}
    table = pd.DataFrame(rows)
    c = city.checkins
    assert (table[0].to_numpy() == c["user_id"].to_numpy()).all()
    assert (table[1].to_numpy() == c["location_id"].to_numpy()).all()
    assert (table[2].to_numpy() == c["category_id"].to_numpy()).all()
    # like the real files, venueCategory is the leaf name ("Coffee Shop", not "Food > Coffee Shop")
    assert (table[3].to_numpy() == c["category"].str.split(" > ").str[-1].to_numpy()).all()
    np.testing.assert_array_equal(table[4].astype(float).to_numpy(), c["latitude"].to_numpy())
    np.testing.assert_array_equal(table[5].astype(float).to_numpy(), c["longitude"].to_numpy())
    assert (table[6] == "-240").all()
    assert table[7].str.match(r"^(Mon|Tue|Wed|Thu|Fri|Sat|Sun) [A-Z][a-z]{2} \d{2} \d{2}:\d{2}:\d{2} \+0000 \d{4}$").all()
    parsed = pd.to_datetime(table[7], format=TSMC_FORMAT)
    epoch = (parsed - pd.Timestamp("1970-01-01", tz="UTC")) // pd.Timedelta(seconds=1)
    np.testing.assert_array_equal(epoch.to_numpy(), c["timestamp"].to_numpy())
    assert rows[0][7].startswith("Mon Apr 02 ")  # day 0 (2012-04-02) is a Monday

    pois = pd.read_csv(paths["pois"], encoding="utf-8", keep_default_na=False, dtype={"name": str})
    assert list(pois.columns) == [*city.pois.columns, "category_group"]
    assert (pois["name"].to_numpy() == city.pois["name"].to_numpy()).all()
    full = pois["category_group"] + " > " + pois["category"]
    assert (full.to_numpy() == city.pois["category"].to_numpy()).all()
    np.testing.assert_array_equal(pois["latitude"].to_numpy(), city.pois["latitude"].to_numpy())


def _popularity_and_markov(checkins: pd.DataFrame) -> tuple[float, float]:
    """Acc@1 of global popularity and of per-user Markov-1, first 70% of each user's check-ins for training."""
    df = checkins[["user_id", "location_id"]].astype(str).copy()
    by_user = df.groupby("user_id", sort=False)
    df["prev"] = by_user["location_id"].shift(1)
    train = by_user.cumcount().to_numpy() < 0.7 * by_user["user_id"].transform("size").to_numpy()
    tr, te = df[train], df[~train & df["prev"].notna()]
    popular = tr["location_id"].value_counts().index[0]
    acc_pop = float((te["location_id"] == popular).mean())

    def top(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
        n = frame.groupby([*keys, "location_id"]).size().rename("n").reset_index()
        n = n.sort_values([*keys, "n", "location_id"], ascending=[True] * len(keys) + [False, True])
        return n.drop_duplicates(keys).rename(columns={"location_id": "pred"})[[*keys, "pred"]]

    successor = top(tr.dropna(subset=["prev"]), ["user_id", "prev"])
    mode = top(tr, ["user_id"]).set_index("user_id")["pred"]
    m = te.merge(successor, on=["user_id", "prev"], how="left")
    m["pred"] = m["pred"].fillna(m["user_id"].map(mode))
    return acc_pop, float((m["pred"] == m["location_id"]).mean())


def test_markov_beats_popularity_but_is_beatable(city):
    acc_pop, acc_markov = _popularity_and_markov(city.checkins)
    assert acc_markov >= 2 * acc_pop + 0.1, (acc_pop, acc_markov)
    assert acc_markov <= 0.85, acc_markov


def test_categories_predict_time(city):
    c = city.checkins
    hours = _local_hours(c)
    top = c["category"].map(CATEGORY_HIERARCHY).to_numpy()
    nightlife = top == "Nightlife Spot"
    assert nightlife[hours >= 20].mean() > 3 * nightlife[hours < 12].mean()
    coffee = (c["category"] == "Food > Coffee Shop").to_numpy()
    assert coffee[(hours >= 6) & (hours < 12)].mean() > 2 * coffee[hours >= 17].mean()
    # Offices are a weekday thing (day 0 is a Monday).
    local_day = (c["timestamp"].to_numpy() + c["tz_offset_min"].to_numpy().astype(np.int64) * 60) // 86400
    weekend = (local_day + 3) % 7 >= 5
    office = (c["category"] == "Professional & Other Places > Office").to_numpy()
    assert office[weekend].mean() < 0.5 * office[~weekend].mean()


def test_small_city_edge_cases():
    tiny = synthesize_checkins(num_users=1, num_locations=20, num_days=1)
    assert len(tiny.pois) == 20 and tiny.checkins["user_id"].nunique() <= 1
    shifted = synthesize_checkins(num_users=5, num_locations=60, num_days=3, start_date="2013-01-05")
    local = pd.to_datetime(shifted.checkins["timestamp"] - 240 * 60, unit="s")
    assert local.min() >= pd.Timestamp("2013-01-05") and local.max() < pd.Timestamp("2013-01-08")


# ------------------------------------------------------------------------------------------------------------------
# User archetypes and the users table
# ------------------------------------------------------------------------------------------------------------------


def _with_time(city: SyntheticCheckins) -> pd.DataFrame:
    """The check-ins with the user's archetype, local hour, local day (since start_date), weekday and land use."""
    c = city.checkins.merge(city.users[["user_id", "archetype"]], on="user_id", how="left")
    local = c["timestamp"].to_numpy() + c["tz_offset_min"].to_numpy().astype(np.int64) * 60
    start = (pd.Timestamp("2012-04-02") - pd.Timestamp("1970-01-01")) // pd.Timedelta(days=1)
    land_use = city.pois.set_index("location_id")["land_use"].astype(str)
    return c.assign(
        hour=(local % 86400) // 3600,
        day=local // 86400 - start,
        weekday=(local // 86400 + 3) % 7,  # 1970-01-01 was a Thursday
        land_use=c["location_id"].map(land_use).to_numpy(),
    )


def test_archetype_names_and_default_mix():
    assert {"office_worker", "student", "night_shift_worker", "visitor"} <= set(ARCHETYPES)
    assert all(name.isidentifier() and name == name.lower() for name in ARCHETYPES)
    assert set(DEFAULT_ARCHETYPE_MIX) == set(ARCHETYPES)
    assert sum(DEFAULT_ARCHETYPE_MIX.values()) == pytest.approx(1.0)
    # office workers and students still dominate the city
    assert DEFAULT_ARCHETYPE_MIX["office_worker"] + DEFAULT_ARCHETYPE_MIX["student"] >= 0.7


def test_archetypes_drawn_in_the_requested_proportions(city):
    counts = city.users["archetype"].value_counts().to_dict()
    # 150 users: every archetype gets its share exactly; 7.5 + 7.5 round to 8 + 7 (largest remainder, first listed)
    assert counts == {"office_worker": 75, "student": 30, "night_shift_worker": 15, "visitor": 15,
                      "remote_worker": 8, "service_worker": 7}
    # shuffled, not in blocks
    first = city.users["archetype"].head(30)
    assert first.nunique() >= 3
    mix = {"office_worker": 0.3, "visitor": 0.7}
    custom = synthesize_checkins(num_users=41, num_locations=120, num_days=14, archetype_mix=mix)
    assert custom.users["archetype"].value_counts().to_dict() == {"visitor": 29, "office_worker": 12}
    only = synthesize_checkins(num_users=5, num_locations=60, num_days=7, archetype_mix={"night_shift_worker": 1})
    assert set(only.users["archetype"]) == {"night_shift_worker"}


def test_users_table_lists_every_user_once(city):
    u = city.users
    assert list(u.columns) == ["user_id", "archetype", "home_location_id", "anchor_location_id", "first_day", "last_day"]
    for col in ("user_id", "archetype", "home_location_id", "anchor_location_id"):
        assert isinstance(u[col].dtype, pd.StringDtype), col
    assert u["first_day"].dtype == np.int64 and u["last_day"].dtype == np.int64
    assert u["user_id"].is_unique and len(u) == 150
    assert u["user_id"].tolist() == [f"u{i:04d}" for i in range(1, 151)]
    assert set(city.checkins["user_id"]) <= set(u["user_id"])
    assert u["archetype"].isin(ARCHETYPES).all()
    pois = city.pois.set_index("location_id")
    assert u["home_location_id"].isin(pois.index).all()
    visitor = (u["archetype"] == "visitor").to_numpy()
    assert u.loc[visitor, "anchor_location_id"].isna().all()
    assert u.loc[~visitor, "anchor_location_id"].isin(pois.index).all()
    # homes are residences (a visitor's a rented apartment); anchors follow the archetype
    assert (pois.loc[u["home_location_id"], "category"].map(CATEGORY_HIERARCHY) == "Residence").all()
    assert (pois.loc[u.loc[visitor, "home_location_id"], "category"]
            == "Residence > Residential Building (Apartment / Condo)").all()
    anchor_leaf = u["anchor_location_id"].map(pois["category"].str.split(" > ").str[-1])
    expected = {"office_worker": {"Office", "Coworking Space"}, "student": {"University", "College Academic Building"},
                "remote_worker": {"Coworking Space"},
                "night_shift_worker": {"Medical Center", "Train Station", "Bus Station", "Deli / Bodega",
                                       "Fast Food Restaurant"}}
    for name, leaves in expected.items():
        assert anchor_leaf[u["archetype"] == name].isin(leaves).all(), name
    # the stay: the whole window for residents, 3-7 days for visitors
    assert (u.loc[~visitor, "first_day"] == 0).all() and (u.loc[~visitor, "last_day"] == 119).all()
    stay = u["last_day"] - u["first_day"] + 1
    assert stay[visitor].between(3, 7).all() and u["first_day"].min() >= 0 and u["last_day"].max() <= 119


def test_users_file_and_determinism(tmp_path):
    a = synthesize_checkins(**SMALL, seed=3)
    path = a.write_tsmc(tmp_path / "a")["users"]
    assert path.name == "users.csv"
    text = path.read_text(encoding="utf-8")
    assert text.startswith("user_id,archetype,home_location_id,anchor_location_id,first_day,last_day\n")
    back = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert back["user_id"].tolist() == a.users["user_id"].tolist()
    assert back["archetype"].tolist() == a.users["archetype"].tolist()
    assert back["anchor_location_id"].tolist() == a.users["anchor_location_id"].fillna("").tolist()
    assert back["first_day"].astype(int).tolist() == a.users["first_day"].tolist()
    # the archetypes and the movements are the same whether users are simulated in one chunk or in several
    big = synthesize_checkins(num_users=300, num_locations=60, num_days=3, seed=2)
    assert big.users["archetype"].value_counts()["office_worker"] == 150
    again = synthesize_checkins(num_users=300, num_locations=60, num_days=3, seed=2)
    pd.testing.assert_frame_equal(big.users, again.users)
    pd.testing.assert_frame_equal(big.checkins, again.checkins)


def test_night_shift_workers_are_out_at_night(city):
    c = _with_time(city)
    night = (c["hour"] >= 21) | (c["hour"] < 6)
    by = night.groupby(c["archetype"]).mean()
    assert by["night_shift_worker"] > 0.55, by
    assert by["office_worker"] < 0.2 and by["student"] < 0.2, by
    # they sleep in the morning
    morning = c["hour"].between(9, 13)
    assert morning[c["archetype"] == "night_shift_worker"].mean() < 0.05
    assert morning[c["archetype"] == "office_worker"].mean() > 0.2
    # and work at their anchor at night, Sunday to Thursday nights (a shift after midnight is on Mon..Fri)
    ns = c[c["archetype"] == "night_shift_worker"]
    anchor = city.users.set_index("user_id")["anchor_location_id"]
    at_anchor = ns[(ns["location_id"] == ns["user_id"].map(anchor)).fillna(False).to_numpy(dtype=bool)]
    assert len(at_anchor) > 100
    assert ((at_anchor["hour"] >= 21) | (at_anchor["hour"] < 6)).mean() > 0.9
    after_midnight = at_anchor[at_anchor["hour"] < 6]
    assert after_midnight["weekday"].isin([0, 1, 2, 3, 4]).mean() > 0.9


def test_visitors_stay_briefly_and_explore(city):
    c = _with_time(city)
    u = city.users.set_index("user_id")
    per_user = c.groupby("user_id").agg(
        archetype=("archetype", "first"), n=("location_id", "size"), distinct=("location_id", "nunique"),
        first=("day", "min"), last=("day", "max"),
    )
    per_user["span"] = per_user["last"] - per_user["first"] + 1
    per_user["ratio"] = per_user["distinct"] / per_user["n"]
    visitors = per_user[per_user["archetype"] == "visitor"]
    office = per_user[per_user["archetype"] == "office_worker"]
    assert len(visitors) == 15
    # present only during the stay (plus the night after its last day)
    assert (visitors["first"] >= u.loc[visitors.index, "first_day"]).all()
    assert (visitors["last"] <= u.loc[visitors.index, "last_day"] + 1).all()
    assert visitors["span"].max() <= 8 and office["span"].median() >= 100
    # they check in often enough to survive the usual filters, at many distinct places
    assert visitors["n"].median() >= 20
    assert visitors["ratio"].median() > 0.4 and visitors["ratio"].median() > 2 * office["ratio"].median()
    # no work anchor: hardly an office or a campus; sightseeing, shopping, food and nightlife instead
    vc = c[c["archetype"] == "visitor"]
    top = vc["category"].map(CATEGORY_HIERARCHY)
    assert top.isin(["Professional & Other Places", "College & University"]).mean() < 0.05
    leisure = ["Arts & Entertainment", "Food", "Nightlife Spot", "Shops & Service", "Outdoors & Recreation"]
    assert top.isin(leisure).mean() > 0.5
    assert (top == "Arts & Entertainment").mean() > 2 * (
        c.loc[c["archetype"] == "office_worker", "category"].map(CATEGORY_HIERARCHY) == "Arts & Entertainment").mean()


def test_workers_and_students_go_to_their_districts(city):
    c = _with_time(city)
    working = (c["weekday"] < 5) & (c["hour"].between(10, 11) | c["hour"].between(14, 16))
    w = c[working]
    office_lu = (w["land_use"] == "office").groupby(w["archetype"]).mean()
    campus_lu = (w["land_use"] == "campus").groupby(w["archetype"]).mean()
    assert office_lu["office_worker"] > 0.5 and office_lu["student"] < 0.15, office_lu
    assert campus_lu["student"] > 0.5 and campus_lu["office_worker"] < 0.15, campus_lu
    # remote workers stay near home; office workers commute
    pois = city.pois.set_index("location_id")
    home = pois.loc[w["user_id"].map(city.users.set_index("user_id")["home_location_id"])]
    km = pd.Series(np.hypot((w["latitude"].to_numpy() - home["latitude"].to_numpy()) * 110.574,
                            (w["longitude"].to_numpy() - home["longitude"].to_numpy()) * 84.3), index=w.index)
    from_home = km.groupby(w["archetype"]).median()
    assert from_home["remote_worker"] < 0.5 * from_home["office_worker"], from_home
    assert from_home["office_worker"] > 3.0, from_home
    # office workers go to their anchor on weekdays; service workers on Wednesday to Sunday (Monday and Tuesday are 2/7
    # of the days; a service worker anchored at a café or shop still goes there now and then on a day off)
    anchor = city.users.set_index("user_id")["anchor_location_id"]
    at_anchor = c[(c["location_id"] == c["user_id"].map(anchor)).fillna(False).to_numpy(dtype=bool)]
    office = at_anchor[at_anchor["archetype"] == "office_worker"]
    assert office["weekday"].isin([5, 6]).mean() < 0.1 and office["hour"].between(8, 17).mean() > 0.9
    service = at_anchor[at_anchor["archetype"] == "service_worker"]
    assert len(service) > 100
    assert service["weekday"].isin([0, 1]).mean() < 0.15 and service["hour"].between(12, 20).mean() > 0.8


def test_archetype_anchor_falls_back_in_a_small_city():
    # 20 POIs rarely have a hospital or a campus: those archetypes then anchor at an office, and still work nights
    small = synthesize_checkins(num_users=6, num_locations=20, num_days=5,
                                archetype_mix={"night_shift_worker": 0.5, "student": 0.5})
    assert small.users["anchor_location_id"].isin(small.pois["location_id"]).all()
    assert set(small.users["archetype"]) == {"night_shift_worker", "student"}


@pytest.mark.parametrize(
    ("mix", "match"),
    [
        ({"astronaut": 1.0}, "unknown archetype"),
        ({"office_worker": 0.6}, "sum to 1"),
        ({"office_worker": 0.5, "student": 0.6}, "sum to 1"),
        ({"office_worker": 1.2, "student": -0.2}, ">= 0"),
        ({"office_worker": float("nan"), "student": 1.0}, ">= 0"),
        ({"office_worker": "1"}, "number"),
        ({"office_worker": True}, "number"),
        ({}, "non-empty dict"),
        ("office_worker", "non-empty dict"),
        ([("office_worker", 1.0)], "non-empty dict"),
    ],
)
def test_bad_archetype_mix(mix, match):
    with pytest.raises(ValueError, match="archetype_mix") as err:
        synthesize_checkins(num_users=3, num_locations=20, num_days=2, archetype_mix=mix)
    assert err.match(match)


# ------------------------------------------------------------------------------------------------------------------
# Land-use tiles (M3ob)
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiles(city) -> np.ndarray:
    return city.land_use_tiles()


def _colour_counts(tiles: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Names of LAND_USE_COLOURS and, per tile, how many pixels have exactly each colour [num_tiles, colours]."""
    names = list(LAND_USE_COLOURS)
    palette = np.array([LAND_USE_COLOURS[u] for u in names], dtype=np.uint8)
    return names, (tiles[:, :, :, None, :] == palette).all(axis=-1).sum(axis=(1, 2))


def test_neighbourhoods_table(city):
    h = city.neighbourhoods
    assert list(h.columns) == ["neighbourhood", "latitude", "longitude", "land_use", "spread_km", "num_pois"]
    assert 8 <= len(h) <= 12 and (h["neighbourhood"].to_numpy() == np.arange(len(h))).all()
    assert set(h["land_use"]) == set(LAND_USES)
    assert h["num_pois"].sum() == len(city.pois)
    assert h["spread_km"].between(0.5, 1.2).all()
    # The POIs of each land use are the POIs of the neighbourhoods of that land use.
    per_use = h.groupby("land_use")["num_pois"].sum()
    assert per_use.to_dict() == city.pois["land_use"].value_counts().to_dict()


def test_land_use_tiles_shape_and_markers(city, tiles):
    assert tiles.shape == (len(city.pois), 32, 32, 3) and tiles.dtype == np.uint8
    small = city.land_use_tiles(size=8, radius_m=150.0)
    assert small.shape == (len(city.pois), 8, 8, 3) and small.dtype == np.uint8
    # The own POI sits at the centre in a darker shade of its land use's colour, inside a white ring.
    lu = city.pois["land_use"].to_numpy().astype(str)
    centre = tiles[:, 15, 15].astype(np.int64)
    colour = np.array([LAND_USE_COLOURS[u] for u in lu], dtype=np.int64)
    assert (centre < colour).all(axis=1).all()
    np.testing.assert_allclose(centre, np.round(colour * 0.55), atol=1)
    assert (tiles[:, 13, 13] == 255).all() and (tiles[:, 18, 18] == 255).all()
    # Tiles differ by their POI's neighbourhood and by the other POIs around it.
    assert len(np.unique(tiles.reshape(len(tiles), -1), axis=0)) == len(tiles)


def test_land_use_tiles_deterministic(city, tiles):
    np.testing.assert_array_equal(city.land_use_tiles(), tiles)
    kw = {**SMALL, "seed": 5}
    a = synthesize_checkins(**kw).land_use_tiles(size=16)
    b = synthesize_checkins(**kw).land_use_tiles(size=16)
    assert a.tobytes() == b.tobytes()
    # The tiles depend on the city only, not on its people.
    c = synthesize_checkins(**{**kw, "seed": 6, "city_seed": 5}).land_use_tiles(size=16)
    assert a.tobytes() == c.tobytes()
    assert not np.array_equal(a, synthesize_checkins(**{**kw, "city_seed": 6}).land_use_tiles(size=16))


def test_land_use_dominates_tile_colour(city, tiles):
    names, counts = _colour_counts(tiles)
    dominant = np.array(names)[counts.argmax(axis=1)]
    lu = city.pois["land_use"].to_numpy().astype(str)
    assert (dominant == lu).mean() >= 0.8, pd.crosstab(lu, dominant)
    # The dominant colour covers most of the tile.
    assert np.median(counts.max(axis=1)) / 32**2 > 0.6
    # A park POI's tile is mostly park green, a residential POI's mostly residential yellow.
    green, yellow = names.index("parks"), names.index("residential")
    parks, homes = lu == "parks", lu == "residential"
    assert np.median(counts[parks, green]) > 0.6 * 32**2 and np.median(counts[parks, yellow]) < 0.05 * 32**2
    assert np.median(counts[homes, yellow]) > 0.6 * 32**2 and np.median(counts[homes, green]) < 0.05 * 32**2


def test_land_use_tiles_far_apart_differ(city, tiles):
    p = city.pois
    lat, lon = p["latitude"].to_numpy(), p["longitude"].to_numpy()
    km = np.hypot((lat[:, None] - lat[None, :]) * 110.574, (lon[:, None] - lon[None, :]) * 84.3)
    i, j = np.unravel_index(np.argmax(km), km.shape)
    assert km[i, j] > 10
    assert (tiles[i] != tiles[j]).any(axis=-1).mean() > 0.5
    # A larger radius shows more of the city: more land uses per tile on average.
    wide = city.land_use_tiles(size=32, radius_m=3000.0)
    n_uses = (_colour_counts(wide)[1] > 0).sum(axis=1).mean()
    assert n_uses > (_colour_counts(tiles)[1] > 0).sum(axis=1).mean()


def test_write_land_use_tiles(tmp_path):
    small = synthesize_checkins(**{**SMALL, "num_locations": 40})
    folder = small.write_land_use_tiles(tmp_path / "out", size=16)
    assert folder == tmp_path / "out" / "tiles"
    files = sorted(folder.iterdir())
    assert [f.name for f in files] == sorted(f"{i}.png" for i in small.pois["location_id"])
    expected = small.land_use_tiles(size=16)
    for k, location_id in enumerate(small.pois["location_id"]):
        image = mpimg.imread(folder / f"{location_id}.png")  # float32 in [0, 1]
        assert image.shape == (16, 16, 3)
        np.testing.assert_array_equal(np.round(image * 255).astype(np.uint8), expected[k])
    first = {f.name: f.read_bytes() for f in files}
    small.write_land_use_tiles(tmp_path / "out", size=16)
    assert {f.name: f.read_bytes() for f in sorted(folder.iterdir())} == first  # same city, same bytes
    assert not list(folder.glob("*.tmp")) and not list(folder.glob(".*"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"size": 7}, "size"),
        ({"size": 257}, "size"),
        ({"size": 16.0}, "size"),
        ({"radius_m": 0}, "radius_m"),
        ({"radius_m": -5.0}, "radius_m"),
        ({"radius_m": float("nan")}, "radius_m"),
        ({"radius_m": "400"}, "radius_m"),
    ],
)
def test_land_use_tiles_bad_arguments(kwargs, match, tmp_path):
    small = synthesize_checkins(num_users=2, num_locations=20, num_days=2)
    with pytest.raises(ValueError, match=match):
        small.land_use_tiles(**kwargs)
    with pytest.raises(ValueError, match=match):
        small.write_land_use_tiles(tmp_path, **kwargs)
    assert not (tmp_path / "tiles").exists()


def test_land_use_tiles_need_the_layout():
    small = synthesize_checkins(num_users=2, num_locations=20, num_days=2)
    with pytest.raises(ValueError, match="neighbourhoods"):
        SyntheticCheckins(checkins=small.checkins, pois=small.pois).land_use_tiles()
    odd = small.pois.assign(land_use="airport")
    with pytest.raises(ValueError, match="airport"):
        SyntheticCheckins(small.checkins, odd, small.neighbourhoods).land_use_tiles()


# ------------------------------------------------------------------------------------------------------------------
# Grid city
# ------------------------------------------------------------------------------------------------------------------


def test_grid_schema_and_ranges(grid):
    assert list(grid.columns) == ["uid", "d", "t", "x", "y"]
    assert [str(grid[c].dtype) for c in grid.columns] == ["int64", "int16", "int8", "int16", "int16"]
    assert grid["uid"].min() == 0 and grid["uid"].max() == 199 and grid["uid"].nunique() == 200
    assert grid["d"].between(0, 74).all() and grid["t"].between(0, 47).all()
    assert grid["x"].between(1, 200).all() and grid["y"].between(1, 200).all()
    assert not grid.duplicated(["uid", "d", "t"]).any()
    key = grid["uid"].to_numpy() * 10_000 + grid["d"].to_numpy().astype(np.int64) * 100 + grid["t"].to_numpy()
    assert (np.diff(key) > 0).all()
    per_day = grid.groupby(["uid", "d"]).size()
    assert 8 <= per_day.mean() <= 20
    assert grid.groupby("uid")["d"].nunique().mean() < 75  # some days are missing


def _grid_predictors(grid: pd.DataFrame) -> tuple[float, float, float]:
    g = grid.assign(cell=grid["x"].astype(np.int64) * 1000 + grid["y"], weekend=(grid["d"] % 7 >= 5))
    tr, te = g[g["d"] < 60], g[g["d"] >= 60]

    def mode(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
        n = frame.groupby([*keys, "cell"]).size().rename("n").reset_index()
        n = n.sort_values([*keys, "n", "cell"], ascending=[True] * len(keys) + [False, True])
        return n.drop_duplicates(keys).rename(columns={"cell": "pred"})[[*keys, "pred"]]

    user_mode = mode(tr, ["uid"]).set_index("uid")["pred"]
    m = te.merge(mode(tr, ["uid", "weekend", "t"]), on=["uid", "weekend", "t"], how="left")
    m["pred"] = m["pred"].fillna(m["uid"].map(user_mode))
    acc_slot = float((m["pred"] == m["cell"]).mean())
    acc_user = float((te["uid"].map(user_mode) == te["cell"]).mean())
    acc_global = float((te["cell"] == tr["cell"].value_counts().index[0]).mean())
    return acc_slot, acc_user, acc_global


def test_grid_structure(grid):
    acc_slot, acc_user, acc_global = _grid_predictors(grid)
    assert acc_slot >= acc_user + 0.1, (acc_slot, acc_user)
    assert acc_slot >= acc_global + 0.3, (acc_slot, acc_global)
    assert acc_slot <= 0.9, acc_slot


def test_grid_deterministic_and_written_bytes(tmp_path):
    a, b = synthesize_grid(**SMALL_GRID, seed=7), synthesize_grid(**SMALL_GRID, seed=7)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(synthesize_grid(**SMALL_GRID, seed=8))
    for name in ("grid.csv", "grid.csv.gz"):
        pa, pb = write_yjmob(a, tmp_path / "a" / name), write_yjmob(b, tmp_path / "b" / name)
        assert pa.read_bytes() == pb.read_bytes()
    plain = (tmp_path / "a" / "grid.csv").read_bytes()
    assert gzip.decompress((tmp_path / "a" / "grid.csv.gz").read_bytes()) == plain
    assert plain.startswith(b"uid,d,t,x,y\n")
    back = pd.read_csv(tmp_path / "a" / "grid.csv.gz")
    pd.testing.assert_frame_equal(back, a.astype(np.int64))
    assert not list(tmp_path.glob("*/*.tmp"))


def test_grid_city_seed_changes_layout():
    def density(frame: pd.DataFrame) -> np.ndarray:
        h = np.zeros((10, 10))
        np.add.at(h, ((frame["x"].to_numpy() - 1) // 20, (frame["y"].to_numpy() - 1) // 20), 1)
        return h.ravel() / h.sum()

    kw = {"num_users": 100, "num_days": 14}
    base = density(synthesize_grid(**kw, seed=0))
    same_city = density(synthesize_grid(**kw, seed=1, city_seed=0))
    other_city = density(synthesize_grid(**kw, seed=0, city_seed=1))
    assert np.corrcoef(base, same_city)[0, 1] > 0.8
    assert np.corrcoef(base, other_city)[0, 1] < 0.5


def test_grid_small_sizes():
    g = synthesize_grid(num_users=3, num_days=2, grid_size=10)
    assert g["x"].between(1, 10).all() and g["y"].between(1, 10).all()
    assert set(g["d"]) <= {0, 1}


# ------------------------------------------------------------------------------------------------------------------
# Bad arguments
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_users": 0}, "num_users"),
        ({"num_users": 2.5}, "num_users"),
        ({"num_users": True}, "num_users"),
        ({"num_locations": 5}, "num_locations"),
        ({"num_days": 0}, "num_days"),
        ({"seed": -1}, "seed"),
        ({"seed": "0"}, "seed"),
        ({"city_seed": -3}, "city_seed"),
        ({"start_date": "not a date"}, "start_date"),
        ({"start_date": "2012-04-02 10:30"}, "start_date"),
    ],
)
def test_checkins_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        synthesize_checkins(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_users": 0}, "num_users"),
        ({"num_days": 0}, "num_days"),
        ({"num_days": 40_000}, "num_days"),
        ({"grid_size": 1}, "grid_size"),
        ({"grid_size": 999}, "grid_size"),
        ({"seed": -1}, "seed"),
        ({"city_seed": 1.5}, "city_seed"),
    ],
)
def test_grid_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        synthesize_grid(**kwargs)


def test_write_yjmob_bad_input(tmp_path):
    with pytest.raises(ValueError, match="missing column"):
        write_yjmob(pd.DataFrame({"uid": [0], "d": [0]}), tmp_path / "g.csv")
    with pytest.raises(ValueError, match="integers"):
        write_yjmob(pd.DataFrame({"uid": [0], "d": [0], "t": [0], "x": [1.5], "y": [1]}), tmp_path / "g.csv")
    assert not (tmp_path / "g.csv").exists()
