"""Train and evaluate NextLocMoE (DESIGN §5.4) with `transformers.Trainer`.

NextLocMoE regresses the coordinates of a user's next visit from the last 45 visits before it (a long history of 40
and a current window of 5, read from the canonical check-ins, never after the target) through a Llama-family
backbone with two mixtures of experts; a KD-tree over the coordinates of the dataset's locations turns the predicted
point into a full ranking, so the ranking metrics of every other model apply, plus the distance error in metres.
Because candidates are ranked by their coordinates, a location never seen in training (the inductive split) is
ranked like any other.

Copy-paste:

```bash
# demo recipe: the prepared SmolLM2-135M-Instruct, truncated to 2 decoder layers (minutes on 2 CPU cores)
python -m train.nextlocmoe --config train/recipes/nextlocmoe_demo.yaml --data runs/demo/data \\
    --output-dir runs/demo/nextlocmoe
# the paper recipe: Llama-3.2-3B truncated to 12 layers (a GPU and Hub access to the gated model)
python -m train.nextlocmoe --config train/recipes/nextlocmoe_paper.yaml --data DATA --output-dir runs/nextlocmoe
```

```python
from train.nextlocmoe import evaluate_nextlocmoe, train_nextlocmoe

result = train_nextlocmoe("runs/demo/data", "runs/nlm", recipe="train/recipes/nextlocmoe_demo.yaml")
report = evaluate_nextlocmoe("runs/nlm", "runs/demo/data", split="test")   # also runs/nlm/metrics.json
```

A run folder holds `model/` (safetensors + config + the modeling files: it loads with
`AutoModel.from_pretrained(RUN/model, trust_remote_code=True)`), `run_info.json`, `recipe.yaml`,
`trainer_state.json`, `metrics.json` and a model card `README.md`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import yaml
from transformers import PrinterCallback, Trainer, set_seed
from transformers.utils import logging as hf_logging

from dataset_builders.descriptions import great_circle_m
from dataset_builders.preprocess import local_time_features
from dataset_builders.publish import METADATA_FILE, PreparedDataset, load_prepared
from modeling_mobility.nextlocmoe import NextLocMoEConfig, NextLocMoEForNextLocation

from .baselines import nearest_location_ranks
from .evaluate import evaluate_baselines, format_results_table, write_json_atomic, write_text_atomic
from .metrics import ranking_metrics
from .mhsa import _collate, _index_of, _IndexDataset, _location_columns, _save_model, _ThroughputCallback
from .recipe import add_recipe_arguments, coerce_fields, epoch_training_arguments, parse_recipe_args, read_recipe

__all__ = [
    "FUNCTION_DESCRIPTIONS",
    "NextLocMoERecipe",
    "NextLocMoESamples",
    "NextLocMoETrainingResult",
    "ROLE_DESCRIPTIONS",
    "build_nextlocmoe_samples",
    "build_parser",
    "checkin_view",
    "evaluate_nextlocmoe",
    "kdtree_ranks",
    "load_recipe",
    "pointer_ranks",
    "main",
    "mercator_xy",
    "train_nextlocmoe",
]

logger = logging.getLogger(__name__)

EARTH_RADIUS_M = 6_378_137.0  # Web-Mercator sphere
TINY_BACKBONE = "tiny"
_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")

# Our own wording of the expert descriptions (later_methods.md §A.8 lists what each covers); their mean static token
# embeddings initialise the location-function experts and are the persona vectors of the role experts.
FUNCTION_DESCRIPTIONS: dict[str, str] = {
    "entertainment": "Entertainment area: parks, cinemas, stadiums, sports grounds and bars, busiest in the evening "
    "and at weekends.",
    "commercial": "Commercial area: shops, malls, banks, restaurants and car services, visited in working hours or "
    "at weekends to shop, eat or run errands.",
    "education": "Education area: schools, universities, libraries and research institutes, visited mostly on "
    "weekdays.",
    "public": "Public services: government offices, hospitals, stations and utilities, whose busy hours depend on "
    "the service.",
    "residential": "Residential area: homes, apartments, mixed-use blocks and hotels, where people stay long, most "
    "of all in the evening, at night and at weekends.",
}
ROLE_DESCRIPTIONS: dict[str, str] = {
    "student": "A student who goes to campus most weekdays, arriving in the morning and leaving in the afternoon.",
    "teacher": "A teacher who commutes to a school on weekdays and makes short stops at nearby shops and services.",
    "office_worker": "An office worker with a fixed weekday commute between home and an office or business "
    "district.",
    "visitor": "A visitor with irregular, all-day trips to sights, restaurants and shops, mostly in the city centre.",
    "night_shift_worker": "A night-shift worker who travels at night to hospitals, factories or services open "
    "around the clock.",
    "remote_worker": "A remote worker with flexible hours who works from coworking spaces, cafes and quiet public "
    "places.",
    "service_worker": "A service-industry worker on shifts at restaurants, shops and venues.",
    "public_official": "A public-service official on rotating shifts at government offices, stations and hospitals.",
    "fitness_enthusiast": "A fitness enthusiast who goes to gyms, sports grounds and parks early in the morning, in "
    "the evening and at weekends.",
    "retail_employee": "A retail employee who travels late in the morning and works until the evening in malls and "
    "stores.",
    "undefined": "Someone whose irregular movements fit none of the usual routines.",
}
PROMPT = ("Predict the normalised Web-Mercator coordinates of the user's next location from 40 historical visits, "
          "which show the user's routine, and 5 current visits, which show the short-term intent.")


def mercator_xy(longitude, latitude) -> np.ndarray:
    """Web-Mercator metres `(N, 2)` (x east, y north) of longitudes and latitudes in degrees (float64)."""
    lon = np.radians(np.asarray(longitude, dtype=np.float64))
    lat = np.radians(np.clip(np.asarray(latitude, dtype=np.float64), -85.05112878, 85.05112878))
    return np.stack([EARTH_RADIUS_M * lon, EARTH_RADIUS_M * np.log(np.tan(np.pi / 4 + lat / 2))], axis=-1)


def _inverse_mercator(xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lon = np.degrees(xy[:, 0] / EARTH_RADIUS_M)
    lat = np.degrees(2 * np.arctan(np.exp(xy[:, 1] / EARTH_RADIUS_M)) - np.pi / 2)
    return lon, lat


# ---------------------------------------------------------------------------------------------------------------------
# recipe


@dataclass
class NextLocMoERecipe:
    r"""
    Everything a NextLocMoE run needs; loaded from a YAML recipe and overridden by keyword arguments or `--key value`.

    Args:
        data (`str`, *optional*): prepared check-in or grid dataset folder (`mobility data prepare`; a grid is read as
            visits at cell centres, [`checkin_view`]).
        output_dir (`str`, *optional*): run folder (created).
        backbone (`str`, *optional*, defaults to `"smollm2-135m-instruct"`): the Llama-family causal LM: a local
            folder, a prepared offline alias or a Hub id (`train.pretrained.resolve_model`); `tiny` builds a small
            randomly initialised Llama in code whose vocabulary is the 256 UTF-8 byte values (tests).
        num_backbone_layers (`int`, *optional*): keep only the first decoder layers (paper: 12 of Llama-3.2-3B).
        moe_layers (`str`, *optional*): comma-separated decoder layers whose MLP becomes the personalised MoE
            (default: every 2nd layer from two thirds of the kept depth; paper: `8,10`).
        history_length, current_length (`int`, *optional*, defaults to 40 and 5): visits of the long history and of
            the current window.
        prompt (`str`, *optional*): the fixed task text before the visits (our wording of the paper's task prompt;
            its tokens go through every layer of the backbone for every sample, so a shorter one is cheaper).
        location_dim, time_dim, duration_dim, tcn_levels, tcn_kernel_size, tcn_dropout, function_top_k,
        router_hidden_size, lora_rank, lora_alpha, lora_dropout, routing, routing_threshold, max_experts,
        routing_top_k, entropy_weight, load_balance_weight, predict_offset, history_pointer, pointer_size,
        pointer_weight: see `NextLocMoEConfig` (paper: 128, 16, 16, 5, 4, 0.1, 2, 128, 16, 16, 0.02, threshold, 0.8,
            5, 2, 300, 0, false; the last three are hf-mobility additions, the pointer off by default).
        max_train_samples (`int`, *optional*): train on a random subset of this many training samples (the published
            code keeps every 20th window; on CPU the subset bounds the cost).
        max_validation_samples (`int`, *optional*): validation samples used for the per-epoch loss.
        batch_size, eval_batch_size (`int`, *optional*, defaults to 32 and 64): samples per step.
        gradient_accumulation_steps (`int`, *optional*, defaults to 1): paper: 4.
        learning_rate (`float`, *optional*, defaults to 2e-4), weight_decay (`float`, *optional*, defaults to 0.01):
            AdamW over the trainable parameters (paper: Adam with weight decay 0.01, lr 2e-4).
        max_epochs (`int`, *optional*, defaults to 50), lr_scheduler_type (`str`, *optional*, defaults to
            `"cosine"`), warmup_ratio (`float`, *optional*, defaults to 0.05), max_grad_norm (`float`, *optional*,
            defaults to 2500): the paper clips at 2,500 (the loss is in metres).
        bf16 (`bool`, *optional*, defaults to `False`): bf16 mixed precision (paper: on; use it on a GPU).
        seed (`int`, *optional*, defaults to 0), num_threads (`int`, *optional*): as in the other recipes.
        evaluate (`bool`, *optional*, defaults to `True`), eval_split (`str`, *optional*, defaults to `"test"`),
        eval_max_samples (`int`, *optional*): score only the first samples of `eval_split` in the final evaluation
            (the baselines on the same samples).
        progress (`bool`, *optional*, defaults to `True`): progress bars.
    """

    data: str | None = None
    output_dir: str | None = None
    backbone: str = "smollm2-135m-instruct"
    num_backbone_layers: int | None = None
    moe_layers: str | None = None
    history_length: int = 40
    current_length: int = 5
    prompt: str = PROMPT
    location_dim: int = 128
    time_dim: int = 16
    duration_dim: int = 16
    tcn_levels: int = 5
    tcn_kernel_size: int = 4
    tcn_dropout: float = 0.1
    function_top_k: int = 2
    router_hidden_size: int = 128
    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_dropout: float = 0.02
    routing: str = "threshold"
    routing_threshold: float = 0.8
    max_experts: int = 5
    routing_top_k: int = 2
    entropy_weight: float = 300.0
    load_balance_weight: float = 0.0
    predict_offset: bool = False
    history_pointer: bool = False
    pointer_size: int = 128
    pointer_weight: float = 1000.0
    max_train_samples: int | None = None
    max_validation_samples: int | None = None
    batch_size: int = 32
    eval_batch_size: int = 64
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    weight_decay: float = 0.01
    max_epochs: int = 50
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.05
    max_grad_norm: float = 2500.0
    bf16: bool = False
    seed: int = 0
    num_threads: int | None = None
    evaluate: bool = True
    eval_split: str = "test"
    eval_max_samples: int | None = None
    progress: bool = True

    def __post_init__(self):
        coerce_fields(self)
        for name in ("history_length", "current_length", "batch_size", "eval_batch_size", "max_epochs",
                     "gradient_accumulation_steps", "pointer_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"recipe key `{name}` must be a positive integer, got {getattr(self, name)!r}")
        for name in ("num_backbone_layers", "max_train_samples", "max_validation_samples", "eval_max_samples",
                     "num_threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"recipe key `{name}` must be a positive integer or null, got {value!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"recipe key `learning_rate` must be > 0, got {self.learning_rate!r}")
        for name in ("weight_decay", "warmup_ratio", "max_grad_norm", "entropy_weight", "load_balance_weight",
                     "pointer_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"recipe key `{name}` must be >= 0, got {getattr(self, name)!r}")
        if self.lr_scheduler_type not in _SCHEDULERS:
            raise ValueError(f"recipe key `lr_scheduler_type` must be one of {list(_SCHEDULERS)}, "
                             f"got {self.lr_scheduler_type!r}")
        if not self.backbone:
            raise ValueError("recipe key `backbone` must name a model (a folder, an alias, a Hub id) or 'tiny'")
        self.moe_layer_list()  # validates the syntax

    def moe_layer_list(self) -> list[int] | None:
        if self.moe_layers is None or not str(self.moe_layers).strip():
            return None
        try:
            return [int(v) for v in str(self.moe_layers).replace(" ", "").strip("[]").split(",") if v != ""]
        except ValueError:
            raise ValueError(f"recipe key `moe_layers` must be comma-separated layer indices, got "
                             f"{self.moe_layers!r}") from None

    def model_config_kwargs(self) -> dict[str, Any]:
        """The architecture keys, as `NextLocMoEConfig` arguments."""
        keys = ("history_length", "current_length", "location_dim", "time_dim", "duration_dim", "tcn_levels",
                "tcn_kernel_size", "tcn_dropout", "function_top_k", "router_hidden_size", "lora_rank", "lora_alpha",
                "lora_dropout", "routing", "routing_threshold", "max_experts", "routing_top_k", "entropy_weight",
                "load_balance_weight", "predict_offset", "history_pointer", "pointer_size", "pointer_weight")
        kwargs = {k: getattr(self, k) for k in keys}
        kwargs["moe_layers"] = self.moe_layer_list()
        return kwargs

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_recipe(path: str | os.PathLike | None = None, **overrides) -> NextLocMoERecipe:
    """Load a YAML recipe (optional) and apply keyword overrides; unknown keys raise a `ValueError`."""
    return read_recipe(NextLocMoERecipe, path, overrides)


# ---------------------------------------------------------------------------------------------------------------------
# data


@dataclass
class NextLocMoESamples:
    """The samples of one split as padded arrays: the last `history_length + current_length` visits before each
    target, left-padded (the most recent visit last), split into the long history and the current window.

    Args:
        sample_ids (`(N,)` int64), user_ids (`(N,)` object), history_xy (`(N, H, 2)` float32 Web-Mercator metres),
        history_time (`(N, H, 2)` int8 weekday, hour), history_duration (`(N, H)` float32 hours until the next
        visit), history_mask (`(N, H)` bool), current_* likewise with `C` steps, target_xy (`(N, 2)` float64),
        target_index (`(N,)` int64 location-table rows), target_seen (`(N,)` bool), last_index (`(N,)` int64
        location-table row of the last visit before the target).
    """

    sample_ids: np.ndarray
    user_ids: np.ndarray
    history_xy: np.ndarray
    history_time: np.ndarray
    history_duration: np.ndarray
    history_mask: np.ndarray
    current_xy: np.ndarray
    current_time: np.ndarray
    current_duration: np.ndarray
    current_mask: np.ndarray
    target_xy: np.ndarray
    target_index: np.ndarray
    target_seen: np.ndarray
    last_index: np.ndarray
    window_index: np.ndarray

    def __len__(self) -> int:
        return len(self.sample_ids)

    def subset(self, rows) -> NextLocMoESamples:
        rows = np.asarray(rows, dtype=np.int64)
        return NextLocMoESamples(**{f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(self)})

    def batch(self, rows) -> dict[str, torch.Tensor]:
        """The keyword arguments of `NextLocMoEForNextLocation.forward`, with `labels` (target metres)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = {}
        for part in ("history", "current"):
            out[f"{part}_xy"] = torch.from_numpy(getattr(self, f"{part}_xy")[rows].astype(np.float32))
            out[f"{part}_time"] = torch.from_numpy(getattr(self, f"{part}_time")[rows].astype(np.int64))
            out[f"{part}_duration"] = torch.from_numpy(getattr(self, f"{part}_duration")[rows].astype(np.float32))
            out[f"{part}_mask"] = torch.from_numpy(getattr(self, f"{part}_mask")[rows])
        out["labels"] = torch.from_numpy(self.target_xy[rows].astype(np.float32))
        return out


