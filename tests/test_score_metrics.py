"""IoU, baselines, bootstrap, detection metrics and the table: checked against hand-computed values."""

import numpy as np
import pytest

from mmsae.score.baselines import bootstrap_ci, derangement, random_images
from mmsae.score.detection import auroc, balanced_accuracy
from mmsae.score.iou import dataset_iou, fit_mask, iou, mean_iou, netdissect_iou
from mmsae.score.table import csv_table, markdown_table, summarize


def box(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def test_iou_hand_computed():
    a = box(10, 10, 0, 4, 0, 4)  # 16 px
    b = box(10, 10, 2, 6, 2, 6)  # 16 px, overlap 2x2 = 4
    assert iou(a, b) == pytest.approx(4 / 28)
    assert iou(a, a) == 1.0
    assert iou(a, box(10, 10, 5, 9, 5, 9)) == 0.0
    assert iou(None, b) == 0.0  # a failed segmentation counts 0
    assert iou(np.zeros((10, 10), bool), np.zeros((10, 10), bool)) == 0.0


def test_mean_and_dataset_iou_differ_as_expected():
    big_a, big_b = box(10, 10, 0, 10, 0, 10), box(10, 10, 0, 10, 0, 5)  # IoU 50/100
    small_a, small_b = box(10, 10, 0, 1, 0, 1), box(10, 10, 5, 6, 5, 6)  # IoU 0/2
    assert mean_iou([big_a, small_a], [big_b, small_b]) == pytest.approx((0.5 + 0.0) / 2)
    # pooled: (50 + 0) / (100 + 2)
    assert dataset_iou([big_a, small_a], [big_b, small_b]) == pytest.approx(50 / 102)
    # a failed segmentation adds the activation's pixels to the union only
    assert dataset_iou([big_a, None], [big_b, small_b]) == pytest.approx(50 / 101)


def test_mask_is_resized_to_the_activation_map():
    mask = box(4, 4, 0, 2, 0, 2)  # top-left quarter
    resized = fit_mask(mask, (8, 8))
    assert resized.shape == (8, 8) and resized.sum() == 16 and resized[:4, :4].all()
    assert iou(mask, box(8, 8, 0, 4, 0, 4)) == 1.0


@pytest.mark.parametrize("n", [2, 3, 7, 50])
def test_derangement_has_no_fixed_point_and_is_a_permutation(n):
    items = list(range(100, 100 + n))
    for seed in range(20):
        d = derangement(items, seed)
        assert sorted(d) == items and sorted(d.values()) == items
        assert all(k != v for k, v in d.items())
    assert derangement(items, 3) == derangement(items, 3)


def test_derangement_needs_two_items():
    with pytest.raises(ValueError):
        derangement([1], 0)


def test_random_images_seeded_and_exclusive():
    pool = list(range(50))
    a = random_images(pool, {1, 2, 3}, 5, seed=0, feature=7)
    assert a == random_images(pool, {1, 2, 3}, 5, seed=0, feature=7)
    assert len(set(a)) == 5 and not set(a) & {1, 2, 3}
    assert a != random_images(pool, {1, 2, 3}, 5, seed=0, feature=8)
    assert random_images([1, 2], {1, 2}, 5, 0, 0) == []
    assert sorted(random_images(pool[:4], {0}, 10, 0, 0)) == [1, 2, 3]


def test_bootstrap_ci_covers_the_mean_and_shrinks_with_more_data():
    rng = np.random.default_rng(0)
    small, large = rng.normal(0.3, 0.1, 20), rng.normal(0.3, 0.1, 2000)
    m, lo, hi = bootstrap_ci(small, seed=1)
    assert m == pytest.approx(small.mean()) and lo < m < hi
    # close to the normal-theory interval mean +- 1.96 * sd / sqrt(n)
    half = 1.96 * small.std(ddof=1) / np.sqrt(small.size)
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.25)
    _, lo2, hi2 = bootstrap_ci(large, seed=1)
    assert hi2 - lo2 < (hi - lo) / 5
    assert bootstrap_ci(small, seed=5) == bootstrap_ci(small, seed=5)
    assert bootstrap_ci([0.5]) == (0.5, 0.5, 0.5)


def test_balanced_accuracy_and_auroc_hand_computed():
    labels = [1, 1, 1, 0]
    assert balanced_accuracy(labels, [1, 1, 1, 1]) == 0.5  # always yes is chance
    assert balanced_accuracy(labels, [1, 0, 0, 0]) == pytest.approx((1 / 3 + 1) / 2)
    assert auroc([1, 1, 0, 0], [0.9, 0.4, 0.5, 0.1]) == pytest.approx(3 / 4)
    assert auroc([1, 0], [0.5, 0.5]) == 0.5  # ties count half
    assert auroc([1, 1, 0, 0], [1, 1, 0, 0]) == 1.0


