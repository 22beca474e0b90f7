"""Measuring an SAE: reconstruction, sparsity, and the model's loss with the SAE spliced in.

Reconstruction (on a store, or on activations the model produces on --data): FVU and explained
variance, L0, dead and dense latent fractions, the latent density histogram.

Spliced loss (needs --model and --data): the model's next-token cross-entropy on text
positions when the SAE's reconstruction replaces the layer's output (a) at image positions only,
(b) at text positions only, (c) at both; against the clean model and against zero-ablation at
the same positions: CE increase, CE recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean) and
the KL divergence of the spliced next-token distribution from the clean one.

Every figure is split by token type (image / text / all). With a token-exclusion rule (the
options, or else the one the SAE was trained with: attention sinks, special tokens), every figure
is also given without those tokens (``*_without_excluded``; splicing leaves them as the model
made them). Output: ``metrics.json`` plus a printed table.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .config import check_config
from .errors import MmsaeError
from .exclusion import TokenExclusion, sequence_keep
from .io import check_own_file, write_json
from .models.sites import check_store_site
from .runtime import out_of_memory_guard, resolve_device
from .sae.formats import load_sae
from .sae.model import SparseAutoencoder

DENSE_FREQUENCY = 0.1  # a latent firing on more than 10% of tokens counts as dense
KINDS = ("all", "image", "text")


@dataclass
class EvaluateConfig:
    sae: str | list[str] = field(metadata={"help": "SAE folder(s) or hub id(s) (sparsify, SAELens or mmsae layout); several "
                                                   "share the model's forward pass and each gets OUT/<site>/metrics.json"})
    out: str = field(default="metrics.json", metadata={"help": "where to write metrics.json (a folder or a .json path)"})
    model: str | None = field(default=None, metadata={"help": "model id or folder (for the spliced-in loss and live activations)"})
    data: str | None = field(default=None, metadata={"help": "data source spec (image folder, .jsonl, HF dataset, shapes:N)"})
    activations: str | None = field(default=None, metadata={"help": "activation store to measure reconstruction on (instead of running the model)"})
    layer: int | None = field(default=None, metadata={"help": "layer to splice at if the SAE records no site (lm:LAYER)", "min": 0})
    hook_point: str | None = field(default=None, metadata={"help": "sub-folder of a multi-hook-point SAE repo"})
    max_samples: int = field(default=64, metadata={"help": "samples of --data to evaluate on", "min": 1})
    max_tokens: int = field(default=200_000, metadata={"help": "tokens of --activations to evaluate on", "min": 1})
    batch_size: int = field(default=8, metadata={"help": "samples per model forward pass", "min": 1})
    prompt: str | None = field(default=None, metadata={"help": "prompt for samples without text"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda"})
    histogram_bins: int = field(default=20, metadata={"help": "bins of the log10 latent density histogram", "min": 1})
    exclude_token_ids: list[int] | None = field(default=None, metadata={"help": "also report every figure without the tokens of these ids (default: the rule the SAE was trained with, if any)", "min": 0})
    exclude_norm_above: float | None = field(default=None, metadata={"help": "also report every figure without the tokens whose norm is above this multiple of their sequence's median token norm (default: the SAE's rule)", "gt": 1})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self):
        check_config(self)


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
                "alive_fraction": float((freq > 0).double().mean()),  # fired at least once on these tokens
                "dense_fraction": float((freq > DENSE_FREQUENCY).double().mean()),
                "density_histogram": {"log10_edges": [round(float(e), 4) for e in edges],
                                      "counts": [int(c) for c in counts], "dead": int((freq == 0).sum())}}


@torch.no_grad()
def _encode_batch(sae: SparseAutoencoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    values, indices = sae.encode_sparse(x)
    if sae.arch.at_most_k:
        recon = sae.decode_sparse(values, indices)
    else:  # threshold SAEs may fire more than k: decode densely
        latents = sae.encode(x)
        recon = sae.decode(latents)
        values, indices = latents, torch.arange(latents.shape[-1], device=x.device).expand_as(latents)
    return recon, values, indices


class _ReconByKind:
    """``_ReconStats`` per token type (all / image / text), over every token and, when there is an
    exclusion rule, over the tokens it keeps."""

    def __init__(self, d: int, n: int, rule: TokenExclusion):
        self.rule = rule
        self.every = {kind: _ReconStats(d, n) for kind in KINDS}
        self.kept = {kind: _ReconStats(d, n) for kind in KINDS} if rule else None

    def add(self, x, recon, values, indices, is_image: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        for stats, rows in ((self.every, None), (self.kept, keep)):
            if stats is None:
                continue
            if rows is not None:
                x, recon, values, indices, is_image = x[rows], recon[rows], values[rows], indices[rows], is_image[rows]
            stats["all"].add(x, recon, values, indices)
            stats["image"].add(x[is_image], recon[is_image], values[is_image], indices[is_image])
            stats["text"].add(x[~is_image], recon[~is_image], values[~is_image], indices[~is_image])

    def result(self, bins: int, where: str) -> dict:
        """``reconstruction`` and, with a rule, ``reconstruction_without_excluded`` and ``exclusion``."""
        out = {"reconstruction": {kind: s.result(bins) for kind, s in self.every.items()}}
        if self.kept is not None:
            self.rule.check_kept(self.kept["all"].count, where)
            out["reconstruction_without_excluded"] = {kind: s.result(bins) for kind, s in self.kept.items()}
            out["exclusion"] = {**self.rule.to_dict(),
                                "excluded_tokens": {kind: self.every[kind].count - self.kept[kind].count for kind in KINDS}}
        return out


def _store_reconstruction(sae: SparseAutoencoder, cfg: EvaluateConfig, device: torch.device, rule: TokenExclusion) -> dict:
    from .activations import ActivationStore

    store = ActivationStore(cfg.activations)
    check_store_site(sae, store.cfg["site"], f"SAE {cfg.sae}", f"store {cfg.activations}")
    if store.d != sae.cfg.d_in:
        raise MmsaeError(f"store {cfg.activations} has width {store.d} but the SAE expects d_in={sae.cfg.d_in}; use the matching SAE or store")
    stats = _ReconByKind(sae.cfg.d_in, sae.cfg.num_latents, rule)
    seen = 0
    for shard in tqdm(store.iter_shards(), total=len(store.shards), desc="evaluate", disable=not cfg.progress):
        # the rule sees whole samples (their median norm) before the token budget cuts the shard
        keep = rule.keep(shard["acts"].float().norm(dim=1), shard["sample"], shard.get("token")) if rule else None
        x = shard["acts"].float().to(device)[: cfg.max_tokens - seen]
        is_image = shard["is_image"][: x.shape[0]].to(device)
        keep = keep[: x.shape[0]].to(device) if keep is not None else None
        for start in range(0, x.shape[0], 4096):
            xb, ib = x[start:start + 4096], is_image[start:start + 4096]
            recon, values, indices = _encode_batch(sae, xb)
            stats.add(xb, recon, values, indices, ib, keep[start:start + 4096] if keep is not None else None)
        seen += x.shape[0]
        if seen >= cfg.max_tokens:
            break
    return stats.result(cfg.histogram_bins, f"store {cfg.activations}")


class _SplicedLoss:
    """One SAE's share of the model pass: its spliced next-token loss (with the reconstruction,
    and with zeros, at image / text / all rows of its site) and its reconstruction statistics."""

    def __init__(self, adapter, sae: SparseAutoencoder, site, rule: TokenExclusion, need_recon: bool):
        self.sae, self.site, self.rule, self.need_recon = sae, site, rule, need_recon
        self.lm = site.kind == "lm"
        if not self.lm and rule:
            raise MmsaeError(f"token exclusion ({rule.describe()}) is for lm sites; the SAE reads {site}, which holds image patches only")
        self.module = adapter.site_module(site)
        self.recon = _ReconByKind(sae.cfg.d_in, sae.cfg.num_latents, rule)
        # an lm site is spliced at the image tokens, the text tokens or both; a vision or projector
        # site holds the image patches only, so "image" and "all" are the same splice there
        self.kinds = KINDS if self.lm else ("all", "image")
        self.suffixes = ("", "_kept") if rule else ("",)  # _kept: spliced only where the rule keeps the token
        self.variants = tuple(f"{how}_{where}{s}" for how in ("sae", "zero") for where in self.kinds for s in self.suffixes)
        self.sums = {v: {"ce": 0.0, "kl": 0.0} for v in self.variants}
        self.excluded = dict.fromkeys(self.kinds, 0)

    def add(self, adapter, inputs, activation: torch.Tensor | None, image_mask, text_mask, clean, targets, log_probs) -> None:
        """One batch: ``activation`` is the site's clean output (None: the site never ran, e.g. a
        vision site on a batch without images), ``log_probs()`` the model's at the targets."""
        from .intervene import Rows, site_rows_mask, spliced

        if activation is None:
            splices = {}
        elif self.lm:
            ids = inputs.input_ids
            keep = sequence_keep(self.rule, activation, image_mask | text_mask, ids)
            flat, real = activation.reshape(-1, activation.shape[-1]).float(), (image_mask | text_mask).reshape(-1)
            x, is_image, kept = flat[real], image_mask.reshape(-1)[real], keep.reshape(-1)[real] if self.rule else None
            splices = {}
            for where, mask in (("image", image_mask), ("text", text_mask), ("all", image_mask | text_mask)):
                self.excluded[where] += int((mask & ~keep).sum())
                for suffix, at in (("", mask), ("_kept", mask & keep))[:len(self.suffixes)]:
                    splices[f"{where}{suffix}"] = Rows(prompt=at, generated=False, site=self.site)
        else:
            x, kept = adapter.site_rows(self.site, inputs).take(activation).float(), None
            is_image = torch.ones(len(x), dtype=torch.bool, device=x.device)
            patches = site_rows_mask(adapter, self.site, inputs, "image")
            splices = {"image": patches, "all": patches}
        if self.need_recon and splices:
            recon, values, indices = _encode_batch(self.sae, x)
            self.recon.add(x, recon, values, indices, is_image, kept)
        for name in self.variants:
            how, where = name.split("_", 1)
            logp = clean
            if where in splices:  # the reconstruction (or zeros) at these rows only
                with spliced(adapter, self.sae, site=self.site, replace=how, rows=splices[where]):
                    logp = log_probs()
            self.sums[name]["ce"] += float(-logp.gather(-1, targets[:, None]).sum())
            self.sums[name]["kl"] += float(F.kl_div(logp, clean, log_target=True, reduction="sum"))

    def result(self, ce_clean_sum: float, n_targets: int, bins: int, where_from: str) -> tuple[dict, dict | None]:
        """(``spliced`` entries, reconstruction entries or None), as metrics.json holds them."""
        ce_clean = ce_clean_sum / n_targets
        ce = {v: self.sums[v]["ce"] / n_targets for v in self.variants}
        out = {"site": str(self.site)}
        for suffix, name in zip(self.suffixes, ("spliced", "spliced_without_excluded")):
            spliced = {"targets": n_targets, "ce_clean": ce_clean}
            if suffix:
                spliced["excluded_positions"] = self.excluded  # spliced nowhere: the model's own activation stays
            for where in self.kinds:
                ce_sae, ce_zero = ce[f"sae_{where}{suffix}"], ce[f"zero_{where}{suffix}"]
                gap = ce_zero - ce_clean
                spliced[where] = {"ce_sae": ce_sae, "ce_zero_ablation": ce_zero, "ce_increase": ce_sae - ce_clean,
                                  "ce_recovered": (ce_zero - ce_sae) / gap if abs(gap) > 1e-9 else None,
                                  "kl_sae": self.sums[f"sae_{where}{suffix}"]["kl"] / n_targets,
                                  "kl_zero_ablation": self.sums[f"zero_{where}{suffix}"]["kl"] / n_targets}
            out[name] = spliced
        recon = self.recon.result(bins, where_from) if self.need_recon else None
        if recon is not None and not self.lm:  # no text rows at an image site
            del recon["reconstruction"]["text"]
        return out, recon


