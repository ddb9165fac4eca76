"""RL post-training of the generator against the reward model (P-Score): ECPO, GRPO, DPO.

Each step takes a batch of users at the state of their training history (the pathways
before each user's validation event, :func:`onerec.experiment.validation_split`, so the
held-out last event is never read), samples a group of G SIDs per user with the served,
trie-constrained search (:mod:`onerec.align_sampling`), maps each SID to its first item
in collision rank, and scores it with the reward model. The simulator is never read.

**Log-probability of a SID** is teacher-forced: the decoder's hidden states at BOS and the
first two codes, each level's head, log-softmax over *all* K codes, summed over the three
levels. It is not renormalised over the trie-legal codes: beam search ranks paths by these
very numbers (the trie only masks), so the objective moves what serving ranks by, and the
mass a level gives to illegal codes stays visible to the legality measure rather than
being hidden by the renormalisation.

**Methods** (``old`` is the policy that sampled the group: its log-probabilities are
those of the first of ``inner_steps`` updates on the batch, so later ones have a ratio):

* ECPO: group-normalised advantages, PPO's clipped surrogate; for a negative advantage the
  ratio is first bounded by ``1 + delta`` (:func:`ecpo_objective`), with its gradient kept,
  so an action already far more likely than when sampled cannot blow up the loss. The
  OneRec report writes the bound as ``1 + eps + delta``; the issue's ``1 + delta`` is used.
  No KL term.
* GRPO: the same surrogate without the early bound, plus ``kl_beta`` times the KL to the
  frozen pre-RL generator (the reference).
* DPO: per user the best and the worst P-Score of the group as chosen and rejected, against
  the reference: ``-log sigmoid(beta * margin)``, the margin being the chosen SID's
  log-ratio to the reference minus the rejected one's. ``beta`` (``dpo_beta``) scales that
  implicit reward, so it sets how far from the reference a preference pulls the policy:
  0.5, above the 0.1 common for text, because a SID's log-ratio sums over three tokens
  rather than hundreds, so the same shift in behaviour is a far smaller margin.

Every method adds ``ntp_weight`` times the next-token loss on logged positives (events
whose engagement score passes the positive threshold), so retrieval does not drift.

**KL** is exact per level along each SID's path (the two codebook distributions), summed
over the levels; the logged entropy is the policy's per-level entropy along the same paths.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from onerec.align_config import METHODS, AlignConfig
from onerec.align_sampling import first_items, legal_share, sample_group
from onerec.data.schema import Dataset
from onerec.event_arrays import EventArrays
from onerec.metrics import Split
from onerec.model import OneRec
from onerec.reward import REWARD_FILE, RewardModel, fit_reward, load_reward
from onerec.runtime.beam_search import exclude_leaves
from onerec.runtime.config import OneRecConfig
from onerec.runtime.engagement import engagement_score, is_positive
from onerec.runtime.lifelong import compress_history
from onerec.runtime.pathways import build_pathways, collate
from onerec.runtime.sid_index import SIDIndex
from onerec.train import ItemTables, SampleSource
from onerec.train_config import RewardConfig

log = logging.getLogger(__name__)
CURVES = ("reward", "kl", "clip_fraction", "entropy")


def aligned_path(artifacts: Path, method: str) -> Path:
    """Where ``onerec align`` stores a method's checkpoint (checkpoint.pt's format)."""
    return artifacts / "model" / f"aligned_{method}.pt"


# --- users and their states ----------------------------------------------------------------


class UserStates:
    """Split rows as the served search sees them: pathways of the history before each row's
    target (built once per row, the lifelong compression included) and the leaves of the
    items the user has seen, which the search excludes as the front end does."""

    def __init__(
        self, ds: Dataset, item_tables: ItemTables, index: SIDIndex, cfg: OneRecConfig, split: Split
    ) -> None:
        self.ds, self.item_tables, self.index = ds, item_tables, index
        self.cfg, self.split = cfg, split
        self.events = EventArrays.from_dataset(ds)
        self.static = ds.users[ds.static_feature_columns()].to_numpy(np.int64)
        self._cache: dict[int, dict[str, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.split)

    def _pathways(self, r: int) -> dict[str, np.ndarray]:
        if r not in self._cache:
            split, vectors = self.split, self.item_tables.vectors
            h = self.events.user(int(split.users[r]))
            past = h.head(int(split.history_end[r] - split.history_start[r]))
            compressed = compress_history(vectors[past.items], self.cfg.lifelong_len)
            now = int(h.timestamp[len(past)])
            static = self.static[split.users[r]]
            self._cache[r] = build_pathways(past, now, static, vectors, self.cfg, compressed)
        return self._cache[r]

    def inputs(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """The encoder's batched inputs for split ``rows``."""
        batch = collate([self._pathways(int(r)) for r in rows])
        return {k: torch.from_numpy(v) for k, v in batch.items()}

    def exclude(self, rows: np.ndarray) -> np.ndarray:
        """(B, E) leaves of each row's seen items, -1 padded."""
        items = self.ds.item_index()
        seen = [
            self.item_tables.sids[items[self.split.history_start[r] : self.split.history_end[r]]]
            for r in rows
        ]
        return exclude_leaves(self.index.trie, seen)


