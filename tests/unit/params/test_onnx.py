"""ONNX models with their weights in Redis (issue 12, items 1 and 5), on the in-memory KV:
publish splits a graph into tensors and a weightless graph, the registry reads each piece once
and the served outputs equal numpy's; hostile graphs are refused at publish, writing nothing; a
graph onnxruntime refuses is ``model_unusable``; tampering is ``params_corrupt``."""

from __future__ import annotations

import asyncio
import hashlib
import tracemalloc
from typing import Any

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx
from onnx import TensorProto, helper, numpy_helper

from pipeline.cache.cache import ParamCache, Source
from pipeline.errors import ConfigError, KvpipeError, ParamsCorrupt, RequestError
from pipeline.io.kv.memory import MemoryKV
from pipeline.params.keys import BlobKey
from pipeline.params.models import PluginModel, build_model, model_kinds
from pipeline.params.onnx import GRAPH_PARAM, set_session_threads
from pipeline.params.onnx_graph import IN_MEMORY, OnnxLimits, prepare_onnx
from pipeline.params.registry import ModelRegistry
from pipeline.params.store import ParamStore
from tests.onnx_graphs import (
    OPSET,
    cnn_model,
    cnn_reference,
    mismatched_gemm,
    mlp_model,
    mlp_reference,
    mlp_weights,
    two_input_model,
    two_input_reference,
    with_custom_op,
    with_external_data,
)


def make_registry() -> tuple[ModelRegistry, MemoryKV]:
    kv = MemoryKV()
    cache: ParamCache[Any] = ParamCache(capacity_bytes=10**8, ttl_s=60.0)
    return ModelRegistry(ParamStore(kv, prefix="t"), cache, version_ttl_s=60.0), kv


def serialized(model: onnx.ModelProto) -> bytes:
    return bytes(model.SerializeToString())


def test_onnx_is_a_registered_kind() -> None:
    assert "onnx" in model_kinds()


def test_prepare_splits_weights_from_the_graph() -> None:
    w = mlp_weights()
    prepared = prepare_onnx(serialized(mlp_model(w)))
    arch = prepared.arch
    assert arch["kind"] == "onnx" and arch["batch"] == "dynamic"
    assert (arch["input_dim"], arch["output_dim"]) == (6, 5)
    assert arch["outputs"] == [
        {"name": "y", "dtype": "float32", "shape": [None, 5], "columns": [0, 5]}
    ]
    assert set(prepared.tensors) == {"W0", "W1"}  # b0 (16) and b1 (5) are small: kept inline
    for name, arr in prepared.tensors.items():
        assert np.array_equal(prepared.tensors[name], arr)
    assert arch["graph_sha256"] == hashlib.sha256(prepared.graph).hexdigest()
    graph = onnx.load_model_from_string(prepared.graph)
    stubs = {t.name: t for t in graph.graph.initializer if t.external_data}
    assert set(stubs) == {"W0", "W1"}  # a stub: name, type, dims, data "elsewhere", in memory
    assert all(not t.raw_data and not t.float_data for t in stubs.values())
    assert [(e.key, e.value) for e in stubs["W0"].external_data] == [("location", IN_MEMORY)]
    assert list(stubs["W0"].dims) == [6, 16]
    assert w["W0"].tobytes() not in prepared.graph and len(prepared.graph) < 1000
    model = build_model(arch)
    assert model.kind == "dense" and model.input_dim == 6 and model.output_dim == 5


