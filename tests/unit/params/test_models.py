"""Models against hand-written numpy."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.params.models import MLP, LinearHeads, build_model, preset


def test_mlp_matches_hand_written_numpy() -> None:
    model = MLP([4, 8, 3], activation="relu")
    params = model.init(seed=1)
    x = np.random.default_rng(2).standard_normal((5, 4)).astype(np.float32)
    hidden = np.maximum(x @ params["w0"] + params["b0"], 0)
    expected = hidden @ params["w1"] + params["b1"]
    np.testing.assert_allclose(model.forward(params, x), expected, rtol=1e-6)
    assert x.shape == (5, 4)  # input untouched


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "identity"])
def test_mlp_activations(activation: str) -> None:
    model = MLP([3, 4, 2], activation=activation, softmax=True)
    params = model.init(seed=0)
    x = np.ones((2, 3), dtype=np.float32)
    h = x @ params["w0"] + params["b0"]
    h = {"tanh": np.tanh, "sigmoid": lambda v: 1 / (1 + np.exp(-v)), "identity": lambda v: v}[
        activation
    ](h)
    logits = h @ params["w1"] + params["b1"]
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(
        model.forward(params, x), e / e.sum(axis=1, keepdims=True), rtol=1e-5
    )


def test_article_preset_is_two_linear_heads_of_1000() -> None:
    model = preset("article")
    assert isinstance(model, LinearHeads)
    specs = model.tensor_specs()
    assert {n: s.shape for n, s in specs.items()} == {
        "weight1": (1000, 1000),
        "bias1": (1000,),
        "weight2": (1000, 1000),
        "bias2": (1000,),
    }
    assert all(s.dtype == "float32" for s in specs.values())
    small = LinearHeads(dim_in=3, dim_out=2)
    p = small.init(seed=3)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    expected = np.concatenate([x @ p["weight1"] + p["bias1"], x @ p["weight2"] + p["bias2"]], 1)
    np.testing.assert_allclose(small.forward(p, x), expected, rtol=1e-6)


def test_init_is_seeded() -> None:
    a, b = preset("mlp").init(7), preset("mlp").init(7)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_build_model_errors_are_clear() -> None:
    with pytest.raises(ConfigError, match="unknown architecture kind"):
        build_model({"kind": "lstm"})
    with pytest.raises(ConfigError, match="d_model must be a positive integer"):
        build_model({"kind": "transformer"})  # a known kind since issue 13: its arch is checked
    with pytest.raises(ConfigError, match="incomplete"):
        build_model({"kind": "mlp"})
    with pytest.raises(ConfigError, match="activation"):
        MLP([2, 2], activation="gelu")
