"""Readers (DESIGN §3.1–3.2): Foursquare TSMC2014, Gowalla SNAP, YJMob100K, generic CSV/Parquet; validation in both
``on_error`` modes, encodings, chunked reading and the row account. Every fixture is written into ``tmp_path``."""

from __future__ import annotations

import gzip
import re

import pandas as pd
import pytest

from dataset_builders.readers import FORMATS, parse_column_mapping, read_dataset, read_yjmob
from dataset_builders.schema import DataValidationError, RowAccount

# 2012-04-03 18:00:09 UTC by hand: 2012-01-01 is day 15340 (1325376000 s); Jan 31 + Feb 29 + Mar 31 = 91 days to
# April 1, so April 3 is 93 days later; then 18 h 0 min 9 s.
APR03_180009 = 1_325_376_000 + 93 * 86_400 + 18 * 3600 + 9
# 2012-04-04 01:02:03 UTC
APR04_010203 = 1_325_376_000 + 94 * 86_400 + 1 * 3600 + 2 * 60 + 3
# 2010-10-19 23:55:27 UTC: 2010-01-01 is day 14610 (1262304000 s); Jan..Sep = 273 days, + 18 days
OCT19_235527 = 1_262_304_000 + (273 + 18) * 86_400 + 23 * 3600 + 55 * 60 + 27

CSV_MAP = "user_id=uid,location_id=venue,timestamp=ts,latitude=lat,longitude=lon"
CSV_HEADER = "uid,venue,ts,lat,lon"
MODES = ("raise", "drop")


# --------------------------------------------------------------------------------------------------------- helpers
def _write(path, lines: list[str], encoding: str = "utf-8"):
    path.write_bytes(("\n".join(lines) + "\n").encode(encoding))
    return path


def _tsmc(user="u1", venue="v1", cat="Café", lat="40.7", lon="-74.0", tz="-240",
          ts="Tue Apr 03 18:00:09 +0000 2012", catid="c1") -> str:
    return "\t".join([user, venue, catid, cat, lat, lon, tz, ts])


def _csv_row(user="u1", venue="v1", ts="1333476009", lat="40.7", lon="-74.0") -> str:
    return ",".join([user, venue, ts, lat, lon])


def _assert_adds_up(account: RowAccount):
    assert account.steps, "the account has no step"
    for s in account.steps:
        assert s.rows_in == s.rows_kept + sum(s.dropped.values()), s


def _assert_names(err: DataValidationError, path, line: int | None, column: str | None = None, value: str | None = None):
    msg = str(err)
    assert isinstance(err, ValueError)
    assert str(path) in msg
    if line is not None:
        assert err.line == line
        assert re.search(rf"\bline {line}\b", msg), msg
    if column is not None:
        assert err.column == column
        assert column in msg
    if value is not None:
        assert value in msg, msg


# ------------------------------------------------------------------------------------------------ Foursquare TSMC
def test_foursquare_canonical_tables_and_latin1(tmp_path):
    path = _write(tmp_path / "dataset_TSMC2014_NYC.txt", [
        _tsmc("u1", "v1", "Café", "40.7", "-74.0", "-240", "Tue Apr 03 18:00:09 +0000 2012"),
        _tsmc("u1", "v2", "Bar", "40.8", "-74.1", "-240", "Tue Apr 03 20:00:09 +0200 2012", catid="c2"),
        _tsmc("u2", "v1", "Café", "40.7", "-74.0", "540", "Wed Apr 04 01:02:03 +0000 2012"),
    ], encoding="latin-1")
    assert b"Caf\xe9\t" in path.read_bytes()  # really Latin-1 on disk
    loaded = read_dataset("foursquare", path)  # encoding detected
    c = loaded.checkins
    assert list(c.columns) == ["user_id", "location_id", "timestamp", "tz_offset_min", "latitude", "longitude"]
    assert dict(c.dtypes.astype(str)) == {
        "user_id": "string", "location_id": "string", "timestamp": "int64", "tz_offset_min": "int16",
        "latitude": "float64", "longitude": "float64",
    }
    assert c["user_id"].tolist() == ["u1", "u1", "u2"]
    assert c["location_id"].tolist() == ["v1", "v2", "v1"]
    # 20:00:09 at +0200 is the same instant as 18:00:09 UTC
    assert c["timestamp"].tolist() == [APR03_180009, APR03_180009, APR04_010203]
    assert APR03_180009 == 1_333_476_009
    assert c["tz_offset_min"].tolist() == [-240, -240, 540]
    assert c["latitude"].tolist() == [40.7, 40.8, 40.7]
    assert c["longitude"].tolist() == [-74.0, -74.1, -74.0]

    locs = loaded.locations.set_index("location_id")
    assert sorted(locs.index) == ["v1", "v2"]
    assert locs.loc["v1", "category"] == "Café"
    assert locs.loc["v2", "category"] == "Bar"
    assert (locs.loc["v2", "latitude"], locs.loc["v2", "longitude"]) == (40.8, -74.1)
    assert loaded.metadata["time_reference"] == "utc_epoch"
    step = loaded.account.steps[-1]
    assert (step.rows_in, step.rows_kept, step.dropped) == (3, 3, {})


