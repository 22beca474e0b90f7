"""Live latents: schedules that scale with the run, resampling, the alive fraction, and leaving
attention-sink / special tokens out of harvest, training and evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mmsae.train as train_mod
from mmsae.errors import MmsaeError
from mmsae.exclusion import TokenExclusion, group_median
from mmsae.sae import SaeConfig, SparseAutoencoder, load_sae
from mmsae.activation_sources import StoreSource
from mmsae.sae.synthetic import SyntheticConfig, generate
from mmsae.train import TrainConfig, make_optimizer, resample_dead_latents, resample_steps, resolve_schedule, train

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# --- schedules -----------------------------------------------------------------------------------
def test_schedule_scales_with_the_run():
    for batch in (256, 1024, 4096):
        for steps in (1, 3, 12, 40, 244, 1000, 20_000, 244_141):
            cfg = resolve_schedule(TrainConfig(out="x", batch_size=batch), steps)
            tokens = steps * batch
            assert 1 <= cfg.warmup <= 100 and cfg.warmup <= max(1, steps // 20), (batch, steps, cfg.warmup)
            assert 4 * batch <= cfg.dead_tokens or cfg.dead_tokens == 10_000_000
            assert cfg.dead_tokens <= 10_000_000
            if tokens >= 40 * batch:  # ten dead windows fit in the run, so AuxK (and resampling) act in time
                assert tokens / cfg.dead_tokens >= 10, (batch, steps, cfg.dead_tokens)
    # the demo's run (250k tokens at 1024) and a billion-token run
    demo = resolve_schedule(TrainConfig(out="x", batch_size=1024), 244)
    assert (demo.warmup, demo.dead_tokens) == (12, 24_985)
    big = resolve_schedule(TrainConfig(out="x", batch_size=4096), 1_000_000_000 // 4096)
    assert (big.warmup, big.dead_tokens) == (100, 10_000_000)
    # explicit values are honoured
    fixed = resolve_schedule(TrainConfig(out="x", warmup=7, dead_tokens=123), 244)
    assert (fixed.warmup, fixed.dead_tokens) == (7, 123)


def test_resampling_schedule_and_a_schedule_longer_than_the_run(tmp_path):
    assert resample_steps(TrainConfig(out="x"), 200) == []
    assert resample_steps(TrainConfig(out="x", resample_every=30), 200) == [30, 60, 90]
    assert resample_steps(TrainConfig(out="x", resample_every=5, resample_until=1.0), 20) == [5, 10, 15]
    with pytest.raises(MmsaeError, match="--resample-every 150 is longer") as err:
        resample_steps(TrainConfig(out="x", resample_every=150), 200)
    assert "\n" not in str(err.value)
    acts, _ = generate(SyntheticConfig(d=8, m=16, k=2, tokens=2000))
    with pytest.raises(MmsaeError, match="--resample-every 20"):
        train(TrainConfig(out=str(tmp_path / "sae"), expansion=2, k=2, batch_size=64, steps=10, resample_every=20,
                          progress=False), source=acts)
    assert not (tmp_path / "sae" / "sae.safetensors").exists()


# --- dead latents revive -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rich_data():
    # more planted features (256) than live latents, so latents left dead have work to do
    return generate(SyntheticConfig(d=32, m=256, k=3, tokens=40_000, noise=0.01, seed=0))[0]


@pytest.fixture
def half_dead(monkeypatch):
    """Start training with the second half of the latents dead: their encoder rows are scaled by
    0.1, so their pre-activations never reach the top k (and get no gradient from the main loss)."""
    real = SparseAutoencoder.reset_parameters

    def crippled(self, generator=None):
        real(self, generator)
        with torch.no_grad():
            self.encoder.weight[self.num_latents // 2:] *= 0.1

    monkeypatch.setattr(SparseAutoencoder, "reset_parameters", crippled)


def run_cfg(out, **kw) -> TrainConfig:
    # AuxK on (the default is off) so the dead window's effect on reviving latents shows
    base = dict(out=str(out), expansion=4, k=3, batch_size=256, steps=200, lr=4e-3, auxk_coefficient=1 / 32, progress=False,
                log_every=50, init_tokens=2048, checkpoint_every=10_000)
    return TrainConfig(**{**base, **kw})


def fraction_firing(folder: Path, x: torch.Tensor) -> float:
    """The fraction of the saved SAE's latents that fire at least once on ``x`` (measured here)."""
    sae = load_sae(folder).requires_grad_(False)
    _, indices = sae.encode_sparse(x)
    return indices.unique().numel() / sae.num_latents


