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


def test_every_name_in_the_api_reference_exists():
    import importlib

    import medfunc as mf

    text = (DOCS / "api.md").read_text()
    names = set(re.findall(r"`(mf(?:\.\w+)+)", text))
    names |= {f"mf.{n}" for n in ("TrainState", "MedicalModelTrainer", "TrainerConfig")}
    assert len(names) > 20
    for dotted in sorted(names):
        obj = mf
        for part in dotted.split(".")[1:]:
            obj = getattr(obj, part)
    for module, attr in re.findall(r"`medfunc\.(\w+)\.(\w+)", text):
        getattr(importlib.import_module(f"medfunc.{module}"), attr)
