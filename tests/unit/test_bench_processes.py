"""``kvpipe bench ... --processes N`` is the bench's option, never the serve setting."""

from __future__ import annotations

import pytest

from pipeline.bench.harness import side_settings
from pipeline.bench.runner import _parse_options
from pipeline.cli import build_parser, build_settings
from pipeline.errors import ConfigError


def test_the_bench_option_leaves_every_side_one_process() -> None:
    args = build_parser().parse_args(["bench", "echo", "--processes", "2"])
    settings = build_settings(args, {"KVPIPE_PROCESSES": "3"})
    assert _parse_options(args).processes == 2
    # even with KVPIPE_PROCESSES in the environment, a side is one process unless asked
    assert side_settings(settings, "t", "one").worker.processes == 1


def test_serve_takes_processes_and_auto() -> None:
    args = build_parser().parse_args(["serve", "--processes", "4"])
    assert build_settings(args, {}).worker.processes == 4
    args = build_parser().parse_args(["serve", "--processes", "auto"])
    assert build_settings(args, {}).worker.processes >= 1


def test_comparing_with_one_process_needs_at_least_two() -> None:
    args = build_parser().parse_args(["bench", "echo", "--processes", "1"])
    with pytest.raises(ConfigError, match="at least 2"):
        _parse_options(args)
