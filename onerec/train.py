"""Training: next-token prediction over the SIDs of the item that follows a time cut.

A sample is (user, cut ``c``): the encoder sees the user's events before ``c``, and the
decoder learns the SIDs of events ``c .. c + targets_per_sample - 1``, each decoded from BOS
on its own (as beams are), so one encoder pass yields several targets, like OneRec's
session-wise generation. Each user's last event (last ``test_events``) is never a target:
it is the held-out item of the evaluation protocol. Cuts are drawn at random per user (up to
``samples_per_user``), so light and heavy users both contribute, and drawn afresh each
epoch, so a long run sees many of a user's cuts rather than the same few again.

The lifelong pathway of a heavy user is compressed once, over the whole training history,
and a sample at cut ``c`` keeps the representatives before ``c``; compressing per sample
would cost a k-means over the whole history for every sample. Evaluation and serving
compress the exact history, so this shortcut only affects which past items training
sees, never the test.

With validation on, the event before the test events is held out as well, and after every
epoch the SID loss on those events decides which weights to keep: past its best epoch the
model memorises the users' own items (docs/findings.md: a longer budget without it
lowered validation recall).

Each batch also carries, per sample, the item tokens of the ``short_len`` events before
its cut and the one at it, for the model's ranking stage (its next-item loss). After the
SID model, :func:`train_ranker` trains that stage alone, on every training event.

AdamW with linear warm-up and cosine decay; checkpoints after every epoch hold model,
optimiser, scheduler and RNG state, and the best epoch's weights, so ``resume=True``
continues where a run stopped.
"""

from __future__ import annotations

import logging
import math
import time
from copy import deepcopy
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from onerec.data.schema import Dataset
from onerec.event_arrays import EventArrays, windows
from onerec.model import NextItemHead, OneRec
from onerec.runtime.config import OneRecConfig
from onerec.runtime.lifelong import Compressed, compress_history
from onerec.runtime.pathways import build_pathways, collate
from onerec.train_config import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class ItemTables:
    """Per-item tables the model needs, built from the data set and its SIDs."""

    vectors: np.ndarray  # (I, dv) frozen tokenizer embeddings
    author: np.ndarray  # (I,) 1-based author code (0 = unknown)
    tag: np.ndarray  # (I,) 1-based tag code
    sids: np.ndarray  # (I, L)

    @classmethod
    def build(cls, ds: Dataset, vectors: np.ndarray, sids: np.ndarray) -> ItemTables:
        author = pd.factorize(ds.items["author_id"].astype(str))[0] + 1
        tag = pd.factorize(ds.items["tag"].astype(str))[0] + 1
        return cls(
            vectors.astype(np.float32),
            author.astype(np.int64),
            tag.astype(np.int64),
            sids.astype(np.int64),
        )

    def model_tables(self) -> tuple[torch.Tensor, ...]:
        """Token-indexed tables: row 0 is padding and the last row an unknown item."""

        def pad(x: np.ndarray) -> torch.Tensor:
            zero = np.zeros((1, *x.shape[1:]), x.dtype)
            return torch.from_numpy(np.concatenate([zero, x, zero]))

        return pad(self.vectors), pad(self.author), pad(self.tag), pad(self.sids)


def model_config(
    ds: Dataset, item_tables: ItemTables, codebook_size: int, **sizes: int
) -> OneRecConfig:
    static = ds.users[ds.static_feature_columns()]
    return OneRecConfig(
        n_items=ds.n_items,
        static_cardinalities=tuple(int(static[c].max()) + 1 for c in static.columns),
        item_vector_dim=item_tables.vectors.shape[1],
        n_authors=int(item_tables.author.max()),
        n_tags=int(item_tables.tag.max()),
        sid_levels=item_tables.sids.shape[1],
        codebook_size=codebook_size,
        **sizes,
    )


def build_model(cfg: OneRecConfig, item_tables: ItemTables) -> OneRec:
    return OneRec(cfg, *item_tables.model_tables())


