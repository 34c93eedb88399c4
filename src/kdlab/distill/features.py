"""Feature matching for distillation: tap named layers of student and teacher, adapt, compare by MSE.

Layers are named by module path strings ('head.shared', 'unet.decoder.blocks.3') resolved on the unwrapped
model, so DDP- or torch.compile-wrapped models take the same names as the bare ones. A path may end in a
selector for modules whose output is a container: 'unet.encoder[-1]' (an index into the list of encoder
maps) or 'head[features]' (a key of a dict output).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kdlab.distill.losses import feature_mse_loss
from kdlab.distill.mgd import MGDGenerator, mask_rng, random_keep_mask
from kdlab.errors import ConfigError

_PATH_RE = re.compile(r"^(?P<module>[^\[\]]*)(?:\[(?P<selector>[^\[\]]+)\])?$")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DDP (`.module`) and torch.compile (`._orig_mod`) wrappers, unwrapped recursively."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
            continue
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        return model


def parse_tap_path(path: str) -> tuple[str, int | str | None]:
    """Split 'a.b[sel]' into ('a.b', sel): an int index for lists/tuples, a str key for dicts, or None."""
    match = _PATH_RE.match(path.strip())
    if match is None:
        raise ConfigError(
            f"feature layer path '{path}' is malformed; use a dotted module path with an optional "
            "selector, e.g. 'unet.decoder' or 'unet.encoder[-1]'"
        )
    selector_text = match.group("selector")
    selector: int | str | None = None
    if selector_text is not None:
        selector_text = selector_text.strip().strip("'\"")
        try:
            selector = int(selector_text)
        except ValueError:
            selector = selector_text
    return match.group("module").strip(), selector


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    """The module at a dotted path on the unwrapped model (a trailing '[selector]' is allowed and ignored).

    Unknown paths raise ConfigError naming the closest valid module names, so typos in configs fail early.
    """
    module_path, _ = parse_tap_path(path)
    base = unwrap_model(model)
    modules = dict(base.named_modules())
    if module_path in modules:
        return modules[module_path]
    close = difflib.get_close_matches(module_path, [n for n in modules if n], n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ConfigError(f"feature layer path '{path}' is not a module of {type(base).__name__}{hint}")


def _select_tensor(output: Any, selector: int | str | None, path: str) -> torch.Tensor:
    """The tensor a hook records: the output itself, the selected element, or the first tensor inside."""
    if isinstance(output, torch.Tensor):
        if selector is not None:
            raise ConfigError(f"feature layer path '{path}' has a selector but the layer returns one tensor")
        return output
    if selector is not None:
        try:
            chosen = output[selector]
        except (IndexError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"feature layer path '{path}': selector {selector!r} does not fit the layer's "
                f"{type(output).__name__} output ({exc})"
            ) from exc
        return _select_tensor(chosen, None, path)
    values = (
        output.values() if isinstance(output, dict) else output if isinstance(output, list | tuple) else ()
    )
    for item in values:
        if isinstance(item, torch.Tensor):
            return item
    raise ConfigError(f"feature layer path '{path}' returns {type(output).__name__}, which holds no tensor")


class FeatureTap:
    """Forward hooks that keep the latest output of named modules in `features` (path -> tensor).

    Student taps keep the autograd graph so a feature loss trains the student; `detach=True` (teacher side)
    stores detached tensors so no teacher graph is kept alive. Usable as a context manager.
    """

    def __init__(self, model: nn.Module, paths: list[str], detach: bool = False) -> None:
        self.paths = list(paths)
        self.detach = detach
        self.features: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        for path in self.paths:
            module = resolve_module(model, path)
            _, selector = parse_tap_path(path)
            self._handles.append(module.register_forward_hook(self._make_hook(path, selector)))

    def _make_hook(self, path: str, selector: int | str | None) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            tensor = _select_tensor(output, selector, path)
            self.features[path] = tensor.detach() if self.detach else tensor

        return hook

    def clear(self) -> None:
        """Drop the stored features (and the graph they hold)."""
        self.features.clear()

    def close(self) -> None:
        """Remove the hooks and drop stored features; later forward passes record nothing."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def __enter__(self) -> FeatureTap:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class FeatureAdapter(nn.Module):
    """Maps a student feature [N,Cs,Hs,Ws] to the teacher's [N,Ct,Ht,Wt]: 1x1 conv if Cs != Ct, then
    bilinear resize if sizes differ.

    Adapters train with the student but belong to the distillation setup, not to the saved student model.
    """

    def __init__(self, student_channels: int, teacher_channels: int) -> None:
        super().__init__()
        self.student_channels = student_channels
        self.teacher_channels = teacher_channels
        self.proj: nn.Module = (
            nn.Conv2d(student_channels, teacher_channels, 1, bias=False)
            if student_channels != teacher_channels
            else nn.Identity()
        )

    def forward(self, student: torch.Tensor, teacher_size: Sequence[int] | None = None) -> torch.Tensor:
        if student.dim() != 4:
            raise ValueError(f"FeatureAdapter expects [N,C,H,W] features, got shape {tuple(student.shape)}")
        x = self.proj(student)
        if teacher_size is not None and tuple(x.shape[-2:]) != tuple(teacher_size):
            x = F.interpolate(x, size=tuple(teacher_size), mode="bilinear", align_corners=False)
        return x


