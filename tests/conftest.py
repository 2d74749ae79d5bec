import os
import uuid

import pytest

import torch_shmem


@pytest.fixture
def name():
    """A unique stream name, always unlinked after the test."""
    n = f"t-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    yield n
    torch_shmem.unlink(n)


@pytest.fixture
def seed():
    """A random seed, printed so a failing multi-process run can be replayed."""
    s = int.from_bytes(os.urandom(4), "little")
    print(f"seed={s}")
    return s


# Every test states where it runs: `pytest -m cpu` (CI) would otherwise drop
# an unmarked test silently.
_PLACEMENT_MARKERS = ("cpu", "gpu", "benchmark", "slow")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects anything
def pytest_collection_modifyitems(config, items):
    unmarked = [
        item.nodeid
        for item in items
        if not any(item.get_closest_marker(m) is not None for m in _PLACEMENT_MARKERS)
    ]
    if unmarked:
        raise pytest.UsageError(
            "tests without a cpu, gpu, benchmark or slow marker (add one, e.g. "
            "pytestmark = pytest.mark.cpu): " + ", ".join(unmarked)
        )