@torch.no_grad()
def pscores(
    reward: RewardModel, inputs: dict[str, torch.Tensor], items: np.ndarray
) -> torch.Tensor:
    """(B, G) P-Score of items (rows, -1 = none: scored 0) for the users of ``inputs``."""
    tokens = torch.from_numpy(np.maximum(items, 0) + 1)
    short = inputs["short_items"][:, : reward.cfg.short_len]
    _, score = reward.scores(inputs["static"], short, inputs["pos_items"], tokens)
    return torch.where(torch.from_numpy(items >= 0), score, 0.0)


# --- the objectives ------------------------------------------------------------------------


def sid_logits(model: OneRec, inputs: dict[str, torch.Tensor], sids: torch.Tensor) -> torch.Tensor:
    """(B, G, L, K) each level's logits along the (B, G, L) SIDs, teacher-forced."""
    memory, keep = model.encoder(**inputs)
    h = model.decoder.hidden(sids[..., :-1], model.decoder.cross_kv(memory), keep)  # (B,G,L,d)
    return torch.stack([head(h[:, :, i]) for i, head in enumerate(model.decoder.heads)], 2)


def sid_logp(logits: torch.Tensor, sids: torch.Tensor) -> torch.Tensor:
    """(B, G) log-probability of each SID: log-softmax over all K codes, summed over levels."""
    return F.log_softmax(logits, -1).gather(-1, sids[..., None])[..., 0].sum(-1)


def path_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """(B, G) KL(policy || reference) of each level's code distribution, summed over levels."""
    logp, ref = F.log_softmax(logits, -1), F.log_softmax(ref_logits, -1)
    return (logp.exp() * (logp - ref)).sum(-1).sum(-1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """(B, G) mean per-level entropy of the code distributions along each path."""
    logp = F.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1).mean(-1)


