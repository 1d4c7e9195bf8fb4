"""LocationTokenizer: code tokens, the location <-> code table, validation, save/load and trust_remote_code loading."""

from __future__ import annotations

import json
import os
import random
import textwrap

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from tokenization_mobility import LocationTokenizer, build_bpe_tokenizer

NUM_LEVELS = 4
CODEBOOK = 16

CORPUS = [
    f"user {i} visited the {place} at {i % 24} o'clock then went to the park near station {i % 7}"
    for i, place in zip(range(600), ["cafe", "museum", "bakery", "gym", "office", "school"] * 100)
]


def random_table(n=300, levels=NUM_LEVELS, size=CODEBOOK, seed=0):
    rng = random.Random(seed)
    codes = set()
    while len(codes) < n:
        codes.add(tuple(rng.randrange(size) for _ in range(levels)))
    codes = sorted(codes)
    rng.shuffle(codes)
    return {f"poi-{i:03d}": c for i, c in enumerate(codes)}


@pytest.fixture(scope="module")
def base():
    return build_bpe_tokenizer(CORPUS, vocab_size=400)


@pytest.fixture(scope="module")
def table():
    return random_table()


@pytest.fixture(scope="module")
def tok(base, table):
    return LocationTokenizer.from_base(base, table, codebook_size=CODEBOOK)


def test_build_bpe_tokenizer(base):
    assert isinstance(base, PreTrainedTokenizerFast)
    assert (base.pad_token, base.bos_token, base.eos_token, base.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")
    assert (base.pad_token_id, base.bos_token_id, base.eos_token_id, base.unk_token_id) == (0, 1, 2, 3)
    assert len(base) <= 400
    text = "user 12 visited the museum"
    assert base.decode(base(text)["input_ids"]) == text
    with pytest.raises(ValueError, match="vocab_size"):
        build_bpe_tokenizer(CORPUS, vocab_size=100)
    with pytest.raises(ValueError, match="special_tokens"):
        build_bpe_tokenizer(CORPUS, special_tokens=("<pad>", "<s>"))
    with pytest.raises(ValueError, match="texts"):
        build_bpe_tokenizer("one string")


def test_build_bpe_tokenizer_split_numbers(tmp_path):
    """split_numbers: a number is the same token after a space and after punctuation (digits in pieces of at most
    3), the text round-trips, and the choice survives save/load."""
    corpus = ["52 12 121 174\n52 14 121 174", '{"prediction":[[60,5,121,174],[60,14,121,174]]}', "1234567"] * 50
    plain = build_bpe_tokenizer(corpus, vocab_size=300)
    split = build_bpe_tokenizer(corpus, vocab_size=300, split_numbers=True)

    def pieces(tokenizer, text):
        return [tokenizer.decode([i]) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]

    assert " 121" in pieces(plain, "52 121") and "121" in pieces(plain, "[52,121]")
    assert pieces(split, "52 121") == ["52", " ", "121"] and "121" in pieces(split, "[52,121]")
    assert pieces(split, "1234567") == ["123", "456", "7"]
    for text in ("52 12 121 174", "[60,5,121,174]", "user 1234567 went"):
        assert split.decode(split(text, add_special_tokens=False)["input_ids"]) == text
    split.save_pretrained(tmp_path)
    again = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert pieces(again, "52 121") == ["52", " ", "121"]


def test_code_tokens_added(tok, base):
    assert tok.num_levels == NUM_LEVELS
    assert tok.codebook_size == CODEBOOK and tok.codebook_sizes == [CODEBOOK] * NUM_LEVELS
    assert len(tok) == len(base) + NUM_LEVELS * CODEBOOK
    assert len(base) == len(build_bpe_tokenizer(CORPUS, vocab_size=400))  # the base is not modified
    ids = tok.code_token_ids
    assert len(ids) == NUM_LEVELS and all(len(row) == CODEBOOK for row in ids)
    assert len({i for row in ids for i in row}) == NUM_LEVELS * CODEBOOK
    assert tok.convert_ids_to_tokens(ids[2][7]) == "<c_7>"
    assert tok.code_tokens[3][15] == "<d_15>"
    # plain (not special) tokens that are never normalised
    for token in ("<a_0>", "<d_15>"):
        added = tok.added_tokens_decoder[tok.convert_tokens_to_ids(token)]
        assert not added.special and not added.normalized
    assert tok.padding_side == base.padding_side and tok.model_max_length == base.model_max_length
    assert tok.model_input_names == base.model_input_names


def test_round_trip_every_location(tok, table):
    assert tok.num_locations == len(table) == 300
    assert dict(tok.location_codes) == table
    for location_id, codes in table.items():
        text = tok.location_to_text(location_id)
        assert text == "".join(f"<{'abcd'[level]}_{code}>" for level, code in enumerate(codes))
        assert tok.text_to_locations(text) == [location_id]
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == NUM_LEVELS
        assert ids == tok.location_to_ids(location_id)
        assert tok.ids_to_locations(ids) == [location_id]
        assert tok.code_to_location(codes) == location_id
        assert tok.location_to_codes(location_id) == codes
    assert tok.locations_to_text(["poi-000", "poi-001"]) == [
        tok.location_to_text("poi-000"),
        tok.location_to_text("poi-001"),
    ]


def test_mixed_text_and_codes(tok):
    first, second = "poi-010", "poi-020"
    text = (
        f"At 9, user 3 visited {tok.location_to_text(first)}. At 10, user 3 will visit {tok.location_to_text(second)}"
    )
    ids = tok(text)["input_ids"]
    for location_id in (first, second):
        code_ids = tok.location_to_ids(location_id)
        assert any(ids[i : i + NUM_LEVELS] == code_ids for i in range(len(ids))), location_id
    decoded = tok.decode(ids, skip_special_tokens=True)
    assert decoded == text  # code tokens survive skip_special_tokens and the text is restored
    assert tok.text_to_locations(decoded) == [first, second]
    assert tok.ids_to_locations(ids) == [first, second]
    # with EOS appended, decoding without special tokens still parses
    assert tok.text_to_locations(tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True)) == [first, second]


