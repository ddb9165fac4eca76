"""Trie-constrained beam search over semantic IDs, in numpy for reuse in a Triton backend.

The decoder emits a SID one level at a time. At every level each live beam may only take
a code that the :class:`~onerec.runtime.trie.SIDTrie` allows after its prefix: only the
trie's edges become candidates for the top-k, so whatever the model's scores and at any
beam width, every returned SID is one that a real item carries.

**Step function.** ``step_fn(tokens, parents)`` maps the (B, W, t) int64 codes decoded so
far (t = 0 at the first level) to (B, W, K) float32 log-probabilities of the next code.
``parents`` (B, W) says which of the previous call's beams each beam extends (None at the
first level): the real decoder keeps each beam's self-attention K/V and gathers them by
it, so no level recomputes earlier positions.

**Vectorisation.** Per level, the Python work is constant in B and W: the live beams'
edges from the trie's CSR (only legal codes become candidates: past the first level a
prefix has a handful of children, not K), one ``np.argpartition`` over each request's
candidates, a sort of the W survivors. Only the L levels are looped over. Columns holding
only dead beams have no edges, so the first level ranks K codes, not W * K.

**Dead beams.** Before level 0 each request has one live beam at the root and W - 1 dead
ones (score -inf, prefix -1), so level 0 takes the top min(W, legal) distinct root codes
rather than W copies of each. When fewer than W legal SIDs exist the leftover beams stay
dead: ``valid`` False, score -inf, SID -1. The model still sees them (the tensor is always
(B, W, t)); their tokens are arbitrary codes in [0, K), so its embedding lookups stay in
range. Exclusions are applied at the last level only, so a beam whose every completion is
excluded dies there, and such a request may get fewer than min(W, legal) SIDs.

**Scores** are float32 sums of log-probabilities along the path. A legal code to which the
model gives -inf or NaN is floored at ``LOGP_FLOOR``: it ranks below every finite path but
is never confused with an illegal one, so the catalog constraint never depends on the
model's numbers. Ties are broken by the flat index ``beam * K + code`` (beams being in rank
order), so equal inputs give identical outputs and no request depends on another.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from onerec.runtime.trie import SIDTrie

LOGP_FLOOR = -1e30  # finite, and hundreds of levels of it still sum to a finite float32


class StepFn(Protocol):
    def __call__(self, tokens: np.ndarray, parents: np.ndarray | None) -> np.ndarray:
        """(B, W, t) int64 codes so far, and each beam's parent among the previous call's
        beams -> (B, W, K) float32 next-code log-probabilities."""
        ...


@dataclass(frozen=True)
class BeamResult:
    """Beams of each request, best first."""

    sids: np.ndarray  # (B, W', L) int64, -1 on invalid beams; W' = W * final_expand
    scores: np.ndarray  # (B, W') float32 total log-probability, -inf on invalid beams
    valid: np.ndarray  # (B, W') bool


def _top_k(x: np.ndarray, k: int) -> np.ndarray:
    """(R, k) column indices of each row's k largest values of ``x`` (R, n), largest first.

    Ties go to the lower index, at the cut as well as in the order, so the selection is
    a function of the row alone. Ties at -inf are left as they fall: those picks are dead.
    """
    n = x.shape[1]
    idx = np.argpartition(x, n - k, axis=1)[:, n - k :]  # (R, k) unordered
    thr = np.take_along_axis(x, idx[:, :1], axis=1)  # (R, 1) k-th largest value
    n_tied = (x == thr).sum(axis=1)
    n_tied_kept = (np.take_along_axis(x, idx, axis=1) == thr).sum(axis=1)
    fix = np.flatnonzero((n_tied > n_tied_kept) & (thr[:, 0] > -np.inf))
    if fix.size:  # the cut split a tie: keep the tie's lowest indices
        xs, t = x[fix], thr[fix]
        above, tied = xs > t, xs == t  # (F, n)
        room = k - above.sum(axis=1, keepdims=True)  # (F, 1) tied entries to keep
        keep = above | (tied & (np.cumsum(tied, axis=1, dtype=np.int32) <= room))  # k per row
        idx[fix] = np.nonzero(keep)[1].reshape(len(fix), k)
    idx.sort(axis=1)  # index order, so that the stable sort below breaks ties by it
    order = np.argsort(-np.take_along_axis(x, idx, axis=1), axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1)


def _candidates(
    logp: np.ndarray, scores: np.ndarray, prefix: np.ndarray, level: int, trie: SIDTrie
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every legal extension of each request's live beams ``prefix`` (B, live), left-packed
    into (B, M) rows in ``beam * K + code`` order: its path score (-inf padding), the
    child it reaches (a prefix id at the next level, a leaf id at the last) and its flat
    index ``beam * K + code``. Only the trie's edges are scored, not all ``live * K``
    codes: past the first level most codes are illegal."""
    n_req, live = prefix.shape
    row, child, code = trie.edges(level, prefix)
    req, beam = np.divmod(row, live)
    value = np.fmax(logp[req, beam, code], LOGP_FLOOR) + scores[req, beam]  # -inf, NaN: floor
    counts = np.bincount(req, minlength=n_req)
    width = max(1, int(counts.max(initial=0)))
    col = np.arange(len(req)) - np.repeat(np.cumsum(counts) - counts, counts)
    cand = np.full((n_req, width), -np.inf, np.float32)
    cand[req, col] = value
    children = np.full((n_req, width), -1, np.int64)
    children[req, col] = child
    flat = np.zeros((n_req, width), np.int64)  # padding: beam 0, code 0, dead anyway
    flat[req, col] = beam * trie.codebook_size + code
    return cand, children, flat


