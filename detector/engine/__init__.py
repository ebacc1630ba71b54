"""Training engine: loop, optimisation, checkpoints, logging, distributed training."""
