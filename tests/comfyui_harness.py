"""Helpers to test the node pack inside the real ComfyUI (0.3.75) named by MVDPP_COMFYUI.

Two ways in:
* in-process: ``import_comfyui`` puts ComfyUI on ``sys.path`` (CPU mode) and ``load_pack``
  imports this repository as a package, the way ComfyUI imports a custom node folder, so
  tests can call node classes directly;
* a real server: ``ComfyServer.start`` runs ComfyUI's ``main.py`` in a temporary base
  directory (``--base-directory``) whose ``custom_nodes/`` links to this repository,
  so the ComfyUI folder itself is never written to.

Plus ``workflow_to_prompt``: the UI-format workflow -> API-format prompt conversion that the
frontend's ``app.graphToPrompt()`` does (checked against it in the browser test).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_DIR = REPO / "workflows"
EXAMPLE_INPUTS = WORKFLOW_DIR / "inputs"
PACK_FOLDER = "comfyui-mvdiffusion-plusplus"
PACK_MODULE = "mvdpp_pack"
NODE_IDS = ["MVDPP_LoadModel", "MVDPP_MaskAwareEncode", "MVDPP_MultiViewSampler", "MVDPP_ViewGrid", "MVDPP_MeshExport"]
DEFAULT_CHECKPOINT = "mvdpp_default.safetensors"
# Frontend-only nodes: graphToPrompt leaves them out of the prompt.
VIRTUAL_NODES = {"Note", "MarkdownNote"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def comfyui_path() -> Path | None:
    """The ComfyUI folder from MVDPP_COMFYUI, or None when unset or not a ComfyUI folder."""
    value = os.environ.get("MVDPP_COMFYUI")
    if not value or not (Path(value) / "main.py").is_file():
        return None
    return Path(value)


def frontend_root() -> Path | None:
    """A frontend build to serve instead of the pinned package (MVDPP_FRONTEND_ROOT: the
    ``static`` folder of another comfyui-frontend-package, e.g. one installed with
    ``pip install --no-deps --target DIR comfyui-frontend-package==X``), or None."""
    value = os.environ.get("MVDPP_FRONTEND_ROOT")
    if not value:
        return None
    if not (Path(value) / "index.html").is_file():
        raise FileNotFoundError(f"MVDPP_FRONTEND_ROOT={value} has no index.html; point it at the package's static/")
    return Path(value)


def workflow_files() -> list[Path]:
    return sorted(WORKFLOW_DIR.glob("*.json"))


# --- in-process -------------------------------------------------------------------------


def import_comfyui(path: Path) -> None:
    """Make ComfyUI's modules importable in this process, in CPU mode.

    ComfyUI goes first on sys.path so ``nodes`` means its nodes.py (as inside ComfyUI);
    bytecode writing is turned off so its folder stays untouched.
    """
    sys.dont_write_bytecode = True
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # must precede the first import of comfy.model_management


def load_pack() -> ModuleType:
    """Import this repository as a package, as ComfyUI imports a custom node folder."""
    if PACK_MODULE in sys.modules:
        return sys.modules[PACK_MODULE]
    spec = importlib.util.spec_from_file_location(
        PACK_MODULE, REPO / "__init__.py", submodule_search_locations=[str(REPO)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = module
    spec.loader.exec_module(module)
    return module


# --- a real server ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_base(base: Path, checkpoint: Path, extra_models: Path) -> Path:
    """A ComfyUI base directory: the pack linked in, the checkpoint as the default name,
    example inputs, a user dir without the tutorial dialog and with workflow schema
    validation on, and an extra_model_paths.yaml
    naming ``extra_models`` as an mvdpp folder. Returns the yaml's path."""
    for sub in ("custom_nodes", "models/mvdpp", "input", "output", "temp", "user/default"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / PACK_FOLDER).symlink_to(REPO, target_is_directory=True)
    shutil.copy(checkpoint, base / "models" / "mvdpp" / DEFAULT_CHECKPOINT)
    for image in EXAMPLE_INPUTS.glob("*.png"):
        shutil.copy(image, base / "input" / image.name)
    # Schema validation of loaded workflows is on by default up to frontend ~1.3x and off in
    # newer ones (1.58): turn it on, so the frontend tests check the files against the schema.
    settings = {"Comfy.TutorialCompleted": True, "Comfy.Validation.Workflows": True}
    (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps(settings))
    extra_models.mkdir(parents=True, exist_ok=True)
    yaml_path = base / "extra_model_paths.yaml"
    yaml_path.write_text(f"mvdpp_tests:\n    mvdpp: {extra_models}\n")
    return yaml_path


