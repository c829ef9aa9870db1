import pytest
import torch


def _one_thread():
    """Our tensors are tiny: intra-op threads only add OpenMP wake-ups, which on a shared 2-core
    machine cost 10-100x the work. Restored afterwards so other suites keep their setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Per test (suites make it autouse), and per module for module-scoped fixtures that run the CLI.
one_thread = pytest.fixture(_one_thread, name="one_thread")
one_thread_module = pytest.fixture(_one_thread, scope="module", name="one_thread_module")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One prepared-data cache for the session: ml100k is prepared once for every suite that
    needs it (the data tests, the doc snippets)."""
    return str(tmp_path_factory.mktemp("cache"))
