"""Train and evaluate the MHSA next-location predictor (DESIGN §5.3) with `transformers.Trainer`.

The model reads a user's history (the previous 7 days of visits of a prepared check-in dataset) and ranks every
location of the dataset's location table for the next visit. Locations enter either as learned IDs
(`--location-encoder id`, the baseline of "Into the Unknown") or as frozen CaLLiPer embeddings
(`--location-encoder RUN/calliper`, the folder written by `mobility train calliper`): the table is computed by the
CaLLiPer encoder from the coordinates of the dataset's locations, so held-out (unseen) locations get embeddings and
can be predicted.

Copy-paste:

```bash
# demo recipe on the synthetic city (about 2 minutes on 2 CPU cores)
python -m train.mhsa --config train/recipes/mhsa_demo.yaml --data runs/demo/data --output-dir runs/demo/mhsa-id
python -m train.mhsa --config train/recipes/mhsa_demo.yaml --data runs/demo/data \\
    --output-dir runs/demo/mhsa-calliper --location-encoder runs/demo/calliper
# the paper recipe (batch 128, Adam lr 1e-3, wd 1e-6, patience 3, at most 100 epochs, d 128, 6 layers)
python -m train.mhsa --config train/recipes/mhsa_paper.yaml --data DATA --output-dir runs/mhsa --max_epochs 50
```

```python
from train.mhsa import evaluate_mhsa, train_mhsa

result = train_mhsa("runs/demo/data", "runs/mhsa", location_encoder="id", recipe="train/recipes/mhsa_demo.yaml")
report = evaluate_mhsa("runs/mhsa", "runs/demo/data", split="test")   # also written to runs/mhsa/metrics.json
```

A run folder holds `model/` (safetensors + config + the modeling files: it loads with
`AutoModel.from_pretrained(RUN/model, trust_remote_code=True)`), `run_info.json`, `recipe.yaml`,
`trainer_state.json`, `metrics.json` and a model card `README.md`; Trainer's `checkpoint-*` folders (model weights
only) stay beside them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import yaml
from transformers import EarlyStoppingCallback, PrinterCallback, Trainer, TrainerCallback, set_seed
from transformers.utils import logging as hf_logging

from dataset_builders.preprocess import local_time_features
from dataset_builders.publish import PreparedDataset, load_prepared
from modeling_mobility.mhsa import MHSAConfig, MHSAForNextLocation

from .baselines import nearest_location_ranks
from .evaluate import evaluate_baselines, format_results_table, write_json_atomic, write_text_atomic
from .metrics import ranking_metrics, ranks_from_scores
from .recipe import add_recipe_arguments, coerce_fields, epoch_training_arguments, parse_recipe_args, read_recipe

__all__ = [
    "MHSARecipe",
    "MHSASamples",
    "MHSATrainingResult",
    "build_mhsa_samples",
    "build_parser",
    "evaluate_mhsa",
    "load_recipe",
    "location_feature_table",
    "main",
    "score_ranking_model",
    "train_mhsa",
]

logger = logging.getLogger(__name__)

_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
_ENCODING_CHUNK = 65536  # coordinates per call of a location encoder


# ---------------------------------------------------------------------------------------------------------------------
# recipe


@dataclass
class MHSARecipe:
    r"""
    Everything an MHSA run needs; loaded from a YAML recipe and overridden by keyword arguments or `--key value`.

    Args:
        data (`str`, *optional*): prepared check-in dataset folder (`mobility data prepare`).
        output_dir (`str`, *optional*): run folder (created).
        location_encoder (`str`, *optional*, defaults to `"id"`): `"id"` for learned location IDs, or a CaLLiPer
            output folder (frozen location features computed from the coordinates of the location table).
        location_residual (`bool`, *optional*, defaults to `True`): with a CaLLiPer encoder, also learn a residual
            embedding for every location seen in training (see [`MHSAConfig`]; an hf-mobility choice: nearby places
            of the same kind have nearly equal frozen embeddings). `false` = features only, as in the paper's input
            layer.
        history_bias (`bool`, *optional*, defaults to `False`): add the history bias of [`MHSAConfig`] (an
            hf-mobility choice: a learned weighted score from whether, how often and how recently the sample's user
            visited each candidate; applies to unseen locations too). Off in the paper recipe, on in the demo's.
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, hidden_dropout_prob,
        attention_probs_dropout_prob, head_dropout_prob, head_norm, use_user_embedding, use_target_time:
            the architecture, see [`MHSAConfig`] (paper: 128, 6, 8, 256, 0.1, 0.1, 0.1, batch_norm, true, true).
        max_history (`int`, *optional*): keep only the most recent visits of each history (default: all of the
            7-day window).
        batch_size (`int`, *optional*, defaults to 128): training samples per step (paper: 128 for FSQ-NYC).
        eval_batch_size (`int`, *optional*, defaults to 512): samples per evaluation step.
        learning_rate (`float`, *optional*, defaults to 1e-3): Adam learning rate (paper: 1e-3).
        weight_decay (`float`, *optional*, defaults to 1e-6): Adam's L2 weight decay (paper: 1e-6; plain Adam, not
            AdamW, as in the mie-lab code).
        max_epochs (`int`, *optional*, defaults to 100): epoch budget (paper: 100).
        patience (`int`, *optional*, defaults to 3): epochs without a lower validation loss before stopping (paper: 3);
            the best-validation-loss checkpoint is restored.
        lr_scheduler_type (`str`, *optional*, defaults to `"linear"`): `constant`, `constant_with_warmup`, `linear`
            (linear decay to 0 over `max_epochs` after the warmup, as mie-lab's warmup schedule) or `cosine`.
        warmup_epochs (`float`, *optional*, defaults to 2.0): linear warmup length in epochs (paper: 2).
        max_grad_norm (`float`, *optional*, defaults to 1.0): gradient clipping (0 disables).
        seed (`int`, *optional*, defaults to 0): seed of the initialisation and the batch order.
        num_threads (`int`, *optional*): CPU threads torch uses while training and evaluating (restored afterwards;
            default: leave torch's setting). 1 is much faster than 2 on a 2-core machine that is also running other
            work (OpenMP threads then wait on each other: ~1,400 vs ~100-1,100 samples/s for the demo model).
        evaluate (`bool`, *optional*, defaults to `True`): evaluate on `eval_split` after training (writes
            `metrics.json` and the metrics table of the model card).
        eval_split (`str`, *optional*, defaults to `"test"`): split of the final evaluation.
        progress (`bool`, *optional*, defaults to `True`): show Trainer's progress bar.
    """

    data: str | None = None
    output_dir: str | None = None
    location_encoder: str = "id"
    location_residual: bool = True
    history_bias: bool = False
    hidden_size: int = 128
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    intermediate_size: int = 256
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    head_dropout_prob: float = 0.1
    head_norm: str = "batch_norm"
    use_user_embedding: bool = True
    use_target_time: bool = True
    max_history: int | None = None
    batch_size: int = 128
    eval_batch_size: int = 512
    learning_rate: float = 1e-3
    weight_decay: float = 1e-6
    max_epochs: int = 100
    patience: int = 3
    lr_scheduler_type: str = "linear"
    warmup_epochs: float = 2.0
    max_grad_norm: float = 1.0
    seed: int = 0
    num_threads: int | None = None
    evaluate: bool = True
    eval_split: str = "test"
    progress: bool = True

    def __post_init__(self):
        coerce_fields(self)
        for name in ("batch_size", "eval_batch_size", "max_epochs", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"recipe key `{name}` must be a positive integer, got {getattr(self, name)!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"recipe key `num_threads` must be a positive integer or null, got {self.num_threads!r}")
        if self.max_history is not None and self.max_history < 1:
            raise ValueError(f"recipe key `max_history` must be a positive integer or null, got {self.max_history!r}")
        for name in ("learning_rate",):
            if not getattr(self, name) > 0:
                raise ValueError(f"recipe key `{name}` must be > 0, got {getattr(self, name)!r}")
        for name in ("weight_decay", "warmup_epochs", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ValueError(f"recipe key `{name}` must be >= 0, got {getattr(self, name)!r}")
        if self.lr_scheduler_type not in _SCHEDULERS:
            raise ValueError(f"recipe key `lr_scheduler_type` must be one of {list(_SCHEDULERS)}, "
                             f"got {self.lr_scheduler_type!r}")
        if not self.location_encoder:
            raise ValueError("recipe key `location_encoder` must be 'id' or a CaLLiPer folder, got an empty value")

    def model_config_kwargs(self) -> dict[str, Any]:
        """The architecture keys, as [`MHSAConfig`] arguments."""
        keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_dropout_prob",
                "attention_probs_dropout_prob", "head_dropout_prob", "head_norm", "use_user_embedding",
                "use_target_time", "history_bias")
        return {k: getattr(self, k) for k in keys}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_recipe(path: str | os.PathLike | None = None, **overrides) -> MHSARecipe:
    """Load a YAML recipe (optional) and apply keyword overrides; unknown keys raise a `ValueError`."""
    return read_recipe(MHSARecipe, path, overrides)


# ---------------------------------------------------------------------------------------------------------------------
# data


@dataclass
class MHSASamples:
    """The samples of one split as flat arrays (histories concatenated; `offsets[i]:offsets[i + 1]` is sample `i`).

    Args:
        sample_ids (`np.ndarray` `(N,)` int64), user_index (`(N,)` int64; 0 = unknown user), offsets (`(N + 1,)`),
        history_index (`(M,)` int32 location-table rows), history_time (`(M, 3)` int8 hour, quarter, weekday),
        target_index (`(N,)` int64 location-table rows), target_time (`(N, 3)` int64), target_seen (`(N,)` bool).
    """

    sample_ids: np.ndarray
    user_index: np.ndarray
    offsets: np.ndarray
    history_index: np.ndarray
    history_time: np.ndarray
    target_index: np.ndarray
    target_time: np.ndarray
    target_seen: np.ndarray

    def __len__(self) -> int:
        return len(self.sample_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def batch(self, rows) -> dict[str, torch.Tensor]:
        """A right-padded batch (the keyword arguments of `MHSAForNextLocation.forward`, with `labels`)."""
        rows = np.asarray(rows, dtype=np.int64)
        starts, lengths = self.offsets[rows], self.lengths[rows]
        width = int(lengths.max())
        steps = np.arange(width)
        valid = steps[None, :] < lengths[:, None]  # (B, T)
        flat = np.where(valid, starts[:, None] + steps[None, :], 0)  # (B, T) positions in the flat arrays
        input_ids = np.where(valid, self.history_index[flat], 0).astype(np.int64)
        time_ids = np.where(valid[..., None], self.history_time[flat], 0).astype(np.int64)
        return {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(valid.astype(np.int64)),
            "time_ids": torch.from_numpy(time_ids),
            "user_ids": torch.from_numpy(self.user_index[rows]),
            "target_time_ids": torch.from_numpy(self.target_time[rows]),
            "labels": torch.from_numpy(self.target_index[rows]),
        }


def _time_ids(timestamps: np.ndarray, tz_offset_min: np.ndarray, day0_weekday: int) -> np.ndarray:
    _, hour, minute, weekday = local_time_features(timestamps, tz_offset_min, day0_weekday)
    return np.stack([hour, (minute % 60) // 15, weekday], axis=-1).astype(np.int64)


def _index_of(values: pa.Array, vocabulary: pa.Array) -> np.ndarray:
    """Positions of `values` in `vocabulary` (-1 when absent), computed in Arrow."""
    found = pc.index_in(values, value_set=vocabulary)
    return pc.fill_null(found, -1).to_numpy(zero_copy_only=False).astype(np.int64)


def build_mhsa_samples(
    data: PreparedDataset,
    split: str,
    location_ids,
    user_ids,
    *,
    max_history: int | None = None,
) -> MHSASamples:
    """Turn the samples of `split` into [`MHSASamples`] with the given vocabularies (vectorised in Arrow/numpy).

    Args:
        data (`PreparedDataset`): a prepared check-in dataset.
        split (`str`): `train`, `validation` or `test`.
        location_ids (sequence of `str`): the location vocabulary (row `i` = `location_ids[i]`); a history or target
            location outside it raises a `ValueError`.
        user_ids (sequence of `str`): the user vocabulary; other users get the unknown-user row 0.
        max_history (`int`, *optional*): keep only the most recent visits of every history.
    """
    if split not in data.splits("samples"):
        raise ValueError(f"{data.path}: no split {split!r}; available: {data.splits('samples')}")
    table = data.table("samples", split)
    day0 = int(data.metadata.get("day0_weekday", 3))
    locations = pa.array([str(v) for v in location_ids], type=pa.string())
    users = pa.array([str(v) for v in user_ids], type=pa.string())

    history = table.column("history_location_ids").combine_chunks()
    lengths = pc.list_value_length(history).to_numpy(zero_copy_only=False).astype(np.int64)
    if table.num_rows and lengths.min() < 1:
        raise ValueError(f"{data.path}: split {split!r} has samples with an empty history")
    history_index = _index_of(pc.list_flatten(history), locations)
    target_index = _index_of(table.column("target_location_id").combine_chunks(), locations)
    for name, index in (("history", history_index), ("target", target_index)):
        if (index < 0).any():
            raise ValueError(
                f"{data.path}: {int((index < 0).sum())} {name} location(s) of split {split!r} are not in the model's "
                "location vocabulary (a model trained on another dataset?)"
            )
    timestamps = pc.list_flatten(table.column("history_timestamps").combine_chunks()).to_numpy(zero_copy_only=False)
    tz = pc.list_flatten(table.column("history_tz_offset_min").combine_chunks()).to_numpy(zero_copy_only=False)
    history_time = _time_ids(timestamps, tz, day0)
    target_time = _time_ids(
        table.column("target_timestamp").to_numpy(), table.column("target_tz_offset_min").to_numpy(), day0
    )
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    if max_history is not None and (lengths > max_history).any():
        # keep the last `max_history` visits of each history
        row = np.repeat(np.arange(len(lengths)), lengths)
        from_end = offsets[row + 1] - 1 - np.arange(len(history_index))
        keep = from_end < max_history
        history_index, history_time = history_index[keep], history_time[keep]
        lengths = np.minimum(lengths, max_history)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return MHSASamples(
        sample_ids=table.column("sample_id").to_numpy().astype(np.int64),
        user_index=_index_of(table.column("user_id").combine_chunks().cast(pa.string()), users) + 1,
        offsets=offsets,
        history_index=history_index.astype(np.int32),  # compact: histories are the bulk of the memory
        history_time=history_time.astype(np.int8),
        target_index=target_index,
        target_time=target_time,
        target_seen=table.column("target_seen").to_numpy(zero_copy_only=False).astype(bool),
    )


class _IndexDataset(torch.utils.data.Dataset):
    """Sample positions as examples; [`_collate`] gathers and pads the whole batch at once with `samples.batch(rows)`
    (any samples object with `__len__` and `batch`: [`MHSASamples`], `train.nextlocmoe.NextLocMoESamples`)."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"row": int(index), "samples": self.samples}


def _collate(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return features[0]["samples"].batch([f["row"] for f in features])


def location_feature_table(location_encoder, data: PreparedDataset) -> tuple[np.ndarray, str]:
    """The frozen feature table `(num_locations, dim)` of the dataset's locations, and a description of its source.

    `location_encoder` is a CaLLiPer output folder (loaded with `AutoModel.from_pretrained(folder,
    trust_remote_code=True)`), an object with a `get_location_embeddings(coordinates)` method (`(N, 2)` longitude,
    latitude in degrees -> `(N, dim)`), or an array `(num_locations, dim)` in the order of the location table.
    """
    locations = data.table("locations")
    n = locations.num_rows
    source: str
    if isinstance(location_encoder, (str, os.PathLike)):
        folder = Path(location_encoder)
        if not (folder / "config.json").is_file():
            raise ValueError(
                f"`location_encoder` {str(location_encoder)!r} must be 'id' or a CaLLiPer model folder with a "
                "config.json (the output of `mobility train calliper`)"
            )
        from transformers import AutoModel

        import modeling_mobility  # noqa: F401  (registers the library's Auto classes)

        encoder = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        source = str(folder.resolve())
    elif hasattr(location_encoder, "get_location_embeddings"):
        encoder, source = location_encoder, f"<{type(location_encoder).__name__}>"
    else:
        table = np.asarray(location_encoder.detach().cpu() if torch.is_tensor(location_encoder) else location_encoder,
                           dtype=np.float32)
        if table.ndim != 2 or table.shape[0] != n:
            raise ValueError(f"a feature array `location_encoder` must have shape ({n}, dim), got {table.shape}")
        encoder, source = None, "<array>"
    if encoder is not None:
        if not hasattr(encoder, "get_location_embeddings"):
            raise ValueError(f"{source}: the loaded model ({type(encoder).__name__}) has no get_location_embeddings")
        coords = np.stack([locations.column("longitude").to_numpy(), locations.column("latitude").to_numpy()], axis=1)
        parts = []
        with torch.no_grad():
            for lo in range(0, n, _ENCODING_CHUNK):
                out = encoder.get_location_embeddings(coords[lo : lo + _ENCODING_CHUNK])
                parts.append(np.asarray(out.detach().cpu().float() if torch.is_tensor(out) else out, dtype=np.float32))
        table = np.concatenate(parts, axis=0)
        if table.ndim != 2 or table.shape[0] != n:
            raise ValueError(f"{source}: get_location_embeddings returned shape {table.shape} for {n} locations")
    if not np.isfinite(table).all():
        raise ValueError(f"{source}: the location feature table contains NaN or infinite values")
    return table, source


# ---------------------------------------------------------------------------------------------------------------------
# training


@dataclass
class MHSATrainingResult:
    """What [`train_mhsa`] returns.

    Args:
        model (`MHSAForNextLocation`): the restored best model (lowest validation loss), in eval mode.
        output_dir (`Path`): the run folder.
        run_info (`dict`): the content of `run_info.json`.
        history (`list[dict]`): Trainer's log history (per-epoch `loss`, `eval_loss`, ...).
        best_epoch (`int`): epoch of the restored model.
        stopped_early (`bool`): whether early stopping ended training before `max_epochs`.
        report (`dict`, *optional*): the evaluation report when the recipe asked for one.
    """

    model: MHSAForNextLocation
    output_dir: Path
    run_info: dict
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False
    report: dict | None = None


class _ThroughputCallback(TrainerCallback):
    """Seconds spent in training epochs (evaluation excluded), for a samples/s figure."""

    def __init__(self):
        self.seconds = 0.0
        self.epochs = 0
        self._start: float | None = None

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self.epochs += 1
            self._start = None
        return control


def _run_name(source: str) -> str:
    if source == "id":
        return "mhsa-id"
    info = Path(source) / "run_info.json"
    try:
        method = json.loads(info.read_text(encoding="utf-8")).get("method") if info.is_file() else None
    except (OSError, ValueError):
        method = None
    return "mhsa-calliper" if method == "calliper" or "calliper" in source.lower() else "mhsa-features"


def train_mhsa(
    data_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    location_encoder: Any = None,
    recipe: MHSARecipe | str | os.PathLike | None = None,
    **overrides,
) -> MHSATrainingResult:
    """Train an [`MHSAForNextLocation`] on a prepared check-in dataset and save a self-contained run folder.

    Args:
        data_dir (`str` or `os.PathLike`): prepared check-in dataset (train and validation samples are used).
        output_dir (`str` or `os.PathLike`): run folder (created; Trainer checkpoints go there too).
        location_encoder (*optional*): `"id"` (learned IDs), a CaLLiPer folder, an object with
            `get_location_embeddings`, or a feature array `(num_locations, dim)` in location-table order. Defaults to
            the recipe's value (`"id"`).
        recipe ([`MHSARecipe`], a YAML path, or `None`): hyper-parameters (defaults: the paper recipe).
        **overrides: recipe keys that replace the recipe's values (e.g. `max_epochs=5`).

    Returns:
        [`MHSATrainingResult`]. The run folder holds `model/`, `run_info.json`, `recipe.yaml`, `trainer_state.json`,
        and, when the recipe evaluates, `metrics.json` and the model card `README.md` with the metrics table.
    """
    if isinstance(recipe, MHSARecipe):
        recipe = dataclasses.replace(recipe, **overrides) if overrides else recipe
    else:
        recipe = load_recipe(recipe, **overrides)
    threads = torch.get_num_threads()
    if recipe.num_threads is not None:
        torch.set_num_threads(recipe.num_threads)
    try:
        return _train_mhsa(data_dir, output_dir, location_encoder, recipe)
    finally:
        torch.set_num_threads(threads)


def _train_mhsa(data_dir, output_dir, location_encoder, recipe: MHSARecipe) -> MHSATrainingResult:
    if location_encoder is None:
        location_encoder = recipe.location_encoder
    if isinstance(location_encoder, (str, os.PathLike)) and str(location_encoder) != "id":
        location_encoder = str(location_encoder)
    data = load_prepared(data_dir)
    if data.kind != "checkins":
        raise ValueError(f"{data.path}: MHSA needs a check-in dataset, got kind {data.kind!r}")
    for split in ("train", "validation"):
        if split not in data.splits("samples"):
            raise ValueError(f"{data.path}: no {split!r} split of samples; available: {data.splits('samples')}")
    out = Path(output_dir)
    recorded = location_encoder if isinstance(location_encoder, str) else None  # objects: set below
    recipe = dataclasses.replace(recipe, data=str(data_dir), output_dir=str(output_dir),
                                 location_encoder=recorded or recipe.location_encoder)

    # vocabularies: every location of the table (so unseen ones can be candidates), the training users
    location_ids = data.table("locations").column("location_id").to_pylist()
    train_table = data.table("samples", "train")
    if train_table.num_rows == 0:
        raise ValueError(f"{data.path}: the train split has no samples")
    user_ids = sorted(set(pc.unique(train_table.column("user_id")).to_pylist()))
    train = build_mhsa_samples(data, "train", location_ids, user_ids, max_history=recipe.max_history)
    validation = build_mhsa_samples(data, "validation", location_ids, user_ids, max_history=recipe.max_history)
    if len(validation) == 0:
        raise ValueError(f"{data.path}: the validation split has no samples (needed for early stopping)")

    use_ids = isinstance(location_encoder, str) and location_encoder == "id"
    set_seed(recipe.seed)
    if use_ids:
        features, source = None, "id"
        config = MHSAConfig(location_ids=location_ids, user_ids=user_ids, location_encoder="id",
                            **recipe.model_config_kwargs())
    else:
        features, source = location_feature_table(location_encoder, data)
        recipe = dataclasses.replace(recipe, location_encoder=source)
        config = MHSAConfig(location_ids=location_ids, user_ids=user_ids, location_encoder="features",
                            location_feature_dim=int(features.shape[1]), location_features_source=source,
                            location_residual=recipe.location_residual, **recipe.model_config_kwargs())
    out.mkdir(parents=True, exist_ok=True)
    model = MHSAForNextLocation(config)
    trained = np.zeros(len(location_ids), dtype=bool)
    trained[train.history_index] = True
    trained[train.target_index] = True
    if use_ids:
        model.set_candidate_mask(trained)  # untrained ID rows are never predicted
    else:
        model.set_location_features(features)
        model.fit_feature_standardization(trained)  # statistics of the locations seen in training only
        if model.location_residuals is not None:
            model.set_residual_mask(trained)  # unseen locations keep a zero residual: features only
        # While training, only the locations of the training samples are candidates: the others do not exist yet
        # (inductive setting) and must not be taught to score low as constant negatives. All are candidates after.
        model.set_candidate_mask(trained)

    steps_per_epoch = math.ceil(len(train) / recipe.batch_size)
    warmup_steps = int(round(recipe.warmup_epochs * steps_per_epoch))
    # BatchNorm in the head cannot train on a last batch of one sample
    drop_last = config.head_norm == "batch_norm" and len(train) % recipe.batch_size == 1
    args = epoch_training_arguments(out, recipe, warmup_steps=warmup_steps, save_total_limit=2,
                                    dataloader_drop_last=drop_last)
    # plain Adam with L2 weight decay, as the mie-lab code (Trainer's default would be AdamW)
    optimizer = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad], lr=recipe.learning_rate, weight_decay=recipe.weight_decay
    )
    throughput = _ThroughputCallback()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_IndexDataset(train),
        eval_dataset=_IndexDataset(validation),
        data_collator=_collate,
        callbacks=[throughput, EarlyStoppingCallback(early_stopping_patience=recipe.patience)],
        optimizers=(optimizer, None),
    )
    trainer.remove_callback(PrinterCallback)
    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no per-checkpoint "Writing model shards" bars
    try:
        result = trainer.train()
    finally:
        if bars_were_enabled:
            hf_logging.enable_progress_bar()
    trainer.save_state()
    model = trainer.model.eval()
    if not use_ids:
        model.set_candidate_mask(np.ones(len(location_ids), dtype=bool))  # every location with features is ranked

    history = list(trainer.state.log_history)
    epochs_run = max((int(round(e.get("epoch", 0))) for e in history), default=0)
    best_step = trainer.state.best_global_step
    best_epoch = int(math.ceil(best_step / steps_per_epoch)) if best_step else epochs_run
    trained_samples = throughput.epochs * len(train)
    info = {
        "method": "mhsa",
        "name": _run_name(source),
        "location_encoder": source,
        "location_residual": bool(config.location_encoder == "features" and config.location_residual),
        "data": str(data.path.resolve()),
        "num_locations": len(location_ids),
        "num_trained_locations": int(trained.sum()),
        "num_users": len(user_ids),
        "train_samples": len(train),
        "validation_samples": len(validation),
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "epochs": epochs_run,
        "best_epoch": best_epoch,
        "best_eval_loss": trainer.state.best_metric,
        "stopped_early": epochs_run < recipe.max_epochs,
        "global_step": trainer.state.global_step,
        "train_seconds": round(throughput.seconds, 3),
        "train_samples_per_second": round(trained_samples / throughput.seconds, 1) if throughput.seconds else None,
        "train_metrics": dict(result.metrics),
        "metrics": {},
    }
    if trainer.is_world_process_zero():
        _save_model(model, out / "model")
        (out / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False), encoding="utf-8")
        write_json_atomic(info, out / "run_info.json")
        _write_card(out, info, None)
        logger.info("wrote MHSA run %s (best epoch %d of %d)", out, best_epoch, epochs_run)
    report = None
    if recipe.evaluate and trainer.is_world_process_zero():
        report = evaluate_mhsa(out, data.path, split=recipe.eval_split, batch_size=recipe.eval_batch_size, model=model)
        info = json.loads((out / "run_info.json").read_text(encoding="utf-8"))
    return MHSATrainingResult(model=model, output_dir=out, run_info=info, history=history, best_epoch=best_epoch,
                              stopped_early=info["stopped_early"], report=report)


