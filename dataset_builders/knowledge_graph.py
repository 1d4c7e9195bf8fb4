"""The spatial-temporal knowledge graph (STKG) of M3ob, its activity types, and its TransE embedding.

M3ob (arXiv 2512.22605, "Learning Multi-Modal Mobility Dynamics for Generalized Next Location Recommendation")
enriches POI categories with LLM-generated activity types, builds a knowledge graph of users, locations, categories
and activity types, embeds it with TransE, and later connects locations whose entity embeddings are similar (a kNN
graph). The paper publishes no code, and most of the details below are not in it; every such default is marked
**hf-mobility choice, not from the paper**.

Pipeline::

    from dataset_builders.knowledge_graph import (
        activities_from_encoder, build_knowledge_graph, location_embeddings, train_transe, write_knowledge_graph,
    )
    from dataset_builders.publish import load_prepared

    data = load_prepared("data/")
    categories = data.table("locations", "train").column("category").to_pylist()
    activities = activities_from_encoder(categories)            # or activities_from_table / activities_from_llm
    kg = build_knowledge_graph(data, activities)
    write_knowledge_graph(kg, "kg/")                              # load_dataset("kg/", "triples") works
    transe = train_transe(kg)
    vectors = location_embeddings(kg, transe, ["4b0588f1f964a520"])

The graph (all hf-mobility choices, not from the paper):

- **Entities**: every location of the ``locations`` table (never-visited and held-out locations included, so that
  they still get an embedding through their category), every user of the **train** check-ins, every category and
  every activity type of the vocabulary (used or not). Entity names are ``location:<id>``, ``user:<id>``,
  ``category:<name>`` and ``activity:<name>``; ids are assigned in that type order, sorted by name within a type
  (activities in vocabulary order).
- **Relations**: ``has_category`` (location -> category), ``functionality`` (category -> activity), one
  ``visit@<day type>_<part of day>`` relation per time-slot group (user -> location; default: night 0-6, morning
  6-12, afternoon 12-18 and evening 18-24 local time, times weekday / weekend (Saturday and Sunday) = 8 relations),
  and ``transition`` (location -> location, consecutive train check-ins of a user at most 24 h apart; a move to the
  same location is dropped).
- Visits and transitions come from the **train** check-ins only; validation and test check-ins never enter the
  graph. A location without a category gets no ``has_category`` triple (counted, not invented). Every triple is
  unique.

:func:`train_transe` embeds the graph with PyG's :class:`torch_geometric.nn.kge.TransE` and reports link prediction
on held-out triples beside an untrained TransE of the same shape.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from .preprocess import local_time_features
from .publish import PreparedDataset, load_prepared, replace_folder, write_dataset

__all__ = [
    "ACTIVITY_TYPES",
    "DEFAULT_TIME_SLOTS",
    "KnowledgeGraph",
    "TransEResult",
    "activities_from_encoder",
    "activities_from_llm",
    "activities_from_table",
    "activity_prompt",
    "build_knowledge_graph",
    "build_parser",
    "compare_activity_mappings",
    "format_summary",
    "load_knowledge_graph",
    "load_transe",
    "location_embeddings",
    "main",
    "make_knowledge_graph",
    "parse_activity",
    "save_transe",
    "train_transe",
    "write_knowledge_graph",
]

logger = logging.getLogger(__name__)

ACTIVITY_TYPES: dict[str, str] = {
    "dining": "eating a meal, a snack or a coffee at a restaurant, cafe, coffee shop, bakery or food court.",
    "working": "doing a paid job at an office, coworking space, factory, shop counter or other workplace.",
    "studying": "attending classes, lectures or studying at a school, college, university or library.",
    "shopping": "buying groceries, clothes, electronics or other goods at a store, supermarket, deli, market or "
    "mall.",
    "exercising": "doing sport, fitness or outdoor recreation at a gym, sports field, pool, park, trail or beach.",
    "entertainment": "watching a film, show, concert or game, or enjoying arts and culture at a cinema, theater, "
    "concert hall, stadium, museum or gallery.",
    "nightlife": "drinking, dancing or socialising in the evening at a bar, pub, nightclub or lounge.",
    "transit": "travelling, commuting or waiting at a train or subway station, bus stop, airport, road or bridge.",
    "home": "living, resting and sleeping at a private home, apartment or residential building.",
    "healthcare": "seeing a doctor, dentist or pharmacist at a hospital, clinic, medical center or pharmacy.",
    "worship": "praying or taking part in religious or community life at a church, mosque, temple, synagogue or "
    "community center.",
    "errands": "using a personal, public or financial service at a bank, post office, hair salon, laundry, car "
    "repair shop or government office.",
}
"""The 12 activity types, name -> one-sentence description (hf-mobility choice, not from the paper: the paper has 12
LLM-inferred types but does not list them). Names are single lower-case words so that an LLM answer is easy to
parse."""

DEFAULT_TIME_SLOTS: tuple[tuple[str, int], ...] = (("night", 0), ("morning", 6), ("afternoon", 12), ("evening", 18))
"""Parts of the day as (name, first local hour) (hf-mobility choice, not from the paper)."""

WEEKEND_DAYS = (5, 6)
"""Saturday and Sunday (0 = Monday): the weekend of the weekday/weekend split (hf-mobility choice)."""

ENTITY_TYPES = ("location", "user", "category", "activity")
_CACHE_FORMAT = "hf-mobility activity answers v1"
_TRANSE_JSON = "transe.json"
_TRANSE_WEIGHTS = "embeddings.safetensors"
_KG_KIND = "knowledge_graph"


# ---------------------------------------------------------------------------------------------------------------------
# activity types


def _check_activity_types(activity_types: Mapping[str, str]) -> dict[str, str]:
    if not isinstance(activity_types, Mapping) or not activity_types:
        raise ValueError("activity_types must be a non-empty mapping name -> description")
    out = {}
    for name, description in activity_types.items():
        if not isinstance(name, str) or not name.strip() or name != name.strip() or ":" in name:
            raise ValueError(f"activity type names must be non-empty strings without ':' or edge spaces, got {name!r}")
        if not isinstance(description, str):
            raise ValueError(f"the description of activity type {name!r} must be a string, got {description!r}")
        out[name] = description
    if len({n.lower() for n in out}) != len(out):
        raise ValueError(f"activity type names must differ case-insensitively: {sorted(out)}")
    return out


def _unique_categories(categories: Iterable[Any]) -> list[str]:
    """Distinct non-empty category strings, sorted; nulls, NaN and blank strings are dropped."""
    if isinstance(categories, str):
        raise ValueError("categories must be an iterable of category names, not a single string")
    if isinstance(categories, (pa.Array, pa.ChunkedArray)):
        categories = categories.to_pylist()
    out = set()
    for value in categories:
        if value is None or (isinstance(value, float) and np.isnan(value)):
            continue
        if not isinstance(value, str):
            raise ValueError(f"categories must be strings, got {value!r} ({type(value).__name__})")
        if value.strip():
            out.add(value.strip())
    return sorted(out)


def _mapping_frame(categories: Sequence[str], activities: Sequence[str], sources: Sequence[str] | str) -> pd.DataFrame:
    if isinstance(sources, str):
        sources = [sources] * len(categories)
    frame = pd.DataFrame(
        {"category": list(categories), "activity": list(activities), "source": list(sources)}, dtype=object
    )
    return frame.sort_values("category", kind="stable").reset_index(drop=True)


def _as_mapping(activities: pd.DataFrame | pa.Table | Mapping[str, str], what: str = "activities") -> dict[str, str]:
    """category -> activity from a mapper's output, a pyarrow table or a plain mapping."""
    if isinstance(activities, Mapping):
        return {str(k): str(v) for k, v in activities.items()}
    if isinstance(activities, pa.Table):
        activities = activities.to_pandas()
    if not isinstance(activities, pd.DataFrame):
        raise ValueError(f"{what} must be a DataFrame, a pyarrow table or a mapping, got {type(activities).__name__}")
    missing = [c for c in ("category", "activity") if c not in activities.columns]
    if missing:
        raise ValueError(f"{what} lacks the column(s) {missing}; it has {list(activities.columns)}")
    cats, acts = activities["category"].astype(str).tolist(), activities["activity"].astype(str).tolist()
    mapping: dict[str, str] = {}
    for c, a in zip(cats, acts):
        if mapping.setdefault(c, a) != a:
            raise ValueError(f"{what} maps category {c!r} to two activities: {mapping[c]!r} and {a!r}")
    return mapping


