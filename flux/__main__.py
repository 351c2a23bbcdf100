"""``python -m flux``: the same as the ``flux`` command."""

import sys

from flux.cli import main

sys.exit(main())
