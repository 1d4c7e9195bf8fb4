"""Build a QT-Mob location tokenizer from a prepared dataset: descriptions -> semantic encoder -> RQ-VAE -> unique codes
-> a stock Hugging Face tokenizer with one code token per (level, code).

```bash
mobility data synth --out raw/
mobility data prepare --format foursquare --input raw/checkins.txt --locations raw/pois.csv --out data/
mobility train location-tokenizer --data data/ --output-dir runs/loctok/ [--encoder PATH] \\
    [--num-quantizers 4] [--codebook-size 64] [--base-tokenizer PATH]
```

The output folder holds ``tokenizer/`` (``AutoTokenizer.from_pretrained(..., trust_remote_code=True)``), ``rqvae/``
(``AutoModel.from_pretrained(..., trust_remote_code=True)``), ``descriptions.parquet``, ``codes.parquet``,
``report.json`` and PNG plots (codebook usage, a map of locations coloured by their first-level code, the training
curve).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .plots import pyplot, save_figure

__all__ = ["LocationTokenizerResult", "build_location_tokenizer", "same_category_first_code_rate"]

logger = logging.getLogger(__name__)


@dataclass
class LocationTokenizerResult:
    output_dir: Path
    report: dict[str, Any] = field(default_factory=dict)


def same_category_first_code_rate(categories, first_codes, seed: int = 0) -> tuple[float | None, float | None]:
    """How often two locations of the same category share their first-level code, and the same rate for a random
    code assignment with the same code usage (a permutation of the codes). Returns (observed, random); `(None, None)`
    when no two locations share a category (e.g. Gowalla, which has no categories)."""
    cats = pd.Series(categories).fillna("").astype(str).to_numpy()
    codes = np.asarray(first_codes)
    ok = cats != ""

    def rate(c: np.ndarray) -> float:
        frame = pd.DataFrame({"cat": cats[ok], "code": c[ok]})
        # pairs of same-category locations sharing a code / same-category pairs
        same = frame.groupby(["cat", "code"]).size()
        per_cat = frame.groupby("cat").size()
        pairs_shared = float((same * (same - 1) / 2).sum())
        pairs_total = float((per_cat * (per_cat - 1) / 2).sum())
        return pairs_shared / pairs_total if pairs_total else 0.0

    if not (pd.Series(cats[ok]).value_counts() > 1).any():
        return None, None
    rng = np.random.default_rng(seed)
    random_rates = [rate(rng.permutation(codes)) for _ in range(20)]
    return rate(codes), float(np.mean(random_rates))


def _plot_usage(codes: np.ndarray, codebook_size: int, path: Path) -> None:
    plt = pyplot()
    levels = codes.shape[1]
    fig, axes = plt.subplots(1, levels, figsize=(3.2 * levels, 2.8), sharey=True)
    axes = np.atleast_1d(axes)
    for level, ax in enumerate(axes):
        counts = np.bincount(codes[:, level], minlength=codebook_size)
        ax.bar(np.arange(codebook_size), counts, width=1.0, color=f"C{level}")
        used = (counts > 0).mean()
        ax.set_title(f"level {chr(ord('a') + level)}: {used:.0%} of codes used", fontsize=9)
        ax.set_xlabel("code")
    axes[0].set_ylabel("locations")
    fig.suptitle("RQ-VAE codebook usage")
    save_figure(fig, path)


def _plot_map(locations: pd.DataFrame, codes: np.ndarray, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 6))
    first = codes[:, 0]
    # the 10 most used first-level codes get their own colour and legend entry, the rest are grey
    top = pd.Series(first).value_counts().index[:10]
    rest = ~np.isin(first, top)
    ax.scatter(locations["longitude"][rest], locations["latitude"][rest], c="lightgrey", s=8, label="other codes")
    for i, code in enumerate(top):
        sel = first == code
        ax.scatter(locations["longitude"][sel], locations["latitude"][sel], s=14, color=f"C{i}",
                   label=f"<a_{code}> ({int(sel.sum())})")
    ax.set_xlabel("longitude")
    ax.set_ylabel("latitude")
    ax.xaxis.set_major_locator(plt.MaxNLocator(5))
    ax.set_title("Locations coloured by their first-level code")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save_figure(fig, path)


def _plot_history(history: list[dict], path: Path) -> None:
    plt = pyplot()
    frame = pd.DataFrame(history)
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for col in [c for c in frame.columns if c.endswith("loss")]:
        series = frame[["epoch", col]].dropna()
        ax.plot(series["epoch"], series[col], label=col)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title("RQ-VAE training")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def _write_parquet_atomic(frame: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def build_location_tokenizer(
    data_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    encoder: str | None = None,
    num_quantizers: int = 4,
    codebook_size: int = 64,
    base_tokenizer: str | None = None,
    max_epochs: int = 200,
    patience: int = 10,
    batch_size: int = 1024,
    learning_rate: float = 1e-3,
    seed: int = 0,
    radius_m: float = 500.0,
    progress: bool = True,
) -> LocationTokenizerResult:
    """Run the whole location-tokenizer pipeline (see the module docstring) and write its outputs.

    The RQ-VAE is trained on the locations that are not held out (the inductive test set's locations stay unseen),
    and codes are assigned to every location; every location gets a distinct code sequence.
    """
    import torch
    from transformers import AutoTokenizer

    from dataset_builders.descriptions import build_descriptions
    from dataset_builders.publish import load_prepared
    from modeling_mobility.rqvae import RQVAEConfig
    from tokenization_mobility import LocationTokenizer, build_bpe_tokenizer

    from .evaluate import write_json_atomic
    from .rqvae import codebook_report, train_rqvae
    from .text_encoder import default_encoder_path, encode_texts

    data = load_prepared(data_dir)
    if data.kind != "checkins":
        raise ValueError(f"{data_dir} holds {data.kind} data; the location tokenizer needs check-in data with locations")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    locations = data.table("locations").to_pandas()
    if num_quantizers < 1 or codebook_size < 2:
        raise ValueError(f"need num_quantizers >= 1 and codebook_size >= 2, got {num_quantizers}, {codebook_size}")
    if len(locations) > codebook_size**num_quantizers:
        raise ValueError(
            f"{len(locations):,} locations do not fit in {codebook_size}^{num_quantizers} code sequences; raise "
            "--codebook-size or --num-quantizers"
        )

    logger.info("describing %d locations", len(locations))
    desc = build_descriptions(locations, radius_m=radius_m)
    _write_parquet_atomic(desc, out / "descriptions.parquet")

    encoder_path = encoder or default_encoder_path()
    logger.info("encoding descriptions with %s", encoder_path)
    embeddings = encode_texts(desc["description"].tolist(), encoder_path, progress=progress)

    torch.manual_seed(seed)
    heldout = locations["heldout"].to_numpy(dtype=bool) if "heldout" in locations else np.zeros(len(locations), bool)
    config = RQVAEConfig(input_dim=int(embeddings.shape[1]), num_quantizers=num_quantizers, codebook_size=codebook_size)
    checkpoints = Path(tempfile.mkdtemp(prefix=".checkpoints-", dir=out))
    try:
        result = train_rqvae(
            embeddings[~heldout], config, output_dir=checkpoints, max_epochs=max_epochs, batch_size=batch_size,
            learning_rate=learning_rate, patience=patience, seed=seed, progress=progress,
        )
    finally:  # the best model is kept in memory and saved below; intermediate checkpoints are not outputs
        shutil.rmtree(checkpoints, ignore_errors=True)
    model = result.model
    codes_t, unique_report = model.get_unique_codes(torch.from_numpy(embeddings))
    codes = codes_t.cpu().numpy()
    model.save_pretrained(out / "rqvae")

    table = {loc: tuple(int(c) for c in row) for loc, row in zip(locations["location_id"], codes)}
    if base_tokenizer:
        from .pretrained import resolve_model

        base = AutoTokenizer.from_pretrained(resolve_model(base_tokenizer))
        base_name = base_tokenizer
    else:
        base = build_bpe_tokenizer(desc["description"].tolist(), vocab_size=1000)
        base_name = "byte-level BPE (vocab 1000) trained on the location descriptions"
    tokenizer = LocationTokenizer.from_base(base, table, codebook_size=codebook_size)
    tokenizer.save_pretrained(out / "tokenizer")

    code_frame = pd.DataFrame({"location_id": locations["location_id"]})
    for level in range(num_quantizers):
        code_frame[f"code_{chr(ord('a') + level)}"] = codes[:, level]
    code_frame["tokens"] = [tokenizer.location_to_text(loc) for loc in locations["location_id"]]
    _write_parquet_atomic(code_frame, out / "codes.parquet")

    observed, random_rate = same_category_first_code_rate(locations.get("category"), codes[:, 0], seed=seed)
    report = {
        "data": str(data_dir),
        "num_locations": int(len(locations)),
        "num_heldout_locations_not_trained_on": int(heldout.sum()),
        "encoder": str(encoder_path),
        "embedding_dim": int(embeddings.shape[1]),
        "base_tokenizer": base_name,
        "num_quantizers": num_quantizers,
        "codebook_size": codebook_size,
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "codes": {**unique_report, **{f"final_{k}": v for k, v in codebook_report(codes, codebook_size).items()}},
        "same_category_first_code_rate": observed,
        "same_category_first_code_rate_random": random_rate,
        "history": result.history,
    }
    write_json_atomic(report, out / "report.json")
    _plot_usage(codes, codebook_size, out / "codebook_usage.png")
    _plot_map(locations, codes, out / "first_code_map.png")
    if result.history:
        _plot_history(result.history, out / "training.png")
    return LocationTokenizerResult(out, report)
