"""The ranking stage: the beam's items, ordered by decoder and user vector together.

The decoder proposes items (every one a real catalog item, through the trie) with the
log-probability of their SID. The model's :class:`~onerec.model.NextItemHead` scores each
of them too: the dot product of the user vector with the item's row of the head's table,
a logit of its softmax over all items. An item's score is the SID's log-probability plus
a weight times that logit: at weight 1, a product of the two models' probabilities (the
head's normaliser is the same for every item of a user, so it does not change the order).
How much the head should count depends on the data (on a set whose next items follow
long-term taste rather than order, any weight can hurt; docs/findings.md has the
measurements). So the weight is fitted per model on validation events
(:func:`onerec.evaluate.fit_rank_weight`) and served as the user vector's length: this
function takes vectors already scaled.

Offline evaluation and the front end both order candidates with :func:`rank_candidates`,
so the evaluated ranking is the served one.

With a reward model (:mod:`onerec.reward`), :func:`rank_by_reward` is the one final
ranking stage instead: the candidates' P-Score, the user's expected engagement with each,
plus ``blend`` times the SID's log-probability, a weight fitted offline on validation
events and stored with the reward model.
"""

from __future__ import annotations

import numpy as np

# The ranking stage orders this many times the beam width of SIDs: the search's best
# completions of its last-level beams (onerec.runtime.beam_search's ``final_expand``),
# which cost the decoder nothing and raise the candidates' recall (docs/findings.md).
FINAL_EXPAND = 4


def rank_candidates(
    users: np.ndarray, table: np.ndarray, tokens: np.ndarray, sid_logp: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Order (B, M) and scores (B, M) of candidate items, best first.

    ``users`` (B, d) are user vectors; ``tokens`` (B, M) index ``table``, the
    (n_items + 2, d) item table (``NextItemHead.served_table``), with -1 for an empty slot
    (it sorts last, score -inf); ``sid_logp`` (B, M) is the beam's log-probability of
    each candidate's SID. Ties keep the beam order.
    """
    vectors = table[np.maximum(tokens, 0)]  # (B, M, d)
    return _order(sid_logp + np.einsum("bmd,bd->bm", vectors, users, dtype=np.float32), tokens)


def _order(scores: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.where(tokens >= 0, scores, np.float32(-np.inf))
    order = np.argsort(-scores, axis=1, kind="stable")
    return order, np.take_along_axis(scores, order, axis=1)


def rank_by_reward(
    pscore: np.ndarray, sid_logp: np.ndarray, tokens: np.ndarray, blend: float
) -> tuple[np.ndarray, np.ndarray]:
    """Order (B, M) and scores (B, M) of candidates by P-Score plus ``blend`` times their
    SID's log-probability; -1 tokens sort last. Ties keep the beam order."""
    return _order(pscore + np.float32(blend) * sid_logp, tokens)
