"""SAE training throughput: mmsae vs a plain matmul ceiling vs EleutherAI sparsify, same run.

    bash bench/setup_sparsify.sh            # once: bench/.venv-sparsify with eai-sparsify
    python bench/bench_sae.py               # GPT-2-small shape and a LLaVA-like shape
    python bench/bench_sae.py --shapes 768x24576x32 --batch 2048 --rounds 5
    python bench/bench_sae.py --device cuda --batch 4096 --bf16   # on a GPU (sparsify on the GPU too)

For each shape (d x n x k) it times, interleaved round by round so that a shared machine's load
hits them all alike:
  * ceiling: a plain [batch, d] x [d, n] matmul (2*d*n FLOPs per token, into a reused buffer);
  * mmsae:   one full training step (encode, decode, FVU loss, backward, decoder-gradient
             projection, Adam, decoder renormalisation) through ``mmsae.train``;
  * mmsae matryoshka: the same step with Matryoshka groups (``--matryoshka-fractions``): the
             loss over every prefix of the groups (its step time / TopK's is printed);
  * sparsify: ``SparseCoder`` forward (FVU loss), backward, the same projection, Adam and
             renormalisation, in its own environment (a worker process fed over a pipe).
It prints tokens/s (median over rounds) and the ratios mmsae/sparsify and mmsae/ceiling.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from mmsae.sae.model import SaeConfig, SparseAutoencoder  # noqa: E402
from mmsae.train import SaeTrainingStep, TrainConfig, make_optimizer, matryoshka_group_sizes, train_step  # noqa: E402

SPARSIFY_WORKER = r"""
import json, sys, time, torch
from sparsify import SparseCoder, SparseCoderConfig
torch.set_num_threads(int(sys.argv[1]))
device = torch.device(sys.argv[2])
torch.backends.cuda.matmul.allow_tf32 = sys.argv[3] == "1"
sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
state = {}
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "init":
        torch.manual_seed(0)
        d, n, k, batch = cmd["d"], cmd["n"], cmd["k"], cmd["batch"]
        sae = SparseCoder(d, SparseCoderConfig(num_latents=n, k=k), device=device)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
        x = torch.randn(batch, d, generator=torch.Generator().manual_seed(1)).to(device)
        state = {"sae": sae, "opt": opt, "x": x}
        print(json.dumps({"ok": True}), flush=True)
    elif cmd["op"] == "run":
        sae, opt, x = state["sae"], state["opt"], state["x"]
        sync()
        start = time.perf_counter()
        for _ in range(cmd["steps"]):
            out = sae(x)
            loss = out.fvu + out.auxk_loss
            loss.backward()
            sae.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            opt.zero_grad()
            sae.set_decoder_norm_to_unit_norm()
        float(loss.detach())
        sync()
        print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)
    elif cmd["op"] == "free":
        state = {}
        print(json.dumps({"ok": True}), flush=True)
