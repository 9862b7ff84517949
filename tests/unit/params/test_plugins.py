"""Model plugins installed as a user would: the docs' example on sys.path, by entry point and
by KVPIPE_MODEL_PLUGINS; published, resolved and run against numpy; every misuse one line."""

from __future__ import annotations

import re
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.cache.cache import ParamCache
from pipeline.config import settings_from_env
from pipeline.errors import ConfigError
from pipeline.io.kv.memory import MemoryKV
from pipeline.params import models
from pipeline.params.models import PluginModel, build_model, model_kinds, register_model
from pipeline.params.plugins import load_model_plugins
from pipeline.params.registry import ModelRegistry
from pipeline.params.store import ParamStore

DOCS = Path(__file__).parents[3] / "docs" / "plugins.md"
ARCH = {"kind": "rbf", "dim_in": 3, "units": 5, "dim_out": 2, "gamma": 0.5}


def example_source() -> str:
    """The example plugin module of docs/plugins.md, as a user would copy it."""
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S)
    return next(b for b in blocks if "class RBFNet" in b)


def rbf_reference(params: dict[str, Any], x: Any, gamma: float) -> Any:
    """The RBF network in plain float64 numpy, one center at a time."""
    x = x.astype(np.float64)
    phi = np.stack(
        [np.exp(-gamma * ((x - c) ** 2).sum(axis=1)) for c in params["centers"].astype(float)],
        axis=1,
    )
    return phi @ params["weight"].astype(float) + params["bias"].astype(float)


def write_package(
    root: Path, module: str, source: str, entry_points: dict[str, str] | None = None
) -> None:
    """``module.py`` under ``root``, with a ``.dist-info`` declaring ``entry_points`` if given."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(source)
    if entry_points is not None:
        dist = root / f"{module}-0.1.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 0.1\n"
        )
        lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
        (dist / "entry_points.txt").write_text(f"[kvpipe.models]\n{lines}")


@pytest.fixture(autouse=True)
def fresh_kinds(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test registers into a copy of the registry; modules it imported are forgotten."""
    monkeypatch.setattr(models, "_KINDS", dict(models._KINDS))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("plug_"):
            del sys.modules[name]


@pytest.fixture
def module_name() -> str:
    return f"plug_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


async def publish_resolve_run(arch: dict[str, Any]) -> None:
    """Publish a seeded version in the in-memory KV, resolve it, compare forward with numpy."""
    rng = np.random.default_rng(3)
    tensors = {
        "centers": rng.standard_normal((5, 3)).astype(np.float32),
        "weight": rng.standard_normal((5, 2)).astype(np.float32),
        "bias": rng.standard_normal(2).astype(np.float32),
    }
    cache: ParamCache[object] = ParamCache(capacity_bytes=10**7, ttl_s=60.0)
    registry = ModelRegistry(ParamStore(MemoryKV(), prefix="t"), cache, version_ttl_s=1.0)
    published = await registry.store.publish("bumps", arch, tensors)
    resolved = await registry.resolve("bumps")
    assert resolved.version == published.version == 1
    assert resolved.model.kind == "dense" and isinstance(resolved.model, PluginModel)
    assert resolved.manifest.arch == arch
    x = rng.standard_normal((7, 3)).astype(np.float32)
    y = resolved.model.forward(resolved.params, x)
    assert y.dtype == np.float32 and y.shape == (7, 2)
    np.testing.assert_allclose(y, rbf_reference(tensors, x, arch["gamma"]), rtol=1e-4, atol=1e-5)


async def test_entry_point_plugin_is_published_resolved_and_matches_numpy(
    on_path: Path, module_name: str
) -> None:
    write_package(on_path, module_name, example_source(), {"rbf": f"{module_name}:RBFNet"})
    assert "rbf" not in model_kinds()
    assert load_model_plugins() == ["rbf"]
    assert "entry point rbf" in model_kinds()["rbf"]
    await publish_resolve_run(ARCH)


async def test_module_plugin_from_the_setting_is_published_resolved_and_matches_numpy(
    on_path: Path, module_name: str
) -> None:
    write_package(on_path, module_name, example_source())
    settings = settings_from_env({"KVPIPE_MODEL_PLUGINS": f" {module_name} ,"})
    assert settings.model_plugins == (module_name,)
    assert load_model_plugins(settings.model_plugins, entry_points=False) == ["rbf"]
    assert "KVPIPE_MODEL_PLUGINS" in model_kinds()["rbf"]
    await publish_resolve_run(ARCH)


