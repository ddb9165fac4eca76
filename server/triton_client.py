"""Triton's ``onerec`` ensemble from the client side: tensors, the probe, the aio client.

One user's pathway arrays (:func:`onerec.runtime.pathways.build_pathways`) become the ensemble's
inputs with a batch axis of one; Triton's dynamic batcher, not the client, forms batches.
The front end talks to Triton through one :class:`TritonModel` (one shared aio channel),
which passes the caller's remaining deadline on and turns Triton's failures into the two
cases the front end handles differently: unavailable (fall back) and rejected (a bug).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE, KeepAliveOptions
from tritonclient.utils import InferenceServerException

from onerec.runtime.config import N_FLAGS, OneRecConfig
from onerec.runtime.pathways import PATHWAY_INPUTS

ENSEMBLE = "onerec"
OUTPUTS = ("sids", "scores", "catalog_version", "user")
REWARD_MODEL = "onerec_reward"


def _tensor(name: str, array: np.ndarray) -> grpcclient.InferInput:
    array = np.ascontiguousarray(array)
    datatype = {np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32"}.get(array.dtype, "FP32")
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def ensemble_inputs(
    pathways: dict[str, np.ndarray],
    beam_width: int,
    count: int,
    exclude_sids: np.ndarray | None = None,
) -> list[grpcclient.InferInput]:
    """One user's pathways plus the search settings, each with a leading batch axis of 1."""
    inputs = []
    for name in PATHWAY_INPUTS:
        dtype = np.float32 if name.endswith("flags") else np.int64
        inputs.append(_tensor(name, np.asarray(pathways[name], dtype)[None]))
    inputs.append(_tensor("beam_width", np.array([[beam_width]], np.int32)))
    inputs.append(_tensor("count", np.array([[count]], np.int32)))
    if exclude_sids is not None and len(exclude_sids):
        inputs.append(_tensor("exclude_sids", np.asarray(exclude_sids, np.int64)[None]))
    return inputs


def requested_outputs() -> list[grpcclient.InferRequestedOutput]:
    return [grpcclient.InferRequestedOutput(name) for name in OUTPUTS]


def empty_pathways(cfg: OneRecConfig) -> dict[str, np.ndarray]:
    """A user with no history and the first value of every static feature."""
    one = np.zeros(1, np.int64)
    flags = np.zeros((1, N_FLAGS), np.float32)
    out = {"static": np.zeros(len(cfg.static_cardinalities), np.int64)}
    for prefix in ("short", "pos"):
        out |= {f"{prefix}_items": one, f"{prefix}_gap": one, f"{prefix}_watch": one}
        out[f"{prefix}_flags"] = flags
    out |= {"life_items": one, "life_gap": one, "life_weight": one}
    return out


def repository_config(repository: str | Path) -> OneRecConfig:
    """The config the repository's encoder was exported with."""
    path = Path(repository) / "onerec_encoder" / "1" / "model.json"
    return OneRecConfig(**json.loads(path.read_text()))


def probe(url: str, cfg: OneRecConfig, timeout_s: float = 30.0) -> np.ndarray:
    """Run one real beam-1 inference through the ensemble; raise unless it returns a SID.

    Triton can call a model ready after its python stub died; only this proves it serves.
    """
    with grpcclient.InferenceServerClient(url) as client:
        result = client.infer(
            ENSEMBLE,
            ensemble_inputs(empty_pathways(cfg), beam_width=1, count=1),
            outputs=requested_outputs(),
            client_timeout=timeout_s,
        )
    sids = result.as_numpy("sids")
    if sids is None or sids.shape != (1, 1, cfg.sid_levels) or (sids < 0).any():
        raise RuntimeError(f"probe inference returned no SID: {sids!r}")
    return sids


class TritonUnavailable(Exception):
    """Triton did not answer in time or is down: the caller falls back."""


class TritonRejected(Exception):
    """Triton refused the tensors (INVALID_ARGUMENT): a bug on our side, not an outage."""


