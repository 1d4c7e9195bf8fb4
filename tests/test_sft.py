"""QT-Mob SFT (train/sft.py) on a toy instruction set: tiny Llama from scratch, LoRA on a saved "pretrained" tiny
Llama, resuming from a checkpoint, and recipe parsing."""

from __future__ import annotations

import json
import random
import shutil

import pyarrow as pa
import pytest
import torch

from dataset_builders.publish import write_dataset
from tokenization_mobility import LocationTokenizer, build_bpe_tokenizer
from train.sft import SFTRecipe, load_recipe, parse_recipe, run_sft

GENRES = ["jazz", "rock", "sushi", "tacos", "chess", "yoga", "opera", "vinyl", "coffee", "tennis", "museums", "beer"]
# 12 locations, 4 levels, 4 codes per level; <c_3>, <d_2>, <d_3> are never used
CODES = {f"L{i}": (i // 4, i % 4, i % 3, (i // 2) % 2) for i in range(len(GENRES))}


def _code_text(location_id: str) -> str:
    return "".join(f"<{'abcd'[level]}_{code}>" for level, code in enumerate(CODES[location_id]))


def _rows(n: int, seed: int, task: str) -> pa.Table:
    rng = random.Random(seed)
    prompts, completions = [], []
    for _ in range(n):
        i = rng.randrange(len(GENRES))
        user = rng.randrange(50)
        if task == "alignment":
            prompts.append(f"which place matches {_code_text(f'L{i}')}? ")
            completions.append(f"a place for {GENRES[i]} lovers")
        else:
            prompts.append(f"user {user} likes {GENRES[i]}; next POI ")
            completions.append(_code_text(f"L{i}"))
    return pa.table({"prompt": prompts, "completion": completions})


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft_toy")
    configs = {
        task: {"train": _rows(200, k, task), "validation": _rows(40, 100 + k, task), "test": _rows(40, 200 + k, task)}
        for k, task in enumerate(["next", "recovery", "alignment"])
    }
    write_dataset(root / "instructions", configs, card_body="toy instructions")
    texts = [f"user {u} likes {g}; next POI a place for {g} lovers" for u in range(20) for g in GENRES]
    base = build_bpe_tokenizer(texts, vocab_size=300)
    LocationTokenizer.from_base(base, CODES, codebook_size=4).save_pretrained(root / "loctok")
    return root


def _recipe(toy, out, **kw) -> SFTRecipe:
    values = dict(
        instructions=str(toy / "instructions"), location_tokenizer=str(toy / "loctok"), output_dir=str(out),
        tasks=["next"], bpe_vocab_size=300, max_length=64, per_device_train_batch_size=16, learning_rate=3e-3,
        lr_scheduler_type="constant", logging_steps=5, eval_samples=0, save_steps=1000, max_steps=10,
    )
    values.update(kw)
    return SFTRecipe(**values)


def test_tiny_llama_full_training_writes_run_folder(toy, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    from train.sft import tiny_llama

    out = run_sft(_recipe(toy, tmp_path / "run", max_steps=40, eval_samples=16, eval_steps=20))
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert state["global_step"] == 40 and len(losses) == 8
    assert losses[-1] < 0.5 * losses[0], losses
    assert any("eval_loss" in e for e in state["log_history"])
    assert (out / "model" / "model.safetensors").is_file()
    assert not list((out / "model").glob("*.bin"))
    for name in ("recipe.yaml", "training_curve.png", "run_info.json", "tokenizer/location_codes.json"):
        assert (out / name).is_file(), name
    info = json.loads((out / "run_info.json").read_text())
    assert info["tasks"] == ["next"] and info["peft"] is None and info["metrics"] == {}
    assert info["trainable_parameters"] == info["parameters"]

    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer", trust_remote_code=True)
    assert tokenizer.location_to_text("L5") == _code_text("L5")
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    # the initial weights, rebuilt with the run's seed: rows of never-seen tokens are untouched (AdamW, no weight
    # decay), which shows the rebuild is exact, and the trained layers moved
    set_seed(0)
    init = tiny_llama(tokenizer, 64)
    unused = tokenizer.convert_tokens_to_ids(["<c_3>", "<d_2>", "<d_3>"])
    torch.testing.assert_close(model.model.embed_tokens.weight[unused], init.model.embed_tokens.weight[unused])
    for name, p in init.named_parameters():
        if "layers.0" in name and name.endswith("proj.weight"):
            assert not torch.allclose(model.get_parameter(name), p), name


def test_lora_on_pretrained_base_merges_exactly(toy, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    texts = [f"user {u} likes {g}; next POI" for u in range(20) for g in GENRES]
    base_tok = build_bpe_tokenizer(texts, vocab_size=300)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(base_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         pad_token_id=base_tok.pad_token_id, eos_token_id=base_tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    base_tok.save_pretrained(tmp_path / "base")

    out = run_sft(_recipe(toy, tmp_path / "run", base_model=str(tmp_path / "base"), lora_r=4, lora_alpha=8,
                          lora_dropout=0.0, learning_rate=1e-2, max_steps=6, tasks=["next", "alignment"]))
    info = json.loads((out / "run_info.json").read_text())
    assert info["peft"] == "lora" and info["trainable_parameters"] < info["parameters"]
    assert (out / "model" / "model.safetensors").is_file() and not list((out / "model").glob("*.bin"))

    merged = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    assert merged.config.tie_word_embeddings is False
    resized = AutoModelForCausalLM.from_pretrained(out / "base_model").eval()
    peft_model = PeftModel.from_pretrained(resized, out / "adapter", is_trainable=True)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(("lora_" in n or "trainable_tokens" in n or "modules_to_save" in n) for n in trainable)
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer", trust_remote_code=True)
    batch = tokenizer(["user 3 likes jazz; next POI <a_0><b_0>", "which place matches <a_2><b_3><c_2><d_1>? "],
                      return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = peft_model.eval()(**batch).logits
        got = merged(**batch).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)

    # only the new code-token rows of the input embeddings and the head changed; norms are untouched
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    resized = AutoModelForCausalLM.from_pretrained(out / "base_model")  # fresh: PeftModel wrapped the first in place
    old = len(base_tok)
    assert resized.model.embed_tokens.weight.shape[0] == len(tokenizer) > old
    torch.testing.assert_close(merged.model.embed_tokens.weight[:old], base.model.embed_tokens.weight)
    assert not torch.allclose(merged.model.embed_tokens.weight[old:], resized.model.embed_tokens.weight[old:])
    assert not torch.allclose(merged.lm_head.weight, resized.lm_head.weight)
    torch.testing.assert_close(merged.model.norm.weight, base.model.norm.weight)
    assert not torch.allclose(merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)


def test_resume_continues_from_checkpoint(toy, tmp_path):
    out = tmp_path / "run"
    run_sft(_recipe(toy, out, max_steps=4, save_steps=4, logging_steps=1, learning_rate=1e-3))
    assert (out / "checkpoint-4").is_dir()
    run_sft(_recipe(toy, out, max_steps=8, save_steps=4, logging_steps=1, learning_rate=5e-3,
                    resume_from_checkpoint="last"))
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 8
    steps = {e["step"]: e for e in state["log_history"] if "loss" in e}
    assert sorted(steps) == list(range(1, 9))
    # steps 1-4 come from the checkpoint (the first run's learning rate), not from a restart
    assert all(steps[s]["learning_rate"] == pytest.approx(1e-3) for s in range(1, 5))
    info = json.loads((out / "run_info.json").read_text())
    assert info["resumed_from"].endswith("checkpoint-4") and info["global_step"] == 8


def test_progress_false_prints_neither_the_bar_nor_the_loss_lines(toy, tmp_path, capfd):
    from train.cli import _library_progress_bars

    with _library_progress_bars(False):  # what `mobility -q train sft` runs under
        out = run_sft(_recipe(toy, tmp_path / "run", max_steps=3, logging_steps=1, progress=False))
    printed = capfd.readouterr()
    assert "'loss'" not in printed.out + printed.err, printed
    assert "it/s" not in printed.err and "s/it" not in printed.err, printed.err
    state = json.loads((out / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3]  # the history is still kept


def test_rows_over_max_length_are_dropped_and_counted_not_truncated(toy, tmp_path):
    # 40 training rows, the first 6 with prompts far over max_length: truncation would cut their answers off
    rows = _rows(40, 7, "next").to_pydict()
    rows["prompt"][:6] = [p + " and also likes " * 40 for p in rows["prompt"][:6]]
    configs = {"next": {"train": pa.table(rows), "validation": _rows(8, 8, "next")}}
    write_dataset(tmp_path / "instructions", configs, card_body="toy instructions with long rows")
    recipe = _recipe(toy, tmp_path / "run", instructions=str(tmp_path / "instructions"), max_steps=2,
                     per_device_train_batch_size=20, eval_samples=8, eval_steps=2)
    info = json.loads((run_sft(recipe) / "run_info.json").read_text())
    assert info["rows_over_max_length"] == {"train": 6, "eval": 0}
    assert info["train_rows"] == 34 and info["eval_rows"] == 8
    rows["prompt"] = [p + " and also likes " * 40 for p in rows["prompt"]]
    write_dataset(tmp_path / "all_long", {"next": {"train": pa.table(rows)}}, card_body="every row too long")
    with pytest.raises(ValueError, match="all 40 training rows are longer than max_length=64"):
        run_sft(_recipe(toy, tmp_path / "run2", instructions=str(tmp_path / "all_long"), max_steps=2,
                        per_device_train_batch_size=20))


def test_group_by_length_batches_rows_of_similar_length(toy, tmp_path, monkeypatch):
    import transformers.trainer as hf_trainer

    samplers = []

    class Spy(hf_trainer.LengthGroupedSampler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            samplers.append(self)

    monkeypatch.setattr(hf_trainer, "LengthGroupedSampler", Spy)
    run_sft(_recipe(toy, tmp_path / "random", max_steps=1))
    assert samplers == []  # the default: random batches
    run_sft(_recipe(toy, tmp_path / "grouped", max_steps=1, group_by_length=True))
    (sampler,) = samplers
    order, lengths = list(sampler), sampler.lengths
    assert sorted(order) == list(range(len(lengths)))
    assert len(set(lengths)) > 1
    batch = [lengths[i] for i in order]  # the 16 rows max_steps=1 consumes: one group, sorted by length
    assert batch == sorted(lengths, reverse=True)


def test_recipe_yaml_and_cli_overrides(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("instructions: data/instr\nlearning_rate: 2e-4\nmax_length: null\nbf16: false\n"
                    "tasks: [next, recovery]\nfull_finetune: null\n")
    recipe = parse_recipe(["--config", str(path), "--learning_rate", "0.01", "--max_steps", "3", "--tasks", "next",
                           "--bf16", "true", "--warmup_ratio", "0.1"])
    assert recipe.learning_rate == 0.01 and isinstance(recipe.learning_rate, float)
    assert recipe.max_steps == 3 and isinstance(recipe.max_steps, int)
    assert recipe.tasks == ["next"] and recipe.bf16 is True and recipe.warmup_ratio == 0.1
    assert recipe.max_length is None and recipe.instructions == "data/instr" and recipe.use_peft is False
    assert parse_recipe(["--config", str(path)]).learning_rate == 2e-4  # YAML 1.1 reads "2e-4" as a string
    assert parse_recipe(["--tasks", "next,alignment"]).tasks == ["next", "alignment"]
    assert parse_recipe(["--base_model", "some/llm"]).use_peft is True
    assert parse_recipe(["--base_model", "some/llm", "--full_finetune", "true"]).use_peft is False

    with pytest.raises(ValueError, match="unknown recipe options.*--lr"):
        parse_recipe(["--lr", "0.1"])
    path.write_text("learning_rte: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown recipe keys \['learning_rte'\].*allowed keys"):
        parse_recipe(["--config", str(path)])
    with pytest.raises(ValueError, match="`max_steps` must be of type int"):
        parse_recipe(["--max_steps", "three"])
    with pytest.raises(ValueError, match="unknown tasks"):
        load_recipe(tasks=["next", "weather"])
    assert parse_recipe(["--num_key_value_heads", "2"]).num_key_value_heads == 2
    with pytest.raises(ValueError, match="must divide tiny-llama's 4 attention heads"):
        parse_recipe(["--num_key_value_heads", "3"])
    with pytest.raises(ValueError, match="a pretrained base keeps its own"):
        parse_recipe(["--base_model", "some/llm", "--num_key_value_heads", "1"])


_RELOAD_SCRIPT = """
import json, sys
import torch
from datasets import load_dataset
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

run = sys.argv[1]
tokenizer = AutoTokenizer.from_pretrained(run + "/tokenizer", trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(run + "/model").eval()
rqvae = AutoModel.from_pretrained(run + "/rqvae", trust_remote_code=True).eval()
rows = load_dataset(run + "/instructions", "next", split="test")
batch = tokenizer(rows[0]["prompt"], return_tensors="pt")
with torch.no_grad():
    logits = model(**batch).logits[0, -1]
    codes = rqvae.get_codes(torch.linspace(-1, 1, 16).reshape(2, 8), use_sinkhorn=False)
print("RESULT" + json.dumps({
    "tokenizer": type(tokenizer).__name__, "module": type(tokenizer).__module__, "rqvae": type(rqvae).__name__,
    "prompt": rows[0]["prompt"], "rows": rows.num_rows, "logits": logits.tolist(), "codes": codes.tolist(),
    "L3": tokenizer.location_to_text("L3"),
}))
"""


def test_run_folder_is_self_contained_and_reloads_in_a_fresh_process(toy, tmp_path, run_without_our_packages):
    """The run folder holds the merged model, the tokenizer, the RQ-VAE, the instructions and a model card, and a
    fresh interpreter without our packages loads each to the same outputs."""
    from transformers import AutoModelForCausalLM

    from modeling_mobility.rqvae import RQVAEConfig, RQVAEModel

    loc = tmp_path / "loc"  # the layout of `mobility train location-tokenizer`: OUT/tokenizer and OUT/rqvae
    LocationTokenizer.from_pretrained(str(toy / "loctok")).save_pretrained(loc / "tokenizer")
    torch.manual_seed(0)
    rqvae = RQVAEModel(RQVAEConfig(input_dim=8, hidden_sizes=[8], code_dim=4, num_quantizers=4, codebook_size=4))
    rqvae.save_pretrained(loc / "rqvae")
    out = run_sft(_recipe(toy, tmp_path / "run", location_tokenizer=str(loc / "tokenizer"), max_steps=3))
    shutil.rmtree(loc)  # nothing may point outside the run folder any more
    info = json.loads((out / "run_info.json").read_text())
    assert info["train_rows"] == 3 * 16  # max_steps caps the rows that are tokenised
    assert info["location_format"] == "semantic"
    card = (out / "README.md").read_text()
    assert "semantic code tokens" in card and "/rqvae\", trust_remote_code=True" in card and "next-location prediction." in card
    assert "No evaluation was run" in card and "```yaml" in card

    proc = run_without_our_packages(_RELOAD_SCRIPT, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))[len("RESULT"):])
    assert got["tokenizer"] == "LocationTokenizer" and got["module"].startswith("transformers_modules.")
    assert got["rqvae"] == "RQVAEModel" and got["rows"] == 40 and got["L3"] == _code_text("L3")
    tokenizer = LocationTokenizer.from_pretrained(str(out / "tokenizer"))
    model = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    with torch.no_grad():
        logits = model(**tokenizer(got["prompt"], return_tensors="pt")).logits[0, -1]
        codes = rqvae.eval().get_codes(torch.linspace(-1, 1, 16).reshape(2, 8), use_sinkhorn=False)
    torch.testing.assert_close(torch.tensor(got["logits"]), logits)
    assert got["codes"] == codes.tolist()


def test_location_codes_come_from_the_instructions_folder(toy, tmp_path):
    """Instructions written with plain IDs carry their tokenizer; a recipe without `location_tokenizer` uses it, and a
    recipe naming a tokenizer with other codes is refused."""
    semantic = LocationTokenizer.from_pretrained(str(toy / "loctok"))
    ids = LocationTokenizer.from_base(semantic, LocationTokenizer.id_codes(CODES), level_prefixes=["loc"])

    def rows(n, seed):
        rng = random.Random(seed)
        picks = [rng.randrange(len(GENRES)) for _ in range(n)]
        return pa.table({"prompt": [f"user likes {GENRES[i]}; next POI " for i in picks],
                         "completion": [ids.location_to_text(f"L{i}") for i in picks]})

    write_dataset(tmp_path / "instr", {"next": {"train": rows(64, 0), "validation": rows(8, 1)}},
                  extras=lambda folder: ids.save_pretrained(folder / "location_tokenizer"))
    out = run_sft(_recipe(toy, tmp_path / "run", instructions=str(tmp_path / "instr"), location_tokenizer=None,
                          max_steps=2))
    run_tok = LocationTokenizer.from_pretrained(str(out / "tokenizer"))
    assert run_tok.level_prefixes == ["loc"] and run_tok.tokenize(ids.location_to_text("L4")) == ["<loc_6>"]  # sorted ids: L0, L1, L10, L11, L2, L3, L4
    info = json.loads((out / "run_info.json").read_text())
    assert info["location_format"] == "id" and not (out / "rqvae").exists()
    assert "plain ID token" in (out / "README.md").read_text()
    with pytest.raises(ValueError, match="does not hold the location codes the instructions were written with"):
        run_sft(_recipe(toy, tmp_path / "run2", instructions=str(tmp_path / "instr"), max_steps=2))
    with pytest.raises(ValueError, match="holds no location_tokenizer/"):
        run_sft(_recipe(toy, tmp_path / "run3", location_tokenizer=None, max_steps=2))


def test_qtmob_smollm_recipe_is_lora_with_code_tokens_on_the_offline_alias():
    recipe = load_recipe("train/recipes/qtmob_smollm.yaml")
    assert recipe.base_model == "smollm2-135m-instruct" and recipe.use_peft and not recipe.is_tiny
    assert recipe.tasks == ["next", "recovery", "alignment"] and recipe.completion_only_loss and recipe.bf16
    assert len(recipe.lora_target_modules) == 7 and recipe.max_steps > 0
