"""Knowledge-distillation losses: logit KL, KL+CE for classifiers, channel-wise distillation (CWD), feature MSE,
trajectory MSE (+ CE) for sequence models.

Conventions shared by every function here:
- Inputs may be any floating dtype (bf16 under autocast included); everything is computed in float32 and the
  returned loss is a 0-dim float32 tensor.
- Logits are laid out class/channel-first: `[N, C, *spatial]` (`[N, C]` for classifiers, `[N, C, H, W]` for
  mask heads). "Pixels" below means the positions of `*spatial` (1 for `[N, C]`).
- With N = 0 ROIs a loss is 0 but still connected to the autograd graph, so `backward()` works.
- No host synchronisation: normalisers are Python ints taken from shapes, never from tensor values.

The teacher targets are used as given; pass detached (or `torch.no_grad()`) teacher tensors. Gradients would
flow into a teacher tensor that requires grad, and for `kd_kl_loss` that gradient is infinite where p_t = 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "cwd_loss",
    "feature_mse_loss",
    "kd_ce_loss",
    "kd_kl_loss",
    "mix_teacher_probs",
    "mix_teacher_trajectories",
    "teacher_probs",
    "trajectory_kd_loss",
    "trajectory_mse_loss",
]


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:  # also rejects NaN
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _check_pair(student: Tensor, teacher: Tensor, min_ndim: int, what: str) -> None:
    if student.ndim < min_ndim:
        raise ValueError(
            f"{what}: expected at least {min_ndim} dims [N,C,...], got shape {tuple(student.shape)}"
        )
    if student.shape != teacher.shape:
        raise ValueError(
            f"{what}: student and teacher shapes differ: {tuple(student.shape)} vs {tuple(teacher.shape)}"
        )


def teacher_probs(teacher_logits: Tensor, temperature: float) -> Tensor:
    """Softened teacher distribution `softmax(t / T)` over the class dim (dim 1), in float32.

    `teacher_logits` is `[N, C, *spatial]`; the result has the same shape and sums to 1 over dim 1.
    """
    _check_temperature(temperature)
    if teacher_logits.ndim < 2:
        raise ValueError(f"teacher_logits must be [N,C,...], got shape {tuple(teacher_logits.shape)}")
    return F.softmax(teacher_logits.float() / temperature, dim=1)


def mix_teacher_probs(probs: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Multi-teacher target in probability space: `sum_i w_i p_i / sum_i w_i`, in float32.

    Every `p_i` must have the same shape (each a distribution over dim 1, e.g. from `teacher_probs`), and every
    weight must be > 0. Since the weights are normalised by their sum, the mixture is again a distribution
    over dim 1 (a convex combination of distributions).
    """
    if len(probs) == 0:
        raise ValueError("mix_teacher_probs needs at least one teacher")
    if len(probs) != len(weights):
        raise ValueError(f"got {len(probs)} teacher probability tensors but {len(weights)} weights")
    if not all(w > 0 for w in weights):  # `not w > 0` also rejects NaN
        raise ValueError(f"teacher weights must all be > 0, got {list(weights)}")
    shape = probs[0].shape
    for i, p in enumerate(probs):
        if p.shape != shape:
            raise ValueError(f"teacher {i} has shape {tuple(p.shape)}, teacher 0 has {tuple(shape)}")
    total = float(sum(weights))
    mixed = probs[0].float() * (float(weights[0]) / total)
    for p, w in zip(probs[1:], weights[1:], strict=True):
        mixed = mixed + p.float() * (float(w) / total)
    return mixed


