import pytest
import torch


@pytest.fixture
def one_thread():
    """Our tensors are tiny: intra-op threads only add OpenMP wake-ups, which on a shared 2-core
    machine cost 10-100x the work. Restored after each test so other suites keep their setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One prepared-data cache for the session: ml100k is prepared once for every suite that
    needs it (the data tests, the doc snippets)."""
    return str(tmp_path_factory.mktemp("cache"))
