"""Alias of people_b3_teacher: the B3 teacher at ROI 80x60 and mask 160x120 (640x640 input).

Kept for the commands users already have. The name promises the distance-transform, contour-detection and
boundary-aware losses: this alias derives from people_b3_teacher and turns them on here once the model
work adds those config keys; until then it trains exactly people_b3_teacher.
"""

BASE = "people_b3_teacher"

CONFIG = {"description": "Alias of people_b3_teacher (B3 teacher, ROI 80x60, mask 160x120, seed sizes)"}
