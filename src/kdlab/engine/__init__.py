"""Engine: training loop, checkpoints, logging, visuals."""
