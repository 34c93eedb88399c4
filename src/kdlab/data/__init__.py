"""Data: COCO people ROIs, synthetic people generator, transforms, collate."""
