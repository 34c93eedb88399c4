"""People segmentation model: one full-image UNet pass per image, RoIAlign, hierarchical ROI head.

The UNet (smp, encoder by name) turns each image into per-pixel features once; RoIAlign crops those
features and the normalised RGB for every ROI; `RoiHierarchicalHead` predicts background/foreground, then
target/non-target gated by the foreground probability, and combines them into 3-class logits
(0 background, 1 the ROI's own person, 2 other people).
"""

from __future__ import annotations

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from kdlab.config.schema import ModelConfig
from kdlab.data.roi_masks import expand_rois
from kdlab.models.encoder_weights import (
    check_weights_name,
    is_weights_name,
    load_encoder_weights,
    smp_weights_argument,
    with_smp_download,
)


def _conv_block(in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    """3x3 conv + GroupNorm + ReLU; GroupNorm because the ROI count per batch varies (and may be 0)."""
    groups = 8 if out_ch % 8 == 0 else 1
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.GroupNorm(groups, out_ch),
        nn.ReLU(inplace=True),
    )


def box_coordinates(height: int, width: int, margin: float = 0.0) -> torch.Tensor:
    """[1,2,h,w] (x, y) of each RoIAlign sample relative to the person's box: -1 and +1 at its edges.

    With a context `margin` (the window is the box grown by margin x its size on every side) the window's
    samples reach +-(1 + 2*margin), so the head still knows where the box itself ends.
    """
    extent = 1.0 + 2.0 * margin
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) / height * 2.0 - 1.0
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) / width * 2.0 - 1.0
    grid_y, grid_x = torch.meshgrid(ys * extent, xs * extent, indexing="ij")
    return torch.stack([grid_x, grid_y]).unsqueeze(0)


def _with_coords(x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, coords.to(x.dtype).expand(x.shape[0], -1, -1, -1)], dim=1)