def _excluded(leaves: np.ndarray, exclude: np.ndarray, n_leaves: int) -> np.ndarray:
    """Mask over ``leaves`` (B, M): the leaf is in request b's ``exclude`` row (B, E)."""
    b, j = np.nonzero(exclude >= 0)
    rows = np.arange(len(leaves))[:, None]
    return np.isin(rows * n_leaves + leaves, b * n_leaves + exclude[b, j]) & (leaves >= 0)


def _check_exclude(exclude: np.ndarray | None, batch_size: int, trie: SIDTrie) -> np.ndarray:
    if exclude is None:
        return np.full((batch_size, 0), -1, np.int64)
    exclude = np.asarray(exclude, dtype=np.int64)
    if exclude.ndim != 2 or exclude.shape[0] != batch_size:
        raise ValueError(f"exclude must be ({batch_size}, E) leaf ids, got {exclude.shape}")
    if exclude.size and exclude.max() >= len(trie):
        raise ValueError(f"exclude holds leaf id {exclude.max()}, the trie has {len(trie)}")
    return exclude


def constrained_beam_search(
    step_fn: StepFn,
    batch_size: int,
    beam_width: int | np.ndarray,
    trie: SIDTrie,
    exclude: np.ndarray | None = None,
    final_expand: int = 1,
) -> BeamResult:
    """The ``beam_width * final_expand`` best catalog SIDs for each of ``batch_size``
    requests, from a search ``beam_width`` wide.

    ``beam_width`` is one width for all, or (B,) widths: the batch is searched at the
    largest, and each level cuts request b back to its best ``beam_width[b]`` beams, which
    is exactly a search at that width (the rest are dead). ``exclude`` (B, E) lists leaf
    ids (``trie.leaf_of``) that request b must not receive, padded with -1; see
    :func:`exclude_leaves`.

    ``final_expand`` keeps that many times more completions at the last level: no step
    follows it, so the extra SIDs cost the decoder nothing, and the items under the
    search's last prefixes all reach the ranking stage (docs/findings.md measured what
    that does to the candidates' recall).
    """
    widths = np.broadcast_to(np.asarray(beam_width, dtype=np.int64), (max(batch_size, 0),))
    if batch_size < 0 or (widths < 1).any() or np.ndim(beam_width) > 1:
        raise ValueError(
            f"need batch_size >= 0 and beam widths >= 1, got {batch_size}, {beam_width}"
        )
    n_req, k = batch_size, trie.codebook_size
    if final_expand < 1:
        raise ValueError(f"final_expand must be >= 1, got {final_expand}")
    width = int(np.max(beam_width, initial=1))
    exclude = _check_exclude(exclude, n_req, trie)
    prefix = np.full((n_req, width), -1, np.int64)  # (B, W) prefix ids, -1 = dead
    prefix[:, 0] = 0
    scores = np.full((n_req, width), -np.inf, np.float32)  # (B, W)
    scores[:, 0] = 0.0
    tokens = np.zeros((n_req, width, 0), np.int64)  # (B, W, t)
    alive = prefix >= 0
    rows = np.arange(n_req)[:, None]
    parents = None
    for level in range(trie.levels):
        logp = np.asarray(step_fn(tokens, parents), dtype=np.float32)
        if logp.shape != (n_req, width, k):
            raise ValueError(f"step_fn returned {logp.shape}, expected {(n_req, width, k)}")
        # Dead beams are a suffix of every row (beams are sorted), so only the first `live`
        # columns can extend: at level 0 that is one beam, not W.
        live = max(1, int(alive.sum(axis=1).max(initial=0)))
        last = level == trie.levels - 1
        keep, cap = (width * final_expand, widths * final_expand) if last else (width, widths)
        cand, child, flat = _candidates(logp, scores, prefix[:, :live], level, trie)
        if last and exclude.size:  # a last-level child is a leaf: drop excluded ones
            cand[_excluded(child, exclude, len(trie))] = -np.inf
        pick = _top_k(cand, min(keep, cand.shape[1]))  # (B, <= W') best first
        scores = np.take_along_axis(cand, pick, axis=1)
        pad = ((0, 0), (0, keep - pick.shape[1]))  # fewer candidates than beams: dead ones
        scores = np.pad(scores, pad, constant_values=-np.inf)  # (B, W')
        scores[np.arange(keep) >= cap[:, None]] = -np.inf  # beyond a request's own width
        alive = scores > -np.inf
        flat = np.pad(np.take_along_axis(flat, pick, axis=1), pad)  # (B, W')
        beam, code = np.divmod(flat, k)  # (B, W) parent beam and new code
        child = np.pad(np.take_along_axis(child, pick, axis=1), pad)
        prefix = np.where(alive, child, -1)
        tokens = np.concatenate([tokens[rows, beam], code[..., None]], axis=2)  # (B, W, t+1)
        parents = beam
    return BeamResult(np.where(alive[..., None], tokens, -1), scores, alive)


def exclude_leaves(trie: SIDTrie, per_request_sids: Sequence[np.ndarray]) -> np.ndarray:
    """(B, E) leaf ids of each request's (M_b, L) SIDs to exclude, padded with -1.

    SIDs that no catalog item carries cannot be recommended anyway and are dropped.
    """
    levels = trie.levels
    arrays = [np.asarray(s, dtype=np.int64) for s in per_request_sids]
    arrays = [a.reshape(0, levels) if a.size == 0 else a for a in arrays]
    counts = [len(a) for a in arrays]
    out = np.full((len(arrays), max(counts, default=0)), -1, np.int64)
    if not out.size:
        return out
    leaves = trie.leaf_of(np.concatenate(arrays))
    for row, chunk in enumerate(np.split(leaves, np.cumsum(counts)[:-1])):
        chunk = np.unique(chunk[chunk >= 0])
        out[row, : len(chunk)] = chunk
    return out
