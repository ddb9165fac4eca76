"""Strict delimited-file reading and side-feature helpers shared by the real-data loaders.

Public data files are the one input we do not control, so :func:`read_table` never loads part
of a file: a missing file, a missing column or a bad row raises :class:`DataError` naming the
file and the 1-based line of the first bad row, which is what a user needs to fix the file.
"""

from __future__ import annotations

import csv
import io
import re
import zlib
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from onerec.data.schema import DataError

# Cells that mean "no value" in a numeric column. String columns only treat "" as missing,
# so a tag or title spelled "NA" or "null" survives.
NA_TOKENS: tuple[str, ...] = ("", "NA", "N/A", "NaN", "nan", "NULL", "null", "None", "<NA>")

_UNIT = "\x1f"  # stands in for a multi-character separator so the fast C parser can be used
_WORD = re.compile(r"[0-9a-z]+")


def read_table(
    path: str | Path,
    *,
    sep: str = ",",
    columns: Sequence[str] = (),
    names: Sequence[str] | None = None,
    dtypes: Mapping[str, type] | None = None,
    nullable: Collection[str] = (),
    encoding: str = "utf-8",
) -> pd.DataFrame:
    """Read a delimited file completely or raise :class:`DataError` naming the file and line.

    ``columns`` must be present and, unless listed in ``nullable``, have no empty cell.
    ``names`` marks a headerless file and names its fields; otherwise line 1 is the header.
    ``dtypes`` maps columns to ``int``, ``float`` or ``str``; numeric cells that do not parse
    (or ``int`` cells with a fraction) are errors; an ``int`` column with empty cells stays
    float64. Other columns are inferred by pandas. ``","`` files honour CSV quoting; other
    separators (``"::"``, tab, ``"|"``) are taken literally, as MovieLens writes them.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    dtypes = dict(dtypes or {})
    source = _source(path, sep)
    header = list(names) if names is not None else _header(path, source, sep, encoding)
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(f"{path}: missing columns {missing}")
    try:
        frame = pd.read_csv(
            source,
            sep=_UNIT if len(sep) > 1 else sep,
            header=None if names is not None else 0,
            names=list(names) if names is not None else None,
            dtype={c: str for c, t in dtypes.items() if t is str and c in header},
            keep_default_na=False,
            na_values={c: [""] if dtypes.get(c) is str else list(NA_TOKENS) for c in header},
            quoting=csv.QUOTE_MINIMAL if sep == "," else csv.QUOTE_NONE,
            encoding=encoding,
            engine="c",
            low_memory=False,
        )
    except pd.errors.ParserError as exc:
        raise _field_count_error(path, sep, encoding, header, names is None) or DataError(
            f"{path}: {exc}"
        ) from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not {encoding} text ({exc.reason})") from exc
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{path}: file is empty") from exc
    if not frame.index.equals(pd.RangeIndex(len(frame))):
        # pandas turns surplus leading fields of the first data row into an index
        raise _field_count_error(path, sep, encoding, header, names is None) or DataError(
            f"{path}: the first data row has more fields than {header}"
        )

    problems: list[tuple[int, str]] = []
    # pandas pads a short row with empty cells instead of failing; such a row always has an
    # empty last cell, so only those rows (usually none) are re-checked with the csv module.
    short = np.flatnonzero(frame.iloc[:, -1].isna().to_numpy())
    if short.size:
        problems += _short_rows(path, sep, encoding, header, names is None, short)
    for col, kind in dtypes.items():
        if col in frame.columns and kind in (int, float):
            values, bad = _numeric(frame[col], kind)
            frame[col] = values
            problems += bad
    for col in columns:
        if col not in nullable:
            empty = np.flatnonzero(frame[col].isna().to_numpy())
            if empty.size:
                problems.append((int(empty[0]), f"column {col!r}: missing value"))
    if problems:
        row, message = min(problems, key=lambda p: p[0])
        raise row_error(path, row, message, sep=sep, header=names is None, encoding=encoding)
    for col, kind in dtypes.items():
        if kind is int and col in frame.columns and not frame[col].isna().any():
            frame[col] = frame[col].astype(np.int64)
    return frame


def row_error(
    path: str | Path,
    row: int,
    message: str,
    *,
    sep: str = ",",
    header: bool = True,
    encoding: str = "utf-8",
) -> DataError:
    """A :class:`DataError` for data row ``row`` (0-based, as read) at its line in the file.

    The line is found by re-reading the file, which is only done on this error path, so blank
    lines and quoted multi-line cells cannot make the reported line wrong.
    """
    skip = 1 if header else 0
    for index, (line, _fields) in enumerate(_records(Path(path), sep, encoding)):
        if index == row + skip:
            return DataError(f"{path}:{line}: {message}")
    return DataError(f"{path}: data row {row + 1}: {message}")


def require_known(
    ids: pd.Series,
    known: pd.Index,
    path: str | Path,
    where: str,
    *,
    sep: str = ",",
    header: bool = True,
    encoding: str = "utf-8",
) -> None:
    """Raise at the first row of ``path`` whose id is not in ``known`` (defined in ``where``).

    Checked before building events so the user learns which file and line to fix, rather than
    the anonymous error :func:`~onerec.data.schema.make_events` would give.
    """
    unknown = np.flatnonzero(~ids.isin(known).to_numpy())
    if unknown.size:
        row = int(unknown[0])
        message = f"{ids.name} {ids.iloc[row]!r} is not in {where}"
        raise row_error(path, row, message, sep=sep, header=header, encoding=encoding)


def require_unique(
    ids: pd.Series,
    path: str | Path,
    *,
    sep: str = ",",
    header: bool = True,
    encoding: str = "utf-8",
) -> None:
    """Raise at the first repeated id in ``path``: a table row must be one user or one item."""
    repeated = np.flatnonzero(ids.duplicated().to_numpy())
    if repeated.size:
        row = int(repeated[0])
        message = f"{ids.name} {ids.iloc[row]!r} appears more than once"
        raise row_error(path, row, message, sep=sep, header=header, encoding=encoding)


def code_categories(series: pd.Series) -> np.ndarray:
    """Integer codes ``0..k-1`` of a static feature, in sorted order of its distinct values.

    Sorting makes the codes stable across runs and machines; a missing value is a category
    of its own (the last code) because "unknown" is itself informative for a profile.
    """
    codes, _ = pd.factorize(series, sort=True, use_na_sentinel=False)
    return codes.astype(np.int64)


def side_feature_content(
    *,
    onehot: Mapping[str, pd.Series] | None = None,
    multihot: Mapping[str, pd.Series] | None = None,
    words: Mapping[str, pd.Series] | None = None,
    hash_dim: int = 64,
) -> np.ndarray:
    """Float32 content vectors of items, from their side features, one row per item.

    All series are aligned by position, one element per item. ``onehot`` fields hold one
    value per item, ``multihot`` fields a list of values (e.g. genres), ``words`` free text
    (titles, tags) that is lower-cased, split into words and hashed with CRC-32 into
    ``hash_dim`` buckets; CRC-32 rather than :func:`hash` keeps vectors identical across
    processes. Missing values contribute nothing. Every field is its own block, scaled to unit
    length so that a long text does not drown a genre, and each row is then L2-normalised; a
    row stays zero only when the item has no feature at all.
    """
    fields: list[tuple[pd.Series, int | None]] = []
    for series in (onehot or {}).values():
        fields.append((series.astype(object).map(lambda v: [v], na_action="ignore"), None))
    fields += [(series, None) for series in (multihot or {}).values()]
    for series in (words or {}).values():
        tokens = series.astype(object).map(
            lambda s: _WORD.findall(str(s).lower()), na_action="ignore"
        )
        fields.append((tokens, hash_dim))
    lengths = {len(series) for series, _ in fields}
    if len(lengths) != 1:
        raise ValueError(f"side feature series differ in length or are absent: {lengths}")
    n_items = lengths.pop()
    blocks = [_bag(series.reset_index(drop=True), n_items, dim) for series, dim in fields]
    content = np.hstack(blocks)
    norms = np.linalg.norm(content, axis=1, keepdims=True)
    return np.divide(content, norms, out=content, where=norms > 0).astype(np.float32)


def _bag(tokens: pd.Series, n_items: int, dim: int | None) -> np.ndarray:
    """Unit-length counts of each item's tokens: a sorted vocabulary, or ``dim`` CRC-32 buckets."""
    exploded = tokens.explode().dropna()
    exploded = exploded[exploded.astype(str) != ""].astype(str)
    rows = exploded.index.to_numpy(np.int64)
    vocab = np.unique(exploded.to_numpy(str))
    if dim is None:
        dim = len(vocab)
        cols = np.searchsorted(vocab, exploded.to_numpy(str))
    else:
        bucket = {t: zlib.crc32(t.encode("utf-8")) % dim for t in vocab}
        cols = exploded.map(bucket).to_numpy(np.int64)
    block = np.bincount(rows * dim + cols, minlength=n_items * dim).astype(np.float64)
    block = block.reshape(n_items, dim)
    norms = np.linalg.norm(block, axis=1, keepdims=True)
    return np.divide(block, norms, out=block, where=norms > 0)


