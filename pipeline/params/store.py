"""Versioned model parameters in Redis: publish atomically, load with verification.

Key layout (DESIGN.md, "Parameters in Redis"), with ``P`` the deployment's key prefix:
``P:{model}:current`` the serving version, ``P:{model}:v{n}:manifest`` JSON,
``P:{model}:v{n}:t:{name}`` one tensor as ``.npy`` bytes, ``P:{model}:v{n}:graph`` the graph
of an ONNX version without its weights (its sha256 is the arch's ``graph_sha256``),
``P:{model}:versions`` a hash of version -> JSON summary, ``P:{model}:seq`` the version counter.

Embedding rows: ``P:{model}:emb:{table}``, one hash per table. On a Redis Cluster
(``kv.cluster``; the braces below are literal hash tags) the pointer and the manifests are
tagged with the model, ``P:{m}:current`` and ``P:{m}:v7:manifest``, so the pointer move and
the manifest it persists are one script in one slot; tensors, graphs and outputs keep their
untagged keys and spread over the nodes; a table is ``emb_partitions`` hashes
``P:m:emb:t:{m:t:i}``, row ``r`` in partition ``r % emb_partitions``. The single-Redis keys
stay as they were.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.errors import (
    ConfigError,
    ModelNotFound,
    ParamsCorrupt,
    ParamsError,
    VersionNotFound,
)
from pipeline.io.kv import KeyValue
from pipeline.io.npy import from_npy, to_npy
from pipeline.names import check_name
from pipeline.params.keys import OutputKey
from pipeline.params.models import build_model
from pipeline.params.onnx import OnnxModel as _OnnxModel  # noqa: F401 (registers it)
from pipeline.params.onnx import check_session
from pipeline.params.onnx_graph import OnnxLimits, PreparedOnnx, prepare_onnx
from pipeline.params.transformer import Transformer as _Transformer  # noqa: F401 (registers it)

ROW_CHUNK = 5000
#: Hashes an embedding table is split into on a Redis Cluster (HPS: 2-5x the primaries).
EMB_PARTITIONS = 8
#: How long the keys of a version being published live until its pointer move persists them.
PENDING_TTL_S = 3600.0


def check_model_name(model: str) -> str:
    """Return ``model`` if it is a valid name (:func:`pipeline.names.check_name`)."""
    return check_name(model)


@dataclass(frozen=True)
class TensorMeta:
    """What the manifest promises about one tensor."""

    dtype: str
    shape: tuple[int, ...]
    sha256: str
    nbytes: int

    def to_json(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "shape": list(self.shape),
            "sha256": self.sha256,
            "nbytes": self.nbytes,
        }


@dataclass(frozen=True)
class Manifest:
    """One published version: its architecture and the tensors it consists of."""

    model: str
    version: int
    arch: Mapping[str, Any]
    tensors: Mapping[str, TensorMeta]
    created_at: float

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def graph_sha256(self) -> str | None:
        """The sha256 of the version's graph key (ONNX versions), None when it has none."""
        sha = self.arch.get("graph_sha256")
        return sha if isinstance(sha, str) else None

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "model": self.model,
                "version": self.version,
                "arch": dict(self.arch),
                "tensors": {n: t.to_json() for n, t in self.tensors.items()},
                "created_at": self.created_at,
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        try:
            raw = json.loads(data)
            tensors = {
                str(name): TensorMeta(
                    dtype=str(t["dtype"]),
                    shape=tuple(int(d) for d in t["shape"]),
                    sha256=str(t["sha256"]),
                    nbytes=int(t["nbytes"]),
                )
                for name, t in raw["tensors"].items()
            }
            return cls(
                model=str(raw["model"]),
                version=int(raw["version"]),
                arch=dict(raw["arch"]),
                tensors=tensors,
                created_at=float(raw["created_at"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ParamsCorrupt(f"manifest is not readable: {exc}") from None


@dataclass(frozen=True)
class Published:
    """What a publish did: the version it wrote, and the version current once it was done.

    ``current`` is greater than ``version`` when a newer publish got there first: the version
    exists (and can be rolled back to) but is not served, and must not be announced as such.
    """

    manifest: Manifest
    current: int

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def nbytes(self) -> int:
        return self.manifest.nbytes

    @property
    def is_current(self) -> bool:
        return self.current == self.manifest.version


@dataclass(frozen=True)
class VersionInfo:
    """A row of ``kvpipe versions``."""

    version: int
    created_at: float
    nbytes: int
    current: bool
    available: bool
    expires_at: float | None = None


class ParamStore:
    """Reads and writes versioned parameters through a :class:`KeyValue` adapter.

    A version's keys are written with a ``pending_ttl_s`` expiry that the pointer move removes
    (in the same Redis step), so a publish that fails half-way leaves nothing for good.
    """

    def __init__(
        self,
        kv: KeyValue,
        *,
        prefix: str = "kvpipe",
        retention_s: float | None = None,
        pending_ttl_s: float = PENDING_TTL_S,
        emb_partitions: int = EMB_PARTITIONS,
    ) -> None:
        if emb_partitions < 1:
            raise ConfigError(f"emb_partitions must be at least 1, not {emb_partitions}")
        self.kv = kv
        self.prefix = prefix
        self.retention_s = retention_s
        self.pending_ttl_s = pending_ttl_s
        #: Keys spread over a Redis Cluster's slots: hash tags where one slot is needed. (A
        #: KeyValue written before the protocol had ``cluster`` counts as one Redis.)
        self.cluster = bool(getattr(kv, "cluster", False))
        self.emb_partitions = emb_partitions if self.cluster else 1

    def _slot_of(self, model: str) -> str:
        """``model``, as the hash tag ``{model}`` on a cluster: the pointer's slot."""
        return f"{{{model}}}" if self.cluster else model

    def current_key(self, model: str) -> str:
        return f"{self.prefix}:{self._slot_of(model)}:current"

    def manifest_key(self, model: str, version: int) -> str:
        return f"{self.prefix}:{self._slot_of(model)}:v{version}:manifest"

    def tensor_key(self, model: str, version: int, name: str) -> str:
        return f"{self.prefix}:{model}:v{version}:t:{name}"

    def graph_key(self, model: str, version: int) -> str:
        return f"{self.prefix}:{model}:v{version}:graph"

    def versions_key(self, model: str) -> str:
        return f"{self.prefix}:{model}:versions"

    def seq_key(self, model: str) -> str:
        return f"{self.prefix}:{model}:seq"

    def table_key(self, model: str, table: str, partition: int = 0) -> str:
        """The hash holding ``partition`` of a table (a single Redis: one hash, no tag)."""
        if not self.cluster:
            return f"{self.prefix}:{model}:emb:{table}"
        return f"{self.prefix}:{model}:emb:{table}:{{{model}:{table}:{partition}}}"

    def _partitions(self, model: str, table: str, ids: Sequence[int]) -> dict[str, list[int]]:
        """Positions in ``ids`` grouped by the hash (partition) their rows live in."""
        groups: dict[str, list[int]] = {}
        parts = self.emb_partitions
        for position, row_id in enumerate(ids):
            key = self.table_key(model, table, int(row_id) % parts)
            groups.setdefault(key, []).append(position)
        return groups

    def output_key(self, key: OutputKey) -> str:
        return f"{self.prefix}:{key.model}:v{key.version}:out:{key.digest.hex()}"

    async def read_outputs(self, keys: Sequence[OutputKey]) -> list[bytes | None]:
        """Memoized outputs a fleet shares (``.npy`` bytes), one MGET; None where absent."""
        return await self.kv.mget([self.output_key(k) for k in keys])

    async def write_outputs(self, outputs: Mapping[OutputKey, bytes], ttl_s: float) -> None:
        """Share memoized outputs for ``ttl_s`` seconds (they expire with no one to clean)."""
        writes = {self.output_key(k): blob for k, blob in outputs.items()}
        await self.kv.set_many(writes, ex=ttl_s)

    async def write_rows(
        self, model: str, table: str, ids: Sequence[int], rows: npt.NDArray[Any]
    ) -> None:
        """Write rows of an embedding table in place (float32 bytes per row id)."""
        check_name(model)
        check_name(table, "table")
        data = np.ascontiguousarray(rows, dtype="<f4")
        if data.ndim != 2 or data.shape[0] != len(ids):
            raise ConfigError(f"rows of shape {data.shape} do not match {len(ids)} ids")
        for key, positions in self._partitions(model, table, ids).items():
            for start in range(0, len(positions), ROW_CHUNK):
                chunk = positions[start : start + ROW_CHUNK]
                await self.kv.hset_many(key, {str(int(ids[i])): data[i].tobytes() for i in chunk})

    async def read_rows(
        self, model: str, table: str, ids: Sequence[int], width: int
    ) -> dict[int, npt.NDArray[np.float32]]:
        """Rows of an embedding table, one HMGET per partition (one on a single Redis), the
        partitions' nodes asked in parallel; absent rows are left out."""
        groups = list(self._partitions(model, table, ids).items())
        replies = await asyncio.gather(
            *(self.kv.hmget(key, [str(ids[i]) for i in positions]) for key, positions in groups)
        )
        blobs: list[bytes | None] = [None] * len(ids)
        for (_, positions), reply in zip(groups, replies, strict=True):
            for position, blob in zip(positions, reply, strict=True):
                blobs[position] = blob
        out: dict[int, npt.NDArray[np.float32]] = {}
        for row_id, blob in zip(ids, blobs, strict=True):
            if blob is None:
                continue
            if len(blob) != width * 4:
                raise ParamsCorrupt(
                    f"row {row_id} of {model!r} table {table!r} is {len(blob)} bytes, "
                    f"expected {width * 4}"
                )
            row = np.frombuffer(blob, dtype="<f4").astype(np.float32)
            if not np.isfinite(row).all():
                raise ParamsCorrupt(f"row {row_id} of {model!r} table {table!r} is not finite")
            out[int(row_id)] = row
        return out

    async def publish(
        self,
        model: str,
        arch: Mapping[str, Any],
        tensors: Mapping[str, npt.ArrayLike],
        *,
        tables: Mapping[str, npt.NDArray[Any]] | None = None,
        graph: bytes | None = None,
    ) -> Published:
        """Write a new version (tensors and manifest first), then make it current in one step.

        The pointer only moves forward: when a newer version became current meanwhile (a
        concurrent publish), this one stays an older version and the result says so.
        ``tables`` (embedding models) are written whole, before the pointer moves; later
        training steps rewrite only the rows they touch (:meth:`write_rows`). ``graph`` (ONNX
        versions, see :meth:`publish_onnx`) is written with the tensors; its sha256 must be
        the arch's ``graph_sha256``.
        """
        check_model_name(model)
        sha = arch.get("graph_sha256")
        if (graph is None) != (sha is None) or (
            graph is not None and hashlib.sha256(graph).hexdigest() != sha
        ):
            raise ConfigError("the graph does not match the architecture's graph_sha256")
        built = build_model(arch)
        specs = built.tensor_specs()
        for name, table in (tables or {}).items():
            shape = built.tables.get(name)
            if shape is None or tuple(table.shape) != shape:
                raise ConfigError(f"table {name!r} of shape {table.shape} does not fit {shape}")
        if set(tensors) != set(specs):
            missing = sorted(set(specs) - set(tensors))
            extra = sorted(set(tensors) - set(specs))
            raise ConfigError(
                f"tensors do not match the architecture: missing {missing}, unexpected {extra}"
            )
        blobs: dict[str, bytes] = {}
        metas: dict[str, TensorMeta] = {}
        for name, spec in specs.items():
            arr = np.asarray(tensors[name])
            if arr.shape != spec.shape:
                raise ConfigError(f"tensor {name!r} has shape {arr.shape}, expected {spec.shape}")
            arr = arr.astype(spec.dtype, copy=False)
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise ConfigError(f"tensor {name!r} holds NaN or infinity; it would answer NaN")
            blob = to_npy(arr)
            blobs[name] = blob
            metas[name] = TensorMeta(
                dtype=spec.dtype,
                shape=spec.shape,
                sha256=hashlib.sha256(blob).hexdigest(),
                nbytes=int(arr.nbytes),
            )
        version = await self.kv.incr(self.seq_key(model))
        manifest = Manifest(model, version, dict(arch), metas, time.time())
        writes = {self.tensor_key(model, version, n): b for n, b in blobs.items()}
        writes[self.manifest_key(model, version)] = manifest.to_bytes()
        if graph is not None:
            writes[self.graph_key(model, version)] = bytes(graph)
        # Pending until the pointer move persists them: a failed publish leaves nothing for good.
        await self.kv.set_many(writes, ex=self.pending_ttl_s)
        for name, table in (tables or {}).items():
            await self.write_rows(model, name, range(table.shape[0]), table)
        summary = {"created_at": manifest.created_at, "nbytes": manifest.nbytes}
        await self.kv.hset_many(
            self.versions_key(model), {str(version): json.dumps(summary).encode()}
        )
        keys = list(writes)
        current = version
        atomic = keys
        if self.cluster:
            # One script, one slot: it persists the manifest (tagged like the pointer); the
            # spread keys are persisted first, so the pointer never names an expiring tensor.
            atomic = [self.manifest_key(model, version)]
            spread = [k for k in keys if k not in atomic]
            await asyncio.gather(*(self.kv.persist(k) for k in spread))
        if not await self.kv.set_if_greater(self.current_key(model), version, persist=atomic):
            # A newer version is current: never move back. This one is complete, so it stays
            # an ordinary older version (retention decides, a rollback can still serve it).
            current = await self.current_version(model)
            await self._keep_version(model, version, keys)
        if self.retention_s is not None:
            await self.expire_old(model)
        return Published(manifest, current)

    async def publish_onnx(
        self,
        model: str,
        data: bytes | PreparedOnnx,
        *,
        limits: OnnxLimits | None = None,
        session_check: bool = True,
    ) -> Published:
        """Publish an ONNX file: every initializer a versioned tensor, the graph without its
        weights under :meth:`graph_key`. The file is checked first
        (:func:`pipeline.params.onnx_graph.prepare_onnx`, unless ``data`` is its result), then
        (``session_check``) onnxruntime builds a session of it; a refused one is a one-line
        ConfigError and writes nothing."""
        check_model_name(model)
        if isinstance(data, PreparedOnnx):
            prepared = data
        else:  # parsing and checking a graph is CPU work: off the event loop
            prepared = await asyncio.to_thread(prepare_onnx, data, limits)
            if session_check:
                await asyncio.to_thread(check_session, data)
        return await self.publish(model, prepared.arch, prepared.tensors, graph=prepared.graph)

    def version_keys(
        self, model: str, version: int, tensors: Sequence[str], *, graph: bool = False
    ) -> list[str]:
        keys = [self.manifest_key(model, version)]
        keys += [self.tensor_key(model, version, t) for t in tensors]
        return keys + ([self.graph_key(model, version)] if graph else [])

    async def expire_old(self, model: str, *, keep: Sequence[int] = ()) -> list[int]:
        """Let old versions expire after the retention period; forget listed ones that are gone.

        Kept: the current version (read here, never taken from the caller, so a stale view
        cannot retire it), every newer one (a publish in flight, or the versions a rollback
        stepped back from), the newest older one (the previous) and ``keep``. Returns the
        versions newly scheduled.
        """
        assert self.retention_s is not None
        rows = await self.kv.hgetall(self.versions_key(model))
        try:
            current = await self.current_version(model)
        except ParamsError:
            return []  # no readable pointer: nothing can be told apart from the current one
        older = sorted(v for v in map(int, rows) if v < current)
        kept = {*keep, *older[-1:]}
        now = time.time()
        scheduled: list[int] = []
        for field, raw in rows.items():
            version = int(field)
            summary = json.loads(raw)
            if version >= current or version in kept:
                continue
            expires_at = summary.get("expires_at")
            if expires_at is not None:
                if expires_at < now:
                    await self.kv.hdel(self.versions_key(model), field)
                continue
            manifest_raw = await self.kv.get(self.manifest_key(model, version))
            if manifest_raw is not None:
                old = Manifest.from_bytes(manifest_raw)
                graph = old.graph_sha256 is not None
                for key in self.version_keys(model, version, list(old.tensors), graph=graph):
                    await self.kv.expire(key, self.retention_s)
            summary["expires_at"] = now + self.retention_s
            await self.kv.hset_many(self.versions_key(model), {field: json.dumps(summary).encode()})
            scheduled.append(version)
        return scheduled

    async def current_version(self, model: str) -> int:
        """The version being served; ModelNotFound when none was ever published."""
        raw = await self.kv.get(self.current_key(model))
        if raw is None:
            raise ModelNotFound(f"model {model!r} is not published")
        try:
            return int(raw)
        except ValueError:
            raise ParamsCorrupt(f"model {model!r} has an unreadable version pointer") from None

    async def manifest(self, model: str, version: int) -> Manifest:
        """The manifest of one version; VersionNotFound when it does not exist (any more)."""
        raw = await self.kv.get(self.manifest_key(model, version))
        if raw is None:
            raise VersionNotFound(f"model {model!r} has no version {version}")
        manifest = Manifest.from_bytes(raw)
        if manifest.model != model or manifest.version != version:
            raise ParamsCorrupt(
                f"manifest under {model!r} v{version} describes {manifest.model!r} "
                f"v{manifest.version}"
            )
        return manifest

    async def tensor(self, manifest: Manifest, name: str) -> npt.NDArray[Any]:
        """One tensor of a version, checked against its manifest (sha256, dtype, shape)."""
        meta = manifest.tensors.get(name)
        if meta is None:
            raise ParamsCorrupt(f"{manifest.model!r} v{manifest.version} has no tensor {name!r}")
        blob = await self.kv.get(self.tensor_key(manifest.model, manifest.version, name))
        if blob is None:
            raise VersionNotFound(
                f"tensor {name!r} of {manifest.model!r} v{manifest.version} is gone"
            )
        return verify_tensor(manifest, name, blob)

    async def graph(self, manifest: Manifest) -> bytes:
        """The graph of an ONNX version, checked against the manifest's ``graph_sha256``."""
        sha = manifest.graph_sha256
        where = f"the graph of {manifest.model!r} v{manifest.version}"
        if sha is None:
            raise ParamsCorrupt(f"{manifest.model!r} v{manifest.version} has no graph")
        blob = await self.kv.get(self.graph_key(manifest.model, manifest.version))
        if blob is None:
            raise VersionNotFound(f"{where} is gone")
        if hashlib.sha256(blob).hexdigest() != sha:
            raise ParamsCorrupt(f"{where} fails its sha256 check")
        return blob

    async def load(
        self, model: str, version: int | None = None
    ) -> tuple[Manifest, dict[str, npt.NDArray[Any]]]:
        """Every tensor of a version in one multi-get; no cache (the article's own method)."""
        if version is None:
            version = await self.current_version(model)
        manifest = await self.manifest(model, version)
        names = list(manifest.tensors)
        blobs = await self.kv.mget([self.tensor_key(model, version, n) for n in names])
        params: dict[str, npt.NDArray[Any]] = {}
        for name, blob in zip(names, blobs, strict=True):
            if blob is None:
                raise VersionNotFound(f"tensor {name!r} of {model!r} v{version} is gone")
            params[name] = verify_tensor(manifest, name, blob)
        return manifest, params

    async def versions(self, model: str) -> list[VersionInfo]:
        """Every version ever published that is still listed, oldest first."""
        rows = await self.kv.hgetall(self.versions_key(model))
        try:
            current: int | None = await self.current_version(model)
        except ModelNotFound:
            current = None
        infos: list[VersionInfo] = []
        for field, raw in rows.items():
            version = int(field)
            summary = json.loads(raw)
            available = await self.kv.exists(self.manifest_key(model, version))
            infos.append(
                VersionInfo(
                    version=version,
                    created_at=float(summary["created_at"]),
                    nbytes=int(summary["nbytes"]),
                    current=version == current,
                    available=available,
                    expires_at=summary.get("expires_at"),
                )
            )
        return sorted(infos, key=lambda i: i.version)

    async def set_current(self, model: str, version: int) -> None:
        """Serve ``version`` (rollback or roll forward); it must still be complete in Redis.

        Its keys stop expiring (a version being served is never retired), and the version
        it replaces becomes the kept previous one. A plain SET, unlike :meth:`publish`: moving
        back is the point; the versions it steps back from are kept (see :meth:`expire_old`).
        """
        manifest = await self.manifest(model, version)
        names = list(manifest.tensors)
        for name in names:
            if not await self.kv.exists(self.tensor_key(model, version, name)):
                raise VersionNotFound(f"tensor {name!r} of {model!r} v{version} is gone")
        graph = manifest.graph_sha256 is not None
        if graph and not await self.kv.exists(self.graph_key(model, version)):
            raise VersionNotFound(f"the graph of {model!r} v{version} is gone")
        keys = self.version_keys(model, version, names, graph=graph)
        await self._keep_version(model, version, keys)
        try:
            previous: int | None = await self.current_version(model)
        except ModelNotFound:
            previous = None
        await self.kv.set(self.current_key(model), str(version).encode())
        if self.retention_s is not None:
            await self.expire_old(model, keep=() if previous is None else (previous,))

    async def _keep_version(self, model: str, version: int, keys: Sequence[str]) -> None:
        """Stop a version's keys from expiring and clear its scheduled expiry in the listing."""
        for key in keys:
            await self.kv.persist(key)
        raw = await self.kv.hget(self.versions_key(model), str(version))
        if raw is not None:
            summary = json.loads(raw)
            if summary.pop("expires_at", None) is not None:
                await self.kv.hset_many(
                    self.versions_key(model), {str(version): json.dumps(summary).encode()}
                )


def verify_tensor(manifest: Manifest, name: str, blob: bytes) -> npt.NDArray[Any]:
    """Decode a tensor's bytes and check them against the manifest; ParamsCorrupt otherwise."""
    meta = manifest.tensors[name]
    where = f"tensor {name!r} of {manifest.model!r} v{manifest.version}"
    if hashlib.sha256(blob).hexdigest() != meta.sha256:
        raise ParamsCorrupt(f"{where} fails its sha256 check")
    try:
        arr = from_npy(blob)
    except ValueError as exc:
        raise ParamsCorrupt(f"{where} is not a readable array: {exc}") from None
    if str(arr.dtype) != meta.dtype or tuple(arr.shape) != meta.shape:
        raise ParamsCorrupt(
            f"{where} is {arr.dtype}{arr.shape}, manifest says {meta.dtype}{meta.shape}"
        )
    arr.flags.writeable = False
    return arr
