"""Concept labels: a short concept phrase and a category for an explanation.

The paper has a small LLM shorten each explanation to a concept phrase and sorts concepts into
scene, object, part, material, texture and colour. Backends with a language model ask it
(:data:`prompts.CONCEPT_TEMPLATE`) and parse its JSON with :func:`parse_concept_reply`;
:func:`keyword_concept` is the deterministic fallback (and the demo backend's labeller): it
finds colour, texture, material, shape/object, part and scene words and builds the phrase
from them.
"""

from __future__ import annotations

import json
import re

CATEGORIES = ("scene", "object", "part", "material", "texture", "colour")

COLOUR_WORDS = {"red", "orange", "yellow", "green", "blue", "purple", "violet", "pink", "brown", "black", "white",
                "gray", "grey", "cyan", "magenta", "gold", "golden", "silver", "beige", "crimson", "navy", "turquoise"}
TEXTURE_WORDS = {"striped", "stripes", "stripe", "dotted", "dots", "spotted", "polka", "checked", "checkered",
                 "chequered", "checkerboard", "plaid", "grid", "solid", "plain", "wavy", "zigzag", "patterned",
                 "pattern", "textured", "furry", "fur", "smooth", "rough", "speckled", "woven", "knitted"}
MATERIAL_WORDS = {"wood", "wooden", "metal", "metallic", "glass", "plastic", "fabric", "cloth", "stone", "brick",
                  "leather", "paper", "concrete", "marble", "ceramic", "rubber", "steel"}
PART_WORDS = {"hole", "holes", "outline", "outlines", "handle", "handles", "edge", "edges", "corner", "corners",
              "border", "rim", "tip", "wheel", "wheels", "leg", "legs", "eye", "eyes", "face", "faces", "head",
              "heads", "hand", "hands", "nose", "ear", "ears", "mouth", "tail", "wing", "wings", "roof", "window",
              "windows", "door", "doors", "stem"}
OBJECT_WORDS = {"circle", "circles", "square", "squares", "triangle", "triangles", "star", "stars", "diamond",
                "diamonds", "hexagon", "hexagons", "rectangle", "rectangles", "heart", "hearts", "cross", "ellipse",
                "person", "people", "man", "woman", "child", "dog", "dogs", "cat", "cats", "car", "cars", "bird",
                "birds", "horse", "tree", "trees", "flower", "flowers", "bottle", "cup", "chair", "table", "boat",
                "plane", "airplane", "bus", "train", "building", "buildings", "food", "ball", "book", "clock",
                "sign", "text", "letters", "animal", "animals", "vehicle", "rocket", "astronaut", "coffee"}
SCENE_WORDS = {"sky", "grass", "sand", "water", "floor", "beach", "field", "indoor", "indoors", "outdoor",
               "outdoors", "room", "street", "road", "forest", "sea", "ocean", "lake", "desert", "kitchen",
               "city", "mountain", "mountains", "snow", "background", "landscape", "meadow", "lawn"}
_SINGULAR = {"circles": "circle", "squares": "square", "triangles": "triangle", "stars": "star",
             "diamonds": "diamond", "hexagons": "hexagon", "rectangles": "rectangle", "stripes": "striped",
             "stripe": "striped", "dots": "dotted", "spotted": "dotted", "checkered": "checked",
             "chequered": "checked", "checkerboard": "checked", "holes": "hole", "outlines": "outline",
             "handles": "handle", "grey": "gray"}


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def keyword_concept(explanation: str) -> tuple[str | None, str | None]:
    """``(concept phrase, category)`` from keywords, or ``(None, None)`` when none is found.

    A named part makes it a part ("star with a hole" -> "hole", part); a named object makes it
    an object, with its colour and texture ("red striped star", object); otherwise a texture, a
    material, a colour, then a scene word decides.
    """
    words = _words(explanation)

    def first(vocab: set[str]) -> str | None:
        return next((_SINGULAR.get(w, w) for w in words if w in vocab), None)

    colour, texture, material = first(COLOUR_WORDS), first(TEXTURE_WORDS - {"pattern", "patterned"}), first(MATERIAL_WORDS)
    obj, part, scene = first(OBJECT_WORDS), first(PART_WORDS), first(SCENE_WORDS)
    if part:
        return (f"{obj} {part}" if obj else part), "part"
    if obj:
        return " ".join(w for w in (colour, texture if texture not in ("solid", "plain") else None, obj) if w), "object"
    if texture and texture not in ("solid", "plain"):
        return texture, "texture"
    if material:
        return material, "material"
    if colour:
        return colour, "colour"
    if scene:
        return scene, "scene"
    return None, None


def parse_concept_reply(reply: str) -> tuple[str | None, str | None]:
    """``(concept, category)`` from a model's JSON reply; ``(None, None)`` if it cannot be read.

    Tolerates text around the JSON, code fences, British/American spelling of colour.
    """
    match = re.search(r"\{.*?\}", reply, flags=re.S)
    if not match:
        return None, None
    try:
        data = json.loads(match.group(0))
    except ValueError:
        return None, None
    if not isinstance(data, dict):
        return None, None
    concept, category = data.get("concept"), str(data.get("category", "")).strip().lower()
    category = {"color": "colour", "materials": "material", "textures": "texture", "objects": "object",
                "parts": "part", "scenes": "scene", "colours": "colour", "colors": "colour"}.get(category, category)
    if not isinstance(concept, str) or not concept.strip():
        return None, None
    return concept.strip(), category if category in CATEGORIES else None
