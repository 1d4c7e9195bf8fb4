"""Llama-3-8B-Mob through the public CLI on a tiny grid city: humob-qa instructions -> SFT (demo recipe, a few steps)
-> predict -> evaluate, the run folder reloading in a fresh interpreter, and the error paths."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from train.cli import main
from train.llamamob import run_input_days
from train.sft import load_recipe

RECIPE = "train/recipes/llamamob_demo.yaml"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 30-user grid city, its humob-qa rows (7 days in, 1 out, 2 windows per training user, each with a shifted copy;
    spaced answers) and a 4-step run."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("llamamob")
    assert main(["-q", "data", "synth", "--kind", "grid", "--users", "30", "--days", "20", "--out",
                 str(root / "raw")]) == 0
    assert main(["-q", "data", "prepare", "--format", "yjmob", "--input", str(root / "raw" / "grid.csv"),
                 "--out", str(root / "data"), "--predict-days", "18-18", "--user-fractions", "0.6,0.2,0.2"]) == 0
    assert main(["-q", "data", "instructions", "--task", "humob-qa", "--data", str(root / "data"), "--out",
                 str(root / "qa"), "--input-days", "11-17", "--predict-days", "18-18", "--windows-per-user", "2",
                 "--shifted-copies", "1", "--answer-style", "spaced", "--seed", "3"]) == 0
    assert main(["-q", "train", "sft", "--config", RECIPE, "--instructions", str(root / "qa"), "--output_dir",
                 str(root / "run"), "--max_steps", "4", "--per_device_train_batch_size", "4", "--eval_samples", "4",
                 "--logging_steps", "2", "--eval_steps", "2", "--save_steps", "100"]) == 0
    return root


def test_run_folder_holds_a_chat_model_and_its_instructions(trained):
    run = trained / "run"
    info = json.loads((run / "run_info.json").read_text())
    assert info["method"] == "llamamob-sft" and info["tasks"] == ["humob-qa"] and info["global_step"] == 4
    assert "location_tokenizer" not in info and "location_format" not in info
    qa = json.loads((trained / "qa" / "hf_mobility.json").read_text())  # --shifted-copies 1 --seed 3 reached the build
    assert qa["config"]["shifted_copies"] == 1 and qa["config"]["seed"] == 3
    assert qa["config"]["answer_style"] == "spaced"
    assert qa["shifted_copies"]["train"]["rows"] == qa["rows"]["train"] // 2 > 0
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["num_key_value_heads"] == 1 and config["num_attention_heads"] == 4  # the recipe's GQA
    assert (run / "model" / "model.safetensors").is_file() and (run / "instructions" / "README.md").is_file()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run / "tokenizer")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "1 2 3 4"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|im_start|>user\n1 2 3 4<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.eos_token == "<|im_end|>"  # generation stops at the end of the answer
    card = (run / "README.md").read_text()
    assert "2410.23692" in card and "No evaluation was run" in card and "```yaml" in card


def test_predict_answers_every_asked_slot_once_and_evaluate_scores_it(trained, capsys):
    run, data = trained / "run", trained / "data"
    out = trained / "pred.csv"
    assert main(["-q", "predict", str(run), "--data", str(data), "--out", str(out), "--batch-size", "4"]) == 0
    printed = capsys.readouterr()
    assert "filled from the slot-mode baseline" in printed.out
    assert "Loading weights" not in printed.err and "it/s]" not in printed.err  # -q: no library progress bars either
    pred = pd.read_csv(out)
    assert list(pred.columns) == ["uid", "d", "t", "x", "y"]
    from dataset_builders.publish import load_prepared

    test = load_prepared(data).table("samples", "test").to_pandas()
    asked = {(u, d, t) for u, ds, ts in zip(test["uid"], test["target_d"], test["target_t"]) for d, t in zip(ds, ts)}
    assert len(pred) == len(asked) and set(zip(pred["uid"], pred["d"], pred["t"])) == asked
    assert pred[["x", "y"]].min().min() >= 1 and pred[["x", "y"]].max().max() <= 200
    report = json.loads((run / "prediction_report_test.json").read_text())
    # constrained decoding (the default): the model answers every asked slot itself, on the grid, nothing dropped
    assert report["decoding"] == "constrained" and report["answered"] == report["asked_slots"] == len(asked)
    assert report["filled"] == report["not_asked"] == report["out_of_grid"] == report["stopped_at_limit"] == 0
    assert report["cells"] == "grid" and report["answer_style"] == "spaced"  # the style of the run's instructions
    from train import cli, humob

    assert cli.CELL_CHOICES == humob.CELL_CHOICES  # the parser's copy (it builds without importing humob)
    # --cells history: every predicted cell is one of the user's records in the prompt (the last input days)
    seen = trained / "pred_seen.csv"
    assert main(["-q", "predict", str(run), "--data", str(data), "--out", str(seen), "--cells", "history"]) == 0
    capsys.readouterr()
    cells = pd.read_csv(seen).merge(
        test[["uid", "input_d", "input_x", "input_y"]].explode(["input_d", "input_x", "input_y"]), on="uid")
    window = cells[(cells["input_d"] >= 11) & (cells["input_d"] <= 17)]
    history = set(zip(window["uid"], window["input_x"], window["input_y"]))
    assert {(u, x, y) for u, x, y in zip(cells["uid"], cells["x"], cells["y"])} <= history
    assert json.loads((run / "prediction_report_test.json").read_text())["cells"] == "history"
    assert main(["-q", "predict", str(run), "--data", str(data), "--cells", "history", "--free-decoding"]) == 2
    assert "free decoding writes any text" in capsys.readouterr().err
    assert main(["-q", "evaluate", str(run), "--data", str(data), "--predictions", str(out), "--cells", "history"]) == 2
    assert "--cells applies when a Llama-3-8B-Mob run predicts" in capsys.readouterr().err

    assert main(["-q", "evaluate", str(run), "--data", str(data), "--predictions", str(out)]) == 0
    printed = capsys.readouterr().out
    # beside slot-mode over every input day: slot-mode on the run's own input window (its instructions' days)
    assert run_input_days(run) == (11, 17)  # the fixture's --input-days, read from the run's instructions
    window = "slot-mode (days 11-17)"
    assert "| slot-mode |" in printed and "| run |" in printed and f"| {window} |" in printed
    metrics = json.loads((run / "metrics.json").read_text())
    assert list(metrics["results"]) == ["run", "slot-mode", window]
    for res in metrics["results"].values():
        assert 0.0 <= res["geobleu@5"] <= 1.0 and res["dtw"] >= 0.0 and res["num_users"] == len(test)
    assert "| run |" in (run / "README.md").read_text()  # the card got the metrics table
    assert json.loads((run / "run_info.json").read_text())["metrics"]["test"] == metrics["results"]["run"]


def test_run_folder_reloads_in_a_fresh_process(trained, run_without_our_packages):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    script = """
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    run = sys.argv[1]
    model = AutoModelForCausalLM.from_pretrained(run + "/model").eval()
    tok = AutoTokenizer.from_pretrained(run + "/tokenizer")
    ids = tok.apply_chat_template([{"role": "user", "content": "3 4 101 87"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        logits = model(**ids).logits[0, -1]
    print("RESULT" + json.dumps({"ids": ids["input_ids"][0].tolist(), "logits": logits.tolist()}))
    """
    proc = run_without_our_packages(script, trained / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))[len("RESULT"):])
    tok = AutoTokenizer.from_pretrained(trained / "run" / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(trained / "run" / "model").eval()
    ids = torch.tensor([got["ids"]])
    with torch.no_grad():
        torch.testing.assert_close(torch.tensor(got["logits"]), model(input_ids=ids).logits[0, -1])
    assert tok.decode(got["ids"]).endswith("<|im_start|>assistant\n")


def test_errors_are_clear(trained, capsys):
    with pytest.raises(ValueError, match="cannot be mixed"):
        load_recipe(RECIPE, tasks=["humob-qa", "next"])
    assert main(["-q", "data", "instructions", "--task", "next", "--data", str(trained / "data"), "--out",
                 str(trained / "x")]) == 2
    assert "--tokenizer" in capsys.readouterr().err
    assert main(["-q", "predict", str(trained / "qa"), "--data", str(trained / "data")]) == 2
    assert "not a training run folder" in capsys.readouterr().err
    assert main(["-q", "evaluate", "--data", str(trained / "data"), "--predictions", "x.csv"]) == 2
    assert "--predictions needs" in capsys.readouterr().err


def test_staged_for_the_hub_with_its_own_card(trained, tmp_path):
    from train.push import stage_run

    staged = stage_run(trained / "run", tmp_path / "staged", repo_id="user/llamamob-demo")
    card = (staged["model"] / "README.md").read_text()
    assert "Llama-3-8B-Mob" in card and "2410.23692" in card and "QT-Mob" not in card
    assert 'AutoTokenizer.from_pretrained("user/llamamob-demo")' in card
    assert (staged["model"] / "model.safetensors").is_file() and (staged["model"] / "tokenizer.json").is_file()
    assert not (staged["model"] / "rqvae").exists()
    assert (staged["instructions"] / "README.md").is_file()


@pytest.mark.slow
def test_smollm_recipe_trains_lora_on_the_offline_alias_and_predicts(trained, offline_home, monkeypatch, tmp_path):
    """llamamob_smollm.yaml end to end for one step: the alias resolves to the prepared SmolLM2, LoRA trains on the
    7 projections, the merged run folder predicts with SmolLM2's own chat template and constrained decoding."""
    monkeypatch.setenv("HF_MOBILITY_HOME", str(offline_home))
    recipe = load_recipe("train/recipes/llamamob_smollm.yaml")
    assert recipe.use_peft and recipe.lora_r == 16 and recipe.lora_alpha == 16 and len(recipe.lora_target_modules) == 7
    run = tmp_path / "smollm"
    assert main(["-q", "train", "sft", "--config", "train/recipes/llamamob_smollm.yaml", "--instructions",
                 str(trained / "qa"), "--output_dir", str(run), "--max_steps", "1", "--per_device_train_batch_size",
                 "1", "--eval_samples", "0", "--max_train_samples", "1"]) == 0
    info = json.loads((run / "run_info.json").read_text())
    assert info["method"] == "llamamob-sft" and info["base_model"] == "smollm2-135m-instruct"
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["hidden_size"] == 576 and config["num_hidden_layers"] == 30  # SmolLM2, not the tiny demo Llama
    out = tmp_path / "pred.csv"
    assert main(["-q", "predict", str(run), "--data", str(trained / "data"), "--out", str(out), "--max-users", "1"]) == 0
    report = json.loads((run / "prediction_report_test.json").read_text())
    assert report["decoding"] == "constrained" and report["answered"] == report["asked_slots"] > 0
    assert report["filled"] == 0 and report["stopped_at_limit"] == 0


def test_run_input_days_is_none_without_recorded_instructions(tmp_path):
    assert run_input_days(tmp_path) is None  # no instructions/ folder
    (tmp_path / "instructions").mkdir()
    (tmp_path / "instructions" / "hf_mobility.json").write_text('{"config": {"input_days": null}}')
    assert run_input_days(tmp_path) is None
    (tmp_path / "instructions" / "hf_mobility.json").write_text('{"config": {"input_days": [3, 9]}}')
    assert run_input_days(tmp_path) == (3, 9)


def test_habit_oracle_continues_the_same_lives(trained, tmp_path):
    from dataset_builders.publish import load_prepared
    from dataset_builders.synthetic import synthesize_grid, write_yjmob
    from train.demo import habit_oracle
    from train.evaluate import grid_targets

    # the CLI wrote synthesize_grid(num_users=30, num_days=20, seed=0): more days repeat these days exactly
    made = {"num_users": 30, "num_days": 20, "seed": 0}
    longer = synthesize_grid(**{**made, "num_days": 27})
    assert longer[longer["d"] < 20].reset_index(drop=True).equals(synthesize_grid(**made))
    oracle = habit_oracle(trained / "raw" / "grid.csv", trained / "data", made, extra_days=140)
    reference = grid_targets(load_prepared(trained / "data"), "test")
    assert oracle["num_points"] == len(reference) > 0 and oracle["num_users"] == reference["uid"].nunique()
    assert 0 < oracle["geobleu@5"] <= 1 and oracle["dtw"] >= 0
    # a CSV that is not that city (another seed) gets no oracle rather than a wrong one
    other = write_yjmob(synthesize_grid(**{**made, "seed": 1}), tmp_path / "other.csv")
    assert habit_oracle(other, trained / "data", made, extra_days=7) is None
