"""Random textured objects: 1-3 primitives (sphere, box, cylinder, cone, torus, capsule).

Why procedural: no MVDiffusion++ weights or Objaverse renders can ship, yet the default
checkpoint must be trained and measured on held-out objects. Every object is a pure function
of its (split, index): the train and held-out splits draw from disjoint seed namespaces, so
training never sees a held-out object, and any object can be rebuilt on the fly (tests, eval).

Each part is built by ``mvdpp_core.reconstruction.shapes`` (unit size, fine tessellation),
coloured with a vertex-colour texture (solid, two-tone, stripes or checker) in its own frame,
stretched, rotated and offset; the parts are concatenated and normalised per DESIGN section 3
(bounding-box centre at the origin, longest side 1).
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import trimesh
from numpy.typing import NDArray
from scipy.spatial.transform import Rotation

from mvdpp_core.reconstruction import shapes

HELDOUT_OFFSET = 1_000_000  # held-out object i has global id HELDOUT_OFFSET + i
SPLIT_SALT = {"train": 0x5EED_0001, "heldout": 0x5EED_0002}
MAX_PARTS = 3


class Split(str, enum.Enum):
    TRAIN = "train"
    HELDOUT = "heldout"


class Texture(str, enum.Enum):
    SOLID = "solid"
    TWO_TONE = "two_tone"
    STRIPES = "stripes"
    CHECKER = "checker"


MAX_EDGE = 0.1  # unit-size part; ~3 px at 64 px, fine enough for the colour patterns
PRIMITIVES: dict[str, Callable[[], trimesh.Trimesh]] = {
    "sphere": lambda: shapes.sphere(subdivisions=3),
    "box": lambda: shapes.box(max_edge=MAX_EDGE),
    "cylinder": lambda: shapes.cylinder(sections=32),
    "cone": lambda: shapes.cone(sections=32),
    "torus": lambda: shapes.torus(sections=32),
    "capsule": lambda: shapes.capsule(),
}
_CACHE: dict[str, trimesh.Trimesh] = {}


@dataclass(frozen=True)
class Part:
    """One primitive of an object: what it is, how it is painted and where it goes."""

    kind: str
    texture: Texture
    colors: tuple[tuple[float, float, float], tuple[float, float, float]]
    frequency: float  # stripes / checker periods per unit length
    axis: tuple[float, float, float]  # pattern axis (two-tone split, stripes) in the part frame
    stretch: tuple[float, float, float]  # per-axis scale
    rotation: tuple[float, float, float, float]  # quaternion (x, y, z, w)
    offset: tuple[float, float, float]


def parse_split(split: Split | str) -> Split:
    try:
        return Split(split)
    except ValueError:
        raise ValueError(f"split={split!r}; allowed {[s.value for s in Split]}.") from None


def object_seed(split: Split | str, index: int) -> int:
    """The seed of object ``index`` of ``split``; train and held-out namespaces never overlap."""
    split = parse_split(split)
    if not 0 <= int(index) < HELDOUT_OFFSET:
        raise ValueError(f"index={index}; allowed 0..{HELDOUT_OFFSET - 1} per split.")
    global_id = int(index) + (HELDOUT_OFFSET if split is Split.HELDOUT else 0)
    return int(np.random.SeedSequence([SPLIT_SALT[split.value], global_id]).generate_state(2, np.uint64)[0] >> 1)


def _color(rng: np.random.Generator) -> tuple[float, float, float]:
    """A saturated-enough colour that never vanishes into the white background."""
    hsv = np.array([rng.uniform(0, 1), rng.uniform(0.35, 0.95), rng.uniform(0.3, 0.9)])
    from colorsys import hsv_to_rgb

    return tuple(float(c) for c in hsv_to_rgb(*hsv))  # type: ignore[return-value]


def sample_part(rng: np.random.Generator, first: bool) -> Part:
    """Draw one part; later parts sit next to (and overlap) the first, at half to full size."""
    kind = str(rng.choice(list(PRIMITIVES)))
    texture = Texture(str(rng.choice([t.value for t in Texture], p=[0.3, 0.25, 0.25, 0.2])))
    axis = rng.normal(size=3)
    size = 1.0 if first else rng.uniform(0.45, 0.9)
    stretch = size * rng.uniform(0.55, 1.0, size=3)
    direction = rng.normal(size=3)
    offset = np.zeros(3) if first else direction / np.linalg.norm(direction) * rng.uniform(0.25, 0.55)
    return Part(
        kind=kind, texture=texture, colors=(_color(rng), _color(rng)), frequency=float(rng.uniform(2.0, 5.0)),
        axis=tuple(axis / np.linalg.norm(axis)), stretch=tuple(stretch),
        rotation=tuple(Rotation.random(random_state=rng).as_quat()), offset=tuple(offset),
    )


def sample_parts(seed: int) -> list[Part]:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, MAX_PARTS + 1))
    return [sample_part(rng, first=i == 0) for i in range(n)]


def upright(parts: tuple[Part, ...] | list[Part]) -> tuple[Part, ...]:
    """The same parts, each turned about the vertical (world +Z) only, by its own yaw: objects
    that, like real ones and the paper's Objaverse renders, have an up."""
    return tuple(dataclasses.replace(p, rotation=tuple(Rotation.from_euler(
        "z", Rotation.from_quat(p.rotation).as_euler("zyx")[0]).as_quat())) for p in parts)


