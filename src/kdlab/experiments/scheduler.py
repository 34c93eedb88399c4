"""Start planned runs as their devices free up, teachers before their students, and watch them to the end.

One loop in the main thread owns every child: it starts a run when its teacher's best_model.pth exists and a
slot is free (a CPU share, or `training.devices_per_run` GPUs of `--gpus`), polls the children, records each
result as it ends (the `on_result` callback writes experiment_runs.json) and shows one live line per running
run, read from the run's `logs/progress.json`. Each child writes its own log file, so parallel output never
interleaves; with a single slot the log is echoed live instead, as a serial runner would.

Children run in their own session, so a Ctrl-C or a SIGTERM reaches the runner alone, which forwards one
SIGTERM to each (a second signal would stop a child before it saves). They are started from this thread with
the kernel's parent-death signal set to SIGTERM (Linux), so a runner killed even with SIGKILL takes its
children down the graceful way: they save last.pth and exit 143, and `--resume` continues them.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kdlab.engine.progress_file import read_progress
from kdlab.errors import ConfigError

log = logging.getLogger(__name__)

POLL_S = 0.5
TERMINATE_GRACE_S = 120.0  # a child given SIGTERM saves last.pth; after this long it is killed


@dataclass(frozen=True)
class Slot:
    """What one running child gets: GPUs (indices into the runner's visible devices, pinned through the child's
    CUDA_VISIBLE_DEVICES, see `child_visible_devices`) or a share of the CPU threads."""

    gpus: tuple[int, ...] = ()
    threads: int | None = None  # None: leave the thread count to torch (a single CPU slot)
    index: int = 0

    @property
    def label(self) -> str:
        if self.gpus:
            return "cuda:" + ",".join(map(str, self.gpus))
        return f"cpu#{self.index}" + (f" ({self.threads} thr)" if self.threads else "")

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.gpus:
            out["CUDA_VISIBLE_DEVICES"] = child_visible_devices(self.gpus)
        if self.threads is not None:
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                out[var] = str(self.threads)
        return out


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _parent_visible_devices() -> list[str] | None:
    """The entries of the runner's own CUDA_VISIBLE_DEVICES (ids, `GPU-...`/`MIG-...` UUIDs), None when unset."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    return [entry.strip() for entry in value.split(",") if entry.strip() != ""]


def child_visible_devices(gpus: tuple[int, ...] | list[int]) -> str:
    """CUDA_VISIBLE_DEVICES for a child given `gpus`, indices into the runner's visible devices (torch's numbering
    in the runner): the matching entries of the runner's own CUDA_VISIBLE_DEVICES, or the indices themselves (the
    physical ids) when the runner has none. A child reads its mask against the physical devices, so passing the
    runner's indices on as they are would pin it to the wrong GPUs under a runner started with a mask."""
    parent = _parent_visible_devices()
    if parent is None:
        return ",".join(map(str, gpus))
    missing = [i for i in gpus if i >= len(parent)]
    if missing:
        raise ConfigError(
            f"GPU {missing[0]} is not visible to the runner (CUDA_VISIBLE_DEVICES={','.join(parent)}); "
            f"give --gpus ids below {len(parent)}"
        )
    return ",".join(parent[i] for i in gpus)


