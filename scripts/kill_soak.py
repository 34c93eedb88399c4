"""Kill soak: SIGKILL a real training run at N random moments, resume it with `--resume auto` each time, and
compare its final `last.pth` bit for bit with an uninterrupted run's (docs/reliability.md, "Kill soak").

    uv run python scripts/kill_soak.py --workdir /work/soak/baseline --kills 20 --seed 1 \\
        --config quickstart_baseline --set training.seed=0 training.deterministic=true

Not part of CI (tests/test_kill_soak.py runs it with 2 kills on a tiny config). Every training process is
`python -m kdlab.cli.train ... --output_dir <workdir>/{reference,killed}` started in its own session (cwd
<workdir>, so relative data paths land there) with OMP_NUM_THREADS=MKL_NUM_THREADS=--threads, as
run_experiments.py pins a child's threads; a kill is a SIGKILL to the whole process group (loader workers too).
The runs import a copy of src/ and configs/ taken when the soak starts (<workdir>/code, via PYTHONPATH and
KDLAB_CONFIGS_DIR), so that edits to the checkout during a long soak cannot reach only some of its processes
(`--no_snapshot` runs the checkout itself).

1. The uninterrupted reference runs first; the script times its start-up, its `last.pth` saves and how long
   one checkpoint write takes (temp file seen until it is renamed).
2. The killed run: each kill is one of
   - `startup`: a random moment within the reference's start-up time (imports, data, model, resume);
   - `step`: once `last.pth` holds the kill's target step (targets are spread evenly over the run), a random
     moment within one reference save interval after the next save (forward/backward, validation, test);
   - `write`: once `last.pth` holds the target step, at the next checkpoint write (a temp file appears or a
     file changes), plus a random delay of up to 1.5 checkpoint-write times: inside torch.save, the fsync,
     the rename, or the top-k files' shift at an epoch end.
   After every kill every `*.pth` in checkpoints/ is loaded (`torch.load`) and any that fails is recorded.
   The next attempt is the same command with `--resume auto`; after the last kill it runs to the end.
3. The final `last.pth` of both runs is compared key by key (model, EMA, optimizer, task modules, scheduler,
   scaler, top-k list, counters, RNG states, config): tensors with torch.equal and dtype, numbers exactly.
   Listed but not counted (`EXPECTED`): wall-clock values (keys holding `seconds`), `config.output_dir`, and
   the numpy / Python global RNG states, which every process seeds from OS entropy and kdlab never uses, so
   two uninterrupted runs differ there too. The best_model*.pth files and the set of checkpoint files are
   compared the same way.

The summary is printed and written as JSON (`--json`, default <workdir>/kill_soak.json). Exit 0 when the run
survived every kill, finished, is bit-identical and no checkpoint was ever unreadable; 1 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
POLL_S = 0.005
# Walk the payload in this order, so that "the first differing tensor" is the most telling one.
KEY_ORDER = ("model_state_dict", "ema_state_dict", "optimizer_state_dict", "task_state_dict",
             "scheduler_state_dict", "scaler_state_dict", "top_k", "global_step", "epoch", "batches_done",
             "best_metric", "best_epoch", "metrics", "epoch_progress", "rng_state")  # fmt: skip
# Differences that are no difference: any two runs have them, killed or not.
EXPECTED = {
    "config.output_dir": "the two runs' output directories differ by design",
    "rng_state.numpy": "numpy's global RNG is seeded from OS entropy when a process starts; kdlab never seeds or "
    "draws from it, so a run saves (and a resume restores) its first process's state",
    "rng_state.python": "as rng_state.numpy, for Python's `random`",
}


def expected_reason(path: str) -> str | None:
    for prefix, reason in EXPECTED.items():
        if path == prefix or path.startswith((prefix + ".", prefix + "[")):
            return reason
    if "seconds" in path.rsplit(".", 1)[-1]:
        return "wall-clock time"
    return None


# --------------------------------------------------------------------------------------------------- options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="kill_soak.py",
        description=__doc__.split("\n\n")[0],
        epilog="Arguments after `--` go to the training command as they are (e.g. -- --epochs 2 --device cpu).",
    )
    p.add_argument(
        "--workdir", type=Path, required=True, help="scratch directory: reference/, killed/, logs/"
    )
    p.add_argument("--config", required=True, help="the training config (a named config or a path)")
    p.add_argument(
        "--set", dest="set_items", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
        help="config overrides for both runs (training.deterministic=true is needed for an exact resume on CPU)",
    )  # fmt: skip
    p.add_argument("--kills", type=int, default=20, help="SIGKILLs to deliver (default 20)")
    p.add_argument("--seed", type=int, default=None, help="seed of the kill moments (default: a random one)")
    p.add_argument("--threads", type=int, default=1, help="OMP/MKL threads of every training process")
    p.add_argument("--json", type=Path, default=None, help="default <workdir>/kill_soak.json")
    p.add_argument("--overwrite", action="store_true", help="remove an earlier soak's runs in --workdir")
    p.add_argument(
        "--no_snapshot", action="store_true",
        help="run the checkout's src/ and configs/ as they are (default: a copy in <workdir>/code, taken at "
        "the start, so that edits to the checkout during the soak do not reach the runs)",
    )  # fmt: skip
    p.add_argument("--timeout", type=float, default=7200.0, help="seconds any one training process may take")
    p.add_argument(
        "train_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS
    )  # after `--`; cwd is --workdir
    args = p.parse_args(argv)
    if args.train_args[:1] == ["--"]:
        args.train_args = args.train_args[1:]
    for flag in ("--output_dir", "--resume", "--overwrite"):
        if flag in args.train_args:
            p.error(f"{flag} is set by the soak itself")
    if args.kills < 0 or args.threads < 1:
        p.error("--kills must be >= 0 and --threads >= 1")
    if Path(args.config).is_file():  # the runs start in --workdir
        args.config = str(Path(args.config).resolve())
    return args


# --------------------------------------------------------------------------------------------- processes


@dataclass
class Soak:
    args: argparse.Namespace
    workdir: Path
    code: Path | None = None  # the snapshot of src/ and configs/ the runs import, if any
    started: float = field(default_factory=time.monotonic)

    def command(self, out: str, resume: bool) -> list[str]:
        cmd = [sys.executable, "-m", "kdlab.cli.train", "--config", self.args.config,
               "--output_dir", str(self.workdir / out), "--no_progress", *self.args.train_args]  # fmt: skip
        if self.args.set_items:
            cmd += ["--set", *self.args.set_items]
        return cmd + (["--resume", "auto"] if resume else [])

    def env(self) -> dict[str, str]:
        threads = str(self.args.threads)
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
        if self.code is not None:  # ahead of the editable install on sys.path
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.code / "src"), env.get("PYTHONPATH")]))
            env["KDLAB_CONFIGS_DIR"] = str(self.code / "configs")
        return env

    def spawn(self, out: str, resume: bool, log_name: str) -> tuple[subprocess.Popen, float]:
        log = self.workdir / "logs" / log_name
        with open(log, "w") as fh:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                self.command(out, resume), cwd=self.workdir, env=self.env(), stdin=subprocess.DEVNULL,
                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        return proc, time.monotonic()


def snapshot_code(dest: Path) -> dict[str, Any]:
    """Copy the checkout's src/ and configs/ to `dest`; the commit, whether the tree was dirty, a hash of the copy."""
    if dest.exists():
        shutil.rmtree(dest)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    digest = hashlib.sha256()
    for sub in ("src", "configs"):
        shutil.copytree(ROOT / sub, dest / sub, ignore=ignore)
        for path in sorted((dest / sub).rglob("*")):
            if path.is_file():
                digest.update(str(path.relative_to(dest)).encode() + b"\0" + path.read_bytes())

    def git(*cmd: str) -> str:
        try:
            done = subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=60)
            return done.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"path": str(dest), "commit": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--", "src", "configs")),
            "sha256": digest.hexdigest()}  # fmt: skip


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the session's group: the trainer and its loader workers
    except ProcessLookupError:
        pass
    proc.wait()


