"""A deterministic synthetic short-video platform: the embedded default data set.

The generative story, kept simple enough that its optimum is known:

* **Topics.** ``n_categories`` categories, each with ``subtopics_per_category`` subtopics.
  A subtopic's latent vector is its category's vector plus a smaller offset, so topics
  form a hierarchy in latent space.
* **Authors and items.** Every author focuses on one subtopic. An item takes its author's
  subtopic (mostly) or a sibling subtopic, has a log-normal duration, a popularity weight
  (Zipf) and a quality. Its content vector is a noisy random projection of its latent
  vector, so content is informative but imperfect. ``tag`` is the subtopic, ``category``
  the category.
* **Users.** Static features (age bucket, gender, region, activity level). The primary
  category depends on (age bucket, gender), so the profile carries signal. Each user holds
  2 to 5 interests (subtopics with Dirichlet weights) that drift: at every session
  boundary an interest may be replaced, and the weights random-walk.
* **History lengths.** A Zipf law over users ranked by activity: the heaviest user has
  exactly ``max_history`` events and the lightest ``min_history``, with multiplicative
  jitter for everyone else.
* **Exposures.** Each event picks, given the current interest state, an item from an
  interest subtopic (probability ``p_interest``), from the global popularity
  distribution (``p_popular``) or uniformly (the rest); within a subtopic, items are drawn
  by popularity. The logged item is that exposure. As in a short-video feed, a user is
  rarely shown an item twice: each event takes the first of ``novelty_tries`` independent
  draws that the user has not consumed yet (only users who exhaust the catalog repeat).
* **Feedback.** Affinity is the cosine of the user's current interest vector with the
  item's latent vector, plus item quality. Watch ratio, like, follow, comment, forward and
  hate are all drawn from logistic functions of affinity: :func:`sample_feedback` draws
  them and :func:`expected_feedback` gives their expected values, one definition shared
  by the generator and the user simulator (:mod:`onerec.simulator`).

``ground_truth`` holds each user's final interest state, the item-level mixture weights
and the latent geometry (subtopic and item latents, item quality). So :func:`oracle_scores`
gives the true next-item probabilities: an upper bound for Recall@K under the
leave-last-out protocol. Novelty only renormalises them over the items a user has not
seen, which is what the protocol ranks, so the order is unchanged. And the simulator can
answer "what would this user do with that item" at the final interest state.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from numpy.polynomial.hermite_e import hermegauss
from scipy.special import ndtr
from tqdm import tqdm

from onerec.data.schema import Dataset, make_events
from onerec.runtime.engagement import WATCH_CAP

log = logging.getLogger(__name__)

START_MS = 1_735_689_600_000  # 2025-01-01T00:00:00Z
DAY_MS = 86_400_000
MAX_INTERESTS = 5

# The feedback model. Watch ratio = WATCH_MAX * sigmoid(WATCH_SCALE * aff + WATCH_BIAS +
# WATCH_NOISE * Z), Z ~ N(0, 1); a click is a ratio above CLICK_RATIO. Each flag is
# Bernoulli(sigmoid(scale * aff + bias)), drawn in this order (the order is part of the
# seed -> bytes contract).
WATCH_MAX = 1.6
WATCH_SCALE = 3.0
WATCH_BIAS = -0.5
WATCH_NOISE = 0.5
CLICK_RATIO = 0.15
FLAG_LOGITS: dict[str, tuple[float, float]] = {  # flag: (scale, bias)
    "like": (3.0, -3.0),
    "follow": (3.0, -5.5),
    "comment": (3.0, -4.5),
    "forward": (3.0, -5.0),
    "hate": (-3.0, -4.5),
}
# Probabilists' Gauss-Hermite rule for E[f(Z)]: 32 nodes put the clipped watch term within
# about 1e-4 of the exact value (the clip's kink limits it) and E[ratio] to 1e-15.
_GH_Z, _GH_W = hermegauss(32)
_GH_W = _GH_W / np.sqrt(2.0 * np.pi)


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of the generator. The defaults build in well under a minute on 2 cores."""

    n_users: int = 2000
    n_items: int = 10000
    max_history: int = 100_000
    min_history: int = 20
    n_categories: int = 16
    subtopics_per_category: int = 8
    items_per_author: int = 25
    latent_dim: int = 32
    content_dim: int = 48
    content_noise: float = 0.6
    session_length: int = 30
    drift: float = 0.15
    p_interest: float = 0.75
    p_popular: float = 0.15
    novelty_tries: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_users < 1 or self.n_items < 1:
            raise ValueError("n_users and n_items must be positive")
        if not 1 <= self.min_history <= self.max_history:
            raise ValueError("need 1 <= min_history <= max_history")
        if self.p_interest + self.p_popular > 1.0:
            raise ValueError("p_interest + p_popular must be <= 1")
        if self.novelty_tries < 1:
            raise ValueError("novelty_tries must be >= 1")


