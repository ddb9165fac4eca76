"""Reference recommenders the generative model must beat: popularity and SASRec.

Both are trained on each user's history before the held-out event of a
:class:`~onerec.metrics.Split` and score every item, so they plug into
:func:`onerec.metrics.evaluate_scorer`.

SASRec follows Kang & McAuley (2018) and the layout of its reference PyTorch port
(pmixer/SASRec.pytorch): a scaled item embedding plus a learned positional embedding, blocks
of "layer-normed query, attention, residual from the normed query, layer norm, point-wise
feed-forward with residual", a final layer norm, and logits from the shared item embedding.
One deliberate change: the loss is a full softmax cross-entropy over all items at every
position instead of binary cross-entropy against one sampled negative. On catalogs of up to a
few ten thousand items it is affordable and clearly stronger, so the bar it sets for the
generative model is an honest one. Padded keys are masked out of attention (the reference
lets them in as zero vectors).

Item index ``i`` of the catalog is token ``i + 1``; token 0 is padding. Sequences are padded
on the left, so the last position always holds the most recent item.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from onerec.data.schema import Dataset
from onerec.event_arrays import windows
from onerec.metrics import Split


class PopularityModel:
    """Scores every item by its count in the training events, the same for every user."""

    def __init__(self, counts: np.ndarray) -> None:
        self.counts = counts.astype(np.float32)  # (I,)

    @classmethod
    def fit(cls, ds: Dataset, split: Split) -> PopularityModel:
        """Count all events except the held-out ones (users without a split row count fully)."""
        counts = np.bincount(ds.item_index(), minlength=ds.n_items)
        counts -= np.bincount(split.target_items, minlength=ds.n_items)
        return cls(counts)

    def scores(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), I) scores; ``rows`` index the split, as evaluate_scorer passes them."""
        return np.tile(self.counts, (len(rows), 1))


@dataclass
class SASRecConfig:
    """The paper's settings, except hidden 64 (it used 50) and the full-softmax loss."""

    n_items: int
    maxlen: int = 200
    hidden: int = 64
    n_blocks: int = 2
    n_heads: int = 1
    dropout: float = 0.2
    lr: float = 1e-3
    batch_size: int = 128


class CausalSelfAttention(nn.Module):
    """Multi-head attention with separate query and key/value inputs, as in the reference."""

    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.n_heads, self.dropout = cfg.n_heads, cfg.dropout
        self.q = nn.Linear(cfg.hidden, cfg.hidden)
        self.kv = nn.Linear(cfg.hidden, 2 * cfg.hidden)
        self.out = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, query: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        q = self.q(query).view(b, t, self.n_heads, -1).transpose(1, 2)  # (B, nh, T, hd)
        k, v = self.kv(x).view(b, t, 2, self.n_heads, -1).permute(2, 0, 3, 1, 4)  # (B, nh, T, hd)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, nh, T, hd)
        return self.out(y.transpose(1, 2).reshape(b, t, h))  # (B, T, H)


class PointWiseFeedForward(nn.Module):
    """Two position-wise linear layers (the reference's 1x1 convolutions) with a residual."""

    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden, cfg.hidden)
        self.fc2 = nn.Linear(cfg.hidden, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.fc2(F.relu(self.drop(self.fc1(x)))))  # (B, T, H)


