"""Safe loading of PyTorch weight files: ``.pt``/``.pth`` without unpickling objects, ``.safetensors``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jdynconv.interop._rules import to_numpy

TORCH_SUFFIXES = (".pt", ".pth")
SAFETENSORS_SUFFIX = ".safetensors"


def _import_error(path: Path, package: str) -> ImportError:
    return ImportError(
        f"Loading {path.suffix} files needs `{package}`, which is not installed; "
        "install jdynconv's torch extra: pip install 'jdynconv[torch]'."
    )


def _bfloat16_as_float32(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float32) if array.dtype == jnp.bfloat16 else array


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Reads a PyTorch state dict file into NumPy arrays, never unpickling arbitrary objects.

    ``.pt``/``.pth``: ``torch.load(path, map_location="cpu", weights_only=True)`` (needs torch), which
    must hold a flat mapping of parameter names to tensors (``model.state_dict()``; for a checkpoint
    that nests it, save ``checkpoint["state_dict"]`` instead). ``.safetensors``:
    ``safetensors.numpy.load_file`` (no torch needed).

    Args:
      path: the file; its suffix chooses the format.

    Returns:
      PyTorch key -> NumPy array, in PyTorch layout and the stored dtype, except bfloat16, which comes
      back as float32 (exactly: every bfloat16 is a float32), since NumPy has no native bfloat16.

    Raises:
      ValueError: an unknown suffix, or a ``.pt`` file that is not a mapping of names to tensors.
      FileNotFoundError: no such file.
      ImportError: torch (``.pt``) or safetensors (``.safetensors``) is not installed.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (*TORCH_SUFFIXES, SAFETENSORS_SUFFIX):
        raise ValueError(f"`path` must end in .pt, .pth or .safetensors, got {str(path)!r} (suffix {path.suffix!r}).")
    if not path.is_file():
        raise FileNotFoundError(f"`path` {str(path)!r} is not a file.")
    if suffix == SAFETENSORS_SUFFIX:
        try:
            from safetensors.numpy import load_file
        except ImportError as error:
            raise _import_error(path, "safetensors") from error
        arrays = load_file(path)
        return {
            key: value.astype(np.float32) if value.dtype == jnp.bfloat16 else value for key, value in arrays.items()
        }
    try:
        import torch
    except ImportError as error:
        raise _import_error(path, "torch") from error
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(loaded, Mapping):
        raise ValueError(
            f"`path` {str(path)!r} must hold a mapping of parameter names to tensors (a state dict), "
            f"got {type(loaded).__qualname__}."
        )
    wrong = [f"{key!r} ({type(value).__qualname__})" for key, value in loaded.items() if not torch.is_tensor(value)]
    if wrong:
        raise ValueError(
            f"`path` {str(path)!r} must hold a flat state dict of tensors; these entries are not tensors: "
            f"{', '.join(wrong)} (for a checkpoint that nests the state dict, save checkpoint['state_dict'])."
        )
    return {str(key): to_numpy(value) for key, value in loaded.items()}
