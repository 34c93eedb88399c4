"""The experiment configuration schema (pydantic).

Every section forbids unknown keys, so a typo fails before anything runs. Defaults are the seed's
people-segmentation sizes (640x640 input, ROI 80x60, mask 160x120, H x W). `task` selects what is trained
("segmentation": the ROI UNet; "classification": a timm image classifier named by `model.name`; "sequence": a
GRU over [T, D_in] sequences, `model.name` = "gru").
"""

from __future__ import annotations

import difflib
from functools import cache
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

PositiveSize = tuple[int, int]
TaskName = Literal["segmentation", "classification", "sequence"]
SEGMENTATION_MODEL = "roi_unet"
SEQUENCE_MODEL = "gru"


@cache
def timm_model_names() -> frozenset[str]:
    """Every architecture name timm can build (imported lazily: segmentation configs never pay for it)."""
    import timm

    return frozenset(timm.list_models())


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_size(value: tuple[int, int], what: str) -> tuple[int, int]:
    if any(v <= 0 for v in value):
        raise ValueError(f"{what} must be two positive integers (height, width), got {list(value)}")
    return value


class ModelConfig(_Section):
    """Segmentation: full-image UNet + RoIAlign + hierarchical ROI head. Classification: a timm model.
    Sequence: a GRU (`hidden_size`, `num_layers`; input size = data.sequence.input_dim, outputs = num_classes)."""

    name: str = Field(
        SEGMENTATION_MODEL,
        description="'roi_unet' (task segmentation), a timm model name (task classification), e.g. resnet18, "
        "or 'gru' (task sequence)",
    )
    encoder: str = Field("timm-efficientnet-b3", description="smp encoder name, e.g. timm-efficientnet-b0")
    encoder_weights: str | None = Field(
        None,
        description="null (random init), a weights name smp has for the encoder (e.g. 'imagenet': smp downloads "
        "it into its Hugging Face cache) or a local weights file, e.g. one `kdlab-weights import` wrote "
        "(docs/data.md)",
    )
    encoder_weights_source: dict[str, str] | None = Field(
        None,
        description="written by kdlab when a run starts, not an input: where encoder_weights came from (smp's "
        "Hub repo and revision, or the file's path, sha256 and origin)",
    )
    decoder_channels: tuple[int, ...] = Field((256, 128, 64, 32, 16), description="smp UNet decoder widths")
    feature_channels: int = Field(16, gt=0, description="per-pixel feature channels the UNet outputs")
    roi_size: PositiveSize = Field((80, 60), description="RoIAlign crop size (H, W)")
    mask_size: PositiveSize = Field((160, 120), description="predicted mask size per ROI (H, W)")
    head_channels: int = Field(64, gt=0, description="width of the ROI head")
    head: Literal["context", "basic"] = Field(
        "context",
        description="ROI head: 'context' (encoder-decoder over the whole ROI + box coordinates) or 'basic' "
        "(the seed's three 3x3 convs; sees ~7 px, learns 'other people' slowly)",
    )
    head_depth: int = Field(3, ge=1, le=5, description="context head: stride-2 stages of its ROI encoder")
    roi_margin: float = Field(
        0.0, ge=0.0, le=1.0,
        description="context around each box, as a fraction of its size per side; the targets are built "
        "on the same enlarged window",
    )  # fmt: skip
    instance_cues: bool = Field(
        False,
        description="context head: add the distance-transform and contour outputs that "
        "training.loss.distance / training.loss.contour train",
    )
    roi_sampling_ratio: int = Field(2, ge=0, description="RoIAlign samples per bin (0 = adaptive)")
    input_mean: tuple[float, float, float] = Field(
        (0.485, 0.456, 0.406), description="normalisation inside the model; inputs stay in [0,1]"
    )
    input_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    num_classes: int = Field(
        10, ge=2, description="classification and sequence: number of classes (the data must match)"
    )
    weights: str | None = Field(
        None,
        description="classification: null (random init) or a local file of timm weights; never downloaded",
    )
    drop_rate: float = Field(0.0, ge=0.0, lt=1.0, description="classification: dropout before the classifier")
    hidden_size: int = Field(64, gt=0, description="sequence: GRU hidden state size H")
    num_layers: int = Field(1, gt=0, le=8, description="sequence: stacked GRU layers")

    @field_validator("roi_size", "mask_size")
    @classmethod
    def _positive(cls, v: tuple[int, int], info: ValidationInfo) -> tuple[int, int]:
        return _check_size(v, f"model.{info.field_name}")

    @field_validator("decoder_channels")
    @classmethod
    def _decoder(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if len(v) != 5 or any(c <= 0 for c in v):
            raise ValueError("model.decoder_channels must be 5 positive integers")
        return v

    @field_validator("input_std")
    @classmethod
    def _std(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(s <= 0 for s in v):
            raise ValueError("model.input_std values must be > 0")
        return v


class SyntheticDataConfig(_Section):
    """Generate a synthetic COCO people dataset on first use (quickstart, tests)."""

    root: str = Field(
        "data/generated/synthetic_people", description="where train/, val/ (and test/) are written"
    )
    train_images: int = Field(64, gt=0)
    val_images: int = Field(16, gt=0)
    test_images: int = Field(
        0,
        ge=0,
        description="held-out test images (0 = no test split); train/ and val/ are the same with or without",
    )
    image_size: PositiveSize = Field((256, 256), description="generated image size (H, W), sides >= 32")
    seed: int = Field(0, description="train split seed (val uses seed + 100003, test seed + 200003)")
    max_people: int = Field(5, ge=1, le=20)

    @field_validator("image_size")
    @classmethod
    def _min_side(cls, v: tuple[int, int]) -> tuple[int, int]:
        if any(s < 32 for s in v):
            raise ValueError(f"data.synthetic.image_size sides must be >= 32, got {list(v)}")
        return v


class AugmentConfig(_Section):
    hflip_prob: float = Field(0.5, ge=0.0, le=1.0)
    scale_range: tuple[float, float] = Field((0.75, 1.25), description="random zoom range of scale/crop")
    brightness: float = Field(0.2, ge=0.0)
    contrast: float = Field(0.2, ge=0.0)
    saturation: float = Field(0.2, ge=0.0)
    hue: float = Field(0.02, ge=0.0, le=0.5)

    @field_validator("scale_range")
    @classmethod
    def _scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (0 < v[0] <= v[1]):
            raise ValueError("data.augment.scale_range must satisfy 0 < low <= high")
        return v


class ClassificationDataConfig(_Section):
    """Image-classification data: the embedded scikit-learn digits, or an ImageFolder tree of your own.

    ImageFolder: `root/<class>/*.png|jpg|...` (split into train/val by val_fraction and split_seed), or
    `root/train/<class>/...` + `root/val/<class>/...` (+ optionally `root/test/<class>/...`; used as given).
    Classes are sorted by name. `test_fraction` holds out a stratified test split taken from what would
    otherwise be training data, so the validation split is the same with or without it.
    """

    source: Literal["digits", "image_folder"] = Field(
        "digits",
        description="digits = sklearn's 8x8 handwritten digits (1,797 images, 10 classes), upsampled",
    )
    root: str | None = Field(None, description="image_folder: the dataset directory")
    image_size: int = Field(32, ge=8, le=1024, description="images are resized to image_size x image_size")
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="held-out share per class (stratified)")
    test_fraction: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="held-out test share per class (stratified, taken from the training part; 0 = no test "
        "split, the train/val split is then unchanged); val picks the checkpoint, test reports it",
    )
    split_seed: int = Field(0, description="seed of the deterministic stratified train/val(/test) split")
    max_train_samples: int | None = Field(
        None, gt=0, description="train on a stratified subset of this many samples (e.g. a data-poor student)"
    )
    random_shift: int = Field(2, ge=0, description="train augmentation: random translation up to N px")
    brightness: float = Field(0.1, ge=0.0, lt=1.0, description="train augmentation: random brightness +-")

    @field_validator("test_fraction")
    @classmethod
    def _room_for_training(cls, v: float, info: ValidationInfo) -> float:
        val_fraction = info.data.get("val_fraction")
        if v > 0 and val_fraction is not None and val_fraction + v >= 1.0:
            raise ValueError(
                f"data.classification.val_fraction ({val_fraction}) + data.classification.test_fraction ({v}) "
                "must be < 1 so that training data remains; lower one of them"
            )
        return v


