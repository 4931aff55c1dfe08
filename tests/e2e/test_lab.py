"""End to end, as a user would: in a temporary clone of the project, JupyterLab in headless Chromium (Python
playwright driving Debian's /usr/bin/chromium) runs each of the four notebooks top to bottom in smoke mode,
moves a slider in each and compares the plotted data with eelab.metrics, clicks export and checks the files
(the count the button reports, the manifest, a PDF that renders), saves every notebook, and then checks that
the clone's commits stay free of outputs (the output-stripping git filter) and its notebook tests still pass.

Run with `make e2e` (not collected by `make test`). Nothing in the working tree is written: the clone, the
JupyterLab settings and the kernels' state live in a temporary folder; screenshots go to build/e2e/.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest
from standin import REFERENCE, ROOT, kernel_env, reference_or_standin

CHROMIUM = Path("/usr/bin/chromium")
NOTEBOOKS = ["01_train_classifiers", "02_tune_alpha", "03_train_dqn", "04_compare_policies"]
SCREENSHOTS = ROOT / "build" / "e2e"  # git-ignored
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage", "--disable-breakpad"]
STAMP = ROOT / ".venv" / ".eelab-installed"

# every plotly figure on the page: its meta name and traces (x, y as plain arrays; typed arrays included)
READ_FIGURES = """() => [...document.querySelectorAll('.js-plotly-plot')].map(gd => ({
    meta: gd.layout && gd.layout.meta,
    traces: (gd.data || []).map(t => ({name: t.name, x: Array.from(t.x || []), y: Array.from(t.y || [])}))}))"""
PROMPTS = "[...document.querySelectorAll('.jp-InputPrompt')].map(e => e.textContent)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def git(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-c", "user.name=e2e", "-c", "user.email=e2e@localhost", *args], cwd=repo,
                          capture_output=True, text=True, check=check)


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A clone of the project holding the working tree's notebooks, tests and Makefile (committed there), with
    the output-stripping filter installed by the Makefile's own target, as `make lab` installs it."""
    root = tmp_path_factory.mktemp("clone")
    repo = root / "eelab"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(repo)], check=True)
    for name in ("notebooks", "tests"):
        shutil.rmtree(repo / name)
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
    for name in ("Makefile", ".gitattributes"):
        shutil.copy(ROOT / name, repo / name)
    # the project's venv serves the clone (-o: its install stamp counts as up to date, nothing is reinstalled)
    subprocess.run(["make", "-s", "-C", str(repo), f"VENV={ROOT / '.venv'}", "-o", str(STAMP), "git-filter"],
                   check=True)
    git(repo, "add", "-A")
    if git(repo, "diff", "--cached", "--quiet", check=False).returncode:
        git(repo, "commit", "--quiet", "-m", "the working tree's notebooks and tests")
    return repo


