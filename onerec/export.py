"""ONNX export of the encoder and of one decoder step per SID level (opset 17).

* ``encoder.onnx``: the twelve pathway tensors -> the encoder's key-padding mask ``keep``,
  for every decoder layer the cross-attention keys and values, and the ranking stage's
  ``user`` vector. Batch and every sequence length are dynamic axes. K/V leave the
  encoder already projected, so the decoder never recomputes them per beam or per step.
* ``item_table.npy``: the ranking stage's (n_items + 2, d) item table that ``user`` scores
  candidate items against (:mod:`onerec.runtime.ranking`); the front end holds it.
* ``decoder_step_{t}.onnx``: the decoder with a KV cache. Level ``t`` takes the code each
  beam chose at level ``t - 1`` (``code``, (B, W)), ``keep``, the cross-attention K/V and
  every layer's self-attention K/V of the beam's earlier positions (``past_k_i``,
  ``past_v_i``, (B, W, heads, t, head_dim)), and returns the log-probabilities (B, W, K)
  of level ``t`` and that cache with position ``t`` appended (``present_*``). So no level
  recomputes earlier positions; the search gathers each beam's cache from its parent.
  One graph per level because the cache's length fixes it; level 0 takes neither code
  nor cache (all beams share BOS) and returns (B, 1, K).

The legacy TorchScript exporter is used (``dynamo=False``): the dynamo exporter needs
``onnxscript``, which the serving images do not carry. Attention under a key-padding mask
exports as ONNX Runtime's contrib ``com.microsoft::MultiHeadAttention``
(:class:`onerec.model.Attention`), so the graphs are for ONNX Runtime (the tests run its
CPU provider).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from onerec.model import OneRec, TorchSearch
from onerec.runtime.config import N_FLAGS
from onerec.runtime.pathways import PATHWAY_INPUTS

OPSET = 17
# ONNX Runtime's contrib domain, for the fused key-padded attention (onerec.model).
CUSTOM_OPSETS = {"com.microsoft": 1}


def kv_names(model: OneRec) -> list[str]:
    return [
        f"{kind}_{i}" for i in range(model.cfg.decoder_layers) for kind in ("cross_k", "cross_v")
    ]


class _Encoder(nn.Module):
    def __init__(self, model: OneRec) -> None:
        super().__init__()
        self.model = model

    def forward(self, *pathways: torch.Tensor) -> tuple[torch.Tensor, ...]:
        memory, keep = self.model.encoder(**dict(zip(PATHWAY_INPUTS, pathways, strict=True)))
        kv = self.model.decoder.cross_kv(memory)
        user = self.model.user(pathways[PATHWAY_INPUTS.index("short_items")])
        return (keep, *(t for pair in kv for t in pair), user)


class _Step(nn.Module):
    """One level of the cached decoder: (code, keep, cross K/V, past self-attention K/V)
    -> (log-probabilities, present self-attention K/V); level 0 takes neither code nor
    past."""

    def __init__(self, model: OneRec, level: int) -> None:
        super().__init__()
        self.model, self.level = model, level

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        layers = self.model.cfg.decoder_layers
        code, rest = (None, args) if self.level == 0 else (args[0], args[1:])
        keep, flat = rest[0], rest[1:]
        cross = [(flat[2 * i], flat[2 * i + 1]) for i in range(layers)]
        cached = flat[2 * layers :]
        past = [(cached[2 * i], cached[2 * i + 1]) for i in range(len(cached) // 2)]
        logp, present = self.model.decoder.cached_step(code, past, cross, keep)
        return (logp, *(t for pair in present for t in pair))


def past_names(model: OneRec, kind: str = "past") -> list[str]:
    """Names of the cached self-attention K/V: ``past_k_0``, ``past_v_0``, ... (inputs) or
    ``present_*`` (outputs), (B, W, heads, t, head_dim) each."""
    return [f"{kind}_{c}_{i}" for i in range(model.cfg.decoder_layers) for c in ("k", "v")]


def example_pathways(model: OneRec, batch: int = 2, length: int = 3) -> tuple[torch.Tensor, ...]:
    """Small valid inputs that fix the graph's ranks and dtypes for tracing."""
    cfg = model.cfg
    ints = torch.ones(batch, length, dtype=torch.long)
    flags = torch.zeros(batch, length, N_FLAGS)
    static = torch.zeros(batch, max(1, len(cfg.static_cardinalities)), dtype=torch.long)
    static = static[:, : len(cfg.static_cardinalities)]
    return (static, ints, ints, ints, flags, ints, ints, ints, flags, ints, ints, ints)


