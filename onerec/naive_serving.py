"""The naive serving that research code uses: the benchmark's baseline, kept honest.

What ``make bench`` compares the server against, with the same weights:

* the torch model in eager mode, in-process, one request at a time;
* the encoder run again at every decode step (no cached encoder output or K/V);
* beam search whose constraint is a Python callback per beam, as in Hugging Face's
  ``prefix_allowed_tokens_fn``: a dict from SID prefix to its allowed codes.

It returns the same SIDs as :func:`onerec.runtime.beam_search.constrained_beam_search` (a test
checks this), so the comparison is about how it runs, not what it computes.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from onerec.model import OneRec


def prefix_table(sids: np.ndarray) -> dict[tuple[int, ...], list[int]]:
    """Every SID prefix -> the sorted codes that extend it to a catalog SID."""
    table: dict[tuple[int, ...], set[int]] = defaultdict(set)
    for sid in np.unique(sids, axis=0).tolist():
        for level in range(len(sid)):
            table[tuple(sid[:level])].add(sid[level])
    return {prefix: sorted(codes) for prefix, codes in table.items()}


class NaiveServing:
    def __init__(self, model: OneRec, sids: np.ndarray) -> None:
        self.model = model.eval()
        self.allowed = prefix_table(sids)
        self.levels = sids.shape[1]

    def prefix_allowed_tokens_fn(self, prefix: list[int]) -> list[int]:
        return self.allowed.get(tuple(prefix), [])

    @torch.no_grad()
    def recommend(self, pathways: dict[str, np.ndarray], beam_width: int) -> list[tuple]:
        """(sid, score) of up to ``beam_width`` beams, best first, for one request."""
        inputs = {k: torch.from_numpy(np.asarray(v)[None]) for k, v in pathways.items()}
        beams: list[tuple[list[int], float]] = [([], 0.0)]
        for _ in range(self.levels):
            memory, keep = self.model.encoder(**inputs)  # again, every step
            kv = self.model.decoder.cross_kv(memory)
            tokens = torch.tensor([[prefix for prefix, _ in beams]], dtype=torch.long)
            logp = self.model.decoder.step(tokens, kv, keep)[0]  # (beams, K)
            scores = torch.full_like(logp, float("-inf"))
            for b, (prefix, score) in enumerate(beams):  # one Python call per beam
                codes = self.prefix_allowed_tokens_fn(prefix)
                scores[b, codes] = logp[b, codes] + score
            flat = scores.flatten()
            k = min(beam_width, int(torch.isfinite(flat).sum()))
            top = torch.topk(flat, k)
            n_codes = logp.shape[1]
            beams = [
                (beams[i // n_codes][0] + [i % n_codes], float(v))
                for v, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
            ]
        return [(tuple(prefix), score) for prefix, score in beams]
