"""The shapes world: procedural images with exact ground truth for every concept.

Each scene is a background of one scene type (sky, grass, sand, water, floor) with 1 to 4 objects.
An object has a shape, a colour, a texture (solid, striped, dotted, checked), a size, a position
and optionally a part (a hole, an outline, a handle). Everything is drawn with hard edges, so
every concept has an exact pixel mask, and the captions and question-answer pairs are generated
from the same description.

A scene is fully determined by its description (a JSON-serialisable dict, stored as the sample's
``meta``), and the description is fully determined by ``(seed, index)``; so any scorer can
regenerate the exact masks of an indexed image with :func:`scene_from_meta`.

Concept categories follow the paper's: ``scene``, ``object`` (whole objects and shapes), ``part``,
``texture`` (the world's only material-like property) and ``colour``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from . import Sample

SCENES = ("sky", "grass", "sand", "water", "floor")
SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 135, 20),
    "yellow": (245, 220, 30),
    "green": (40, 170, 50),
    "blue": (30, 70, 225),
    "purple": (135, 45, 190),
    "white": (250, 250, 250),
    "black": (20, 20, 20),
}
TEXTURES = ("solid", "striped", "dotted", "checked")
PARTS = ("hole", "outline", "handle")
CATEGORIES = ("scene", "object", "part", "texture", "colour")
SCENE_PHRASES = {"sky": "in the sky", "grass": "on the grass", "sand": "on the sand",
                 "water": "on the water", "floor": "on the floor"}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
OUTLINE_RGB = (10, 10, 10)
OUTLINE_ON_BLACK_RGB = (235, 235, 235)
HANDLE_RGB = (120, 75, 35)

# size: the object's radius as a fraction of the image side
MIN_RADIUS, MAX_RADIUS = 0.11, 0.19
SMALL_RADIUS = 0.14  # below this an object is "small" in captions


@dataclass
class Scene:
    """One rendered scene: the image, exact masks per concept, and text about it."""

    image: Image.Image
    masks: dict[str, np.ndarray]        # concept name -> bool [H, W]
    concepts: dict[str, str]            # concept name -> category (scene/object/part/texture/colour)
    caption: str
    qa: list[tuple[str, str]]
    meta: dict[str, Any]                # the JSON description the scene was rendered from
    object_masks: list[np.ndarray] = field(default_factory=list)  # visible pixels per object, in meta order
    part_masks: list[np.ndarray | None] = field(default_factory=list)  # the object's part pixels, if any


class ShapesWorld:
    """An endless, deterministic sequence of scenes: ``scene(i)`` depends only on ``(seed, i)``."""

    def __init__(self, seed: int = 0, size: int = 224):
        if size < 16:
            raise ValueError(f"shapes world image size must be at least 16 pixels, got {size}")
        self.seed, self.size = int(seed), int(size)

    def describe(self, i: int) -> dict[str, Any]:
        """The JSON description of scene ``i`` (what :meth:`scene` renders)."""
        rng = np.random.default_rng([self.seed, int(i), 0x5A9E5])
        n_objects = int(rng.integers(1, 5))
        objects: list[dict[str, Any]] = []
        for _ in range(n_objects):
            for _attempt in range(20):
                r = float(rng.uniform(MIN_RADIUS, MAX_RADIUS))
                x, y = (float(v) for v in rng.uniform(r + 0.02, 1 - r - 0.02, size=2))
                # keep objects apart (touching at most) so each stays recognisable
                if all(np.hypot(x - o["x"], y - o["y"]) > 1.0 * (r + o["radius"]) for o in objects):
                    break
            else:
                continue  # no room left: the scene gets fewer objects
            part = rng.choice(["none", "none", "none", *PARTS])
            objects.append({
                "shape": str(rng.choice(SHAPES)),
                "colour": str(rng.choice(list(COLOURS))),
                "texture": str(rng.choice(TEXTURES)),
                "part": None if part == "none" else str(part),
                "x": round(x, 4), "y": round(y, 4), "radius": round(r, 4),
                "rotation": round(float(rng.uniform(-0.3, 0.3)), 4),
            })
        return {"world": "shapes", "seed": self.seed, "index": int(i), "size": self.size,
                "scene": str(rng.choice(SCENES)), "noise_seed": int(rng.integers(2**31)), "objects": objects}

    def scene(self, i: int) -> Scene:
        return render(self.describe(i))

    def sample(self, i: int) -> Sample:
        """Scene ``i`` as a data-source sample.

        ``text`` is empty so that a data source applies its own prompt; the caption, the
        question-answer pairs and the full description are in ``meta``.
        """
        scene = self.scene(i)
        meta = dict(scene.meta, caption=scene.caption, qa=[list(p) for p in scene.qa])
        return Sample(id=int(i), image=scene.image, text="", meta=meta)

    @staticmethod
    def masks_from_meta(meta: dict[str, Any]) -> dict[str, np.ndarray]:
        return scene_from_meta(meta).masks


def scene_from_meta(meta: dict[str, Any]) -> Scene:
    """Re-render the scene a sample came from (its ``meta``), with its exact masks."""
    if meta.get("world") != "shapes":
        raise ValueError("meta has no 'world': 'shapes' entry")
    return render(meta)


# ----------------------------------------------------------------------------------------------
# rendering


def _polygon(n: int, radius: float, rotation: float, inner: float | None = None) -> list[tuple[float, float]]:
    """Regular polygon (or star with ``inner`` radius ratio) around the origin, pointing up."""
    points = []
    steps = 2 * n if inner else n
    for k in range(steps):
        angle = -np.pi / 2 + rotation + 2 * np.pi * k / steps
        rr = radius * (inner if inner and k % 2 else 1.0)
        points.append((rr * np.cos(angle), rr * np.sin(angle)))
    return points


def _shape_mask(shape: str, cx: float, cy: float, radius: float, rotation: float, size: int) -> np.ndarray:
    if shape == "circle":
        yy, xx = np.ogrid[:size, :size]
        return (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= radius**2
    if shape == "square":
        pts = _polygon(4, radius * 1.3, rotation + np.pi / 4)
    elif shape == "diamond":
        pts = [(0, -radius * 1.15), (radius * 0.8, 0), (0, radius * 1.15), (-radius * 0.8, 0)]
        c, s = np.cos(rotation), np.sin(rotation)
        pts = [(x * c - y * s, x * s + y * c) for x, y in pts]
    elif shape == "triangle":
        pts = _polygon(3, radius * 1.25, rotation)
        pts = [(x, y + radius * 0.2) for x, y in pts]
    elif shape == "star":
        pts = _polygon(5, radius * 1.25, rotation, inner=0.45)
    elif shape == "hexagon":
        pts = _polygon(6, radius * 1.05, rotation)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    img = Image.new("1", (size, size), 0)
    ImageDraw.Draw(img).polygon([(cx + x, cy + y) for x, y in pts], fill=1)
    return np.asarray(img, dtype=bool)


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(steps):
        inner = out.copy()
        inner[1:, :] &= out[:-1, :]
        inner[:-1, :] &= out[1:, :]
        inner[:, 1:] &= out[:, :-1]
        inner[:, :-1] &= out[:, 1:]
        out = inner
    return out


def _background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    f32 = np.float32
    yy = (np.arange(size, dtype=f32) / size)[:, None]   # [H, 1]
    xx = (np.arange(size, dtype=f32) / size)[None, :]   # [1, W]
    noise = rng.standard_normal((size, size), dtype=f32)
    if kind == "sky":
        top, bottom = np.array([70, 140, 230], f32), np.array([170, 210, 250], f32)
        img = top + (bottom - top) * yy[..., None] + 3 * noise[..., None]
        for _ in range(int(rng.integers(1, 4))):  # soft clouds
            cx, cy, rx, ry = (f32(v) for v in (rng.uniform(0, 1), rng.uniform(0.05, 0.6), rng.uniform(0.1, 0.25), rng.uniform(0.04, 0.08)))
            cloud = f32(0.8) * np.exp(-(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2))
            img += (np.array([245, 248, 252], f32) - img) * cloud[..., None]
    elif kind == "grass":
        blades = np.repeat(rng.standard_normal((size // 2 + 1, size), dtype=f32), 2, axis=0)[:size]
        img = np.array([60, 140, 45], f32) + (18 * blades + 8 * noise)[..., None] * np.array([0.5, 1.0, 0.4], f32)
    elif kind == "sand":
        dunes = np.sin(2 * np.pi * (3 * yy + f32(0.6) * np.sin(2 * np.pi * xx)))
        img = np.array([222, 196, 140], f32) + (6 * dunes + 10 * noise)[..., None]
    elif kind == "water":
        phase = f32(rng.uniform(0, 6))
        waves = np.sin(2 * np.pi * (9 * yy + f32(0.4) * np.sin(2 * np.pi * 2 * xx + phase)))
        img = np.array([25, 95, 150], f32) + (14 * waves + 5 * noise)[..., None] * np.array([0.6, 1.0, 1.0], f32)
    elif kind == "floor":
        plank = np.floor(yy * 6)
        grain = np.sin(2 * np.pi * (xx * 3 + plank * f32(0.37)) * 4) * 8
        img = np.array([150, 100, 60], f32) + (grain + 14 * ((plank % 2) - 0.5) + 4 * noise)[..., None]
        seams = np.broadcast_to(np.abs(yy * 6 - np.round(yy * 6)) < 0.6 / size * 6, (size, size))
        img[seams] = (90, 55, 30)
    else:
        raise ValueError(f"unknown scene {kind!r}")
    return np.clip(img, 0, 255).astype(np.uint8)


def _pattern(texture: str, size: int, cx: float, cy: float, radius: float) -> np.ndarray:
    """Where the texture's second shade goes, in object-relative coordinates."""
    if texture == "solid":
        return np.zeros((size, size), dtype=bool)
    v = ((np.arange(size, dtype=np.float32) + 0.5 - cy) / radius)[:, None]
    u = ((np.arange(size, dtype=np.float32) + 0.5 - cx) / radius)[None, :]
    if texture == "striped":
        return np.mod(u + v, 0.7) < 0.28
    if texture == "dotted":
        return (np.mod(u, 0.6) - 0.3) ** 2 + (np.mod(v, 0.6) - 0.3) ** 2 < 0.13**2
    if texture == "checked":
        return (np.floor(u / 0.45) + np.floor(v / 0.45)) % 2 == 1
    raise ValueError(f"unknown texture {texture!r}")


