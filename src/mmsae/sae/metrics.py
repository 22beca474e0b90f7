"""Measuring an SAE: reconstruction, sparsity, and the model's loss with the SAE spliced in.

Reconstruction (on a store, or on activations the model produces on --data): FVU and explained
variance, L0, dead and dense latent fractions, the latent density histogram.

Spliced loss (needs --model and --data): the model's next-token cross-entropy on text
positions when the SAE's reconstruction replaces the layer's output (a) at image positions only,
(b) at text positions only, (c) at both; against the clean model and against zero-ablation at
the same positions: CE increase, CE recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean) and
the KL divergence of the spliced next-token distribution from the clean one.

Every figure is split by token type (image / text / all). Output: ``metrics.json`` plus a
printed table.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import MmsaeError
from ..io import write_json
from .formats import load_sae
from .model import SparseAutoencoder

DENSE_FREQUENCY = 0.1  # a latent firing on more than 10% of tokens counts as dense


@dataclass
class EvaluateConfig:
    sae: str = field(metadata={"help": "SAE folder or hub id (sparsify, SAELens or mmsae layout)"})
    out: str = field(default="metrics.json", metadata={"help": "where to write metrics.json (a folder or a .json path)"})
    model: str | None = field(default=None, metadata={"help": "model id or folder (for the spliced-in loss and live activations)"})
    data: str | None = field(default=None, metadata={"help": "data source spec (image folder, .jsonl, HF dataset, shapes:N)"})
    activations: str | None = field(default=None, metadata={"help": "activation store to measure reconstruction on (instead of running the model)"})
    layer: int | None = field(default=None, metadata={"help": "layer to splice at (default: the SAE's recorded layer)"})
    hook_point: str | None = field(default=None, metadata={"help": "sub-folder of a multi-hook-point SAE repo"})
    max_samples: int = field(default=64, metadata={"help": "samples of --data to evaluate on"})
    max_tokens: int = field(default=200_000, metadata={"help": "tokens of --activations to evaluate on"})
    batch_size: int = field(default=8, metadata={"help": "samples per model forward pass"})
    prompt: str | None = field(default=None, metadata={"help": "prompt for samples without text"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda"})
    histogram_bins: int = field(default=20, metadata={"help": "bins of the log10 latent density histogram"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})


class _ReconStats:
    """Streaming reconstruction statistics for one token type."""

    def __init__(self, d: int, n: int):
        self.count = 0
        self.sum_x = torch.zeros(d, dtype=torch.float64)
        self.sum_x2 = 0.0
        self.sum_err2 = 0.0
        self.sum_l0 = 0.0
        self.fires = torch.zeros(n, dtype=torch.float64)

    def add(self, x: torch.Tensor, recon: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> None:
        if x.shape[0] == 0:
            return
        x, recon = x.double().cpu(), recon.double().cpu()
        self.count += x.shape[0]
        self.sum_x += x.sum(0)
        self.sum_x2 += float(x.pow(2).sum())
        self.sum_err2 += float((recon - x).pow(2).sum())
        active = values > 0
        self.sum_l0 += float(active.sum())
        self.fires.index_add_(0, indices[active].cpu(), torch.ones(int(active.sum()), dtype=torch.float64))

    def result(self, bins: int) -> dict:
        if self.count == 0:
            return {"tokens": 0}
        variance = self.sum_x2 - float(self.sum_x.pow(2).sum()) / self.count
        fvu = self.sum_err2 / variance if variance > 0 else float("nan")
        freq = self.fires / self.count
        alive = freq[freq > 0]
        edges = torch.linspace(-math.log10(max(self.count, 10)), 0.0, bins + 1)
        counts = torch.histogram(alive.log10().float(), bins=edges).hist if len(alive) else torch.zeros(bins)
        return {"tokens": self.count, "fvu": fvu, "explained_variance": 1 - fvu, "mse": self.sum_err2 / self.count,
                "l0": self.sum_l0 / self.count, "dead_fraction": float((freq == 0).double().mean()),
                "dense_fraction": float((freq > DENSE_FREQUENCY).double().mean()),
                "density_histogram": {"log10_edges": [round(float(e), 4) for e in edges],
                                      "counts": [int(c) for c in counts], "dead": int((freq == 0).sum())}}


@torch.no_grad()
def _encode_batch(sae: SparseAutoencoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    values, indices = sae.encode_sparse(x)
    if sae.cfg.architecture == "topk":
        recon = sae.decode_sparse(values, indices)
    else:  # threshold SAEs may fire more than k: decode densely
        latents = sae.encode(x)
        recon = sae.decode(latents)
        values, indices = latents, torch.arange(latents.shape[-1], device=x.device).expand_as(latents)
    return recon, values, indices


def _store_reconstruction(sae: SparseAutoencoder, cfg: EvaluateConfig, device: torch.device) -> dict:
    from ..activations import ActivationStore

    store = ActivationStore(cfg.activations)
    if store.d != sae.cfg.d_in:
        raise MmsaeError(f"store {cfg.activations} has width {store.d} but the SAE expects d_in={sae.cfg.d_in}; use the matching SAE or store")
    stats = {kind: _ReconStats(sae.cfg.d_in, sae.cfg.num_latents) for kind in ("all", "image", "text")}
    seen = 0
    for shard in tqdm(store.iter_shards(), total=len(store.shards), desc="evaluate", disable=not cfg.progress):
        x = shard["acts"].float().to(device)[: cfg.max_tokens - seen]
        is_image = shard["is_image"][: x.shape[0]].to(device)
        for start in range(0, x.shape[0], 4096):
            xb, ib = x[start:start + 4096], is_image[start:start + 4096]
            recon, values, indices = _encode_batch(sae, xb)
            stats["all"].add(xb, recon, values, indices)
            stats["image"].add(xb[ib], recon[ib], values[ib], indices[ib])
            stats["text"].add(xb[~ib], recon[~ib], values[~ib], indices[~ib])
        seen += x.shape[0]
        if seen >= cfg.max_tokens:
            break
    return {kind: s.result(cfg.histogram_bins) for kind, s in stats.items()}


def _masks(layouts, shape, device) -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.zeros(shape, dtype=torch.bool, device=device)
    text = torch.zeros(shape, dtype=torch.bool, device=device)
    for i, layout in enumerate(layouts):
        image[i, layout.positions.to(device)] = True
        text[i, layout.text_positions.to(device)] = True
    return image, text


def _model_metrics(sae: SparseAutoencoder, cfg: EvaluateConfig, device: torch.device, need_recon: bool) -> tuple[dict, dict | None]:
    from ..data.sources import DEFAULT_PROMPT, open_source
    from ..hooks import edit
    from ..models import load_adapter

    adapter = load_adapter(cfg.model, device=str(device))
    layer = cfg.layer if cfg.layer is not None else sae.cfg.layer
    if layer is None:
        raise MmsaeError("the SAE does not record its layer; pass --layer")
    if not 0 <= layer < adapter.num_layers:
        raise MmsaeError(f"--layer {layer} is out of range: {cfg.model} has {adapter.num_layers} layers")
    if adapter.hidden_size != sae.cfg.d_in:
        raise MmsaeError(f"{cfg.model} layer {layer} has width {adapter.hidden_size} but the SAE expects d_in={sae.cfg.d_in}")
    module = adapter.layer_module(layer)
    source = open_source(cfg.data, prompt=cfg.prompt or DEFAULT_PROMPT)
    recon_stats = {kind: _ReconStats(sae.cfg.d_in, sae.cfg.num_latents) for kind in ("all", "image", "text")}
    variants = ("clean", *(f"{how}_{where}" for how in ("sae", "zero") for where in ("image", "text", "all")))
    sums = {v: {"ce": 0.0, "kl": 0.0} for v in variants}
    n_targets = 0
    samples = list(source.samples(stop=cfg.max_samples))
    if not samples:
        raise MmsaeError(f"data {cfg.data} gave no samples")
    for start in tqdm(range(0, len(samples), cfg.batch_size), desc="evaluate", disable=not cfg.progress):
        batch = samples[start:start + cfg.batch_size]
        inputs = adapter.build_inputs([s.image for s in batch], [s.text for s in batch])
        ids = inputs.inputs["input_ids"]
        image_mask, text_mask = _masks(inputs.layouts, ids.shape, ids.device)
        # next-token targets: text positions t >= 1, predicted from t - 1
        target_mask = text_mask.clone()
        target_mask[:, 0] = False
        pred_mask = target_mask[:, 1:]
        targets = ids[:, 1:][pred_mask]
        n_targets += int(targets.numel())
        captured = {}

        def run(fn=None):
            if fn is None:
                with torch.no_grad():
                    logits = adapter.model(**inputs.inputs, use_cache=False).logits
            else:
                with torch.no_grad(), edit(module, fn):
                    logits = adapter.model(**inputs.inputs, use_cache=False).logits
            return logits[:, :-1][pred_mask].float().log_softmax(-1)

        def clean_capture(hidden):
            captured["hidden"] = hidden
            return hidden

        clean = run(clean_capture)
        hidden = captured["hidden"]
        recon_full = sae(hidden.reshape(-1, hidden.shape[-1])).reshape(hidden.shape).to(hidden.dtype)
        if need_recon:
            flat = hidden.reshape(-1, hidden.shape[-1]).float()
            recon, values, indices = _encode_batch(sae, flat)
            img, txt = image_mask.reshape(-1), text_mask.reshape(-1)
            for kind, m in (("all", img | txt), ("image", img), ("text", txt)):
                recon_stats[kind].add(flat[m], recon[m], values[m], indices[m])
        sums["clean"]["ce"] += float(-clean.gather(-1, targets[:, None]).sum())
        for where, mask in (("image", image_mask), ("text", text_mask), ("all", image_mask | text_mask)):
            for how in ("sae", "zero"):
                replacement = recon_full if how == "sae" else torch.zeros_like(hidden)

                def splice(h, mask=mask, replacement=replacement):
                    return torch.where(mask[..., None], replacement, h)

                logp = run(splice)
                name = f"{how}_{where}"
                sums[name]["ce"] += float(-logp.gather(-1, targets[:, None]).sum())
                sums[name]["kl"] += float(F.kl_div(logp, clean, log_target=True, reduction="sum"))
    if n_targets == 0:
        raise MmsaeError(f"data {cfg.data} has no text positions to measure next-token loss on")
    ce = {v: sums[v]["ce"] / n_targets for v in variants}
    spliced = {"targets": n_targets, "ce_clean": ce["clean"]}
    for where in ("image", "text", "all"):
        ce_sae, ce_zero = ce[f"sae_{where}"], ce[f"zero_{where}"]
        gap = ce_zero - ce["clean"]
        spliced[where] = {"ce_sae": ce_sae, "ce_zero_ablation": ce_zero, "ce_increase": ce_sae - ce["clean"],
                          "ce_recovered": (ce_zero - ce_sae) / gap if abs(gap) > 1e-9 else None,
                          "kl_sae": sums[f"sae_{where}"]["kl"] / n_targets,
                          "kl_zero_ablation": sums[f"zero_{where}"]["kl"] / n_targets}
    recon = {kind: s.result(cfg.histogram_bins) for kind, s in recon_stats.items()} if need_recon else None
    return spliced, recon


def evaluate(cfg: EvaluateConfig) -> dict:
    """Measure an SAE; writes metrics.json and prints a table. Returns the metrics."""
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else ("cpu" if cfg.device == "auto" else cfg.device))
    if not cfg.activations and not (cfg.model and cfg.data):
        raise MmsaeError("give --activations STORE, or --model and --data (or both)")
    sae = load_sae(cfg.sae, hook_point=cfg.hook_point, device=device).eval()
    metrics: dict = {"sae": str(cfg.sae), "architecture": sae.cfg.architecture, "d_in": sae.cfg.d_in,
                     "num_latents": sae.cfg.num_latents, "k": sae.cfg.k, "model": cfg.model or sae.cfg.model,
                     "layer": cfg.layer if cfg.layer is not None else sae.cfg.layer, "hook_point": sae.cfg.hook_point}
    if cfg.activations:
        metrics["reconstruction"] = _store_reconstruction(sae, cfg, device)
        metrics["reconstruction_source"] = str(cfg.activations)
    if cfg.model and cfg.data:
        spliced, recon = _model_metrics(sae, cfg, device, need_recon=not cfg.activations)
        metrics["spliced"] = spliced
        if recon is not None:
            metrics["reconstruction"] = recon
            metrics["reconstruction_source"] = f"{cfg.model} on {cfg.data}"
        metrics["data"] = cfg.data
    out = Path(cfg.out)
    path = out if out.suffix == ".json" else out / "metrics.json"
    write_json(path, metrics)
    print(format_table(metrics), file=sys.stderr)
    return metrics


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.3g}"
    return str(value)


def format_table(metrics: dict) -> str:
    """The printed table: one row per metric, one column per token type."""
    kinds = ("all", "image", "text")
    lines = [f"SAE {metrics['sae']} ({metrics['architecture']}, {metrics['num_latents']} latents, k={metrics['k']})",
             f"{'metric':<26}" + "".join(f"{k:>12}" for k in kinds)]
    recon = metrics.get("reconstruction")
    if recon:
        for key in ("tokens", "fvu", "explained_variance", "l0", "dead_fraction", "dense_fraction"):
            lines.append(f"{key:<26}" + "".join(f"{_fmt(recon[k].get(key)):>12}" for k in kinds))
    spliced = metrics.get("spliced")
    if spliced:
        lines.append(f"{'ce_clean (text targets)':<26}{_fmt(spliced['ce_clean']):>12}")
        lines.append("spliced at positions of:")
        for key in ("ce_sae", "ce_increase", "ce_zero_ablation", "ce_recovered", "kl_sae", "kl_zero_ablation"):
            lines.append(f"{key:<26}" + "".join(f"{_fmt(spliced[k].get(key)):>12}" for k in kinds))
    return "\n".join(lines)
