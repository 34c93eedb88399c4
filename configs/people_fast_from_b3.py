"""Fast student: people_b0_from_b3 with the decoder and the ROI head at half width, < half the teacher's time.

Measured in ONNX on CPU at 640x640 with 4 ROIs: 0.37-0.43x the B3 teacher's latency (0.41x by CPU time), against
0.64-0.84x for people_b0_from_b3 (every decoder stage 128..8 instead of 256..16, head_channels 32 instead of 64).

B0 and B3 share the decoder (256..16) and the ROI head, which dominate at the seed sizes: a smaller encoder
alone is not enough, and neither is one of the two halvings alone (0.55-0.62x each); see docs/people-model.md,
"A faster student" and `python -m benchmarks --suite fast_student`. Distillation is on logits, which have the
teacher's shape whatever the student's widths (mask size and ROI margin stay the teacher's, as KD requires).
"""

BASE = "people_b0_from_b3"

CONFIG = {
    "description": "Fast B0 student (decoder 128..8, head 32) distilled from people_b3_teacher (T=4, alpha=0.7)",
    "model": {
        "decoder_channels": [128, 64, 32, 16, 8],
        "head_channels": 32,
    },
}