def _location_xy(data: PreparedDataset) -> tuple[list[str], np.ndarray]:
    """Location ids of the table and their Web-Mercator metres."""
    locations = data.table("locations")
    ids = locations.column("location_id").to_pylist()
    lon = locations.column("longitude").to_numpy(zero_copy_only=False).astype(np.float64)
    lat = locations.column("latitude").to_numpy(zero_copy_only=False).astype(np.float64)
    bad = ~(np.isfinite(lon) & np.isfinite(lat))
    if bad.any():
        raise ValueError(f"{data.path}: {int(bad.sum())} location(s) of the location table have no valid "
                         f"coordinates (first: {ids[int(np.flatnonzero(bad)[0])]!r}); NextLocMoE needs coordinates")
    return ids, mercator_xy(lon, lat)


def checkin_view(data_dir: str | os.PathLike, cache_dir: str | os.PathLike | None) -> PreparedDataset:
    """The check-in dataset NextLocMoE reads for `data_dir`: the folder itself for check-in data; for a grid dataset
    its visits ([`dataset_builders.grid_visits.grid_to_checkins`] with its defaults: consecutive records in one cell
    are one visit at the cell's centre, the grid's user split is kept), written once into
    `cache_dir/grid_visits/<fingerprint of the grid dataset's metadata>` and reused while the grid dataset is
    unchanged.

    Args:
        data_dir (`str` or `os.PathLike`): a prepared check-in or grid dataset.
        cache_dir (`str` or `os.PathLike`, *optional*): where converted grids are kept (a run folder); required for
            grid data.
    """
    data = load_prepared(data_dir)
    if data.kind != "grid":
        return data
    if cache_dir is None:
        raise ValueError(f"{data.path} is a grid dataset: give a folder to keep its conversion to visits in")
    from dataset_builders.grid_visits import grid_to_checkins

    fingerprint = hashlib.sha1(json.dumps(data.metadata, sort_keys=True, default=str).encode()).hexdigest()[:12]
    target = Path(cache_dir) / "grid_visits" / fingerprint
    if not (target / METADATA_FILE).is_file():
        logger.info("converting the grid dataset %s to visits at cell centres in %s", data.path, target)
        grid_to_checkins(data.path, target)
    return load_prepared(target)


