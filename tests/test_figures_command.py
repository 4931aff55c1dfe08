"""make_figures (`eelab figures NOTEBOOK --out DIR [--size column|page]`): a notebook run headless with its
export on writes its figures (at the size asked), tables and manifest, the count it returns is what is on disk
and in the manifest, every file says what made it, and the figures pass figcheck.figure_problems; notebook names
resolve, unknown ones and an --out that cannot be a folder fail in one line before the notebook runs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from standin import kernel_env, reference_or_standin

from eelab import plots
from eelab.cli import main
from eelab.errors import EelabError, EelabWarning
from eelab.figures import FIGURE_SIZES, NOTEBOOKS, find_notebook, make_figures


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
    assert main(["figures", "01", "--out", str(out), "--smoke", "--checkpoint", str(checkpoint), "--size", "column",
                 "--json"]) == 0
    files = [Path(f) for f in json.loads(capsys.readouterr().out)["files"]]
    on_disk = sorted(p.name for p in out.iterdir())
    manifest = json.loads((out / "01_manifest.json").read_text())
    assert sorted(p.name for p in files) == on_disk and len(files) == len(set(files))
    assert len(manifest["files"]) + 1 == len(on_disk) and files[-1].name == "01_manifest.json"
    assert {"01_exit_profile.pdf", "01_training.svg", "01_exits.csv", "01_frontier.pdf"} <= set(on_disk)
    assert manifest["checkpoint_sha256"] and {r["split"] for r in manifest["records"]} == {"cal", "test"}
    assert all(r["path"] and r["path"].endswith(f"{r['split']}.pt") for r in manifest["records"])
    # every figure was checked, and prints as it is, at one column's width
    assert set(manifest["figure_problems"]) == {name.removesuffix(".pdf") for name in on_disk if name.endswith(".pdf")}
    assert all(problems == [] for problems in manifest["figure_problems"].values()), manifest["figure_problems"]
    assert manifest["size"] == "column"
    assert {f["size_inches"][0] for f in manifest["files"] if f["name"].endswith(".pdf")} == {plots.SIZES["column"]}
    # every file says what made it: the examples, the policy and EXAMPLE_POLICY; the panel's, its threshold grid
    made = {f["name"]: f["made_with"] for f in manifest["files"]}
    assert set(made["01_examples.pdf"]["constants"]) >= {"EXAMPLE_POLICY", "N_EXAMPLES"}
    assert [p["family"] for p in made["01_examples.pdf"]["policies"]] == ["threshold"]
    assert [p["grid"] for p in made["01_frontier.pdf"]["policies"]] == ["threshold"]


def test_figures_refuses_a_file_as_out(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["figures", "01", "--out", str(tmp_path / "f")]) != 0
    assert "is a file" in capsys.readouterr().err


@pytest.mark.parametrize("out,says", [("f/sub", "f is a file, not a folder"), ("/proc/eelab-figures", "not writable")])
def test_figures_refuses_an_out_it_cannot_make_before_running_anything(out, says, tmp_path, capsys, monkeypatch):
    import nbclient

    (tmp_path / "f").write_text("x")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(nbclient.NotebookClient, "execute", lambda *a, **k: pytest.fail("the notebook ran"))
    assert main(["figures", "01", "--out", out]) == 1  # an EelabError, not an internal error (3)
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1, err
    with pytest.raises(EelabError, match=says):
        make_figures("01", out)


def test_figure_sizes_are_plots_sizes(tmp_path):
    assert FIGURE_SIZES == ("default", *plots.SIZES)
    with pytest.raises(EelabError, match="column, page"):
        make_figures("01", tmp_path, size="poster")


def test_figures_says_which_figures_are_not_ready_to_print(tmp_path, monkeypatch):
    """What the export found wrong with a figure (written all the same) is warned, not only kept in the manifest."""
    import nbclient

    seen = {}

    def execute(client, env):  # the notebook's export, as its manifest reports it
        seen.update(env)
        out = Path(env["EELAB_FIGURES"])
        (out / "01_x.pdf").write_bytes(b"%PDF-1.4")
        (out / "01_manifest.json").write_text(json.dumps({"files": [{"name": "01_x.pdf"}], "figure_problems": {
            "01_x": ["text 'exit 3' leaves the canvas", "two series alike"], "01_y": []}}))

    monkeypatch.setattr(nbclient.NotebookClient, "execute", execute)
    with pytest.warns(EelabWarning, match=r"01_x is not ready to print: text 'exit 3' leaves the canvas \(and 1 more"):
        files = make_figures("01", tmp_path / "out", size="page")
    assert [f.name for f in files] == ["01_x.pdf", "01_manifest.json"] and seen["EELAB_FIGURE_SIZE"] == "page"
