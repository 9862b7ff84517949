"""Online training in numpy: SGD for the MLP and the embedding scorer, and synthetic tasks.

The synthetic tasks have a known target (a fixed random "teacher"), so a falling loss and a
rising accuracy of served results can be measured end to end. Examples from the training topic
are validated whole by :func:`parse_example` before they reach a batch, and a step that makes
any weight non-finite is undone (:class:`Diverged`), back to the last checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from pipeline.errors import ConfigError, KvpipeError
from pipeline.params.models import MLP, EmbeddingScorer

Array = npt.NDArray[np.float32]

#: The largest magnitude accepted for an input or target value of an MLP example. With every
#: |x|, |y| <= 1e6 one forward pass on sane weights and the squared error (<= ~1e15 summed)
#: stay far inside float32 (max 3.4e38); drift over many steps is caught by :class:`Diverged`.
MAX_ABS_VALUE = 1e6
#: Bytes one example may take: 64 KiB, or 64 bytes per number the model reads, if more.
MIN_EXAMPLE_BYTES = 64 * 1024


class BadExample(KvpipeError):
    """A training example that cannot be used; ``code`` is the reason it is skipped."""

    code = "bad_example"


class Diverged(KvpipeError):
    """A step made the loss or a weight non-finite; the trainer is back at its checkpoint."""

    code = "non_finite_step"


def max_example_bytes(model: MLP | EmbeddingScorer) -> int:
    """The size bound of one example for ``model``."""
    return max(MIN_EXAMPLE_BYTES, 64 * (model.input_dim + model.output_dim))


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _numbers(body: dict[str, Any], name: str, width: int) -> Array:
    """``body[name]`` as ``width`` finite float32 values of sane magnitude (a bare number
    stands for a list of one)."""
    value = body[name]
    if _is_number(value) and width == 1:
        value = [value]
    if not isinstance(value, list):
        raise BadExample(f"{name} is not a list of numbers", code="not_numbers")
    if len(value) != width:
        raise BadExample(
            f"{name} has {len(value)} values, the model takes {width}", code="wrong_width"
        )
    if not all(_is_number(v) for v in value):
        raise BadExample(f"{name} holds something other than numbers", code="not_numbers")
    if not all(math.isfinite(v) for v in value):
        raise BadExample(f"{name} holds a non-finite value", code="non_finite")
    if any(abs(v) > MAX_ABS_VALUE for v in value):
        raise BadExample(f"{name} holds a value beyond +-{MAX_ABS_VALUE:g}", code="out_of_range")
    return np.array(value, dtype=np.float32)


def _ids(body: dict[str, Any], model: EmbeddingScorer) -> npt.NDArray[np.int64]:
    value = body["ids"]
    if not isinstance(value, list) or len(value) != 2:
        raise BadExample("ids is not a list [user, item]", code="wrong_width")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise BadExample("ids are not integers", code="not_integers")
    user, item = value
    if not (0 <= user < model.users and 0 <= item < model.items):
        raise BadExample(
            f"ids out of range: users 0..{model.users - 1}, items 0..{model.items - 1}",
            code="out_of_range",
        )
    return np.array(value, dtype=np.int64)


def _label(body: dict[str, Any]) -> Array:
    value = body["target"]
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not _is_number(value) or value not in (0, 1):
        raise BadExample("target of an embedding example is not 0 or 1", code="bad_label")
    return np.array([value], dtype=np.float32)


def parse_example(
    raw: bytes | None, model: MLP | EmbeddingScorer
) -> tuple[npt.NDArray[Any], Array]:
    """One example from the training topic, checked whole: ``(inputs or ids, target)``.

    Raises :class:`BadExample` (its code the reason) for anything else: a tombstone, too many
    bytes, non-UTF-8 or non-JSON bytes (NaN literals included), a non-object, a missing
    field, bools, strings or nesting, a wrong width, non-finite or out-of-range values.
    """
    if not raw:
        raise BadExample("empty message (tombstone)", code="empty")
    limit = max_example_bytes(model)
    if len(raw) > limit:
        raise BadExample(f"{len(raw)} bytes, more than {limit}", code="too_large")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadExample("bytes are not UTF-8", code="not_utf8") from None
    try:
        body = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise BadExample(f"not JSON: {exc}", code="not_json") from None
    if not isinstance(body, dict):
        raise BadExample("not a JSON object", code="not_object")
    field = "ids" if isinstance(model, EmbeddingScorer) else "inputs"
    for name in (field, "target"):
        if name not in body:
            raise BadExample(f"no {name!r} field", code="missing_field")
    if isinstance(model, EmbeddingScorer):
        return _ids(body, model), _label(body)
    return _numbers(body, "inputs", model.input_dim), _numbers(body, "target", model.output_dim)


def _finite(arrays: Any) -> bool:
    return all(bool(np.isfinite(a).all()) for a in arrays)


class SyntheticRegression:
    """Examples ``(x, teacher(x))`` for an MLP: the teacher is the same architecture, seeded."""

    def __init__(self, model: MLP, *, seed: int) -> None:
        self.model = model
        self.teacher = model.init(seed + 10_007)
        for name in self.teacher:
            self.teacher[name] *= 2.0
        self.rng = np.random.default_rng(seed)

    def target(self, x: Array) -> Array:
        return self.model.forward(self.teacher, x)

    def batch(self, n: int) -> tuple[Array, Array]:
        x = self.rng.standard_normal((n, self.model.input_dim)).astype(np.float32)
        return x, self.target(x)


class SyntheticClicks:
    """(user, item) pairs labelled by a teacher scorer; popular ids follow Zipf(1.0)."""

    def __init__(self, model: EmbeddingScorer, *, seed: int, hot: int = 2000) -> None:
        self.model = model
        self.teacher = model.init_tables(seed + 10_007)
        for table in self.teacher.values():
            table[:, : model.dim] *= 6.0
        self.rng = np.random.default_rng(seed)
        self.hot = hot

    def ids(self, n: int) -> npt.NDArray[np.int64]:
        def draw(limit: int) -> npt.NDArray[np.int64]:
            support = min(limit, self.hot)
            p = 1.0 / np.arange(1, support + 1)
            return self.rng.choice(support, size=n, p=p / p.sum()).astype(np.int64)

        return np.stack([draw(self.model.users), draw(self.model.items)], axis=1)

    def target(self, ids: npt.NDArray[np.int64]) -> Array:
        rows = {"user": self.teacher["user"][ids[:, 0]], "item": self.teacher["item"][ids[:, 1]]}
        p = self.model.forward({**rows, "bias": np.zeros(1, np.float32)}, ids)
        return (p > 0.5).astype(np.float32)

    def batch(self, n: int) -> tuple[npt.NDArray[np.int64], Array]:
        ids = self.ids(n)
        return ids, self.target(ids)


def _activation_grad(name: str, pre: Array, post: Array) -> Array:
    if name == "relu":
        return (pre > 0).astype(np.float32)
    if name == "tanh":
        return (1.0 - post * post).astype(np.float32)
    if name == "sigmoid":
        return (post * (1.0 - post)).astype(np.float32)
    return np.ones_like(pre)


class MLPTrainer:
    """Minibatch SGD with mean squared error on an MLP (no softmax head)."""

    def __init__(self, model: MLP, params: dict[str, Array], *, lr: float = 0.05) -> None:
        if model.softmax:
            raise ConfigError("the trainer fits MLPs without a softmax head (MSE regression)")
        self.model = model
        self.params = {k: np.array(v, dtype=np.float32) for k, v in params.items()}
        self.lr = lr
        self._saved = {k: v.copy() for k, v in self.params.items()}

    def loss(self, x: Array, y: Array) -> float:
        return float(np.mean((self.model.forward(self.params, x) - y) ** 2))

    def finite(self) -> bool:
        """Whether every weight is finite (checked before each publish)."""
        return _finite(self.params.values())

    def checkpoint(self) -> None:
        """Remember the weights as they are (about to be published): :meth:`restore` target."""
        self._saved = {k: v.copy() for k, v in self.params.items()}

    def restore(self) -> None:
        """Back to the last checkpoint."""
        self.params = {k: v.copy() for k, v in self._saved.items()}

    def step(self, x: Array, y: Array) -> float:
        """One SGD step on a minibatch; returns the loss before the step.

        Raises :class:`Diverged`, back at the last checkpoint, if a weight, the loss before
        it or the loss after it on the same batch is not finite (an exploding gradient): one
        bad step never reaches a publish.
        """
        with np.errstate(all="ignore"):
            loss = self._step(x, y)
            after = self.loss(x, y) if self.finite() else math.nan
        if not (math.isfinite(loss) and math.isfinite(after)):
            self.restore()
            raise Diverged(
                f"non-finite loss or weights after a step (loss {loss:.3g} -> {after:.3g})"
            )
        return loss

    def _step(self, x: Array, y: Array) -> float:
        p, m = self.params, self.model
        layers = len(m.layers) - 1
        acts = [x]
        pres: list[Array] = []
        h = x
        for i in range(layers):
            pre = h @ p[f"w{i}"] + p[f"b{i}"]
            pres.append(pre)
            h = pre if i == layers - 1 else _activate_copy(m.activation, pre)
            acts.append(h)
        err = h - y
        loss = float(np.mean(err**2))
        grad = (2.0 / err.size) * err
        for i in reversed(range(layers)):
            gw = acts[i].T @ grad
            gb = grad.sum(axis=0)
            if i > 0:
                grad = (grad @ p[f"w{i}"].T) * _activation_grad(m.activation, pres[i - 1], acts[i])
            p[f"w{i}"] -= self.lr * gw
            p[f"b{i}"] -= self.lr * gb
        return loss


def _activate_copy(name: str, x: Array) -> Array:
    if name == "relu":
        return np.maximum(x, 0)
    if name == "tanh":
        return np.tanh(x)
    if name == "sigmoid":
        out: Array = (1.0 / (1.0 + np.exp(-x))).astype(np.float32)
        return out
    return x.copy()


@dataclass
class RowUpdate:
    """Rows of one table changed by training since the last publish."""

    table: str
    ids: npt.NDArray[np.int64]
    rows: Array


class EmbeddingTrainer:
    """SGD with logistic loss on the scorer; keeps the tables it trains in memory."""

    def __init__(
        self,
        model: EmbeddingScorer,
        tables: dict[str, Array],
        bias: Array,
        *,
        lr: float = 0.5,
    ) -> None:
        self.model = model
        self.tables = {k: np.array(v, dtype=np.float32) for k, v in tables.items()}
        self.bias = np.array(bias, dtype=np.float32)
        self.lr = lr
        self._touched: dict[str, set[int]] = {name: set() for name in self.tables}
        self._saved_tables = {k: v.copy() for k, v in self.tables.items()}
        self._saved_bias = self.bias.copy()

    def finite(self, *, whole: bool = False) -> bool:
        """Whether the bias and every row changed since the last checkpoint (every row if
        ``whole``) are finite: what the next publish would write."""
        if not _finite([self.bias]):
            return False
        if whole:
            return _finite(self.tables.values())
        return all(
            _finite([self.tables[name][sorted(touched)]])
            for name, touched in self._touched.items()
            if touched
        )

    def checkpoint(self) -> None:
        """Remember the rows changed since the last checkpoint and the bias (about to be
        published); :meth:`restore` returns to them."""
        for name, touched in self._touched.items():
            if touched:
                rows = sorted(touched)
                self._saved_tables[name][rows] = self.tables[name][rows]
        self._saved_bias = self.bias.copy()

    def restore(self) -> None:
        """Back to the last checkpoint; the rows changed since are no longer pending."""
        for name, touched in self._touched.items():
            if touched:
                rows = sorted(touched)
                self.tables[name][rows] = self._saved_tables[name][rows]
                touched.clear()
        self.bias = self._saved_bias.copy()

    def predict(self, ids: npt.NDArray[np.int64]) -> Array:
        rows = {"user": self.tables["user"][ids[:, 0]], "item": self.tables["item"][ids[:, 1]]}
        return self.model.forward({**rows, "bias": self.bias}, ids)

    def step(self, ids: npt.NDArray[np.int64], y: Array) -> float:
        """One SGD step; returns the log loss before it.

        Raises :class:`Diverged`, back at the last checkpoint, if the loss, the bias or a row
        it changed is not finite after it.
        """
        with np.errstate(all="ignore"):
            loss = self._step(ids, y)
        changed = [self.tables["user"][ids[:, 0]], self.tables["item"][ids[:, 1]], self.bias]
        if not (math.isfinite(loss) and _finite(changed)):
            self.restore()
            raise Diverged(f"non-finite loss or weights after a step (loss {loss})")
        return loss

    def _step(self, ids: npt.NDArray[np.int64], y: Array) -> float:
        d = self.model.dim
        u = self.tables["user"][ids[:, 0]]
        v = self.tables["item"][ids[:, 1]]
        p = self.predict(ids)[:, 0]
        target = y.reshape(-1)
        eps = 1e-7
        loss = float(-np.mean(target * np.log(p + eps) + (1 - target) * np.log(1 - p + eps)))
        g = (p - target) / len(target)
        gu = np.zeros_like(u)
        gv = np.zeros_like(v)
        gu[:, :d] = g[:, None] * v[:, :d]
        gv[:, :d] = g[:, None] * u[:, :d]
        gu[:, d] = g
        gv[:, d] = g
        np.add.at(self.tables["user"], ids[:, 0], -self.lr * gu * len(target) / 8)
        np.add.at(self.tables["item"], ids[:, 1], -self.lr * gv * len(target) / 8)
        self.bias -= self.lr * g.sum()
        self._touched["user"].update(int(i) for i in ids[:, 0])
        self._touched["item"].update(int(i) for i in ids[:, 1])
        return loss

    def take_updates(self) -> list[RowUpdate]:
        """The rows changed since the last call (and forget them)."""
        out: list[RowUpdate] = []
        for name, touched in self._touched.items():
            if touched:
                ids = np.array(sorted(touched), dtype=np.int64)
                out.append(RowUpdate(name, ids, self.tables[name][ids]))
                touched.clear()
        return out


def accuracy(scores: npt.NDArray[Any], labels: npt.NDArray[Any]) -> float:
    """Share of binary predictions (score > 0.5) that match the labels."""
    return float(np.mean((scores.reshape(-1) > 0.5) == (labels.reshape(-1) > 0.5)))
