"""What every Triton python-backend model here does around its batch function: read the
settings and the requests' tensors, and turn each request's result or error into a
response. ``pb_utils`` (``triton_python_backend_utils``) exists only inside Triton's stub,
so the model files pass it in."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from onerec.runtime.batching import RequestError

T = TypeVar("T")


def parameter(args: dict[str, str], key: str, default: str) -> str:
    """A ``parameters`` entry of the model's config.pbtxt."""
    params = json.loads(args["model_config"]).get("parameters", {})
    return params.get(key, {}).get("string_value", default)


def version_dir(args: dict[str, str]) -> Path:
    return Path(args["model_repository"]) / args["model_version"]


def request_arrays(pb_utils: Any, requests: list, names: Sequence[str]) -> list[dict]:
    """Each request's tensors by name as arrays; an optional input it lacks is left out."""
    arrays = []
    for request in requests:
        tensors = {n: pb_utils.get_input_tensor_by_name(request, n) for n in names}
        arrays.append({n: t.as_numpy() for n, t in tensors.items() if t is not None})
    return arrays


def responses(
    pb_utils: Any,
    results: Sequence[T | Exception],
    outputs: Callable[[T], dict[str, np.ndarray]],
) -> list:
    """One response per request: its output tensors, or its error (a bad request is
    INVALID_ARGUMENT for the client; a failed batch stays INTERNAL)."""
    out = []
    for r in results:
        if isinstance(r, Exception):
            code = pb_utils.TritonError.INVALID_ARG if isinstance(r, RequestError) else None
            error = pb_utils.TritonError(str(r), code) if code else pb_utils.TritonError(str(r))
            out.append(pb_utils.InferenceResponse(error=error))
        else:
            tensors = [pb_utils.Tensor(name, a) for name, a in outputs(r).items()]
            out.append(pb_utils.InferenceResponse(tensors))
    return out