class SequenceDataConfig(_Section):
    """Sequence-classification data: an HDF5 file, or one generated from the synthetic parameters below.

    HDF5 layout: groups `train`, `val` and optionally `test`, each holding `data` float32 [N, T, D_in] and
    `labels` int64 [N] in [0, model.num_classes). D_in must equal `input_dim` (the GRU is built from it).
    """

    source: Literal["synthetic", "hdf5"] = Field(
        "synthetic", description="synthetic = generated on first use into `path`; hdf5 = read `path`"
    )
    path: str = Field(
        "data/generated/synthetic_sequences.hdf5",
        description="hdf5: the dataset file; synthetic: where the generated file is written (reused when its "
        "generator parameters match, else an error)",
    )
    input_dim: int = Field(
        8, gt=0, description="D_in, features per time step (the model's input size; an hdf5 file must match)"
    )
    seq_len: int = Field(48, ge=2, description="synthetic: time steps T per sequence")
    train_samples: int = Field(2000, gt=0, description="synthetic: training sequences")
    val_samples: int = Field(1000, gt=0, description="synthetic: validation sequences")
    test_samples: int = Field(0, ge=0, description="synthetic: test sequences (0 = no test split)")
    noise: float = Field(1.0, ge=0.0, description="synthetic: std of the Gaussian noise on every channel")
    seed: int = Field(0, description="synthetic: generator seed (classes use model.num_classes)")
    max_train_samples: int | None = Field(
        None, gt=0, description="train on a stratified subset of this many samples (e.g. a data-poor student)"
    )
    subset_seed: int = Field(1, description="seed of the max_train_samples subset")