def build_nextlocmoe_samples(
    data: PreparedDataset, split: str, *, history_length: int = 40, current_length: int = 5
) -> NextLocMoESamples:
    """The samples of `split` (the same targets as every other model) with their visit windows.

    The most recent visits of a window are the sample's own history (exactly what every other model reads: the visits
    of the previous days, `mobility data prepare --history-days`); when it is shorter than the window, the user's
    earlier check-ins of the dataset's check-in tables (all splits, sorted by time) complete it, up to
    `history_length + current_length` visits, all strictly before the target. (In the inductive setting the check-in
    tables of the train and validation days hold no visit to a held-out place, so such older visits are absent, as
    for every model.) Vectorised in numpy: no Python loop over samples.

    Args:
        data (`PreparedDataset`): a prepared check-in dataset.
        split (`str`): `train`, `validation` or `test`.
        history_length, current_length (`int`): window sizes (paper: 40 and 5).
    """
    if data.kind != "checkins":
        raise ValueError(f"{data.path}: NextLocMoE samples come from check-in data (visits with coordinates), got "
                         f"kind {data.kind!r}; convert a grid dataset with `mobility data grid-visits` (or "
                         "`checkin_view`), which `train_nextlocmoe` and `evaluate_nextlocmoe` do by themselves")
    if split not in data.splits("samples"):
        raise ValueError(f"{data.path}: no split {split!r}; available: {data.splits('samples')}")
    location_ids, loc_xy = _location_xy(data)
    vocabulary = pa.array([str(v) for v in location_ids], type=pa.string())
    day0 = int(data.metadata.get("day0_weekday", 3))

    # the user's check-ins, sorted by (user, time)
    checkins = pa.concat_tables([data.table("checkins", s).select(["user_id", "location_id", "timestamp",
                                                                   "tz_offset_min"])
                                 for s in data.splits("checkins")])
    table = data.table("samples", split)
    users = pc.unique(pa.concat_arrays([checkins.column("user_id").combine_chunks().cast(pa.string()),
                                        table.column("user_id").combine_chunks().cast(pa.string())]))
    c_user = _index_of(checkins.column("user_id").combine_chunks().cast(pa.string()), users)
    c_ts = checkins.column("timestamp").to_numpy().astype(np.int64)
    c_loc = _index_of(checkins.column("location_id").combine_chunks().cast(pa.string()), vocabulary)
    if (c_loc < 0).any():
        raise ValueError(f"{data.path}: {int((c_loc < 0).sum())} check-in(s) visit locations missing from the "
                         "location table")
    order = np.lexsort((c_ts, c_user))
    c_user, c_ts, c_loc = c_user[order], c_ts[order], c_loc[order]
    c_tz = checkins.column("tz_offset_min").to_numpy().astype(np.int64)[order]

    # the samples' own histories (flat) and targets
    history = table.column("history_location_ids").combine_chunks()
    lengths = pc.list_value_length(history).to_numpy(zero_copy_only=False).astype(np.int64)
    h_loc = _index_of(pc.list_flatten(history).cast(pa.string()), vocabulary)
    h_ts = pc.list_flatten(table.column("history_timestamps").combine_chunks()).to_numpy(
        zero_copy_only=False).astype(np.int64)
    h_tz = pc.list_flatten(table.column("history_tz_offset_min").combine_chunks()).to_numpy(
        zero_copy_only=False).astype(np.int64)
    s_user = _index_of(table.column("user_id").combine_chunks().cast(pa.string()), users)
    s_ts = table.column("target_timestamp").to_numpy().astype(np.int64)
    s_target = _index_of(table.column("target_location_id").combine_chunks().cast(pa.string()), vocabulary)
    if (h_loc < 0).any() or (s_target < 0).any():
        raise ValueError(f"{data.path}: split {split!r} has samples whose history or target location is not in the "
                         "location table")
    n = len(s_ts)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    first_ts = np.where(lengths > 0, h_ts[np.minimum(offsets[:-1], max(len(h_ts) - 1, 0))], s_ts)

    t_min = int(min(c_ts.min() if len(c_ts) else 0, s_ts.min() if n else 0))
    t_max = int(max(c_ts.max() if len(c_ts) else 0, s_ts.max() if n else 0))
    span = t_max - t_min + 2
    key = c_user * span + (c_ts - t_min)
    older_end = np.searchsorted(key, s_user * span + (first_ts - t_min), side="left")  # before the history
    user_start = np.searchsorted(key, s_user * span, side="left")

    width = history_length + current_length
    back = width - 1 - np.arange(width)[None, :]  # (1, W) steps back from the most recent visit
    from_history = back < lengths[:, None]
    h_idx = np.where(from_history, offsets[1:, None] - 1 - back, 0)
    o_idx = older_end[:, None] - 1 - (back - lengths[:, None])
    from_older = ~from_history & (o_idx >= user_start[:, None])
    o_idx = np.where(from_older, o_idx, 0)
    valid = from_history | from_older
    if len(c_ts) == 0:
        from_older[:] = False
        valid = from_history
    loc = np.where(from_history, h_loc[h_idx] if len(h_loc) else 0, c_loc[o_idx] if len(c_loc) else 0)
    ts = np.where(from_history, h_ts[h_idx] if len(h_ts) else 0, c_ts[o_idx] if len(c_ts) else 0)
    tz = np.where(from_history, h_tz[h_idx] if len(h_tz) else 0, c_tz[o_idx] if len(c_tz) else 0)
    next_ts = np.concatenate([ts[:, 1:], s_ts[:, None]], axis=1)
    duration = np.where(valid, (next_ts - ts) / 3600.0, 0.0).astype(np.float32)
    _, hour, _, weekday = local_time_features(ts, tz, day0)
    xy = np.where(valid[..., None], loc_xy[loc], 0.0).astype(np.float32)
    tfeat = np.where(valid[..., None], np.stack([weekday, hour], axis=-1), 0).astype(np.int8)
    h = history_length
    return NextLocMoESamples(
        sample_ids=table.column("sample_id").to_numpy().astype(np.int64),
        user_ids=np.asarray(table.column("user_id").to_pylist(), dtype=object),
        history_xy=xy[:, :h], history_time=tfeat[:, :h], history_duration=duration[:, :h], history_mask=valid[:, :h],
        current_xy=xy[:, h:], current_time=tfeat[:, h:], current_duration=duration[:, h:], current_mask=valid[:, h:],
        target_xy=loc_xy[s_target], target_index=s_target,
        target_seen=table.column("target_seen").to_numpy(zero_copy_only=False).astype(bool),
        last_index=np.where(valid[:, -1], loc[:, -1], -1),
        window_index=np.where(valid, loc, -1).astype(np.int64),
    )


