"""Triton glue for the OneRec encoder; the batching logic is
onerec.runtime.batching.encode_batch."""

from __future__ import annotations

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from onerec.runtime.batching import RequestError, check_encoder_request, encode_batch, run_valid
from onerec.runtime.config import OneRecConfig
from onerec.runtime.onnx_runners import OnnxEncoder
from onerec.runtime.pathways import PATHWAY_INPUTS

OUTPUTS = ("keep", "cross_kv", "user")  # encode_batch's order


def _error(e: Exception) -> pb_utils.TritonError:
    """A bad request is INVALID_ARGUMENT for the client; a failed batch stays INTERNAL."""
    if isinstance(e, RequestError):
        return pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG)
    return pb_utils.TritonError(str(e))


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        params = json.loads(args["model_config"]).get("parameters", {})
        threads = int(params.get("intra_op_threads", {}).get("string_value", "0"))
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.cfg = OneRecConfig(**json.loads((version_dir / "model.json").read_text()))
        self.encoder = OnnxEncoder(version_dir / "encoder.onnx", threads)

    def execute(self, requests: list) -> list:
        arrays = [
            {n: pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in PATHWAY_INPUTS}
            for r in requests
        ]
        results = run_valid(
            arrays,
            lambda a: check_encoder_request(a, self.cfg),
            lambda batch: encode_batch(self.encoder, batch),
        )
        return [
            pb_utils.InferenceResponse(error=_error(r))
            if isinstance(r, Exception)
            else pb_utils.InferenceResponse(
                [pb_utils.Tensor(name, a) for name, a in zip(OUTPUTS, r, strict=True)]
            )
            for r in results
        ]
