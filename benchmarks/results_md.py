"""One job: replace (or append) one '## ' section of benchmarks/RESULTS.md, keeping every other."""
from __future__ import annotations

from pathlib import Path


def replace_section(results: Path, heading: str, body: list[str]) -> None:
    """Write ``body`` (its first line is ``heading``) in place of the section titled ``heading``,
    or append it; the sections before and after are kept as they are."""
    text = results.read_text() if results.exists() else "# Benchmark results\n\n"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + "\n".join(body)
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = "\n".join(lines[:start] + body + lines[end:]) + "\n"
    results.write_text(new)