def _restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    for module, training in modes:
        module.train(training)


class FeatureDistiller(nn.Module):
    """Feature distillation between tapped student and teacher layers: MSE, or MGD on chosen pairs.

    pairs: (student_path, teacher_path, weight). `mgd` maps a pair's index to its mask ratio: that pair is
    distilled by masked generation (`kdlab.distill.mgd`): its adapted student feature is masked and passed
    through a generator before the MSE. Call `infer_channels` once (a dry forward pass) before building the
    optimizer: it creates one `FeatureAdapter` per pair (and one `MGDGenerator` per MGD pair), whose
    parameters `.parameters()` yields. After both models ran forward, `loss()` returns the weighted sum of
    per-pair MSE terms (mean over all elements, computed in float32) and the terms keyed 'distill_feat_<i>'
    ('distill_mgd_<i>' for MGD pairs). Teacher features are constants (detached; inference-mode tensors are
    cloned so autograd may save them). `seed` and `step` (set by the KD task before each student forward)
    seed the MGD masks.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        pairs: Sequence[tuple[str, str, float]],
        mgd: dict[int, float] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not pairs:
            raise ConfigError("feature distillation needs at least one (student_layer, teacher_layer) pair")
        self.pairs = [(str(s), str(t), float(w)) for s, t, w in pairs]
        for s_path, t_path, weight in self.pairs:
            if weight < 0:
                raise ConfigError(f"feature pair ('{s_path}', '{t_path}') has negative weight {weight}")
        self.mgd = {int(i): float(r) for i, r in (mgd or {}).items()}
        for i, ratio in self.mgd.items():
            if not 0 <= i < len(self.pairs) or not 0.0 <= ratio < 1.0:
                raise ConfigError(
                    f"MGD pair {i} with mask ratio {ratio}: needs a pair index and 0 <= ratio < 1"
                )
        self.seed = int(seed)
        self.step = 0
        self.generators = nn.ModuleDict()
        # Taps are plain objects, so the student and teacher do not become submodules of the distiller.
        self.student_tap = FeatureTap(student, _unique(s for s, _, _ in self.pairs))
        self.teacher_tap = FeatureTap(teacher, _unique(t for _, t, _ in self.pairs), detach=True)
        self.adapters = nn.ModuleList()
        self._adapted: list[torch.Tensor] | None = None

    @property
    def ready(self) -> bool:
        return len(self.adapters) == len(self.pairs) and len(self.generators) == len(self.mgd)

    def term_name(self, i: int) -> str:
        return f"distill_mgd_{i}" if i in self.mgd else f"distill_feat_{i}"

    @torch.no_grad()
    def infer_channels(
        self,
        student: nn.Module,
        teacher: nn.Module,
        example_images: torch.Tensor,
        example_rois: torch.Tensor | None = None,
    ) -> None:
        """Run both models once (no grad, eval mode, modes restored after) and build the adapters.

        The models are called as `model(images, rois)`, or `model(images)` when `example_rois` is None
        (classifiers).

        Eval mode keeps the dry pass from touching BatchNorm running statistics. Adapters are created on the
        device of the student features. Calling it again is a no-op when the channel counts still match.
        """
        modes = [(m, m.training) for m in (*student.modules(), *teacher.modules())]
        try:
            student.eval()
            teacher.eval()
            inputs = (example_images,) if example_rois is None else (example_images, example_rois)
            student(*inputs)
            teacher(*inputs)
            shapes: list[tuple[torch.Tensor, torch.Tensor]] = [
                (self._feature(self.student_tap, s, "student"), self._feature(self.teacher_tap, t, "teacher"))
                for s, t, _ in self.pairs
            ]
        finally:
            _restore_modes(modes)
            self.clear()
        channels: list[tuple[int, int, torch.device]] = []
        for (s_path, t_path, _), (s_feat, t_feat) in zip(self.pairs, shapes, strict=True):
            for side, path, feat in (("student", s_path, s_feat), ("teacher", t_path, t_feat)):
                if feat.dim() != 4:
                    raise ConfigError(
                        f"{side} feature layer '{path}' gives shape {tuple(feat.shape)}; feature distillation "
                        "needs [N,C,H,W] maps"
                    )
            channels.append((int(s_feat.shape[1]), int(t_feat.shape[1]), s_feat.device))
        wanted = [(s, t) for s, t, _ in channels]
        if self.ready:
            known = [(int(a.student_channels), int(a.teacher_channels)) for a in self.adapters]
            if known != wanted:
                raise RuntimeError(f"feature channels changed since adapters were built: {known} -> {wanted}")
            return
        self.adapters = nn.ModuleList(FeatureAdapter(s, t).to(device) for s, t, device in channels)
        self.generators = nn.ModuleDict(
            {str(i): MGDGenerator(channels[i][1]).to(channels[i][2]) for i in sorted(self.mgd)}
        )

    @staticmethod
    def _feature(tap: FeatureTap, path: str, side: str) -> torch.Tensor:
        if path not in tap.features:
            raise RuntimeError(
                f"no {side} feature recorded for '{path}'; run the {side} forward pass before the feature loss"
            )
        return tap.features[path]

    def _pair_features(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s_path, t_path, _ = self.pairs[i]
        student = self._feature(self.student_tap, s_path, "student")
        teacher = self._feature(self.teacher_tap, t_path, "teacher").detach()
        if teacher.is_inference():
            teacher = teacher.clone()  # outside inference mode this gives a normal tensor
        return student, teacher

    def adapt(self) -> None:
        """Apply the adapters to the student features just recorded (the teacher's ran first and fix the
        sizes). Called inside the trained module's forward (`StudentWithAdapters`), so under DDP the adapters
        are part of the wrapped module; `loss()` then compares. Skipped when no teacher feature is recorded
        (a forward pass outside a distillation step)."""
        if not self.ready or any(t not in self.teacher_tap.features for _, t, _ in self.pairs):
            return
        self._adapted = [self._adapt_pair(i) for i in range(len(self.pairs))]

    def _adapt_pair(self, i: int) -> torch.Tensor:
        """Pair i's student feature as compared with the teacher's: adapted, and for MGD masked then
        regenerated (masks seeded by seed, step, rank and pair: see `kdlab.distill.mgd`)."""
        student, teacher = self._pair_features(i)
        adapted = self.adapters[i](student, teacher.shape[-2:])
        if i not in self.mgd:
            return adapted
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        rng = mask_rng(self.seed, self.step, rank * 4096 + i, adapted.device)
        keep = random_keep_mask(adapted, self.mgd[i], rng)
        return self.generators[str(i)](adapted * keep)

    def loss(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted sum of feature MSE terms and the terms by name; consumes (clears) the stored features.

        Uses the features `adapt()` produced in this step's forward, or adapts now when it was not called.
        Clearing makes a skipped teacher forward (e.g. cached teacher outputs) an error instead of a silent
        comparison against stale features.
        """
        if not self.ready:
            raise RuntimeError("FeatureDistiller.infer_channels must be called once before loss()")
        adapted_now = self._adapted
        try:
            total: torch.Tensor | None = None
            parts: dict[str, torch.Tensor] = {}
            for i, (s_path, t_path, weight) in enumerate(self.pairs):
                _, teacher = self._pair_features(i)
                adapted = adapted_now[i] if adapted_now is not None else self._adapt_pair(i)
                if adapted.shape != teacher.shape:
                    raise RuntimeError(
                        f"feature pair {i} ('{s_path}' -> '{t_path}'): adapted student shape "
                        f"{tuple(adapted.shape)} != teacher shape {tuple(teacher.shape)}"
                    )
                term = feature_mse_loss(adapted, teacher)  # graph-connected 0 for an empty batch (0 ROIs)
                parts[self.term_name(i)] = term
                total = weight * term if total is None else total + weight * term
        finally:
            self.clear()
        assert total is not None
        return total, parts

    def clear(self) -> None:
        """Drop features stored by both taps (and their adapted versions)."""
        self._adapted: list[torch.Tensor] | None = None
        self.student_tap.clear()
        self.teacher_tap.clear()

    def close(self) -> None:
        """Remove all hooks from both models."""
        self.student_tap.close()
        self.teacher_tap.close()


def _unique(paths: Any) -> list[str]:
    return list(dict.fromkeys(paths))