def test_foursquare_utf8_file_and_explicit_latin1(tmp_path):
    lines = [_tsmc(cat="Café"), _tsmc("u2", cat="Café")]
    utf8 = _write(tmp_path / "utf8.txt", lines, encoding="utf-8")
    latin = _write(tmp_path / "latin.txt", lines, encoding="latin-1")
    a = read_dataset("foursquare", utf8)
    b = read_dataset("foursquare", latin, encoding="latin-1")
    assert a.locations["category"].tolist() == b.locations["category"].tolist() == ["Café"]
    pd.testing.assert_frame_equal(a.checkins, b.checkins)


# ----------------------------------------------------------------------------------------------------- Gowalla
def test_gowalla_timestamps_by_hand(tmp_path):
    path = _write(tmp_path / "loc-gowalla_totalCheckins.txt", [
        "0\t2010-10-19T23:55:27Z\t30.2359091167\t-97.7951395833\t22847",
        "0\t2010-10-18T22:17:43Z\t30.2691029532\t-97.7493953705\t420315",
        "1\t2010-10-19T23:55:27+00:00\t30.2359091167\t-97.7951395833\t22847",
    ])
    loaded = read_dataset("gowalla", path)
    c = loaded.checkins
    assert c["timestamp"].tolist() == [OCT19_235527, OCT19_235527 - 86_400 - (1 * 3600 + 37 * 60 + 44),
                                       OCT19_235527]
    assert OCT19_235527 == 1_287_532_527
    assert c["user_id"].tolist() == ["0", "0", "1"]
    assert c["location_id"].tolist() == ["22847", "420315", "22847"]
    assert str(c["user_id"].dtype) == "string" and str(c["timestamp"].dtype) == "int64"
    assert (c["tz_offset_min"] == 0).all() and str(c["tz_offset_min"].dtype) == "int16"
    assert c["latitude"].iloc[0] == pytest.approx(30.2359091167, abs=1e-12)
    assert sorted(loaded.locations["location_id"]) == ["22847", "420315"]


# ------------------------------------------------------------------------------------------------------ YJMob
def test_yjmob_header_dtypes_base1_hidden_rows(tmp_path):
    path = _write(tmp_path / "yjmob.csv", [
        "uid,d,t,x,y", "0,0,0,1,200", "0,0,1,999,999", "0,1,47,200,3", "5,74,10,999,999", "5,74,11,7,8",
    ])
    loaded = read_dataset("yjmob", path, on_error="raise")
    g = loaded.grid
    assert list(g.columns) == ["uid", "d", "t", "x", "y"]
    assert dict(g.dtypes.astype(str)) == {"uid": "int64", "d": "int16", "t": "int8", "x": "int16", "y": "int16"}
    assert len(g) == 5
    assert (g["x"] == 999).sum() == 2 and (g["y"] == 999).sum() == 2  # hidden cells kept
    assert loaded.metadata["coordinate_base"] == 1
    assert loaded.metadata["day_range"] == [0, 74]
    step = loaded.account.steps[-1]
    assert step.notes["hidden_rows"] == 2
    assert (step.rows_in, step.rows_kept, step.dropped) == (5, 5, {})


def test_yjmob_no_header_base0_and_gzip(tmp_path):
    rows = ["1,0,0,0,199", "1,0,1,999,999", "2,3,5,10,0"]
    plain = _write(tmp_path / "grid.csv", rows)
    gz = tmp_path / "grid.csv.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    a = read_dataset("yjmob", plain)
    b = read_dataset("yjmob", gz)
    assert a.metadata["coordinate_base"] == 0 and b.metadata["coordinate_base"] == 0
    pd.testing.assert_frame_equal(a.grid, b.grid)
    assert a.grid.values.tolist() == [[1, 0, 0, 0, 199], [1, 0, 1, 999, 999], [2, 3, 5, 10, 0]]
    assert a.account.steps[-1].notes["hidden_rows"] == 1
    # a gzip file with a header
    gzh = tmp_path / "grid_h.csv.gz"
    gzh.write_bytes(gzip.compress(("uid,d,t,x,y\n" + "\n".join(rows) + "\n").encode()))
    pd.testing.assert_frame_equal(read_dataset("yjmob", gzh).grid, a.grid)


def test_yjmob_duplicate_slot(tmp_path):
    path = _write(tmp_path / "dup.csv", ["uid,d,t,x,y", "1,0,3,10,10", "1,0,4,11,11", "1,0,3,50,50"])
    loaded = read_dataset("yjmob", path, on_error="drop")
    assert loaded.account.total_dropped() == {"duplicate_slot": 1}
    assert loaded.grid[["t", "x"]].values.tolist() == [[3, 10], [4, 11]]  # the first row of the slot is kept
    _assert_adds_up(loaded.account)
    with pytest.raises(DataValidationError) as info:
        read_dataset("yjmob", path, on_error="raise")
    assert str(path) in str(info.value) and "day 0 slot 3" in str(info.value) and "user 1" in str(info.value)


