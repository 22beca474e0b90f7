"""Steering: change SAE features inside the model while it generates.

An intervention sets a feature's activation (``clamp``), adds a multiple of its decoder
direction (``add``) or multiplies its activation (``scale``) at the SAE's site, in the prefill
and at every decode step, on a chosen span of positions. The edit itself is the intervention
layer's (``mmsae.intervene``): the SAE's error term is kept, so with no intervention (or a clamp
to a feature's own value) the model is *exactly* the clean model, unlike the released code, which
swaps in the bare reconstruction and steers only the prompt pass. An SAE at a ``vision:L`` or
``projector`` site edits the image features the language model reads.

Python API (see ``mmsae.intervene``)::

    mmsae.generate(adapter, image, "What colour is the shape?", {sae: [Intervention(123, 40.0, "clamp")]})

``steer(SteerConfig(...))`` is the CLI stage: clean and steered generations side by side,
rows in ``OUT/steering.jsonl``; with ``sweep`` values it also measures, per value, how often
the output names the feature's concept and how fluent it is (``OUT/sweep.json``, ``sweep.png``).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .config import check_config
from .errors import MmsaeError
from .intervene import Generation, Intervention, Mode, Span, check_features, generate_inputs
from .io import append_jsonl, check_own_file, ensure_dir, latest_rows, read_jsonl, write_json
from .models.sites import check_sae_site, site_record
from .runtime import check_dtype, out_of_memory_guard, resolve_device

__all__ = ["Intervention", "SteerConfig", "steer", "sweep", "run_batches", "build_interventions", "perplexity"]


def perplexity(adapter, inputs, gen: Generation) -> list[float]:
    """The clean model's perplexity of each generated continuation (teacher-forced)."""
    prompt_len = inputs.inputs["input_ids"].shape[1]
    batch = dict(inputs.inputs)
    batch["input_ids"] = gen.sequences
    batch["attention_mask"] = torch.cat([inputs.inputs["attention_mask"], gen.new_mask.to(inputs.inputs["attention_mask"].dtype)], 1)
    with torch.no_grad():
        logits = adapter.model(**batch).logits.float()
    logp = torch.log_softmax(logits[:, prompt_len - 1:-1], dim=-1)
    nll = -logp.gather(-1, gen.new_tokens.unsqueeze(-1)).squeeze(-1)
    out = []
    for row, m in zip(nll, gen.new_mask):
        out.append(float(torch.exp(row[m].mean())) if m.any() else float("nan"))
    return out


# --- the stage --------------------------------------------------------------------------------

# every steering.jsonl row (``steer`` and the demo's) carries these: how a file is known to be mmsae's
STEERING_KEYS = ("prompt", "interventions", "clean", "steered")


@dataclass
class SteerConfig:
    model: str = field(metadata={"help": "model id or local path (a vision-language model)"})
    sae: str = field(metadata={"help": "SAE folder (sparsify, SAELens or mmsae layout)"})
    feature: list[int] = field(metadata={"help": "feature id(s) to steer", "min": 0})
    prompt: list[str] = field(metadata={"help": "prompt(s); several are generated as one padded batch"})
    value: list[float] = field(default_factory=lambda: [10.0], metadata={
        "help": "value per feature (one value applies to all): the activation for clamp, the multiple of the "
                "decoder direction for add, the factor for scale"})
    mode: Mode = field(default="clamp", metadata={"help": "clamp | add | scale"})
    image: list[str] = field(default_factory=list, metadata={"help": "image path(s): none, one for all prompts, or one per prompt"})
    span: Span = field(default="all", metadata={
        "help": "where to steer: all (prompt and every generated token), image (image tokens), text (text "
                "tokens and generated ones), prompt (prefill only), generated (decode steps only)"})
    out: str = field(default="steering", metadata={"help": "output folder (steering.jsonl, sweep.json, sweep.png)"})
    max_new_tokens: int = field(default=32, metadata={"help": "tokens to generate", "min": 1})
    index: Optional[str] = field(default=None, metadata={
        "help": "feature index folder: clamp/add values become multiples of each feature's max activation"})
    site: Optional[str] = field(default=None, metadata={
        "help": "the SAE's site (lm:L, vision:L, projector; a number is lm:L) if its cfg records none"})
    sweep: list[float] = field(default_factory=list, metadata={
        "help": "sweep these values for the (single) feature: concept rate and fluency per value, with a plot"})
    keywords: list[str] = field(default_factory=list, metadata={
        "help": "sweep: words whose presence in the output counts as expressing the concept"})
    explanations: Optional[str] = field(default=None, metadata={
        "help": "sweep: explanations.jsonl; the feature's concept (or explanation) gives the keywords"})
    judge_model: Optional[str] = field(default=None, metadata={
        "help": "sweep: judge concept expression with this model on an OpenAI-compatible endpoint instead of keywords"})
    judge_base_url: Optional[str] = field(default=None, metadata={
        "help": "sweep: the judge's endpoint (default: $OPENAI_BASE_URL or api.openai.com)"})
    batch_size: int = field(default=8, metadata={"help": "prompts per generate call", "min": 1})
    device: str = field(default="auto", metadata={"help": "auto (this rank's GPU if any, else cpu), cpu, cuda or cuda:N"})
    dtype: str = field(default="float32", metadata={"help": "model dtype: float32, bfloat16, float16"})

    def __post_init__(self):
        check_config(self)


