"""MovieLens loaders on the real ml-latest-small files and on ML-1M / ML-100K files made from them.

Expected values are computed from the source files with plain pandas, independently of the
loader. Malformed inputs are small slices of the real files copied into ``tmp_path``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from onerec.data.csvfiles import code_categories, read_table, side_feature_content
from onerec.data.loaders import load_source
from onerec.data.movielens import load_movielens
from onerec.data.schema import DataError

N_SUBSET = 3000  # ratings copied into the ML-1M / ML-100K fixtures
# u.genre of ML-100K: the order of the genre flag columns in u.item.
U_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
]  # fmt: skip


def _canon(user, item, timestamp, **columns) -> pd.DataFrame:
    """An event table in a fixed row order, to compare loader output with source rows."""
    frame = pd.DataFrame(
        {"user_id": np.asarray(user).astype(str), "item_id": np.asarray(item).astype(str)}
    )
    frame["timestamp"] = np.asarray(timestamp, dtype=np.int64)
    for name, values in columns.items():
        frame[name] = np.asarray(values)
    return frame.sort_values(["user_id", "item_id", "timestamp"]).reset_index(drop=True)


def _loaded(ds, *columns: str) -> pd.DataFrame:
    ev = ds.events
    cols = {c: ev[c].to_numpy() for c in columns}
    return _canon(ev["user_id"].astype(str), ev["item_id"].astype(str), ev["timestamp"], **cols)


def _assert_sorted(ds) -> None:
    codes = ds.user_index().astype(np.int64)
    ts = ds.events["timestamp"].to_numpy()
    assert np.all((np.diff(codes) > 0) | ((np.diff(codes) == 0) & (np.diff(ts) >= 0)))


def test_ml_latest_small_real_load(ml_latest_small: Path) -> None:
    ratings = pd.read_csv(ml_latest_small / "ratings.csv")
    movies = pd.read_csv(ml_latest_small / "movies.csv")
    tags = pd.read_csv(ml_latest_small / "tags.csv")
    assert len(ratings) == 100_836 and len(movies) == 9_742

    ds = load_movielens(ml_latest_small)
    ds.validate()

    rated = set(zip(ratings.userId, ratings.movieId, strict=True))
    tagged = set(zip(tags.userId, tags.movieId, strict=True))
    tag_only = tagged - rated
    assert len(ds.events) == len(ratings) + len(tag_only)
    assert ds.meta == {
        "source": "movielens",
        "format": "ml-latest",
        "path": str(ml_latest_small),
        "tag_only_events": len(tag_only),
    }
    assert ds.n_users == 610 and ds.n_items == 9_742
    assert ds.items["item_id"].tolist() == sorted(movies.movieId.astype(str), key=int)
    _assert_sorted(ds)

    ev = ds.events
    from_rating = ev["rating"].to_numpy() > 0
    assert int(from_rating.sum()) == len(ratings)
    assert int(ev["like"].sum()) == int((ratings.rating >= 4).sum())
    assert ev.loc[from_rating, "like"].mean() == pytest.approx((ratings.rating >= 4).mean())
    assert int(ev["hate"].sum()) == int((ratings.rating <= 1.5).sum())
    assert (ev["click"] == 1).all()
    assert (ev[["follow", "forward", "watch_ms", "duration_ms"]] == 0).all().all()
    assert int(ev["comment"].sum()) == len(rated & tagged) + len(tag_only)

    expected = _canon(
        ratings.userId,
        ratings.movieId,
        ratings.timestamp * 1000,
        rating=ratings.rating.astype(np.float32),
        like=(ratings.rating >= 4).astype(np.int8),
    )
    got = _loaded(ds, "rating", "like")
    got = got[got["rating"] > 0].reset_index(drop=True)
    pd.testing.assert_frame_equal(got, expected, check_dtype=False)

    first_tag = tags.groupby(["userId", "movieId"])["timestamp"].min()
    only = first_tag[[pair in tag_only for pair in first_tag.index]]
    got = _loaded(ds, "rating", "comment", "like")
    got = got[got["rating"] == 0].reset_index(drop=True)
    want = _canon(
        only.index.get_level_values(0),
        only.index.get_level_values(1),
        only.to_numpy() * 1000,
        rating=np.zeros(len(only), np.float32),
        comment=np.ones(len(only), np.int8),
        like=np.zeros(len(only), np.int8),
    )
    pd.testing.assert_frame_equal(got, want, check_dtype=False)

    items = ds.items.set_index("item_id")
    toy = items.loc["1"]
    assert toy["title"] == "Toy Story (1995)" and toy["category"] == "Adventure"
    assert toy["tag"] == "Adventure|Animation|Children|Comedy|Fantasy"
    assert (ds.items["author_id"] == "").all() and (ds.items["duration_ms"] == 0).all()

    norms = np.linalg.norm(ds.item_content, axis=1)
    has_genres = (movies.sort_values("movieId").genres != "(no genres listed)").to_numpy()
    assert has_genres.sum() == 9_742 - 34
    assert np.allclose(norms[has_genres], 1.0, atol=1e-5)
    assert ds.item_content.dtype == np.float32

    assert ds.static_feature_columns() == ["activity_level"]
    level = ds.users.set_index("user_id")["activity_level"]
    counts = ratings.userId.value_counts()
    assert set(level.unique()) == {0, 1, 2, 3}
    busiest, idlest = str(counts.idxmax()), str(counts.idxmin())
    assert level[busiest] == 3 and level[idlest] == 0


def test_load_source_dispatches_and_round_trips(ml_latest_small: Path, tmp_path: Path) -> None:
    ds = load_source(ml_latest_small)
    assert ds.meta["format"] == "ml-latest"
    saved = ds.save(tmp_path / "saved")
    again = load_source(saved)
    pd.testing.assert_frame_equal(again.events, ds.events)
    np.testing.assert_array_equal(again.item_content, ds.item_content)
    with pytest.raises(DataError, match="unrecognised data directory"):
        load_source(tmp_path)


def _subset(ml: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The first ratings of ml-latest-small, the movies they reference and their users.

    MovieLens ML-1M/100K have no files here, so these real rows are rewritten in those layouts.
    The demographics are made up (a deterministic function of the user id): ml-latest has none.
    Half-star ratings are kept, which the integer-rated layouts must read all the same.
    """
    ratings = pd.read_csv(ml / "ratings.csv", nrows=N_SUBSET)
    movies = pd.read_csv(ml / "movies.csv")
    movies = movies[movies.movieId.isin(ratings.movieId)].reset_index(drop=True)
    # ML-1M/100K files are latin-1: titles with other characters lose them, as in a real export
    movies["title"] = movies.title.str.encode("latin-1", "replace").str.decode("latin-1")
    uid = np.sort(ratings.userId.unique())
    users = pd.DataFrame(
        {
            "user_id": uid,
            "gender": np.where(uid % 2 == 1, "F", "M"),
            "age": 12 + (uid * 7) % 50,
            "occupation": uid % 21,
            "zip": [f"{(u * 7919) % 100_000:05d}" for u in uid],
        }
    )
    return ratings, movies, users