def parse_gpus(spec: str | None) -> list[int] | None:
    """`--gpus 0,1,3` -> [0, 1, 3]; `--gpus all` -> every visible CUDA device; None -> no GPUs (CPU slots).

    Ids are indices into the runner's visible devices as torch numbers them (under CUDA_VISIBLE_DEVICES=2,3,
    `--gpus 0` is physical GPU 2); an id beyond them is a ConfigError. Where torch sees no CUDA device (a
    CPU-only build, no driver), explicit ids are checked against the runner's CUDA_VISIBLE_DEVICES when it has
    one, else passed on unchecked with a warning."""
    if spec is None:
        return None
    import torch

    count = torch.cuda.device_count()
    if spec.strip() == "all":
        if count == 0:
            raise ConfigError("--gpus all: this machine has no visible CUDA device; drop --gpus (CPU runs)")
        return list(range(count))
    try:
        ids = [int(x) for x in spec.split(",") if x.strip() != ""]
    except ValueError:
        raise ConfigError(f"--gpus expects 'all' or device ids like 0,1,3, got '{spec}'") from None
    if not ids or any(i < 0 for i in ids):
        raise ConfigError(f"--gpus expects 'all' or device ids >= 0 like 0,1,3, got '{spec}'")
    if len(set(ids)) != len(ids):
        raise ConfigError(f"--gpus lists a device twice: '{spec}'; give each id once")
    parent = _parent_visible_devices()
    visible = count if count > 0 else (len(parent) if parent is not None else None)
    if visible is None:
        log.warning(
            "--gpus %s: torch sees no CUDA device here; the ids are passed to the runs unchecked", spec
        )
        return ids
    beyond = [i for i in ids if i >= visible]
    if beyond:
        mask = f", CUDA_VISIBLE_DEVICES={','.join(parent)}" if parent is not None else ""
        hint = f"use 0..{visible - 1} or 'all'" if visible > 0 else "drop --gpus (CPU runs)"
        raise ConfigError(
            f"--gpus {spec}: device {beyond[0]} is not visible to the runner ({visible} visible{mask}); "
            f"ids index the visible devices: {hint}"
        )
    return ids


