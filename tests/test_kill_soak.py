"""Smoke test of scripts/kill_soak.py (the kill soak itself is not run in CI; docs/reliability.md, "Kill soak"):
two SIGKILLs on a tiny config, each resumed with --resume auto, end bit-identical to the uninterrupted run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import tiny_args

ROOT = Path(__file__).resolve().parents[1]


def test_kill_soak_two_kills_on_a_tiny_run(tmp_path):
    args = tiny_args(
        tmp_path, "training.checkpoint_every_steps=1", "training.num_vis_images=0", "training.save_every=100"
    )
    for flag in ("--config", "--output_dir"):  # the soak sets both
        i = args.index(flag)
        del args[i : i + 2]
    sets = args[args.index("--set") + 1 :]
    flags = args[: args.index("--set")]
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "kill_soak.py"), "--workdir", str(tmp_path / "soak"),
         "--config", "quickstart_baseline", "--kills", "2", "--seed", "7", "--json", str(out),
         "--set", *sets, "--", *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["seed"] == 7 and "seed 7" in proc.stdout
    assert result["kills_delivered"] == result["kills_survived"] == 2
    assert result["resumes"] == 2  # after each kill, the second one running to the end
    assert result["bit_identical"] and result["first_differing_tensor"] is None
    assert result["unreadable_checkpoints"] == [] and result["checkpoint_loads"] > 0
    assert result["child_threads"] == {"reference": 1, "killed": 1}
    assert [k["kind"] for k in result["kills"]].count("write") == 1
