"""The porting example (``examples/port_from_pytorch.py``) runs and its port is exact to float32 rounding.

It is the user's manual for moving the seed's PyTorch model to jdynconv and back, so its own measured
differences are held to the parity suite's tolerance: ``RTOL`` of the largest output magnitude (as
``conftest.py``'s absolute term), since a max absolute difference over a whole tensor has no per-element
reference to be relative to, and float32 rounding in a conv + BatchNorm grows with the values' scale,
while a real porting error (a transposed kernel, a wrong flatten order, biased running variance) is
O(1) relative. The example runs under this directory's strict promotion settings, which is why it
fine-tunes with ``optax.sgd`` (``optax.adam`` mixes its int32 step counter with Python floats).
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import port_from_pytorch
import pytest

from jdynconv import interop
from parity.conftest import RTOL

STEPS = 3


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("port_from_pytorch")


@pytest.fixture(scope="module")
def results(out_dir: Path) -> dict[str, float]:
    # Module scope: one run (a few seconds of compiling and PyTorch) serves every test here. The
    # autouse strict-promotion fixture is function-scoped, so enable the same settings for this run.
    with (
        jax.numpy_dtype_promotion("strict"),
        jax.numpy_rank_promotion("raise"),
        jax.default_matmul_precision("highest"),
    ):
        return port_from_pytorch.main(["--steps", str(STEPS), "--seed", "1", "--out-dir", str(out_dir)])


def _tolerance(output_max_abs: float) -> float:
    return RTOL * max(1.0, output_max_abs)


@pytest.mark.parametrize(
    ("diff", "magnitude"),
    [
        ("eval_max_abs_diff_pt", "eval_output_max_abs"),
        ("eval_max_abs_diff_safetensors", "eval_output_max_abs"),
        ("train_max_abs_diff", "train_output_max_abs"),
        ("export_max_abs_diff", "export_output_max_abs"),
    ],
)
def test_outputs_match_pytorch(results: dict[str, float], diff: str, magnitude: str) -> None:
    assert results[magnitude] > 0.1, f"{magnitude} = {results[magnitude]}: a degenerate output proves nothing"
    assert results[diff] <= _tolerance(results[magnitude]), f"{diff} = {results[diff]:.3g}"


@pytest.mark.parametrize("diff", ["running_mean_max_abs_diff", "running_var_max_abs_diff"])
def test_running_statistics_match_pytorch(results: dict[str, float], diff: str) -> None:
    # The statistics are below 1 here, so RTOL * max(1, max |reference|) is RTOL. Flax's biased running
    # variance would be off by (1 - momentum) * var / (n - 1) ~ 0.1 * 0.8 / 2047 ~ 4e-5 (n = 8 * 16 * 16).
    assert results[diff] <= RTOL, f"{diff} = {results[diff]:.3g}"


def test_fine_tuning_lowers_the_loss(results: dict[str, float]) -> None:
    assert np.isfinite(results["final_loss"])
    assert results["final_loss"] < results["initial_loss"]


def test_both_file_formats_give_identical_variables(results: dict[str, float], out_dir: Path) -> None:
    assert results["formats_max_abs_diff"] == 0.0
    assert results["eval_max_abs_diff_pt"] == results["eval_max_abs_diff_safetensors"]
    # Bitwise, independently of the example: same keys, dtypes, shapes and bytes.
    block = port_from_pytorch.make_block(port_from_pytorch.Config())
    from_pt = interop.torch_to_linen(block, interop.load_state_dict(out_dir / "seed_model.pt"))
    from_safetensors = interop.torch_to_linen(block, interop.load_state_dict(out_dir / "seed_model.safetensors"))
    assert jax.tree.structure(from_pt) == jax.tree.structure(from_safetensors)
    for a, b in zip(jax.tree.leaves(from_pt), jax.tree.leaves(from_safetensors), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert (a.dtype, a.shape) == (b.dtype, b.shape)
        assert a.tobytes() == b.tobytes()


def test_example_model_is_the_parity_suites_seed_model() -> None:
    """The example carries its own copy of the seed's model (a user's file would); it must stay the one
    the parity suite checks: same state-dict names and shapes, same outputs from the same weights."""
    import torch

    from parity.seed_model import SeedModel

    args = (3, 8, 4, 3, 1, (10, 10))
    torch.manual_seed(0)
    example, reference = port_from_pytorch.SeedModel(*args), SeedModel(*args)
    example_state = example.state_dict()
    assert {k: v.shape for k, v in example_state.items()} == {k: v.shape for k, v in reference.state_dict().items()}
    reference.load_state_dict(example_state)
    x = torch.randn(5, 3, 10, 10)
    for train in (True, False):
        example.train(train)
        reference.train(train)
        with torch.no_grad():
            assert torch.equal(example(x), reference(x))
