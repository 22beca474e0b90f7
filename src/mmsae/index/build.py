"""Building the feature index from a model: each feature's top images with their per-patch activation maps.

``build_index`` streams images through the model with the SAE attached at its site (``lm:L``,
``vision:L`` or ``projector``) and keeps, per feature and with memory bounded by features x N:

- the top N images by an image score (the max or the mean of the feature over the image's
  patches), each with the full per-patch activation map (every tile, AnyRes crops included);
- a uniform random sample of the images where the feature fires (those with the smallest
  :func:`random_key`), with their maps, spanning the feature's activation quantiles, for scoring
  and detection later;
- firing frequency (patches, images, text tokens), maximum, a log-binned histogram of the
  non-zero patch activations and quantiles over all image patches (Network Dissection's
  threshold is the 0.995 quantile);
- the top text tokens with their context (lm sites; a vision or projector site holds image
  patches only).

Several SAEs share one forward pass per batch (``hooks.run_sites`` captures every SAE's site,
stopping after the last) and each gets its own index folder.

The lists and statistics are kept on the SAE's device, updated from the sparse codes; only the
patch maps of the images that enter a list go to the host. Under ``torchrun`` each rank indexes
the samples whose id % world == rank and rank 0 merges the ranks' states into the same index.

The folder it writes (``RUN/index/``, laid out as :mod:`mmsae.index.folder` describes) is read
back by :class:`FeatureIndex`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..config import check_config
from ..errors import MmsaeError
from ..io import claim_dir, read_json, write_text
from ..models.base import ModelAdapter, ModelInputs, TokenLayout
from ..models.sites import Site, parse_site, site_dirnames
from ..runtime import barrier, check_dtype, init_distributed, out_of_memory_guard, resolve_device
from .folder import (FORMAT, IMAGES_WRITTEN, INDEX_FILES, VERSION, FeatureIndex, _drop_unreferenced_images, _image_records,
                     _is_index_folder, _jsonable, _save_image, _write_folder, _written_images, sae_fingerprint)
from .state import AFTER_TOKENS, IndexState
from .stats import QUANTILE_LEVELS


@dataclass
class IndexConfig:
    """Options of ``mmsae index``.

    ``sae`` is one SAE folder or a list of them (the CLI: ``--sae A B``). Several SAEs share one
    forward pass per batch and each gets its own index: ``OUT/<site>`` (``lm:2`` -> ``OUT/lm-2``,
    ``vision:0`` -> ``OUT/vision-0``), or ``OUT/0``, ``OUT/1``, ... (the SAEs' order) when two of
    them read the same site. One SAE writes its index to ``OUT`` itself.
    """

    sae: str | list[str] = field(metadata={"help": "SAE folder(s) (sparsify, SAELens or mmsae layout) or hub id(s); several share one "
                                             "forward pass and each gets its own index in OUT/<site> (lm:2 -> OUT/lm-2), or "
                                             "OUT/0, OUT/1, ... when two read the same site"})
    data: str = field(metadata={"help": "data: image folder, .jsonl, dataset path or name, or shapes:N[:SEED]"})
    out: str = field(metadata={"help": "index folder to write (RUN/index)"})
    model: str | None = field(default=None, metadata={"help": "model id or path (default: the SAE's cfg.model)"})
    layer: int | None = field(default=None, metadata={"help": "decoder layer: the same as --site lm:LAYER (default: the SAE's own site)", "min": 0})
    site: str | None = field(default=None, metadata={"help": "site the SAE reads: lm:L, vision:L or projector (default: the SAE's recorded site)"})
    top_n: int = field(default=20, metadata={"help": "top images kept per feature", "min": 1})
    random_n: int = field(default=20, metadata={"help": "random activating images kept per feature (a sample across quantiles)", "min": 1})
    image_score: Literal["max", "mean"] = field(default="max", metadata={"help": "image score: max or mean of the feature over the image's patches"})
    top_tokens: int = field(default=10, metadata={"help": "top text tokens kept per feature", "min": 1})
    context_tokens: int = field(default=8, metadata={"help": "text tokens of context kept before each top token", "min": 0})
    batch_size: int = field(default=8, metadata={"help": "images per forward pass", "min": 1})
    max_samples: int | None = field(default=None, metadata={"help": "only samples with id below this", "min": 1})
    prompt: str | None = field(default=None, metadata={"help": "prompt shown with every image (default: the sample's own text)"})
    split: str = field(default="train", metadata={"help": "dataset split"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N or auto"})
    dtype: str = field(default="float32", metadata={"help": "model dtype: float32, bfloat16 or float16"})
    checkpoint_every: int = field(default=512, metadata={"help": "save resumable state every this many images", "min": 1})
    seed: int = field(default=0, metadata={"help": "seed of the random example sample", "min": 0})
    overwrite: bool = field(default=False, metadata={"help": "write into an --out folder that holds other files (they are kept)"})

    def __post_init__(self):
        check_config(self)
        saes = self.saes()
        if not saes:
            raise MmsaeError("index needs at least one --sae")
        if len(set(saes)) != len(saes):
            raise MmsaeError(f"--sae {' '.join(saes)} names an SAE twice; give each once")
        if self.layer is not None and self.site is not None:
            raise MmsaeError(f"--layer {self.layer} and --site {self.site} both pick the site; give one")
        if len(saes) > 1 and (self.layer is not None or self.site is not None):
            raise MmsaeError("--layer and --site pick the site of one SAE; with several --sae each is indexed at its own recorded site")
        if self.site is not None:
            parse_site(self.site)  # a malformed name fails here, before any work

    def saes(self) -> list[str]:
        """The SAE folders (the Python API also takes one path as ``sae``)."""
        return [str(self.sae)] if isinstance(self.sae, (str, os.PathLike)) else [str(s) for s in self.sae]


def _text_contexts(input_ids: torch.Tensor, text_positions: torch.Tensor, before: int) -> torch.Tensor:
    """Context ids [T, before + 1 + AFTER_TOKENS] around each text position, over text tokens only."""
    ids = input_ids[text_positions].cpu()
    T = ids.numel()
    padded = torch.cat([torch.full((before,), -1, dtype=ids.dtype), ids, torch.full((AFTER_TOKENS,), -1, dtype=ids.dtype)])
    window = torch.arange(before + 1 + AFTER_TOKENS)[None] + torch.arange(T)[:, None]
    return padded[window].to(torch.int32)


@dataclass
class SiteCodes:
    """One SAE's codes for one batch: per sequence its image patches' (values, indices) [P, k] and
    its text tokens' [T, k] (none at vision and projector sites), float32 values on the SAE's
    device; ``layouts[i]`` places sequence i's patches (``positions`` are rows of the site's
    activation flattened to [R, d]: :func:`mmsae.intervene.flat_layouts`)."""

    site: Site
    layouts: list[TokenLayout]
    patches: list[tuple[torch.Tensor, torch.Tensor]]
    text: list[tuple[torch.Tensor, torch.Tensor]]


def encode_batch(adapter: ModelAdapter, saes: list, sites: list[Site], images: list, prompts: list[str]
                 ) -> tuple[ModelInputs, list[SiteCodes]]:
    """One forward pass, stopped after the last of ``sites``, and the codes of ``saes[i]`` at
    ``sites[i]`` (canonical sites: ``adapter.resolve_site``) for every image patch and text token.

    The index's bookkeeping runs on the SAE's device, where the codes are.
    """
    from ..hooks import run_sites
    from ..intervene import flat_layouts

    inputs = adapter.build_inputs(images, prompts)
    out = []
    with torch.inference_mode():
        acts = run_sites(adapter, sites, inputs)
        for sae, site in zip(saes, sites):
            flat = acts[site].reshape(-1, acts[site].shape[-1])
            layouts, text_rows = flat_layouts(adapter, site, inputs)
            parts = []
            for layout, text in zip(layouts, text_rows):
                parts += [flat[layout.positions.to(flat.device)], flat[text.to(flat.device)]]
            values, indices = sae.encode_sparse(torch.cat(parts).to(sae.device))
            values = values.float()
            codes, start = [], 0
            for part in parts:
                codes.append((values[start:start + part.shape[0]], indices[start:start + part.shape[0]]))
                start += part.shape[0]
            out.append(SiteCodes(site, layouts, codes[0::2], codes[1::2]))
    return inputs, out


def _stored_layout(site: Site, sequence: TokenLayout, rows: TokenLayout) -> TokenLayout:
    """The layout an index keeps for a sample (``rows``: its patches among the site's rows): at an
    lm site its image tokens' sequence positions, elsewhere 0..P-1 (the order of its patch rows)."""
    positions = sequence.positions.cpu() if site.kind == "lm" else torch.arange(rows.num_image_tokens)
    return TokenLayout(positions, rows.tile.cpu(), rows.row.cpu(), rows.col.cpu(), rows.tiles, rows.image_size)


def _checkpoint_name(rank: int, world: int) -> str:
    """One process's checkpoint; under torchrun each rank has its own, named with the world size."""
    return "checkpoint.safetensors" if world == 1 else f"checkpoint-{rank}-of-{world}.safetensors"


def build_index(cfg: IndexConfig) -> FeatureIndex | list[FeatureIndex]:
    """Stream ``cfg.data`` through the model with each SAE at its site and write the index.

    One SAE: its index in ``cfg.out`` (returned). Several: one forward pass per batch and one
    index per SAE under ``cfg.out`` (see :class:`IndexConfig`; returned in ``cfg.sae``'s order).
    Resumable: rerun with the same options after an interruption and it continues from its
    last checkpoint; a finished index with the same options is returned as it is. Under
    ``torchrun`` rank r indexes the samples whose id % world == r (resumable per rank, with the
    same number of processes); rank 0 merges the ranks' states and writes the folder, the index
    one process would write.
    """
    device = resolve_device(cfg.device)
    check_dtype(cfg.dtype, device)
    rank, world = init_distributed(device, "index")  # (the group stays for the process: see init_distributed)
    return _build_index(cfg, device, rank, world)


@dataclass
class _Job:
    """One SAE's index within a build."""

    name: str  # the SAE as given (--sae)
    sae: Any
    site: Site
    out: Path
    signature: dict
    done: bool = False  # a complete index with this signature was there already
    state: IndexState | None = None
    written: set[str] = field(default_factory=set)


def _build_index(cfg: IndexConfig, device: torch.device, rank: int, world: int) -> FeatureIndex | list[FeatureIndex]:
    from tqdm import tqdm

    from ..data.sources import open_source
    from ..models import load_adapter
    from ..models.sites import check_sae_site, recorded_site
    from ..sae import load_sae

    names = cfg.saes()
    saes = [load_sae(name).to(device).eval() for name in names]
    for name, sae in zip(names, saes):
        if cfg.model is None and sae.cfg.model is None:
            raise MmsaeError(f"SAE {name} does not record its model; give --model")
    models = {str(cfg.model or sae.cfg.model) for sae in saes}
    if len(models) > 1:
        raise MmsaeError(f"the SAEs were trained on different models ({', '.join(sorted(models))}); index them in separate "
                         "runs, or give --model if these name one model")
    model_id = models.pop()
    adapter: ModelAdapter | None = None

    def model() -> ModelAdapter:  # loaded when first needed: a finished index is returned without it
        nonlocal adapter
        if adapter is None:
            adapter = load_adapter(model_id, dtype=cfg.dtype, device=device)
        return adapter

    wanted = cfg.site if cfg.site is not None else cfg.layer
    sites = []
    for name, sae in zip(names, saes):
        given = wanted if wanted is not None else recorded_site(sae.cfg)  # e.g. a release records only model.layers.24
        if given is None:
            raise MmsaeError(f"SAE {name} does not record its site; give --site (or --layer)")
        site = parse_site(given)
        if site.kind == "module":  # a module path: only the model knows which site it is
            site = check_sae_site(sae, model(), wanted, f"SAE {name}")
        if site.kind == "module":
            raise MmsaeError(f"SAE {name} reads {site}, a module whose tokens mmsae cannot place on the image; "
                             "index SAEs trained at lm:L, vision:L or projector")
        sites.append(site)
    outs = [Path(cfg.out)] if len(names) == 1 else [Path(cfg.out) / d for d in site_dirnames(sites)]
    if rank == 0:  # one claim: ranks checking an empty folder at once would see each other's marker
        if len(names) > 1:
            claim_dir(cfg.out, "index", cfg.overwrite)
        for out in outs:
            claim_dir(out, "index", cfg.overwrite, legacy=_is_index_folder)
            if not _is_index_folder(out):  # a new index: none of the files it writes may be someone else's
                taken = [name for name in INDEX_FILES if (out / name).exists()]
                if taken:
                    raise MmsaeError(f"{out / taken[0]} exists and was not written by mmsae index; move it away or choose a new --out")
    barrier(world)
    record = IMAGES_WRITTEN if world == 1 else f"{IMAGES_WRITTEN}-{rank}"
    jobs = []
    for name, sae, site, out in zip(names, saes, sites, outs):
        # (an lm site's signature is what it was before sites: its layer names it)
        where = {"layer": site.layer} if site.kind == "lm" else {"layer": None, "site": str(site)}
        signature = {"sae_fingerprint": sae_fingerprint(sae), "model": model_id, **where, "data": cfg.data,
                     "split": cfg.split, "max_samples": cfg.max_samples, "prompt": cfg.prompt, "top_n": cfg.top_n,
                     "random_n": cfg.random_n, "image_score": cfg.image_score, "top_tokens": cfg.top_tokens,
                     "context_tokens": cfg.context_tokens, "seed": cfg.seed}
        job = _Job(name, sae, site, out, signature, written=_written_images(out, rank, world))
        jobs.append(job)
        manifest_path = out / "manifest.json"
        if manifest_path.exists():
            old = read_json(manifest_path)
            if old.get("complete") and old.get("signature") == signature:
                print(f"index {out} is already complete", flush=True)
                job.done = True
                continue
            if old.get("complete"):
                raise MmsaeError(f"{out} already holds an index built with other options or another SAE; use another --out or delete it")
        ours = {_checkpoint_name(r, world) for r in range(world)}
        theirs = sorted(p.name for p in out.glob("checkpoint*.safetensors") if p.name not in ours)
        if theirs:
            raise MmsaeError(f"{out / theirs[0]} is the unfinished index of another number of processes than {world}; "
                             "rerun with as many as before, or use another --out")
    live = [job for job in jobs if not job.done]
    if live:
        _run_jobs(cfg, live, model(), open_source(cfg.data, split=cfg.split), device, rank, world, record, tqdm)
    barrier(world)
    indexes = [FeatureIndex(job.out) for job in jobs]
    return indexes[0] if len(indexes) == 1 else indexes


def _run_jobs(cfg: IndexConfig, jobs: list[_Job], adapter: ModelAdapter, source, device: torch.device, rank: int, world: int,
              record: str, tqdm) -> None:
    """Stream the data once through the model for every unfinished index, then write them (rank 0)."""
    from ..models.sites import check_sae_site

    for job in jobs:
        check_sae_site(job.sae, adapter, job.site, f"SAE {job.name}")  # the one site and width check
    state_kwargs = [dict(num_latents=job.sae.cfg.num_latents, top_n=cfg.top_n, random_n=cfg.random_n, top_tokens=cfg.top_tokens,
                         context_tokens=cfg.context_tokens, image_score=cfg.image_score, seed=cfg.seed, device=device)
                    for job in jobs]
    who = f"rank {rank}: " if world > 1 else ""
    for job, kwargs in zip(jobs, state_kwargs):
        ckpt = job.out / _checkpoint_name(rank, world)
        at = f" {job.out}" if len(jobs) > 1 else ""
        if ckpt.exists():
            job.state = IndexState.load(ckpt, job.signature, **kwargs)
            print(f"{who}resuming index{at} at sample {job.state.next_id} ({job.state.stats.n_images} images done)", flush=True)
        else:
            with out_of_memory_guard("index", device, "--top-n or --random-n"):  # features x (top_n + random_n) slots
                job.state = IndexState(**kwargs)
    total = source.num_samples if cfg.max_samples is None or source.num_samples is None else min(cfg.max_samples, source.num_samples)
    start = min(job.state.next_id for job in jobs)  # (indexes checkpointed at different samples each skip what they hold)

    def share(stop: int) -> int:  # this rank's samples below ``stop``
        return len(range(rank, stop, world))

    def on_skip(sample_id: int, reason: str) -> None:
        for job in jobs:
            if sample_id >= job.state.next_id:
                job.state.skipped += 1

    @out_of_memory_guard("index", device, "--batch-size or --top-n")  # the last checkpoint stays: a rerun resumes
    def run_batch(batch: list) -> None:
        # a batch without images never reaches the vision tower: only lm sites see it
        has_image = any(s.image is not None for s in batch)
        active = [job for job in jobs if batch[-1].id >= job.state.next_id and (job.site.kind == "lm" or has_image)]
        prompts = [cfg.prompt or s.text or "Describe the image." for s in batch]
        if active:
            inputs, codes = encode_batch(adapter, [job.sae for job in active], [job.site for job in active],
                                         [s.image for s in batch], prompts)
            for job, sc in zip(active, codes):
                _add_batch(job, batch, prompts, inputs, sc, record)
        for job in jobs:
            job.state.next_id = max(job.state.next_id, batch[-1].id + 1)
            # evicted maps are dropped once they outnumber the live ones: memory stays O(features x N)
            state = job.state
            if len(state.maps) > 2 * int((state.top_sample >= 0).sum() + (state.rand_sample >= 0).sum()) + 4096:
                state.prune()

    def save_all() -> None:
        for job in jobs:
            job.state.save(job.out / _checkpoint_name(rank, world), job.signature)
            _drop_unreferenced_images(job.out, {r["image"] for r in job.state.samples.values()}, job.written, record)

    since_ckpt = 0
    started = time.perf_counter()
    bar = tqdm(total=None if total is None else share(total), initial=share(start), dynamic_ncols=True,
               desc="index" + (f" rank {rank}" if world > 1 else ""), unit="sample", disable=rank != 0)
    batch: list = []
    try:
        for sample in source.samples(start=start, rank=rank, world=world, stop=cfg.max_samples, on_skip=on_skip):
            batch.append(sample)
            if len(batch) == cfg.batch_size:
                run_batch(batch)
                bar.update(share(batch[-1].id + 1) - bar.n)
                since_ckpt += len(batch)
                batch = []
                if since_ckpt >= cfg.checkpoint_every:
                    save_all()
                    since_ckpt = 0
        if batch:
            run_batch(batch)
    finally:
        bar.close()
    for job in jobs:
        if total is not None:
            job.state.next_id = max(job.state.next_id, total)
        job.state.save(job.out / _checkpoint_name(rank, world), job.signature)  # the finished state, in case writing is interrupted
    barrier(world)  # every rank's finished state is on disk
    if rank == 0:
        for job, kwargs in zip(jobs, state_kwargs):
            for r in range(1, world):
                job.state.merge(IndexState.load(job.out / _checkpoint_name(r, world), job.signature, **kwargs))
            _write_index(cfg, job, adapter, world, started, several=len(jobs) > 1)


def _add_batch(job: _Job, batch: list, prompts: list[str], inputs: ModelInputs, sc: SiteCodes, record: str) -> None:
    """Merge one SAE's codes for a batch into its index's state (the samples it has not seen)."""
    state = job.state
    first = next((b for b, s in enumerate(batch) if s.id >= state.next_id), len(batch))
    with_image = [b for b in range(first, len(batch)) if sc.layouts[b].num_image_tokens > 0]
    entered = state.add_images([batch[b].id for b in with_image], [sc.patches[b] for b in with_image])
    for b in (with_image[j] for j in entered):  # images that became some feature's example: keep the sample
        sid = batch[b].id
        if sid not in state.samples:
            state.samples[sid] = {"meta": _jsonable(batch[b].meta), "text": prompts[b],
                                  "image": _save_image(job.out, sid, batch[b].image, job.written, record)}
            state.layouts[sid] = _stored_layout(job.site, inputs.layouts[b], sc.layouts[b])
    if job.site.kind != "lm":  # image patches only: no text tokens
        return
    ids = inputs.inputs["input_ids"].cpu()
    sample_t, pos_t, ctx_t = [], [], []
    for b in range(first, len(batch)):
        tp = inputs.layouts[b].text_positions.cpu()
        sample_t.append(torch.full((tp.numel(),), batch[b].id, dtype=torch.int64))
        pos_t.append(tp)
        ctx_t.append(_text_contexts(ids[b], tp, state.C))
    if sample_t:
        text_v = torch.cat([sc.text[b][0] for b in range(first, len(batch))])
        text_i = torch.cat([sc.text[b][1] for b in range(first, len(batch))])
        state.add_text(torch.cat(sample_t), torch.cat(pos_t), torch.cat(ctx_t), text_v, text_i)


def _write_index(cfg: IndexConfig, job: _Job, adapter: ModelAdapter, world: int, started: float, several: bool = False) -> None:
    """Rank 0: write the folder of the finished (merged) state of ``job``, then remove the checkpoints."""
    out, state, site = job.out, job.state, job.site
    if state.stats.n_images == 0:  # nothing worth resuming: the folder may take other data
        for r in range(world):
            (out / _checkpoint_name(r, world)).unlink(missing_ok=True)
        raise MmsaeError(f"data {cfg.data} gave no images to index; give a source with images")
    state.to("cpu")
    # every rank's image copies, recorded in the one record before the ranks' records go
    written = _written_images(out)
    records = _image_records(out)
    if any(path.name != IMAGES_WRITTEN for path in records):
        write_text(out / IMAGES_WRITTEN, "".join(f"{rel}\n" for rel in sorted(written)))
        for path in records:
            if path.name != IMAGES_WRITTEN:
                path.unlink()
    lm = site.kind == "lm"
    manifest = {"format": FORMAT, "version": VERSION, "sae": job.name, "sae_fingerprint": job.signature["sae_fingerprint"],
                "model": job.signature["model"], "layer": site.layer if lm else None, "site": str(site),
                "hook_point": adapter.hook_point(site.layer) if lm else None,
                "data": cfg.data, "top_n": cfg.top_n, "random_n": cfg.random_n, "image_score": cfg.image_score,
                "n_images": state.stats.n_images, "n_skipped": state.skipped, "num_latents": job.sae.cfg.num_latents,
                "k": job.sae.cfg.k, "quantile_levels": list(QUANTILE_LEVELS), "signature": job.signature,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tokens = state.token_rows(adapter.tokenizer)
    # this session's time from the first batch to the finished folder (model loading excluded)
    manifest["run_seconds"] = round(time.perf_counter() - started, 3)
    _write_folder(out, manifest, state.top_sample, state.top_score, state.rand_sample, state.rand_score, state.maps,
                  state.stats, state.samples, state.layouts, tokens, written)
    for r in range(world):
        (out / _checkpoint_name(r, world)).unlink(missing_ok=True)
    if state.skipped:
        print(f"skipped {state.skipped} unreadable samples", flush=True)
    n_features = int((state.top_sample >= 0).any(1).sum())
    at = f" at {site}" if several else ""
    print(f"index{at}: {n_features} of {job.sae.cfg.num_latents} features fired on {state.stats.n_images} images -> {out}", flush=True)
