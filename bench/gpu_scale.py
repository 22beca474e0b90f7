"""Every GPU figure of the scale work in one run (about 8 minutes on an H100/H200), into one JSON.

    python bench/gpu_scale.py --out results/                 # on a CUDA machine
    python bench/gpu_scale.py --out /tmp/g --dry-run         # the same parts at tiny shapes on the CPU (plumbing)

Parts, each printed as a ratio to a baseline measured in the same run:

  sae_paper   SAE training step at the paper's shape, d 4096, n 131,072, k 256: mmsae in float32,
              TF32 and bf16 autocast, against the matmul ceiling of the same shapes (float32, TF32,
              bf16) and EleutherAI sparsify when it is importable (this Python, or
              bench/.venv-sparsify); bench/bench_sae.py's step makers
  sae_gpt2    the same at d 768, n 24,576, k 32
  harvest     harvest vs the bare early-exit forward and the full forward (bench/bench_harvest.py)
  index       build_index vs the bare forward + SAE encode (bench/bench_index.py)
  rehearsal   the full-size LLaVA-NeXT-8B pipeline and the paper-run projection (bench/scale_rehearsal.py,
              128 images, LLaVA-NeXT only, whatever budget is left; run that script alone for both
              families); its store-fed SAE training rate is compared with sae_paper's bf16 step

Each part runs in its own try/except (a failure is recorded and the next part runs); a part is
skipped when less than its usual time is left of ``--budget-s``. The JSON is rewritten after
every part, so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import scale_rehearsal  # noqa: E402
from bench_sae import SparsifyWorker, make_matmul, make_mmsae_step  # noqa: E402

from mmsae.io import ensure_dir, write_json  # noqa: E402

# seconds a part usually takes on an H100 (it is skipped when less than this is left)
PART_SECONDS = {"sae_paper": 90, "sae_gpt2": 30, "harvest": 60, "index": 60, "rehearsal": 150}


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def tokens_per_s(run: Callable[[int], float], batch: int, steps: int, rounds: int) -> dict:
    """Median tokens/s of ``rounds`` timed calls of ``run(steps)`` after one warm-up step."""
    run(1)
    rates = [batch * steps / run(steps) for _ in range(rounds)]
    return {"tokens_per_s": statistics.median(rates), "rounds": rates}


def bf16_matmul(d: int, n: int, batch: int, device: torch.device) -> Callable[[int], float]:
    """The bf16 ceiling: [batch, d] x [d, n] in bfloat16 (what autocast gives the encoder)."""
    x = torch.randn(batch, d, device=device, dtype=torch.bfloat16)
    w = torch.randn(n, d, device=device, dtype=torch.bfloat16) / d**0.5
    out = torch.empty(batch, n, device=device, dtype=torch.bfloat16)

    def run(steps: int) -> float:
        torch.cuda.synchronize() if device.type == "cuda" else None
        start = time.perf_counter()
        for _ in range(steps):
            torch.mm(x, w.t(), out=out)
        torch.cuda.synchronize() if device.type == "cuda" else None
        return time.perf_counter() - start

    return run


def sparsify_python() -> str | None:
    """A Python that can import sparsify: this one, or bench/.venv-sparsify's."""
    try:
        import sparsify  # noqa: F401

        return sys.executable
    except ImportError:
        venv = HERE / ".venv-sparsify" / "bin" / "python"
        return str(venv) if venv.exists() else None


