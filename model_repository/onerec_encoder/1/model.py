"""Triton glue for the OneRec encoder; the batching logic is
onerec.runtime.batching.encode_batch."""

from __future__ import annotations

import json

import triton_python_backend_utils as pb_utils

from onerec.runtime.batching import check_encoder_request, encode_batch, run_valid
from onerec.runtime.config import OneRecConfig
from onerec.runtime.onnx_runners import OnnxEncoder
from onerec.runtime.pathways import PATHWAY_INPUTS
from onerec.runtime.triton_glue import parameter, request_arrays, responses, version_dir

OUTPUTS = ("keep", "cross_kv", "user")  # encode_batch's order


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        threads = int(parameter(args, "intra_op_threads", "0"))
        self.cfg = OneRecConfig(**json.loads((version_dir(args) / "model.json").read_text()))
        self.encoder = OnnxEncoder(version_dir(args) / "encoder.onnx", threads)

    def execute(self, requests: list) -> list:
        results = run_valid(
            request_arrays(pb_utils, requests, PATHWAY_INPUTS),
            lambda a: check_encoder_request(a, self.cfg),
            lambda batch: encode_batch(self.encoder, batch),
        )
        return responses(pb_utils, results, lambda r: dict(zip(OUTPUTS, r, strict=True)))
