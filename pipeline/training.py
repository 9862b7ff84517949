"""Online training in numpy: SGD for the MLP and the embedding scorer, and synthetic tasks.

The synthetic tasks have a known target (a fixed random "teacher"), so a falling loss and a
rising accuracy of served results can be measured end to end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.errors import ConfigError
from pipeline.models import MLP, EmbeddingScorer

Array = npt.NDArray[np.float32]


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

    def loss(self, x: Array, y: Array) -> float:
        return float(np.mean((self.model.forward(self.params, x) - y) ** 2))

    def step(self, x: Array, y: Array) -> float:
        """One SGD step on a minibatch; returns the loss before the step."""
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

    def predict(self, ids: npt.NDArray[np.int64]) -> Array:
        rows = {"user": self.tables["user"][ids[:, 0]], "item": self.tables["item"][ids[:, 1]]}
        return self.model.forward({**rows, "bias": self.bias}, ids)

    def step(self, ids: npt.NDArray[np.int64], y: Array) -> float:
        """One SGD step; returns the log loss before it."""
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
