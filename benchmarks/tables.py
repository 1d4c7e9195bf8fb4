"""Shared output of the benchmark scripts: Markdown tables."""

from __future__ import annotations


def print_table(title: str, header: list[str], rows: list[list[str]], align: str) -> None:
    """A Markdown table; `align` has one letter per column, `l` or `r`."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if a == "l" else c.rjust(w)
                                 for c, w, a in zip(cells, widths, align)) + " |"

    print(f"\n{title}\n")
    print(line(header))
    print("|" + "|".join("-" * (w + 1) + ":" if a == "r" else "-" * (w + 2) for w, a in zip(widths, align)) + "|")
    for row in rows:
        print(line(row))