@dataclass
class _World:
    """Topic hierarchy and items, shared by all users."""

    subtopic_latent: np.ndarray  # (S, L) unit vectors
    item_subtopic: np.ndarray  # (I,)
    item_latent: np.ndarray  # (I, L) unit vectors
    item_quality: np.ndarray  # (I,)
    item_popularity: np.ndarray  # (I,) sums to 1
    item_duration: np.ndarray  # (I,) ms
    sub_items: np.ndarray  # item ids grouped by subtopic
    sub_offsets: np.ndarray  # (S+1,) CSR offsets into sub_items
    sub_cdf: np.ndarray  # subtopic index + popularity CDF within it, aligned with sub_items
    pop_cdf: np.ndarray  # global popularity CDF


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(1e-12)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def interest_vectors(
    subtopic_latent: np.ndarray, subtopics: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    """Unit interest vector of each state: (..., K) subtopics and weights -> (..., L)."""
    return _unit(np.einsum("...k,...kd->...d", weights, subtopic_latent[subtopics]))


def sample_feedback(
    aff: np.ndarray, duration_ms: np.ndarray, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Draw every behaviour for affinities ``aff`` (any shape) on items of ``duration_ms``.

    Returns the event columns (``watch_ms``, ``duration_ms`` and the flags, so
    :func:`onerec.runtime.engagement.engagement_score` applies) plus ``watch_ratio``.
    The draws are one normal, then one uniform per flag, each of ``aff``'s shape.
    """
    shape = np.shape(aff)
    duration = np.broadcast_to(duration_ms, shape)
    logit = WATCH_SCALE * aff + WATCH_BIAS + rng.normal(0, WATCH_NOISE, shape)
    ratio = _sigmoid(logit) * WATCH_MAX
    out = {
        "watch_ratio": ratio,
        "watch_ms": (ratio * duration).astype(np.int64),
        "duration_ms": duration.astype(np.int64),
        "click": (ratio > CLICK_RATIO).astype(np.int8),
    }
    for flag, (scale, bias) in FLAG_LOGITS.items():
        out[flag] = (rng.random(shape) < _sigmoid(scale * aff + bias)).astype(np.int8)
    return out


def expected_feedback(aff: np.ndarray) -> dict[str, np.ndarray]:
    """Expected value of every behaviour at affinities ``aff`` (any shape).

    ``watch`` is the engagement formula's watch term E[clip(ratio, 0, WATCH_CAP)] /
    WATCH_CAP and ``watch_ratio`` is E[ratio] (both by quadrature over the noise);
    ``click`` is P(ratio > CLICK_RATIO) and each flag its probability, both exact.
    """
    aff = np.asarray(aff, dtype=np.float64)
    mean = WATCH_SCALE * aff + WATCH_BIAS
    watch = np.zeros_like(mean)
    ratio = np.zeros_like(mean)
    for z, w in zip(_GH_Z, _GH_W, strict=True):  # 32 nodes, each vectorised over aff
        r = _sigmoid(mean + WATCH_NOISE * z) * WATCH_MAX
        ratio += w * r
        watch += w * np.minimum(r, WATCH_CAP)
    threshold = np.log(CLICK_RATIO / (WATCH_MAX - CLICK_RATIO))  # logit of CLICK_RATIO / MAX
    out = {
        "watch": watch / WATCH_CAP,
        "watch_ratio": ratio,
        "click": ndtr((mean - threshold) / WATCH_NOISE),
    }
    for flag, (scale, bias) in FLAG_LOGITS.items():
        out[flag] = _sigmoid(scale * aff + bias)
    return out


def _build_world(
    cfg: SyntheticConfig, rng: np.random.Generator
) -> tuple[_World, pd.DataFrame, np.ndarray]:
    n_sub = cfg.n_categories * cfg.subtopics_per_category
    cat_latent = rng.normal(size=(cfg.n_categories, cfg.latent_dim))
    sub_category = np.repeat(np.arange(cfg.n_categories), cfg.subtopics_per_category)
    sub_latent = _unit(cat_latent[sub_category] + 0.6 * rng.normal(size=(n_sub, cfg.latent_dim)))

    n_authors = max(1, cfg.n_items // cfg.items_per_author)
    author_sub = rng.integers(0, n_sub, n_authors)
    item_author = rng.integers(0, n_authors, cfg.n_items)
    item_sub = author_sub[item_author].copy()
    stray = rng.random(cfg.n_items) < 0.15  # a sibling subtopic in the same category
    sibling = sub_category[item_sub] * cfg.subtopics_per_category + rng.integers(
        0, cfg.subtopics_per_category, cfg.n_items
    )
    item_sub[stray] = sibling[stray]
    item_latent = _unit(
        sub_latent[item_sub] + 0.35 * rng.normal(size=(cfg.n_items, cfg.latent_dim))
    )
    item_quality = rng.normal(0.0, 0.3, cfg.n_items)
    ranks = rng.permutation(cfg.n_items) + 1
    popularity = ranks**-0.9
    popularity /= popularity.sum()
    duration = np.exp(rng.normal(np.log(30_000), 0.7, cfg.n_items)).clip(3_000, 600_000)

    order = np.argsort(item_sub, kind="stable")
    offsets = np.searchsorted(item_sub[order], np.arange(n_sub + 1))
    sub_cdf = np.empty(cfg.n_items)
    for s in range(n_sub):  # one pass over subtopics at build time, not per event
        lo, hi = offsets[s], offsets[s + 1]
        if hi > lo:
            w = np.cumsum(popularity[order[lo:hi]])
            sub_cdf[lo:hi] = s + w / w[-1]

    projection = rng.normal(size=(cfg.latent_dim, cfg.content_dim)) / np.sqrt(cfg.latent_dim)
    content = item_latent @ projection + cfg.content_noise * rng.normal(
        size=(cfg.n_items, cfg.content_dim)
    ) / np.sqrt(cfg.content_dim)
    items = pd.DataFrame(
        {
            "item_id": [f"i{i}" for i in range(cfg.n_items)],
            "author_id": [f"a{a}" for a in item_author],
            "category": [f"cat{c}" for c in sub_category[item_sub]],
            "tag": [f"cat{sub_category[s]}/sub{s}" for s in item_sub],
            "title": "",
            "duration_ms": duration.astype(np.int64),
        }
    )
    world = _World(
        subtopic_latent=sub_latent,
        item_subtopic=item_sub,
        item_latent=item_latent,
        item_quality=item_quality,
        item_popularity=popularity,
        item_duration=duration,
        sub_items=order,
        sub_offsets=offsets,
        sub_cdf=sub_cdf,
        pop_cdf=np.cumsum(popularity) / popularity.sum(),
    )
    return world, items, content.astype(np.float32)


def history_lengths(cfg: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """Zipf-law lengths over users ranked by activity; the heaviest gets ``max_history``."""
    rank = np.arange(1, cfg.n_users + 1, dtype=np.float64)
    exponent = np.log(cfg.max_history / cfg.min_history) / max(np.log(cfg.n_users), 1e-9)
    lengths = cfg.max_history * rank**-exponent
    lengths[1:] *= np.exp(rng.normal(0.0, 0.3, cfg.n_users - 1))
    lengths = lengths.round().clip(cfg.min_history, cfg.max_history).astype(np.int64)
    lengths[0] = cfg.max_history
    return lengths[rng.permutation(cfg.n_users)]


def _users(cfg: SyntheticConfig, rng: np.random.Generator, lengths: np.ndarray) -> pd.DataFrame:
    age = rng.integers(0, 7, cfg.n_users)
    gender = rng.integers(0, 3, cfg.n_users)
    region = rng.integers(0, 12, cfg.n_users)
    activity = np.searchsorted(np.quantile(lengths, [0.5, 0.8, 0.95]), lengths, side="right")
    return pd.DataFrame(
        {
            "user_id": [f"u{u}" for u in range(cfg.n_users)],
            "age_bucket": age,
            "gender": gender,
            "region": region,
            "activity_level": activity.astype(np.int64),
        }
    )


def _interest_trajectory(
    cfg: SyntheticConfig, rng: np.random.Generator, n_sessions: int, primary_cat: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-session interest subtopics and weights, each (n_sessions, MAX_INTERESTS).

    Unused interest slots have weight 0. Drift replaces one interest at a session boundary
    with probability ``cfg.drift`` (half the time with a sibling subtopic) and random-walks
    the weights.
    """
    spc = cfg.subtopics_per_category
    n_sub = cfg.n_categories * spc
    k = int(rng.integers(2, MAX_INTERESTS + 1))
    subs = rng.integers(0, n_sub, MAX_INTERESTS)
    subs[0] = primary_cat * spc + rng.integers(0, spc)
    base = np.full(MAX_INTERESTS, -np.inf)
    base[:k] = np.log(rng.dirichlet(np.full(k, 2.0)))
    base[0] += 0.5
    wander = np.zeros(MAX_INTERESTS)
    sub_traj = np.empty((n_sessions, MAX_INTERESTS), np.int64)
    w_traj = np.empty((n_sessions, MAX_INTERESTS))
    changes = rng.random(n_sessions) < cfg.drift
    slot = rng.integers(0, k, n_sessions)
    sibling = rng.random(n_sessions) < 0.5
    fresh = rng.integers(0, n_sub, n_sessions)
    near = rng.integers(0, spc, n_sessions)
    walk = rng.normal(0.0, 0.25, (n_sessions, MAX_INTERESTS))
    for s in range(n_sessions):  # per session, vectorised over the events inside it
        if s and changes[s]:
            old = subs[slot[s]]
            subs[slot[s]] = (old // spc) * spc + near[s] if sibling[s] else fresh[s]
        wander = 0.9 * wander + walk[s]  # mean-reverting, so no interest dies for good
        logits = base + wander
        w = np.exp(logits - logits[:k].max())
        sub_traj[s] = subs
        w_traj[s] = w / w.sum()
    return sub_traj, w_traj


def _sample_in_subtopic(world: _World, subs: np.ndarray, u: np.ndarray) -> np.ndarray:
    lo, hi = world.sub_offsets[subs], world.sub_offsets[subs + 1]
    empty = hi == lo
    # One searchsorted for all subtopics: each CDF slice is offset by its subtopic index.
    pos = np.searchsorted(world.sub_cdf, subs + u, side="left")
    pos = np.clip(pos, lo, np.maximum(hi - 1, lo))
    items = world.sub_items[np.minimum(pos, len(world.sub_items) - 1)]
    items[empty] = -1
    return items


def _exposures(
    cfg: SyntheticConfig,
    world: _World,
    rng: np.random.Generator,
    sub_traj: np.ndarray,
    w_traj: np.ndarray,
    session: np.ndarray,
) -> np.ndarray:
    """One independent draw from the exposure mixture for each of the events ``session``."""
    n = len(session)
    # Choose the interest slot of each event from its session's weights.
    cdf = np.cumsum(w_traj[session], axis=1)
    slot = (rng.random((n, 1)) > cdf).sum(axis=1).clip(0, MAX_INTERESTS - 1)
    subs = sub_traj[session, slot]
    item = _sample_in_subtopic(world, subs, rng.random(n))
    mode = rng.random(n)
    popular = (mode >= cfg.p_interest) & (mode < cfg.p_interest + cfg.p_popular)
    uniform = (mode >= cfg.p_interest + cfg.p_popular) | (item < 0)
    item[popular] = np.searchsorted(world.pop_cdf, rng.random(popular.sum()))
    item[uniform] = rng.integers(0, len(world.item_subtopic), uniform.sum())
    return np.minimum(item, len(world.item_subtopic) - 1)


def _first_unseen(candidates: np.ndarray) -> np.ndarray:
    """Per event, the first of its candidates (R, n) the user has not consumed before.

    When all R are already seen (only heavy users who exhaust the catalog) the first
    candidate is a repeat. An unseen item ``i`` is thus chosen with probability
    ``p(i) (1 + q + ... + q^(R-1))``, where ``q`` is the mass of the seen items: in
    proportion to the mixture ``p``, so the oracle's ranking of unseen items is exact.
    """
    seen: set[int] = set()
    out = candidates[0].copy()
    columns = candidates.T.tolist()
    for j, options in enumerate(columns):  # sequential by nature: each pick changes "seen"
        for c in options:
            if c not in seen:
                out[j] = c
                break
        seen.add(int(out[j]))
    return out


def _user_events(
    cfg: SyntheticConfig, world: _World, rng: np.random.Generator, n: int, primary_cat: int
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    n_sessions = -(-n // cfg.session_length)
    sub_traj, w_traj = _interest_trajectory(cfg, rng, n_sessions, primary_cat)
    session = np.arange(n) // cfg.session_length
    candidates = _exposures(cfg, world, rng, sub_traj, w_traj, np.tile(session, cfg.novelty_tries))
    item = _first_unseen(candidates.reshape(cfg.novelty_tries, n))

    # Affinity of the current interest vector with the item.
    user_vec = interest_vectors(world.subtopic_latent, sub_traj, w_traj)
    aff = (
        np.einsum("nd,nd->n", user_vec[session], world.item_latent[item]) + world.item_quality[item]
    )
    feedback = sample_feedback(aff, world.item_duration[item], rng)
    watch = feedback["watch_ms"]

    # Events in a session follow each other (watch time plus a short pause); sessions are
    # separated by exponential gaps, so time order equals generation order.
    step = watch + rng.integers(1_000, 8_000, n)
    first = np.arange(n_sessions) * cfg.session_length
    offset_in_session = np.cumsum(step) - step
    offset_in_session -= offset_in_session[first][session]
    session_len = np.add.reduceat(step, first)
    gap_mean = max(60_000.0, min(3 * DAY_MS, 365 * DAY_MS / n_sessions))
    gaps = rng.exponential(gap_mean, n_sessions).astype(np.int64)
    session_start = np.cumsum(session_len + gaps) - session_len
    timestamp = START_MS + session_start[session] + offset_in_session
    events = {
        "item_idx": item,
        "timestamp": timestamp,
        **{k: v for k, v in feedback.items() if k != "watch_ratio"},
    }
    return events, sub_traj[-1], w_traj[-1]


def generate(cfg: SyntheticConfig | None = None, progress: bool = False) -> Dataset:
    """Build the synthetic data set; the same config (seed included) gives the same bytes."""
    cfg = cfg or SyntheticConfig()
    rng = np.random.default_rng(cfg.seed)
    world, items, content = _build_world(cfg, rng)
    lengths = history_lengths(cfg, rng)
    users = _users(cfg, rng, lengths)
    # Profile carries signal: the primary category depends on (age bucket, gender).
    table = rng.integers(0, cfg.n_categories, (7, 3))
    primary = np.where(
        rng.random(cfg.n_users) < 0.7,
        table[users["age_bucket"].to_numpy(), users["gender"].to_numpy()],
        rng.integers(0, cfg.n_categories, cfg.n_users),
    )
    user_seeds = rng.integers(0, 2**63 - 1, cfg.n_users)

    chunks: list[dict[str, np.ndarray]] = []
    final_subs = np.zeros((cfg.n_users, MAX_INTERESTS), np.int64)
    final_w = np.zeros((cfg.n_users, MAX_INTERESTS))
    for u in tqdm(range(cfg.n_users), desc="synthetic users", disable=not progress):
        urng = np.random.default_rng(user_seeds[u])
        ev, final_subs[u], final_w[u] = _user_events(
            cfg, world, urng, int(lengths[u]), int(primary[u])
        )
        ev["user_idx"] = np.full(len(ev["item_idx"]), u, np.int64)
        chunks.append(ev)
    cols = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}

    frame = pd.DataFrame(
        {
            "user_id": pd.Categorical.from_codes(cols.pop("user_idx"), categories=users["user_id"]),
            "item_id": pd.Categorical.from_codes(cols.pop("item_idx"), categories=items["item_id"]),
            **cols,
        }
    )
    events = make_events(frame, pd.Index(users["user_id"]), pd.Index(items["item_id"]))
    ground_truth = {
        "final_subtopics": final_subs,
        "final_weights": final_w,
        "item_subtopic": world.item_subtopic,
        "item_popularity": world.item_popularity,
        "sub_offsets": world.sub_offsets,
        "p_mix": np.array([cfg.p_interest, cfg.p_popular]),
        "subtopic_latent": world.subtopic_latent,
        "item_latent": world.item_latent,
        "item_quality": world.item_quality,
    }
    return Dataset(
        name="synthetic",
        events=events,
        users=users,
        items=items,
        item_content=content,
        meta={"source": "synthetic", "config": asdict(cfg)},
        ground_truth=ground_truth,
    )


def oracle_scores(ground_truth: dict[str, np.ndarray], users: np.ndarray) -> np.ndarray:
    """True next-item probability for each of ``users`` over all items: (len(users), I).

    This is the generator's own exposure mixture evaluated at each user's final interest
    state, so ranking by it is the best any model can do in expectation.
    """
    item_sub = ground_truth["item_subtopic"]
    pop = ground_truth["item_popularity"]
    p_interest, p_popular = ground_truth["p_mix"]
    n_sub = len(ground_truth["sub_offsets"]) - 1
    sub_mass = np.bincount(item_sub, weights=pop, minlength=n_sub)
    within = pop / sub_mass[item_sub]  # (I,) probability of the item inside its subtopic
    subs = ground_truth["final_subtopics"][users]  # (U, K)
    weights = ground_truth["final_weights"][users]
    per_sub = np.zeros((len(users), n_sub))
    np.add.at(per_sub, (np.arange(len(users))[:, None], subs), weights)
    # The generator falls back to a uniform draw when an interest subtopic has no items.
    lost = (per_sub * (sub_mass == 0)).sum(axis=1, keepdims=True)
    uniform = 1.0 - p_interest - p_popular + p_interest * lost
    return p_interest * per_sub[:, item_sub] * within + p_popular * pop + uniform / len(item_sub)
