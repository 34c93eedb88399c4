"""What every CLI shares: one-line errors with exit codes, logging that does not break progress bars."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable

from tqdm import tqdm

from kdlab.atomic_io import (
    FileWriteError,
    defer_write_failure,
    inject_write_fault,
    is_no_space,
    take_deferred_write_failure,
    write_failure,
)
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
    """Log lines on stderr, above any progress bar. When stderr is a file on a full disk, the failure is no
    "--- Logging error ---" traceback: the console falls silent and the failure is raised as one error line at
    the next safe point (the trainer's next step, or the end of the command)."""

    failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if self.failed:
            return
        try:
            inject_write_fault("stderr")
            tqdm.write(self.format(record), file=sys.stderr)
        except OSError as exc:
            if not is_no_space(exc):
                self.handleError(record)
                return
            self.failed = True
            target = _stderr_file()
            defer_write_failure(write_failure(target or "stderr", exc, "", on_disk=target is not None))
        except Exception:  # pragma: no cover - logging must never crash the run
            self.handleError(record)


def _stderr_file() -> str | None:
    """The file stderr writes to, when it is one (Linux /proc), else None (a pipe, a terminal, unknown)."""
    try:
        target = os.readlink(f"/proc/self/fd/{sys.stderr.fileno()}")
    except (OSError, ValueError, AttributeError):
        return None
    return target if target.startswith("/") and os.path.isfile(target) else None


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
    """Run `main`, mapping bad input to exit 2 (`error: ...`), a run failure (a full disk included) to 1 with one
    `error:` line, Ctrl-C to 130, SIGTERM to 143, bugs to 1 with their traceback."""

    def _on_term(signum: int, frame: object) -> None:
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, _on_term)
    take_deferred_write_failure()  # one left by an earlier command in this process is not this one's
    for handler in logging.getLogger("kdlab").handlers:
        if isinstance(handler, _TqdmHandler):
            handler.failed = False  # the console may have room again
    try:
        code = main(argv)
        late = take_deferred_write_failure()  # a log line that failed after the last safe point
        if late is None:
            return code
        print(f"error: {late}", file=sys.stderr)
        return EXIT_FAILURE
    except KdlabInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (KdlabRunFailure, FileWriteError) as exc:  # FileWriteError: a full disk, one line
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
