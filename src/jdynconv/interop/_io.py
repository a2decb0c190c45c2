"""Safe loading of PyTorch weight files: ``.pt``/``.pth`` without unpickling objects, ``.safetensors``.

Every way a file can fail to be a state dict (truncated, corrupt, empty, a pickled model, a checkpoint that
nests the state dict, NaN or Inf weights) ends in one :class:`LoadError` that names the file and the fix.
Nothing in a file runs: ``.pt`` files go through ``torch.load(..., weights_only=True)``, which refuses any
pickled object that is not a tensor or a plain container; the refusal is reported without torch's advice to
switch that safety off.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jdynconv.interop._rules import describe, is_tensor, non_finite_count, to_numpy

TORCH_SUFFIXES = (".pt", ".pth")
SAFETENSORS_SUFFIX = ".safetensors"

_SAVE_STATE_DICT = "save `model.state_dict()` instead (torch.save(model.state_dict(), path)) or use safetensors"


class LoadError(ValueError):
    """A weight file that cannot be read as a state dict; the message names the file and what is wrong.

    A ValueError, so ``except ValueError`` keeps working. The error from torch or safetensors, if any, is kept
    as ``original`` but not chained: torch's text for a refused pickle advises ``weights_only=False``, the unsafe
    bypass, and a chained cause is printed in every traceback.

    Attributes:
      path: the file.
      original: the error torch or safetensors raised, or None.
    """

    def __init__(self, path: Path, problem: str, original: BaseException | None = None) -> None:
        self.path = path
        self.original = original
        super().__init__(f"Cannot load {str(path)!r}: {problem}")


class _NotAFileError(LoadError, FileNotFoundError):
    """A path that exists but is not a regular file (a directory): a LoadError, and a FileNotFoundError as
    before LoadError existed."""


def _import_error(path: Path, package: str) -> ImportError:
    return ImportError(
        f"Loading {path.suffix} files needs `{package}`, which is not installed; "
        "install jdynconv's torch extra: pip install 'jdynconv[torch]'."
    )


def _short_cause(error: BaseException) -> str:
    """``SafetensorError: header too small``: the first sentence of ``error``, cut short, as a hint. Left out
    where it gives torch's advice to turn the unpickling safety off, which jdynconv never suggests."""
    lines = str(error).strip().splitlines()
    text = lines[0].split(". ")[0].rstrip(".") if lines else ""
    if "weights_only" in str(error) or "safe_globals" in str(error):
        text = ""
    if len(text) > 160:
        text = text[:157] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _refused_pickle(path: Path, error: pickle.UnpicklingError) -> LoadError:
    """torch refused to unpickle something that is not a tensor: name it, never the bypass."""
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    if found:
        return LoadError(
            path,
            f"the file holds a pickled torch.nn.Module or other Python object ({found.group(1)}), which jdynconv "
            f"does not unpickle (unpickling can run code from the file); {_SAVE_STATE_DICT}.",
            error,
        )
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(error))
    cause = f" ({detail.group(1).strip()[:100]})" if detail and "weights_only" not in detail.group(1) else ""
    return LoadError(
        path,
        "it is not a readable PyTorch file: corrupt, not written by torch.save, or a pickle of Python objects "
        f"other than tensors, which jdynconv does not unpickle{cause}; {_SAVE_STATE_DICT}.",
        error,
    )


def _check_not_empty(path: Path) -> None:
    """An empty file is the commonest damaged one (an interrupted save); say so rather than "header too small"."""
    if path.stat().st_size == 0:
        raise LoadError(path, "the file is empty (0 bytes): the save was interrupted, or the copy failed.")


