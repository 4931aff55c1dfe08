"""make_figures (`eelab figures NOTEBOOK --out DIR`): a notebook run headless with its export on writes its
figures, tables and manifest, the count it returns is what is on disk and in the manifest, and the figures
pass figcheck.figure_problems; notebook names resolve, unknown ones fail in one line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from standin import kernel_env, reference_or_standin

from eelab.cli import main
from eelab.errors import EelabError
from eelab.figures import NOTEBOOKS, find_notebook, make_figures


@pytest.mark.parametrize("name", ["04", "04_compare_policies", "04_compare_policies.ipynb",
                                  "notebooks/04_compare_policies.py"])
def test_notebook_names_resolve(name, monkeypatch):
    monkeypatch.chdir(find_notebook("01").parents[1])
    assert find_notebook(name).name == "04_compare_policies.ipynb"


def test_unknown_notebook_is_one_line_naming_the_four():
    with pytest.raises(EelabError) as info:
        find_notebook("05_nothing")
    assert "\n" not in str(info.value) and all(name in str(info.value) for name in NOTEBOOKS)


def test_missing_notebook_packages_say_how_to_install(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nbclient" else real(name, *a))
    with pytest.raises(EelabError, match=r"nbclient.*pip install -e '\.\[notebooks,dev\]'"):
        make_figures("01", tmp_path)


@pytest.mark.timeout(400)
def test_figures_of_a_notebook_without_a_browser(tmp_path, monkeypatch, capsys):
    checkpoint = reference_or_standin(tmp_path / "standin")
    for key, value in kernel_env(checkpoint, tmp_path).items():  # the kernel inherits this environment
        monkeypatch.setenv(key, value)
    out = tmp_path / "figures"
    assert main(["figures", "01", "--out", str(out), "--smoke", "--checkpoint", str(checkpoint), "--json"]) == 0
    files = [Path(f) for f in json.loads(capsys.readouterr().out)["files"]]
    on_disk = sorted(p.name for p in out.iterdir())
    manifest = json.loads((out / "01_manifest.json").read_text())
    assert sorted(p.name for p in files) == on_disk and len(files) == len(set(files))
    assert len(manifest["files"]) + 1 == len(on_disk) and files[-1].name == "01_manifest.json"
    assert {"01_exit_profile.pdf", "01_training.svg", "01_exits.csv", "01_frontier.pdf"} <= set(on_disk)
    assert manifest["checkpoint_sha256"] and {r["split"] for r in manifest["records"]} == {"cal", "test"}
    assert all(r["path"] and r["path"].endswith(f"{r['split']}.pt") for r in manifest["records"])
    # every figure was checked, and prints as it is
    assert set(manifest["figure_problems"]) == {name.removesuffix(".pdf") for name in on_disk if name.endswith(".pdf")}
    assert all(problems == [] for problems in manifest["figure_problems"].values()), manifest["figure_problems"]


def test_figures_refuses_a_file_as_out(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["figures", "01", "--out", str(tmp_path / "f")]) != 0
    assert "is a file" in capsys.readouterr().err