def _model_metrics(saes: list[SparseAutoencoder], rules: list[TokenExclusion], cfg: EvaluateConfig, device: torch.device,
                   need_recon: bool) -> list[tuple[dict, dict | None]]:
    """Per SAE: ``spliced`` (and with a rule ``spliced_without_excluded``: the excluded positions
    keep the model's own activation), and the reconstruction entries when ``need_recon``. The SAEs
    share each batch's clean forward pass (every site captured in it); each splice is a pass of its own."""
    from contextlib import ExitStack

    from .data.sources import DEFAULT_PROMPT, open_source
    from .hooks import capture
    from .intervene import span_positions
    from .models import load_adapter
    from .models.sites import check_sae_site

    adapter = load_adapter(cfg.model, device=str(device))
    losses = [_SplicedLoss(adapter, sae, check_sae_site(sae, adapter, cfg.layer), rule, need_recon)
              for sae, rule in zip(saes, rules)]
    source = open_source(cfg.data, prompt=cfg.prompt or DEFAULT_PROMPT)
    ce_clean, n_targets = 0.0, 0
    samples = list(source.samples(stop=cfg.max_samples))
    if not samples:
        raise MmsaeError(f"data {cfg.data} gave no samples")
    for start in tqdm(range(0, len(samples), cfg.batch_size), desc="evaluate", disable=not cfg.progress):
        batch = samples[start:start + cfg.batch_size]
        inputs = adapter.build_inputs([s.image for s in batch], [s.text for s in batch])
        ids = inputs.inputs["input_ids"]
        image_mask, text_mask = span_positions(inputs, "image"), span_positions(inputs, "text")
        # next-token targets: text positions t >= 1, predicted from t - 1
        target_mask = text_mask.clone()
        target_mask[:, 0] = False
        pred_mask = target_mask[:, 1:]
        targets = ids[:, 1:][pred_mask]
        n_targets += int(targets.numel())

        def log_probs() -> torch.Tensor:
            with torch.no_grad():
                logits = adapter.model(**inputs.inputs, use_cache=False).logits
            return logits[:, :-1][pred_mask].float().log_softmax(-1)

        with ExitStack() as stack:  # the clean pass, every SAE's site captured in it
            captured = [stack.enter_context(capture(loss.module)) for loss in losses]
            clean = log_probs()
        ce_clean += float(-clean.gather(-1, targets[:, None]).sum())
        for loss, record in zip(losses, captured):
            loss.add(adapter, inputs, record.outputs[0] if len(record) else None, image_mask, text_mask, clean, targets, log_probs)
    if n_targets == 0:
        raise MmsaeError(f"data {cfg.data} has no text positions to measure next-token loss on")
    return [loss.result(ce_clean, n_targets, cfg.histogram_bins, f"data {cfg.data}") for loss in losses]