def _random_rows(n: int, limit: int | None, seed: int) -> np.ndarray:
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


# ---------------------------------------------------------------------------------------------------------------------
# ranking


def kdtree_ranks(pred_xy, candidate_xy, target_index, *, k: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Rank candidates by their distance from each predicted point with a KD-tree (`scipy.spatial.cKDTree`).

    Args:
        pred_xy (`(N, 2)`): predicted points (any planar unit, e.g. Web-Mercator metres).
        candidate_xy (`(L, 2)`): candidate coordinates in the same unit (row = location-table row).
        target_index (`(N,)` int): the true candidate row of each sample (`-1`: not a candidate, rank `inf`).
        k (`int`, *optional*, defaults to 20): length of the returned top-k lists.

    Returns:
        `(ranks, topk)`: `ranks` `(N,)` float 1-based rank of the target = the number of candidates at most as far
        from the predicted point as the target (ties counted against the model); `topk` `(N, min(k, L))` int the
        nearest candidates, nearest first.
    """
    from scipy.spatial import cKDTree

    pred = np.asarray(pred_xy, dtype=np.float64)
    cand = np.asarray(candidate_xy, dtype=np.float64)
    target = np.asarray(target_index, dtype=np.int64)
    if pred.ndim != 2 or pred.shape[1] != 2 or cand.ndim != 2 or cand.shape[1] != 2:
        raise ValueError(f"pred_xy and candidate_xy must have shape (N, 2) and (L, 2), got {pred.shape}, {cand.shape}")
    if target.shape != (len(pred),):
        raise ValueError(f"target_index must have shape ({len(pred)},), got {target.shape}")
    if not np.isfinite(pred).all():
        raise ValueError("pred_xy holds NaN or infinite values")
    if len(cand) == 0:
        raise ValueError("no candidates to rank")
    tree = cKDTree(cand)
    kk = min(int(k), len(cand))
    _, topk = tree.query(pred, k=kk)
    topk = np.asarray(topk, dtype=np.int64).reshape(len(pred), kk)
    ranks = np.full(len(pred), np.inf)
    ok = (target >= 0) & (target < len(cand))
    if ok.any():
        d_target = np.linalg.norm(pred[ok] - cand[target[ok]], axis=1)
        # the target itself is within its own distance; a tiny relative slack absorbs rounding
        counts = tree.query_ball_point(pred[ok], r=d_target * (1 + 1e-12) + 1e-9, return_length=True)
        ranks[ok] = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
    return ranks, topk


def pointer_ranks(window_index, window_probs, pred_xy, candidate_xy, target_index, *,
                  point_ranks=None) -> np.ndarray:
    """Rank candidates with the history pointer (`NextLocMoEConfig.history_pointer`): the places of a sample's windows
    first, by pointer mass (a place's mass is the sum over its visits), then every other candidate by its distance from
    the predicted point (as [`kdtree_ranks`]). Ties count against the model in both parts. Vectorised: no loop over
    samples.

    Args:
        window_index (`(N, W)` int): location-table rows of the window visits, -1 on padding.
        window_probs (`(N, W)`): the pointer's probability of each visit (the "elsewhere" column dropped).
        pred_xy (`(N, 2)`), candidate_xy (`(L, 2)`), target_index (`(N,)`): as for [`kdtree_ranks`].
        point_ranks (`(N,)`, *optional*): the ranks [`kdtree_ranks`] gives for the same points, targets and
            candidates, when the caller has them already (computed here otherwise).

    Returns:
        `(N,)` float: 1-based rank of the target (`inf` when it is not a candidate).
    """
    window_index = np.asarray(window_index, dtype=np.int64)
    probs = np.asarray(window_probs, dtype=np.float64)
    pred = np.asarray(pred_xy, dtype=np.float64)
    cand = np.asarray(candidate_xy, dtype=np.float64)
    target = np.asarray(target_index, dtype=np.int64)
    n = len(target)
    if window_index.ndim != 2 or window_index.shape[0] != n or probs.shape != window_index.shape:
        raise ValueError(f"window_index and window_probs must both have shape ({n}, W), got {window_index.shape} and "
                         f"{probs.shape}")
    if (window_index >= len(cand)).any():
        raise ValueError(f"window_index holds rows beyond the {len(cand)} candidates")
    if point_ranks is None:
        point_ranks, _ = kdtree_ranks(pred, cand, target, k=1)
    point_ranks = np.asarray(point_ranks, dtype=np.float64)
    num = len(cand)
    real = window_index >= 0
    rows = np.broadcast_to(np.arange(n)[:, None], window_index.shape)[real]
    keys, inverse = np.unique(rows * num + window_index[real], return_inverse=True)
    mass = np.bincount(inverse, weights=probs[real], minlength=len(keys))
    place_rows, places = keys // num, keys % num
    n_places = np.bincount(place_rows, minlength=n)

    ok = (target >= 0) & (target < num)
    target_keys = np.arange(n) * num + np.where(ok, target, 0)
    if len(keys):
        at = np.minimum(np.searchsorted(keys, target_keys), len(keys) - 1)
        in_window = ok & (keys[at] == target_keys)
        target_mass = np.where(in_window, mass[at], np.inf)
    else:
        in_window, target_mass = np.zeros(n, dtype=bool), np.full(n, np.inf)
    window_rank = np.bincount(place_rows, weights=mass >= target_mass[place_rows], minlength=n)

    # outside the windows: after the window's places, by distance among the other candidates
    d_target = np.linalg.norm(pred - cand[np.where(ok, target, 0)], axis=1)
    d_place = np.linalg.norm(pred[place_rows] - cand[places], axis=1)
    nearer = d_place <= d_target[place_rows] * (1 + 1e-12) + 1e-9
    n_nearer = np.bincount(place_rows, weights=nearer, minlength=n)
    outside_rank = n_places + point_ranks - n_nearer
    ranks = np.where(in_window, window_rank, outside_rank).astype(np.float64)
    ranks[~ok] = np.inf
    return ranks


# ---------------------------------------------------------------------------------------------------------------------
# model


def _tokenize(tokenizer, text: str) -> list[int]:
    if tokenizer is None:  # the tiny backbone: UTF-8 bytes
        return list(text.encode("utf-8"))
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _tiny_backbone_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=False)


def build_model(recipe: NextLocMoERecipe, coord_mean, coord_std, *, progress: bool = True):
    """A fresh `NextLocMoEForNextLocation` for `recipe`: the backbone (resolved and truncated, or the tiny one), the
    prompt tokens, the function-expert initialisation and the persona vectors from the backbone's static token
    embeddings. Returns `(model, backbone_source)`."""
    kwargs = recipe.model_config_kwargs()
    kwargs.update(coord_mean=[float(v) for v in coord_mean], coord_std=[float(v) for v in coord_std],
                  function_names=list(FUNCTION_DESCRIPTIONS), role_names=list(ROLE_DESCRIPTIONS))
    if recipe.backbone == TINY_BACKBONE:
        tokenizer, source = None, TINY_BACKBONE
        backbone_config = _tiny_backbone_config()
        if recipe.num_backbone_layers is not None:
            kwargs["num_backbone_layers"] = recipe.num_backbone_layers
        config = NextLocMoEConfig(backbone_config=backbone_config.to_dict(),
                                  prompt_token_ids=_tokenize(None, recipe.prompt), **kwargs)
        model = NextLocMoEForNextLocation(config)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .pretrained import resolve_model

        source = resolve_model(recipe.backbone, progress=progress)
        tokenizer = AutoTokenizer.from_pretrained(source)
        lm = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        model = NextLocMoEForNextLocation.from_backbone(
            lm, num_backbone_layers=recipe.num_backbone_layers, prompt_token_ids=_tokenize(tokenizer, recipe.prompt),
            **kwargs)
        del lm
    with torch.no_grad():
        functions = model.description_vectors([_tokenize(tokenizer, t) for t in FUNCTION_DESCRIPTIONS.values()],
                                              max_tokens=60)
        roles = model.description_vectors([_tokenize(tokenizer, t) for t in ROLE_DESCRIPTIONS.values()],
                                          max_tokens=50)
        model.set_semantic_vectors(functions, roles)
    return model, source


# ---------------------------------------------------------------------------------------------------------------------
# training


@dataclass
class NextLocMoETrainingResult:
    """What [`train_nextlocmoe`] returns: the trained model (eval mode), the run folder, `run_info.json`'s content,
    Trainer's log history and the evaluation report (when the recipe evaluates)."""

    model: NextLocMoEForNextLocation
    output_dir: Path
    run_info: dict
    history: list[dict] = field(default_factory=list)
    report: dict | None = None


def train_nextlocmoe(
    data_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    recipe: NextLocMoERecipe | str | os.PathLike | None = None,
    **overrides,
) -> NextLocMoETrainingResult:
    """Train NextLocMoE on a prepared check-in dataset and save a self-contained run folder.

    Args:
        data_dir (`str` or `os.PathLike`): prepared check-in dataset (train and validation samples are used), or a
            prepared grid dataset: it is read as visits at cell centres ([`checkin_view`], kept in
            `output_dir/grid_visits`), and the model predicts the next visited cell.
        output_dir (`str` or `os.PathLike`): run folder (created).
        recipe ([`NextLocMoERecipe`], a YAML path, or `None`): hyper-parameters (defaults: the class defaults).
        **overrides: recipe keys that replace the recipe's values (e.g. `max_epochs=2`).
    """
    if isinstance(recipe, NextLocMoERecipe):
        recipe = dataclasses.replace(recipe, **overrides) if overrides else recipe
    else:
        recipe = load_recipe(recipe, **overrides)
    threads = torch.get_num_threads()
    if recipe.num_threads is not None:
        torch.set_num_threads(recipe.num_threads)
    try:
        return _train(data_dir, output_dir, recipe)
    finally:
        torch.set_num_threads(threads)


def _train(data_dir, output_dir, recipe: NextLocMoERecipe) -> NextLocMoETrainingResult:
    data = checkin_view(data_dir, output_dir)  # a grid dataset: its visits at cell centres, kept in the run folder
    for split in ("train", "validation"):
        if split not in data.splits("samples"):
            raise ValueError(f"{data.path}: no {split!r} split of samples; available: {data.splits('samples')}")
    recipe = dataclasses.replace(recipe, data=str(data_dir), output_dir=str(output_dir))
    windows = {"history_length": recipe.history_length, "current_length": recipe.current_length}
    train_all = build_nextlocmoe_samples(data, "train", **windows)
    if len(train_all) == 0:
        raise ValueError(f"{data.path}: the train split has no samples")
    validation_all = build_nextlocmoe_samples(data, "validation", **windows)
    if len(validation_all) == 0:
        raise ValueError(f"{data.path}: the validation split has no samples")
    train = train_all.subset(_random_rows(len(train_all), recipe.max_train_samples, recipe.seed))
    validation = validation_all.subset(_random_rows(len(validation_all), recipe.max_validation_samples, recipe.seed + 1))
    # normalisation statistics of the training targets (the paper fixes them per dataset)
    coord_mean, coord_std = _coordinate_statistics(data)

    set_seed(recipe.seed)
    model, source = build_model(recipe, coord_mean, coord_std, progress=recipe.progress)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps_per_epoch = math.ceil(len(train) / (recipe.batch_size * recipe.gradient_accumulation_steps))
    args = epoch_training_arguments(
        out, recipe, warmup_steps=int(round(recipe.warmup_ratio * steps_per_epoch * recipe.max_epochs)),
        gradient_accumulation_steps=recipe.gradient_accumulation_steps, bf16=recipe.bf16)
    throughput = _ThroughputCallback()
    trainer = Trainer(model=model, args=args, train_dataset=_IndexDataset(train),
                      eval_dataset=_IndexDataset(validation), data_collator=_collate, callbacks=[throughput])
    trainer.remove_callback(PrinterCallback)
    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        result = trainer.train()
    finally:
        if bars_were_enabled:
            hf_logging.enable_progress_bar()
    trainer.save_state()
    model = trainer.model.eval()
    history = list(trainer.state.log_history)
    info = {
        "method": "nextlocmoe",
        "name": "nextlocmoe",
        "backbone": recipe.backbone,  # as the user named it (an alias or Hub id; no local path in a shared card)
        "backbone_source": source,
        "num_backbone_layers": model.config.backbone_config.num_hidden_layers,
        "moe_layers": list(model.config.moe_layers),
        "routing": model.config.routing,
        "load_balance_weight": model.config.load_balance_weight,
        "predict_offset": model.config.predict_offset,
        "history_pointer": model.config.history_pointer,
        "data": str(Path(data_dir).resolve()),
        **({"grid_visits": str(data.path.resolve())} if data.path.resolve() != Path(data_dir).resolve() else {}),
        "num_locations": int(data.table("locations").num_rows),
        "train_samples": len(train),
        "train_samples_available": len(train_all),
        "validation_samples": len(validation),
        "coord_mean": [float(v) for v in coord_mean],
        "coord_std": [float(v) for v in coord_std],
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "epochs": recipe.max_epochs,
        "best_eval_loss": trainer.state.best_metric,
        "global_step": trainer.state.global_step,
        "train_seconds": round(throughput.seconds, 3),
        "train_samples_per_second": (round(throughput.epochs * len(train) / throughput.seconds, 2)
                                     if throughput.seconds else None),
        "train_metrics": dict(result.metrics),
        "metrics": {},
    }
    if trainer.is_world_process_zero():
        _save_model(model, out / "model")
        (out / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False), encoding="utf-8")
        write_json_atomic(info, out / "run_info.json")
        _write_card(out, info, None)
        logger.info("wrote NextLocMoE run %s", out)
    report = None
    if recipe.evaluate and trainer.is_world_process_zero():
        report = evaluate_nextlocmoe(out, data.path, split=recipe.eval_split, batch_size=recipe.eval_batch_size,
                                     max_samples=recipe.eval_max_samples, model=model,
                                     progress=recipe.progress)
        info = json.loads((out / "run_info.json").read_text(encoding="utf-8"))
    return NextLocMoETrainingResult(model=model, output_dir=out, run_info=info, history=history, report=report)


# ---------------------------------------------------------------------------------------------------------------------
# evaluation


def _users_archetypes(data: PreparedDataset) -> dict[str, str] | None:
    """user_id -> archetype from the dataset's optional `users` table (the synthetic city writes one)."""
    try:
        table = data.table("users")
    except (FileNotFoundError, KeyError, ValueError, OSError):
        return None
    if table is None or "archetype" not in table.column_names:
        return None
    return dict(zip(table.column("user_id").to_pylist(), table.column("archetype").to_pylist(), strict=True))


def evaluate_nextlocmoe(
    run_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    split: str = "test",
    *,
    batch_size: int = 64,
    max_samples: int | None = None,
    model: NextLocMoEForNextLocation | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    normalize_per_city: bool = False,
    write: bool = True,
    slice_by: str | list[str] | None = None,
) -> dict:
    """Predict the next point of every sample of `split`, rank every location of the table by its distance from it
    (KD-tree), and score beside the baselines on the same samples.

    Besides the ranking metrics: `distance_m` (mean great-circle distance between the predicted point and the target,
    metres) and `median_distance_m`. The report's `routing` holds the mean role-expert weights overall and, when the
    dataset has a `users` table with an `archetype` column (the synthetic city), per archetype. Every result (model,
    baselines, `nearest`) has `"slices"`: the ranking metrics on the long-tail targets and on each value of each
    `slice_by` check-in column (`train.evaluate.sample_slices`).

    Args:
        run_dir (`str` or `os.PathLike`): a run folder of [`train_nextlocmoe`].
        data_dir (`str` or `os.PathLike`): the prepared check-in dataset, or a grid dataset (read as its visits at
            cell centres, [`checkin_view`]; kept in `run_dir/grid_visits`, or a temporary folder with `write=False`).
        split (`str`, *optional*, defaults to `"test"`): the split to score.
        batch_size (`int`, *optional*, defaults to 64): samples per forward pass.
        max_samples (`int`, *optional*): score only the first `max_samples` samples of the split (model and
            baselines), as `mobility evaluate --max-samples` does for every model.
        model (`NextLocMoEForNextLocation`, *optional*): use this model instead of loading `run_dir/model`.
        device (`str` or `torch.device`, *optional*): where to run (default: CUDA when available, else CPU).
        progress (`bool`, *optional*, defaults to `False`): a progress bar over the batches.
        normalize_per_city (`bool`, *optional*, defaults to `False`): z-score coordinates with the statistics of this
            dataset's training targets instead of those the model was trained with (zero-shot transfer to another
            city: the model sees every city in its own normalised frame; no label of the new city is used). The
            report records the statistics used.
        write (`bool`, *optional*, defaults to `True`): write the report to `run_dir/metrics.json` and refresh the
            run's `run_info.json` and model card (turn off to score another city without touching the run).
        slice_by (`str` or `list[str]`, *optional*): check-in column(s) to slice the metrics by, e.g. `"weather"`
            (`mobility evaluate --slice-by`).
    """
    run = Path(run_dir)
    info_file = run / "run_info.json"
    if not info_file.is_file():
        raise FileNotFoundError(f"{run} is not a NextLocMoE run folder (no run_info.json)")
    info = json.loads(info_file.read_text(encoding="utf-8"))
    if info.get("method") != "nextlocmoe":
        raise ValueError(f"{run} is a {info.get('method')!r} run, not a NextLocMoE run")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}")
    scratch = contextlib.ExitStack()
    with scratch:
        # a grid dataset is read as its visits, kept in the run folder (in a temporary folder with write=False)
        data = checkin_view(data_dir, run if write else scratch.enter_context(tempfile.TemporaryDirectory()))
        return _evaluate_loaded(run, info, data, split, batch_size, max_samples, model, device, progress,
                                normalize_per_city, write, slice_by)


