"""``python -m pipeline.cli``: the ``kvpipe`` command."""

import sys

from pipeline.cli import main

sys.exit(main())
