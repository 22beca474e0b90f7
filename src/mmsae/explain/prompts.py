"""Explanation and concept prompts. Templates are ``str.format`` strings users can replace.

Fields a template may use: ``{n_images}``, ``{highlight}`` (how the activated region is shown),
``{tokens}`` (the feature's top text tokens, quoted and comma-separated; empty when not asked
for) and ``{tokens_line}`` (a sentence naming them, or nothing).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import MmsaeError

# The paper's explanation step: the top images with the activated regions highlighted, and the
# question what they have in common.
DEFAULT_TEMPLATE = (
    "Each of these {n_images} images shows where one feature of a vision-language model is active: {highlight}. "
    "What do the highlighted regions have in common across the images? "
    "Name the shared concept (an object, a part of an object, a scene, a material, a texture or a colour) "
    "and describe it in one short sentence.{tokens_line}"
)
DEFAULT_VERSION = "paper-v1"

HIGHLIGHT_TEXT = {
    "mask": "the active region is shown at full brightness and the rest of the image is darkened",
    "overlay": "the active region is covered by a heat-map, red where the feature is strongest",
    "crop": "each image is cropped to the active region",
    "none": "the images are shown as they are",
}

CONCEPT_TEMPLATE = (
    "Here is an explanation of what a feature of a vision model responds to:\n\"{explanation}\"\n"
    "Shorten it to a concept phrase of at most four words, and give the concept's category, "
    "one of: scene, object, part, material, texture, colour. "
    "Reply with JSON only, like {{\"concept\": \"red star\", \"category\": \"object\"}}."
)


def load_template(template: str | None) -> tuple[str, str]:
    """``(template text, prompt version)``. ``template`` is None (the default), text, or ``@path``."""
    if template is None:
        return DEFAULT_TEMPLATE, DEFAULT_VERSION
    if template.startswith("@"):
        path = Path(template[1:]).expanduser()
        try:
            template = path.read_text(encoding="utf-8")
        except OSError as e:
            raise MmsaeError(f"cannot read the prompt template {path}: {e.strerror}") from e
    try:
        template.format(n_images=5, highlight="", tokens="", tokens_line="")
    except (KeyError, IndexError, ValueError) as e:
        raise MmsaeError(f"prompt template has an unknown or broken field ({e}); use {{n_images}}, {{highlight}}, "
                         "{tokens} or {tokens_line}, and double other braces") from e
    return template, "custom-" + hashlib.sha256(template.encode()).hexdigest()[:8]


def render(template: str, n_images: int, highlight: str, tokens: list[str]) -> str:
    quoted = ", ".join(f'"{t.strip()}"' for t in tokens if t.strip())
    line = f" In text, the feature is most active on these tokens: {quoted}." if quoted else ""
    return template.format(n_images=n_images, highlight=HIGHLIGHT_TEXT[highlight], tokens=quoted, tokens_line=line)
