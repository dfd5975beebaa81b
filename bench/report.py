"""The benchmark's table: rows of absolute figures and ratios, targets with PASS/FAIL, number formats."""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

COLUMNS = ("metric", "1 client", "16 clients", "ratio", "target", "result")


@dataclass
class Row:
    section: str
    metric: str
    c1: str = ""
    c16: str = ""
    ratio: str = ""
    target: str = ""
    result: str = ""

    def cells(self) -> tuple[str, ...]:
        return (self.metric, self.c1, self.c16, self.ratio, self.target, self.result)


@dataclass
class Target:
    section: str
    name: str
    target: str
    value: float | None
    display: str
    passed: bool | None  # None: not measured (or measured with errors)
    note: str = ""

    @property
    def result(self) -> str:
        if self.passed is None:
            return "ERR (errors, see rows)" if self.note else "n/a (not measured)"
        return "PASS" if self.passed else "FAIL"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "result": self.result}


def median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def ms(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) < 10:
        return f"{value:.3f} ms"
    if abs(value) < 1000:
        return f"{value:.1f} ms"
    return f"{value / 1000:.2f} s"


def signed_ms(value: float | None) -> str:
    if value is None:
        return "-"
    return ("+" if value >= 0 else "") + ms(value)


def rps(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}/s"


def ratio(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}x"


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def mib(kib: float | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f} MiB"


def count_label(n: int) -> str:
    if n >= 1000 and n % 1000 == 0:
        return f"{n // 1000}k"
    return str(n)


def format_table(rows: list[Row], errors: dict[str, str]) -> str:
    """One table; a section's heading line precedes its rows, a broken section shows its error."""
    widths = [len(c) for c in COLUMNS]
    widths[0] = max(widths[0], len("  ERROR (the section broke; see below)"))
    for row in rows:
        for i, cell in enumerate(row.cells()):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Iterable[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    out = [line(COLUMNS), rule]
    current = None
    sections = list(dict.fromkeys([r.section for r in rows] + list(errors)))
    for section in sections:
        if section != current:
            current = section
            out.append(line([f"[{section}]"] + [""] * (len(COLUMNS) - 1)))
        for row in rows:
            if row.section == section:
                out.append(line(row.cells()))
        if section in errors:
            out.append(line(["  ERROR (the section broke; see below)"] + [""] * (len(COLUMNS) - 1)))
    return "\n".join(out)
