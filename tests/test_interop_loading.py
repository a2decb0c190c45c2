"""jdynconv.interop's loading fails safely and clearly: damaged files, pickled objects, NaN weights, bad arguments.

Every failure to read a weight file is one :class:`~jdynconv.interop.LoadError` naming the file and the fix;
nothing in a file runs; no message suggests turning torch's unpickling safety off (``weights_only=False``).
Non-finite weights are refused unless asked for; arguments of the wrong type name themselves.

The ``.pt`` tests need torch (CI's main run installs it with the ``torch`` extra; a venv without torch, such
as the Python 3.12 one, skips them); the ``.safetensors`` and conversion tests need only the ``test`` extra.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from jdynconv import interop
from jdynconv import linen as jdc_linen
from jdynconv import nnx as jdc_nnx

COND_CONV = {"features": 4, "kernel_size": 3, "num_experts": 2}
INPUT_SHAPE = (1, 5, 5, 3)


@pytest.fixture
def torch() -> Any:
    return pytest.importorskip("torch")


def assert_message(error: pytest.ExceptionInfo[BaseException], *parts: str) -> str:
    """The message names every part, and neither it nor the traceback a user sees (chained causes included)
    mentions, let alone suggests, torch's unsafe bypass."""
    message = str(error.value)
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"
    shown = "".join(traceback.format_exception(error.value))
    assert "weights_only" not in shown.replace("weights_only=True", "")
    return message


def seed_arrays() -> dict[str, np.ndarray]:
    return {"conv.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2), "conv.bias": np.ones(2, np.float32)}


def cond_conv_state_dict() -> dict[str, np.ndarray]:
    """A linen CondConv's variables (random values) as a PyTorch state dict."""
    module = jdc_linen.CondConv(**COND_CONV)
    shapes = jax.eval_shape(module.init, jax.random.key(0), jax.ShapeDtypeStruct(INPUT_SHAPE, jnp.float32))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape).astype(s.dtype)), shapes)
    return interop.linen_to_torch(module, variables)


def cond_conv_nnx() -> jdc_nnx.CondConv:
    args = (INPUT_SHAPE[-1], COND_CONV["features"], (3, 3), COND_CONV["num_experts"])
    return nnx.eval_shape(lambda: jdc_nnx.CondConv(*args, rngs=nnx.Rngs(0)))


def _save_safetensors(tmp_path: Path, arrays: dict[str, np.ndarray], name: str = "model.safetensors") -> Path:
    path = tmp_path / name
    safetensors.numpy.save_file(arrays, str(path))
    return path


# --- damaged files -----------------------------------------------------------------------------------


def test_truncated_safetensors(tmp_path: Path) -> None:
    path = _save_safetensors(tmp_path, seed_arrays())
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(interop.LoadError) as error:
        interop.load_state_dict(path)
    assert_message(error, str(path), "not a readable safetensors file", "truncated or corrupt")
    assert error.value.path == path
    assert error.value.__cause__ is not None  # safetensors' own error, chained


def test_corrupt_safetensors_header(tmp_path: Path) -> None:
    path = _save_safetensors(tmp_path, seed_arrays())
    data = path.read_bytes()
    path.write_bytes(data[:8] + b"{not json" + data[17:])  # the 8-byte length, then a broken JSON header
    with pytest.raises(interop.LoadError) as error:
        interop.load_state_dict(path)
    assert_message(error, str(path), "not a readable safetensors file", "header")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_empty_file(tmp_path: Path, suffix: str, request: pytest.FixtureRequest) -> None:
    if suffix == ".pt":
        request.getfixturevalue("torch")
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"")
    with pytest.raises(interop.LoadError) as error:
        interop.load_state_dict(path)
    assert_message(error, str(path), "empty (0 bytes)")


