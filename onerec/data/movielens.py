"""MovieLens (ml-latest / ml-latest-small CSV, ML-1M ``::`` and ML-100K) as a canonical Dataset.

MovieLens has ratings, not views, so the behaviour flags are derived from them: every rating is
a ``click``; ``like`` is a rating of 4 or more (the usual positive-feedback threshold) and
``hate`` a rating of 1.5 or less; ``watch_ms`` and ``duration_ms`` are 0 (unknown) and the raw
rating is kept as the extra event column ``rating``. In ml-latest a user's tag on a movie is
the second behaviour: it sets ``comment`` on that user's rating of the movie, and a tagged
movie the user never rated becomes one event of its own (``click`` and ``comment``, rating
0.0) at the time of the user's first tag on it, however many tags the user gave it.

Static user features: ML-1M and ML-100K have demographics (gender, age bucket, occupation,
first character of the zip code), ML-100K ages being bucketed as ML-1M does. ml-latest has
none, so its only feature is ``activity_level``: the quartile (0..3) of the user's number of
ratings in the whole file. It is computed from all events, test period included, so it is a
(weak) leak for a time-split evaluation; drop the column where that matters.

Every movie of the movie file is an item, rated or not, in ascending movie id order; users are
in ascending id order too.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from pathlib import Path
from typing import Any, NamedTuple

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
from onerec.data.schema import DataError, Dataset, make_events

NO_GENRES = "(no genres listed)"
LIKE_MIN_RATING = 4.0
HATE_MAX_RATING = 1.5
# ML-1M age codes: the lower bound of each bucket (<18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+).
AGE_BUCKETS: tuple[int, ...] = (1, 18, 25, 35, 45, 50, 56)
# ML-100K u.item genre flag columns in file order (as in u.genre); "unknown" means no genre.
ML100K_GENRES: tuple[str, ...] = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
    "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
_YEAR = re.compile(r"\s*\((\d{4})(?:\s*[-\u2013]\s*\d{4})?\)\s*$")

# How each layout is written: separator, header line, encoding (GroupLens' old files are latin-1).
_CSV: dict[str, Any] = {"sep": ",", "header": True, "encoding": "utf-8"}
_DAT: dict[str, Any] = {"sep": "::", "header": False, "encoding": "latin-1"}
_TAB: dict[str, Any] = {"sep": "\t", "header": False, "encoding": "latin-1"}
_BAR: dict[str, Any] = {"sep": "|", "header": False, "encoding": "latin-1"}
_RATING_TYPES = {"user": int, "movie": int, "rating": float, "timestamp": int}


class _Parts(NamedTuple):
    """One layout's files in common form, before they become a Dataset."""

    ratings: pd.DataFrame  # user, movie, rating, timestamp (seconds), in file order
    movies: pd.DataFrame  # movieId, title, genres (list of str), ascending movieId
    users: pd.DataFrame  # user_id (str) and coded static features, ascending id
    tags: pd.DataFrame | None  # user, movie, tag, timestamp (ml-latest only)


def load_movielens(path: str | Path, name: str | None = None) -> Dataset:
    """Read a MovieLens directory in whichever of the three GroupLens layouts it holds."""
    root = Path(path)
    if (root / "ratings.csv").is_file():
        fmt, parts = "ml-latest", _read_ml_latest(root)
    elif (root / "ratings.dat").is_file():
        fmt, parts = "ml-1m", _read_ml_1m(root)
    elif (root / "u.data").is_file():
        fmt, parts = "ml-100k", _read_ml_100k(root)
    else:
        raise DataError(
            f"{root}: not a MovieLens directory; expected ratings.csv (ml-latest), "
            "ratings.dat (ML-1M) or u.data (ML-100K)"
        )
    movies = parts.movies
    events = _rating_events(parts.ratings)
    meta: dict[str, Any] = {"source": "movielens", "format": fmt, "path": str(root)}
    words = {"title": movies["title"].str.replace(_YEAR, "", regex=True)}
    if parts.tags is not None:
        events, meta["tag_only_events"] = _add_tags(events, parts.tags)
        text = parts.tags.dropna(subset=["tag"]).groupby("movie")["tag"].agg(" ".join)
        words["tags"] = text.reindex(movies["movieId"]).reset_index(drop=True)
    items = pd.DataFrame(
        {
            "item_id": movies["movieId"].astype(str),
            "author_id": "",
            "category": movies["genres"].map(lambda g: g[0] if g else NO_GENRES),
            "tag": movies["genres"].map(lambda g: "|".join(g) if g else NO_GENRES),
            "title": movies["title"].astype(str),
            "duration_ms": np.zeros(len(movies), dtype=np.int64),
        }
    )
    content = side_feature_content(
        onehot={"decade": _decade(movies["title"])},
        multihot={"genres": movies["genres"]},
        words=words,
    )
    ds = Dataset(
        name=name or root.resolve().name,
        events=make_events(events, pd.Index(parts.users["user_id"]), pd.Index(items["item_id"])),
        users=parts.users,
        items=items,
        item_content=content,
        meta=meta,
    )
    ds.validate()
    return ds


