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


def _cell(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


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
        models = entry.get("models")
        if models:
            lines += ["| row | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
            for row, m in models.items():
                lines.append(f"| {row} | " + " | ".join(_cell(m.get(c)) for c in COLUMNS) + " |")
            lines.append("")
        extra = {
            k: v for k, v in entry.items() if k not in ("models", "reward_detail", "reward_auc")
        }
        if extra:
            lines += ["```", json.dumps(extra, indent=2), "```", ""]
    return "\n".join(lines)