def test_dead_latents_revive_in_a_short_run_with_the_default_schedule(tmp_path, rich_data, half_dead):
    held_out = rich_data[-8000:]
    train(run_cfg(tmp_path / "new"), source=rich_data[:-8000])
    train(run_cfg(tmp_path / "old", dead_tokens=10_000_000, warmup=100), source=rich_data[:-8000])  # the former defaults
    new = [json.loads(line) for line in (tmp_path / "new" / "train_log.jsonl").read_text().splitlines()]
    old = [json.loads(line) for line in (tmp_path / "old" / "train_log.jsonl").read_text().splitlines()]
    assert new[-1]["alive_fraction"] >= 0.95 and old[-1]["alive_fraction"] <= 0.55, (new[-1], old[-1])
    assert new[-1]["alive_fraction"] == pytest.approx(1 - new[-1]["dead_fraction"])
    # on held-out data, measured from the saved weights
    assert fraction_firing(tmp_path / "new", held_out) >= 0.95
    assert fraction_firing(tmp_path / "old", held_out) <= 0.55
    assert new[-1]["fvu"] < old[-1]["fvu"]
    schedule = json.loads((tmp_path / "new" / "train_state.json").read_text())["schedule"]
    assert schedule["warmup"] == 10 and schedule["dead_tokens"] == 200 * 256 // 10


def test_resampling_revives_dead_latents(tmp_path, rich_data, half_dead):
    # AuxK off: only resampling can revive them
    train(run_cfg(tmp_path / "off", auxk_coefficient=0.0), source=rich_data)
    train(run_cfg(tmp_path / "on", auxk_coefficient=0.0, resample_every=25), source=rich_data)
    off = [json.loads(line) for line in (tmp_path / "off" / "train_log.jsonl").read_text().splitlines()]
    on = [json.loads(line) for line in (tmp_path / "on" / "train_log.jsonl").read_text().splitlines()]
    assert off[-1]["alive_fraction"] <= 0.55 and off[-1]["resampled"] == 0
    assert on[-1]["resampled"] >= 64 and on[-1]["alive_fraction"] >= 0.95, on[-1]
    assert on[-1]["fvu"] < off[-1]["fvu"]
    assert json.loads((tmp_path / "on" / "train_state.json").read_text())["schedule"]["resample_steps"] == [25, 50, 75, 100]


def tiny_sae(n: int) -> SparseAutoencoder:
    """d = 4, k = 1: latent 0 reads and writes e0 (encoder norm 1), latent 1 reads 3 * e1 and
    writes e1 (encoder norm 3); the rest read nothing. b_dec = 0.5 * e0."""
    sae = SparseAutoencoder(SaeConfig(d_in=4, num_latents=n, k=1))
    with torch.no_grad():
        sae.encoder.weight.zero_()
        sae.encoder.weight[0, 0] = 1.0
        sae.encoder.weight[1, 1] = 3.0
        sae.encoder.bias.zero_()
        sae.W_dec.copy_(torch.eye(4)[torch.arange(n) % 4])
        sae.b_dec.copy_(torch.tensor([0.5, 0, 0, 0]))
    return sae