class DataConfig(_Section):
    """COCO-format person data (segmentation) or `classification` data. Paths are relative to the cwd."""

    train_annotations: str | None = Field(None, description="COCO instances JSON of the training split")
    train_images: str | None = Field(None, description="directory of the training images")
    val_annotations: str | None = Field(None, description="COCO instances JSON of the validation split")
    val_images: str | None = Field(None, description="directory of the validation images")
    test_annotations: str | None = Field(
        None,
        description="COCO instances JSON of a held-out test split (optional, with test_images): the checkpoint "
        "selected on val is scored on it once training ends",
    )
    test_images: str | None = Field(
        None, validate_default=True, description="directory of the test images (with test_annotations)"
    )
    synthetic: SyntheticDataConfig | None = Field(
        None,
        description="when set, the four train/val paths above default to a generated synthetic dataset (and "
        "the test paths too when data.synthetic.test_images > 0)",
    )
    person_category: str = Field("person", description="category name of people (found by name, not id)")
    input_size: PositiveSize = Field((640, 640), description="network input size (H, W)")
    min_box_size: float = Field(
        8.0, ge=0.0, description="skip person boxes smaller than this (px, either side)"
    )
    max_rois_per_image: int | None = Field(None, gt=0)
    keep_images_without_people: bool = Field(False, description="train on images with no person too")
    skip_bad_images: bool = Field(False, description="count unreadable images as warnings instead of failing")
    num_workers: int = Field(2, ge=0)
    augment: AugmentConfig = AugmentConfig()
    max_train_images: int | None = Field(None, gt=0, description="use only the first N training images")
    max_val_images: int | None = Field(None, gt=0, description="use only the first N validation images")
    classification: ClassificationDataConfig = ClassificationDataConfig()
    sequence: SequenceDataConfig = SequenceDataConfig()

    @field_validator("test_images")
    @classmethod
    def _test_pair(cls, v: str | None, info: ValidationInfo) -> str | None:
        """A COCO test split needs both files; one alone is almost certainly a forgotten key."""
        annotations = info.data.get("test_annotations")
        if (annotations is None) != (v is None):
            raise ValueError(
                "data.test_annotations and data.test_images go together: set both (a COCO test split) or neither"
            )
        return v

    @field_validator("input_size")
    @classmethod
    def _input(cls, v: tuple[int, int]) -> tuple[int, int]:
        _check_size(v, "data.input_size")
        if any(s % 32 for s in v):
            raise ValueError(
                f"data.input_size must be multiples of 32 (the UNet downsamples 5 times), got {list(v)}"
            )
        return v