def _evaluate_loaded(run, info, data, split, batch_size, max_samples, model, device, progress, normalize_per_city,
                     write, slice_by) -> dict:
    if model is None:
        model = NextLocMoEForNextLocation.from_pretrained(run / "model")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device is not None:
        model = model.to(device)
    model = model.eval()
    config = model.config
    samples = build_nextlocmoe_samples(data, split, history_length=config.history_length,
                                       current_length=config.current_length)
    trained_stats = (list(config.coord_mean), list(config.coord_std))
    if normalize_per_city:
        mean, std = _coordinate_statistics(data)
        config.coord_mean, config.coord_std = [float(v) for v in mean], [float(v) for v in std]
    try:
        return _score(run, info, data, split, samples, model, batch_size, max_samples, progress, trained_stats,
                      normalize_per_city, write, slice_by)
    finally:
        config.coord_mean, config.coord_std = trained_stats


def _coordinate_statistics(data: PreparedDataset) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation (metres, at least 1 m) of the training targets' Web-Mercator coordinates."""
    _, loc_xy = _location_xy(data)
    targets = data.table("samples", "train").column("target_location_id").combine_chunks().cast(pa.string())
    ids = pa.array([str(v) for v in data.table("locations").column("location_id").to_pylist()], type=pa.string())
    index = _index_of(targets, ids)
    if len(index) == 0 or (index < 0).any():
        raise ValueError(f"{data.path}: the training targets give no coordinate statistics")
    xy = loc_xy[index]
    return xy.mean(axis=0), np.maximum(xy.std(axis=0), 1.0)


