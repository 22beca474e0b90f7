"""Reading and writing SAE folders: sparsify's layout (mmsae's own), SAELens' layout.

* sparsify / mmsae: ``cfg.json`` + ``sae.safetensors`` with ``encoder.weight`` [n, d],
  ``encoder.bias`` [n], ``W_dec`` [n, d], ``b_dec`` [d] (+ ``threshold`` [n] for threshold
  architectures). cfg keys ``d_in, num_latents, k, expansion_factor, normalize_decoder`` (and
  sparsify's ``activation, multi_topk, skip_connection, transcode``) plus mmsae's
  ``architecture, model, layer, hook_point, input_scale, matryoshka_groups, token_exclusion``.
* SAELens (v6 and earlier): ``cfg.json`` + ``sae_weights.safetensors`` with ``W_enc`` [d, n],
  ``b_enc``, ``W_dec`` [n, d], ``b_dec`` (+ ``threshold`` for JumpReLU); cfg ``d_in, d_sae,
  architecture, k, apply_b_dec_to_input, normalize_activations, metadata{model_name, hook_name}``;
  mmsae's own keys go under ``metadata.mmsae``.

Each architecture names the SAELens architecture it saves as (``Architecture.saelens``; BatchTopK
runs as a JumpReLU at inference); tensors beyond the four above keep their ``state_dict`` names.
A Matryoshka SAE is a TopK / BatchTopK SAE at inference, so both layouts carry it: other tools
load it as that plain SAE (same encode and decode), mmsae also restores its ``matryoshka_groups``.

A folder (or hub repo) with one sub-folder per hook point, as sparsify writes and the paper's
SAE is released, loads with ``hook_point=`` (or on its own if it holds a single SAE).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

import torch

from ..errors import MmsaeError
from ..io import ensure_dir, read_json, save_tensors, write_json
from .architectures import ARCHITECTURES
from .model import SaeConfig, SparseAutoencoder

SPARSIFY_WEIGHTS = "sae.safetensors"
SAELENS_WEIGHTS = "sae_weights.safetensors"
CFG = "cfg.json"


# --- saving ------------------------------------------------------------------------------------
def save_sae(sae: SparseAutoencoder, path, layout: Literal["sparsify", "saelens"] = "sparsify") -> None:
    """Write ``sae`` to folder ``path`` in the given layout (weights in raw activation units)."""
    cfg = sae.cfg
    if layout == "saelens" and sae.arch.saelens is None:
        raise MmsaeError(f"SAELens has no equivalent of a {cfg.architecture} SAE; save it with layout='sparsify'")
    folder = ensure_dir(path)
    state = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in sae.state_dict().items()}
    mmsae_keys = {"architecture": cfg.architecture, "model": cfg.model, "layer": cfg.layer,
                  "hook_point": cfg.hook_point, "site": cfg.site, "input_scale": cfg.input_scale, "matryoshka_groups": cfg.matryoshka_groups,
                  "token_exclusion": cfg.token_exclusion}
    if layout == "sparsify":
        save_tensors(folder / SPARSIFY_WEIGHTS, state)
        write_json(folder / CFG, {
            "d_in": cfg.d_in, "num_latents": cfg.num_latents, "k": cfg.k,
            "expansion_factor": cfg.expansion_factor, "normalize_decoder": cfg.normalize_decoder,
            "activation": "topk", "multi_topk": False, "skip_connection": False, "transcode": False,
            "format": "mmsae", **mmsae_keys,
        })
    elif layout == "saelens":
        architecture = sae.arch.saelens
        tensors = {"W_enc": state.pop("encoder.weight").t().contiguous(), "b_enc": state.pop("encoder.bias"), **state}
        body = {"d_in": cfg.d_in, "d_sae": cfg.num_latents, "dtype": "float32", "device": "cpu",
                "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
                "architecture": architecture,
                "metadata": {"sae_lens_version": "6.0.0", "sae_lens_training_version": "6.0.0",
                             "model_name": cfg.model, "hook_name": cfg.hook_point, "hook_layer": cfg.layer,
                             "mmsae": {**mmsae_keys, "k": cfg.k}}}
        if architecture == "topk":
            body.update(k=cfg.k, rescale_acts_by_decoder_norm=False)
        save_tensors(folder / SAELENS_WEIGHTS, tensors)
        write_json(folder / CFG, body)
    else:
        raise MmsaeError(f"unknown SAE layout {layout!r}; use 'sparsify' or 'saelens'")


# --- loading -----------------------------------------------------------------------------------
def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises several types for a damaged file
        raise MmsaeError(f"{path} is not a readable safetensors file ({e}); re-save or re-download the SAE") from e


def _need(tensors: dict, names: list[str], path: Path) -> None:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise MmsaeError(f"{path} lacks tensors {', '.join(missing)}; it is not a complete SAE")


def _load_sparsify(folder: Path, cfg: dict) -> SparseAutoencoder:
    weights = folder / SPARSIFY_WEIGHTS
    if cfg.get("skip_connection") or cfg.get("transcode"):
        raise MmsaeError(f"{folder / CFG}: sparsify transcoders / skip connections are not supported; use a plain SAE")
    if cfg.get("activation", "topk") != "topk":
        raise MmsaeError(f"{folder / CFG}: sparsify activation {cfg.get('activation')!r} is not supported (only topk)")
    tensors = _read_tensors(weights)
    _need(tensors, ["encoder.weight", "encoder.bias", "W_dec", "b_dec"], weights)
    n, d = tensors["encoder.weight"].shape
    d_in = int(cfg.get("d_in", d))
    if d_in != d or tuple(tensors["W_dec"].shape) != (n, d):
        raise MmsaeError(f"{weights}: tensor shapes {tuple(tensors['encoder.weight'].shape)} / {tuple(tensors['W_dec'].shape)} do not match cfg d_in={d_in}")
    sae_cfg = SaeConfig(
        d_in=d, num_latents=n, k=int(cfg.get("k", 32)),
        architecture=cfg.get("architecture", "topk"), normalize_decoder=bool(cfg.get("normalize_decoder", True)),
        model=cfg.get("model"), layer=cfg.get("layer"), hook_point=cfg.get("hook_point"), site=cfg.get("site"),
        input_scale=float(cfg.get("input_scale", 1.0)), matryoshka_groups=cfg.get("matryoshka_groups"),
        token_exclusion=cfg.get("token_exclusion"))
    return _with_weights(sae_cfg, tensors, weights)


def _with_weights(sae_cfg: SaeConfig, tensors: dict, path: Path) -> SparseAutoencoder:
    sae = SparseAutoencoder(sae_cfg)
    _need(tensors, list(sae.state_dict()), path)  # e.g. a threshold architecture's threshold
    state = {k: v.to(torch.float32) for k, v in tensors.items() if k in sae.state_dict()}
    sae.load_state_dict(state, strict=True)
    return sae


def _saelens_layer(hook_name: str | None) -> int | None:
    """The decoder layer whose output a SAELens hook reads (hook_resid_pre of block L is the
    output of layer L - 1), or None."""
    match = re.search(r"(?:blocks|layers)\.(\d+)(\.hook_resid_pre$)?", hook_name or "")
    if not match:
        return None
    return int(match.group(1)) - (1 if match.group(2) else 0)


def _load_saelens(folder: Path, cfg: dict) -> SparseAutoencoder:
    weights = folder / SAELENS_WEIGHTS
    meta = dict(cfg.get("metadata") or {})
    mmsae_keys = meta.get("mmsae") or {}
    architecture = cfg.get("architecture")
    # SAELens < 6 kept TopK in activation_fn(_str) / activation_fn_kwargs and the hook at top level
    act_fn = cfg.get("activation_fn") or cfg.get("activation_fn_str")
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    if architecture is None:
        architecture = "topk" if act_fn == "topk" else "standard"
    if cfg.get("normalize_activations", "none") not in ("none", None, False):
        raise MmsaeError(f"{folder / CFG}: SAELens normalize_activations={cfg['normalize_activations']!r} is not supported; "
                         "fold the normalisation into the weights first (SAELens: fold_activation_norm_scaling_factor)")
    if cfg.get("finetuning_scaling_factor"):
        raise MmsaeError(f"{folder / CFG}: SAELens finetuning_scaling_factor is not supported")
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise MmsaeError(f"{folder / CFG}: SAELens reshape_activations={cfg['reshape_activations']!r} is not supported")
    tensors = _read_tensors(weights)
    _need(tensors, ["W_enc", "b_enc", "W_dec", "b_dec"], weights)
    d, n = tensors["W_enc"].shape
    if tuple(tensors["W_dec"].shape) != (n, d) or int(cfg.get("d_in", d)) != d:
        raise MmsaeError(f"{weights}: W_enc {tuple(tensors['W_enc'].shape)} / W_dec {tuple(tensors['W_dec'].shape)} do not match cfg d_in={cfg.get('d_in')}")
    w_enc = tensors["W_enc"].to(torch.float32)
    b_enc = tensors["b_enc"].to(torch.float32)
    b_dec = tensors["b_dec"].to(torch.float32)
    if not cfg.get("apply_b_dec_to_input", True):
        # pre = x W + b_enc = (x - b_dec) W + (b_enc + b_dec W): same SAE with a pre-encoder bias
        b_enc = b_enc + b_dec @ w_enc
    if architecture == "standard":  # a plain ReLU SAE is a JumpReLU with a zero threshold
        architecture, tensors["threshold"] = "jumprelu", torch.zeros(n)
    if architecture == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        raise MmsaeError(f"{folder / CFG}: SAELens rescale_acts_by_decoder_norm=True is not supported")
    # mmsae's own architecture when it wrote the file (BatchTopK saves as jumprelu), else SAELens' name
    ours = next((name for name in (mmsae_keys.get("architecture"), architecture)
                 if name in ARCHITECTURES and ARCHITECTURES[name].saelens == architecture), None)
    if ours is None:
        known = ", ".join(dict.fromkeys([*(a.saelens for a in ARCHITECTURES.values() if a.saelens), "standard"]))
        raise MmsaeError(f"{folder / CFG}: SAELens architecture {architecture!r} is not supported ({known})")
    if architecture != "topk":  # SAELens keeps no k for a threshold SAE: mmsae's, else a width for encode_sparse
        k = mmsae_keys.get("k") or k or min(n, 64)
    hook_name = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    # SAELens' hook_layer is the block of the hook (for hook_resid_pre one past mmsae's layer): the name says which
    layer = mmsae_keys.get("layer", _saelens_layer(hook_name))
    if layer is None:
        layer = meta.get("hook_layer", cfg.get("hook_point_layer", cfg.get("hook_layer")))
    sae_cfg = SaeConfig(
        d_in=d, num_latents=n, k=int(k or 32), architecture=ours,
        model=mmsae_keys.get("model") or meta.get("model_name") or cfg.get("model_name"),
        layer=layer,
        hook_point=mmsae_keys.get("hook_point") or hook_name, site=mmsae_keys.get("site"),
        input_scale=float(mmsae_keys.get("input_scale", 1.0)), matryoshka_groups=mmsae_keys.get("matryoshka_groups"),
        token_exclusion=mmsae_keys.get("token_exclusion"))
    tensors.update({"encoder.weight": w_enc.t().contiguous(), "encoder.bias": b_enc, "b_dec": b_dec})
    return _with_weights(sae_cfg, tensors, weights)


def _sub_folders_with_sae(folder: Path) -> list[Path]:
    return sorted(p.parent for p in folder.glob(f"*/{CFG}"))


def _load_folder(folder: Path, hook_point: str | None) -> SparseAutoencoder:
    cfg_path = folder / CFG
    if not cfg_path.exists():
        subs = _sub_folders_with_sae(folder)
        if not subs:
            raise MmsaeError(f"{folder} holds no cfg.json (nor sub-folders with one); it is not an SAE folder")
        if hook_point is not None:
            wanted = folder / hook_point
            if not (wanted / CFG).exists():
                raise MmsaeError(f"{folder} has no SAE for hook point {hook_point!r}; it has: {', '.join(p.name for p in subs)}")
            return _load_folder(wanted, hook_point)
        if len(subs) > 1:
            raise MmsaeError(f"{folder} holds SAEs for several hook points ({', '.join(p.name for p in subs)}); pass hook_point")
        return _load_folder(subs[0], subs[0].name)
    cfg = read_json(cfg_path)
    if not isinstance(cfg, dict):
        raise MmsaeError(f"{cfg_path} is not a JSON object; it is not an SAE config")
    if (folder / SPARSIFY_WEIGHTS).exists() and ("num_latents" in cfg or "expansion_factor" in cfg) and "d_in" in cfg:
        sae = _load_sparsify(folder, cfg)
    elif (folder / SAELENS_WEIGHTS).exists() and "d_sae" in cfg and "d_in" in cfg:
        sae = _load_saelens(folder, cfg)
    else:
        keys = ", ".join(sorted(cfg)[:8])
        raise MmsaeError(f"{folder}: unknown SAE format (cfg.json keys: {keys}); expected sparsify (cfg.json + sae.safetensors) "
                         "or SAELens (cfg.json + sae_weights.safetensors)")
    if hook_point is not None and sae.cfg.hook_point is None:
        sae.cfg.hook_point = hook_point
    return sae


def load_sae(path_or_hub_id, hook_point: str | None = None, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Load an SAE from a folder or a Hugging Face hub repo, detecting its layout.

    ``path_or_hub_id``: an SAE folder, a folder with one sub-folder per hook point, or a hub id
    (``owner/name`` or ``owner/name/sub/folder``). ``hook_point`` picks the sub-folder.
    """
    path = Path(path_or_hub_id)
    if not path.exists():
        path = _download(str(path_or_hub_id), hook_point)
    if path.is_file():
        path = path.parent
    sae = _load_folder(path, hook_point)
    return sae.to(device)


def _download(hub_id: str, hook_point: str | None) -> Path:
    parts = hub_id.strip("/").split("/")
    if len(parts) < 2 or not all(re.fullmatch(r"[\w.\-]+", p) for p in parts):
        raise MmsaeError(f"SAE {hub_id!r} is neither an existing folder nor a hub id (owner/name)")
    repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
    prefix = "/".join(p for p in (sub, hook_point) if p)
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo, allow_patterns=[f"{prefix}/*"] if prefix else None)
    except Exception as e:  # offline, missing repo, auth: all one message
        raise MmsaeError(f"cannot fetch SAE {hub_id!r} from the Hugging Face hub ({type(e).__name__}); download it and pass the folder") from e
    return Path(local) / sub if sub else Path(local)


def read_sae_cfg(path) -> dict:
    """The raw cfg.json of an SAE folder (for reports)."""
    return json.loads((Path(path) / CFG).read_text(encoding="utf-8"))
