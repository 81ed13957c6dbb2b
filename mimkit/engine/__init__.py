"""The single training loop shared by every method, with its schedules, checkpoints and DDP helpers."""
