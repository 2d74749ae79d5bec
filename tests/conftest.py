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
