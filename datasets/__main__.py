"""python -m datasets --stats NAME --root DIR [--masks DIR] [--skip-bad]: a dataset's statistics (datasets/__init__.py)."""
import sys

from datasets import _main
from utils import run_cli

sys.exit(run_cli(_main, program=True))  # the process's program: a repeated stop signal at its end changes nothing
