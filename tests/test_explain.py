"""Explainers against a local OpenAI-compatible server that fails on purpose, and the local backends."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

from fake_server import FakeChatServer
from mmsae.errors import MmsaeError
from mmsae.demo.explainer import vote
from mmsae.explain import ExplainConfig, explain, keyword_concept, parse_concept_reply
from mmsae.explain.openai_client import OpenAIClient, TransientRequestError
from mmsae.explain.prompts import DEFAULT_VERSION, load_template
from mmsae.index import IndexWriter
from mmsae.io import read_jsonl
from mmsae.models.base import Tile, TokenLayout

N_FEATURES = 6


def _layout():
    r, c = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    return TokenLayout(positions=torch.arange(16) + 3, tile=torch.zeros(16, dtype=torch.long), row=r.reshape(-1),
                       col=c.reshape(-1), tiles=[Tile((0, 0, 32, 32), 4, 4)], image_size=(32, 32))


def make_index(path, model="unused", fingerprint="abc", num_latents=N_FEATURES + 2):
    """Features 0..N_FEATURES-1 each fire on 6 images (on patch f); the last features never fire."""
    rng = np.random.default_rng(0)
    w = IndexWriter(path, num_latents=num_latents, top_n=6, model=model, sae_fingerprint=fingerprint)
    for s in range(8):
        w.add_sample(s, Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)), _layout(), meta={"i": s})
    for f in range(N_FEATURES):
        for s in range(6):
            values = np.zeros(16)
            values[f] = 1.0 + s + f
            w.add_example(f, (s + f) % 8, values)
        w.add_token(f, token=f"tok{f}", context=f"a tok{f} b", activation=1.0)
    return w.finish()


@pytest.fixture
def index(tmp_path):
    return make_index(tmp_path / "index")


def _cfg(index, server, out, **kw):
    base = dict(index=str(index.path), out=str(out), backend="openai", model="fake-vlm", base_url=server.base_url,
                api_key="k", concurrency=2, timeout=2.0, max_retries=3, retry_backoff=0.01)
    return ExplainConfig(**{**base, **kw})


def test_openai_explains_every_feature(index, tmp_path):
    with FakeChatServer(api_key="k") as server:
        out = explain(_cfg(index, server, tmp_path / "run"))
    rows = read_jsonl(out)
    assert out == tmp_path / "run" / "explanations.jsonl"
    assert sorted(r["feature"] for r in rows) == list(range(N_FEATURES))
    for r in rows:
        assert r["explanation"] == "The highlighted regions share a red star (seen in 5 images)."
        assert (r["concept"], r["category"]) == ("red star", "object")
        assert r["backend"] == "openai" and r["model"] == "fake-vlm" and r["prompt_version"] == DEFAULT_VERSION
        assert r["evidence"] == [e.sample_id for e in index.top_examples(r["feature"], 5)]
        assert r["binarization"] == {"method": "paper", "threshold": 0.0} and r["sae_fingerprint"] == "abc"
        assert r["index_fingerprint"] == index.fingerprint != "abc"
    # one explanation (5 images) and one concept request (text only) per feature
    assert sorted(n for _, n in server.log) == [0] * N_FEATURES + [5] * N_FEATURES


def test_retries_on_500_429_garbage_and_stalls(index, tmp_path):
    script = ["500", "429", "garbage", "nochoices", "stall"]
    with FakeChatServer(script=script, stall_seconds=3.0) as server:
        t0 = time.time()
        out = explain(_cfg(index, server, tmp_path / "e.jsonl", concurrency=1, timeout=0.5, max_retries=5, features=[0, 1], concepts=False))
        elapsed = time.time() - t0
    rows = read_jsonl(out)
    assert [r["feature"] for r in rows] == [0, 1] and rows[0]["concept"] is None
    assert [b for b, _ in server.log[:5]] == script
    assert server.requests == 6 + 1  # feature 0: five failures, then its sixth attempt; feature 1: one
    assert elapsed < 3.0  # the stalled request was abandoned at the time-out, not waited for


def test_gives_up_after_retries_keeps_rows_and_rerun_asks_only_missing(index, tmp_path):
    out = tmp_path / "e.jsonl"
    # the first 2 features succeed (2 requests each), then everything fails with 500
    with FakeChatServer(script=["ok"] * 4, default="500") as server:
        with pytest.raises(MmsaeError, match=r"4 features failed after retries.*the 2 written are kept"):
            explain(_cfg(index, server, out, concurrency=1, max_retries=1))
    assert [r["feature"] for r in read_jsonl(out)] == [0, 1]
    # a crash mid-write leaves half a line: it is dropped and that feature asked again
    with open(out, "a") as f:
        f.write('{"feature": 2, "explan')
    with FakeChatServer() as server:
        explain(_cfg(index, server, out))
    assert server.requests == 2 * (N_FEATURES - 2)
    rows = read_jsonl(out)
    assert sorted(r["feature"] for r in rows) == list(range(N_FEATURES))
    with FakeChatServer() as server:  # nothing missing: nothing asked
        explain(_cfg(index, server, out))
    assert server.requests == 0


def test_ctrl_c_keeps_what_was_written(index, tmp_path, monkeypatch):
    import mmsae.explain as explain_mod

    real = explain_mod.request_maker

    def interrupting(*args):
        make = real(*args)

        def maybe(f):
            if f == 3:
                raise KeyboardInterrupt
            return make(f)
        return maybe

    out = tmp_path / "e.jsonl"
    monkeypatch.setattr(explain_mod, "request_maker", interrupting)
    with FakeChatServer() as server:
        with pytest.raises(KeyboardInterrupt):
            explain(_cfg(index, server, out, concurrency=1))
    assert [r["feature"] for r in read_jsonl(out)] == [0, 1, 2]
    monkeypatch.setattr(explain_mod, "request_maker", real)
    with FakeChatServer() as server:
        explain(_cfg(index, server, out, concurrency=1))
    assert server.requests == 2 * (N_FEATURES - 3)
    assert [r["feature"] for r in read_jsonl(out)] == list(range(N_FEATURES))


def test_concurrency_limit_is_used_and_respected(index, tmp_path):
    with FakeChatServer(latency=0.3) as server:
        t0 = time.time()
        explain(_cfg(index, server, tmp_path / "e.jsonl", concurrency=3, concepts=False))
        elapsed = time.time() - t0
    assert server.max_in_flight == 3
    assert elapsed < N_FEATURES * 0.3 * 0.8  # clearly faster than one at a time


def test_refused_model_image_and_bad_features_are_clear_errors(index, tmp_path):
    out = tmp_path / "e.jsonl"
    with FakeChatServer(script=["ok", "ok"]) as server:
        explain(_cfg(index, server, out, concurrency=1, features=[3]))
    with FakeChatServer(model="other-model") as server:
        with pytest.raises(MmsaeError, match="refused the model name 'fake-vlm'"):
            explain(_cfg(index, server, out))
    with FakeChatServer(default="no_image") as server:
        with pytest.raises(MmsaeError, match="cannot take the images"):
            explain(_cfg(index, server, out))
    with FakeChatServer(api_key="right") as server:
        with pytest.raises(MmsaeError, match="credentials"):
            explain(_cfg(index, server, out, api_key="wrong"))
    assert [r["feature"] for r in read_jsonl(out)] == [3]  # what was written stays
    with FakeChatServer() as server:
        with pytest.raises(MmsaeError, match="out of range"):
            explain(_cfg(index, server, out, features=[0, 99]))
        assert server.requests == 0
        with pytest.raises(MmsaeError, match="openai backend needs --model"):
            explain(_cfg(index, server, tmp_path / "x.jsonl", model=None))


def test_explanations_of_another_index_are_refused(index, tmp_path):
    out = tmp_path / "e.jsonl"
    out.write_text(json.dumps({"feature": 0, "explanation": "x", "index_fingerprint": "zzz"}) + "\n")
    with FakeChatServer() as server:
        with pytest.raises(MmsaeError, match="another SAE"):
            explain(_cfg(index, server, out))


def test_prompt_template_tokens_and_highlight(index, tmp_path):
    template = tmp_path / "t.txt"
    template.write_text("Look at {n_images} images ({highlight}).{tokens_line} Tokens: [{tokens}]")
    text, version = load_template("@" + str(template))
    assert version.startswith("custom-") and text.startswith("Look at")
    with pytest.raises(MmsaeError, match="unknown or broken field"):
        load_template("{nonsense}")
    seen = []
    with FakeChatServer(rules={"Tokens: [\"tok1\"]": "ok"}) as server:
        original = server._behaviour
        server._behaviour = lambda prompt: (seen.append(prompt), original(prompt))[1]
        explain(_cfg(index, server, tmp_path / "e.jsonl", features=[1], prompt_template="@" + str(template),
                     include_tokens=True, highlight="overlay", binarization="fraction", concepts=False))
    assert seen[0].startswith("Look at 5 images (the active region is covered by a heat-map")
    assert 'Tokens: ["tok1"]' in seen[0]
    row = read_jsonl(tmp_path / "e.jsonl")[0]
    assert row["prompt_version"] == version and row["highlight"] == "overlay"
    assert row["binarization"]["method"] == "fraction" and row["binarization"]["threshold"] == pytest.approx(0.5 * 7.0)


def test_client_gives_up_with_a_transient_error():
    with FakeChatServer(default="500") as server:
        client = OpenAIClient(server.base_url, "fake-vlm", max_retries=2, backoff=0.01)
        with pytest.raises(TransientRequestError, match="3 attempts failed; last: HTTP 500"):
            client.chat([{"role": "user", "content": "hi"}])
    assert server.requests == 3


def test_keyword_concepts_and_concept_replies():
    assert keyword_concept("The regions all show red striped stars on grass.") == ("red striped star", "object")
    assert keyword_concept("Blue areas of any shape") == ("blue", "colour")
    assert keyword_concept("a dotted pattern") == ("dotted", "texture")
    assert keyword_concept("the hole in each square") == ("square hole", "part")
    assert keyword_concept("open sky") == ("sky", "scene")
    assert keyword_concept("wooden surfaces") == ("wooden", "material")
    assert keyword_concept("nothing recognisable") == (None, None)
    assert parse_concept_reply('Sure! {"concept": "sky", "category": "Scene"}') == ("sky", "scene")
    assert parse_concept_reply('{"concept": "red", "category": "color"}') == ("red", "colour")
    assert parse_concept_reply("no json here") == (None, None)
    assert parse_concept_reply('{"concept": "x", "category": "vibe"}') == ("x", None)


def test_vote_keeps_what_most_descriptions_share():
    text, concept, category, votes = vote(["A red star on the grass.", "A red star and a blue circle in the sky.",
                                           "A small red star on the grass.", "A red star on the grass."])
    assert (concept, category) == ("red star", "object") and "4 of 4" in text and "on the grass" in text
    assert votes["object"] == {"star": 4, "circle": 1} and votes["scene"] == {"grass": 3, "sky": 1}
    # the concept named most often wins: red in all four, star in three (a shape the crops suggest)
    text, concept, category, _ = vote(["A red star.", "A red star.", "A red square.", "A red star in the sky."])
    assert (concept, category) == ("red", "colour") and "4 of 4" in text
    assert vote(["A red circle.", "A red square.", "A red star."])[1:3] == ("red", "colour")
    assert vote(["A blue star in the sky.", "A red circle in the sky.", "A green square in the sky."])[1:3] == ("sky", "scene")
    assert vote(["A red star with a hole.", "A blue star with a hole.", "A green circle."])[1:3] == ("star hole", "part")
    assert vote(["", "", ""])[1] is None
    text, concept, category, _ = vote(["A red star.", "A blue circle.", "A green square.", "A red hexagon."])
    assert concept is None and category is None and "closest: red (named in 2 of 4" in text


@pytest.fixture(scope="module")
def tiny_llava_index(tmp_path_factory):
    from tiny_models import tiny_model

    return make_index(tmp_path_factory.mktemp("tiny") / "index", model=tiny_model("llava"))


def test_demo_backend_runs_offline_on_a_llava(tiny_llava_index, tmp_path):
    out = explain(ExplainConfig(index=str(tiny_llava_index.path), out=str(tmp_path / "e.jsonl"), backend="demo",
                                max_features=2, max_new_tokens=8, device="cpu"))
    rows = read_jsonl(out)
    assert [r["feature"] for r in rows] == [0, 1]
    for r in rows:
        assert r["backend"] == "demo" and r["highlight"] == "crop" and r["prompt_version"].startswith("demo-")
        assert len(r["details"]["descriptions"]) == 5 and r["explanation"]


def test_hf_backend_batches_on_a_llava(tiny_llava_index, tmp_path):
    from tiny_models import tiny_model

    out = explain(ExplainConfig(index=str(tiny_llava_index.path), out=str(tmp_path / "e.jsonl"), backend="hf",
                                model=tiny_model("llava"), features=[0, 1, 2], batch_size=2, max_new_tokens=8, device="cpu"))
    rows = read_jsonl(out)
    assert sorted(r["feature"] for r in rows) == [0, 1, 2]
    assert all(r["backend"] == "hf" and isinstance(r["explanation"], str) for r in rows)
    with pytest.raises(MmsaeError, match="takes no images"):
        explain(ExplainConfig(index=str(tiny_llava_index.path), out=str(tmp_path / "f.jsonl"), backend="hf",
                              model=tiny_model("llama"), device="cpu"))


def test_vote_counts_only_the_kinds_asked_for(tmp_path):
    import json

    from mmsae.demo.explainer import readable_kinds

    # every description hallucinates a handle: with parts untrusted, the shared colour wins
    descriptions = ["A red star with a handle.", "A red circle with a handle.", "A red square with a handle."]
    assert vote(descriptions)[1:3] == ("handle", "part")
    text, concept, category, votes = vote(descriptions, ("colour", "object", "scene"))
    assert (concept, category) == ("red", "colour") and "part" not in votes
    # the kinds come from the model's held-out check: pattern at 16% is not trusted, parts never
    (tmp_path / "quality.json").write_text(json.dumps({"by_type": {
        "colour": {"accuracy": 0.95}, "shape": {"accuracy": 0.9}, "pattern": {"accuracy": 0.16}, "scene": {"accuracy": 1.0}}}))
    assert readable_kinds(str(tmp_path)) == ("colour", "object", "scene")
    assert readable_kinds(str(tmp_path / "missing")) == ("colour", "texture", "object", "part", "scene")


def test_vote_is_the_same_under_every_hash_seed():
    """Ties are broken by the order words are first named, never by a set's hash order."""
    import subprocess
    import sys

    probe = ("from mmsae.demo.explainer import vote; import json; "
             "print(json.dumps(vote(['a yellow and black square', 'a black and yellow circle', 'a green square'])))")
    outs = {subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                           env={**__import__("os").environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in range(6)}
    assert len(outs) == 1
    explanation, concept, category, votes = json.loads(outs.pop())
    assert list(votes["colour"]) == ["yellow", "black", "green"]  # yellow and black tie at 2: yellow is named first
