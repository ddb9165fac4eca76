"""KuaiRand (Pure, 1K, 27K or a sample of them) as a canonical Dataset.

KuaiRand is the one public source with the behaviours OneRec models, so the mapping is direct:
``time_ms`` is the timestamp, ``play_time_ms`` the watch time, ``is_click`` .. ``is_hate`` the
flags. Every other log field (``long_view``, ``profile_stay_time``, ``comment_stay_time``,
``is_profile_enter``, ``is_rand``, ``tab``, ...) is kept as an extra event column, except
``date`` and ``hourmin``, which only restate ``time_ms`` in local time.

A directory must hold exactly one ``user_features_*.csv``, exactly one
``video_features_basic_*.csv`` and at least one ``log_*.csv``; all logs are concatenated (the
random-exposure and standard logs of one release belong together). Two feature files are an
error rather than a guess, since picking one would silently mix releases.

Static user features are every user column except ``user_id``, coded as categories (a missing
value is its own code). Where a count has a bucketed ``*_range`` twin (follow, fans, friends,
register days), only the range is kept: raw counts have thousands of values, far too many to
learn an embedding for each from so few users. Every user and every video of the feature files
is kept, with or without events.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from onerec.data.csvfiles import (
    code_categories,
    read_table,
    require_known,
    require_unique,
    row_error,
    side_feature_content,
)
from onerec.data.schema import FLAGS, DataError, Dataset, make_events

# Log fields and the canonical event column each becomes.
LOG_COLUMNS: dict[str, str] = {
    "user_id": "user_id",
    "video_id": "item_id",
    "time_ms": "timestamp",
    "play_time_ms": "watch_ms",
    "duration_ms": "duration_ms",
    **{f"is_{flag}": flag for flag in FLAGS},
}
DROPPED_LOG_COLUMNS: tuple[str, ...] = ("date", "hourmin")
VIDEO_COLUMNS: tuple[str, ...] = (
    "video_id", "author_id", "video_type", "upload_type", "video_duration", "music_type", "tag",
)  # fmt: skip


def load_kuairand(path: str | Path, name: str | None = None) -> Dataset:
    """Read a KuaiRand data directory: user features, basic video features and all logs."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    users_path = _one(root, "user_features_*.csv")
    videos_path = _one(root, "video_features_basic_*.csv")
    log_paths = sorted(root.glob("log_*.csv"))
    if not log_paths:
        raise DataError(f"{root}: no log_*.csv interaction file")

    users = _users(users_path)
    videos = read_table(
        videos_path,
        columns=VIDEO_COLUMNS,
        dtypes={"video_id": int, "author_id": int, "video_duration": float, "tag": str},
        nullable=VIDEO_COLUMNS[2:],
    )
    require_unique(videos["video_id"], videos_path)
    _require_non_negative(videos, "video_duration", videos_path)
    videos = videos.sort_values("video_id", kind="stable").reset_index(drop=True)
    logs = [
        _log(p, users_path, users["user_id"], videos_path, videos["video_id"]) for p in log_paths
    ]

    duration = videos["video_duration"].fillna(0).round().to_numpy(np.int64)
    items = pd.DataFrame(
        {
            "item_id": videos["video_id"].astype(str),
            "author_id": videos["author_id"].astype(str),
            "category": videos["video_type"].fillna("").astype(str),
            "tag": videos["tag"].fillna("").astype(str),
            "title": "",
            "duration_ms": duration,
        }
    )
    seconds = videos["video_duration"].to_numpy(np.float64) / 1000
    content = side_feature_content(
        onehot={
            "video_type": videos["video_type"],
            "upload_type": videos["upload_type"],
            "music_type": videos["music_type"],
            "log2_seconds": pd.Series(np.floor(np.log2(seconds + 1))),
        },
        multihot={"tag": videos["tag"].str.split(",")},
    )
    user_ids = users["user_id"].astype(str)
    ds = Dataset(
        name=name or root.resolve().name,
        events=make_events(
            pd.concat(logs, ignore_index=True), pd.Index(user_ids), pd.Index(items["item_id"])
        ),
        users=users.assign(user_id=user_ids),
        items=items,
        item_content=content,
        meta={
            "source": "kuairand",
            "path": str(root),
            "users_file": users_path.name,
            "videos_file": videos_path.name,
            "log_files": [p.name for p in log_paths],
        },
    )
    ds.validate()
    return ds


def _one(root: Path, pattern: str) -> Path:
    found = sorted(root.glob(pattern))
    if not found:
        raise DataError(f"{root}: no {pattern} file")
    if len(found) > 1:
        raise DataError(f"{root}: several {pattern} files {[p.name for p in found]}; keep one")
    return found[0]


def _users(path: Path) -> pd.DataFrame:
    """user_id (int, ascending) and every other column coded, ranges replacing raw counts."""
    table = read_table(path, columns=["user_id"], dtypes={"user_id": int})
    require_unique(table["user_id"], path)
    table = table.sort_values("user_id", kind="stable").reset_index(drop=True)
    features = [c for c in table.columns if c != "user_id" and f"{c}_range" not in table.columns]
    coded = {c: code_categories(table[c]) for c in features}
    return pd.DataFrame({"user_id": table["user_id"], **coded})


def _log(
    path: Path, users_path: Path, user_ids: pd.Series, videos_path: Path, video_ids: pd.Series
) -> pd.DataFrame:
    """One log file as canonical event columns plus its extra fields, every row checked."""
    frame = read_table(path, columns=list(LOG_COLUMNS), dtypes=dict.fromkeys(LOG_COLUMNS, int))
    require_known(frame["user_id"], pd.Index(user_ids), path, users_path.name)
    require_known(frame["video_id"], pd.Index(video_ids), path, videos_path.name)
    for col in ("play_time_ms", "duration_ms"):
        _require_non_negative(frame, col, path)
    for col in (f"is_{flag}" for flag in FLAGS):
        odd = np.flatnonzero(~frame[col].isin((0, 1)).to_numpy())
        if odd.size:
            row = int(odd[0])
            raise row_error(path, row, f"column {col!r}: {frame[col].iloc[row]} is not 0 or 1")
    frame = frame.drop(columns=[c for c in DROPPED_LOG_COLUMNS if c in frame.columns])
    return frame.rename(columns=LOG_COLUMNS)


def _require_non_negative(frame: pd.DataFrame, col: str, path: Path) -> None:
    negative = np.flatnonzero((frame[col] < 0).to_numpy())
    if negative.size:
        row = int(negative[0])
        raise row_error(path, row, f"column {col!r}: {frame[col].iloc[row]} is negative")
