"""Student baseline from ImageNet at the seed sizes: people_lite2_teacher's recipe with a pretrained Lite0 encoder
(weights/efficientnet-lite0.pth, `kdlab-weights import efficientnet-lite0`), trained without a teacher."""

BASE = "people_lite2_teacher"

CONFIG = {
    "description": "People segmentation student (ImageNet-pretrained Lite0) without distillation, seed sizes",
    "model": {
        "encoder": "timm-tf_efficientnet_lite0",
        "encoder_weights": "weights/efficientnet-lite0.pth",
    },
}