class LossConfig(_Section):
    """Weights of the base segmentation loss terms (see kdlab.models.losses)."""

    ce: float = Field(1.0, ge=0.0)
    dice: float = Field(1.0, ge=0.0)
    bg_fg: float = Field(0.5, ge=0.0)
    target: float = Field(0.5, ge=0.0)
    class_weights: tuple[float, float, float] = (1.0, 2.0, 1.0)
    distance: float = Field(
        0.0,
        ge=0.0,
        description="instance cue: weight of the distance-transform regression (needs model.instance_cues)",
    )
    contour: float = Field(
        0.0, ge=0.0, description="instance cue: weight of the target-contour BCE (needs model.instance_cues)"
    )
    boundary_weight: float = Field(
        0.0,
        ge=0.0,
        description="boundary-aware CE: extra pixel weight within boundary_width px of a label change",
    )
    boundary_width: int = Field(2, ge=1, description="boundary-aware CE: band half-width in mask pixels")
    distance_max: int = Field(8, ge=1, description="distance transform cap in mask pixels")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="classification: CE label smoothing")


class EMAConfig(_Section):
    """Exponential moving average of the student's weights."""

    enabled: bool = False
    decay: float = Field(0.999, gt=0.0, lt=1.0)
    evaluate: bool = Field(False, description="validate and save (best_model.pth) the EMA weights")


class TrainingConfig(_Section):
    epochs: int = Field(50, gt=0)
    devices_per_run: int = Field(
        1,
        ge=1,
        description="run_experiments.py --gpus: GPUs this run takes; more than 1 runs it under torchrun",
    )
    batch_size: int = Field(8, gt=0)
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    warmup_epochs: float = Field(1.0, ge=0.0, description="linear LR warm-up length, in epochs")
    min_lr_ratio: float = Field(0.01, ge=0.0, le=1.0, description="cosine floor as a fraction of lr")
    lr_schedule: Literal["cosine", "step", "plateau", "constant"] = Field(
        "cosine",
        description="LR after the warm-up: cosine to min_lr_ratio; step = times lr_gamma every lr_step_size "
        "epochs; plateau = times lr_gamma after lr_patience validations without improvement of the monitored "
        "metric; constant",
    )
    lr_step_size: int = Field(30, ge=1, description="step schedule: epochs between LR reductions")
    lr_gamma: float = Field(
        0.1, gt=0.0, le=1.0, description="step/plateau schedule: factor of each reduction"
    )
    lr_patience: int = Field(
        5, ge=1, description="plateau schedule: validations without improvement before the LR is reduced"
    )
    monitor: str | None = Field(
        None,
        description="validation metric that picks best_model.pth and drives early stopping and the plateau "
        "schedule (null = the task's headline metric)",
    )
    mode: Literal["max", "min"] | None = Field(
        None,
        description="whether a higher or lower monitored value is better (null = min for *loss* and ece)",
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="stop after this many validations without improvement (null = off)"
    )
    early_stopping_min_delta: float = Field(
        0.0,
        ge=0.0,
        description="early stopping: smallest change of the monitored metric that counts as better",
    )
    save_top_k: int = Field(
        1, ge=1, description="keep best_model.pth plus best_model_top2..k.pth, ranked by the monitored metric"
    )
    grad_clip_norm: float | None = Field(1.0, gt=0.0)
    grad_accum_steps: int = Field(1, gt=0)
    amp: Literal["auto", "bf16", "fp16", "off"] = Field(
        "auto",
        description="auto = bf16 on GPUs with native bf16 (compute capability >= 8.0), fp16 with a grad "
        "scaler on older GPUs, off on CPU; fp16 on CPU is refused (use bf16 or off)",
    )
    channels_last: bool = True
    compile: bool = Field(
        False,
        description="torch.compile the student's and teachers' forward (falls back to eager, with a warning, "
        "when compilation fails)",
    )
    val_every: int = Field(1, gt=0, description="validate every N epochs (and always after the last)")
    save_every: int = Field(5, gt=0, description="write checkpoint_epoch_XXXX.pth every N epochs")
    log_every_steps: int = Field(10, gt=0)
    checkpoint_every_steps: int | None = Field(
        500, gt=0, description="also save last.pth every N optimizer steps (null = only at epoch ends)"
    )
    max_nonfinite_steps: int = Field(
        5, gt=0, description="stop the run after this many non-finite (NaN/inf) steps in a row"
    )
    num_vis_images: int = Field(4, ge=0, description="fixed validation images drawn each validation")
    seed: int = 42
    deterministic: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    loss: LossConfig = LossConfig()
    ema: EMAConfig = EMAConfig()


