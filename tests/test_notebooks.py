"""The notebooks: committed clean (no outputs or widget state), in sync with their py:percent pairs, only
importing eelab, one tagged setup cell with every constant, no function or class; and each runs top to bottom
headless (nbclient) in smoke mode on the reference checkpoint, or on a tiny stand-in while it is absent."""
from __future__ import annotations

import ast
import re
import time
from pathlib import Path

import nbformat
import pytest
from standin import kernel_env, reference_or_standin

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
IDS = [path.stem for path in NOTEBOOKS]
ALLOWED_IMPORTS = {"eelab", "os"}  # os only reads the environment variables of the setup cell
MAX_CELL_LINES = 10                # "cells of a few lines" (the setup cell excepted)


def code_cells(nb) -> list:
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def test_the_four_notebooks_are_planned():
    names = {path.stem for path in NOTEBOOKS}
    assert {"01_train_classifiers", "02_tune_alpha", "03_train_dqn", "04_compare_policies"} <= names


def committed(path: Path) -> str:
    """The notebook as the next commit holds it: git's index, which the output-stripping filter
    (.gitattributes, installed by `make lab`) feeds; the file itself outside a git checkout. Running and saving
    the notebooks in JupyterLab changes the working file, not this."""
    import subprocess

    try:
        return subprocess.run(["git", "show", f":{path.relative_to(NOTEBOOK_DIR.parent).as_posix()}"],
                              cwd=NOTEBOOK_DIR.parent, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):  # no git, or not a checkout (an unpacked sdist)
        return path.read_text()


def test_notebooks_pass_through_the_output_stripping_filter():
    attributes = (NOTEBOOK_DIR.parent / ".gitattributes").read_text().split("\n")
    assert "notebooks/*.ipynb filter=nbstripout diff=ipynb" in attributes
    makefile = (NOTEBOOK_DIR.parent / "Makefile").read_text()
    assert re.search(r"^lab: .*git-filter", makefile, re.M) and "git config filter.nbstripout.clean" in makefile


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_committed_without_outputs_or_widget_state(path):
    nb = nbformat.reads(committed(path), as_version=4)
    nbformat.validate(nb)
    assert "widgets" not in nb.metadata, f"{path.name} holds widget state: clear it before committing"
    for i, cell in enumerate(code_cells(nb)):
        assert cell.outputs == [] and cell.execution_count is None, (
            f"{path.name} cell {i} has outputs: clear them (Edit > Clear Outputs of All Cells) before committing")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_one_tagged_setup_cell_only_imports_eelab_and_defines_nothing(path):
    cells = code_cells(nbformat.read(path, as_version=4))
    assert "parameters" in cells[0].metadata.get("tags", []), f"{path.name}: the first code cell must be tagged parameters"
    setup = ast.parse(cells[0].source)
    assert any(isinstance(n, ast.Assign) and n.targets[0].id == "SMOKE" for n in setup.body if isinstance(n, ast.Assign)
               and isinstance(n.targets[0], ast.Name)), f"{path.name}: the setup cell must set SMOKE from the environment"
    for i, cell in enumerate(cells):
        tree = ast.parse(cell.source)
        for node in ast.walk(tree):
            assert not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)), (
                f"{path.name} cell {i} defines a function or class: move it into eelab with a test")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                assert i == 0, f"{path.name} cell {i} imports: imports belong in the setup cell"
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert {n.split(".")[0] for n in names} <= ALLOWED_IMPORTS, f"{path.name} imports {names}"
            if i > 0 and isinstance(node, ast.Assign):
                for target in node.targets:
                    assert not (isinstance(target, ast.Name) and re.fullmatch(r"[A-Z][A-Z0-9_]*", target.id)), (
                        f"{path.name} cell {i} sets the constant {target.id}: constants belong in the setup cell")
        if i > 0:
            lines = [line for line in cell.source.splitlines() if line.strip()]
            assert len(lines) <= MAX_CELL_LINES, f"{path.name} cell {i} has {len(lines)} lines; split it"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_paired_script_is_in_sync(path):
    jupytext = pytest.importorskip("jupytext")
    pair = path.with_suffix(".py")
    if not pair.exists():
        pytest.skip(f"{path.name} has no py:percent pair")
    ours = [(c.cell_type, c.source.strip()) for c in nbformat.read(path, as_version=4).cells]
    theirs = [(c.cell_type, c.source.strip()) for c in jupytext.read(pair).cells]
    assert ours == theirs, f"{path.name} and {pair.name} differ: run `jupytext --sync {pair}`"


@pytest.fixture(scope="module")
def executed(tmp_path_factory) -> dict[str, tuple]:
    """Every notebook run once in smoke mode, all at once (one kernel each, so start-up and imports overlap):
    {name: (executed notebook, seconds, error or None)}."""
    import asyncio

    from nbclient import NotebookClient

    root = tmp_path_factory.mktemp("notebooks")
    checkpoint = reference_or_standin(root / "standin")
    env = kernel_env(checkpoint, root)

    async def run(path: Path) -> tuple:
        nb = nbformat.read(path, as_version=4)
        client = NotebookClient(nb, timeout=240, kernel_name="python3",
                                resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
        start = time.perf_counter()
        try:
            await client.async_execute(env=env)
            return nb, time.perf_counter() - start, None
        except Exception as e:  # CellExecutionError carries the failing cell's traceback
            return nb, time.perf_counter() - start, e

    async def run_all() -> list:
        return await asyncio.gather(*(run(path) for path in NOTEBOOKS))

    return dict(zip(IDS, asyncio.run(run_all())))


@pytest.mark.timeout(420)
@pytest.mark.parametrize("name", IDS)
def test_runs_top_to_bottom_in_smoke_mode(name, executed):
    nb, seconds, error = executed[name]
    if error is not None:
        raise error
    outputs = [o for cell in code_cells(nb) for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    shown = {kind for o in outputs for kind in o.get("data", {})}
    assert "application/vnd.jupyter.widget-view+json" in shown  # the panels
    assert "image/png" in shown  # the paper figures, each shown once
    print(f"{name}: {seconds:.1f} s")