def second_shade(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """The pattern colour of a textured object: a darker shade (a lighter one for black)."""
    if max(rgb) < 60:
        return (85, 85, 85)
    return tuple(int(c * 0.55) for c in rgb)  # type: ignore[return-value]


def render(desc: dict[str, Any]) -> Scene:
    """Draw a described scene and compute the mask of every concept in it."""
    size = int(desc["size"])
    rng = np.random.default_rng(int(desc["noise_seed"]))
    pixels = _background(desc["scene"], size, rng)
    owner = np.full((size, size), -1, dtype=np.int8)   # which object a pixel shows, -1 background
    kind = np.zeros((size, size), dtype=np.int8)       # 0 fill, 1 outline, 2 handle, 3 hole
    for j, obj in enumerate(desc["objects"]):
        cx, cy, r = obj["x"] * size, obj["y"] * size, obj["radius"] * size
        silhouette = _shape_mask(obj["shape"], cx, cy, r, obj["rotation"], size)
        part = obj.get("part")
        region = silhouette.copy()
        handle = hole = ring = None
        if part == "handle":  # a stick below the object, drawn first so the object covers its top
            w = max(1, int(round(0.18 * r)))
            x0, x1 = int(round(cx - w)), int(round(cx + w))
            y0, y1 = int(round(cy)), int(round(min(size, cy + 1.9 * r)))
            handle = np.zeros_like(region)
            handle[max(0, y0):y1, max(0, x0):max(0, x1)] = True
            handle &= ~silhouette
            region |= handle
        if part == "hole":
            hole = _shape_mask("circle", cx, cy, 0.35 * r, 0.0, size) & silhouette
            region &= ~hole
        if part == "outline":
            ring = silhouette & ~_erode(silhouette, max(1, int(round(0.12 * r))))
        fill = silhouette.copy()
        if hole is not None:
            fill &= ~hole
        if ring is not None:
            fill &= ~ring
        rgb = COLOURS[obj["colour"]]
        shade = _pattern(obj["texture"], size, cx, cy, r)
        pixels[fill] = rgb
        pixels[fill & shade] = second_shade(rgb)
        if ring is not None:
            pixels[ring] = OUTLINE_ON_BLACK_RGB if obj["colour"] == "black" else OUTLINE_RGB
        if handle is not None:
            pixels[handle] = HANDLE_RGB
        # later objects cover earlier ones; a hole shows whatever lies below
        owner[region] = j
        kind[fill] = 0
        if ring is not None:
            kind[ring] = 1
        if handle is not None:
            kind[handle] = 2
    # holes: the pixels inside each holed object's silhouette not covered by a later object
    object_masks, part_masks = [], []
    for j, obj in enumerate(desc["objects"]):
        visible = owner == j
        object_masks.append(visible)
        part = obj.get("part")
        if part == "outline":
            part_masks.append(visible & (kind == 1))
        elif part == "handle":
            part_masks.append(visible & (kind == 2))
        elif part == "hole":
            cx, cy, r = obj["x"] * size, obj["y"] * size, obj["radius"] * size
            hole = _shape_mask("circle", cx, cy, 0.35 * r, 0.0, size)
            covered_later = np.zeros_like(hole)
            for later in range(j + 1, len(desc["objects"])):
                covered_later |= owner == later
            part_masks.append(hole & ~covered_later)
        else:
            part_masks.append(None)

    masks: dict[str, np.ndarray] = {}
    concepts: dict[str, str] = {}

    def add(name: str, category: str, mask: np.ndarray) -> None:
        masks[name] = masks[name] | mask if name in masks else mask.copy()
        concepts[name] = category

    background = owner == -1
    add(desc["scene"], "scene", background)
    for obj, visible, part_mask in zip(desc["objects"], object_masks, part_masks):
        fill = visible & (kind == 0)
        silhouette = visible & (kind != 2)
        add(object_phrase(obj), "object", visible)
        add(obj["shape"], "object", silhouette)
        add(obj["colour"], "colour", fill)
        add(obj["texture"], "texture", fill)
        if part_mask is not None:
            add(obj["part"], "part", part_mask)
    caption = make_caption(desc)
    return Scene(image=Image.fromarray(pixels, "RGB"), masks=masks, concepts=concepts, caption=caption,
                 qa=make_qa(desc, caption), meta=desc, object_masks=object_masks, part_masks=part_masks)


# ----------------------------------------------------------------------------------------------
# text


def object_phrase(obj: dict[str, Any]) -> str:
    """``"red striped star"``; solid objects are just ``"red star"``."""
    texture = "" if obj["texture"] == "solid" else obj["texture"] + " "
    return f"{obj['colour']} {texture}{obj['shape']}"


def _object_text(obj: dict[str, Any]) -> str:
    small = "small " if obj["radius"] < SMALL_RADIUS else ""
    part = {"hole": " with a hole", "outline": " with an outline", "handle": " with a handle", None: ""}[obj.get("part")]
    return f"a {small}{object_phrase(obj)}{part}"


def make_caption(desc: dict[str, Any]) -> str:
    items = [_object_text(o) for o in desc["objects"]]
    listed = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return f"{listed[0].upper()}{listed[1:]} {SCENE_PHRASES[desc['scene']]}."


def make_qa(desc: dict[str, Any], caption: str) -> list[tuple[str, str]]:
    """Question-answer pairs that the description answers unambiguously."""
    objects = desc["objects"]
    qa: list[tuple[str, str]] = []
    shape_count = {s: sum(o["shape"] == s for o in objects) for s in SHAPES}
    colour_count = {c: sum(o["colour"] == c for o in objects) for c in COLOURS}
    for obj in objects:
        if shape_count[obj["shape"]] == 1:
            qa.append((f"What colour is the {obj['shape']}?", obj["colour"]))
            texture = "plain" if obj["texture"] == "solid" else obj["texture"]
            qa.append((f"What pattern does the {obj['shape']} have?", texture))
        if colour_count[obj["colour"]] == 1:
            qa.append((f"What shape is the {obj['colour']} object?", obj["shape"]))
    n = len(objects)
    qa.append(("How many objects are there?", NUMBER_WORDS[n]))
    qa.append(("Where are the objects?" if n > 1 else "Where is the object?", desc["scene"]))
    present = {o["shape"] for o in objects}
    absent = [s for s in SHAPES if s not in present]
    asked = sorted(present)[desc["index"] % len(present)]
    qa.append((f"Is there a {asked}?", "yes"))
    if absent:
        qa.append((f"Is there a {absent[desc['index'] % len(absent)]}?", "no"))
    qa.append(("Describe the image.", caption))
    return qa


def question_type(question: str) -> str:
    """The kind of a generated question: colour, shape, pattern, count, scene, presence or caption."""
    q = question.lower()
    for prefix, kind in (("what colour", "colour"), ("what shape", "shape"), ("what pattern", "pattern"),
                         ("how many", "count"), ("where", "scene"), ("is there", "presence"),
                         ("describe", "caption")):
        if q.startswith(prefix):
            return kind
    return "other"


# ----------------------------------------------------------------------------------------------
# phrase -> mask (the oracle segmenter)

SYNONYMS: dict[str, str] = {
    # colours
    "color": "", "colour": "", "coloured": "", "colored": "",
    "crimson": "red", "scarlet": "red", "maroon": "red", "gold": "yellow", "golden": "yellow",
    "lime": "green", "emerald": "green", "navy": "blue", "azure": "blue", "cyan": "blue",
    "violet": "purple", "magenta": "purple", "lavender": "purple", "amber": "orange",
    "ivory": "white", "dark": "", "bright": "", "light": "",
    # shapes
    "round": "circle", "ball": "circle", "disc": "circle", "disk": "circle", "dot": "dotted",
    "box": "square", "rectangle": "square", "rectangular": "square", "cube": "square", "block": "square",
    "rhombus": "diamond", "lozenge": "diamond", "triangular": "triangle", "pyramid": "triangle",
    "hexagonal": "hexagon", "starry": "star", "pentagram": "star", "circular": "circle",
    # textures
    "stripe": "striped", "stripes": "striped", "stripy": "striped", "streak": "striped", "lined": "striped",
    "line": "striped", "dots": "dotted", "spotted": "dotted", "spots": "dotted", "spot": "dotted",
    "polka": "dotted", "speckled": "dotted", "check": "checked", "checkered": "checked",
    "chequered": "checked", "checkerboard": "checked", "checkered-pattern": "checked", "plaid": "checked",
    "grid": "checked", "tiled": "checked", "plain": "solid", "uniform": "solid", "flat": "solid",
    # parts
    "holes": "hole", "opening": "hole", "donut": "hole", "border": "outline", "edge": "outline",
    "rim": "outline", "contour": "outline", "outlined": "outline", "stick": "handle", "stem": "handle",
    "lollipop": "handle", "pole": "handle",
    # scenes
    "blue-sky": "sky", "clouds": "sky", "cloud": "sky", "heaven": "sky", "lawn": "grass",
    "field": "grass", "meadow": "grass", "turf": "grass", "grassy": "grass", "beach": "sand",
    "desert": "sand", "dune": "sand", "dunes": "sand", "sandy": "sand", "sea": "water", "ocean": "water",
    "lake": "water", "river": "water", "waves": "water", "wave": "water", "pool": "water",
    "wood": "floor", "wooden": "floor", "planks": "floor", "parquet": "floor", "indoor": "floor",
    "room": "floor", "tiles": "floor", "background": "background",
}
KNOWN_WORDS = {*SCENES, *SHAPES, *COLOURS, *TEXTURES, *PARTS, "background"}


def _normalise(word: str) -> str:
    """Map a word to the world's vocabulary: synonyms, then plurals ("stars", "boxes")."""
    if word in SYNONYMS:
        return SYNONYMS[word]
    if word in KNOWN_WORDS:
        return word
    for suffix in ("es", "s"):
        stem = word[: -len(suffix)]
        if word.endswith(suffix) and (stem in KNOWN_WORDS or stem in SYNONYMS):
            return _normalise(stem)
    return word


def parse_phrase(phrase: str) -> dict[str, set[str]]:
    """Split a concept phrase into the world's vocabulary: scenes, shapes, colours, textures, parts."""
    words = [_normalise(w) for w in re.findall(r"[a-z]+(?:-[a-z]+)?", phrase.lower())]
    return {
        "scene": {w for w in words if w in SCENES or w == "background"},
        "shape": {w for w in words if w in SHAPES},
        "colour": {w for w in words if w in COLOURS},
        "texture": {w for w in words if w in TEXTURES},
        "part": {w for w in words if w in PARTS},
        "object": {"object"} if re.search(r"\b(objects?|things?|shapes?|items?)\b", phrase.lower()) else set(),
    }


def concept_mask(scene: Scene, phrase: str) -> np.ndarray | None:
    """The ground-truth mask of a concept phrase ("red", "a striped star", "grass", "red objects").

    Returns ``None`` when the phrase names nothing the world knows (so no ground truth exists) and
    an all-False mask when it names something known that is absent from this scene.
    Colour-only and texture-only phrases give the coloured/textured surface; phrases with a shape
    or an explicit "object" give the whole matching objects; a part word gives that part of the
    matching objects; a scene word gives the visible background.
    """
    p = parse_phrase(phrase)
    size = scene.image.height
    empty = np.zeros((size, size), dtype=bool)
    if not any(p[k] for k in ("scene", "shape", "colour", "texture", "part")):
        return None
    has_object_terms = bool(p["shape"] or p["colour"] or p["texture"] or p["part"])
    if p["scene"] and not has_object_terms:
        if "background" in p["scene"]:
            return scene.masks[scene.meta["scene"]].copy()
        return scene.masks.get(scene.meta["scene"], empty).copy() if scene.meta["scene"] in p["scene"] else empty
    objects = scene.meta["objects"]
    chosen = [j for j, o in enumerate(objects)
              if (not p["shape"] or o["shape"] in p["shape"])
              and (not p["colour"] or o["colour"] in p["colour"])
              and (not p["texture"] or o["texture"] in p["texture"])
              and (not p["part"] or o.get("part") in p["part"])]
    out = empty.copy()
    if p["part"]:
        for j in chosen:
            if scene.part_masks[j] is not None:
                out |= scene.part_masks[j]
        return out
    surface_only = not p["shape"] and not p["object"]
    for j in chosen:
        mask = scene.object_masks[j]
        if surface_only:
            # "red", "striped": the coloured/textured fill, without outline or handle
            fill = scene.masks.get(objects[j]["colour"], empty) if p["colour"] else scene.masks.get(objects[j]["texture"], empty)
            mask = mask & fill
        out |= mask
    return out