def activities_from_table(
    categories: Iterable[str], path: str | os.PathLike, *, activity_types: Mapping[str, str] = ACTIVITY_TYPES
) -> pd.DataFrame:
    """Map categories to activity types with a user-written CSV file.

    The file has a header with the columns ``category`` and ``activity`` (more columns are ignored); each activity
    must be a name of ``activity_types`` (case-insensitive); rows for categories that are not asked for are ignored.

    Args:
        categories (`Iterable[str]`): the categories to map; nulls and blanks are ignored, duplicates merged.
        path (`str` or `os.PathLike`): the CSV file.
        activity_types (`Mapping[str, str]`, *optional*, defaults to `ACTIVITY_TYPES`): the vocabulary.

    Returns:
        `pd.DataFrame`: columns ``category``, ``activity``, ``source`` (``"table"``), one row per distinct category,
        sorted by category.

    Raises:
        `ValueError`: a missing column, an unknown activity (the message names the file, the line and the value), a
        category given two activities, or categories the file does not map (the message lists a few).
        `FileNotFoundError`: no such file.
    """
    vocab = _check_activity_types(activity_types)
    by_lower = {name.lower(): name for name in vocab}
    wanted = _unique_categories(categories)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"activity table {path} does not exist")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    table.columns = [str(c).strip().lower() for c in table.columns]
    missing = [c for c in ("category", "activity") if c not in table.columns]
    if missing:
        raise ValueError(f"activity table {path} lacks the column(s) {missing}; it has {list(table.columns)}")
    mapping: dict[str, str] = {}
    for row, (category, activity) in enumerate(zip(table["category"].str.strip(), table["activity"].str.strip())):
        line = row + 2  # 1-based, after the header line
        canonical = by_lower.get(activity.lower())
        if canonical is None:
            raise ValueError(
                f"activity table {path}, line {line}: unknown activity {activity!r} for category {category!r}; "
                f"known activities: {', '.join(vocab)}"
            )
        if not category:
            raise ValueError(f"activity table {path}, line {line}: empty category")
        if mapping.setdefault(category, canonical) != canonical:
            raise ValueError(
                f"activity table {path}, line {line}: category {category!r} is mapped to {mapping[category]!r} "
                f"earlier and to {canonical!r} here"
            )
    absent = [c for c in wanted if c not in mapping]
    if absent:
        raise ValueError(
            f"activity table {path} does not map {len(absent)} of {len(wanted)} categories, e.g. "
            f"{absent[:5]}; add a row for each"
        )
    return _mapping_frame(wanted, [mapping[c] for c in wanted], "table")


def _activity_texts(vocab: Mapping[str, str]) -> list[str]:
    return [f"{name}: {description}" for name, description in vocab.items()]


