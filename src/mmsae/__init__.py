"""mmsae: sparse autoencoders that find, explain, score and steer features of multimodal models.

In a notebook::

    import mmsae
    model = mmsae.load_adapter("llava-hf/llava-v1.6-mistral-7b-hf")     # any supported family
    sae = mmsae.load_sae("RUN/sae")                                      # its site is in its cfg
    run = mmsae.run_with_saes(model, [sae], image, "Describe the image.")
    run.latents[sae].top_features(), run.latents[sae].heatmap(123)       # per token, over the image
    mmsae.generate(model, image, "What colour is it?", {sae: [mmsae.Intervention(123, 40.0)]})

The names below are loaded on first use, so ``import mmsae`` is cheap and changes no global state.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "load_adapter": "mmsae.models",
    "load_sae": "mmsae.sae",
    "SparseAutoencoder": "mmsae.sae",
    "Site": "mmsae.models.sites",
    "Intervention": "mmsae.intervene",
    "run_with_saes": "mmsae.intervene",
    "generate": "mmsae.intervene",
    "attached": "mmsae.intervene",
    "spliced": "mmsae.intervene",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mmsae' has no attribute {name!r}")
