"""Test-wide settings: offline Hub, and a private `datasets` cache so tests never read or pollute the user's."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
