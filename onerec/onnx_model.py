"""The exported model run by ONNX Runtime: what the Triton python backend will host.

``OnnxOneRec.encode`` runs ``encoder.onnx`` once per request batch; ``step`` runs the
decoder graph of the prefix's level and is shaped to be the ``step_fn`` of
:func:`onerec.beam_search.constrained_beam_search`, so the search is the same code
offline and online. CUDA is asked for only when ONNX Runtime reports it available.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from onerec.export import PATHWAY_INPUTS


def _providers() -> list[str]:
    available = ort.get_available_providers()
    wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return [p for p in wanted if p in available]


class OnnxOneRec:
    """Encoder and per-level decoder-step sessions loaded from an export directory."""

    def __init__(self, directory: str | Path, threads: int = 0) -> None:
        directory = Path(directory)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.encoder = ort.InferenceSession(
            str(directory / "encoder.onnx"), options, providers=_providers()
        )
        self.steps = []
        level = 0
        while (path := directory / f"decoder_step_{level}.onnx").is_file():
            self.steps.append(ort.InferenceSession(str(path), options, providers=_providers()))
            level += 1
        if not self.steps:
            raise FileNotFoundError(f"{directory}: no decoder_step_0.onnx")
        self.kv_names = [o.name for o in self.encoder.get_outputs()][1:]

    def encode(self, pathways: dict[str, np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Pathway arrays (as :func:`onerec.pathways.collate` makes them) -> keep, K/V."""
        keep, *kv = self.encoder.run(None, {name: pathways[name] for name in PATHWAY_INPUTS})
        return keep, kv

    def step(self, tokens: np.ndarray, keep: np.ndarray, kv: list[np.ndarray]) -> np.ndarray:
        """(B, W, t) prefixes -> (B, W, K) log-probabilities of level t."""
        b, w, t = tokens.shape
        feeds = {"keep": keep, **dict(zip(self.kv_names, kv, strict=True))}
        if t:
            feeds["tokens"] = tokens.astype(np.int64)
        (logp,) = self.steps[t].run(None, feeds)
        return np.broadcast_to(logp, (b, w, logp.shape[-1]))
