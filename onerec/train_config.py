"""Training's knobs, apart from the trainer so that the command line can show their
defaults without importing torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    epochs: int = 4
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    samples_per_user: int = 8
    targets_per_sample: int = 8
    max_minutes: float = 4.0
    ranker_minutes: float = 0.5  # then the ranking stage alone (train_ranker)
    threads: int = 2
    seed: int = 0
    keep_best: bool = True  # validate on each user's second-to-last event, keep the best epoch
