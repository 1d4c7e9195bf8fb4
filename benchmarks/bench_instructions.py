"""Speed of the QT-Mob instruction builder (``mobility data instructions``) on a 1,000,000-check-in dataset.

Target (issue #4): at least 20,000 instruction pairs/s on 2 cores.

    python benchmarks/bench_instructions.py [--checkins 1000000] [--users 5000] [--locations 20000] [--keep]

The raw TSMC2014-format file is written with ``bench_prepare.write_tsmc`` and prepared with the ``dataset_builders``
APIs (not timed); a LocationTokenizer gets random unique 4 x 64 codes for every location. Then each task is built
alone (timed, including the user profiles and descriptions it needs) and all tasks together; pairs/s is printed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prepare import write_tsmc  # noqa: E402

from dataset_builders.instructions.qtmob import QTMobInstructionConfig, build_qtmob_instructions  # noqa: E402
from dataset_builders.preprocess import CheckinPreprocessConfig, prepare_checkins  # noqa: E402
from dataset_builders.publish import load_prepared, write_prepared  # noqa: E402
from dataset_builders.readers import read_dataset  # noqa: E402
from tokenization_mobility import LocationTokenizer, build_bpe_tokenizer  # noqa: E402


def random_codes(ids: list[str], seed: int = 0) -> dict[str, tuple[int, ...]]:
    rng = np.random.default_rng(seed)
    flat = rng.choice(64**4, size=len(ids), replace=False)
    digits = np.stack([flat // 64**3, flat // 64**2 % 64, flat // 64 % 64, flat % 64], axis=1)
    return {loc: tuple(int(c) for c in row) for loc, row in zip(ids, digits)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkins", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=5_000)
    parser.add_argument("--locations", type=int, default=20_000)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()

    import datasets

    datasets.disable_progress_bars()
    tmp = Path(tempfile.mkdtemp(prefix="bench_instructions_"))
    try:
        t = time.perf_counter()
        raw = tmp / "checkins.txt"
        write_tsmc(raw, args.checkins, args.users, args.locations)
        loaded = read_dataset("foursquare", raw)
        write_prepared(prepare_checkins(loaded, CheckinPreprocessConfig()), tmp / "data")
        prepared = load_prepared(tmp / "data")
        ids = prepared.table("locations").column("location_id").to_pylist()
        base = build_bpe_tokenizer(["a user visits a place", "at noon"], vocab_size=300)
        tokenizer = LocationTokenizer.from_base(base, random_codes(ids), codebook_size=64)
        sizes = {s: prepared.table("samples", s).num_rows for s in prepared.splits("samples")}
        print(f"prepared {args.checkins:,} check-ins -> {sum(sizes.values()):,} samples {sizes}, {len(ids):,} "
              f"locations, tokenizer with random 4 x 64 codes ({time.perf_counter() - t:.1f}s, not timed)")

        print()
        print("| tasks | pairs | wall (s) | pairs/s | target |")
        print("|---|---:|---:|---:|---|")
        for tasks in (("next",), ("recovery",), ("alignment",), ("translation",),
                      ("next", "recovery", "alignment", "translation")):
            t = time.perf_counter()
            result = build_qtmob_instructions(prepared, tokenizer, QTMobInstructionConfig(tasks=tasks))
            wall = time.perf_counter() - t
            pairs = sum(ds.num_rows for dd in result.datasets.values() for ds in dd.values())
            target = ""
            if tasks == ("next",) or len(tasks) == 4:
                target = f">= 20,000 pairs/s: {'met' if pairs / wall >= 20_000 else 'MISSED'}"
            print(f"| {'+'.join(tasks)} | {pairs:,} | {wall:.1f} | {pairs / wall:,.0f} | {target} |")
            del result
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