def _source(path: Path, sep: str) -> Path | io.BytesIO:
    """What pandas reads: the file, or its bytes with a multi-character separator replaced."""
    if len(sep) == 1:
        return path
    return io.BytesIO(path.read_bytes().replace(sep.encode("ascii"), _UNIT.encode("ascii")))


def _header(path: Path, source: Path | io.BytesIO, sep: str, encoding: str) -> list[str]:
    try:
        header = pd.read_csv(
            source,
            sep=_UNIT if len(sep) > 1 else sep,
            nrows=0,
            encoding=encoding,
            quoting=csv.QUOTE_MINIMAL if sep == "," else csv.QUOTE_NONE,
        ).columns
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the header line ({exc})") from exc
    if isinstance(source, io.BytesIO):
        source.seek(0)
    return [str(c) for c in header]


def _records(path: Path, sep: str, encoding: str) -> Iterator[tuple[int, list[str]]]:
    """(first line number, fields) of every non-blank record, parsed as pandas parses them."""
    with path.open(encoding=encoding, newline="") as fh:
        lines: Iterator[str] = (line.replace(sep, _UNIT) for line in fh) if len(sep) > 1 else fh
        quoting = csv.QUOTE_MINIMAL if sep == "," else csv.QUOTE_NONE
        reader = csv.reader(lines, delimiter=_UNIT if len(sep) > 1 else sep, quoting=quoting)
        previous = 0
        for fields in reader:
            start, previous = previous + 1, reader.line_num
            if fields:
                yield start, fields