@pytest.fixture(scope="module")
def lab(clone, tmp_path_factory):
    """A JupyterLab server on the clone's notebooks: (base url, token, checkpoint, kernel environment)."""
    if not CHROMIUM.exists():
        pytest.fail("make e2e needs Debian's Chromium at /usr/bin/chromium: apt-get install chromium")
    root = tmp_path_factory.mktemp("lab")
    checkpoint = reference_or_standin(root / "standin")
    port, token = free_port(), secrets.token_hex(16)
    env = kernel_env(checkpoint, root)
    if checkpoint == REFERENCE:  # the clone's own copy of the reference, as a user of the clone has it
        checkpoint = clone / REFERENCE.relative_to(ROOT)
        env["EELAB_CHECKPOINT"] = str(checkpoint)
    for name in ("JUPYTER_CONFIG_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR"):  # no state left in the user's home
        env[name] = str(root / name.lower())
    settings = root / "settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    (settings / "tracker.jupyterlab-settings").write_text('{"windowingMode": "none"}')  # every cell rendered
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
           f"--ServerApp.token={token}", f"--ServerApp.root_dir={clone / 'notebooks'}", "--ServerApp.port_retries=0",
           f"--LabApp.user_settings_dir={root / 'settings'}", f"--LabApp.workspaces_dir={root / 'workspaces'}"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    log = open(root / "lab.log", "w")
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5).read()
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    pytest.fail(f"JupyterLab did not start: {(root / 'lab.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield base, token, checkpoint, env
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture(scope="module")
def page(lab, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(str(tmp_path_factory.mktemp("profile")),
                                                       executable_path=str(CHROMIUM), headless=True,
                                                       args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 1000})
        page = browser.new_page()
        page.set_default_timeout(120_000)
        try:
            yield page
        finally:
            browser.close()


def constants(clone: Path, name: str, env: dict[str, str]) -> dict:
    """The notebook's own setup cell, run here with the kernel's environment: its constants (LIMIT, ...)."""
    nb = nbformat.read(clone / "notebooks" / f"{name}.ipynb", as_version=4)
    setup = next(cell for cell in nb.cells if "parameters" in cell.metadata.get("tags", []))
    saved = dict(os.environ)
    os.environ.update({k: v for k, v in env.items() if k.startswith("EELAB_")})
    try:
        namespace: dict = {}
        exec(setup.source, namespace)
        return namespace
    finally:
        os.environ.clear()
        os.environ.update(saved)


def run_all(page, base: str, token: str, name: str) -> None:
    """Open a notebook in a workspace of its own, run every cell, fail on any error or warning output."""
    page.goto(f"{base}/lab/workspaces/{name}/tree/{name}.ipynb?reset&token={token}")
    page.wait_for_selector(".jp-Notebook .jp-Cell")
    # the kernel is connected once the status bar says Idle (the toolbar's indicator reads idle before that)
    page.wait_for_function("() => /\\| Idle/.test(document.querySelector('.jp-StatusBar-Widget')?.textContent || '')",
                           timeout=180_000)
    for attempt in range(2):  # a click landing while the layout still settles is lost: try once more
        page.locator(".lm-MenuBar-item", has_text="Run").first.click()
        page.locator("[data-command='runmenu:run-all']").click()
        try:
            page.wait_for_function(f"() => {PROMPTS}.some(t => /\\[(\\*|\\d+)\\]/.test(t))", timeout=20_000)
            break
        except Exception:
            if attempt:
                raise
    # the run is over when no prompt says [*]: every cell done, or stopped at an error
    page.wait_for_function(f"() => !{PROMPTS}.some(t => t.includes('*'))", timeout=600_000)
    stderr = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']").all_inner_texts()
    errors = page.locator(".jp-OutputArea-output.jp-mod-error, .jp-RenderedText[data-mime-type*='error']").count()
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)
    outputs = page.locator(".jp-Cell-outputArea:has(.jp-OutputArea-output)")
    for i in range(outputs.count()):  # every output as a user sees it, to look at (build/e2e/NAME_outI.png)
        outputs.nth(i).screenshot(path=str(SCREENSHOTS / f"{name}_out{i:02d}.png"))
    assert not stderr and not errors, f"{name} wrote errors or warnings:\n" + "\n".join(stderr)[-3000:]
    assert page.locator("button", has_text="export").count() == 1, f"{name} has no export button"


def slider(page, label: str):
    return page.locator(".widget-slider", has=page.locator(".widget-label", has_text=re.compile(f"^{label}$"))).first


def move(page, label: str, steps: int) -> str:
    """Move a slider `steps` to the right (left when negative) with the keyboard; returns its new readout."""
    control = slider(page, label)
    control.scroll_into_view_if_needed()
    readout = control.locator(".widget-readout")
    before = readout.inner_text()
    control.locator(".noUi-handle").focus()
    for _ in range(abs(steps)):
        page.keyboard.press("ArrowRight" if steps > 0 else "ArrowLeft")
    page.wait_for_function("([el, old]) => el.textContent !== old", arg=[readout.element_handle(), before])
    return readout.inner_text()


def figures(page) -> dict[str, dict[str, dict]]:
    """The page's plotly figures: {meta: {trace name: {x, y}}}."""
    return {f["meta"]: {t["name"]: t for t in f["traces"]} for f in page.evaluate(READ_FIGURES)}


def wait_for_point(page, meta: str, trace: str, x: float) -> None:
    """Wait until the kernel's answer to a move reached the page: trace `trace` of figure `meta` at x."""
    page.wait_for_function("""([meta, name, x]) => [...document.querySelectorAll('.js-plotly-plot')]
        .some(gd => gd.layout.meta === meta
              && gd.data.some(t => t.name === name && Math.abs(Array.from(t.x)[0] - x) < 1e-9))""",
                           arg=[meta, trace, x])