def run_dir_of(out: Path) -> Path | None:
    found = sorted(p.parent for p in out.glob("*/checkpoints"))
    return found[0] if found else None


class Watcher:
    """Polls one output directory's checkpoints/: file changes, temp files (writes in progress), last.pth's step."""

    def __init__(self, out: Path):
        self.out = out
        self.pid: int | None = None  # the training process; its temp files are `.<name>.tmp-<pid>`
        self.seen: dict[str, int] = {}
        self.last_mtime: int | None = None
        self.step: int | None = None  # global_step of last.pth (None: no last.pth yet)
        self.tmp_since: dict[str, float] = {}
        self.write_times: list[float] = []  # temp file first seen -> gone
        self.saves: list[float] = []  # monotonic times at which a new last.pth was seen
        self.poll()
        self.saves.clear()

    @property
    def ckpt_dir(self) -> Path | None:
        run = run_dir_of(self.out)
        return run / "checkpoints" if run else None

    def poll(self) -> tuple[bool, bool]:
        """(a write started or a file changed since the last poll, a new last.pth appeared)."""
        ckpt = self.ckpt_dir
        if ckpt is None:
            return False, False
        now = time.monotonic()
        current: dict[str, int] = {}
        try:
            with os.scandir(ckpt) as it:
                for entry in it:
                    try:
                        current[entry.name] = entry.stat().st_mtime_ns
                    except FileNotFoundError:
                        pass
        except FileNotFoundError:
            return False, False
        activity = any(self.seen.get(name) != mtime for name, mtime in current.items())
        for name in current:
            if self.own_tmp(name) and name not in self.tmp_since:
                self.tmp_since[name] = now
        for name in list(self.tmp_since):
            if name not in current:
                self.write_times.append(now - self.tmp_since.pop(name))
        self.seen = current
        new_last = "last.pth" in current and current["last.pth"] != self.last_mtime
        if new_last:
            self.last_mtime = current["last.pth"]
            self.saves.append(now)
            self.step = read_step(ckpt / "last.pth", self.step)
        return activity, new_last

    def own_tmp(self, name: str) -> bool:
        """A temp file of the watched process (a killed attempt's stays until the next one starts)."""
        return self.pid is not None and name.endswith(f".tmp-{self.pid}")

    def writing(self) -> bool:
        return any(self.own_tmp(name) for name in self.seen)


