"""The shared YAML recipe helpers (train/recipe.py) used by the SFT, CaLLiPer and MHSA scripts."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from train.recipe import coerce_fields, read_recipe


@dataclass
class Toy:
    name: str = "x"
    steps: int = 1
    rate: float = 0.1
    flag: bool = False
    limit: int | None = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self):
        coerce_fields(self)


def test_values_from_yaml_and_command_line_are_converted(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: run\nsteps: 1e3\nrate: 2e-4\nflag: yes\nlimit: null\ntags: [a, b]\n")
    toy = read_recipe(Toy, path)
    assert (toy.name, toy.steps, toy.rate, toy.flag, toy.limit, toy.tags) == ("run", 1000, 2e-4, True, None, ["a", "b"])
    assert isinstance(toy.rate, float)  # YAML 1.1 reads "2e-4" as a string
    over = read_recipe(Toy, path, {"steps": "7", "flag": "false", "limit": "none", "tags": "c", "name": 12})
    assert (over.steps, over.flag, over.limit, over.tags, over.name) == (7, False, None, ["c"], "12")


@pytest.mark.parametrize(
    "values, match",
    [
        ({"steps": "three"}, "`steps` must be of type int"),
        ({"steps": 2.5}, "`steps` must be of type int"),
        ({"steps": "2.5e0"}, "`steps` must be of type int"),
        ({"rate": True}, "`rate` must be of type float"),
        ({"flag": "maybe"}, "`flag` must be of type bool"),
        ({"steps": None}, "`steps` must be of type int"),
        ({"name": ["a"]}, "`name` must be of type str"),
    ],
)
def test_bad_values_name_the_key(values, match):
    with pytest.raises(ValueError, match=match):
        read_recipe(Toy, None, values)


def test_unknown_keys_and_bad_files(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("stepz: 3\n")
    with pytest.raises(ValueError, match=r"unknown recipe keys \['stepz'\] in .*r.yaml; allowed keys: name, steps"):
        read_recipe(Toy, path)
    path.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="must be a YAML mapping"):
        read_recipe(Toy, path)
    with pytest.raises(ValueError, match="does not exist"):
        read_recipe(Toy, tmp_path / "missing.yaml")