def _save_model(model: MHSAForNextLocation, folder: Path) -> None:
    """`save_pretrained` into a temporary sibling, then swap it in (a crash never leaves half a folder)."""
    import shutil

    tmp = folder.with_name(f".{folder.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    old = folder.with_name(f".{folder.name}.old")
    if folder.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old.exists():
        shutil.rmtree(old)


# ---------------------------------------------------------------------------------------------------------------------
# evaluation


def evaluate_mhsa(
    run_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    split: str = "test",
    *,
    batch_size: int = 512,
    model: MHSAForNextLocation | None = None,
    device: str | torch.device | None = None,
    slice_by: str | list[str] | None = None,
) -> dict:
    """Rank every location of the table for every sample of `split`, score with the baselines beside the model.

    Ranks are 1-based, ties broken by location-table order (`train.metrics.ranks_from_scores`); a target the model
    cannot predict (an untrained ID of the ID variant, score `-inf`) counts as a miss (rank `inf`). The baselines of
    `train.evaluate` are scored on exactly the same samples, and so is `nearest` (candidates by distance from the
    last visited location, `train.baselines.nearest_location_ranks`). Metrics over all samples, in `"unseen"` over
    the samples whose target is an unseen (held-out) location when the split has any, and in `"unseen_candidates"`
    over the same samples with only the held-out locations as candidates (the model and `nearest`: "given that the
    next place is a new one, which one?"). Every result (model, baselines, `nearest`) also has `"slices"`: the metrics
    on the long-tail targets and on each value of each `slice_by` check-in column (`train.evaluate.sample_slices`).

    Args:
        run_dir (`str` or `os.PathLike`): a run folder of [`train_mhsa`] (`model/` and `run_info.json`).
        data_dir (`str` or `os.PathLike`): the prepared check-in dataset.
        split (`str`, *optional*, defaults to `"test"`): the split to score.
        batch_size (`int`, *optional*, defaults to 512): samples per forward pass.
        model (`MHSAForNextLocation`, *optional*): use this model instead of loading `run_dir/model`.
        device (`str` or `torch.device`, *optional*): where to score (default: the model's device when `model` is
            given, else CUDA when available, else CPU).
        slice_by (`str` or `list[str]`, *optional*): check-in column(s) to slice the metrics by, e.g.
            `"weather"` (`mobility evaluate --slice-by`).

    Returns:
        `dict`: `{"data", "split", "kind", "results": {model_name: metrics, baseline: metrics, ...}, "run",
        "location_encoder", "inference"}`; also written to `run_dir/metrics.json`, and the run's model card is
        refreshed with the metrics table.
    """
    run = Path(run_dir)
    info_file = run / "run_info.json"
    if not info_file.is_file():
        raise FileNotFoundError(f"{run} is not an MHSA run folder (no run_info.json); train one with train_mhsa")
    info = json.loads(info_file.read_text(encoding="utf-8"))
    if info.get("method") != "mhsa":
        raise ValueError(f"{run} is a {info.get('method')!r} run, not an MHSA run")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}")
    data = load_prepared(data_dir)
    if data.kind != "checkins":
        raise ValueError(f"{data.path}: MHSA is evaluated on check-in data, got kind {data.kind!r}")
    if model is None:
        model = MHSAForNextLocation.from_pretrained(run / "model")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device is not None:
        model = model.to(device)
    model = model.eval()
    config = model.config
    if config.location_ids is None:
        raise ValueError(f"{run}/model has no location vocabulary in its config")
    recipe_max_history = None
    if (run / "recipe.yaml").is_file():
        recipe_max_history = (yaml.safe_load((run / "recipe.yaml").read_text(encoding="utf-8")) or {}).get(
            "max_history"
        )
    samples = build_mhsa_samples(data, split, config.location_ids, config.user_ids or [],
                                 max_history=recipe_max_history)
    if len(samples) == 0:
        raise ValueError(f"{data.path}: split {split!r} has no samples")
    name = info.get("name", "mhsa")
    report, model_res, seconds = score_ranking_model(model, data, split, samples, name=name, batch_size=batch_size,
                                                     slice_by=slice_by)
    report.update(run=str(run), location_encoder=info.get("location_encoder"))
    write_json_atomic(report, run / "metrics.json")
    info.setdefault("metrics", {})[split] = model_res
    write_json_atomic(info, info_file)
    _write_card(run, info, report)
    logger.info("%s on %s: acc@1 %.4f, mrr %.4f over %d samples (%.0f predictions/s)", name, split,
                model_res["acc@1"], model_res["mrr"], len(samples), len(samples) / max(seconds, 1e-9))
    return report


