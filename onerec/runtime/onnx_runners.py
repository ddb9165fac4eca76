"""The exported model run by ONNX Runtime: what the Triton python backend will host.

:class:`OnnxEncoder` runs ``encoder.onnx`` once per request batch; :class:`OnnxDecoder`
holds the decoder graph of each level, and its :class:`DecoderSearch` is the ``step_fn``
of :func:`onerec.runtime.beam_search.constrained_beam_search` with a KV cache, so the
search is the same code offline and online. The Triton encoder and decoder models each
load only their half. :class:`OnnxReward` runs ``reward.onnx``, the reward model that
scores a request's candidate items (:mod:`onerec.reward`). CUDA is asked for only when
ONNX Runtime reports it available.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from onerec.runtime.pathways import PATHWAY_INPUTS


def _providers() -> list[str]:
    """CUDA only where a GPU driver is loaded: onnxruntime-gpu lists CUDA everywhere and
    logs a load error for every session on a machine without one."""
    gpu = Path("/proc/driver/nvidia/version").exists()
    wanted = ["CUDAExecutionProvider"] if gpu else []
    available = ort.get_available_providers()
    return [p for p in [*wanted, "CPUExecutionProvider"] if p in available]


def _session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # Idle pool threads spin by default; beside Triton's other instances and the front end
    # on the same cores, that spinning steals the CPU the busy sessions need.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=_providers())


class OnnxEncoder:
    """``encoder.onnx``: pathway arrays -> key-padding mask, per-layer cross K/V and the
    ranking stage's user vectors."""

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        self.session = _session(Path(path), threads)

    def encode(
        self, pathways: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        """Pathway arrays (as :func:`onerec.runtime.pathways.collate` makes them) -> keep (B, T),
        K/V, user (B, d)."""
        keep, *kv, user = self.session.run(None, {n: pathways[n] for n in PATHWAY_INPUTS})
        return keep, kv, user


class OnnxDecoder:
    """``decoder_step_{t}.onnx`` for every level t found in ``directory``."""

    def __init__(self, directory: str | Path, threads: int = 0) -> None:
        directory = Path(directory)
        self.steps = []
        level = 0
        while (path := directory / f"decoder_step_{level}.onnx").is_file():
            self.steps.append(_session(path, threads))
            level += 1
        if not self.steps:
            raise FileNotFoundError(f"{directory}: no decoder_step_0.onnx")
        self.kv_names = [i.name for i in self.steps[0].get_inputs()][1:]
        self.past_names = [i.name for i in self.steps[-1].get_inputs()][2 + len(self.kv_names) :]
        k0 = self.steps[0].get_inputs()[1].shape  # (batch, heads, enc_len, head_dim)
        self.kv_shape = (len(self.kv_names), int(k0[1]), int(k0[3]))  # cross_kv's fixed axes

    def search(self, keep: np.ndarray, kv: list[np.ndarray]) -> DecoderSearch:
        """The ``step_fn`` of one beam search over these users (see
        :mod:`onerec.runtime.beam_search`)."""
        return DecoderSearch(self, keep, kv)


class DecoderSearch:
    """One search's decoder state: each beam's self-attention K/V so far. A level runs
    only the beams' newest code; the cache follows each beam from its parent."""

    def __init__(self, decoder: OnnxDecoder, keep: np.ndarray, kv: list[np.ndarray]) -> None:
        self.decoder = decoder
        self.feeds = {"keep": keep, **dict(zip(decoder.kv_names, kv, strict=True))}
        self.present: list[np.ndarray] = []

    def __call__(self, tokens: np.ndarray, parents: np.ndarray | None) -> np.ndarray:
        """(B, W, t) codes so far and each beam's parent among the last call's beams ->
        (B, W, K) log-probabilities of level t."""
        b, w, t = tokens.shape
        feeds = dict(self.feeds)
        if t:
            rows = np.arange(b)[:, None]
            feeds["code"] = np.ascontiguousarray(tokens[:, :, -1], dtype=np.int64)
            for name, cache in zip(self.decoder.past_names, self.present, strict=True):
                feeds[name] = cache[rows, parents]  # (B, W, h, t, dh): each beam's parent's
        logp, *self.present = self.decoder.steps[t].run(None, feeds)
        return np.broadcast_to(logp, (b, w, logp.shape[-1]))


class OnnxOneRec:
    """Encoder and decoder of one export directory, for offline use and parity tests."""

    def __init__(
        self, directory: str | Path, threads: int = 0, decoder_directory: str | Path | None = None
    ) -> None:
        """``directory`` holds encoder.onnx and, unless ``decoder_directory`` is given (a
        model repository keeps them apart), the decoder steps."""
        self.encoder = OnnxEncoder(Path(directory) / "encoder.onnx", threads)
        self.decoder = OnnxDecoder(decoder_directory or directory, threads)
        self.encode = self.encoder.encode
        self.search = self.decoder.search


REWARD_INPUTS = ("static", "short_items", "pos_items", "candidates")


class OnnxReward:
    """``reward.onnx``: a request's static, short-term and positive pathways and its
    candidates' item tokens (B, M) -> each head's value (B, M, H) and the P-Score (B, M)."""

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        self.session = _session(Path(path), threads)

    def score(
        self,
        static: np.ndarray,
        short_items: np.ndarray,
        pos_items: np.ndarray,
        candidates: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        arrays = (static, short_items, pos_items, candidates)
        feeds = {
            n: np.ascontiguousarray(a, np.int64) for n, a in zip(REWARD_INPUTS, arrays, strict=True)
        }
        heads, pscore = self.session.run(None, feeds)
        return heads, pscore