class ScheduleConfig(_Section):
    """How a value moves from its start (the main setting) to `end` over training."""

    kind: Literal["constant", "linear", "cosine"] = "constant"
    end: float | None = Field(None, description="value at the end of training (linear/cosine); null = start")


class TeacherSpec(_Section):
    checkpoint: str = Field(description="teacher checkpoint (.pth with model_state_dict + config)")
    weight: float = Field(1.0, gt=0.0, description="weight in the probability-space mixture")


class FeaturePairConfig(_Section):
    student: str = Field(description="student module path, e.g. head.shared or unet.encoder[-1]")
    teacher: str = Field(description="teacher module path")
    weight: float = Field(1.0, ge=0.0)
    method: Literal["mse", "mgd"] = Field(
        "mse",
        description="'mse': adapted student vs teacher; 'mgd': masked generative distillation (the adapted "
        "student feature is masked at random, then a conv generator must regenerate the teacher's)",
    )
    mask_ratio: float = Field(0.65, ge=0.0, lt=1.0, description="MGD: share of spatial positions masked")


class TeacherCacheConfig(_Section):
    """Offline distillation: train from teacher outputs cached once in an HDF5 file (no teacher per step).

    An existing `distillation_data_path` is reused (checked against the configured data); a missing one is
    generated from `teacher_model_path` (a .pth checkpoint or an .onnx export) before training. The subset
    (per split: `subset_fraction` of the samples, then at most `max_samples`) is drawn once, without
    replacement, with `seed`, and recorded in the file.
    """

    teacher_model_path: str | None = Field(
        None, description="teacher (.pth or .onnx) that generates the cache when the file does not exist"
    )
    distillation_data_path: str | None = Field(
        None, description="the cache file (.hdf5): reused when it exists; default <run>/teacher_cache.hdf5"
    )
    subset_fraction: float = Field(1.0, gt=0.0, le=1.0, description="share of each split that is cached")
    max_samples: int | None = Field(None, gt=0, description="cap per split, applied after subset_fraction")
    batch_size: int = Field(32, gt=0, description="images (or sequences) per teacher batch when generating")
    seed: int = Field(0, description="seed of the subset draw (recorded in the file)")
    symmetrize_flips: bool = Field(
        True,
        description="segmentation: cache the mean of the teacher on the image and on its mirror image, so a "
        "replayed horizontal flip is exact (false: half the generation time, flips only approximate)",
    )


