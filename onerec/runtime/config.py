"""The model's sizes and the FLOPs of one request, for training and serving alike.

:class:`OneRecConfig` is the single source of sizes: ``onerec.model`` builds the network
from it, the Triton models and the front end read it from ``model.json``. MFU needs
:func:`flops_per_request` on the request path, so it lives here, beside the config it
reads, with no torch; a test checks it against torch's FlopCounterMode.
"""

from __future__ import annotations

from dataclasses import dataclass

N_FLAGS = 6  # click, like, follow, comment, forward, hate (schema order)
N_GAP_BUCKETS = 33  # 0 = pad, then floor(log2(1 + seconds before the request)) + 1, up to 32
N_WATCH_BUCKETS = 10  # 0 = pad, then the watch ratio in tenths up to 0.8, then "> 0.8"
N_WEIGHT_BUCKETS = 18  # 0 = pad, then floor(log2(cluster size)) + 1
# Decoder levels whose MoE runs every expert densely instead of dispatching tokens: at
# level 0 one token per user makes the gather/scatter cost more than the experts; at the
# beam levels dispatch is as fast or faster (docs/findings.md).
DENSE_MOE_LEVELS = (0,)


@dataclass
class OneRecConfig:
    """Every size the model has. ``static_cardinalities`` comes from the data set."""

    n_items: int
    static_cardinalities: tuple[int, ...] = ()
    item_vector_dim: int = 64  # frozen content+collaborative item embedding (tokenizer input)
    n_authors: int = 1
    n_tags: int = 1
    sid_levels: int = 3
    codebook_size: int = 256
    d_model: int = 64  # sized so the default trains in ~5 minutes on 2 CPU cores
    n_heads: int = 4
    d_ff: int = 128
    n_static_tokens: int = 2
    short_len: int = 20
    positive_len: int = 256
    lifelong_len: int = 2000
    n_queries: int = 128
    qformer_blocks: int = 2
    encoder_layers: int = 2
    decoder_layers: int = 2
    n_experts: int = 4
    top_k: int = 2
    d_expert: int = 128
    dropout: float = 0.0  # CPU dropout masks cost half a step; the model is step-starved
    rank_dropout: float = 0.2  # the ranking stage's, SASRec's: it overfits small catalogs

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def encoder_len(self) -> int:
        return self.n_static_tokens + self.short_len + self.positive_len + self.n_queries


def _linear(n: int, d_in: int, d_out: int) -> int:
    return 2 * n * d_in * d_out


def _attention(nq: int, nk: int, d: int) -> int:
    return 2 * 2 * nq * nk * d  # scores and weighted sum


def _encoder_layer(t: int, d: int, ff: int) -> int:
    return _linear(t, d, 3 * d) + _attention(t, t, d) + _linear(t, d, d) + 2 * _linear(t, d, ff)


def flops_per_request(
    cfg: OneRecConfig,
    beam_width: int,
    lifelong_items: int | None = None,
    short_items: int | None = None,
    positive_items: int | None = None,
) -> int:
    """Matmul FLOPs of one request: the encoder once, each SID level for ``beam_width``
    beams, then the ranking stage over the beams' items.

    Pathway lengths default to the config's maxima; a server passes the request's own,
    since a light user's encoder runs on far fewer tokens (padding is not useful work).

    Counts what the served decoder executes: with its KV cache, level ``t`` computes one
    new position per beam, which attends to the ``t + 1`` cached ones; cross-attention K/V
    are computed once per request, and the first level once, since all beams share BOS.
    Embedding lookups and element-wise work are not counted, as is usual for MFU.
    """
    d, ff = cfg.d_model, cfg.d_ff
    n_life = cfg.lifelong_len if lifelong_items is None else lifelong_items
    n_short = cfg.short_len if short_items is None else short_items
    n_pos = cfg.positive_len if positive_items is None else positive_items
    n_events = n_short + n_pos
    t_enc = cfg.n_static_tokens + n_events + cfg.n_queries
    f = _linear(1, max(1, len(cfg.static_cardinalities)) * d, cfg.n_static_tokens * d)
    f += _linear(n_events + n_life, cfg.item_vector_dim, d)  # item vector projection
    f += _linear(n_events, N_FLAGS, d)
    q = cfg.n_queries
    f += cfg.qformer_blocks * (
        _linear(q, d, d)
        + _linear(n_life, d, 2 * d)
        + _attention(q, n_life, d)
        + _linear(q, d, d)
        + 2 * _linear(q, d, ff)
    )
    f += cfg.encoder_layers * _encoder_layer(t_enc, d, ff)
    # The ranking stage: its two layers over the short-term items, then the candidates'
    # scores (as many as beams; a SID shared by several items adds a few more).
    f += _linear(n_short, cfg.item_vector_dim, d)  # its own item vector projection
    f += 2 * _encoder_layer(n_short, d, ff) + _linear(beam_width, d, 1)
    f += cfg.decoder_layers * _linear(t_enc, d, 2 * d)  # cross K/V, once
    for level in range(cfg.sid_levels):
        n = 1 if level == 0 else beam_width  # new positions: every beam starts from BOS
        experts = cfg.n_experts if level in DENSE_MOE_LEVELS else cfg.top_k
        per_layer = (
            _linear(n, d, 3 * d)
            + _attention(n, level + 1, d)  # each new position over its beam's cache
            + _linear(n, d, d)
            + _linear(n, d, d)  # cross-attention queries
            + _attention(n, t_enc, d)
            + _linear(n, d, d)
            + _linear(n, d, cfg.n_experts)
            + experts * 2 * _linear(n, d, cfg.d_expert)
        )
        f += cfg.decoder_layers * per_layer
        f += _linear(n, d, cfg.codebook_size)
    return int(f)
