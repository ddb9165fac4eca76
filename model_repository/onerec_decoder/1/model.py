"""Triton glue for the trie-constrained beam-search decoder (onerec.runtime.batching.decode_batch).

The trie comes from the versioned catalog beside this model (onerec.runtime.catalog); a newly
published version is picked up between batches, and every answer says which version
constrained it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from onerec.runtime.batching import check_decoder_request, decode_batch, run_valid
from onerec.runtime.catalog import TrieWatcher
from onerec.runtime.onnx_runners import OnnxDecoder
from onerec.runtime.triton_glue import parameter, request_arrays, responses, version_dir

INPUTS = ("keep", "cross_kv", "beam_width", "count", "exclude_sids")


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        threads = int(parameter(args, "intra_op_threads", "0"))
        self.decoder = OnnxDecoder(version_dir(args), threads)
        catalog = Path(args["model_repository"]) / parameter(args, "catalog_dir", "catalog")
        self.catalog = TrieWatcher(catalog)

    def execute(self, requests: list) -> list:
        version, trie = self.catalog.get()  # one trie for the whole batch
        results = run_valid(
            request_arrays(pb_utils, requests, INPUTS),
            lambda a: check_decoder_request(a, trie, self.decoder.kv_shape),
            lambda batch: decode_batch(self.decoder, trie, batch),
        )

        def outputs(r) -> dict[str, np.ndarray]:
            version_tensor = np.full((len(r.sids), 1), version, np.int64)
            return {"sids": r.sids, "scores": r.scores, "catalog_version": version_tensor}

        return responses(pb_utils, results, outputs)