class DistillationConfig(_Section):
    """Knowledge distillation: total = alpha * distill_total + (1 - alpha) * base_total."""

    enabled: bool = Field(False, description="--teacher_checkpoint turns it on")
    teacher_checkpoint: str | None = Field(
        None, description="the teacher (its architecture comes from its checkpoint)"
    )
    teacher_experiment: str | None = Field(
        None,
        description="another experiment whose best_model.pth is the teacher (<output_dir>/<name>/checkpoints/); "
        "run_experiments.py runs it first",
    )
    teachers: list[TeacherSpec] = Field(
        default_factory=list, description="several teachers, mixed in probability space"
    )
    self_distillation: bool = Field(
        False, description="the student's EMA is the teacher (needs training.ema.enabled)"
    )
    temperature: float = Field(4.0, gt=0.0)
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="weight of the distillation terms")
    temperature_schedule: ScheduleConfig = ScheduleConfig()
    alpha_schedule: ScheduleConfig = ScheduleConfig()
    final_weight: float = Field(1.0, ge=0.0, description="KD weight on the 3-class logits")
    bg_fg_weight: float = Field(0.5, ge=0.0, description="KD weight on the bg/fg head")
    target_weight: float = Field(0.5, ge=0.0, description="KD weight on the target/non-target head")
    cwd_weight: float = Field(0.0, ge=0.0, description="channel-wise distillation on the 3-class logits")
    logit_standardize: bool = Field(
        False,
        description="standardise student and teacher logits over the classes (per pixel) before the softmax "
        "of every KL term on 3 or more classes (Sun et al., CVPR 2024); 2-class heads keep the plain KL",
    )
    dist_weight: float = Field(
        0.0, ge=0.0, description="DIST (Pearson-correlation relations) on the 3-class logits"
    )
    dist_beta: float = Field(1.0, ge=0.0, description="DIST: weight of the inter-class (per-pixel) relation")
    dist_gamma: float = Field(1.0, ge=0.0, description="DIST: weight of the intra-class (per-ROI) relation")
    dist_temperature: float = Field(1.0, gt=0.0, description="DIST: softmax temperature (its own, not T)")
    features: list[FeaturePairConfig] = Field(
        default_factory=list, description="feature MSE through 1x1 adapters"
    )
    grad_share_every: int = Field(
        50, ge=0, description="log each term's share of the gradient norm every N steps (0 = off)"
    )
    evaluate_teacher: bool = Field(
        True,
        description="validate the teacher once before epoch 1 (its metrics in summary.json); validation "
        "never runs the teacher otherwise",
    )
    teacher_input_mean: tuple[float, float, float] | None = Field(
        None, description="override the teacher's input normalisation (teacher trained with other mean/std)"
    )
    teacher_input_std: tuple[float, float, float] | None = None
    cache: TeacherCacheConfig | None = Field(
        None, description="train from cached teacher outputs (HDF5) instead of running a teacher every step"
    )

    @field_validator("temperature_schedule")
    @classmethod
    def _temperature_end(cls, v: ScheduleConfig) -> ScheduleConfig:
        if v.end is not None and v.end <= 0:
            raise ValueError("distillation.temperature_schedule.end must be > 0")
        return v

    @field_validator("alpha_schedule")
    @classmethod
    def _alpha_end(cls, v: ScheduleConfig) -> ScheduleConfig:
        if v.end is not None and not 0.0 <= v.end <= 1.0:
            raise ValueError("distillation.alpha_schedule.end must be in [0, 1]")
        return v

    def teacher_specs(self) -> list[TeacherSpec]:
        """`teacher_checkpoint` (weight 1) followed by `teachers`."""
        specs = [TeacherSpec(checkpoint=self.teacher_checkpoint)] if self.teacher_checkpoint else []
        return specs + list(self.teachers)