def _write(path: Path, rows: list[str]) -> None:
    path.write_bytes(("\n".join(rows) + "\n").encode("latin-1"))


def _ml_1m_age(age: int) -> int:
    for low in (56, 50, 45, 35, 25, 18):
        if age >= low:
            return low
    return 1


def _write_ml_1m(ml: Path, out: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    ratings, movies, users = _subset(ml)
    out.mkdir()
    _write(
        out / "ratings.dat",
        [f"{r.userId}::{r.movieId}::{r.rating:g}::{r.timestamp}" for r in ratings.itertuples()],
    )
    _write(out / "movies.dat", [f"{m.movieId}::{m.title}::{m.genres}" for m in movies.itertuples()])
    users["age"] = users.age.map(_ml_1m_age)
    _write(
        out / "users.dat",
        [f"{u.user_id}::{u.gender}::{u.age}::{u.occupation}::{u.zip}" for u in users.itertuples()],
    )
    return ratings, movies, users


def _check_against_source(ds, ratings: pd.DataFrame, movies: pd.DataFrame) -> None:
    ds.validate()
    _assert_sorted(ds)
    assert len(ds.events) == len(ratings)
    assert ds.n_items == len(movies)
    assert ds.items["title"].tolist() == movies.sort_values("movieId").title.tolist()
    expected = _canon(
        ratings.userId,
        ratings.movieId,
        ratings.timestamp * 1000,
        rating=ratings.rating.astype(np.float32),
        click=np.ones(len(ratings), np.int8),
        like=(ratings.rating >= 4).astype(np.int8),
        hate=(ratings.rating <= 1.5).astype(np.int8),
        comment=np.zeros(len(ratings), np.int8),
    )
    got = _loaded(ds, "rating", "click", "like", "hate", "comment")
    pd.testing.assert_frame_equal(got, expected, check_dtype=False)
    assert (ds.events[["follow", "forward"]] == 0).all().all()
    assert np.allclose(np.linalg.norm(ds.item_content, axis=1), 1.0, atol=1e-5)


def test_ml_1m_layout(ml_latest_small: Path, tmp_path: Path) -> None:
    ratings, movies, users = _write_ml_1m(ml_latest_small, tmp_path / "ml-1m")
    ds = load_movielens(tmp_path / "ml-1m")
    assert ds.meta["format"] == "ml-1m" and ds.name == "ml-1m"
    _check_against_source(ds, ratings, movies)
    assert ds.n_users == len(users)
    assert ds.items["tag"].tolist() == movies.sort_values("movieId").genres.tolist()
    assert ds.static_feature_columns() == ["gender", "age", "occupation", "zip_prefix"]
    got = ds.users.set_index("user_id")
    ids = users.user_id.astype(str)
    assert (got.loc[ids, "gender"].to_numpy() == (users.gender == "M").to_numpy()).all()
    want_age = pd.factorize(users.age, sort=True)[0]
    np.testing.assert_array_equal(got.loc[ids, "age"].to_numpy(), want_age)
    np.testing.assert_array_equal(
        got.loc[ids, "zip_prefix"].to_numpy(), pd.factorize(users.zip.str[0], sort=True)[0]
    )


def _write_ml_100k(ml: Path, out: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    ratings, movies, users = _subset(ml)
    out.mkdir()
    _write(
        out / "u.data",
        [f"{r.userId}\t{r.movieId}\t{r.rating:g}\t{r.timestamp}" for r in ratings.itertuples()],
    )
    rows = []
    for m in movies.itertuples():
        genres = {"Children's" if g == "Children" else g for g in m.genres.split("|")}
        flags = [int(g in genres) for g in U_GENRES]
        flags[0] = int(not any(flags[1:]))  # ml-latest's IMAX has no ML-100K flag
        rows.append(
            f"{m.movieId}|{m.title}|01-Jan-1995||http://example.invalid/{m.movieId}|"
            + "|".join(map(str, flags))
        )
    _write(out / "u.item", rows)
    _write(
        out / "u.user",
        [f"{u.user_id}|{u.age}|{u.gender}|occ{u.occupation}|{u.zip}" for u in users.itertuples()],
    )
    return ratings, movies, users


def test_ml_100k_layout(ml_latest_small: Path, tmp_path: Path) -> None:
    ratings, movies, users = _write_ml_100k(ml_latest_small, tmp_path / "ml-100k")
    ds = load_source(tmp_path / "ml-100k")
    assert ds.meta["format"] == "ml-100k"
    _check_against_source(ds, ratings, movies)
    assert ds.n_users == len(users)

    for m, item in zip(
        movies.sort_values("movieId").itertuples(), ds.items.itertuples(), strict=True
    ):
        mine = {"Children's" if g == "Children" else g for g in m.genres.split("|")}
        ordered = [g for g in U_GENRES[1:] if g in mine]
        assert item.tag == ("|".join(ordered) or "(no genres listed)")
        assert item.category == (ordered[0] if ordered else "(no genres listed)")

    got = ds.users.set_index("user_id").loc[users.user_id.astype(str)]
    buckets = users.age.map(_ml_1m_age)
    np.testing.assert_array_equal(got["age"].to_numpy(), pd.factorize(buckets, sort=True)[0])
    occupation = pd.factorize("occ" + users.occupation.astype(str), sort=True)[0]
    np.testing.assert_array_equal(got["occupation"].to_numpy(), occupation)


def _replace_line(path: Path, line: int, text: str | None, sep: bytes = b"\r\n") -> None:
    """Overwrite (or, with None, drop) 1-based ``line`` of ``path``, keeping its line endings."""
    lines = path.read_bytes().split(sep)
    if text is None:
        del lines[line - 1]
    else:
        lines[line - 1] = text.encode()
    path.write_bytes(sep.join(lines))


@pytest.fixture
def ml_latest_slice(ml_latest_small: Path, tmp_path: Path) -> Path:
    """movies.csv and the first 60 ratings and 30 tags of ml-latest-small, CRLF kept."""
    out = tmp_path / "ml-slice"
    out.mkdir()
    (out / "movies.csv").write_bytes((ml_latest_small / "movies.csv").read_bytes())
    for name, n in (("ratings.csv", 60), ("tags.csv", 30)):
        lines = (ml_latest_small / name).read_bytes().split(b"\r\n")[: n + 1]
        (out / name).write_bytes(b"\r\n".join(lines) + b"\r\n")
    return out


def test_ml_latest_slice_loads(ml_latest_slice: Path) -> None:
    ds = load_movielens(ml_latest_slice)
    assert int((ds.events["rating"] > 0).sum()) == 60
    assert ds.n_items == 9_742


def test_ml_latest_malformed(ml_latest_slice: Path) -> None:
    ratings = ml_latest_slice / "ratings.csv"
    good = ratings.read_bytes()

    _replace_line(ratings, 17, "1,157,abc,964984100")
    with pytest.raises(DataError, match=r"ratings\.csv:17: column 'rating': 'abc' is not a number"):
        load_movielens(ml_latest_slice)

    ratings.write_bytes(good)
    _replace_line(ratings, 30, "1,1024")
    with pytest.raises(DataError, match=r"ratings\.csv:30: expected 4 fields, found 2"):
        load_movielens(ml_latest_slice)

    ratings.write_bytes(good)
    _replace_line(ratings, 9, "1,1,4.0,964982703,7")
    with pytest.raises(DataError, match=r"ratings\.csv:9: expected 4 fields, found 5"):
        load_movielens(ml_latest_slice)

    ratings.write_bytes(good)
    _replace_line(ratings, 12, "1,999999999,4.0,964982703")
    with pytest.raises(DataError, match=r"ratings\.csv:12: movie 999999999 is not in movies\.csv"):
        load_movielens(ml_latest_slice)

    ratings.write_bytes(good)
    _replace_line(ratings, 1, "userId,movieId,score,timestamp")
    with pytest.raises(DataError, match=r"ratings\.csv: missing columns \['rating'\]"):
        load_movielens(ml_latest_slice)

    ratings.write_bytes(good)
    _replace_line(ml_latest_slice / "tags.csv", 5, "2,60756,funny")
    with pytest.raises(DataError, match=r"tags\.csv:5: expected 4 fields, found 3"):
        load_movielens(ml_latest_slice)

    (ml_latest_slice / "movies.csv").unlink()
    with pytest.raises(DataError, match=r"movies\.csv: file not found"):
        load_movielens(ml_latest_slice)


def test_ml_1m_malformed(ml_latest_small: Path, tmp_path: Path) -> None:
    root = tmp_path / "ml-1m"
    _write_ml_1m(ml_latest_small, root)
    ratings = root / "ratings.dat"
    good = ratings.read_bytes()

    _replace_line(ratings, 10, "1::3", sep=b"\n")
    with pytest.raises(DataError, match=r"ratings\.dat:10: expected 4 fields, found 2"):
        load_movielens(root)

    ratings.write_bytes(good)
    _replace_line(ratings, 20, "1::3::four::964981247", sep=b"\n")
    with pytest.raises(
        DataError, match=r"ratings\.dat:20: column 'rating': 'four' is not a number"
    ):
        load_movielens(root)

    ratings.write_bytes(good)
    _replace_line(ratings, 25, "99999::3::4::964981247", sep=b"\n")
    with pytest.raises(DataError, match=r"ratings\.dat:25: user 99999 is not in users\.dat"):
        load_movielens(root)

    # every row lacking its last field is how a missing column shows in a headerless file
    ratings.write_bytes(b"\n".join(line.rsplit(b"::", 1)[0] for line in good.splitlines()))
    with pytest.raises(
        DataError, match=r"ratings\.dat:1: expected 4 fields, found 3 \(no \['timestamp'\]\)"
    ):
        load_movielens(root)

    ratings.write_bytes(good)
    (root / "users.dat").unlink()
    with pytest.raises(DataError, match=r"users\.dat: file not found"):
        load_movielens(root)


def test_ml_100k_malformed(ml_latest_small: Path, tmp_path: Path) -> None:
    root = tmp_path / "ml-100k"
    _write_ml_100k(ml_latest_small, root)
    items = root / "u.item"
    good_items = items.read_bytes()
    lines = good_items.split(b"\n")
    lines[4] = lines[4].rsplit(b"|", 1)[0] + b"|x"
    items.write_bytes(b"\n".join(lines))
    with pytest.raises(DataError, match=r"u\.item:5: column 'Western': 'x' is not a number"):
        load_movielens(root)

    items.write_bytes(good_items)
    _replace_line(root / "u.data", 7, "1\t3\t4.0", sep=b"\n")
    with pytest.raises(
        DataError, match=r"u\.data:7: expected 4 fields, found 3 \(no \['timestamp'\]\)"
    ):
        load_movielens(root)

    (root / "u.user").unlink()
    with pytest.raises(DataError, match=r"u\.user: file not found"):
        load_movielens(root)


def test_read_table_line_numbers_count_physical_lines(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_bytes(b'a,b\r\n1,"two\r\nlines"\r\n\r\n2,x\r\n3,y\r\nq,z\r\n')
    with pytest.raises(DataError, match=r"t\.csv:7: column 'a': 'q' is not a number"):
        read_table(path, columns=["a", "b"], dtypes={"a": int})
    path.write_bytes(b"a,b\n1,NA\n2,\n")
    frame = read_table(path, columns=["a", "b"], dtypes={"a": int, "b": str}, nullable=["b"])
    assert frame["b"].iloc[0] == "NA" and pd.isna(frame["b"].iloc[1])
    with pytest.raises(DataError, match=r"t\.csv:3: column 'b': missing value"):
        read_table(path, columns=["a", "b"], dtypes={"b": str})
    path.write_bytes(b"a,b\n1,2.5\n")
    with pytest.raises(DataError, match=r"t\.csv:2: column 'b': 2.5 is not an integer"):
        read_table(path, dtypes={"b": int})


def test_content_and_codes_are_deterministic() -> None:
    words = pd.Series(["Toy Story", None, "toy soldiers"])
    one = side_feature_content(
        onehot={"kind": pd.Series(["a", None, "b"])},
        multihot={"genres": pd.Series([["x", "y"], [], ["y"]])},
        words={"title": words},
    )
    two = side_feature_content(
        onehot={"kind": pd.Series(["a", None, "b"])},
        multihot={"genres": pd.Series([["x", "y"], [], ["y"]])},
        words={"title": words},
    )
    np.testing.assert_array_equal(one, two)
    assert one.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(one, axis=1), [1.0, 0.0, 1.0], atol=1e-6)
    codes = code_categories(pd.Series([10.0, 2.0, np.nan, 2.0]))
    np.testing.assert_array_equal(codes, [1, 0, 2, 0])