@dataclass
class ComfyServer:
    """A ComfyUI server process on 127.0.0.1 with small JSON-over-HTTP helpers."""

    base: Path
    port: int
    process: subprocess.Popen
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(
        cls, comfy_dir: Path, base: Path, extra_model_paths: Path, timeout: float = 120.0, extra_args: tuple = ()
    ) -> ComfyServer:
        """Start ``main.py``; ``extra_args`` go to it (e.g. ``("--front-end-root", folder)``)."""
        port = free_port()
        log = base / "server.log"
        command = [
            sys.executable, str(comfy_dir / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
            "--base-directory", str(base), "--user-directory", str(base / "user"),
            "--extra-model-paths-config", str(extra_model_paths),
            "--database-url", "sqlite:///:memory:", "--disable-auto-launch", "--disable-api-nodes", *extra_args,
        ]
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        with open(log, "wb") as out:
            process = subprocess.Popen(command, cwd=base, stdout=out, stderr=subprocess.STDOUT, env=env)
        server = cls(base, port, process, log)
        server.wait_ready(timeout)
        return server

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                status, info = self.request("GET", f"/object_info/{NODE_IDS[0]}")
                if status == 200 and NODE_IDS[0] in info:
                    return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"ComfyUI did not serve our nodes within {timeout} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                raw = resp.read()
                status = resp.status
        except urllib.error.HTTPError as err:
            raw, status = err.read(), err.code
        try:
            return status, json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return status, raw.decode(errors="replace")

    def object_info(self) -> dict[str, Any]:
        return self.request("GET", "/object_info")[1]

    def queue(self, prompt: dict[str, Any], client_id: str | None = None) -> tuple[int, Any]:
        """POST /prompt; returns (HTTP status, reply): 200 with prompt_id, or 400 with node_errors."""
        body: dict[str, Any] = {"prompt": prompt}
        if client_id:
            body["client_id"] = client_id
        return self.request("POST", "/prompt", body)

    def wait(self, prompt_id: str, timeout: float = 300.0) -> dict[str, Any]:
        """The history entry of a finished prompt (success or error)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _, history = self.request("GET", f"/history/{prompt_id}")
            entry = (history or {}).get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and entry["status"].get("status_str"):
                return entry
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout} s:\n{self.log_tail()}")

    def run(self, prompt: dict[str, Any], timeout: float = 300.0) -> dict[str, Any]:
        """Queue a prompt that must pass validation and wait for its history entry."""
        status, reply = self.queue(prompt)
        if status != 200:
            raise AssertionError(f"prompt rejected ({status}): {json.dumps(reply, indent=1)[:3000]}")
        return self.wait(reply["prompt_id"], timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def execution_error(entry: dict[str, Any]) -> dict[str, Any] | None:
    """The ``execution_error`` message of a history entry, if the prompt failed."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return data
    return None


def node_error_text(reply: dict[str, Any]) -> str:
    """All error messages and details of a 400 reply's node_errors, as one string."""
    parts = []
    for node in (reply.get("node_errors") or {}).values():
        for err in node.get("errors", []):
            parts.append(f"{err.get('message', '')}: {err.get('details', '')}")
    return "\n".join(parts)


# --- UI format -> API format ------------------------------------------------------------


def _is_widget(spec: list[Any]) -> bool:
    kind = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if options.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _extra_widget_values(name: str, spec: list[Any]) -> int:
    """Frontend widgets that follow an input's widget in widgets_values without being inputs:
    the seed's 'control after generate' combo and the image upload button."""
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    extra = 0
    if options.get("control_after_generate") or (spec[0] == "INT" and name in ("seed", "noise_seed")):
        extra += 1
    if options.get("image_upload"):
        extra += 1
    return extra


def node_inputs(node: dict[str, Any], info: dict[str, Any], links: dict[int, list[Any]]) -> dict[str, Any]:
    """One UI node's API inputs: widget values by position, links as ``[from_id, slot]``."""
    specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
    order = info.get("input_order", {})
    names = list(order.get("required", [])) + list(order.get("optional", []))
    values = list(node.get("widgets_values") or [])
    linked = {i["name"]: i["link"] for i in node.get("inputs", []) if i.get("link") is not None}
    inputs: dict[str, Any] = {}
    position = 0
    for name in names:
        spec = specs[name]
        if _is_widget(spec) and position < len(values):
            inputs[name] = values[position]
            position += 1 + _extra_widget_values(name, spec)
        if name in linked:
            link = links[linked[name]]
            inputs[name] = [str(link[1]), link[2]]
    return inputs


def workflow_to_prompt(workflow: dict[str, Any], object_info: dict[str, Any]) -> dict[str, Any]:
    """Convert a UI-format workflow to the API prompt ``{id: {class_type, inputs}}``.

    Raises KeyError for node types the server does not know (a missing node pack)."""
    links = {link[0]: link for link in workflow["links"]}
    prompt: dict[str, Any] = {}
    for node in workflow["nodes"]:
        if node["type"] in VIRTUAL_NODES or node.get("mode", 0) == 2:  # notes, muted nodes
            continue
        if node.get("mode", 0) == 4:
            raise NotImplementedError(f"node {node['id']} is bypassed; this converter does not rewire bypasses")
        if node["type"] not in object_info:
            raise KeyError(f"node type {node['type']!r} (node {node['id']}) is not registered on the server")
        info = object_info[node["type"]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": node_inputs(node, info, links)}
    return prompt


def nodes_of_type(prompt: dict[str, Any], class_type: str) -> list[str]:
    return [node_id for node_id, node in prompt.items() if node["class_type"] == class_type]
