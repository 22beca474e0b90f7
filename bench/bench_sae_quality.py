"""SAE quality at equal tokens: mmsae's training defaults vs EleutherAI sparsify's default recipe.

    bash scripts/setup.sh && bash bench/setup_sparsify.sh     # once
    python bench/bench_sae_quality.py                           # both stores, a short and a long run
    python bench/bench_sae_quality.py --stores demo --long 200 --json quality.json

Two stores of real activations, built on first use and cached under ``--cache``:
  * demo: the demo model (``mmsae demo build``) at the demo's layer over shapes-world images and
    their default prompt (image and text tokens), held out: other images (another world seed);
  * text: the demo's language model alone (SmolLM2-135M-Instruct, dequantised by the demo build)
    at the same layer over English paragraphs from the docstrings of Python's standard library
    (text that ships with every Python), held out: other paragraphs.
On each, both trainers see the same tokens in the same order for the same number of steps:
  * mmsae: ``mmsae.train.train`` with every ``TrainConfig`` default except the run's size
    (steps, batch size, expansion, k, seed), so the table follows whatever the defaults are;
  * sparsify: its own ``Trainer`` with its ``TrainConfig`` defaults (optimizer, learning rate,
    AuxK, b_dec initialisation, ...) in its own environment (bench/.venv-sparsify), fed by a
    stand-in "model" whose one layer emits the stored activation of each token id.
Both SAEs are then scored by the same plain-torch TopK on the held-out store: FVU, L0 and the
fraction of latents that never fire there (and on the first tokens of the training data).
Every process runs torch with ``--threads`` threads (1 by default, for a shared machine).
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from mmsae.activation_sources import ActivationSource  # noqa: E402

SPARSIFY_WORKER = r"""
import json, sys, time
import torch
from torch import nn
from safetensors.torch import load_file
from transformers import PretrainedConfig, PreTrainedModel
from sparsify import SparseCoderConfig, Trainer, TrainConfig

args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
data = load_file(args["data"])
acts, order = data["acts"], data["order"].long()


class Table(PreTrainedModel):
    # a stand-in language model: token id i -> stored activation i, at its one "layer"
    config_class = PretrainedConfig

    def __init__(self, acts):
        super().__init__(PretrainedConfig(num_hidden_layers=1))
        self.table = nn.Parameter(acts, requires_grad=False)
        self.layers = nn.ModuleList([nn.Identity()])

    def forward(self, input_ids, **kwargs):
        h = self.table[input_ids]
        for layer in self.layers:
            h = layer(h)
        return h


class Rows(torch.utils.data.Dataset):
    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i]}


seq = args["seq_len"]
rows = Rows(order.reshape(-1, seq))
# sparsify's defaults, except what sizes the run (batch_size counts sequences of seq tokens)
cfg = TrainConfig(SparseCoderConfig(num_latents=args["num_latents"], k=args["k"]), batch_size=args["batch_size"] // seq,
                  init_seeds=[args["seed"]], log_to_wandb=False, save_dir=args["out"], run_name="run")
start = time.perf_counter()
trainer = Trainer(cfg, rows, Table(acts))
trainer.fit()
seconds = time.perf_counter() - start
lr = trainer.optimizers[0].param_groups[0]["lr"] if cfg.optimizer != "adam" else trainer.lr_schedulers[0].base_lrs[0]
print(json.dumps({"seconds": seconds, "weights": f"{args['out']}/run/layers.0/sae.safetensors",
                  "recipe": {"optimizer": cfg.optimizer, "lr": lr, "auxk_alpha": cfg.auxk_alpha,
                             "dead_feature_threshold": cfg.dead_feature_threshold, "lr_warmup_steps": cfg.lr_warmup_steps}}))
