"""Speed and memory of ``mobility data prepare`` on a 1,000,000-check-in TSMC2014-format file.

Target (issue #2): at most 60 s on 2 cores and a peak RSS of at most 2 GB.

    python benchmarks/bench_prepare.py [--checkins 1000000] [--users 5000] [--locations 20000] [--keep]

The file is written once (not timed), then ``mobility data prepare --format foursquare`` runs in a child process whose
wall time and peak resident memory (``ru_maxrss`` of the children) are printed. ``--evaluate`` also times the baselines;
``--grid-users N`` benchmarks the grid path instead.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

DAYS = np.array(["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"])
MONTHS = np.array(["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"])


def write_tsmc(path: Path, n: int, users: int, locations: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    user = rng.integers(0, users, n)
    # each user mostly revisits a personal set of places: realistic filter survival and history lengths
    personal = rng.integers(0, locations, (users, 30))
    pick = rng.random(n) < 0.8
    loc = np.where(pick, personal[user, rng.integers(0, 30, n)], rng.zipf(1.3, n) % locations)
    ts = 1333238400 + rng.integers(0, 320 * 86400, n)  # 2012-04-01 + up to 320 days
    dt = pd.to_datetime(ts, unit="s", utc=True)
    stamp = (
        pd.Series(DAYS[dt.day_of_week]) + " " + pd.Series(MONTHS[dt.month - 1]) + " "
        + pd.Series(dt.strftime("%d %H:%M:%S +0000 %Y"))
    )
    venue = pd.Series(loc).map(lambda i: f"{i:024x}")
    cat = loc % 250
    frame = pd.DataFrame({
        "userId": user,
        "venueId": venue,
        "venueCategoryId": pd.Series(cat).map(lambda i: f"{i + 7:024x}"),
        "venueCategory": pd.Series(cat).map(lambda i: f"Category {i}"),
        "latitude": 40.5 + (loc % 997) / 997 * 0.4,
        "longitude": -74.2 + (loc // 997) / (locations / 997 + 1) * 0.5,
        "timezoneOffset": -240,
        "utcTimestamp": stamp,
    })
    frame.to_csv(path, sep="\t", header=False, index=False, encoding="latin-1")


def run_cli(*args: str) -> tuple[float, str, float]:
    """Run ``mobility ARGS`` in a child process; return (wall seconds, stdout, the largest child peak RSS in MiB)."""
    cmd = [sys.executable, "-m", "train.cli", "-q", *args]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"`mobility {' '.join(args)}` failed with exit code {proc.returncode}:\n{err}")
    # ru_maxrss of RUSAGE_CHILDREN is the largest peak of all children so far
    return wall, out, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def bench_grid(tmp: Path, users: int) -> None:
    from dataset_builders.synthetic import synthesize_grid, write_yjmob

    t = time.perf_counter()
    grid = synthesize_grid(num_users=users)
    raw = write_yjmob(grid, tmp / "grid.csv")
    rows = len(grid)
    del grid
    print(f"wrote {rows:,} grid rows ({raw.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t:.1f}s")
    wall, _, peak_mib = run_cli("data", "prepare", "--format", "yjmob", "--input", str(raw), "--out", str(tmp / "data"))
    print()
    print("| grid rows | wall (s) | rows/s | peak RSS (MiB) | bytes per row |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| {rows:,} | {wall:.1f} | {rows / wall:,.0f} | {peak_mib:,.0f} | {peak_mib * 2**20 / rows:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkins", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=5_000)
    parser.add_argument("--locations", type=int, default=20_000)
    parser.add_argument("--grid-users", type=int, default=0,
                        help="instead: a synthetic YJMob-style grid of this many users through `data prepare --format "
                        "yjmob` (12,000 users are ~10.5M rows; HuMob city A is ~111M)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--evaluate", action="store_true",
                        help="also time `mobility evaluate --baseline all` on the prepared test split")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    if args.grid_users:
        bench_grid(tmp, args.grid_users)
        if not args.keep:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        return
    raw = tmp / "checkins.txt"
    t = time.perf_counter()
    write_tsmc(raw, args.checkins, args.users, args.locations)
    print(f"wrote {args.checkins:,} check-ins ({raw.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t:.1f}s")

    wall, out, peak_mib = run_cli("data", "prepare", "--format", "foursquare", "--input", str(raw),
                                  "--out", str(tmp / "data"))
    print(out.strip().splitlines()[-2])
    print()
    print("| check-ins | wall (s) | check-ins/s | peak RSS (MiB) | target |")
    print("|---:|---:|---:|---:|---|")
    ok = wall <= 60 and peak_mib <= 2048
    print(f"| {args.checkins:,} | {wall:.1f} | {args.checkins / wall:,.0f} | {peak_mib:,.0f} | "
          f"<= 60 s and <= 2048 MiB: {'met' if ok else 'MISSED'} |")
    if args.evaluate:
        wall, out, peak_mib = run_cli("evaluate", "--baseline", "all", "--data", str(tmp / "data"))
        n = int(out.split("| popularity |")[1].split("|")[-2].replace(",", ""))
        print()
        print("| evaluate (4 baselines) | test samples | wall (s) | samples/s per baseline | peak RSS, max of both runs (MiB) |")
        print("|---|---:|---:|---:|---:|")
        print(f"| all | {n:,} | {wall:.1f} | {4 * n / wall:,.0f} | {peak_mib:,.0f} |")
    if not args.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"kept {tmp}")


if __name__ == "__main__":
    main()