def read_step(path: Path, default: int | None) -> int | None:
    try:  # mmap: only the pickle is read, the tensors are not
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    except Exception:  # replaced again while being read; the next poll sees it
        return default


def check_checkpoints(out: Path) -> tuple[int, list[dict[str, str]]]:
    """torch.load every *.pth of the run; (files loaded, failures)."""
    run = run_dir_of(out)
    if run is None:
        return 0, []
    failures = []
    files = sorted((run / "checkpoints").glob("*.pth"))
    for path in files:
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any failure is what we look for
            failures.append({"file": path.name, "error": f"{type(exc).__name__}: {exc}"[:300]})
    return len(files), failures


# ------------------------------------------------------------------------------------------------- reference


def run_reference(soak: Soak) -> dict[str, Any]:
    out = soak.workdir / "reference"
    proc, t0 = soak.spawn("reference", resume=False, log_name="reference.log")
    watcher = Watcher(out)
    watcher.pid = proc.pid
    startup = None
    while proc.poll() is None:
        watcher.poll()
        ckpt = watcher.ckpt_dir
        if startup is None and ckpt is not None and (ckpt / "untrained_model.pth").exists():
            startup = time.monotonic() - t0
        if time.monotonic() - t0 > soak.args.timeout:
            kill_group(proc)
            raise SystemExit(f"error: the reference run took more than {soak.args.timeout:.0f} s")
        time.sleep(POLL_S)
    wall = time.monotonic() - t0
    watcher.poll()
    if proc.returncode != 0:
        raise SystemExit(
            f"error: the reference run failed (exit {proc.returncode}); see {soak.workdir}/logs/reference.log"
        )
    run = run_dir_of(out)
    assert run is not None
    final = torch.load(run / "checkpoints" / "last.pth", map_location="cpu", weights_only=True)
    intervals = [b - a for a, b in zip(watcher.saves, watcher.saves[1:], strict=False)]
    return {
        "wall_s": round(wall, 2),
        "startup_s": round(startup if startup is not None else wall / 10, 2),
        "last_pth_saves": len(watcher.saves),
        "save_interval_s": round(statistics.median(intervals), 3) if intervals else round(wall / 4, 3),
        "write_s": round(statistics.median(watcher.write_times), 3) if watcher.write_times else 0.05,
        "writes_timed": len(watcher.write_times),
        "total_steps": int(final["global_step"]),
    }


