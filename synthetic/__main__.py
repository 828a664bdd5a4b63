"""python -m synthetic: make the benchmark, preview it, make the pretraining corpus (synthetic/cli.py)."""
import sys

from synthetic.cli import _main
from utils import run_cli

sys.exit(run_cli(_main, program=True))  # the process's program: a repeated stop signal at its end changes nothing
