"""Training: DeepSpeed engine setup, the loop, LR and batch-size schedules, metrics, checkpoints."""