# ---------------------------------------------------------------------------------------------------- kills


@dataclass
class Kill:
    index: int
    kind: str  # startup | step | write
    target_step: int | None
    delay_s: float  # startup: after the spawn; step: after the next save; write: after the write is seen
    # filled in when it happens
    delivered: bool = False
    at_s: float | None = None  # seconds after the attempt's spawn
    step_before: int | None = None
    step_after: int | None = None
    in_write: bool | None = None  # a temp file existed at the kill
    checkpoints_loaded: int = 0
    unreadable: list[dict[str, str]] = field(default_factory=list)
    exit: int | None = None


def plan_kills(n: int, rng: random.Random, ref: dict[str, Any]) -> list[Kill]:
    """n kills: a fifth during start-up, the rest half `step`, half `write`, with target steps spread evenly
    (one per stratum, at a random place in it) over the run minus its last save interval. Start-up kills go
    anywhere before the last training kill: after it, the rest of the run may take less than a start-up."""
    n_startup = n // 5
    n_write = (n - n_startup) // 2
    kinds = ["write"] * n_write + ["step"] * (n - n_startup - n_write)
    rng.shuffle(kinds)
    for _ in range(n_startup):
        kinds.insert(rng.randrange(max(len(kinds), 1)), "startup")
    m = n - n_startup
    saves = max(ref["last_pth_saves"], 1)
    span = ref["total_steps"] * (1 - 1 / saves) if saves > 1 else ref["total_steps"] / 2
    targets = iter(sorted(int(span * (j + rng.random()) / m) for j in range(m)))
    kills = []
    for i, kind in enumerate(kinds):
        if kind == "startup":
            kills.append(Kill(i, kind, None, rng.uniform(0.0, ref["startup_s"])))
        elif kind == "step":
            kills.append(Kill(i, kind, next(targets), rng.uniform(0.0, ref["save_interval_s"])))
        else:
            kills.append(Kill(i, kind, next(targets), rng.uniform(0.0, 1.5 * ref["write_s"])))
    return kills


