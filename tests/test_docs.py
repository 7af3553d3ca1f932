"""Code examples in docs/ run as written."""

from __future__ import annotations

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _python_blocks(name: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / name).read_text(), flags=re.S)


def test_custom_loop_in_step_guide_runs_and_learns(capsys):
    block = next(b for b in _python_blocks("step.md") if "for epoch" in b)
    namespace: dict = {}
    exec(compile(block, "docs/step.md", "exec"), namespace)
    lines = capsys.readouterr().out.strip().splitlines()
    losses = [float(line.split()[1]) for line in lines]
    assert len(losses) == 5 and losses[-1] < losses[0]
    assert float(namespace["accuracy"]) > 0.7
    assert namespace["state"].step.item() == 80