def group_advantages(reward: torch.Tensor, valid: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(B, G) rewards normalised within each user's group (mean 0, std 1 over its valid SIDs)."""
    n = valid.sum(1, keepdim=True).clamp(min=1)
    mean = (reward * valid).sum(1, keepdim=True) / n
    std = (((reward - mean) ** 2 * valid).sum(1, keepdim=True) / n).sqrt()
    return torch.where(valid, (reward - mean) / (std + eps), 0.0)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def ppo_objective(
    logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, eps: float, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate as a loss, and the share of ratios outside [1 - eps, 1 + eps]."""
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)
    clipped = ((ratio - 1).abs() > eps).float()
    return -_masked_mean(surrogate, mask), _masked_mean(clipped, mask).detach()


def ecpo_objective(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    eps: float,
    delta: float,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ECPO: where the advantage is negative, the old policy's probability is raised to at
    least the current one over ``1 + delta`` (stop-gradient), which bounds the ratio by
    ``1 + delta`` while keeping its gradient; then PPO's clip applies."""
    floor = logp.detach() - math.log1p(delta)
    old = torch.where(adv < 0, torch.maximum(old_logp, floor), old_logp)
    return ppo_objective(logp, old, adv, eps, mask)


def dpo_loss(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    reward: torch.Tensor,
    valid: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """DPO on each user's best (chosen) and worst (rejected) P-Score of the group."""
    chosen = reward.masked_fill(~valid, -math.inf).argmax(1, keepdim=True)
    rejected = reward.masked_fill(~valid, math.inf).argmin(1, keepdim=True)
    ratio = logp - ref_logp
    margin = ratio.gather(1, chosen) - ratio.gather(1, rejected)
    return -F.logsigmoid(beta * margin).mean()


# --- the loop ------------------------------------------------------------------------------


@dataclass
class Aligner:
    """What the loop reads: the policy it moves, the frozen reference, the reward model,
    the users, and the logged positives for the mixed-in next-token loss."""

    policy: OneRec
    reference: OneRec
    reward: RewardModel
    states: UserStates
    index: SIDIndex
    ntp: SampleSource | None
    ntp_rows: np.ndarray  # samples of ``ntp`` whose target is a logged positive

    def step(self, rows: np.ndarray, cfg: AlignConfig, opt, rng: np.random.Generator) -> dict:
        """One sampled batch, ``cfg.inner_steps`` updates; returns the step's measurements."""
        inputs = self.states.inputs(rows)
        self.policy.eval()
        sids_np, valid_np = sample_group(
            self.policy,
            inputs,
            self.index.trie,
            cfg.group,
            self.states.exclude(rows),
            cfg.search,
            rng,
        )
        reward = pscores(self.reward, inputs, first_items(self.index, sids_np, valid_np))
        valid = torch.from_numpy(valid_np)
        sids = torch.from_numpy(np.maximum(sids_np, 0))
        adv = group_advantages(reward, valid)
        with torch.no_grad():
            ref_logits = sid_logits(self.reference, inputs, sids)
        ntp = None
        if self.ntp is not None and cfg.ntp_weight > 0 and len(self.ntp_rows):
            ntp_inputs, targets, _ = self.ntp.batch(rng.choice(self.ntp_rows, cfg.ntp_batch))
            ntp = (ntp_inputs, targets)
        old = None
        self.policy.train()  # the fused attention kernel; the default config has no dropout
        for _ in range(cfg.inner_steps):
            logits = sid_logits(self.policy, inputs, sids)
            logp = sid_logp(logits, sids)
            old = logp.detach() if old is None else old
            kl = path_kl(logits, ref_logits)
            clip = torch.zeros(())
            if cfg.method == "ecpo":
                loss, clip = ecpo_objective(logp, old, adv, cfg.clip_eps, cfg.delta, valid)
            elif cfg.method == "grpo":
                loss, clip = ppo_objective(logp, old, adv, cfg.clip_eps, valid)
                loss = loss + cfg.kl_beta * _masked_mean(kl, valid)
            else:
                loss = dpo_loss(logp, sid_logp(ref_logits, sids), reward, valid, cfg.dpo_beta)
            ntp_loss = torch.zeros(())
            if ntp is not None:
                ntp_loss = self.policy.losses(*ntp)["sid"]
                loss = loss + cfg.ntp_weight * ntp_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), 1.0)
            opt.step()
            for moe in self.policy.moe_layers():  # routing stays as pre-trained
                moe.load.zero_()
        self.policy.eval()
        return {
            "reward": float(_masked_mean(reward, valid)),
            "kl": float(_masked_mean(kl.detach(), valid)),
            "clip_fraction": float(clip),
            "entropy": float(_masked_mean(entropy(logits.detach()), valid)),
            "loss": float(loss.detach()),
            "ntp_loss": float(ntp_loss.detach()),
        }

    def legality(self, rows: np.ndarray, width: int, chunk: int = 32) -> float:
        """Share of legal unconstrained beams over ``rows`` (see :func:`legal_share`)."""
        self.policy.eval()
        shares = [
            legal_share(
                self.policy, self.states.inputs(rows[lo : lo + chunk]), self.index.trie, width
            )
            for lo in range(0, len(rows), chunk)
        ]
        return float(np.mean(shares))


def run(
    aligner: Aligner, cfg: AlignConfig, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """The RL loop for ``cfg.steps`` steps or ``cfg.minutes``; returns per-step curves and
    the legality of unconstrained beams before and after."""
    if cfg.method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {cfg.method!r}")
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    for p in aligner.reference.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(aligner.policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    n = len(aligner.states)
    legal_rows = np.sort(rng.choice(n, min(cfg.legal_users, n), replace=False))
    before = aligner.legality(legal_rows, cfg.legal_width)
    started = time.monotonic()
    curves: list[dict[str, float]] = []
    for step in range(cfg.steps):
        rows = rng.choice(n, min(cfg.users_per_step, n), replace=False)
        curves.append(aligner.step(rows, cfg, opt, rng))
        if progress is not None:
            progress(
                f"{cfg.method} step {step + 1}/{cfg.steps}: "
                + ", ".join(f"{k} {v:.4f}" for k, v in curves[-1].items())
            )
        if time.monotonic() - started > 60 * cfg.minutes:
            log.warning("stopping at the %.1f-minute budget after %d steps", cfg.minutes, step + 1)
            break
    aligner.policy.eval()
    return {
        "config": asdict(cfg),
        "steps": len(curves),
        "seconds": time.monotonic() - started,
        "legal_unconstrained_before": before,
        "legal_unconstrained_after": aligner.legality(legal_rows, cfg.legal_width),
        "first_reward": curves[0]["reward"],
        "final_reward": float(np.mean([c["reward"] for c in curves[-5:]])),  # last 5 steps
        "final_kl": float(np.mean([c["kl"] for c in curves[-5:]])),
        "curves": curves,
    }


def positive_samples(source: SampleSource, ds: Dataset) -> np.ndarray:
    """Samples of ``source`` whose (first) target event is a logged positive."""
    positive = is_positive(engagement_score(ds.events))
    return np.flatnonzero(positive[source.events.offsets[source.users] + source.cuts])


def reward_model(
    artifacts: Path, ds: Dataset, item_tables: ItemTables, index: SIDIndex
) -> RewardModel:
    """The artefact's reward model, trained first (``onerec reward``'s defaults) if missing."""
    path = artifacts / "model" / REWARD_FILE
    if not path.is_file():
        log.warning("%s missing: training the reward model first", path)
        fit_reward(artifacts, RewardConfig())
    return load_reward(path, ds, item_tables, index.trie.codebook_size)


def save_aligned(model: OneRec, path: Path, result: dict[str, Any]) -> None:
    """checkpoint.pt's format (``model``, ``model_config``), plus the run's summary."""
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = {k: v for k, v in result.items() if k != "curves"}
    torch.save(
        {"model": model.state_dict(), "model_config": asdict(model.cfg), "align": summary}, path
    )
    path.with_suffix(".json").write_text(json.dumps(result, indent=2))


def plot_curves(runs: dict[str, list[dict[str, float]]], path: Path) -> Path:
    """One panel per logged quantity, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.2))
    for ax, key in zip(axes, CURVES, strict=True):
        for name, curves in runs.items():
            ax.plot([c[key] for c in curves], label=name)
        ax.set(xlabel="step", title=key)
    axes[0].legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def align_artifacts(
    artifacts: Path,
    cfg: AlignConfig,
    name: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Align the generator of a trained artefact directory; store it as
    ``model/aligned_<name>.pt`` (``name`` defaults to the method) with its curves beside it
    (``.json``, ``.png``)."""
    from onerec.experiment import load_item_tables, load_model, test_events, validation_split

    ds, item_tables, index = load_item_tables(artifacts)
    policy = load_model(artifacts, item_tables)
    reference = load_model(artifacts, item_tables)
    held = test_events(artifacts)
    states = UserStates(
        ds, item_tables, index, policy.cfg, validation_split(ds, held, max_users=ds.n_users)
    )
    source = SampleSource(
        ds, item_tables, policy.cfg, 8, cfg.seed, validation=True, test_events=held
    )
    aligner = Aligner(
        policy,
        reference,
        reward_model(artifacts, ds, item_tables, index),
        states,
        index,
        source,
        positive_samples(source, ds),
    )
    result = run(aligner, cfg, progress)
    path = aligned_path(artifacts, name or cfg.method)
    save_aligned(policy, path, result)
    plot_curves({name or cfg.method: result["curves"]}, path.with_suffix(".png"))
    return path, result