class SlotPool:
    """Free slots. With GPUs a run takes `devices_per_run` of them (at most `parallel` runs at once when given);
    on CPU there are `parallel` slots, each limited to its share of the cores when there is more than one."""

    def __init__(
        self,
        gpus: list[int] | None,
        parallel: int | None,
        cpus: int | None = None,
        threads: int | None = None,
    ) -> None:
        if parallel is not None and parallel < 1:
            raise ConfigError(f"--parallel must be >= 1, got {parallel}")
        if threads is not None and threads < 1:
            raise ConfigError(f"--threads_per_run must be >= 1, got {threads}")
        cpus = cpus or available_cpus()
        self.gpus = gpus
        self.free_gpus = list(gpus or [])
        self.max_running = parallel if parallel is not None else (len(gpus) if gpus else 1)
        self.running = 0
        if gpus:
            self.threads: int | None = max(1, cpus // min(self.max_running, len(gpus)))
        else:
            self.threads = max(1, cpus // self.max_running) if self.max_running > 1 else None
        if (
            threads is not None
        ):  # CPU results depend on the thread count: fix it to compare --parallel settings
            self.threads = threads
        self.free_cpu = list(range(self.max_running)) if not gpus else []

    @property
    def single(self) -> bool:
        return self.max_running == 1

    def check_fits(self, run_name: str, devices: int) -> None:
        if self.gpus is not None and devices > len(self.gpus):
            raise ConfigError(
                f"{run_name} needs training.devices_per_run={devices} GPUs but --gpus gives {len(self.gpus)}; "
                "give more devices or lower devices_per_run"
            )

    def acquire(self, devices: int) -> Slot | None:
        if self.running >= self.max_running:
            return None
        if self.gpus is not None:
            if len(self.free_gpus) < devices:
                return None
            take, self.free_gpus = self.free_gpus[:devices], self.free_gpus[devices:]
            slot = Slot(gpus=tuple(take), threads=self.threads)
        else:
            slot = Slot(threads=self.threads, index=self.free_cpu.pop(0))
        self.running += 1
        return slot

    def release(self, slot: Slot) -> None:
        self.running -= 1
        if slot.gpus:
            self.free_gpus = sorted(self.free_gpus + list(slot.gpus))
        else:
            self.free_cpu = sorted(self.free_cpu + [slot.index])


def _die_with_parent() -> None:
    """preexec_fn: ask the kernel to SIGTERM this child when the runner dies (Linux), however it dies."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() == 1:  # the runner died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


@dataclass
class ChildSpec:
    """What the scheduler needs to start one run: built by the runner when the run's turn comes."""

    command: list[str]
    env: dict[str, str]
    log_path: Path
    devices: int = 0  # GPUs the job needs (a cluster job; a local child gets its slot's)
    header: str = ""  # first line of the log: where the runner placed the run
    job_id: str | None = None  # a cluster job an earlier runner submitted for this run: watched, not started


class Launcher(Protocol):
    """Starts a child's command with its output in `log_path`; polls, stops it. `start_after` lists the
    handles of runs it depends on, for launchers that let the scheduler express dependencies itself."""

    expresses_dependencies: bool

    def start(self, name: str, spec: ChildSpec, start_after: list[Any]) -> Any: ...

    def poll(self, handle: Any) -> int | None: ...

    def terminate(self, handle: Any) -> None: ...

    def kill(self, handle: Any) -> None: ...


class ProcessLauncher:
    """Children as local processes (argument lists, never a shell), each writing its own log file."""

    expresses_dependencies = False

    def start(self, name: str, spec: ChildSpec, start_after: list[Any]) -> subprocess.Popen:
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        with spec.log_path.open("w", encoding="utf-8") as sink:
            if spec.header:
                sink.write(spec.header + "\n")
                sink.flush()
            return subprocess.Popen(
                spec.command, stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, **spec.env},
                start_new_session=True,  # a Ctrl-C reaches the runner only, which forwards one SIGTERM
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )  # fmt: skip

    def poll(self, handle: subprocess.Popen) -> int | None:
        return handle.poll()

    def terminate(self, handle: subprocess.Popen) -> None:
        if handle.poll() is None:
            handle.send_signal(signal.SIGTERM)

    def kill(self, handle: subprocess.Popen) -> None:
        if handle.poll() is None:
            handle.kill()


class LogEcho:
    """Copies what a child appends to its log file to the console (the single-slot, serial view)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def pump(self) -> None:
        try:
            with self.path.open("rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return
        if data:
            self.offset += len(data)
            sys.stdout.write(data.decode("utf-8", errors="replace"))
            sys.stdout.flush()


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


@dataclass
class Running:
    plan: Any
    name: str
    run_dir: Path
    slot: Slot | None
    handle: Any
    log_path: Path
    started: float = field(default_factory=time.perf_counter)
    started_wall: float = field(default_factory=time.time)
    echo: LogEcho | None = None
    last_line: str = ""
    last_print: float = float("-inf")
    stopped: bool = False  # sent its SIGTERM (the suite is stopping)

    def status_line(self) -> str:
        where = self.slot.label if self.slot is not None else "job"
        prog = read_progress(self.run_dir, newer_than=self.started_wall - 1.0)
        if prog is None:
            what = "starting"
        else:
            what = (f"epoch {prog['epoch']}/{prog['epochs']} batch {prog['batch']}/{prog['batches']} "
                    f"ETA {_eta(prog.get('eta_s'))}")  # fmt: skip
        return f"{self.name}  [{where}]  {what}"


class LiveLines:
    """One line per running experiment. On a terminal the block is redrawn in place (on stderr, where the
    log goes); otherwise a run's line is printed when it reaches a new epoch, at most once per `quiet_s`."""

    def __init__(self, stream: Any = None, quiet_s: float = 30.0) -> None:
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.drawn = 0
        self.quiet_s = quiet_s

    def clear(self) -> None:
        if self.tty and self.drawn:
            self.stream.write(f"\x1b[{self.drawn}F\x1b[J")
            self.stream.flush()
            self.drawn = 0

    def draw(self, running: list[Running]) -> None:
        lines = [r.status_line() for r in running]
        if self.tty:
            self.clear()
            for line in lines:
                self.stream.write(line + "\n")
            self.drawn = len(lines)
            self.stream.flush()
            return
        now = time.perf_counter()
        for r, line in zip(running, lines, strict=True):
            key = line.split(" batch ")[0]  # the run and its epoch: a new epoch is news, a new batch is not
            if key != r.last_line and now - r.last_print >= self.quiet_s:
                self.stream.write(line + "\n")
                self.stream.flush()
                r.last_line, r.last_print = key, now


class RunBook(Protocol):
    """The runner's side of scheduling: what each run needs and what its end means."""

    def teacher_of(self, run: Any) -> str | None: ...

    def blocked(self, run: Any) -> str | None:
        """None: it may start now; "wait": its teacher has not finished; else why it never can (skipped)."""

    def devices_of(self, run: Any) -> int: ...

    def prepare(self, run: Any, slot: Slot | None) -> ChildSpec | Any:
        """The child to start, or a result that needs no child (done before, run directory busy)."""

    def skip(self, run: Any, reason: str) -> Any: ...

    def finish(self, run: Any, exit_code: int, seconds: float, slot: Slot | None) -> Any: ...

    def stops(self, result: Any) -> bool:
        """Whether this result stops the suite (an interrupted child; a failure under --fail_fast)."""


def schedule(runs: list[Any], book: RunBook, launcher: Launcher, pool: SlotPool | None) -> None:
    """Start and watch every run until all have a result, in plan order as slots and teachers allow.

    `pool` None: the launcher queues the jobs itself (a cluster), so every ready run is submitted at once."""
    pending = list(runs)
    running: list[Running] = []
    handles: dict[str, Any] = {}
    live = LiveLines() if pool is None or not pool.single else None
    stopping = False
    if pool is not None:
        for run in runs:
            pool.check_fits(run.run_name, book.devices_of(run))

    def start_ready() -> bool:
        """Start what can start; False when a result stops the suite."""
        for run in list(pending):
            state = book.blocked(run)
            after: list[Any] = []
            if state == "wait":
                teacher = book.teacher_of(run)
                if not (launcher.expresses_dependencies and teacher in handles):
                    continue
                after = [handles[teacher]]
            elif state is not None:
                pending.remove(run)
                if book.stops(book.skip(run, state)):
                    return False
                continue
            slot = None
            if pool is not None:
                slot = pool.acquire(book.devices_of(run))
                if slot is None:
                    continue
            pending.remove(run)
            prepared = book.prepare(run, slot)
            if not isinstance(prepared, ChildSpec):
                if pool is not None and slot is not None:
                    pool.release(slot)
                if book.stops(prepared):
                    return False
                continue
            log.info("starting %s on %s", run.run_name, slot.label if slot else "the cluster")
            handle = launcher.start(run.run_name, prepared, after)
            handles[run.run_name] = handle
            echo = LogEcho(prepared.log_path) if pool is not None and pool.single else None
            running.append(
                Running(run, run.run_name, run.run_dir(), slot, handle, prepared.log_path, echo=echo)
            )
        return True

    try:
        while pending or running:
            if live is not None:
                live.clear()  # the runner's log lines of this round go above the block, which is redrawn below
            if not stopping and not start_ready():
                stopping = True
            if stopping:
                pending.clear()
                for other in running:
                    if not other.stopped:
                        log.warning(
                            "stopping %s (SIGTERM: it saves last.pth; continue with --resume)", other.name
                        )
                        launcher.terminate(other.handle)
                        other.stopped = True
            for child in list(running):
                if child.echo is not None:
                    child.echo.pump()
                code = launcher.poll(child.handle)
                if code is None:
                    continue
                if child.echo is not None:
                    child.echo.pump()
                running.remove(child)
                if pool is not None and child.slot is not None:
                    pool.release(child.slot)
                result = book.finish(child.plan, code, time.perf_counter() - child.started, child.slot)
                if book.stops(result):
                    stopping = True
            if live is not None and running:
                live.draw(running)
            if pending or running:
                time.sleep(POLL_S)
    except BaseException:
        # Ctrl-C, SIGTERM (run_cli raises it here) or a bug: stop every child the graceful way, then wait.
        if live is not None:
            live.clear()
        for child in running:
            launcher.terminate(child.handle)
        deadline = time.perf_counter() + TERMINATE_GRACE_S
        for child in running:
            while launcher.poll(child.handle) is None and time.perf_counter() < deadline:
                time.sleep(POLL_S)
            code = launcher.poll(child.handle)
            if code is None:
                launcher.kill(child.handle)
                code = 137
            book.finish(child.plan, code, time.perf_counter() - child.started, child.slot)
        raise
