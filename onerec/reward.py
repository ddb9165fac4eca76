"""The reward model, OneRec's P-Score: how much a user will engage with an item, learned
from multi-behaviour feedback.

It predicts, for a (user, item) exposure, one head per behaviour: the watch term of the
engagement formula (the clipped watch ratio, scaled to [0, 1]) and the probabilities of
click, like, follow, comment, forward and hate. The heads are fused into one **P-Score**
by the documented formula of :mod:`onerec.runtime.engagement` applied to the predicted
values. That formula is linear in the clipped watch ratio and in the flags, so the P-Score
is the model's estimate of the *expected* engagement score, on the scale that defines
positive feedback; no fusion weights are learned that could drift from it.

**User side: a lighter tower than the generator's encoder.** The generator's encoder
reads four pathways and a lifelong QFormer; scoring 512 beams must cost a fraction of a
request, and the reward has to be trained on every logged exposure at the history before
it, which the encoder cannot afford on CPU. The tower reads what a request already holds:
the static profile, the short-term pathway's items and the newest positive-feedback items,
plus target attention from each candidate over the short-term items (DIN-style), so a
candidate like the last few watched scores higher.

**Item side** is the item's ID embedding plus its side information (SID codes per level,
author, tag, content vector), as the generator's ranking head builds it: items that share
codes share rows, so rare items borrow from their neighbours. It depends on the item
alone, so serving can precompute it per catalog version.

**Split.** The reward model trains on every logged exposure except each user's last
``HOLDOUT`` events, which hold the generator's own held-out events; its AUCs are measured
on those, each against the history before it.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import mannwhitneyu
from torch import nn

from onerec.data.schema import FLAGS, Dataset
from onerec.event_arrays import windows
from onerec.runtime.engagement import (
    HEAD_WEIGHTS,
    HEADS,
    WATCH_CAP,
    engagement_score,
    is_positive,
    watch_ratio,
)
from onerec.runtime.reward import RewardMeta
from onerec.train import ItemTables
from onerec.train_config import RewardConfig

log = logging.getLogger(__name__)

HOLDOUT = 5  # each user's last events: the reward model never trains on them
REWARD_FILE = "reward.pt"  # in an artefact directory's model/


class RewardModel(nn.Module):
    """Heads' logits for candidate items of users; see the module docstring."""

    def __init__(
        self,
        cfg: RewardConfig,
        static_cardinalities: tuple[int, ...],
        item_tables: ItemTables,
        codebook_size: int,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d
        tables = item_tables.model_tables()  # token-indexed: 0 pad, n + 1 unknown
        vectors, author, tag, sids = tables
        self.n_items = len(item_tables.sids)
        levels = sids.shape[1]
        none = levels * codebook_size
        codes = sids.long() + codebook_size * torch.arange(levels)
        codes[0] = codes[-1] = none
        self.register_buffer("item_codes", codes, persistent=False)
        self.register_buffer("item_vectors", vectors.float(), persistent=False)
        self.register_buffer("item_author", author.long(), persistent=False)
        self.register_buffer("item_tag", tag.long(), persistent=False)
        self.items = nn.Embedding(self.n_items + 2, d, padding_idx=0)
        self.codes = nn.Embedding(none + 1, d, padding_idx=none)
        self.vector = nn.Linear(vectors.shape[1], d, bias=False)
        self.author = nn.Embedding(int(author.max()) + 1, d, padding_idx=0)
        self.tag = nn.Embedding(int(tag.max()) + 1, d, padding_idx=0)
        offsets = np.concatenate([[0], np.cumsum(static_cardinalities)[:-1]])
        self.register_buffer("static_offsets", torch.as_tensor(offsets, dtype=torch.long))
        self.static = nn.Embedding(max(1, int(sum(static_cardinalities))), d)
        self.user_mlp = nn.Sequential(nn.Linear(3 * d, d), nn.ReLU(), nn.LayerNorm(d))
        self.head = nn.Sequential(
            nn.Linear(5 * d, cfg.hidden),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, cfg.hidden),
            nn.ReLU(),
            nn.Linear(cfg.hidden, len(HEADS)),
        )
        self.register_buffer("fusion", torch.from_numpy(HEAD_WEIGHTS))
        for emb in (self.items, self.codes, self.author, self.tag, self.static):
            nn.init.normal_(emb.weight, std=0.02)
            if emb.padding_idx is not None:
                emb.weight.data[emb.padding_idx].zero_()

    def item_table(self) -> torch.Tensor:
        """(n_items + 2, d): every item token's vector; per catalog, not per request."""
        return (
            self.items.weight
            + self.vector(self.item_vectors)
            + self.author(self.item_author)
            + self.tag(self.item_tag)
            + self.codes(self.item_codes).sum(-2)
        )

    def forward(
        self,
        static: torch.Tensor,  # (B, F) profile codes
        short_items: torch.Tensor,  # (B, S) item tokens, newest first, 0 = padding
        pos_items: torch.Tensor,  # (B, P) the same for positive feedback
        candidates: torch.Tensor,  # (B, M) item tokens
    ) -> torch.Tensor:
        """(B, M, len(HEADS)) logits."""
        return self.logits(self.item_table(), static, short_items, pos_items, candidates)

    def logits(
        self,
        table: torch.Tensor,
        static: torch.Tensor,
        short_items: torch.Tensor,
        pos_items: torch.Tensor,
        candidates: torch.Tensor,
    ) -> torch.Tensor:
        """:meth:`forward` with the item table given (precomputed, when serving)."""
        pos_items = pos_items[:, : self.cfg.pos_len]  # a request carries up to 256
        short = table[short_items]  # (B, S, d)
        short_mask = (short_items > 0).unsqueeze(-1)
        pos_mask = (pos_items > 0).unsqueeze(-1)
        short_mean = (short * short_mask).sum(1) / short_mask.sum(1).clamp(min=1)
        pos_mean = (table[pos_items] * pos_mask).sum(1) / pos_mask.sum(1).clamp(min=1)
        profile = self.static(static + self.static_offsets).sum(1)
        user = self.user_mlp(torch.cat([profile, short_mean, pos_mean], -1))  # (B, d)
        item = table[candidates]  # (B, M, d)
        logits = item @ short.transpose(1, 2) / math.sqrt(self.cfg.d)  # (B, M, S)
        logits = logits.masked_fill(~short_mask.transpose(1, 2), -1e4)
        attended = torch.softmax(logits, -1) @ short  # (B, M, d)
        user = user.unsqueeze(1).expand_as(item)
        x = torch.cat([user, item, user * item, attended, attended * item], -1)
        return self.head(x)

    def scores(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each head's predicted value (B, M, H) and the P-Score (B, M)."""
        heads = torch.sigmoid(self(*inputs))
        return heads, heads @ self.fusion


class ServedReward(nn.Module):
    """The reward model as served: the item table computed once (per catalog, at export),
    so a request pays only for its user and its candidates. Inputs are the request's
    ``static``, ``short_items`` and ``pos_items`` pathways and the candidates' item
    tokens; outputs each head's value and the P-Score."""

    def __init__(self, model: RewardModel) -> None:
        super().__init__()
        self.model = model.eval()
        self.register_buffer("table", model.item_table().detach())

    def forward(
        self,
        static: torch.Tensor,
        short_items: torch.Tensor,
        pos_items: torch.Tensor,
        candidates: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model.logits(self.table, static, short_items, pos_items, candidates)
        heads = torch.sigmoid(logits)
        return heads, heads @ self.model.fusion


@dataclass
class Exposures:
    """Logged exposures with the history before each, as the reward model reads them."""

    static: np.ndarray  # (N, F)
    short_items: np.ndarray  # (N, S) newest first
    pos_items: np.ndarray  # (N, P) newest first
    items: np.ndarray  # (N,) item token of the exposure
    targets: np.ndarray  # (N, H) float32: the watch term, then the flags

    def __len__(self) -> int:
        return len(self.items)

    def tensors(self, rows: np.ndarray) -> tuple[torch.Tensor, ...]:
        return tuple(
            torch.from_numpy(a[rows])
            for a in (self.static, self.short_items, self.pos_items, self.items[:, None])
        )


class ExposureLog:
    """A data set's events as exposures: features of any event from the events before it,
    with no per-event Python work."""

    def __init__(self, ds: Dataset, cfg: RewardConfig) -> None:
        ev = ds.events
        self.cfg = cfg
        self.item = ds.item_index().astype(np.int64)
        user = ds.user_index()
        self.user = user
        self.start = np.searchsorted(user, np.arange(ds.n_users + 1))
        self.static = ds.users[ds.static_feature_columns()].to_numpy(np.int64)
        ratio = watch_ratio(ev["watch_ms"].to_numpy(), ev["duration_ms"].to_numpy())
        watch = np.clip(ratio, 0.0, WATCH_CAP) / WATCH_CAP
        flags = ev[list(FLAGS)].to_numpy(np.float32)
        self.targets = np.column_stack([watch, flags]).astype(np.float32)
        self.positive = np.flatnonzero(is_positive(engagement_score(ev)))
        self.engagement = engagement_score(ev)
        counts = np.diff(self.start)
        held = np.minimum(HOLDOUT, counts // 2)  # the last events of each user
        self.test_from = (self.start[1:] - held)[user]  # per event: its user's first test row
        rows = np.arange(len(user))
        self.train_rows = rows[rows < self.test_from]
        self.test_rows = rows[rows >= self.test_from]

    def exposures(self, rows: np.ndarray) -> Exposures:
        """Features of events ``rows`` (indices into the events), each from its history."""
        cfg, start = self.cfg, self.start[self.user[rows]]
        short = windows(self.item, start, rows, cfg.short_len)[:, ::-1]
        # The user's positives before each row: a window over the positives' own array.
        first_pos = np.searchsorted(self.positive, start)
        end_pos = np.searchsorted(self.positive, rows)
        pos_items = self.item[self.positive]
        pos = windows(pos_items, first_pos, end_pos, cfg.pos_len)[:, ::-1]
        return Exposures(
            self.static[self.user[rows]],
            np.ascontiguousarray(short),
            np.ascontiguousarray(pos),
            self.item[rows] + 1,
            self.targets[rows],
        )


def build_reward_model(
    ds: Dataset, item_tables: ItemTables, codebook_size: int, cfg: RewardConfig
) -> RewardModel:
    static = ds.users[ds.static_feature_columns()]
    cards = tuple(int(static[c].max()) + 1 for c in static.columns)
    return RewardModel(cfg, cards, item_tables, codebook_size)


def train_reward(
    model: RewardModel,
    log_: ExposureLog,
    progress: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Multi-task training on the training exposures: the mean of the heads' binary
    cross-entropies (the watch head's target is its soft [0, 1] value), within the
    config's epochs and minutes."""
    cfg = model.cfg
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-5)
    started, steps, loss_sum = time.monotonic(), 0, 0.0
    out_of_time = False
    epochs_done = 0
    for epoch in range(cfg.epochs):
        model.train()
        rows = rng.permutation(log_.train_rows)[: cfg.events_per_epoch]
        for lo in range(0, len(rows), cfg.batch_size):
            batch = log_.exposures(rows[lo : lo + cfg.batch_size])
            logits = model(*batch.tensors(np.arange(len(batch))))[:, 0]
            loss = F.binary_cross_entropy_with_logits(logits, torch.from_numpy(batch.targets))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            loss_sum += loss.item()
            if time.monotonic() - started > 60 * cfg.minutes:
                out_of_time = True
                break
        epochs_done = epoch + 1
        if progress is not None:
            progress(f"reward epoch {epoch + 1}: loss {loss_sum / max(steps, 1):.4f}")
        if out_of_time:
            break
    model.eval()
    return {
        "steps": steps,
        "epochs": epochs_done,
        "seconds": time.monotonic() - started,
        "final_loss": loss_sum / max(steps, 1),
    }


@torch.no_grad()
def predict(model: RewardModel, exposures: Exposures, chunk: int = 4096) -> np.ndarray:
    """(N, H) predicted head values of logged exposures."""
    model.eval()
    out = []
    for lo in range(0, len(exposures), chunk):
        rows = np.arange(lo, min(lo + chunk, len(exposures)))
        out.append(torch.sigmoid(model(*exposures.tensors(rows)))[:, 0].numpy())
    return np.concatenate(out) if out else np.zeros((0, len(HEADS)), np.float32)


def auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC (Mann-Whitney, ties counted half); None where only one class occurs."""
    labels = np.asarray(labels, bool)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    scores = np.asarray(scores)
    u = mannwhitneyu(scores[labels], scores[~labels], method="asymptotic").statistic
    return float(u / (n_pos * n_neg))


def auc_se(a: float, n_pos: int, n_neg: int) -> float:
    """Standard error of an AUC (Hanley and McNeil, 1982): with a few dozen positives,
    as on the KuaiRand sample, a gap of 0.05 can be noise."""
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg)
    return float(math.sqrt(max(var, 0.0)))


def head_aucs(log_: ExposureLog, predicted: np.ndarray) -> dict[str, dict[str, float | None]]:
    """Per head, on the held-out exposures: the head's own AUC, the P-Score's, and that of
    the fixed engagement formula as a scorer: each item's mean formula score over its
    training exposures (the global mean for an item never trained on), which is what a
    system without a learned reward could rank by. The watch head's label is a watch
    beyond half the cap (0.75 plays); ``positive`` is the engagement rule's own label."""
    test = log_.test_rows
    targets = log_.targets[test]
    train = log_.train_rows
    n_items = int(log_.item.max()) + 1
    sums = np.bincount(log_.item[train], log_.engagement[train], minlength=n_items)
    counts = np.bincount(log_.item[train], minlength=n_items)
    mean = log_.engagement[train].mean() if len(train) else 0.0
    item_score = np.where(counts > 0, sums / np.maximum(counts, 1), mean)[log_.item[test]]
    pscore = predicted @ HEAD_WEIGHTS
    labels = {h: targets[:, i] > (0.5 if h == "watch" else 0.0) for i, h in enumerate(HEADS)}
    labels["positive"] = is_positive(log_.engagement[test])
    out: dict[str, dict[str, float | None]] = {}
    for i, (name, label) in enumerate(labels.items()):
        scorers = {"pscore": pscore, "formula_item_mean": item_score}
        if name != "positive":
            scorers = {"head": predicted[:, i], **scorers}
        row: dict[str, float | None] = {k: auc(label, v) for k, v in scorers.items()}
        n_pos = int(label.sum())
        row |= {"positives": n_pos, "exposures": len(label)}
        main = row.get("head", row["pscore"])
        row["se"] = None if main is None else auc_se(main, n_pos, len(label) - n_pos)
        out[name] = row
    return out


def save_reward(model: RewardModel, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": asdict(model.cfg), "state": model.state_dict()}, path)


def load_reward(
    path: Path, ds: Dataset, item_tables: ItemTables, codebook_size: int
) -> RewardModel:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model = build_reward_model(ds, item_tables, codebook_size, RewardConfig(**saved["config"]))
    model.load_state_dict(saved["state"])
    return model.eval()


def fit_reward(
    artifacts: Path, cfg: RewardConfig, progress: Callable[[str], None] | None = None
) -> tuple[RewardModel, dict]:
    """Train the reward model of a built artefact directory on its training exposures,
    store it as ``model/reward.pt`` and measure it on the held-out ones."""
    from onerec.experiment import load_item_tables

    ds, item_tables, index = load_item_tables(artifacts)
    exposures = ExposureLog(ds, cfg)
    model = build_reward_model(ds, item_tables, index.trie.codebook_size, cfg)
    result = train_reward(model, exposures, progress)
    save_reward(model, artifacts / "model" / REWARD_FILE)
    predicted = predict(model, exposures.exposures(exposures.test_rows))
    result |= {
        "train_exposures": len(exposures.train_rows),
        "test_exposures": len(exposures.test_rows),
        "aucs": head_aucs(exposures, predicted),
        "config": asdict(cfg),
    }
    return model, result


def export_reward(model: RewardModel, path: Path) -> Path:
    """Write ``reward.onnx`` (:class:`ServedReward`; batch, history and candidate counts
    are dynamic axes)."""
    from onerec.export import OPSET
    from onerec.runtime.onnx_runners import REWARD_INPUTS

    served = ServedReward(model).eval()
    b, n_static = 2, len(model.static_offsets)
    example = (
        torch.zeros(b, n_static, dtype=torch.long),
        torch.ones(b, 3, dtype=torch.long),
        torch.ones(b, 4, dtype=torch.long),
        torch.ones(b, 5, dtype=torch.long),
    )
    axes = {
        "static": {0: "batch"},
        "short_items": {0: "batch", 1: "short_len"},
        "pos_items": {0: "batch", 1: "pos_len"},
        "candidates": {0: "batch", 1: "candidates"},
        "heads": {0: "batch", 1: "candidates"},
        "pscore": {0: "batch", 1: "candidates"},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter's notice
        torch.onnx.export(
            served,
            example,
            path,
            input_names=list(REWARD_INPUTS),
            output_names=["heads", "pscore"],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
    return path


@torch.no_grad()
def reward_parity(model: RewardModel, runner, exposures: Exposures, width: int = 64) -> float:
    """Max |diff| of heads and P-Score between torch and ``runner`` (an
    :class:`~onerec.runtime.onnx_runners.OnnxReward`) on logged users, each scoring
    ``width`` candidates (its logged item and random others)."""
    rng = np.random.default_rng(0)
    n = len(exposures)
    candidates = rng.integers(1, model.n_items + 1, (n, width))
    candidates[:, 0] = exposures.items
    inputs = (exposures.static, exposures.short_items, exposures.pos_items, candidates)
    heads_t, pscore_t = model.scores(*(torch.from_numpy(np.ascontiguousarray(a)) for a in inputs))
    heads, pscore = runner.score(*inputs)
    return float(
        max(np.abs(heads - heads_t.numpy()).max(), np.abs(pscore - pscore_t.numpy()).max())
    )


def reward_meta(model: RewardModel, blend: float) -> RewardMeta:
    """What serving reads beside ``reward.onnx``."""
    cards = np.diff(np.r_[model.static_offsets.numpy(), model.static.num_embeddings])
    return RewardMeta(
        d=model.cfg.d,
        hidden=model.cfg.hidden,
        pos_len=model.cfg.pos_len,
        n_items=model.n_items,
        static_cardinalities=tuple(int(c) for c in cards),
        blend=blend,
    )