class RoiContextEncoder(nn.Module):
    """Encoder-decoder over one ROI crop whose receptive field is the whole ROI, whatever its size.

    `depth` stride-2 stages shrink the crop (32x24 -> 4x3 at depth 3); at the bottom a global-average-pooled
    context vector is added to every position, so each output pixel has seen the entire box. The decoder
    climbs back with skip connections to the crop resolution. Input: features + RGB + 2 box coordinates.
    """

    def __init__(self, in_channels: int, channels: int, depth: int) -> None:
        super().__init__()
        self.stem = _conv_block(in_channels, channels)
        self.down = nn.ModuleList(_conv_block(channels, channels, stride=2) for _ in range(depth))
        self.context = nn.Sequential(nn.Linear(channels, channels), nn.ReLU(inplace=True))
        self.up = nn.ModuleList(_conv_block(2 * channels, channels) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        skips = []
        for down in self.down:
            skips.append(x)
            x = down(x)
        x = x + self.context(x.mean(dim=(2, 3)))[:, :, None, None]
        for up, skip in zip(self.up, reversed(skips), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = up(torch.cat([x, skip], dim=1))
        return x


def combine_hierarchy(bg_fg_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """3-class log-probabilities log p(bg), log p(fg) + log p(target|fg), log p(fg) + log p(other|fg)."""
    log_bg_fg = F.log_softmax(bg_fg_logits.float(), dim=1)
    log_target = F.log_softmax(target_logits.float(), dim=1)
    return torch.cat(
        [log_bg_fg[:, :1], log_bg_fg[:, 1:] + log_target[:, :1], log_bg_fg[:, 1:] + log_target[:, 1:]], dim=1
    )


class RoiHierarchicalHead(nn.Module):
    """The seed's small per-ROI head ('basic'): three 3x3 convs of context, no box coordinates.

    Shared features -> bg/fg logits -> fg-gated target/non-target logits -> 3 classes (`combine_hierarchy`).
    Kept for comparison and old checkpoints; it sees ~7 px around a pixel, so it learns "other" slowly.
    """

    def __init__(self, in_channels: int, head_channels: int, mask_size: tuple[int, int]) -> None:
        super().__init__()
        self.mask_size = tuple(mask_size)
        self.shared = nn.Sequential(
            _conv_block(in_channels, head_channels), _conv_block(head_channels, head_channels)
        )
        self.refine = _conv_block(head_channels, head_channels)
        self.bg_fg = nn.Conv2d(head_channels, 2, 1)
        self.target = nn.Sequential(
            _conv_block(head_channels + 1, head_channels), nn.Conv2d(head_channels, 2, 1)
        )

    def forward(self, roi_inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.shared(roi_inputs)
        if tuple(x.shape[-2:]) != self.mask_size:
            x = F.interpolate(x, size=self.mask_size, mode="bilinear", align_corners=False)
        shared_features = self.refine(x)
        bg_fg_logits = self.bg_fg(shared_features)
        p_fg = bg_fg_logits.softmax(dim=1)[:, 1:2]
        target_logits = self.target(torch.cat([shared_features * p_fg, p_fg], dim=1))
        return {
            "logits": combine_hierarchy(bg_fg_logits, target_logits),
            "bg_fg_logits": bg_fg_logits,
            "target_logits": target_logits,
            "features": shared_features,
        }


class RoiContextHead(nn.Module):
    """Per-ROI head that can tell whose ROI it is ('context', the default).

    - `shared`: a `RoiContextEncoder` over features + RGB + box coordinates (receptive field = whole ROI);
    - upsampled to the mask size and refined, with the coordinates again, into `features`;
    - bg/fg logits; target/non-target logits from fg-gated features, p(fg) and the coordinates through a
      dilated branch; 3-class logits by `combine_hierarchy`.
    - with `instance_cues`, also `distance` ([N,1,h,w], the target's normalised distance transform, a
      regression) and `contour_logits` ([N,1,h,w], the target's boundary), trained by their aux losses.
    """

    def __init__(
        self,
        in_channels: int,
        head_channels: int,
        roi_size: tuple[int, int],
        mask_size: tuple[int, int],
        depth: int = 3,
        margin: float = 0.0,
        instance_cues: bool = False,
    ) -> None:
        super().__init__()
        self.mask_size = tuple(mask_size)
        c = head_channels
        self.register_buffer("roi_coords", box_coordinates(*roi_size, margin), persistent=False)
        self.register_buffer("mask_coords", box_coordinates(*mask_size, margin), persistent=False)
        self.shared = RoiContextEncoder(in_channels + 2, c, depth)
        self.refine = _conv_block(c + 2, c)
        self.bg_fg = nn.Conv2d(c, 2, 1)
        self.target = nn.Sequential(_conv_block(c + 3, c), _conv_block(c, c, dilation=2), nn.Conv2d(c, 2, 1))
        self.instance_cues = instance_cues
        if instance_cues:
            self.distance = nn.Conv2d(c, 1, 1)
            self.contour = nn.Conv2d(c, 1, 1)

    def forward(self, roi_inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.shared(_with_coords(roi_inputs, self.roi_coords))
        if tuple(x.shape[-2:]) != self.mask_size:
            x = F.interpolate(x, size=self.mask_size, mode="bilinear", align_corners=False)
        features = self.refine(_with_coords(x, self.mask_coords))
        bg_fg_logits = self.bg_fg(features)
        p_fg = bg_fg_logits.softmax(dim=1)[:, 1:2]
        target_logits = self.target(_with_coords(torch.cat([features * p_fg, p_fg], dim=1), self.mask_coords))
        out = {
            "logits": combine_hierarchy(bg_fg_logits, target_logits),
            "bg_fg_logits": bg_fg_logits,
            "target_logits": target_logits,
            "features": features,
        }
        if self.instance_cues:
            out["distance"] = self.distance(features)
            out["contour_logits"] = self.contour(features)
        return out


def build_head(cfg: ModelConfig) -> nn.Module:
    """The ROI head named by `model.head` over the UNet's features + the ROI's RGB."""
    in_channels = cfg.feature_channels + 3
    if cfg.head == "basic":
        return RoiHierarchicalHead(in_channels, cfg.head_channels, cfg.mask_size)
    return RoiContextHead(
        in_channels, cfg.head_channels, cfg.roi_size, cfg.mask_size,
        depth=cfg.head_depth, margin=cfg.roi_margin, instance_cues=cfg.instance_cues,
    )  # fmt: skip


# Modules some smp encoders keep from their classifier although the UNet never runs them (timm-efficientnet:
# conv_head + bn2). They stay in the state dict (parameter counts match smp) but get no gradient.
UNUSED_ENCODER_MODULES = ("conv_head", "bn2")


def freeze_unused_encoder_head(encoder: nn.Module) -> None:
    """Mark the encoder's never-used classifier-head parameters as frozen: the optimizer then skips them and
    DistributedDataParallel does not wait for gradients that never come."""
    for name in UNUSED_ENCODER_MODULES:
        module = getattr(encoder, name, None)
        if isinstance(module, nn.Module):
            module.requires_grad_(False)


class RoiUNet(nn.Module):
    """Full-image UNet + RoIAlign + `RoiHierarchicalHead`.

    forward(images [B,3,H,W] in [0,1], rois [N,5] = (batch_index, x1, y1, x2, y2) in input pixels)
    -> dict with "logits" [N,3,mask_h,mask_w], "bg_fg_logits", "target_logits", "features".
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.roi_size = tuple(cfg.roi_size)
        self.sampling_ratio = cfg.roi_sampling_ratio
        self.unet = build_unet(cfg)
        self.register_buffer("input_mean", torch.tensor(cfg.input_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(cfg.input_std).view(1, 3, 1, 1), persistent=False)
        self.roi_margin = cfg.roi_margin
        self.head = build_head(cfg)
        if cfg.encoder_weights and not is_weights_name(cfg.encoder_weights):
            load_encoder_weights(self.unet.encoder, cfg.encoder_weights, cfg.encoder)
        freeze_unused_encoder_head(self.unet.encoder)

    def forward(self, images: torch.Tensor, rois: torch.Tensor) -> dict[str, torch.Tensor]:
        x = (images - self.input_mean) / self.input_std
        features = self.unet(x)  # one pass per image, [B, F, H, W] at input resolution
        # Box coordinates stay float32: in bf16 a coordinate near 640 is only accurate to ~4 px.
        rois = expand_rois(rois.float(), self.roi_margin)
        roi_features = roi_align(
            features.float(), rois, self.roi_size, 1.0, self.sampling_ratio, aligned=True
        )
        roi_rgb = roi_align(x.float(), rois, self.roi_size, 1.0, self.sampling_ratio, aligned=True)
        return self.head(torch.cat([roi_features, roi_rgb], dim=1))


def build_unet(cfg: ModelConfig) -> smp.Unet:
    """The full-image smp Unet; a weights name smp knows (`model.encoder_weights: imagenet`) is fetched by smp
    itself (its Hugging Face cache), a local file is loaded afterwards by the caller."""
    name = cfg.encoder_weights if is_weights_name(cfg.encoder_weights) else None
    if name is not None:
        check_weights_name(cfg.encoder, name)

    def build() -> smp.Unet:
        return smp.Unet(
            encoder_name=cfg.encoder,
            encoder_weights=smp_weights_argument(cfg.encoder, name) if name is not None else None,
            decoder_channels=list(cfg.decoder_channels),
            classes=cfg.feature_channels,
        )

    return with_smp_download(cfg.encoder, name, build) if name is not None else build()


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
