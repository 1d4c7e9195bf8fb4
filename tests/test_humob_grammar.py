"""The answer grammar of constrained Llama-3-8B-Mob decoding (train/humob_grammar.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from train.humob_grammar import AnswerGrammar

ASKED = [[60, 13], [60, 14], [61, 0]]
CELLS = [[45, 102], [200, 1], [7, 199]]


def _walk(grammar, text, chunks=1):
    state = grammar.start
    for i in range(0, len(text), chunks):
        state = grammar.advance(state, text[i : i + chunks])
        if state is None:
            return None
    return state


def test_reference_answer_is_the_compact_json_and_walks_to_completion():
    g = AnswerGrammar(ASKED, 1, 200)
    text = g.text_of(CELLS)
    assert text == '{"prediction":[[60,13,45,102],[60,14,200,1],[61,0,7,199]]}'
    assert json.loads(text)["prediction"] == [a + c for a, c in zip(ASKED, CELLS)]
    for chunk in (1, 2, 3, 7, len(text)):  # any tokenisation of the same text reaches the same state
        state = _walk(g, text, chunk)
        assert state is not None and g.is_complete(state)
    # before the end it is not complete, and nothing may follow the end
    assert not g.is_complete(_walk(g, text[:-1]))
    assert g.advance(_walk(g, text), "x") is None and g.advance(_walk(g, text), ",") is None


def test_spaced_style_is_json_dumps_default_and_refuses_the_compact_form():
    g = AnswerGrammar(ASKED, 1, 200, style="spaced")
    text = g.text_of(CELLS)
    assert text == json.dumps({"prediction": [a + c for a, c in zip(ASKED, CELLS)]})
    assert text == '{"prediction": [[60, 13, 45, 102], [60, 14, 200, 1], [61, 0, 7, 199]]}'
    for chunk in (1, 2, 5, len(text)):
        state = _walk(g, text, chunk)
        assert state is not None and g.is_complete(state)
    # a cell written as the token " 121" (space and digits) is one step of the walk
    state = _walk(g, '{"prediction": [[60, 13,')
    assert g.advance(state, " 121") is not None and g.advance(state, "121") is None
    assert _walk(g, AnswerGrammar(ASKED, 1, 200).text_of(CELLS)) is None  # the compact answer is off this grammar
    assert _walk(g, '{"prediction": [[60, 13,  45') is None  # two spaces
    assert _walk(g, '{"prediction": [[60, 13, 45 ,') is None  # a space before the comma
    assert AnswerGrammar([[5, 7]], 0, 9, style="spaced").max_length == len('{"prediction": [[5, 7, 1, 2]]}')
    with pytest.raises(ValueError, match="answer_style must be one of"):
        AnswerGrammar(ASKED, 1, 200, style="pretty")


@pytest.mark.parametrize(
    "prefix",
    [
        '{"prediction":[[60,12,',  # another slot than the asked one
        '{"prediction":[[61,',  # slots out of the asked order
        '{"prediction": [[',  # whitespace: the answer is compact
        '{"prediction":[[60,13,201',  # off the grid (hi = 200)
        '{"prediction":[[60,13,0',  # no cell 0 on a 1-based grid
        '{"prediction":[[60,13,04',  # leading zero
        '{"prediction":[[60,13,1234',  # too many digits
        '{"prediction":[[60,13,,',  # an empty number
        '{"prediction":[[60,13,45]',  # a cell missing
        '{"prediction":[[60,13,45,102]]}',  # stopping before the last asked slot
        '{"prediction":[[60,13,45,102,3',  # a fifth value
    ],
)
def test_answers_off_the_grammar_are_refused(prefix):
    assert _walk(AnswerGrammar(ASKED, 1, 200), prefix) is None


def test_digit_prefixes_follow_the_cell_range():
    g = AnswerGrammar([[0, 0]], 1, 200)
    head = '{"prediction":[[0,0,'
    for ok in ("2", "20", "200", "19", "199", "3", "99"):
        assert _walk(g, head + ok) is not None, ok
    for bad in ("201", "21x", "300", "0", "1999"):
        assert _walk(g, head + bad) is None, bad
    # a number ends only at the character that follows it, and only when in range
    assert _walk(g, head + "3,") is not None and _walk(g, head + "3]") is None
    # 0-based grids allow the single digit 0 but no leading zero
    g0 = AnswerGrammar([[0, 0]], 0, 199)
    assert _walk(g0, head + "0,") is not None and _walk(g0, head + "05") is None and _walk(g0, head + "200") is None
    # a range that starts above one digit: prefixes that cannot reach it are refused early
    g_hi = AnswerGrammar([[0, 0]], 50, 60)
    assert _walk(g_hi, head + "5") is not None and _walk(g_hi, head + "4") is None
    assert _walk(g_hi, head + "6,") is None and _walk(g_hi, head + "55,") is not None


def test_bad_grammar_arguments():
    with pytest.raises(ValueError, match=r"\(m, 2\)"):
        AnswerGrammar(np.zeros((0, 2)), 1, 200)
    with pytest.raises(ValueError, match=r"\(m, 2\)"):
        AnswerGrammar([1, 2, 3], 1, 200)
    with pytest.raises(ValueError, match="non-negative"):
        AnswerGrammar([[-1, 0]], 1, 200)
    with pytest.raises(ValueError, match="lo <= hi"):
        AnswerGrammar([[0, 0]], 5, 4)


def test_max_length_is_the_longest_answer():
    g = AnswerGrammar(ASKED, 1, 200)
    assert g.max_length == len(g.text_of([[200, 200]] * 3)) == len(g.text_of(CELLS)) + 5  # 18 digits at most, 13 in CELLS
    assert AnswerGrammar([[5, 7]], 0, 9).max_length == len('{"prediction":[[5,7,1,2]]}')


def test_cells_restrict_each_slot_to_one_of_them():
    allowed = [[45, 102], [7, 199], [45, 9], [120, 5]]
    g = AnswerGrammar(ASKED, 1, 200, cells=allowed)
    text = g.text_of([[45, 9], [7, 199], [45, 102]])
    for chunk in (1, 2, 3, len(text)):
        state = _walk(g, text, chunk)
        assert state is not None and g.is_complete(state)
    head = '{"prediction":[[60,13,'
    for ok in ("4", "45", "45,1", "45,10", "45,102", "45,9", "7,19", "7,199", "12", "120,5"):
        assert _walk(g, head + ok) is not None, ok
    # an X no allowed cell has, a Y that goes with another X, a prefix that ends before an allowed number
    for bad in ("5", "46", "200", "45,199", "45,5", "7,9", "45,10]", "12,", "4,", "120,50"):
        assert _walk(g, head + bad) is None, bad
    # the next slot starts over: its X again from every allowed cell
    assert _walk(g, head + "45,9],[60,14,7,199]") is not None and _walk(g, head + "45,9],[60,14,7,9]") is None
    # the longest answer still bounds every allowed answer
    assert g.max_length >= len(g.text_of([[120, 5]] * 3))
    with pytest.raises(ValueError, match=r"\(k, 2\)"):
        AnswerGrammar(ASKED, 1, 200, cells=np.zeros((0, 2)))
    with pytest.raises(ValueError, match=r"\(k, 2\)"):
        AnswerGrammar(ASKED, 1, 200, cells=[1, 2, 3])
    with pytest.raises(ValueError, match=r"cells must lie in 1\.\.200, got \[0, 5\]"):
        AnswerGrammar(ASKED, 1, 200, cells=[[3, 4], [0, 5]])
