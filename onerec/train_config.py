"""Training's knobs, the generator's and the reward model's, apart from the trainers so
that the command line can show their defaults without importing torch."""

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


@dataclass(frozen=True)
class RewardConfig:
    """The reward model (:mod:`onerec.reward`): its widths and its training budget."""

    d: int = 64
    hidden: int = 128
    short_len: int = 20  # the short-term pathway's length
    pos_len: int = 32  # the newest positive-feedback items it reads
    dropout: float = 0.1
    lr: float = 2e-3
    batch_size: int = 512
    events_per_epoch: int = 200_000
    epochs: int = 8
    minutes: float = 3.0
    seed: int = 0
