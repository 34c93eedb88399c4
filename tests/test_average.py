"""Weight averaging of a run's top-k checkpoints (`python -m kdlab.average`): the mean, the refusals, the run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from kdlab.checkpoints import save_checkpoint_atomic
from kdlab.cli.average import main as average_main
from kdlab.cli.common import run_cli
from kdlab.cli.train import main as train_main
from kdlab.experiments.average import average_checkpoints, average_state_dicts, top_k_checkpoints
from kdlab.tasks import task_of
from tests.helpers import error_lines, tiny_args, weights

CONFIG = {"task": "classification", "training": {"epochs": 3, "lr": 0.1}}


def _payload(state: dict[str, torch.Tensor], config: dict | None = None, epoch: int = 1) -> dict:
    return {"format": "kdlab-checkpoint-v1", "model_state_dict": state, "config": config or CONFIG,
            "epoch": epoch, "metrics": {"top1": 0.5}, "best_metric": 0.5}  # fmt: skip


def _state(w: list[float], steps: int = 7) -> dict[str, torch.Tensor]:
    return {"fc.weight": torch.tensor(w), "bn.num_batches_tracked": torch.tensor(steps)}


def _write_run(tmp_path: Path, *payloads: dict) -> Path:
    ckpt = tmp_path / "run" / "checkpoints"
    ckpt.mkdir(parents=True)
    for i, payload in enumerate(payloads):
        name = "best_model.pth" if i == 0 else f"best_model_top{i + 1}.pth"
        save_checkpoint_atomic(payload, ckpt / name)
    return tmp_path / "run"


def test_averaging_identical_states_returns_the_same_weights():
    torch.manual_seed(0)
    state = {"w": torch.randn(3, 5), "b": torch.randn(5).half(), "n": torch.tensor(4)}
    out = average_state_dicts([state, {k: v.clone() for k, v in state.items()}])
    assert out.keys() == state.keys()
    for key in state:
        assert out[key].dtype == state[key].dtype and torch.equal(out[key], state[key]), key


def test_averaging_known_tensors_gives_their_mean_and_the_best_models_counters():
    out = average_state_dicts(
        [_state([1.0, 2.0], steps=9), _state([3.0, 6.0], steps=2), _state([2.0, 1.0], 5)]
    )
    assert torch.equal(out["fc.weight"], torch.tensor([2.0, 3.0]))
    assert out["bn.num_batches_tracked"].item() == 9  # integer buffers: the first (best) checkpoint's


def test_top_k_files_are_found_in_rank_order(tmp_path):
    run = _write_run(tmp_path, *[_payload(_state([float(i)])) for i in range(3)])
    save_checkpoint_atomic(_payload(_state([9.0])), run / "checkpoints" / "best_model_top10.pth")
    names = [p.name for p in top_k_checkpoints(run / "checkpoints")]
    assert names == ["best_model.pth", "best_model_top2.pth", "best_model_top3.pth", "best_model_top10.pth"]


def test_averaged_payload_is_a_best_model_payload_with_its_sources(tmp_path):
    run = _write_run(tmp_path, _payload(_state([1.0, 2.0]), epoch=5), _payload(_state([1.0, 2.0]), epoch=3))
    payload = average_checkpoints(top_k_checkpoints(run / "checkpoints"))
    assert set(payload) == {"format", "model_state_dict", "config", "epoch", "metrics", "best_metric",
                            "averaged_from"}  # fmt: skip
    assert payload["averaged_from"] == ["best_model.pth", "best_model_top2.pth"]
    assert payload["epoch"] == 5 and payload["config"] == CONFIG
    assert torch.equal(payload["model_state_dict"]["fc.weight"], torch.tensor([1.0, 2.0]))


def test_a_resumed_run_with_more_epochs_still_averages(tmp_path):
    longer = {**CONFIG, "training": {**CONFIG["training"], "epochs": 9}}
    run = _write_run(tmp_path, _payload(_state([1.0, 2.0]), longer), _payload(_state([3.0, 4.0])))
    payload = average_checkpoints(top_k_checkpoints(run / "checkpoints"))
    assert torch.equal(payload["model_state_dict"]["fc.weight"], torch.tensor([2.0, 3.0]))


@pytest.mark.parametrize(
    ("other", "words"),
    [
        (_payload(_state([1.0, 2.0, 3.0])), "fc.weight is (3,)"),
        (
            _payload({"fc.bias": torch.tensor([1.0, 2.0]), "bn.num_batches_tracked": torch.tensor(1)}),
            "other keys",
        ),
        (_payload(_state([1.0, 2.0]), {**CONFIG, "training": {"epochs": 3, "lr": 0.5}}), "different configs"),
    ],
    ids=["shape", "keys", "config"],
)
def test_mismatched_checkpoints_are_one_error_line_exit_2(tmp_path, capsys, other, words):
    run = _write_run(tmp_path, _payload(_state([1.0, 2.0])), other)
    assert run_cli(average_main, [str(run), "--no_eval"]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "best_model_top2.pth" in lines[0] and words in lines[0], lines
    assert not (run / "checkpoints" / "averaged_model.pth").exists()


@pytest.mark.parametrize(
    ("setup", "words"),
    [("missing_run", "does not exist"), ("only_best", "nothing to average"), ("no_best", "best_model.pth")],
)
def test_a_run_with_nothing_to_average_is_one_error_line(tmp_path, capsys, setup, words):
    run = tmp_path / "run"
    if setup == "only_best":
        run = _write_run(tmp_path, _payload(_state([1.0])))
    elif setup == "no_best":
        (run / "checkpoints").mkdir(parents=True)
    assert run_cli(average_main, [str(run)]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and words in lines[0], lines


def test_averaging_a_trained_run_writes_and_evaluates_the_average(tmp_path, capsys):
    assert run_cli(train_main, tiny_args(tmp_path)) == 0
    run = tmp_path / "runs" / "quickstart_baseline"
    ckpt = run / "checkpoints"
    best = torch.load(ckpt / "best_model.pth", map_location="cpu", weights_only=True)
    perturbed = {k: (v + 0.01 * torch.randn_like(v)) if torch.is_floating_point(v) else v
                 for k, v in best["model_state_dict"].items()}  # fmt: skip
    save_checkpoint_atomic({**best, "model_state_dict": perturbed}, ckpt / "best_model_top2.pth")
    capsys.readouterr()

    assert run_cli(average_main, [str(run), "--device", "cpu", "--no_progress"]) == 0
    out = capsys.readouterr().out
    averaged = weights(ckpt / "averaged_model.pth")
    for key, value in best["model_state_dict"].items():
        if torch.is_floating_point(value):
            assert torch.allclose(averaged[key], (value + perturbed[key]) / 2, atol=1e-6), key
        else:
            assert torch.equal(averaged[key], value), key
    payload = torch.load(ckpt / "averaged_model.pth", map_location="cpu", weights_only=True)
    assert payload["averaged_from"] == ["best_model.pth", "best_model_top2.pth"]
    result = json.loads((ckpt / "averaged_model.json").read_text())
    metric = task_of(best["config"]).best_metric  # the metric best_model.pth was picked by
    assert result["metric"] == metric and 0.0 <= result["metrics"][metric] <= 1.0
    assert result["metrics"] == payload["metrics"] and payload["best_metric"] == result["metrics"][metric]
    assert result["best_model_metrics"] == pytest.approx(best["metrics"])
    assert metric in out and "best_model" in out and "averaged" in out

    # --out elsewhere, --no_eval: only the weights, no metrics file; the run's checkpoints untouched
    other = tmp_path / "elsewhere.pth"
    shutil.copy2(ckpt / "best_model.pth", tmp_path / "best_copy.pth")
    assert run_cli(average_main, [str(run), "--out", str(other), "--no_eval"]) == 0
    assert other.is_file() and not other.with_suffix(".json").exists()
    assert weights(other).keys() == averaged.keys()
    assert (ckpt / "best_model.pth").read_bytes() == (tmp_path / "best_copy.pth").read_bytes()
