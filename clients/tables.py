"""The one markdown-table writer of the reports (eval.md, results.md, the demo's table)."""
from __future__ import annotations

# A column: (header, key of the result dict, format string or None for the default).
Column = tuple[str, str, "str | None"]


def format_cell(value, fmt: str | None = None) -> str:
    if value is None:
        return "-"
    if fmt is not None:
        return fmt.format(value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown_table(rows: list[dict], columns: list[Column]) -> str:
    lines = ["| " + " | ".join(header for header, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(format_cell(row.get(key), fmt) for _, key, fmt in columns) + " |")
    return "\n".join(lines) + "\n"