def sae_shape(d: int, n: int, k: int, batch: int, steps: int, rounds: int, device: torch.device) -> dict:
    """mmsae's training step in float32, TF32 and bf16 autocast, the matmul ceilings, and sparsify."""
    row: dict = {"d": d, "n": n, "k": k, "batch": batch, "tokens_per_s": {}}
    rate = row["tokens_per_s"]

    def timed(name: str, make: Callable[[], Callable[[int], float]], tf32: bool) -> None:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            run = make()
            rate[name] = tokens_per_s(run, batch, steps, rounds)["tokens_per_s"]
        except Exception as e:  # noqa: BLE001 - e.g. out of memory for one method: the others still run
            traceback.print_exc()
            row.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        finally:
            run = None
            _free()

    # one method at a time: at the paper's shape each holds ~17 GB of weights, gradients and Adam moments
    timed("ceiling_fp32", lambda: make_matmul(d, n, batch, device), False)
    timed("ceiling_tf32", lambda: make_matmul(d, n, batch, device), True)
    timed("ceiling_bf16", lambda: bf16_matmul(d, n, batch, device), False)
    timed("mmsae_fp32", lambda: make_mmsae_step(d, n, k, batch, False, device), False)
    timed("mmsae_tf32", lambda: make_mmsae_step(d, n, k, batch, False, device), True)
    timed("mmsae_bf16", lambda: make_mmsae_step(d, n, k, batch, True, device), True)
    python = sparsify_python()
    row["sparsify_python"] = python
    for tf32 in ([False, True] if python else []):
        name = "sparsify_tf32" if tf32 else "sparsify_fp32"
        worker = SparsifyWorker(python, torch.get_num_threads(), str(device), tf32)
        try:
            worker.call(op="init", d=d, n=n, k=k, batch=batch)
            timed(name, lambda: (lambda steps: worker.call(op="run", steps=steps)["seconds"]), tf32)
        except Exception as e:  # noqa: BLE001
            row.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"[:300]
        finally:
            try:
                worker.close()
            except Exception:  # noqa: BLE001 - a dead worker has nothing to close
                pass
    torch.backends.cuda.matmul.allow_tf32 = False
    ratios = {}
    for precision in ("fp32", "tf32", "bf16"):
        ours = rate.get(f"mmsae_{precision}")
        if ours and rate.get(f"ceiling_{precision}"):
            ratios[f"mmsae_{precision}_vs_ceiling"] = ours / rate[f"ceiling_{precision}"]
        for theirs in ("fp32", "tf32"):
            if ours and rate.get(f"sparsify_{theirs}"):
                ratios[f"mmsae_{precision}_vs_sparsify_{theirs}"] = ours / rate[f"sparsify_{theirs}"]
    row["ratios"] = ratios
    return row