def deliver(soak: Soak, kill: Kill, resume: bool) -> tuple[subprocess.Popen, float]:
    """Start an attempt and SIGKILL it as `kill` says; returns the (ended) process and its wall time."""
    out = soak.workdir / "killed"
    watcher = Watcher(out)
    kill.step_before = watcher.step
    proc, t0 = soak.spawn("killed", resume=resume, log_name=f"attempt_{kill.index:02d}.log")
    watcher.pid = proc.pid
    fire_at: float | None = t0 + kill.delay_s if kill.kind == "startup" else None
    reached = False
    while proc.poll() is None:
        now = time.monotonic()
        if now - t0 > soak.args.timeout:
            kill_group(proc)
            raise SystemExit(f"error: attempt {kill.index} took more than {soak.args.timeout:.0f} s")
        activity, new_last = watcher.poll()
        if fire_at is None:
            if kill.kind == "step":
                # at least one save of this attempt, so that every step kill is inside training
                if new_last and watcher.step is not None and watcher.step >= kill.target_step:
                    fire_at = now + kill.delay_s
            else:  # write
                if reached and activity:
                    fire_at = now + kill.delay_s
                reached = reached or (watcher.step is not None and watcher.step >= kill.target_step)
        if fire_at is not None and now >= fire_at:
            watcher.poll()
            kill.in_write = watcher.writing()
            kill_group(proc)
            # it may have ended on its own just before
            kill.delivered, kill.at_s = proc.returncode == -signal.SIGKILL, round(time.monotonic() - t0, 3)
            break
        time.sleep(POLL_S)
    kill.exit = proc.returncode
    wall = time.monotonic() - t0
    watcher.poll()
    kill.step_after = watcher.step
    kill.checkpoints_loaded, kill.unreadable = check_checkpoints(out)
    return proc, wall


# ------------------------------------------------------------------------------------------------ compare


