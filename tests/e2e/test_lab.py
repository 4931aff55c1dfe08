"""End to end, as a user would: JupyterLab in headless Chromium (Python playwright driving Debian's
/usr/bin/chromium) opens 04_compare_policies, runs every cell, moves the risk panel's epsilon slider, reads
the plotted data back from the page and compares it with eelab.metrics, and saves a screenshot.

Run with `make e2e` (not collected by `make test`). JupyterLab serves a copy of notebooks/ from a temporary
folder, on a free localhost port with a token, so nothing in the tree is written.
"""
from __future__ import annotations

import os
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
import torch
from standin import ROOT, kernel_env, reference_or_standin

CHROMIUM = Path("/usr/bin/chromium")
NOTEBOOK = "04_compare_policies.ipynb"
SCREENSHOTS = ROOT / "build" / "e2e"  # git-ignored
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage", "--disable-breakpad"]

# every plotly figure on the page: its meta name and traces (x, y as plain arrays; typed arrays included)
READ_FIGURES = """() => [...document.querySelectorAll('.js-plotly-plot')].map(gd => ({
    meta: gd.layout && gd.layout.meta,
    traces: (gd.data || []).map(t => ({name: t.name, x: Array.from(t.x || []), y: Array.from(t.y || [])}))}))"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on a copy of the notebooks: (base url, token, checkpoint, kernel environment)."""
    if not CHROMIUM.exists():
        pytest.fail("make e2e needs Debian's Chromium at /usr/bin/chromium: apt-get install chromium")
    root = tmp_path_factory.mktemp("lab")
    checkpoint = reference_or_standin(root / "standin")
    served = root / "notebooks"
    served.mkdir()
    shutil.copy(ROOT / "notebooks" / NOTEBOOK, served / NOTEBOOK)
    port, token = free_port(), secrets.token_hex(16)
    env = kernel_env(checkpoint, root)
    for name in ("JUPYTER_CONFIG_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR"):  # no state left in the user's home
        env[name] = str(root / name.lower())
    settings = root / "settings" / "@jupyterlab"
    for extension, name, text in (
            ("apputils-extension", "notification", '{"fetchNews": "false", "checkForUpdates": false}'),  # no network
            ("notebook-extension", "tracker", '{"windowingMode": "none"}')):  # every cell rendered, even off-screen
        (settings / extension).mkdir(parents=True, exist_ok=True)
        (settings / extension / f"{name}.jupyterlab-settings").write_text(text)
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
           f"--ServerApp.token={token}", f"--ServerApp.root_dir={served}", "--ServerApp.port_retries=0",
           f"--LabApp.user_settings_dir={root / 'settings'}", f"--LabApp.workspaces_dir={root / 'workspaces'}",
           "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
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


def notebook_constants(env: dict[str, str]) -> dict:
    """The notebook's own setup cell, run here with the kernel's environment: its constants (LIMIT, ...)."""
    nb = nbformat.read(ROOT / "notebooks" / NOTEBOOK, as_version=4)
    setup = next(cell for cell in nb.cells if "parameters" in cell.metadata.get("tags", []))
    saved = dict(os.environ)
    os.environ.update({k: env[k] for k in ("EELAB_CHECKPOINT", "EELAB_SMOKE")})
    try:
        namespace: dict = {}
        exec(setup.source, namespace)
        return namespace
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.mark.timeout(900)
def test_compare_notebook_runs_in_the_browser_and_plots_what_metrics_compute(lab, tmp_path):
    from playwright.sync_api import sync_playwright

    from eelab.metrics import evaluate
    from eelab.policies import RiskPolicy
    from eelab.records import load_records

    base, token, checkpoint, env = lab
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=str(CHROMIUM),
                                                       headless=True, args=CHROMIUM_ARGS,
                                                       viewport={"width": 1400, "height": 1000})
        page = browser.new_page()
        page.set_default_timeout(120_000)
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        try:
            epsilon, delta, before, figures = drive(page, base, token)
        except Exception:
            page.screenshot(path=str(SCREENSHOTS / "failure.png"))
            raise
        finally:
            browser.close()

    # the same numbers, computed here from the records with eelab.metrics
    constants = notebook_constants(env)
    cal, test = load_records(checkpoint, limit=constants["LIMIT"])
    assert epsilon in constants["RISK_EPSILONS"] and epsilon != before
    exits = RiskPolicy(epsilon=epsilon, delta=delta).fit(cal).decide(test)
    m = evaluate(test, exits)
    point = figures["eelab:frontier"]["risk (selected)"]
    assert point["x"] == pytest.approx([m["rel_macs"]], abs=1e-12)
    assert point["y"] == pytest.approx([m["accuracy"]], abs=1e-12)
    assert figures["eelab:exits"]["risk"]["y"] == pytest.approx(m["exit_fractions"], abs=1e-12)
    correct = test.logits.argmax(-1) == test.labels.unsqueeze(1)
    lost = float((correct[:, -1] & ~correct[torch.arange(test.n), exits]).double().mean())
    assert figures["eelab:risk"]["selected"]["y"] == pytest.approx([lost], abs=1e-12)
    assert "threshold" in figures["eelab:compare"]  # the compare panel drew the families


