"""GPU acceptance check: `python -m benchmarks --suite gpu --device cuda [--out DIR] [--json PATH]`.

One command that a person with a GPU box runs once to know kdlab works there (docs/performance.md, "GPU
acceptance check"). It runs a fixed list of items (benchmarks/gpu_items.py): the quickstart teacher and
distilled student through `run_experiments.py` with the ONNX export and INT8, the KD step under bf16 / fp16
(with a forced overflow) / channels_last / torch.compile, torchrun with NCCL, the runner's `--gpus` and
CUDA_VISIBLE_DEVICES pinning, `python -m kdlab.cli.predict` on a `.pth`, and the KD step's throughput against
the naive loop with the GPU-busy fraction. Every item runs even when an earlier one failed, except items that
need an earlier item's output (skipped, with the reason). The result is one JSON (overall ok, per item:
status, figure, seconds, error tail), a short table, and exit code 0 when every item passed, 1 otherwise.

`--device cpu` runs the same items at tiny sizes on the CPU (their CPU analogue, or "skipped: needs CUDA"),
so CI can check the script itself. Children run as `sys.executable ...` with this checkout's `src` first on
PYTHONPATH and their working directory in the output directory, so a plain Python with the dependencies
installed works as well as `uv run`, and nothing is written into the repository.
"""

from __future__ import annotations

import gc
import json
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ERROR_TAIL_CHARS = 3000