def threshold_row(cal, test, value: str, max_points: int | None):
    """The threshold grid point whose slider label is `value`, computed here: (policy, eelab.metrics.evaluate)."""
    from eelab.metrics import evaluate
    from eelab.policies import show_value
    from eelab.sweep import precompute_grid

    grid = precompute_grid("threshold", cal, test, max_points=max_points, progress=False)
    i = next(i for i, v in enumerate(grid.table["threshold"]) if show_value(v) == value)
    policy = grid.policies[i]
    return policy, evaluate(test, policy.decide(test), overhead=policy.overhead_macs(test.k, test.c))


def check_point(page, trace: str, m: dict) -> None:
    """The frontier's selected point and the exit bars show what eelab.metrics computes for this policy."""
    wait_for_point(page, "eelab:frontier", f"{trace} (selected)", m["rel_macs"])
    shown = figures(page)
    point = shown["eelab:frontier"][f"{trace} (selected)"]
    assert point["x"] == pytest.approx([m["rel_macs"]], abs=1e-12)
    assert point["y"] == pytest.approx([m["accuracy"]], abs=1e-12)
    assert shown["eelab:exits"][trace]["y"] == pytest.approx(m["exit_fractions"], abs=1e-12)


def export(page, clone: Path, prefix: str) -> dict[str, dict]:
    """Click the notebook's export button; check the reported count, the files, the manifest (every figure
    ready to print, every file saying what made it), a rendered PDF. Returns each file's made_with by name."""
    button = page.locator("button", has_text="export")
    button.scroll_into_view_if_needed()
    button.click()
    message = page.locator(".widget-html", has_text=re.compile(r"wrote \d+ files")).first
    message.wait_for(timeout=180_000)
    reported = int(re.search(r"wrote (\d+) files", message.inner_text()).group(1))
    written = sorted(p for p in (clone / "figures").glob(f"{prefix}*") if p.is_file())
    assert reported == len(written), f"{prefix}: reported {reported} files, {len(written)} on disk"
    manifest = json.loads((clone / "figures" / f"{prefix}manifest.json").read_text())
    listed = {Path(str(f["path"] if isinstance(f, dict) else f)).name for f in manifest["files"]}
    assert listed == {p.name for p in written} - {f"{prefix}manifest.json"}
    assert manifest.get("eelab_version") and manifest.get("date") and manifest.get("records")
    # the notebook's real figures, as exported, print as they are (not only the synthetic ones of the tests)
    problems = manifest["figure_problems"]
    assert set(problems) == {p.stem for p in written if p.suffix == ".pdf"}
    assert all(found == [] for found in problems.values()), f"{prefix} figures not ready to print: {problems}"
    assert "check " not in message.inner_text()
    made = {f["name"]: f["made_with"] for f in manifest["files"]}
    assert all("policies" in entry and "constants" in entry for entry in made.values())
    pdf = next(p for p in written if p.suffix == ".pdf")
    if not shutil.which("pdftoppm"):
        pytest.fail("make e2e renders an exported PDF with poppler's pdftoppm: apt-get install poppler-utils")
    png = SCREENSHOTS / f"{pdf.stem}"
    subprocess.run(["pdftoppm", "-png", "-r", "60", "-singlefile", str(pdf), str(png)], check=True)
    assert png.with_suffix(".png").stat().st_size > 2000  # a picture, not an empty page
    return made


def save(page) -> None:
    """Save the open notebook with its outputs and widget state, as JupyterLab's autosave would."""
    page.locator(".jp-NotebookPanel-toolbar [data-command='docmanager:save']").first.click()
    page.wait_for_function("() => !document.querySelector('.jp-mod-dirty')")


