"""mmsae.runtime: the device option, half precision, torchrun's group and running out of memory.

Every test is right on a machine with or without CUDA: what a device string resolves to is
asserted from ``torch.cuda.is_available()``. Running out of memory is real: an allocation of a
petabyte or more, which no machine's allocator grants (more than a 47-bit address space, so not
even an overcommitting kernel hands it out).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import mmsae.hooks
import mmsae.train as train_mod
from mmsae.cli import main as cli_main
from mmsae.errors import MmsaeError
from mmsae.io import read_jsonl
from mmsae.runtime import check_dtype, init_distributed, out_of_memory_guard, resolve_device
from mmsae.train import TrainConfig, train
from tiny_models import tiny_adapter, tiny_model

CUDA = torch.cuda.is_available()
PETABYTE = 2**50


def impossible_allocation(device: str | torch.device = "cpu") -> torch.Tensor:
    return torch.empty(PETABYTE // 4, dtype=torch.float32, device=device)


def last_error_line(code: int, capsys, stage: str) -> str:
    """Exit 2, no traceback, and the last line of stderr (progress bars come before it)."""
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"mmsae {stage}: error: "), last
    return last


# --- the device -----------------------------------------------------------------------------------


def test_auto_is_the_gpu_when_there_is_one_else_the_cpu():
    assert resolve_device("auto") == (torch.device("cuda", 0) if CUDA else torch.device("cpu"))
    assert resolve_device("cpu") == resolve_device("cpu:0") == resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_bare_cuda_names_this_machine_or_says_it_has_none():
    if CUDA:
        assert resolve_device("cuda") == torch.device("cuda", 0)
        return
    with pytest.raises(MmsaeError) as err:
        resolve_device("cuda")
    built = "built without CUDA" if torch.version.cuda is None else "no GPU is visible"
    assert re.fullmatch(rf"--device cuda: this machine has no CUDA device \(torch \S+ is .*{built}\); "
                        r"use --device cpu or auto", str(err.value)), str(err.value)


def test_a_gpu_this_machine_lacks_is_named_with_what_it_has():
    with pytest.raises(MmsaeError) as err:
        resolve_device("cuda:99")
    if CUDA:
        n = torch.cuda.device_count()
        assert f"--device cuda:99: this machine has {n} CUDA device" in str(err.value)
        assert f"cuda:0 to cuda:{n - 1}" in str(err.value)
    else:
        assert str(err.value).startswith("--device cuda:99: this machine has no CUDA device (torch ")


@pytest.mark.parametrize("text, message", [
    ("gpu", "--device 'gpu' is not a device; use auto, cpu, cuda, cuda:N or mps"),
    ("cuda:-1", "--device 'cuda:-1' is not a device"),
    ("", "--device '' is not a device"),
    ("meta", "--device meta: mmsae runs on cpu, cuda or mps"),
])
def test_a_string_that_names_no_usable_device_is_one_line(text, message):
    with pytest.raises(MmsaeError) as err:
        resolve_device(text)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_mps_only_where_there_is_one():
    if torch.backends.mps.is_available():
        assert resolve_device("mps").type == "mps"
    else:
        with pytest.raises(MmsaeError, match="^--device mps: this machine has no MPS"):
            resolve_device("mps")


@pytest.mark.parametrize("argv", [
    ["train", "--activations", "synthetic:d=8,m=16,k=2,tokens=512", "--out", "OUT"],
    ["harvest", "--model", "M", "--layer", "0", "--data", "D", "--out", "OUT"],
    ["index", "--sae", "S", "--data", "D", "--out", "OUT"],
    ["evaluate", "--sae", "S", "--out", "OUT"],
])
def test_cli_refuses_a_missing_device_before_any_work(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    last = last_error_line(cli_main(argv + ["--device", "cuda:99"]), capsys, argv[0])
    assert "--device cuda:99: this machine has" in last
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


# --- half precision ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", torch.bfloat16])
def test_half_precision_is_refused_only_where_the_hardware_lacks_it(dtype):
    check_dtype(dtype, "cpu")  # CPUs run both
    device = resolve_device("auto")
    native = device.type != "cuda" or str(dtype) not in ("bfloat16", "torch.bfloat16") \
        or torch.cuda.get_device_capability(device)[0] >= 8
    if native:
        check_dtype(dtype, device)
    else:
        with pytest.raises(MmsaeError, match=r"^--dtype bfloat16: .* has no native bfloat16"):
            check_dtype(dtype, device)


# --- torchrun -------------------------------------------------------------------------------------


def test_one_process_joins_no_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed(torch.device("cpu")) == (0, 1)
    assert not torch.distributed.is_initialized()


def test_train_refuses_several_processes_without_a_rendezvous(tmp_path, monkeypatch):
    """WORLD_SIZE set by hand, no torchrun: each rank would otherwise train alone on its slice."""
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(MmsaeError, match=r"^train with WORLD_SIZE=2 needs torchrun's process group \(MASTER_ADDR is not set\); "
                       r"start it with torchrun --nproc-per-node N -m mmsae.cli train \.\.\.$"):
        train(TrainConfig(out=str(tmp_path / "sae"), activations="synthetic:d=8,m=16,k=2,tokens=512", expansion=2, k=2,
                          batch_size=64, steps=1, progress=False, device="cpu"))
    assert not (tmp_path / "sae").exists()


# --- running out of memory ---------------------------------------------------------------------------


def test_a_real_allocation_failure_becomes_one_line():
    with pytest.raises(MmsaeError) as err:
        with out_of_memory_guard("harvest", "cpu", "--batch-size or --shard-size"):
            impossible_allocation()
    assert str(err.value) == ("harvest ran out of host memory on cpu (it asked for 1.0 PiB); lower --batch-size or "
                              "--shard-size and rerun; finished work is kept")
    assert "DefaultCPUAllocator" in str(err.value.__cause__)  # the allocator's own error, kept as the cause


def test_numpy_running_out_is_host_memory_too():
    with pytest.raises(MmsaeError, match=r"^evaluate ran out of host memory on the host; lower --batch-size and rerun$"):
        with out_of_memory_guard("evaluate", "cuda:0", "--batch-size", resumes=False):
            np.empty(PETABYTE, dtype=np.uint8)


def test_other_errors_pass_through_unchanged():
    other = RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)")
    with pytest.raises(RuntimeError) as err:
        with out_of_memory_guard("train", "cpu", "--batch-size"):
            raise other
    assert err.value is other
    with pytest.raises(ValueError, match="^not memory$"):
        with out_of_memory_guard("train", "cpu", "--batch-size"):
            raise ValueError("not memory")


def test_train_with_an_impossible_number_of_latents_exits_2_with_one_line(tmp_path, capsys):
    """16 x 2^44 float32 weights (1 PiB): the SAE's first allocation fails, on the GPU under auto if there is one."""
    argv = ["train", "--activations", "synthetic:d=16,m=32,k=2,tokens=2000", "--num-latents", str(2**44), "--k", "2",
            "--batch-size", "256", "--steps", "2", "--init-tokens", "256", "--no-progress", "--out", str(tmp_path / "sae")]
    last = last_error_line(cli_main(argv), capsys, "train")
    where = "GPU memory on cuda:0" if CUDA else "host memory on cpu"
    assert re.fullmatch(rf"mmsae train: error: train ran out of {where} \(it asked for [\d.]+ [PT]iB\); "
                        r"lower --batch-size or --expansion \(--num-latents\) and rerun; finished work is kept", last), last