class ExportConfig(_Section):
    onnx: bool = Field(False, description="export the student to ONNX after training")
    opset: int = Field(18, ge=16, le=20, description="ONNX opset (>= 16 for RoiAlign's half-pixel mode)")
    exporter: Literal["auto", "dynamo", "torchscript"] = Field(
        "auto",
        description="torch.onnx exporter: 'dynamo' (torch.export + onnxscript, the supported one), "
        "'torchscript' (the deprecated tracer) or 'auto' (dynamo; torchscript when dynamo fails or misses "
        "parity, recorded in best_model.onnx.json)",
    )
    accuracy_images: int | None = Field(
        None, gt=0,
        description="validation images the exported file is scored on with onnxruntime (null = all of them)",
    )  # fmt: skip
    latency_runs: int | None = Field(
        None, gt=0,
        description="timed onnxruntime and PyTorch runs of the export's latency figures, after 3 warm-up runs "
        "(null = 20)",
    )  # fmt: skip
    quantize: Literal["none", "int8"] = Field(
        "none", description="'int8': also write an onnxruntime static INT8 (QDQ, per-channel) model"
    )
    calibration_images: int = Field(32, gt=0, description="training images INT8 calibration runs on")
    max_int8_iou_drop: float = Field(
        0.01, ge=0.0, le=1.0,
        description="an INT8 model losing more of the headline metric (mIoU, top-1) than this is kept aside with a warning; "
        "best_model.onnx stays FP32",
    )  # fmt: skip


class WandbConfig(_Section):
    """Weights & Biases logging beside TensorBoard (needs the extra: pip install kdlab[wandb])."""

    project: str = Field("kdlab", min_length=1, description="W&B project the run is logged to")
    entity: str | None = Field(None, description="W&B user or team (null = your default entity)")
    mode: Literal["online", "offline", "disabled"] = Field(
        "online", description="offline: write the run under WANDB_DIR with no network (sync it later)"
    )


class LoggingConfig(_Section):
    wandb: WandbConfig | None = Field(
        None, description="also log the TensorBoard scalars and images plus the config to W&B (null = off)"
    )


class ReportConfig(_Section):
    """How the comparison report judges a distilled student against its baseline over seeds."""

    equivalence_margin: float = Field(
        0.005, gt=0.0, le=1.0,
        description="±margin on the headline metric: a paired 95% interval of Δ inside (−m, +m) reads "
        "'equivalent within ±m'; one that straddles 0 but leaves the margin reads 'inconclusive'",
    )  # fmt: skip


class ExperimentConfig(_Section):
    """One experiment: everything needed to rebuild the run."""

    name: str = Field(
        "experiment", min_length=1, description="run directory name (defaults to the config's name)"
    )
    description: str = Field("", description="free text shown in listings and reports")
    task: TaskName = Field(
        "segmentation", description="what is trained: segmentation, classification or sequence"
    )
    output_dir: str = Field("experiments", description="parent of run directories")
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    training: TrainingConfig = TrainingConfig()
    distillation: DistillationConfig = DistillationConfig()
    export: ExportConfig = ExportConfig()
    logging: LoggingConfig = LoggingConfig()
    report: ReportConfig = ReportConfig()

    @model_validator(mode="after")
    def _distillation_has_a_teacher(self) -> ExperimentConfig:
        d = self.distillation
        if d.cache is not None:
            if not d.enabled:
                raise ValueError("distillation.cache needs distillation.enabled=true")
            if d.self_distillation:
                raise ValueError(
                    "distillation.cache replaces a live teacher; it cannot be combined with "
                    "distillation.self_distillation=true"
                )
            if d.features:
                raise ValueError(
                    "distillation.features needs a live teacher's activations, which a cache does not hold; "
                    "set distillation.features=[] or remove distillation.cache"
                )
            if d.teachers:
                raise ValueError(
                    "a cache holds one teacher's outputs; several teachers (distillation.teachers) with "
                    "distillation.cache are not implemented"
                )
            c = d.cache
            if not (
                c.teacher_model_path
                or c.distillation_data_path
                or d.teacher_checkpoint
                or d.teacher_experiment
            ):
                raise ValueError(
                    "distillation.cache needs distillation.cache.distillation_data_path (an existing cache) or "
                    "a teacher to generate it: distillation.cache.teacher_model_path (or "
                    "distillation.teacher_checkpoint / distillation.teacher_experiment)"
                )
            return self
        if d.enabled and not d.teacher_specs() and not d.self_distillation and not d.teacher_experiment:
            raise ValueError(
                "distillation.enabled=true needs a teacher: set distillation.teacher_checkpoint "
                "(or --teacher_checkpoint), distillation.teacher_experiment, distillation.teachers, "
                "or distillation.self_distillation=true"
            )
        if d.self_distillation and (d.teacher_specs() or d.teacher_experiment):
            raise ValueError(
                "distillation.self_distillation=true uses the student's EMA as the teacher; set "
                "distillation.teacher_checkpoint=null, distillation.teacher_experiment=null and distillation.teachers=[]"
            )
        if d.enabled and d.self_distillation and not self.training.ema.enabled:
            raise ValueError("distillation.self_distillation=true needs training.ema.enabled=true")
        return self

    @model_validator(mode="after")
    def _model_fits_the_task(self) -> ExperimentConfig:
        TASK_CONFIG_RULES[self.task](self)
        return self

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if "/" in v or "\\" in v or v in {".", ".."}:
            raise ValueError("name must be a plain directory name (no slashes)")
        return v