def load_images(paths: Sequence[str], n_prompts: int) -> list:
    """The ``--image`` files, one per prompt (none, or one for all, is repeated)."""
    from .data.sources import open_image

    if len(paths) not in (0, 1, n_prompts):
        raise MmsaeError(f"got {len(paths)} images for {n_prompts} prompts; give none, one, or one per prompt")
    images = [open_image(p, "--image") for p in paths]
    if not images:
        return [None] * n_prompts
    return images * n_prompts if len(images) == 1 else images


def relative_scale(index_dir: str, features: Sequence[int], sae=None) -> list[float]:
    """Each feature's largest activation in the index (what relative values multiply); with
    ``sae``, an index built with another SAE is refused (one written by hand records none)."""
    from .index import FeatureIndex

    index = FeatureIndex(index_dir)
    if sae is not None and index.sae_fingerprint:
        index.check_sae(sae)
    scales = []
    for f in features:
        m = index.stats(f).get("max_activation")
        if not m or m <= 0:
            raise MmsaeError(f"feature {f} has no positive max_activation in index {index_dir}; give absolute values (no --index)")
        scales.append(float(m))
    return scales


def build_interventions(features: Sequence[int], values: Sequence[float], mode: str,
                        scales: Sequence[float] | None = None) -> list[Intervention]:
    if len(values) not in (1, len(features)):
        raise MmsaeError(f"got {len(values)} values for {len(features)} features; give one value, or one per feature")
    values = list(values) * len(features) if len(values) == 1 else list(values)
    if scales is not None and mode != "scale":
        values = [v * s for v, s in zip(values, scales)]
    return [Intervention(int(f), float(v), mode) for f, v in zip(features, values)]


def side_by_side(left: str, right: str, width: int = 48) -> str:
    a = textwrap.wrap(left, width) or [""]
    b = textwrap.wrap(right, width) or [""]
    rows = [f"  {x:<{width}} | {y}" for x, y in zip(a + [""] * (len(b) - len(a)), b + [""] * (len(a) - len(b)))]
    return "\n".join([f"  {'clean':<{width}} | steered", f"  {'-' * width} | {'-' * width}"] + rows)


def run_batches(adapter, images, prompts, batch_size: int, max_new_tokens: int, sae=None,
                interventions: Sequence[Intervention] = (), span: str = "all", with_perplexity: bool = False):
    """Generate over prompts in batches, steered when ``sae`` and ``interventions`` are given
    (the SAE at its own site, see ``mmsae.intervene``); returns texts (and clean perplexities if asked)."""
    texts, ppl = [], []
    saes = {sae: list(interventions)} if sae is not None and interventions else None
    for i in range(0, len(prompts), batch_size):
        inputs = adapter.build_inputs(images[i:i + batch_size], prompts[i:i + batch_size])
        gen = generate_inputs(adapter, inputs, max_new_tokens, saes, span)
        texts += gen.texts
        if with_perplexity:
            ppl += perplexity(adapter, inputs, gen)
    return texts, ppl


def expresses(text: str, keywords: Sequence[str]) -> bool:
    low = text.lower()
    return any(k.lower() in low for k in keywords)


JUDGE_PROMPT = ("Concept: {concept}\nText: {text}\n\nDoes the text express or mention the concept? "
                "Answer with one word: yes or no.")


