"""``onerec align-eval``: the alignment rows of ``reports/align.json``, graded by the user
simulator on each user's held-out state (leave-last-out, the test split).

Each row is a top-10 list per user, seen items removed:

* ``random``, ``popularity``: scorers over the catalog;
* ``ntp``: the next-token generator as served today, the beams' items in the order of
  :func:`~onerec.runtime.ranking.rank_candidates` at the model's fitted weight;
* ``ntp+reward``: the same beams' items ordered by :func:`~onerec.runtime.ranking.rank_by_reward`
  with the P-Score and the blend fitted on validation events (:func:`fit_blend`);
* ``ecpo``, ``grpo``, ``dpo``: each aligned generator as served (its own rank_candidates);
* ``best+reward``: the aligned generator with the highest training reward (the P-Score of
  its last sampled groups: the simulator does not pick it), with reward selection;
* ``oracle``: the simulator's top-10 unseen items by expected engagement.

Diagnostics: ``pscore-catalog``, the reward model's own top-10 over the catalog, and
``ntp@m+oracle`` (:func:`keep_head`), the served list's first m items with the oracle's
best after them: how much engagement can be gained while keeping the recall that the
generator's first m slots carry.

Columns: ``engagement`` (the simulator's expected engagement, mean over a list's items,
then over users), ``gap_closed`` (``(row - ntp) / (oracle - ntp)`` of it), leave-last-out
``recall@10``, ``ndcg@10``, and ``legal_unconstrained`` (:func:`onerec.align_sampling.legal_share`)
for the generator rows. Paired standard errors over users of each row's difference to
``ntp`` go beside them, and the like-rate among hits (the share of hits whose held-out event
carries ``like``; on MovieLens, rating >= 4).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from onerec.align import UserStates, aligned_path, reward_model
from onerec.align_config import METHODS
from onerec.align_sampling import legal_share
from onerec.baselines import PopularityModel
from onerec.data.schema import Dataset
from onerec.evaluate import Candidates, candidates, served_ranking
from onerec.event_arrays import EventArrays
from onerec.experiment import (
    CHECKPOINT,
    load_checkpoint,
    load_item_tables,
    load_model,
    test_events,
    validation_split,
)
from onerec.metrics import Split, filter_topk_seen, gains, leave_last_out, mask_seen, topk_ranks
from onerec.model import OneRec
from onerec.reward import ExposureLog, RewardModel
from onerec.runtime.engagement import engagement_score
from onerec.runtime.ranking import rank_by_reward
from onerec.runtime.sid_index import SIDIndex
from onerec.simulator import UserSimulator
from onerec.train import ItemTables

log = logging.getLogger(__name__)
K = 10
# The SID log-probability's weight beside the P-Score: 0 is the P-Score alone; the top of
# the grid is near the beam order (a fit that picks it says the grid should grow).
BLENDS = (0.0, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
BLEND_FILE = "reward_blend.json"  # in model/, beside reward.pt
METRICS = ("engagement", "recall@10", "ndcg@10")
# How many of the served list's first items the recall-kept bound holds on to.
KEPT = (2, 4, 6, 8)


@dataclass(frozen=True)
class Decoded:
    """One chunk of users' beams, their items' P-Scores, and the rows they belong to."""

    rows: np.ndarray
    found: Candidates
    pscore: np.ndarray  # (B, M)

    def served(self, model: OneRec, split: Split, ds: Dataset) -> np.ndarray:
        """(B, K) top items in the served order (rank_candidates)."""
        return _top(self.found.ranked(*served_ranking(model)), split, ds, self.rows)

    def by_reward(self, blend: float, split: Split, ds: Dataset) -> np.ndarray:
        """(B, K) top items in rank_by_reward's order."""
        items = self.found.items
        tokens = np.where(items >= 0, items + 1, -1)
        order, _ = rank_by_reward(self.pscore, self.found.sid_logp, tokens, blend)
        return _top(np.take_along_axis(items, order, axis=1), split, ds, self.rows)


