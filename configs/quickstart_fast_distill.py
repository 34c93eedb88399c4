"""Quickstart fast student: quickstart_distill with people_fast_from_b3's change (decoder and head at half width).

The quickstart table then shows what the faster student costs in accuracy on the same data, schedule, seed
and teacher.

The change is the same relative one: every decoder stage at half the default width (128..8) and the ROI head at
half its student's width. The quickstart's head is already 32 wide (people: 64), so here it is 16.
"""

BASE = "quickstart_distill"

CONFIG = {
    "description": "Fast B0 student (decoder 128..8, head 16: half widths) distilled from quickstart_teacher",
    "model": {
        "decoder_channels": [128, 64, 32, 16, 8],
        "head_channels": 16,
    },
}