def score_ranking_model(model, data: PreparedDataset, split: str, samples: MHSASamples, *, name: str,
                        batch_size: int = 512, slice_by: str | list[str] | None = None) -> tuple[dict, dict, float]:
    """Rank every location for every sample with a model that takes `samples.batch(rows)` and returns `logits` over
    the location table (MHSA, M3ob), and score it beside the baselines and `nearest` on the same samples.

    A target outside the model's `candidate_mask` is a miss (rank `inf`). Metrics over all samples, `"unseen"` and
    `"unseen_candidates"` as described in [`evaluate_mhsa`], and `"slices"` (`train.evaluate.sample_slices`).

    Returns:
        `(report, model_metrics, seconds)`: the report of `train.evaluate.evaluate_baselines` with the model first and
        `nearest` last in `results` and an `inference` entry; the model's metrics; the seconds spent ranking.
    """
    from .evaluate import sample_slices, slice_metrics

    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}")
    config = model.config
    slices = sample_slices(data, split, samples.sample_ids, slice_by)  # before scoring: a bad column fails fast
    device = next(model.parameters()).device
    mask = model.candidate_mask.cpu().numpy()
    unseen = ~samples.target_seen
    locations = _location_columns(data, config.location_ids)
    heldout = locations["heldout"]
    # "given that the next place is a new one, which?": unseen targets ranked among the held-out locations only
    among_unseen = bool(unseen.any() and heldout.any())
    allowed = mask & heldout
    ranks = np.empty(len(samples), dtype=np.float64)
    among = np.full(len(samples), np.inf)
    start = time.perf_counter()
    with torch.inference_mode():
        for lo in range(0, len(samples), batch_size):
            rows = np.arange(lo, min(lo + batch_size, len(samples)))
            batch = samples.batch(rows)
            labels = batch.pop("labels").numpy()
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu().numpy()
            batch_ranks = ranks_from_scores(logits, labels)
            batch_ranks[~mask[labels]] = np.inf  # a target the model cannot predict is a miss
            ranks[rows] = batch_ranks
            sel = np.flatnonzero(unseen[rows] & allowed[labels]) if among_unseen else np.zeros(0, dtype=np.int64)
            if sel.size:
                restricted = np.where(allowed[None, :], logits[sel], -np.inf)
                among[rows[sel]] = ranks_from_scores(restricted, labels[sel])
    seconds = time.perf_counter() - start
    model_res = ranking_metrics(ranks)
    if unseen.any():
        model_res["unseen"] = ranking_metrics(ranks[unseen])
    if among_unseen:
        model_res["unseen_candidates"] = ranking_metrics(among[unseen])
    model_res["slices"] = slice_metrics(ranks, slices)
    report = evaluate_baselines(data, "all", split=split, sample_ids=samples.sample_ids, slice_by=slice_by)
    last = samples.history_index[samples.offsets[1:] - 1]
    nearest = nearest_location_ranks(last, samples.target_index, locations["latitude"], locations["longitude"])
    nearest_res = ranking_metrics(nearest)
    if unseen.any():
        nearest_res["unseen"] = ranking_metrics(nearest[unseen])
        if heldout.any():
            nearest_res["unseen_candidates"] = ranking_metrics(nearest_location_ranks(
                last[unseen], samples.target_index[unseen], locations["latitude"], locations["longitude"], heldout
            ))
    nearest_res["slices"] = slice_metrics(nearest, slices)
    report["results"] = {name: model_res, **report["results"], "nearest": nearest_res}
    report.update(
        inference={"samples": len(samples), "seconds": round(seconds, 4),
                   "predictions_per_second": round(len(samples) / seconds, 1) if seconds > 0 else None,
                   "device": str(device)},
    )
    return report, model_res, seconds


