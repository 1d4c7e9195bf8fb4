"""Frozen image features per location, with a disk cache (the image modality of M3ob, DESIGN §3.3).

:func:`location_image_features` takes one image per location (:func:`dataset_builders.location_images.location_images`:
a folder of ``<location_id>.png`` files such as the synthetic city's land-use tiles, an image column of the locations
table, or context rasters rendered from the POIs), runs a **frozen** vision transformer over them in eval mode under
``torch.inference_mode()``, and returns one float32 vector per location in table order:

- DINOv2 (the default, the prepared alias ``"dinov2-small"``: ViT-S/14, 384 dimensions) and other plain vision models
  loaded with ``AutoModel``: the ``pooler_output`` (for DINOv2 the CLS token after the final layer norm; the CLS token
  of the last hidden state for a model without a pooler).
- CLIP (a folder whose config is a ``CLIPConfig``) and other two-tower models with ``get_image_features``: the image
  embedding in the joint space (the vision tower's pooled output through the visual projection).

Images are resized through the model's own image processor to ``image_size`` pixels (shortest edge, then a centre
crop of ``image_size`` when the processor crops; both sides for processors with a fixed height and width). 112 px is
8 x 8 patches for DINOv2 and about 4 times faster than the processor's default 224 on a CPU. Models with a fixed
position grid (CLIP) interpolate their position embeddings when ``image_size`` differs from theirs.

Features are cached on disk, keyed by the encoder's identity, the image size and the SHA-256 of each image's bytes
(:meth:`~dataset_builders.location_images.LocationImages.digests`), so that a second call computes nothing and a
changed image is computed again. Layout, under ``$HF_MOBILITY_HOME/image_features`` (``HF_MOBILITY_HOME`` defaults
to ``~/.cache/hf-mobility``), the same as the text embeddings' (:mod:`train.text_encoder`, whose cache it reuses)::

    <encoder key>/model.json                     what the key stands for (model files, pooling, image size)
    <encoder key>/shard-<stamp>.emb.npy          float32 [rows, dim], append-only
    <encoder key>/shard-<stamp>.keys.npy         the images' sha256 hex digests, one per row (written last)
    <encoder key>/index.npz                      sorted digests -> (shard, row)

Every file is written atomically (a temporary name, then ``os.replace``). The key of a local model folder hashes its
path and the names, sizes and modification times of its files (weights, config, ``preprocessor_config.json``).

Example::

    from train.image_features import location_image_features

    result = location_image_features("/data/prepared", images="/data/raw/tiles")
    result.features.shape, result.present.sum(), result.source["image_source"]  # (812, 384), 812, "folder"
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from dataset_builders.location_images import ImageReadError, LocationImages, location_images
from dataset_builders.schema import OnError, check_on_error

from .text_encoder import _cache_add, _check_positive_int, _EmbeddingCache, _model_identity, _model_key

__all__ = [
    "DEFAULT_IMAGE_ENCODER",
    "LocationImageFeatures",
    "clear_encoder_pool",
    "default_cache_dir",
    "encode_location_images",
    "location_image_features",
]

logger = logging.getLogger(__name__)

#: The default frozen image encoder: the prepared alias of DINOv2-small (``mobility models prepare dinov2-small``).
DEFAULT_IMAGE_ENCODER = "dinov2-small"

_CACHE_BLOCK = 2048  # images encoded between two cache writes
_POOL_SIZE = 1
_POOL: OrderedDict[tuple, tuple[Any, Any, str]] = OrderedDict()
_POOL_LOCK = threading.Lock()


@dataclass
class LocationImageFeatures:
    """Frozen image features of the locations of a table (:func:`location_image_features`).

    Args:
        location_ids (`np.ndarray`): the location ids (object array of `str`), in table order.
        features (`np.ndarray`): float32 ``[N, dim]``, one row per location; zeros where ``present`` is false.
        present (`np.ndarray`): bool ``[N]``, whether the location had a (readable) image.
        source (`dict`): for model cards: the encoder (name as given, resolved path or Hub id, model type,
            pooling), the image size, the image source and its settings, and the counts (locations, with and
            without an image by reason, distinct images, encoded, read from the cache).
    """

    location_ids: np.ndarray
    features: np.ndarray
    present: np.ndarray
    source: dict[str, Any]

    @property
    def dim(self) -> int:
        """`int`: the feature size."""
        return int(self.features.shape[1])

    def __len__(self) -> int:
        return len(self.features)


def default_cache_dir() -> Path:
    """``$HF_MOBILITY_HOME/image_features`` (``HF_MOBILITY_HOME`` defaults to ``~/.cache/hf-mobility``)."""
    from .pretrained import hf_mobility_home

    return hf_mobility_home() / "image_features"


def clear_encoder_pool() -> None:
    """Forget the image encoder kept loaded between calls."""
    with _POOL_LOCK:
        _POOL.clear()


# --------------------------------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------------------------------


def _pooling(config) -> str:
    """``"image_features"`` for two-tower models (CLIP and alike: ``get_image_features``), else ``"pooler_output"``."""
    return "image_features" if getattr(config, "vision_config", None) is not None else "pooler_output"


def _config_image_size(config) -> int | None:
    cfg = getattr(config, "vision_config", None) or config
    size = getattr(cfg, "image_size", None)
    return size if isinstance(size, int) else None


def _feature_size(config) -> int:
    if _pooling(config) == "image_features":
        for name in ("projection_dim", "embed_dim"):
            size = getattr(config, name, None)
            if isinstance(size, int):
                return size
    for cfg in (config, getattr(config, "vision_config", None)):
        size = getattr(cfg, "hidden_size", None) if cfg is not None else None
        if isinstance(size, int):
            return size
    raise ValueError(f"cannot tell the feature size of the image encoder from its config ({type(config).__name__})")


def _load_encoder(source: str, identity: dict[str, Any], device: str) -> tuple[Any, Any, str]:
    """(model, image processor, pooling), frozen in eval mode, kept in a small pool between calls."""
    from transformers import AutoImageProcessor, AutoModel

    key = (json.dumps(identity, sort_keys=True), device)
    with _POOL_LOCK:
        if key in _POOL:
            _POOL.move_to_end(key)
            return _POOL[key]
    t0 = time.perf_counter()
    try:
        processor = AutoImageProcessor.from_pretrained(source)
        model = AutoModel.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise OSError(f"could not load the image encoder {source!r} (model and image processor): {err}") from err
    pooling = _pooling(model.config)
    if pooling == "image_features" and not hasattr(model, "get_image_features"):
        raise ValueError(f"the image encoder {source!r} ({type(model).__name__}) has no get_image_features")
    model.requires_grad_(False)
    model.eval().to(device)
    logger.info("loaded image encoder %s (%s) on %s in %.2fs", source, type(model).__name__, device,
                time.perf_counter() - t0)
    entry = (model, processor, pooling)
    with _POOL_LOCK:
        _POOL[key] = entry
        while len(_POOL) > _POOL_SIZE:
            _POOL.popitem(last=False)
    return entry


def _size_field(size, name: str):
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get(name)
    return getattr(size, name, None)


def _processor_kwargs(processor, image_size: int | None) -> dict[str, Any]:
    """Call arguments that make ``processor`` output ``image_size`` x ``image_size`` pixels (square inputs)."""
    if image_size is None:
        return {}
    size = getattr(processor, "size", None)
    kwargs: dict[str, Any] = {}
    if _size_field(size, "shortest_edge") is not None:
        kwargs["size"] = {"shortest_edge": image_size}
        if getattr(processor, "do_center_crop", False):
            kwargs["crop_size"] = {"height": image_size, "width": image_size}
    elif _size_field(size, "height") is not None:
        kwargs["size"] = {"height": image_size, "width": image_size}
        if getattr(processor, "do_center_crop", False):
            kwargs["crop_size"] = {"height": image_size, "width": image_size}
    else:
        raise ValueError(
            f"cannot set the image size of {type(processor).__name__} (size {size!r}); pass image_size=None to use "
            "its own"
        )
    return kwargs


def _accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _forward(model, pooling: str, pixel_values, interpolate: bool):
    if pooling == "image_features":
        fn = model.get_image_features
        extra = {"interpolate_pos_encoding": True} if interpolate and _accepts(fn, "interpolate_pos_encoding") else {}
        out = fn(pixel_values=pixel_values, **extra)
        return out if hasattr(out, "shape") else out.pooler_output
    extra = {"interpolate_pos_encoding": True} if interpolate and _accepts(model.forward, "interpolate_pos_encoding") else {}
    out = model(pixel_values=pixel_values, **extra)
    pooled = getattr(out, "pooler_output", None)
    return pooled if pooled is not None else out.last_hidden_state[:, 0]


def encode_location_images(
    images: LocationImages,
    rows: np.ndarray,
    model,
    processor,
    pooling: str,
    *,
    image_size: int | None,
    batch_size: int,
    device: str,
    on_error: OnError = "drop",
    bar=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Encode the images of locations ``rows`` of ``images`` with a loaded frozen encoder.

    Args:
        images (`LocationImages`): the images.
        rows (`np.ndarray`): int indices of locations with an image.
        model: the loaded model (eval mode).
        processor: its image processor.
        pooling (`str`): ``"pooler_output"`` or ``"image_features"``.
        image_size (`int`, *optional*): pixels per side fed to the model; `None` keeps the processor's.
        batch_size (`int`): images per forward pass.
        device (`str`): where the model is.
        on_error (`str`, *optional*, defaults to ``"drop"``): an image that does not decode is skipped with a warning
            (``"drop"``) or raises an :class:`ImageReadError` (``"raise"``).
        bar: a tqdm bar to advance, or `None`.

    Returns:
        `tuple`: ``(features, ok)``: float32 ``[len(rows), dim]`` (zeros where not ok) and bool ``[len(rows)]``.
    """
    import torch

    kwargs = _processor_kwargs(processor, image_size)
    config_size = _config_image_size(model.config)
    interpolate = image_size is not None and config_size is not None and image_size != config_size
    ok = np.zeros(len(rows), dtype=bool)
    out: np.ndarray | None = None
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            pil, kept = [], []
            for k, i in enumerate(chunk.tolist()):
                try:
                    pil.append(images.image(i))
                except ImageReadError as err:
                    if on_error == "raise":
                        raise
                    logger.warning("%s; counted as missing", err)
                    continue
                kept.append(start + k)
            if pil:
                batch = processor(pil, return_tensors="pt", **kwargs)
                pixel_values = batch["pixel_values"].to(device)
                feats = _forward(model, pooling, pixel_values, interpolate).float().cpu().numpy()
                if out is None:
                    out = np.zeros((len(rows), feats.shape[-1]), dtype=np.float32)
                out[kept] = feats
                ok[kept] = True
            if bar is not None:
                bar.update(len(chunk))
    if out is None:
        out = np.zeros((len(rows), _feature_size(model.config)), dtype=np.float32)
    return out, ok


