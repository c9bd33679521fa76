"""Rebuild the example workflows and their example input images.

    PYTHONPATH=. python workflows/build.py

Writes ``workflows/mvdpp_*.json`` (ComfyUI UI format: drag into the browser) and
``workflows/inputs/mvdpp_example_*.png`` (128 px RGBA renders of held-out procedural object 4,
the demo's input, which the embedded default never saw in training, on condition-view cameras). The JSON is written from the
small graph descriptions below so node ids, links and slot numbers stay consistent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import trimesh
from PIL import Image

from mvdpp_core import cameras
from mvdpp_core.sampling_defaults import EMBEDDED_SAMPLING
from train.procedural.objects import Split, procedural_object
from train.procedural.render import render_views

HERE = Path(__file__).resolve().parent
INPUT_SIZE = 128
CHECKPOINT = "mvdpp_default.safetensors"
# The sampler node's widgets (steps, sampler, cfg, mirror averaging, seeds averaged, input averaging)
# for the embedded default: mvdpp_core.sampling_defaults.EMBEDDED_SAMPLING, in widget order.
EMBEDDED_WIDGETS = [EMBEDDED_SAMPLING.steps, EMBEDDED_SAMPLING.sampler, EMBEDDED_SAMPLING.cfg,
                    EMBEDDED_SAMPLING.mirror_average, EMBEDDED_SAMPLING.average_seeds, EMBEDDED_SAMPLING.input_average]
# (file stem, azimuth deg, elevation deg): the first view defines azimuth 0.
EXAMPLE_OBJECT = 4
EXAMPLE_VIEWS = [("front", 0.0, 15.0), ("left", 90.0, 20.0), ("back", 180.0, 15.0), ("right", 270.0, 25.0)]


def example_object() -> trimesh.Trimesh:
    """Held-out procedural object 4 (the demo's input): the embedded default never trained on it."""
    return procedural_object(Split.HELDOUT, EXAMPLE_OBJECT)[0]


def render_examples(mesh: trimesh.Trimesh) -> None:
    """The example photos: the object on the procedural renderer's lighting, RGBA (alpha = mask)."""
    out = HERE / "inputs"
    out.mkdir(exist_ok=True)
    K = cameras.intrinsics(INPUT_SIZE)
    for stem, az, el in EXAMPLE_VIEWS:
        c2w = cameras.spherical_c2w(torch.tensor([az]), torch.tensor([el]), 1.8)
        pixels = render_views(mesh, c2w, K, INPUT_SIZE)[0]  # H W 4 uint8
        Image.fromarray(pixels, "RGBA").save(out / f"mvdpp_example_{stem}.png", optimize=True)


@dataclass
class Node:
    id: int
    type: str
    pos: tuple[int, int]
    widgets: list[Any]
    inputs: list[tuple[str, str]] = field(default_factory=list)  # (name, type) of sockets
    outputs: list[tuple[str, str]] = field(default_factory=list)
    widget_inputs: set[str] = field(default_factory=set)  # sockets that are also widgets
    size: tuple[int, int] = (320, 160)
    title: str | None = None


class Graph:
    """Nodes plus links ``(from_id, from_slot, to_id, input_name)``, serialised as UI JSON."""

    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.edges: list[tuple[int, int, int, str]] = []

    def add(self, node: Node) -> Node:
        self.nodes.append(node)
        return node

    def link(self, src: Node, slot: int, dst: Node, name: str) -> None:
        self.edges.append((src.id, slot, dst.id, name))

    def to_json(self) -> dict[str, Any]:
        by_id = {n.id: n for n in self.nodes}
        links, in_link, out_links = [], {}, {}
        for link_id, (src, slot, dst, name) in enumerate(self.edges, start=1):
            kind = by_id[src].outputs[slot][1]
            links.append([link_id, src, slot, dst, [i for i, _ in by_id[dst].inputs].index(name), kind])
            in_link[(dst, name)] = link_id
            out_links.setdefault((src, slot), []).append(link_id)
        order = {n.id: i for i, n in enumerate(self._topological())}
        nodes = [self._node_json(n, order[n.id], in_link, out_links) for n in self.nodes]
        return {
            "last_node_id": max(by_id), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {"ds": {"scale": 0.6, "offset": [40, 40]}}, "version": 0.4,
        }

    def _node_json(self, n: Node, order: int, in_link: dict, out_links: dict) -> dict[str, Any]:
        inputs = []
        for name, kind in n.inputs:
            entry: dict[str, Any] = {"name": name, "type": kind, "link": in_link.get((n.id, name))}
            if name in n.widget_inputs:
                entry["widget"] = {"name": name}
            inputs.append(entry)
        outputs = [
            {"name": name, "type": kind, "links": out_links.get((n.id, slot), []), "slot_index": slot}
            for slot, (name, kind) in enumerate(n.outputs)
        ]
        node = {
            "id": n.id, "type": n.type, "pos": list(n.pos), "size": list(n.size), "flags": {}, "order": order,
            "mode": 0, "inputs": inputs, "outputs": outputs, "properties": {"Node name for S&R": n.type},
            "widgets_values": n.widgets,
        }
        if n.title:
            node["title"] = n.title
        return node

    def _topological(self) -> list[Node]:
        done: list[Node] = []
        pending = list(self.nodes)
        while pending:
            for n in pending:
                deps = {src for src, _, dst, _ in self.edges if dst == n.id}
                if deps <= {d.id for d in done}:
                    done.append(n)
                    pending.remove(n)
                    break
            else:
                raise ValueError("the graph has a cycle")
        return done


def load_image(node_id: int, stem: str, pos: tuple[int, int]) -> Node:
    return Node(node_id, "LoadImage", pos, [f"mvdpp_example_{stem}.png", "image"],
                outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")], size=(240, 320))


def pipeline(g: Graph, images: Node, image_slot: int, mask: tuple[Node, int] | None, x: int) -> None:
    """Loader -> condition views -> sampler -> views, masks, grid, mesh (+ previews)."""
    convention = "alpha-inverted (LoadImage MASK)" if mask else "foreground=1 (background removal nodes)"
    loader = g.add(Node(100, "MVDPP_LoadModel", (x, 420), [CHECKPOINT, "auto", "auto", "auto"],
                        inputs=[("clip_vision", "CLIP_VISION")], outputs=[("model", "MVDPP_MODEL")]))
    encode = g.add(Node(101, "MVDPP_MaskAwareEncode", (x + 360, 40), [convention, 0.1, 0.55],
                        inputs=[("model", "MVDPP_MODEL"), ("images", "IMAGE"), ("mask", "MASK")],
                        outputs=[("cond", "MVDPP_COND"), ("framed", "IMAGE")], size=(340, 180)))
    sampler = g.add(Node(102, "MVDPP_MultiViewSampler", (x + 760, 40), [0, "fixed", *EMBEDDED_WIDGETS],
                         inputs=[("model", "MVDPP_MODEL"), ("cond", "MVDPP_COND")],
                         outputs=[("views", "IMAGE"), ("masks", "MASK")], size=(320, 200)))
    framed = g.add(Node(103, "PreviewImage", (x + 360, 300), [], inputs=[("images", "IMAGE")], size=(300, 300)))
    grid = g.add(Node(104, "MVDPP_ViewGrid", (x + 1140, 40), ["grid", "0", "0, 2, 4, 6", "#FFFFFF"],
                      inputs=[("views", "IMAGE"), ("masks", "MASK")], outputs=[("image", "IMAGE")], size=(300, 200)))
    save_grid = g.add(Node(105, "SaveImage", (x + 1500, 40), ["mvdpp/grid"], inputs=[("images", "IMAGE")],
                           size=(520, 330)))
    save_views = g.add(Node(106, "SaveImage", (x + 1140, 320), ["mvdpp/views"], inputs=[("images", "IMAGE")],
                            size=(320, 300)))
    to_image = g.add(Node(107, "MaskToImage", (x + 760, 320), [], inputs=[("mask", "MASK")],
                          outputs=[("IMAGE", "IMAGE")], size=(220, 60)))
    save_masks = g.add(Node(108, "SaveImage", (x + 760, 420), ["mvdpp/masks"], inputs=[("images", "IMAGE")],
                            size=(320, 300)))
    mesh = g.add(Node(109, "MVDPP_MeshExport", (x + 1500, 420), ["fast", 128, "glb", "mvdpp/mesh"],
                      inputs=[("views", "IMAGE"), ("masks", "MASK")],
                      outputs=[("mesh", "MESH"), ("path", "STRING")], size=(320, 200)))
    preview = g.add(Node(110, "Preview3D", (x + 1860, 420), ["", ""], inputs=[("model_file", "STRING")],
                         widget_inputs={"model_file"}, size=(400, 550)))
    g.link(loader, 0, encode, "model")
    g.link(images, image_slot, encode, "images")
    if mask:
        g.link(mask[0], mask[1], encode, "mask")
    g.link(loader, 0, sampler, "model")
    g.link(encode, 0, sampler, "cond")
    g.link(encode, 1, framed, "images")
    g.link(sampler, 0, grid, "views")
    g.link(sampler, 1, grid, "masks")
    g.link(grid, 0, save_grid, "images")
    g.link(sampler, 0, save_views, "images")
    g.link(sampler, 1, to_image, "mask")
    g.link(to_image, 0, save_masks, "images")
    g.link(sampler, 0, mesh, "views")
    g.link(sampler, 1, mesh, "masks")
    g.link(mesh, 1, preview, "model_file")


def single_view() -> Graph:
    g = Graph()
    photo = g.add(load_image(1, "front", (20, 40)))
    pipeline(g, photo, 0, (photo, 1), 300)
    return g


def multi_view(stems: list[str]) -> Graph:
    """LoadImage x N, alpha re-joined (LoadImage splits it off), batched with ImageBatch."""
    g = Graph()
    joined = []
    for i, stem in enumerate(stems):
        photo = g.add(load_image(1 + i, stem, (20, 40 + 360 * i)))
        join = g.add(Node(20 + i, "JoinImageWithAlpha", (300, 40 + 360 * i), [],
                          inputs=[("image", "IMAGE"), ("alpha", "MASK")], outputs=[("IMAGE", "IMAGE")], size=(240, 60)))
        g.link(photo, 0, join, "image")
        g.link(photo, 1, join, "alpha")
        joined.append(join)
    batch = joined[0]
    for i, other in enumerate(joined[1:]):
        node = g.add(Node(40 + i, "ImageBatch", (580, 40 + 120 * i), [],
                          inputs=[("image1", "IMAGE"), ("image2", "IMAGE")], outputs=[("IMAGE", "IMAGE")],
                          size=(200, 60)))
        g.link(batch, 0, node, "image1")
        g.link(other, 0, node, "image2")
        batch = node
    pipeline(g, batch, 0, None, 840)
    return g


WORKFLOWS = {
    "mvdpp_single_view.json": single_view,
    "mvdpp_two_views.json": lambda: multi_view(["front", "back"]),
    "mvdpp_four_views.json": lambda: multi_view(["front", "left", "back", "right"]),
}


def main() -> None:
    render_examples(example_object())
    for name, build in WORKFLOWS.items():
        (HERE / name).write_text(json.dumps(build().to_json(), indent=1) + "\n")


if __name__ == "__main__":
    main()