def kd_kl_loss(student_logits: Tensor, teacher_probs: Tensor, temperature: float) -> Tensor:
    """Hinton logit distillation: `T² · mean over (ROIs, pixels) of KL(p_t || softmax(s / T))`.

    Normalisation, with q = softmax(s / T) over classes (dim 1) and KL summed over the C classes:

        loss = T² / (N · P) · sum_{n, pixel} sum_c p_t[n,c,pixel] · (log p_t[n,c,pixel] - log q[n,c,pixel])

    where P is the number of pixels per ROI (H·W for `[N,C,H,W]`, 1 for `[N,C]`). Hence the value does not
    grow with the mask resolution and equals the plain mean of the per-ROI losses. The T² factor keeps the
    gradient magnitude independent of T: d loss / d s = T · (q - p_t) / (N · P).

    `student_logits` is `[N, C, *spatial]`; `teacher_probs` has the same shape and is already a distribution
    over dim 1 (`teacher_probs(t, T)`, or a `mix_teacher_probs` mixture). Terms with p_t = 0 contribute 0
    (`xlogy`), so zero teacher probabilities give a finite loss and a finite student gradient.
    N = 0 returns a graph-connected 0. Computed in float32.
    """
    _check_temperature(temperature)
    _check_pair(student_logits, teacher_probs, 2, "kd_kl_loss")
    p_t = teacher_probs.float()
    log_q = F.log_softmax(student_logits.float() / temperature, dim=1)
    kl_sum = (torch.xlogy(p_t, p_t) - p_t * log_q).sum()
    n_rows = student_logits.numel() // max(student_logits.shape[1], 1)  # N · P
    return kl_sum * (temperature * temperature / max(n_rows, 1))


