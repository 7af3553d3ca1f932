"""The documentation: every Python block of the guides runs as written, every public name has a
docstring, and the site (MkDocs Material + mkdocstrings) builds with ``--strict``.

A ```` ```python ```` block in ``docs/*.md`` is run, in page order, in one namespace per page
and in a fresh working folder. A block that cannot run here (a signature shown as code, a
torchrun or multi-GPU launch, files of another program) is preceded by the line
``<!-- signature -->``, invisible in the rendered page, and is not run.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SIGNATURE = "<!-- signature -->"
_BLOCK = re.compile(r"(<!-- signature -->[ \t]*\n)?```python\n(.*?)```", flags=re.S)
# pages whose blocks take more than a few seconds on two busy cores (a Trainer run, an
# inductor compile)
_SLOW_PAGES = {"trainer.md", "performance.md"}
#: the modules of the API reference, each with a page ``docs/reference/<last part>.md``
PUBLIC_MODULES = (
    "medfunc",
    "medfunc.optim",
    "medfunc.schedules",
    "medfunc.checkpoint",
    "medfunc.compile",
    "medfunc.ensemble",
    "medfunc.export",
    "medfunc.distributed",
    "medfunc.trainer",
    "medfunc.testing",
    "medfunc.errors",
)


def _python_blocks(name: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / name).read_text(), flags=re.S)


def _runnable_blocks(name: str) -> list[tuple[int, str]]:
    """``(line, code)`` of the page's Python blocks not marked as signatures."""
    text = (DOCS / name).read_text()
    return [
        (text[: m.start(2)].count("\n") + 1, m.group(2))
        for m in _BLOCK.finditer(text)
        if not m.group(1)
    ]


def _pages() -> list:
    pages = sorted(p.name for p in DOCS.glob("*.md") if _runnable_blocks(p.name))
    return [
        pytest.param(page, marks=pytest.mark.slow) if page in _SLOW_PAGES else page
        for page in pages
    ]


@pytest.mark.parametrize("page", _pages())
def test_every_python_block_of_the_guides_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    with torch.random.fork_rng():
        for line, code in _runnable_blocks(page):
            try:
                exec(compile(code, f"docs/{page}:{line}", "exec"), namespace)
            except Exception as error:
                raise AssertionError(
                    f"docs/{page}, the Python block at line {line} fails: "
                    f"{type(error).__name__}: {error}. Fix the block, or mark it "
                    f"'{SIGNATURE}' when it cannot run here (GPU, torchrun, outside files)"
                ) from error


def test_signature_blocks_are_marked_and_the_rest_is_run():
    marked = {
        page.name: page.read_text().count(SIGNATURE + "\n```python") for page in DOCS.glob("*.md")
    }
    for page in ("architecture.md", "export.md", "optimizers.md", "step.md", "distributed.md"):
        assert marked[page] >= 1, page
    total = sum(len(_python_blocks(p.name)) for p in DOCS.glob("*.md"))
    run = sum(len(_runnable_blocks(p.name)) for p in DOCS.glob("*.md"))
    assert run == total - sum(marked.values())
    assert run >= 20


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


def _public_names(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    names = getattr(module, "__all__", None)
    if names is not None:
        return list(names)
    return [
        name
        for name, obj in vars(module).items()
        if not name.startswith("_")
        and (inspect.isfunction(obj) or inspect.isclass(obj))
        and obj.__module__ == module_name
    ]


def _undocumented(module_name: str) -> list[str]:
    """Public functions, classes and their public methods/properties without a docstring."""
    module = importlib.import_module(module_name)
    missing = []
    for name in _public_names(module_name):
        obj = getattr(module, name)
        if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.ismodule(obj)):
            continue
        own = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
        if not (own or "").strip():
            missing.append(f"{module_name}.{name}")
        if not inspect.isclass(obj) or not obj.__module__.startswith("medfunc"):
            continue
        for member, value in vars(obj).items():
            if member.startswith("_"):
                continue
            if isinstance(value, property):
                value = value.fget
            elif isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            if inspect.isfunction(value) and not (value.__doc__ or "").strip():
                missing.append(f"{module_name}.{name}.{member}")
    return missing


def test_every_public_name_has_a_docstring_and_a_reference_page():
    missing = [name for module in PUBLIC_MODULES for name in _undocumented(module)]
    assert missing == [], f"public names without a docstring: {missing}"
    for module in PUBLIC_MODULES:
        page = DOCS / "reference" / f"{module.rsplit('.', 1)[-1]}.md"
        assert f"::: {module}\n" in page.read_text(), page


def test_the_undocumented_check_finds_a_missing_docstring(monkeypatch):
    import medfunc.export as export

    def undocumented(x: int) -> int:
        return x

    monkeypatch.setattr(export, "to_onnx", undocumented)
    assert _undocumented("medfunc.export") == ["medfunc.export.to_onnx"]


@pytest.mark.slow
def test_the_site_builds_with_strict_and_documents_every_public_name(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    for guide in DOCS.glob("*.md"):
        page = "index.html" if guide.stem == "index" else f"{guide.stem}/index.html"
        assert (site / page).is_file(), guide.name
    pages = {
        module: (site / "reference" / module.rsplit(".", 1)[-1] / "index.html").read_text()
        for module in PUBLIC_MODULES
    }
    for module in PUBLIC_MODULES:
        for name in _public_names(module):
            obj = getattr(importlib.import_module(module), name)
            if inspect.ismodule(obj) or not getattr(obj, "__module__", "medfunc").startswith(
                "medfunc"
            ):
                continue  # a submodule (its own page) or a re-exported torch name
            # on its module's page, or (a re-export) on the page of the module it comes from
            anchors = [f'id="{other}.{name}"' in html for other, html in pages.items()]
            assert f'id="{module}.{name}"' in pages[module] or (
                obj.__module__ != module and any(anchors)
            ), f"{module}.{name} is not in the API reference"
