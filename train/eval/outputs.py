"""Writing results: one JSON file (the numbers) and one Markdown file (the table a person reads) per evaluation."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Iterable, List, Sequence


def fmt(x: Any, digits: int = 3) -> str:
    """A table cell: floats rounded, NaN / None as a dash."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if abs(x) < 1e5 else f"{x:.3g}"
    return str(x)


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]], digits: int = 3) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c, digits) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_result(out_dir: Path, name: str, result: Dict[str, Any], markdown: str) -> Path:
    """Write <out_dir>/<name>.json and <name>.md; returns the JSON path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / f"{name}.md").write_text(markdown)
    return path


def read_results(eval_dir: Path) -> Dict[str, Dict[str, Any]]:
    """{stage: {evaluation: result}} from <eval_dir>/<stage>/<evaluation>.json."""
    out: Dict[str, Dict[str, Any]] = {}
    for path in sorted(Path(eval_dir).glob("*/*.json")):
        out.setdefault(path.parent.name, {})[path.stem] = json.loads(path.read_text())
    return out


def mean(xs: List[float]) -> float:
    """Arithmetic mean, NaN for an empty list."""
    return sum(xs) / len(xs) if xs else float("nan")
