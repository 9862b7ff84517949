"""Small ONNX graphs built with ``onnx.helper`` for the ONNX tests, and their numpy references.

Import only after ``pytest.importorskip("onnx")``: onnx is the optional extra ``kvpipe[onnx]``.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = [helper.make_opsetid("", 17)]


def mlp_weights(seed: int = 0, sizes: tuple[int, ...] = (6, 16, 5)) -> dict[str, np.ndarray]:
    """Weights of a dense relu MLP: ``W0, b0, W1, b1, ...`` ((in, out) and (out,))."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        out[f"W{i}"] = (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)
        out[f"b{i}"] = (rng.standard_normal(n_out) * 0.1).astype(np.float32)
    return out


def mlp_reference(weights: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The MLP in float64 numpy."""
    h = x.astype(np.float64)
    layers = len(weights) // 2
    for i in range(layers):
        h = h @ weights[f"W{i}"].astype(np.float64) + weights[f"b{i}"].astype(np.float64)
        if i < layers - 1:
            h = np.maximum(h, 0)
    return h


def mlp_model(weights: dict[str, np.ndarray], *, batch: str | int = "N") -> onnx.ModelProto:
    """MatMul + Add (+ Relu) layers; input ``x`` [batch, in], output ``y`` [batch, out]."""
    layers = len(weights) // 2
    nodes = []
    h = "x"
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [h, f"W{i}"], [f"m{i}"]))
        nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]))
        h = f"a{i}"
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [h], [f"r{i}"]))
            h = f"r{i}"
    nodes.append(helper.make_node("Identity", [h], ["y"]))
    n_in = weights["W0"].shape[0]
    n_out = weights[f"b{layers - 1}"].shape[0]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, n_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, n_out])],
        [numpy_helper.from_array(a, name) for name, a in weights.items()],
    )
    return helper.make_model(graph, opset_imports=OPSET)


def mismatched_gemm() -> onnx.ModelProto:
    """A Gemm whose weight does not fit its input: passes onnx.checker, onnxruntime refuses."""
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "b"], ["y"])],
        "bad_gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [
            numpy_helper.from_array(np.ones((50, 3), np.float32), "W"),
            numpy_helper.from_array(np.ones(3, np.float32), "b"),
        ],
    )
    return helper.make_model(graph, opset_imports=OPSET)


def with_external_data(model: onnx.ModelProto, tensor: str, path: str) -> onnx.ModelProto:
    """``model`` with one initializer's data said to live in a file (a path on the worker)."""
    hostile = onnx.ModelProto()
    hostile.CopyFrom(model)
    for t in hostile.graph.initializer:
        if t.name == tensor:
            t.ClearField("raw_data")
            t.ClearField("float_data")
            t.data_location = TensorProto.EXTERNAL
            entry = t.external_data.add()
            entry.key, entry.value = "location", path
    return hostile


def with_custom_op(model: onnx.ModelProto, domain: str = "com.example.evil") -> onnx.ModelProto:
    """``model`` with one more node from a custom operator domain."""
    hostile = onnx.ModelProto()
    hostile.CopyFrom(model)
    out = hostile.graph.output[0].name
    hostile.graph.node[-1].output[0] = "pre_evil"
    hostile.graph.node.append(helper.make_node("Evil", ["pre_evil"], [out], domain=domain))
    hostile.opset_import.append(helper.make_opsetid(domain, 1))
    return hostile


def cnn_model(seed: int = 0) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A small convolutional net on 1x8x8 images: Conv 3x3 (4 ch) + Relu + Flatten + Gemm."""
    rng = np.random.default_rng(seed)
    w = {
        "conv_w": (rng.standard_normal((4, 1, 3, 3)) * 0.3).astype(np.float32),
        "conv_b": (rng.standard_normal(4) * 0.1).astype(np.float32),
        "fc_w": (rng.standard_normal((4 * 6 * 6, 5)) * 0.1).astype(np.float32),
        "fc_b": (rng.standard_normal(5) * 0.1).astype(np.float32),
    }
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], kernel_shape=[3, 3]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("Flatten", ["r"], ["f"], axis=1),
            helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"]),
        ],
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        [numpy_helper.from_array(a, n) for n, a in w.items()],
    )
    return helper.make_model(graph, opset_imports=OPSET), w


def cnn_reference(w: dict[str, Any], x: np.ndarray) -> np.ndarray:
    """The CNN in float64 numpy (valid 3x3 convolution, one kernel offset at a time)."""
    img = x.reshape(-1, 1, 8, 8).astype(np.float64)
    k = w["conv_w"].astype(np.float64)
    conv = np.zeros((img.shape[0], 4, 6, 6))
    for i in range(3):
        for j in range(3):
            patch = img[:, :, i : i + 6, j : j + 6]  # (n, 1, 6, 6)
            conv += np.einsum("nchw,oc->nohw", patch, k[:, :, i, j])
    conv += w["conv_b"].astype(np.float64)[None, :, None, None]
    h = np.maximum(conv, 0).reshape(img.shape[0], -1)
    return h @ w["fc_w"].astype(np.float64) + w["fc_b"].astype(np.float64)


def two_input_model(seed: int = 0) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Two named inputs and two named outputs: ``features`` float [N, 16] through a dense layer,
    plus a bias row picked by ``bucket`` int64 [N, 1] from a table ``E`` [16, 5]; outputs
    ``label`` int64 [N] (the argmax) and ``scores`` float [N, 5]."""
    rng = np.random.default_rng(seed)
    w = {
        "W0": (rng.standard_normal((16, 5)) / 4).astype(np.float32),
        "E": rng.standard_normal((16, 5)).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["features", "W0"], ["m"]),
        helper.make_node("Gather", ["E", "bucket"], ["g3"], axis=0),
        helper.make_node("Flatten", ["g3"], ["g"], axis=1),
        helper.make_node("Add", ["m", "g"], ["scores"]),
        helper.make_node("ArgMax", ["scores"], ["label"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "two_inputs",
        [
            helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 16]),
            helper.make_tensor_value_info("bucket", TensorProto.INT64, ["N", 1]),
        ],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 5]),
        ],
        [numpy_helper.from_array(a, name) for name, a in w.items()],
    )
    return helper.make_model(graph, opset_imports=OPSET), w


def two_input_reference(
    w: dict[str, np.ndarray], features: np.ndarray, bucket: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The two-input model in float64 numpy: (label, scores)."""
    scores = features.astype(np.float64) @ w["W0"] + w["E"][bucket.reshape(-1)]
    return scores.argmax(axis=1), scores
