"""The real ComfyUI frontend (1.32.9) in headless Chromium loads every shipped workflow with
no missing node type and no schema alert, converts it to the same prompt as our test
converter, and its Run executes it to success. Screenshots go to test-artifacts/.

Another frontend build: set MVDPP_FRONTEND_ROOT to its ``static`` folder, e.g.
``pip install --no-deps --target /tmp/fe comfyui-frontend-package==1.58.1`` then
``MVDPP_FRONTEND_ROOT=/tmp/fe/comfyui_frontend_package/static bash scripts/test.sh tests/test_comfyui_frontend.py``
(the server runs with ``--front-end-root``; screenshots get the version in their name).

Chromium is Debian's (/usr/bin/chromium, ``apt-get install -y chromium``); playwright is
only the driver (never ``playwright install``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from comfyui_harness import REPO, ComfyServer, frontend_root, prepare_base, workflow_files, workflow_to_prompt

pytestmark = [pytest.mark.comfyui, pytest.mark.browser, pytest.mark.slow]
CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
ARTIFACTS = REPO / "test-artifacts"
SCHEMA_ALERT = "Invalid workflow against zod schema"


@pytest.fixture(scope="module")
def server(comfyui_dir: Path, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("comfy_frontend")
    root = frontend_root()
    extra_args = ("--front-end-root", str(root)) if root else ()
    comfy = ComfyServer.start(comfyui_dir, base, prepare_base(base, tiny_checkpoint, base / "extra"),
                              extra_args=extra_args)
    yield comfy
    comfy.stop()


WATCH_RUNS = """() => {
    const api = window.comfyAPI.api.api;
    window.__runs = [];
    const kinds = [['execution_success', true], ['execution_error', false], ['execution_interrupted', false]];
    for (const [kind, ok] of kinds) {
        api.addEventListener(kind, e => window.__runs.push({ok, kind, detail: e.detail}));
    }
}"""


@pytest.fixture(scope="module")
def page(server: ComfyServer):
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is missing: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": 2560, "height": 1400})
        page.on("dialog", lambda dialog: dialog.dismiss())
        page.goto(server.url)
        page.wait_for_function("() => window.app && window.app.graph && window.comfyAPI?.api?.api", timeout=120_000)
        page.evaluate(WATCH_RUNS)
        page.frontend_version = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ || 'unknown'")
        print(f"frontend {page.frontend_version}")
        yield page
        browser.close()


def load(page, workflow: dict[str, Any]) -> dict[str, Any]:
    """Load a UI workflow as drag-and-drop does; count new schema alerts, list unregistered types."""
    before = page.inner_text("body").count(SCHEMA_ALERT)
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", workflow)
    page.wait_for_timeout(500)
    state = page.evaluate(
        """() => ({
            unregistered: window.app.graph._nodes
                .filter(n => !(n.type in window.LiteGraph.registered_node_types))
                .map(n => n.type),
            types: window.app.graph._nodes.map(n => n.type).sort(),
        })"""
    )
    state["new_alerts"] = page.inner_text("body").count(SCHEMA_ALERT) - before
    return state


def test_schema_alert_is_detected(page):
    """Negative control for the check below: a node without 'flags' and 'order' is refused."""
    broken = copy.deepcopy(json.loads(workflow_files()[0].read_text()))
    for key in ("flags", "order"):
        del broken["nodes"][0][key]
    assert load(page, broken)["new_alerts"] >= 1


def test_unregistered_node_type_is_detected(page):
    """Negative control: a node type no pack provides is reported as unregistered."""
    workflow = json.loads(workflow_files()[0].read_text())
    workflow["nodes"][0]["type"] = "NoSuchNode"
    assert load(page, workflow)["unregistered"] == ["NoSuchNode"]
    page.keyboard.press("Escape")  # the "missing nodes" dialog


def known_inputs(prompt: dict[str, Any], object_info: dict[str, Any]) -> dict[str, Any]:
    """The prompt restricted to inputs the server declares (the frontend adds UI-only widgets)."""
    out = {}
    for node_id, node in prompt.items():
        spec = object_info[node["class_type"]]["input"]
        names = set(spec.get("required", {})) | set(spec.get("optional", {}))
        out[node_id] = {"class_type": node["class_type"],
                        "inputs": {k: v for k, v in node["inputs"].items() if k in names}}
    return out


FAST_WIDGETS = {"MVDPP_MultiViewSampler": {"steps": 1, "cfg": 1.0}, "MVDPP_MeshExport": {"resolution": 48}}


@pytest.mark.parametrize("path", workflow_files(), ids=lambda p: p.stem)
def test_workflow_loads_converts_and_runs_in_the_browser(page, server, path):
    object_info = server.object_info()
    workflow = json.loads(path.read_text())
    state = load(page, workflow)
    assert state["new_alerts"] == 0
    assert state["unregistered"] == []
    assert state["types"] == sorted(n["type"] for n in workflow["nodes"])
    # our converter (used by the engine tests) gives what the browser's graphToPrompt gives
    browser_prompt = page.evaluate("async () => (await window.app.graphToPrompt()).output")
    assert known_inputs(browser_prompt, object_info) == known_inputs(workflow_to_prompt(workflow, object_info),
                                                                     object_info)
    # the file round-trips: the frontend serialises our nodes' widgets exactly as the file has them
    serialised = page.evaluate("() => window.app.graph.serialize()")
    ours = {n["id"]: n["widgets_values"] for n in serialised["nodes"] if n["type"].startswith("MVDPP_")}
    assert ours == {n["id"]: n["widgets_values"] for n in workflow["nodes"] if n["type"].startswith("MVDPP_")}
    # Run, with sampling cut to 1 step for the CPU
    page.evaluate(
        """(fast) => {
            for (const node of window.app.graph._nodes) {
                for (const [name, value] of Object.entries(fast[node.type] || {})) {
                    node.widgets.find(w => w.name === name).value = value;
                }
            }
            window.__runs = [];
        }""",
        FAST_WIDGETS,
    )
    page.evaluate("async () => { await window.app.queuePrompt(0); }")
    page.wait_for_function("() => window.__runs.length > 0", timeout=300_000, polling=500)
    run = page.evaluate("() => window.__runs[0]")
    assert run["ok"], json.dumps(run["detail"])[:3000]
    page.wait_for_timeout(1500)  # let the previews draw
    ARTIFACTS.mkdir(exist_ok=True)
    # close toasts (1.32: PrimeVue's close button; 1.58: its own toast's close button)
    page.evaluate("""() => document.querySelectorAll('.p-toast-close-button, [data-testid="toast-close"]')
        .forEach(b => b.click())""")
    page.evaluate("() => window.app.extensionManager?.command?.execute('Comfy.Canvas.FitView')")
    page.wait_for_timeout(500)
    suffix = f"_{page.frontend_version}" if frontend_root() else ""
    page.screenshot(path=str(ARTIFACTS / f"frontend_{path.stem}{suffix}.png"))
    # the run's files are there: a GLB under the output folder
    assert list((server.base / "output" / "mvdpp").glob("mesh_*.glb"))
