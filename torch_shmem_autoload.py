"""torch's extension-autoload entry point for torch_shmem.

A top-level module on purpose: torch calls it during ``import torch``, and a
problem anywhere in the torch_shmem package (even in its ``__init__``) must
turn into a warning here, never into a failed ``import torch``.
"""


def autoload() -> None:
    try:
        from torch_shmem import _torch

        _torch.load_ops()
    except Exception as exc:  # pragma: no cover - depends on the install
        import warnings

        warnings.warn(
            f"torch_shmem: torch.ops.shmem is unavailable ({exc!r}); "
            "rebuild with pip install --no-build-isolation -e .",
            RuntimeWarning,
            stacklevel=2,
        )
