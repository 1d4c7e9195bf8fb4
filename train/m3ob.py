"""Train and evaluate M3ob (DESIGN §5.5) with `transformers.Trainer`: the first public implementation.

The pipeline of "Learning Multi-Modal Mobility Dynamics for Generalized Next Location Recommendation"
(arXiv 2512.22605), built from the parts of this library:

1. a spatial-temporal knowledge graph of the TRAIN check-ins (users, locations, categories and activity types;
   `dataset_builders.knowledge_graph`), with each category mapped to an activity type by a user table, the MiniLM
   nearest-description mapping, or an LLM as in the paper;
2. TransE entity embeddings of that graph (PyG's `torch_geometric.nn.kge.TransE`), frozen;
3. a k-nearest-neighbour relational graph over the locations' TransE embeddings (cosine similarity), saved with the
   model so prediction needs no graph rebuild;
4. frozen image features per location (`train.image_features`: a folder of images, an image column, or context
   rasters rendered from the POI table; encoder DINOv2-small offline);
5. `modeling_mobility.m3ob.M3obForNextLocation`: GCNs over the ID and the image modality on that graph, gated fusion,
   InfoNCE alignment of the image branch with the TransE embeddings, a transformer over the fused history with time
   and user embeddings, and heads for the next location, category, activity and hour.

The paper's code is not public: every default that the paper does not fix is an hf-mobility choice (docstrings and
the model card say which); this is not a reproduction of the paper's numbers. Samples are exactly those of every other
model (`train.mhsa.build_mhsa_samples`), and so is the evaluation (`train.mhsa.evaluate_mhsa`'s scoring path).

Copy-paste:

```bash
mobility train m3ob --config train/recipes/m3ob_demo.yaml --data runs/demo/data --output-dir runs/demo/m3ob \\
    --images runs/demo/raw/tiles
mobility train m3ob --config train/recipes/m3ob_demo.yaml --data runs/demo/data --output-dir runs/demo/m3ob-id \\
    --modalities id                                        # the ID-only ablation
mobility evaluate runs/demo/m3ob --data runs/demo/data      # long-tail slice included
```

A run folder holds `model/` (safetensors, config and modeling files: `AutoModel.from_pretrained(RUN/model,
trust_remote_code=True)`), `kg/` (the knowledge graph dataset and `kg/transe/`, unless `--kg` named one),
`run_info.json`, `recipe.yaml`, `trainer_state.json`, `metrics.json` and the model card `README.md`.
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
import pyarrow.compute as pc
import torch
import yaml
from transformers import EarlyStoppingCallback, PrinterCallback, Trainer, set_seed
from transformers.utils import logging as hf_logging

from dataset_builders.publish import PreparedDataset, load_prepared

from .evaluate import format_results_table, write_json_atomic, write_text_atomic
from .mhsa import _collate, _IndexDataset, _save_model, _ThroughputCallback, build_mhsa_samples
from .recipe import add_recipe_arguments, coerce_fields, epoch_training_arguments, parse_recipe_args, read_recipe

__all__ = [
    "M3obRecipe",
    "M3obTrainingResult",
    "build_parser",
    "evaluate_m3ob",
    "load_recipe",
    "main",
    "train_m3ob",
]

logger = logging.getLogger(__name__)

_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
_MODALITIES = ("id", "image")
_DEFAULT_MAX_HISTORY = 128  # visits per history when the recipe sets none (the model's position table)


# ---------------------------------------------------------------------------------------------------------------------
# recipe


@dataclass
class M3obRecipe:
    r"""
    Everything an M3ob run needs; loaded from a YAML recipe and overridden by keyword arguments or `--key value`.

    Knowledge graph and features:
        data (`str`, *optional*): prepared check-in dataset folder (`mobility data prepare`).
        output_dir (`str`, *optional*): run folder (created).
        kg (`str`, *optional*): a folder written by `mobility data kg` for the same dataset (its `transe/` is used);
            default: build the graph and train TransE inside the run folder (`RUN/kg`).
        activities (`str`, *optional*): a `category,activity` CSV (the user-given mapping).
        activity_model (`str`, *optional*): a causal LM (local folder, `smollm2-135m-instruct`, or a Hub id) that
            picks each category's activity type, as the paper does; default: the MiniLM nearest-description mapping.
        embedding_dim (`int`, *optional*, defaults to 64): TransE dimension (hf-mobility choice).
        transe_epochs (`int`, *optional*, defaults to 100): TransE epochs (hf-mobility choice).
        images (`str`, *optional*): a folder of location images named `<location_id>.<ext>`; default: an image column
            of the location table, else context rasters rendered from the POI table (categories around each location).
        image_encoder (`str`, *optional*, defaults to `"dinov2-small"`): the frozen vision model (resolver: a local
            folder, an offline alias or a Hub id; CLIP folders use their vision tower).
        image_size (`int`, *optional*, defaults to 112): image side fed to the encoder (DINOv2: 8x8 patches of 14).

    Model ([`M3obConfig`]; hf-mobility choices unless stated):
        modalities (`str`, *optional*, defaults to `"id,image"`): `id` (the ID-only ablation) or `id,image`.
        fusion (`str`, *optional*, defaults to `"gate"`): `gate` (the paper's gated fusion) or `sum` (ablation).
        alignment_weight (`float`, *optional*, defaults to 0.1): weight of the image-STKG InfoNCE alignment (0 = off,
            the `--no-alignment` ablation).
        kg_neighbors (`int`, *optional*, defaults to 10): k of the kNN relational graph.
        hidden_size, num_gcn_layers, num_hidden_layers, num_attention_heads, intermediate_size, hidden_dropout_prob,
        category_loss_weight, activity_loss_weight, time_loss_weight: see [`M3obConfig`].
        max_history (`int`, *optional*): keep only the most recent visits of every history (default 128; also the
            model's `max_position_embeddings`).

    Training (as the MHSA recipe): batch_size, eval_batch_size, learning_rate, weight_decay (plain Adam),
    max_epochs, patience (early stopping on the validation loss, best checkpoint restored), lr_scheduler_type,
    warmup_epochs, max_grad_norm, seed, num_threads, evaluate, eval_split, progress.
    """

    data: str | None = None
    output_dir: str | None = None
    kg: str | None = None
    activities: str | None = None
    activity_model: str | None = None
    embedding_dim: int = 64
    transe_epochs: int = 100
    images: str | None = None
    image_encoder: str = "dinov2-small"
    image_size: int = 112
    modalities: str = "id,image"
    fusion: str = "gate"
    alignment_weight: float = 0.1
    kg_neighbors: int = 10
    hidden_size: int = 128
    num_gcn_layers: int = 2
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 256
    hidden_dropout_prob: float = 0.1
    category_loss_weight: float = 0.2
    activity_loss_weight: float = 0.2
    time_loss_weight: float = 0.2
    max_history: int | None = None
    batch_size: int = 128
    eval_batch_size: int = 512
    learning_rate: float = 1e-3
    weight_decay: float = 1e-6
    max_epochs: int = 50
    patience: int = 3
    lr_scheduler_type: str = "linear"
    warmup_epochs: float = 1.0
    max_grad_norm: float = 1.0
    seed: int = 0
    num_threads: int | None = None
    evaluate: bool = True
    eval_split: str = "test"
    progress: bool = True

    def __post_init__(self):
        coerce_fields(self)
        for name in ("batch_size", "eval_batch_size", "max_epochs", "patience", "embedding_dim", "transe_epochs",
                     "image_size", "kg_neighbors", "hidden_size", "num_gcn_layers", "num_hidden_layers",
                     "num_attention_heads", "intermediate_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"recipe key `{name}` must be a positive integer, got {getattr(self, name)!r}")
        for name in ("num_threads", "max_history"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"recipe key `{name}` must be a positive integer or null, got {value!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"recipe key `learning_rate` must be > 0, got {self.learning_rate!r}")
        for name in ("weight_decay", "warmup_epochs", "max_grad_norm", "alignment_weight", "category_loss_weight",
                     "activity_loss_weight", "time_loss_weight", "hidden_dropout_prob"):
            if getattr(self, name) < 0:
                raise ValueError(f"recipe key `{name}` must be >= 0, got {getattr(self, name)!r}")
        if self.lr_scheduler_type not in _SCHEDULERS:
            raise ValueError(f"recipe key `lr_scheduler_type` must be one of {list(_SCHEDULERS)}, "
                             f"got {self.lr_scheduler_type!r}")
        if self.fusion not in ("gate", "sum"):
            raise ValueError(f"recipe key `fusion` must be 'gate' or 'sum', got {self.fusion!r}")
        self.modality_list()  # validates

    def modality_list(self) -> list[str]:
        """`modalities` as a list (`"id,image"` -> `["id", "image"]`); the ID modality is always on."""
        parts = [p.strip() for p in str(self.modalities).replace("+", ",").split(",") if p.strip()]
        wrong = [p for p in parts if p not in _MODALITIES]
        if wrong or "id" not in parts or len(set(parts)) != len(parts):
            raise ValueError(f"recipe key `modalities` must be 'id' or 'id,image', got {self.modalities!r}")
        return parts

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_recipe(path: str | os.PathLike | None = None, **overrides) -> M3obRecipe:
    """Load a YAML recipe (optional) and apply keyword overrides; unknown keys raise a `ValueError`."""
    return read_recipe(M3obRecipe, path, overrides)


# ---------------------------------------------------------------------------------------------------------------------
# knowledge graph, relational graph and image features


@dataclass
class M3obInputs:
    """What the model is built from (all in location-table order).

    Args:
        location_ids (`list[str]`), user_ids (`list[str]`): the vocabularies.
        kg_embeddings (`np.ndarray` `(N, d)`): frozen TransE embeddings of the locations.
        categories (`list[str]`), activities (`list[str]`): the category and activity vocabularies.
        location_categories (`np.ndarray` `(N,)` int64): category row of every location (-1 = none).
        category_activities (`np.ndarray` `(C,)` int64): activity row of every category.
        image_features (`np.ndarray` `(N, D)`, *optional*): frozen image features (None: the image branch is off).
        kg_source (`dict`), image_source (`dict`): provenance for the run info and the model card.
    """

    location_ids: list[str]
    user_ids: list[str]
    kg_embeddings: np.ndarray
    categories: list[str]
    activities: list[str]
    location_categories: np.ndarray
    category_activities: np.ndarray
    image_features: np.ndarray | None
    kg_source: dict = field(default_factory=dict)
    image_source: dict = field(default_factory=dict)


def build_kg(data: PreparedDataset, out: Path, recipe: M3obRecipe):
    """Build the knowledge graph and its TransE embeddings in `out/kg` (`dataset_builders.knowledge_graph.
    make_knowledge_graph`, what `mobility data kg` runs), or load the ones of `recipe.kg`; returns `(kg, transe,
    source)`."""
    from dataset_builders import knowledge_graph as kgmod

    if recipe.kg:
        folder = Path(recipe.kg)
        source = {"kg": str(folder.resolve()), "built": False}
    else:
        folder = out / "kg"
        summary = kgmod.make_knowledge_graph(data.path, folder, activities=recipe.activities,
                                             activity_model=recipe.activity_model,
                                             transe_epochs=recipe.transe_epochs, embedding_dim=recipe.embedding_dim,
                                             seed=recipe.seed, progress=recipe.progress)
        source = {"kg": "kg", "built": True, "seconds": summary.get("seconds")}
    kg = kgmod.load_knowledge_graph(folder)
    if not (folder / "transe").is_dir():
        raise ValueError(f"{folder}: no transe/ folder beside the knowledge graph (run `mobility data kg` without "
                         "--no-transe)")
    transe = kgmod.load_transe(folder / "transe")
    mapping = kg.metadata.get("activity_mapping") or {}
    source["activities"] = mapping.get("source", "given table")
    if "agreement" in mapping:
        source["activity_agreement"] = mapping["agreement"]
    return kg, transe, source


def _location_categories(data: PreparedDataset, location_ids: list[str], activity_table) -> tuple:
    """`(categories, activities, location_categories (N,), category_activities (C,))` from the location table and
    the category -> activity mapping (`category`, `activity` columns)."""
    import pandas as pd

    from dataset_builders.knowledge_graph import ACTIVITY_TYPES

    activities = list(ACTIVITY_TYPES)
    table = activity_table.to_pandas() if hasattr(activity_table, "to_pandas") else pd.DataFrame(activity_table)
    mapping = dict(zip(table["category"].astype(str), table["activity"].astype(str), strict=True))
    categories = sorted(mapping)
    wrong = sorted({a for a in mapping.values() if a not in activities})
    if wrong:
        raise ValueError(f"activity mapping names unknown activity types {wrong[:5]}; known: {activities}")
    cat_index = {c: i for i, c in enumerate(categories)}
    locations = data.table("locations").to_pandas().set_index("location_id")
    if "category" in locations:
        rows = locations["category"].reindex(location_ids).map(cat_index)  # NaN: no category, or not in the mapping
        location_categories = rows.fillna(-1).to_numpy(dtype=np.int64)
    else:
        location_categories = np.full(len(location_ids), -1, dtype=np.int64)
    category_activities = np.array([activities.index(mapping[c]) for c in categories], dtype=np.int64)
    return categories, activities, location_categories, category_activities


def _image_features(data: PreparedDataset, recipe: M3obRecipe):
    """Frozen image features in location-table order (the order of the model's location vocabulary) and their
    provenance, or `(None, {...})` when the image modality is off or no location has an image."""
    if "image" not in recipe.modality_list():
        return None, {"modality": "off (ID-only model)"}
    from .image_features import location_image_features

    result = location_image_features(data, images=recipe.images, encoder=recipe.image_encoder,
                                     image_size=recipe.image_size, progress=recipe.progress)
    source = dict(result.source)
    if not result.present.any():
        logger.warning("no location has an image: the image branch is off and the model is ID-only")
        return None, {**source, "modality": "off (no location has an image)"}
    source["locations_with_image"] = int(result.present.sum())
    source["locations_without_image"] = int((~result.present).sum())
    return np.asarray(result.features, dtype=np.float32), source


def build_inputs(data: PreparedDataset, out: Path, recipe: M3obRecipe) -> M3obInputs:
    """Everything [`M3obForNextLocation`] is built from: the knowledge graph and TransE (built or loaded), the
    categories and activities, and the image features."""
    from dataset_builders.knowledge_graph import location_embeddings

    location_ids = [str(v) for v in data.table("locations").column("location_id").to_pylist()]
    train_table = data.table("samples", "train")
    if train_table.num_rows == 0:
        raise ValueError(f"{data.path}: the train split has no samples")
    user_ids = sorted(set(pc.unique(train_table.column("user_id")).to_pylist()))
    kg, transe, kg_source = build_kg(data, out, recipe)
    kg_embeddings = location_embeddings(kg, transe, location_ids)
    categories, activities, location_categories, category_activities = _location_categories(
        data, location_ids, kg.activities)
    image_features, image_source = _image_features(data, recipe)
    kg_source.update(transe_metrics=transe.metrics, summary=kg.summary())
    return M3obInputs(location_ids=location_ids, user_ids=user_ids, kg_embeddings=kg_embeddings,
                      categories=categories, activities=activities, location_categories=location_categories,
                      category_activities=category_activities, image_features=image_features, kg_source=kg_source,
                      image_source=image_source)


def build_model(inputs: M3obInputs, recipe: M3obRecipe, *, max_history: int = 128):
    """An untrained [`M3obForNextLocation`] with its frozen buffers set: the TransE embeddings, the kNN relational
    graph over them, the image features and the category/activity maps."""
    from modeling_mobility.m3ob import M3obConfig, M3obForNextLocation, build_knn_graph

    edge_index, edge_weight = build_knn_graph(torch.as_tensor(inputs.kg_embeddings), recipe.kg_neighbors)
    with_images = inputs.image_features is not None
    config = M3obConfig(
        location_ids=inputs.location_ids,
        user_ids=inputs.user_ids,
        num_categories=len(inputs.categories),  # 0 (no category column): no category or activity head
        num_activities=len(inputs.activities) if inputs.categories else 0,
        kg_embedding_dim=int(inputs.kg_embeddings.shape[1]),
        image_feature_dim=int(inputs.image_features.shape[1]) if with_images else 0,
        modalities=["id", "image"] if with_images else ["id"],
        fusion=recipe.fusion,
        alignment_weight=recipe.alignment_weight if with_images else 0.0,
        num_neighbors=recipe.kg_neighbors,
        num_edges=int(edge_index.shape[1]),
        hidden_size=recipe.hidden_size,
        num_gcn_layers=recipe.num_gcn_layers,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        intermediate_size=recipe.intermediate_size,
        hidden_dropout_prob=recipe.hidden_dropout_prob,
        category_loss_weight=recipe.category_loss_weight,
        activity_loss_weight=recipe.activity_loss_weight,
        time_loss_weight=recipe.time_loss_weight,
        max_position_embeddings=max_history,
    )
    model = M3obForNextLocation(config)
    model.set_graph(torch.as_tensor(inputs.kg_embeddings), edge_index, edge_weight)
    if with_images:
        model.set_image_features(torch.as_tensor(inputs.image_features))
    if inputs.categories:
        model.set_location_categories(inputs.location_categories, inputs.category_activities)
    return model


@dataclass
class M3obTrainingResult:
    """What [`train_m3ob`] returns: the restored best model (eval mode), the run folder, `run_info.json`'s content,
    Trainer's log history and the evaluation report (when the recipe asked for one)."""

    model: Any
    output_dir: Path
    run_info: dict
    history: list[dict] = field(default_factory=list)
    report: dict | None = None


def train_m3ob(
    data_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    recipe: M3obRecipe | str | os.PathLike | None = None,
    **overrides,
) -> M3obTrainingResult:
    """Build the knowledge graph, TransE, the relational graph and the image features, train
    [`M3obForNextLocation`] on a prepared check-in dataset and save a self-contained run folder.

    Args:
        data_dir (`str` or `os.PathLike`): prepared check-in dataset (train and validation samples are used; the
            knowledge graph reads only the train check-ins).
        output_dir (`str` or `os.PathLike`): run folder (created).
        recipe ([`M3obRecipe`], a YAML path, or `None`): hyper-parameters (defaults: the class defaults).
        **overrides: recipe keys that replace the recipe's values (e.g. `modalities="id"`).
    """
    if isinstance(recipe, M3obRecipe):
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


def _train(data_dir, output_dir, recipe: M3obRecipe) -> M3obTrainingResult:
    data = load_prepared(data_dir)
    if data.kind != "checkins":
        raise ValueError(f"{data.path}: M3ob needs a check-in dataset (locations, categories), got kind {data.kind!r}")
    for split in ("train", "validation"):
        if split not in data.splits("samples"):
            raise ValueError(f"{data.path}: no {split!r} split of samples; available: {data.splits('samples')}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    recipe = dataclasses.replace(recipe, data=str(data_dir), output_dir=str(output_dir))
    t0 = time.perf_counter()
    inputs = build_inputs(data, out, recipe)
    prepare_seconds = time.perf_counter() - t0
    history = recipe.max_history or _DEFAULT_MAX_HISTORY
    train = build_mhsa_samples(data, "train", inputs.location_ids, inputs.user_ids, max_history=history)
    validation = build_mhsa_samples(data, "validation", inputs.location_ids, inputs.user_ids, max_history=history)
    if len(validation) == 0:
        raise ValueError(f"{data.path}: the validation split has no samples (needed for early stopping)")

    set_seed(recipe.seed)
    model = build_model(inputs, recipe, max_history=history)
    steps_per_epoch = math.ceil(len(train) / recipe.batch_size)
    warmup_steps = int(round(recipe.warmup_epochs * steps_per_epoch))
    args = epoch_training_arguments(out, recipe, warmup_steps=warmup_steps)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=recipe.learning_rate,
                                 weight_decay=recipe.weight_decay)
    throughput = _ThroughputCallback()
    trainer = Trainer(model=model, args=args, train_dataset=_IndexDataset(train),
                      eval_dataset=_IndexDataset(validation), data_collator=_collate,
                      callbacks=[throughput, EarlyStoppingCallback(early_stopping_patience=recipe.patience)],
                      optimizers=(optimizer, None))
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
    epochs_run = max((int(round(e.get("epoch", 0))) for e in history), default=0)
    best_step = trainer.state.best_global_step
    info = {
        "method": "m3ob",
        "name": _run_name(model.config, recipe),
        "modalities": list(model.config.modalities),
        "fusion": model.config.fusion,
        "alignment_weight": model.config.alignment_weight,
        "kg_neighbors": recipe.kg_neighbors,
        "knowledge_graph": inputs.kg_source,
        "images": inputs.image_source,
        "data": str(data.path.resolve()),
        "num_locations": len(inputs.location_ids),
        "num_users": len(inputs.user_ids),
        "num_categories": len(inputs.categories),
        "num_edges": int(model.config.num_edges),
        "train_samples": len(train),
        "validation_samples": len(validation),
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "epochs": epochs_run,
        "best_epoch": int(math.ceil(best_step / steps_per_epoch)) if best_step else epochs_run,
        "best_eval_loss": trainer.state.best_metric,
        "stopped_early": epochs_run < recipe.max_epochs,
        "global_step": trainer.state.global_step,
        "prepare_seconds": round(prepare_seconds, 3),
        "train_seconds": round(throughput.seconds, 3),
        "train_samples_per_second": (round(throughput.epochs * len(train) / throughput.seconds, 1)
                                     if throughput.seconds else None),
        "train_metrics": dict(result.metrics),
        "metrics": {},
    }
    if trainer.is_world_process_zero():
        _save_model(model, out / "model")
        (out / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False), encoding="utf-8")
        write_json_atomic(info, out / "run_info.json")
        _write_card(out, info, None)
        logger.info("wrote M3ob run %s", out)
    report = None
    if recipe.evaluate and trainer.is_world_process_zero():
        report = evaluate_m3ob(out, data.path, split=recipe.eval_split, batch_size=recipe.eval_batch_size,
                               model=model)
        info = json.loads((out / "run_info.json").read_text(encoding="utf-8"))
    return M3obTrainingResult(model=model, output_dir=out, run_info=info, history=history, report=report)


def _run_name(config, recipe: M3obRecipe) -> str:
    """`m3ob` for the full model; the ablations say what they leave out or change."""
    parts = ["m3ob"]
    if "image" not in config.modalities:
        parts.append("id-only")
    else:
        if config.alignment_weight == 0:
            parts.append("no-alignment")
        if config.fusion != "gate":
            parts.append(f"{config.fusion}-fusion")
    if recipe.kg_neighbors != M3obRecipe.kg_neighbors:
        parts.append(f"k{recipe.kg_neighbors}")
    return "-".join(parts)


# ---------------------------------------------------------------------------------------------------------------------
# evaluation


def evaluate_m3ob(
    run_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    split: str = "test",
    *,
    batch_size: int = 512,
    model=None,
    slice_by: str | list[str] | None = None,
) -> dict:
    """Rank every location for every sample of `split` and score beside the baselines and `nearest` on the same
    samples (`train.mhsa.score_ranking_model`: all metrics, unseen targets, the long-tail slice and `slice_by`
    columns); writes `run_dir/metrics.json` and refreshes the model card.

    Args:
        run_dir (`str` or `os.PathLike`): a run folder of [`train_m3ob`].
        data_dir (`str` or `os.PathLike`): the prepared check-in dataset.
        split (`str`, *optional*, defaults to `"test"`): the split to score.
        batch_size (`int`, *optional*, defaults to 512): samples per forward pass.
        model (`M3obForNextLocation`, *optional*): use this model instead of loading `run_dir/model`.
        slice_by (`str` or `list[str]`, *optional*): check-in column(s) to slice the metrics by (`--slice-by`).
    """
    from .mhsa import score_ranking_model

    run = Path(run_dir)
    info_file = run / "run_info.json"
    if not info_file.is_file():
        raise FileNotFoundError(f"{run} is not an M3ob run folder (no run_info.json); train one with train_m3ob")
    info = json.loads(info_file.read_text(encoding="utf-8"))
    if info.get("method") != "m3ob":
        raise ValueError(f"{run} is a {info.get('method')!r} run, not an M3ob run")
    data = load_prepared(data_dir)
    if data.kind != "checkins":
        raise ValueError(f"{data.path}: M3ob is evaluated on check-in data, got kind {data.kind!r}")
    if model is None:
        from modeling_mobility.m3ob import M3obForNextLocation

        model = M3obForNextLocation.from_pretrained(run / "model")
        if torch.cuda.is_available():
            model = model.to("cuda")
    model = model.eval()
    # histories are cut to the model's longest (the most recent visits), as in training
    samples = build_mhsa_samples(data, split, model.config.location_ids, model.config.user_ids or [],
                                 max_history=model.config.max_position_embeddings)
    if len(samples) == 0:
        raise ValueError(f"{data.path}: split {split!r} has no samples")
    name = info.get("name", "m3ob")
    report, model_res, seconds = score_ranking_model(model, data, split, samples, name=name, batch_size=batch_size,
                                                     slice_by=slice_by)
    report.update(run=str(run))
    write_json_atomic(report, run / "metrics.json")
    info.setdefault("metrics", {})[split] = model_res
    write_json_atomic(info, info_file)
    _write_card(run, info, report)
    logger.info("%s on %s: acc@1 %.4f, mrr %.4f over %d samples (%.0f predictions/s)", name, split,
                model_res["acc@1"], model_res["mrr"], len(samples), len(samples) / max(seconds, 1e-9))
    return report


# ---------------------------------------------------------------------------------------------------------------------
# model card

_CITATION = """\
```bibtex
@article{dai2025m3ob,
  title   = {Learning Multi-Modal Mobility Dynamics for Generalized Next Location Recommendation},
  author  = {Dai, Junshu and Wang, Yu and Zheng, Tongya and Ji, Wei and Guo, Qinghong and Cao, Ji and Song, Jie and
             Jin, Canghong and Song, Mingli},
  journal = {arXiv preprint arXiv:2512.22605},
  year    = {2025}
}
```"""

_CHOICES = [
    "knowledge graph: visit relations per part of the day x weekday/weekend, transitions between consecutive train "
    "check-ins of a user, every location of the table as an entity (with its category), train check-ins only",
    "12 activity types of our own wording; the default category -> activity mapping is the nearest description in "
    "the MiniLM sentence space (an LLM, as in the paper, with `activity_model`)",
    "TransE (PyG) dimension, margin and epochs; the relational graph is a symmetrised cosine kNN over the TransE "
    "location embeddings",
    "the image modality shares the relational graph's topology; gate per node and dimension; residual to the inputs",
    "alignment: symmetric InfoNCE between the image branch and projected TransE embeddings, learnable temperature",
    "sequence model: a transformer encoder over the fused history with hour, weekday and position embeddings, a user "
    "embedding; heads for location, category, activity and the target hour, with fixed loss weights",
]


def build_model_card(info: dict, metrics: dict | None = None, recipe: str | None = None) -> str:
    """The model card (`README.md`) of an M3ob run: metadata, what was built, the hf-mobility choices, metrics,
    usage and citation. It does not claim to reproduce the paper's numbers."""
    from huggingface_hub import ModelCardData

    card_data = ModelCardData(library_name="transformers",
                              tags=["hf-mobility", "mobility", "next-location-prediction", "m3ob", "knowledge-graph"])
    kg = info.get("knowledge_graph") or {}
    images = info.get("images") or {}
    transe = (kg.get("transe_metrics") or {})
    modalities = info.get("modalities") or ["id"]
    if "image" in modalities:
        image_line = (f"- Image modality: {images.get('image_source', 'images')} through the frozen "
                      f"`{images.get('encoder', '?')}` at {images.get('image_size', '?')} px "
                      f"({images.get('locations_with_image', '?')} locations with an image, "
                      f"{images.get('locations_without_image', 0)} without: zero features)")
        if str(images.get("image_source", "")).startswith("context"):
            image_line += "; the images are context rasters rendered from the POI table, not remote-sensing images"
    else:
        image_line = f"- Image modality: {images.get('modality', 'off')}: this is the ID-only model"
    parts = [
        f"---\n{card_data.to_yaml()}\n---",
        "",
        f"# {info.get('name', 'm3ob')}",
        "",
        "A next-location recommender trained with the `hf-mobility` library after M3ob (Dai et al., \"Learning "
        "Multi-Modal Mobility Dynamics for Generalized Next Location Recommendation\", "
        "[arXiv 2512.22605](https://arxiv.org/abs/2512.22605)). The paper's code is not public: this is an "
        "independent implementation from the paper's description, and it does **not** claim to reproduce the "
        "paper's numbers.",
        "",
        "## What was built",
        "",
        f"- Knowledge graph of the train check-ins: {kg.get('summary', {})}",
        f"- Activity types: {kg.get('activities', 'from a given knowledge graph')}",
        "- TransE link prediction on held-out triples: "
        + ", ".join(f"{name} MRR {m.get('mrr', float('nan')):.3f} / Hits@10 {m.get('hits@10', float('nan')):.3f}"
                    for name, m in transe.items() if isinstance(m, dict)),
        f"- Relational graph: {info.get('kg_neighbors')}-NN over the TransE location embeddings, "
        f"{info.get('num_edges', 0):,} directed edges over {info.get('num_locations', 0):,} locations",
        image_line,
        f"- Fusion: {info.get('fusion')}; alignment weight {info.get('alignment_weight')}",
        f"- Training samples: {info.get('train_samples', 0):,}; validation samples: "
        f"{info.get('validation_samples', 0):,}; epochs {info.get('epochs')} (best {info.get('best_epoch')})",
        f"- Parameters: {info.get('trainable_parameters', 0):,} trainable of {info.get('parameters', 0):,}",
        "",
        "## hf-mobility choices (not from the paper)",
        "",
        *[f"- {c}" for c in _CHOICES],
        "",
        "## Evaluation",
        "",
    ]
    if metrics and metrics.get("results"):
        parts += [f"Next-location prediction on the `{metrics.get('split', 'test')}` split (ranking metrics x100; "
                  "every location ranked; the baselines on the same samples).", "", format_results_table(metrics), ""]
    else:
        parts += ["No evaluation was run for this model yet (`mobility evaluate RUN --data DATA` writes one).", ""]
    parts += [
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModel",
        "",
        'model = AutoModel.from_pretrained("path/to/run/model", trust_remote_code=True).eval()',
        "# the relational graph, TransE embeddings and image features are buffers of the model: no rebuild needed",
        "scores = model(input_ids=..., attention_mask=..., time_ids=..., user_ids=...).logits",
        "# (batch, num_locations); model.config.location_ids names the columns",
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
    """`--config RECIPE.yaml`, `--data`, `--output-dir`, `--images`, the ablation switches and `--key value` for every
    recipe key (dashes or underscores)."""
    parser = argparse.ArgumentParser(
        prog=prog or "mobility train m3ob",
        description="Train M3ob (knowledge graph + TransE, kNN relational graph, GCNs over ID and image modalities, "
        "gated fusion, alignment, multi-task transformer) on a prepared check-in dataset, then evaluate it beside the "
        "baselines. Ablations: --modalities id, --no-alignment, --fusion sum, --kg-neighbors K.",
        allow_abbrev=False,
    )
    helps = {"data": "prepared check-in dataset folder", "output_dir": "run folder (created)",
             "images": "folder of location images <location_id>.png|jpg (default: an image column, else context "
             "rasters from the POI table)",
             "kg": "a folder of `mobility data kg` (default: build the graph in the run folder)",
             "modalities": "id or id,image"}
    add_recipe_arguments(parser, M3obRecipe, helps)
    parser.add_argument("--no-alignment", dest="alignment_weight", action="store_const", const=0.0,
                        default=argparse.SUPPRESS, help="ablation: no image-STKG alignment (alignment_weight 0)")
    return parser


def parse_recipe(argv: list[str] | None = None, *, required: bool = False) -> M3obRecipe:
    """Parse `argv` into a [`M3obRecipe`] (YAML recipe first, then the command-line overrides)."""
    needed = {"data": "a prepared check-in dataset folder", "output_dir": "the run folder"} if required else None
    return parse_recipe_args(build_parser(), M3obRecipe, argv, needed)


def main(argv: list[str] | None = None) -> Path:
    """Parse `argv`, train (and evaluate, unless `--evaluate false`), print the results table; returns the run."""
    recipe = parse_recipe(argv, required=True)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = train_m3ob(recipe.data, recipe.output_dir, recipe=recipe)
    info = result.run_info
    print(f"wrote {result.output_dir}: model/, kg/, run_info.json, recipe.yaml, README.md"
          + (", metrics.json" if result.report else ""))
    print(f"{info['name']}: modalities {', '.join(info['modalities'])}; trained {info['epochs']} epochs "
          f"(best {info['best_epoch']}), {info['train_samples_per_second']} training samples/s")
    if result.report:
        print(format_results_table(result.report))
    print(f"load with: AutoModel.from_pretrained('{result.output_dir / 'model'}', trust_remote_code=True)")
    return result.output_dir


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:
        print(f"m3ob: error: {err}", file=sys.stderr)
        sys.exit(2)
