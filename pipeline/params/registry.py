"""Resolve a model name (and optional version) to its architecture and cached parameters."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from pipeline.cache.cache import ParamCache, Source
from pipeline.errors import ConfigError, ModelNotFound, ParamsCorrupt, ParamsUnavailable
from pipeline.params.keys import BlobKey, ManifestKey, PointerKey, RowKey, of_model
from pipeline.params.models import Model, build_model
from pipeline.params.onnx import GRAPH_PARAM
from pipeline.params.store import Manifest, ParamStore

T = TypeVar("T")

_RANK = {Source.HIT: 0, Source.LOADED: 1, Source.STALE: 2}


def worst(sources: list[Source]) -> Source:
    """The provenance of a set of values: stale if any is stale, else loaded if any was."""
    return max(sources, key=_RANK.__getitem__, default=Source.HIT)


@dataclass(frozen=True)
class Resolved:
    """One version of a model, ready to run: every tensor of exactly that version."""

    name: str
    version: int
    model: Model
    manifest: Manifest
    params: Mapping[str, npt.NDArray[Any]]
    source: Source


class ModelRegistry:
    """Finds the serving version and its tensors through the cache, single-flight per key.

    Cache keys (:mod:`pipeline.params.keys`): a :class:`PointerKey` for the version pointer
    (short TTL: how fast a publish is seen without an announcement), a :class:`ManifestKey` per
    version, a :class:`BlobKey` per tensor content (the manifest's sha256), a :class:`RowKey`
    per embedding row. An ONNX version's graph is content too (``BlobKey`` of its sha256,
    verified when read); it comes with the tensors under ``GRAPH_PARAM``.

    Tensors are cached by content: versions of a model that share a tensor share one entry
    (one Redis read, counted once in the byte budget), so a new version reloads only the
    tensors that changed. A batch still gets one manifest's tensors: content is looked up
    through that manifest, and every Redis read is checked against it (sha256, dtype, shape).
    The registry remembers which content each resolved version uses; dropping a version drops
    its manifest and the content no other remembered version uses. When the serving version
    changes, the replaced version's content is dropped only at the model's next resolve, once
    the new manifest has claimed what it shares (an announcement names a version before its
    manifest is read).
    """

    def __init__(
        self, store: ParamStore, cache: ParamCache[Any], *, version_ttl_s: float = 2.0
    ) -> None:
        self.store = store
        self.cache = cache
        self.version_ttl_s = version_ttl_s
        self._models: OrderedDict[tuple[str, int], Model] = OrderedDict()
        self._serving: dict[str, int] = {}
        self._seen: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._uses: dict[str, dict[int, frozenset[str]]] = {}
        self._retired: dict[str, set[str]] = {}

    async def current_version(self, name: str) -> tuple[int, Source]:
        version, source = await self.cache.get(
            PointerKey(name),
            lambda: self._gone_if_served(name, None, self._read_pointer(name)),
            ttl_s=self.version_ttl_s,
        )
        self._moved_to(name, int(version))
        return int(version), source

    async def _read_pointer(self, name: str) -> int:
        """The serving version, with its manifest read in the same breath and cached.

        A version number can name other parameters after Redis lost its data and the model was
        published again (the counter restarts): the manifest's creation time tells, and cached
        pieces of the old meaning are dropped before they could be served.
        """
        version = await self.store.current_version(name)
        manifest = await self.store.manifest(name, version)
        key = ManifestKey(name, version)
        known = self.cache.peek(key)
        if isinstance(known, Manifest) and known.created_at != manifest.created_at:
            self.drop_version(name, version)
        self.cache.put(key, manifest)
        return version

    def _moved_to(self, name: str, version: int) -> None:
        """When the serving version changes, retire the one it replaced: its manifest goes now,
        its content once the new version has claimed what it shares (see :meth:`_claim`); its
        hit counts would otherwise keep it over the new version's tensors under LFU."""
        before = self._serving.get(name)
        self._serving[name] = version
        if before is not None and before != version:
            self._models.pop((name, before), None)
            self.cache.invalidate(ManifestKey(name, before))
            shas = self._uses.get(name, {}).pop(before, None)
            if shas:
                self._retired.setdefault(name, set()).update(shas)

    async def resolve(self, name: str, version: int | None = None) -> Resolved:
        """The model at ``version`` (the serving one when None), all tensors of one version."""
        sources: list[Source] = []
        if version is None:
            version, src = await self.current_version(name)
            sources.append(src)
        v = version
        manifest, src = await self.cache.get(
            ManifestKey(name, v),
            lambda: self._gone_if_served(name, v, self.store.manifest(name, v)),
        )
        sources.append(src)
        model = self._model_for(manifest)
        self._claim(manifest)
        names = list(manifest.tensors)
        loads = [
            self.cache.get(
                BlobKey(name, manifest.tensors[t].sha256), self._tensor_loader(manifest, t)
            )
            for t in names
        ]
        graph_sha = manifest.graph_sha256
        if graph_sha is not None:
            loads.append(self.cache.get(BlobKey(name, graph_sha), self._graph_loader(manifest)))
        loaded = await asyncio.gather(*loads)
        params = {
            t: _fits(manifest, t, arr)
            for t, (arr, _) in zip(names, loaded[: len(names)], strict=True)
        }
        if graph_sha is not None:
            params[GRAPH_PARAM] = loaded[-1][0]
        sources.extend(s for _, s in loaded)
        self._seen[(name, v)] = None
        if len(self._seen) > 10_000:  # versions served long ago: forget the oldest
            self._seen.popitem(last=False)
        return Resolved(name, v, model, manifest, params, worst(sources))

    def _claim(self, manifest: Manifest) -> None:
        """Remember the content this version uses; drop retired content no version uses."""
        name = manifest.model
        uses = self._uses.setdefault(name, {})
        if manifest.version not in uses:
            uses[manifest.version] = _content(manifest)
            if len(uses) > 64:  # versions pinned long ago: forget the oldest claim
                del uses[next(iter(uses))]
        retired = self._retired.pop(name, None)
        if retired:
            self._drop_content(name, retired)

    def _drop_content(self, name: str, shas: frozenset[str] | set[str]) -> int:
        """Drop the cached content among ``shas`` that no remembered version of ``name`` uses."""
        used = set().union(*self._uses.get(name, {}).values())
        return sum(self.cache.invalidate(BlobKey(name, s)) for s in shas - used)

    def _tensor_loader(self, manifest: Manifest, tensor: str) -> Any:
        return lambda: self._gone_if_served(
            manifest.model, manifest.version, self.store.tensor(manifest, tensor)
        )

    def _graph_loader(self, manifest: Manifest) -> Any:
        async def load() -> npt.NDArray[np.uint8]:
            blob = await self.store.graph(manifest)
            graph = np.frombuffer(blob, dtype=np.uint8)  # an array: sized by nbytes in the cache
            graph.flags.writeable = False
            return graph

        return lambda: self._gone_if_served(manifest.model, manifest.version, load())

    async def _gone_if_served(self, name: str, version: int | None, load: Awaitable[T]) -> T:
        """Redis answering "no such model/version" for a model this worker has served means
        the data was lost (a flush, a failover to an empty replica), not a client's typo:
        say ``params_unavailable`` (retry later), and never serve the old value for it."""
        try:
            return await load
        except ModelNotFound as exc:
            served = name in self._serving if version is None else (name, version) in self._seen
            if not served:
                raise
            self.drop_model(name)
            raise ParamsUnavailable(
                f"model {name!r} was being served but Redis no longer has it ({exc}); "
                "publish it again"
            ) from None

    def _model_for(self, manifest: Manifest) -> Model:
        key = (manifest.model, manifest.version)
        model = self._models.get(key)
        if model is None:
            try:
                model = build_model(manifest.arch)
            except ConfigError as exc:
                raise ParamsCorrupt(f"{manifest.model!r} v{manifest.version}: {exc}") from None
            specs = model.tensor_specs()
            for t, meta in manifest.tensors.items():
                spec = specs.get(t)
                if spec is None or spec.shape != meta.shape or np.dtype(spec.dtype) != meta.dtype:
                    raise ParamsCorrupt(
                        f"{manifest.model!r} v{manifest.version}: tensor {t!r} does not fit "
                        f"its architecture"
                    )
            if set(specs) != set(manifest.tensors):
                raise ParamsCorrupt(
                    f"{manifest.model!r} v{manifest.version}: tensors do not match architecture"
                )
            self._models[key] = model
            if len(self._models) > 64:
                self._models.popitem(last=False)
        else:
            self._models.move_to_end(key)
        return model

    async def rows(
        self, resolved: Resolved, ids: npt.NDArray[np.int64]
    ) -> tuple[dict[str, npt.NDArray[np.float32]], Source]:
        """The embedding rows a batch needs, gathered per table in the order of ``ids``.

        Cached rows come from memory; the batch's missing rows of one table come in one
        Redis round trip, single-flight per row across concurrent batches.
        """
        tables = list(resolved.model.tables.items())
        fetched = await asyncio.gather(
            *(
                self._table_rows(resolved.name, table, width, ids[:, column])
                for column, (table, (_, width)) in enumerate(tables)
            )
        )
        gathered = {table: mat for (table, _), (mat, _) in zip(tables, fetched, strict=True)}
        return gathered, worst([src for _, src in fetched])

    async def _table_rows(
        self, name: str, table: str, width: int, column: npt.NDArray[np.int64]
    ) -> tuple[npt.NDArray[np.float32], Source]:
        unique = np.unique(column)
        keys: list[Hashable] = [RowKey(name, table, int(i)) for i in unique]

        async def load(missing: list[Hashable]) -> dict[Hashable, Any]:
            ids = [k.row for k in missing if isinstance(k, RowKey)]
            found = await self.store.read_rows(name, table, ids, width)
            return {RowKey(name, table, i): row for i, row in found.items()}

        def absent(key: Hashable) -> BaseException:
            row = key.row if isinstance(key, RowKey) else key
            return ParamsUnavailable(f"row {row} of {name!r} table {table!r} is not in Redis")

        values, source = await self.cache.get_many(keys, load, missing=absent)
        matrix = np.stack([values[k] for k in keys])
        return matrix[np.searchsorted(unique, column)], source

    def invalidate_rows(self, name: str, table: str, ids: list[int]) -> int:
        """Drop cached rows an update rewrote."""
        return sum(self.cache.invalidate(RowKey(name, table, int(i))) for i in ids)

    def set_version(self, name: str, version: int) -> None:
        """Serve ``version`` from the next batch on (an announcement said it is current).

        A pointer read already in flight is discarded, so it cannot put an older version back.
        """
        key = PointerKey(name)
        self.cache.invalidate(key)
        self.cache.put(key, int(version), ttl_s=self.version_ttl_s)
        self._moved_to(name, int(version))

    def invalidate_pointer(self, name: str) -> bool:
        """Forget the cached serving version of ``name`` so the next request reads it anew."""
        return self.cache.invalidate(PointerKey(name))

    def drop_model(self, name: str) -> int:
        """Drop every cached piece of every version of a model (its data is gone)."""
        for key in [k for k in self._models if k[0] == name]:
            del self._models[key]
        self._uses.pop(name, None)
        self._retired.pop(name, None)
        return self.cache.invalidate_where(lambda key: of_model(key, name))

    def drop_version(self, name: str, version: int) -> int:
        """Drop one version's manifest and the tensors no other resolved version shares."""
        self._models.pop((name, version), None)
        shas = self._uses.get(name, {}).pop(version, None)
        if shas is None:  # never resolved here: its cached manifest (if any) names its tensors
            known = self.cache.peek(ManifestKey(name, version))
            shas = _content(known) if isinstance(known, Manifest) else frozenset()
        dropped = int(self.cache.invalidate(ManifestKey(name, version)))
        return dropped + self._drop_content(name, shas)


def _content(manifest: Manifest) -> frozenset[str]:
    """The sha256 of every piece of content a version uses: its tensors and its graph."""
    shas = {m.sha256 for m in manifest.tensors.values()}
    if manifest.graph_sha256 is not None:
        shas.add(manifest.graph_sha256)
    return frozenset(shas)


def _fits(manifest: Manifest, tensor: str, arr: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """The cached content for ``tensor``, checked against this manifest's dtype and shape."""
    meta = manifest.tensors[tensor]
    if str(arr.dtype) != meta.dtype or tuple(arr.shape) != meta.shape:
        raise ParamsCorrupt(
            f"tensor {tensor!r} of {manifest.model!r} v{manifest.version}: its content "
            f"(sha256 {meta.sha256[:12]}) is {arr.dtype}{arr.shape}, manifest says "
            f"{meta.dtype}{meta.shape}"
        )
    return arr
