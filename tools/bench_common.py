"""What every benchmark script does with its table: write it under bench/ and print it."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_table(out: str | Path, lines: list[str]) -> str:
    """Write ``lines`` (Markdown) to ``out`` (relative to the repository root unless absolute), print and return them."""
    path = ROOT / out
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines)
    path.write_text(text)
    print(text)
    return text
