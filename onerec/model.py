"""The OneRec encoder-decoder, in one file: four user pathways in, 3-level semantic IDs out.

Read top to bottom:

* :class:`~onerec.runtime.config.OneRecConfig` -- the single source of sizes, and
  :func:`~onerec.runtime.config.flops_per_request`, the FLOP count from it, live in the
  runtime package: the request path reads both without torch.
* Building blocks: :class:`Attention`, :class:`FeedForward`, :class:`MoE`.
* :class:`PathwayEncoder` -- static, short-term, positive-feedback and lifelong pathways;
  the lifelong one is compressed offline/online by :mod:`onerec.runtime.lifelong` and then
  reduced by a QFormer (:class:`QFormer`) to ``n_queries`` tokens.
* :class:`SIDDecoder` -- BOS + one embedding table per SID level; causal self-attention,
  cross-attention to the encoder and a mixture-of-experts FFN; one head per level.
* :class:`NextItemHead` -- the ranking stage: a user vector from the short-term items,
  scored against the head's own item table, orders the items that the beam search
  generated.

Token inputs use index 0 for padding; item index ``i`` of the catalog is ``i + 1`` and
``n_items + 1`` stands for an item the model has never seen.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from onerec.runtime.config import (
    DENSE_MOE_LEVELS,
    N_FLAGS,
    N_GAP_BUCKETS,
    N_WATCH_BUCKETS,
    N_WEIGHT_BUCKETS,
    OneRecConfig,
)


class _FusedKeyPaddedAttention(torch.autograd.Function):
    """Attention under a key-padding mask, exported as ONNX Runtime's fused
    ``com.microsoft::MultiHeadAttention``: one kernel instead of the score matmul, bias
    Add, Softmax and value matmul, each a pass over (queries x keys) scores that do not fit
    in cache at serving shapes. Torch runs the same maths (the parity tests compare them).

    q (B, Nq, h * dh), k and v (B, h, T, dh), keep (B, T) int32 with 1 = attend; every
    row must keep a key, as every caller's mask does: the two disagree on an all-masked row.
    """

    @staticmethod
    def forward(
        ctx: object,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        keep: torch.Tensor,
        heads: int,
    ) -> torch.Tensor:
        b, n, d = q.shape
        q = q.view(b, n, heads, d // heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :].bool())
        return y.transpose(1, 2).reshape(b, n, d)

    @staticmethod
    def symbolic(
        g: torch.Graph,
        q: torch.Value,
        k: torch.Value,
        v: torch.Value,
        keep: torch.Value,
        heads: int,
    ) -> torch.Value:
        no_bias = g.op("prim::Constant")  # an omitted optional input
        no_bias.setType(torch._C.OptionalType.ofTensor())
        y = g.op("com.microsoft::MultiHeadAttention", q, k, v, no_bias, keep, num_heads_i=heads)
        y.setType(q.type())
        return y


class Attention(nn.Module):
    """Multi-head attention; keys/values may come precomputed (shared across beams)."""

    def __init__(self, cfg: OneRecConfig) -> None:
        super().__init__()
        self.h, self.dh = cfg.n_heads, cfg.head_dim
        self.q = nn.Linear(cfg.d_model, cfg.d_model)
        self.kv = nn.Linear(cfg.d_model, 2 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, _ = memory.shape
        k, v = self.kv(memory).view(b, t, 2, self.h, self.dh).permute(2, 0, 3, 1, 4)
        return k, v  # each (B, h, T, dh)

    def forward(
        self,
        x: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        k, v = kv
        # Queries of W beams share one user's keys: fold beams into the query length.
        q = self.q(x).view(k.shape[0], -1, self.h * self.dh)  # (Bk, W*t, d)
        if (
            torch.onnx.is_in_onnx_export()
            and mask is not None
            and not causal
            and mask.shape[1:3] == (1, 1)
        ):
            keep = mask[:, 0, 0].to(torch.int32)  # (Bk, T) key padding
            y = _FusedKeyPaddedAttention.apply(q, k, v, keep, self.h)
            return self.out(y.reshape(b, t, -1))
        q = q.view(k.shape[0], -1, self.h, self.dh).transpose(1, 2)  # (Bk, h, W*t, dh)
        if self.training and torch.is_grad_enabled():
            # Training only: the fused kernel skips the (Nq, T) score round trips through
            # memory that dominate a CPU step. Same maths as the path below.
            if causal:
                n = k.shape[-2]
                causal_keep = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
                mask = causal_keep if mask is None else mask & causal_keep
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.drop.p if self.drop.p else 0.0
            )
            return self.out(y.transpose(1, 2).reshape(b, t, -1))
        # Inference: plain matmuls rather than SDPA. The FLOP counter sees them (CPU SDPA
        # kernels are invisible to it), and they export as-is where the mask is no key
        # padding.
        scores = (q * (1.0 / math.sqrt(self.dh))) @ k.transpose(-2, -1)  # (Bk, h, Nq, T)
        if mask is not None:
            # An additive bias built at the mask's own (small) shape: the same -inf where
            # masked, but one broadcast Add over the scores instead of ONNX Runtime's Where,
            # which costs about twice as much per score at serving shapes.
            scores = scores + torch.zeros(mask.shape, dtype=scores.dtype).masked_fill(
                ~mask, float("-inf")
            )
        if causal:
            n = scores.shape[-1]
            future = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        y = self.drop(scores.softmax(-1)) @ v  # (Bk, h, Nq, dh)
        return self.out(y.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, d_ff)
        self.down = nn.Linear(d_ff, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.down(F.gelu(self.up(x))))


class MoE(nn.Module):
    """Top-k mixture of experts with loss-free load balancing (a routing bias).

    The bias only shifts which experts are *chosen*; gates come from the unbiased scores.
    After each training step :meth:`update_bias` nudges under-used experts up and
    over-used ones down, as in DeepSeek-V3 / OneRec, so no auxiliary loss is needed.
    """

    def __init__(self, cfg: OneRecConfig) -> None:
        super().__init__()
        self.k = cfg.top_k
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(
            FeedForward(cfg.d_model, cfg.d_expert, cfg.dropout) for _ in range(cfg.n_experts)
        )
        self.register_buffer("bias", torch.zeros(cfg.n_experts))
        self.register_buffer("load", torch.zeros(cfg.n_experts))

    def forward(self, x: torch.Tensor, dense: bool = False) -> torch.Tensor:
        """``dense`` runs every expert on every token, weighted by its gate (0 where it was
        not chosen): the same result without the gather/scatter dispatch, which costs more
        than the experts when there are few tokens (see DENSE_MOE_LEVELS)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, d)
        scores = torch.sigmoid(self.router(x))  # (N, E)
        _, chosen = torch.topk(scores + self.bias, self.k, dim=-1)  # (N, k)
        gates = torch.gather(scores, 1, chosen)
        gates = gates / gates.sum(-1, keepdim=True)
        if self.training:
            self.load += torch.bincount(chosen.flatten(), minlength=len(self.experts)).float()
        if dense:
            picked = chosen[..., None] == torch.arange(len(self.experts), device=x.device)
            weight = (picked * gates[..., None]).sum(1)  # (N, E)
            return sum(weight[:, e, None] * ex(x) for e, ex in enumerate(self.experts)).view(shape)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):  # a loop over E experts, not over tokens
            rows, slot = torch.nonzero(chosen == e, as_tuple=True)
            out.index_add_(0, rows, gates[rows, slot, None] * expert(x[rows]))
        return out.view(shape)

    @torch.no_grad()
    def update_bias(self, rate: float = 1e-3) -> None:
        if self.load.sum() > 0:
            self.bias += rate * torch.sign(self.load.mean() - self.load)
            self.load.zero_()


