"""Foreign clients enter through one adapter each; nothing ever unpickles."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
SOURCES = sorted([*ROOT.glob("pipeline/*.py"), *ROOT.glob("consumers/*.py")])

ALLOWED = {
    "redis": {"pipeline/kv.py"},
    "asyncio_redis": {"pipeline/kv.py"},
    # echo.py is a bare aiokafka echo: the reference point bench.py measures the worker against
    "aiokafka": {"pipeline/kafka.py", "pipeline/local.py", "pipeline/bench.py", "pipeline/echo.py"},
}


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_foreign_clients_are_imported_only_by_their_adapter(module: str) -> None:
    pattern = re.compile(rf"^\s*(import|from)\s+{module}(\.|\s|$)", re.M)
    users = {str(p.relative_to(ROOT)) for p in SOURCES if pattern.search(p.read_text())}
    assert users <= ALLOWED[module]


def test_nothing_can_unpickle() -> None:
    pattern = re.compile(r"import pickle|pickle\.loads?|allow_pickle\s*=\s*True")
    assert [str(p) for p in SOURCES if pattern.search(p.read_text())] == []
