#!/usr/bin/env python3
"""Train one kdlab experiment: `python train_advanced.py --config quickstart_teacher` (see --help)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # runnable without installing the package

from kdlab.cli.train import entrypoint  # noqa: E402

if __name__ == "__main__":
    entrypoint()
