"""Benchmark of M3ob (train/m3ob.py): knowledge graph and TransE, the kNN relational graph, training and prediction.

Data: the default synthetic check-in city (`synthesize_checkins(seed=--seed)`, `--users` users), written as TSMC
files, read back with the `foursquare` reader and prepared with the default `prepare_checkins` (as `mobility demo`),
plus the city's land-use tiles (`city.write_land_use_tiles`) as the location images.

1. Knowledge graph of the demo city (`dataset_builders.knowledge_graph`, the steps of `make_knowledge_graph`): the
   category -> activity mapping `activities_from_encoder` (all-MiniLM-L6-v2, timed once without the embedding cache,
   i.e. loading the model and encoding, and once with the default cache under `$HF_MOBILITY_HOME/embeddings`), then
   `build_knowledge_graph` and `train_transe` with its defaults (dimension 64, 100 epochs, 1 torch thread): entities,
   relations, triples, seconds, and TransE link prediction on the held-out triples (MRR, Hits@10) beside an untrained
   TransE of the same shape (`random`).
2. Relational graph: `modeling_mobility.m3ob.build_knn_graph(torch.randn(N, 64), 10)` (the default chunking) with
   `--threads` torch threads, for N = 10,000 and 100,000 (`--quick`: 20,000): seconds and edges (both directions).
   Target: at most 30 s for 100,000 locations on 2 cores.
3. Training and prediction of the demo model, `train/recipes/m3ob_demo.yaml` cut to 1 epoch without evaluation
   (`train_m3ob(..., max_epochs=1, evaluate=False, progress=False)`, the recipe's `num_threads` for training), for the
   full model (`id,image`: the tiles through the prepared DINOv2-small) and the ID-only ablation (`modalities="id"`):
   training samples/s (`run_info["train_samples_per_second"]`: the training epoch only, validation excluded), then
   `evaluate_m3ob(run, data, model=...)` on the test split with `--threads` torch threads: predictions/s
   (`report["inference"]["predictions_per_second"]`: every location ranked for every test sample, the recipe's
   `eval_batch_size`) and test Acc@1 / MRR after that one epoch, for reference. The one-off preparation of each run
   (`run_info["prepare_seconds"]`: knowledge graph, TransE and image features, before any training) is reported
   apart; image features are cached under `$HF_MOBILITY_HOME/image_features`, so they are computed only when the
   tiles were never encoded before (the table says how many were encoded and how many came from the cache); the
   cost without that cache is timed once beforehand (`location_image_features(..., cache_dir=False)`, loading the
   encoder included, the recipe's threads).

Data and runs go to a temporary folder; `HF_MOBILITY_HOME` is left as it is (its prepared dinov2-small and its caches
are used). Unless `OMP_WAIT_POLICY` is already set, it is set to `PASSIVE` before torch loads (see
benchmarks/bench_humob.py). Wall times depend on the machine and on what else runs on it; nothing here asserts on them.

Usage:

    .venv/bin/python benchmarks/bench_m3ob.py [--quick] [--threads 2] [--users 150] [--seed 0]

Measured on this machine (full run, defaults: 150 users, --threads 2; torch 2.13.0+cpu; 2 CPU cores shared with other
work: load average 2.27 at the start and 2.28 at the end, i.e. about two cores' worth of other load, so every timing
here is pessimistic; 71 s in all, 76 s wall with the interpreter start):

    knowledge graph   567 entities (368 locations, 149 users, 38 categories, 12 activities), 17,481 triples
                      (11 relations): activities_from_encoder 0.55 s without the cache (MiniLM load + encode),
                      0.00 s cached; build_knowledge_graph 0.02 s; train_transe 2.8 s (train 2.4, eval 0.33)
    TransE            MRR 0.1063 vs 0.0104 random, Hits@10 25.2% vs 1.4% (1,748 held-out triples)
    kNN graph         10,000 locations 0.44 s (117,518 edges); 100,000 locations 24.47 s (1,175,048 edges):
                      meets the <= 30 s target on 2 cores
    training, 1 epoch m3ob (id,image) 2,186 samples/s, m3ob-id-only 2,283 samples/s (21,377 samples, 1 thread)
    prediction        m3ob 8,326 predictions/s, m3ob-id-only 8,374 predictions/s (7,267 test samples, 2 threads)
    preparation       prepare_seconds 3.0 s (image) / 3.1 s (ID-only), almost all TransE; image features from the
                      cache (0.15 s); without the cache 368 tiles through DINOv2-small at 112 px took 10.8 s
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

OMP_POLICY_GIVEN = os.environ.get("OMP_WAIT_POLICY")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see benchmarks/bench_humob.py)

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_mhsa import _with_threads  # noqa: E402
from benchmarks.tables import print_table  # noqa: E402

M3OB_RECIPE = REPO / "train" / "recipes" / "m3ob_demo.yaml"
KNN_TARGET_SECONDS = 30.0  # for KNN_TARGET_LOCATIONS locations on 2 cores
KNN_TARGET_LOCATIONS = 100_000
KNN_DIM = 64
KNN_NEIGHBORS = 10
QUICK = {"users": 50, "knn": (10_000, 20_000)}
FULL_KNN = (10_000, KNN_TARGET_LOCATIONS)


def build_city(root: Path, seed: int, num_users: int) -> tuple[Path, Path]:
    """The demo check-in dataset (as `mobility demo` prepares it) and the folder of the city's land-use tiles."""
    from dataset_builders.preprocess import prepare_checkins
    from dataset_builders.publish import write_prepared
    from dataset_builders.readers import read_dataset
    from dataset_builders.synthetic import synthesize_checkins

    city = synthesize_checkins(seed=seed, num_users=num_users)
    paths = city.write_tsmc(root / "raw")
    tiles = city.write_land_use_tiles(root / "raw")
    loaded = read_dataset("foursquare", paths["checkins"], locations_path=paths["pois"])
    return Path(write_prepared(prepare_checkins(loaded), root / "data")), Path(tiles)