def test_text_to_locations_unknown_partial_and_spaces(tok, table):
    used = set(table.values())
    unknown = next(c for c in ((a, b, 0, 0) for a in range(16) for b in range(16)) if c not in used)
    unknown_text = "".join(f"<{'abcd'[level]}_{code}>" for level, code in enumerate(unknown))
    known = tok.location_to_text("poi-005")
    spaced = " ".join(tok.convert_ids_to_tokens(tok.location_to_ids("poi-006")))
    text = f"{unknown_text} then <a_1><b_2> and <a_3> {known} <b_1><c_1><d_1> , {spaced} <a_99><b_0><c_0><d_0>"
    assert tok.text_to_locations(text) == [None, "poi-005", "poi-006", None]
    assert tok.text_to_locations("no codes here") == []
    assert tok.text_to_locations("<a_1><b_2><c_3>") == []  # partial group
    assert tok.code_to_location(unknown) is None
    assert tok.code_to_location((1, 2)) is None
    partial_ids = tok.location_to_ids("poi-005")[:2] + tok.location_to_ids("poi-006")
    assert tok.ids_to_locations(partial_ids) == ["poi-006"]
    with pytest.raises(ValueError, match="not in the code table"):
        tok.location_to_text("no-such-poi")


def test_build_trie(tok, table):
    trie = tok.build_trie()
    leaves = 0
    level0 = set(tok.code_token_ids[0])

    def walk(node, depth):
        nonlocal leaves
        if not node:
            assert depth == NUM_LEVELS
            leaves += 1
            return
        for token_id, child in node.items():
            assert token_id in tok.code_token_ids[depth]
            walk(child, depth + 1)

    walk(trie, 0)
    assert leaves == len(table)
    assert set(trie) <= level0
    assert set(trie) == {tok.code_token_ids[0][c[0]] for c in table.values()}
    assert tok.build_trie() is trie  # cached


def test_validation_errors(base):
    with pytest.raises(ValueError, match=r"'x'.*'y'|'y'.*'x'"):
        LocationTokenizer.from_base(base, {"x": (1, 2), "y": (1, 2)})
    with pytest.raises(ValueError, match="same number of levels"):
        LocationTokenizer.from_base(base, {"x": (1, 2), "y": (1, 2, 3)})
    with pytest.raises(ValueError, match="allowed: 0 <= code < 4"):
        LocationTokenizer.from_base(base, {"x": (1, 2), "y": (1, 4)}, codebook_size=4)
    with pytest.raises(ValueError, match="allowed: 0 <= code"):
        LocationTokenizer.from_base(base, {"x": (1, -1)})
    with pytest.raises(ValueError, match="26"):
        LocationTokenizer.from_base(base, {"x": tuple(range(27))})
    with pytest.raises(ValueError, match="empty"):
        LocationTokenizer.from_base(base, {})
    with pytest.raises(ValueError, match="codebook_size"):
        LocationTokenizer.from_base(base, {"x": (1, 2)}, codebook_size=[4, 4, 4])
    with pytest.raises(ValueError, match="codebook_size"):
        LocationTokenizer.from_base(base, {"x": (1, 2)}, codebook_size=0)
    with pytest.raises(ValueError, match="ints"):
        LocationTokenizer.from_base(base, {"x": (1, "b")})
    with pytest.raises(ValueError, match="fast tokenizer"):
        LocationTokenizer.from_base("gpt2", {"x": (1, 2)})
    with pytest.raises(ValueError, match="location_codes"):
        LocationTokenizer(tokenizer_object=base.backend_tokenizer)


