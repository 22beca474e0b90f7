"""Training a sparse autoencoder on stored (or synthetic, or live) activations.

One step: encode (the architecture's ``train_encode``, see ``architectures``: TopK and BatchTopK
through the sparse kernels), decode, loss = FVU (+ AuxK for dead latents when
``auxk_coefficient`` > 0, or + an L0 penalty for JumpReLU), backward, project the decoder
gradient onto the rows' tangent space, Adam, renormalise decoder rows. Learning rate: linear
warm-up, constant, linear decay to zero over the last ``decay`` fraction of steps. The warm-up
and the dead window (after which a silent latent counts as dead, for AuxK and the optional
resampling) scale with the run's length unless given (``resolve_schedule``).

Matryoshka (``--matryoshka-groups`` / ``--matryoshka-fractions``, with topk or batchtopk): the
loss is the mean, over the nested prefixes of the latent groups, of the FVU of the
reconstruction from that prefix alone (its active latents plus ``b_dec``), so the first group
must reconstruct on its own (coarse features) and later groups refine it.

Exact resume: the data order is a pure function of (seed, step), and a checkpoint holds every
piece of state (weights, Adam moments, dead-latent counters, the BatchTopK threshold, the
input scale), so a resumed run ends with the same weights as an uninterrupted one.

Several processes: run under ``torchrun --nproc-per-node N -m mmsae.cli train ...``; each rank
reads its slice of every global batch, gradients are all-reduced (averaged) after backward, and
every normaliser (the batch variance, dead-latent firing, BatchTopK's cut-off) is reduced over
ranks, so N processes compute what one process computes on the same global batch.

Grids: several values of the options in ``GRID_OPTIONS`` (``--expansion 8 16 --k 16 32``) or
several stores train one SAE per combination and store, in its own folder under ``--out``; the
SAEs of one store step in turn on each batch, read once (see ``train``).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from .config import check_config, flag
from .errors import MmsaeError
from .exclusion import TokenExclusion
from .io import (append_jsonl, check_own_file, claim_dir, ensure_dir, read_json, read_jsonl, save_tensors, write_json,
                  write_text)
from .runtime import barrier, check_dtype, init_distributed, out_of_memory_guard, resolve_device
from .sae.architectures import ARCHITECTURES, all_gather_cat, get_architecture
from .sae.kernels import sparse_decode, sparse_decode_groups, sparse_encode
from .sae.formats import load_sae
from .sae.model import SaeConfig, SparseAutoencoder
from .activation_sources import ActivationSource, StoreSource, TensorSource, open_activation_source
from .models.sites import site_dirname

# options that take several values: one SAE per combination, all trained from one pass over the data
GRID_OPTIONS = ("architecture", "expansion", "num_latents", "k", "lr", "auxk_coefficient")


def _values(value) -> list:
    """An option's values: a grid option holds one value or a list of them."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


