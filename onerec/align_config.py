"""RL post-training's knobs (:mod:`onerec.align`), apart from the trainer so that the
command line can show their defaults without importing torch."""

from __future__ import annotations

from dataclasses import dataclass

METHODS = ("ecpo", "grpo", "dpo")


@dataclass(frozen=True)
class AlignConfig:
    """One RL run: the defaults fit a few minutes on 2 CPU cores."""

    method: str = "ecpo"
    search: str = "beam"  # "beam": the served top-G beams; "sample": draws under the trie
    steps: int = 40
    users_per_step: int = 32
    group: int = 16  # G SIDs per user
    inner_steps: int = 2  # updates per sampled batch: the ratio to the sampling policy moves
    lr: float = 1e-4
    clip_eps: float = 0.2  # PPO's clip, ECPO's and GRPO's
    delta: float = 0.1  # ECPO: negative advantages first bound the ratio by 1 + delta
    kl_beta: float = 0.1  # GRPO: the weight of the KL to the reference
    dpo_beta: float = 0.5  # DPO: the inverse temperature of the implicit reward
    ntp_weight: float = 0.5  # the next-token loss on logged positives, mixed in
    ntp_batch: int = 32
    legal_users: int = 128  # users whose unconstrained beams measure legality
    legal_width: int = 32
    minutes: float = 4.0  # the loop stops here whatever ``steps`` says
    threads: int = 2
    seed: int = 0