def _read(
    path: Path,
    layout: dict[str, Any],
    cols: list[str],
    dtypes: dict[str, type],
    nullable: Collection[str] = (),
) -> pd.DataFrame:
    return read_table(
        path,
        sep=layout["sep"],
        names=None if layout["header"] else cols,
        columns=cols,
        dtypes=dtypes,
        nullable=nullable,
        encoding=layout["encoding"],
    )


def _read_ml_latest(root: Path) -> _Parts:
    movies_path, ratings_path, tags_path = (
        root / f for f in ("movies.csv", "ratings.csv", "tags.csv")
    )
    movies = _read(
        movies_path,
        _CSV,
        ["movieId", "title", "genres"],
        {"movieId": int, "title": str, "genres": str},
    )
    require_unique(movies["movieId"], movies_path, **_CSV)
    cols = ["userId", "movieId", "rating", "timestamp"]
    ratings = _ratings(ratings_path, _CSV, cols, (movies["movieId"], movies_path))
    if tags_path.is_file():
        tags = _read(
            tags_path,
            _CSV,
            ["userId", "movieId", "tag", "timestamp"],
            {"userId": int, "movieId": int, "tag": str, "timestamp": int},
            nullable=["tag"],
        ).rename(columns={"userId": "user", "movieId": "movie"})
        require_known(
            tags["movie"], pd.Index(movies["movieId"]), tags_path, movies_path.name, **_CSV
        )
    else:
        tags = pd.DataFrame({c: pd.Series(dtype=np.int64) for c in ("user", "movie", "timestamp")})
        tags["tag"] = pd.Series(dtype=object)
    user_ids = np.union1d(ratings["user"].to_numpy(), tags["user"].to_numpy(np.int64))
    counts = ratings["user"].value_counts().reindex(user_ids, fill_value=0).to_numpy()
    users = pd.DataFrame({"user_id": user_ids.astype(str), "activity_level": _quartile(counts)})
    return _Parts(ratings, _movies(movies, movies["genres"].str.split("|")), users, tags)


def _read_ml_1m(root: Path) -> _Parts:
    movies_path, users_path = root / "movies.dat", root / "users.dat"
    movies = _read(
        movies_path,
        _DAT,
        ["movieId", "title", "genres"],
        {"movieId": int, "title": str, "genres": str},
    )
    require_unique(movies["movieId"], movies_path, **_DAT)
    users = _read(
        users_path,
        _DAT,
        ["user_id", "gender", "age", "occupation", "zip"],
        {"user_id": int, "gender": str, "age": int, "occupation": int, "zip": str},
    )
    require_unique(users["user_id"], users_path, **_DAT)
    ratings = _ratings(
        root / "ratings.dat",
        _DAT,
        list(_RATING_TYPES),
        (movies["movieId"], movies_path),
        (users["user_id"], users_path),
    )
    return _Parts(
        ratings, _movies(movies, movies["genres"].str.split("|")), _demographics(users), None
    )


def _read_ml_100k(root: Path) -> _Parts:
    movies_path, users_path = root / "u.item", root / "u.user"
    head = ["movieId", "title", "release_date", "video_release_date", "imdb_url"]
    movies = read_table(
        movies_path,
        sep="|",
        names=[*head, *ML100K_GENRES],
        columns=["movieId", "title", *ML100K_GENRES],
        dtypes={
            "movieId": int,
            "title": str,
            "release_date": str,
            **dict.fromkeys(ML100K_GENRES, int),
        },
        encoding="latin-1",
    )
    require_unique(movies["movieId"], movies_path, **_BAR)
    users = _read(
        users_path,
        _BAR,
        ["user_id", "age", "gender", "occupation", "zip"],
        {"user_id": int, "age": int, "gender": str, "occupation": str, "zip": str},
    )
    require_unique(users["user_id"], users_path, **_BAR)
    bucket = np.searchsorted(AGE_BUCKETS[1:], users["age"].to_numpy(), side="right")
    users["age"] = np.asarray(AGE_BUCKETS)[bucket]
    ratings = _ratings(
        root / "u.data",
        _TAB,
        list(_RATING_TYPES),
        (movies["movieId"], movies_path),
        (users["user_id"], users_path),
    )
    named = np.asarray(ML100K_GENRES[1:], dtype=object)
    flags = movies[list(named)].to_numpy() == 1
    genres = pd.Series([list(named[row]) for row in flags], dtype=object)
    return _Parts(ratings, _movies(movies, genres), _demographics(users), None)


