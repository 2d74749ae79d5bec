"""Child-process bodies that must stay NumPy-only (this module never imports torch)."""

import sys

import numpy as np

import torch_shmem


def numpy_reader(name, q):
    s = torch_shmem.open(name)
    q.put((s.read().tolist(), "torch" in sys.modules))


def numpy_writer(name):
    torch_shmem.open(name).write(np.full((2, 3), 7, np.float32))
