"""What every CLI shares: one-line errors with exit codes, logging that does not break progress bars."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import traceback
from collections.abc import Callable

from tqdm import tqdm

from kdlab.engine.stop_signals import StoppedAtOnce, TrainingInterrupted
from kdlab.errors import KdlabInputError, KdlabRunFailure

# Dedicated flags -> config keys; they rank above `--set` (DESIGN.md's precedence).
CONFIG_FLAG_KEYS = {
    "epochs": "training.epochs",
    "batch_size": "training.batch_size",
    "device": "training.device",
    "seed": "training.seed",
    "output_dir": "output_dir",
    "teacher_checkpoint": "distillation.teacher_checkpoint",
    "distillation_temperature": "distillation.temperature",
    "distillation_alpha": "distillation.alpha",
    "quantize": "export.quantize",
}

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_SIGINT, EXIT_SIGTERM = 0, 1, 2, 130, 143


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one `error:` line (exit 2) instead of usage + message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise KdlabInputError(f"{message} (see {self.prog} --help)")


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never crash the run
            self.handleError(record)


def setup_logging(verbose: bool = False) -> None:
    root = logging.getLogger("kdlab")
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not any(isinstance(h, _TqdmHandler) for h in root.handlers):
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    root.propagate = False


class _Terminated(BaseException):
    """SIGTERM outside training's graceful stop. A BaseException, so no `except Exception` on the way (a
    reader's "not a readable image", a runner's "this run failed") turns a stop into a wrong error."""


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run `main`, mapping bad input to exit 2 (`error: ...`), Ctrl-C to 130, SIGTERM to 143, bugs to 1."""

    def _on_term(signum: int, frame: object) -> None:
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, _on_term)
    try:
        return main(argv)
    except KdlabInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KdlabRunFailure as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except (TrainingInterrupted, StoppedAtOnce) as exc:  # the trainer turns the latter into the former
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted (SIGINT)", file=sys.stderr)
        return EXIT_SIGINT
    except _Terminated:
        print("error: terminated (SIGTERM)", file=sys.stderr)
        return EXIT_SIGTERM
    except Exception:
        traceback.print_exc()
        print("error: unexpected failure (traceback above); please report it", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        signal.signal(signal.SIGTERM, previous)


def print_named_configs(suites: dict[str, list[str]] | None = None) -> None:
    """--list_configs: every named config with its docstring's first line (and the suites, when given)."""
    from kdlab.config.loader import list_named_configs

    for name, doc in list_named_configs().items():
        print(f"{name:28s} {doc}")
    for name, members in (suites or {}).items():
        print(f"{name:28s} suite: {' '.join(members)}")
