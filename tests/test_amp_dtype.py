"""training.amp resolution: `auto` takes bf16 only where the GPU runs it natively (fp16 + grad scaler on V100/T4,
whose bf16 is emulated), and `fp16` on the CPU is refused instead of silently becoming bf16. No GPU needed:
torch.cuda's capability queries are faked."""

from __future__ import annotations

import pytest
import torch

from kdlab.engine.device import resolve_amp_dtype
from kdlab.errors import ConfigError

CUDA = torch.device("cuda", 0)


def _gpu(monkeypatch, capability: tuple[int, int], emulated_bf16: bool = True, keyword: bool = True) -> None:
    """A GPU of this compute capability; torch's bf16 query counts emulation unless told not to (torch >= 2.4),
    or, with keyword=False, an older torch whose query has no `including_emulation` and answers True."""
    native = capability[0] >= 8

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return native or (including_emulation and emulated_bf16)

    def old_is_bf16_supported() -> bool:
        return native or emulated_bf16

    monkeypatch.setattr(
        torch.cuda, "is_bf16_supported", is_bf16_supported if keyword else old_is_bf16_supported
    )
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


@pytest.mark.parametrize("keyword", [True, False])
def test_auto_on_a_v100_takes_fp16_not_emulated_bf16(monkeypatch, keyword):
    _gpu(monkeypatch, (7, 0), keyword=keyword)
    assert resolve_amp_dtype("auto", CUDA) == torch.float16  # and so the trainer's GradScaler is on


@pytest.mark.parametrize("keyword", [True, False])
@pytest.mark.parametrize("capability", [(8, 0), (9, 0)])
def test_auto_on_an_a100_or_h100_takes_bf16(monkeypatch, capability, keyword):
    _gpu(monkeypatch, capability, keyword=keyword)
    assert resolve_amp_dtype("auto", CUDA) == torch.bfloat16


def test_explicit_choices_on_cuda_are_kept(monkeypatch):
    _gpu(monkeypatch, (7, 5))
    assert resolve_amp_dtype("fp16", CUDA) == torch.float16
    assert resolve_amp_dtype("bf16", CUDA) == torch.bfloat16
    assert resolve_amp_dtype("off", CUDA) is None


def test_fp16_on_cpu_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match=r"training\.amp=fp16 needs a CUDA device") as err:
        resolve_amp_dtype("fp16", torch.device("cpu"))
    assert "\n" not in str(err.value) and "training.amp=bf16" in str(err.value)


def test_cpu_choices_other_than_fp16_are_unchanged():
    cpu = torch.device("cpu")
    assert resolve_amp_dtype("auto", cpu) is None
    assert resolve_amp_dtype("off", cpu) is None
    assert resolve_amp_dtype("bf16", cpu) == torch.bfloat16


def test_train_cli_with_fp16_on_cpu_exits_2_with_one_line_before_writing(tmp_path, capsys):
    from kdlab.cli.common import run_cli
    from kdlab.cli.train import main as train_main
    from tests.helpers import error_lines, tiny_args

    code = run_cli(train_main, tiny_args(tmp_path, "training.amp=fp16", epochs=1))
    lines = error_lines(capsys.readouterr().err)
    assert code == 2 and len(lines) == 1 and "training.amp=fp16 needs a CUDA device" in lines[0]
    assert not (tmp_path / "runs").exists()