def test_index_with_an_impossible_top_n_exits_2_with_one_line(tmp_path, capsys):
    from PIL import Image

    from mmsae.sae import SaeConfig, SparseAutoencoder

    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (30, 40), "red").save(tmp_path / "imgs" / "0.png")
    d = tiny_adapter("llava").hidden_size
    SparseAutoencoder(SaeConfig(d_in=d, num_latents=24, k=4, model=tiny_model("llava"), layer=1)).save(tmp_path / "sae")
    argv = ["index", "--sae", str(tmp_path / "sae"), "--data", str(tmp_path / "imgs"), "--top-n", str(2**45),
            "--device", "cpu", "--out", str(tmp_path / "index")]
    last = last_error_line(cli_main(argv), capsys, "index")
    assert last == ("mmsae index: error: index ran out of host memory on cpu (it asked for 6.0 PiB); "
                    "lower --top-n or --random-n and rerun; finished work is kept")


def test_train_out_of_memory_keeps_its_checkpoint_and_resumes(tmp_path, monkeypatch, capsys):
    args = ["train", "--activations", "synthetic:d=16,m=32,k=2,tokens=8000", "--expansion", "2", "--k", "2",
            "--batch-size", "256", "--steps", "12", "--warmup", "3", "--lr", "4e-3", "--init-tokens", "1024",
            "--log-every", "2", "--checkpoint-every", "4", "--device", "cpu", "--no-progress"]
    assert cli_main(args + ["--out", str(tmp_path / "ref")]) == 0
    def run_out_after_step_6(done: int) -> None:  # then the run asks for more memory than there is
        if done == 6:
            impossible_allocation()

    real_train = train_mod.train  # the CLI calls train(cfg), looked up when it runs
    monkeypatch.setattr(train_mod, "train", lambda cfg: real_train(cfg, on_step=run_out_after_step_6))
    out = tmp_path / "oom"
    assert "train ran out of host memory on cpu" in last_error_line(cli_main(args + ["--out", str(out)]), capsys, "train")
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-000000004"]
    monkeypatch.undo()
    assert cli_main(args + ["--out", str(out)]) == 0
    ref, got = load_file(str(tmp_path / "ref" / "sae.safetensors")), load_file(str(out / "sae.safetensors"))
    assert all(torch.allclose(ref[k], got[k], atol=1e-6) for k in ref)
    assert [r["step"] for r in read_jsonl(out / "train_log.jsonl")] == [2, 4, 6, 8, 10, 12]