def test_resampling_points_dead_rows_at_the_badly_reconstructed_input():
    sae = tiny_sae(6)
    b = sae.b_dec.detach().clone()
    # x0 is reconstructed exactly (latent 0), x2 = b_dec + 2 * e3 not at all: only x2 has a loss
    x = torch.stack([b + torch.tensor([2.0, 0, 0, 0]), b, b + torch.tensor([0, 0, 0, 2.0])])
    opt = make_optimizer(sae, 0.0)
    for p in sae.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # lr 0: Adam has its state, the weights are as set
    for state in opt.state.values():
        state["exp_avg"].fill_(1.0)
        state["exp_avg_sq"].fill_(1.0)
    dead = torch.tensor([False, False, True, True, True, False])
    idx = resample_dead_latents(sae, opt, x, dead, torch.Generator().manual_seed(0))
    assert idx.tolist() == [2, 3, 4]
    alive_encoder_norm = (sae.encoder.weight[0].norm() + sae.encoder.weight[1].norm() + sae.encoder.weight[5].norm()) / 3
    e3 = torch.tensor([0, 0, 0, 1.0])  # (x2 - b_dec) / |x2 - b_dec|: b_dec is taken off first
    for i in (2, 3, 4):
        assert torch.allclose(sae.W_dec[i], e3)
        assert torch.allclose(sae.encoder.weight[i], train_mod.RESAMPLE_ENCODER_SCALE * alive_encoder_norm * e3)
        assert float(sae.encoder.bias[i]) == 0.0
    for name, p in (("W_dec", sae.W_dec), ("encoder.weight", sae.encoder.weight), ("encoder.bias", sae.encoder.bias)):
        state = opt.state[p]
        assert not state["exp_avg"][idx].any() and not state["exp_avg_sq"][idx].any()
        keep = torch.tensor([0, 1, 5])
        assert bool((state["exp_avg"][keep] == 1).all() and (state["exp_avg_sq"][keep] == 1).all()), name
    assert torch.allclose(sae.W_dec[0], torch.eye(4)[0])  # alive rows untouched


def test_resampling_draws_inputs_in_proportion_to_the_squared_loss():
    n = 4002
    sae = tiny_sae(n)
    b = sae.b_dec.detach().clone()
    # losses (squared errors) 1 and 2 (and 0): probabilities 1 : 4 under loss squared (1 : 2 under the loss)
    x = torch.stack([b + torch.tensor([0, 0, 1.0, 0]), b + torch.tensor([0, 0, 0, 2.0 ** 0.5]), b + torch.tensor([2.0, 0, 0, 0])])
    dead = torch.ones(n, dtype=torch.bool)
    dead[:2] = False
    opt = make_optimizer(sae, 1e-3)
    resample_dead_latents(sae, opt, x, dead, torch.Generator().manual_seed(1))
    to_e3 = float((sae.W_dec[2:, 3] > 0.99).double().mean())
    to_e2 = float((sae.W_dec[2:, 2] > 0.99).double().mean())
    assert to_e2 + to_e3 == pytest.approx(1.0)
    assert to_e3 == pytest.approx(0.8, abs=0.03)


def test_resume_with_resampling_gives_the_same_weights(tmp_path, rich_data, half_dead):
    def cfg(out):
        return run_cfg(out, steps=12, log_every=2, checkpoint_every=4, resample_every=3, resample_until=1.0, auxk_coefficient=0.0)

    def crash_after_step_6(done: int) -> None:  # after step 6's resampling, before the next checkpoint
        if done == 7:
            raise KeyboardInterrupt

    train(cfg(tmp_path / "a"), source=rich_data)
    with pytest.raises(KeyboardInterrupt):
        train(cfg(tmp_path / "b"), source=rich_data, on_step=crash_after_step_6)
    train(cfg(tmp_path / "b"), source=rich_data)
    a, b = load_file(str(tmp_path / "a" / "sae.safetensors")), load_file(str(tmp_path / "b" / "sae.safetensors"))
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    state_a = json.loads((tmp_path / "a" / "train_state.json").read_text())
    state_b = json.loads((tmp_path / "b" / "train_state.json").read_text())
    assert state_a["schedule"]["resampled"] == state_b["schedule"]["resampled"] >= 64
    log_a = [json.loads(line) for line in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    log_b = [json.loads(line) for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["resampled"], r["alive_fraction"]) for r in log_a] == [(r["step"], r["resampled"], r["alive_fraction"]) for r in log_b]
    assert [r["fvu"] for r in log_a] == pytest.approx([r["fvu"] for r in log_b], rel=1e-5)


