"""The program's name and exit statuses, shared by ``main`` and the commands."""

from __future__ import annotations

import argparse
from typing import Any, TypeAlias

PROG = "kvpipe"
#: Exit statuses: a failure at run time (a service down, an error result) and a usage error
#: (argparse's own status for a bad command line, and settings or input that cannot work).
EXIT_FAILURE = 1
EXIT_USAGE = 2
#: What ``add_subparsers`` returns: each command module's ``add_parsers`` adds to it.
Subparsers: TypeAlias = "argparse._SubParsersAction[Any]"