def test_directory_and_unknown_suffix(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint.pt"
    folder.mkdir()
    with pytest.raises(interop.LoadError) as error:
        interop.load_state_dict(folder)
    assert_message(error, str(folder), "not a file")
    assert isinstance(error.value, FileNotFoundError)  # as before LoadError existed
    with pytest.raises(interop.LoadError) as error:
        interop.load_state_dict(tmp_path / "model.ckpt")
    assert_message(error, str(tmp_path / "model.ckpt"), ".pt, .pth or .safetensors", "'.ckpt'")
    with pytest.raises(FileNotFoundError, match=r"missing\.pt") as missing:
        interop.load_state_dict(tmp_path / "missing.pt")
    assert not isinstance(missing.value, interop.LoadError)


def test_truncated_pt(tmp_path: Path, torch: Any) -> None:
    path = tmp_path / "model.pt"
    torch.save({key: torch.from_numpy(value) for key, value in seed_arrays().items()}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(interop.LoadError) as error:
        interop.load_state_dict(path)
    assert_message(error, str(path), "not a readable PyTorch file", "truncated, corrupt")
    assert error.value.original is not None  # torch's own error, kept but not chained (see LoadError)


def test_not_a_pt_file(tmp_path: Path, torch: Any) -> None:
    path = tmp_path / "model.pth"
    path.write_bytes(b"plain text, not a PyTorch file")
    with pytest.raises(interop.LoadError) as error:
        interop.load_state_dict(path)
    assert_message(error, str(path), "not a readable PyTorch file")


# --- files that hold something other than a state dict ------------------------------------------------


def test_pickled_module(tmp_path: Path, torch: Any) -> None:
    path = tmp_path / "model.pt"
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)), path)
    with pytest.raises(interop.LoadError) as error:
        interop.load_state_dict(path)
    assert_message(
        error,
        str(path),
        "pickled torch.nn.Module or other Python object",
        "torch.nn.modules.container.Sequential",
        "torch.save(model.state_dict(), path)",
        "safetensors",
    )
    assert isinstance(error.value.original, pickle.UnpicklingError)
    assert error.value.__cause__ is None  # torch's text advises weights_only=False: not printed with ours


def test_list(tmp_path: Path, torch: Any) -> None:
    path = tmp_path / "model.pt"
    torch.save([torch.ones(2), torch.zeros(3)], path)
    with pytest.raises(interop.LoadError) as error:
        interop.load_state_dict(path)
    assert_message(error, str(path), "list of length 2", "not a state dict", "model.state_dict()")


def test_nested_checkpoint(tmp_path: Path, torch: Any) -> None:
    path = tmp_path / "checkpoint.pt"
    state_dict = {key: torch.from_numpy(value) for key, value in seed_arrays().items()}
    torch.save({"state_dict": state_dict, "epoch": 3}, path)
    with pytest.raises(interop.LoadError) as error:
        interop.load_state_dict(path)
    assert_message(error, str(path), "checkpoint", "checkpoint['state_dict']")


def test_non_tensor_entries_and_non_str_keys(tmp_path: Path, torch: Any) -> None:
    path = tmp_path / "model.pt"
    torch.save({"conv.weight": torch.ones(2), "epoch": 3}, path)
    with pytest.raises(interop.LoadError) as error:
        interop.load_state_dict(path)
    assert_message(error, str(path), "'epoch' (int)", "not tensors")
    torch.save({0: torch.ones(2)}, path)
    with pytest.raises(interop.LoadError) as error:
        interop.load_state_dict(path)
    assert_message(error, str(path), "0 (int)", "keys")


