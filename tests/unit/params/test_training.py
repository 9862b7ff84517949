"""The trainer against hostile input: examples validated whole before they join a batch,
skipped and counted by reason, few log lines for a flood of junk; a diverging step undone; a
publish of non-finite weights refused (on the in-memory KV)."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from consumers.trainer import TrainSettings, _Examples
from pipeline.errors import KvpipeError
from pipeline.io.kafka import Message, Partition
from pipeline.params.models import EmbeddingScorer, preset
from pipeline.params.training import MLPTrainer

MLP_CFG = TrainSettings(model="m", preset="mlp", synthetic=False, batch_size=1000)


class ListConsumer:
    """The consumer boundary: hands out the given values, ``max_records`` at a time."""

    def __init__(self, values: list[bytes | None]) -> None:
        self.messages = [
            Message(Partition("t.training", 0), i, None, v, (), 0) for i, v in enumerate(values)
        ]

    async def getmany(self, *, timeout_ms: int, max_records: int) -> list[Message]:
        out, self.messages = self.messages[:max_records], self.messages[max_records:]
        return out


def good(i: int) -> bytes:
    return orjson.dumps({"inputs": [0.01 * i] * 32, "target": [0.5] * 8})


def with_target(target: Any) -> bytes:
    return orjson.dumps({"inputs": [0.1] * 32, "target": target})


#: (message, reason) for the MLP preset (32 inputs, 8 outputs)
BAD_MLP: list[tuple[bytes | None, str]] = [
    (None, "empty"),
    (b"", "empty"),
    (with_target("oops"), "not_numbers"),
    (with_target([1e39] * 8), "out_of_range"),
    (with_target([1e6 + 1] + [0.0] * 7), "out_of_range"),
    (with_target([True] * 8), "not_numbers"),
    (with_target([[0.5]] * 8), "not_numbers"),
    (with_target([None] * 8), "not_numbers"),
    (with_target({"a": 1}), "not_numbers"),
    (with_target([0.5] * 7), "wrong_width"),
    (with_target(0.5), "not_numbers"),
    (orjson.dumps({"inputs": [0.1] * 31, "target": [0.5] * 8}), "wrong_width"),
    (orjson.dumps({"inputs": [[0.1] * 32], "target": [0.5] * 8}), "wrong_width"),
    (orjson.dumps({"inputs": ["0.1"] * 32, "target": [0.5] * 8}), "not_numbers"),
    (orjson.dumps({"ids": [1, 2], "target": [0.5] * 8}), "missing_field"),
    (orjson.dumps({"inputs": [0.1] * 32}), "missing_field"),
    (b'{"inputs": [NaN' + b", 0.1" * 31 + b'], "target": [0,0,0,0,0,0,0,0]}', "not_json"),
    (b'{"inputs": [1e400' + b", 0.1" * 31 + b'], "target": [0,0,0,0,0,0,0,0]}', "not_json"),
    (b"\xff\xfe\x00junk", "not_utf8"),
    (b"\x80\x04\x95pickle", "not_utf8"),
    (b"{not json", "not_json"),
    (b"[1, 2, 3]", "not_object"),
    (b'"just a string"', "not_object"),
    (b"null", "not_object"),
    (orjson.dumps({"inputs": [0.1] * 20_000, "target": [0.5] * 8}), "too_large"),
]


async def test_bad_examples_are_skipped_by_reason_and_never_reach_the_batch() -> None:
    values: list[bytes | None] = []
    for i, (raw, _) in enumerate(BAD_MLP):
        values += [good(i), raw]
    model = preset("mlp")
    examples = _Examples(model, MLP_CFG, ListConsumer(values))  # type: ignore[arg-type]
    batch = await examples.next()
    assert batch is not None
    x, y = batch
    assert x.shape == (len(BAD_MLP), 32) and y.shape == (len(BAD_MLP), 8)
    assert x.dtype == np.float32 and np.isfinite(x).all() and np.isfinite(y).all()
    assert np.allclose(x[:, 0], [0.01 * i for i in range(len(BAD_MLP))])
    assert examples.skipped == Counter(reason for _, reason in BAD_MLP)
    trainer = MLPTrainer(model, model.init(0))  # type: ignore[arg-type]
    assert math.isfinite(trainer.step(x, y))


@pytest.mark.parametrize("poison", [with_target("oops"), with_target([1e39] * 8)])
async def test_the_issue_examples_cannot_break_a_step(poison: bytes) -> None:
    """Issue 10 case 6: one ``"target": "oops"`` crashed the step (broadcast error); targets
    of 1e39 made every weight NaN."""
    model = preset("mlp")
    examples = _Examples(model, MLP_CFG, ListConsumer([good(1), good(2), poison, good(3)]))  # type: ignore[arg-type]
    trainer = MLPTrainer(model, model.init(0))  # type: ignore[arg-type]
    batch = await examples.next()
    assert batch is not None
    trainer.step(*batch)
    assert all(np.isfinite(v).all() for v in trainer.params.values())
    assert sum(examples.skipped.values()) == 1


async def test_embedding_examples_need_two_in_range_ids_and_a_0_or_1_target() -> None:
    model = EmbeddingScorer(users=50, items=60, dim=4)
    cfg = TrainSettings(model="e", synthetic=False, batch_size=1000)
    ok = [
        orjson.dumps({"ids": [0, 0], "target": 1}),
        orjson.dumps({"ids": [49, 59], "target": 0}),
        orjson.dumps({"ids": [3, 4], "target": [1]}),
        orjson.dumps({"ids": [3, 4], "target": 0.0, "extra": "ignored"}),
    ]
    bad = [
        (orjson.dumps({"ids": [50, 0], "target": 1}), "out_of_range"),
        (orjson.dumps({"ids": [0, 60], "target": 1}), "out_of_range"),
        (orjson.dumps({"ids": [-1, 0], "target": 1}), "out_of_range"),
        (orjson.dumps({"ids": [1.0, 2], "target": 1}), "not_integers"),
        (orjson.dumps({"ids": [True, 2], "target": 1}), "not_integers"),
        (orjson.dumps({"ids": ["1", 2], "target": 1}), "not_integers"),
        (orjson.dumps({"ids": [1, 2, 3], "target": 1}), "wrong_width"),
        (orjson.dumps({"ids": [[1, 2]], "target": 1}), "wrong_width"),
        (orjson.dumps({"ids": [1, 2], "target": 0.5}), "bad_label"),
        (orjson.dumps({"ids": [1, 2], "target": True}), "bad_label"),
        (orjson.dumps({"ids": [1, 2], "target": "1"}), "bad_label"),
        (orjson.dumps({"ids": [1, 2], "target": 1e39}), "bad_label"),
        (orjson.dumps({"inputs": [1, 2], "target": 1}), "missing_field"),
    ]
    examples = _Examples(model, cfg, ListConsumer([*ok, *(raw for raw, _ in bad)]))  # type: ignore[arg-type]
    batch = await examples.next()
    assert batch is not None
    ids, y = batch
    assert ids.dtype == np.int64 and ids.tolist() == [[0, 0], [49, 59], [3, 4], [3, 4]]
    assert y.reshape(-1).tolist() == [1.0, 0.0, 1.0, 0.0]
    assert examples.skipped == Counter(reason for _, reason in bad)


async def test_a_flood_of_junk_is_a_few_truncated_log_lines() -> None:
    junk = [b"x" * 5000, with_target("oops"), b"\xff" * 3000] * 400
    examples = _Examples(preset("mlp"), MLP_CFG, ListConsumer(junk))  # type: ignore[arg-type]
    tally = getattr(examples, "tally", None)
    if tally is not None:
        tally.interval_s = math.inf  # no summary by time: only at flush
    with capture_logs() as logs:
        for _ in range(3):
            assert await examples.next() is None
        if tally is not None:
            tally.flush()
    assert sum(examples.skipped.values()) == 1200
    assert [e["event"] for e in logs] == ["example_skipped"] * 3 + ["examples_skipped"]
    assert {e["reason"] for e in logs[:3]} == {"not_json", "not_numbers", "not_utf8"}
    assert logs[-1]["counts"] == {"not_json": 399, "not_numbers": 399, "not_utf8": 399}
    assert logs[-1]["total"] == 1200
    assert all(len(str(v)) <= 250 for e in logs for v in e.values())


texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=8)  # orjson encodes
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.floats()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.sampled_from([0, 1, 1e6, -1e6, 1e6 + 1, 1e39, 5, 6])
    | texts,
    lambda children: st.lists(children, max_size=34) | st.dictionaries(texts, children, max_size=4),
    max_leaves=80,
)
bodies = st.fixed_dictionaries(
    {}, optional={"inputs": json_values, "ids": json_values, "target": json_values}
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    raw=st.binary(max_size=300) | bodies.map(orjson.dumps) | json_values.map(orjson.dumps),
    kind=st.sampled_from(["mlp", "embedding"]),
)
def test_any_bytes_are_an_example_or_a_bad_example(raw: bytes, kind: str) -> None:
    from pipeline.params.training import BadExample, parse_example

    model: Any = preset("mlp") if kind == "mlp" else EmbeddingScorer(users=5, items=6, dim=2)
    try:
        x, y = parse_example(raw, model)
    except BadExample as exc:
        assert exc.code in REASONS
        return
    assert x.shape == (model.input_dim,) and y.shape == (model.output_dim,)
    assert np.isfinite(x).all() and np.isfinite(y).all() and np.abs(y).max() <= 1e6


REASONS = {
    "empty", "too_large", "not_utf8", "not_json", "not_object", "missing_field",
    "not_numbers", "not_integers", "wrong_width", "non_finite", "out_of_range", "bad_label",
}  # fmt: skip


def test_a_diverging_step_is_undone_and_the_weights_stay_finite() -> None:
    model = preset("mlp")
    trainer = MLPTrainer(model, model.init(0))  # type: ignore[arg-type]
    before = {k: v.copy() for k, v in trainer.params.items()}
    x = np.full((4, 32), 1e6, np.float32)  # valid examples (|value| <= 1e6) that explode
    y = np.full((4, 8), -1e6, np.float32)
    undone = 0
    for _ in range(5):
        try:
            trainer.step(x, y)
        except KvpipeError:
            undone += 1
        assert all(np.isfinite(v).all() for v in trainer.params.values())
    assert undone == 5
    assert all(np.array_equal(trainer.params[k], before[k]) for k in before)
    good_x = np.random.default_rng(0).standard_normal((16, 32)).astype(np.float32)
    assert math.isfinite(trainer.step(good_x, np.zeros((16, 8), np.float32)))


@pytest.mark.parametrize("kind", ["mlp", "embedding"])
async def test_a_publish_of_non_finite_weights_is_refused_and_training_goes_on(
    kind: str,
) -> None:
    from consumers.trainer import TrainingRun, make_trainer
    from pipeline.io.kv.memory import MemoryKV
    from pipeline.params.store import ParamStore
    from pipeline.params.updates import Announcement

    model = preset("mlp") if kind == "mlp" else EmbeddingScorer(users=50, items=60, dim=4)
    cfg = TrainSettings(model="m", synthetic=False)
    store = ParamStore(MemoryKV(), prefix="t")
    sent: list[Announcement] = []

    async def send(a: Announcement) -> None:
        sent.append(a)

    tables = model.init_tables(0) if isinstance(model, EmbeddingScorer) else None
    trainer = make_trainer(model, dict(model.init(0)), tables, cfg)
    run = TrainingRun(cfg, model, trainer, store, send)
    assert (await run.publish(first=True)) is not None
    if isinstance(model, EmbeddingScorer):
        x: Any = np.array([[1, 2], [3, 4]], np.int64)
        y: Any = np.array([[1.0], [0.0]], np.float32)
    else:
        x = np.random.default_rng(1).standard_normal((8, 32)).astype(np.float32)
        y = np.zeros((8, 8), np.float32)
    assert run.step(x, y)
    assert (await run.publish()) is not None
    published = await snapshot(store, model)
    announced = len(sent)

    assert run.step(x, y)
    if isinstance(model, EmbeddingScorer):
        trainer.tables["user"][1, 0] = np.inf  # type: ignore[union-attr]
    else:
        trainer.params["w1"][0, 0] = np.nan  # type: ignore[union-attr]
    with capture_logs() as logs:
        assert (await run.publish()) is None
    assert [(e["event"], e["reason"]) for e in logs] == [("publish_refused", "non_finite_weights")]
    assert run.report.refused == 1
    assert len(sent) == announced and await store.current_version("m") == 2
    assert_same(await snapshot(store, model), published)  # nothing non-finite was written
    assert_same(current_weights(trainer), published)  # back to the last published weights

    assert run.step(x, y)
    pub = await run.publish()
    assert pub is not None and pub.version == 3
    assert all(np.isfinite(v).all() for v in (await snapshot(store, model)).values())
    assert [p.version for p in run.report.publishes] == [1, 2, 3]


async def snapshot(store: Any, model: Any) -> dict[str, np.ndarray]:
    """What a worker would serve: the current version's tensors and the table rows."""
    _, params = await store.load("m")
    out = {k: np.asarray(v) for k, v in params.items()}
    if isinstance(model, EmbeddingScorer):
        for name, (rows, width) in model.tables.items():
            found = await store.read_rows("m", name, range(rows), width)
            out[name] = np.stack([found[i] for i in range(rows)])
    return out


def current_weights(trainer: Any) -> dict[str, np.ndarray]:
    if hasattr(trainer, "tables"):
        return {"bias": trainer.bias, **trainer.tables}
    return dict(trainer.params)


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k