def _field_count_error(
    path: Path, sep: str, encoding: str, columns: list[str], header: bool
) -> DataError | None:
    """The first record whose field count differs from the header's, if there is one."""
    for index, (line, fields) in enumerate(_records(path, sep, encoding)):
        if (index or not header) and len(fields) != len(columns):
            return DataError(f"{path}:{line}: {_count_message(columns, len(fields))}")
    return None


def _short_rows(
    path: Path, sep: str, encoding: str, columns: list[str], header: bool, candidates: np.ndarray
) -> list[tuple[int, str]]:
    skip = 1 if header else 0
    wanted = set((candidates + skip).tolist())
    for index, (_line, fields) in enumerate(_records(path, sep, encoding)):
        if index in wanted and len(fields) < len(columns):
            return [(index - skip, _count_message(columns, len(fields)))]
    return []


def _count_message(columns: list[str], found: int) -> str:
    message = f"expected {len(columns)} fields, found {found}"
    return message + f" (no {columns[found:]})" if found < len(columns) else message


def _numeric(values: pd.Series, kind: type) -> tuple[pd.Series, list[tuple[int, str]]]:
    """``values`` as numbers, and the first cell that is not one (row, message), if any."""
    col = values.name
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        parsed = values.astype(np.float64) if kind is float else values
        bad = np.zeros(len(values), dtype=bool)
    else:
        parsed = pd.to_numeric(values, errors="coerce")
        bad = (parsed.isna() & values.notna()).to_numpy()
    bad = bad | np.isinf(parsed.to_numpy(np.float64))
    problems = []
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        problems.append((row, f"column {col!r}: {values.iloc[row]!r} is not a number"))
    if kind is int and pd.api.types.is_float_dtype(parsed):
        fractional = np.flatnonzero((parsed.notna() & (parsed != np.floor(parsed))).to_numpy())
        if fractional.size:
            row = int(fractional[0])
            problems.append((row, f"column {col!r}: {values.iloc[row]!r} is not an integer"))
    return parsed, problems