def test_inferred_and_per_level_codebook_sizes(base):
    tok = LocationTokenizer.from_base(base, {"x": (0, 4, 1), "y": (2, 0, 1)})
    assert tok.codebook_sizes == [3, 5, 2] and tok.codebook_size == [3, 5, 2]
    assert len(tok) == len(base) + 10
    tok = LocationTokenizer.from_base(base, {"x": (0, 4, 1), "y": (2, 0, 1)}, codebook_size=[3, 6, 2])
    assert [len(row) for row in tok.code_token_ids] == [3, 6, 2]
    assert tok.text_to_locations("<a_2><b_0><c_1>") == ["y"]
    tok = LocationTokenizer.from_base(base, {7: [1, 1], 8: [1, 0]})  # non-str ids are stored as str
    assert tok.location_ids == ["7", "8"] and tok.location_to_text(7) == "<a_1><b_1>"


def test_from_base_keeps_base_settings(table):
    base = build_bpe_tokenizer(CORPUS, vocab_size=400, special_tokens=("<pad>", "<s>", "</s>", "<unk>", "<sep>"))
    base.padding_side = "left"
    base.model_max_length = 256
    base.chat_template = "{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    tok = LocationTokenizer.from_base(base, table)
    assert tok.padding_side == "left" and tok.model_max_length == 256
    assert tok.chat_template == base.chat_template
    assert tok.all_special_tokens == base.all_special_tokens
    assert "<sep>" in tok.extra_special_tokens
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "hi</s>"
    assert base("user 3 visited")["input_ids"] == tok("user 3 visited")["input_ids"]


def test_save_and_from_pretrained(tok, table, tmp_path):
    files = tok.save_pretrained(tmp_path)
    names = sorted(os.listdir(tmp_path))
    assert {"tokenizer.json", "tokenizer_config.json", "location_codes.json", "tokenization_location.py"} <= set(names)
    assert any(str(f).endswith("location_codes.json") for f in files)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "LocationTokenizer"
    assert config["auto_map"]["AutoTokenizer"][0] == "tokenization_location.LocationTokenizer"
    assert "location_codes" not in config  # the table lives in its own file
    saved = json.loads((tmp_path / "location_codes.json").read_text())
    assert saved["num_levels"] == NUM_LEVELS and saved["codebook_size"] == CODEBOOK
    assert saved["level_prefixes"] == ["a", "b", "c", "d"]
    assert {k: tuple(v) for k, v in saved["location_codes"].items()} == table

    loaded = LocationTokenizer.from_pretrained(tmp_path)
    assert type(loaded) is LocationTokenizer
    assert dict(loaded.location_codes) == table
    assert loaded.num_levels == NUM_LEVELS and loaded.codebook_size == CODEBOOK
    assert loaded.code_token_ids == tok.code_token_ids
    assert len(loaded) == len(tok)
    text = f"user 5 will visit {tok.location_to_text('poi-042')}"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.text_to_locations(text) == ["poi-042"]
    assert (loaded.pad_token, loaded.eos_token, loaded.padding_side) == (
        tok.pad_token,
        tok.eos_token,
        tok.padding_side,
    )
    # the in-library AutoTokenizer path (our module is importable here) also gives a LocationTokenizer
    auto = AutoTokenizer.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(auto).__name__ == "LocationTokenizer"
    assert auto(text)["input_ids"] == tok(text)["input_ids"]


_REMOTE_SCRIPT = textwrap.dedent(
    """
    import json, sys

    from transformers import AutoTokenizer

    texts = json.loads(sys.argv[1])
    out = {}
    for folder in sys.argv[2:]:
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        out[folder] = {
            "class": type(tok).__name__,
            "module": type(tok).__module__,
            "encodings": [tok(t)["input_ids"] for t in texts],
            "parsed": [tok.text_to_locations(t) for t in texts],
            "location_codes": {k: list(v) for k, v in tok.location_codes.items()},
            "num_levels": tok.num_levels,
            "codebook_size": tok.codebook_size,
            "code_token_ids": tok.code_token_ids,
            "padding_side": tok.padding_side,
        }
    try:
        import tokenization_mobility  # noqa: F401
        out["blocked"] = False
    except ImportError:
        out["blocked"] = True
    print("RESULT" + json.dumps(out))
    """
)


