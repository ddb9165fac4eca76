"""Trie-constrained beam search over semantic IDs, in numpy for reuse in a Triton backend.

The decoder emits a SID one level at a time. At every level each live beam may only take
a code that the :class:`~onerec.runtime.trie.SIDTrie` allows after its prefix: illegal codes are set
to -inf *before* the top-k, so whatever the model's scores and at any beam width, every
returned SID is one that a real item carries.

**Step function.** ``step_fn(tokens, parents)`` maps the (B, W, t) int64 codes decoded so
far (t = 0 at the first level) to (B, W, K) float32 log-probabilities of the next code.
``parents`` (B, W) says which of the previous call's beams each beam extends (None at the
first level): the real decoder keeps each beam's self-attention K/V and gathers them by
it, so no level recomputes earlier positions.

**Vectorisation.** Per level, the Python work is constant in B and W: one mask from the
trie's CSR, one ``np.argpartition`` over the (B, W * K) candidates, a sort of the W
survivors. Only the L levels are looped over. Columns holding only dead beams are left
out of the candidates, so the first level ranks K codes, not W * K.

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


def _forbid_excluded(
    legal: np.ndarray, prefix: np.ndarray, exclude: np.ndarray, trie: SIDTrie
) -> None:
    """Clear, in place, the last-level codes of ``legal`` (B, W, K) that would complete a
    SID in the request's ``exclude`` row (B, E)."""
    level = trie.levels - 1
    b, j = np.nonzero(exclude >= 0)
    if not b.size:
        return
    leaf = exclude[b, j]  # (X,)
    owner = trie.parent(level, leaf)  # (X,) the excluded SID's last-level prefix
    code = trie.sids[leaf, level]
    # Join on (request, prefix). A request's beams hold distinct prefixes, so each excluded
    # SID matches at most one beam.
    n = trie.num_prefixes(level)
    n_beams = prefix.shape[1]
    beam_key = np.where(prefix >= 0, np.arange(len(prefix))[:, None] * n + prefix, -1).ravel()
    order = np.argsort(beam_key, kind="stable")  # (B * W,)
    sorted_keys = beam_key[order]
    want = b * n + owner
    pos = np.minimum(np.searchsorted(sorted_keys, want), len(sorted_keys) - 1)
    hit = sorted_keys[pos] == want
    rows, beams = np.divmod(order[pos[hit]], n_beams)
    legal[rows, beams, code[hit]] = False


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
        legal = trie.allowed(level, prefix[:, :live])  # (B, live, K)
        if level == trie.levels - 1:
            _forbid_excluded(legal, prefix[:, :live], exclude, trie)
        cand = np.fmax(logp[:, :live], LOGP_FLOOR)  # (B, live, K); -inf, NaN -> the floor
        with np.errstate(invalid="ignore"):  # a dead beam's -inf plus +inf: NaN, masked next
            cand += scores[:, :live, None]
        cand = np.where(legal, cand, np.float32(-np.inf)).reshape(n_req, live * k)
        last = level == trie.levels - 1
        keep, cap = (width * final_expand, widths * final_expand) if last else (width, widths)
        flat = _top_k(cand, min(keep, live * k))  # (B, <= W') best first
        scores = np.take_along_axis(cand, flat, axis=1)
        pad = ((0, 0), (0, keep - flat.shape[1]))  # fewer candidates than beams: dead ones
        flat = np.pad(flat, pad)  # (B, W')
        scores = np.pad(scores, pad, constant_values=-np.inf)  # (B, W')
        scores[np.arange(keep) >= cap[:, None]] = -np.inf  # beyond a request's own width
        alive = scores > -np.inf
        beam, code = np.divmod(flat, k)  # (B, W) parent beam and new code
        prefix = np.where(alive, trie.advance(level, prefix[rows, beam], code), -1)
        if (prefix[alive] < 0).any():  # the mask and the step read the same CSR
            raise RuntimeError(f"a legal step left the trie at level {level}")
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
