"""The index under torchrun: states built from disjoint samples merge into the state of their union,
the random examples do not depend on who saw a sample, and two processes write the index one does."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mmsae.index import IndexState, random_key
from mmsae.models.base import TokenLayout
from tiny_models import run_in_one_and_two_processes, tiny_adapter, tiny_model

F, K_CODES, TOP_N, RANDOM_N, TOP_TOKENS, CONTEXT = 32, 4, 3, 4, 5, 2
W = CONTEXT + 1 + 3


def _samples(n: int = 40) -> list[dict]:
    """Sparse codes of ``n`` synthetic images with text: image 4 repeats image 3 and every text starts
    with the same two tokens (tied scores and activations, which must go to the lower sample id)."""
    g = torch.Generator().manual_seed(0)
    shared = (torch.rand(2, K_CODES, generator=g), torch.stack([torch.randperm(F, generator=g)[:K_CODES] for _ in range(2)]))
    out = []
    for sid in range(n):
        P, T = 3 + sid % 4, 2 + sid % 3

        def codes(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
            values = torch.rand(rows, K_CODES, generator=g) * (torch.rand(rows, K_CODES, generator=g) > 0.2)  # some zeros
            return values, torch.stack([torch.randperm(F, generator=g)[:K_CODES] for _ in range(rows)])

        patch, text = codes(P), codes(T)
        text = (torch.cat([shared[0], text[0]]), torch.cat([shared[1], text[1]]))
        out.append({"id": sid, "patch": patch, "text": text,
                    "context": torch.randint(0, 100, (T + 2, W), generator=g, dtype=torch.int32)})
    out[3]["patch"] = (out[3]["patch"][0] * 10, out[3]["patch"][1])  # the top image of its features
    out[4] = {**out[3], "id": 4}
    return out


def _build(samples: list[dict], batch: int) -> IndexState:
    state = IndexState(F, TOP_N, RANDOM_N, TOP_TOKENS, CONTEXT, "max", seed=7)
    for i in range(0, len(samples), batch):
        chunk = samples[i: i + batch]
        for j in state.add_images([s["id"] for s in chunk], [s["patch"] for s in chunk]):
            s = chunk[j]
            state.samples[s["id"]] = {"text": str(s["id"])}
            P = s["patch"][0].shape[0]
            state.layouts[s["id"]] = TokenLayout(torch.arange(P), torch.zeros(P, dtype=torch.long), torch.zeros(P, dtype=torch.long),
                                                 torch.arange(P), [], (P, 1))
        T = [s["text"][0].shape[0] for s in chunk]
        state.add_text(torch.cat([torch.full((t,), s["id"]) for s, t in zip(chunk, T)]), torch.cat([torch.arange(t) for t in T]),
                       torch.cat([s["context"] for s in chunk]), torch.cat([s["text"][0] for s in chunk]),
                       torch.cat([s["text"][1] for s in chunk]))
        state.next_id = chunk[-1]["id"] + 1
    state.prune()
    return state


def _dense(codes: tuple[torch.Tensor, torch.Tensor]) -> np.ndarray:
    values, indices = codes
    return torch.zeros(values.shape[0], F).scatter(1, indices, values).numpy()


def _assert_same_state(a: IndexState, b: IndexState) -> None:
    for name in IndexState._LISTS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    sa, sb = a.stats.state(), b.stats.state()
    for name in sa:
        if name == "sum_patches":  # float64 sums in another order
            torch.testing.assert_close(sa[name], sb[name], rtol=1e-12, atol=0)
        else:
            assert torch.equal(sa[name], sb[name]), name
    assert a.maps.keys() == b.maps.keys() and all(np.array_equal(a.maps[k], b.maps[k]) for k in a.maps)
    assert a.samples == b.samples and a.layouts.keys() == b.layouts.keys()


def test_merged_states_equal_the_state_of_the_union():
    samples = _samples()
    whole = _build(samples, batch=3)
    # brute force over the dense codes: top N by score (ties to the lower id), the random examples are
    # the firing images with the smallest keys, top tokens by activation (ties to the lower sample, position)
    scores = np.stack([_dense(s["patch"]).max(0) for s in samples])  # [n, F]
    tokens = [(a, s["id"], p, f) for s in samples for p, row in enumerate(_dense(s["text"])) for f, a in enumerate(row) if a > 0]
    for f in range(F):
        firing = [s["id"] for s in samples if scores[s["id"], f] > 0]
        top = sorted(firing, key=lambda sid: (-scores[sid, f], sid))[:TOP_N]
        assert whole.top_sample[f].tolist() == top + [-1] * (TOP_N - len(top))
        keys = random_key(7, torch.tensor(f), torch.tensor(firing)).tolist()
        assert sorted(whole.rand_sample[f][whole.rand_sample[f] >= 0].tolist()) == sorted(
            sid for _, sid in sorted(zip(keys, firing))[:RANDOM_N])
        best = sorted((t for t in tokens if t[3] == f), key=lambda t: (-t[0], t[1], t[2]))[:TOP_TOKENS]
        assert whole.tok_sample[f][: len(best)].tolist() == [t[1] for t in best]
        assert whole.tok_pos[f][: len(best)].tolist() == [t[2] for t in best]
    assert (whole.top_sample[:, :2] == torch.tensor([3, 4])).all(1).sum() >= K_CODES  # image 4 ties image 3: the lower id first

    # two ranks (id % 2), other batch sizes, merged either way round; and batch sizes alone change nothing
    even, odd = _build(samples[0::2], batch=2), _build(samples[1::2], batch=5)
    even.merge(odd)
    _assert_same_state(even, whole)
    odd, even = _build(samples[1::2], batch=4), _build(samples[0::2], batch=1)
    odd.merge(even)
    _assert_same_state(odd, whole)
    _assert_same_state(_build(samples, batch=40), whole)
    assert whole.stats.n_images == 40 and odd.next_id == 40


def test_random_key_is_a_per_feature_permutation_picking_uniformly():
    samples = torch.arange(20)
    features = torch.arange(4000)[:, None]
    keys = random_key(3, features, samples)  # [4000, 20]
    assert keys.min() >= 0 and torch.equal(keys, random_key(3, features, samples))
    assert all(row.unique().numel() == 20 for row in keys)  # never a tie inside one feature
    assert not torch.equal(keys, random_key(4, features, samples))  # the seed matters
    # each feature keeps its 4 smallest keys: every sample is picked about 4000 * 4 / 20 = 800 times,
    # and two features rarely pick the same set
    picked = keys.argsort(1)[:, :4]
    counts = torch.bincount(picked.reshape(-1), minlength=20)
    assert counts.min() > 800 * 0.8 and counts.max() < 800 * 1.2, counts
    sets = {tuple(sorted(row)) for row in picked.tolist()}
    assert len(sets) > 2500  # 4000 uniform draws of C(20, 4) = 4845 sets give 4845 (1 - e^(-4000/4845)) = 2723 distinct
    # large sample ids (all 62 bits in play) stay distinct too
    big = torch.tensor([2**40 - 1, 2**40 - 2, 2**31, 2**31 - 1, 0])
    assert random_key(0, torch.tensor([[5]]), big).unique().numel() == 5


def test_two_processes_build_the_index_one_does(tmp_path):
    from mmsae.sae import SaeConfig, SparseAutoencoder

    rng = np.random.default_rng(1)
    (tmp_path / "imgs").mkdir()
    for i in range(9):
        Image.fromarray(rng.integers(0, 255, (28 + 2 * i, 40 - i, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i:03d}.png")
    torch.manual_seed(0)
    SparseAutoencoder(SaeConfig(d_in=tiny_adapter("llava").hidden_size, num_latents=48, k=4, model=tiny_model("llava"),
                                layer=1)).save(tmp_path / "sae")
    script = tmp_path / "run.py"
    script.write_text(  # (each process also counts the images it ran through the model)
        "import os, sys\n"
        "import mmsae.index.build as ix\n"
        "seen, encode = [], ix.encode_batch\n"
        "ix.encode_batch = lambda adapter, saes, sites, images, prompts: (\n"
        "    seen.append(len(images)) or encode(adapter, saes, sites, images, prompts))\n"
        f"ix.build_index(ix.IndexConfig(sae={str(tmp_path / 'sae')!r}, data={str(tmp_path / 'imgs')!r}, out=sys.argv[1],\n"
        "                               top_n=3, random_n=2, batch_size=2, checkpoint_every=2, device='cpu'))\n"
        "open(sys.argv[1] + '-rank' + os.environ.get('RANK', '0'), 'w').write(str(sum(seen)))\n")
    run_in_one_and_two_processes(script, tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    seen = {p.name: int(p.read_text()) for p in tmp_path.glob("*-rank*")}
    assert seen == {"one-rank0": 9, "two-rank0": 5, "two-rank1": 4}  # the ranks split the images
    for name in ("examples.safetensors", "stats.safetensors", "layouts.safetensors"):
        a, b = load_file(str(one / name)), load_file(str(two / name))
        assert a.keys() == b.keys()
        for key in a:
            if key == "sum_patches":  # float64 sums in another order
                torch.testing.assert_close(a[key], b[key], rtol=1e-12, atol=0)
            else:
                assert torch.equal(a[key], b[key]), (name, key)
    for name in ("samples.json", "tokens.json", ".mmsae-images"):
        assert (one / name).read_text() == (two / name).read_text(), name
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (one, two))
    assert {k for k in ma if ma[k] != mb[k]} <= {"created", "run_seconds"}
    assert ma["n_images"] == 9 and ma["complete"]
    assert sorted(p.name for p in (one / "images").iterdir()) == sorted(p.name for p in (two / "images").iterdir())
    # the ranks' checkpoints and image records are gone; only the index's files remain
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())


def test_checkpoints_of_another_number_of_processes_are_refused(tmp_path):
    from mmsae.errors import MmsaeError
    from mmsae.index import IndexConfig, build_index
    from mmsae.io import claim_dir
    from mmsae.sae import SaeConfig, SparseAutoencoder

    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (30, 40), "red").save(tmp_path / "imgs" / "0.png")
    SparseAutoencoder(SaeConfig(d_in=tiny_adapter("llava").hidden_size, num_latents=8, k=2, model=tiny_model("llava"),
                                layer=1)).save(tmp_path / "sae")
    out = claim_dir(tmp_path / "index", "index")
    (out / "checkpoint-1-of-2.safetensors").write_bytes(b"")  # what rank 1 of two left
    with pytest.raises(MmsaeError, match=r"checkpoint-1-of-2.safetensors is the unfinished index of another number of "
                                         r"processes than 1; rerun with as many as before"):
        build_index(IndexConfig(sae=str(tmp_path / "sae"), data=str(tmp_path / "imgs"), out=str(out), device="cpu"))
