"""Publish a training run of `mobility train sft` (QT-Mob, or Llama-3-8B-Mob with its own card) on the Hugging Face Hub (DESIGN §7).

```bash
mobility push runs/demo/sft --repo-id USER/qtmob-demo            # model repo + USER/qtmob-demo-instructions
mobility push runs/demo/sft --repo-id USER/qtmob-demo --private --dataset-repo-id USER/nyc-instructions
```

The run folder is first *staged* (:func:`stage_run`) into the exact folders that are uploaded:

- ``model/``: the model files and the `LocationTokenizer` files side by side at the root, so one repo serves both
  ``AutoModelForCausalLM.from_pretrained(repo)`` and ``AutoTokenizer.from_pretrained(repo, trust_remote_code=True)``;
  the RQ-VAE location quantizer under ``rqvae/`` (``AutoModel.from_pretrained(repo, subfolder="rqvae",
  trust_remote_code=True)``); ``training_curve.png``, ``recipe.yaml``, ``metrics.json`` when present; and a model
  card ``README.md`` (metadata, metrics table beside the baselines, how to load, the recipe, the citation).
- ``instructions/``: a copy of the instruction dataset folder (Hub layout, ``load_dataset(repo, "next")``).

Checkpoints (``checkpoint-*``), ``adapter/`` and ``base_model/`` are never staged. :func:`push_run` then creates the
repos and uploads each folder in one commit with :class:`huggingface_hub.HfApi`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "CITATION",
    "build_model_card",
    "format_metrics_table",
    "push_cli",
    "push_run",
    "stage_run",
    "validate_repo_id",
]

logger = logging.getLogger(__name__)

CITATION = """@article{chen2025qtmob,
  title   = {Enhancing Large Language Models for Mobility Analytics with Semantic Location Tokenization},
  author  = {Chen, Yile and others},
  journal = {arXiv preprint arXiv:2506.11109},
  year    = {2025},
  url     = {https://arxiv.org/abs/2506.11109}
}"""

DEFAULT_COMMIT_MESSAGE = "Upload QT-Mob run with hf-mobility"
STAGED_NAMES = ("model", "instructions")
NEVER_UPLOADED = ("checkpoint-*", "adapter", "base_model")
RUN_EXTRAS = ("training_curve.png", "recipe.yaml", "metrics.json")
_RANKING_COLUMNS = ("acc@1", "acc@5", "acc@10", "acc@20", "mrr", "ndcg@5", "ndcg@10")
_HEADERS = {"acc@1": "Acc@1", "acc@5": "Acc@5", "acc@10": "Acc@10", "acc@20": "Acc@20", "mrr": "MRR",
            "ndcg@5": "NDCG@5", "ndcg@10": "NDCG@10"}
_NAME_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"^{_NAME_PART}/{_NAME_PART}$")
_IGNORED_FILES = {"README.md", ".gitattributes", ".DS_Store"}
_TASK_NAMES = {"next": "next-location prediction", "recovery": "mobility recovery", "alignment": "location alignment",
               "translation": "trajectory translation"}


def validate_repo_id(repo_id: Any, name: str = "repo_id") -> str:
    """Return ``repo_id`` if it is a Hub ``"user/name"`` id, else raise a `ValueError` naming ``name``."""
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id:
        raise ValueError(
            f"`{name}` must be a Hub repo id of the form 'user/name' (letters, digits, '-', '_', '.'), got {repo_id!r}"
        )
    return repo_id


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"could not read {path} as JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _check_run(run_dir: str | os.PathLike) -> tuple[Path, dict]:
    run = Path(run_dir)
    if not run.is_dir():
        raise ValueError(f"`run_dir` {str(run)!r} is not a folder (expected the output folder of `mobility train sft`)")
    info_file = run / "run_info.json"
    if not info_file.is_file() and not (run / "model").is_dir():
        raise ValueError(
            f"`run_dir` {str(run)!r} is not a training run folder (no run_info.json and no model/); "
            "train one with `mobility train sft`"
        )
    if not (run / "model" / "config.json").is_file():
        raise ValueError(f"`run_dir` {str(run)!r} has no model/ folder with a config.json; the run did not finish")
    info = _read_json(info_file) if info_file.is_file() else {}
    return run, info


def _copy_files(src: Path, dst: Path, *, skip: set[str] = _IGNORED_FILES) -> None:
    """Copy the content of ``src`` into ``dst`` (files overwrite), skipping never-uploaded folders."""
    for entry in sorted(src.iterdir()):
        if entry.name in skip or entry.name.startswith(".") or _never_uploaded(entry.name):
            continue
        if entry.is_dir():
            shutil.copytree(entry, dst / entry.name, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", ".*", *NEVER_UPLOADED))
        elif entry.is_file():
            shutil.copy2(entry, dst / entry.name)


def _never_uploaded(name: str) -> bool:
    return name.startswith("checkpoint-") or name in ("adapter", "base_model", "__pycache__")


def _find_rqvae(info: dict, run: Path | None = None) -> Path | None:
    if run is not None and (run / "rqvae" / "config.json").is_file():  # the run's own copy (`mobility train sft`)
        return run / "rqvae"
    if info.get("location_format") == "id":
        return None
    loctok = info.get("location_tokenizer")
    if not loctok:
        return None
    folder = Path(loctok)
    # run_info may name the output folder of `mobility train location-tokenizer` or its tokenizer/ subfolder
    for candidate in (folder / "rqvae", folder.parent / "rqvae"):
        if (candidate / "config.json").is_file():
            return candidate
    logger.warning("no RQ-VAE (rqvae/config.json) found beside location tokenizer %s; the model repo will lack it",
                   loctok)
    return None


def _find_instructions(info: dict, run: Path | None = None) -> Path | None:
    if run is not None and (run / "instructions" / "README.md").is_file():  # the run's own copy
        return run / "instructions"
    path = info.get("instructions")
    if not path:
        return None
    folder = Path(path)
    if folder.is_dir() and (folder / "README.md").is_file():
        return folder
    logger.warning("instruction dataset %s named in run_info.json is missing; it will not be uploaded", path)
    return None


def _hub_base_model(info: dict) -> str | None:
    base = info.get("base_model")
    if isinstance(base, str) and _REPO_ID.match(base) and not Path(base).exists():
        return base
    return None


def format_metrics_table(metrics: dict) -> str:
    """A Markdown table of the ``results`` of a ``metrics.json`` (ranking metrics x100), the model first."""
    results = metrics.get("results") if isinstance(metrics, dict) else None
    if not isinstance(results, dict) or not results:
        raise ValueError("`metrics` must hold a non-empty 'results' mapping {model_name: {metric: value}}")
    first = next(iter(results.values()))
    cols = [c for c in _RANKING_COLUMNS if c in first]
    scale = 100.0
    if not cols:  # not a ranking report (e.g. trajectory generation): show every numeric metric as is
        cols = [k for k, v in first.items() if isinstance(v, (int, float)) and not k.startswith("num_")]
        scale = 1.0
    lines = ["| model | " + " | ".join(_HEADERS.get(c, c) for c in cols) + " | samples |",
             "|---|" + "---:|" * (len(cols) + 1)]
    for i, (name, res) in enumerate(results.items()):
        cells = []
        for c in cols:
            value = res.get(c) if isinstance(res, dict) else None
            cells.append(f"{scale * value:.2f}" if isinstance(value, (int, float)) else "–")
        samples = res.get("num_samples", res.get("num_users")) if isinstance(res, dict) else None
        label = f"**{name}** (this model)" if i == 0 else name
        samples_cell = f"{samples:,}" if isinstance(samples, int) else "–"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {samples_cell} |")
    return "\n".join(lines)


def build_model_card(
    info: dict,
    *,
    repo_id: str | None = None,
    metrics: dict | None = None,
    recipe: str | None = None,
    dataset_repo_id: str | None = None,
    has_rqvae: bool = False,
    run_dir: str | os.PathLike | None = None,
) -> str:
    """The model card (``README.md``) of a staged run: YAML metadata then Markdown.

    With ``run_dir`` the card describes the run folder itself (``model/``, ``tokenizer/``, ``rqvae/`` and
    ``instructions/`` subfolders) instead of the flat layout of the Hub repo.
    """
    from huggingface_hub import ModelCardData

    base_model = _hub_base_model(info)
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["hf-mobility", "mobility", "qt-mob"],
        datasets=[dataset_repo_id] if dataset_repo_id else None,
        base_model=base_model,
    )
    ref = repo_id or "path/to/this/folder"
    parts = [f"---\n{card_data.to_yaml()}\n---", ""]
    if info.get("location_format") == "id":
        how = ("every location is written as one plain ID token (`<loc_123>`; QT-Mob's ablation without semantic "
               "codes)")
    else:
        how = ("every location is written as a short sequence of semantic code tokens (`<a_3><b_17>...`) learned by "
               "an RQ-VAE over location descriptions")
    tasks = ", ".join(_TASK_NAMES.get(t, t) for t in info.get("tasks") or ("next", "recovery", "alignment"))
    parts += [
        f"# {repo_id.split('/')[-1] if repo_id else 'QT-Mob model'}",
        "",
        "A causal language model fine-tuned with the `hf-mobility` library following QT-Mob "
        f"([arXiv 2506.11109](https://arxiv.org/abs/2506.11109)): {how}, and the model is instruction-tuned on "
        f"{tasks}.",
        "",
    ]
    facts = []
    if info.get("base_model"):
        facts.append(f"- Base model: `{info['base_model']}`" + (" (LoRA, merged)" if info.get("peft") else ""))
    if info.get("tasks"):
        facts.append("- Tasks: " + ", ".join(f"`{t}`" for t in info["tasks"]))
    if info.get("train_rows") is not None:
        facts.append(f"- Training rows: {info['train_rows']:,}" if isinstance(info["train_rows"], int)
                     else f"- Training rows: {info['train_rows']}")
    if info.get("global_step") is not None:
        facts.append(f"- Optimizer steps: {info['global_step']}")
    if dataset_repo_id:
        facts.append(f"- Instruction data: [{dataset_repo_id}](https://huggingface.co/datasets/{dataset_repo_id})")
    if facts:
        parts += ["## Training", "", *facts, ""]

    parts += ["## Evaluation", ""]
    if metrics and isinstance(metrics.get("results"), dict) and metrics["results"]:
        split = metrics.get("split", "test")
        parts += [f"Next-location prediction on the `{split}` split (ranking metrics x100; the model ranks "
                  f"locations by beam search constrained to valid codes, with the baselines on the same samples).", "",
                  format_metrics_table(metrics), ""]
    else:
        parts += ["No evaluation was run for this model (`mobility evaluate RUN --data DATA` writes one).", ""]

    if run_dir is not None:
        ref = Path(run_dir).as_posix()
        model_ref, tok_ref = f"{ref}/model", f"{ref}/tokenizer"
        rqvae_args = f'"{ref}/rqvae"'
    else:
        model_ref = tok_ref = ref
        rqvae_args = f'"{ref}", subfolder="rqvae"'
    load = [
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{model_ref}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{tok_ref}", trust_remote_code=True)  # LocationTokenizer',
    ]
    if has_rqvae:
        load += [
            "",
            "from transformers import AutoModel",
            "",
            f"rqvae = AutoModel.from_pretrained({rqvae_args}, trust_remote_code=True)  # RQ-VAE",
        ]
    if run_dir is not None:
        load += ["", "from datasets import load_dataset", "",
                 f'instructions = load_dataset("{ref}/instructions", "next")  # the instruction sets it was trained on']
    load += ["```"]
    parts += [
        "## How to use",
        "",
        "The tokenizer and the RQ-VAE are custom code shipped in this repo, so they load with "
        "`trust_remote_code=True` (pin `revision=` to a commit you have reviewed).",
        "",
        *load,
        "",
    ]
    if recipe:
        parts += ["## Recipe", "", "```yaml", recipe.rstrip(), "```", ""]
    parts += ["## Citation", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(parts)


def _stage_model(run: Path, info: dict, out: Path, *, repo_id: str | None, dataset_repo_id: str | None) -> None:
    out.mkdir()
    _copy_files(run / "model", out)
    tokenizer_dir = run / "tokenizer"
    if tokenizer_dir.is_dir():
        _copy_files(tokenizer_dir, out)  # tokenizer files win over any copy saved with the model
    else:
        logger.warning("%s has no tokenizer/ folder; the model repo carries only the tokenizer files in model/", run)
    rqvae = _find_rqvae(info, run)
    if rqvae is not None:
        (out / "rqvae").mkdir(exist_ok=True)
        _copy_files(rqvae, out / "rqvae")
    for name in RUN_EXTRAS:
        if (run / name).is_file():
            shutil.copy2(run / name, out / name)
    metrics = _read_json(run / "metrics.json") if (run / "metrics.json").is_file() else None
    recipe = (run / "recipe.yaml").read_text(encoding="utf-8") if (run / "recipe.yaml").is_file() else None
    if recipe is not None:
        yaml.safe_load(recipe)  # fail early on a broken recipe rather than publish it
    if info.get("method") == "llamamob-sft":  # a Llama-3-8B-Mob run: its own card (no location codes, grid metrics)
        from .llamamob import build_model_card as build_llamamob_card

        card = build_llamamob_card(info, metrics=metrics, recipe=recipe, repo_id=repo_id)
    else:
        card = build_model_card(info, repo_id=repo_id, metrics=metrics, recipe=recipe,
                                dataset_repo_id=dataset_repo_id, has_rqvae=rqvae is not None)
    (out / "README.md").write_text(card, encoding="utf-8")


def stage_run(
    run_dir: str | os.PathLike,
    staging_dir: str | os.PathLike,
    *,
    repo_id: str | None = None,
    dataset_repo_id: str | None = None,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Build, atomically, the folders that :func:`push_run` uploads; returns ``{"model": dir, "instructions": dir}``.

    ``instructions`` is present only when ``run_info.json`` names an instruction dataset folder that exists.
    ``repo_id`` / ``dataset_repo_id`` only feed the model card (load snippet, dataset link). An existing non-empty
    ``staging_dir`` is replaced only with ``overwrite=True`` and only if it holds nothing but staged folders.
    """
    run, info = _check_run(run_dir)
    if repo_id is not None:
        validate_repo_id(repo_id)
    if dataset_repo_id is not None:
        validate_repo_id(dataset_repo_id, "dataset_repo_id")
    staging = Path(staging_dir)
    if staging.exists():
        if not staging.is_dir():
            raise ValueError(f"`staging_dir` {str(staging)!r} exists and is not a folder")
        entries = [p.name for p in staging.iterdir()]
        if entries and not overwrite:
            raise ValueError(f"`staging_dir` {str(staging)!r} is not empty; pass overwrite=True to replace it")
        if any(name not in STAGED_NAMES for name in entries):
            raise ValueError(f"`staging_dir` {str(staging)!r} holds files other than {STAGED_NAMES}; refusing to "
                             "replace it")
    instructions = _find_instructions(info, run)
    if instructions is not None and dataset_repo_id is None and repo_id is not None:
        dataset_repo_id = f"{repo_id}-instructions"

    staging.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{staging.name}.tmp-", dir=staging.parent))
    try:
        _stage_model(run, info, tmp / "model", repo_id=repo_id, dataset_repo_id=dataset_repo_id)
        if instructions is not None:
            shutil.copytree(instructions, tmp / "instructions", ignore=shutil.ignore_patterns(".*", "__pycache__"))
        if staging.exists():
            shutil.rmtree(staging)
        os.replace(tmp, staging)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    staged = {name: staging / name for name in STAGED_NAMES if (staging / name).is_dir()}
    logger.info("staged %s into %s", ", ".join(staged), staging)
    return staged


def _list_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _network_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import OfflineModeIsEnabled

    errors: list[type[BaseException]] = [OfflineModeIsEnabled, ConnectionError, TimeoutError]
    try:
        import httpx2

        errors.append(httpx2.TransportError)
    except ImportError:  # pragma: no cover - huggingface_hub < 2 uses httpx
        pass
    try:
        import httpx

        errors.append(httpx.TransportError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def _upload(api, folder: Path, repo_id: str, repo_type: str, *, private: bool, commit_message: str) -> dict:
    api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type=repo_type,
                               commit_message=commit_message)
    commit_url = getattr(commit, "commit_url", None)
    return {
        "repo_id": repo_id,
        "repo_type": repo_type,
        "files": _list_files(folder),
        "commit_url": commit_url if isinstance(commit_url, str) else None,
    }


def push_run(
    run_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    api=None,
    dataset_repo_id: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
) -> dict:
    """Stage a run folder and upload it: the model repo ``repo_id`` and the dataset repo of its instructions.

    The instructions go to ``dataset_repo_id`` (default ``f"{repo_id}-instructions"``). Returns
    ``{"model": {"repo_id", "repo_type", "files", "commit_url"}, "instructions": {...} or None}`` where ``files``
    are the paths in the repo. ``api`` defaults to ``HfApi(token=token)``.
    """
    validate_repo_id(repo_id)
    if dataset_repo_id is not None:
        validate_repo_id(dataset_repo_id, "dataset_repo_id")
    if not isinstance(commit_message, str) or not commit_message.strip():
        raise ValueError(f"`commit_message` must be a non-empty string, got {commit_message!r}")
    run, info = _check_run(run_dir)
    instructions_id = (dataset_repo_id or f"{repo_id}-instructions") if _find_instructions(info, run) else None
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="hf-mobility-push-") as tmp:
        staged = stage_run(run_dir, Path(tmp) / "staged", repo_id=repo_id, dataset_repo_id=instructions_id)
        summary: dict[str, Any] = {"model": None, "instructions": None}
        try:
            summary["model"] = _upload(api, staged["model"], repo_id, "model", private=private,
                                       commit_message=commit_message)
            if instructions_id and "instructions" in staged:
                summary["instructions"] = _upload(api, staged["instructions"], instructions_id, "dataset",
                                                  private=private, commit_message=commit_message)
        except _network_errors() as err:
            raise ValueError(
                f"could not push `run_dir` {str(run_dir)!r} to `repo_id` {repo_id!r}: the Hub could not be reached "
                f"({type(err).__name__}: {err}). Check the network, and unset HF_HUB_OFFLINE if it is set "
                f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '')!r})."
            ) from err
    logger.info("pushed %s to %s%s", run_dir, repo_id,
                f" and {instructions_id}" if summary["instructions"] else "")
    return summary


def push_cli(run_dir: str | os.PathLike, repo_id: str, private: bool = False,
             dataset_repo_id: str | None = None) -> dict:
    """Entry point of ``mobility push RUN_DIR --repo-id USER/NAME``: push and print a short summary."""
    summary = push_run(run_dir, repo_id, private=private, dataset_repo_id=dataset_repo_id)
    for key in ("model", "instructions"):
        part = summary.get(key)
        if part:
            prefix = "datasets/" if part["repo_type"] == "dataset" else ""
            print(f"{key}: https://huggingface.co/{prefix}{part['repo_id']} ({len(part['files'])} files)")
    return summary