def test_yjmob_slot_out_of_range(tmp_path):
    path = _write(tmp_path / "slot.csv", ["uid,d,t,x,y", "1,0,0,1,1", "", "1,0,48,2,2", "1,0,47,3,3"])
    loaded = read_dataset("yjmob", path, on_error="drop")
    assert loaded.account.total_dropped() == {"slot_out_of_range": 1, "blank_line": 1}
    assert loaded.grid["t"].tolist() == [0, 47]
    _assert_adds_up(loaded.account)
    with pytest.raises(DataValidationError) as info:
        read_dataset("yjmob", path, on_error="raise")
    _assert_names(info.value, path, line=4, column="t", value="'48'")


@pytest.mark.parametrize("mode", MODES)
def test_yjmob_mixed_0_and_200_is_an_error(tmp_path, mode):
    path = _write(tmp_path / "mixed.csv", ["uid,d,t,x,y", "1,0,0,0,5", "1,0,1,200,5"])
    with pytest.raises(DataValidationError, match="both 0 and 200"):
        read_dataset("yjmob", path, on_error=mode)


@pytest.mark.parametrize("mode", MODES)
def test_yjmob_header_only_and_locations_rejected(tmp_path, mode):
    path = _write(tmp_path / "h.csv", ["uid,d,t,x,y"])
    with pytest.raises(DataValidationError, match="no data rows"):
        read_dataset("yjmob", path, on_error=mode)
    with pytest.raises(ValueError, match="yjmob"):
        read_dataset("yjmob", path, on_error=mode, locations_path=path)


def test_yjmob_chunked_equals_whole(tmp_path, monkeypatch):
    rows = ["uid,d,t,x,y"] + [f"{u},{d},{t},{(u * 7 + t) % 200 + 1},{(d * 3 + t) % 200 + 1}"
                              for u in range(3) for d in range(2) for t in range(0, 48, 9)]
    rows[5] = "0,0,48,1,1"  # a bad slot inside the second chunk
    rows.insert(9, "")
    path = _write(tmp_path / "g.csv", rows)
    import dataset_builders.readers.yjmob as yjmob_module

    seen = []
    real = yjmob_module.iter_table_chunks

    def spy(*args, **kwargs):
        seen.append(kwargs["chunksize"])
        return real(*args, **kwargs)

    monkeypatch.setattr(yjmob_module, "iter_table_chunks", spy)
    whole = read_yjmob(path)
    chunked = read_dataset("yjmob", path, chunksize=4)  # read_dataset passes the chunk size on
    assert seen[-1] == 4 and seen[0] > 4
    pd.testing.assert_frame_equal(whole.grid, chunked.grid)
    assert whole.account.to_dict() == chunked.account.to_dict()
    assert whole.account.total_dropped() == {"slot_out_of_range": 1, "blank_line": 1}
    with pytest.raises(DataValidationError) as info:
        read_dataset("yjmob", path, chunksize=4, on_error="raise")
    assert info.value.line == 6


# ------------------------------------------------------------------------------------------------- generic CSV
def test_csv_epoch_seconds(tmp_path):
    path = _write(tmp_path / "c.csv", [CSV_HEADER, _csv_row("u1", "v1", "1333476009"), _csv_row("u2", "v2", "0")])
    loaded = read_dataset("csv", path, columns=CSV_MAP)
    assert loaded.checkins["timestamp"].tolist() == [APR03_180009, 0]
    assert loaded.metadata["timestamp_unit"] == "s"
    assert loaded.metadata["time_reference"] == "utc_epoch"
    assert str(loaded.checkins["timestamp"].dtype) == "int64"
    assert loaded.checkins["user_id"].tolist() == ["u1", "u2"]


def test_csv_epoch_milliseconds_detected(tmp_path):
    path = _write(tmp_path / "c.csv", [CSV_HEADER, _csv_row(ts="1333476009000"), _csv_row(ts="1333476010999")])
    loaded = read_dataset("csv", path, columns=CSV_MAP)
    assert loaded.metadata["timestamp_unit"] == "ms"
    assert loaded.checkins["timestamp"].tolist() == [APR03_180009, APR03_180009 + 1]


def test_csv_iso_strings(tmp_path):
    path = _write(tmp_path / "c.csv", [
        CSV_HEADER, _csv_row(ts="2012-04-03T18:00:09Z"), _csv_row(ts="2012-04-03 20:00:09+02:00"),
        _csv_row(ts="2012-04-04T01:02:03"),
    ])
    loaded = read_dataset("csv", path, columns=CSV_MAP)
    assert loaded.metadata["timestamp_unit"] == "datetime"
    assert loaded.checkins["timestamp"].tolist() == [APR03_180009, APR03_180009, APR04_010203]
    # no tz column: the card must not claim that local time is timestamp + tz_offset_min
    assert "tz_offset_min" not in loaded.metadata["local_time"]


def test_csv_tz_offset_column(tmp_path):
    path = _write(tmp_path / "c.csv", ["uid,venue,ts,lat,lon,off", _csv_row() + ",-240"])
    loaded = read_dataset("csv", path, columns=CSV_MAP + ",tz_offset_min=off")
    assert loaded.checkins["tz_offset_min"].tolist() == [-240]
    assert str(loaded.checkins["tz_offset_min"].dtype) == "int16"
    assert loaded.metadata["local_time"] == "timestamp + tz_offset_min"