"""


class OrderedSource(ActivationSource):
    """In-memory activations served in a given token order (the order sparsify's worker gets too)."""

    def __init__(self, acts: torch.Tensor, order: torch.Tensor, name: str):
        self.acts, self.order, self.name = acts, order, name
        self.d, self.n_tokens = acts.shape[1], acts.shape[0]

    def batches(self, local_batch, seed, rank, world, skip=0):
        assert world == 1, "one process"
        step = skip
        while True:
            yield self.acts[self.order[step * local_batch:(step + 1) * local_batch]]
            step += 1

    def sample(self, n, seed):
        return self.acts[torch.randperm(self.n_tokens, generator=torch.Generator().manual_seed(seed + 7777))[:n]]

    def describe(self):
        return self.name


def token_order(n_tokens: int, total: int, seed: int) -> torch.Tensor:
    """``total`` token indices: a fresh permutation of the store per epoch."""
    parts, epoch = [], 0
    while sum(len(p) for p in parts) < total:
        parts.append(torch.randperm(n_tokens, generator=torch.Generator().manual_seed(seed * 1000 + epoch)))
        epoch += 1
    return torch.cat(parts)[:total]


# --- stores ----------------------------------------------------------------------------------
def stdlib_paragraphs() -> list[str]:
    """English paragraphs from the docstrings of this Python's standard library (not its tests)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: dict[str, None] = {}
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if any(part in ("test", "tests", "idlelib", "site-packages", "lib2to3") for part in path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                for para in (ast.get_docstring(node) or "").split("\n\n"):
                    text = " ".join(para.split())
                    # prose, not code samples or tables
                    if 120 <= len(text) <= 800 and sum(c.isalpha() or c in " ,." for c in text) > 0.9 * len(text):
                        seen[text] = None
    return list(seen)


def build_stores(cache: Path, names: list[str], layer: int, sizes: dict) -> dict[str, tuple[Path, Path]]:
    """Harvest each missing store (train and held-out) into ``cache``; return their folders."""
    from mmsae.activations import HarvestConfig, harvest
    from mmsae.demo.build import build, build_language_model, default_cache_dir

    stores = {}
    for name in names:
        train_dir, held_dir = cache / f"{name}-train", cache / f"{name}-heldout"
        stores[name] = (train_dir, held_dir)
        if (train_dir / "manifest.json").exists() and (held_dir / "manifest.json").exists():
            continue
        if name == "demo":
            model = str(build(default_cache_dir()))
            data = {train_dir: f"shapes:{sizes['demo_train']}:0", held_dir: f"shapes:{sizes['demo_heldout']}:1"}
        else:
            model = str(build_language_model(default_cache_dir() / "stages"))
            paragraphs = stdlib_paragraphs()
            random.Random(0).shuffle(paragraphs)
            n_train, n_held = sizes["text_train"], sizes["text_heldout"]
            if len(paragraphs) < n_train + n_held:
                raise SystemExit(f"only {len(paragraphs)} docstring paragraphs; lower --text-train / --text-heldout")
            data = {}
            for folder, texts in ((train_dir, paragraphs[:n_train]), (held_dir, paragraphs[n_train:n_train + n_held])):
                jsonl = cache / f"{folder.name}.jsonl"
                jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
                data[folder] = str(jsonl)
        for folder, spec in data.items():
            if not (folder / "manifest.json").exists():
                print(f"[bench] harvesting {folder.name} from {spec}", flush=True)
                harvest(HarvestConfig(model=model, layer=layer, data=spec, out=str(folder)))
    return stores


# --- training --------------------------------------------------------------------------------
def train_mmsae(acts, order, args, steps: int, out: Path) -> tuple[dict, float, dict]:
    from safetensors.torch import load_file

    from mmsae.train import TrainConfig, train

    cfg = TrainConfig(out=str(out), steps=steps, batch_size=args.batch_size, expansion=args.expansion, k=args.k,
                      seed=args.seed, device="cpu", progress=False)
    start = time.perf_counter()
    train(cfg, OrderedSource(acts, order, out.name))
    seconds = time.perf_counter() - start
    state = json.loads((out / "train_state.json").read_text())
    recipe = {k: state["config"][k] for k in ("warmup", "decay", "auxk_coefficient", "dead_tokens", "normalize_input", "b_dec_init")}
    recipe["lr"] = state["lr"]
    if json.loads((out / "cfg.json").read_text())["architecture"] != "topk":  # evaluate() is plain TopK
        raise SystemExit("mmsae's default architecture is no longer topk; teach evaluate() its encoder")
    return load_file(str(out / "sae.safetensors")), seconds, recipe


def train_sparsify(acts, order, args, steps: int, out: Path) -> tuple[dict, float, dict]:
    from safetensors.torch import load_file, save_file

    data = out.parent / f"{out.name}-data.safetensors"
    save_file({"acts": acts.contiguous(), "order": order.int()}, str(data))
    job = {"data": str(data), "out": str(out), "threads": args.threads, "num_latents": acts.shape[1] * args.expansion,
           "k": args.k, "batch_size": args.batch_size, "seq_len": args.seq_len, "seed": args.seed}
    proc = subprocess.run([args.sparsify_python, "-c", SPARSIFY_WORKER, json.dumps(job)], capture_output=True, text=True)
    data.unlink()
    if proc.returncode != 0:
        raise SystemExit(f"sparsify worker failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return load_file(result["weights"]), result["seconds"], result["recipe"]


# --- evaluation ------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(w: dict[str, torch.Tensor], x: torch.Tensor, k: int, chunk: int = 4096) -> dict:
    """TopK encode and decode ``x``: FVU, mean L0 and the fraction of latents that never fire."""
    enc, b_enc, dec, b_dec = w["encoder.weight"], w["encoder.bias"], w["W_dec"], w["b_dec"]
    fired = torch.zeros(enc.shape[0], dtype=torch.bool)
    sq_err, active = 0.0, 0
    for part in x.split(chunk):
        values, idx = torch.nn.functional.linear(part - b_dec, enc, b_enc).topk(k, dim=-1)
        values = values.relu()
        recon = torch.nn.functional.embedding_bag(idx, dec, per_sample_weights=values, mode="sum") + b_dec
        sq_err += float((recon - part).double().pow(2).sum())
        on = values > 0
        active += int(on.sum())
        fired[idx[on]] = True
    total = float((x.double() - x.double().mean(0)).pow(2).sum())
    return {"fvu": sq_err / total, "l0": active / len(x), "dead": 1 - float(fired.float().mean())}


def main() -> None:
    from mmsae.activations import ActivationStore
    from mmsae.demo import DemoConfig
    from mmsae.demo.build import default_cache_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stores", default="demo,text", help="comma-separated: demo, text")
    parser.add_argument("--short", type=int, default=30, help="steps of the short run")
    parser.add_argument("--long", type=int, default=300, help="steps of the long run")
    parser.add_argument("--batch-size", type=int, default=1024, help="tokens per step, both trainers")
    parser.add_argument("--expansion", type=int, default=8, help="latents = expansion * d (8 keeps the bench near 10 minutes on 2 cores)")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seq-len", type=int, default=256, help="sparsify's batches are batch-size / seq-len sequences")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each process")
    parser.add_argument("--demo-train", type=int, default=800, help="shapes-world images in the demo training store")
    parser.add_argument("--demo-heldout", type=int, default=200)
    parser.add_argument("--text-train", type=int, default=2000, help="docstring paragraphs in the text training store")
    parser.add_argument("--text-heldout", type=int, default=300)
    parser.add_argument("--train-eval-tokens", type=int, default=32768, help="training tokens on which dead latents are also counted")
    parser.add_argument("--cache", default=None, help="where the stores are kept (default: $MMSAE_CACHE/bench-sae-quality)")
    parser.add_argument("--sparsify-python", default=str(HERE / ".venv-sparsify" / "bin" / "python"))
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    if args.batch_size % args.seq_len:
        raise SystemExit("--batch-size must be a multiple of --seq-len")
    if not Path(args.sparsify_python).exists():
        raise SystemExit(f"no sparsify environment at {args.sparsify_python}; run: bash bench/setup_sparsify.sh")
    torch.set_num_threads(args.threads)
    cache = Path(args.cache) if args.cache else default_cache_dir() / "bench-sae-quality"
    cache.mkdir(parents=True, exist_ok=True)
    sizes = {"demo_train": args.demo_train, "demo_heldout": args.demo_heldout,
             "text_train": args.text_train, "text_heldout": args.text_heldout}
    stores = build_stores(cache, args.stores.split(","), DemoConfig().layer, sizes)

    rows, recipes = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-sae-quality-") as work:
        for name, (train_dir, held_dir) in stores.items():
            acts, held = ActivationStore(train_dir).load_all(), ActivationStore(held_dir).load_all()
            print(f"[bench] {name}: {len(acts)} training tokens, {len(held)} held-out tokens, d={acts.shape[1]}", flush=True)
            for run, steps in (("short", args.short), ("long", args.long)):
                order = token_order(len(acts), steps * args.batch_size, args.seed)
                for trainer, fn in (("mmsae", train_mmsae), ("sparsify", train_sparsify)):
                    weights, seconds, recipes[f"{trainer} {run}"] = fn(acts, order, args, steps, Path(work) / f"{trainer}-{name}-{run}")
                    held_out = evaluate(weights, held, args.k)
                    on_train = evaluate(weights, acts[order[:args.train_eval_tokens]], args.k)
                    row = {"store": name, "run": run, "steps": steps, "tokens": steps * args.batch_size, "trainer": trainer,
                           "fvu": held_out["fvu"], "l0": held_out["l0"], "dead": held_out["dead"],
                           "dead_train": on_train["dead"], "train_fvu": on_train["fvu"], "seconds": seconds}
                    rows.append(row)
                    print(f"[bench] {name} {run} {trainer}: FVU {row['fvu']:.4f}  L0 {row['l0']:.1f}  dead {row['dead']:.3f}  "
                          f"({seconds:.0f} s)", flush=True)

    print(f"\nSAE quality at equal tokens: {args.expansion} x d latents, k={args.k}, batch {args.batch_size} tokens, "
          f"{args.threads} torch thread(s) per process")
    for trainer, recipe in recipes.items():
        print(f"  {trainer} recipe: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in recipe.items()))
    print(f"  dead = never fires on the held-out store; dead (train) = on the first {args.train_eval_tokens} training tokens\n")
    print("| store | run | tokens | trainer | held-out FVU | L0 | dead | dead (train) | train s |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['store']} | {r['run']} ({r['steps']} steps) | {r['tokens']:,} | {r['trainer']} | {r['fvu']:.4f} | {r['l0']:.1f} | "
              f"{r['dead']:.3f} | {r['dead_train']:.3f} | {r['seconds']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "recipes": recipes, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
