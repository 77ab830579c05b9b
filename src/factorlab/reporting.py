"""Result tables (Markdown, CSV, JSON) and seed aggregation, shared by every recipe."""

from __future__ import annotations

import csv
import io
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from factorlab.runtime import atomic_write_text, write_json


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    fmt: str = "{}"
    ci: bool = False
    """Render aggregated values as mean ± 95% CI half-width instead of mean ± std."""

    def render(self, row: dict[str, Any]) -> str:
        value = row.get(self.key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "–"
        if isinstance(value, MeanStd):
            return value.render_ci(self.fmt) if self.ci else value.render(self.fmt)
        return self.fmt.format(value)


@dataclass(frozen=True)
class MeanStd:
    mean: float
    std: float
    n: int

    def render(self, fmt: str) -> str:
        if self.n <= 1:
            return fmt.format(self.mean)
        return f"{fmt.format(self.mean)} ± {fmt.format(self.std)}"

    @property
    def ci95(self) -> float:
        """Half-width of the 95% confidence interval of the mean (Student's t)."""
        if self.n <= 1:
            return float("nan")
        return t_quantile_975(self.n - 1) * self.std / math.sqrt(self.n)

    def render_ci(self, fmt: str) -> str:
        if self.n <= 1:
            return fmt.format(self.mean)
        return f"{fmt.format(self.mean)} ± {fmt.format(self.ci95)}"

    def to_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "std": self.std, "n": self.n, "ci95": self.ci95}


# Student's t 0.975 quantiles for 1..30 degrees of freedom; beyond, the normal 1.96 is close enough.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_quantile_975(dof: int) -> float:
    return _T975[dof - 1] if dof <= len(_T975) else 1.96


def mean_std(values: Sequence[float | None]) -> MeanStd | None:
    """Mean and sample standard deviation over seeds, ignoring missing values."""
    present = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not present:
        return None
    std = statistics.stdev(present) if len(present) > 1 else 0.0
    return MeanStd(statistics.fmean(present), std, len(present))


def aggregate(
    records: Sequence[dict[str, Any]], by: Sequence[str], metrics: Sequence[str], unit: str | None = None
) -> list[dict[str, Any]]:
    """Group flat records by the ``by`` keys (first-seen order) and reduce ``metrics`` to MeanStd.

    ``unit``: the independent unit when runs are nested (e.g. "pretrain_seed": fine-tuning seeds share
    a pretrained backend). Each unit's runs are averaged first and the interval is over units, so n is
    the number of units, not of runs. ``seeds`` counts runs either way."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for rec in records:
        groups.setdefault(tuple(rec.get(k) for k in by), []).append(rec)
    rows = []
    for key, recs in groups.items():
        row: dict[str, Any] = dict(zip(by, key))
        row["seeds"] = len(recs)
        for m in metrics:
            row[m] = mean_std(unit_means(recs, m, unit))
        rows.append(row)
    return rows


def unit_means(records: Sequence[dict[str, Any]], metric: str, unit: str | None) -> list[float | None]:
    """``metric`` per record, or (given ``unit``) its mean over each unit's records."""
    if unit is None:
        return [r.get(metric) for r in records]
    by_unit: dict[Any, list[float]] = {}
    for r in records:
        value = r.get(metric)
        if value is not None and not math.isnan(float(value)):
            by_unit.setdefault(r.get(unit), []).append(float(value))
    return [statistics.fmean(values) for values in by_unit.values()]


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    lines = [
        "| " + " | ".join(c.header for c in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(c.render(r) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _plain(value: Any) -> Any:
    return value.to_dict() if isinstance(value, MeanStd) else value


def write_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column], stem: str | os.PathLike) -> str:
    """Write ``stem``.md, .csv and .json; return the Markdown text.

    CSV gets one column per plain value and ``<key>_mean`` / ``<key>_std`` for aggregated ones.
    """
    stem = Path(stem)
    md = markdown_table(rows, columns)
    atomic_write_text(stem.with_suffix(".md"), md)
    aggregated = {c.key: any(isinstance(r.get(c.key), MeanStd) for r in rows) for c in columns}
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(
        [h for c in columns for h in ([f"{c.key}_mean", f"{c.key}_std"] if aggregated[c.key] else [c.key])]
    )
    for r in rows:
        line: list[Any] = []
        for c in columns:
            v = r.get(c.key)
            if aggregated[c.key]:
                line += [v.mean, v.std] if v is not None else ["", ""]
            else:
                line.append("" if v is None else v)
        writer.writerow(line)
    atomic_write_text(stem.with_suffix(".csv"), buf.getvalue())
    write_json(stem.with_suffix(".json"), [{k: _plain(v) for k, v in r.items()} for r in rows])
    return md
