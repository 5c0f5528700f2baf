"""Training: one Trainer configured by a TrainingConfig dataclass."""
