"""Can the demo's frozen language model answer shapes-world questions from a *text* caption?

The evidence behind the demo model's recipe (README, "The offline demo"): SmolLM2-135M-Instruct,
unchanged, is given each held-out scene's ground-truth caption in place of the image, then each
colour and shape question with "Answer with one word."; its answer is the most likely first
token among the candidate words (8 colours, 6 shapes). If it cannot read the caption, no
projector in front of the frozen model can make it read the image.

    python bench/demo_text_ceiling.py            # needs the built stages in ~/.cache/mmsae
    python bench/demo_text_ceiling.py --scenes 60 --cache DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from mmsae.data.shapes import COLOURS, SHAPES, ShapesWorld, question_type  # noqa: E402
from mmsae.demo.build import build_language_model, default_cache_dir  # noqa: E402


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", type=int, default=60)
    parser.add_argument("--seed", type=int, default=10_001, help="world seed (the build's held-out scenes)")
    parser.add_argument("--cache", default=None)
    args = parser.parse_args()
    from transformers import AutoTokenizer, LlamaForCausalLM

    lm_dir = build_language_model(Path(args.cache or default_cache_dir()) / "stages")
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    lm = LlamaForCausalLM.from_pretrained(lm_dir, dtype=torch.float32).eval()
    words = {"colour": list(COLOURS), "shape": list(SHAPES)}
    first = {k: [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ws] for k, ws in words.items()}
    right = {k: [] for k in words}
    world = ShapesWorld(seed=args.seed)
    for i in range(args.scenes):
        scene = world.scene(i)
        for q, a in scene.qa:
            kind = question_type(q)
            if kind not in words:
                continue
            text = f"<|im_start|>user\n{scene.caption}\n{q} Answer with one word.<|im_end|>\n<|im_start|>assistant\n"
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            logits = lm(ids).logits[0, -1]
            right[kind].append(words[kind][int(logits[first[kind]].argmax())] == a)
    print(f"frozen SmolLM2-135M-Instruct, ground-truth caption as text, {args.scenes} held-out scenes:")
    for kind, r in right.items():
        print(f"  {kind:6s} {sum(r) / len(r):6.1%} of {len(r)}   (chance {1 / len(words[kind]):.1%})")


if __name__ == "__main__":
    main()
