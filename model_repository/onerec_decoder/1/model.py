"""Triton glue for the trie-constrained beam-search decoder (onerec.runtime.batching.decode_batch).

The trie comes from the versioned catalog beside this model (onerec.runtime.catalog); a newly
published version is picked up between batches, and every answer says which version
constrained it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from onerec.runtime.batching import RequestError, check_decoder_request, decode_batch, run_valid
from onerec.runtime.catalog import TrieWatcher
from onerec.runtime.onnx_runners import OnnxDecoder

INPUTS = ("keep", "cross_kv", "beam_width", "count", "exclude_sids")


def _param(params: dict, key: str, default: str) -> str:
    return params.get(key, {}).get("string_value", default)


def _error(e: Exception) -> pb_utils.TritonError:
    """A bad request is INVALID_ARGUMENT for the client; a failed batch stays INTERNAL."""
    if isinstance(e, RequestError):
        return pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG)
    return pb_utils.TritonError(str(e))


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        params = json.loads(args["model_config"]).get("parameters", {})
        model_dir = Path(args["model_repository"])
        threads = int(_param(params, "intra_op_threads", "0"))
        self.decoder = OnnxDecoder(model_dir / args["model_version"], threads)
        self.catalog = TrieWatcher(model_dir / _param(params, "catalog_dir", "catalog"))

    def execute(self, requests: list) -> list:
        version, trie = self.catalog.get()  # one trie for the whole batch
        arrays = []
        for request in requests:
            tensors = {n: pb_utils.get_input_tensor_by_name(request, n) for n in INPUTS}
            arrays.append({n: t.as_numpy() for n, t in tensors.items() if t is not None})
        results = run_valid(
            arrays,
            lambda a: check_decoder_request(a, trie, self.decoder.kv_shape),
            lambda batch: decode_batch(self.decoder, trie, batch),
        )
        responses = []
        for r in results:
            if isinstance(r, Exception):
                responses.append(pb_utils.InferenceResponse(error=_error(r)))
                continue
            version_tensor = np.full((len(r.sids), 1), version, np.int64)
            responses.append(
                pb_utils.InferenceResponse(
                    [
                        pb_utils.Tensor("sids", r.sids),
                        pb_utils.Tensor("scores", r.scores),
                        pb_utils.Tensor("catalog_version", version_tensor),
                    ]
                )
            )
        return responses