def _score(run, info, data, split, samples, model, batch_size, max_samples, progress, trained_stats,
           normalize_per_city, write, slice_by=None) -> dict:
    from .evaluate import sample_slices, slice_metrics

    config = model.config
    if len(samples) == 0:
        raise ValueError(f"{data.path}: split {split!r} has no samples")
    if max_samples is not None:
        samples = samples.subset(np.arange(min(int(max_samples), len(samples))))
    slices = sample_slices(data, split, samples.sample_ids, slice_by)  # before predicting: a bad column fails fast
    device = next(model.parameters()).device
    location_ids, loc_xy = _location_xy(data)

    n = len(samples)
    pred = np.empty((n, 2), dtype=np.float64)
    roles = np.zeros((n, len(config.role_names)), dtype=np.float64)
    window_probs = np.zeros(samples.window_index.shape, dtype=np.float64) if config.history_pointer else None
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="NextLocMoE predict", unit="batch")
    start = time.perf_counter()
    with torch.inference_mode():
        for lo in starts:
            rows = np.arange(lo, min(lo + batch_size, n))
            batch = samples.batch(rows)
            batch.pop("labels")
            output = model(**{k: v.to(device) for k, v in batch.items()})
            pred[rows] = output.xy.float().cpu().numpy()
            if output.role_weights is not None:
                roles[rows] = output.role_weights.float().cpu().numpy()
            if window_probs is not None:
                window_probs[rows] = output.pointer_probs[:, :-1].float().cpu().numpy()
    forward_seconds = time.perf_counter() - start
    point_ranks, _ = kdtree_ranks(pred, loc_xy, samples.target_index)
    if window_probs is not None:
        ranks = pointer_ranks(samples.window_index, window_probs, pred, loc_xy, samples.target_index,
                              point_ranks=point_ranks)
    else:
        ranks = point_ranks
    seconds = time.perf_counter() - start
    pred_lon, pred_lat = _inverse_mercator(pred)
    locs = _location_columns(data, location_ids)
    dist = great_circle_m(pred_lat, pred_lon, locs["latitude"][samples.target_index],
                          locs["longitude"][samples.target_index])
    unseen = ~samples.target_seen

    def scored(r: np.ndarray, d: np.ndarray | None) -> dict:
        res = ranking_metrics(r)
        if d is not None:
            res["distance_m"] = float(np.mean(d))
            res["median_distance_m"] = float(np.median(d))
        return res

    model_res = scored(ranks, dist)
    if unseen.any():
        model_res["unseen"] = scored(ranks[unseen], dist[unseen])
    model_res["slices"] = slice_metrics(ranks, slices)
    if window_probs is not None:  # the paper's ranking (the regressed point alone), for comparison
        model_res["point_ranking"] = ranking_metrics(point_ranks)
    report = evaluate_baselines(data, "all", split=split, sample_ids=samples.sample_ids, slice_by=slice_by)
    has_last = samples.last_index >= 0
    last = np.where(has_last, samples.last_index, 0)
    nearest = nearest_location_ranks(last, samples.target_index, locs["latitude"], locs["longitude"])
    nearest[~has_last] = np.inf
    nearest_dist = great_circle_m(locs["latitude"][last], locs["longitude"][last],
                                  locs["latitude"][samples.target_index], locs["longitude"][samples.target_index])
    nearest_res = scored(nearest, nearest_dist)
    if unseen.any():
        nearest_res["unseen"] = scored(nearest[unseen], nearest_dist[unseen])
    nearest_res["slices"] = slice_metrics(nearest, slices)
    report["results"] = {info.get("name", "nextlocmoe"): model_res, **report["results"], "nearest": nearest_res}

    routing: dict[str, Any] = {"roles": list(config.role_names), "overall": roles.mean(axis=0).round(4).tolist()}
    archetypes = _users_archetypes(data)
    if archetypes:
        per = {}
        names = np.array([archetypes.get(u, "unknown") for u in samples.user_ids], dtype=object)
        for name in sorted(set(names.tolist())):
            sel = names == name
            per[name] = {"samples": int(sel.sum()), "weights": roles[sel].mean(axis=0).round(4).tolist()}
        routing["by_archetype"] = per
    report.update(
        run=str(run),
        backbone=info.get("backbone"),
        routing=routing,
        inference={"samples": n, "seconds": round(seconds, 4), "forward_seconds": round(forward_seconds, 4),
                   "predictions_per_second": round(n / seconds, 1) if seconds > 0 else None, "device": str(device),
                   "max_samples": max_samples},
        normalization={"per_city": bool(normalize_per_city), "coord_mean": list(config.coord_mean),
                       "coord_std": list(config.coord_std), "trained_coord_mean": trained_stats[0],
                       "trained_coord_std": trained_stats[1]},
    )
    if write:
        write_json_atomic(report, run / "metrics.json")
        info.setdefault("metrics", {})[split] = model_res
        write_json_atomic(info, run / "run_info.json")
        _write_card(run, info, report)
    logger.info("NextLocMoE on %s: acc@1 %.4f, acc@10 %.4f, mean distance %.0f m over %d samples", split,
                model_res["acc@1"], model_res["acc@10"], model_res["distance_m"], n)
    return report