async def test_published_onnx_serves_numpy_outputs_and_reads_each_piece_once() -> None:
    registry, kv = make_registry()
    w = mlp_weights(1)
    published = await registry.store.publish_onnx("m", serialized(mlp_model(w)))
    tensors = published.manifest.tensors
    assert published.version == 1 and set(tensors) == {"W0", "W1"}
    assert await kv.exists("t:m:v1:graph")
    kv.calls.clear()
    kv.latency_s = 0.01
    out = await asyncio.gather(*(registry.resolve("m") for _ in range(300)))
    # the pointer, the manifest, two initializers and the graph: five GETs for 300 resolves
    assert kv.calls["get"] == 1 + 1 + len(tensors) + 1
    assert sum(kv.calls.values()) == kv.calls["get"]
    resolved = out[0]
    assert GRAPH_PARAM in resolved.params
    x = np.random.default_rng(0).standard_normal((37, 6)).astype(np.float32)
    y = resolved.model.forward(resolved.params, x)
    ref = mlp_reference(w, x)
    diff = float(np.abs(y - ref).max())
    print(f"onnx mlp: max abs diff to numpy {diff:.2e} over {x.shape[0]} rows")
    assert y.dtype == np.float32 and y.shape == (37, 5) and diff < 1e-5
    again = await registry.resolve("m")
    assert again.source is Source.HIT


async def test_a_new_version_changing_one_initializer_reads_only_that_one() -> None:
    registry, kv = make_registry()
    w1 = mlp_weights(2, (6, 16, 16, 5))
    await registry.store.publish_onnx("m", serialized(mlp_model(w1)))
    await registry.resolve("m")
    w2 = {**w1, "W2": w1["W2"] + np.float32(0.25)}  # the head (16x5) alone
    await registry.store.publish_onnx("m", serialized(mlp_model(w2)))
    registry.set_version("m", 2)
    kv.calls.clear()
    resolved = await registry.resolve("m")
    # the manifest and the changed head; the graph without weights is the same content
    assert kv.calls["get"] == 2, dict(kv.calls)
    x = np.random.default_rng(1).standard_normal((5, 6)).astype(np.float32)
    assert np.abs(resolved.model.forward(resolved.params, x) - mlp_reference(w2, x)).max() < 1e-5


async def test_a_cnn_on_image_rows() -> None:
    registry, _ = make_registry()
    model, w = cnn_model()
    await registry.store.publish_onnx("cnn", serialized(model))
    resolved = await registry.resolve("cnn")
    assert resolved.model.input_dim == 64 and resolved.model.output_dim == 5
    x = np.random.default_rng(3).standard_normal((9, 64)).astype(np.float32)  # flattened 8x8
    y = resolved.model.forward(resolved.params, x)
    assert np.abs(y - cnn_reference(w, x)).max() < 1e-4


async def test_named_inputs_are_packed_and_every_output_comes_back_by_name() -> None:
    registry, _ = make_registry()
    model, w = two_input_model()
    published = await registry.store.publish_onnx("two", serialized(model))
    assert set(published.manifest.tensors) == {"W0", "E"}
    resolved = await registry.resolve("two")
    served = resolved.model
    assert isinstance(served, PluginModel)
    assert served.input_names == ("features", "bucket") and served.input_dim == 17
    assert served.packed_dtype == np.float64  # an int64 input: packed exactly
    rng = np.random.default_rng(4)
    features = rng.standard_normal((11, 16)).astype(np.float32)
    bucket = rng.integers(0, 16, (11, 1))
    x = served.pack_inputs({"bucket": bucket, "features": features})  # any order
    y = served.forward(resolved.params, x)
    named = served.named_outputs(y)
    assert named is not None and list(named) == ["label", "scores"]
    label, scores = two_input_reference(w, features, bucket)
    assert named["label"].dtype == np.int64 and named["label"].shape == (11,)
    assert np.array_equal(named["label"], label)
    assert named["scores"].dtype == np.float32 and np.abs(named["scores"] - scores).max() < 1e-5
    # a flat row per input works as well as its own shape
    assert np.array_equal(served.pack_inputs({"features": features, "bucket": bucket[:, 0]}), x)


