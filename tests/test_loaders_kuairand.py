"""KuaiRand loader on the real KuaiRand-Pure sample, and on malformed slices of it.

Expected values are computed from the CSV files with plain pandas, independently of the loader.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from onerec.data.kuairand import load_kuairand
from onerec.data.loaders import load_source
from onerec.data.schema import FLAGS, DataError

LOG = "log_random_sample_pure.csv"
USERS = "user_features_pure.csv"
VIDEOS = "video_features_basic_pure.csv"
EXTRA = [
    "long_view",
    "profile_stay_time",
    "comment_stay_time",
    "is_profile_enter",
    "is_rand",
    "tab",
]


def test_kuairand_sample_real_load(kuairand_sample: Path) -> None:
    log = pd.read_csv(kuairand_sample / LOG)
    users = pd.read_csv(kuairand_sample / USERS)
    videos = pd.read_csv(kuairand_sample / VIDEOS)

    ds = load_source(kuairand_sample)
    ds.validate()
    assert ds.meta["source"] == "kuairand" and ds.meta["log_files"] == [LOG]
    assert len(ds.events) == 14_005 == len(log)
    assert ds.events["user_id"].nunique() == 256
    assert ds.n_users == 27_285 == len(users)
    assert ds.n_items == 7_583 == len(videos)

    ev = ds.events
    codes = ds.user_index().astype(np.int64)
    ts = ev["timestamp"].to_numpy()
    assert np.all((np.diff(codes) > 0) | ((np.diff(codes) == 0) & (np.diff(ts) >= 0)))
    assert list(ev.columns[11:]) == EXTRA

    # the log has one row per time_ms, so (user, time) identifies a row
    assert not log.duplicated(["user_id", "time_ms"]).any()
    want = log.sort_values(["user_id", "time_ms"]).reset_index(drop=True)
    got = ev.assign(user=ev["user_id"].astype(int)).sort_values(["user", "timestamp"])
    got = got.reset_index(drop=True)
    np.testing.assert_array_equal(got["item_id"].astype(int), want["video_id"])
    np.testing.assert_array_equal(got["timestamp"], want["time_ms"])
    np.testing.assert_array_equal(got["watch_ms"], want["play_time_ms"])
    np.testing.assert_array_equal(got["duration_ms"], want["duration_ms"])
    for flag in FLAGS:
        np.testing.assert_array_equal(got[flag], want[f"is_{flag}"])
        assert int(ev[flag].sum()) == int(log[f"is_{flag}"].sum())
    for col in EXTRA:
        np.testing.assert_array_equal(got[col], want[col])

    items = ds.items
    assert items["item_id"].tolist() == videos.video_id.astype(str).tolist()
    assert items["author_id"].tolist() == videos.author_id.astype(str).tolist()
    assert items["category"].tolist() == videos.video_type.fillna("").tolist()
    assert items["tag"].tolist() == videos.tag.fillna("").astype(str).tolist()
    assert (items["title"] == "").all()
    np.testing.assert_array_equal(
        items["duration_ms"], videos.video_duration.fillna(0).round().astype(np.int64)
    )
    assert (items.loc[videos.video_duration.isna().to_numpy(), "duration_ms"] == 0).all()
    assert set(items.loc[videos.tag.fillna("").str.contains(","), "tag"]) >= {"39,68"}

    norms = np.linalg.norm(ds.item_content, axis=1)
    assert ds.item_content.dtype == np.float32 and np.allclose(norms, 1.0, atol=1e-5)

    features = ds.static_feature_columns()
    assert "user_active_degree" in features and "onehot_feat17" in features
    assert "follow_user_num_range" in features and "follow_user_num" not in features
    assert len(features) == 30 - 4
    u = ds.users
    assert u["user_id"].tolist() == users.user_id.astype(str).tolist()
    np.testing.assert_array_equal(
        u["user_active_degree"], pd.factorize(users.user_active_degree, sort=True)[0]
    )
    # NaN in onehot_feat4 is a category of its own, the last code
    feat4 = u["onehot_feat4"].to_numpy()
    assert (feat4[users.onehot_feat4.isna().to_numpy()] == feat4.max()).all()
    assert feat4.max() == users.onehot_feat4.nunique()


@pytest.fixture
def kuairand_slice(kuairand_sample: Path, tmp_path: Path) -> Path:
    """The first 80 log rows of the sample, with the users and videos they need plus a few."""
    out = tmp_path / "kuairand-slice"
    out.mkdir()
    log_lines = (kuairand_sample / LOG).read_text().splitlines()[:81]
    (out / LOG).write_text("\n".join(log_lines) + "\n")
    log = pd.read_csv(out / LOG)
    for name, key, used in ((USERS, "user_id", log.user_id), (VIDEOS, "video_id", log.video_id)):
        lines = (kuairand_sample / name).read_text().splitlines()
        ids = pd.read_csv(kuairand_sample / name, usecols=[key])[key]
        keep = (ids.isin(used) | (ids.index < 20)).to_numpy()
        rows = [line for line, k in zip(lines[1:], keep, strict=True) if k]
        (out / name).write_text("\n".join([lines[0], *rows]) + "\n")
    return out


def _replace_line(path: Path, line: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[line - 1] = text
    path.write_text("\n".join(lines) + "\n")


def test_kuairand_slice_loads(kuairand_slice: Path) -> None:
    ds = load_kuairand(kuairand_slice, name="slice")
    assert ds.name == "slice" and len(ds.events) == 80


def test_kuairand_malformed(kuairand_slice: Path) -> None:
    log = kuairand_slice / LOG
    good = log.read_text()
    header = good.splitlines()[0].split(",")

    row = good.splitlines()[56].split(",")
    row[header.index("is_click")] = "x"
    _replace_line(log, 57, ",".join(row))
    with pytest.raises(DataError, match=rf"{LOG}:57: column 'is_click': 'x' is not a number"):
        load_kuairand(kuairand_slice)

    log.write_text(good)
    row = good.splitlines()[39].split(",")
    row[header.index("is_like")] = "2"
    _replace_line(log, 40, ",".join(row))
    with pytest.raises(DataError, match=rf"{LOG}:40: column 'is_like': 2 is not 0 or 1"):
        load_kuairand(kuairand_slice)

    log.write_text(good)
    row = good.splitlines()[11].split(",")
    row[header.index("video_id")] = "99999999"
    _replace_line(log, 12, ",".join(row))
    with pytest.raises(DataError, match=rf"{LOG}:12: video_id 99999999 is not in {VIDEOS}"):
        load_kuairand(kuairand_slice)

    log.write_text(good)
    _replace_line(log, 33, ",".join(good.splitlines()[32].split(",")[:10]))
    with pytest.raises(DataError, match=rf"{LOG}:33: expected 19 fields, found 10"):
        load_kuairand(kuairand_slice)

    frame = pd.read_csv(io.StringIO(good)).drop(columns=["is_like"])
    frame.to_csv(log, index=False)
    with pytest.raises(DataError, match=rf"{LOG}: missing columns \['is_like'\]"):
        load_kuairand(kuairand_slice)

    log.write_text(good)
    users = kuairand_slice / USERS
    (kuairand_slice / "user_features_other.csv").write_bytes(users.read_bytes())
    with pytest.raises(DataError, match=r"several user_features_\*\.csv files"):
        load_kuairand(kuairand_slice)

    (kuairand_slice / "user_features_other.csv").unlink()
    (kuairand_slice / VIDEOS).unlink()
    with pytest.raises(DataError, match=r"kuairand-slice: no video_features_basic_\*\.csv file"):
        load_source(kuairand_slice)


def test_kuairand_user_features_bad_row(kuairand_slice: Path) -> None:
    users = kuairand_slice / USERS
    lines = users.read_text().splitlines()
    _replace_line(users, 6, lines[5].split(",", 1)[1])  # user_id cell cut off: one field short
    with pytest.raises(DataError, match=rf"{USERS}:6: expected 31 fields, found 30"):
        load_kuairand(kuairand_slice)
    _replace_line(users, 6, "abc," + lines[5].split(",", 1)[1])
    with pytest.raises(DataError, match=rf"{USERS}:6: column 'user_id': 'abc' is not a number"):
        load_kuairand(kuairand_slice)