def test_the_same_class_by_both_ways_registers_once(on_path: Path, module_name: str) -> None:
    write_package(on_path, module_name, example_source(), {"rbf": f"{module_name}:RBFNet"})
    assert load_model_plugins([module_name, module_name]) == ["rbf"]
    assert load_model_plugins([module_name]) == ["rbf"]


def test_default_init_is_seeded_and_fits_the_specs(on_path: Path, module_name: str) -> None:
    write_package(on_path, module_name, example_source())
    load_model_plugins([module_name], entry_points=False)
    model = build_model(ARCH)
    a, b = model.init(4), model.init(4)
    assert {k: v.shape for k, v in a.items()} == {
        k: s.shape for k, s in model.tensor_specs().items()
    }
    assert all(np.array_equal(a[k], b[k]) and a[k].dtype == np.float32 for k in a)


def one_line(exc: pytest.ExceptionInfo[ConfigError]) -> str:
    text = str(exc.value)
    assert "\n" not in text and "Traceback" not in text
    return text


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import not_a_module_anywhere\n", "cannot be imported: ModuleNotFoundError"),
        ("def broken(:\n", "cannot be imported: SyntaxError"),
        ("raise RuntimeError('boom\\nsecond line')\n", "RuntimeError: boom second line"),
        ("X = 1\n", "must define KVPIPE_MODELS = [YourModel, ...]"),
        ("KVPIPE_MODELS = 3\n", "must define KVPIPE_MODELS"),
        ("KVPIPE_MODELS = [len]\n", "is a builtin_function_or_method, not a class"),
        ("class A:\n    pass\nKVPIPE_MODELS = [A]\n", "has kind None"),
        ("class A:\n    kind = 'a b'\nKVPIPE_MODELS = [A]\n", "has kind 'a b'"),
        (
            "class A:\n    kind = 'a'\n    def tensor_specs(self): return {}\n"
            "KVPIPE_MODELS = [A]\n",
            "has no forward() method",
        ),
    ],
)
def test_a_broken_module_is_one_line(
    on_path: Path, module_name: str, source: str, expected: str
) -> None:
    write_package(on_path, module_name, source)
    with pytest.raises(ConfigError) as exc:
        load_model_plugins([module_name], entry_points=False)
    text = one_line(exc)
    assert f"module {module_name} (KVPIPE_MODEL_PLUGINS)" in text and expected in text, text


def test_a_missing_module_is_one_line() -> None:
    with pytest.raises(ConfigError) as exc:
        load_model_plugins(["plug_nowhere_at_all"], entry_points=False)
    assert "plug_nowhere_at_all (KVPIPE_MODEL_PLUGINS) cannot be imported" in one_line(exc)


def test_a_plugin_cannot_replace_a_built_in(on_path: Path, module_name: str) -> None:
    source = example_source().replace('kind = "rbf"', 'kind = "mlp"')
    write_package(on_path, module_name, source)
    with pytest.raises(ConfigError) as exc:
        load_model_plugins([module_name], entry_points=False)
    assert "names kind 'mlp', which is built in" in one_line(exc)
    assert model_kinds()["mlp"] == "kvpipe (built in)"


def test_two_classes_of_one_kind_are_refused(on_path: Path, module_name: str) -> None:
    write_package(on_path, module_name, example_source())
    write_package(on_path, f"{module_name}_b", example_source())
    with pytest.raises(ConfigError) as exc:
        load_model_plugins([module_name, f"{module_name}_b"], entry_points=False)
    text = one_line(exc)
    assert "model kind 'rbf' is registered twice" in text
    assert f"module {module_name} " in text and f"module {module_name}_b " in text


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("{m}:Missing", "cannot be loaded: AttributeError"),
        ("plug_absent_pkg:RBFNet", "cannot be loaded: ModuleNotFoundError"),
    ],
)
def test_a_broken_entry_point_is_one_line(
    on_path: Path, module_name: str, target: str, expected: str
) -> None:
    write_package(on_path, module_name, example_source(), {"rbf": target.format(m=module_name)})
    with pytest.raises(ConfigError) as exc:
        load_model_plugins()
    text = one_line(exc)
    assert "entry point rbf = " in text and "(kvpipe.models, package plug-" in text, text
    assert expected in text, text