@pytest.mark.parametrize(
    ("named", "code", "says"),
    [
        ({"features": np.zeros((2, 16), np.float32)}, "bad_input", "missing bucket"),
        (
            {"features": np.zeros((2, 16)), "bucket": np.zeros((2, 1)), "extra": np.zeros((2, 1))},
            "bad_input",
            "not inputs of it: 'extra'",
        ),
        ({"features": np.zeros((2, 15)), "bucket": np.zeros((2, 1))}, "bad_shape", "[N, 16]"),
        ({"features": np.zeros((2, 16)), "bucket": np.full((2, 1), 0.5)}, "bad_dtype", "integers"),
        (
            {"features": np.zeros((2, 16)), "bucket": np.full((2, 1), 2**60)},
            "bad_input",
            "int64 values from -9007199254740992 to 9007199254740992",
        ),
        (
            {"features": np.zeros((2, 16)), "bucket": np.full((2, 1), 1e19)},
            "bad_input",
            "int64 values from",
        ),
        ({"features": np.full((2, 16), 1e39), "bucket": np.zeros((2, 1))}, "non_finite", "range"),
    ],
)
async def test_named_inputs_that_do_not_fit_say_why(
    named: dict[str, np.ndarray], code: str, says: str
) -> None:
    registry, _ = make_registry()
    await registry.store.publish_onnx("two", serialized(two_input_model()[0]))
    served = (await registry.resolve("two")).model
    assert isinstance(served, PluginModel)
    with pytest.raises(RequestError) as info:
        served.pack_inputs(named)
    assert info.value.code == code and says in str(info.value), str(info.value)


async def test_fixed_batch_of_one_runs_row_by_row() -> None:
    registry, _ = make_registry()
    w = mlp_weights(4)
    await registry.store.publish_onnx("one", serialized(mlp_model(w, batch=1)))
    resolved = await registry.resolve("one")
    assert resolved.manifest.arch["batch"] == 1
    x = np.random.default_rng(4).standard_normal((7, 6)).astype(np.float32)
    assert np.abs(resolved.model.forward(resolved.params, x) - mlp_reference(w, x)).max() < 1e-5