class Skip(Exception):
    """An item that does not apply here (e.g. needs CUDA on a CPU run). `expected`: skipped by design for this
    device, so it does not fail the run; an unexpected skip does."""

    def __init__(self, reason: str, expected: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.expected = expected


class CheckFailed(Exception):
    """A check that did not hold; `tail` is the end of the output that explains it (a child's log). A goal
    that was missed still has its `figure` and `values`, which the report keeps."""

    def __init__(
        self, message: str, tail: str = "", figure: str = "", values: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.tail = tail
        self.figure = figure
        self.values = values or {}


@dataclass
class Outcome:
    """What a passing item reports: a short figure for the table, numbers and facts for the JSON."""

    figure: str
    values: dict[str, Any] = field(default_factory=dict)
    note: str = ""


@dataclass
class Item:
    name: str
    what: str  # one line: what is checked
    run: Callable[[Any], Outcome]
    needs: tuple[str, ...] = ()  # items whose output this one uses: skipped unless they passed


@dataclass
class ItemResult:
    name: str
    what: str
    status: str  # passed | failed | skipped
    seconds: float
    figure: str = ""
    values: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    error: str | None = None
    expected_skip: bool = False

    @property
    def ok(self) -> bool | None:
        return {"passed": True, "failed": False}.get(self.status)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "what": self.what, "status": self.status, "ok": self.ok,
            "figure": self.figure, "seconds": round(self.seconds, 2), "values": _finite(self.values),
            "note": self.note, "error": self.error, "expected_skip": self.expected_skip,
        }  # fmt: skip


def _finite(value: Any) -> Any:
    """JSON-safe: NaN/inf become None (json.dumps would write the invalid token NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def error_text(exc: BaseException) -> str:
    """The error of a failed item: its message, then the child's output tail or the traceback's tail."""
    if isinstance(exc, CheckFailed):
        head, detail = str(exc), exc.tail
        label = "output tail"
    else:
        head = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
        detail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        label = "traceback"
    if len(detail) > ERROR_TAIL_CHARS:
        detail = "..." + detail[-ERROR_TAIL_CHARS:]
    return head + (f"\n--- {label} ---\n{detail.rstrip()}" if detail.strip() else "")


def run_items(
    items: list[Item], ctx: Any, on_result: Callable[[ItemResult], None] | None = None
) -> list[ItemResult]:
    """Run every item in order. A raising item is recorded as failed and the next one runs; an item whose
    `needs` did not pass is skipped with the reason. `on_result` sees each result as it is made."""
    results: dict[str, ItemResult] = {}
    for item in items:
        missing = [n for n in item.needs if n not in results or results[n].status != "passed"]
        start = time.perf_counter()
        if missing:
            why = ", ".join(f"{n} ({results[n].status if n in results else 'not run'})" for n in missing)
            result = ItemResult(item.name, item.what, "skipped", 0.0, error=f"skipped: needs {why}")
        else:
            try:
                out = item.run(ctx)
                result = ItemResult(item.name, item.what, "passed", time.perf_counter() - start, out.figure,
                                    out.values, out.note)  # fmt: skip
            except Skip as exc:
                result = ItemResult(item.name, item.what, "skipped", time.perf_counter() - start,
                                    note=f"skipped: {exc.reason}", expected_skip=exc.expected)  # fmt: skip
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure is this item's, the next one still runs
                result = ItemResult(item.name, item.what, "failed", time.perf_counter() - start,
                                    getattr(exc, "figure", ""), getattr(exc, "values", {}),
                                    error=error_text(exc))  # fmt: skip
        results[item.name] = result
        if on_result is not None:
            on_result(result)
    return list(results.values())


def overall_ok(results: list[ItemResult]) -> bool:
    """Passed: nothing failed, nothing was skipped except by design for the device, and something ran."""
    if any(r.status == "failed" for r in results):
        return False
    if any(r.status == "skipped" and not r.expected_skip for r in results):
        return False
    return any(r.status == "passed" for r in results)


def exit_code(results: list[ItemResult]) -> int:
    return 0 if overall_ok(results) else 1


def report(results: list[ItemResult], meta: dict[str, Any]) -> dict[str, Any]:
    counts = {s: sum(r.status == s for r in results) for s in ("passed", "failed", "skipped")}
    return {
        "ok": overall_ok(results),
        "counts": counts,
        **meta,
        "seconds": round(sum(r.seconds for r in results), 2),
        "items": [r.to_json() for r in results],
    }


def table(results: list[ItemResult]) -> str:
    """The printed summary: item, ok, figure, seconds (failed and skipped items say why, shortened)."""
    rows = []
    for r in results:
        ok = {"passed": "pass", "failed": "FAIL", "skipped": "skip"}[r.status]
        figure = r.figure
        if r.status == "failed" and r.error:
            first = r.error.strip().splitlines()[0]
            figure = f"{figure}; {first}" if figure else first
        elif r.status == "skipped":
            figure = r.note or r.error or ""
        if len(figure) > 90:
            figure = figure[:87] + "..."
        rows.append((r.name, ok, figure.replace("|", "/"), f"{r.seconds:.1f}"))
    head = ("item", "ok", "figure", "seconds")
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in rows]
    return "\n".join([line, sep, *body])


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def run_acceptance(
    device: str, out: Path | None, json_path: Path | None, only: list[str] | None = None
) -> int:
    """The `--suite gpu` entry point: run the items, write the JSON after every item, print the table."""
    import torch

    from benchmarks.common import machine_info
    from benchmarks.gpu_items import Context, items_for

    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available (use --device cpu for the smoke run)",
              file=sys.stderr)  # fmt: skip
        return 2
    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="kdlab-gpu-acceptance-"))
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    json_path = Path(json_path) if json_path is not None else out / "gpu_acceptance.json"
    items = items_for(device)
    if only:
        unknown = sorted(set(only) - {i.name for i in items})
        if unknown:
            print(f"error: unknown item(s) {', '.join(unknown)}; items: {', '.join(i.name for i in items)}",
                  file=sys.stderr)  # fmt: skip
            return 2
        items = [i for i in items if i.name in only]
    ctx = Context(device=device, out=out)
    meta = {
        "device": device, "out_dir": str(out), "machine": machine_info(torch.device(device)),
        "command": [sys.executable, "-m", "benchmarks", *sys.argv[1:]],
    }  # fmt: skip
    started = time.perf_counter()
    done: list[ItemResult] = []
    print(f"kdlab GPU acceptance check on {device}: {len(items)} items, working in {out}", flush=True)

    def record(result: ItemResult) -> None:
        gc.collect()  # an in-process item's models go before the next item's children need the GPU
        if device == "cuda":
            torch.cuda.empty_cache()
        done.append(result)
        mark = {"passed": "pass", "failed": "FAIL", "skipped": "skip"}[result.status]
        print(f"[{len(done)}/{len(items)}] {result.name}: {mark} ({result.seconds:.1f} s) {result.figure}",
              flush=True)  # fmt: skip
        write_json(json_path, {**report(done, meta), "wall_seconds": round(time.perf_counter() - started, 2),
                               "finished": False})  # fmt: skip

    threads = torch.get_num_threads()
    if device == "cpu":
        # the in-process items on one thread: two threads spin against the children on a shared machine
        torch.set_num_threads(1)
    try:
        results = run_items(items, ctx, on_result=record)
    finally:
        torch.set_num_threads(threads)
    final = {
        **report(results, meta),
        "wall_seconds": round(time.perf_counter() - started, 2),
        "finished": True,
    }
    write_json(json_path, final)
    print()
    print(table(results))
    for r in results:
        if r.status == "failed":
            print(f"\n{r.name} failed:\n{r.error}")
    verdict = "PASSED" if final["ok"] else "FAILED"
    print(f"\n{verdict}: {final['counts']['passed']} passed, {final['counts']['failed']} failed, "
          f"{final['counts']['skipped']} skipped in {final['wall_seconds']:.0f} s; wrote {json_path}")  # fmt: skip
    return exit_code(results)