def test_harvest_out_of_memory_keeps_its_shards_and_resumes(tmp_path, text_jsonl, monkeypatch, capsys):
    args = ["harvest", "--model", tiny_model("llama"), "--layer", "0", "--data", str(text_jsonl),
            "--batch-size", "1", "--shard-size", "1", "--device", "cpu"]
    assert cli_main(args + ["--out", str(tmp_path / "ref")]) == 0
    real_run, calls = mmsae.hooks.run_sites, {"n": 0}

    def run_that_runs_out(*a, **kw):  # the third forward pass asks for more memory than there is
        calls["n"] += 1
        if calls["n"] == 3:
            impossible_allocation()
        return real_run(*a, **kw)

    monkeypatch.setattr(mmsae.hooks, "run_sites", run_that_runs_out)
    out = tmp_path / "oom"
    last = last_error_line(cli_main(args + ["--out", str(out)]), capsys, "harvest")
    assert last.endswith("lower --batch-size or --shard-size and rerun; finished work is kept")
    # the shards written before it stay, each recorded, none cut short (a shard still queued for the
    # writer thread when the error came is dropped, and redone by the rerun)
    kept = sorted(p.name for p in out.glob("shard-*"))
    assert kept and kept == sorted(s["file"] for s in json.loads((out / "progress-0.json").read_text())["shards"])
    assert set(kept) < {s["file"] for s in json.loads((tmp_path / "ref" / "manifest.json").read_text())["shards"]}
    assert not list(out.glob("*.tmp"))
    monkeypatch.undo()
    assert cli_main(args + ["--out", str(out)]) == 0
    ref = json.loads((tmp_path / "ref" / "manifest.json").read_text())
    got = json.loads((out / "manifest.json").read_text())
    assert got["complete"] and got["stats"] == ref["stats"] and len(got["shards"]) == len(ref["shards"])
