"""The README stays true to the code."""

from __future__ import annotations

from pathlib import Path

from pipeline.cli import build_parser
from pipeline.config import env_table

README = (Path(__file__).parents[2] / "README.md").read_text()


def test_configuration_table_is_generated_from_the_settings() -> None:
    assert env_table() in README


def test_every_cli_command_is_in_the_readme() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in sub.choices:  # type: ignore[union-attr]
        assert f"`kvpipe {name}" in README, name


def test_readme_quick_start_commands_exist_in_the_makefile() -> None:
    makefile = (Path(__file__).parents[2] / "Makefile").read_text()
    assert "make demo" in README and "make test" in README
    assert "\ndemo:" in makefile and "\ntest:" in makefile