class EncoderLayer(nn.Module):
    def __init__(self, cfg: OneRecConfig) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, self.attn.keys_values(h), mask)
        return x + self.ffn(self.ln2(x))


class QFormer(nn.Module):
    """``n_queries`` learned queries cross-attend to the lifelong items: (B, L, d) -> (B, Q, d)."""

    def __init__(self, cfg: OneRecConfig) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(cfg.n_queries, cfg.d_model) * 0.02)
        self.blocks = nn.ModuleList(_QFormerBlock(cfg) for _ in range(cfg.qformer_blocks))

    def forward(self, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = self.queries.expand(items.shape[0], -1, -1)
        for block in self.blocks:
            q = block(q, items, mask)
        return q


class _QFormerBlock(nn.Module):
    def __init__(self, cfg: OneRecConfig) -> None:
        super().__init__()
        self.ln_q, self.ln_kv, self.ln_ff = (nn.LayerNorm(cfg.d_model) for _ in range(3))
        self.cross = Attention(cfg)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout)

    def forward(self, q: torch.Tensor, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = q + self.cross(self.ln_q(q), self.cross.keys_values(self.ln_kv(items)), mask)
        return q + self.ffn(self.ln_ff(q))


class PathwayEncoder(nn.Module):
    """Static, short-term, positive-feedback and lifelong pathways -> (B, T_enc, d)."""

    def __init__(
        self,
        cfg: OneRecConfig,
        item_vectors: torch.Tensor,
        item_author: torch.Tensor,
        item_tag: torch.Tensor,
        item_sids: torch.Tensor,
        codes: nn.ModuleList,
    ) -> None:
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        # Frozen per-item side information, indexed by token id (0 = pad, n+1 = unknown).
        self.register_buffer("item_vectors", item_vectors.float())
        self.register_buffer("item_author", item_author.long())
        self.register_buffer("item_tag", item_tag.long())
        self.register_buffer("item_sids", item_sids.long())
        self.codes = codes  # the decoder's SID embeddings: history and output share one space
        self.item = nn.Embedding(cfg.n_items + 2, d, padding_idx=0)
        self.item_proj = nn.Linear(cfg.item_vector_dim, d)
        self.author = nn.Embedding(cfg.n_authors + 1, d)
        self.tag = nn.Embedding(cfg.n_tags + 1, d)
        self.gap = nn.Embedding(N_GAP_BUCKETS, d)
        self.watch = nn.Embedding(N_WATCH_BUCKETS, d)
        self.weight = nn.Embedding(N_WEIGHT_BUCKETS, d)
        self.flags = nn.Linear(N_FLAGS, d)
        self.static = nn.ModuleList(nn.Embedding(c, d) for c in cfg.static_cardinalities)
        self.static_proj = nn.Linear(
            max(1, len(cfg.static_cardinalities)) * d, cfg.n_static_tokens * d
        )
        self.pos_short = nn.Embedding(cfg.short_len, d)
        self.pos_positive = nn.Embedding(cfg.positive_len, d)
        self.pathway = nn.Embedding(4, d)  # static, short-term, positive, lifelong
        self.qformer = QFormer(cfg)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.ln = nn.LayerNorm(d)

    def _items(self, ids: torch.Tensor) -> torch.Tensor:
        return (
            self.item(ids)
            + self.item_proj(self.item_vectors[ids])
            + self.author(self.item_author[ids])
            + self.tag(self.item_tag[ids])
            + sum(emb(self.item_sids[ids, i]) for i, emb in enumerate(self.codes))
        )

    def _events(
        self, ids: torch.Tensor, gap: torch.Tensor, watch: torch.Tensor, flags: torch.Tensor
    ) -> torch.Tensor:
        return self._items(ids) + self.gap(gap) + self.watch(watch) + self.flags(flags)

    def forward(
        self,
        static: torch.Tensor,  # (B, F) int
        short_items: torch.Tensor,  # (B, S) int, S <= short_len
        short_gap: torch.Tensor,
        short_watch: torch.Tensor,
        short_flags: torch.Tensor,  # (B, S, 6) float
        pos_items: torch.Tensor,  # (B, P) int, P <= positive_len
        pos_gap: torch.Tensor,
        pos_watch: torch.Tensor,
        pos_flags: torch.Tensor,
        life_items: torch.Tensor,  # (B, L) int, L <= lifelong_len
        life_gap: torch.Tensor,
        life_weight: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the encoder output (B, T, d) and its key-padding mask (B, T), True = keep."""
        b = static.shape[0]
        cfg = self.cfg
        if len(self.static):
            feats = torch.cat([emb(static[:, i]) for i, emb in enumerate(self.static)], dim=-1)
        else:
            feats = torch.zeros(b, cfg.d_model, device=static.device)
        st = self.static_proj(feats).view(b, cfg.n_static_tokens, cfg.d_model)  # (B, n_static, d)
        short = self._events(short_items, short_gap, short_watch, short_flags)
        short = short + self.pos_short(torch.arange(short.shape[1], device=short.device))
        pos = self._events(pos_items, pos_gap, pos_watch, pos_flags)
        pos = pos + self.pos_positive(torch.arange(pos.shape[1], device=pos.device))
        life_tokens = (
            self._items(life_items) + self.gap(life_gap) + self.weight(life_weight)
        )  # (B, L, d)
        # Queries of a user with no lifelong items attend to the first (pad) token alone.
        life_keep = life_items > 0
        first = torch.arange(life_keep.shape[1], device=life_keep.device) == 0
        life_keep = life_keep | (first & ~life_keep.any(1, keepdim=True))
        life = self.qformer(life_tokens, life_keep[:, None, None, :])  # (B, Q, d)

        x = torch.cat(
            [
                st + self.pathway.weight[0],
                short + self.pathway.weight[1],
                pos + self.pathway.weight[2],
                life + self.pathway.weight[3],
            ],
            dim=1,
        )  # (B, T, d)
        keep = torch.cat(
            [
                torch.ones(b, cfg.n_static_tokens, dtype=torch.bool, device=x.device),
                short_items > 0,
                pos_items > 0,
                torch.ones(b, life.shape[1], dtype=torch.bool, device=x.device),
            ],
            dim=1,
        )  # (B, T)
        mask = keep[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
        return self.ln(x), keep


class DecoderLayer(nn.Module):
    def __init__(self, cfg: OneRecConfig) -> None:
        super().__init__()
        self.ln1, self.ln2, self.ln3 = (nn.LayerNorm(cfg.d_model) for _ in range(3))
        self.self_attn = Attention(cfg)
        self.cross = Attention(cfg)
        self.moe = MoE(cfg)

    def forward(
        self, x: torch.Tensor, cross_kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor
    ) -> torch.Tensor:
        b, w, t, d = x.shape  # beams of one user share its cross-attention keys/values
        h = self.ln1(x).view(b * w, t, d)
        x = x + self.self_attn(h, self.self_attn.keys_values(h), causal=True).view(b, w, t, d)
        x = x + self.cross(self.ln2(x).view(b, w * t, d), cross_kv, mask).view(b, w, t, d)
        return x + self.moe(self.ln3(x))

    def step(
        self,
        x: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None,
        cross_kv: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        dense_moe: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One new position per beam, x (B, W, 1, d), attending to its beam's cached
        self-attention K/V (B, W, h, t, dh): returns x and the K/V with the new position
        appended (B, W, h, t + 1, dh). The same maths as :meth:`forward` at the last
        position, without recomputing the earlier ones."""
        b, w, _, d = x.shape
        h = self.ln1(x).view(b * w, 1, d)
        k, v = self.self_attn.keys_values(h)  # (B*W, h, 1, dh)
        if past is not None:
            k = torch.cat([past[0].flatten(0, 1), k], dim=2)  # (B*W, h, t+1, dh)
            v = torch.cat([past[1].flatten(0, 1), v], dim=2)
        x = x + self.self_attn(h, (k, v)).view(b, w, 1, d)
        x = x + self.cross(self.ln2(x).view(b, w, d), cross_kv, mask).view(b, w, 1, d)
        x = x + self.moe(self.ln3(x), dense=dense_moe)
        return x, k.unflatten(0, (b, w)), v.unflatten(0, (b, w))


class SIDDecoder(nn.Module):
    """Generates SID levels from BOS; cross-attention K/V are computed once per user."""

    def __init__(self, cfg: OneRecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.bos = nn.Parameter(torch.randn(cfg.d_model) * 0.02)
        self.codes = nn.ModuleList(
            nn.Embedding(cfg.codebook_size, cfg.d_model) for _ in range(cfg.sid_levels)
        )
        self.pos = nn.Embedding(cfg.sid_levels, cfg.d_model)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.ln = nn.LayerNorm(cfg.d_model)
        self.heads = nn.ModuleList(
            nn.Linear(cfg.d_model, cfg.codebook_size) for _ in range(cfg.sid_levels)
        )

    def cross_kv(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer cross-attention keys/values of the encoder output: once per request."""
        return [layer.cross.keys_values(memory) for layer in self.layers]

    def hidden(
        self,
        tokens: torch.Tensor,
        cross_kv: list[tuple[torch.Tensor, torch.Tensor]],
        keep: torch.Tensor,
    ) -> torch.Tensor:
        """tokens (B, W, t) SID prefixes -> hidden states (B, W, t+1, d) at BOS and each token."""
        b, w, t = tokens.shape
        x = self.bos.expand(b, w, 1, -1)
        if t:
            emb = torch.stack(
                [self.codes[i](tokens[..., i]) for i in range(t)], dim=2
            )  # (B, W, t, d)
            x = torch.cat([x, emb], dim=2)
        x = x + self.pos.weight[: t + 1]
        mask = keep[:, None, None, :]
        for layer, kv in zip(self.layers, cross_kv, strict=True):
            x = layer(x, kv, mask)
        return self.ln(x)

    def step(
        self,
        tokens: torch.Tensor,
        cross_kv: list[tuple[torch.Tensor, torch.Tensor]],
        keep: torch.Tensor,
    ) -> torch.Tensor:
        """Log-probabilities (B, W, K) of the next level given prefixes (B, W, t).

        At the first level every beam is the bare BOS, so one row is computed and shared.
        """
        b, w, t = tokens.shape
        if t == 0:
            tokens = tokens[:, :1]
        h = self.hidden(tokens, cross_kv, keep)[:, :, -1]  # (B, W or 1, d)
        return F.log_softmax(self.heads[t](h), dim=-1).expand(b, w, -1)

    def cached_step(
        self,
        code: torch.Tensor | None,
        past: list[tuple[torch.Tensor, torch.Tensor]],
        cross_kv: list[tuple[torch.Tensor, torch.Tensor]],
        keep: torch.Tensor,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """What serving runs per level: :meth:`step` with a KV cache.

        Level t reads only the code each beam chose at level t - 1, ``code`` (B, W) (None
        at level 0, where all beams share BOS and one row is computed), and every layer's
        self-attention K/V of positions 0..t-1, ``past`` (B, W, h, t, dh) each, already
        gathered to the beams' parents. Returns the log-probabilities (B, W, K) and the
        K/V of positions 0..t for the next level.
        """
        t = 0 if code is None else past[0][0].shape[3]
        if code is None:
            x = (self.bos + self.pos.weight[0]).expand(keep.shape[0], 1, 1, -1)
        else:
            x = (self.codes[t - 1](code) + self.pos.weight[t])[:, :, None]  # (B, W, 1, d)
        mask = keep[:, None, None, :]
        present = []
        for i, (layer, kv) in enumerate(zip(self.layers, cross_kv, strict=True)):
            x, k, v = layer.step(x, past[i] if past else None, kv, mask, t in DENSE_MOE_LEVELS)
            present.append((k, v))
        logp = F.log_softmax(self.heads[t](self.ln(x)[:, :, 0]), dim=-1)  # (B, W, K)
        return logp, present


class NextItemHead(nn.Module):
    """The ranking stage: scores items for a user from the order of their recent items.

    The SID decoder generates good candidates but orders them worse than a sequential
    next-item model does; :mod:`onerec.runtime.ranking` adds this head's score to each decoded
    item's SID log-probability. This small causal transformer reads the short-term
    pathway's items, oldest first, and its state at the newest one is the user vector; an
    item's score is its dot product with that item's row of the head's item table.

    An item's row is its ID's embedding plus the side information the encoder's item
    tokens carry (content vector, author, tag, one embedding per SID code), in the head's
    own parameters: items that share a code, tag or author share those rows, so an item
    seen a few times borrows from its neighbours (SASRec's table has the ID alone; what
    each part added is in docs/findings.md).
    """

    def __init__(
        self,
        cfg: OneRecConfig,
        item_vectors: torch.Tensor,
        item_author: torch.Tensor,
        item_tag: torch.Tensor,
        item_sids: torch.Tensor,
    ) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_items = cfg.n_items
        # How much its score counts beside the SID's log-probability: fitted after training
        # on the validation events (onerec.evaluate.fit_rank_weight), served in the user
        # vector's length.
        self.register_buffer("rank_weight", torch.ones(()))
        self.items = nn.Embedding(cfg.n_items + 2, d, padding_idx=0)  # ID rows
        # Token-indexed side information (0 = pad, n + 1 = unknown), rebuilt from the
        # catalog, so not part of the checkpoint; code 0 (unknown author or tag), padding
        # and the unknown item add nothing. Each SID level has its own rows of ``codes``.
        none = cfg.sid_levels * cfg.codebook_size
        rows = item_sids.long() + cfg.codebook_size * torch.arange(cfg.sid_levels)
        rows[0] = rows[-1] = none
        self.register_buffer("item_codes", rows, persistent=False)
        self.register_buffer("item_vectors", item_vectors.float(), persistent=False)
        self.register_buffer("item_author", item_author.long(), persistent=False)
        self.register_buffer("item_tag", item_tag.long(), persistent=False)
        self.codes = nn.Embedding(none + 1, d, padding_idx=none)
        self.vector = nn.Linear(cfg.item_vector_dim, d, bias=False)
        self.author = nn.Embedding(cfg.n_authors + 1, d, padding_idx=0)
        self.tag = nn.Embedding(cfg.n_tags + 1, d, padding_idx=0)
        self.pos = nn.Embedding(cfg.short_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.rank_dropout)
        layer = replace(cfg, dropout=cfg.rank_dropout)
        self.layers = nn.ModuleList(EncoderLayer(layer) for _ in range(2))
        self.ln = nn.LayerNorm(cfg.d_model)

    def embed(self, items: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        """(..., d) rows of item tokens (...): ``items``' ID rows plus the side information's."""
        return items(ids) + self._side(ids)

    def table(self, items: nn.Embedding) -> torch.Tensor:
        """(n_items + 2, d): :meth:`embed` of every token, what scores are taken against."""
        return items.weight + self._side(slice(None))

    def _side(self, ids: torch.Tensor | slice) -> torch.Tensor:
        """The side information's share of the rows of ``ids`` (all rows for ``:``)."""
        return (
            self.vector(self.item_vectors[ids])
            + self.author(self.item_author[ids])
            + self.tag(self.item_tag[ids])
            + self.codes(self.item_codes[ids]).sum(-2)
        )

    def served_table(self) -> torch.Tensor:
        """The table that serving scores candidates with (``item_table.npy``)."""
        return self.table(self.items).detach()

    def states(self, items: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        """(B, t, d) states of item tokens (B, t), oldest first and left-padded with 0: the
        newest item always takes the last position, whatever t."""
        t = ids.shape[1]
        x = self.embed(items, ids) * math.sqrt(items.embedding_dim) + self.pos.weight[-t:]
        x = self.drop(x)
        pos = torch.arange(t, device=ids.device)
        # Padding is never a key, except to itself, so no row of the mask is empty.
        mask = ((pos[:, None] >= pos) & (ids > 0)[:, None, :]) | (pos[:, None] == pos)
        for layer in self.layers:
            x = layer(x, mask[:, None])
        return self.ln(x)

    def user(self, short_items: torch.Tensor) -> torch.Tensor:
        """(B, d) user vectors from the short-term pathway's items (B, S), newest first and
        right-padded, as the encoder receives them."""
        return self.states(self.items, short_items.flip(1))[:, -1]

    def loss(self, items: nn.Embedding, window: torch.Tensor, last: bool = False) -> torch.Tensor:
        """Mean cross-entropy of each position's successor (only the newest one's with
        ``last``) over all rows of ``items``; ``window`` (B, short_len + 1) holds item
        tokens, oldest first, left-padded with 0."""
        ids, targets = window[:, :-1], window[:, 1:]
        real = (ids > 0) & (targets > 0) & (targets <= self.n_items)
        if last:
            real[:, :-1] = False
        h = self.states(items, ids)[real]  # (N, d)
        logits = h @ self.table(items)[1 : self.n_items + 1].T  # (N, n_items)
        return F.cross_entropy(logits, targets[real] - 1)


def _init(module: nn.Module) -> None:
    """Small GPT-style init: summed token features and tied heads start near uniform."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
        nn.init.zeros_(module.weight[module.padding_idx])
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class OneRec(nn.Module):
    """Encoder + decoder, with the teacher-forced training loss."""

    def __init__(
        self,
        cfg: OneRecConfig,
        item_vectors: torch.Tensor,
        item_author: torch.Tensor,
        item_tag: torch.Tensor,
        item_sids: torch.Tensor,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.decoder = SIDDecoder(cfg)
        self.encoder = PathwayEncoder(
            cfg, item_vectors, item_author, item_tag, item_sids, self.decoder.codes
        )
        self.next_item = NextItemHead(cfg, item_vectors, item_author, item_tag, item_sids)
        self.apply(_init)
        for head, codes in zip(self.decoder.heads, self.decoder.codes, strict=True):
            head.weight = codes.weight  # tied: the logit of a code is its embedding's match

    def losses(
        self,
        inputs: dict[str, torch.Tensor],
        target_sids: torch.Tensor,
        recent: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The training objectives by name: ``"sid"``, the mean next-token cross-entropy over
        the SID levels of the targets, and, with ``recent`` (the window of item tokens that
        ends at the first target), ``"next_item"``, :class:`NextItemHead`'s loss.

        ``target_sids`` is (B, L) for one target per user or (B, M, L) for M targets that
        share one encoder pass (the next items after the cut, decoded independently, like
        beams); rows of -1 are padding and are ignored. They are kept apart so that training
        can report the SID loss on the same scale as the validation loss.
        """
        if target_sids.dim() == 2:
            target_sids = target_sids[:, None]
        memory, keep = self.encoder(**inputs)
        kv = self.decoder.cross_kv(memory)
        h = self.decoder.hidden(target_sids[..., :-1].clamp(min=0), kv, keep)  # (B, M, L, d)
        levels = [
            F.cross_entropy(
                self.decoder.heads[i](h[:, :, i]).flatten(0, 1),
                target_sids[:, :, i].flatten(),
                ignore_index=-1,
            )
            for i in range(self.cfg.sid_levels)
        ]
        parts = {"sid": torch.stack(levels).mean()}
        if recent is not None:
            parts["next_item"] = self.next_item.loss(self.encoder.item, recent)
        return parts

    def loss(
        self,
        inputs: dict[str, torch.Tensor],
        target_sids: torch.Tensor,
        recent: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The sum of :meth:`losses`: what training minimises."""
        return sum(self.losses(inputs, target_sids, recent).values())

    def user(self, short_items: torch.Tensor) -> torch.Tensor:
        """(B, d) user vectors of the ranking stage (:class:`NextItemHead`), scaled by its
        fitted weight: what serving scores items with."""
        return self.next_item.rank_weight * self.next_item.user(short_items)

    def moe_layers(self) -> list[MoE]:
        return [layer.moe for layer in self.decoder.layers]


class TorchSearch:
    """The torch twin of :class:`onerec.runtime.onnx_runners.DecoderSearch`: a beam
    search's ``step_fn`` that runs :meth:`SIDDecoder.cached_step`, each beam's cache
    gathered from its parent, for offline decoding and the export's parity check."""

    def __init__(
        self, decoder: SIDDecoder, keep: torch.Tensor, cross_kv: list[tuple[torch.Tensor, ...]]
    ) -> None:
        self.decoder, self.keep, self.cross_kv = decoder, keep, cross_kv
        self.present: list[tuple[torch.Tensor, torch.Tensor]] = []

    @torch.no_grad()
    def __call__(self, tokens, parents):  # (B, W, t) int64 ndarray, (B, W) or None
        b, w, t = tokens.shape
        code, past = None, []
        if t:
            rows = torch.arange(b)[:, None]
            at = torch.from_numpy(parents)
            code = torch.from_numpy(np.ascontiguousarray(tokens[:, :, -1]))
            past = [(k[rows, at], v[rows, at]) for k, v in self.present]
        logp, self.present = self.decoder.cached_step(code, past, self.cross_kv, self.keep)
        return logp.expand(b, w, -1).numpy()