def _ratings(
    path: Path,
    layout: dict[str, Any],
    cols: list[str],
    movies: tuple[pd.Series, Path],
    users: tuple[pd.Series, Path] | None = None,
) -> pd.DataFrame:
    """The ratings file as columns user, movie, rating, timestamp; ids checked against
    (ids, file) of the movies and, where the layout has a user file, of the users."""
    frame = _read(path, layout, cols, dict(zip(cols, _RATING_TYPES.values(), strict=True)))
    frame.columns = list(_RATING_TYPES)
    for col, known in (("movie", movies), ("user", users)):
        if known is not None:
            require_known(frame[col], pd.Index(known[0]), path, known[1].name, **layout)
    rating = frame["rating"].to_numpy()
    bad = np.flatnonzero((rating < 0.5) | (rating > 5))
    if bad.size:
        row = int(bad[0])
        raise row_error(path, row, f"rating {rating[row]} is outside 0.5..5", **layout)
    return frame


def _movies(movies: pd.DataFrame, genres: pd.Series) -> pd.DataFrame:
    """movieId, title and genre list (without the no-genre marker), ascending movieId."""
    genres = genres.map(lambda g: [x for x in g if x and x != NO_GENRES])
    out = pd.DataFrame(
        {"movieId": movies["movieId"], "title": movies["title"], "genres": genres.to_numpy()}
    )
    return out.sort_values("movieId", kind="stable").reset_index(drop=True)


def _demographics(users: pd.DataFrame) -> pd.DataFrame:
    """ML-1M / ML-100K profile columns coded as categorical static features, ascending id."""
    users = users.sort_values("user_id", kind="stable").reset_index(drop=True)
    return pd.DataFrame(
        {
            "user_id": users["user_id"].astype(str),
            "gender": code_categories(users["gender"]),
            "age": code_categories(users["age"]),
            "occupation": code_categories(users["occupation"]),
            "zip_prefix": code_categories(users["zip"].str[:1]),
        }
    )


def _rating_events(ratings: pd.DataFrame) -> pd.DataFrame:
    rating = ratings["rating"].to_numpy(np.float32)
    n = len(ratings)
    zeros = np.zeros(n, dtype=np.int64)
    return pd.DataFrame(
        {
            "user_id": ratings["user"].to_numpy(),
            "item_id": ratings["movie"].to_numpy(),
            "timestamp": ratings["timestamp"].to_numpy(np.int64) * 1000,
            "watch_ms": zeros,
            "duration_ms": zeros,
            "click": np.ones(n, dtype=np.int8),
            "like": (rating >= LIKE_MIN_RATING).astype(np.int8),
            "follow": zeros,
            "comment": zeros,
            "forward": zeros,
            "hate": (rating <= HATE_MAX_RATING).astype(np.int8),
            "rating": rating,
        }
    )


def _add_tags(events: pd.DataFrame, tags: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Mark tagged ratings as comments; add one event per tagged-but-unrated (user, movie)."""
    rated = pd.MultiIndex.from_arrays([events["user_id"], events["item_id"]])
    tagged = pd.MultiIndex.from_arrays([tags["user"], tags["movie"]])
    events = events.assign(comment=rated.isin(tagged).astype(np.int8))
    first = tags[~tagged.isin(rated)].groupby(["user", "movie"], sort=True)["timestamp"].min()
    n = len(first)
    zeros = np.zeros(n, dtype=np.int64)
    only = pd.DataFrame(
        {
            "user_id": first.index.get_level_values("user").to_numpy(),
            "item_id": first.index.get_level_values("movie").to_numpy(),
            "timestamp": first.to_numpy(np.int64) * 1000,
            "watch_ms": zeros,
            "duration_ms": zeros,
            "click": np.ones(n, dtype=np.int8),
            "like": zeros,
            "follow": zeros,
            "comment": np.ones(n, dtype=np.int8),
            "forward": zeros,
            "hate": zeros,
            "rating": np.zeros(n, dtype=np.float32),
        }
    )
    return pd.concat([events, only], ignore_index=True), n


def _quartile(counts: np.ndarray) -> np.ndarray:
    """0..3: which quartile of all users' counts each count falls in (ties share a bucket)."""
    if counts.size == 0:
        return np.zeros(0, dtype=np.int64)
    edges = np.quantile(counts, [0.25, 0.5, 0.75])
    return np.searchsorted(edges, counts, side="left").astype(np.int64)


def _decade(titles: pd.Series) -> pd.Series:
    """Release decade from the "(1995)" title suffix, e.g. "1990s"; NaN when absent."""
    year = pd.to_numeric(titles.str.extract(_YEAR, expand=False), errors="coerce")
    return (year // 10 * 10).map(lambda y: f"{int(y)}s", na_action="ignore")
