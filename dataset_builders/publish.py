"""Write prepared datasets as Parquet shards + a ``README.md`` dataset card with YAML ``configs:`` (DESIGN §3.5).

The folder loads with ``datasets.load_dataset(folder, config)`` and, once uploaded, with
``load_dataset("user/name", config)``; no loading script is involved (datasets >= 4 has none). A machine-readable
``hf_mobility.json`` beside the card carries the row account, the preprocessing settings and the source metadata.
Writes are atomic: the folder is built under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from .preprocess import PreparedCheckins, PreparedGrid
from .schema import RowAccount

__all__ = [
    "PreparedDataset",
    "load_dataset_folder",
    "load_prepared",
    "replace_folder",
    "write_dataset",
    "write_prepared",
]

logger = logging.getLogger(__name__)

METADATA_FILE = "hf_mobility.json"
MAX_ROWS_PER_SHARD = 1_000_000


def replace_folder(tmp: Path, out: Path) -> None:
    """Put the finished folder `tmp` (a sibling of `out`) at `out` by renames: an existing `out` is first moved into a
    temporary folder and removed afterwards, so `out` is never half written."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def write_dataset(
    out_dir: str | os.PathLike,
    configs: dict[str, dict[str, pa.Table]],
    *,
    card_body: str = "",
    metadata: dict[str, Any] | None = None,
    pretty_name: str | None = None,
    overwrite: bool = True,
    max_rows_per_shard: int = MAX_ROWS_PER_SHARD,
    extras: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``{config: {split: table}}`` as a Hub-style dataset folder, atomically.

    An existing ``out_dir`` is replaced only when it is empty or was written by this function (it holds
    ``hf_mobility.json``) and ``overwrite`` is true. ``extras(folder)`` may write more files into the folder before it
    is renamed into place (e.g. the tokenizer an instruction set was rendered with). A split with no rows is written
    (``load_prepared`` lists it) but left out of the card's ``configs``, since ``datasets.load_dataset`` cannot load a
    0-row Parquet split.
    """
    out = Path(out_dir)
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a directory")
        if any(out.iterdir()) and not (out / METADATA_FILE).exists():
            raise FileExistsError(f"{out} is not empty and is not an hf-mobility dataset; choose another --out")
        if any(out.iterdir()) and not overwrite:
            raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yaml_configs, infos = [], []
        for config, splits in configs.items():
            data_files, split_infos = [], []
            for split, table in splits.items():
                n_shards = max(1, -(-table.num_rows // max_rows_per_shard))
                (tmp / "data" / config).mkdir(parents=True, exist_ok=True)
                for i in range(n_shards):
                    shard = table.slice(i * max_rows_per_shard, max_rows_per_shard)
                    pq.write_table(shard, tmp / "data" / config / f"{split}-{i:05d}-of-{n_shards:05d}.parquet")
                if table.num_rows == 0:
                    # kept on disk for `load_prepared`, left out of the card: `datasets` cannot load a 0-row split
                    continue
                data_files.append({"split": split, "path": f"data/{config}/{split}-*.parquet"})
                size = sum(p.stat().st_size for p in (tmp / "data" / config).glob(f"{split}-*.parquet"))
                split_infos.append({"name": split, "num_bytes": size, "num_examples": table.num_rows})
            if not data_files:
                logger.warning("config %r of %s has no rows in any split; `load_dataset` will not list it", config, out)
                continue
            yaml_configs.append({"config_name": config, "data_files": data_files})
            # `datasets` keys its cache of a local folder on this info (not on the files), so it also keeps a folder
            # re-written under the same name from loading stale cached rows
            total = sum(s["num_bytes"] for s in split_infos)
            infos.append({"config_name": config, "splits": split_infos, "download_size": total, "dataset_size": total})
        header = {"configs": yaml_configs, "dataset_info": infos, "tags": ["mobility", "hf-mobility"]}
        if pretty_name:
            header["pretty_name"] = pretty_name
        readme = "---\n" + yaml.safe_dump(header, sort_keys=False) + "---\n\n" + card_body.strip() + "\n"
        (tmp / "README.md").write_text(readme, encoding="utf-8")
        (tmp / METADATA_FILE).write_text(json.dumps(metadata or {}, indent=2, default=str), encoding="utf-8")
        if extras is not None:
            extras(tmp)
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote dataset %s (configs: %s)", out, ", ".join(configs))
    return out


def _stats_table(tables: dict[str, pa.Table], what: str) -> str:
    rows = [f"| split | {what} |", "|---|---:|"]
    rows += [f"| {split} | {t.num_rows:,} |" for split, t in tables.items()]
    return "\n".join(rows)


def _card(prepared: PreparedCheckins | PreparedGrid, title: str) -> str:
    meta = prepared.metadata
    source = ", ".join(Path(p).name for p in meta.get("source_files", [])) or "unknown"
    lines = [
        f"# {title}",
        "",
        f"Prepared by hf-mobility (`mobility data prepare`) from `{source}` (format `{meta.get('format')}`).",
        "",
        "## Time",
        "",
        f"- Time reference: `{meta.get('time_reference')}`; local time: {meta.get('local_time', 'n/a')}.",
        f"- Weekday of day 0: {meta.get('day0_weekday')} (0 = Monday).",
        "",
    ]
    if prepared.kind == "checkins":
        pp = meta["preprocess"]
        lines += [
            "## Filters and split",
            "",
            f"- Users with at least {pp['min_user_visits']} check-ins and locations with at least "
            f"{pp['min_location_visits']} visits, applied iteratively until stable.",
            f"- Split per user by tracked day: day < {pp['split_fractions'][0]} x max day -> train, "
            f"< {pp['split_fractions'][1]} x max day -> validation, else test.",
            f"- A sample is (user, visits of the previous {pp['history_days']} days"
            + (f", at most {pp['max_history']}" if pp["max_history"] else "")
            + ", target visit); samples with a history shorter than "
            f"{max(1, pp['min_history'])} are dropped.",
        ]
        if pp["inductive_fraction"]:
            lines.append(
                f"- Inductive: {meta['num_heldout_locations']} of the training locations "
                f"({pp['inductive_fraction']:.0%}, seed {pp['seed']}) are held out; train/validation drop every sample "
                "that touches one, the test set keeps only samples that do (`target_seen` is false when the target "
                "is held out)."
            )
        lines += [
            "",
            f"{meta['num_users']:,} users, {meta['num_locations']:,} locations, {meta['num_checkins']:,} check-ins.",
            "",
            "## Configs",
            "",
            "- `samples`: next-location samples (`load_dataset(path, 'samples')`).",
            "- `checkins`: the canonical check-ins after filtering, split by day.",
            "- `locations`: one row per location (coordinates, category, name when known, `heldout`).",
        ]
        if prepared.users is not None:
            lines.append(
                f"- `users`: one row per user from the source's user table ({prepared.users.num_rows:,} users; columns "
                + ", ".join(f"`{c}`" for c in prepared.users.column_names)
                + "). Descriptive only, for reports: no model or baseline reads it."
            )
        lines += [
            "",
            _stats_table(prepared.samples, "samples"),
        ]
    else:
        lines += [
            "## Grid and split",
            "",
            f"- {meta.get('grid_size')} x {meta.get('grid_size')} cells (coordinate base {meta.get('coordinate_base')}),"
            f" {meta.get('slots_per_day')} half-hour slots per day; 999 marks a hidden cell.",
            f"- Input days {meta['input_days'][0]}-{meta['input_days'][1]}, target days "
            f"{meta['predict_days'][0]}-{meta['predict_days'][1]}.",
            f"- Users split {meta['preprocess']['user_fractions']} (seed {meta['preprocess']['seed']}); users whose "
            "targets are all hidden form the `hidden` split.",
            "",
            "## Configs",
            "",
            "- `samples`: one row per user with input and target (d, t, x, y) lists.",
            "- `grid`: the canonical grid rows of the kept users, by split.",
            "",
            _stats_table(prepared.samples, "users"),
        ]
    lines += ["", "## Row account", "", prepared.account.to_markdown(), ""]
    return "\n".join(lines)


def write_prepared(
    prepared: PreparedCheckins | PreparedGrid, out_dir: str | os.PathLike, *, title: str | None = None
) -> Path:
    """Publish a :func:`~dataset_builders.preprocess.prepare_checkins` / ``prepare_grid`` result."""
    if prepared.kind == "checkins":
        configs = {
            "samples": prepared.samples,
            "checkins": prepared.checkins,
            "locations": {"train": prepared.locations},
        }
        if prepared.users is not None:
            configs["users"] = {"train": prepared.users}  # descriptive only: no model or baseline reads it
    else:
        configs = {"samples": prepared.samples, "grid": prepared.grid}
    title = title or f"hf-mobility {prepared.kind} dataset"
    metadata = {"kind": prepared.kind, "row_account": prepared.account.to_dict(), **prepared.metadata}
    return write_dataset(out_dir, configs, card_body=_card(prepared, title), metadata=metadata, pretty_name=title)


@dataclass
class PreparedDataset:
    """A prepared dataset folder read back with pyarrow (fast path for evaluation; ``load_dataset`` gives the same
    rows)."""

    path: Path
    kind: str
    metadata: dict[str, Any]

    @property
    def account(self) -> RowAccount:
        return RowAccount.from_dict(self.metadata.get("row_account", []))

    def table(self, config: str, split: str = "train") -> pa.Table:
        files = sorted((self.path / "data" / config).glob(f"{split}-*.parquet"))
        if not files:
            available = sorted({p.name.split("-")[0] for p in (self.path / "data" / config).glob("*.parquet")})
            raise ValueError(f"{self.path}: config {config!r} has no split {split!r}; available: {available}")
        return pa.concat_tables([pq.read_table(f) for f in files])

    def splits(self, config: str) -> list[str]:
        return sorted({p.name.split("-")[0] for p in (self.path / "data" / config).glob("*.parquet")})


def load_dataset_folder(path: str | os.PathLike, config: str | None = None, split: str | None = None, **kwargs):
    """`datasets.load_dataset(path, config, split=split)` whose cache cannot serve another folder's rows.

    `datasets` (5.x) caches a local dataset folder under its base name and a hash of its card's `configs:` and
    `dataset_info:` entries, neither of which names the folder or its files' contents: two folders with the same name
    and equal split sizes (every run's `instructions/` copy, or a folder rebuilt with other settings) share one cache
    entry, and the second load silently returns the first folder's rows. For a local folder this resolves the card's
    data files and loads them with their packaged builder (`parquet`, ...), whose cache is keyed by the files' paths and
    modification times; a Hub id goes to `load_dataset` as it is. With a `split`, only that split's files are read (a
    prediction on the test split does not convert the training rows first).

    Raises:
        `ValueError`: as `load_dataset` does for an unknown config or split.
    """
    import datasets

    folder = Path(path)
    if not folder.is_dir():
        return datasets.load_dataset(str(path), config, split=split, **kwargs)
    builder = datasets.load_dataset_builder(str(folder), config)
    module = type(builder).__module__.rsplit(".", 1)[-1]  # the packaged builder: parquet, json, csv, arrow, ...
    data_files = {name: list(files) for name, files in builder.config.data_files.items()}
    if split is not None:
        name = re.match(r"[\w.-]*", str(split)).group(0)  # a slice such as "train[:10]" reads the train files
        if name not in data_files:
            raise ValueError(f'Unknown split "{name}" of {folder} (config {builder.config.name!r}). Should be one of '
                             f"{list(data_files)}.")
        data_files = {name: data_files[name]}
    return datasets.load_dataset(module, data_files=data_files, split=split, **kwargs)


def load_prepared(path: str | os.PathLike) -> PreparedDataset:
    """Open a folder written by :func:`write_prepared` (``mobility data prepare``)."""
    path = Path(path)
    meta_file = path / METADATA_FILE
    if not meta_file.exists():
        raise FileNotFoundError(
            f"{path} is not a prepared hf-mobility dataset (no {METADATA_FILE}); create one with `mobility data prepare`"
        )
    metadata = json.loads(meta_file.read_text(encoding="utf-8"))
    return PreparedDataset(path=path, kind=metadata.get("kind", "checkins"), metadata=metadata)
