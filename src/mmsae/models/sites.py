"""Sites: the named places in a model where an SAE reads and writes activations.

A site is one of

- ``lm:L``: the output of language-model decoder layer L (the residual stream after it; the
  place mmsae has always used, and what a bare layer number means);
- ``vision:L``: the output of vision-tower block L (the tower's residual stream after it);
- ``projector``: the output of the multimodal projector (image features in the language
  model's width, before they are put into the text sequence);
- a module path of the model (``model.language_model.layers.3.mlp``): that module's output.

``parse_site`` reads the canonical names and the namings released SAEs record (sparsify and the
paper's release: ``model.layers.24``, ``layers.24``, ``language_model.model.layers.24``,
``model.language_model.layers.24``; SAELens: ``blocks.24.hook_resid_post``). Which module a
site is in a given model, and its width and token geometry, is the adapter's business
(``ModelAdapter.resolve_site``, ``site_module``, ``site_width``, ``site_rows``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import MmsaeError

KINDS = ("lm", "vision", "projector", "module")

# prefixes under which released SAEs name the language model's decoder layers
_LM_LAYERS = re.compile(r"^(?:(?:model|language_model|text_model)\.)*layers\.(\d+)$")
_SAELENS = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")
_MODULE_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*$")


@dataclass(frozen=True, repr=False)
class Site:
    """A place in a model: ``kind`` is "lm", "vision", "projector" or "module".

    ``layer`` is the block index for "lm" and "vision" (None otherwise); ``path`` is the module
    path for "module" (None otherwise). ``str(site)`` is the canonical name: ``lm:L``,
    ``vision:L``, ``projector`` or the path; sites are equal when their names are.
    """

    kind: str
    layer: int | None = None
    path: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise MmsaeError(f"site kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.kind in ("lm", "vision"):
            if not isinstance(self.layer, int) or isinstance(self.layer, bool) or self.layer < 0 or self.path is not None:
                raise MmsaeError(f"a {self.kind} site needs a layer number >= 0 and no path (got layer={self.layer!r}, path={self.path!r})")
        elif self.layer is not None:
            raise MmsaeError(f"a {self.kind} site takes no layer (got {self.layer!r})")
        if (self.kind == "module") != (self.path is not None):
            raise MmsaeError(f"only a module site has a path (got kind={self.kind!r}, path={self.path!r})")
        if self.kind == "module" and not _MODULE_PATH.match(self.path):
            raise MmsaeError(f"{self.path!r} is not a module path (names joined by dots, e.g. model.language_model.layers.3.mlp)")

    def __str__(self) -> str:
        if self.kind in ("lm", "vision"):
            return f"{self.kind}:{self.layer}"
        return self.path if self.kind == "module" else self.kind

    def __repr__(self) -> str:
        return f"Site({str(self)!r})"

    @classmethod
    def lm(cls, layer: int) -> Site:
        return cls("lm", layer)

    @classmethod
    def vision(cls, layer: int) -> Site:
        return cls("vision", layer)

    @classmethod
    def projector(cls) -> Site:
        return cls("projector")

    @classmethod
    def module(cls, path: str) -> Site:
        return cls("module", path=path)


SITE_FORMS = "lm:L, vision:L, projector, a layer number, or a module path"


def parse_site(text: str | int | Site) -> Site:
    """The site a name stands for, without a model.

    Canonical names (``lm:3``, ``vision:3``, ``projector``), a bare layer number (``3`` =
    ``lm:3``), the language-model layer paths released SAEs record (``model.layers.3``,
    ``layers.3``, ``language_model.model.layers.3``, ``model.language_model.layers.3``,
    ``language_model.layers.3``) and SAELens' ``blocks.3.hook_resid_post`` (``hook_resid_pre``
    of block L is the output of block L-1). Any other dotted name is a module site; whether the
    model has that module, or which site it is, ``ModelAdapter.resolve_site`` decides.
    """
    if isinstance(text, Site):
        return text
    if isinstance(text, int) and not isinstance(text, bool):
        return Site.lm(text)
    if not isinstance(text, str):
        raise MmsaeError(f"site {text!r} is not a name; use {SITE_FORMS}")
    name = text.strip()
    kind, colon, rest = name.partition(":")
    if colon:
        if kind not in ("lm", "vision") or not rest.isdigit():
            raise MmsaeError(f"site {text!r} is not understood; use {SITE_FORMS}")
        return Site(kind, int(rest))
    if name == "projector":
        return Site.projector()
    if name.isdigit():
        return Site.lm(int(name))
    if match := _LM_LAYERS.match(name):
        return Site.lm(int(match.group(1)))
    if match := _SAELENS.match(name):
        block, which = int(match.group(1)), match.group(2)
        if which == "post":
            return Site.lm(block)
        if block == 0:
            raise MmsaeError(f"site {text!r} is the embedding output, before any decoder layer; mmsae has no site there")
        return Site.lm(block - 1)
    if name.startswith("blocks.") and ".hook_" in name:
        raise MmsaeError(f"site {text!r} is a SAELens hook mmsae does not map; only blocks.L.hook_resid_post (= lm:L) and hook_resid_pre are residual-stream sites")
    if _MODULE_PATH.match(name):
        return Site.module(name)
    raise MmsaeError(f"site {text!r} is not understood; use {SITE_FORMS}")


def site_dirname(site: Site | str) -> str:
    """The folder name of a site's store in a multi-site harvest: ``lm:2`` -> ``lm-2``."""
    return str(site).replace(":", "-")