def test_an_entry_point_is_named_after_its_kind(on_path: Path, module_name: str) -> None:
    write_package(on_path, module_name, example_source(), {"bumps": f"{module_name}:RBFNet"})
    with pytest.raises(ConfigError) as exc:
        load_model_plugins()
    assert "loads a class of kind 'rbf'; name the entry point 'rbf'" in one_line(exc)


def test_bad_plugin_module_names_are_refused_by_the_setting() -> None:
    with pytest.raises(ConfigError, match=r"KVPIPE_MODEL_PLUGINS='a b,c': 'a b' is not a module"):
        settings_from_env({"KVPIPE_MODEL_PLUGINS": "a b,c"})
    assert settings_from_env({"KVPIPE_MODEL_PLUGINS": "a.b,c"}).model_plugins == ("a.b", "c")
    assert settings_from_env({}).model_plugins == ()


class Poly:
    """``sum_k (x ** k) @ w_k`` for k = 1..degree: a plugin defined in the test itself."""

    kind = "poly"

    def __init__(self, arch: Any) -> None:
        self.degree = int(arch["degree"])
        if self.degree < 1:
            raise ConfigError("a poly model needs degree >= 1")
        self.input_dim = int(arch["dim"])
        self.output_dim = int(arch.get("out", 1))
        self.bad_output = bool(arch.get("bad_output", False))

    def tensor_specs(self) -> Any:
        return {f"w{k}": (self.input_dim, self.output_dim) for k in range(1, self.degree + 1)}

    def forward(self, params: Any, x: Any) -> Any:
        y = sum((x**k) @ params[f"w{k}"] for k in range(1, self.degree + 1))
        return y[:, 0] if self.bad_output else y


def test_register_model_in_process_with_shape_tuples() -> None:
    assert register_model(Poly) == "poly"
    assert register_model(Poly) == "poly"  # idempotent
    model = build_model({"kind": "poly", "degree": 2, "dim": 3})
    assert model.tensor_specs()["w2"] == models.TensorSpec((3, 1), "float32")
    params = model.init(0)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_allclose(
        model.forward(params, x), x @ params["w1"] + (x * x) @ params["w2"], rtol=1e-6
    )


def test_a_bad_arch_or_a_broken_answer_is_one_line() -> None:
    register_model(Poly)
    with pytest.raises(ConfigError, match=r"^a poly model needs degree >= 1$"):
        build_model({"kind": "poly", "degree": 0, "dim": 3})
    with pytest.raises(ConfigError, match="is incomplete: 'degree'"):
        build_model({"kind": "poly", "dim": 3})
    with pytest.raises(ConfigError, match="input_dim and output_dim must be positive ints"):
        build_model({"kind": "poly", "degree": 1, "dim": 0})
    model = build_model({"kind": "poly", "degree": 1, "dim": 2, "bad_output": True})
    with pytest.raises(ValueError, match=r"returned float32 outputs of shape \(4,\)"):
        model.forward(model.init(0), np.ones((4, 2), dtype=np.float32))


def test_a_bad_tensor_spec_is_one_line() -> None:
    class BadSpec(Poly):
        kind = "badspec"
        specs: Any = {}

        def tensor_specs(self) -> Any:
            return self.specs

    register_model(BadSpec)
    arch = {"kind": "badspec", "degree": 1, "dim": 2}
    for specs, expected in [
        ({}, "names no tensors"),
        ({"a:b": (2,)}, "tensor name 'a:b'"),
        ({"w": (0, 2)}, "use a tuple of positive ints"),
        ({"w": [2, 2]}, "use TensorSpec(shape, dtype) or a shape tuple"),
        ({"w": models.TensorSpec((2,), "object")}, "use a float or integer dtype"),
        ({"w": models.TensorSpec((2,), "no-such-dtype")}, "use a float or integer dtype"),
    ]:
        BadSpec.specs = specs
        with pytest.raises(ConfigError, match=re.escape(expected)):
            build_model(arch)


def test_an_arch_never_imports_what_it_names() -> None:
    """A manifest's kind only picks a registered kind: naming a module imports nothing."""
    for kind in ("os.path", "plug_never_imported", "pipeline.params.plugins:RBFNet"):
        with pytest.raises(ConfigError, match="unknown architecture kind") as exc:
            build_model({"kind": kind})
        assert "KVPIPE_MODEL_PLUGINS" in one_line(exc)
    assert "plug_never_imported" not in sys.modules
    with pytest.raises(ConfigError, match="an architecture is a JSON object"):
        build_model(["mlp"])  # type: ignore[arg-type]