@dataclass(frozen=True)
class ModelAnswer:
    sids: np.ndarray  # (C, L) in beam order, -1 rows past the last legal SID
    scores: np.ndarray  # (C,) each SID's summed log-probability
    catalog_version: int
    user: np.ndarray  # (d,) the ranking stage's user vector (onerec.runtime.ranking)


def channel_args() -> list[tuple[str, int | str]]:
    """tritonclient's defaults plus round-robin balancing: with a ``dns:///`` URL naming a
    headless Service, the one channel spreads calls over every Triton pod instead of
    pinning to whichever pod its single connection reached."""
    keepalive = KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.lb_policy_name", "round_robin"),
    ]


class TritonModel:
    """The ensemble over one shared ``tritonclient.grpc.aio`` channel."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client = grpcaio.InferenceServerClient(url, channel_args=channel_args())

    async def recommend(
        self,
        pathways: dict[str, np.ndarray],
        beam_width: int,
        count: int,
        exclude_sids: np.ndarray | None,
        timeout_s: float,
    ) -> ModelAnswer:
        """Decoded SIDs and the user vector for one user; the caller's remaining deadline
        bounds the call."""
        if timeout_s <= 0:
            raise TritonUnavailable("no time left before the caller's deadline")
        try:
            result = await self.client.infer(
                ENSEMBLE,
                ensemble_inputs(pathways, beam_width, count, exclude_sids),
                outputs=requested_outputs(),
                client_timeout=timeout_s,
                timeout=int(timeout_s * 1e6),  # Triton drops it from its queue past this
            )
            return ModelAnswer(
                result.as_numpy("sids")[0],
                result.as_numpy("scores")[0],
                int(result.as_numpy("catalog_version")[0, 0]),
                result.as_numpy("user")[0],
            )
        except InferenceServerException as e:
            if "INVALID_ARG" in str(e.status()):
                raise TritonRejected(e.message()) from e
            raise TritonUnavailable(f"{e.status()}: {e.message()}") from e
        except Exception as e:  # channel errors, or a reply without the outputs
            raise TritonUnavailable(f"{type(e).__name__}: {e}") from e

    async def reward(
        self,
        pathways: dict[str, np.ndarray],
        candidates: np.ndarray,
        pos_len: int,
        timeout_s: float,
    ) -> np.ndarray:
        """(M,) P-Scores of one user's candidate item tokens, from the reward model; its
        dynamic batcher scores concurrent requests together. Only the ``pos_len`` newest
        positive items are sent: the model reads no more."""
        if timeout_s <= 0:
            raise TritonUnavailable("no time left before the caller's deadline")
        arrays = {
            "static": pathways["static"],
            "short_items": pathways["short_items"],
            "pos_items": pathways["pos_items"][:pos_len],
            "candidates": candidates,
        }
        try:
            result = await self.client.infer(
                REWARD_MODEL,
                [_tensor(n, np.asarray(a, np.int64)[None]) for n, a in arrays.items()],
                outputs=[grpcclient.InferRequestedOutput("pscore")],
                client_timeout=timeout_s,
                timeout=int(timeout_s * 1e6),
            )
            return result.as_numpy("pscore")[0]
        except InferenceServerException as e:
            if "INVALID_ARG" in str(e.status()):
                raise TritonRejected(e.message()) from e
            raise TritonUnavailable(f"{e.status()}: {e.message()}") from e
        except Exception as e:
            raise TritonUnavailable(f"{type(e).__name__}: {e}") from e

    async def probe(self, cfg: OneRecConfig, timeout_s: float = 5.0) -> bool:
        """One real beam-1 inference: True only if it returned a SID."""
        try:
            d = await self.recommend(empty_pathways(cfg), 1, 1, None, timeout_s)
        except (TritonUnavailable, TritonRejected):
            return False
        return d.sids.shape[0] == 1 and bool((d.sids >= 0).all())

    async def close(self) -> None:
        await self.client.close()