def part_count(split: Split | str, index: int) -> int:
    """How many primitives object ``index`` of ``split`` has (1..MAX_PARTS), without building it."""
    return len(sample_parts(object_seed(split, index)))


def first_objects(split: Split | str, count: int, parts: int = 0) -> list[int]:
    """The indices of the first ``count`` objects of ``split`` (only those made of exactly
    ``parts`` primitives when ``parts`` > 0)."""
    indices = (i for i in itertools.count() if not parts or part_count(split, i) == parts)
    return list(itertools.islice(indices, count))


def texture_colors(points: NDArray[np.floating], part: Part) -> NDArray[np.float64]:
    """Vertex colours (n, 3) of the part's pattern at its own-frame points (n, 3)."""
    a, b = (np.asarray(c, dtype=np.float64) for c in part.colors)
    along = points @ np.asarray(part.axis)
    if part.texture is Texture.SOLID:
        pick = np.zeros(len(points), bool)
    elif part.texture is Texture.TWO_TONE:
        pick = along > 0
    elif part.texture is Texture.STRIPES:
        pick = np.sin(2 * np.pi * part.frequency * along) > 0
    else:
        cells = np.floor(points * 2 * part.frequency).astype(np.int64)  # n 3
        pick = cells.sum(axis=1) % 2 == 1
    return np.where(pick[:, None], b, a)


def _refined(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """Split long edges (the capsule's sides) so vertex-colour patterns resolve everywhere."""
    vertices, faces = trimesh.remesh.subdivide_to_size(mesh.vertices, mesh.faces, MAX_EDGE * 1.5)
    return trimesh.Trimesh(vertices, faces, process=False)


def build_part(part: Part) -> trimesh.Trimesh:
    """The part's mesh: painted in its own frame, then stretched, rotated and offset."""
    if part.kind not in _CACHE:
        _CACHE[part.kind] = _refined(PRIMITIVES[part.kind]())
    base = _CACHE[part.kind]
    points = np.asarray(base.vertices)
    rotation = Rotation.from_quat(part.rotation).as_matrix()
    world = (points * np.asarray(part.stretch)) @ rotation.T + np.asarray(part.offset)
    mesh = trimesh.Trimesh(world, np.asarray(base.faces), process=False)
    return shapes.paint(mesh, texture_colors(points, part))


def build_object(parts: list[Part]) -> tuple[trimesh.Trimesh, NDArray[np.float64], float]:
    """Concatenate and normalise; returns the mesh, the source centre and the scale
    (``world = (source - center) * scale``, as in cameras.json)."""
    mesh = trimesh.util.concatenate([build_part(p) for p in parts])
    lo, hi = mesh.bounds
    center, scale = (lo + hi) / 2, 1.0 / float(np.max(hi - lo))
    shapes.normalize_mesh(mesh)
    return mesh, center, scale


def procedural_object(split: Split | str, index: int, upright_parts: bool = False,
                      ) -> tuple[trimesh.Trimesh, NDArray[np.float64], float]:
    """Object ``index`` of ``split`` (deterministic): normalised mesh with vertex colours,
    source centre and scale (``upright_parts``: each part turned about the vertical only)."""
    parts = sample_parts(object_seed(split, index))
    return build_object(list(upright(parts)) if upright_parts else parts)
