"""``python -m scripts.bench``: what ``scripts/benchmark.sh`` runs."""

import sys

from scripts.bench.cli import main

sys.exit(main())