class _Payload:
    """Unpickling this makes the directory ``marker``: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.mkdir, (str(self.marker),)


def test_pickle_payload_does_not_run(tmp_path: Path, torch: Any) -> None:
    armed = tmp_path / "armed"
    pickle.loads(pickle.dumps(_Payload(armed)))
    assert armed.is_dir()  # the payload works when unpickled naively

    marker = tmp_path / "marker"
    torch_file = tmp_path / "payload.pt"
    torch.save(_Payload(marker), torch_file)
    raw_file = tmp_path / "payload.pth"  # a bare pickle (no zip archive), protocol 2 as torch's legacy format
    raw_file.write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    for path in (torch_file, raw_file):
        with pytest.raises(interop.LoadError) as error:
            interop.load_state_dict(path)
        assert_message(error, str(path), "pickled torch.nn.Module or other Python object", "mkdir")
        assert not marker.exists()


# --- non-finite values -----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_safetensors(tmp_path: Path, bad: float) -> None:
    arrays = seed_arrays()
    arrays["conv.weight"][0, 1, 0, :] = bad
    arrays["bf16"] = np.array([1.0, bad, bad], dtype=jnp.bfloat16)
    arrays["num_batches_tracked"] = np.array(7, np.int64)  # integers are not checked
    path = _save_safetensors(tmp_path, arrays)
    with pytest.raises(interop.LoadError) as error:
        interop.load_state_dict(path)
    message = assert_message(error, str(path), "'conv.weight' (2 of 24)", "'bf16' (2 of 3)", "allow_non_finite=True")
    assert "conv.bias" not in message
    assert "num_batches_tracked" not in message
    loaded = interop.load_state_dict(path, allow_non_finite=True)
    np.testing.assert_array_equal(loaded["conv.weight"], arrays["conv.weight"])
    assert np.isnan(loaded["bf16"][1]) == np.isnan(bad)


def test_non_finite_pt(tmp_path: Path, torch: Any) -> None:
    weight = torch.ones(3, 2)
    weight[1, 0] = float("nan")
    weight[2, 1] = float("inf")
    path = tmp_path / "model.pt"
    torch.save({"fc.weight": weight, "bn.num_batches_tracked": torch.tensor(5), "fc.bias": torch.zeros(3)}, path)
    with pytest.raises(interop.LoadError) as error:
        interop.load_state_dict(path)
    message = assert_message(error, str(path), "'fc.weight' (2 of 6)", "allow_non_finite=True")
    assert "fc.bias" not in message
    loaded = interop.load_state_dict(path, allow_non_finite=True)
    np.testing.assert_array_equal(loaded["fc.weight"], weight.numpy())


def test_safetensors_load_without_torch(tmp_path: Path) -> None:
    """``.safetensors`` loading (NaN check included) imports no torch: it works with torch unimportable."""
    good = _save_safetensors(tmp_path, seed_arrays(), "good.safetensors")
    arrays = seed_arrays()
    arrays["conv.bias"][0] = np.nan
    bad = _save_safetensors(tmp_path, arrays, "bad.safetensors")
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "from jdynconv import interop\n"
        f"assert interop.load_state_dict({str(good)!r})['conv.weight'].shape == (2, 3, 2, 2)\n"
        "try:\n"
        f"    interop.load_state_dict({str(bad)!r})\n"
        "except interop.LoadError as error:\n"
        "    assert 'conv.bias' in str(error), error\n"
        "else:\n"
        "    raise AssertionError('NaN loaded')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1], timeout=120)


def test_non_finite_state_dict_into_linen_and_nnx() -> None:
    state_dict = cond_conv_state_dict()
    state_dict["weight"][1, :3] = np.nan
    state_dict["routing_fn.bias"][0] = -np.inf
    module = jdc_linen.CondConv(**COND_CONV)
    with pytest.raises(interop.StateDictError) as error:
        interop.torch_to_linen(module, state_dict)
    assert_message(
        error, "2 values with NaN or Inf", "non-finite: weight: 3 NaN or Inf entries", "routing_fn.bias: 1 NaN or Inf"
    )
    assert error.value.non_finite == [("weight", 3), ("routing_fn.bias", 1)]
    assert "allow_non_finite=True" in str(error.value)

    model = cond_conv_nnx()
    before = nnx.to_pure_dict(nnx.state(model))
    with pytest.raises(interop.StateDictError) as nnx_error:
        interop.torch_to_nnx(model, state_dict)
    assert nnx_error.value.non_finite == error.value.non_finite
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), nnx_values(model), before)

    variables = interop.torch_to_linen(module, state_dict, allow_non_finite=True)
    assert np.isnan(variables["params"]["kernel"][1]).sum() == 3
    interop.torch_to_nnx(model, state_dict, allow_non_finite=True)
    np.testing.assert_array_equal(interop.nnx_to_torch(model)["weight"], state_dict["weight"])


def nnx_values(model: nnx.Module) -> dict[str, Any]:
    return nnx.to_pure_dict(nnx.state(model))


def test_non_finite_torch_tensors(torch: Any) -> None:
    state_dict = {key: torch.from_numpy(value) for key, value in cond_conv_state_dict().items()}
    state_dict["bias"] = state_dict["bias"].to(torch.bfloat16)
    state_dict["bias"][0, 0] = float("nan")
    with pytest.raises(interop.StateDictError) as error:
        interop.torch_to_linen(jdc_linen.CondConv(**COND_CONV), state_dict)
    assert error.value.non_finite == [("bias", 1)]


def test_flax_from_torch_non_finite() -> None:
    rules = interop.linear_rules(
        "fc", kernel=interop.Target(("params", "kernel")), bias=None, in_features=2, features=3
    )
    weight = np.ones((3, 2), np.float32)
    weight[0, 0] = np.inf
    with pytest.raises(interop.StateDictError) as error:
        interop.flax_from_torch(rules, {"fc.weight": weight}, dtype=lambda key: jnp.float32)
    assert error.value.non_finite == [("fc.weight", 1)]
    loaded = interop.flax_from_torch(rules, {"fc.weight": weight}, dtype=lambda key: jnp.float32, allow_non_finite=True)
    assert np.isinf(loaded["params"]["kernel"][0, 0])
    with pytest.raises(TypeError) as type_error:
        interop.flax_from_torch([*rules, "fc.bias"], {"fc.weight": weight}, dtype=lambda key: jnp.float32)
    assert_message(type_error, "`rules`", "item 1: str")


# --- arguments of the wrong type ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state_dict", "received"),
    [(None, "got None"), ("model.pt", "got str 'model.pt'"), ([np.ones(2)], "got list of length 1")],
    ids=["none", "str", "list"],
)
def test_state_dict_not_a_mapping(state_dict: Any, received: str) -> None:
    with pytest.raises(TypeError) as error:
        interop.torch_to_linen(jdc_linen.CondConv(**COND_CONV), state_dict)
    assert_message(error, "`state_dict` must be a mapping", received)
    with pytest.raises(TypeError) as error:
        interop.torch_to_nnx(cond_conv_nnx(), state_dict)
    assert_message(error, "`state_dict` must be a mapping", received)


def test_state_dict_keys_and_values_of_the_wrong_type() -> None:
    module = jdc_linen.CondConv(**COND_CONV)
    state_dict = cond_conv_state_dict()
    with pytest.raises(TypeError) as error:
        interop.torch_to_linen(module, {**state_dict, 3: np.ones(2)})
    assert_message(error, "`state_dict` keys must be str", "3 (int)")
    wrong = {**state_dict, "nested": {"weight": np.ones(2)}, "name": "conv", "scale": 2.0}
    for convert in (
        lambda: interop.torch_to_linen(module, wrong),
        lambda: interop.torch_to_nnx(cond_conv_nnx(), wrong),
    ):
        with pytest.raises(TypeError) as error:
            convert()
        message = assert_message(error, "`state_dict` values must be arrays or tensors", "'nested' (a nested mapping")
        assert "checkpoint['nested']" in message
        assert "'name' (str 'conv')" in message
        assert "'scale' (float)" in message
        assert "'weight'" not in message  # the good entries are not listed


def test_torch_module_as_state_dict(torch: Any) -> None:
    with pytest.raises(TypeError) as error:
        interop.torch_to_linen(jdc_linen.CondConv(**COND_CONV), torch.nn.Linear(2, 3))
    assert_message(error, "`state_dict`", "got Linear", "model.state_dict()")


@pytest.mark.parametrize(("variables", "received"), [(None, "got None"), ([], "got list of length 0")])
def test_variables_not_a_mapping(variables: Any, received: str) -> None:
    with pytest.raises(TypeError) as error:
        interop.linen_to_torch(jdc_linen.CondConv(**COND_CONV), variables)
    assert_message(error, "`variables` must be a mapping", received)


class _MyConv(jdc_linen.CondConv):
    """A fresh class to register, so the tests leave jdynconv's own registrations alone."""


