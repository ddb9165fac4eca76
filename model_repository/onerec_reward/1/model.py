"""Triton glue for the reward model; the batching logic is
onerec.runtime.batching.reward_batch."""

from __future__ import annotations

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from onerec.runtime.batching import (
    RequestError,
    RewardShape,
    check_reward_request,
    reward_batch,
    run_valid,
)
from onerec.runtime.layout import REWARD_JSON, REWARD_ONNX
from onerec.runtime.onnx_runners import REWARD_INPUTS, OnnxReward
from onerec.runtime.reward import RewardMeta


def _error(e: Exception) -> pb_utils.TritonError:
    if isinstance(e, RequestError):
        return pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG)
    return pb_utils.TritonError(str(e))


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        params = json.loads(args["model_config"]).get("parameters", {})
        threads = int(params.get("intra_op_threads", {}).get("string_value", "0"))
        version_dir = Path(args["model_repository"]) / args["model_version"]
        meta = RewardMeta.load(version_dir / REWARD_JSON)
        cards = meta.static_cardinalities
        self.shape = RewardShape(len(cards), cards, meta.n_items)
        self.reward = OnnxReward(version_dir / REWARD_ONNX, threads)

    def execute(self, requests: list) -> list:
        arrays = [
            {n: pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in REWARD_INPUTS}
            for r in requests
        ]
        results = run_valid(
            arrays,
            lambda a: check_reward_request(a, self.shape),
            lambda batch: reward_batch(self.reward, batch),
        )
        return [
            pb_utils.InferenceResponse(error=_error(r))
            if isinstance(r, Exception)
            else pb_utils.InferenceResponse(
                [pb_utils.Tensor("heads", r[0]), pb_utils.Tensor("pscore", r[1])]
            )
            for r in results
        ]
