"""Typed keys of the in-process caches: one small frozen type per kind of cached value.

Two keys are equal only when they are of the same kind and every field is equal, so kinds
never collide even where their fields do; drops select by type and field, never by shape.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PointerKey:
    """A model's serving version pointer (short TTL: how fast a publish is seen)."""

    model: str


@dataclass(frozen=True, slots=True)
class ManifestKey:
    """The manifest of one version of a model."""

    model: str
    version: int


@dataclass(frozen=True, slots=True)
class BlobKey:
    """A tensor of a model by content: the sha256 of its ``.npy`` bytes, shared by versions."""

    model: str
    sha256: str


@dataclass(frozen=True, slots=True)
class RowKey:
    """One row of an embedding table (rows are not versioned: updates rewrite them)."""

    model: str
    table: str
    row: int


@dataclass(frozen=True, slots=True)
class OutputKey:
    """A memoized output: one version of a model on inputs with this digest."""

    model: str
    version: int
    digest: bytes


@dataclass(frozen=True, slots=True)
class PrefixKey:
    """Attention keys/values of one prompt chunk: a chained hash of every token up to the
    chunk's end (:mod:`pipeline.params.prefix`), for exactly one version of a model."""

    model: str
    version: int
    digest: str


CacheKey = PointerKey | ManifestKey | BlobKey | RowKey | OutputKey | PrefixKey


def of_model(key: object, model: str) -> bool:
    """Whether ``key`` is a versioned piece (manifest or tensor content) of ``model``."""
    return isinstance(key, ManifestKey | BlobKey) and key.model == model


def of_version(key: object, model: str, version: int) -> bool:
    """Whether ``key`` belongs to exactly this version of ``model`` (its manifest: content is
    shared by versions, so the registry decides which of a version's tensors go with it)."""
    return isinstance(key, ManifestKey) and key.model == model and key.version == version
