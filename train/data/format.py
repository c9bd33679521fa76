"""The rendered-object folder format, defined once: file names, ``cameras.json``, writer, reader.

Every renderer (Blender, or a PyTorch renderer of procedural objects) writes exactly this,
and the dataset reads exactly this. One object per folder::

    <uid>/
      target_00.png ... target_31.png   RGBA, rig view i = e * 8 + a (DESIGN section 3)
      cond_00.png ... cond_{N-1}.png    RGBA, training condition views; cond_00 is at azimuth 0
      cameras.json                      written LAST: its presence marks a complete folder

``cameras.json`` (format ``mvdpp-views``, version 1)::

    {"format": "mvdpp-views", "version": 1, "convention": "opencv_c2w_z_up",
     "image_size": [W, H], "K": 3x3 pixel intrinsics (shared by all views),
     "normalization": {"center": [x, y, z], "scale": s},   # world = (source - center) * scale
     "renderer": "...", "source": "...",
     "targets": [{"file", "index", "azimuth_deg", "elevation_deg", "distance", "c2w"}, ...32],
     "conditions": [{"file", "index", "azimuth_deg", "elevation_deg", "distance", "c2w"}, ...N]}

``c2w`` is a 4x4 OpenCV camera-to-world matrix (x right, y down, z forward); Blender /
OpenGL cameras are ``c2w @ diag(1, -1, -1, 1)`` (``mvdpp_core.cameras.OPENCV_TO_OPENGL``).

This module imports only the standard library and numpy at import time, so that Blender's
bundled Python can use it; Pillow is imported where PNGs are encoded or decoded.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_NAME = "mvdpp-views"
FORMAT_VERSION = 1
CONVENTION = "opencv_c2w_z_up"
CAMERAS_FILE = "cameras.json"
NUM_TARGETS = 32
_VIEW_KEYS = ("file", "index", "azimuth_deg", "elevation_deg", "distance", "c2w")


class ObjectReadError(ValueError):
    """A rendered object folder (or shard sample) is incomplete or holds an unreadable file."""


def target_file(index: int) -> str:
    """File name of rig view ``index`` (0..31)."""
    return f"target_{index:02d}.png"


def cond_file(index: int) -> str:
    """File name of training condition view ``index`` (0 = the azimuth-0 view)."""
    return f"cond_{index:02d}.png"


def view_record(
    file: str,
    index: int,
    azimuth_deg: float,
    elevation_deg: float,
    distance: float,
    c2w: Sequence[Sequence[float]] | np.ndarray,
) -> dict[str, Any]:
    """One entry of ``targets`` / ``conditions`` in cameras.json."""
    c2w = np.asarray(c2w, dtype=np.float64)
    if c2w.shape != (4, 4):
        raise ValueError(f"c2w of {file} has shape {c2w.shape}; expected a 4x4 camera-to-world matrix.")
    return {
        "file": file,
        "index": int(index),
        "azimuth_deg": float(azimuth_deg),
        "elevation_deg": float(elevation_deg),
        "distance": float(distance),
        "c2w": c2w.tolist(),
    }


def cameras_document(
    *,
    image_size: int,
    K: np.ndarray | Sequence[Sequence[float]],
    targets: list[dict],
    conditions: list[dict],
    center: Sequence[float] = (0.0, 0.0, 0.0),
    scale: float = 1.0,
    renderer: str = "",
    source: str = "",
) -> dict[str, Any]:
    """Assemble (and validate) a cameras.json document."""
    doc = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "convention": CONVENTION,
        "image_size": [int(image_size), int(image_size)],
        "K": np.asarray(K, dtype=np.float64).tolist(),
        "normalization": {"center": [float(c) for c in center], "scale": float(scale)},
        "renderer": renderer,
        "source": source,
        "targets": targets,
        "conditions": conditions,
    }
    validate_cameras(doc)
    return doc


def validate_cameras(doc: Any, where: str = CAMERAS_FILE) -> dict[str, Any]:
    """Check a cameras.json document against the schema; raise ObjectReadError naming the problem."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise ObjectReadError(
            f"{where}: not an {FORMAT_NAME} document (format={doc.get('format') if isinstance(doc, dict) else doc!r})."
        )
    if int(doc.get("version", 0)) > FORMAT_VERSION:
        raise ObjectReadError(f"{where}: version {doc['version']} is newer than this reader ({FORMAT_VERSION}).")
    missing = [k for k in ("image_size", "K", "normalization", "targets", "conditions") if k not in doc]
    if missing:
        raise ObjectReadError(f"{where}: missing key(s) {missing}.")
    if len(doc["targets"]) != NUM_TARGETS:
        raise ObjectReadError(f"{where}: {len(doc['targets'])} target views; the rig has {NUM_TARGETS}.")
    if not doc["conditions"]:
        raise ObjectReadError(f"{where}: no condition views; render at least one (cond_00 at azimuth 0).")
    for view in doc["targets"] + doc["conditions"]:
        absent = [k for k in _VIEW_KEYS if k not in view]
        if absent:
            raise ObjectReadError(f"{where}: view {view.get('file', '?')} lacks {absent}.")
        if Path(view["file"]).name != view["file"]:
            raise ObjectReadError(f"{where}: view file {view['file']!r} must be a bare file name inside the folder.")
    return doc


