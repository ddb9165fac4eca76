"""``reports/align.json`` and ``reports/align.md``: the reward model's AUCs and the
alignment rows per data set, in the shape ``DESIGN.md`` gives. Each step merges its own
section, so the reward fit and the RL runs can be rerun one at a time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from onerec.runtime.engagement import HEADS

ROWS = ("random", "popularity", "ntp", "ntp+reward", "ecpo", "grpo", "dpo", "best+reward")
COLUMNS = ("engagement", "gap_closed", "recall@10", "ndcg@10", "legal_unconstrained")


def merge(reports: Path, dataset: str, section: dict[str, Any]) -> dict[str, Any]:
    """Merge ``section`` into the data set's entry of ``align.json``; rewrite ``align.md``."""
    reports.mkdir(parents=True, exist_ok=True)
    path = reports / "align.json"
    report = json.loads(path.read_text()) if path.is_file() else {"datasets": {}}
    entry = report["datasets"].setdefault(dataset, {})
    for key, value in section.items():
        if isinstance(value, dict) and isinstance(entry.get(key), dict):
            entry[key] |= value
        else:
            entry[key] = value
    path.write_text(json.dumps(report, indent=2))
    (reports / "align.md").write_text(render(report))
    return report


SHOWN = (
    "models",
    "ablations",
    "diagnostics",
    "alignment",
    "se_vs_ntp",
    "like_rate_among_hits",
    "reward_detail",
    "reward_auc",
)
DIAGNOSTICS = (
    "Diagnostic: `pscore-catalog` is the reward model's own top-10 over the whole catalog, "
    "no generator: the most that selecting by the P-Score could reach. `ntp@m+oracle` keeps "
    "the served list's first m items and fills the rest with the oracle's best: the most "
    "engagement any list reaches while it keeps the generator's hits in those m slots."
)
RUN_COLUMNS = (
    "method",
    "search",
    "ntp_weight",
    "lr",
    "steps",
    "seconds",
    "first_reward",
    "final_reward",
    "final_kl",
    "legal_unconstrained_before",
    "legal_unconstrained_after",
)
ABLATIONS = (
    "Ablations of ECPO, in the served order and with reward selection (`+reward`): "
    "`-sample` draws each group under the trie instead of taking the top beams; `-ntp<w>` "
    "sets the next-token loss's mix weight (default 0.5); `-long` doubles the learning "
    "rate and allows 120 steps (the runs table says how many the time budget let it take)."
)
PAIRED = ("engagement", "recall@10", "ndcg@10")


def _cell(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or value != value else f"{value:.{digits}f}"


def _rows_table(
    rows: dict[str, dict[str, float | None]],
    se: dict[str, dict[str, float]],
    likes: dict[str, float | None],
) -> list[str]:
    """The columns, each paired metric with ± its standard error against ``ntp`` (where
    the row has one), and the like-rate among hits."""
    head = [*COLUMNS, "like-rate among hits"]
    lines = ["| row | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for row, m in rows.items():
        cells = []
        for c in COLUMNS:
            cell = _cell(m.get(c))
            if c in PAIRED and m.get(c) is not None and c in se.get(row, {}):
                cell += f" ± {_cell(se[row][c])}"
            cells.append(cell)
        cells.append(_cell(likes.get(row), 3))
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def render(report: dict[str, Any]) -> str:
    lines = ["# Preference alignment", ""]
    for name, entry in report["datasets"].items():
        lines += [f"## {name}", ""]
        detail = entry.get("reward_detail")
        if detail:
            lines += [
                "Reward model (P-Score), AUC on held-out exposures (each user's last events, "
                "scored against the history before each). `head`: the behaviour's own head; "
                "`P-Score`: the fused score; `formula, item mean`: the fixed engagement "
                "formula averaged over the item's training exposures, the non-learned "
                "scorer; ± is the head's (or P-Score's) standard error.",
                "",
                "| behaviour | head | ± | P-Score | formula, item mean | positives / exposures |",
                "|---|---|---|---|---|---|",
            ]
            for head in (*HEADS, "positive"):
                r = detail[head]
                lines.append(
                    f"| {head} | {_cell(r.get('head'))} | {_cell(r['se'], 3)} | "
                    f"{_cell(r['pscore'])} | {_cell(r['formula_item_mean'])} | "
                    f"{r['positives']} / {r['exposures']} |"
                )
            lines.append("")
        se = entry.get("se_vs_ntp", {})
        likes = entry.get("like_rate_among_hits", {})
        tables = (("models", None), ("ablations", ABLATIONS), ("diagnostics", DIAGNOSTICS))
        for key, title in tables:
            if entry.get(key):
                lines += [title, ""] if title else []
                lines += _rows_table(entry[key], se, likes)
        if entry.get("alignment"):
            lines += _runs_table(entry["alignment"])
        extra = {k: v for k, v in entry.items() if k not in SHOWN}
        if extra:
            lines += ["```", json.dumps(extra, indent=2), "```", ""]
    return "\n".join(lines)


def _runs_table(runs: dict[str, dict[str, Any]]) -> list[str]:
    """The RL runs: reward is the P-Score of the sampled groups (the mean of the first
    step, and of the last five), KL to the reference over the last five steps."""
    lines = ["RL runs (`onerec align`):", ""]
    lines += ["| run | " + " | ".join(RUN_COLUMNS) + " |", "|---" * (len(RUN_COLUMNS) + 1) + "|"]
    for name, run in runs.items():
        cells = [f"{v:.4g}" if isinstance(v := run.get(c), float) else str(v) for c in RUN_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]