def activities_from_encoder(
    categories: Iterable[str],
    encoder: str | os.PathLike | Callable[[list[str]], np.ndarray] | None = None,
    *,
    activity_types: Mapping[str, str] = ACTIVITY_TYPES,
    embedding_cache: str | os.PathLike | bool | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Map each category to the activity type whose description is nearest in a sentence-embedding space.

    ``"What people do at a <category>"`` and each ``"<activity>: <description>"`` are embedded, and the category gets
    the activity of highest cosine similarity (ties: the first in vocabulary order). Deterministic, and a sensible
    fallback for the LLM mapping (hf-mobility choice, not from the paper). The sentence around the category matters
    for all-MiniLM-L6-v2: embedded bare, "Coffee Shop" and "Drugstore / Pharmacy" went to ``shopping``.

    Args:
        categories (`Iterable[str]`): the categories to map; nulls and blanks are ignored, duplicates merged.
        encoder (`str`, `os.PathLike` or callable, *optional*): a model for
            [`train.text_encoder.encode_texts`] (default all-MiniLM-L6-v2, shipped for offline use), or a function
            ``texts -> (n, d) array``.
        activity_types (`Mapping[str, str]`, *optional*, defaults to `ACTIVITY_TYPES`): the vocabulary.
        embedding_cache (`str`, `os.PathLike` or `bool`, *optional*): ``cache_dir`` of ``encode_texts`` (``None``:
            ``$HF_MOBILITY_HOME/embeddings``, ``False``: no cache).
        progress (`bool`, *optional*, defaults to `False`): progress bar while encoding.

    Returns:
        `pd.DataFrame`: columns ``category``, ``activity``, ``source`` (``"encoder"``), one row per distinct
        category, sorted by category.
    """
    vocab = _check_activity_types(activity_types)
    wanted = _unique_categories(categories)
    if not wanted:
        return _mapping_frame([], [], "encoder")
    texts = [f"What people do at a {c}" for c in wanted] + _activity_texts(vocab)
    if callable(encoder):
        vectors = np.asarray(encoder(texts), dtype=np.float32)
    else:
        from train.text_encoder import encode_texts  # lazy: dataset_builders does not import train at import time

        vectors = encode_texts(texts, encoder, cache_dir=embedding_cache, progress=progress)
    if vectors.ndim != 2 or len(vectors) != len(texts):
        raise ValueError(
            f"the encoder returned shape {vectors.shape} for {len(texts)} texts; expected ({len(texts)}, d)"
        )
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    similarity = vectors[: len(wanted)] @ vectors[len(wanted) :].T
    names = list(vocab)
    return _mapping_frame(wanted, [names[i] for i in similarity.argmax(axis=1)], "encoder")


def activity_prompt(category: str, activity_types: Mapping[str, str] = ACTIVITY_TYPES) -> str:
    """The question asked to an LLM for one category (hf-mobility choice, not from the paper: its prompt is not
    published).

    Args:
        category (`str`): a category name.
        activity_types (`Mapping[str, str]`, *optional*, defaults to `ACTIVITY_TYPES`): the vocabulary listed.

    Returns:
        `str`: the user message.
    """
    listing = "\n".join(f"- {name}: {description}" for name, description in activity_types.items())
    return (
        "Places are labelled with the main activity people do there. The activity types are:\n"
        f"{listing}\n\n"
        f'Place category: "{category}"\n'
        "Which one activity type fits this place category best? Answer with exactly one activity type name from the "
        "list and nothing else."
    )


def parse_activity(answer: str, activity_types: Mapping[str, str] = ACTIVITY_TYPES) -> str | None:
    """The activity type named in an LLM answer: the one whose name appears first in it, as a whole word,
    case-insensitive (``_`` and ``-`` read as spaces); ``None`` when the answer names none.

    Args:
        answer (`str`): the generated text.
        activity_types (`Mapping[str, str]`, *optional*, defaults to `ACTIVITY_TYPES`): the vocabulary.

    Returns:
        `str` or `None`: the canonical activity name.
    """
    text = re.sub(r"[_\-]", " ", str(answer).lower())
    best: tuple[int, int, str] | None = None
    for name in activity_types:
        pattern = r"(?<![a-z0-9])" + re.escape(re.sub(r"[_\-]", " ", name.lower())) + r"(?![a-z0-9])"
        found = re.search(pattern, text)
        if found is not None:
            key = (found.start(), -len(name), name)  # earliest; at the same place, the longest name
            best = key if best is None or key < best else best
    return None if best is None else best[2]


def _model_identity(model: Any) -> str:
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if name:
        return str(name)
    config = getattr(model, "config", None)
    text = config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else repr(config)
    return f"{type(model).__name__}:{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def _read_cache(path: Path | None) -> dict[str, dict[str, str]]:
    if path is None or not path.exists():
        return {}
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(
            f"activity answer cache {path} is not readable JSON ({err}); delete it or pick another file"
        ) from err
    if not isinstance(content, dict) or content.get("format") != _CACHE_FORMAT:
        raise ValueError(f"{path} is not an hf-mobility activity answer cache (format {_CACHE_FORMAT!r})")
    return content.get("answers", {})


def _write_json_atomic(content: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(content, f, indent=1, ensure_ascii=False, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_causal_lm(name: str | os.PathLike) -> tuple[Any, Any, str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train.pretrained import resolve_model

    source = resolve_model(name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    logger.info("loading %s for the activity mapping", source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).to(device).eval()
    return model, tokenizer, source


def activities_from_llm(
    categories: Iterable[str],
    model: str | os.PathLike | tuple[Any, Any] = "smollm2-135m-instruct",
    *,
    activity_types: Mapping[str, str] = ACTIVITY_TYPES,
    cache_path: str | os.PathLike | None = None,
    fallback: pd.DataFrame | Mapping[str, str] | None = None,
    encoder: str | os.PathLike | Callable[[list[str]], np.ndarray] | None = None,
    model_key: str | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 24,
    progress: bool = True,
    return_stats: bool = False,
) -> pd.DataFrame | tuple[pd.DataFrame, dict[str, Any]]:
    """Map categories to activity types by asking a causal LM, with a JSON answer cache.

    Each category gets the prompt of [`activity_prompt`] (through the tokenizer's chat template when it has one)
    and a greedy answer of at most ``max_new_tokens`` tokens ([`train.humob.generate_answers`]); the answer is read
    with [`parse_activity`]. An answer that names no activity type is **invalid**: it is counted, and the category
    gets the activity of ``fallback`` (default: [`activities_from_encoder`] with ``encoder``). The prompt wording,
    greedy decoding and the encoder fallback are hf-mobility choices, not from the paper (its LLM and prompt are not
    published).

    Raw answers are cached in ``cache_path`` (JSON, written atomically), keyed by the model identity (``model_key``,
    else the resolved model folder or Hub id, else the class and configuration of an in-memory model), a hash of
    the prompt with its activity list, and ``max_new_tokens``; categories found there are not asked again (the
    model is not even loaded when every category is cached).

    Args:
        categories (`Iterable[str]`): the categories to map; nulls and blanks are ignored, duplicates merged.
        model (`str`, `os.PathLike` or `tuple`, *optional*, defaults to `"smollm2-135m-instruct"`): a model name
            for [`train.pretrained.resolve_model`] (folder, offline alias or Hub id), or a ``(model, tokenizer)``
            pair.
        activity_types (`Mapping[str, str]`, *optional*, defaults to `ACTIVITY_TYPES`): the vocabulary.
        cache_path (`str` or `os.PathLike`, *optional*): the JSON answer cache (created); ``None``: no cache.
        fallback (`pd.DataFrame` or `Mapping[str, str]`, *optional*): the mapping used for invalid answers; it must
            cover them.
        encoder (*optional*): the encoder of the default fallback (see [`activities_from_encoder`]).
        model_key (`str`, *optional*): the model's identity in the cache.
        batch_size (`int`, *optional*, defaults to 16): prompts decoded together.
        max_new_tokens (`int`, *optional*, defaults to 24): answer budget. Names are single words, but small chat
            models answer in a sentence (SmolLM2-135M-Instruct: 'The activity type that fits this place category
            best is "Dining"', 17 tokens).
        progress (`bool`, *optional*, defaults to `True`): progress bar while generating.
        return_stats (`bool`, *optional*, defaults to `False`): also return the statistics.

    Returns:
        `pd.DataFrame`: columns ``category``, ``activity``, ``source`` (``"llm"`` for a valid answer, ``"fallback"``
        for an invalid one), sorted by category. With ``return_stats=True``, a tuple ``(mapping, stats)``;
        ``stats`` holds ``model``, ``categories``, ``asked`` (prompts generated now), ``cached`` (answers read from
        the cache), ``valid``, ``invalid`` (``valid + invalid == categories``), ``invalid_answers``
        (category -> raw answer) and ``seconds``.
    """
    vocab = _check_activity_types(activity_types)
    wanted = _unique_categories(categories)
    start = time.perf_counter()
    loaded: tuple[Any, Any] | None = None
    if isinstance(model, tuple):
        if len(model) != 2:
            raise ValueError("model must be a name or a (model, tokenizer) pair")
        loaded = model
        identity = model_key or _model_identity(model[0])
    elif isinstance(model, (str, os.PathLike)):
        identity = model_key
        if identity is None:
            from train.pretrained import resolve_model

            identity = resolve_model(model, progress=progress) if wanted else str(model)
    else:
        raise ValueError(f"model must be a name or a (model, tokenizer) pair, got {type(model).__name__}")
    prompt_hash = hashlib.sha256(activity_prompt("{category}", vocab).encode()).hexdigest()[:12]
    key = f"{identity}|prompt:{prompt_hash}|tokens:{_positive_int('max_new_tokens', max_new_tokens)}"
    cache_file = Path(cache_path) if cache_path is not None else None
    store = _read_cache(cache_file)
    answers = dict(store.get(key, {}))
    todo = [c for c in wanted if c not in answers]
    cached = len(wanted) - len(todo)
    if todo:
        if loaded is None:
            m, tok, _ = _load_causal_lm(model)
        else:
            m, tok = loaded
        from train.humob import generate_answers  # lazy: dataset_builders does not import train at import time

        if getattr(tok, "chat_template", None):
            prompts: list[Any] = [[{"role": "user", "content": activity_prompt(c, vocab)}] for c in todo]
        else:
            prompts = [activity_prompt(c, vocab) + "\nAnswer:" for c in todo]
        generated = generate_answers(m, tok, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                     progress=progress)
        answers.update({c: a.strip() for c, a in zip(todo, generated)})
        if cache_file is not None:
            store = _read_cache(cache_file)  # re-read: another run may have written meanwhile
            store.setdefault(key, {}).update({c: answers[c] for c in todo})
            _write_json_atomic({"format": _CACHE_FORMAT, "answers": store}, cache_file)
    parsed = {c: parse_activity(answers[c], vocab) for c in wanted}
    invalid = [c for c in wanted if parsed[c] is None]
    if invalid:
        if fallback is None:
            backup = _as_mapping(activities_from_encoder(invalid, encoder, activity_types=vocab))
        else:
            backup = _as_mapping(fallback, "fallback")
            absent = [c for c in invalid if c not in backup]
            if absent:
                raise ValueError(f"the fallback mapping does not map {len(absent)} categories, e.g. {absent[:5]}")
            unknown = sorted({backup[c] for c in invalid} - set(vocab))
            if unknown:
                raise ValueError(f"the fallback mapping uses unknown activities {unknown}")
        for c in invalid:
            parsed[c] = backup[c]
    invalid_set = set(invalid)
    frame = _mapping_frame(wanted, [parsed[c] for c in wanted],
                           ["fallback" if c in invalid_set else "llm" for c in wanted])
    stats = {
        "model": identity,
        "categories": len(wanted),
        "asked": len(todo),
        "cached": cached,
        "valid": len(wanted) - len(invalid),
        "invalid": len(invalid),
        "invalid_answers": {c: answers[c] for c in invalid},
        "seconds": round(time.perf_counter() - start, 3),
    }
    logger.info("LLM activity mapping: %d categories, %d asked, %d cached, %d invalid answers (fallback)",
                len(wanted), len(todo), cached, len(invalid))
    return (frame, stats) if return_stats else frame


def compare_activity_mappings(
    a: pd.DataFrame | pa.Table | Mapping[str, str], b: pd.DataFrame | pa.Table | Mapping[str, str]
) -> dict[str, Any]:
    """How far two category -> activity mappings agree (e.g. the LLM's and the encoder's).

    Args:
        a, b (`pd.DataFrame`, `pa.Table` or `Mapping[str, str]`): mapper outputs or plain mappings.

    Returns:
        `dict`: ``categories`` (mapped by both), ``agreeing``, ``agreement`` (fraction; ``None`` without common
        categories), ``disagreements`` (``[{"category", "a", "b"}]`` sorted by category), ``confusion``
        (``[{"a", "b", "count"}]`` over the disagreements, most frequent first), ``only_in_a`` and ``only_in_b``.
    """
    ma, mb = _as_mapping(a, "a"), _as_mapping(b, "b")
    common = sorted(set(ma) & set(mb))
    disagreements = [{"category": c, "a": ma[c], "b": mb[c]} for c in common if ma[c] != mb[c]]
    pairs = pd.DataFrame(disagreements, columns=["category", "a", "b"])
    confusion = (
        pairs.groupby(["a", "b"]).size().reset_index(name="count")
        .sort_values(["count", "a", "b"], ascending=[False, True, True])
    )
    agreeing = len(common) - len(disagreements)
    return {
        "categories": len(common),
        "agreeing": agreeing,
        "agreement": agreeing / len(common) if common else None,
        "disagreements": disagreements,
        "confusion": [{"a": r["a"], "b": r["b"], "count": int(r["count"])} for r in confusion.to_dict("records")],
        "only_in_a": sorted(set(ma) - set(mb)),
        "only_in_b": sorted(set(mb) - set(ma)),
    }


# ---------------------------------------------------------------------------------------------------------------------
# knowledge graph


@dataclass
class KnowledgeGraph:
    """A spatial-temporal knowledge graph as pyarrow tables.

    Args:
        entities (`pa.Table`): ``entity_id`` (int64, ``0..E-1``), ``name`` (``"<type>:<key>"``), ``type``.
        relations (`pa.Table`): ``relation_id`` (int64), ``name``, ``head_type``, ``tail_type``.
        triples (`pa.Table`): ``head``, ``relation``, ``tail`` (int64 ids) and ``head_name``, ``relation_name``,
            ``tail_name``; unique, sorted by relation, head, tail.
        activities (`pa.Table`): the category -> activity mapping used (``category``, ``activity``, ``source``).
        metadata (`dict`): the settings and row counts of the build (JSON-serialisable).
    """

    entities: pa.Table
    relations: pa.Table
    triples: pa.Table
    activities: pa.Table
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def num_entities(self) -> int:
        return self.entities.num_rows

    @property
    def num_relations(self) -> int:
        return self.relations.num_rows

    @property
    def entity_names(self) -> list[str]:
        return self.entities.column("name").to_pylist()

    @property
    def relation_names(self) -> list[str]:
        return self.relations.column("name").to_pylist()

    def summary(self) -> dict[str, Any]:
        """Counts: ``num_entities``, ``num_relations``, ``num_triples``, ``entities`` (per type), ``triples`` (per
        relation, zeros included) and the build's ``counts`` (dropped or skipped rows)."""
        types = pd.Series(self.entities.column("type").to_numpy(zero_copy_only=False))
        per_type = types.value_counts()
        rel = pd.Series(self.triples.column("relation").to_numpy()).value_counts()
        return {
            "num_entities": self.num_entities,
            "num_relations": self.num_relations,
            "num_triples": self.triples.num_rows,
            "entities": {t: int(per_type.get(t, 0)) for t in ENTITY_TYPES},
            "triples": {name: int(rel.get(i, 0)) for i, name in enumerate(self.relation_names)},
            "counts": dict(self.metadata.get("counts", {})),
        }


def _check_time_slots(time_slots: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    slots = [(str(n), int(h)) for n, h in time_slots]
    if not slots:
        raise ValueError("time_slots must hold at least one (name, first hour) part of the day, e.g. [('day', 0)]")
    hours = [h for _, h in slots]
    if hours[0] != 0 or any(b <= a for a, b in zip(hours, hours[1:])) or hours[-1] > 23:
        raise ValueError(f"time_slots must start at hour 0 and increase strictly within 0-23, got {slots}")
    names = [n for n, _ in slots]
    if len(set(names)) != len(names) or any(not re.fullmatch(r"[a-z0-9]+", n) for n in names):
        raise ValueError(f"time slot names must be distinct lower-case words, got {names}")
    return slots


def _as_prepared(data: PreparedDataset | str | os.PathLike) -> PreparedDataset:
    if not isinstance(data, PreparedDataset):
        data = load_prepared(data)
    if data.kind != "checkins":
        raise ValueError(
            f"{data.path} is a {data.kind!r} dataset, not check-ins: the knowledge graph needs check-ins at "
            "locations with categories (a grid dataset has neither)"
        )
    return data


def _string_column(table: pa.Table, name: str) -> pd.Series:
    return pd.Series(table.column(name).to_numpy(zero_copy_only=False), dtype=object)


def build_knowledge_graph(
    data: PreparedDataset | str | os.PathLike,
    activities: pd.DataFrame | pa.Table | Mapping[str, str],
    *,
    activity_types: Mapping[str, str] = ACTIVITY_TYPES,
    time_slots: Sequence[tuple[str, int]] = DEFAULT_TIME_SLOTS,
    split_weekend: bool = True,
    max_transition_gap_hours: float | None = 24.0,
) -> KnowledgeGraph:
    """Build the STKG of a prepared check-in dataset (see the module docstring for the schema).

    Rules (hf-mobility choices, not from the paper):

    - entities: all locations of the ``locations`` table, the users of the **train** check-ins, the categories of
      the locations, and every activity type of ``activity_types``;
    - ``has_category``: one triple per location with a category; locations without one (null, blank or no
      ``category`` column) get none and are counted (``counts.locations_without_category``);
    - ``functionality``: category -> its activity in ``activities``;
    - ``visit@<slot>``: user -> location for each distinct (user, slot, location) of the train check-ins, the slot
      taken from local time: the part of the day of ``time_slots``, split into weekday / weekend (Saturday, Sunday)
      when ``split_weekend``;
    - ``transition``: location -> next location for each pair of consecutive train check-ins of a user (ordered by
      time) at most ``max_transition_gap_hours`` apart; pairs at the same location are dropped (a stay is no move),
      and each distinct pair gives one triple. In an inductive dataset the train check-ins at held-out locations
      were removed by ``prepare``, so the visits around one may form a transition; train check-ins at a location
      marked ``heldout`` are dropped here as well (counted).

    Validation and test check-ins are never read, so the graph leaks nothing about them.

    Args:
        data (`PreparedDataset`, `str` or `os.PathLike`): a prepared check-in dataset (``mobility data prepare``).
        activities (`pd.DataFrame`, `pa.Table` or `Mapping[str, str]`): category -> activity, e.g. the output of
            [`activities_from_encoder`]; it must map every category of the locations.
        activity_types (`Mapping[str, str]`, *optional*, defaults to `ACTIVITY_TYPES`): the vocabulary.
        time_slots (`Sequence[tuple[str, int]]`, *optional*, defaults to `DEFAULT_TIME_SLOTS`): parts of the day as
            (name, first local hour), starting at hour 0.
        split_weekend (`bool`, *optional*, defaults to `True`): one visit relation per part of the day and day type
            (weekday / weekend) instead of per part of the day.
        max_transition_gap_hours (`float`, *optional*, defaults to 24.0): longest time between two check-ins that
            still forms a transition (check-ins more than a day apart rarely belong to one trip; sparse check-in
            data rarely has much shorter gaps); ``None``: no limit.

    Returns:
        [`KnowledgeGraph`]

    Raises:
        `ValueError`: a grid dataset, an activity mapping that misses categories or uses unknown activities, train
        check-ins at locations missing from the ``locations`` table, duplicate location ids, or bad settings.
    """
    start = time.perf_counter()
    data = _as_prepared(data)
    vocab = _check_activity_types(activity_types)
    slots = _check_time_slots(time_slots)
    if max_transition_gap_hours is not None and not max_transition_gap_hours > 0:
        raise ValueError(f"max_transition_gap_hours must be positive or None, got {max_transition_gap_hours!r}")

    # locations and their categories
    locations = data.table("locations", "train")
    loc_ids = _string_column(locations, "location_id").astype(str)
    if loc_ids.duplicated().any():
        raise ValueError(f"{data.path}: duplicate location ids in the locations table, e.g. "
                         f"{loc_ids[loc_ids.duplicated()].head(5).tolist()}")
    if "category" in locations.column_names:
        raw = _string_column(locations, "category")
        loc_cat = raw.map(lambda v: v.strip() if isinstance(v, str) and v.strip() else None)
    else:
        loc_cat = pd.Series([None] * len(loc_ids), dtype=object)
    heldout = (
        np.asarray(locations.column("heldout").fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)
        if "heldout" in locations.column_names else np.zeros(len(loc_ids), dtype=bool)
    )
    categories = _unique_categories(loc_cat)
    mapping = _as_mapping(activities)
    absent = [c for c in categories if c not in mapping]
    if absent:
        raise ValueError(f"the activity mapping does not map {len(absent)} of the {len(categories)} categories, e.g. "
                         f"{absent[:5]}")
    unknown = sorted({mapping[c] for c in categories} - set(vocab))
    if unknown:
        raise ValueError(
            f"the activity mapping uses activities outside the vocabulary: {unknown}; known: {list(vocab)}"
        )

    # train check-ins only
    checkins = data.table("checkins", "train")
    ck = pd.DataFrame({
        "user_id": _string_column(checkins, "user_id").astype(str),
        "location_id": _string_column(checkins, "location_id").astype(str),
        "timestamp": checkins.column("timestamp").to_numpy().astype(np.int64),
        "tz_offset_min": (checkins.column("tz_offset_min").to_numpy().astype(np.int64)
                          if "tz_offset_min" in checkins.column_names else np.zeros(checkins.num_rows, np.int64)),
    })
    loc_index = pd.Index(loc_ids)
    loc_pos = loc_index.get_indexer(ck["location_id"])
    if (loc_pos < 0).any():
        missing = sorted(set(ck.loc[loc_pos < 0, "location_id"]))
        raise ValueError(f"{data.path}: {len(missing)} locations of the train check-ins are not in the locations "
                         f"table, e.g. {missing[:5]}")
    at_heldout = heldout[loc_pos]
    dropped_heldout = int(at_heldout.sum())
    if dropped_heldout:
        ck, loc_pos = ck.loc[~at_heldout].reset_index(drop=True), loc_pos[~at_heldout]

    # entities: locations, users, categories, activities
    loc_order = np.argsort(loc_ids.to_numpy(dtype=object), kind="stable")
    sorted_locs = loc_ids.to_numpy(dtype=object)[loc_order]
    rank_of_row = np.empty(len(loc_ids), dtype=np.int64)
    rank_of_row[loc_order] = np.arange(len(loc_ids))
    users = np.array(sorted(ck["user_id"].unique()), dtype=object)
    acts = list(vocab)
    offsets = np.cumsum([0, len(sorted_locs), len(users), len(categories)])
    names = np.concatenate([
        np.array([f"location:{v}" for v in sorted_locs], dtype=object),
        np.array([f"user:{v}" for v in users], dtype=object),
        np.array([f"category:{v}" for v in categories], dtype=object),
        np.array([f"activity:{v}" for v in acts], dtype=object),
    ])
    types = np.repeat(np.array(ENTITY_TYPES, dtype=object), [len(sorted_locs), len(users), len(categories), len(acts)])

    # relations
    day_types = ("weekday", "weekend") if split_weekend else ("",)
    visit_names = [f"visit@{d}_{p}" if d else f"visit@{p}" for d in day_types for p, _ in slots]
    rel_names = ["has_category", "functionality", *visit_names, "transition"]
    rel_head = ["location", "category", *["user"] * len(visit_names), "location"]
    rel_tail = ["category", "activity", *["location"] * len(visit_names), "location"]
    visit0, transition_rel = 2, len(rel_names) - 1

    parts: list[pd.DataFrame] = []
    cat_index = pd.Index(categories)
    has_cat = loc_cat.notna().to_numpy()
    parts.append(pd.DataFrame({
        "head": offsets[0] + rank_of_row[has_cat],
        "relation": 0,
        "tail": offsets[2] + cat_index.get_indexer(loc_cat[has_cat]),
    }))
    act_index = pd.Index(acts)
    parts.append(pd.DataFrame({
        "head": offsets[2] + np.arange(len(categories)),
        "relation": 1,
        "tail": offsets[3] + act_index.get_indexer([mapping[c] for c in categories]),
    }))

    # visits: (user, slot, location), local time
    day0 = int(data.metadata.get("day0_weekday", 3))
    _, hour, _, weekday = local_time_features(ck["timestamp"].to_numpy(), ck["tz_offset_min"].to_numpy(), day0)
    part = np.searchsorted(np.array([h for _, h in slots]), hour, side="right") - 1
    slot = part + (len(slots) * np.isin(weekday, WEEKEND_DAYS) if split_weekend else 0)
    user_pos = offsets[1] + pd.Index(users).get_indexer(ck["user_id"])
    loc_entity = offsets[0] + rank_of_row[loc_pos]
    parts.append(pd.DataFrame({"head": user_pos, "relation": visit0 + slot, "tail": loc_entity}))

    # transitions: consecutive train check-ins of a user, by time
    order = np.lexsort((ck["timestamp"].to_numpy(), user_pos))
    u, ts, loc = user_pos[order], ck["timestamp"].to_numpy()[order], loc_entity[order]
    same_user = u[1:] == u[:-1]
    gap_ok = np.ones(len(same_user), dtype=bool)
    if max_transition_gap_hours is not None:
        gap_ok = (ts[1:] - ts[:-1]) <= max_transition_gap_hours * 3600
    moved = loc[1:] != loc[:-1]
    keep = same_user & gap_ok & moved
    parts.append(pd.DataFrame({"head": loc[:-1][keep], "relation": transition_rel, "tail": loc[1:][keep]}))

    triples = pd.concat(parts, ignore_index=True).astype(np.int64)
    raw_counts = triples["relation"].value_counts()
    triples = triples.drop_duplicates().sort_values(["relation", "head", "tail"], kind="stable").reset_index(drop=True)
    rel_arr = np.array(rel_names, dtype=object)
    counts = {
        "locations": len(loc_ids),
        "locations_without_category": int((~has_cat).sum()),
        "heldout_locations": int(heldout.sum()),
        "train_checkins": int(checkins.num_rows),
        "train_checkins_at_heldout_dropped": dropped_heldout,
        "visit_checkins": int(len(ck)),
        "visit_triples_before_dedup": int(raw_counts.reindex(range(visit0, transition_rel), fill_value=0).sum()),
        "consecutive_pairs": int(same_user.sum()),
        "transition_pairs_over_max_gap": int((same_user & ~gap_ok).sum()),
        "transition_pairs_same_location": int((same_user & gap_ok & ~moved).sum()),
        "transition_pairs_kept": int(keep.sum()),
    }
    metadata = {
        "source": str(data.path),
        "day0_weekday": day0,
        "time_slots": [[n, h] for n, h in slots],
        "split_weekend": bool(split_weekend),
        "weekend_days": list(WEEKEND_DAYS),
        "max_transition_gap_hours": None if max_transition_gap_hours is None else float(max_transition_gap_hours),
        "activity_types": dict(vocab),
        "counts": counts,
    }
    activity_frame = pd.DataFrame({"category": categories, "activity": [mapping[c] for c in categories]})
    if isinstance(activities, (pd.DataFrame, pa.Table)) and "source" in (
        activities.columns if isinstance(activities, pd.DataFrame) else activities.column_names
    ):
        frame = activities.to_pandas() if isinstance(activities, pa.Table) else activities
        sources = dict(zip(frame["category"].astype(str), frame["source"].astype(str)))
        activity_frame["source"] = [sources.get(c, "given") for c in categories]
    else:
        activity_frame["source"] = "given"
    kg = KnowledgeGraph(
        entities=pa.table({
            "entity_id": pa.array(np.arange(len(names)), pa.int64()),
            "name": pa.array(names.tolist(), pa.string()),
            "type": pa.array(types.tolist(), pa.string()),
        }),
        relations=pa.table({
            "relation_id": pa.array(np.arange(len(rel_names)), pa.int64()),
            "name": pa.array(rel_names, pa.string()),
            "head_type": pa.array(rel_head, pa.string()),
            "tail_type": pa.array(rel_tail, pa.string()),
        }),
        triples=pa.table({
            "head": pa.array(triples["head"].to_numpy(), pa.int64()),
            "relation": pa.array(triples["relation"].to_numpy(), pa.int64()),
            "tail": pa.array(triples["tail"].to_numpy(), pa.int64()),
            "head_name": pa.array(names[triples["head"].to_numpy()].tolist(), pa.string()),
            "relation_name": pa.array(rel_arr[triples["relation"].to_numpy()].tolist(), pa.string()),
            "tail_name": pa.array(names[triples["tail"].to_numpy()].tolist(), pa.string()),
        }),
        activities=pa.Table.from_pandas(activity_frame, preserve_index=False).cast(
            pa.schema([("category", pa.string()), ("activity", pa.string()), ("source", pa.string())])
        ),
        metadata=metadata,
    )
    logger.info("built a knowledge graph of %d entities, %d relations, %d triples in %.1fs", kg.num_entities,
                kg.num_relations, kg.triples.num_rows, time.perf_counter() - start)
    return kg


def _card(kg: KnowledgeGraph) -> str:
    summary = kg.summary()
    meta = kg.metadata
    gap = meta.get("max_transition_gap_hours")
    slots = meta.get("time_slots", [])
    slot_text = ", ".join(
        f"{n} {h}-{slots[i + 1][1] if i + 1 < len(slots) else 24}" for i, (n, h) in enumerate(slots)
    )
    counts = summary["counts"]
    lines = [
        "# hf-mobility spatial-temporal knowledge graph",
        "",
        "The spatial-temporal knowledge graph (STKG) of M3ob (arXiv 2512.22605) built by hf-mobility "
        "(`dataset_builders.knowledge_graph`) from the prepared check-in dataset "
        f"`{Path(meta.get('source', '?')).name}`. "
        "The paper publishes no code; the construction rules below are hf-mobility choices, not from the paper.",
        "",
        f"{summary['num_entities']:,} entities, {summary['num_relations']} relations, {summary['num_triples']:,} "
        "triples.",
        "",
        "| entity type | entities |",
        "|---|---:|",
        *[f"| {t} | {n:,} |" for t, n in summary["entities"].items()],
        "",
        "| relation | head -> tail | triples |",
        "|---|---|---:|",
        *[
            f"| `{name}` | {h} -> {t} | {summary['triples'][name]:,} |"
            for name, h, t in zip(kg.relation_names, kg.relations.column("head_type").to_pylist(),
                                  kg.relations.column("tail_type").to_pylist())
        ],
        "",
        "## Construction (hf-mobility choices, not from the paper)",
        "",
        "- Entities: every location of the `locations` table (never-visited and held-out ones included), every user "
        "of the **train** check-ins, every category and every activity type.",
        f"- `has_category`: location -> category; {counts.get('locations_without_category', 0):,} locations without "
        "a category get no such triple.",
        "- `functionality`: category -> activity type (see the `activities` config for the mapping and its source).",
        f"- `visit@...`: user -> location, one relation per local time slot ({slot_text}"
        + (", times weekday / weekend (Saturday, Sunday)" if meta.get("split_weekend") else "")
        + "), from the train check-ins only; each (user, slot, location) once.",
        "- `transition`: location -> next location of consecutive train check-ins of a user"
        + (f", at most {gap:g} h apart" if gap is not None else "")
        + f"; moves to the same location are dropped ({counts.get('transition_pairs_same_location', 0):,} pairs), "
        f"as are longer gaps ({counts.get('transition_pairs_over_max_gap', 0):,} pairs); each pair once.",
        "- Validation and test check-ins are never read.",
        "",
        "## Activity types",
        "",
        "| activity | description | categories |",
        "|---|---|---:|",
    ]
    per_activity = pd.Series(kg.activities.column("activity").to_pylist(), dtype=object).value_counts()
    lines += [f"| {n} | {d} | {int(per_activity.get(n, 0))} |" for n, d in meta.get("activity_types", {}).items()]
    report = meta.get("activity_mapping")
    if report:
        lines += ["", f"Category -> activity mapping: {report.get('source', 'given')}."]
        stats = report.get("llm_stats")
        if stats:
            lines.append(
                f"LLM answers: {stats['categories']} categories, {stats['valid']} valid answers, "
                f"{stats['invalid']} invalid (given the fallback mapping), {stats['cached']} read from the cache."
            )
        agreement = report.get("agreement")
        if agreement and agreement.get("agreement") is not None:
            lines.append(f"Agreement of the valid LLM answers with the encoder mapping: {agreement['agreement']:.0%} "
                         f"of {agreement['categories']} categories.")
    lines += [
        "",
        "## Configs",
        "",
        "- `triples`: `head`, `relation`, `tail` (entity / relation ids) and their names.",
        "- `entities`: `entity_id`, `name` (`location:<id>`, `user:<id>`, `category:<name>`, `activity:<name>`), "
        "`type`.",
        "- `relations`: `relation_id`, `name`, `head_type`, `tail_type`.",
        "- `activities`: `category`, `activity`, `source` (the mapping used).",
        "",
        "```python",
        "from datasets import load_dataset",
        "",
        'triples = load_dataset("path/to/this/folder", "triples", split="train")',
        "```",
    ]
    return "\n".join(lines)


def write_knowledge_graph(kg: KnowledgeGraph, out: str | os.PathLike) -> Path:
    """Write a knowledge graph as a Hub-style dataset folder (atomic; see
    [`dataset_builders.publish.write_dataset`]): configs ``triples``, ``entities``, ``relations`` and
    ``activities``, each with a ``train`` split, and a dataset card.

    Args:
        kg ([`KnowledgeGraph`]): the graph.
        out (`str` or `os.PathLike`): the folder (replaced when it holds an hf-mobility dataset).

    Returns:
        `Path`: the folder; ``datasets.load_dataset(out, "triples")`` loads it.
    """
    configs = {
        "triples": {"train": kg.triples},
        "entities": {"train": kg.entities},
        "relations": {"train": kg.relations},
        "activities": {"train": kg.activities},
    }
    metadata = {"kind": _KG_KIND, "knowledge_graph": kg.metadata}
    return write_dataset(out, configs, card_body=_card(kg), metadata=metadata,
                         pretty_name="hf-mobility spatial-temporal knowledge graph")


def load_knowledge_graph(path: str | os.PathLike) -> KnowledgeGraph:
    """Read a folder written by [`write_knowledge_graph`].

    Args:
        path (`str` or `os.PathLike`): the folder.

    Returns:
        [`KnowledgeGraph`]: equal to the one written.

    Raises:
        `ValueError`: the folder holds another kind of dataset.
    """
    data = load_prepared(path)
    if data.kind != _KG_KIND:
        raise ValueError(f"{path} holds a {data.kind!r} dataset, not a knowledge graph (write one with "
                         "`write_knowledge_graph` / `mobility data kg`)")
    return KnowledgeGraph(
        entities=data.table("entities"), relations=data.table("relations"), triples=data.table("triples"),
        activities=data.table("activities"), metadata=data.metadata.get("knowledge_graph", {}),
    )


# ---------------------------------------------------------------------------------------------------------------------
# TransE


@dataclass
class TransEResult:
    """A trained TransE embedding of a [`KnowledgeGraph`].

    ``entity_embeddings`` are the p-normalised entity vectors that PyG's ``TransE`` scores with, so
    ``score(h, r, t) = -|| entity[h] + relation[r] - entity[t] ||_p`` holds exactly with these arrays.

    Args:
        entity_embeddings (`np.ndarray`): float32 ``(E, d)``, rows in entity id order.
        relation_embeddings (`np.ndarray`): float32 ``(R, d)``.
        entity_names (`list[str]`): the entity names, in row order.
        relation_names (`list[str]`): the relation names, in row order.
        metrics (`dict`): ``{"transe": {"mrr", "hits@10", "mean_rank"}, "random": {...}, "test_triples": n}``
            (empty without held-out triples).
        history (`list[float]`): mean training loss per epoch.
        seconds (`float`): wall time of training and evaluation.
        settings (`dict`): the hyper-parameters and timings.
    """

    entity_embeddings: np.ndarray
    relation_embeddings: np.ndarray
    entity_names: list[str]
    relation_names: list[str]
    metrics: dict[str, Any]
    history: list[float]
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _link_prediction(model: Any, head, rel, tail, k: int = 10) -> dict[str, float]:
    """PyG's ``KGEModel.test``: raw (unfiltered) tail ranking against every entity. PyG's mean rank is 0-based;
    it is reported 1-based here, like the ranks of its MRR."""
    model.eval()
    batch = max(1, min(model.num_nodes, 1 << 16))
    mean_rank, mrr, hits = model.test(head, rel, tail, batch_size=batch, k=k, log=False)
    return {"mrr": float(mrr), f"hits@{k}": float(hits), "mean_rank": float(mean_rank) + 1.0}


def train_transe(
    kg: KnowledgeGraph,
    *,
    embedding_dim: int = 64,
    epochs: int = 100,
    batch_size: int = 2048,
    learning_rate: float = 0.01,
    margin: float = 0.5,
    p_norm: float = 2.0,
    test_fraction: float = 0.1,
    max_test_triples: int = 2000,
    seed: int = 0,
    device: str | None = None,
    num_threads: int | None = 1,
    progress: bool = True,
) -> TransEResult:
    """Embed a knowledge graph with PyG's ``TransE`` and measure link prediction on held-out triples.

    A random ``min(test_fraction * T, max_test_triples)`` of the triples is held out; the model is trained on the
    rest with Adam and PyG's margin ranking loss (one corrupted head or tail per triple) and evaluated with PyG's
    ``test`` (raw tail ranking against all entities: MRR, Hits@10, mean rank); an untrained ``TransE`` of the same
    shape and seed + 1 is the ``random`` baseline. The returned embeddings are those of the evaluated model, trained
    without the held-out triples (capping them keeps the evaluation fast, ``O(test x E)``, and leaves nearly every
    triple of a large graph for training). Defaults (dimension 64, 100 epochs, batch 2048, learning rate 0.01,
    margin 0.5, L2 norm) are hf-mobility choices, not from the paper (its settings are not published): on the demo
    city (567 entities, 17k triples) a small sweep gave MRR 0.075 with PyG's margin 1 and L1 norm and 0.107 with
    margin 0.5 and L2; more epochs or a larger dimension changed little.

    Args:
        kg ([`KnowledgeGraph`]): the graph.
        embedding_dim (`int`, *optional*, defaults to 64): embedding size.
        epochs (`int`, *optional*, defaults to 100): passes over the training triples.
        batch_size (`int`, *optional*, defaults to 2048): triples per step.
        learning_rate (`float`, *optional*, defaults to 0.01): Adam learning rate.
        margin (`float`, *optional*, defaults to 0.5): margin of the ranking loss.
        p_norm (`float`, *optional*, defaults to 2.0): norm of the TransE distance (and of the entity normalisation).
        test_fraction (`float`, *optional*, defaults to 0.1): share of triples held out for the metrics (0: none,
            and no metrics).
        max_test_triples (`int`, *optional*, defaults to 2000): cap on the held-out triples.
        seed (`int`, *optional*, defaults to 0): seed of the split, the initialisation, the batches and the negatives
            (the global torch RNG is left as it was).
        device (`str`, *optional*): defaults to ``"cuda"`` when available, else ``"cpu"``.
        num_threads (`int`, *optional*, defaults to 1): torch CPU threads while this function runs (restored
            afterwards); ``None`` leaves the setting alone. One thread by default (hf-mobility choice): the operations
            are small (a batch of 2048 x 64), and on a busy machine OpenMP threads waiting on each other made an
            epoch ~25x slower with 2 threads than with 1.
        progress (`bool`, *optional*, defaults to `True`): a tqdm bar over the epochs (only on a terminal).

    Returns:
        [`TransEResult`]
    """
    import torch
    import torch.nn.functional as F
    from torch_geometric.nn.kge import TransE
    from tqdm.auto import tqdm

    embedding_dim = _positive_int("embedding_dim", embedding_dim)
    epochs = _positive_int("epochs", epochs)
    batch_size = _positive_int("batch_size", batch_size)
    max_test_triples = _positive_int("max_test_triples", max_test_triples)
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
    if not learning_rate > 0 or not margin > 0:
        raise ValueError(f"learning_rate and margin must be positive, got {learning_rate!r} and {margin!r}")
    n = kg.triples.num_rows
    if n == 0:
        raise ValueError("the knowledge graph has no triples to train on")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    head = kg.triples.column("head").to_numpy()
    rel = kg.triples.column("relation").to_numpy()
    tail = kg.triples.column("tail").to_numpy()
    n_test = min(int(round(test_fraction * n)), max_test_triples, n - 1) if test_fraction > 0 else 0
    perm = np.random.default_rng(seed).permutation(n)
    test_idx, train_idx = np.sort(perm[:n_test]), np.sort(perm[n_test:])

    def tensors(idx):
        return tuple(torch.as_tensor(a[idx], dtype=torch.long, device=device) for a in (head, rel, tail))

    train_h, train_r, train_t = tensors(train_idx)
    cuda = torch.device(device).type == "cuda"
    history: list[float] = []
    metrics: dict[str, Any] = {}
    threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(_positive_int("num_threads", num_threads))
    try:
        with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if cuda else []):
            torch.manual_seed(seed)
            model = TransE(kg.num_entities, kg.num_relations, embedding_dim, margin=margin, p_norm=p_norm).to(device)
            optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
            loader = model.loader(train_h, train_r, train_t, batch_size=batch_size, shuffle=True,
                                  generator=torch.Generator().manual_seed(seed))
            bar = tqdm(range(epochs), desc="TransE", unit=" epoch", disable=not progress or None, leave=False)
            for _ in bar:
                model.train()
                total, count = 0.0, 0
                for h, r, t in loader:
                    optimizer.zero_grad()
                    loss = model.loss(h, r, t)
                    loss.backward()
                    optimizer.step()
                    total += float(loss.detach()) * h.numel()
                    count += h.numel()
                history.append(total / count)
                bar.set_postfix(loss=f"{history[-1]:.4f}")
            bar.close()
            train_seconds = time.perf_counter() - start
            if n_test:
                test_h, test_r, test_t = tensors(test_idx)
                metrics["transe"] = _link_prediction(model, test_h, test_r, test_t)
                torch.manual_seed(seed + 1)
                baseline = TransE(kg.num_entities, kg.num_relations, embedding_dim, margin=margin, p_norm=p_norm)
                metrics["random"] = _link_prediction(baseline.to(device), test_h, test_r, test_t)
                metrics["test_triples"] = int(n_test)
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        entities = F.normalize(model.node_emb.weight, p=p_norm, dim=-1).float().cpu().numpy()
        relations = model.rel_emb.weight.float().cpu().numpy()
    seconds = time.perf_counter() - start
    settings = {
        "embedding_dim": embedding_dim, "epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate,
        "margin": margin, "p_norm": p_norm, "test_fraction": test_fraction, "max_test_triples": max_test_triples,
        "seed": seed, "train_triples": int(len(train_idx)), "test_triples": int(n_test), "device": str(device),
        "train_seconds": round(train_seconds, 3), "eval_seconds": round(seconds - train_seconds, 3),
        "evaluation": "PyG KGEModel.test: raw tail ranking against all entities; mean_rank is 1-based",
    }
    if metrics:
        logger.info("TransE: %d epochs in %.1fs, loss %.4f -> %.4f; MRR %.4f (random %.4f), Hits@10 %.4f "
                    "(random %.4f)",
                    epochs, train_seconds, history[0], history[-1], metrics["transe"]["mrr"],
                    metrics["random"]["mrr"], metrics["transe"]["hits@10"], metrics["random"]["hits@10"])
    return TransEResult(
        entity_embeddings=np.ascontiguousarray(entities, dtype=np.float32),
        relation_embeddings=np.ascontiguousarray(relations, dtype=np.float32),
        entity_names=kg.entity_names,
        relation_names=kg.relation_names,
        metrics=metrics,
        history=history,
        seconds=round(seconds, 3),
        settings=settings,
    )


def save_transe(result: TransEResult, folder: str | os.PathLike) -> Path:
    """Save a [`TransEResult`]: ``embeddings.safetensors`` (``entity_embeddings``, ``relation_embeddings``) and
    ``transe.json`` (entity and relation order, metrics, history, settings), atomically (written under a temporary
    name, then renamed into place).

    Args:
        result ([`TransEResult`]): what to save.
        folder (`str` or `os.PathLike`): the folder; an existing one is replaced only when it is empty or was
            written by this function.

    Returns:
        `Path`: the folder.
    """
    from safetensors.numpy import save_file

    out = Path(folder)
    if out.exists():
        if not out.is_dir() or (any(out.iterdir()) and not (out / _TRANSE_JSON).exists()):
            raise FileExistsError(f"{out} exists and is not a TransE folder written by hf-mobility; choose another")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(
            {"entity_embeddings": np.ascontiguousarray(result.entity_embeddings, dtype=np.float32),
             "relation_embeddings": np.ascontiguousarray(result.relation_embeddings, dtype=np.float32)},
            str(tmp / _TRANSE_WEIGHTS), metadata={"format": "hf-mobility transe v1"},
        )
        info = {
            "format": "hf-mobility transe v1",
            "entity_names": list(result.entity_names),
            "relation_names": list(result.relation_names),
            "metrics": result.metrics,
            "history": [float(x) for x in result.history],
            "seconds": result.seconds,
            "settings": result.settings,
        }
        (tmp / _TRANSE_JSON).write_text(json.dumps(info, indent=1), encoding="utf-8")
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_transe(folder: str | os.PathLike) -> TransEResult:
    """Read a folder written by [`save_transe`].

    Args:
        folder (`str` or `os.PathLike`): the folder.

    Returns:
        [`TransEResult`]
    """
    from safetensors.numpy import load_file

    folder = Path(folder)
    if not (folder / _TRANSE_JSON).is_file() or not (folder / _TRANSE_WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder} holds no {_TRANSE_JSON} and {_TRANSE_WEIGHTS}: not a saved TransE result")
    info = json.loads((folder / _TRANSE_JSON).read_text(encoding="utf-8"))
    arrays = load_file(str(folder / _TRANSE_WEIGHTS))
    return TransEResult(
        entity_embeddings=arrays["entity_embeddings"], relation_embeddings=arrays["relation_embeddings"],
        entity_names=info["entity_names"], relation_names=info["relation_names"], metrics=info["metrics"],
        history=info["history"], seconds=info["seconds"], settings=info.get("settings", {}),
    )


def location_embeddings(kg: KnowledgeGraph, result: TransEResult, location_ids: Iterable[str]) -> np.ndarray:
    """The TransE vectors of locations, in the order asked.

    Args:
        kg ([`KnowledgeGraph`]): the graph the result was trained on.
        result ([`TransEResult`]): the embedding.
        location_ids (`Iterable[str]`): location ids (without the ``location:`` prefix).

    Returns:
        `np.ndarray`: float32 ``(N, d)``.

    Raises:
        `ValueError`: the result belongs to another graph, or some ids are not location entities (the message names
        a few).
    """
    names = kg.entity_names
    if list(result.entity_names) != names:
        raise ValueError("the TransE result was trained on another knowledge graph (its entities differ)")
    ids = [str(v) for v in location_ids]
    index = pd.Index(names).get_indexer([f"location:{v}" for v in ids])
    if (index < 0).any():
        missing = [v for v, i in zip(ids, index) if i < 0]
        raise ValueError(f"{len(missing)} location ids are not entities of the knowledge graph, e.g. {missing[:5]}")
    return np.ascontiguousarray(result.entity_embeddings[index], dtype=np.float32)


# ---------------------------------------------------------------------------------------------------------------------
# command line


def make_knowledge_graph(
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    activities: str | os.PathLike | None = None,
    activity_model: str | os.PathLike | None = None,
    activity_cache: str | os.PathLike | None = None,
    encoder: str | os.PathLike | None = None,
    transe: bool = True,
    transe_epochs: int = 100,
    embedding_dim: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Build, write and embed the knowledge graph of a prepared dataset (what ``mobility data kg`` runs).

    The activity mapping comes from the CSV ``activities``, else the LLM ``activity_model`` (invalid answers take
    the encoder mapping, and the agreement of the valid answers with the encoder mapping is reported), else the
    encoder mapping. The graph is written to ``out`` and the TransE
    result to ``out/transe``.

    Args:
        data (`str` or `os.PathLike`): prepared check-in dataset folder.
        out (`str` or `os.PathLike`): output folder.
        activities (`str` or `os.PathLike`, *optional*): a category,activity CSV ([`activities_from_table`]).
        activity_model (`str` or `os.PathLike`, *optional*): a causal LM for [`activities_from_llm`].
        activity_cache (`str` or `os.PathLike`, *optional*): its answer cache.
        encoder (`str` or `os.PathLike`, *optional*): the sentence encoder (default all-MiniLM-L6-v2).
        transe (`bool`, *optional*, defaults to `True`): train and save TransE.
        transe_epochs (`int`, *optional*, defaults to 100): TransE epochs.
        embedding_dim (`int`, *optional*, defaults to 64): TransE dimension.
        seed (`int`, *optional*, defaults to 0): TransE seed.
        progress (`bool`, *optional*, defaults to `True`): progress bars.

    Returns:
        `dict`: ``out``, ``knowledge_graph`` (the summary), ``activities`` (source, LLM stats, agreement),
        ``transe`` (metrics, history ends, folder) and ``seconds`` per stage.
    """
    if activities is not None and activity_model is not None:
        raise ValueError("give either an activity table or an activity model, not both")
    prepared = _as_prepared(data)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    locations = prepared.table("locations", "train")
    categories = _unique_categories(locations.column("category")) if "category" in locations.column_names else []
    report: dict[str, Any]
    if activities is not None:
        mapping = activities_from_table(categories, activities)
        report = {"source": f"table {Path(activities).name}"}
    elif activity_model is not None:
        by_encoder = activities_from_encoder(categories, encoder, progress=progress)
        mapping, stats = activities_from_llm(categories, activity_model, cache_path=activity_cache,
                                             fallback=by_encoder, progress=progress, return_stats=True)
        # agreement over the valid answers only: an invalid answer takes the encoder's activity and would agree
        answered = mapping[mapping["source"] == "llm"]
        report = {"source": f"LLM {activity_model} (invalid answers: encoder mapping)", "llm_stats": stats,
                  "agreement": compare_activity_mappings(answered, by_encoder)}
    else:
        mapping = activities_from_encoder(categories, encoder, progress=progress)
        report = {"source": f"sentence encoder {encoder or 'all-MiniLM-L6-v2'} (nearest activity description)"}
    seconds["activities"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    kg = build_knowledge_graph(prepared, mapping)
    kg.metadata["activity_mapping"] = report
    seconds["build"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    out = write_knowledge_graph(kg, out)
    seconds["write"] = round(time.perf_counter() - t0, 3)
    summary: dict[str, Any] = {"out": str(out), "knowledge_graph": kg.summary(), "activities": report}
    if transe:
        result = train_transe(kg, epochs=transe_epochs, embedding_dim=embedding_dim, seed=seed, progress=progress)
        folder = save_transe(result, out / "transe")
        seconds["transe"] = result.seconds
        summary["transe"] = {"folder": str(folder), "metrics": result.metrics, "first_loss": result.history[0],
                             "last_loss": result.history[-1], "settings": result.settings}
    summary["seconds"] = seconds
    return summary


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The options of ``mobility data kg``."""
    parser = argparse.ArgumentParser(
        prog=prog or "mobility data kg",
        description="Build the spatial-temporal knowledge graph of M3ob (users, locations, categories, activity "
        "types; visit, transition and functionality relations) from a prepared check-in dataset, write it as a "
        "dataset folder and embed it with TransE (saved to OUT/transe).",
        allow_abbrev=False,
    )
    parser.add_argument("--data", required=True, type=Path, help="prepared check-in dataset folder")
    parser.add_argument("--out", required=True, type=Path, help="output folder (replaced if it holds a dataset)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--activities", type=Path, default=None,
                        help="CSV with columns category,activity (default: sentence-encoder mapping)")
    source.add_argument("--activity-model", default=None,
                        help="causal LM (folder, alias or Hub id) that maps categories to activity types; the "
                        "encoder mapping is computed too and the agreement reported")
    parser.add_argument("--activity-cache", type=Path, default=None,
                        help="JSON cache of the LLM's answers (default: no cache)")
    parser.add_argument("--transe-epochs", type=int, default=100, help="TransE epochs (default 100)")
    parser.add_argument("--embedding-dim", type=int, default=64, help="TransE dimension (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="TransE seed (default 0)")
    parser.add_argument("--no-transe", action="store_true", help="build and write the graph only")
    return parser


def format_summary(summary: dict[str, Any]) -> str:
    """The lines ``mobility data kg`` prints for a [`make_knowledge_graph`] summary."""
    kg = summary["knowledge_graph"]
    lines = [f"wrote {summary['out']}: {kg['num_entities']:,} entities "
             f"({', '.join(f'{n:,} {t}' for t, n in kg['entities'].items())}), {kg['num_triples']:,} triples",
             "triples per relation: " + ", ".join(f"{r} {n:,}" for r, n in kg["triples"].items())]
    acts = summary["activities"]
    lines.append(f"activities: {acts['source']}")
    if "llm_stats" in acts:
        s, a = acts["llm_stats"], acts["agreement"]
        share = "n/a" if a["agreement"] is None else format(a["agreement"], ".0%")
        lines.append(f"LLM answers: {s['valid']} valid, {s['invalid']} invalid (encoder mapping used), {s['cached']} "
                     f"cached; valid answers agreeing with the encoder mapping: {share}")
    if "transe" in summary:
        t = summary["transe"]
        m = t["metrics"]
        if m:
            lines.append(f"TransE ({t['settings']['train_seconds']:.1f}s): MRR {m['transe']['mrr']:.4f} "
                         f"(random {m['random']['mrr']:.4f}), Hits@10 {m['transe']['hits@10']:.4f} "
                         f"(random {m['random']['hits@10']:.4f}) on {m['test_triples']:,} held-out triples")
        lines.append(f"embeddings: {t['folder']}")
    lines.append(f"load with: datasets.load_dataset('{summary['out']}', 'triples')")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` (the options of ``mobility data kg``) and run [`make_knowledge_graph`]; returns the summary
    (the CLI prints [`format_summary`] of it)."""
    args = build_parser().parse_args(argv)
    return make_knowledge_graph(
        args.data, args.out, activities=args.activities, activity_model=args.activity_model,
        activity_cache=args.activity_cache, transe=not args.no_transe, transe_epochs=args.transe_epochs,
        embedding_dim=args.embedding_dim, seed=args.seed,
    )