# ---------------------------------------------------------------------------------------------------------------------
# model card

_CITATION = """\
```bibtex
@article{liu2025nextlocmoe,
  title   = {NextLocMoE: Enhancing Next Location Prediction via Location-Semantics Mixture-of-Experts and
             Personalized Mixture-of-Experts},
  author  = {Liu, Shuai and others},
  journal = {arXiv preprint arXiv:2505.24597},
  year    = {2025}
}
```"""


def build_model_card(info: dict, metrics: dict | None = None, recipe: str | None = None) -> str:
    """The model card (`README.md`) of a NextLocMoE run."""
    from huggingface_hub import ModelCardData

    card_data = ModelCardData(library_name="transformers",
                              tags=["hf-mobility", "mobility", "next-location-prediction", "nextlocmoe",
                                    "mixture-of-experts"])
    parts = [
        f"---\n{card_data.to_yaml()}\n---",
        "",
        f"# {info.get('name', 'nextlocmoe')}",
        "",
        "NextLocMoE ([arXiv 2505.24597](https://arxiv.org/abs/2505.24597)) trained with the `hf-mobility` library: a "
        f"Llama-family backbone (`{info.get('backbone')}`, {info.get('num_backbone_layers')} decoder layers, frozen "
        "but for its norms) fed step features of the last 40 + 5 visits, a location-semantics mixture of experts on "
        "the current visits and a personalised mixture of role experts (LoRA updates of the MLP) in decoder layers "
        f"{info.get('moe_layers')}, routed by `{info.get('routing')}` routing conditioned on a temporal convolution "
        "over the long history. The model regresses the next point; candidates are ranked by their distance from it "
        "(KD-tree), so places never seen in training are ranked too.",
        "",
        "Differences from the published code: the cumulative-probability routing follows the paper's rule (sorted "
        "probabilities, the smallest prefix reaching the threshold, at most `max_experts`, renormalised; the code "
        "fires nearly every expert), attention gets a real causal mask, AdamW with the recipe's schedule replaces "
        "Adam with ReduceLROnPlateau, and the TCN has no weight norm."
        + (f" The loss adds a load-balancing term (weight {info['load_balance_weight']:g}, an hf-mobility choice that "
           "the paper does not have): with the paper's loss alone the router sent every token to one expert."
           if info.get("load_balance_weight") else "")
        + (" The head regresses the step from the last visited place (`predict_offset`, an hf-mobility choice), not "
           "the absolute position." if info.get("predict_offset") else "")
        + (" A history pointer (`history_pointer`, an hf-mobility choice the paper does not have) attends from the "
           "last position to the visits of both windows (plus an 'elsewhere' slot) and is trained by the likelihood "
           "of the visits at the target's coordinates; ranking puts the windows' places first, by pointer mass, and "
           "every other location after them by distance from the regressed point. The evaluation also reports the "
           "paper's ranking by the point alone (`point_ranking` in metrics.json)." if info.get("history_pointer")
           else "")
        + (f" Trained on a grid dataset read as visits at cell centres (consecutive records in one cell are one "
           f"visit; `mobility data grid-visits`, kept in `{Path(info['grid_visits']).name}` of the run's "
           "`grid_visits/`)." if info.get("grid_visits") else ""),
        "",
        "## Training",
        "",
        f"- Data: `{info.get('data')}`",
        f"- Training samples: {info.get('train_samples', 0):,} (of {info.get('train_samples_available', 0):,}); "
        f"validation samples: {info.get('validation_samples', 0):,}",
        f"- Parameters: {info.get('trainable_parameters', 0):,} trainable of {info.get('parameters', 0):,}",
        f"- Training: {info.get('train_seconds')} s, {info.get('train_samples_per_second')} samples/s",
        "",
        "## Evaluation",
        "",
    ]
    if metrics and metrics.get("results"):
        ranked = ("the windows' places by pointer mass, then every other location by distance from the predicted "
                  "point" if info.get("history_pointer") else "every location of the table by distance from the "
                  "predicted point")
        parts += [f"Next-location prediction on the `{metrics.get('split', 'test')}` split (ranking metrics x100; "
                  f"ranked: {ranked}; the baselines are scored on the same samples).", "",
                  format_results_table(metrics), ""]
        model_res = metrics["results"].get(info.get("name", "nextlocmoe"), {})
        point = model_res.get("point_ranking")
        if point:
            parts += [f"The paper's ranking by the regressed point alone: Acc@1 {100 * point['acc@1']:.1f}, Acc@5 "
                      f"{100 * point['acc@5']:.1f}, Acc@10 {100 * point['acc@10']:.1f}, MRR {100 * point['mrr']:.1f}.",
                      ""]
        if "distance_m" in model_res:
            parts += [f"Mean distance between the predicted point and the target: {model_res['distance_m']:,.0f} m "
                      f"(median {model_res['median_distance_m']:,.0f} m).", ""]
    else:
        parts += ["No evaluation was run for this model yet (`mobility evaluate RUN --data DATA` writes one).", ""]
    parts += [
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModel",
        "",
        'model = AutoModel.from_pretrained("path/to/run/model", trust_remote_code=True).eval()',
        "out = model(history_xy=..., history_time=..., history_duration=..., history_mask=...,",
        "            current_xy=..., current_time=..., current_duration=..., current_mask=...)",
        "out.xy  # (batch, 2) predicted Web-Mercator metres; out.role_weights: routing mass per role expert",
        "```",
        "",
    ]
    if recipe:
        parts += ["## Recipe", "", "```yaml", recipe.strip(), "```", ""]
    parts += ["## Citation", "", _CITATION, ""]
    return "\n".join(parts)