def evaluate(cfg: EvaluateConfig) -> dict | list[dict]:
    """Measure an SAE; writes metrics.json and prints a table. Returns the metrics.

    Several SAEs (``--sae A B``, with ``--model`` and ``--data``) share each batch's clean forward
    pass; each gets ``OUT/<site>/metrics.json`` (``OUT/0``, ``OUT/1``, ... when two read one site),
    and the list of their metrics is returned."""
    from .models.sites import parse_site, recorded_site, site_dirnames

    device = resolve_device(cfg.device)
    names = [cfg.sae] if isinstance(cfg.sae, str) else list(cfg.sae)
    if not cfg.activations and not (cfg.model and cfg.data):
        raise MmsaeError("give --activations STORE, or --model and --data (or both)")
    if len(names) > 1:
        if cfg.activations or not (cfg.model and cfg.data):
            raise MmsaeError("several SAEs share the model's forward pass: give --model and --data, and no --activations "
                             "(evaluate each SAE on its own store separately)")
        if len(set(names)) < len(names) or cfg.layer is not None:
            raise MmsaeError(f"--sae {' '.join(names)}: give each SAE once, and no --layer (each SAE is evaluated at its own site)")
    out = Path(cfg.out)
    if len(names) > 1 and out.suffix == ".json":
        raise MmsaeError(f"--out {out}: with several SAEs --out is a folder (each gets OUT/<site>/metrics.json)")
    if len(names) == 1:  # checked before anything is loaded: a user's file is never replaced
        paths = [check_own_file(out if out.suffix == ".json" else out / "metrics.json", ("sae", "num_latents"))]
    saes = [load_sae(name, hook_point=cfg.hook_point, device=device).eval() for name in names]
    if len(saes) > 1:  # each SAE's folder is named by its site, which its cfg records
        sites = [parse_site(recorded_site(sae)) if recorded_site(sae) is not None else None for sae in saes]
        if None in sites:
            raise MmsaeError(f"SAE {names[sites.index(None)]} records no site; evaluate it alone with --layer")
        paths = [check_own_file(out / d / "metrics.json", ("sae", "num_latents")) for d in site_dirnames(sites)]
    all_metrics = [{"sae": str(name), "architecture": sae.cfg.architecture, "d_in": sae.cfg.d_in,
                    "num_latents": sae.cfg.num_latents, "k": sae.cfg.k, "model": cfg.model or sae.cfg.model,
                    "layer": cfg.layer if cfg.layer is not None else sae.cfg.layer, "hook_point": sae.cfg.hook_point}
                   for name, sae in zip(names, saes)]
    # with and without the tokens the options (or else the rule the SAE was trained with) leave out
    rules = [TokenExclusion.of(cfg) or TokenExclusion.from_dict(sae.cfg.token_exclusion) for sae in saes]
    with out_of_memory_guard("evaluate", device, "--batch-size", resumes=False):
        if cfg.activations:
            all_metrics[0].update(_store_reconstruction(saes[0], cfg, device, rules[0]))
            all_metrics[0]["reconstruction_source"] = str(cfg.activations)
        if cfg.model and cfg.data:
            results = _model_metrics(saes, rules, cfg, device, need_recon=not cfg.activations)
            for metrics, (spliced, recon) in zip(all_metrics, results):
                metrics.update(spliced)
                if recon is not None:
                    metrics.update(recon)
                    metrics["reconstruction_source"] = f"{cfg.model} on {cfg.data}"
                metrics["data"] = cfg.data
    for path, metrics in zip(paths, all_metrics):
        write_json(check_own_file(path, ("sae", "num_latents")), metrics)
        print(format_table(metrics), file=sys.stderr)
    return all_metrics[0] if len(all_metrics) == 1 else all_metrics


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
    rule = TokenExclusion.from_dict(metrics.get("exclusion")).describe()
    for name, title in (("reconstruction", None), ("reconstruction_without_excluded", f"without the tokens {rule} leaves out:")):
        recon = metrics.get(name)
        if recon:
            lines += [title] if title else []
            for key in ("tokens", "fvu", "explained_variance", "l0", "alive_fraction", "dead_fraction", "dense_fraction"):
                lines.append(f"{key:<26}" + "".join(f"{_fmt(recon.get(k, {}).get(key)):>12}" for k in kinds))
    for name, title in (("spliced", "spliced at positions of:"),
                        ("spliced_without_excluded", "spliced at positions of, excluded tokens left as they are:")):
        spliced = metrics.get(name)
        if spliced:
            if name == "spliced":
                lines.append(f"{'ce_clean (text targets)':<26}{_fmt(spliced['ce_clean']):>12}")
            lines.append(title)
            for key in ("ce_sae", "ce_increase", "ce_zero_ablation", "ce_recovered", "kl_sae", "kl_zero_ablation"):
                lines.append(f"{key:<26}" + "".join(f"{_fmt(spliced.get(k, {}).get(key)):>12}" for k in kinds))
    return "\n".join(lines)
