"""CLIP score, MiniLM text similarity and the CLIPSeg / GroundingDINO+SAM segmenters on tiny models.

The tiny models are built from configs with random weights and saved to temporary folders, so the
loading code is the same as for hub ids, and nothing is downloaded.
"""

import json
import string

import numpy as np
import pytest
import torch
from PIL import Image

from mmsae.score.clip import ClipScorer, TextSimilarity, clip_score_from_embeddings
from mmsae.score.segmenters import ClipSegSegmenter


def _clip_tokenizer(folder):
    from transformers import CLIPTokenizer

    chars = list(string.ascii_lowercase + string.digits + ".,!?'-")
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")), vocab


def _text_config(vocab):
    return dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


def build_tiny_clip(folder):
    """A tiny random CLIPModel with its processor, saved in ``folder``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer, vocab = _clip_tokenizer(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    torch.manual_seed(0)
    config = CLIPConfig(text_config=_text_config(vocab), projection_dim=16,
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8))
    CLIPModel(config).save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40 + 5 * i, 48, 3), dtype=np.uint8)) for i in range(n)]


def test_clip_score_formula_hand_computed():
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    image = torch.tensor([[1.0, 1.0], [-1.0, 0.0], [3.0, 0.0]])
    assert clip_score_from_embeddings(text, image).tolist() == pytest.approx([100 / np.sqrt(2), 0.0, 100.0])


def test_clip_score_matches_float64_reference(tiny_clip):
    from transformers import AutoProcessor, CLIPModel

    images = _images(3)
    scores = ClipScorer(str(tiny_clip)).score("a red circle", images)

    # reference: the same weights in float64, embeddings and cosine computed by hand
    model = CLIPModel.from_pretrained(tiny_clip).double().eval()
    processor = AutoProcessor.from_pretrained(tiny_clip)
    inputs = processor(text=["a red circle"], images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        t = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        v = model.get_image_features(pixel_values=inputs["pixel_values"].double())
    t = getattr(t, "pooler_output", t)[0].numpy()
    v = getattr(v, "pooler_output", v).numpy()
    cos = v @ t / (np.linalg.norm(v, axis=1) * np.linalg.norm(t))
    expected = 100 * np.maximum(cos, 0)
    assert len(scores) == 3
    np.testing.assert_allclose(scores, expected, atol=1e-3)
    assert ClipScorer(str(tiny_clip)).score("x", []) == []


def test_text_similarity_minilm():
    sim = TextSimilarity()
    same, related, unrelated = sim.score("a red circle", ["a red circle", "a crimson round disc", "tax law reform"])
    assert same == pytest.approx(100.0, abs=1e-3)
    assert related > unrelated
    # mean pooling + normalisation by hand, in float64 from the model's own hidden states
    from transformers import AutoModel, AutoTokenizer

    from mmsae.score.clip import minilm_path

    tok, model = AutoTokenizer.from_pretrained(minilm_path()), AutoModel.from_pretrained(minilm_path()).double()
    with torch.no_grad():
        hidden = model(**tok(["blue square"], return_tensors="pt")).last_hidden_state[0].numpy()
    ref = hidden.mean(axis=0)
    ref /= np.linalg.norm(ref)
    np.testing.assert_allclose(sim.embed(["blue square"])[0].numpy(), ref, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_clipseg(tmp_path_factory):
    return build_tiny_clipseg(tmp_path_factory.mktemp("tiny-clipseg"))


def build_tiny_clipseg(folder):
    """A tiny random CLIPSeg model with its processor, saved in ``folder``."""
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, ViTImageProcessor

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer, vocab = _clip_tokenizer(folder)
    torch.manual_seed(0)
    config = CLIPSegConfig(text_config=_text_config(vocab), projection_dim=16, reduce_dim=16,
                           extract_layers=[0, 1], decoder_num_attention_heads=2, decoder_intermediate_size=32,
                           vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=2, image_size=32, patch_size=8))
    CLIPSegForImageSegmentation(config).save_pretrained(folder)
    image_processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.485, 0.456, 0.406],
                                        image_std=[0.229, 0.224, 0.225])
    CLIPSegProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_clipseg_segmenter(tiny_clipseg):
    from transformers import AutoProcessor, CLIPSegForImageSegmentation

    image = _images(1)[0]  # 40 x 48
    seg = ClipSegSegmenter(str(tiny_clipseg), threshold=0.5)
    probs = seg.probabilities(image, "red circle")
    assert probs.shape == (40, 48) and probs.dtype == np.float32

    # reference: the model's logits directly, upsampled the same way
    model = CLIPSegForImageSegmentation.from_pretrained(tiny_clipseg).eval()
    inputs = AutoProcessor.from_pretrained(tiny_clipseg)(text=["red circle"], images=[image], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits.reshape(1, 1, 32, 32)
    ref = torch.sigmoid(torch.nn.functional.interpolate(logits, size=(40, 48), mode="bilinear")).numpy()[0, 0]
    np.testing.assert_allclose(probs, ref, atol=1e-5)

    mask = seg.segment(image, "red circle")
    if mask is not None:
        assert mask.shape == (40, 48) and np.array_equal(mask, probs > 0.5)
    assert ClipSegSegmenter(str(tiny_clipseg), threshold=0.0).segment(image, "x").all()
    assert ClipSegSegmenter(str(tiny_clipseg), threshold=1.0).segment(image, "x") is None  # failed -> None


@pytest.fixture(scope="module")
def tiny_grounded_sam(tmp_path_factory):
    from transformers import (BertConfig, BertTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor, SamConfig, SamImageProcessor,
                              SamModel, SamProcessor, SwinConfig)

    det, sam = tmp_path_factory.mktemp("tiny-gdino"), tmp_path_factory.mktemp("tiny-sam")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "red", "circle", "blue", "square"]
    (det / "vocab.txt").write_text("\n".join(words) + "\n")
    GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}),
                           tokenizer=BertTokenizer(str(det / "vocab.txt"))).save_pretrained(det)
    torch.manual_seed(0)
    GroundingDinoForObjectDetection(GroundingDinoConfig(
        backbone_config=SwinConfig(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 1],
                                   window_size=4, out_indices=[1, 2]),
        text_config=BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=64),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        encoder_attention_heads=2, decoder_attention_heads=2, num_queries=10, num_feature_levels=2,
        encoder_n_points=2, decoder_n_points=2, max_text_len=32, use_timm_backbone=False,
        use_pretrained_backbone=False)).save_pretrained(det)
    SamModel(SamConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=16,
                           output_channels=16, mlp_dim=64, global_attn_indexes=[1], window_size=2, num_pos_feats=8),
        prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=16, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_dim=32,
                                 iou_head_hidden_dim=16))).save_pretrained(sam)
    SamProcessor(image_processor=SamImageProcessor(
        size={"longest_edge": 64}, pad_size={"height": 64, "width": 64}, mask_size={"longest_edge": 16},
        mask_pad_size={"height": 16, "width": 16})).save_pretrained(sam)
    return det, sam


def test_grounded_sam_segmenter(tiny_grounded_sam):
    from transformers import SamModel, SamProcessor

    from mmsae.score.segmenters import GroundedSamSegmenter

    det, sam = tiny_grounded_sam
    image = _images(1)[0]  # 40 x 48
    seg = GroundedSamSegmenter(str(det), str(sam), box_threshold=0.0, text_threshold=0.0)
    assert seg.grounding_text("Red Circle") == "red circle."
    boxes = seg.boxes(image, "red circle")
    assert boxes and all(len(b) == 4 for b in boxes)
    mask = seg.segment(image, "red circle")

    # reference: SAM run directly on the same boxes, one mask per box, united by hand
    processor, model = SamProcessor.from_pretrained(sam), SamModel.from_pretrained(sam).eval()
    inputs = processor(images=image, input_boxes=[boxes], return_tensors="pt")
    with torch.no_grad():
        pred = model(pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"],
                     multimask_output=False).pred_masks
    per_box = processor.post_process_masks(pred, inputs["original_sizes"], inputs["reshaped_input_sizes"])[0]
    expected = np.zeros((40, 48), dtype=bool)
    for m in per_box.numpy().reshape(len(boxes), 40, 48):
        expected |= m
    if expected.any():
        assert mask is not None and np.array_equal(mask, expected)
    else:
        assert mask is None
    # nothing passes an impossible box threshold: the segmentation fails (IoU 0 downstream)
    assert GroundedSamSegmenter(str(det), str(sam), box_threshold=1.01).segment(image, "red circle") is None
