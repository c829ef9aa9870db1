import pytest


@pytest.fixture(autouse=True)
def _tiny_tensors_one_thread(one_thread):
    """Every test here runs on one intra-op thread (python_tests/conftest.py says why)."""
