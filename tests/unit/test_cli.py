"""The kvpipe command line without services: version, descriptions, exit statuses.

``main()`` runs in this process, so each test restores what it reconfigures (structlog and
the root logging handlers), or later tests would log into a closed capture stream.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from importlib.metadata import version

import pytest
import structlog

from pipeline.cli import EXIT_FAILURE, EXIT_USAGE, build_parser, main
from pipeline.dev.local import free_port


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    config = structlog.get_config()
    try:
        yield
    finally:
        structlog.configure(**config)
        root.handlers[:] = handlers
        root.setLevel(level)


def subcommands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert isinstance(sub.choices, dict)
    return sub.choices


def test_version_prints_the_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"kvpipe {version('kvpipe')}"


def test_every_subcommand_has_a_description() -> None:
    commands = subcommands()
    assert {"serve", "publish", "produce", "results", "infer", "versions"} <= set(commands)
    for name, parser in commands.items():
        assert parser.description, f"kvpipe {name} has no description"
        assert len(parser.description) > 40, f"kvpipe {name}: {parser.description!r}"
        assert "--help" not in parser.description


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["nope"],
        ["infer", "--model", "m"],  # neither --input nor --ids
        ["infer", "--model", "m", "--input", "[[1]]", "--ids", "[[1, 2]]"],
        ["infer", "--model", "m", "--input", "[[1]]", "--timeout", "soon"],
    ):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == EXIT_USAGE == 2, argv
    capsys.readouterr()


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--input", "[[1, 2", "is not JSON rows of numbers"),
        ("--input", '[["a", "b"]]', "is not JSON rows of numbers"),
        ("--input", "{}", "rows of numbers"),
        ("--input", "[]", "non-empty list of rows"),
        ("--input", "[[[1]]]", "non-empty list of rows"),
        ("--input", "[[1, NaN]]", "null, NaN or infinity"),
        ("--ids", "[[1, null]]", "null, NaN or infinity"),
        ("--ids", "[[1.5, 2]]", "whole numbers"),
    ],
)
def test_bad_input_is_a_usage_error_of_one_line(
    flag: str, value: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    dead = f"127.0.0.1:{free_port()}"  # never reached: the input is refused first
    status = main(["infer", "--model", "m", flag, value, "--kafka", dead], environ={})
    err = capsys.readouterr().err.strip().splitlines()
    assert status == EXIT_USAGE
    assert len(err) == 1 and err[0].startswith("kvpipe infer: error: ") and says in err[0], err


def test_bad_settings_and_names_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["infer", "--model", "bad name", "--input", "[1]"], environ={}) == EXIT_USAGE
    assert "invalid model name" in capsys.readouterr().err
    env = {"KVPIPE_REPLY_TOPIC": "kvpipe.requests"}
    assert main(["infer", "--model", "m", "--input", "[1]"], environ=env) == EXIT_USAGE
    assert "KVPIPE_REPLY_TOPIC" in capsys.readouterr().err


def test_a_service_that_is_down_is_a_failure_at_run_time(
    capsys: pytest.CaptureFixture[str],
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    status = main(["infer", "--model", "m", "--input", "[[1, 2]]", "--kafka", dead], environ={})
    err = capsys.readouterr().err.strip().splitlines()
    assert status == EXIT_FAILURE == 1
    assert len(err) == 1 and err[0].startswith("kvpipe infer: error: Kafka at ") and dead in err[0]
    redis = f"redis://127.0.0.1:{free_port()}/0"
    assert main(["versions", "--model", "m", "--redis", redis], environ={}) == EXIT_FAILURE
    assert "Redis at redis://" in capsys.readouterr().err
