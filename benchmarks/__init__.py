"""kdlab performance suite: `python -m benchmarks --suite kd|data|onnx|all --device cpu|cuda --json PATH`.

Not part of the pass/fail tests (tests/test_benchmarks.py only smoke-runs the code paths at tiny size).
Importable without installing kdlab: `src/` is put on the path here, like train_advanced.py does.
"""

import sys
from pathlib import Path

_SRC = str(Path(__file__).resolve().parents[1] / "src")
if _SRC not in sys.path:
    sys.path.insert(0, _SRC)
