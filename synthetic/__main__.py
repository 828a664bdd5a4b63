"""python -m synthetic: make the benchmark, preview it, make the pretraining corpus (synthetic/cli.py)."""
import sys

from synthetic.cli import main

sys.exit(main())