async def test_small_constants_stay_in_the_graph_weights_go_to_redis() -> None:
    """A weight (6x100) goes to Redis; a scalar, an int64 shape that onnxruntime reads while
    it resolves the graph, and a bool stay inline."""
    w = np.random.default_rng(8).standard_normal((6, 100)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["m"]),
            helper.make_node("Mul", ["m", "scale"], ["s"]),
            helper.make_node("Reshape", ["s", "grid"], ["g"]),
            helper.make_node("Relu", ["g"], ["r"]),
            helper.make_node("Reshape", ["r", "flat"], ["f"]),
            helper.make_node("Cast", ["flag"], ["flagf"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["f", "flagf"], ["y"]),
        ],
        "misc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 100])],
        [
            numpy_helper.from_array(w, "W"),
            numpy_helper.from_array(np.array(2.5, dtype=np.float32), "scale"),
            numpy_helper.from_array(np.array([-1, 10, 10], dtype=np.int64), "grid"),
            numpy_helper.from_array(np.array([-1, 100], dtype=np.int64), "flat"),
            numpy_helper.from_array(np.array([True]), "flag"),
        ],
    )
    model = helper.make_model(graph, opset_imports=OPSET)
    registry, _ = make_registry()
    published = await registry.store.publish_onnx("misc", serialized(model))
    assert set(published.manifest.tensors) == {"W"}
    resolved = await registry.resolve("misc")
    x = np.random.default_rng(9).standard_normal((3, 6)).astype(np.float32)
    ref = np.maximum(x.astype(np.float64) @ w * 2.5, 0)
    assert np.abs(resolved.model.forward(resolved.params, x) - ref).max() < 1e-4


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("external", "references external data (/etc/passwd)"),
        ("external_attribute", "references external data (weights.bin)"),
        ("custom_domain", "operator domain 'com.example.evil'"),
        ("function", "local function"),
        ("too_many_nodes", "more than 3 nodes"),
        ("too_many_bytes", "initializers hold more than 100 bytes"),
        ("file_too_big", "over the limit of 200"),
        ("not_onnx", "not an ONNX model"),
        ("mixed_batch", "fixed batch sizes"),
        ("fixed_batch", "fixed batch sizes ('x' [4, 6])"),
        ("dynamic_width", "must be fixed"),
        ("checker", "onnx.checker"),
    ],
)
async def test_hostile_graphs_are_refused_at_publish_writing_nothing(case: str, says: str) -> None:
    w = mlp_weights()
    base = mlp_model(w)
    limits = OnnxLimits()
    if case == "external":
        model = with_external_data(base, "W0", "/etc/passwd")
    elif case == "external_attribute":
        model = onnx.ModelProto()
        model.CopyFrom(base)
        const = helper.make_node(
            "Constant",
            [],
            ["c"],
            value=numpy_helper.from_array(np.ones(4, np.float32), "c"),
        )
        t = const.attribute[0].t
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        e = t.external_data.add()
        e.key, e.value = "location", "weights.bin"
        model.graph.node.insert(0, const)
    elif case == "custom_domain":
        model = with_custom_op(base)
    elif case == "function":
        model = onnx.ModelProto()
        model.CopyFrom(base)
        fn = helper.make_function(
            "local", "F", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])], OPSET
        )
        model.functions.append(fn)
    elif case == "too_many_nodes":
        model, limits = base, OnnxLimits(max_nodes=3)
    elif case == "too_many_bytes":
        model, limits = base, OnnxLimits(max_initializer_bytes=100)
    elif case == "file_too_big":
        model, limits = base, OnnxLimits(max_file_bytes=200)
    elif case == "mixed_batch":
        model = onnx.ModelProto()
        model.CopyFrom(base)
        model.graph.input.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [3, 2]))
    elif case == "fixed_batch":
        model = mlp_model(w, batch=4)
    elif case == "dynamic_width":
        model = onnx.ModelProto()
        model.CopyFrom(base)
        model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "W"
    elif case == "checker":
        model = onnx.ModelProto()
        model.CopyFrom(base)
        model.graph.node[0].input[0] = "nowhere"
    kv = MemoryKV()
    store = ParamStore(kv, prefix="t")
    data = b"\x08\x07garbage" * 3 if case == "not_onnx" else serialized(model)
    with pytest.raises(ConfigError) as info:
        await store.publish_onnx("m", data, limits=limits)
    message = str(info.value)
    print(f"{case}: {message}")
    assert says in message and "\n" not in message
    assert kv.keys() == []


async def test_a_graph_onnxruntime_refuses_is_refused_at_publish_writing_nothing() -> None:
    registry, kv = make_registry()
    with pytest.raises(ConfigError) as info:
        await registry.store.publish_onnx("bad", serialized(mismatched_gemm()))
    assert "onnxruntime cannot build a session" in str(info.value)
    assert "\n" not in str(info.value) and kv.calls["set"] == 0
    assert not await kv.exists("t:bad:current")


async def test_a_graph_onnxruntime_refuses_is_model_unusable_every_time() -> None:
    """Published unchecked (by an older kvpipe, or session_check=False): every batch of its
    version is model_unusable, never a crash."""
    registry, _ = make_registry()
    await registry.store.publish_onnx("bad", serialized(mismatched_gemm()), session_check=False)
    resolved = await registry.resolve("bad")
    x = np.ones((2, 4), dtype=np.float32)
    for _ in range(2):  # the failure is remembered for the version, never a crash
        with pytest.raises(KvpipeError) as info:
            resolved.model.forward(resolved.params, x)
        assert info.value.code == "model_unusable"
        assert "onnxruntime cannot build a session" in str(info.value)


@pytest.mark.parametrize("piece", ["tensor", "graph"])
async def test_tampered_pieces_are_params_corrupt(piece: str) -> None:
    registry, kv = make_registry()
    await registry.store.publish_onnx("m", serialized(mlp_model(mlp_weights(5))))
    key = "t:m:v1:t:W1" if piece == "tensor" else "t:m:v1:graph"
    blob = bytearray(await kv.get(key) or b"")
    blob[-1] ^= 0x01
    await kv.set(key, bytes(blob))
    with pytest.raises(ParamsCorrupt, match="sha256"):
        await registry.resolve("m")


