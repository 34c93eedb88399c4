"""Methods suite (d): channel-wise distillation (Shu et al., ICCV 2021) on the 3-class ROI logits instead of
the KL terms (T=4, alpha=0.7). Same schedule, seed and initial weights as quickstart_baseline."""

BASE = "quickstart_distill"

CONFIG = {
    "description": "B0 from quickstart_teacher: CWD on the ROI logits (T=4), no KL",
    "distillation": {"final_weight": 0.0, "bg_fg_weight": 0.0, "target_weight": 0.0, "cwd_weight": 1.0},
}