def openai_judge(model: str, base_url: str | None = None, concept: str = "") -> Callable[[str], bool]:
    """A judge through the explainer's OpenAI-compatible client: does a text express ``concept``?

    The endpoint and key come from ``base_url`` or the environment (``OpenAIClient.from_env``)."""
    from .explain.openai_client import OpenAIClient, user_message

    client = OpenAIClient.from_env(model, base_url, needs="the judge needs --judge-model", url_flag="--judge-base-url",
                                   max_tokens=3)

    def judge(text: str) -> bool:
        reply = client.chat(user_message(JUDGE_PROMPT.format(concept=concept, text=text), []))
        return reply.strip().lower().startswith("yes")

    return judge


def sweep(adapter, sae, feature: int, values: Sequence[float], prompts: Sequence[str], images=None,
          keywords: Sequence[str] = (), mode: str = "clamp", span: str = "all", max_new_tokens: int = 32,
          batch_size: int = 8, value_scale: float = 1.0,
          judge: Callable[[str], bool] | None = None) -> list[dict]:
    """For each value: how often the outputs express the concept, and their mean clean perplexity.

    An output expresses the concept when it contains one of ``keywords`` or, given a ``judge``
    (text -> bool), when the judge says so. Value 0 in ``add`` mode and 1 in ``scale`` mode are
    the clean model; the clean baseline is always measured too (the row with ``value`` None).
    """
    if not keywords and judge is None:
        raise MmsaeError(f"the sweep of feature {feature} needs keywords (--keywords, or --explanations with its concept) or --judge-model")
    images = list(images) if images is not None else [None] * len(prompts)
    rows = []
    for value in [None, *values]:
        ivs = [] if value is None else build_interventions([feature], [value], mode, [value_scale])
        texts, ppl = run_batches(adapter, images, list(prompts), batch_size, max_new_tokens, sae, ivs, span,
                                 with_perplexity=True)
        hits = [judge(t) if judge is not None else expresses(t, keywords) for t in texts]
        finite = [p for p in ppl if math.isfinite(p)]
        rows.append({"feature": feature, "value": value, "mode": mode, "span": span,
                     "value_abs": None if value is None else ivs[0].value,
                     "concept_rate": sum(hits) / len(hits),
                     "perplexity": sum(finite) / len(finite) if finite else None,
                     "outputs": texts, "perplexities": ppl})
    return rows