@dataclass
class TrainConfig:
    out: str = field(metadata={"help": "folder for the trained SAE (cfg.json + sae.safetensors), checkpoints/ and train_log.jsonl"})
    activations: str | list[str] | None = field(default=None, metadata={"help": "activation store folder (from `mmsae harvest`), or synthetic:d=64,m=256,k=4,tokens=100000; several stores (the sites of one harvest, e.g. DIR/lm-2 DIR/vision-1) train the grid once per store, into --out/SITE"})
    model: str | None = field(default=None, metadata={"help": "live mode: model id or folder to harvest from on the fly (instead of --activations)"})
    layer: int | None = field(default=None, metadata={"help": "live mode: the layer whose output to train on", "min": 0})
    data: str | None = field(default=None, metadata={"help": "live mode: data source spec (image folder, .jsonl, HF dataset, shapes:N)"})
    tokens: Literal["all", "image", "text"] = field(default="all", metadata={"help": "which stored tokens to train on"})
    exclude_token_ids: list[int] | None = field(default=None, metadata={"help": "leave out tokens with these ids (e.g. BOS; a store must record token ids); recorded in the SAE's cfg.json", "min": 0})
    exclude_norm_above: float | None = field(default=None, metadata={"help": "leave out tokens whose norm is above this multiple of their sequence's median token norm (attention sinks; e.g. 10); recorded in the SAE's cfg.json", "gt": 1})
    # the grid options (GRID_OPTIONS): several values train one SAE per combination, in one pass over the data
    expansion: int | list[int] = field(default=32, metadata={"help": "latents = expansion * activation width (several values: a grid)", "min": 1})
    num_latents: int | list[int] = field(default=0, metadata={"help": "number of latents (overrides --expansion when > 0; several values: a grid)", "min": 0})
    k: int | list[int] = field(default=32, metadata={"help": "active latents per token (TopK, BatchTopK; several values: a grid)", "min": 1})
    architecture: str | list[str] = field(default="topk", metadata={"help": f"SAE architecture: {', '.join(ARCHITECTURES)} (mmsae.sae.architectures; several: a grid)"})
    lr: float | list[float] | None = field(default=None, metadata={"help": "peak Adam learning rate (default 8e-4 / sqrt(latents / 2^14); several values: a grid)", "gt": 0})
    batch_size: int = field(default=4096, metadata={"help": "tokens per optimiser step (global, over all processes)", "min": 1})
    max_tokens: int | None = field(default=None, metadata={"help": "stop after this many tokens (default: one pass over the store)", "min": 1})
    steps: int | None = field(default=None, metadata={"help": "stop after this many steps (overrides --max-tokens)", "min": 1})
    warmup: int | None = field(default=None, metadata={"help": "linear learning-rate warm-up steps (default: 5% of the steps, at most 100, at least 1)", "min": 0})
    decay: float = field(default=0.2, metadata={"help": "fraction of the final steps over which the learning rate decays linearly to 0", "min": 0, "max": 1})
    seed: int = field(default=0, metadata={"help": "seed for the initialisation and the data order", "min": 0})
    checkpoint_every: int = field(default=500, metadata={"help": "write a resumable checkpoint every N steps", "min": 1})
    log_every: int = field(default=10, metadata={"help": "append a train_log.jsonl row every N steps", "min": 1})
    auxk_coefficient: float | list[float] = field(default=0.0, metadata={"help": "weight of the AuxK loss that revives dead latents (default 0: off; the literature's value is 1/32; several values: a grid)", "min": 0})
    dead_tokens: int | None = field(default=None, metadata={"help": "a latent is dead after this many tokens without firing; AuxK and resampling act on dead latents (default: a tenth of the run's tokens, at least 4 batches, at most 10M)", "min": 1})
    resample_every: int | None = field(default=None, metadata={"help": "every N steps, point dead latents at badly reconstructed inputs (Anthropic 2023 resampling; default: off)", "min": 1})
    resample_until: float = field(default=0.5, metadata={"help": "resample only during this first fraction of the run", "gt": 0, "max": 1})
    normalize_input: bool = field(default=True, metadata={"help": "scale inputs so their mean squared norm is d (folded back into the saved weights)"})
    b_dec_init: Literal["geometric_median", "mean", "zero"] = field(default="geometric_median", metadata={"help": "initial pre-encoder bias"})
    init_tokens: int = field(default=16384, metadata={"help": "tokens sampled for the input scale and b_dec initialisation", "min": 1})
    l0_coefficient: float = field(default=1e-3, metadata={"help": "JumpReLU: weight of the L0 penalty (per active latent)", "min": 0})
    jumprelu_bandwidth: float = field(default=0.05, metadata={"help": "JumpReLU: straight-through estimator bandwidth", "gt": 0})
    batchtopk_candidates: int = field(default=4, metadata={"help": "BatchTopK: per-token candidates = this * k (the global top-(k*batch) is taken among them)", "min": 1})
    matryoshka_groups: list[int] | None = field(default=None, metadata={"help": "Matryoshka: sizes of the nested latent groups, summing to the number of latents (every prefix of groups is trained to reconstruct alone; topk or batchtopk)", "min": 1})
    matryoshka_fractions: list[float] | None = field(default=None, metadata={"help": "Matryoshka: the groups as fractions of the latents, summing to 1 (instead of --matryoshka-groups)", "gt": 0, "max": 1})
    k_anneal_steps: int = field(default=0, metadata={"help": "TopK / BatchTopK: lower k linearly from the activation width to --k over the first N steps (dictionary_learning's k_anneal_steps; 0: off)", "min": 0})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    autocast: bool = field(default=False, metadata={"help": "run the encoder matmul in bfloat16 (GPU, or CPUs with bf16 support)"})
    resume: bool = field(default=True, metadata={"help": "continue from the latest checkpoint in --out when there is one"})
    keep_checkpoints: int = field(default=2, metadata={"help": "how many recent checkpoints to keep (0: all)", "min": 0})
    overwrite: bool = field(default=False, metadata={"help": "write into an --out folder that holds other files (they are kept; an SAE there is replaced)"})
    allow_partial: bool = field(default=False, metadata={"help": "train on a store whose harvest did not finish (only the tokens harvested so far)"})
    # live mode
    shuffle_buffer: int = field(default=262_144, metadata={"help": "live mode: tokens held in the shuffle buffer", "min": 1})
    model_batch_size: int = field(default=8, metadata={"help": "live mode: samples per model forward pass", "min": 1})
    max_samples: int | None = field(default=None, metadata={"help": "live mode: use at most this many samples of --data", "min": 1})
    prompt: str | None = field(default=None, metadata={"help": "live mode: prompt for samples without text"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self):
        for name in (*GRID_OPTIONS, "activations"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                if not value:
                    raise MmsaeError(f"{flag(name)} needs at least one value")
                # one value is a plain run, recorded exactly as a plain value (cfg.json, train_state.json)
                setattr(self, name, value[0] if len(value) == 1 else list(value))
        check_config(self)
        for arch in _values(self.architecture):
            get_architecture(arch)  # an unknown name fails here, before any work


# --- distributed ---------------------------------------------------------------------------------
def _all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


# --- the training module -------------------------------------------------------------------------
class SaeTrainingStep(nn.Module):
    """One training forward: (x, dead mask, global batch variance, world) -> (loss, parts)."""

    def __init__(self, sae: SparseAutoencoder, cfg: TrainConfig):
        super().__init__()
        self.sae = sae
        self.cfg = cfg
        groups = sae.cfg.matryoshka_groups
        # Matryoshka: each group's end latent (the last is the width)
        self.group_ends = torch.tensor(list(itertools.accumulate(groups)), device=sae.device) if groups else None
        self.k = sae.cfg.k  # this step's k (the loop lowers it to sae.cfg.k under --k-anneal-steps)

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None, total_variance: torch.Tensor, world: int):
        sae, cfg = self.sae, self.cfg
        centred = x - sae.b_dec
        codes = sae.arch.train_encode(sae, centred, self.k, cfg, world)
        values, indices = codes.values, codes.indices
        prefixes = None
        if indices is None:  # dense latents [B, n]
            recon = values @ sae.W_dec + sae.b_dec
            fired = (values > 0).any(0)
        else:
            if self.group_ends is None:
                recon = sparse_decode(values, indices, sae.W_dec) + sae.b_dec
            else:
                # Matryoshka: the reconstruction from each prefix of the groups [B, G, d], as
                # cumulative sums of each group's share (one sparse decode, not G)
                prefixes = sparse_decode_groups(values, indices, sae.W_dec, self.group_ends).cumsum(1) + sae.b_dec
                recon = prefixes[:, -1]
            # scatter, not boolean indexing: no host sync on a GPU
            fired = torch.zeros(sae.cfg.num_latents, device=x.device).scatter_reduce_(
                0, indices.reshape(-1), (values > 0).reshape(-1).float(), "amax") > 0
        l0_mean = (values > 0).sum(-1).float().mean()
        # normalised by the GLOBAL batch's variance, times world (DDP averages gradients)
        if prefixes is None:
            fvu_local = (recon - x).pow(2).sum() / total_variance
            loss = fvu_local * world
        else:
            # the mean of the prefixes' FVUs: one group gives the plain FVU, and AuxK keeps its weight
            prefix_fvus = (prefixes - x.unsqueeze(1)).pow(2).sum((0, 2)) / total_variance
            fvu_local = prefix_fvus[-1]
            loss = prefix_fvus.mean() * world
        if codes.penalty is not None:  # (a mean over the local tokens: the ranks' gradients are averaged)
            loss = loss + codes.penalty
        auxk = torch.zeros((), device=x.device)
        if dead_mask is not None and cfg.auxk_coefficient > 0 and sae.arch.auxk:
            dead = dead_mask.nonzero().squeeze(1)
            k_aux = min(sae.cfg.d_in // 2, dead.numel())
            if k_aux > 0:
                # AuxK: the top dead latents reconstruct the residual the live ones left
                aux_values, aux_idx = sparse_encode(centred, sae.encoder.weight[dead], sae.encoder.bias[dead], k_aux)
                aux_recon = sparse_decode(aux_values.relu(), aux_idx, sae.W_dec[dead])
                residual = (x - recon).detach()
                stats = torch.stack([residual.pow(2).sum(), *residual.sum(0)]).double()
                _all_reduce(stats)
                count = x.shape[0] * world
                res_var = (stats[0] - stats[1:].pow(2).sum() / count).clamp_min(1e-12).float()
                auxk = (aux_recon - residual).pow(2).sum() / res_var
                loss = loss + cfg.auxk_coefficient * auxk * world
        return loss, {"fvu_part": fvu_local.detach(), "l0": l0_mean.detach(), "fired": fired, "auxk_part": auxk.detach(), **codes.extra}


# --- initialisation ------------------------------------------------------------------------------
def geometric_median(points: torch.Tensor, iters: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm, started from the mean."""
    points = points.double()
    median = points.mean(0)
    for _ in range(iters):
        dist_ = (points - median).norm(dim=1).clamp_min(1e-8)
        weights = 1.0 / dist_
        new = (weights[:, None] * points).sum(0) / weights.sum()
        if (new - median).norm() <= tol * max(1.0, float(median.norm())):
            median = new
            break
        median = new
    return median.float()


def make_optimizer(sae: SparseAutoencoder, lr: float) -> torch.optim.Adam:
    """Adam; the fused implementation (one pass over each tensor) where this torch has it."""
    try:
        return torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)


def _lr_at(step: int, total: int, peak: float, warmup: int, decay: float) -> float:
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    decay_steps = int(total * decay)
    decay_start = total - decay_steps
    if decay_steps > 0 and step >= decay_start:
        return peak * max(0.0, (total - step) / decay_steps)
    return peak


# --- checkpoints ---------------------------------------------------------------------------------
def _checkpoint_dirs(out: Path) -> list[Path]:
    root = out / "checkpoints"
    if not root.exists():
        return []
    done = [p for p in root.glob("step-*") if (p / "state.json").exists() and (p / "state.safetensors").exists()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def _save_checkpoint(out: Path, step: int, sae: SparseAutoencoder, opt: torch.optim.Adam, state: dict, keep: int) -> None:
    root = ensure_dir(out / "checkpoints")
    tmp = root / f".tmp-step-{step:09d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    tensors = {f"model.{k}": v.detach().cpu() for k, v in sae.state_dict().items()}
    names = {id(p): n for n, p in sae.named_parameters()}
    opt_steps = {}
    for group in opt.param_groups:
        for p in group["params"]:
            s = opt.state.get(p)
            if s:
                n = names[id(p)]
                tensors[f"adam.{n}.exp_avg"] = s["exp_avg"].cpu()
                tensors[f"adam.{n}.exp_avg_sq"] = s["exp_avg_sq"].cpu()
                opt_steps[n] = float(s["step"])
    tensors["tokens_since_fired"] = state["tokens_since_fired"].cpu()
    save_tensors(tmp / "state.safetensors", tensors)
    write_json(tmp / "state.json", {"step": step, "tokens": state["tokens"], "input_scale": state["input_scale"],
                                    "threshold_initialised": state["threshold_initialised"], "resampled": state["resampled"],
                                    "adam_steps": opt_steps, "sae_cfg": sae.cfg.to_dict(), "train_cfg": state["train_cfg"]})
    final = root / f"step-{step:09d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in _checkpoint_dirs(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def _drop_checkpoints(out: Path) -> None:
    """Delete the checkpoints a train run wrote in ``out`` (complete or cut short); nothing else."""
    root = out / "checkpoints"
    for p in _checkpoint_dirs(out) + (list(root.glob(".tmp-step-*")) if root.exists() else []):
        shutil.rmtree(p, ignore_errors=True)
    if root.exists() and not any(root.iterdir()):
        root.rmdir()


def _is_train_folder(path: Path) -> bool:
    """An SAE folder a train run wrote before output folders were marked (for ``claim_dir``)."""
    return (path / "train_state.json").exists() or bool(_checkpoint_dirs(path))


def _load_checkpoint(path: Path, sae: SparseAutoencoder, opt: torch.optim.Adam, device: torch.device) -> dict:
    from safetensors.torch import load_file

    meta = read_json(path / "state.json")
    tensors = load_file(str(path / "state.safetensors"))
    sae.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    # fused / capturable Adam keeps its step counts on the parameters' device, plain Adam on the CPU
    on_device = any(group.get("fused") or group.get("capturable") for group in opt.param_groups)
    for n, p in sae.named_parameters():
        if f"adam.{n}.exp_avg" in tensors:
            opt.state[p] = {"step": torch.tensor(meta["adam_steps"][n], dtype=torch.float32, device=p.device if on_device else "cpu"),
                            "exp_avg": tensors[f"adam.{n}.exp_avg"].to(device),
                            "exp_avg_sq": tensors[f"adam.{n}.exp_avg_sq"].to(device)}
    meta["tokens_since_fired"] = tensors["tokens_since_fired"].to(device)
    return meta


# --- the loop ------------------------------------------------------------------------------------
_IDENTITY_KEYS = ("architecture", "k", "expansion", "num_latents", "batch_size", "seed", "normalize_input", "b_dec_init",
                  "matryoshka_groups", "matryoshka_fractions", "exclude_token_ids", "exclude_norm_above")


def _check_resumable(meta: dict, cfg: TrainConfig, d: int, ckpt: Path) -> None:
    saved = meta["train_cfg"]
    if meta["sae_cfg"]["d_in"] != d:
        raise MmsaeError(f"checkpoint {ckpt} is for activations of width {meta['sae_cfg']['d_in']} but the data has width {d}; "
                         "use a new --out or the matching activations")
    changed = [k for k in _IDENTITY_KEYS if json.dumps(saved.get(k)) != json.dumps(getattr(cfg, k))]  # tuples as lists
    if changed:
        raise MmsaeError(f"checkpoint {ckpt} was written with different {', '.join(changed)}; rerun with the same options, "
                         "--no-resume, or a new --out")


def train(cfg: TrainConfig, source: ActivationSource | torch.Tensor | None = None,
          on_step: Callable[[int], None] | None = None) -> SparseAutoencoder | dict[str, SparseAutoencoder]:
    """Train an SAE into ``cfg.out`` (cfg.json + sae.safetensors + train_log.jsonl); returns it, as saved.

    ``source`` overrides ``cfg.activations`` (an in-memory [tokens, d] tensor or a source).
    ``on_step(steps_done)`` is called at the end of every step (after its log row and checkpoint);
    what it raises stops the run like a crash would (tests use it to interrupt one).

    A grid (several values of an option in ``GRID_OPTIONS``, or several activation stores) trains
    one SAE per combination and store, each in its own folder under ``cfg.out`` (``OUT/x8-k16``,
    ``OUT/lm-2/x8-k16``; see ``grid_member_name``), and returns ``{folder under OUT: SAE}``.
    The SAEs of one store train side by side on the same batches, each batch read once; each
    keeps its own optimiser, schedule, dead-latent counters, checkpoints and log, so it ends with
    the weights it would have reached alone, and a rerun resumes every member. ``OUT/grid.json``
    and ``OUT/grid.md`` summarise the members (also printed). A member that diverges stops alone;
    the others finish, then the run fails naming it.
    """
    device = resolve_device(cfg.device)
    if cfg.autocast:
        check_dtype(torch.bfloat16, device, "--autocast")
    rank, world = init_distributed(device, "train")  # (without the group each rank would train alone on its slice)
    if cfg.batch_size % world:
        raise MmsaeError(f"--batch-size {cfg.batch_size} must be divisible by the number of processes ({world})")
    local_batch = cfg.batch_size // world
    out = Path(cfg.out)
    combos = grid_combinations(cfg)
    specs = _values(cfg.activations)
    if source is not None and len(specs) > 1:
        raise MmsaeError("give one activation source: source= or several --activations stores, not both")
    sources = [_open_source(replace(cfg, activations=spec) if len(specs) > 1 else cfg, source) for spec in specs]
    site_dirs = _site_dirs(sources, specs) if len(sources) > 1 else [""]
    grid = len(combos) > 1 or len(sources) > 1
    # every member's plan (and so every bad option) before any work: (folder under OUT, cfg, SaeConfig)
    groups: list[tuple[ActivationSource, list[tuple[str, TrainConfig, SaeConfig]], int]] = []
    for spec, src, site_dir in zip(specs, sources, site_dirs):
        members = []
        for name, member_cfg in combos:
            rel = "/".join(part for part in (site_dir, name) if part)
            if grid:
                member_cfg = replace(member_cfg, out=str(out / rel), activations=spec)
            member_cfg, sae_cfg, total_steps = _plan(member_cfg, src)
            members.append((rel, member_cfg, sae_cfg))
        groups.append((src, members, total_steps))
    everyone = [m for _, members, _ in groups for m in members]
    if rank == 0:
        _claim_outputs(out, everyone, grid, cfg.overwrite)
        if grid:  # written first, so the folder says it is a grid even if interrupted
            write_json(out / "grid.json", {"complete": False, "members": [_grid_row(out, m, "pending") for m in everyone]})

    threads = torch.get_num_threads()
    failed: dict[str, str] = {}
    try:  # (checkpoints written before running out of memory stay: a rerun resumes from the last)
        settings = "--batch-size or --expansion (--num-latents)" + (", or train fewer SAEs at once" if grid else "")
        with out_of_memory_guard("train", device, settings):
            for src, members, total_steps in groups:
                failed.update(_train(members, src, rank, world, device, local_batch, total_steps, threads, on_step, grid))
    finally:
        torch.set_num_threads(threads)
    if not grid:
        return load_sae(out)
    if rank == 0:
        _write_grid_summary(out, everyone, failed)
    barrier(world)
    if failed:
        raise MmsaeError(f"{len(failed)} of {len(everyone)} SAEs diverged ({'; '.join(f'{k}: {v}' for k, v in failed.items())}); "
                         f"lower --lr for them; the others are done (see {out / 'grid.md'})")
    return {rel: load_sae(member_cfg.out) for rel, member_cfg, _ in everyone}


def _open_source(cfg: TrainConfig, source: ActivationSource | torch.Tensor | None) -> ActivationSource:
    """The activation source of ``cfg`` (one store, synthetic, live) or the given one, checked."""
    if isinstance(source, torch.Tensor):
        source = TensorSource(source)
    source = source or open_activation_source(cfg)
    if TokenExclusion.of(cfg) and isinstance(source, TensorSource):
        raise MmsaeError(f"{TokenExclusion.of(cfg).describe()} needs an activation store or a live model; in-memory activations have no sequences")
    if isinstance(source, StoreSource) and not source.store.complete and not cfg.allow_partial:
        raise MmsaeError(f"activation store {source.store.path} is incomplete (its harvest did not finish); rerun the same "
                         "'mmsae harvest' to complete it, or pass --allow-partial to train on what it holds")
    return source


def _plan(cfg: TrainConfig, source: ActivationSource) -> tuple[TrainConfig, SaeConfig, int]:
    """One SAE's settings on ``source``: (cfg with its schedule resolved, its SaeConfig, its steps);
    a bad combination (k above the latents, a schedule longer than the run, a checkpoint of other
    options in its folder) fails here, before any work."""
    d = source.d
    n_latents = cfg.num_latents or d * cfg.expansion
    if cfg.k > n_latents:
        raise MmsaeError(f"--k {cfg.k} is larger than the number of latents ({n_latents}); lower --k or raise --expansion")
    sae_cfg = SaeConfig(d_in=d, num_latents=n_latents, k=cfg.k, expansion_factor=cfg.expansion, architecture=cfg.architecture,
                        model=source.model, layer=source.layer, hook_point=source.hook_point, site=source.site,
                        matryoshka_groups=matryoshka_group_sizes(cfg, n_latents),
                        token_exclusion=source.exclusion.to_dict() if source.exclusion else None)
    if cfg.steps is not None:
        total_steps = cfg.steps
    elif cfg.max_tokens is not None:
        total_steps = cfg.max_tokens // cfg.batch_size
    else:
        total_steps = (source.n_tokens or 0) // cfg.batch_size
    if total_steps <= 0:
        raise MmsaeError(f"nothing to train: {source.n_tokens} tokens at --batch-size {cfg.batch_size} is less than one step; "
                         "lower --batch-size or pass --steps")
    cfg = resolve_schedule(cfg, total_steps)
    resample_steps(cfg, total_steps)  # a schedule longer than the run fails here, before any work
    checkpoints = _checkpoint_dirs(Path(cfg.out)) if cfg.resume else []
    if checkpoints:
        _check_resumable(read_json(checkpoints[-1] / "state.json"), cfg, d, checkpoints[-1])
    return cfg, sae_cfg, total_steps


def _claim_outputs(out: Path, members: list[tuple[str, TrainConfig, SaeConfig]], grid: bool, overwrite: bool) -> None:
    """Make ``out`` (and, for a grid, each member's folder) this run's; a single SAE's folder is
    never reused for a grid nor a grid's for a single SAE."""
    if grid:
        if (out / "cfg.json").exists() or _is_train_folder(out):
            raise MmsaeError(f"{out} holds a single SAE, but a grid trains one SAE per folder under --out; choose a new --out")
        claim_dir(out, "train", overwrite)
        check_own_file(out / "grid.json", ("members",))
        check_own_file(out / "grid.md", prefix=GRID_MD_TITLE)
    elif (out / "grid.json").exists():
        raise MmsaeError(f"{out} holds a grid of SAEs (grid.json); rerun the grid's options to resume it, train one member "
                         "in its own folder, or choose a new --out")
    for _, member_cfg, _ in members:
        folder = Path(member_cfg.out)
        claim_dir(folder, "train", overwrite, legacy=_is_train_folder)
        for name, keys in (("cfg.json", ("d_in",)), ("train_log.jsonl", ("step",)), ("train_state.json", ("steps",))):
            check_own_file(folder / name, keys)  # this run replaces them: never a user's file of that name


# --- grids ---------------------------------------------------------------------------------------
GRID_MD_TITLE = "# mmsae train grid"


def grid_member_name(settings: dict, varying: set[str]) -> str:
    """A grid member's folder under ``--out``: its size and k (``x8-k16``, or ``n4096-k16`` where
    ``--num-latents`` gives the size), led by the architecture and followed by ``lr...`` and
    ``auxk...`` where those vary in the grid (``batchtopk-x8-k16-lr0.001``)."""
    parts = [settings["architecture"]] if "architecture" in varying else []
    parts += [f"n{settings['num_latents']}" if settings["num_latents"] else f"x{settings['expansion']}", f"k{settings['k']}"]
    if "lr" in varying:
        parts.append(f"lr{settings['lr']:g}")
    if "auxk_coefficient" in varying:
        parts.append(f"auxk{settings['auxk_coefficient']:g}")
    return "-".join(parts)


def grid_combinations(cfg: TrainConfig) -> list[tuple[str, TrainConfig]]:
    """``(folder name, cfg with one value per option)`` for every combination of the values of
    ``GRID_OPTIONS``; ``[("", cfg)]`` when each option has one value (a plain run)."""
    values = {name: _values(getattr(cfg, name)) for name in GRID_OPTIONS}
    if all(len(v) == 1 for v in values.values()):
        return [("", cfg)]
    for name, v in values.items():
        if len(set(v)) < len(v):
            raise MmsaeError(f"{flag(name)} {' '.join(map(str, v))} names a value twice; give each value of a grid once")
    varying = {name for name, v in values.items() if len(v) > 1}
    combos: dict[str, TrainConfig] = {}
    for combo in itertools.product(*values.values()):
        settings = dict(zip(values, combo))
        name = grid_member_name(settings, varying)
        if name in combos:  # e.g. several --expansion with --num-latents, which overrides it
            raise MmsaeError(f"the grid holds {name} twice: --expansion has no effect where --num-latents is given; "
                             "give several values to one of them")
        combos[name] = replace(cfg, **settings)
    return list(combos.items())


def _site_dirs(sources: list[ActivationSource], specs: list[str | None]) -> list[str]:
    """The folder of each of several stores under ``--out``: its site (``lm-2``, ``vision-1``);
    the stores must be of one model and at different sites."""
    sites = {}
    for source, spec in zip(sources, specs):
        if not isinstance(source, StoreSource):
            raise MmsaeError(f"several --activations must all be activation stores; {spec} is not")
        site = source.site or (f"lm:{source.layer}" if source.layer is not None else None)
        if site is None:
            raise MmsaeError(f"activation store {spec} records no site or layer; train it on its own")
        if site in sites:
            raise MmsaeError(f"activation stores {sites[site]} and {spec} are both at {site}; give each site once")
        sites[site] = spec
    models = {str(s.model) for s in sources}
    if len(models) > 1:
        raise MmsaeError(f"the --activations stores come from different models ({', '.join(sorted(models))}); "
                         "train each model's stores in its own run")
    return [site_dirname(site) for site in sites]


def _grid_row(out: Path, member: tuple[str, TrainConfig, SaeConfig], status: str) -> dict:
    """One member's line of the grid summary: its settings and, once trained, its final figures
    (the last train_log.jsonl row: the mean over the last --log-every steps)."""
    rel, cfg, sae_cfg = member
    folder = out / rel
    row = {"folder": rel, "site": sae_cfg.site, "architecture": cfg.architecture, "latents": sae_cfg.num_latents,
           "k": cfg.k, "lr": cfg.lr, "auxk_coefficient": cfg.auxk_coefficient, "status": status}
    if status == "pending":
        return row
    log = read_jsonl(folder / "train_log.jsonl")
    last = log[-1] if log else {}
    state = read_json(folder / "train_state.json") if status == "done" else {}
    row.update(lr=state.get("lr", cfg.lr), steps=last.get("step"), tokens=last.get("tokens"), fvu=last.get("fvu"),
               l0=last.get("l0"), dead_fraction=last.get("dead_fraction"), seconds=state.get("run_seconds"))
    return row


def _write_grid_summary(out: Path, members: list[tuple[str, TrainConfig, SaeConfig]], failed: dict[str, str]) -> None:
    """``OUT/grid.json`` (one row per member) and ``OUT/grid.md`` (the same as a table, printed)."""
    rows = [_grid_row(out, m, failed.get(m[0], "done")) for m in members]
    write_json(out / "grid.json", {"complete": not failed, "members": rows})
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    lines = [f"{GRID_MD_TITLE}: {out}", "",
             "| SAE | site | architecture | latents | k | lr | FVU | L0 | dead | seconds | status |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['folder']} | {r['site'] or '-'} | {r['architecture']} | {r['latents']} | {r['k']} | {fmt(r['lr'], '.3g')} "
                     f"| {fmt(r['fvu'], '.4f')} | {fmt(r['l0'], '.1f')} | {fmt(r['dead_fraction'], '.3f')} "
                     f"| {fmt(r['seconds'], '.1f')} | {r['status']} |")
    text = "\n".join(lines) + "\n"
    write_text(out / "grid.md", text)
    print(text, end="")


def matryoshka_group_sizes(cfg: TrainConfig, n_latents: int) -> list[int] | None:
    """The Matryoshka group sizes: ``--matryoshka-groups``, or ``--matryoshka-fractions`` of the
    width (cumulative fractions rounded, so the sizes sum exactly to it); None for a plain SAE."""
    fractions = cfg.matryoshka_fractions
    if fractions is None:
        return cfg.matryoshka_groups  # SaeConfig checks that they sum to the width
    if cfg.matryoshka_groups is not None:
        raise MmsaeError("pass --matryoshka-groups or --matryoshka-fractions, not both")
    if not fractions or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-6:
        raise MmsaeError(f"--matryoshka-fractions {' '.join(map(str, fractions))} must be positive and sum to 1 (they sum to {sum(fractions):g})")
    ends = [round(c * n_latents) for c in itertools.accumulate(fractions)]
    ends[-1] = n_latents
    sizes = [end - start for start, end in zip([0, *ends[:-1]], ends)]
    if min(sizes) <= 0:
        raise MmsaeError(f"--matryoshka-fractions {' '.join(map(str, fractions))} leave a group empty at {n_latents} latents; "
                         "use larger fractions or more latents")
    return sizes


# --- schedules that scale with the run ------------------------------------------------------------
# sparsify and dictionary_learning call a latent dead after 10M tokens without firing (SAELens
# counts a window of steps) and warm up over 1000 steps or so: right for a billion-token run,
# but a 250k-token run then never sees a dead latent and spends its steps warming up.
DEAD_TOKENS_CAP = 10_000_000
WARMUP_CAP = 100
# Anthropic (2023) gave resampled encoder rows 0.2 x the mean alive encoder norm, for a ReLU SAE
# where any positive pre-activation fires. Under TopK such rows never reach the top k (measured on
# synthetic data, 200 steps, AuxK off: 0 of 64 dead latents revived at 0.2, 64 of 64 at 1.0).
RESAMPLE_ENCODER_SCALE = 1.0


def resolve_schedule(cfg: TrainConfig, total_steps: int) -> TrainConfig:
    """``cfg`` with the warm-up and the dead window derived from the run's length where they are None.

    Warm-up: 5% of the steps, at least 1, at most 100. Dead window: a tenth of the run's tokens
    (so AuxK and resampling act several times in a short run), at least 4 batches, at most 10M
    tokens (the common default, reached by runs of 100M tokens and more).
    """
    warmup = cfg.warmup if cfg.warmup is not None else max(1, min(WARMUP_CAP, total_steps // 20))
    dead = cfg.dead_tokens
    if dead is None:
        dead = min(DEAD_TOKENS_CAP, max(total_steps * cfg.batch_size // 10, 4 * cfg.batch_size))
    return replace(cfg, warmup=warmup, dead_tokens=dead)


def resample_steps(cfg: TrainConfig, total_steps: int) -> list[int]:
    """The steps before which dead latents are resampled: every ``resample_every`` steps within
    the first ``resample_until`` of the run (none when resampling is off)."""
    if cfg.resample_every is None:
        return []
    last = min(int(cfg.resample_until * total_steps), total_steps - 1)  # (TrainConfig checks the bounds of both)
    steps = list(range(cfg.resample_every, last + 1, cfg.resample_every))
    if not steps:
        raise MmsaeError(f"--resample-every {cfg.resample_every} is longer than the resampling part of the run "
                         f"({last} of {total_steps} steps at --resample-until {cfg.resample_until}); lower --resample-every")
    return steps


@torch.no_grad()
def resample_dead_latents(sae: SparseAutoencoder, opt: torch.optim.Optimizer, x: torch.Tensor, dead: torch.Tensor,
                          generator: torch.Generator) -> torch.Tensor:
    """Point the ``dead`` latents at badly reconstructed inputs of ``x`` (Anthropic, "Towards
    Monosemanticity", 2023); returns their indices.

    Each dead latent draws an input with probability proportional to the square of the input's
    loss (its squared reconstruction error); its decoder row becomes the unit vector along ``input - b_dec``, its encoder
    row that vector times the mean encoder norm of the alive latents (``RESAMPLE_ENCODER_SCALE``;
    Anthropic used 0.2 for a ReLU SAE), its bias 0, and the
    Adam moments of those rows restart from zero.
    """
    idx = dead.nonzero().squeeze(1)
    if idx.numel() == 0:
        return idx
    error = (sae.decode_sparse(*sae.encode_sparse(x)) - x).pow(2).sum(-1)
    weights = error.double().pow(2).cpu()
    if not bool(weights.sum() > 0):
        weights = torch.ones_like(weights)
    # distinct inputs where there are enough to draw from (duplicates would make twin latents)
    replace = int((weights > 0).sum()) < idx.numel()
    picks = torch.multinomial(weights, idx.numel(), replacement=replace, generator=generator).to(x.device)
    directions = x[picks] - sae.b_dec
    directions = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-8)
    alive = ~dead
    enc_norm = sae.encoder.weight[alive].norm(dim=1).mean() if bool(alive.any()) else torch.ones((), device=x.device)
    sae.W_dec[idx] = directions.to(sae.W_dec.dtype)
    sae.encoder.weight[idx] = (directions * RESAMPLE_ENCODER_SCALE * enc_norm).to(sae.encoder.weight.dtype)
    sae.encoder.bias[idx] = 0
    for p in (sae.W_dec, sae.encoder.weight, sae.encoder.bias):
        state = opt.state.get(p)
        if state:
            state["exp_avg"][idx] = 0
            state["exp_avg_sq"][idx] = 0
    return idx


def annealed_k(cfg: TrainConfig, sae_cfg: SaeConfig, step: int) -> int:
    """The k of training step ``step``: from the activation width (at most the latents) down to
    ``--k``, linearly over the first ``--k-anneal-steps`` (dictionary_learning's k annealing). A
    dense start lets every latent see every token before sparsity fixes which latent takes which
    feature (in the Matryoshka ground-truth test, it makes the first group find all the parents)."""
    if step >= cfg.k_anneal_steps:
        return sae_cfg.k
    start = max(sae_cfg.k, min(sae_cfg.d_in, sae_cfg.num_latents))
    return round(start + (sae_cfg.k - start) * step / cfg.k_anneal_steps)


# below this many weights per matrix, one thread is faster (thread sync dominates)
_SMALL_PROBLEM = 1 << 18


class _Diverged(MmsaeError):
    """A member's loss became non-finite (its data was finite): in a grid only that member stops."""


class _Member:
    """One SAE being trained: its options (schedule resolved), folder, weights, optimiser and state."""

    def __init__(self, rel: str, cfg: TrainConfig, sae_cfg: SaeConfig, device: torch.device):
        self.rel, self.cfg, self.out = rel, cfg, Path(cfg.out)
        torch.manual_seed(cfg.seed)
        self.sae = SparseAutoencoder(sae_cfg, device=device)
        self.sae.reset_parameters(torch.Generator().manual_seed(cfg.seed))
        n_latents = sae_cfg.num_latents
        # 4x the 2e-4 of Gao et al. (2024): with AuxK off, it lowered held-out FVU in 30- and 300-step
        # runs on real demo and text stores (bench/bench_sae_quality.py); with AuxK on, the demo's
        # attention-sink residual drew the dead latents' AuxK updates and left more of them dead
        self.peak_lr = cfg.lr if cfg.lr is not None else 8e-4 / math.sqrt(n_latents / 2**14)
        self.opt = make_optimizer(self.sae, self.peak_lr)
        self.state = {"tokens": 0, "input_scale": 1.0, "threshold_initialised": False, "train_cfg": asdict(cfg),
                      "tokens_since_fired": torch.zeros(n_latents, dtype=torch.long, device=device), "resampled": 0}
        self.model = SaeTrainingStep(self.sae, cfg)
        self.log = _LogAccumulator()
        self.start_step = 0
        # tiny matrices: thread hand-offs cost more than the work
        self.one_thread = device.type == "cpu" and n_latents * sae_cfg.d_in < _SMALL_PROBLEM
        self.seconds = 0.0  # this session's time in its own steps
        self.failed: str | None = None

    def resume(self, ckpt: Path, rank: int, device: torch.device) -> None:
        """Continue from checkpoint ``ckpt`` (``_plan`` checked that it is this SAE's)."""
        meta = _load_checkpoint(ckpt, self.sae, self.opt, device)
        self.start_step = meta["step"]
        self.state.update(tokens=meta["tokens"], input_scale=meta["input_scale"], threshold_initialised=meta["threshold_initialised"],
                          tokens_since_fired=meta["tokens_since_fired"], resampled=meta.get("resampled", 0))
        if rank == 0 and (self.out / "train_log.jsonl").exists():
            # rows logged after the checkpoint are redone by this run
            kept = [r for r in read_jsonl(self.out / "train_log.jsonl") if r.get("step", 0) <= self.start_step]
            write_text(self.out / "train_log.jsonl", "".join(json.dumps(r) + "\n" for r in kept))

    def step(self, batch: torch.Tensor, step: int, total_steps: int, resample_at: set[int], source: ActivationSource,
             rank: int, world: int) -> dict | None:
        """Train on one batch (raw, unscaled); returns the log row when this step writes one."""
        cfg, state, sae = self.cfg, self.state, self.sae
        x = batch * state["input_scale"]
        if step in resample_at:
            state["resampled"] += _resample(sae, self.opt, x, state, cfg, step)
        lr = _lr_at(step, total_steps, self.peak_lr, cfg.warmup, cfg.decay)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.model.k = annealed_k(cfg, sae.cfg, step)
        if step <= cfg.k_anneal_steps:  # BatchTopK's threshold starts from the first cut at the final k
            state["threshold_initialised"] = False
        loss, parts = train_step(self.model, self.opt, x, state, cfg, world)
        if not math.isfinite(float(loss)):  # the one host sync per step; a non-finite batch is named first
            _check_finite(x, source, f"the batch of step {step}")
            raise _Diverged(f"training diverged at step {step} (loss {float(loss)}); lower --lr; checkpoints in "
                            f"{self.out / 'checkpoints'} are kept")
        state["tokens"] += cfg.batch_size
        step_done = step + 1
        self.log.add(parts, loss)
        row = None
        if step_done % cfg.log_every == 0 or step_done == total_steps:
            row = self.log.row(step_done, lr, state, sae.cfg.num_latents, cfg.dead_tokens)
            if rank == 0:
                append_jsonl(self.out / "train_log.jsonl", [row])
        if step_done % cfg.checkpoint_every == 0 and step_done < total_steps and rank == 0:
            _save_checkpoint(self.out, step_done, sae, self.opt, state, cfg.keep_checkpoints)
        return row

    def finish(self, total_steps: int, world: int, resample_at: set[int], source: ActivationSource) -> None:
        """The last checkpoint, the SAE in raw-activation units (cfg.json + sae.safetensors), train_state.json."""
        cfg, state, scale = self.cfg, self.state, self.state["input_scale"]
        _save_checkpoint(self.out, total_steps, self.sae, self.opt, state, cfg.keep_checkpoints)
        final = SparseAutoencoder(SaeConfig(**self.sae.cfg.to_dict()))
        final.load_state_dict({k: v.detach().cpu() for k, v in self.sae.state_dict().items()})
        final.fold_scale(scale)
        final.save(self.out, layout="sparsify")
        write_json(self.out / "train_state.json", {"steps": total_steps, "tokens": state["tokens"], "input_scale": scale,
                                                   "lr": self.peak_lr, "world_size": world, "config": state["train_cfg"],
                                                   "schedule": {"warmup": cfg.warmup, "dead_tokens": cfg.dead_tokens,
                                                                "resample_steps": sorted(resample_at),
                                                                "resampled": state["resampled"]},
                                                   "run_seconds": round(self.seconds, 3), "run_steps": total_steps - self.start_step,
                                                   "source": source.describe()})


def _input_init(cfg: TrainConfig, source: ActivationSource, device: torch.device) -> tuple[float, torch.Tensor]:
    """(input scale, initial b_dec) from ``--init-tokens`` tokens of the data."""
    sample = source.sample(cfg.init_tokens, seed=cfg.seed).to(device)
    _check_finite(sample, source, "the initialisation sample")
    mean_sq = sample.pow(2).sum(-1).mean()
    scale = float(math.sqrt(sample.shape[1] / float(mean_sq))) if cfg.normalize_input and mean_sq > 0 else 1.0
    sample = sample * scale
    if cfg.b_dec_init == "geometric_median":
        return scale, geometric_median(sample)
    if cfg.b_dec_init == "mean":
        return scale, sample.mean(0)
    return scale, torch.zeros(sample.shape[1], device=device)


def _train(plans: list[tuple[str, TrainConfig, SaeConfig]], source: ActivationSource, rank: int, world: int, device: torch.device,
           local_batch: int, total_steps: int, threads: int, on_step: Callable[[int], None] | None, grid: bool) -> dict[str, str]:
    """Train the SAEs of ``plans`` side by side on one stream of ``source``'s batches (each batch
    read once, every member trained on it in turn); returns ``{folder: why}`` for members that
    diverged (in a grid; a single run raises). The members share the data options (seed, batch
    size, steps, schedule), so a member's weights equal those it would reach alone."""

    def use_threads(m: _Member) -> None:  # each member runs under the thread count it would have alone
        want = 1 if m.one_thread else threads
        if torch.get_num_threads() != want:
            torch.set_num_threads(want)

    members = [_Member(rel, cfg, sae_cfg, device) for rel, cfg, sae_cfg in plans]
    cfg = members[0].cfg  # (the options every member shares)
    inits = {}  # (input scale, b_dec) drawn once, for the members that start fresh (per thread count: bit-equal to alone)
    for m in members:
        checkpoints = _checkpoint_dirs(m.out) if m.cfg.resume else []
        if checkpoints:
            m.resume(checkpoints[-1], rank, device)
            continue
        if rank == 0:  # a fresh run starts a fresh log and drops another run's checkpoints (only those)
            (m.out / "train_log.jsonl").unlink(missing_ok=True)
            _drop_checkpoints(m.out)
        use_threads(m)
        if m.one_thread not in inits:
            inits[m.one_thread] = _input_init(cfg, source, device)
        m.state["input_scale"] = inits[m.one_thread][0]
        with torch.no_grad():
            m.sae.b_dec.copy_(inits[m.one_thread][1])

    start_step = min(m.start_step for m in members)
    batches = source.batches(local_batch, seed=cfg.seed, rank=rank, world=world, skip=start_step)
    bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", disable=not cfg.progress or rank != 0)
    resample_at = set(resample_steps(cfg, total_steps))
    if rank == 0 and cfg.progress:
        tqdm.write(f"train: {f'{len(members)} SAEs, ' if len(members) > 1 else ''}{total_steps} steps of {cfg.batch_size} tokens; "
                   f"warm-up {cfg.warmup} steps; a latent is dead after {cfg.dead_tokens} tokens without firing"
                   + (f"; resampling at {len(resample_at)} steps" if resample_at else ""))
    read_seconds = 0.0
    for step in range(start_step, total_steps):
        started = time.perf_counter()
        batch = next(batches).to(device, non_blocking=True)
        read_seconds += time.perf_counter() - started
        for m in members:
            if step < m.start_step or m.failed:  # (a resumed member rejoins the stream at its checkpoint)
                continue
            use_threads(m)
            started = time.perf_counter()
            try:
                row = m.step(batch, step, total_steps, resample_at, source, rank, world)
            except _Diverged as e:
                if not grid:
                    raise
                m.failed = str(e)
                if rank == 0:
                    tqdm.write(f"train: {m.rel}: {e}")
                continue
            finally:
                m.seconds += time.perf_counter() - started
            if row is not None and len(members) == 1:
                bar.set_postfix(fvu=f"{row['fvu']:.3f}", l0=f"{row['l0']:.1f}", dead=f"{row['dead_fraction']:.2f}")
        bar.update(1)
        if on_step is not None:
            on_step(step + 1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    bar.close()
    for m in members:
        m.seconds += read_seconds / len(members)  # its steps plus its share of reading the data (saving not)
        if rank == 0 and not m.failed:
            m.finish(total_steps, world, resample_at, source)
    barrier(world)
    return {m.rel: m.failed for m in members if m.failed}


def _resample(sae: SparseAutoencoder, opt: torch.optim.Adam, x: torch.Tensor, state: dict, cfg: TrainConfig, step: int) -> int:
    """Resample the latents that have not fired within the dead window (or since the start)
    toward this step's global batch; the draw is a function of (seed, step), the same on every rank."""
    dead = state["tokens_since_fired"] >= min(cfg.dead_tokens, state["tokens"])
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    idx = resample_dead_latents(sae, opt, all_gather_cat(x), dead, generator)
    state["tokens_since_fired"][idx] = 0  # a fresh window to prove themselves
    return int(idx.numel())


def train_step(model: SaeTrainingStep, opt: torch.optim.Adam, x: torch.Tensor, state: dict, cfg: TrainConfig, world: int):
    """One optimiser step of ``model.sae`` on the local batch ``x`` (already scaled); returns the
    global loss and its parts (fvu, l0, auxk) as device tensors. ``state`` holds ``tokens`` (seen
    so far), ``tokens_since_fired`` [n] (updated here) and what the architecture keeps
    (``threshold_initialised`` for BatchTopK)."""
    sae = model.sae
    # the global batch's total variance: the FVU denominator on every rank
    stats = torch.cat([x.pow(2).sum().reshape(1), x.sum(0)]).double()
    _all_reduce(stats)
    count = x.shape[0] * world
    total_variance = (stats[0] - stats[1:].pow(2).sum() / count).clamp_min(1e-12).float()
    dead_mask = None
    if state["tokens"] >= cfg.dead_tokens:  # before that, no latent can be dead (and no host sync is needed)
        dead_mask = state["tokens_since_fired"] >= cfg.dead_tokens
        dead_mask = dead_mask if bool(dead_mask.any()) else None
    loss, parts = model(x, dead_mask, total_variance, world)
    loss.backward()
    if world > 1:
        # data parallel: average gradients over ranks (the sparse kernels write .grad directly,
        # so this explicit all-reduce replaces DistributedDataParallel's hooks)
        for p in sae.parameters():
            if p.grad is not None:
                _all_reduce(p.grad).div_(world)
    if sae.cfg.normalize_decoder:
        sae.remove_gradient_parallel_to_decoder_directions()
    opt.step()
    opt.zero_grad(set_to_none=False)  # keep the gradient buffers: no fresh [n, d] tensors per step
    with torch.no_grad():
        if sae.cfg.normalize_decoder:
            sae.set_decoder_norm_to_unit_norm()
        sae.arch.after_step(sae, parts, state)  # e.g. BatchTopK's threshold follows the batch's cut-off
        fired = _all_reduce(parts["fired"].to(torch.int32), dist.ReduceOp.MAX if dist.is_initialized() else None) > 0
        state["tokens_since_fired"].add_(cfg.batch_size).masked_fill_(fired, 0)
    # parts stay on the device (read when a log row is written): no host sync per step here
    reduced = _all_reduce(torch.stack([parts["fvu_part"], parts["l0"] / world, parts["auxk_part"]]).double())
    return _all_reduce(loss.detach().double()) / world, {"fvu": reduced[0], "l0": reduced[1], "auxk": reduced[2]}


class _LogAccumulator:
    """Averages loss parts over the steps between two log rows."""

    def __init__(self):
        self.rows = []

    def add(self, parts: dict, loss: torch.Tensor) -> None:
        self.rows.append(torch.stack([loss, parts["fvu"], parts["l0"], parts["auxk"]]))

    def row(self, step: int, lr: float, state: dict, n_latents: int, dead_tokens: int) -> dict:
        loss, fvu, l0, auxk = torch.stack(self.rows).mean(0).tolist()
        dead = float((state["tokens_since_fired"] >= min(dead_tokens, state["tokens"])).float().mean()) if state["tokens"] else 0.0
        self.rows = []
        # alive: fired within the dead window (or since the start, early in the run)
        return {"step": step, "loss": loss, "fvu": fvu, "l0": l0, "auxk": auxk, "dead_fraction": dead,
                "alive_fraction": 1.0 - dead if state["tokens"] else 0.0, "resampled": state["resampled"],
                "lr": lr, "tokens": state["tokens"]}


def _check_finite(x: torch.Tensor, source: ActivationSource, what: str) -> None:
    if not bool(torch.isfinite(x).all()):
        where = source.locate_nonfinite()
        raise MmsaeError(f"NaN or inf activations in {what}{' (' + where + ')' if where else ''}; re-harvest or drop that shard; "
                         "checkpoints written so far are kept")
