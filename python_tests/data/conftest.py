import importlib.util

import pytest

from s2meta_fast.data import prepare
from s2meta_fast.data.synthetic import write_raw

HAS_RECBOLE = importlib.util.find_spec("recbole") is not None

# Small enough for a fast test run, large enough for several 192-interaction scenarios.
SMALL = dict(min_items=10, max_items=500, mf_epochs=3, progress=False)


@pytest.fixture(scope="session")
def synthetic_dirs(tmp_path_factory):
    out = {}
    for fmt in ("ml20m", "amazon", "taobao"):
        folder = tmp_path_factory.mktemp(f"raw_{fmt}")
        out[fmt] = (str(folder), write_raw(fmt, str(folder), seed=0))
    return out


@pytest.fixture(scope="session")
def synthetic_prepared(synthetic_dirs, cache_dir):
    return {fmt: prepare(fmt, folder, cache_dir=cache_dir, **SMALL) for fmt, (folder, _) in synthetic_dirs.items()}


@pytest.fixture(scope="session")
def ml100k(cache_dir):
    if not HAS_RECBOLE:
        pytest.skip("recbole is not installed (pip install --no-deps recbole==1.2.1)")
    return prepare("ml100k", cache_dir=cache_dir, progress=False)