def _write_card(run: Path, info: dict, metrics: dict | None) -> None:
    recipe = (run / "recipe.yaml").read_text(encoding="utf-8") if (run / "recipe.yaml").is_file() else None
    write_text_atomic(build_model_card(info, metrics, recipe), run / "README.md")


# ---------------------------------------------------------------------------------------------------------------------
# command line


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """`--config RECIPE.yaml`, `--data`, `--output-dir`, and `--key value` for every recipe key."""
    parser = argparse.ArgumentParser(
        prog=prog or "mobility train nextlocmoe",
        description="Train NextLocMoE (an LLM backbone with a location-semantics and a personalised mixture of "
        "experts) on a prepared check-in dataset (or a grid dataset, read as visits at cell centres), then evaluate it "
        "beside the baselines.",
        allow_abbrev=False,
    )
    helps = {"data": "prepared check-in or grid dataset folder (a grid is converted to visits into the run folder)",
             "output_dir": "run folder (created)",
             "backbone": "causal LM: a folder, an offline alias, a Hub id, or 'tiny'"}
    add_recipe_arguments(parser, NextLocMoERecipe, helps)
    return parser


def parse_recipe(argv: list[str] | None = None, *, required: bool = False) -> NextLocMoERecipe:
    """Parse `argv` into a [`NextLocMoERecipe`] (YAML recipe first, then the command-line overrides); `required=True` also
    demands `--data` and `--output-dir`."""
    needed = {"data": "a prepared check-in dataset folder", "output_dir": "the run folder"} if required else None
    return parse_recipe_args(build_parser(), NextLocMoERecipe, argv, needed)


def main(argv: list[str] | None = None) -> Path:
    """Parse `argv`, train (and evaluate, unless `--evaluate false`), print the results table; returns the run."""
    recipe = parse_recipe(argv, required=True)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = train_nextlocmoe(recipe.data, recipe.output_dir, recipe=recipe)
    info = result.run_info
    print(f"wrote {result.output_dir}: model/, run_info.json, recipe.yaml, README.md"
          + (", metrics.json" if result.report else ""))
    print(f"trained {info['train_samples']:,} samples x {info['epochs']} epochs in {info['train_seconds']} s "
          f"({info['train_samples_per_second']} samples/s)")
    if result.report:
        print(format_results_table(result.report))
        res = result.report["results"][info["name"]]
        print(f"mean distance to the target {res['distance_m']:,.0f} m (median {res['median_distance_m']:,.0f} m); "
              f"{result.report['inference']['predictions_per_second']} predictions/s")
    print(f"load with: AutoModel.from_pretrained('{result.output_dir / 'model'}', trust_remote_code=True)")
    return result.output_dir


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:
        print(f"nextlocmoe: error: {err}", file=sys.stderr)
        sys.exit(2)