@dataclass
class Decoder:
    """The served decode path offline (:func:`onerec.evaluate.candidates`), with the reward
    model scoring the beams' items from the history before each target, as it was trained."""

    ds: Dataset
    item_tables: ItemTables
    index: SIDIndex
    reward: RewardModel
    exposures: ExposureLog
    events: EventArrays
    beam_width: int

    @torch.no_grad()
    def pscore(self, split: Split, rows: np.ndarray, items: np.ndarray) -> np.ndarray:
        """(B, M) P-Score of item rows for the users of split ``rows``, each from the
        history before its target (-1 items score as item 0, for the caller to drop)."""
        x = self.exposures.exposures(split.history_end[rows])
        tokens = torch.from_numpy(np.maximum(items, 0) + 1)
        return self.reward.scores(*x.tensors(np.arange(len(rows)))[:3], tokens)[1].numpy()

    def decode(
        self, model: OneRec, split: Split, rows: np.ndarray, chunk: int = 32
    ) -> list[Decoded]:
        """The beams of ``rows`` and their items' P-Scores, ``chunk`` users at a time."""
        out = []
        for lo in range(0, len(rows), chunk):
            part = rows[lo : lo + chunk]
            found = candidates(
                model,
                self.ds,
                self.item_tables,
                self.index,
                split,
                part,
                self.beam_width,
                self.events,
                final_expand=1,  # the beams alone: what the served P-Score scores
            )
            out.append(Decoded(part, found, self.pscore(split, part, found.items)))
        return out


def _top(ranked: np.ndarray, split: Split, ds: Dataset, rows: np.ndarray) -> np.ndarray:
    """(B, K) the first K unseen items of ranked lists, -1 padded."""
    top = filter_topk_seen(ranked, split, ds, rows)[:, :K]
    return np.pad(top, ((0, 0), (0, K - top.shape[1])), constant_values=-1)


def scorer_lists(
    score_fn: Callable[[np.ndarray], np.ndarray],
    split: Split,
    ds: Dataset,
    rows: np.ndarray,
    chunk_size: int = 256,
) -> np.ndarray:
    """(len(rows), K) top-K unseen items of a scorer over the catalog."""
    out = []
    for lo in range(0, len(rows), chunk_size):
        chunk = rows[lo : lo + chunk_size]
        scores = mask_seen(np.array(score_fn(chunk), np.float64), split, ds, chunk)
        top = np.argpartition(-scores, K - 1, axis=1)[:, :K]
        order = np.argsort(-np.take_along_axis(scores, top, 1), axis=1, kind="stable")
        out.append(np.take_along_axis(top, order, 1))
    return np.concatenate(out)


def fit_blend(decoder: Decoder, model: OneRec, split: Split) -> tuple[float, dict[str, float]]:
    """The blend of :data:`BLENDS` whose reward-ranked top-10 has the best engagement-weighted
    NDCG@10 on ``split`` (validation events, never the test's): each hit counts the logged
    engagement score of the event it hit (negative ones as 0), so the fit prefers hitting
    what users engaged with, from logged feedback alone. Ties go to the smaller blend."""
    weight = np.maximum(engagement_score(decoder.ds.events)[split.history_end], 0.0)
    decoded = decoder.decode(model, split, np.arange(len(split)))
    objective = {}
    for blend in BLENDS:
        top = np.concatenate([d.by_reward(blend, split, decoder.ds) for d in decoded])
        ranks = topk_ranks(top, split.target_items)
        objective[str(blend)] = float((gains(ranks, "ndcg@10") * weight).mean())
    best = max(BLENDS, key=lambda b: (objective[str(b)], -b))
    return best, objective


def fit_served_blend(
    artifacts: Path, reward: RewardModel, model: OneRec, generator: str, max_users: int = 256
) -> float:
    """The blend the build serves with ``model`` (stored as ``model/<generator>``):
    :func:`fit_blend` on a sample of validation events, stored in ``model/`` with the
    generator's name (a later ``align-eval`` refits it on more users, for its own rows)."""
    ds, item_tables, index = load_item_tables(artifacts)
    events = EventArrays.from_dataset(ds)
    exposures = ExposureLog(ds, reward.cfg)
    decoder = Decoder(ds, item_tables, index, reward, exposures, events, 128)
    validation = validation_split(ds, test_events(artifacts), max_users)
    blend, objective = fit_blend(decoder, model, validation)
    _store_blend(artifacts, blend, objective, generator)
    return blend


def _store_blend(artifacts: Path, blend: float, objective: dict, generator: str) -> None:
    """``model/reward_blend.json``: the blend, its objective per candidate, and the
    generator it was fitted for (a build reuses it only for that generator)."""
    record = {"blend": blend, "objective": objective, "generator": generator}
    (artifacts / "model" / BLEND_FILE).write_text(json.dumps(record, indent=2))


