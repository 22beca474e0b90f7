"""GPU checks of the SAE engine: correctness against float64 references, then speed.

    python bench/gpu_check.py --out results/            # needs a CUDA device

1. kernels: sparse encode / decode and all their gradients on the GPU against a dense float64
   reference on the CPU (relative error ||ours - ref|| / ||ref||), in float32 and with the bf16
   encoder matmul (autocast);
2. training on the GPU: planted-direction recovery on synthetic activations, and exact resume
   (a run killed after its first checkpoint and resumed, against one never interrupted);
3. the sparse backward's two products, timed at the benchmark shapes: the CSR products the
   kernels use (cuSPARSE under ``ActiveSet``) against the obvious alternative, outer products
   added with ``index_add_`` (atomics) and gathered rows with ``bmm``;
4. where a training step's GPU time goes (torch.profiler, kernels by total time).
Everything goes to ``--out`` as JSON, and a short table is printed last.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mmsae.sae import load_sae  # noqa: E402
from mmsae.sae.kernels import ActiveSet, sparse_decode, sparse_encode  # noqa: E402
from mmsae.sae.synthetic import SyntheticConfig, generate, recovery_score  # noqa: E402
import mmsae.train as train_mod  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sae import make_mmsae_step  # noqa: E402


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    return float((a - ref).norm() / ref.norm().clamp_min(1e-300))


def check_kernels(device: torch.device, autocast: bool) -> dict:
    gen = torch.Generator().manual_seed(3)
    B, d, n, k = 512, 96, 3000, 24
    cpu = [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in ((B, d), (n, d), (n,), (n, d), (B, d))]
    x, w_enc, b_enc, w_dec, target = (t.clone().requires_grad_(i < 4) for i, t in enumerate(cpu))
    # reference: dense float64, with the active set the GPU picked (ties aside, the same top-k)
    xs, we, be, wd = (t.detach().to(device, torch.float32).requires_grad_() for t in (x, w_enc, b_enc, w_dec))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        values, indices = sparse_encode(xs, we, be, k)
    out = sparse_decode(values.float().relu(), indices, wd)
    ((out - target.to(device, torch.float32)) ** 2).sum().backward()
    pre = x @ w_enc.T + b_enc
    mask = torch.zeros_like(pre).scatter(1, indices.cpu(), 1.0)
    ref_out = (pre.relu() * mask) @ w_dec
    ((ref_out - target) ** 2).sum().backward()
    topk_agree = float((torch.sort(indices.cpu(), 1).values == torch.sort(pre.topk(k, 1).indices, 1).values).float().mean())
    return {"autocast_bf16": autocast, "topk_index_agreement": topk_agree, "out": rel(out, ref_out),
            "grad_x": rel(xs.grad, x.grad), "grad_w_enc": rel(we.grad, w_enc.grad), "grad_b_enc": rel(be.grad, b_enc.grad),
            "grad_w_dec": rel(wd.grad, w_dec.grad)}


def check_training(device: torch.device, root: Path) -> dict:
    acts, directions = generate(SyntheticConfig(d=32, m=64, k=3, tokens=40_000, noise=0.01, seed=0))
    base = dict(expansion=4, k=3, batch_size=256, warmup=10, lr=4e-3, progress=False, init_tokens=2048, device=str(device))
    start = time.perf_counter()
    train_mod.train(train_mod.TrainConfig(out=str(root / "recover"), steps=150, dead_tokens=10_000, log_every=50,
                                          checkpoint_every=1000, **base), source=acts)
    seconds = time.perf_counter() - start
    score = recovery_score(directions, load_sae(root / "recover").W_dec)
    # exact resume on the GPU
    small = dict(base, warmup=3, steps=12, dead_tokens=1000, log_every=2, checkpoint_every=4)
    train_mod.train(train_mod.TrainConfig(out=str(root / "a"), **small), source=acts)

    def crash_after_step_6(done: int) -> None:
        if done == 6:
            raise KeyboardInterrupt

    try:
        train_mod.train(train_mod.TrainConfig(out=str(root / "b"), **small), source=acts, on_step=crash_after_step_6)
    except KeyboardInterrupt:
        pass
    train_mod.train(train_mod.TrainConfig(out=str(root / "b"), **small), source=acts)
    a, b = load_sae(root / "a"), load_sae(root / "b")
    diff = max(float((pa - pb).abs().max()) for pa, pb in zip(a.state_dict().values(), b.state_dict().values()))
    # the same run on the CPU: same seed, same data order (GPU float order differs: close, not equal)
    train_mod.train(train_mod.TrainConfig(out=str(root / "cpu"), **dict(small, device="cpu")), source=acts)
    c = load_sae(root / "cpu")
    cpu_diff = max(rel(pa, pc) for pa, pc in zip(a.state_dict().values(), c.state_dict().values()))
    return {"recovery": score, "train_seconds_150_steps": seconds, "resume_max_abs_diff": diff,
            "gpu_vs_cpu_max_rel_diff_12_steps": cpu_diff}


def median_ms(fn, device: torch.device, reps: int = 20) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(1000 * (time.perf_counter() - start))
    return sorted(times)[len(times) // 2]


def compare_backward(device: torch.device, d: int, n: int, k: int, batch: int) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    indices = torch.rand(batch, n, device=device, generator=gen).topk(k, dim=1).indices
    coeffs = torch.rand(batch, k, device=device, generator=gen)
    vectors = torch.randn(batch, d, device=device, generator=gen)
    weight = torch.randn(n, d, device=device, generator=gen)
    grad = torch.zeros(n, d, device=device)

    def csr_grad():
        ActiveSet(indices, n).add_weight_grad(grad, coeffs, vectors)

    def atomic_grad():
        grad.index_add_(0, indices.reshape(-1), (coeffs[:, :, None] * vectors[:, None, :]).reshape(-1, d))

    def csr_dots():
        return ActiveSet(indices, n).row_dots(weight, vectors)

    def gather_dots():
        return torch.bmm(weight[indices], vectors[:, :, None]).squeeze(-1)

    csr_grad()
    ref = grad.clone()
    grad.zero_()
    atomic_grad()
    agree = {"weight_grad": rel(grad, ref), "row_dots": rel(csr_dots(), gather_dots())}  # before timing accumulates
    return {"d": d, "n": n, "k": k, "batch": batch, "agree": agree,
            "weight_grad_ms": {"csr": median_ms(csr_grad, device), "index_add": median_ms(atomic_grad, device)},
            "row_dots_ms": {"csr": median_ms(csr_dots, device), "gather_bmm": median_ms(gather_dots, device)}}


def profile_step(device: torch.device, d: int, n: int, k: int, batch: int, steps: int = 5) -> dict:
    """Share of a training step's device time per kernel (top 15) and the step's wall time."""
    from torch.profiler import ProfilerActivity, profile

    run = make_mmsae_step(d, n, k, batch, False, device)
    run(3)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        seconds = run(steps)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr) > 0]
    total = sum(getattr(e, attr) for e in events)
    events.sort(key=lambda e: -getattr(e, attr))
    print(prof.key_averages().table(sort_by=attr, row_limit=15))
    return {"d": d, "n": n, "k": k, "batch": batch, "wall_ms_per_step": 1000 * seconds / steps,
            "device_ms_per_step": total / 1000 / steps,
            "top": [{"name": e.key[:80], "ms_per_step": getattr(e, attr) / 1000 / steps, "calls_per_step": e.count / steps}
                    for e in events[:15]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="gpu_check")
    parser.add_argument("--device", default="cuda", help="cuda (the point), or cpu to try the script itself")
    parser.add_argument("--batch", type=int, default=4096, help="tokens per step in the backward comparison")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this script checks the GPU paths (--device cpu tries it on the CPU)")
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    result = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}

    def section(name: str, fn) -> None:  # one failing check must not hide the others
        try:
            result[name] = fn()
        except Exception as e:  # noqa: BLE001 - reported in the results
            traceback.print_exc()
            result[name] = {"error": f"{type(e).__name__}: {e}"}

    section("kernels", lambda: [check_kernels(device, False), check_kernels(device, True)])
    with tempfile.TemporaryDirectory() as tmp:
        section("training", lambda: check_training(device, Path(tmp)))
    section("backward", lambda: [compare_backward(device, 768, 24576, 32, args.batch),
                                 compare_backward(device, 4096, 32768, 64, args.batch)])
    section("profile", lambda: [profile_step(device, 768, 24576, 32, args.batch)])
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
