"""ONNX models served end to end (issue 12, items 1, 4 and 5): published to the real Redis,
served by a real worker through the broker, compared with numpy and scikit-learn; hostile
graphs refused by ``kvpipe publish --onnx`` in one line; a graph onnxruntime refuses answered
``model_unusable`` while the worker keeps serving; tampering ``params_corrupt``; a cold burst
reads each initializer from Redis once."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis.asyncio as redis_py

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx
from onnx import helper

from pipeline.client import ResultStream
from pipeline.config import settings_to_env
from pipeline.io.kv import open_kv
from pipeline.params.store import ParamStore, Published
from tests.integration.conftest import collect
from tests.integration.test_cli import kvpipe
from tests.onnx_graphs import (
    mismatched_gemm,
    mlp_model,
    mlp_reference,
    mlp_weights,
    two_input_model,
    two_input_reference,
    with_custom_op,
    with_external_data,
)

pytestmark = pytest.mark.integration


async def publish_onnx(
    settings: Any, name: str, model: onnx.ModelProto, *, session_check: bool = True
) -> Published:
    async with open_kv(settings.redis) as kv:
        store = ParamStore(kv, prefix=settings.redis.key_prefix)
        return await store.publish_onnx(
            name, model.SerializeToString(), session_check=session_check
        )


async def test_an_onnx_mlp_served_through_kafka_equals_numpy(
    make_settings: Any, start_worker: Any, make_client: Any
) -> None:
    settings = make_settings()
    w = mlp_weights(11, (12, 64, 32, 7))
    published = await publish_onnx(settings, "mlp", mlp_model(w))
    assert published.version == 1
    client = await make_client(settings)
    rng = np.random.default_rng(12)
    xs = [rng.standard_normal((int(rng.integers(1, 5)), 12)).astype(np.float32) for _ in range(60)]
    k = settings.kafka
    async with ResultStream(k, k.results_topic, from_beginning=True) as stream:
        await start_worker(settings)
        for i, x in enumerate(xs):
            await client.submit("mlp", x, id=f"r{i}", wait=False)
        await client.flush()
        got = await collect(stream, {f"r{i}" for i in range(len(xs))})
    assert len(got) == len(xs)
    worst = 0.0
    for i, x in enumerate(xs):
        result = got[f"r{i}"][0]
        assert result.ok and result.version == 1, result.meta()
        assert result.outputs is not None and result.outputs.shape == (x.shape[0], 7)
        worst = max(worst, float(np.abs(result.outputs - mlp_reference(w, x)).max()))
    print(f"onnx mlp through kafka: {len(xs)} requests, max abs diff to numpy {worst:.2e}")
    assert worst < 1e-5


async def test_a_graph_onnxruntime_refuses_is_model_unusable_and_the_worker_serves_on(
    make_settings: Any, start_worker: Any, make_client: Any
) -> None:
    settings = make_settings()
    await publish_onnx(settings, "bad", mismatched_gemm(), session_check=False)
    w = mlp_weights(13)
    await publish_onnx(settings, "good", mlp_model(w))
    client = await make_client(settings)
    await start_worker(settings)
    x_bad = np.ones((2, 4), dtype=np.float32)
    x_good = np.random.default_rng(14).standard_normal((3, 6)).astype(np.float32)
    for _ in range(2):  # the failure is remembered per version; every answer is the same
        bad = await client.infer("bad", x_bad)
        assert not bad.ok and bad.error_code == "model_unusable", bad.meta()
        assert "onnxruntime cannot build a session" in (bad.error_message or "")
        good = await client.infer("good", x_good)
        assert good.ok and good.outputs is not None, good.meta()
        assert np.abs(good.outputs - mlp_reference(w, x_good)).max() < 1e-5


async def test_a_tampered_initializer_is_params_corrupt(
    make_settings: Any, start_worker: Any, make_client: Any
) -> None:
    settings = make_settings()
    published = await publish_onnx(settings, "m", mlp_model(mlp_weights(15)))
    tensor = sorted(published.manifest.tensors)[0]
    async with open_kv(settings.redis) as kv:
        store = ParamStore(kv, prefix=settings.redis.key_prefix)
        key = store.tensor_key("m", 1, tensor)
        blob = bytearray(await kv.get(key) or b"")
        blob[-1] ^= 0x01  # one bit of one weight
        await kv.set(key, bytes(blob))
    client = await make_client(settings)
    await start_worker(settings)
    result = await client.infer("m", np.ones((1, 6), dtype=np.float32))
    assert not result.ok and result.error_code == "params_corrupt", result.meta()


async def test_cold_burst_of_500_reads_each_initializer_once_from_redis(
    redis_factory: Any, make_settings: Any, start_worker: Any, make_client: Any
) -> None:
    server = await redis_factory()
    settings = make_settings(redis__url=server.url)
    w = mlp_weights(16, (32, 128, 128, 10))
    published = await publish_onnx(settings, "burst", mlp_model(w))
    initializers = len(published.manifest.tensors)
    assert initializers == 5  # W0, b0, W1, b1, W2; b2 (10 values) stays in the graph
    raw = redis_py.Redis.from_url(server.url)
    try:
        await raw.config_resetstat()
        client = await make_client(settings)
        x = np.random.default_rng(17).standard_normal((500, 32)).astype(np.float32)
        for i in range(500):
            await client.submit("burst", x[i : i + 1], id=f"b{i}", wait=False)
        await client.flush()
        k = settings.kafka
        async with ResultStream(k, k.results_topic, from_beginning=True) as stream:
            await start_worker(settings)
            got = await collect(stream, {f"b{i}" for i in range(500)})
        assert len(got) == 500 and all(r[0].ok for r in got.values())
        stats = await raw.info("commandstats")
    finally:
        await raw.aclose()
    worst = max(
        float(np.abs(got[f"b{i}"][0].outputs - mlp_reference(w, x[i : i + 1])).max())  # type: ignore[operator]
        for i in range(500)
    )
    reads = {
        name: int(v["calls"])
        for name, v in stats.items()
        if name.removeprefix("cmdstat_") in ("get", "mget", "hget", "hmget", "hgetall")
    }
    print(f"cold burst of 500: Redis reads {reads}, max abs diff {worst:.2e}")
    # the version pointer, the manifest, five initializers and the graph: eight GETs
    assert reads == {"cmdstat_get": 1 + 1 + initializers + 1}, json.dumps(stats)
    assert worst < 1e-4


def _long_chain(nodes: int) -> onnx.ModelProto:
    """An MLP followed by ``nodes`` Identity nodes: over the node limit, small on disk."""
    model = mlp_model(mlp_weights(18))
    graph = model.graph
    graph.node[-1].output[0] = "c0"
    for i in range(nodes):
        graph.node.append(helper.make_node("Identity", [f"c{i}"], [f"c{i + 1}"]))
    graph.node.append(helper.make_node("Identity", [f"c{nodes}"], ["y"]))
    return model


def test_publish_onnx_from_the_command_line_and_hostile_files_in_one_line(
    make_settings: Any, tmp_path: Path
) -> None:
    settings = make_settings()
    env = settings_to_env(settings)
    good = tmp_path / "good.onnx"
    onnx.save_model(mlp_model(mlp_weights(19)), good)
    out = kvpipe("publish", "--model", "cli", "--onnx", str(good), "--no-announce", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"
    base = mlp_model(mlp_weights(20))
    external = with_external_data(base, "W0", "/etc/passwd")
    hostile = {
        "external": (external, "references external data (/etc/passwd)"),
        "custom_op": (with_custom_op(base), "operator domain 'com.example.evil'"),
        "oversized": (_long_chain(20_001), "more than 20000 nodes"),
    }
    for case, (model, says) in hostile.items():
        path = tmp_path / f"{case}.onnx"
        path.write_bytes(model.SerializeToString())
        out = kvpipe("publish", "--model", "cli", "--onnx", str(path), env=env)
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        print(f"{case}: exit {out.returncode}: {lines}")
        assert out.returncode == 2 and len(lines) == 1 and "Traceback" not in out.stderr
        assert lines[0].startswith("kvpipe publish: error: ONNX graph refused: ")
        assert says in lines[0]
    not_onnx = tmp_path / "junk.onnx"
    not_onnx.write_bytes(b"\x08\x07 not a model")
    out = kvpipe("publish", "--model", "cli", "--onnx", str(not_onnx), env=env)
    assert out.returncode == 2 and "not an ONNX model" in out.stderr
    unbuildable = tmp_path / "gemm.onnx"  # passes onnx.checker; onnxruntime refuses it
    unbuildable.write_bytes(mismatched_gemm().SerializeToString())
    out = kvpipe("publish", "--model", "cli", "--onnx", str(unbuildable), env=env)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    print(f"unbuildable: exit {out.returncode}: {lines}")
    assert out.returncode == 2 and len(lines) == 1
    assert "onnxruntime cannot build a session for this ONNX graph" in lines[0]
    listing = kvpipe("versions", "--model", "cli", "--json", env=env)
    assert listing.returncode == 0, listing.stderr
    assert [v["version"] for v in json.loads(listing.stdout)] == [1]  # nothing refused written


async def test_digits_mlp_from_scikit_learn_served_equals_its_predict(
    make_settings: Any, start_worker: Any, make_client: Any
) -> None:
    sklearn = pytest.importorskip("sklearn")
    pytest.importorskip("skl2onnx")
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    x_all, y_all = load_digits(return_X_y=True)  # ships inside scikit-learn: nothing downloaded
    x_all = (x_all / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x_all, y_all, test_size=0.25, random_state=0, stratify=y_all
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few iterations on purpose: ConvergenceWarning
        clf = MLPClassifier(hidden_layer_sizes=(32,), max_iter=60, random_state=0)
        clf.fit(x_train, y_train)
    converted = convert_sklearn(
        clf,
        initial_types=[("input", FloatTensorType([None, 64]))],
        options={id(clf): {"zipmap": False}},
    )
    settings = make_settings()
    published = await publish_onnx(settings, "digits", converted)
    outputs = {o["name"]: o["columns"] for o in published.manifest.arch["outputs"]}
    assert outputs == {"label": [0, 1], "probabilities": [1, 11]}
    client = await make_client(settings)
    k = settings.kafka
    async with ResultStream(k, k.results_topic, from_beginning=True) as stream:
        await start_worker(settings)
        for i in range(0, len(x_test), 10):  # ten held-out rows a request
            await client.submit("digits", x_test[i : i + 10], id=f"d{i}", wait=False)
        await client.flush()
        ids = {f"d{i}" for i in range(0, len(x_test), 10)}
        got = await collect(stream, ids)
    assert got.keys() == ids and all(r[0].ok for r in got.values())
    served = np.concatenate(
        [got[f"d{i}"][0].outputs for i in range(0, len(x_test), 10)]  # type: ignore[misc]
    )
    labels, probs = served[:, 0].astype(int), served[:, 1:11]
    for i in range(0, len(x_test), 10):  # the same answers by name, the label an integer
        named = got[f"d{i}"][0].named
        assert named is not None and list(named) == ["label", "probabilities"]
        assert named["label"].dtype.kind == "i" and named["label"].shape == (
            min(10, len(x_test) - i),
        )
        assert np.array_equal(named["label"], labels[i : i + 10])
        assert np.array_equal(named["probabilities"].astype(np.float32), probs[i : i + 10])
    predicted = clf.predict(x_test)
    proba = clf.predict_proba(x_test)
    differ = np.flatnonzero(probs.argmax(axis=1) != predicted)
    for row in differ:  # only where sklearn's two best classes are a rounding apart
        top2 = np.sort(proba[row])[-2:]
        print(f"row {row}: served {probs[row].argmax()}, sklearn {predicted[row]}, margin "
              f"{top2[1] - top2[0]:.2e}")  # fmt: skip
        assert top2[1] - top2[0] < 1e-5
    accuracy = float((labels == y_test).mean())
    print(
        f"digits (scikit-learn {sklearn.__version__}): {len(x_test)} held-out rows served, "
        f"{len(differ)} differ from predict, served accuracy {accuracy:.4f}, sklearn's own "
        f"{clf.score(x_test, y_test):.4f}, max abs diff of probabilities "
        f"{np.abs(probs - proba).max():.2e}"
    )
    assert set(np.flatnonzero(labels != predicted)) <= set(differ)
    assert np.abs(probs - proba).max() < 1e-4
    assert accuracy > 0.9


async def test_named_inputs_through_kafka_get_every_output_by_name(
    make_settings: Any, start_worker: Any, make_client: Any
) -> None:
    settings = make_settings()
    model, w = two_input_model(5)
    await publish_onnx(settings, "two", model)
    await publish_onnx(settings, "one", mlp_model(mlp_weights(6)))
    client = await make_client(settings)
    rng = np.random.default_rng(6)
    sent: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    k = settings.kafka
    async with ResultStream(k, k.results_topic, from_beginning=True) as stream:
        await start_worker(settings)
        for i in range(40):
            rows = int(rng.integers(1, 4))
            features = rng.standard_normal((rows, 16)).astype(np.float32)
            bucket = rng.integers(0, 16, (rows, 1))
            sent[f"n{i}"] = (features, bucket)
            named = {"bucket": bucket.tolist(), "features": features}
            await client.submit("two", named, id=f"n{i}", wait=False)
        await client.submit("two", np.zeros((1, 17), np.float32), id="unnamed", wait=False)
        await client.submit("one", {"y": np.zeros((1, 6))}, id="misnamed", wait=False)
        await client.submit("one", {"x": np.ones((2, 6))}, id="one-named", wait=False)
        await client.submit("one", np.ones((2, 6), np.float32), id="one-rows", wait=False)
        await client.flush()
        got = await collect(stream, {*sent, "unnamed", "misnamed", "one-named", "one-rows"})
    for rid, (features, bucket) in sent.items():
        result = got[rid][0]
        assert result.ok and result.named is not None, result.meta()
        label, scores = two_input_reference(w, features, bucket)
        assert result.named["label"].tolist() == label.tolist()
        assert np.abs(result.named["scores"] - scores).max() < 1e-5
    unnamed, misnamed = got["unnamed"][0], got["misnamed"][0]
    assert unnamed.error_code == "bad_request" and "features, bucket" in str(unnamed.error_message)
    assert misnamed.error_code == "bad_input" and "missing x" in str(misnamed.error_message)
    one_named, one_rows = got["one-named"][0], got["one-rows"][0]
    assert one_named.ok and one_rows.ok and one_named.named is not None
    # a single input, by name or as rows, is the same request
    assert np.array_equal(one_named.named["y"].astype(np.float32), one_rows.outputs)
    print(f"named inputs through kafka: {len(sent)} requests, every output by name equal numpy")
