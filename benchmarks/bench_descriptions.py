"""Benchmark of location descriptions and their text embeddings (QT-Mob steps 1-2, DESIGN §5.1).

- `build_descriptions` on many random locations (default 100,000) spread over clustered neighbourhoods of a
  35 km x 35 km city, with names (5% missing) and categories drawn from a skewed distribution over 300 categories;
  reports the number of (location, neighbour) pairs within the radius and the time.
- `encode_texts` with the offline all-MiniLM-L6-v2 on the first `--encode` descriptions (default 2,000): cold (empty
  cache, model loaded), warm model with cache disabled, and fully cached; and, for reference, sentence-transformers'
  own `encode` of the same texts with the same model.

Usage:

    HF_HUB_OFFLINE=1 python benchmarks/bench_descriptions.py [--locations 100000 --encode 2000 --radius 500 --no-compare-st]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataset_builders.descriptions import build_descriptions  # noqa: E402
from train.text_encoder import clear_model_pool, encode_texts  # noqa: E402


def random_city(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    hoods = 250
    centres = rng.uniform([40.55, -74.15], [40.87, -73.73], size=(hoods, 2))
    spread = rng.uniform(0.003, 0.015, size=hoods)
    hood = rng.integers(0, hoods, n)
    lat = centres[hood, 0] + rng.normal(0, 1, n) * spread[hood]
    lon = centres[hood, 1] + rng.normal(0, 1, n) * spread[hood] * 1.3
    categories = np.array([f"Category {i:03d}" for i in range(300)], dtype=object)
    groups = np.array([f"Group {i:02d}" for i in range(10)], dtype=object)
    cat = (rng.zipf(1.4, n) - 1) % 300
    words = np.array(["Golden", "Corner", "Harbor", "Maple", "Owl", "Union", "River", "Elm", "Rose", "Hill"])
    name = (
        pd.Series(words[rng.integers(0, 10, n)])
        + " "
        + pd.Series(categories[cat]).str[-3:]
        + " #"
        + pd.Series(np.arange(n).astype(str))
    )
    name[rng.random(n) < 0.05] = ""
    return pd.DataFrame(
        {
            "location_id": [f"loc{i:07d}" for i in range(n)],
            "latitude": lat,
            "longitude": lon,
            "name": name,
            "category": categories[cat],
            "category_group": groups[cat % 10],
        }
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--locations", type=int, default=100_000)
    parser.add_argument("--encode", type=int, default=2_000)
    parser.add_argument("--radius", type=float, default=500.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-compare-st", dest="compare_st", action="store_false", help="skip the sentence-transformers reference row"
    )
    args = parser.parse_args(argv)

    rows = []
    city = random_city(args.locations, args.seed)
    t0 = time.perf_counter()
    out = build_descriptions(city, radius_m=args.radius)
    seconds = time.perf_counter() - t0
    pairs = int(pd.to_numeric(out["contextual"].str.extract(r": (\d+) place", expand=False)).fillna(0).sum())
    rows.append(("build_descriptions", f"{args.locations:,} locations", seconds, args.locations / seconds))
    lengths = out["description"].str.len()
    print(
        f"{pairs:,} (location, neighbour) pairs within {args.radius:g} m; description length (chars) "
        f"mean {lengths.mean():.0f}, max {lengths.max()}"
    )
    print("example:\n" + out["description"][0] + "\n")

    texts = out["description"][: args.encode].tolist()
    with tempfile.TemporaryDirectory() as cache:
        clear_model_pool()
        for label, kwargs in (
            ("encode_texts cold (load + encode + write cache)", {"cache_dir": cache}),
            ("encode_texts model loaded, cache off", {"cache_dir": False}),
            ("encode_texts all cached", {"cache_dir": cache}),
        ):
            t0 = time.perf_counter()
            emb, stats = encode_texts(texts, batch_size=args.batch_size, progress=False, return_stats=True, **kwargs)
            seconds = time.perf_counter() - t0
            rows.append((label, f"{len(texts):,} texts ({stats.encoded} encoded)", seconds, len(texts) / seconds))

    if args.compare_st:
        from sentence_transformers import SentenceTransformer

        from train.text_encoder import default_encoder_path

        model = SentenceTransformer(default_encoder_path(), device="cpu")
        t0 = time.perf_counter()
        model.encode(texts, batch_size=args.batch_size, show_progress_bar=False)
        seconds = time.perf_counter() - t0
        rows.append(
            ("sentence-transformers encode (reference)", f"{len(texts):,} texts", seconds, len(texts) / seconds)
        )

    width = max(len(r[0]) for r in rows)
    print(f"{'step':<{width}}  {'input':<26} {'seconds':>8} {'items/s':>12}")
    for label, what, secs, rate in rows:
        print(f"{label:<{width}}  {what:<26} {secs:>8.2f} {rate:>12,.0f}")
    print(f"embeddings: {emb.shape}, {emb.dtype}")


if __name__ == "__main__":
    main()
