"""Models: full-image UNet + RoIAlign + hierarchical head, builders, losses."""