# --- token exclusion -----------------------------------------------------------------------------
def test_exclusion_rule_on_a_hand_made_batch():
    # two sequences; each has one token far above its own median; sequence 1 is louder throughout
    norms = torch.tensor([1.0, 1.2, 0.9, 30.0, 1.1, 40.0, 41.0, 39.0, 500.0])
    groups = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1])
    ids = torch.tensor([1, 5, 6, 7, 1, 1, 5, 6, 7])
    rule = TokenExclusion(norm_above=10)
    assert rule.keep(norms, groups).tolist() == [True, True, True, False, True, True, True, True, False]
    # one median over both sequences (39) would keep the first sink (30) and drop nothing else but 500
    assert rule.keep(norms).tolist() == [True] * 8 + [False]
    by_id = TokenExclusion(token_ids=(1,))
    assert by_id.keep(norms, groups, ids).tolist() == [False, True, True, True, False, False, True, True, True]
    both = by_id.union(rule)
    assert both.keep(norms, groups, ids).tolist() == [False, True, True, False, False, False, True, True, False]
    assert not TokenExclusion() and both and both.to_dict() == {"exclude_token_ids": [1], "exclude_norm_above": 10}
    assert TokenExclusion.from_dict(both.to_dict()) == both
    with pytest.raises(MmsaeError, match="needs token ids"):
        by_id.keep(norms, groups, None)
    for bad in (dict(norm_above=0.5), dict(norm_above=float("inf")), dict(token_ids=(-1,))):
        with pytest.raises(MmsaeError, match="--exclude-"):
            TokenExclusion(**bad)
    with pytest.raises(MmsaeError, match="--exclude-token-ids 1 --exclude-norm-above 10 leaves no token of the batch") as err:
        both.check_kept(0, "the batch")
    assert "\n" not in str(err.value)
    # the per-group median against torch's, group by group
    torch.manual_seed(0)
    values, labels = torch.rand(200), torch.randint(0, 7, (200,))
    got = group_median(values, labels)
    for g in range(7):
        assert torch.all(got[labels == g] == values[labels == g].median())


def write_store(path: Path, samples: int = 10, per_sample: int = 8, d: int = 4, sink: float = 100.0, tokens: bool = True) -> torch.Tensor:
    """A one-shard store in the documented format whose first token of every sample is a sink
    (norm ``sink`` times the others'); token ids are the position (0 = the sink)."""
    torch.manual_seed(0)
    n = samples * per_sample
    acts = torch.randn(n, d)
    acts = acts / acts.norm(dim=1, keepdim=True)
    pos = torch.arange(n) % per_sample
    acts[pos == 0] *= sink
    is_image = (pos >= 2) & (pos < 6)
    columns = {"acts": acts, "sample": torch.arange(n) // per_sample, "pos": pos.to(torch.int32), "is_image": is_image,
               "tile": torch.zeros(n, dtype=torch.int16), "row": torch.zeros(n, dtype=torch.int16),
               "col": torch.zeros(n, dtype=torch.int16)}
    if tokens:
        columns["token"] = pos.to(torch.int32)
    path.mkdir(parents=True)
    save_file(columns, str(path / "shard-0-00000.safetensors"))
    manifest = {"format": "mmsae-activations", "version": 1, "model": "m", "layer": 1, "hook_point": "h", "d": d,
                "dtype": "float32", "source": "s", "tokens": "all", "world": 1, "complete": True,
                "shards": [{"file": "shard-0-00000.safetensors", "rank": 0, "n_tokens": n, "n_image_tokens": int(is_image.sum()),
                            "first_sample": 0, "last_sample": samples - 1, "norm_sum": 0.0}],
                "ranks": {"0": {"samples_done": samples}}, "stats": {"n_tokens": n, "mean_norm": 1.0}, "config": {"data": "s"}}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return acts