def plot_sweep(rows: list[dict], path: str | Path, keywords: Sequence[str] = ()) -> None:
    """Concept rate and clean perplexity against the steering value (one PNG)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    from .io import atomic_path

    steered_rows = [r for r in rows if r["value"] is not None]
    clean = next((r for r in rows if r["value"] is None), None)
    xs = [r["value"] for r in steered_rows]
    fig = Figure(figsize=(6, 3.6), dpi=120)
    ax1 = fig.subplots()
    ax1.plot(xs, [r["concept_rate"] for r in steered_rows], "o-", color="tab:blue", label="concept rate")
    ax1.set_xlabel(f"value ({steered_rows[0]['mode']})" if steered_rows else "value")
    ax1.set_ylabel("concept rate", color="tab:blue")
    ax1.set_ylim(-0.05, 1.05)
    ax2 = ax1.twinx()
    ax2.plot(xs, [r["perplexity"] if r["perplexity"] is not None else float("nan") for r in steered_rows], "s--",
             color="tab:red", label="perplexity")
    ax2.set_ylabel("clean-model perplexity", color="tab:red")
    ax2.set_yscale("log")
    if clean is not None:
        ax1.axhline(clean["concept_rate"], color="tab:blue", lw=0.8, ls=":")
        if clean["perplexity"]:
            ax2.axhline(clean["perplexity"], color="tab:red", lw=0.8, ls=":")
    title = f"feature {rows[0]['feature']}" + (f" - keywords: {', '.join(keywords)}" if keywords else "")
    ax1.set_title(title + "\n(dotted: clean model)", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def concept_keywords(explanations: str, feature: int) -> list[str]:
    row = latest_rows(read_jsonl(explanations)).get(feature)  # the feature's last row, as every reader takes it
    if row is None:
        raise MmsaeError(f"feature {feature} has no row in {explanations}; give --keywords")
    phrase = row.get("concept") or row.get("explanation") or ""
    words = [w.strip(".,;:!?\"'()").lower() for w in phrase.split()]
    return [w for w in words if len(w) > 2]


def load_model_and_sae(model: str, sae_path: str, device: str = "cpu", dtype: str = "float32", site: str | None = None):
    """The model in ``dtype`` on ``device`` (a ``--device`` value, checked), and the SAE beside it in
    float32, checked to fit the model at its site (``site`` where its cfg records none)."""
    from .models import load_adapter
    from .sae import load_sae

    device = resolve_device(device)
    check_dtype(dtype, device)
    adapter = load_adapter(model, dtype=dtype, device=device)
    sae = load_sae(sae_path).to(device=adapter.device, dtype=torch.float32).eval()
    if site is not None and sae.cfg.site is None:
        sae.cfg.site = str(check_sae_site(sae, adapter, site))  # where the SAE is spliced in from here on
    check_sae_site(sae, adapter, site)
    return adapter, sae


def steer(cfg: SteerConfig) -> list[dict]:
    """Generate clean and steered side by side for each prompt; rows go to ``OUT/steering.jsonl``."""
    if not cfg.prompt:
        raise MmsaeError("give at least one --prompt")
    if cfg.sweep and len(cfg.feature) != 1:
        raise MmsaeError(f"a sweep steers one feature; got {len(cfg.feature)} features")
    out = ensure_dir(cfg.out)
    check_own_file(out / "steering.jsonl", STEERING_KEYS)  # appended to: it must be mmsae's
    if cfg.sweep:
        check_own_file(out / "sweep.json", ("feature", "keywords", "rows"))
    images = load_images(cfg.image, len(cfg.prompt))
    adapter, sae = load_model_and_sae(cfg.model, cfg.sae, cfg.device, cfg.dtype, cfg.site)
    site = check_sae_site(sae, adapter)
    check_features(sae, cfg.feature)
    scales = relative_scale(cfg.index, cfg.feature, sae) if cfg.index else None
    ivs = build_interventions(cfg.feature, cfg.value, cfg.mode, scales)

    lower = "--batch-size or --max-new-tokens"
    with out_of_memory_guard("steer", adapter.device, lower, resumes=False):
        clean, _ = run_batches(adapter, images, cfg.prompt, cfg.batch_size, cfg.max_new_tokens)
        steered_texts, _ = run_batches(adapter, images, cfg.prompt, cfg.batch_size, cfg.max_new_tokens, sae, ivs, cfg.span)
    desc = ", ".join(f"{iv.mode} f{iv.feature}={iv.value:g}" for iv in ivs)
    rows = []
    for i, (p, a, b) in enumerate(zip(cfg.prompt, clean, steered_texts)):
        print(f"[{i}] {p}\n    steering: {desc} on span '{cfg.span}'\n{side_by_side(a, b)}\n")
        rows.append({"prompt": p, "image": cfg.image[0] if len(cfg.image) == 1 else (cfg.image[i] if cfg.image else None),
                     "interventions": [{"feature": iv.feature, "value": iv.value, "mode": iv.mode} for iv in ivs], "span": cfg.span, **site_record(adapter, site),
                     "relative_to_index": cfg.index is not None,
                     "clean": a, "steered": b, "model": cfg.model, "sae": cfg.sae})
    append_jsonl(out / "steering.jsonl", rows)

    if cfg.sweep:
        keywords = list(cfg.keywords) or (concept_keywords(cfg.explanations, cfg.feature[0]) if cfg.explanations else [])
        judge = openai_judge(cfg.judge_model, cfg.judge_base_url, " ".join(keywords)) if cfg.judge_model else None
        if judge is not None and not keywords:
            raise MmsaeError("the judge needs the concept: give --keywords or --explanations")
        with out_of_memory_guard("steer --sweep", adapter.device, lower, resumes=False):
            sweep_rows = sweep(adapter, sae, cfg.feature[0], cfg.sweep, cfg.prompt, images, keywords, cfg.mode, cfg.span,
                               cfg.max_new_tokens, cfg.batch_size, scales[0] if scales else 1.0, judge)
        write_json(out / "sweep.json", {"feature": cfg.feature[0], "keywords": keywords,
                                        "judge": cfg.judge_model or "keywords", "rows": sweep_rows})
        plot_sweep(sweep_rows, out / "sweep.png", keywords)
        for r in sweep_rows:
            v = "clean" if r["value"] is None else f"{r['value']:g}"
            ppl = "n/a" if r["perplexity"] is None else f"{r['perplexity']:.2f}"
            print(f"  value {v:>8}: concept rate {r['concept_rate']:.2f}, perplexity {ppl}")
        print(f"sweep: {out / 'sweep.json'}, plot {out / 'sweep.png'}")
    print(f"wrote {out / 'steering.jsonl'}")
    return rows