def _location_columns(data, location_ids) -> dict[str, np.ndarray]:
    """Latitude, longitude and the held-out flag (all false outside the inductive split) of `location_ids`."""
    table = data.table("locations").to_pandas().set_index("location_id")
    missing = [i for i in location_ids if i not in table.index][:5]
    if missing:
        raise ValueError(f"{data.path}: location(s) {missing} of the model are not in the location table")
    table = table.loc[list(location_ids)]
    held = table["heldout"].fillna(False).to_numpy(dtype=bool) if "heldout" in table else np.zeros(len(table), bool)
    return {"latitude": table["latitude"].to_numpy(np.float64), "longitude": table["longitude"].to_numpy(np.float64),
            "heldout": held}


# ---------------------------------------------------------------------------------------------------------------------
# model card

_CITATION = """\
```bibtex
@inproceedings{hong2022howdoyougowhere,
  title     = {How do you go where? Improving next location prediction by learning travel mode information using
               transformers},
  author    = {Hong, Ye and Martin, Henry and Raubal, Martin},
  booktitle = {Proceedings of the 30th International Conference on Advances in Geographic Information Systems
               (SIGSPATIAL '22)},
  year      = {2022}
}

@article{wang2025intotheunknown,
  title   = {Into the Unknown: Applying Inductive Spatial-Semantic Location Embeddings for Predicting Individuals'
             Mobility Beyond Visited Places},
  author  = {Wang, Xinglei and others},
  journal = {arXiv preprint arXiv:2506.14070},
  year    = {2025}
}
```"""


