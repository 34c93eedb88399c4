"""The command line this process was started with, as its user would type it again: what a resume hint prints.

`sys.orig_argv` holds the interpreter's own argv. The interpreter becomes its name ("python3"), its options
(-u, -X ..., -W ...) are dropped, a console script (`kdlab-train`) is named by itself, and a torchrun worker
(torchrun sets TORCHELASTIC_RUN_ID) is shown as the torchrun line that started it.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

# Interpreter options that take a value (python -X dev, -W error): dropped with their value.
_OPTIONS_WITH_VALUE = {"-X", "-W", "--check-hash-based-pycs"}
# Flags that must not be repeated when resuming: --overwrite would replace the very run being resumed.
_DROP_FLAGS = {"--overwrite"}
_DROP_WITH_VALUE = {"--resume"}


def _program_and_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(how the program was named, its arguments) from an interpreter argv."""
    interpreter, rest = Path(argv[0]).name, list(argv[1:])
    i = 0
    while i < len(rest) and rest[i].startswith("-") and rest[i] not in ("-m", "-c", "-"):
        i += 2 if rest[i] in _OPTIONS_WITH_VALUE else 1
    rest = rest[i:]
    if not rest:
        return [interpreter], []
    if rest[0] in ("-m", "-c") and len(rest) > 1:
        return [interpreter, rest[0], rest[1]], rest[2:]
    script = Path(rest[0])
    if script.suffix != ".py" and script.name.startswith("kdlab-"):  # a console script of this package
        return [script.name], rest[1:]
    return [interpreter, rest[0]], rest[1:]


def _without_resume_flags(args: Sequence[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if arg in _DROP_FLAGS or (name in _DROP_WITH_VALUE and "=" in arg):
            continue
        if arg in _DROP_WITH_VALUE:
            skip = True
            continue
        out.append(arg)
    return out


def _launch_parts(
    argv: Sequence[str] | None, environ: Mapping[str, str] | None
) -> tuple[list[str], list[str]]:
    argv = list(sys.orig_argv if argv is None else argv)
    env = os.environ if environ is None else environ
    program, args = _program_and_args(argv)
    if "TORCHELASTIC_RUN_ID" in env:  # torchrun runs the script (or -m module) itself
        local = int(env.get("LOCAL_WORLD_SIZE", "1"))
        nodes = max(1, int(env.get("WORLD_SIZE", str(local))) // max(1, local))
        launcher = ["torchrun", *([f"--nnodes={nodes}"] if nodes > 1 else []), f"--nproc_per_node={local}"]
        program = [*launcher, *(program[1:] if len(program) > 1 else program)]
    return program, args


def launch_command(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> list[str]:
    """This process's command line as its user typed it (see the module docstring)."""
    program, args = _launch_parts(argv, environ)
    return [*program, *args]


def resume_command(
    checkpoint: Path, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> str:
    """The launch command with `--resume <checkpoint>` (an earlier --resume and --overwrite removed), quoted
    for a POSIX shell."""
    program, args = _launch_parts(argv, environ)
    return shlex.join([*program, *_without_resume_flags(args), "--resume", str(checkpoint)])
