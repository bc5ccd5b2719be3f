"""``python -m adapter_merging``: the ``adapter-merge`` command line (see `adapter_merging.cli`)."""
import sys

from .cli import main

sys.exit(main())
