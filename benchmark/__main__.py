"""``python -m benchmark`` is ``python run_benchmark.py``."""
import sys

from benchmark.cli import main

sys.exit(main())
