"""Read whatever a run folder holds; every piece is optional and what is absent is named."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MmsaeError
from ..io import latest_rows, read_json, read_jsonl


@dataclass
class RunData:
    """The files of one run, read once. ``missing`` says, per absent piece, what would make it."""

    run: Path
    sae_dir: Path
    sae_cfg: dict | None = None
    train_log: list[dict] = field(default_factory=list)
    metrics: dict | None = None
    index: Any = None  # mmsae.index.FeatureIndex
    explanations: dict[int, dict] = field(default_factory=dict)
    scores: list[dict] = field(default_factory=list)
    scores_md: str | None = None
    steering: list[dict] = field(default_factory=list)
    steering_dir: Path | None = None  # where steering.jsonl lies; its sweep.json / sweep.png sit beside it
    attribution: Any = None
    attribution_dir: Path | None = None  # attribution.json names its heat-map PNGs relative to this
    demo_log: dict | None = None  # what `mmsae demo` records: sizes and seconds per stage
    sub_runs: list[RunData] = field(default_factory=list)  # runs of other sites inside this one (RUN/vision-11)
    missing: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def num_latents(self) -> int | None:
        for source in (self.sae_cfg or {}, (self.index.cfg if self.index is not None else {}) or {}):
            if source.get("num_latents"):
                return int(source["num_latents"])
        return None

    @property
    def model(self) -> str | None:
        return _first_key("model", self.sae_cfg, self.index.cfg if self.index is not None else None, self.metrics)

    @property
    def layer(self) -> Any:
        return _first_key("layer", self.sae_cfg, self.index.cfg if self.index is not None else None, self.metrics)

    @property
    def site(self) -> str | None:
        """The SAE's site (``lm:L``, ``vision:L``, ...); ``lm:LAYER`` for runs from before sites."""
        site = _first_key("site", self.sae_cfg, self.index.cfg if self.index is not None else None, self.metrics)
        return site if site is not None else (f"lm:{self.layer}" if self.layer is not None else None)

    @property
    def hook_point(self) -> Any:
        return _first_key("hook_point", self.sae_cfg, self.index.cfg if self.index is not None else None, self.metrics)


def _first_key(key: str, *dicts: dict | None) -> Any:
    for d in dicts:
        if d and d.get(key) is not None:
            return d[key]
    return None


def _optional(data: RunData, path: Path, what: str, reader):
    """Read ``path`` with ``reader``; a missing file is noted, a broken one is a problem, not a crash."""
    if not path.exists():
        data.missing.append(f"{path.name}: {what}")
        return None
    try:
        return reader(path)
    except (MmsaeError, OSError, ValueError) as e:
        data.problems.append(f"{path.name} could not be read ({e}); it is left out")
        return None


def _stage_dir(run: Path, folder: str, name: str) -> Path:
    return run / folder if not (run / name).exists() and (run / folder / name).exists() else run


def load_run(run: str | Path, sae: str | Path | None = None) -> RunData:
    """Read a run folder (see docs/architecture.md) for the dashboard."""
    run = Path(run)
    if not run.is_dir():
        raise MmsaeError(f"run folder {run} does not exist; pass --run the folder a pipeline stage or `mmsae demo` wrote")
    sae_dir = Path(sae) if sae else run / "sae"
    data = RunData(run=run, sae_dir=sae_dir)

    data.sae_cfg = _optional(data, sae_dir / "cfg.json", "no trained SAE config (run `mmsae train`)", read_json)
    if not (sae_dir / "sae.safetensors").exists() and not (sae_dir / "sae_weights.safetensors").exists():
        data.missing.append("sae.safetensors: no SAE weights (run `mmsae train`)")
    data.train_log = _optional(data, sae_dir / "train_log.jsonl", "no training log (run `mmsae train`)", read_jsonl) or []
    data.metrics = _optional(data, run / "metrics.json", "no evaluation metrics (run `mmsae evaluate`)", read_json)

    if (run / "index").is_dir():
        try:
            from ..index import FeatureIndex

            data.index = FeatureIndex(run / "index")
        except (MmsaeError, OSError, ValueError, KeyError) as e:
            data.problems.append(f"index/ could not be read ({e}); features are listed without examples")
    else:
        data.missing.append("index/: no feature index, so no top images or activation statistics (run `mmsae index`)")

    rows = _optional(data, run / "explanations.jsonl", "no explanations (run `mmsae explain`)", read_jsonl) or []
    data.explanations = latest_rows(rows)  # a feature's last row wins, as in every reader
    data.scores = [r for r in (_optional(data, run / "scores.jsonl", "no scores (run `mmsae score`)", read_jsonl) or [])
                   if isinstance(r, dict) and "feature" in r and "scorer" in r]
    if (run / "scores.md").exists():
        data.scores_md = (run / "scores.md").read_text(encoding="utf-8")
    # `mmsae steer` / `mmsae attribute` write into their --out folder: RUN itself or RUN/steering, RUN/attribution
    data.steering_dir = _stage_dir(run, "steering", "steering.jsonl")
    data.steering = _optional(data, data.steering_dir / "steering.jsonl", "no steering examples (run `mmsae steer`)",
                              read_jsonl) or []
    data.attribution_dir = _stage_dir(run, "attribution", "attribution.json")
    data.attribution = _optional(data, data.attribution_dir / "attribution.json", "no attribution (run `mmsae attribute`)",
                                 lambda p: json.loads(p.read_text(encoding="utf-8")))
    if (run / "demo_log.json").exists():
        data.demo_log = _optional(data, run / "demo_log.json", "", read_json)
    if sae is None:  # SAEs of other sites trained beside this one, each a run folder of its own
        data.sub_runs = [load_run(p) for p in sorted(run.iterdir())
                         if p.is_dir() and p != sae_dir and (p / "sae" / "cfg.json").exists()]
    return data