class Block(nn.Module):
    """One SASRec block; the residual of attention starts from the layer-normed query."""

    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.hidden, eps=1e-8)
        self.attn = CausalSelfAttention(cfg)
        self.ffn_norm = nn.LayerNorm(cfg.hidden, eps=1e-8)
        self.ffn = PointWiseFeedForward(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        q = self.attn_norm(x)  # (B, T, H)
        x = q + self.attn(q, x, mask)
        x = self.ffn(self.ffn_norm(x))
        return x * keep  # padded positions stay zero


class SASRec(nn.Module):
    """Self-attentive sequential recommender: next-item logits at every position."""

    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.item_emb = nn.Embedding(cfg.n_items + 1, cfg.hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.maxlen + 1, cfg.hidden, padding_idx=0)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_blocks))
        self.last_norm = nn.LayerNorm(cfg.hidden, eps=1e-8)
        self.train_losses: list[float] = []  # mean loss per epoch, filled by train_sasrec
        self.train_seconds = 0.0
        for p in self.parameters():  # the reference's init: Xavier normal for every matrix
            if p.dim() > 1:
                nn.init.xavier_normal_(p)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
            self.pos_emb.weight[0].zero_()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Hidden state after each position of left-padded ``tokens`` (B, T) -> (B, T, H)."""
        t = tokens.shape[1]
        keep = tokens != 0  # (B, T)
        # Position = slot in the window (1..T), 0 on padding: the latest item is always T.
        pos = torch.arange(1, t + 1, device=tokens.device) * keep  # (B, T)
        x = self.item_emb(tokens) * math.sqrt(self.cfg.hidden) + self.pos_emb(pos)
        x = self.drop(x) * keep[..., None]  # (B, T, H)
        causal = torch.ones(t, t, dtype=torch.bool, device=tokens.device).tril()
        # Attend to earlier real items; a padded query attends to itself only (no NaN rows).
        mask = (causal & keep[:, None, :]) | torch.eye(t, dtype=torch.bool, device=tokens.device)
        mask = mask[:, None]  # (B, 1, T, T)
        for block in self.blocks:
            x = block(x, mask, keep[..., None])
        return self.last_norm(x)  # (B, T, H)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores of every catalog item from hidden states (..., H) -> (..., I)."""
        return hidden @ self.item_emb.weight[1:].T


def train_sasrec(
    ds: Dataset,
    split: Split,
    config: SASRecConfig,
    epochs: int,
    seed: int = 0,
    progress: bool = True,
    device: str | torch.device = "cpu",
    min_seconds: float = 0.0,
    max_epochs: int = 200,
) -> SASRec:
    """Train on each split user's history before the held-out event.

    One sample per user and epoch: the last ``maxlen + 1`` history items, giving next-item
    targets at ``maxlen`` positions, so heavy users weigh no more than a full window. On the
    CPU, the same seed and thread count give the same weights (GPU kernels may not).

    ``epochs`` are always run; with ``min_seconds`` training goes on, epoch by epoch (up to
    ``max_epochs``, the paper's 200), until that much wall time has passed, so a comparison
    can give SASRec at least the time the model it is compared with had.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = SASRec(config).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, betas=(0.9, 0.98))
    items = ds.item_index()
    seqs = windows(items, split.history_start, split.history_end, config.maxlen + 1)
    seqs = seqs[(seqs[:, -2:] != 0).all(axis=1)]  # at least one (input, target) pair
    model.train()
    started = time.perf_counter()

    def more() -> Iterator[int]:
        epoch = 0
        while epoch < epochs or (
            epoch < max_epochs and time.perf_counter() - started < min_seconds
        ):
            yield epoch
            epoch += 1

    bar = tqdm(more(), desc="sasrec", disable=not progress)
    for _ in bar:
        total, count, tic = 0.0, 0, time.perf_counter()
        order = rng.permutation(len(seqs))
        for lo in range(0, len(seqs), config.batch_size):
            batch = torch.from_numpy(seqs[order[lo : lo + config.batch_size]]).to(device)
            inputs, targets = batch[:, :-1], batch[:, 1:]  # (B, T) from (B, T + 1)
            real = (inputs != 0) & (targets != 0)
            hidden = model(inputs)[real]  # (N, H) only positions with a next item
            loss = F.cross_entropy(model.logits(hidden), targets[real] - 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, count = total + loss.item() * len(hidden), count + len(hidden)
        model.train_losses.append(total / max(count, 1))
        bar.set_postfix(loss=f"{model.train_losses[-1]:.3f}", s=f"{time.perf_counter() - tic:.1f}")
    model.train_seconds = time.perf_counter() - started
    model.eval()
    return model


@torch.no_grad()
def sasrec_scores(model: SASRec, ds: Dataset, split: Split, rows: np.ndarray) -> np.ndarray:
    """(len(rows), I) next-item scores from the last ``maxlen`` history items of each row."""
    model.eval()
    rows = np.asarray(rows)
    seqs = windows(
        ds.item_index(), split.history_start[rows], split.history_end[rows], model.cfg.maxlen
    )
    device = model.item_emb.weight.device
    hidden = model(torch.from_numpy(seqs).to(device))[:, -1]  # (b, H) after the latest item
    return model.logits(hidden).cpu().numpy()
