"""Every field of every request, checked before any work: errors name the field.

A :class:`Invalid` becomes INVALID_ARGUMENT with its message, e.g.
``events[3].timestamp_ms: 1900000000000 is in the future``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onerec.runtime.pathways import FLAG_COLUMNS, History

MAX_ID_LEN = 128
MAX_BEAM_WIDTH = 512
CLOCK_SKEW_MS = 60_000  # events may be this far ahead of the server's clock
MAX_WATCH_MS = 24 * 3600 * 1000
MIN_TIMESTAMP_MS = 946_684_800_000  # 2000-01-01: anything earlier is a unit mistake
RANKINGS = (0, 1, 2)  # onerec.v1.Ranking: default, reward, generation


class Invalid(ValueError):
    """A request field is wrong; the message starts with the field's name."""


@dataclass(frozen=True)
class Limits:
    max_count: int = 100
    default_count: int = 10
    default_beam_width: int = 128
    max_inline_events: int = 256
    max_logged_events: int = 1_000
    max_exclude: int = 1_000


def check_id(value: str, field: str) -> str:
    if not value:
        raise Invalid(f"{field}: must not be empty")
    if len(value) > MAX_ID_LEN:
        raise Invalid(f"{field}: longer than {MAX_ID_LEN} characters")
    if not value.isprintable():
        raise Invalid(f"{field}: must not contain control characters")
    return value


def check_events(events, field: str, limit: int, now_ms: int, allow_empty: bool) -> None:
    if len(events) > limit:
        raise Invalid(f"{field}: at most {limit} events per call, got {len(events)}")
    if not events and not allow_empty:
        raise Invalid(f"{field}: at least one event is required")
    for i, e in enumerate(events):
        name = f"{field}[{i}]"
        check_id(e.item_id, f"{name}.item_id")
        if e.timestamp_ms < MIN_TIMESTAMP_MS:
            raise Invalid(f"{name}.timestamp_ms: {e.timestamp_ms} is not a time in ms")
        if e.timestamp_ms > now_ms + CLOCK_SKEW_MS:
            raise Invalid(f"{name}.timestamp_ms: {e.timestamp_ms} is in the future")
        if not 0 <= e.watch_ms <= MAX_WATCH_MS:
            raise Invalid(f"{name}.watch_ms: must be in 0..{MAX_WATCH_MS}")


def check_recommend(request, limits: Limits, now_ms: int) -> tuple[int, int]:
    """Validates a RecommendRequest; returns (count, beam_width) with defaults applied."""
    check_id(request.user_id, "user_id")
    count = request.count or limits.default_count
    if not 1 <= count <= limits.max_count:
        raise Invalid(f"count: must be in 1..{limits.max_count}, got {request.count}")
    beam = request.beam_width or max(limits.default_beam_width, count)
    if not count <= beam <= MAX_BEAM_WIDTH:
        raise Invalid(f"beam_width: must be in {count}..{MAX_BEAM_WIDTH}, got {beam}")
    check_events(request.events, "events", limits.max_inline_events, now_ms, allow_empty=True)
    if len(request.exclude_item_ids) > limits.max_exclude:
        raise Invalid(f"exclude_item_ids: at most {limits.max_exclude} ids")
    for i, item in enumerate(request.exclude_item_ids):
        check_id(item, f"exclude_item_ids[{i}]")
    check_request_id(request.request_id)
    if request.ranking not in RANKINGS:
        raise Invalid(f"ranking: unknown value {request.ranking}")
    return count, beam


def check_log_events(request, limits: Limits, now_ms: int) -> None:
    check_id(request.user_id, "user_id")
    check_events(request.events, "events", limits.max_logged_events, now_ms, allow_empty=False)
    check_request_id(request.request_id)


def check_request_id(value: str) -> None:
    """Optional, but when given it is an id like the others (it is echoed and logged)."""
    if value:
        check_id(value, "request_id")


def event_flags(e) -> tuple[bool, ...]:
    return tuple(bool(getattr(e, name)) for name in FLAG_COLUMNS)


def inline_history(events, item_index: dict[str, int], durations: np.ndarray) -> History:
    """Request events as a History in time order (model index, catalog duration)."""
    unknown = len(durations)
    idx = np.array([item_index.get(e.item_id, unknown) for e in events], np.int64)
    ts = np.array([e.timestamp_ms for e in events], np.int64)
    watch = np.array([e.watch_ms for e in events], np.int64)
    duration = np.where(idx < unknown, durations[np.minimum(idx, unknown - 1)], 0)  # 0: unknown
    flags = np.array([event_flags(e) for e in events], np.int8).reshape(len(events), 6)
    order = np.argsort(ts, kind="stable")
    return History(idx[order], ts[order], watch[order], duration[order], flags[order])