def build_model_card(info: dict, metrics: dict | None = None, recipe: str | None = None) -> str:
    """The model card (`README.md`) of an MHSA run: YAML metadata, description, metrics table, usage, citation."""
    from huggingface_hub import ModelCardData

    card_data = ModelCardData(library_name="transformers", tags=["hf-mobility", "mobility", "next-location-prediction",
                                                                  "mhsa"])
    source = info.get("location_encoder", "id")
    if source == "id":
        encoder = ("learned location ID embeddings (the \"Vanilla-E2E\" baseline); locations never seen in training "
                   "cannot be predicted")
    else:
        encoder = (f"frozen location features (`{source}`, e.g. CaLLiPer embeddings of the locations' coordinates) "
                   "through trainable projections; any location with features, also one never seen in training, can "
                   "be ranked")
        if info.get("location_residual"):
            encoder += (" (plus a learned residual embedding for each location seen in training, an hf-mobility "
                        "choice; unseen locations use their features alone)")
    parts = [
        f"---\n{card_data.to_yaml()}\n---",
        "",
        f"# {info.get('name', 'mhsa')}",
        "",
        "A next-location predictor trained with the `hf-mobility` library: the multi-head self-attention (MHSA) model "
        "of mie-lab (Hong et al., \"How do you go where?\"), as used in \"Into the Unknown\" "
        f"([arXiv 2506.14070](https://arxiv.org/abs/2506.14070)), with {encoder}. Candidates are scored by dot "
        "product with their embeddings.",
        "",
        "## Training",
        "",
        f"- Data: `{info.get('data')}`",
        f"- Locations: {info.get('num_locations', 0):,} ({info.get('num_trained_locations', 0):,} seen in training); "
        f"users: {info.get('num_users', 0):,}",
        f"- Training samples: {info.get('train_samples', 0):,}; "
        f"validation samples: {info.get('validation_samples', 0):,}",
        f"- Epochs: {info.get('epochs')} (best: {info.get('best_epoch')}, validation loss "
        f"{info.get('best_eval_loss') if info.get('best_eval_loss') is None else round(info['best_eval_loss'], 4)})",
        f"- Parameters: {info.get('trainable_parameters', 0):,} trainable of {info.get('parameters', 0):,}",
        "",
        "## Evaluation",
        "",
    ]
    if metrics and metrics.get("results"):
        parts += [f"Next-location prediction on the `{metrics.get('split', 'test')}` split (ranking metrics x100; "
                  "the model ranks every location of the table, the baselines are scored on the same samples).", "",
                  format_results_table(metrics), ""]
    else:
        parts += ["No evaluation was run for this model yet (`train.mhsa.evaluate_mhsa(RUN, DATA)` writes one).", ""]
    parts += [
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModel",
        "",
        'model = AutoModel.from_pretrained("path/to/run/model", trust_remote_code=True).eval()',
        "batch = model.prepare_inputs(",
        '    [["loc_a", "loc_b"]],              # history location ids, oldest first',
        "    [[1333263600, 1333267200]],        # their timestamps (seconds)",
        "    [1333270800],                      # time of the visit to predict",
        '    users=["user_1"],                  # unknown users share one row',
        ")",
        "scores = model(**batch).logits         # (1, num_locations); model.config.location_ids names the columns",
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
    """`--config RECIPE.yaml`, `--data`, `--output-dir`, `--location-encoder`, and `--key value` for every recipe key
    (dashes or underscores); values are converted with the recipe's types."""
    parser = argparse.ArgumentParser(
        prog=prog or "mobility train mhsa",
        description="Train the MHSA next-location predictor (mie-lab; 'Into the Unknown') on a prepared check-in "
        "dataset, with learned location IDs or frozen CaLLiPer embeddings, then evaluate it beside the baselines.",
        allow_abbrev=False,
    )
    helps = {"data": "prepared check-in dataset folder", "output_dir": "run folder (created)",
             "location_encoder": "'id' or a CaLLiPer output folder"}
    add_recipe_arguments(parser, MHSARecipe, helps)
    return parser


def parse_recipe(argv: list[str] | None = None, *, required: bool = False) -> MHSARecipe:
    """Parse `argv` into a [`MHSARecipe`] (YAML recipe first, then the command-line overrides); `required=True` also
    demands `--data` and `--output-dir`."""
    needed = {"data": "a prepared check-in dataset folder", "output_dir": "the run folder"} if required else None
    return parse_recipe_args(build_parser(), MHSARecipe, argv, needed)


def main(argv: list[str] | None = None) -> Path:
    """Parse `argv`, train (and evaluate, unless `--evaluate false`), print the results table; returns the run."""
    recipe = parse_recipe(argv, required=True)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = train_mhsa(recipe.data, recipe.output_dir, recipe=recipe)
    info = result.run_info
    print(f"wrote {result.output_dir}: model/, run_info.json, recipe.yaml, README.md"
          + (", metrics.json" if result.report else ""))
    print(f"trained {info['epochs']} epochs (best {info['best_epoch']}), "
          f"{info['train_samples_per_second']} training samples/s")
    if result.report:
        print(format_results_table(result.report))
        print(f"{result.report['inference']['predictions_per_second']} predictions/s")
    print(f"load with: AutoModel.from_pretrained('{result.output_dir / 'model'}', trust_remote_code=True)")
    return result.output_dir


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:
        print(f"mhsa: error: {err}", file=sys.stderr)
        sys.exit(2)
