"""ONNX export of the encoder and of one decoder step per SID level (opset 17).

* ``encoder.onnx``: the twelve pathway tensors -> the encoder's key-padding mask ``keep``,
  for every decoder layer the cross-attention keys and values, and the ranking stage's
  ``user`` vector. Batch and every sequence length are dynamic axes. K/V leave the
  encoder already projected, so the decoder never recomputes them per beam or per step.
* ``item_table.npy``: the ranking stage's (n_items + 2, d) item table that ``user`` scores
  candidate items against (:mod:`onerec.runtime.ranking`); the front end holds it.
* ``decoder_step_{t}.onnx``: SID prefixes ``tokens`` (B, W, t) plus ``keep`` and the K/V
  -> log-probabilities (B, W, K) of level ``t``. One graph per level because the prefix
  length fixes the graph; level 0 takes no tokens (all beams share BOS) and returns
  (B, 1, K).

The legacy TorchScript exporter is used (``dynamo=False``): the dynamo exporter needs
``onnxscript``, which the serving images do not carry.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from onerec.model import OneRec
from onerec.runtime.config import N_FLAGS
from onerec.runtime.pathways import PATHWAY_INPUTS

OPSET = 17


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
    def __init__(self, model: OneRec, level: int) -> None:
        super().__init__()
        self.model, self.level = model, level

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        if self.level == 0:
            keep, *flat = args
            tokens = torch.zeros(keep.shape[0], 1, 0, dtype=torch.long)
        else:
            tokens, keep, *flat = args
        kv = [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]
        return self.model.decoder.step(tokens, kv, keep)


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
        )
        keep, *flat, _ = encoder(*pathways)
        for level in range(model.cfg.sid_levels):
            tokens = torch.zeros(2, 3, level, dtype=torch.long)
            inputs = (keep, *flat) if level == 0 else (tokens, keep, *flat)
            in_names = ["keep", *names] if level == 0 else ["tokens", "keep", *names]
            axes = {n: dynamic[n] for n in ["keep", *names]}
            axes["tokens"] = {0: "batch", 1: "beams"}
            axes["log_probs"] = {0: "batch", 1: "beams"}
            path = out / f"decoder_step_{level}.onnx"
            torch.onnx.export(
                _Step(model, level).eval(),
                inputs,
                path,
                input_names=in_names,
                output_names=["log_probs"],
                dynamic_axes={k: v for k, v in axes.items() if k in in_names or k == "log_probs"},
                opset_version=OPSET,
                dynamo=False,
            )
            paths.append(path)
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
    step_max_abs: float  # decoder log-probabilities at every level of the search
    top10_equal: int  # requests whose beam-search top 10 SIDs are identical

    def __str__(self) -> str:
        return (
            f"ONNX vs torch on {self.requests} requests at beam {self.beam_width}: K/V max "
            f"|diff| {self.kv_max_abs:.1e}, user vectors {self.user_max_abs:.1e}, "
            f"decoder steps {self.step_max_abs:.1e}, "
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
    step_diff = [0.0]

    def torch_step(tokens: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            ref = model.decoder.step(torch.from_numpy(tokens), kv_t, keep_t).numpy()
        ours = onnx.step(tokens, keep, kv)
        step_diff[0] = max(step_diff[0], float(np.abs(ours - ref).max()))
        return ref

    n = len(pathways)
    ref = constrained_beam_search(torch_step, n, beam_width, trie)
    ours = constrained_beam_search(lambda t: onnx.step(t, keep, kv), n, beam_width, trie)
    same = (ours.sids[:, :10] == ref.sids[:, :10]).all(axis=(1, 2))
    user_diff = float(np.abs(user - user_t).max())
    return Parity(n, beam_width, kv_diff, user_diff, step_diff[0], int(same.sum()))
