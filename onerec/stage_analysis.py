"""Where the generator loses quality, stage by stage, on the evaluation's own rows.

A held-out item can be lost in three places: no beam reaches it (the candidates' recall
bounds everything after), the SID model orders it low, or the ranking stage does. Each is
measured alone, per search: the candidates' recall, NDCG@10 in beam order (ranking weight
0), under the ranking head alone, and as served (the fitted weight). The searches are the
served one (beam width W, the last level's best ``FINAL_EXPAND`` x W completions), the
beams alone (x1) and a search four times as wide. SASRec's recall at the same number of
items says whether the candidates are worse than the baseline's own top of that size.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from onerec.metrics import MISS, metrics_from_ranks

# A ranking weight so large that the SID's log-probability only breaks the head's ties.
HEAD_ONLY = 1e6


def _metrics(ranks: np.ndarray) -> dict[str, float]:
    return {k: round(v, 4) for k, v in metrics_from_ranks(ranks).items()}


def beam_stages(
    ranks: dict[float, np.ndarray], counts: np.ndarray, served: float
) -> dict[str, Any]:
    """One beam width's stages, from :func:`onerec.evaluate.beam_ranks` run with the
    weights 0, ``served`` and :data:`HEAD_ONLY` (those present are reported)."""
    any_ranks = next(iter(ranks.values()))
    out: dict[str, Any] = {
        "candidates": round(float(counts.mean()), 1),
        "candidate_recall": round(float((any_ranks != MISS).mean()), 4),
    }
    for name, weight in (("sid_order", 0.0), ("head_only", HEAD_ONLY), ("served", served)):
        if weight in ranks:  # a fitted weight of 0 serves the beam order itself
            out[name] = _metrics(ranks[weight])
    return out


def recall_at(ranks: np.ndarray, sizes: list[int]) -> dict[str, float]:
    """A full-ranking model's recall at each list size (its top ``k`` against ``k``
    candidates)."""
    return {f"recall@{k}": round(float((ranks < k).mean()), 4) for k in sizes}


def stage_lines(stages: dict[str, Any]) -> list[str]:
    """Markdown table of :func:`beam_stages` entries, one row per beam width."""
    lines = [
        "| search | items | candidate recall | NDCG@10 beam order | head only | served |"
        " Recall@50 served |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in stages.items():
        if not name.startswith("beam"):
            continue

        def ndcg(key: str, s: dict[str, Any] = s) -> str:
            return f"{s[key]['ndcg@10']:.4f}" if key in s else "-"

        lines.append(
            f"| {name.removeprefix('beam ')} | {s['candidates']:.0f} | "
            f"{s['candidate_recall']:.4f} | "
            f"{ndcg('sid_order')} | {ndcg('head_only')} | {ndcg('served')} | "
            f"{s['served']['recall@50']:.4f} |"
        )
    if "sasrec" in stages:
        cells = ", ".join(f"{k} {v:.4f}" for k, v in stages["sasrec"].items())
        lines += ["", f"SASRec over the same number of items: {cells}"]
    return lines