# ---------------------------------------------------------------------------------- per-task config rules
# The config layer is validated before any task code loads, so each task's rules on its own sections live
# here, one function per task (see `kdlab.tasks` for everything else a task owns).
def _segmentation_rules(cfg: ExperimentConfig) -> None:
    name = cfg.model.name
    if name != SEGMENTATION_MODEL:
        needs = "sequence" if name == SEQUENCE_MODEL else "classification"
        raise ValueError(
            f"model.name='{name}' needs task={needs}; task=segmentation uses model.name='{SEGMENTATION_MODEL}'"
        )
    loss = cfg.training.loss
    if (loss.distance > 0 or loss.contour > 0) and not cfg.model.instance_cues:
        raise ValueError(
            "training.loss.distance / training.loss.contour > 0 need the head's instance-cue outputs; "
            "set model.instance_cues=true (with model.head='context')"
        )
    if cfg.model.instance_cues and cfg.model.head != "context":
        raise ValueError("model.instance_cues=true needs model.head='context'")


def _classification_rules(cfg: ExperimentConfig) -> None:
    name = cfg.model.name
    if name == SEQUENCE_MODEL:
        raise ValueError(f"model.name='{SEQUENCE_MODEL}' needs task=sequence")
    if name not in timm_model_names():
        close = difflib.get_close_matches(name, sorted(timm_model_names()), n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"model.name='{name}' is not a timm model{hint}")
    for key, value in (
        ("cwd_weight", cfg.distillation.cwd_weight),
        ("dist_weight", cfg.distillation.dist_weight),
    ):
        if value > 0:
            raise ValueError(
                f"distillation.{key} > 0 needs spatial logits (task=segmentation); classifiers use "
                "the KL+CE loss (distillation.logit_standardize) and distillation.features"
            )
    if cfg.export.quantize != "none":
        raise ValueError(
            f"export.quantize={cfg.export.quantize} is not implemented for task=classification (INT8 calibration "
            "reads people images); use export.quantize=none"
        )


def _sequence_rules(cfg: ExperimentConfig) -> None:
    name = cfg.model.name
    if name != SEQUENCE_MODEL:
        raise ValueError(f"model.name='{name}' does not fit task=sequence; use model.name='{SEQUENCE_MODEL}'")
    for key, value in (("distillation.features", cfg.distillation.features),
                       ("distillation.cwd_weight", cfg.distillation.cwd_weight > 0),
                       ("distillation.dist_weight", cfg.distillation.dist_weight > 0),
                       ("distillation.logit_standardize", cfg.distillation.logit_standardize),
                       ("export.onnx", cfg.export.onnx),
                       ("export.quantize", cfg.export.quantize != "none")):  # fmt: skip
        if value:
            raise ValueError(f"{key} is not implemented for task=sequence; unset it")


TASK_CONFIG_RULES = {
    "segmentation": _segmentation_rules,
    "classification": _classification_rules,
    "sequence": _sequence_rules,
}