@pytest.mark.timeout(1500)
def test_the_four_notebooks_in_the_browser(clone, lab, page):
    from eelab.metrics import evaluate
    from eelab.policies import RiskPolicy, load_policy
    from eelab.records import load_records

    import torch

    base, token, checkpoint, env = lab
    try:
        # 01: the threshold slider of the first policy panel
        c = constants(clone, NOTEBOOKS[0], env)
        run_all(page, base, token, NOTEBOOKS[0])
        cal, test = load_records(checkpoint, limit=c["LIMIT"])
        value = move(page, "threshold", 2)
        check_point(page, "threshold", threshold_row(cal, test, value, c.get("THRESHOLD_POINTS"))[1])
        export(page, clone, "01_")
        save(page)

        # 02: the threshold slider beside the alpha gates
        c = constants(clone, NOTEBOOKS[1], env)
        run_all(page, base, token, NOTEBOOKS[1])
        cal, test = load_records(checkpoint, limit=c["LIMIT"])
        value = move(page, "threshold", -2)
        check_point(page, "threshold", threshold_row(cal, test, value, c["THRESHOLD_POINTS"])[1])
        made = export(page, clone, "02_")
        for name in ("02_sensitivity.csv", "02_alpha_sensitivity.pdf", "02_summary.tex"):  # every seed's gates
            assert made[name]["constants"]["SEEDS"] == c["SEEDS"]
            assert sorted(p["parameters"]["seed"][0] for p in made[name]["policies"] if p["family"] == "alpha") == \
                sorted(c["SEEDS"])
        save(page)

        # 03: the cost-weight slider picks an agent; the saved agent, decided here, gives the plotted point
        c = constants(clone, NOTEBOOKS[2], env)
        run_all(page, base, token, NOTEBOOKS[2])
        cal, test = load_records(checkpoint, limit=c["LIMIT"])
        move(page, "cost_weight", 1)
        page.locator("button", has_text="save policy").click()
        page.locator(".widget-html", has_text="saved").first.wait_for()
        agent = load_policy(clone / "runs" / "policies" / "dqn.pt")
        check_point(page, "dqn", evaluate(test, agent.decide(test), overhead=agent.overhead_macs(test.k, test.c)))
        export(page, clone, "03_")
        save(page)

        # 04: the risk panel's epsilon slider
        c = constants(clone, NOTEBOOKS[3], env)
        run_all(page, base, token, NOTEBOOKS[3])
        cal, test = load_records(checkpoint, limit=c["LIMIT"])
        epsilon = float(move(page, "epsilon", 2))
        delta = float(slider(page, "delta").locator(".widget-readout").inner_text())
        assert epsilon in c["RISK_EPSILONS"]
        exits = RiskPolicy(epsilon=epsilon, delta=delta).fit(cal).decide(test)
        m = evaluate(test, exits)
        check_point(page, "risk", m)
        correct = test.logits.argmax(-1) == test.labels.unsqueeze(1)
        lost = float((correct[:, -1] & ~correct[torch.arange(test.n), exits]).double().mean())
        wait_for_point(page, "eelab:risk", "selected", epsilon)
        shown = figures(page)
        assert shown["eelab:risk"]["selected"]["y"] == pytest.approx([lost], abs=1e-12)
        assert "threshold" in shown["eelab:compare"]  # the compare panel drew the families
        made = export(page, clone, "04_")
        assert made["04_operating_points.csv"]["constants"]["TOLERANCE"] == c["TOLERANCE"]
        assert "accuracy" in made["04_operating_points.csv"]["matched_at"]
        assert made["04_split.pdf"]["constants"]["SPLIT_POLICY"] == c["SPLIT_POLICY"]
        assert made["04_summary.csv"]["constants"]["BUDGET"] == c["BUDGET"]
        assert made["04_ensemble.csv"]["constants"]["ENSEMBLE_SEEDS"] == c["ENSEMBLE_SEEDS"]
        save(page)

    except Exception:
        page.screenshot(path=str(SCREENSHOTS / "failure.png"), full_page=True)
        raise
    saved = [nbformat.read(clone / "notebooks" / f"{name}.ipynb", as_version=4) for name in NOTEBOOKS]
    assert all(any(cell.get("outputs") for cell in nb.cells) for nb in saved), "a notebook was saved without outputs"

    # what a commit takes from the saved notebooks: no outputs, nothing changed (the filter strips them)
    assert git(clone, "diff", "--quiet", "--", "notebooks", check=False).returncode == 0, git(clone, "diff", "--stat").stdout
    git(clone, "add", "-A", "notebooks")
    assert git(clone, "diff", "--cached", "--quiet", check=False).returncode == 0, git(clone, "diff", "--cached").stdout
    # and the clone's notebook tests pass with the saved notebooks in place (the smoke runs are make test's)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_notebooks.py",
                          "-k", "not runs_top_to_bottom"], cwd=clone, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