def keep_head(head: np.ndarray, fill: np.ndarray, m: int) -> np.ndarray:
    """(U, K) lists: the first ``m`` items of each ``head`` row, then ``fill``'s items in
    order, less those already taken (-1 is padding in both)."""
    out = np.full((len(head), K), -1, np.int64)
    for u, (first, rest) in enumerate(zip(head[:, :m], fill, strict=True)):
        first = first[first >= 0]
        rest = rest[(rest >= 0) & ~np.isin(rest, first)]
        items = np.concatenate([first, rest])[:K]
        out[u, : len(items)] = items
    return out


def _simulator(ds: Dataset) -> UserSimulator | None:
    try:
        return UserSimulator.from_dataset(ds)
    except ValueError as err:  # no ground truth: real data
        log.info("no simulator: %s", err)
        return None


def _seen(split: Split, ds: Dataset, rows: np.ndarray) -> list[np.ndarray]:
    items = ds.item_index()
    return [items[split.history_start[r] : split.history_end[r]] for r in rows]


def row_metrics(
    lists: dict[str, np.ndarray],
    split: Split,
    ds: Dataset,
    rows: np.ndarray,
    simulator: UserSimulator | None,
) -> tuple[
    dict[str, dict[str, float | None]], dict[str, dict[str, float]], dict[str, float | None]
]:
    """Per row: the report's columns (legality aside), the paired standard error of each
    metric's per-user difference to ``ntp``, and the like-rate among hits."""
    like = ds.events["like"].to_numpy()[split.history_end[rows]] > 0
    per_user: dict[str, dict[str, np.ndarray]] = {}
    likes = {}
    for name, top in lists.items():
        ranks = topk_ranks(top, split.target_items[rows])
        values = {m: gains(ranks, m) for m in ("recall@10", "ndcg@10")}
        if simulator is not None:
            values["engagement"] = simulator.list_engagement(split.users[rows], top)
        per_user[name] = values
        hits = ranks < K
        likes[name] = float(like[hits].mean()) if hits.any() else None
    mean = {n: {m: float(np.nanmean(v)) for m, v in vals.items()} for n, vals in per_user.items()}
    se = {}
    for name, vals in per_user.items():
        if name == "ntp":
            continue
        diffs = {m: v - per_user["ntp"][m] for m, v in vals.items()}
        se[name] = {
            m: float(np.nanstd(d, ddof=1) / np.sqrt(np.isfinite(d).sum())) for m, d in diffs.items()
        }
    columns: dict[str, dict[str, float | None]] = {}
    for name, m in mean.items():
        engagement = m.get("engagement")
        gap = None
        if engagement is not None and "oracle" in mean:
            span = mean["oracle"]["engagement"] - mean["ntp"]["engagement"]
            gap = (engagement - mean["ntp"]["engagement"]) / span if span else None
        columns[name] = {
            "engagement": engagement,
            "gap_closed": gap,
            "recall@10": m["recall@10"],
            "ndcg@10": m["ndcg@10"],
        }
    return columns, se, likes


