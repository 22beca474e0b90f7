"""Steering: change SAE features inside the model while it generates.

An intervention sets a feature's activation (``clamp``), adds a multiple of its decoder
direction (``add``) or multiplies its activation (``scale``) at the SAE's hook point, in the
prefill and at every decode step, on a chosen span of positions. The SAE's error term is kept:
the hidden state becomes ``decode(edited latents) + (x - decode(latents))``, which, the decoder
being linear, is ``x + sum_f (new_f - old_f) * W_dec[f]``. So with no intervention (or a clamp
to a feature's own value) the model is *exactly* the clean model, unlike the released code,
which swaps in the bare reconstruction and steers only the prompt pass.

Python API::

    with steered(adapter, sae, [Intervention(123, 40.0, "clamp")], span="all", inputs=batch):
        out = adapter.model.generate(**batch.inputs, max_new_tokens=20)

``steer(SteerConfig(...))`` is the CLI stage: clean and steered generations side by side,
rows in ``OUT/steering.jsonl``; with ``sweep`` values it also measures, per value, how often
the output names the feature's concept and how fluent it is (``OUT/sweep.json``, ``sweep.png``).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

from .config import check_config
from .errors import MmsaeError
from .hooks import edit
from .io import append_jsonl, check_own_file, ensure_dir, latest_rows, read_jsonl, write_json
from .models.sites import resolve_layer
from .runtime import check_dtype, out_of_memory_guard, resolve_device

Mode = Literal["clamp", "add", "scale"]
Span = Literal["all", "image", "text", "prompt", "generated"]
SPANS = ("all", "image", "text", "prompt", "generated")
MODES = ("clamp", "add", "scale")


@dataclass
class Intervention:
    """One feature edit: ``clamp`` sets the activation to ``value``, ``add`` adds ``value`` times
    the feature's decoder direction, ``scale`` multiplies the activation by ``value``."""

    feature: int
    value: float
    mode: Mode = "clamp"


# --- checks shared with attribution -----------------------------------------------------------


def check_features(sae, features: Sequence[int]) -> None:
    n = sae.cfg.num_latents
    for f in features:
        if not 0 <= int(f) < n:
            raise MmsaeError(f"feature {f} is out of range: the SAE has {n} latents (0..{n - 1})")


def decoder_directions(sae, features: Sequence[int]) -> torch.Tensor:
    """Each feature's decoder direction [F, d] in float32, whatever the SAE's parameterisation."""
    n = sae.cfg.num_latents
    onehot = torch.zeros(len(features), n, device=_sae_device(sae))
    onehot[torch.arange(len(features)), torch.as_tensor(list(features), dtype=torch.long)] = 1.0
    with torch.no_grad():
        directions = sae.decode(onehot) - sae.decode(torch.zeros_like(onehot))
    return directions.to(work_dtype(directions.dtype))


