"""One entry point that turns any supported data directory into a :class:`Dataset`.

Users point the tools at a directory; recognising its layout here keeps every command free of
per-source options.
"""

from __future__ import annotations

from pathlib import Path

from onerec.data.kuairand import load_kuairand
from onerec.data.movielens import load_movielens
from onerec.data.schema import DataError, Dataset


def load_source(path: str | Path) -> Dataset:
    """Load a saved canonical data set, a MovieLens directory or a KuaiRand directory.

    Recognised by the files present: ``meta.json`` with ``events.parquet`` (a data set written
    by :meth:`Dataset.save`), ``ratings.csv`` (ml-latest), ``ratings.dat`` (ML-1M), ``u.data``
    (ML-100K) or ``user_features_*.csv`` (KuaiRand).
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    if (root / "meta.json").is_file() and (root / "events.parquet").is_file():
        return Dataset.load(root)
    if any((root / f).is_file() for f in ("ratings.csv", "ratings.dat", "u.data")):
        return load_movielens(root)
    if any(root.glob("user_features_*.csv")):
        return load_kuairand(root)
    raise DataError(
        f"{root}: unrecognised data directory; expected meta.json + events.parquet (a saved data "
        "set), ratings.csv (MovieLens ml-latest), ratings.dat (ML-1M), u.data (ML-100K) or "
        "user_features_*.csv + video_features_basic_*.csv + log_*.csv (KuaiRand)"
    )
