"""The offline demo: the whole pipeline on a real small vision-language model and the shapes world.

``mmsae demo`` builds the demo model once (``mmsae demo build``; see :mod:`mmsae.demo.build`),
then runs every stage into one run folder, each stage skipped when its output already exists, so
an interrupted demo resumes where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import check_config


@dataclass
class DemoConfig:
    out: str = field(default="runs/demo", metadata={"help": "run folder to write"})
    quick: bool = field(default=False, metadata={"help": "a smaller run that finishes in a few minutes (for CI)"})
    cache: str | None = field(default=None, metadata={"help": "where the demo model is built (default: $MMSAE_CACHE or ~/.cache/mmsae)"})
    # 6 of 30: measured against 0, 2, 4 and 12 (README); early enough that features fire on whole
    # objects rather than single patches, late enough that clamping one steers the answer
    layer: int = field(default=6, metadata={"help": "language-model layer to hook (SmolLM2-135M has 30)", "min": 0})
    # the demo tower (DINOv2-S) has 12 blocks; the projector reads the outputs of blocks 3 and 11
    vision_layer: int = field(default=11, metadata={
        "help": "vision-tower block of the second SAE, harvested in the same pass and reported beside the "
                "language-model one", "min": 0})
    vision: bool = field(default=True, metadata={"help": "also run the vision-tower SAE (train, index, explain, score, steer)"})
    seed: int = field(default=0, metadata={"help": "seed for data, training and baselines", "min": 0})
    force: bool = field(default=False, metadata={"help": "rerun every stage even if its output exists"})
    overwrite: bool = field(default=False, metadata={"help": "write into an --out folder that holds other files (they are kept)"})

    def __post_init__(self):
        check_config(self)


def build_demo_model(cfg: DemoConfig) -> str:
    """Build (or find) the demo model and return its folder."""
    from pathlib import Path

    from .build import build, default_cache_dir

    cache = Path(cfg.cache) if cfg.cache else default_cache_dir()
    return str(build(cache, seed=cfg.seed))


def run_demo(cfg: DemoConfig) -> None:
    """Run the whole pipeline offline into ``cfg.out``."""
    from .pipeline import run_pipeline

    run_pipeline(cfg, build_demo_model(cfg))