def bench_script(script: str, args: list[str], timeout: float) -> dict:
    """Run ``bench/script`` with ``--json`` in a fresh process (its own GPU memory) and read the result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
        done = subprocess.run([sys.executable, str(HERE / script), *args, "--json", str(out)], env=env, capture_output=True,
                              text=True, timeout=timeout)
        print(done.stdout[-3000:], end="")
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"{script} exited {done.returncode}: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}")
        return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for gpu_scale.json (and the rehearsal's scale_rehearsal.json)")
    p.add_argument("--budget-s", type=float, default=480.0, help="skip the parts that would not fit in this many seconds")
    p.add_argument("--dry-run", action="store_true", help="every part at tiny shapes on the CPU: checks the plumbing, measures nothing useful")
    p.add_argument("--parts", default=",".join(PART_SECONDS), help="comma-separated subset of " + ", ".join(PART_SECONDS))
    args = p.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this script measures the GPU figures (--dry-run tries it on the CPU)")
    device = torch.device("cpu" if args.dry_run else "cuda")
    out = ensure_dir(args.out)
    started = time.perf_counter()
    result: dict = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "dry_run": args.dry_run, "budget_s": args.budget_s, "parts": {}}
    small = args.dry_run
    if small:
        torch.set_num_threads(1)
    sae = dict(batch=256, steps=1, rounds=2) if small else dict(batch=4096, steps=3, rounds=3)
    harvest_args = (["--d", "64", "--layers", "2", "--layer", "0", "--samples", "8", "--tokens", "32", "--repeats", "1"] if small
                    else ["--d", "2048", "--layers", "8", "--layer", "5", "--samples", "64", "--tokens", "512", "--batch-size", "16",
                          "--repeats", "3"])
    index_args = (["--images", "8", "--latents", "512", "--image-size", "32", "--patch", "8", "--d", "32", "--layers", "2",
                   "--layer", "1", "--repeats", "1"] if small else ["--images", "128", "--batch-size", "16", "--latents", "32768", "--k", "64",
                                                    "--repeats", "2"])

    def left() -> float:
        return args.budget_s - (time.perf_counter() - started)

    def rehearsal() -> dict:
        plan_args = ["--out", str(out)] + (["--tiny"] if small else ["--budget-s", str(max(left() - 20, 60))])
        if not small:  # LLaVA-NeXT-8B only and half the images: four loads of its 16 GB dominate, and the budget is short
            plan_args += ["--device", "cuda", "--families", "llava_next", "--images", "128", "--train-tokens", str(2**19)]
        rep = scale_rehearsal.main(plan_args)
        train = rep["families"][rep["plan"]["families"][0]]["stages"].get("train", {})
        step = result["parts"].get("sae_paper", {}).get("tokens_per_s", {}).get("mmsae_bf16")
        if train.get("tokens_per_s") and step and not small:
            rep["train_vs_sae_paper_bf16_step"] = train["tokens_per_s"] / step  # the store-fed loop vs synthetic batches
        return rep

    parts: dict[str, Callable[[], dict]] = {
        "sae_paper": lambda: sae_shape(64, 1024, 8, device=device, **sae) if small else sae_shape(4096, 131072, 256, device=device, **sae),
        "sae_gpt2": lambda: sae_shape(32, 512, 4, device=device, **sae) if small else sae_shape(768, 24576, 32, device=device, **sae),
        "harvest": lambda: bench_script("bench_harvest.py", harvest_args + ["--device", device.type], timeout=max(left(), 30)),
        "index": lambda: bench_script("bench_index.py", index_args + ["--device", device.type], timeout=max(left(), 30)),
        "rehearsal": rehearsal,
    }
    for name in args.parts.split(","):
        if name not in parts:
            p.error(f"--parts: unknown part {name!r}; known: {', '.join(parts)}")
        if not small and left() < PART_SECONDS[name]:
            result["parts"][name] = {"skipped": f"{left():.0f} s of the budget left, the part takes about {PART_SECONDS[name]} s"}
            continue
        print(f"\n=== {name} ({left():.0f} s of the budget left)", flush=True)
        t = time.perf_counter()
        try:
            result["parts"][name] = parts[name]()
        except Exception as e:  # noqa: BLE001 - recorded; the next part still runs
            traceback.print_exc()
            result["parts"][name] = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:500]}
        result["parts"][name]["part_seconds"] = round(time.perf_counter() - t, 1)
        _free()
        result["wall_s"] = round(time.perf_counter() - started, 1)
        write_json(out / "gpu_scale.json", result)
    print_summary(result)
    print(f"\nwrote {out / 'gpu_scale.json'}")


def print_summary(result: dict) -> None:
    print(f"\n=== summary ({result['device']}, {result.get('wall_s', 0):.0f} s)")
    for name, part in result["parts"].items():
        if "error" in part or "skipped" in part:
            print(f"{name:10s} {part.get('error') or part.get('skipped')}")
        elif name.startswith("sae_"):
            rates = ", ".join(f"{k} {v:,.0f}" for k, v in part["tokens_per_s"].items())
            print(f"{name:10s} d {part['d']} n {part['n']} k {part['k']}: tokens/s {rates}")
            for k, v in part["ratios"].items():
                print(f"{'':10s}   {k:34s} {v:.2f}")
        elif name == "harvest":
            print(f"{name:10s} harvest / early-exit forward time {part['harvest_vs_early']:.3f}; "
                  f"full / early {part['full_vs_early']:.2f}x")
        elif name == "index":
            print(f"{name:10s} build_index / bare forward + SAE time {part['index_vs_bare']:.2f}; "
                  f"{part['index_images_per_s']:.1f} vs {part['bare_images_per_s']:.1f} images/s")
        elif name == "rehearsal":
            proj = part.get("projection") or {}
            ratio = part.get("train_vs_sae_paper_bf16_step")
            print(f"{name:10s} paper run: {proj.get('one_gpu_h', float('nan')):.1f} h on one GPU, "
                  f"{proj.get('multi_gpu_h', float('nan')):.1f} h on {proj.get('gpus', 8)}"
                  + (f"; store-fed training / bf16 step {ratio:.2f}" if ratio else ""))


if __name__ == "__main__":
    main()