def kd_ce_loss(
    student_logits: Tensor,
    teacher_probs: Tensor,
    labels: Tensor,
    temperature: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> dict[str, Tensor]:
    """Classic classifier distillation: `alpha · T² · KL(p_t || softmax(s/T)) + (1 − alpha) · CE(s, y)`.

    Normalisation, for logits `[N, C]` and integer labels `[N]`:

        kd = T² / N · sum_n sum_c p_t[n,c] · (log p_t[n,c] − log softmax(s[n]/T)_c)   (`kd_kl_loss`)
        ce = 1 / N · sum_n CE(s[n], y[n])   (temperature 1; with label smoothing ε the target is
             (1 − ε)·onehot(y) + ε/C, as `torch.nn.functional.cross_entropy`)
        loss = alpha · kd + (1 − alpha) · ce

    i.e. the KL is summed over classes and averaged over the batch, and T² keeps its gradient scale
    independent of T. `teacher_probs` is `softmax(t / T)` (or a multi-teacher mixture). alpha = 0 is
    plain CE. Returns {"loss", "distill_kl", "ce"} as 0-dim float32 tensors.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if student_logits.ndim != 2:
        raise ValueError(f"kd_ce_loss: expected [N, C] logits, got shape {tuple(student_logits.shape)}")
    kd = kd_kl_loss(student_logits, teacher_probs, temperature)
    ce = F.cross_entropy(student_logits.float(), labels.long(), label_smoothing=label_smoothing)
    return {"loss": alpha * kd + (1.0 - alpha) * ce, "distill_kl": kd, "ce": ce}


def cwd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Channel-wise distillation (Shu et al., ICCV 2021).

    For each ROI n and channel c, the logits over the P spatial positions (P = H·W) are turned into a spatial
    distribution: phi_t = softmax(t[n,c,:] / T), phi_s = softmax(s[n,c,:] / T). Normalisation:

        loss = T² / (N · C) · sum_{n, c} sum_{positions} phi_t · (log phi_t - log phi_s)

    i.e. the KL is summed over positions and averaged over (ROI, channel) pairs, so duplicating channels or
    ROIs leaves the value unchanged. Inputs are `[N, C, *spatial]` with at least one spatial dim; shapes must
    match. N = 0 returns a graph-connected 0. Computed in float32.
    """
    _check_temperature(temperature)
    _check_pair(student_logits, teacher_logits, 3, "cwd_loss")
    s = student_logits.float().flatten(2) / temperature  # [N, C, P]
    t = teacher_logits.float().flatten(2) / temperature
    log_phi_t = F.log_softmax(t, dim=2)
    log_phi_s = F.log_softmax(s, dim=2)
    kl_sum = (log_phi_t.exp() * (log_phi_t - log_phi_s)).sum()
    n_pairs = student_logits.shape[0] * student_logits.shape[1]
    return kl_sum * (temperature * temperature / max(n_pairs, 1))


def feature_mse_loss(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """Mean squared error over all elements: `sum (s - t)² / numel`, in float32.

    Shapes must match exactly (no broadcasting; project the student first, e.g. with a 1×1 adapter); a
    mismatch raises ValueError. Empty inputs return a graph-connected 0.
    """
    if student_feat.shape != teacher_feat.shape:
        raise ValueError(
            f"feature_mse_loss: student and teacher shapes differ: "
            f"{tuple(student_feat.shape)} vs {tuple(teacher_feat.shape)}"
        )
    diff = student_feat.float() - teacher_feat.float()
    return (diff * diff).sum() / max(diff.numel(), 1)


def trajectory_mse_loss(student_traj: Tensor, teacher_traj: Tensor) -> Tensor:
    """Trajectory distillation: mean squared difference of the output-state histories, in float32.

    Normalisation, for trajectories `[B, T+1, C]` (batch, time steps with t = 0 the initial state, outputs):

        traj_mse = 1 / (B · (T+1) · C) · sum_{b, t, c} (s[b,t,c] − t[b,t,c])²

    i.e. a plain mean over every element, so the value does not grow with the sequence length or the number
    of outputs. Shapes must match exactly; empty inputs return a graph-connected 0.
    """
    if student_traj.ndim != 3:
        raise ValueError(f"trajectory_mse_loss: expected [B, T+1, C], got shape {tuple(student_traj.shape)}")
    if student_traj.shape != teacher_traj.shape:
        raise ValueError(
            f"trajectory_mse_loss: student and teacher shapes differ: "
            f"{tuple(student_traj.shape)} vs {tuple(teacher_traj.shape)}"
        )
    diff = student_traj.float() - teacher_traj.float()
    return (diff * diff).sum() / max(diff.numel(), 1)


def mix_teacher_trajectories(trajectories: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Several teachers' trajectories as one target: `sum_i w_i traj_i / sum_i w_i` (float32, weights > 0)."""
    if len(trajectories) == 0:
        raise ValueError("mix_teacher_trajectories needs at least one teacher")
    if len(trajectories) != len(weights) or not all(w > 0 for w in weights):
        raise ValueError(f"need one weight > 0 per teacher trajectory, got {list(weights)}")
    total = float(sum(weights))
    mixed = trajectories[0].float() * (float(weights[0]) / total)
    for traj, w in zip(trajectories[1:], weights[1:], strict=True):
        if traj.shape != trajectories[0].shape:
            raise ValueError(
                f"teacher trajectories differ in shape: {tuple(traj.shape)} vs {tuple(trajectories[0].shape)}"
            )
        mixed = mixed + traj.float() * (float(w) / total)
    return mixed


def trajectory_kd_loss(
    student_traj: Tensor,
    student_logits: Tensor,
    teacher_traj: Tensor,
    labels: Tensor,
    alpha: float,
    label_smoothing: float = 0.0,
) -> dict[str, Tensor]:
    """Sequence distillation: `alpha · traj_mse + (1 − alpha) · CE(logits, y)`.

    traj_mse is `trajectory_mse_loss` (mean over batch, the T+1 time steps and the C outputs); CE is the
    batch mean on the final logits `[B, C]` (label smoothing as `F.cross_entropy`). No temperature: the
    trajectories are matched as raw outputs. alpha = 0 is plain CE. Returns {"loss", "traj_mse", "ce"}.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    traj = trajectory_mse_loss(student_traj, teacher_traj)
    ce = F.cross_entropy(student_logits.float(), labels.long(), label_smoothing=label_smoothing)
    return {"loss": alpha * traj + (1.0 - alpha) * ce, "traj_mse": traj, "ce": ce}