def compare(a: Any, b: Any, path: str = "", out: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Differences between two checkpoint payloads, in KEY_ORDER first; each {path, tensor, what}."""
    out = [] if out is None else out
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            out.append({"path": path, "tensor": True, "what": f"{type(a).__name__} vs {type(b).__name__}"})
        elif a.dtype != b.dtype or a.shape != b.shape:
            out.append(
                {
                    "path": path,
                    "tensor": True,
                    "what": f"{a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}",
                }
            )
        elif not torch.equal(a, b):
            if a.is_floating_point():
                nan_same = torch.equal(a.isnan(), b.isnan())
                if nan_same and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)):
                    return out  # equal, NaNs in the same places
                delta = (a.double() - b.double()).abs().nan_to_num(0.0).max().item()
                what = f"max |diff| {delta:.3g}, {int((a != b).sum())} of {a.numel()} elements"
            else:
                what = f"{int((a != b).sum())} of {a.numel()} elements"
            out.append({"path": path, "tensor": True, "what": what})
        return out
    if isinstance(a, dict) and isinstance(b, dict):
        keys = [k for k in KEY_ORDER if k in a or k in b] if not path else []
        keys += sorted((set(a) | set(b)) - set(keys), key=str)
        for key in keys:
            sub = f"{path}.{key}" if path else str(key)
            if key not in a or key not in b:
                out.append(
                    {
                        "path": sub,
                        "tensor": False,
                        "what": "only in " + ("reference" if key in a else "killed run"),
                    }
                )
            else:
                compare(a[key], b[key], sub, out)
        return out
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            out.append({"path": path, "tensor": False, "what": f"length {len(a)} vs {len(b)}"})
            return out
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            compare(x, y, f"{path}[{i}]", out)
        return out
    same = a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
    if not same or type(a) is not type(b):
        out.append({"path": path, "tensor": False, "what": f"{a!r} vs {b!r}"[:200]})
    return out


def split_expected(diffs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """(real differences, {expected prefix: {count, reason}})."""
    real, expected = [], {}
    for d in diffs:
        reason = expected_reason(d["path"])
        if reason is None:
            real.append(d)
        else:
            key = next((p for p in EXPECTED if d["path"].startswith(p)), d["path"])
            expected.setdefault(key, {"count": 0, "reason": reason})["count"] += 1
    return real, expected


def compare_runs(ref_run: Path, got_run: Path) -> dict[str, Any]:
    def load(path: Path) -> dict[str, Any]:
        return torch.load(path, map_location="cpu", weights_only=True)

    diffs, expected = split_expected(
        compare(load(ref_run / "checkpoints" / "last.pth"), load(got_run / "checkpoints" / "last.pth"))
    )
    ref_files = sorted(p.name for p in (ref_run / "checkpoints").glob("*.pth"))
    got_files = sorted(p.name for p in (got_run / "checkpoints").glob("*.pth"))
    best_diffs = {}
    for name in ref_files:
        if name.startswith("best_model") and name in got_files:
            d, _ = split_expected(
                compare(load(ref_run / "checkpoints" / name), load(got_run / "checkpoints" / name))
            )
            if d:
                best_diffs[name] = d[:5]
    tensors = [d for d in diffs if d["tensor"]]
    return {
        "bit_identical": not diffs,
        # weights, EMA, optimizer, scheduler, top-k, counters: all but the RNG states saved for the next step
        "training_state_identical": all(d["path"].startswith("rng_state") for d in diffs),
        "first_difference": diffs[0] if diffs else None,
        "first_differing_tensor": tensors[0]["path"] if tensors else None,
        "differences": len(diffs),
        "differences_head": diffs[:20],
        "expected_differences": expected,
        "checkpoint_files_same": ref_files == got_files,
        "checkpoint_files": {"reference": ref_files, "killed": got_files},
        "best_model_files_identical": not best_diffs,
        "best_model_differences": best_diffs,
    }


# ---------------------------------------------------------------------------------------------------- main


def child_threads(run: Path | None) -> int | None:
    try:
        summary = json.loads((run / "summary.json").read_text())  # type: ignore[operator]
        return summary.get("provenance", {}).get("threads")
    except (OSError, TypeError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    workdir = args.workdir.resolve()
    for sub in ("reference", "killed"):
        if (workdir / sub).exists():
            if not args.overwrite:
                raise SystemExit(f"error: {workdir / sub} exists (pass --overwrite to replace it)")
            shutil.rmtree(workdir / sub)
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    soak = Soak(args, workdir)
    code = None if args.no_snapshot else snapshot_code(workdir / "code")
    soak.code = Path(code["path"]) if code else None
    print(f"kill soak: seed {seed}, {args.kills} kills, {args.threads} thread(s), torch {torch.__version__}")
    print("command:", shlex.join(soak.command("killed", resume=False)), flush=True)

    ref = run_reference(soak)
    print(f"reference: {ref['wall_s']:.1f} s, {ref['total_steps']} steps, start-up {ref['startup_s']:.1f} s, "
          f"{ref['last_pth_saves']} last.pth saves {ref['save_interval_s']:.2f} s apart, "
          f"a write {ref['write_s']:.3f} s", flush=True)  # fmt: skip

    kills = plan_kills(args.kills, random.Random(seed), ref)
    killed_start = time.monotonic()
    attempts: list[dict[str, Any]] = []
    resumed = False
    failed = None
    for kill in kills:
        proc, wall = deliver(soak, kill, resume=resumed)
        attempts.append(
            {"attempt": kill.index, "resume": resumed, "wall_s": round(wall, 2), "exit": proc.returncode}
        )
        resumed = True
        where = "in a write" if kill.in_write else ""
        print(f"kill {kill.index + 1:2d}/{len(kills)} {kill.kind:7s} target step {kill.target_step!s:>4}: "
              + (f"SIGKILL at {kill.at_s:.2f} s {where}" if kill.delivered else f"not delivered (exit {kill.exit})")
              + f"; last.pth step {kill.step_before} -> {kill.step_after}; {kill.checkpoints_loaded} checkpoints "
              f"loaded, {len(kill.unreadable)} unreadable", flush=True)  # fmt: skip
        if not kill.delivered:
            if kill.exit != 0:
                failed = f"attempt {kill.index} exited {kill.exit} on its own (see logs/attempt_{kill.index:02d}.log)"
            break  # finished (or failed) before the kill: nothing left to resume

    final_wall, final_exit = 0.0, 0
    if failed is None and all(k.delivered for k in kills):
        proc, t0 = soak.spawn("killed", resume=resumed, log_name="final.log")
        try:
            proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
        final_wall, final_exit = time.monotonic() - t0, proc.returncode
        attempts.append(
            {"attempt": "final", "resume": resumed, "wall_s": round(final_wall, 2), "exit": final_exit}
        )
        if final_exit != 0:
            failed = f"the final resume exited {final_exit} (see logs/final.log)"
    killed_wall = time.monotonic() - killed_start
    loaded, final_unreadable = check_checkpoints(workdir / "killed")

    ref_run, got_run = run_dir_of(workdir / "reference"), run_dir_of(workdir / "killed")
    comparison = (
        compare_runs(ref_run, got_run) if failed is None and ref_run and got_run else {"bit_identical": False}
    )
    unreadable = [{"after_kill": k.index, **u} for k in kills for u in k.unreadable]
    unreadable += [{"after_kill": "final", **u} for u in final_unreadable]
    delivered = sum(k.delivered for k in kills)
    result = {
        "seed": seed,
        "config": args.config,
        "set": args.set_items,
        "train_args": args.train_args,
        "command": shlex.join(soak.command("killed", resume=False)),
        "resume_command": shlex.join(soak.command("killed", resume=True)),
        "soak_args": sys.argv[1:] if argv is None else argv,
        "kills_planned": len(kills),
        "kills_delivered": delivered,
        # a kill is survived when the attempt after it resumed and ran on (to the next kill or to the end)
        "kills_survived": delivered - (1 if failed and delivered else 0),
        "kills_in_write": sum(bool(k.in_write) for k in kills if k.delivered),
        "kills_by_kind": {
            kind: sum(k.kind == kind and k.delivered for k in kills) for kind in ("startup", "step", "write")
        },
        "resumes": sum(a["resume"] for a in attempts),
        "failure": failed,
        "bit_identical": bool(comparison.get("bit_identical")),
        "first_differing_tensor": comparison.get("first_differing_tensor"),
        "training_state_identical": bool(comparison.get("training_state_identical")),
        "comparison": comparison,
        "checkpoint_loads": sum(k.checkpoints_loaded for k in kills) + loaded,
        "unreadable_checkpoints": unreadable,
        "wall_s": {
            "reference": ref["wall_s"],
            "killed_run_total": round(killed_wall, 2),
            "final_resume": round(final_wall, 2),
            "soak_total": round(time.monotonic() - soak.started, 2),
        },
        "reference": ref,
        "kills": [asdict(k) for k in kills],
        "attempts": attempts,
        "code": code or {"path": str(ROOT / "src"), "snapshot": False},
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": args.threads,
        "child_threads": {"reference": child_threads(ref_run), "killed": child_threads(got_run)},
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "loadavg_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "host": platform.node(),
    }
    ok = (failed is None and result["bit_identical"] and not unreadable and delivered == len(kills)
          and comparison.get("best_model_files_identical") and comparison.get("checkpoint_files_same"))  # fmt: skip
    result["ok"] = ok
    path = args.json or workdir / "kill_soak.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\nseed {seed}: {delivered}/{len(kills)} kills delivered ({result['kills_in_write']} inside a checkpoint "
          f"write), {result['resumes']} resumes, {result['checkpoint_loads']} checkpoint loads, "
          f"{len(unreadable)} unreadable")  # fmt: skip
    if failed:
        print("FAILED:", failed)
    if comparison.get("bit_identical"):
        ignored = ", ".join(comparison["expected_differences"]) or "nothing"
        print(f"final last.pth: bit-identical to the uninterrupted run (ignored: {ignored})")
        if not (comparison["best_model_files_identical"] and comparison["checkpoint_files_same"]):
            print("but the best_model*.pth files or the set of checkpoint files differ (see the JSON)")
    elif "first_difference" in comparison:
        first = comparison["first_difference"]
        print(f"final last.pth: NOT bit-identical; {comparison['differences']} differences, first {first['path']} "
              f"({first['what']}); first tensor {comparison['first_differing_tensor']}")  # fmt: skip
    print(f"wall: reference {ref['wall_s']:.1f} s, killed run {killed_wall:.1f} s; "
          f"threads {result['child_threads']}; json {path}")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