def test_csv_relative_day_minute_with_weekday(tmp_path):
    path = _write(tmp_path / "rel.csv", [
        "uid,venue,day,min,wd,lat,lon",
        "u1,v1,0,30,5,40.7,-74.0",
        "u1,v2,2,90,0,40.8,-74.1",
        "u2,v1,9,1439,2,40.7,-74.0",
    ])
    loaded = read_dataset("csv", path, columns="user_id=uid,location_id=venue,day=day,minute=min,weekday=wd,"
                                                 "latitude=lat,longitude=lon")
    assert loaded.checkins["timestamp"].tolist() == [0 * 86400 + 30 * 60, 2 * 86400 + 90 * 60, 9 * 86400 + 1439 * 60]
    assert loaded.metadata["time_reference"] == "relative_day0"
    assert loaded.metadata["day0_weekday"] == 5  # day 0 is a Saturday: (5 - 0) % 7 == (0 - 2) % 7 == (2 - 9) % 7
    # without a weekday column day 0 is taken as a Monday
    plain = read_dataset("csv", path, columns="user_id=uid,location_id=venue,day=day,minute=min,latitude=lat,"
                                              "longitude=lon")
    assert plain.metadata["day0_weekday"] == 0
    assert plain.checkins["timestamp"].tolist() == loaded.checkins["timestamp"].tolist()


@pytest.mark.parametrize("mode", MODES)
def test_csv_relative_minute_out_of_range(tmp_path, mode):
    path = _write(tmp_path / "rel.csv", ["uid,venue,day,min,lat,lon", "u1,v1,0,30,1,1", "u1,v1,0,1440,1,1"])
    cols = "user_id=uid,location_id=venue,day=day,minute=min,latitude=lat,longitude=lon"
    if mode == "raise":
        with pytest.raises(DataValidationError) as info:
            read_dataset("csv", path, columns=cols, on_error=mode)
        _assert_names(info.value, path, line=3)
    else:
        loaded = read_dataset("csv", path, columns=cols, on_error=mode)
        assert loaded.account.total_dropped() == {"unparsable_timestamp": 1}
        assert loaded.checkins["timestamp"].tolist() == [1800]


def test_csv_parquet_input(tmp_path):
    path = tmp_path / "c.parquet"
    pd.DataFrame({"uid": ["u1", "u2", "u3"], "venue": ["v1", "v2", "v1"], "ts": [100, 200, 300],
                  "lat": [1.5, 95.0, 1.5], "lon": [2.5, 3.0, 2.5]}).to_parquet(path)
    loaded = read_dataset("csv", path, columns=CSV_MAP, on_error="drop")
    c = loaded.checkins
    assert c["user_id"].tolist() == ["u1", "u3"]
    assert c["timestamp"].tolist() == [100, 300]
    assert dict(c.dtypes.astype(str)) == {
        "user_id": "string", "location_id": "string", "timestamp": "int64", "tz_offset_min": "int16",
        "latitude": "float64", "longitude": "float64",
    }
    assert loaded.account.total_dropped() == {"latitude_out_of_range": 1}
    with pytest.raises(DataValidationError) as info:
        read_dataset("csv", path, columns=CSV_MAP, on_error="raise")
    _assert_names(info.value, path, line=2, column="lat", value="95.0")  # Parquet: the row number


def test_csv_coordinates_from_location_table(tmp_path):
    locs = _write(tmp_path / "pois.csv", ["location_id,latitude,longitude,name", "v1,40.7,-74.0,Joe's",
                                          "v2,40.8,-74.1,Bob's"])
    path = _write(tmp_path / "c.csv", ["uid,venue,ts", "u1,v1,100", "u1,v2,200", "u2,v1,300"])
    loaded = read_dataset("csv", path, columns="user_id=uid,location_id=venue,timestamp=ts", locations_path=locs,
                          on_error="raise")
    c = loaded.checkins
    assert c["latitude"].tolist() == [40.7, 40.8, 40.7]
    assert c["longitude"].tolist() == [-74.0, -74.1, -74.0]
    table = loaded.locations.set_index("location_id")
    assert table.loc["v2", "name"] == "Bob's"
    assert [s.name for s in loaded.account.steps] == ["read locations pois.csv", "read csv c.csv"]
    assert str(locs) in loaded.metadata["source_files"]


@pytest.mark.parametrize("mode", MODES)
def test_csv_location_missing_from_table(tmp_path, mode):
    locs = _write(tmp_path / "pois.csv", ["location_id,latitude,longitude", "v1,40.7,-74.0"])
    path = _write(tmp_path / "c.csv", ["uid,venue,ts", "u1,v1,100", "u1,v9,200", "u2,v1,300"])
    cols = "user_id=uid,location_id=venue,timestamp=ts"
    if mode == "raise":
        with pytest.raises(DataValidationError) as info:
            read_dataset("csv", path, columns=cols, locations_path=locs, on_error=mode)
        _assert_names(info.value, path, line=3, column="location_id", value="'v9'")
    else:
        loaded = read_dataset("csv", path, columns=cols, locations_path=locs, on_error=mode)
        assert loaded.account.total_dropped() == {"location_without_coordinates": 1}
        assert loaded.checkins["location_id"].tolist() == ["v1", "v1"]
        _assert_adds_up(loaded.account)


