"""Triton glue for the reward model; the batching logic is
onerec.runtime.batching.reward_batch."""

from __future__ import annotations

import triton_python_backend_utils as pb_utils

from onerec.runtime.batching import RewardShape, check_reward_request, reward_batch, run_valid
from onerec.runtime.layout import REWARD_JSON, REWARD_ONNX
from onerec.runtime.onnx_runners import REWARD_INPUTS, OnnxReward
from onerec.runtime.reward import RewardMeta
from onerec.runtime.triton_glue import parameter, request_arrays, responses, version_dir


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        meta = RewardMeta.load(version_dir(args) / REWARD_JSON)
        cards = meta.static_cardinalities
        self.shape = RewardShape(len(cards), cards, meta.n_items)
        threads = int(parameter(args, "intra_op_threads", "0"))
        self.reward = OnnxReward(version_dir(args) / REWARD_ONNX, threads)

    def execute(self, requests: list) -> list:
        results = run_valid(
            request_arrays(pb_utils, requests, REWARD_INPUTS),
            lambda a: check_reward_request(a, self.shape),
            lambda batch: reward_batch(self.reward, batch),
        )
        return responses(pb_utils, results, lambda r: {"heads": r[0], "pscore": r[1]})