def write_cameras(folder: str | Path, doc: dict[str, Any]) -> Path:
    """Write cameras.json atomically (temp file + rename): it marks the folder complete."""
    validate_cameras(doc)
    folder = Path(folder)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".cameras.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, folder / CAMERAS_FILE)
    return folder / CAMERAS_FILE


def is_complete(folder: str | Path) -> bool:
    """True when the folder has a cameras.json and every file it names."""
    folder = Path(folder)
    try:
        doc = validate_cameras(json.loads((folder / CAMERAS_FILE).read_text()))
    except (OSError, ValueError):
        return False
    return all((folder / v["file"]).is_file() for v in doc["targets"] + doc["conditions"])


def encode_png(rgba: np.ndarray) -> bytes:
    """PNG bytes of one (H, W, 4) uint8 RGBA image."""
    from PIL import Image

    if rgba.dtype != np.uint8 or rgba.ndim != 3 or rgba.shape[-1] != 4:
        raise ValueError(f"expected an (H, W, 4) uint8 RGBA image, got {rgba.shape} {rgba.dtype}.")
    buf = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes, name: str = "image") -> np.ndarray:
    """(H, W, 4) uint8 RGBA from PNG bytes; ObjectReadError if they do not decode."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGBA"))
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise ObjectReadError(f"{name} is not a readable PNG ({type(err).__name__}: {err}).") from None


def write_object_folder(
    path: str | Path, target_rgba: np.ndarray, cond_rgba: np.ndarray, cameras: dict[str, Any]
) -> Path:
    """Write one object: targets (32, H, W, 4) and conditions (N, H, W, 4) uint8 RGBA, plus cameras.

    ``cameras`` is a document from ``cameras_document``; its file names must be
    ``target_file(i)`` / ``cond_file(j)``. cameras.json is written last.
    """
    path = Path(path)
    validate_cameras(cameras)
    if target_rgba.shape[0] != NUM_TARGETS:
        raise ValueError(f"target_rgba has {target_rgba.shape[0]} views; the rig has {NUM_TARGETS}.")
    if cond_rgba.shape[0] != len(cameras["conditions"]):
        raise ValueError(f"cond_rgba has {cond_rgba.shape[0]} views but cameras lists {len(cameras['conditions'])}.")
    path.mkdir(parents=True, exist_ok=True)
    for images, views in ((target_rgba, cameras["targets"]), (cond_rgba, cameras["conditions"])):
        for image, view in zip(images, views, strict=True):
            (path / view["file"]).write_bytes(encode_png(np.ascontiguousarray(image)))
    write_cameras(path, cameras)
    return path


@dataclass
class ObjectViews:
    """Some views of one rendered object.

    target_rgba: (t, H, W, 4) uint8; target_ids: rig indices (t,);
    cond_rgba: (k, H, W, 4) uint8; cond_ids: indices into the rendered condition views (k,).
    """

    uid: str
    target_rgba: np.ndarray
    target_ids: list[int]
    cond_rgba: np.ndarray
    cond_ids: list[int]
    cameras: dict[str, Any]


Selector = Callable[[dict[str, Any]], tuple[Sequence[int], Sequence[int]]]


def read_views(
    uid: str,
    get_bytes: Callable[[str], bytes],
    target_ids: Sequence[int] | None = None,
    cond_ids: Sequence[int] | None = None,
    select: Selector | None = None,
) -> ObjectViews:
    """Read selected views through ``get_bytes(file_name)`` (a folder or a shard sample).

    ``None`` selects all views; ``select(cameras_doc) -> (target_ids, cond_ids)`` chooses
    them once the number of rendered condition views is known. Raises ObjectReadError for
    a missing or corrupt file.
    """
    doc = _load_cameras(get_bytes, uid)
    if select is not None:
        target_ids, cond_ids = select(doc)
    target_ids = list(range(NUM_TARGETS)) if target_ids is None else [int(i) for i in target_ids]
    cond_ids = list(range(len(doc["conditions"]))) if cond_ids is None else [int(i) for i in cond_ids]
    bad = [i for i in cond_ids if not 0 <= i < len(doc["conditions"])]
    if bad or any(not 0 <= i < NUM_TARGETS for i in target_ids):
        raise ValueError(
            f"{uid}: views targets={target_ids} conditions={cond_ids} requested; it has {NUM_TARGETS} targets "
            f"and {len(doc['conditions'])} condition views."
        )

    def load(view: dict) -> np.ndarray:
        return decode_png(_get(get_bytes, view["file"], uid), f"{uid}/{view['file']}")

    targets = [load(doc["targets"][i]) for i in target_ids]
    conds = [load(doc["conditions"][j]) for j in cond_ids]
    shapes = {im.shape for im in targets + conds}
    if len(shapes) > 1:
        raise ObjectReadError(f"{uid}: views have different sizes {sorted(shapes)}.")
    return ObjectViews(uid, _stack(targets), target_ids, _stack(conds), cond_ids, doc)


def _load_cameras(get_bytes: Callable[[str], bytes], uid: str) -> dict[str, Any]:
    try:
        doc = json.loads(_get(get_bytes, CAMERAS_FILE, uid))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ObjectReadError(f"{uid}/{CAMERAS_FILE} is not valid JSON ({err}).") from None
    return validate_cameras(doc, f"{uid}/{CAMERAS_FILE}")


def _stack(images: list[np.ndarray]) -> np.ndarray:
    return np.stack(images) if images else np.zeros((0, 0, 0, 4), np.uint8)


def _get(get_bytes: Callable[[str], bytes], name: str, uid: str) -> bytes:
    try:
        return get_bytes(name)
    except (OSError, KeyError):
        raise ObjectReadError(f"{uid}/{name} is missing.") from None


def read_object_folder(
    path: str | Path,
    target_ids: Sequence[int] | None = None,
    cond_ids: Sequence[int] | None = None,
    select: Selector | None = None,
) -> ObjectViews:
    """Read an object folder (all views by default); ObjectReadError if incomplete or corrupt."""
    folder = Path(path)

    def get_bytes(name: str) -> bytes:
        if Path(name).name != name:
            raise KeyError(name)  # never read outside the folder
        return (folder / name).read_bytes()

    return read_views(folder.name, get_bytes, target_ids, cond_ids, select)


def folder_files(path: str | Path) -> dict[str, bytes]:
    """All files of a complete object folder by name (for packing into a shard)."""
    folder = Path(path)
    doc = validate_cameras(json.loads((folder / CAMERAS_FILE).read_text()), f"{folder}/{CAMERAS_FILE}")
    names = [CAMERAS_FILE] + [v["file"] for v in doc["targets"] + doc["conditions"]]
    return {name: (folder / name).read_bytes() for name in names}