def bench_knowledge_graph(data_dir: Path, seed: int) -> None:
    from dataset_builders.knowledge_graph import activities_from_encoder, build_knowledge_graph, train_transe
    from dataset_builders.publish import load_prepared

    data = load_prepared(data_dir)
    categories = data.table("locations", "train").column("category").to_pylist()
    t0 = time.perf_counter()
    activities_from_encoder(categories, embedding_cache=False)
    t_cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    mapping = activities_from_encoder(categories)
    t_mapping = time.perf_counter() - t0
    t0 = time.perf_counter()
    kg = build_knowledge_graph(data, mapping)
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    transe = train_transe(kg, seed=seed, progress=False)
    t_transe = time.perf_counter() - t0

    summary = kg.summary()
    entities = ", ".join(f"{v:,} {k}" for k, v in summary["entities"].items())
    settings = transe.settings
    rows = [
        ["activities_from_encoder, no cache (MiniLM load + encode)", f"{len(mapping):,} categories", "-",
         f"{t_cold:.2f}"],
        ["activities_from_encoder, default cache", f"{len(mapping):,} categories", "-", f"{t_mapping:.2f}"],
        ["build_knowledge_graph", f"{summary['num_entities']:,} ({entities})",
         f"{summary['num_triples']:,} ({summary['num_relations']} relations)", f"{t_build:.2f}"],
        [f"train_transe (dim {settings['embedding_dim']}, {settings['epochs']} epochs, 1 thread)",
         f"{settings['train_triples']:,} train / {settings['test_triples']:,} test triples", "-",
         f"{t_transe:.1f} (train {settings['train_seconds']:.1f}, eval {settings['eval_seconds']:.2f})"],
    ]
    print_table("Knowledge graph of the demo city (train check-ins only)",
                ["step", "entities", "triples", "seconds"], rows, "lrrr")
    metrics = transe.metrics
    rows = [[name, f"{metrics[name]['mrr']:.4f}", f"{100 * metrics[name]['hits@10']:.1f}%",
             f"{metrics[name]['mean_rank']:.0f}"] for name in ("transe", "random")]
    print_table(f"TransE link prediction, {metrics['test_triples']:,} held-out triples (raw tail ranking against all "
                f"{summary['num_entities']:,} entities)", ["model", "MRR", "Hits@10", "mean rank"], rows, "lrrr")


def bench_knn(sizes: tuple[int, ...], threads: int, seed: int) -> None:
    from modeling_mobility.m3ob import build_knn_graph

    generator = torch.Generator().manual_seed(seed)
    _with_threads(threads, build_knn_graph, torch.randn(2_000, KNN_DIM, generator=generator), KNN_NEIGHBORS)  # warm-up
    rows = []
    for n in sizes:
        embeddings = torch.randn(n, KNN_DIM, generator=generator)
        t0 = time.perf_counter()
        edge_index, _ = _with_threads(threads, build_knn_graph, embeddings, KNN_NEIGHBORS)
        seconds = time.perf_counter() - t0
        target = (f"<= {KNN_TARGET_SECONDS:.0f} s (2 cores)", "yes" if seconds <= KNN_TARGET_SECONDS else "no") \
            if n == KNN_TARGET_LOCATIONS else ("-", "-")
        rows.append([f"{n:,}", f"{seconds:.2f}", f"{edge_index.shape[1]:,}", f"{edge_index.shape[1] / n:.1f}",
                     *target])
        del embeddings, edge_index
    print_table(f"build_knn_graph(torch.randn(N, {KNN_DIM}), {KNN_NEIGHBORS}), {threads} torch thread(s), default "
                f"chunking; target for {KNN_TARGET_LOCATIONS:,} locations",
                ["locations", "seconds", "edges (both directions)", "edges / location", "target", "meets target"],
                rows, "rrrrll")