def site_dirnames(sites: list[Site]) -> list[str]:
    """Folder names for several SAEs' outputs under one --out (index, evaluate): each site's name
    (``lm:2`` -> ``lm-2``), or their positions (``0``, ``1``, ...) when two read the same site."""
    if len(set(sites)) < len(sites):
        return [str(k) for k in range(len(sites))]
    return [site_dirname(site) for site in sites]


def site_record(adapter, site: Site) -> dict:
    """What an output file records of where its SAE sat: the site, and for an lm site its layer
    and hook point."""
    lm = site.kind == "lm"
    return {"site": str(site), "layer": site.layer if lm else None, "hook_point": adapter.hook_point(site.layer) if lm else None}


def recorded_site(cfg) -> str | int | None:
    """The site an SAE config records (``cfg`` is a SaeConfig, an SAE or a cfg dict): its
    ``site``, else its ``hook_point``, else its ``layer`` (``lm:L``); None if it records none."""
    cfg = getattr(cfg, "cfg", cfg)
    get = cfg.get if isinstance(cfg, dict) else lambda key: getattr(cfg, key, None)
    for key in ("site", "hook_point", "layer"):
        if get(key) is not None:
            return get(key)
    return None


def check_sae_site(sae, adapter, site: Site | str | int | None = None, name: str = "the SAE") -> Site:
    """The site the SAE ``sae`` (an SAE, its SaeConfig or cfg dict) is used at on ``adapter``.

    The SAE's recorded site (see :func:`recorded_site`; a release's ``model.layers.24`` is
    ``lm:24`` on LLaVA) and the requested ``site`` (None: the recorded one) are resolved on the
    adapter; a site mismatch, a width mismatch or an SAE that records no site when none is
    requested is a one-line MmsaeError naming ``name``.
    """
    cfg = getattr(sae, "cfg", sae)
    d_in = cfg.get("d_in") if isinstance(cfg, dict) else getattr(cfg, "d_in", None)
    recorded = recorded_site(cfg)
    if recorded is None and site is None:
        raise MmsaeError(f"{name} records no site or layer; pass --site (or --layer) with the one it was trained at")
    try:
        trained = None if recorded is None else adapter.resolve_site(recorded)
    except MmsaeError as e:  # say whose recorded site it is
        raise MmsaeError(f"{name} was trained at hook point {recorded!r}, not a site of this model: {e}") from e
    wanted = trained if site is None else adapter.resolve_site(site)
    if trained is not None and trained != wanted:
        raise MmsaeError(f"{name} was trained at {trained} but --site is {wanted}; use the SAE's own site or an SAE trained at {wanted}")
    width = adapter.site_width(wanted)
    if width is not None and d_in is not None and int(d_in) != width:
        raise MmsaeError(f"{name} has input width d_in={d_in} but {wanted} of {adapter.model_id} has width {width}; use an SAE trained on this model")
    return wanted


def check_store_site(sae, store_site: str | None, name: str = "the SAE", store: str = "the store") -> None:
    """Without a model: refuse (one line) an SAE whose recorded site is not ``store_site``.

    Both are read by :func:`parse_site`; a module path, which only a model can place
    (``check_sae_site``), is not compared.
    """
    recorded = recorded_site(sae)
    if recorded is None or store_site is None:
        return
    trained, stored = parse_site(recorded), parse_site(store_site)
    if "module" not in (trained.kind, stored.kind) and trained != stored:
        raise MmsaeError(f"{name} was trained at {trained} but {store} holds {stored}; use the SAE and store of one site")