# --------------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------------


def location_image_features(
    data_or_locations,
    *,
    images: str | os.PathLike | LocationImages | None = None,
    image_column: str | None = None,
    pois=None,
    encoder: str | os.PathLike = DEFAULT_IMAGE_ENCODER,
    image_size: int | None = 112,
    batch_size: int = 64,
    cache_dir: str | os.PathLike | bool | None = None,
    device: str | None = None,
    on_error: OnError = "drop",
    progress: bool = True,
) -> LocationImageFeatures:
    """Frozen image features for every location of a table, cached on disk.

    The image of each location comes from the first source that applies (see
    :func:`dataset_builders.location_images.location_images`): the folder ``images`` (``<location_id>.png`` etc.,
    e.g. the synthetic city's ``tiles/``), else the image column of the table, else a context raster of the POIs
    around the location. Locations without an image (no file, a null cell, an unreadable file) get a row of zeros and
    ``present=False``; they are counted in ``source["missing"]`` and logged with a warning.

    Args:
        data_or_locations (`PreparedDataset`, `str`, `os.PathLike`, `pd.DataFrame` or `pa.Table`):
            A prepared check-in dataset (or its folder) or a locations table with ``location_id`` (and ``latitude``,
            ``longitude``, ``category`` for context rasters).
        images (`str`, `os.PathLike` or `LocationImages`, *optional*):
            A folder of images named by location id, or images already built (e.g.
            :func:`~dataset_builders.location_images.context_raster_images` with other settings).
        image_column (`str`, *optional*):
            The image column of the table (a ``datasets.Image`` struct, bytes or paths); found by itself when there
            is one.
        pois (`pd.DataFrame` or `pa.Table`, *optional*):
            The POIs drawn into context rasters; defaults to the locations themselves.
        encoder (`str` or `os.PathLike`, *optional*, defaults to ``"dinov2-small"``):
            A local model folder, a prepared alias or a Hub id (:func:`train.pretrained.resolve_model`), with an image
            processor. DINOv2 and other vision models give their ``pooler_output``; CLIP gives its image embedding.
        image_size (`int`, *optional*, defaults to 112):
            Pixels per side fed to the encoder (for DINOv2 best a multiple of its 14-pixel patches); `None` keeps the
            image processor's own resize and crop. Part of the cache key.
        batch_size (`int`, *optional*, defaults to 64):
            Images per forward pass.
        cache_dir (`str`, `os.PathLike` or `bool`, *optional*):
            Root of the feature cache; `None` (or `True`) uses ``$HF_MOBILITY_HOME/image_features``
            (:func:`default_cache_dir`), `False` disables it.
        device (`str`, *optional*):
            Where the encoder runs; defaults to ``"cuda"`` when available, else ``"cpu"``.
        on_error (`str`, *optional*, defaults to ``"drop"``):
            An unreadable image counts as missing with a warning naming its file (``"drop"``), or raises an
            :class:`~dataset_builders.location_images.ImageReadError` (``"raise"``).
        progress (`bool`, *optional*, defaults to `True`):
            Show a tqdm progress bar while encoding (only on a terminal).

    Returns:
        `LocationImageFeatures`: ``features`` float32 ``[N, dim]`` in table order, ``present`` bool ``[N]``,
        ``source`` (a dict for the model card) and ``dim``.

    Raises:
        `OSError`: the encoder cannot be resolved or loaded.
        `ValueError`: bad arguments, or a table without ``location_id``.
        `ImageReadError`: an unreadable image with ``on_error="raise"``.
    """
    from transformers import AutoConfig

    from .pretrained import resolve_model

    check_on_error(on_error)
    batch_size = _check_positive_int("batch_size", batch_size)
    if image_size is not None:
        image_size = _check_positive_int("image_size", image_size)
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike, bool)):
        raise ValueError(f"cache_dir must be a folder, None (the default folder) or False (no cache), got {cache_dir!r}")
    imgs = location_images(data_or_locations, images=images, image_column=image_column, pois=pois, on_error=on_error)
    # a copy: images that fail to decode are dropped from it, not from the caller's LocationImages
    imgs = replace(imgs, items=list(imgs.items), origins=list(imgs.origins), missing=dict(imgs.missing))
    source = resolve_model(encoder, progress=progress)
    local = os.path.isdir(source)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise OSError(f"could not read the config of the image encoder {source!r}: {err}") from err
    pooling = _pooling(config)
    identity = _model_identity(source, local, 0, "float32")
    identity.pop("max_length", None)
    identity.update({"modality": "image", "pooling": pooling, "image_size": image_size})
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"

    t0 = time.perf_counter()
    digests = imgs.digests()
    rows = np.flatnonzero(imgs.present)
    uniq, first, inverse = np.unique(digests[rows], return_index=True, return_inverse=True)
    uniq_rows = rows[first]  # one location per distinct image

    cache = None
    if cache_dir is not False:
        root = default_cache_dir() if cache_dir is None or cache_dir is True else Path(cache_dir).expanduser()
        try:
            cache = _EmbeddingCache(root / _model_key(source, identity), identity)
        except OSError as err:
            logger.warning("image feature cache disabled: cannot use %s (%s)", root, err)

    found = np.zeros(len(uniq), dtype=bool)
    uniq_feat: np.ndarray | None = None
    if cache is not None:
        found, uniq_feat = cache.lookup(uniq)
    ok = found.copy()
    todo = np.flatnonzero(~found)
    if len(todo):
        from tqdm.auto import tqdm

        model, processor, pooling = _load_encoder(source, identity, device)
        with tqdm(total=len(todo), desc="encoding images", unit="img", disable=not progress or None) as bar:
            for start in range(0, len(todo), _CACHE_BLOCK):
                block = todo[start : start + _CACHE_BLOCK]
                fresh, good = encode_location_images(
                    imgs, uniq_rows[block], model, processor, pooling, image_size=image_size, batch_size=batch_size,
                    device=device, on_error=on_error, bar=bar,
                )
                if uniq_feat is None:
                    uniq_feat = np.zeros((len(uniq), fresh.shape[1]), dtype=np.float32)
                elif uniq_feat.shape[1] != fresh.shape[1]:
                    raise ValueError(
                        f"cached image features of {source!r} have size {uniq_feat.shape[1]} but the encoder gives "
                        f"{fresh.shape[1]}; delete its folder under the cache"
                    )
                uniq_feat[block] = fresh
                ok[block] = good
                if cache is not None and good.any():
                    cache = _cache_add(cache, uniq[block][good], fresh[good])
    elif cache is not None:
        try:
            cache.save_index()
        except OSError as err:
            logger.warning("could not update the image feature index in %s (%s)", cache.folder, err)
    dim = uniq_feat.shape[1] if uniq_feat is not None else _feature_size(config)

    # Images that did not decode: the locations that share them lose their image.
    for u in np.flatnonzero(~ok).tolist():
        for i in rows[inverse == u].tolist():
            imgs.drop(i, "unreadable")
    features = np.zeros((len(imgs), dim), dtype=np.float32)
    present = imgs.present
    if uniq_feat is not None and len(rows):
        keep = ok[inverse]
        features[rows[keep]] = uniq_feat[inverse[keep]]
    encoded = int(len(todo))
    info = {
        "encoder": os.fspath(encoder),
        "encoder_path": source,
        "model_type": getattr(config, "model_type", None),
        "pooling": pooling,
        "image_size": image_size,
        "dim": int(dim),
        "frozen": True,
        **imgs.describe(),
        "num_unique_images": int(len(uniq)),
        "num_encoded": encoded,
        "num_cached": int(found.sum()),
    }
    logger.info(
        "image features of %d locations (%d with an image; %d distinct images: %d encoded, %d from cache) with %s at "
        "%s px in %.2fs", len(imgs), int(present.sum()), len(uniq), encoded, int(found.sum()), source, image_size,
        time.perf_counter() - t0,
    )
    return LocationImageFeatures(location_ids=imgs.location_ids, features=features, present=present, source=info)
