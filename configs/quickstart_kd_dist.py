"""Methods suite (f): the seed's KL terms on all three heads plus DIST on the 3-class logits.

The combination was fixed before the suite's results were in (docs/distillation-methods.md says why and how it
fared): DIST was the strongest method in the published comparison, and it only covers the 3-class logits, so
the KL keeps distilling the two 2-class heads. Same schedule, seed and initial weights as quickstart_baseline.
"""

BASE = "quickstart_distill"

CONFIG = {
    "description": "B0 from quickstart_teacher: KL on the three heads + DIST on the ROI logits (alpha=0.7)",
    "distillation": {"dist_weight": 1.0, "dist_beta": 1.0, "dist_gamma": 1.0, "dist_temperature": 1.0},
}