def evaluate_alignment(
    artifacts: Path,
    max_users: int | None = None,
    seed: int = 0,
    beam_width: int = 128,
    legal_users: int = 256,
    legal_width: int = 32,
    extra: tuple[str, ...] = (),
    blend: float | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The data set's section of ``reports/align.json``: every row present (RL rows where
    ``onerec align`` stored their checkpoints), plus ``extra`` aligned checkpoints by name
    (``model/aligned_<name>.pt``) as ablations in the served order. The reward rows use
    ``blend`` where given (a build's served blend), else one fitted on validation events
    and stored in ``model/``."""
    say = progress or (lambda _: None)
    ds, item_tables, index = load_item_tables(artifacts)
    split = leave_last_out(ds)
    rows = np.arange(len(split))
    if max_users is not None and max_users < len(rows):
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_users, replace=False))
    reward = reward_model(artifacts, ds, item_tables, index)
    events = EventArrays.from_dataset(ds)
    decoder = Decoder(
        ds, item_tables, index, reward, ExposureLog(ds, reward.cfg), events, beam_width
    )
    ntp = load_model(artifacts, item_tables)
    objective: dict[str, float] = {}
    if blend is None:
        blend, objective = fit_blend(decoder, ntp, validation_split(ds, test_events(artifacts)))
        _store_blend(artifacts, blend, objective, CHECKPOINT)  # ntp is checkpoint.pt
        say(f"blend {blend} fitted on validation events")

    rng = np.random.default_rng(seed)
    popularity = PopularityModel.fit(ds, split)
    lists = {
        "random": scorer_lists(lambda r: rng.random((len(r), ds.n_items)), split, ds, rows),
        "popularity": scorer_lists(popularity.scores, split, ds, rows),
    }
    states = UserStates(ds, item_tables, index, ntp.cfg, split)
    legal_rows = rows[np.sort(rng.choice(len(rows), min(legal_users, len(rows)), replace=False))]

    def legality(model: OneRec) -> float:
        shares = [
            legal_share(model, states.inputs(legal_rows[lo : lo + 32]), index.trie, legal_width)
            for lo in range(0, len(legal_rows), 32)
        ]
        return float(np.mean(shares))

    def generator(model: OneRec) -> tuple[np.ndarray, np.ndarray]:
        decoded = decoder.decode(model, split, rows)
        served = np.concatenate([d.served(model, split, ds) for d in decoded])
        return served, np.concatenate([d.by_reward(blend, split, ds) for d in decoded])

    lists["ntp"], lists["ntp+reward"] = generator(ntp)
    legal = {"ntp": legality(ntp)}
    legal["ntp+reward"] = legal["ntp"]
    say("ntp rows done")
    by_reward, training = {}, {}
    for name in (*METHODS, *extra):
        path = aligned_path(artifacts, name)
        if not path.is_file():
            continue
        model = load_checkpoint(path, item_tables)
        lists[name], by_reward[name] = generator(model)
        legal[name] = legality(model)
        if name in extra:  # an ablation: served order and with reward selection
            lists[f"{name}+reward"], legal[f"{name}+reward"] = by_reward[name], legal[name]
        summary = json.loads(path.with_suffix(".json").read_text())
        config = summary["config"]
        training[name] = {k: config[k] for k in ("method", "search", "ntp_weight", "lr")} | {
            k: v for k, v in summary.items() if k not in ("config", "curves")
        }
        say(f"{name} rows done")
    methods = [m for m in METHODS if m in training]
    best = None
    if methods:  # by the P-Score of its last groups: training's own signal, not the test's
        best = max(methods, key=lambda m: training[m]["final_reward"])
        lists["best+reward"], legal["best+reward"] = by_reward[best], legal[best]
    simulator = _simulator(ds)
    diagnostics = ["pscore-catalog"]
    if simulator is not None:
        oracle = simulator.oracle_top(split.users[rows], 3 * K, _seen(split, ds, rows))
        lists["oracle"] = oracle[:, :K]
        # The recall-kept bound: the served list's first m items, where most of its hits
        # are, and the oracle's best in the other slots: the most engagement a list reaches
        # that keeps those m items, whatever reward model or aligned generator fills the rest.
        for m in KEPT:
            lists[f"ntp@{m}+oracle"] = keep_head(lists["ntp"], oracle, m)
            diagnostics.append(f"ntp@{m}+oracle")
    # The reward model's ceiling: its own top-10 over the whole catalog, no generator.
    catalog = np.arange(ds.n_items)[None]
    lists["pscore-catalog"] = scorer_lists(
        lambda r: decoder.pscore(split, r, np.repeat(catalog, len(r), 0)), split, ds, rows, 8
    )
    columns, se, likes = row_metrics(lists, split, ds, rows, simulator)
    for name, value in columns.items():
        value["legal_unconstrained"] = legal.get(name)
    ablations = [n for name in extra for n in (name, f"{name}+reward") if n in columns]
    return {
        "models": {n: v for n, v in columns.items() if n not in (*ablations, *diagnostics)},
        "ablations": {n: columns[n] for n in ablations},
        "diagnostics": {n: columns[n] for n in diagnostics},
        "se_vs_ntp": se,
        "like_rate_among_hits": likes,
        "blend": blend,
        "blend_objective": objective,
        "best_rl": best,
        "users": len(rows),
        "beam_width": beam_width,
        "legal_width": legal_width,
        "legal_users": len(legal_rows),
        "alignment": training,
    }
