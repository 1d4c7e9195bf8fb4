"""Llama-3-8B-Mob runs (DESIGN §5.2): the model card, and prediction / evaluation of a run folder of `train/sft.py`
trained on the `humob-qa` instruction rows.

```bash
mobility data instructions --task humob-qa --data runs/demo/data/grid_qa --out runs/demo/humob_qa
mobility train sft --config train/recipes/llamamob_demo.yaml --instructions runs/demo/humob_qa \\
    --output_dir runs/demo/llamamob
mobility predict runs/demo/llamamob --data runs/demo/data/grid_qa --split test --out predictions.csv
mobility evaluate runs/demo/llamamob --data runs/demo/data/grid_qa [--predictions predictions.csv]
```

A run folder holds `model/` (safetensors; LoRA runs merged), `tokenizer/` (with its chat template),
`instructions/` (the Q&A rows it was trained on, whose prompts are reused for prediction), `recipe.yaml`,
`run_info.json` and `README.md`. Prediction answers every asked (day, slot) exactly once: answers are parsed
tolerantly and missing or unusable slots are filled from the per-user slot-mode baseline, with every repair counted
(`train.humob`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .evaluate import write_json_atomic, write_text_atomic

__all__ = ["CITATION", "build_model_card", "evaluate_llamamob_run", "predict_llamamob_run", "read_run_info"]

logger = logging.getLogger(__name__)

METHOD = "llamamob-sft"
CITATION = """@article{tang2024llamamob,
  title   = {Instruction-Tuning Llama-3-8B Excels in City-Scale Mobility Prediction},
  author  = {Tang, Peizhi and others},
  journal = {arXiv preprint arXiv:2410.23692},
  year    = {2024},
  url     = {https://arxiv.org/abs/2410.23692}
}"""


def read_run_info(run_dir: str | os.PathLike) -> tuple[Path, dict]:
    """`(run folder, run_info.json)` of a Llama-3-8B-Mob run; a clear error for anything else."""
    run = Path(run_dir)
    info_file = run / "run_info.json"
    if not info_file.is_file():
        raise FileNotFoundError(f"{run} is not a training run folder (no run_info.json); train one with "
                                "`mobility train sft --config train/recipes/llamamob_demo.yaml`")
    info = json.loads(info_file.read_text(encoding="utf-8"))
    if info.get("method") != METHOD:
        raise ValueError(f"{run} is a {info.get('method')!r} run, not a Llama-3-8B-Mob ({METHOD}) run")
    for sub in ("model", "tokenizer"):
        if not (run / sub).is_dir():
            raise FileNotFoundError(f"{run} has no {sub}/ folder (an unfinished or partly copied run)")
    return run, info


def _instructions_dir(run: Path, info: dict) -> Path:
    from .push import _find_instructions

    folder = _find_instructions(info, run)
    if folder is not None:
        return folder
    raise FileNotFoundError(f"{run}: neither instructions/ nor the instruction dataset named in run_info.json "
                            f"({info.get('instructions')}) exists; the prompts to answer come from there")


def _load(run: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(run / "model", dtype="auto").to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "tokenizer")
    return model, tokenizer


def predict_llamamob_run(
    run_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    *,
    split: str = "test",
    out_csv: str | os.PathLike | None = None,
    batch_size: int = 16,
    max_users: int | None = None,
    constrained: bool = True,
    cells: str = "grid",
    progress: bool = True,
):
    """Answer the `split` prompts of the run's instruction dataset with its model and fill every asked slot.

    Args:
        run_dir: a run folder of `train/sft.py` on `humob-qa` rows.
        data_dir: the prepared grid dataset the instructions were built from (the fallback baseline reads it).
        split: the split to predict (`test`, `validation`, or `hidden` for HuMob-style hidden users).
        out_csv: where to write `uid,d,t,x,y` (default `RUN/predictions_{split}.csv`).
        batch_size: prompts per generation batch (1 = unbatched).
        max_users: only the first users of the split (quick looks).
        constrained: grammar-constrained decoding (default; the model writes only the cells of the asked slots);
            `False` decodes freely as the paper does (see [`train.humob.predict_grid`]).
        cells: which cells a constrained answer may hold: `"grid"` or `"history"` (the cells of the user's records in
            its prompt; see [`train.humob.predict_grid`]).
        progress: show a progress bar over the batches.

    Returns:
        `(pd.DataFrame, dict)`: the predictions and the report (counts of parsed, filled and dropped slots, timings),
        also written to `RUN/prediction_report_{split}.json`.
    """
    from .humob import predict_grid

    run, info = read_run_info(run_dir)
    model, tokenizer = _load(run)
    out_csv = Path(out_csv) if out_csv is not None else run / f"predictions_{split}.csv"
    predictions, report = predict_grid(
        model, tokenizer, data_dir, split=split, instructions_dir=_instructions_dir(run, info),
        batch_size=batch_size, max_users=max_users, constrained=constrained, cells=cells, progress=progress,
        out_csv=out_csv,
        on_missing_prompt="fallback",  # users the builder dropped (over the token budget) get the baseline, counted
    )
    report = {**report, "run": str(run), "predictions": str(out_csv)}
    write_json_atomic(report, run / f"prediction_report_{split}.json")
    return predictions, report


def evaluate_llamamob_run(
    run_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    *,
    split: str = "test",
    predictions: str | os.PathLike | None = None,
    batch_size: int = 16,
    constrained: bool = True,
    cells: str = "grid",
    progress: bool = True,
) -> dict:
    """GEO-BLEU (N = 5 and 3) and DTW of a run's predictions on `split`, with the slot-mode baseline beside them.

    Predicts first (see [`predict_llamamob_run`]) unless `predictions` names a `uid,d,t,x,y` CSV. Writes
    `RUN/metrics.json`, records the metrics in `run_info.json` and refreshes the model card.
    """
    from .humob import evaluate_grid_predictions

    run, info = read_run_info(run_dir)
    prediction_report = None
    if predictions is None:
        frame, prediction_report = predict_llamamob_run(run, data_dir, split=split, batch_size=batch_size,
                                                        constrained=constrained, cells=cells, progress=progress)
        source = frame
    else:
        source = Path(predictions)
    report = evaluate_grid_predictions(source, data_dir, split=split, name=info.get("name", "llamamob"),
                                       input_days=run_input_days(run))
    if prediction_report is not None:
        report["prediction"] = prediction_report
    write_json_atomic(report, run / "metrics.json")
    name = next(iter(report["results"]))
    info.setdefault("metrics", {})[split] = report["results"][name]
    write_json_atomic(info, run / "run_info.json")
    recipe = (run / "recipe.yaml").read_text(encoding="utf-8") if (run / "recipe.yaml").is_file() else None
    write_text_atomic(build_model_card(info, metrics=report, recipe=recipe, run_dir=run), run / "README.md")
    return report


def run_input_days(run_dir: str | os.PathLike) -> tuple[int, int] | None:
    """The input days `(first, last)` of the humob-qa prompts a run was trained on (its `instructions/` metadata), or
    `None` when the run does not record them."""
    from dataset_builders.instructions.humob_qa import built_config

    try:
        first, last = (int(v) for v in (built_config(Path(run_dir) / "instructions") or {})["input_days"])
    except (KeyError, TypeError, ValueError):
        return None
    return first, last


def build_model_card(info: dict, *, metrics: dict | None = None, recipe: str | None = None,
                     run_dir: str | os.PathLike | None = None, repo_id: str | None = None) -> str:
    """The model card (`README.md`) of a Llama-3-8B-Mob run: metadata, what it does, metrics, usage, citation."""
    from huggingface_hub import ModelCardData

    from .evaluate import format_results_table

    base = info.get("base_model")
    card_data = ModelCardData(
        library_name="transformers", pipeline_tag="text-generation",
        tags=["hf-mobility", "mobility", "trajectory-prediction", "llama-3-8b-mob"],
        base_model=base if base and base != "tiny-llama" and not Path(base).exists() else None,
    )
    title = repo_id.split("/")[-1] if repo_id else info.get("name", "Llama-3-8B-Mob model")
    parts = [f"---\n{card_data.to_yaml()}\n---", "", f"# {title}", "",
             "A causal language model instruction-tuned with the `hf-mobility` library following Llama-3-8B-Mob "
             "([arXiv 2410.23692](https://arxiv.org/abs/2410.23692)): long-term trajectory prediction as question "
             "answering on a grid city (HuMob / YJMob100K format). The prompt lists a user's observed records "
             "`d t x y` (day, 30-minute slot, grid cell) and the slots to predict as `d t 999 999`; the model answers "
             "JSON `{\"prediction\": [[d, t, x, y], ...]}`.", ""]
    facts = []
    if base:
        what = "a tiny Llama trained from scratch" if base == "tiny-llama" else f"`{base}`"
        facts.append(f"- Base model: {what}" + (" (LoRA, merged)" if info.get("peft") else ""))
    if info.get("train_rows") is not None:
        facts.append(f"- Training rows (users x windows): {info['train_rows']:,}")
    if info.get("global_step") is not None:
        facts.append(f"- Optimizer steps: {info['global_step']}")
    if facts:
        parts += ["## Training", "", *facts, ""]
    parts += ["## Evaluation", ""]
    if metrics and metrics.get("results"):
        parts += [f"GEO-BLEU (N = 5, and N = 3 as in HuMob'24 reports; higher is better) and DTW (lower is better) on "
                  f"the `{metrics.get('split', 'test')}` users, beside the per-user slot-mode baseline on the same "
                  "slots (over every input day; `slot-mode (days a-b)`: fitted on the model's input window alone). "
                  "Unanswered slots are filled from that baseline and counted.", "",
                  format_results_table(metrics), ""]
        pred = metrics.get("prediction") or {}
        if pred.get("asked_slots"):
            parts += [f"Of {pred['asked_slots']:,} asked slots, {pred.get('filled', 0):,} were filled from the "
                      "baseline (missing or unusable in the answers).", ""]
    else:
        parts += ["No evaluation was run for this model (`mobility evaluate RUN --data DATA` writes one).", ""]
    ref = Path(run_dir).as_posix() if run_dir is not None else (repo_id or "path/to/this/folder")
    model_ref, tok_ref = (f"{ref}/model", f"{ref}/tokenizer") if run_dir is not None else (ref, ref)
    parts += ["## How to use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'model = AutoModelForCausalLM.from_pretrained("{model_ref}")',
              f'tokenizer = AutoTokenizer.from_pretrained("{tok_ref}")',
              "messages = [...]  # system + user messages of a humob-qa row",
              "ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
              "return_dict=True)",
              "answer = tokenizer.decode(model.generate(**ids, max_new_tokens=4096)[0, ids[\"input_ids\"].shape[1]:], "
              "skip_special_tokens=True)", "```", ""]
    if run_dir is not None:
        parts += ["`mobility predict RUN --data DATA` does this for a whole split, batched, and repairs the answers.",
                  ""]
    if recipe:
        parts += ["## Recipe", "", "```yaml", recipe.rstrip(), "```", ""]
    parts += ["## Citation", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(parts)