def feature_activations(sae, x: torch.Tensor, features: Sequence[int]) -> torch.Tensor:
    """The SAE activations of ``features`` at every row of ``x`` [.., d] -> [.., F]."""
    values, indices = sae.encode_sparse(x)
    wanted = torch.as_tensor(list(features), dtype=indices.dtype, device=indices.device)
    hit = indices.unsqueeze(-1) == wanted  # [.., k, F]
    return (values.to(work_dtype(x.dtype)).unsqueeze(-1) * hit).sum(-2)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32 (edits of bfloat16 states are computed in float32; float64 stays)."""
    return torch.promote_types(dtype, torch.float32)


def _sae_device(sae) -> torch.device:
    return next(sae.parameters()).device


# --- the edit applied at the hook point --------------------------------------------------------


def span_mask(inputs, span: str) -> torch.Tensor:
    """[batch, seq] True at the prompt positions that ``span`` covers (padding never)."""
    attention = inputs.inputs["attention_mask"].bool()
    mask = torch.zeros_like(attention)
    if span in ("all", "prompt"):
        return attention.clone()
    if span == "generated":
        return mask
    for b, layout in enumerate(inputs.layouts):
        positions = layout.positions if span == "image" else layout.text_positions
        mask[b, positions.to(mask.device)] = True
    return mask & attention


class FeatureEditor:
    """The function run on the hooked layer's output: edits latents, keeps the error term.

    It follows positions across a ``generate`` call: a call with more than one token is a new
    pass starting at position 0 (the prefill, or a plain forward), a one-token call continues
    the previous pass (a decode step). Prompt positions are steered where ``prompt_mask`` is
    True; positions past the prompt (generated tokens) when ``span`` covers them.
    """

    def __init__(self, sae, interventions: Sequence[Intervention], span: str = "all",
                 prompt_mask: torch.Tensor | None = None):
        if span not in SPANS:
            raise MmsaeError(f"span '{span}' is not one of {', '.join(SPANS)}")
        for iv in interventions:
            if iv.mode not in MODES:
                raise MmsaeError(f"mode '{iv.mode}' is not one of {', '.join(MODES)}")
        if prompt_mask is None and span not in ("all",):
            raise MmsaeError(f"span '{span}' needs the batch's inputs (to know which positions are image/text/prompt)")
        check_features(sae, [iv.feature for iv in interventions])
        self.sae = sae
        self.interventions = list(interventions)
        self.features = [iv.feature for iv in interventions]
        self.span = span
        self.prompt_mask = prompt_mask
        self.directions = decoder_directions(sae, self.features) if interventions else None
        self.position = 0

    def positions_mask(self, batch: int, length: int, device) -> torch.Tensor:
        start = 0 if length > 1 else self.position
        self.position = start + length
        if self.prompt_mask is None:  # span "all", no inputs given
            return torch.ones(batch, length, dtype=torch.bool, device=device)
        prompt_len = self.prompt_mask.shape[1]
        covers_generated = self.span in ("all", "text", "generated")
        mask = torch.full((batch, length), covers_generated, dtype=torch.bool, device=device)
        in_prompt = max(0, min(prompt_len, start + length) - start)
        if in_prompt:
            mask[:, :in_prompt] = self.prompt_mask[:, start:start + in_prompt].to(device)
        return mask

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        batch, length = hidden.shape[:2]
        mask = self.positions_mask(batch, length, hidden.device)
        if not self.interventions or not mask.any():
            return hidden
        x = hidden.to(work_dtype(hidden.dtype))
        sae_device = _sae_device(self.sae)
        with torch.no_grad():
            old = feature_activations(self.sae, x.to(sae_device), self.features).to(x.device)  # [B, T, F]
        new = old.clone()
        for i, iv in enumerate(self.interventions):
            if iv.mode == "clamp":
                new[..., i] = iv.value
            elif iv.mode == "add":
                new[..., i] = old[..., i] + iv.value
            else:
                new[..., i] = old[..., i] * iv.value
        coef = (new - old) * mask.unsqueeze(-1)  # zero off-span: those hidden states stay bit-exact
        delta = coef @ self.directions.to(x)
        return (x + delta).to(hidden.dtype)


@contextmanager
def steered(adapter, sae, interventions: Sequence[Intervention], span: str = "all", inputs=None,
            layer: int | None = None) -> Iterator[FeatureEditor]:
    """Apply ``interventions`` at the SAE's layer for every forward pass run inside the block.

    ``inputs`` (the ``ModelInputs`` about to be run) tells which positions are image, text or
    padding; it is required for any span but ``all``. Use one block per ``generate`` call.
    """
    layer = resolve_layer(adapter, sae, layer)
    prompt_mask = span_mask(inputs, span) if inputs is not None else None
    editor = FeatureEditor(sae, interventions, span, prompt_mask)
    with edit(adapter.layer_module(layer), editor):
        yield editor


# --- generation -------------------------------------------------------------------------------


@dataclass
class Generation:
    sequences: torch.Tensor  # [B, prompt + new] token ids
    new_tokens: torch.Tensor  # [B, new]
    new_mask: torch.Tensor  # [B, new] True up to and including the first end-of-sequence token
    texts: list[str]


def generate(adapter, inputs, max_new_tokens: int = 32, sae=None, interventions: Sequence[Intervention] = (),
             span: str = "all", layer: int | None = None) -> Generation:
    """Greedy generation, steered when ``sae`` and ``interventions`` are given."""
    tok = adapter.tokenizer
    eos = adapter.model.generation_config.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    with torch.no_grad():
        if sae is not None and interventions:
            with steered(adapter, sae, interventions, span=span, inputs=inputs, layer=layer):
                seq = adapter.model.generate(**inputs.inputs, **kwargs)
        else:
            seq = adapter.model.generate(**inputs.inputs, **kwargs)
    prompt_len = inputs.inputs["input_ids"].shape[1]
    new = seq[:, prompt_len:]
    eos_ids = torch.as_tensor(eos if isinstance(eos, list) else [eos] if eos is not None else [], device=new.device)
    is_eos = torch.isin(new, eos_ids) if len(eos_ids) else torch.zeros_like(new, dtype=torch.bool)
    # True up to and including the first EOS: the count of EOS strictly before each position is 0
    before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    new_mask = before == 0
    texts = [tok.decode(row[m], skip_special_tokens=True).strip() for row, m in zip(new, new_mask)]
    return Generation(seq, new, new_mask, texts)


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
    layer: Optional[int] = field(default=None, metadata={"help": "layer, if the SAE's cfg does not record it", "min": 0})
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


def relative_scale(index_dir: str, features: Sequence[int]) -> list[float]:
    """Each feature's largest activation in the index (what relative values multiply)."""
    from .index import FeatureIndex

    index = FeatureIndex(index_dir)
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
                interventions: Sequence[Intervention] = (), span: str = "all", layer: int | None = None,
                with_perplexity: bool = False):
    """Generate over prompts in batches; returns texts (and clean perplexities if asked)."""
    texts, ppl = [], []
    for i in range(0, len(prompts), batch_size):
        inputs = adapter.build_inputs(images[i:i + batch_size], prompts[i:i + batch_size])
        gen = generate(adapter, inputs, max_new_tokens, sae, interventions, span, layer)
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
          batch_size: int = 8, layer: int | None = None, value_scale: float = 1.0,
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
        texts, ppl = run_batches(adapter, images, list(prompts), batch_size, max_new_tokens, sae, ivs, span, layer,
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import atomic_path

    steered_rows = [r for r in rows if r["value"] is not None]
    clean = next((r for r in rows if r["value"] is None), None)
    xs = [r["value"] for r in steered_rows]
    fig, ax1 = plt.subplots(figsize=(6, 3.6), dpi=120)
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
    plt.close(fig)


def concept_keywords(explanations: str, feature: int) -> list[str]:
    row = latest_rows(read_jsonl(explanations)).get(feature)  # the feature's last row, as every reader takes it
    if row is None:
        raise MmsaeError(f"feature {feature} has no row in {explanations}; give --keywords")
    phrase = row.get("concept") or row.get("explanation") or ""
    words = [w.strip(".,;:!?\"'()").lower() for w in phrase.split()]
    return [w for w in words if len(w) > 2]


def load_model_and_sae(model: str, sae_path: str, device: str = "cpu", dtype: str = "float32"):
    """The model in ``dtype`` on ``device`` (a ``--device`` value, checked), and the SAE beside it in float32."""
    from .models import load_adapter
    from .sae import load_sae

    device = resolve_device(device)
    check_dtype(dtype, device)
    adapter = load_adapter(model, dtype=dtype, device=device)
    sae = load_sae(sae_path).to(device=adapter.device, dtype=torch.float32).eval()
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
    adapter, sae = load_model_and_sae(cfg.model, cfg.sae, cfg.device, cfg.dtype)
    layer = resolve_layer(adapter, sae, cfg.layer)
    check_features(sae, cfg.feature)
    scales = relative_scale(cfg.index, cfg.feature) if cfg.index else None
    ivs = build_interventions(cfg.feature, cfg.value, cfg.mode, scales)

    lower = "--batch-size or --max-new-tokens"
    with out_of_memory_guard("steer", adapter.device, lower, resumes=False):
        clean, _ = run_batches(adapter, images, cfg.prompt, cfg.batch_size, cfg.max_new_tokens)
        steered_texts, _ = run_batches(adapter, images, cfg.prompt, cfg.batch_size, cfg.max_new_tokens, sae, ivs,
                                       cfg.span, layer)
    desc = ", ".join(f"{iv.mode} f{iv.feature}={iv.value:g}" for iv in ivs)
    rows = []
    for i, (p, a, b) in enumerate(zip(cfg.prompt, clean, steered_texts)):
        print(f"[{i}] {p}\n    steering: {desc} on span '{cfg.span}'\n{side_by_side(a, b)}\n")
        rows.append({"prompt": p, "image": cfg.image[0] if len(cfg.image) == 1 else (cfg.image[i] if cfg.image else None),
                     "interventions": [asdict(iv) for iv in ivs], "span": cfg.span, "layer": layer,
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
                               cfg.max_new_tokens, cfg.batch_size, layer, scales[0] if scales else 1.0, judge)
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
