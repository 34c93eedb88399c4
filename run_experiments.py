#!/usr/bin/env python3
"""Run several kdlab experiments, export them and compare them: `python run_experiments.py --configs quickstart`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # runnable without installing the package

from kdlab.cli.experiments import entrypoint  # noqa: E402

if __name__ == "__main__":
    entrypoint()
