"""The original project's B3 teacher name: people_b3_teacher (640x640, ROI 80x60, mask 160x120) with the
instance cues its name promises: distance-transform regression (disttrans), contour detection (contdet) and
boundary-aware cross-entropy (baware).

Kept for the commands users already have. The cue weights are the ones tried on the quickstart
(docs/people-model.md, "Ablation"); they have not been tuned at the seed sizes.
"""

BASE = "people_b3_teacher"

CONFIG = {
    "description": "B3 teacher at the seed sizes with distance-transform, contour and boundary-aware losses",
    "model": {"instance_cues": True},
    "training": {"loss": {"distance": 1.0, "contour": 1.0, "boundary_weight": 2.0}},
}