def test_auto_tokenizer_trust_remote_code_fresh_process(tok, table, tmp_path, run_without_our_packages):
    """Load the saved folder the way a Hub user would: fresh process, other folder, our packages not importable."""
    from transformers import LlamaConfig

    alone = tmp_path / "tokenizer_only"
    with_model = tmp_path / "with_model_config"
    tok.save_pretrained(alone)
    tok.save_pretrained(with_model)
    LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    ).save_pretrained(with_model)
    texts = [
        f"At 9, user 3 visited {tok.location_to_text('poi-001')}. At 10 user 3 will visit {tok.location_to_text('poi-002')}",
        "the cafe <a_1><b_2>",
    ]
    proc = run_without_our_packages(_REMOTE_SCRIPT, json.dumps(texts), alone, with_model)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))
    result = json.loads(line[len("RESULT") :])
    assert result["blocked"] is True
    for folder in (alone, with_model):
        got = result[str(folder)]
        assert got["class"] == "LocationTokenizer"
        assert got["module"].startswith("transformers_modules.")
        assert got["encodings"] == [tok(t)["input_ids"] for t in texts]
        assert got["parsed"] == [tok.text_to_locations(t) for t in texts] == [["poi-001", "poi-002"], []]
        assert {k: tuple(v) for k, v in got["location_codes"].items()} == table
        assert got["num_levels"] == NUM_LEVELS and got["codebook_size"] == CODEBOOK
        assert got["code_token_ids"] == tok.code_token_ids
        assert got["padding_side"] == tok.padding_side
    assert (tmp_path / "fresh_hf_home" / "modules" / "transformers_modules").is_dir()


def test_plain_id_tokens_and_recoding_a_location_tokenizer(tok, table, tmp_path):
    """QT-Mob's ablation: one `<loc_N>` token per location; re-coding a LocationTokenizer drops its old code tokens."""
    codes = LocationTokenizer.id_codes(["p10", "p3", "p7", "p3"])
    assert codes == {"p10": (0,), "p3": (1,), "p7": (2,)}  # sorted, unique, one level
    ids = LocationTokenizer.from_base(tok, LocationTokenizer.id_codes(table), level_prefixes=["loc"])
    assert ids.level_prefixes == ["loc"] and ids.num_levels == 1 and ids.codebook_size == len(table)
    assert len(ids) == len(tok) - NUM_LEVELS * CODEBOOK + len(table)  # the <a_i>... tokens are gone
    assert ids.convert_tokens_to_ids("<a_1>") in (None, ids.unk_token_id)
    first = sorted(table)[0]
    assert ids.location_to_text(first) == "<loc_0>" and ids.tokenize("POI <loc_0>.")[-2:] == ["<loc_0>", "."]
    assert ids.text_to_locations("at <loc_0> then <loc_5> and <a_1><b_2>") == [first, sorted(table)[5]]
    assert ids.ids_to_locations(ids("x <loc_3>")["input_ids"]) == [sorted(table)[3]]
    assert ids.build_trie() == {ids.convert_tokens_to_ids(f"<loc_{i}>"): {} for i in range(len(table))}
    ids.save_pretrained(tmp_path / "ids")
    saved = json.loads((tmp_path / "ids" / "location_codes.json").read_text())
    assert saved["level_prefixes"] == ["loc"]
    again = LocationTokenizer.from_pretrained(str(tmp_path / "ids"))
    assert again.level_prefixes == ["loc"] and again("a <loc_7>")["input_ids"] == ids("a <loc_7>")["input_ids"]
    # custom prefixes for several levels, and the checks on them
    two = LocationTokenizer.from_base(tok, {"x": (1, 2), "y": (0, 3)}, level_prefixes=["zone", "poi"])
    assert two.location_to_text("y") == "<zone_0><poi_3>" and two.text_to_locations("<zone_1> <poi_2>") == ["x"]
    for bad, match in ((["a"], "2 levels"), (["a", "a"], "distinct"), (["A", "b"], "lower-case"),
                       (["a", "b_c"], "lower-case"), ("ab", "list")):
        with pytest.raises(ValueError, match=match):
            LocationTokenizer.from_base(tok, {"x": (1, 2)}, level_prefixes=bad)