def bench_training(data_dir: Path, tiles: Path, root: Path, threads: int, seed: int) -> None:
    from train.image_features import location_image_features
    from train.m3ob import evaluate_m3ob, load_recipe, train_m3ob

    recipe = load_recipe(M3OB_RECIPE, images=str(tiles), max_epochs=1, evaluate=False, progress=False, seed=seed)
    # the image features once without the cache (first in the process: the encoder is loaded too), as the runs below
    # would compute them with an empty feature cache
    prep_threads = recipe.num_threads or torch.get_num_threads()
    t0 = time.perf_counter()
    cold = _with_threads(prep_threads, location_image_features, data_dir,
                         images=tiles, encoder=recipe.image_encoder, image_size=recipe.image_size, cache_dir=False,
                         progress=False)
    t_cold = time.perf_counter() - t0
    rows, prep_rows, info = [], [], {}
    for variant, modalities in (("id,image", "id,image"), ("id-only", "id")):
        t0 = time.perf_counter()
        result = train_m3ob(data_dir, root / f"m3ob-{variant}", recipe=recipe, modalities=modalities)
        t_run = time.perf_counter() - t0
        info = result.run_info
        report = _with_threads(threads, evaluate_m3ob, result.output_dir, data_dir, split=recipe.eval_split,
                               batch_size=recipe.eval_batch_size, model=result.model)
        test = report["results"][info["name"]]
        inference = report["inference"]
        rows.append([
            info["name"], f"{info['trainable_parameters']:,}", f"{info['train_seconds']:.1f}",
            f"{info['train_samples_per_second']:,.0f}", f"{inference['samples']:,}", f"{inference['seconds']:.2f}",
            f"{inference['predictions_per_second']:,.0f}", f"{100 * test['acc@1']:.1f}%", f"{100 * test['mrr']:.1f}%",
            f"{t_run:.0f}",
        ])
        kg_seconds = info["knowledge_graph"].get("seconds") or {}
        images = info["images"]
        image_note = ("off" if "num_encoded" not in images else
                      f"{images['num_encoded']:,} encoded, {images['num_cached']:,} from cache")
        prep_rows.append([
            info["name"], f"{info['prepare_seconds']:.1f}",
            *(f"{kg_seconds.get(k, 0.0):.2f}" for k in ("activities", "build", "write", "transe")),
            f"{info['prepare_seconds'] - sum(kg_seconds.values()):.2f}", image_note,
        ])
    title = (f"M3ob, recipe {M3OB_RECIPE.name} with max_epochs=1 (training on {recipe.num_threads} torch thread(s), "
             f"batch {recipe.batch_size}; evaluation on {threads} thread(s), batch {recipe.eval_batch_size}); synthetic "
             f"city: {info['train_samples']:,} training samples, {info['num_locations']:,} locations, "
             f"{info['num_users']:,} users, {info['num_edges']:,} relational-graph edges")
    print_table(title, ["model", "trainable params", "train s", "training samples/s", "test samples", "ranking s",
                        "predictions/s", "test Acc@1", "test MRR", "run s"], rows, "lrrrrrrrrr")
    print_table("One-off preparation per run (run_info prepare_seconds, before training; seconds)",
                ["model", "prepare", "activities", "KG build", "KG write", "TransE", "image features + rest",
                 "image features"], prep_rows, "lrrrrrrl")
    print(f"\nwithout the feature cache: {cold.source['num_encoded']:,} tiles through {recipe.image_encoder} at "
          f"{recipe.image_size} px ({cold.dim}-d features) in {t_cold:.1f} s on {prep_threads} thread(s), "
          "loading the encoder included: what the image run adds to its preparation with an empty feature cache")
    print("\n'run s' = train_m3ob end to end (preparation, 1 epoch, validation, saving); 'ranking s' = the model's "
          "ranking of the test split in evaluate_m3ob (baselines excluded); Acc@1 / MRR after 1 epoch only")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"smaller: {QUICK['users']} users and kNN graphs of {QUICK['knn']} locations")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads for the kNN graph and the evaluation (default 2)")
    parser.add_argument("--users", type=int, default=None,
                        help=f"users of the synthetic city (default 150, --quick {QUICK['users']})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the city, TransE, the training and the kNN inputs")
    args = parser.parse_args(argv)
    users = args.users or (QUICK["users"] if args.quick else 150)
    if args.threads < 1 or users < 1:
        parser.error("--threads and --users must be positive")
    for name in ("transformers", "train", "dataset_builders"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    policy = os.environ["OMP_WAIT_POLICY"] + (" (given)" if OMP_POLICY_GIVEN else " (set by this script)")
    print(f"{os.cpu_count()} CPUs, load average {load} at start (other work on the cores slows every timing); "
          f"torch {torch.__version__}, OMP_WAIT_POLICY={policy}; HF_MOBILITY_HOME="
          f"{os.environ.get('HF_MOBILITY_HOME', '~/.cache/hf-mobility (default)')}"
          + ("; --quick" if args.quick else ""))

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_m3ob_") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        data_dir, tiles = build_city(root, args.seed, users)
        print(f"\ndemo city ({users} users, seed {args.seed}): prepared data and land-use tiles of all "
              f"{len(list(tiles.glob('*.png'))):,} POIs in {time.perf_counter() - t0:.1f} s")
        bench_knowledge_graph(data_dir, args.seed)
        bench_knn(QUICK["knn"] if args.quick else FULL_KNN, args.threads, args.seed)
        bench_training(data_dir, tiles, root, args.threads, args.seed)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; load average at the end "
          + ", ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