def test_csv_without_coordinates_and_without_table(tmp_path):
    path = _write(tmp_path / "c.csv", ["uid,venue,ts", "u1,v1,100"])
    with pytest.raises(DataValidationError, match="location table"):
        read_dataset("csv", path, columns="user_id=uid,location_id=venue,timestamp=ts")


def test_column_mapping_errors(tmp_path):
    path = _write(tmp_path / "c.csv", [CSV_HEADER, _csv_row()])
    with pytest.raises(ValueError, match="canonical=source"):
        read_dataset("csv", path, columns="user_id")
    with pytest.raises(ValueError, match="canonical=source"):
        parse_column_mapping("user_id=")
    with pytest.raises(ValueError, match=r"unknown canonical column\(s\) \['bogus'\]") as info:
        read_dataset("csv", path, columns="user_id=uid,bogus=venue")
    assert "location_id" in str(info.value)  # lists the allowed names
    assert parse_column_mapping(" user_id = uid , , location_id=venue ") == {"user_id": "uid", "location_id": "venue"}


def test_unknown_format(tmp_path):
    path = _write(tmp_path / "c.csv", [CSV_HEADER, _csv_row()])
    with pytest.raises(ValueError) as info:
        read_dataset("foo", path)
    for name in FORMATS:
        assert name in str(info.value)
    assert "'foo'" in str(info.value)


# ------------------------------------------------------------------------------------- bad rows, in both modes
# (format, bad line, column as in the file, value as it appears in the message, drop reason)
BAD_ROWS = [
    ("csv", _csv_row(lat="95.0"), "lat", "'95.0'", "latitude_out_of_range"),
    ("csv", _csv_row(lon="-190"), "lon", "'-190'", "longitude_out_of_range"),
    ("csv", _csv_row(lat=""), "lat", None, "missing_coordinates"),
    ("csv", _csv_row(lon=""), "lon", None, "missing_coordinates"),
    ("csv", _csv_row(lat="abc"), "lat", "'abc'", "missing_coordinates"),
    ("csv", _csv_row(ts="not-a-time"), "ts", "'not-a-time'", "unparsable_timestamp"),
    ("csv", _csv_row(user=""), "uid", None, "missing_user_id"),
    ("foursquare", _tsmc(lat="95.0"), "latitude", "'95.0'", "latitude_out_of_range"),
    ("foursquare", _tsmc(lon="-190"), "longitude", "'-190'", "longitude_out_of_range"),
    ("foursquare", _tsmc(lat=""), "latitude", None, "missing_coordinates"),
    ("foursquare", _tsmc(lon="abc"), "longitude", "'abc'", "missing_coordinates"),
    ("foursquare", _tsmc(ts="Tue Foo 03 18:00:09 +0000 2012"), "utcTimestamp", "'Tue Foo 03 18:00:09 +0000 2012'",
     "unparsable_timestamp"),
    ("foursquare", _tsmc(tz="abc"), "timezoneOffset", "'abc'", "bad_tz_offset"),
    ("gowalla", "7\t2010-13-45T99:00:00Z\t30.1\t-97.1\t100", "check_in_time", "'2010-13-45T99:00:00Z'",
     "unparsable_timestamp"),
    ("gowalla", "7\t2010-10-19T23:55:27Z\t-91\t-97.1\t100", "latitude", "'-91'", "latitude_out_of_range"),
]


def _good_rows(fmt: str, n: int) -> list[str]:
    if fmt == "csv":
        return [_csv_row(user=f"u{i}", venue=f"v{i}", ts=str(1_333_476_009 + i)) for i in range(n)]
    if fmt == "foursquare":
        return [_tsmc(user=f"u{i}", venue=f"v{i}") for i in range(n)]
    return [f"{i}\t2010-10-19T23:55:27Z\t30.{i}\t-97.{i}\t{i}" for i in range(n)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt,bad,column,value,reason", BAD_ROWS,
                         ids=[f"{b[0]}-{b[4]}-{i}" for i, b in enumerate(BAD_ROWS)])
def test_bad_row(tmp_path, mode, fmt, bad, column, value, reason):
    good = _good_rows(fmt, 4)
    # good, blank, good, BAD, good, good: the bad row is on line 4, or line 5 below the csv header
    lines = [good[0], "", good[1], bad, good[2], good[3]]
    header = [CSV_HEADER] if fmt == "csv" else []
    path = _write(tmp_path / ("in.csv" if fmt == "csv" else "in.txt"), header + lines)
    kwargs = {"columns": CSV_MAP} if fmt == "csv" else {}
    if mode == "raise":
        with pytest.raises(DataValidationError) as info:
            read_dataset(fmt, path, on_error=mode, **kwargs)
        _assert_names(info.value, path, line=4 + len(header), column=column, value=value)
    else:
        loaded = read_dataset(fmt, path, on_error=mode, **kwargs)
        assert loaded.account.total_dropped() == {reason: 1, "blank_line": 1}
        step = loaded.account.steps[-1]
        assert (step.rows_in, step.rows_kept) == (6, 4)
        _assert_adds_up(loaded.account)
        assert len(loaded.checkins) == 4
        assert sorted(loaded.checkins["user_id"]) == sorted(r.split("," if fmt == "csv" else "\t")[0] for r in good)


