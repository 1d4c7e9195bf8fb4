"""The `mobility` command line: the contract of issue #2 (synth, prepare, evaluate), exit codes and help."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from datasets import load_dataset

from train.cli import build_parser, main


def _write_tsmc(path, n_users=12, n_locs=15, days=40, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    start = pd.Timestamp("2012-04-02", tz="UTC")
    for u in range(n_users):
        for d in range(days):
            for _ in range(rng.integers(1, 3)):
                loc = int(rng.integers(0, n_locs))
                ts = start + pd.Timedelta(days=d, seconds=int(rng.integers(0, 86400)))
                stamp = ts.strftime("%a %b %d %H:%M:%S +0000 %Y")
                rows.append(f"{u}\tv{loc:03d}\tc{loc % 3}\tCat {loc % 3}\t{40 + loc / 100}\t{-74 + loc / 100}\t-240\t{stamp}")
    path.write_text("\n".join(rows) + "\n", encoding="latin-1")
    return path


def test_prepare_and_evaluate_checkins(tmp_path, capsys):
    raw = _write_tsmc(tmp_path / "checkins.txt")
    out = tmp_path / "data"
    assert main(["-q", "data", "prepare", "--format", "foursquare", "--input", str(raw), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Row account" in printed and "filter users >= 10" in printed
    ds = load_dataset(str(out), "samples")
    assert set(ds) == {"train", "validation", "test"} and ds["test"].num_rows > 0
    assert main(["-q", "evaluate", "--baseline", "all", "--data", str(out), "--out", str(tmp_path / "m.json")]) == 0
    printed = capsys.readouterr().out
    assert "markov" in printed and "Acc@1" in printed
    report = json.loads((tmp_path / "m.json").read_text())
    assert set(report["results"]) == {"popularity", "most-frequent", "history-frequency", "markov"}
    for res in report["results"].values():
        assert res["num_samples"] == ds["test"].num_rows
        assert 0 <= res["acc@1"] <= res["acc@5"] <= res["acc@10"] <= res["acc@20"] <= 1
        assert 0 < res["mrr"] <= 1


def test_bad_input_exits_2_with_a_message(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code = main(["-q", "data", "prepare", "--format", "foursquare", "--input", str(empty), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "empty" in capsys.readouterr().err
    code = main(["-q", "data", "prepare", "--format", "csv", "--input", str(tmp_path / "missing.csv"),
                 "--out", str(tmp_path / "o")])
    assert code == 2 and "not found" in capsys.readouterr().err
    raw = _write_tsmc(tmp_path / "c.txt")
    code = main(["-q", "data", "prepare", "--format", "csv", "--input", str(raw), "--out", str(tmp_path / "o"),
                 "--columns", "user_id"])
    assert code == 2 and "canonical=source" in capsys.readouterr().err
    code = main(["-q", "evaluate", "--baseline", "markov", "--data", str(tmp_path)])
    assert code == 2 and "mobility data prepare" in capsys.readouterr().err


def test_on_error_raise_names_the_line(tmp_path, capsys):
    raw = _write_tsmc(tmp_path / "c.txt")
    lines = raw.read_text(encoding="latin-1").splitlines()
    fields = lines[4].split("\t")
    fields[4] = "95.5"  # latitude out of range on line 5
    lines[4] = "\t".join(fields)
    raw.write_text("\n".join(lines) + "\n", encoding="latin-1")
    code = main(["-q", "data", "prepare", "--format", "foursquare", "--input", str(raw), "--out", str(tmp_path / "o"),
                 "--on-error", "raise"])
    err = capsys.readouterr().err
    assert code == 2 and "line 5" in err and "latitude" in err and "95.5" in err
    assert main(["-q", "data", "prepare", "--format", "foursquare", "--input", str(raw), "--out",
                 str(tmp_path / "o")]) == 0
    assert "latitude_out_of_range: 1" in capsys.readouterr().out


def test_options_of_the_other_data_kind_are_rejected(tmp_path, capsys):
    raw = _write_tsmc(tmp_path / "c.txt")
    code = main(["-q", "data", "prepare", "--format", "foursquare", "--input", str(raw), "--out", str(tmp_path / "o"),
                 "--predict-days", "60-74"])
    assert code == 2 and "--predict-days only applies to the yjmob grid format" in capsys.readouterr().err
    code = main(["-q", "data", "prepare", "--format", "yjmob", "--input", str(raw), "--out", str(tmp_path / "o"),
                 "--inductive-fraction", "0.1"])
    assert code == 2 and "--inductive-fraction only applies to check-in formats" in capsys.readouterr().err


def test_wrong_format_name_is_rejected(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["data", "prepare", "--format", "geolife", "--input", "x", "--out", "y"])
    assert exc.value.code == 2
    assert "invalid choice: 'geolife'" in capsys.readouterr().err


def test_quiet_hides_the_progress_bars_of_recipe_scripts(monkeypatch):
    from types import SimpleNamespace

    import train.calliper
    import train.sft

    seen = {}

    def stub(name, result):
        def script_main(argv):
            seen[name] = argv
            return result
        return script_main

    monkeypatch.setattr(train.sft, "main", stub("sft", "runs/x"))
    monkeypatch.setattr(train.calliper, "main", stub("calliper", SimpleNamespace(output_dir="runs/c")))
    assert main(["-q", "train", "sft", "--config", "r.yaml"]) == 0
    assert seen.pop("sft") == ["--config", "r.yaml", "--progress", "false"]
    assert main(["-q", "train", "sft", "--config", "r.yaml", "--progress", "true"]) == 0  # the user's choice stays
    assert seen.pop("sft") == ["--config", "r.yaml", "--progress", "true"]
    assert main(["train", "sft", "--config", "r.yaml"]) == 0
    assert seen.pop("sft") == ["--config", "r.yaml"]
    assert main(["-q", "train", "calliper", "--data", "d"]) == 0
    assert seen.pop("calliper") == ["--data", "d", "--no-progress"]


def test_every_command_has_help():
    parser = build_parser()
    commands = [
        ["data", "synth"],
        ["data", "prepare"],
        ["evaluate"],
        ["demo"],
        ["data"],
        [],
        ["train"],
        ["train", "location-tokenizer"],
        ["data", "instructions"],
        ["push"],
    ]
    for cmd in commands:
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([*cmd, "--help"])
        assert exc.value.code == 0
    # every option of every command documents itself
    top = parser._subparsers._group_actions[0].choices
    commands = [
        top["evaluate"],
        top["demo"],
        top["push"],
        *top["data"]._subparsers._group_actions[0].choices.values(),
        *top["train"]._subparsers._group_actions[0].choices.values(),
    ]
    for command in commands:
        for action in command._actions:
            assert action.help, (command.prog, action.dest)


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "train.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "mobility" in out.stdout


def test_headerless_files_like_foursquare_tist2015(tmp_path, capsys):
    """Check-ins and POIs without header lines, mapped by position, with a custom time format."""
    rng = np.random.default_rng(0)
    start = pd.Timestamp("2012-04-03", tz="UTC")
    lines = []
    for i in range(400):
        ts = (start + pd.Timedelta(hours=int(i * 7 % 1000))).strftime("%a %b %d %H:%M:%S +0000 %Y")
        lines.append(f"{i % 8}\tv{rng.integers(0, 6)}\t{ts}\t-240")
    (tmp_path / "checkins.txt").write_text("\n".join(lines) + "\n")
    pois = "".join(f"v{j}\t{40 + j / 100}\t{-74 + j / 100}\tCafe\tUS\n" for j in range(6))
    (tmp_path / "pois.txt").write_text(pois)
    code = main([
        "-q", "data", "prepare", "--format", "csv", "--input", str(tmp_path / "checkins.txt"),
        "--locations", str(tmp_path / "pois.txt"), "--out", str(tmp_path / "data"), "--no-header",
        "--columns", "user_id=0,location_id=1,timestamp=2,tz_offset_min=3",
        "--location-columns", "location_id=0,latitude=1,longitude=2,category=3",
        "--timestamp-format", "%a %b %d %H:%M:%S %z %Y", "--on-error", "raise",
    ])
    assert code == 0, capsys.readouterr().err
    checkins = load_dataset(str(tmp_path / "data"), "checkins")
    rows = sum(checkins[s].num_rows for s in checkins)
    assert rows == 400
    first = checkins["train"].to_pandas().sort_values("timestamp").iloc[0]
    assert first["timestamp"] == int(start.timestamp()) and first["tz_offset_min"] == -240
    locs = load_dataset(str(tmp_path / "data"), "locations")["train"].to_pandas()
    assert set(locs["category"]) == {"Cafe"} and "4" in locs.columns  # unmapped columns kept by position


def test_quiet_silences_library_progress_bars_and_restores_them():
    import datasets
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    from train.cli import _library_progress_bars

    def state():
        return (hub_utils.are_progress_bars_disabled(), datasets.are_progress_bars_disabled(),
                hf_logging.is_progress_bar_enabled())

    if state() != (False, False, True):
        pytest.skip("the environment disables the libraries' progress bars (HF_HUB_DISABLE_PROGRESS_BARS?)")
    with _library_progress_bars(False):
        assert state() == (True, True, False)
    assert state() == (False, False, True)
    with _library_progress_bars(True):  # without -q nothing changes
        assert state() == (False, False, True)
