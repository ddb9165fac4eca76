"""A user simulator on the synthetic platform: what a user would do with any item.

Logged data only says how users reacted to what they were shown. To score a list a model
recommends (items nobody was shown), evaluation asks the generator's own feedback model
(:func:`onerec.data.synthetic.expected_feedback`) at each user's final interest state, the
state the held-out next events were drawn from.

Only evaluation reads the simulator: training, reward-model fitting and serving never do,
or they would learn from the answer key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from onerec.data.schema import Dataset
from onerec.data.synthetic import expected_feedback, interest_vectors, sample_feedback
from onerec.runtime.engagement import HEAD_WEIGHTS, HEADS

_GROUND_TRUTH = (
    "final_subtopics",
    "final_weights",
    "subtopic_latent",
    "item_latent",
    "item_quality",
)
_CHUNK = 1 << 22  # (users x items) cells scored at once by oracle_top: a few 32 MB arrays


@dataclass(frozen=True)
class UserSimulator:
    """Feedback of ``ds.users`` rows at their final interest state on ``ds.items`` rows."""

    user_vec: np.ndarray  # (U, L) unit interest vectors
    item_latent: np.ndarray  # (I, L) unit vectors
    item_quality: np.ndarray  # (I,)
    item_duration: np.ndarray  # (I,) ms, as logged

    @classmethod
    def from_dataset(cls, ds: Dataset) -> UserSimulator:
        gt = ds.ground_truth or {}
        missing = [k for k in _GROUND_TRUTH if k not in gt]
        if missing:
            raise ValueError(
                f"{ds.name}: the simulator needs a synthetic data set's ground truth "
                f"(missing {missing}); regenerate it with onerec.data.synthetic.generate"
            )
        return cls(
            user_vec=interest_vectors(
                gt["subtopic_latent"], gt["final_subtopics"], gt["final_weights"]
            ),
            item_latent=gt["item_latent"],
            item_quality=gt["item_quality"],
            item_duration=ds.items["duration_ms"].to_numpy(np.int64),
        )

    @property
    def n_items(self) -> int:
        return len(self.item_latent)

    def affinity(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Affinity of ``users`` with ``items``: paired (N,) x (N,) or any broadcast.

        (U, 1) x (1, I) is one matrix product, so scoring a whole catalog stays cheap.
        """
        users, items = np.asarray(users), np.asarray(items)
        if users.ndim == 2 and items.ndim == 2 and users.shape[1] == 1 and items.shape[0] == 1:
            dot = self.user_vec[users[:, 0]] @ self.item_latent[items[0]].T  # (U, I)
        else:
            users, items = np.broadcast_arrays(users, items)
            dot = np.einsum("...d,...d->...", self.user_vec[users], self.item_latent[items])
        return dot + self.item_quality[items]

    def expected(self, users: np.ndarray, items: np.ndarray) -> dict[str, np.ndarray]:
        """Expected value of each behaviour; ``watch`` is the engagement formula's term."""
        return expected_feedback(self.affinity(users, items))

    def sample(self, users: np.ndarray, items: np.ndarray, seed: int) -> dict[str, np.ndarray]:
        """One draw of every behaviour, from the generator's own distributions.

        The result has the event columns, so ``engagement_score`` applies to it.
        """
        aff = self.affinity(users, items)
        duration = self.item_duration[np.broadcast_to(items, aff.shape)]
        return sample_feedback(aff, duration, np.random.default_rng(seed))

    def engagement(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Expected engagement score: the formula is linear, so it is the formula applied
        to the expected feedback."""
        p = self.expected(users, items)
        return sum(float(w) * p[h] for h, w in zip(HEADS, HEAD_WEIGHTS, strict=True))

    def list_engagement(self, users: np.ndarray, item_lists: np.ndarray) -> np.ndarray:
        """Mean expected engagement over each user's list (U, K) -> (U,), the simulated
        stay time. Entries of -1 are padding; a list of padding only scores NaN."""
        item_lists = np.asarray(item_lists)
        valid = item_lists >= 0
        score = self.engagement(np.asarray(users)[:, None], np.where(valid, item_lists, 0))
        total = np.where(valid, score, 0.0).sum(axis=1)
        count = valid.sum(axis=1)
        return np.divide(total, count, out=np.full(len(total), np.nan), where=count > 0)

    def oracle_top(
        self,
        users: np.ndarray,
        k: int,
        exclude: sp.spmatrix | sp.sparray | Sequence[np.ndarray] | None = None,
    ) -> np.ndarray:
        """The ``k`` items of highest expected engagement per user, best first: (U, k).

        ``exclude`` row ``j`` holds the items ``users[j]`` has seen (a CSR matrix with
        ``len(users)`` rows, or one array per user); they are never returned. Where fewer
        than ``k`` items remain the row is padded with -1.
        """
        users = np.asarray(users)
        rows, cols = _pairs(exclude, len(users))
        k = min(k, self.n_items)
        out = np.empty((len(users), k), np.int64)
        step = max(1, _CHUNK // self.n_items)
        everything = np.arange(self.n_items)[None, :]
        for lo in range(0, len(users), step):  # chunks of users bound the (U, I) memory
            hi = min(lo + step, len(users))
            score = self.engagement(users[lo:hi, None], everything)
            a, b = np.searchsorted(rows, [lo, hi])  # rows are sorted
            score[rows[a:b] - lo, cols[a:b]] = -np.inf
            top = np.argpartition(-score, k - 1, axis=1)[:, :k]
            top_score = np.take_along_axis(score, top, axis=1)
            order = np.argsort(-top_score, axis=1, kind="stable")
            top = np.take_along_axis(top, order, axis=1)
            out[lo:hi] = np.where(np.take_along_axis(top_score, order, axis=1) > -np.inf, top, -1)
        return out


def _pairs(
    exclude: sp.spmatrix | sp.sparray | Sequence[np.ndarray] | None, n_rows: int
) -> tuple[np.ndarray, np.ndarray]:
    """(row, item) of every excluded entry."""
    if exclude is None:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    if sp.issparse(exclude):
        csr = sp.csr_array(exclude)
        if csr.shape[0] != n_rows:
            raise ValueError(f"exclude has {csr.shape[0]} rows for {n_rows} users")
        return np.repeat(np.arange(n_rows), np.diff(csr.indptr)), csr.indices.astype(np.int64)
    if len(exclude) != n_rows:
        raise ValueError(f"exclude has {len(exclude)} rows for {n_rows} users")
    arrays = [np.asarray(e, np.int64).ravel() for e in exclude]
    cols = np.concatenate(arrays) if arrays else np.empty(0, np.int64)
    return np.repeat(np.arange(n_rows), [len(e) for e in arrays]), cols