def test_raise_names_the_first_bad_line_not_the_first_broken_rule(tmp_path):
    # line 2 breaks a later rule (latitude range) than line 3 (missing coordinates): line 2 is reported
    path = _write(tmp_path / "c.csv", [CSV_HEADER, _csv_row(lat="95.0"), _csv_row(lat=""), _csv_row()])
    with pytest.raises(DataValidationError) as info:
        read_dataset("csv", path, columns=CSV_MAP, on_error="raise")
    _assert_names(info.value, path, line=2, column="lat", value="'95.0'")
    # drop mode counts each row once, under the first rule it breaks
    loaded = read_dataset("csv", path, columns=CSV_MAP, on_error="drop")
    assert loaded.account.total_dropped() == {"latitude_out_of_range": 1, "missing_coordinates": 1}


def test_one_bad_timestamp_does_not_spoil_a_numeric_column(tmp_path):
    path = _write(tmp_path / "c.csv", [CSV_HEADER] + [_csv_row(ts=str(100 + i)) for i in range(4)]
                  + [_csv_row(ts="oops")])
    loaded = read_dataset("csv", path, columns=CSV_MAP, on_error="drop")
    assert loaded.checkins["timestamp"].tolist() == [100, 101, 102, 103]
    assert loaded.account.total_dropped() == {"unparsable_timestamp": 1}
    with pytest.raises(DataValidationError) as info:
        read_dataset("csv", path, columns=CSV_MAP, on_error="raise")
    _assert_names(info.value, path, line=6, column="ts", value="'oops'")


@pytest.mark.parametrize("mode", MODES)
def test_missing_mapped_column(tmp_path, mode):
    path = _write(tmp_path / "c.csv", ["user,venue,ts,lat,lon", _csv_row()])
    with pytest.raises(DataValidationError) as info:
        read_dataset("csv", path, columns=CSV_MAP, on_error=mode)
    msg = str(info.value)
    assert "missing column(s) ['uid']" in msg
    assert "['user', 'venue', 'ts', 'lat', 'lon']" in msg  # the available columns
    assert str(path) in msg and info.value.column == "uid"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", ["csv", "foursquare", "gowalla", "yjmob"])
def test_empty_file(tmp_path, mode, fmt):
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    kwargs = {"columns": CSV_MAP} if fmt == "csv" else {}
    with pytest.raises(DataValidationError, match="empty") as info:
        read_dataset(fmt, path, on_error=mode, **kwargs)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("mode", MODES)
def test_header_only_file(tmp_path, mode):
    path = _write(tmp_path / "h.csv", [CSV_HEADER])
    with pytest.raises(DataValidationError, match="no data rows") as info:
        read_dataset("csv", path, columns=CSV_MAP, on_error=mode)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("mode", MODES)
def test_latin1_file_read_as_utf8(tmp_path, mode):
    path = _write(tmp_path / "fsq.txt", [_tsmc(cat="Bar"), _tsmc("u2", cat="Café")], encoding="latin-1")
    with pytest.raises(DataValidationError) as info:
        read_dataset("foursquare", path, encoding="utf-8", on_error=mode)
    _assert_names(info.value, path, line=2)
    assert "latin-1" in str(info.value)


@pytest.mark.parametrize("mode", MODES)
def test_utf16_without_bom_is_an_error(tmp_path, mode):
    path = _write(tmp_path / "c.csv", [CSV_HEADER, _csv_row()], encoding="utf-16-le")
    assert b"\x00" in path.read_bytes()
    with pytest.raises(DataValidationError, match="NUL bytes") as info:
        read_dataset("csv", path, columns=CSV_MAP, on_error=mode)
    assert str(path) in str(info.value) and "UTF-16" in str(info.value)


def test_utf16_with_bom_is_read(tmp_path):
    lines = [_tsmc(cat="Café"), _tsmc("u2", "v2", cat="Bar")]
    path = _write(tmp_path / "fsq16.txt", lines, encoding="utf-16")
    assert path.read_bytes()[:2] in (b"\xff\xfe", b"\xfe\xff")
    loaded = read_dataset("foursquare", path, on_error="raise")
    ref = read_dataset("foursquare", _write(tmp_path / "fsq8.txt", lines), on_error="raise")
    pd.testing.assert_frame_equal(loaded.checkins, ref.checkins)
    assert loaded.locations["category"].tolist() == ["Café", "Bar"]
    csv16 = _write(tmp_path / "c16.csv", [CSV_HEADER, _csv_row()], encoding="utf-16")
    assert read_dataset("csv", csv16, columns=CSV_MAP).checkins["timestamp"].tolist() == [APR03_180009]