"""


class SparsifyWorker:
    def __init__(self, python: str, threads: int, device: str, tf32: bool):
        self.proc = subprocess.Popen([python, "-c", SPARSIFY_WORKER, str(threads), device, str(int(tf32))], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)

    def call(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("sparsify worker died")
            if line.startswith("{"):
                return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_mmsae_step(d: int, n: int, k: int, batch: int, autocast: bool, device: torch.device, groups: list[int] | None = None):
    torch.manual_seed(0)
    sae = SparseAutoencoder(SaeConfig(d_in=d, num_latents=n, k=k, matryoshka_groups=groups), device=device)
    cfg = TrainConfig(out="unused", k=k, batch_size=batch, dead_tokens=10**12, autocast=autocast, device=str(device))
    model = SaeTrainingStep(sae, cfg)
    opt = make_optimizer(sae, 1e-4)
    x = torch.randn(batch, d, generator=torch.Generator().manual_seed(1)).to(device)
    state = {"tokens_since_fired": torch.zeros(n, dtype=torch.long, device=device), "tokens": 0, "threshold_initialised": False}

    def run(steps: int) -> float:
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            loss, _ = train_step(model, opt, x, state, cfg, 1)
        float(loss)
        _sync(device)
        return time.perf_counter() - start

    return run


def make_matmul(d: int, n: int, batch: int, device: torch.device):
    x = torch.randn(batch, d, device=device)
    w = torch.randn(n, d, device=device) / d**0.5
    out = torch.empty(batch, n, device=device)

    def run(steps: int) -> float:
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            torch.mm(x, w.t(), out=out)
        _sync(device)
        return time.perf_counter() - start

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="768x24576x32,4096x32768x64", help="comma-separated d x n x k")
    parser.add_argument("--batch", type=int, default=1024, help="tokens per step")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round and method")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="also time mmsae with the bf16 encoder matmul (--autocast)")
    parser.add_argument("--matryoshka-fractions", default="0.03125,0.0625,0.125,0.25,0.53125",
                        help="groups of the Matryoshka step (timed beside the TopK step: same selection, prefix losses added)")
    parser.add_argument("--sparsify-python", default=str(HERE / ".venv-sparsify" / "bin" / "python"))
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the ceiling's matmul is float32: TF32 off unless --tf32)")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on GPU (all three methods)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32

    threads = torch.get_num_threads()
    worker = SparsifyWorker(args.sparsify_python, threads, args.device, args.tf32) if Path(args.sparsify_python).exists() else None
    if worker is None:
        print(f"(no sparsify environment at {args.sparsify_python}; run bench/setup_sparsify.sh to compare)")
    results = []
    for shape in args.shapes.split(","):
        d, n, k = (int(v) for v in shape.split("x"))
        groups = matryoshka_group_sizes(TrainConfig(out="unused", matryoshka_fractions=[float(f) for f in args.matryoshka_fractions.split(",")]), n)
        methods = {"ceiling (matmul)": make_matmul(d, n, args.batch, device), "mmsae": make_mmsae_step(d, n, k, args.batch, False, device),
                   "mmsae matryoshka": make_mmsae_step(d, n, k, args.batch, False, device, groups)}
        if args.bf16:
            methods["mmsae bf16"] = make_mmsae_step(d, n, k, args.batch, True, device)
        if worker is not None:
            try:
                worker.call(op="init", d=d, n=n, k=k, batch=args.batch)
            except RuntimeError as e:  # its environment cannot import sparsify: compare without it
                print(f"(sparsify unavailable: {e})")
                worker = None
        if worker is not None:
            methods["sparsify"] = lambda steps: worker.call(op="run", steps=steps)["seconds"]
        for run in methods.values():  # warm-up
            run(1)
        times: dict[str, list[float]] = {name: [] for name in methods}
        for _ in range(args.rounds):
            for name, run in methods.items():
                times[name].append(args.batch * args.steps / run(args.steps))
        if worker is not None:
            worker.call(op="free")
        rate = {name: statistics.median(v) for name, v in times.items()}
        row = {"d": d, "n": n, "k": k, "batch": args.batch, "threads": threads, "device": str(device), "tokens_per_s": rate,
               "rounds": times, "mmsae_vs_ceiling": rate["mmsae"] / rate["ceiling (matmul)"],
               "matryoshka_groups": groups, "matryoshka_step_vs_topk": rate["mmsae"] / rate["mmsae matryoshka"]}
        if "sparsify" in rate:
            row["mmsae_vs_sparsify"] = rate["mmsae"] / rate["sparsify"]
        results.append(row)
        print(f"\nd={d} n={n} k={k} batch={args.batch} threads={threads} device={device}")
        for name, value in rate.items():
            spread = f"{min(times[name]):.0f}-{max(times[name]):.0f}"
            print(f"  {name:<18} {value:10.0f} tokens/s   (rounds: {spread})")
        print(f"  mmsae / ceiling    {row['mmsae_vs_ceiling']:.2f}   (target >= 0.60)")
        print(f"  matryoshka step / topk step {row['matryoshka_step_vs_topk']:.2f}x  (target <= 1.3x; {len(groups)} groups)")
        if "mmsae_vs_sparsify" in row:
            print(f"  mmsae / sparsify   {row['mmsae_vs_sparsify']:.2f}x  (target >= 1.5x)")
        del methods
    if worker is not None:
        worker.close()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
