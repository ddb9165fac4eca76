"""Groups of SIDs for RL post-training, and the legality of unconstrained decoding.

A group is what the policy would serve a user: the top-G beams of the served,
trie-constrained beam search (:func:`~onerec.runtime.beam_search.constrained_beam_search`,
the user's seen items excluded inside the search as the front end does), or G draws from
the same constrained distribution, code by code, with the illegal and excluded codes
masked. OneRec compared the two; ``onerec align --search`` measures both here.

Legality asks what the trie hides: the same beam search over every code sequence
(:class:`OpenTrie`), and the share of its beams that some catalog item carries.
"""

from __future__ import annotations

import numpy as np
import torch

from onerec.model import OneRec, TorchSearch
from onerec.runtime.beam_search import constrained_beam_search
from onerec.runtime.sid_index import SIDIndex
from onerec.runtime.trie import SIDTrie

SEARCHES = ("beam", "sample")


class OpenTrie:
    """A stand-in for :class:`SIDTrie` that allows every code: the served beam search
    run through it is plain, unconstrained beam search. Prefix ids number the code
    sequences themselves (base K), so they stay distinct per beam."""

    def __init__(self, levels: int, codebook_size: int) -> None:
        self.levels, self.codebook_size = levels, codebook_size

    def edges(
        self, level: int, prefix_ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`SIDTrie.edges`: every code out of every live prefix."""
        flat = np.asarray(prefix_ids, dtype=np.int64).ravel()
        row = np.repeat(np.flatnonzero(flat >= 0), self.codebook_size)
        code = np.tile(np.arange(self.codebook_size), len(row) // self.codebook_size)
        return row, flat[row] * self.codebook_size + code, code


@torch.no_grad()
def _search(model: OneRec, inputs: dict[str, torch.Tensor]) -> TorchSearch:
    memory, keep = model.encoder(**inputs)
    return TorchSearch(model.decoder, keep, model.decoder.cross_kv(memory))


@torch.no_grad()
def legal_share(model: OneRec, inputs: dict[str, torch.Tensor], trie: SIDTrie, width: int) -> float:
    """Share of the ``width`` unconstrained beams per user whose SID a catalog item carries."""
    n = len(inputs["static"])
    result = constrained_beam_search(
        _search(model, inputs), n, width, OpenTrie(trie.levels, trie.codebook_size)
    )
    return legal_fraction(result.sids, result.valid, trie)


def legal_fraction(sids: np.ndarray, valid: np.ndarray, trie: SIDTrie) -> float:
    """Share of the valid (B, W, L) SIDs that some catalog item carries."""
    sids = sids[valid]
    return float(trie.contains(sids).mean()) if len(sids) else float("nan")


@torch.no_grad()
def sample_group(
    model: OneRec,
    inputs: dict[str, torch.Tensor],
    trie: SIDTrie,
    group: int,
    exclude: np.ndarray,
    search: str,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """(B, G, L) SIDs and (B, G) validity: the group of each user, never an excluded leaf
    (``exclude`` (B, E), -1 padded, as :func:`~onerec.runtime.beam_search.exclude_leaves`)."""
    n = len(inputs["static"])
    step = _search(model, inputs)
    if search == "beam":
        result = constrained_beam_search(step, n, group, trie, exclude)
        return result.sids, result.valid
    if search != "sample":
        raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
    return _sample(step, n, group, trie, exclude, rng)


def _sample(
    step: TorchSearch,
    n: int,
    group: int,
    trie: SIDTrie,
    exclude: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Ancestral sampling under the trie: each level draws from the model's distribution
    over the legal codes (Gumbel-max), the last level also skipping excluded leaves."""
    k, last = trie.codebook_size, trie.levels - 1
    prefix = np.zeros((n, group), np.int64)
    tokens = np.zeros((n, group, 0), np.int64)
    parents = None
    for level in range(trie.levels):
        logp = step(tokens, parents)  # (B, G, K)
        if level < last:
            legal = trie.allowed(level, prefix)
        else:  # the children's leaf ids, to drop the user's excluded ones
            leaf = trie.advance(level, prefix[..., None], np.arange(k))  # (B, G, K)
            keys = np.arange(n)[:, None, None] * len(trie) + leaf
            banned = (np.arange(n)[:, None] * len(trie) + exclude)[exclude >= 0]
            legal = (leaf >= 0) & ~np.isin(keys, banned)
        gumbel = -np.log(-np.log(rng.random(logp.shape).clip(1e-12, 1.0)))
        code = np.where(legal, logp + gumbel, -np.inf).argmax(-1)  # (B, G)
        ok = legal.any(-1)
        prefix = np.where(ok & (prefix >= 0), trie.advance(level, prefix, code), -1)
        tokens = np.concatenate([tokens, code[..., None]], axis=2)
        # Every draw extends its own cache; at level 0 all share the single BOS row.
        parents = np.tile(np.arange(group) * (level > 0), (n, 1))
    valid = prefix >= 0
    return np.where(valid[..., None], tokens, -1), valid


def first_items(index: SIDIndex, sids: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(B, G) the first item (collision rank) of each SID, as the catalog serves it; -1
    where invalid."""
    leaf = np.where(
        valid, index.trie.leaf_of(sids.reshape(-1, sids.shape[-1])).reshape(valid.shape), -1
    )
    return np.where(leaf >= 0, index.items[index.offsets[np.maximum(leaf, 0)]], -1)