class SampleSource:
    """Training samples (user, cut) and their pathways."""

    def __init__(
        self,
        ds: Dataset,
        item_tables: ItemTables,
        cfg: OneRecConfig,
        samples_per_user: int,
        seed: int,
        targets_per_sample: int = 1,
        validation: bool = False,
        test_events: int = 1,
    ) -> None:
        self.events = EventArrays.from_dataset(ds)
        self.catalog, self.cfg = item_tables, cfg
        self.targets_per_sample = targets_per_sample
        # Each user's last ``test_events`` are the test items; with validation, the one
        # before them is never a training target either: its loss picks the epoch whose
        # weights are kept.
        self.test_events = test_events
        self.held_out = test_events + int(validation)
        self.static = ds.users[ds.static_feature_columns()].to_numpy(np.int64)
        self.samples_per_user = samples_per_user
        self.draw(np.random.default_rng(seed))
        self._compressed: dict[int, Compressed] = {}

    def draw(self, rng: np.random.Generator) -> None:
        """Draw up to ``samples_per_user`` distinct cuts per user (each epoch calls this).

        With fixed cuts, a small data set replays the same few samples every epoch; fresh
        ones lower the held-out SID loss (docs/findings.md)."""
        users, cuts = [], []
        lengths = np.diff(self.events.offsets)
        for u in np.flatnonzero(lengths >= 2 + self.held_out):  # per user, to draw its cuts
            end = lengths[u] - self.held_out  # the first held-out event
            k = min(end - 1, self.samples_per_user)
            users.append(np.full(k, u))
            cuts.append(rng.choice(np.arange(1, end), size=k, replace=False))
        self.users = np.concatenate(users) if users else np.zeros(0, np.int64)
        self.cuts = np.concatenate(cuts) if cuts else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.users)

    def _lifelong(self, u: int, cut: int) -> Compressed:
        h = self.events.user(u)
        if len(h) - 1 <= self.cfg.lifelong_len:
            return Compressed(np.arange(cut), np.ones(cut, np.int64))
        if u not in self._compressed:
            train = h.head(len(h) - self.test_events)
            self._compressed[u] = compress_history(
                self.catalog.vectors[train.items], self.cfg.lifelong_len
            )
        full = self._compressed[u]
        keep = full.positions < cut
        return Compressed(full.positions[keep], full.weights[keep])

    def batch(self, idx: np.ndarray) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Samples ``idx`` of the current draw: pathways; targets (B, M, L), the next items
        after each cut up to the first held-out event, -1 padded; and, for the model's
        ranking stage, the item tokens of the ``short_len`` events before each cut (the
        short-term pathway's items, oldest first) and the one at it."""
        users, cuts = self.users[idx], self.cuts[idx]
        starts = self.events.offsets[users]
        ends = self.events.offsets[users + 1] - starts - self.held_out
        inputs, targets = self._tensors(
            users, cuts, np.minimum(cuts + self.targets_per_sample, ends)
        )
        length = self.cfg.short_len + 1
        recent = windows(self.events.items, starts, starts + cuts + 1, length)
        return inputs, targets, torch.from_numpy(recent)

    def validation_batches(
        self, batch_size: int
    ) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        """Each user's validation event as the one target after a cut just before it."""
        if self.held_out == self.test_events:
            return []
        lengths = np.diff(self.events.offsets)
        users = np.flatnonzero(lengths >= 1 + self.held_out)
        users = users[np.argsort(lengths[users], kind="stable")]  # similar lengths, less padding
        cuts = lengths[users] - self.held_out
        return [
            self._tensors(
                users[i : i + batch_size], cuts[i : i + batch_size], cuts[i : i + batch_size] + 1
            )
            for i in range(0, len(users), batch_size)
        ]

    def _tensors(
        self, users: np.ndarray, cuts: np.ndarray, stops: np.ndarray
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Pathways before each cut and the SIDs of events ``cut .. stop - 1``, -1 padded."""
        width = int((stops - cuts).max(initial=1))
        samples, targets = [], []
        for u, cut, stop in zip(users.tolist(), cuts.tolist(), stops.tolist(), strict=True):
            h = self.events.user(u)  # one user per sample: batch preparation, outside the model
            past = h.head(cut)
            samples.append(
                build_pathways(
                    past,
                    int(h.timestamp[cut]),
                    self.static[u],
                    self.catalog.vectors,
                    self.cfg,
                    self._lifelong(u, cut),
                )
            )
            sids = np.full((width, self.catalog.sids.shape[1]), -1, np.int64)
            sids[: stop - cut] = self.catalog.sids[h.items[cut:stop]]
            targets.append(sids)
        batch = {k: torch.from_numpy(v) for k, v in collate(samples).items()}
        return batch, torch.from_numpy(np.stack(targets))

    def batches(self, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
        """A fresh draw of cuts, in batches of similar lifelong length (less padding), in
        random order."""
        self.draw(rng)
        lengths = np.minimum(self.cuts, self.cfg.lifelong_len) + rng.random(len(self.cuts))
        order = np.argsort(lengths)
        chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        return [chunks[i] for i in rng.permutation(len(chunks))]


def _schedule(step: int, total: int, warmup: int, time_progress: float = 0.0) -> float:
    """Warm-up, then cosine decay over the steps or over the time budget, whichever runs out
    first, so a run stopped by ``max_minutes`` still ends at a small learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = max((step - warmup) / max(1, total - warmup), time_progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train(
    model: OneRec,
    source: SampleSource,
    cfg: TrainConfig,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, float]:
    """Train in place; returns epochs run, seconds and the moving average of each objective:
    ``"loss"`` is the SID loss, on the scale of ``"validation_loss"``; the next-item
    objective's, when the model has it, is ``"next_item_loss"``."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(source) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    clock = {"started": time.perf_counter(), "before": 0.0}  # seconds of earlier runs

    def elapsed() -> float:
        """Training seconds of this run and of the runs it resumes: one budget for all."""
        return clock["before"] + time.perf_counter() - clock["started"]

    def time_progress() -> float:
        return elapsed() / (60 * cfg.max_minutes)

    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _schedule(s, total, cfg.warmup_steps, time_progress())
    )
    rng = np.random.default_rng(cfg.seed)
    validation = source.validation_batches(cfg.batch_size)
    best: dict = {}  # epoch, loss and weights of the epoch with the lowest validation loss
    start_epoch = 0
    ckpt = Path(checkpoint) if checkpoint else None
    if resume and ckpt and ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        start_epoch = state["epoch"]
        best = state.get("best", {})
        clock["before"] = state.get("seconds", 0.0)
        log.info("resumed from %s at epoch %d", ckpt, start_epoch)

    clock["started"] = time.perf_counter()
    averages: dict[str, float] = {}  # moving average of each objective, for the bar and result
    epoch = start_epoch
    model.train()
    for epoch in range(start_epoch, cfg.epochs):
        bar = tqdm(
            source.batches(cfg.batch_size, rng),
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not progress,
        )
        for idx in bar:
            inputs, targets, recent = source.batch(idx)
            parts = model.losses(inputs, targets, recent)
            loss = sum(parts.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            for moe in model.moe_layers():
                moe.update_bias()
            for name, part in parts.items():
                value = part.item()
                averages[name] = 0.98 * averages.get(name, value) + 0.02 * value
            bar.set_postfix(
                {name: f"{value:.3f}" for name, value in averages.items()}
                | {"lr": f"{sched.get_last_lr()[0]:.1e}"}
            )
            if elapsed() / 60 > cfg.max_minutes:
                break
        if validation:
            val_loss = validation_loss(model, validation)
            if not best or val_loss < best["loss"]:
                best = {"epoch": epoch + 1, "loss": val_loss, "model": deepcopy(model.state_dict())}
            log.info("epoch %d: validation loss %.4f", epoch + 1, val_loss)
        if ckpt:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "rng": rng.bit_generator.state,
                    "torch_rng": torch.get_rng_state(),
                    "epoch": epoch + 1,
                    "seconds": elapsed(),
                    "best": best,
                    "model_config": asdict(model.cfg),
                    "train_config": asdict(cfg),
                },
                ckpt,
            )
        if elapsed() / 60 > cfg.max_minutes:
            log.warning(
                "stopping at the %.1f-minute budget in epoch %d", cfg.max_minutes, epoch + 1
            )
            break
    result = {
        "loss": averages.get("sid", float("nan")),  # the SID loss, as validation_loss
        **{f"{name}_loss": value for name, value in averages.items() if name != "sid"},
        "epochs": epoch + 1,
        "seconds": elapsed(),
    }
    if best:
        model.load_state_dict(best["model"])
        result |= {"best_epoch": best["epoch"], "validation_loss": best["loss"]}
    with torch.no_grad():  # the ranking stage serves its own copy (NextItemHead)
        model.next_item.items.weight.copy_(model.encoder.item.weight)
    model.eval()
    return result


def ranker_windows(source: SampleSource) -> np.ndarray:
    """Every training event once as a next-item target: each user's events before the held
    out ones, cut from the newest back into windows of ``short_len + 1`` tokens that
    overlap by one (oldest first, the oldest window left-padded)."""
    length = source.cfg.short_len + 1
    offsets = source.events.offsets
    starts, ends = offsets[:-1], offsets[1:] - source.held_out
    counts = np.maximum(ends - starts - 1, 0)
    counts = (counts + length - 2) // (length - 1)
    user = np.repeat(np.arange(len(starts)), counts)
    back = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return windows(source.events.items, starts[user], ends[user] - back * (length - 1), length)


def train_ranker(
    model: OneRec, source: SampleSource, cfg: TrainConfig, progress: bool = True
) -> dict[str, float]:
    """Train the ranking stage alone for ``cfg.ranker_minutes``, after :func:`train`.

    The SID model saturates early (its best epoch on the validation events comes well
    before the budget ends) while a next-item model keeps improving for hundreds of
    epochs (SASRec's paper trains 200). So the head goes on by itself, on every training
    event per epoch, with dropout, and keeps the epoch with the lowest next-item loss on
    the validation events (what it moved on ml-latest-small is in docs/findings.md).
    """
    head = model.next_item
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    validation = _ranker_validation(source)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=0.0)
    started = time.perf_counter()
    best = {"epoch": 0, "loss": math.inf, "state": deepcopy(head.state_dict())}
    if validation is not None:
        best["loss"] = _ranker_loss(head, validation)
    chunks = ranker_windows(source)

    def within_budget() -> bool:
        return time.perf_counter() - started < 60 * cfg.ranker_minutes

    epoch = 0
    while len(chunks) and within_budget():
        head.train()
        order = rng.permutation(len(chunks))
        steps = range(0, len(chunks), cfg.batch_size)
        bar = tqdm(steps, desc=f"ranker epoch {epoch + 1}", disable=not progress)
        for lo in bar:
            window = torch.from_numpy(chunks[order[lo : lo + cfg.batch_size]])
            loss = head.loss(head.items, window)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if not within_budget():
                break
        epoch += 1
        loss = _ranker_loss(head, validation) if validation is not None else -math.inf
        if loss <= best["loss"]:  # without validation events, the latest epoch
            best = {"epoch": epoch, "loss": loss, "state": deepcopy(head.state_dict())}
    head.load_state_dict(best["state"])
    model.eval()
    result = {"ranker_epochs": epoch, "ranker_best_epoch": best["epoch"]}
    if validation is not None:
        result["ranker_validation_loss"] = best["loss"]
    return result | {"ranker_seconds": time.perf_counter() - started}


def _ranker_validation(source: SampleSource) -> torch.Tensor | None:
    """Windows that end at each user's validation event (the one before the test events);
    None when training held none out or no user has one."""
    offsets = source.events.offsets
    starts, ends = offsets[:-1], offsets[1:] - source.test_events
    keep = ends - starts >= 2
    if source.held_out == source.test_events or not keep.any():
        return None
    length = source.cfg.short_len + 1
    return torch.from_numpy(windows(source.events.items, starts[keep], ends[keep], length))


@torch.no_grad()
def _ranker_loss(head: NextItemHead, validation: torch.Tensor, chunk: int = 512) -> float:
    """Mean next-item cross-entropy of the validation windows' newest event (one per
    window), ``chunk`` windows at a time: the logits of every user at once would be
    (users, n_items)."""
    head.eval()
    total = sum(
        head.loss(head.items, part, last=True).item() * len(part)
        for part in validation.split(chunk)
    )
    return total / len(validation)


@torch.no_grad()
def validation_loss(
    model: OneRec, batches: list[tuple[dict[str, torch.Tensor], torch.Tensor]]
) -> float:
    """Mean SID cross-entropy of the validation events, in eval mode (MoE loads untouched)."""
    training = model.training
    model.eval()
    total = sum(model.loss(inputs, targets).item() * len(targets) for inputs, targets in batches)
    model.train(training)
    return total / sum(len(targets) for _, targets in batches)
