"""Teacher: UNet with an EfficientNet-B3 encoder, seed sizes (640x640 input, ROI 80x60, mask 160x120).

Point the data paths at a COCO-format person dataset (e.g. COCO 2017) with --set or a derived config.
"""

CONFIG = {
    "description": "People segmentation teacher (B3) at the seed sizes",
    "model": {
        "encoder": "timm-efficientnet-b3",
        "roi_size": [80, 60],
        "mask_size": [160, 120],
    },
    "data": {
        "train_annotations": "data/coco/annotations/instances_train2017.json",
        "train_images": "data/coco/train2017",
        "val_annotations": "data/coco/annotations/instances_val2017.json",
        "val_images": "data/coco/val2017",
        "input_size": [640, 640],
        "min_box_size": 16,
        "num_workers": 8,
    },
    "training": {
        "epochs": 50,
        "batch_size": 16,
        "lr": 1e-3,
        "warmup_epochs": 1,
        "save_every": 5,
    },
}