def test_coordinate_conflict(tmp_path):
    path = _write(tmp_path / "c.csv", [
        CSV_HEADER,
        _csv_row("u1", "v1", "100", "40.7", "-74.0"),
        _csv_row("u1", "v1", "200", "40.7000005", "-74.0000005"),  # within 1e-6: the same place
        _csv_row("u2", "v1", "300", "41.0", "-73.0"),
        _csv_row("u2", "v2", "400", "1.0", "1.0"),
        _csv_row("u3", "v1", "500", "42.0", "-72.0"),
        _csv_row("u3", "v2", "600", "1.0", "1.0"),
    ])
    with pytest.raises(DataValidationError) as info:
        read_dataset("csv", path, columns=CSV_MAP, on_error="raise")
    msg = str(info.value)
    assert "'v1'" in msg and "(41.0, -73.0)" in msg and "(40.7, -74.0)" in msg
    assert info.value.line == 4 and str(path) in msg

    loaded = read_dataset("csv", path, columns=CSV_MAP, on_error="drop")
    c = loaded.checkins
    v1 = c[c["location_id"] == "v1"]
    assert len(v1) == 4 and (v1["latitude"] == 40.7).all() and (v1["longitude"] == -74.0).all()
    assert c.loc[c["location_id"] == "v2", "latitude"].tolist() == [1.0, 1.0]
    step = loaded.account.steps[-1]
    assert step.notes == {"coordinate_conflict_locations_merged": 1, "coordinate_conflict_rows_moved": 2}
    assert (step.rows_in, step.rows_kept, step.dropped) == (6, 6, {})
    assert loaded.locations.set_index("location_id").loc["v1", "latitude"] == 40.7


def test_coordinates_within_tolerance_are_not_a_conflict(tmp_path):
    path = _write(tmp_path / "c.csv", [CSV_HEADER, _csv_row(lat="40.7"), _csv_row(lat="40.7000009"),
                                       _csv_row(lon="-74.0000009")])
    loaded = read_dataset("csv", path, columns=CSV_MAP, on_error="raise")
    assert loaded.account.steps[-1].notes == {}
    assert loaded.checkins["latitude"].tolist() == [40.7, 40.7000009, 40.7]  # not merged either


@pytest.mark.parametrize("where", ["middle", "first"])
@pytest.mark.parametrize("fmt", ["csv", "foursquare"])
def test_too_many_fields(tmp_path, fmt, where):
    good = _good_rows(fmt, 4)
    sep = "," if fmt == "csv" else "\t"
    bad = good[0] + sep + "extra"
    header = [CSV_HEADER] if fmt == "csv" else []
    rows = [bad, *good[1:]] if where == "first" else [good[0], "", good[1], bad, good[2], good[3]]
    path = _write(tmp_path / ("in.csv" if fmt == "csv" else "in.txt"), header + rows)
    kwargs = {"columns": CSV_MAP} if fmt == "csv" else {}
    bad_line = rows.index(bad) + 1 + len(header)
    with pytest.raises(DataValidationError) as info:
        read_dataset(fmt, path, on_error="raise", **kwargs)
    _assert_names(info.value, path, line=bad_line)
    for chunksize in (None, 2):
        loaded = read_dataset(fmt, path, on_error="drop", chunksize=chunksize, **kwargs)
        expected = {"wrong_field_count": 1} | ({"blank_line": 1} if "" in rows else {})
        assert loaded.account.total_dropped() == expected
        _assert_adds_up(loaded.account)
        kept = [r for r in rows if r and r != bad]
        assert loaded.checkins["user_id"].tolist() == [r.split(sep)[0] for r in kept]
        # the columns are not shifted: the timestamps and coordinates are those of the good rows
        assert loaded.checkins["latitude"].notna().all() and (loaded.checkins["timestamp"] > 1e9).all()


@pytest.mark.parametrize("mode", MODES)
def test_location_table_duplicates_and_bad_lines(tmp_path, mode):
    locs = _write(tmp_path / "pois.csv", [
        "location_id,latitude,longitude,name",
        "v1,40.7,-74.0,Joe's",
        "v2,40.8,-74.1,Bob's",
        "v1,41.5,-73.5,Joe's again",
        "v3,1.0,1.0,x,extra",
    ])
    path = _write(tmp_path / "c.csv", ["uid,venue,ts", "u1,v1,100", "u1,v2,200"])
    cols = "user_id=uid,location_id=venue,timestamp=ts"
    if mode == "raise":
        with pytest.raises(DataValidationError) as info:
            read_dataset("csv", path, columns=cols, locations_path=locs, on_error=mode)
        _assert_names(info.value, locs, line=5)  # the line with too many fields comes first
        locs.write_text(locs.read_text().replace(",extra", ""))
        with pytest.raises(DataValidationError) as info:
            read_dataset("csv", path, columns=cols, locations_path=locs, on_error=mode)
        assert "'v1'" in str(info.value) and "(41.5, -73.5)" in str(info.value) and "(40.7, -74.0)" in str(info.value)
    else:
        loaded = read_dataset("csv", path, columns=cols, locations_path=locs, on_error=mode)
        step = loaded.account.step("read locations pois.csv")
        assert step.dropped == {"wrong_field_count": 1, "duplicate_location_id": 1}
        assert (step.rows_in, step.rows_kept) == (4, 2)
        assert list(step.notes.values()) == [1]  # one location id merged
        _assert_adds_up(loaded.account)
        assert loaded.checkins["latitude"].tolist() == [40.7, 40.8]  # the first coordinate of v1


def test_blank_lines_counted(tmp_path):
    path = _write(tmp_path / "c.csv", [CSV_HEADER, "", _csv_row("u1"), "", "", _csv_row("u2"), ""])
    loaded = read_dataset("csv", path, columns=CSV_MAP, on_error="raise")  # blank lines are not errors
    assert loaded.account.total_dropped() == {"blank_line": 4}
    assert loaded.checkins["user_id"].tolist() == ["u1", "u2"]
    _assert_adds_up(loaded.account)