def test_summary_and_table_layout():
    rows = []
    for f, (cat, ours, shuf) in enumerate([("color", 0.6, 0.0), ("colour", 0.4, 0.1), ("object", 0.5, 0.0)]):
        rows.append({"feature": f, "scorer": "iou", "baseline": "none", "value": ours, "category": cat})
        rows.append({"feature": f, "scorer": "iou", "baseline": "shuffled", "value": shuf, "category": cat})
        rows.append({"feature": f, "scorer": "detection", "baseline": "none", "value": 1.0, "category": cat,
                     "details": {"auroc": 0.75}})
    summary = summarize(rows, seed=0, n_boot=200)
    cell = {(s["category"], s["scorer"], s["baseline"]): s for s in summary}
    assert cell[("colour", "iou", "none")]["mean"] == pytest.approx(0.5)
    assert cell[("colour", "iou", "none")]["n"] == 2
    assert cell[("total", "iou", "none")]["mean"] == pytest.approx(0.5)
    assert cell[("total", "iou", "shuffled")]["mean"] == pytest.approx(0.1 / 3)
    assert cell[("total", "detection_auroc", "none")]["mean"] == pytest.approx(0.75)
    md = markdown_table(summary)
    lines = md.strip().splitlines()
    assert lines[0].startswith("| category | features | IoU ours | IoU shuffled |")
    assert [ln.split("|")[1].strip() for ln in lines[2:]] == ["object", "colour", "**total**"]
    assert "0.500 [" in lines[-1]
    csv = csv_table(summary).splitlines()
    assert csv[0] == "category,scorer,baseline,n,mean,ci_low,ci_high"
    assert "total,iou,none,3,0.5," in "\n".join(csv)


def test_chat_judge_reads_yes_no_replies_and_fills_the_template():
    from PIL import Image

    from mmsae.score.detection import ChatJudge, DetectionItem, detect

    asked = []

    def ask(images, questions):
        asked.extend(questions)
        return [("Yes." if im.getpixel((0, 0))[0] > 128 else "no, it does not") for im in images]

    red, black = Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 0))
    items = [DetectionItem(i, red if i < 3 else black, {}, activates=i < 3) for i in range(6)]
    judge = ChatJudge(ask, "Is there {concept}? ({explanation})")
    result = detect(judge, "red things", items, seed=0, concept="red")
    assert asked[0] == "Is there red? (red things)"
    assert result["balanced_accuracy"] == 1.0 and result["auroc"] == 1.0
    assert sorted(result["sample_ids"]) == list(range(6)) and result["sample_ids"] != list(range(6))
    # a judge that always says yes is at chance
    always = detect(ChatJudge(lambda ims, qs: ["YES"] * len(ims)), "red", items, seed=0)
    assert always["balanced_accuracy"] == 0.5 and always["auroc"] == 0.5


def test_resolution_ceiling_hand_computed():
    import torch

    from mmsae.models.base import Tile, TokenLayout
    from mmsae.score.iou import resolution_ceiling, token_coverage

    g, size = 4, 20  # 5 x 5 pixel cells
    rows, cols = np.divmod(np.arange(g * g), g)
    layout = TokenLayout(positions=torch.arange(g * g), tile=torch.zeros(g * g, dtype=torch.long),
                         row=torch.as_tensor(rows), col=torch.as_tensor(cols),
                         tiles=[Tile((0.0, 0.0, float(size), float(size)), g, g)], image_size=(size, size))
    mask = box(size, size, 0, 5, 0, 5) | box(size, size, 5, 8, 5, 7)  # one full cell + 6 px of the next
    cov = token_coverage(layout, mask).reshape(g, g)
    assert cov[0, 0] == 1.0 and cov[1, 1] == pytest.approx(6 / 25) and cov.sum() == pytest.approx(1 + 6 / 25)
    # both cells: 31 / 50; the full cell alone: 25 / 31, the better one
    assert resolution_ceiling(layout, mask) == pytest.approx(25 / 31)
    assert resolution_ceiling(layout, None) == 0.0
    assert resolution_ceiling(layout, np.zeros((size, size), dtype=bool)) == 0.0
    # no union of cells beats it: brute force over every set of the cells a random mask touches
    rng = np.random.default_rng(0)
    for _ in range(3):
        mask = np.zeros((size, size), dtype=bool)
        y, x = rng.integers(0, 12, 2)
        mask[y:y + rng.integers(4, 9), x:x + rng.integers(4, 9)] = True
        mask &= rng.random((size, size)) < 0.8
        cells = [(r, c) for r in range(g) for c in range(g) if mask[5 * r:5 * r + 5, 5 * c:5 * c + 5].any()]
        best = 0.0
        for bits in range(1, 2 ** len(cells)):
            chosen = np.zeros((size, size), dtype=bool)
            for j, (r, c) in enumerate(cells):
                if bits >> j & 1:
                    chosen[5 * r:5 * r + 5, 5 * c:5 * c + 5] = True
            best = max(best, (mask & chosen).sum() / (mask | chosen).sum())
        assert resolution_ceiling(layout, mask) == pytest.approx(best)


def test_netdissect_estimate_hand_computed():
    # 100 images, the feature fires on 10; sampled firing images have (I, U) = (30, 60) and (10, 40):
    # sum I = 10 * 20 = 200; sum U = 10 * 50 + 90 * mean(mask area on others: 0, 20) = 500 + 900
    assert netdissect_iou([(30, 60), (10, 40)], 10, [0, 20], 100) == pytest.approx(200 / 1400)
    # with every image sampled it is the exact pooled IoU
    pairs = [(3, 9), (0, 4)]
    assert netdissect_iou(pairs, 2, [5], 3) == pytest.approx(3 / (13 + 5))
    assert netdissect_iou([], 0, [5], 3) == 0.0
