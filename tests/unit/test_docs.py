"""docs/architecture.md's module list names every module, and only modules that exist.

The section "## Where each module fits" has one subsection per package root, headed
"### `pipeline/`" and "### `consumers/`". Each list item there starts with a path in backticks
relative to that root, then a colon: "- `serving/batcher.py`: ...", or "- `io/kv/`: ..." for a
subpackage. Only those leading paths count: a module mentioned in passing is not listed.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[2]
ARCHITECTURE = ROOT / "docs" / "architecture.md"
SECTION = "## Where each module fits"
ROOTS = ("pipeline", "consumers")

#: A list item's leading path: "- `serving/batcher.py`:" or "  - `io/kv/`:" (any nesting).
ENTRY = re.compile(r"^\s*- `([^`]+)`:", re.MULTILINE)
HEADING = re.compile(r"^### (.*)$", re.MULTILINE)
ROOT_HEADING = re.compile(r"`([a-z_]+)/`")


def module_list() -> dict[str, list[str]]:
    """The leading paths of the module list, by package root, in the order written."""
    text = ARCHITECTURE.read_text()
    assert SECTION in text, f"{ARCHITECTURE.name} has no {SECTION!r} section"
    section = text.split(SECTION, 1)[1]
    end = re.search(r"^## ", section, re.MULTILINE)
    if end:
        section = section[: end.start()]
    heads = list(HEADING.finditer(section))
    listed: dict[str, list[str]] = {}
    for head, after in zip(heads, [*heads[1:], None], strict=True):
        root = ROOT_HEADING.fullmatch(head.group(1).strip())
        if root:  # other subsections (Layers) list no modules
            body = section[head.end() : after.start() if after else len(section)]
            listed[root.group(1)] = ENTRY.findall(body)
    return listed


def modules(root: str) -> set[str]:
    """Every module of a package root (``__init__.py`` aside) and every subpackage, as paths
    relative to the root: ``serving/batcher.py``, ``io/kv/``."""
    base = ROOT / root
    found = {
        p.relative_to(base).as_posix()
        for p in base.rglob("*.py")
        if p.name != "__init__.py" and "__pycache__" not in p.parts
    }
    found |= {
        f"{p.parent.relative_to(base).as_posix()}/"
        for p in base.rglob("__init__.py")
        if p.parent != base and "__pycache__" not in p.parts
    }
    return found


def test_the_module_list_has_a_subsection_per_package_root() -> None:
    assert set(module_list()) == set(ROOTS)


def test_every_module_is_in_the_module_list() -> None:
    listed = module_list()
    for root in ROOTS:
        missing = sorted(modules(root) - set(listed[root]))
        assert not missing, (
            f"not in {ARCHITECTURE.name} '{SECTION}' under `{root}/`: {missing}; "
            "add a line `- `PATH`: what it is` for each"
        )


def exists(root: str, entry: str) -> bool:
    """A listed module is a file; a listed subpackage a directory with an ``__init__.py``."""
    if entry.endswith("/"):
        return (ROOT / root / entry / "__init__.py").is_file()
    return entry.endswith(".py") and (ROOT / root / entry).is_file()


def test_every_listed_module_exists() -> None:
    for root, entries in module_list().items():
        stale = sorted(e for e in entries if not exists(root, e))
        assert not stale, f"{ARCHITECTURE.name} lists what `{root}/` does not have: {stale}"


def test_each_module_is_listed_once() -> None:
    for root, entries in module_list().items():
        twice = sorted({e for e in entries if entries.count(e) > 1})
        assert not twice, f"listed more than once under `{root}/`: {twice}"