def export(model: OneRec, out: str | Path) -> list[Path]:
    """Write ``encoder.onnx``, ``decoder_step_{t}.onnx`` and ``item_table.npy`` into
    ``out``; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    encoder = _Encoder(model).eval()
    names = kv_names(model)
    dynamic = {"static": {0: "batch"}, "keep": {0: "batch", 1: "enc_len"}, "user": {0: "batch"}}
    for name in PATHWAY_INPUTS[1:]:
        dynamic[name] = {0: "batch", 1: f"{name.split('_')[0]}_len"}
    for name in names:
        dynamic[name] = {0: "batch", 2: "enc_len"}
    pathways = example_pathways(model)
    paths = [out / "encoder.onnx"]
    with torch.no_grad(), warnings.catch_warnings():
        # Known and checked by the parity tests: Python ints read from shapes (one graph per
        # level), the K/V split, and the legacy exporter's deprecation notice.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        # The MoE's index_add gets row ids from nonzero(): never negative, never repeated
        # within one call, which is what these two exporter notices are about.
        warnings.filterwarnings("ignore", "Exporting aten::index operator", UserWarning)
        warnings.filterwarnings("ignore", ".*duplicated values in 'index'", UserWarning)
        torch.onnx.export(
            encoder,
            pathways,
            paths[0],
            input_names=list(PATHWAY_INPUTS),
            output_names=["keep", *names, "user"],
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,
            custom_opsets=CUSTOM_OPSETS,
        )
        keep, *flat, _ = encoder(*pathways)
        past: list[torch.Tensor] = []
        for level in range(model.cfg.sid_levels):
            step = _Step(model, level).eval()
            code = torch.zeros(2, 3, dtype=torch.long)
            inputs = (keep, *flat) if level == 0 else (code, keep, *flat, *past)
            in_names = (
                ["keep", *names] if level == 0 else ["code", "keep", *names, *past_names(model)]
            )
            out_names = ["log_probs", *past_names(model, "present")]
            axes = {n: dynamic[n] for n in ["keep", *names]}
            axes |= {"code": {0: "batch", 1: "beams"}, "log_probs": {0: "batch", 1: "beams"}}
            axes |= {n: {0: "batch", 1: "beams"} for n in past_names(model)}
            axes |= {n: {0: "batch", 1: "beams"} for n in past_names(model, "present")}
            path = out / f"decoder_step_{level}.onnx"
            torch.onnx.export(
                step,
                inputs,
                path,
                input_names=in_names,
                output_names=out_names,
                dynamic_axes={k: v for k, v in axes.items() if k in in_names + out_names},
                opset_version=OPSET,
                dynamo=False,
                custom_opsets=CUSTOM_OPSETS,
            )
            paths.append(path)
            # The next level's example cache: this level's, for 3 beams.
            _, *present = step(*inputs)
            past = [t.expand(-1, 3, -1, -1, -1) for t in present]
    paths.append(out / "item_table.npy")
    np.save(paths[-1], model.next_item.served_table().numpy())
    return paths


@dataclass(frozen=True)
class Parity:
    """ONNX Runtime against torch on the same requests."""

    requests: int
    beam_width: int
    kv_max_abs: float  # encoder output: every layer's cross-attention K and V
    user_max_abs: float  # encoder output: the ranking stage's user vectors
    step_max_abs: float  # decoder log-probabilities at every level, against the uncached step
    cache_max_abs: float  # the decoder's self-attention K/V cache at every level
    top10_equal: int  # requests whose beam-search top 10 SIDs are identical

    def __str__(self) -> str:
        return (
            f"ONNX vs torch on {self.requests} requests at beam {self.beam_width}: K/V max "
            f"|diff| {self.kv_max_abs:.1e}, user vectors {self.user_max_abs:.1e}, "
            f"decoder steps {self.step_max_abs:.1e}, KV cache {self.cache_max_abs:.1e}, "
            f"top-10 identical for {self.top10_equal}/{self.requests}"
        )


def parity(model: OneRec, onnx, pathways: list, trie, beam_width: int) -> Parity:
    """Run torch and ``onnx`` (an :class:`~onerec.runtime.onnx_runners.OnnxOneRec`) on ``pathways``
    (build_pathways dicts): the encoder once, each decode step on the torch search's own
    prefixes, and the constrained search end to end."""
    from onerec.runtime.beam_search import constrained_beam_search
    from onerec.runtime.pathways import collate

    batch = collate(pathways)
    keep, kv, user = onnx.encode(batch)
    with torch.no_grad():
        memory, keep_t = model.encoder(**{k: torch.from_numpy(batch[k]) for k in PATHWAY_INPUTS})
        kv_t = model.decoder.cross_kv(memory)
        user_t = model.user(torch.from_numpy(batch["short_items"])).numpy()
    kv_diff = max(
        float(np.abs(a - e.numpy()).max())
        for a, e in zip(kv, [t for pair in kv_t for t in pair], strict=True)
    )
    step_diff, cache_diff = [0.0], [0.0]
    torch_search, onnx_search = TorchSearch(model.decoder, keep_t, kv_t), onnx.search(keep, kv)

    def checked_step(tokens: np.ndarray, parents: np.ndarray | None) -> np.ndarray:
        """The uncached torch step decides the search; the cached torch step and ONNX's
        are compared with it, and their caches with each other."""
        with torch.no_grad():
            ref = model.decoder.step(torch.from_numpy(tokens), kv_t, keep_t).numpy()
        for got in (torch_search(tokens, parents), onnx_search(tokens, parents)):
            step_diff[0] = max(step_diff[0], float(np.abs(got - ref).max()))
        for ours, theirs in zip(
            onnx_search.present, [t for pair in torch_search.present for t in pair], strict=True
        ):
            cache_diff[0] = max(cache_diff[0], float(np.abs(ours - theirs.numpy()).max()))
        return ref

    n = len(pathways)
    ref = constrained_beam_search(checked_step, n, beam_width, trie)
    ours = constrained_beam_search(onnx.search(keep, kv), n, beam_width, trie)
    same = (ours.sids[:, :10] == ref.sids[:, :10]).all(axis=(1, 2))
    user_diff = float(np.abs(user - user_t).max())
    return Parity(n, beam_width, kv_diff, user_diff, step_diff[0], cache_diff[0], int(same.sum()))
