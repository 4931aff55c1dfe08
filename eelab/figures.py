"""A notebook's figures and tables without a browser (`eelab figures NOTEBOOK --out DIR`), for papers rebuilt
from a Makefile.

The notebook runs top to bottom headless (nbclient; its kernel, ipykernel, in a subprocess) from its cached
fits (the notebooks' FITTED folder), with EELAB_FIGURES=DIR, EELAB_EXPORT=1 and EELAB_FIGURE_SIZE (column, page
or default) in the kernel's environment: its parameters cell reads them, and its last cell then calls its
ExportControl's export(), the code the export button runs. What was written, and what figcheck found wrong with a
figure, is read back from the {prefix}manifest.json that export writes beside the files.
"""
from __future__ import annotations

import importlib.util
import json
import os
import time
import warnings
from pathlib import Path

from .errors import EelabError, EelabWarning
from .files import check_output_folder

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = ("01_train_classifiers", "02_tune_alpha", "03_train_dqn", "04_compare_policies")
INSTALL = "pip install -e '.[notebooks,dev]' (or `make install`)"
FIGURE_SIZES = ("default", "column", "page")  # each figure as the notebook draws it, one column, two columns


def find_notebook(notebook: str | Path) -> Path:
    """The .ipynb a name means: "04", "04_compare_policies", "04_compare_policies.ipynb" (in eelab's
    notebooks/ folder), or a path to a notebook (its py:percent twin's .ipynb for a .py)."""
    path = Path(notebook).expanduser()
    if path.suffix in (".ipynb", ".py") and path.exists():
        path = path.with_suffix(".ipynb")
        if not path.is_file():
            raise EelabError(f"{notebook} has no paired notebook {path.name}; run `jupytext --sync {notebook}`")
        return path.resolve()
    stem = Path(str(notebook)).name.removesuffix(".ipynb")
    matches = [name for name in NOTEBOOKS if name == stem or name.split("_", 1)[0] == stem]
    if len(matches) != 1 or not (NOTEBOOK_DIR / f"{matches[0]}.ipynb").is_file():
        raise EelabError(f"no notebook {str(notebook)!r}: give one of {', '.join(NOTEBOOKS)} (or 01-04, or a path "
                         f"to a .ipynb)")
    return NOTEBOOK_DIR / f"{matches[0]}.ipynb"


def make_figures(notebook: str | Path, out: str | Path, smoke: bool = False, checkpoint: str | Path | None = None,
                 timeout: int = 3600, size: str = "default") -> list[Path]:
    """Run a notebook headless with its export on, writing its figures, tables and manifest into out; returns
    the files written (from the manifest, the manifest last). A figure figcheck.figure_problems finds fault with
    is written and named in an EelabWarning (and in the manifest's figure_problems).

    notebook: see find_notebook; out: the folder, checked (and made) before the notebook runs; smoke: the
    notebook's quick run (EELAB_SMOKE=1: subsets, thin grids, no cache); checkpoint: EELAB_CHECKPOINT for the
    run (default: the notebook's own); timeout: seconds per cell; size: every figure at "column" (3.3 in) or
    "page" (6.9 in) width, or "default" (each at the size the notebook draws it).
    """
    if size not in FIGURE_SIZES:
        raise EelabError(f"figure size must be one of {', '.join(FIGURE_SIZES)}, got {size!r}")
    for module in ("nbclient", "nbformat", "ipykernel"):
        if importlib.util.find_spec(module) is None:
            raise EelabError(f"eelab figures needs {module} to run a notebook without a browser: {INSTALL}")
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    path = find_notebook(notebook)
    out = check_output_folder(Path(out).expanduser()).resolve()  # a file on the way fails here, not after the run
    env = {**os.environ, "EELAB_FIGURES": str(out), "EELAB_EXPORT": "1", "EELAB_SMOKE": "1" if smoke else "0",
           "EELAB_FIGURE_SIZE": size}
    if checkpoint is not None:
        env["EELAB_CHECKPOINT"] = str(Path(checkpoint).expanduser().resolve())
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})  # its relative paths hold
    start = time.time()
    try:
        client.execute(env=env)
    except CellExecutionError as e:
        lines = str(getattr(e, "evalue", "") or e).strip().splitlines() or [""]
        raise EelabError(f"{path.name} failed: {getattr(e, 'ename', 'error')}: {lines[0]}") from None
    except (CellTimeoutError, DeadKernelError) as e:
        raise EelabError(f"{path.name} did not finish: {str(e).splitlines()[0]}") from None
    manifests = [m for m in sorted(out.glob("*manifest.json")) if m.stat().st_mtime >= start - 1]
    if not manifests:
        raise EelabError(f"{path.name} ran but exported nothing into {out}: its last cell must call its "
                         f"ExportControl's export() when EXPORT (EELAB_EXPORT=1) is set")
    files: list[Path] = []
    for manifest in manifests:
        content = json.loads(manifest.read_text())
        files += [out / entry["name"] for entry in content["files"]] + [manifest]
        for name, problems in (content.get("figure_problems") or {}).items():
            if problems:  # written all the same (the data may trip the checker); said here, where it is seen
                more = f" (and {len(problems) - 1} more, in {manifest.name})" if len(problems) > 1 else ""
                warnings.warn(f"figure {name} is not ready to print: {problems[0]}{more}", EelabWarning, stacklevel=2)
    return files


__all__ = ["FIGURE_SIZES", "NOTEBOOKS", "find_notebook", "make_figures"]