# --------------------------------------------------------------------------------------------------- chunking
def _mixed_file(tmp_path):
    rows = [CSV_HEADER]
    for i in range(12):
        rows.append(_csv_row(f"u{i % 4}", f"v{i % 5}", str(1_333_476_009 + 60 * i), f"40.{i % 5}", f"-74.{i % 5}"))
    rows[3] = _csv_row("u9", "v9", "1333476009", "95.0", "1.0")  # out of range, chunk 1
    rows.insert(5, "")  # blank, chunk 2
    rows[8] = _csv_row("u1", "v0", "nope", "40.0", "-74.0")  # unparsable timestamp
    rows[10] = _csv_row("u2", "v2", "1333476999", "40.9", "-74.9")  # coordinate conflict for v2
    rows.append(_csv_row("u3", "v3", "1333477999", "40.3", "-74.3") + ",extra")  # too many fields, last chunk
    rows.append(_csv_row("u3", "v4", "1333478999", "40.4", "-74.4"))
    return _write(tmp_path / "mixed.csv", rows)


def test_chunked_reading_is_identical(tmp_path):
    path = _mixed_file(tmp_path)
    whole = read_dataset("csv", path, columns=CSV_MAP, on_error="drop")
    chunked = read_dataset("csv", path, columns=CSV_MAP, on_error="drop", chunksize=3)
    pd.testing.assert_frame_equal(whole.checkins, chunked.checkins)
    pd.testing.assert_frame_equal(whole.locations, chunked.locations)
    assert whole.account.to_dict() == chunked.account.to_dict()
    assert whole.account.total_dropped() == {
        "latitude_out_of_range": 1, "blank_line": 1, "unparsable_timestamp": 1, "wrong_field_count": 1,
    }
    step = whole.account.steps[-1]
    assert step.notes == {"coordinate_conflict_locations_merged": 1, "coordinate_conflict_rows_moved": 1}
    assert (step.rows_in, step.rows_kept) == (15, 11)
    _assert_adds_up(whole.account)


def test_chunked_reading_foursquare_identical(tmp_path):
    rows = [_tsmc(f"u{i}", f"v{i % 3}", ts=f"Tue Apr 03 18:0{i}:09 +0000 2012") for i in range(8)]
    rows.insert(2, "")
    rows[6] = _tsmc("u6", "v0", ts="garbage")
    path = _write(tmp_path / "fsq.txt", rows, encoding="latin-1")
    whole = read_dataset("foursquare", path)
    chunked = read_dataset("foursquare", path, chunksize=3)
    pd.testing.assert_frame_equal(whole.checkins, chunked.checkins)
    pd.testing.assert_frame_equal(whole.locations, chunked.locations)
    assert whole.account.to_dict() == chunked.account.to_dict()
    assert whole.account.total_dropped() == {"blank_line": 1, "unparsable_timestamp": 1}


@pytest.mark.parametrize("chunksize", [3, None])
def test_bad_row_in_third_chunk_has_exact_line(tmp_path, chunksize):
    rows = [CSV_HEADER, _csv_row("u0"), "", _csv_row("u1"), _csv_row("u2"), _csv_row("u3"), _csv_row("u4"),
            _csv_row("u5"), _csv_row("u6", lon="181"), _csv_row("u7")]
    # data rows (blank included) 1-3 are chunk 1, 4-6 chunk 2, 7-9 chunk 3; the bad row is the 8th, on line 9
    path = _write(tmp_path / "c.csv", rows)
    with pytest.raises(DataValidationError) as info:
        read_dataset("csv", path, columns=CSV_MAP, on_error="raise", chunksize=chunksize)
    _assert_names(info.value, path, line=9, column="lon", value="'181'")


# ------------------------------------------------------------------------------------------------ row account
def test_row_account_add_checks_the_sum():
    account = RowAccount()
    with pytest.raises(ValueError, match="does not add up"):
        account.add("read x", rows_in=10, rows_kept=8, dropped={"bad": 1})
    with pytest.raises(ValueError, match="does not add up"):
        account.add("read x", rows_in=10, rows_kept=10, dropped={"bad": 1})
    assert account.steps == []
    step = account.add("read x", rows_in=10, rows_kept=7, dropped={"bad": 2, "blank_line": 1, "zero": 0})
    assert step.dropped == {"bad": 2, "blank_line": 1}  # zero counts are left out


def test_row_account_markdown_and_round_trip():
    account = RowAccount()
    account.add("read a", 10, 8, {"latitude_out_of_range": 2}, {"hidden_rows": 3})
    account.add("filter users", 8, 8)
    account.add("filter locations", 8, 5, {"rare_location": 3})
    md = account.to_markdown().splitlines()
    assert len(md) == 2 + 3
    assert md[2].startswith("| read a | 10 | 8 | latitude_out_of_range: 2 | hidden_rows: 3 |")
    assert md[3] == "| filter users | 8 | 8 | - | - |"
    back = RowAccount.from_dict(account.to_dict())
    assert back.to_dict() == account.to_dict()
    assert back.total_dropped() == {"latitude_out_of_range": 2, "rare_location": 3}
    assert back.step("filter locations").rows_kept == 5
    with pytest.raises(KeyError):
        back.step("nope")