def test_register_bad_arguments() -> None:
    rules = interop.Converter(flax_rules=lambda module, shapes: [], torch_rules=lambda module, shapes: [])
    with pytest.raises(TypeError) as error:
        interop.register(jdc_linen.CondConv(**COND_CONV), rules)
    assert_message(error, "`module_type`", "got CondConv", "pass the class CondConv itself")
    with pytest.raises(TypeError) as error:
        interop.register("CondConv", rules)
    assert_message(error, "`module_type`", "got str 'CondConv'")
    with pytest.raises(TypeError) as error:
        interop.register(_MyConv, interop.cond_conv_rules)
    assert_message(error, "`converter` must be a jdynconv.interop.Converter", "got function", "Converter(flax_rules=")
    with pytest.raises(TypeError) as error:
        interop.register(_MyConv, {"flax_rules": None})
    assert_message(error, "`converter`", "got dict")
    with pytest.raises(TypeError) as error:
        interop.Converter(flax_rules=None)
    assert_message(error, "`flax_rules` must be a callable", "got None")
    with pytest.raises(TypeError) as error:
        interop.Converter(flax_rules=lambda module, shapes: [], torch_rules="rules")
    assert_message(error, "`torch_rules` must be None or a callable", "got str 'rules'")


def test_registered_rules_that_return_no_rules() -> None:
    """A registered function that returns something other than a list of Rule is named at conversion."""
    interop.register(_MyConv, interop.Converter(flax_rules=lambda m, s: None, torch_rules=lambda m, s: ["weight"]))
    with pytest.raises(TypeError) as error:
        interop.torch_to_linen(_MyConv(**COND_CONV), cond_conv_state_dict())
    assert_message(error, "`torch_rules` registered for _MyConv", "item 0: str 'weight'")
    with pytest.raises(TypeError) as error:
        interop.linen_to_torch(_MyConv(**COND_CONV), {"params": {}})
    assert_message(error, "`flax_rules` registered for _MyConv", "got None")