def _read_torch(path: Path) -> Any:
    try:
        import torch
    except ImportError as error:
        raise _import_error(path, "torch") from error
    _check_not_empty(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise _refused_pickle(path, error) from None
    except MemoryError:
        raise
    except Exception as error:  # torch raises RuntimeError, EOFError, KeyError, ... for damaged files
        raise LoadError(
            path,
            "it is not a readable PyTorch file: truncated, corrupt, or not written by torch.save "
            f"({_short_cause(error)}).",
            error,
        ) from None


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        from safetensors.numpy import load_file
    except ImportError as error:
        raise _import_error(path, "safetensors") from error
    _check_not_empty(path)
    try:
        return load_file(path)
    except MemoryError:
        raise
    except Exception as error:  # SafetensorError for a bad header or a truncated file; others for odd dtypes
        raise LoadError(
            path, f"it is not a readable safetensors file: truncated or corrupt ({_short_cause(error)})."
        ) from error


def _state_dict(path: Path, loaded: Any) -> dict[str, np.ndarray]:
    """What ``torch.load`` returned -> NumPy arrays, if it is a flat mapping of str names to tensors."""
    if not isinstance(loaded, Mapping):
        raise LoadError(
            path,
            f"the file holds a {describe(loaded)}, not a state dict (a mapping of parameter names to tensors); "
            f"{_SAVE_STATE_DICT}.",
        )
    nested = [key for key, value in loaded.items() if isinstance(value, Mapping)]
    if nested:
        inner = nested[0]
        raise LoadError(
            path,
            f"the file holds a checkpoint, not a state dict: its entries {nested!r} are mappings themselves; "
            f"save checkpoint[{inner!r}] if that is the state dict (torch.save(checkpoint[{inner!r}], path)).",
        )
    not_str = [f"{key!r} ({type(key).__qualname__})" for key in loaded if not isinstance(key, str)]
    if not_str:
        raise LoadError(path, f"a state dict's keys are parameter names (str); these are not: {', '.join(not_str)}.")
    not_tensors = [f"{key!r} ({describe(value)})" for key, value in loaded.items() if not is_tensor(value)]
    if not_tensors:
        raise LoadError(
            path,
            f"a state dict holds tensors only; these entries are not tensors: {', '.join(not_tensors)} "
            f"({_SAVE_STATE_DICT}).",
        )
    arrays = {}
    for key, value in loaded.items():
        try:
            arrays[key] = to_numpy(value)
        except Exception as error:  # sparse, quantised or float8 tensors have no NumPy form
            raise LoadError(
                path, f"the tensor {key!r} ({value.dtype}, {value.layout}) has no NumPy form ({_short_cause(error)})."
            ) from error
    return arrays


def _check_finite(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    counts = [(key, non_finite_count(array), array.size) for key, array in arrays.items()]
    bad = [f"{key!r} ({count} of {size})" for key, count, size in counts if count]
    if bad:
        raise LoadError(
            path,
            f"NaN or Inf entries in {', '.join(bad)}: a diverged or corrupted checkpoint? "
            "Pass allow_non_finite=True to load it anyway.",
        )


def load_state_dict(path: str | os.PathLike[str], *, allow_non_finite: bool = False) -> dict[str, np.ndarray]:
    """Reads a PyTorch state dict file into NumPy arrays, never unpickling arbitrary objects.

    ``.pt``/``.pth``: ``torch.load(path, map_location="cpu", weights_only=True)`` (needs torch); the file
    must hold a flat mapping of parameter names to tensors (``torch.save(model.state_dict(), path)``; for a
    checkpoint that nests it, save ``checkpoint["state_dict"]`` instead). A pickled model or any other
    Python object is refused, since unpickling it could run code from the file. ``.safetensors``:
    ``safetensors.numpy.load_file``, without torch (neither this function nor ``jdynconv.interop`` imports it).

    Args:
      path: the file; its suffix chooses the format.
      allow_non_finite: return float tensors holding NaN or Inf entries. By default they are refused: weights
        from a diverged run or a corrupted file would otherwise load without a word.

    Returns:
      PyTorch key -> NumPy array, in PyTorch layout and the stored dtype, except bfloat16, which comes
      back as float32 (exactly: every bfloat16 is a float32), since NumPy has no native bfloat16.

    Raises:
      LoadError (a ValueError): the file cannot be read as a state dict: an unknown suffix, a directory
        (also a FileNotFoundError), an empty, truncated or corrupt file, a pickled ``torch.nn.Module`` or
        other Python object, something that is not a flat mapping of names to tensors (a list, a checkpoint
        that nests the state dict), or NaN/Inf entries (unless ``allow_non_finite``). The message names the
        file, the offending keys and the fix; torch's or safetensors' error is chained.
      FileNotFoundError: no such file.
      ImportError: torch (``.pt``) or safetensors (``.safetensors``) is not installed.
    """
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"`path` must be a str or os.PathLike file path, got {path!r}.")
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (*TORCH_SUFFIXES, SAFETENSORS_SUFFIX):
        raise LoadError(
            path, f"`path` must end in .pt, .pth or .safetensors, got {str(path)!r} (suffix {path.suffix!r})."
        )
    if not path.exists():
        raise FileNotFoundError(f"`path` {str(path)!r} is not a file.")
    if not path.is_file():
        raise _NotAFileError(path, "`path` is not a file (a directory?); pass the weight file inside it.")
    if suffix == SAFETENSORS_SUFFIX:
        arrays = {
            key: value.astype(np.float32) if value.dtype == jnp.bfloat16 else value
            for key, value in _read_safetensors(path).items()
        }
    else:
        arrays = _state_dict(path, _read_torch(path))
    if not allow_non_finite:
        _check_finite(path, arrays)
    return arrays