async def test_a_version_switch_drops_the_old_graph() -> None:
    registry, _ = make_registry()
    await registry.store.publish_onnx("m", serialized(mlp_model(mlp_weights(6))))
    v1 = await registry.resolve("m")
    await registry.store.publish_onnx("m", serialized(mismatched_gemm()), session_check=False)
    registry.set_version("m", 2)
    await registry.resolve("m")
    keys = set(registry.cache.keys())
    assert v1.manifest.graph_sha256 is not None
    assert BlobKey("m", v1.manifest.graph_sha256) not in keys


async def test_retention_and_rollback_keep_the_graph_with_its_version() -> None:
    kv = MemoryKV()
    store = ParamStore(kv, prefix="t", retention_s=30.0)
    data = serialized(mlp_model(mlp_weights(7)))
    for _ in range(3):
        await store.publish_onnx("m", data)
    assert (kv.ttl("t:m:v1:graph") or 0) > 0  # v1 is neither current nor the previous one
    assert kv.ttl("t:m:v3:graph") is None and kv.ttl("t:m:v2:graph") is None
    await store.set_current("m", 1)
    assert kv.ttl("t:m:v1:graph") is None


async def test_a_stored_graph_reaching_for_a_file_is_refused_before_onnxruntime_sees_it() -> None:
    """Someone who can write Redis rewrites a version's graph and its manifest's sha256 to
    match: a tensor that would be read from a file is refused when the session is built."""
    prepared = prepare_onnx(serialized(mlp_model(mlp_weights(10))))
    graph = onnx.load_model_from_string(prepared.graph)
    for t in graph.graph.initializer:
        if t.name == "b0":  # an inline initializer, now said to live in a file
            t.ClearField("raw_data")
            t.data_location = TensorProto.EXTERNAL
            entry = t.external_data.add()
            entry.key, entry.value = "location", "/etc/shadow"
    forged = graph.SerializeToString()
    arch = {**prepared.arch, "graph_sha256": hashlib.sha256(forged).hexdigest()}
    registry, _ = make_registry()
    await registry.store.publish("m", arch, prepared.tensors, graph=forged)
    resolved = await registry.resolve("m")
    with pytest.raises(ParamsCorrupt, match="external data"):
        resolved.model.forward(resolved.params, np.ones((1, 6), dtype=np.float32))


async def test_sessions_compute_with_the_workers_blas_threads() -> None:
    registry, _ = make_registry()
    await registry.store.publish_onnx("m", serialized(mlp_model(mlp_weights(9))))
    resolved = await registry.resolve("m")
    assert isinstance(resolved.model, PluginModel)
    set_session_threads(2)
    try:
        resolved.model.forward(resolved.params, np.zeros((1, 6), np.float32))
    finally:
        set_session_threads(1)
    session = resolved.model.plugin._session
    assert session.get_session_options().intra_op_num_threads == 2


async def test_integers_stay_exact_and_nothing_is_allocated_before_the_inputs_fit() -> None:
    registry, _ = make_registry()
    await registry.store.publish_onnx("two", serialized(two_input_model()[0]))
    served = (await registry.resolve("two")).model
    assert isinstance(served, PluginModel)
    exact = served.pack_inputs({"features": np.zeros((1, 16)), "bucket": np.array([[16777217.0]])})
    assert exact[0, 16] == 16777217  # beyond float32's exact integers, still exact
    rows = 4096
    wrong = {"features": np.zeros((rows, 15)), "bucket": np.zeros((rows, 1), np.int64)}
    tracemalloc.start()
    try:
        with pytest.raises(RequestError):
            served.pack_inputs(wrong)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < rows * served.input_dim * 8 // 4, peak  # the packed matrix never allocated