def one_sparse_sae(d: int = 4) -> SparseAutoencoder:
    """Latents +e_i and -e_i, k = 1: keeps the largest coordinate (by magnitude) of each token."""
    from test_sae_metrics import exact_sae

    return exact_sae(d, k=1)


def test_store_training_and_evaluation_leave_out_the_sinks(tmp_path):
    from mmsae.evaluate import EvaluateConfig, evaluate

    acts = write_store(tmp_path / "store")
    pos = torch.arange(len(acts)) % 8
    source = StoreSource(str(tmp_path / "store"), "all", TokenExclusion(norm_above=10))
    assert source.n_tokens == 70
    seen = torch.cat([b for _, b in zip(range(10), source.batches(16, seed=0, rank=0, world=1))])
    assert seen.norm(dim=1).max() < 2  # no sink in any training batch
    assert StoreSource(str(tmp_path / "store"), "image", TokenExclusion(token_ids=(2,))).n_tokens == 30

    train(TrainConfig(out=str(tmp_path / "sae"), activations=str(tmp_path / "store"), exclude_norm_above=10, expansion=2,
                      k=1, batch_size=16, steps=4, progress=False, init_tokens=64))
    recorded = json.loads((tmp_path / "sae" / "cfg.json").read_text())["token_exclusion"]
    assert recorded == {"exclude_token_ids": [], "exclude_norm_above": 10}
    assert load_sae(tmp_path / "sae").cfg.token_exclusion == recorded

    # evaluate a known SAE: with the sinks (all tokens) and without them, against a hand computation
    one_sparse_sae().save(tmp_path / "known")
    metrics = evaluate(EvaluateConfig(sae=str(tmp_path / "known"), activations=str(tmp_path / "store"),
                                      out=str(tmp_path / "m.json"), exclude_norm_above=10, progress=False))

    def fvu(x):
        top = x.abs().argmax(dim=1)
        recon = torch.zeros_like(x).scatter(1, top[:, None], x.gather(1, top[:, None]))
        return float((recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())

    assert metrics["reconstruction"]["all"]["fvu"] == pytest.approx(fvu(acts), rel=1e-5)
    assert metrics["reconstruction_without_excluded"]["all"]["fvu"] == pytest.approx(fvu(acts[pos != 0]), rel=1e-5)
    assert metrics["reconstruction_without_excluded"]["all"]["tokens"] == 70
    assert metrics["exclusion"]["excluded_tokens"] == {"all": 10, "image": 0, "text": 10}
    assert metrics["reconstruction"]["all"]["alive_fraction"] == pytest.approx(1 - metrics["reconstruction"]["all"]["dead_fraction"])
    # the rule recorded in the SAE is the default
    by_cfg = evaluate(EvaluateConfig(sae=str(tmp_path / "sae"), activations=str(tmp_path / "store"), out=str(tmp_path / "m2.json"),
                                     progress=False))
    assert by_cfg["exclusion"]["exclude_norm_above"] == 10 and by_cfg["reconstruction_without_excluded"]["all"]["tokens"] == 70

    # bad input: a rule that leaves nothing, token ids on a store without them
    with pytest.raises(MmsaeError, match="--exclude-token-ids 0 1 2 3 4 5 6 7 leaves no token of store") as err:
        train(TrainConfig(out=str(tmp_path / "none"), activations=str(tmp_path / "store"), exclude_token_ids=list(range(8)),
                          progress=False))
    assert "\n" not in str(err.value)
    with pytest.raises(MmsaeError, match="leaves no token"):
        evaluate(EvaluateConfig(sae=str(tmp_path / "known"), activations=str(tmp_path / "store"), out=str(tmp_path / "m3.json"),
                                exclude_token_ids=list(range(8)), progress=False))
    write_store(tmp_path / "old", tokens=False)
    with pytest.raises(MmsaeError, match="needs token ids"):
        train(TrainConfig(out=str(tmp_path / "old-sae"), activations=str(tmp_path / "old"), exclude_token_ids=[0], progress=False))
    with pytest.raises(MmsaeError, match="needs an activation store"):
        train(TrainConfig(out=str(tmp_path / "syn"), activations="synthetic:d=8,m=16,k=2,tokens=1000", exclude_norm_above=10,
                          progress=False))


def tiny_text_ids() -> tuple[set[int], int, int]:
    """The token ids at the text positions of the tiny LLaVA's inputs for shapes:2, the id of
    <|user|>, and how often it occurs there."""
    from mmsae.data.sources import DEFAULT_PROMPT, open_source
    from tiny_models import tiny_adapter

    adapter = tiny_adapter("llava")
    samples = list(open_source("shapes:2", prompt=DEFAULT_PROMPT).samples(stop=2))
    inputs = adapter.build_inputs([s.image for s in samples], [s.text for s in samples])
    ids = inputs.inputs["input_ids"]
    text = torch.cat([ids[i, lay.text_positions.long()] for i, lay in enumerate(inputs.layouts)])
    user = adapter.processor.tokenizer.convert_tokens_to_ids("<|user|>")
    return set(text.tolist()), user, int((text == user).sum())


def test_evaluate_on_a_model_reports_with_and_without_the_excluded_tokens(tmp_path):
    from mmsae.evaluate import EvaluateConfig, evaluate
    from test_sae_metrics import exact_sae, zero_sae
    from tiny_models import tiny_adapter, tiny_model

    d = tiny_adapter("llava").hidden_size
    zero_sae(d).save(tmp_path / "zero")
    exact_sae(d).save(tmp_path / "exact")
    text_ids, user, n_user = tiny_text_ids()
    assert n_user >= 2
    common = dict(model=tiny_model("llava"), data="shapes:2", max_samples=2, batch_size=2, progress=False)

    # leaving out every text token: splicing "at text positions" changes nothing, images as before
    every_text = evaluate(EvaluateConfig(sae=str(tmp_path / "zero"), out=str(tmp_path / "a"), exclude_token_ids=sorted(text_ids), **common))
    kept = every_text["spliced_without_excluded"]
    assert kept["text"]["ce_sae"] == pytest.approx(every_text["spliced"]["ce_clean"], abs=1e-5)
    assert kept["text"]["kl_sae"] == pytest.approx(0.0, abs=1e-6)
    assert every_text["spliced"]["text"]["kl_sae"] > 1e-4  # with them, the zero SAE changes the answer
    for key in ("ce_sae", "kl_sae", "ce_zero_ablation"):
        assert kept["image"][key] == pytest.approx(every_text["spliced"]["image"][key], abs=1e-6)
        assert kept["all"][key] == pytest.approx(every_text["spliced"]["image"][key], abs=1e-6)
    recon, without = every_text["reconstruction"], every_text["reconstruction_without_excluded"]
    assert without["text"]["tokens"] == 0 and without["all"]["tokens"] == recon["image"]["tokens"]
    assert kept["excluded_positions"]["text"] == recon["text"]["tokens"] and kept["excluded_positions"]["image"] == 0

    # leaving out <|user|>: counted where it occurs; an exact SAE is exact with and without it
    exact = evaluate(EvaluateConfig(sae=str(tmp_path / "exact"), out=str(tmp_path / "b"), exclude_token_ids=[user], **common))
    assert exact["spliced_without_excluded"]["excluded_positions"] == {"all": n_user, "image": 0, "text": n_user}
    assert exact["reconstruction"]["text"]["tokens"] - exact["reconstruction_without_excluded"]["text"]["tokens"] == n_user
    for name in ("spliced", "spliced_without_excluded"):
        assert abs(exact[name]["all"]["ce_increase"]) < 1e-4
    assert exact["reconstruction_without_excluded"]["all"]["fvu"] < 1e-8
    table = (tmp_path / "b" / "metrics.json").read_text()
    assert "spliced_without_excluded" in table and "alive_fraction" in table


def test_harvest_leaves_out_the_excluded_tokens_and_records_them(tmp_path):
    from mmsae.activations import ActivationStore, HarvestConfig, harvest
    from tiny_models import tiny_model

    text_ids, user, n_user = tiny_text_ids()
    common = dict(model=tiny_model("llava"), layer=1, data="shapes:2", batch_size=2)
    plain = harvest(HarvestConfig(out=str(tmp_path / "plain"), **common))
    store = harvest(HarvestConfig(out=str(tmp_path / "store"), exclude_token_ids=[user], exclude_norm_above=50, **common))
    tokens = torch.cat([s["token"] for s in store.iter_shards()])
    assert user not in tokens.tolist() and user in torch.cat([s["token"] for s in plain.iter_shards()]).tolist()
    n_excluded = store.manifest["stats"]["n_excluded"]
    assert n_excluded >= n_user and store.n_tokens == plain.n_tokens - n_excluded
    # what was left out beside <|user|> is exactly what the norm rule picks on the plain store
    by_norm = plain.count(exclude=TokenExclusion(norm_above=50))
    both = plain.count(exclude=TokenExclusion(token_ids=(user,), norm_above=50))
    assert store.n_tokens == both and by_norm >= both
    assert TokenExclusion.from_dict(ActivationStore(tmp_path / "store").cfg["harvest"]) == TokenExclusion((user,), 50)
    # an SAE trained on it records the harvest's rule
    train(TrainConfig(out=str(tmp_path / "sae"), activations=str(tmp_path / "store"), expansion=2, k=2, batch_size=16, steps=2,
                      progress=False, init_tokens=32))
    assert TokenExclusion.from_dict(load_sae(tmp_path / "sae").cfg.token_exclusion) == TokenExclusion((user,), 50)
    with pytest.raises(MmsaeError, match="--exclude-token-ids .* leaves no token of data shapes:2") as err:
        harvest(HarvestConfig(out=str(tmp_path / "none"), exclude_token_ids=sorted(text_ids | set(range(300))), **common))
    assert "\n" not in str(err.value)


def test_two_processes_resample_as_one_does(tmp_path):
    from tiny_models import run_in_one_and_two_processes

    script = tmp_path / "run.py"
    script.write_text(
        "import sys\n"
        "from mmsae.train import TrainConfig, train\n"
        "train(TrainConfig(out=sys.argv[1], activations='synthetic:d=16,m=64,k=2,tokens=4096', expansion=8, k=1,\n"
        "                  batch_size=128, steps=4, lr=3e-3, progress=False, log_every=4, init_tokens=512,\n"
        "                  resample_every=3, resample_until=1.0))\n")
    run_in_one_and_two_processes(script, tmp_path)
    a, b = load_file(str(tmp_path / "one" / "sae.safetensors")), load_file(str(tmp_path / "two" / "sae.safetensors"))
    # many rarely-firing latents: Adam normalises their tiny gradients, so float-order differences
    # between one and two processes can flip an update's sign; Adam moves an element at most lr per
    # step, which bounds that at steps x lr = 1.2e-2. A different draw moves whole rows by about 1.
    for name in a:
        assert torch.allclose(a[name], b[name], atol=4 * 3e-3), (name, (a[name] - b[name]).abs().max())
    resampled = [json.loads((tmp_path / r / "train_state.json").read_text())["schedule"]["resampled"] for r in ("one", "two")]
    assert resampled[0] == resampled[1] > 0