def drive(page, base: str, token: str) -> tuple[float, float, float, dict]:
    """Open the notebook, run every cell, move the epsilon slider two steps right, take screenshots:
    (epsilon, delta, epsilon before the move, the page's figures {meta: {trace name: trace}})."""
    page.goto(f"{base}/lab/tree/{NOTEBOOK}?token={token}")
    page.wait_for_selector(".jp-Notebook .jp-Cell")
    # the kernel is connected once the status bar says Idle (the toolbar's indicator reads idle before that)
    page.wait_for_function("() => /\\| Idle/.test(document.querySelector('.jp-StatusBar-Widget')?.textContent || '')",
                           timeout=180_000)
    prompts = "[...document.querySelectorAll('.jp-InputPrompt')].map(e => e.textContent)"
    for attempt in range(2):  # a click landing while the layout still settles is lost: try once more
        page.locator(".lm-MenuBar-item", has_text="Run").first.click()
        page.locator("[data-command='runmenu:run-all']").click()
        try:
            page.wait_for_function(f"() => {prompts}.some(t => /\\[(\\*|\\d+)\\]/.test(t))", timeout=20_000)
            break
        except Exception:
            if attempt:
                raise
    # the run is over when no prompt says [*]: every cell done, or stopped at an error
    page.wait_for_function(f"() => !{prompts}.some(t => t.includes('*'))", timeout=600_000)
    if page.locator("button:has-text('export to figures/')").count() == 0:
        stderr = page.locator("[data-mime-type='application/vnd.jupyter.stderr']").all_inner_texts()
        pytest.fail("the notebook stopped before its last cell:\n" + "\n".join(stderr)[-3000:])
    page.wait_for_function("() => [...document.querySelectorAll('.js-plotly-plot')]"
                           ".some(gd => gd.layout && gd.layout.meta === 'eelab:risk')")
    page.screenshot(path=str(SCREENSHOTS / "04_compare_policies.png"))

    slider = page.locator(".widget-slider", has=page.locator(".widget-label", has_text="epsilon"))
    slider.scroll_into_view_if_needed()
    readout = slider.locator(".widget-readout")
    before = float(readout.inner_text())
    slider.locator(".noUi-handle").focus()
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    page.wait_for_function("([el, old]) => parseFloat(el.textContent) !== old", arg=[readout.element_handle(), before])
    epsilon = float(readout.inner_text())
    delta = float(page.locator(".widget-slider", has=page.locator(".widget-label", has_text="delta"))
                  .locator(".widget-readout").inner_text())
    # the kernel answers the move by rewriting the traces: wait until the page shows the new point
    page.wait_for_function("""(eps) => [...document.querySelectorAll('.js-plotly-plot')]
        .some(gd => gd.layout.meta === 'eelab:risk'
              && gd.data.some(t => t.name === 'selected' && Math.abs(Array.from(t.x)[0] - eps) < 1e-9))""",
                           arg=epsilon)
    figures = {f["meta"]: {t["name"]: t for t in f["traces"]} for f in page.evaluate(READ_FIGURES)}
    panel = page.locator(".widget-vbox", has=slider).last
    panel.scroll_into_view_if_needed()
    panel.screenshot(path=str(SCREENSHOTS / "04_risk_panel.png"))
    return epsilon, delta, before, figures
