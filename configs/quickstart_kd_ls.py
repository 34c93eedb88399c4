"""Methods suite (b): the seed's KL terms on standardised logits (Sun et al., CVPR 2024), everything else as
quickstart_distill (T=4, alpha=0.7, the same schedule, seed and so initial weights)."""

BASE = "quickstart_distill"

CONFIG = {
    "description": "B0 from quickstart_teacher: KL on class-standardised logits (T=4, alpha=0.7)",
    "distillation": {"logit_standardize": True},
}
