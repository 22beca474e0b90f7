"""score() over several run folders in one call (``--run A B``): each run's files are those a call
for it alone writes, while each (image, phrase) is segmented once for all of them.

The runs are hand-built indexes of shapes-world scenes (as in test_score_pipeline: each feature
fires on its concept's coverage of each grid cell), scored with the oracle segmenter behind a
wrapper that counts what it is asked.
"""

import json
import shutil

import numpy as np
import pytest

from mmsae.cli import main
from mmsae.data.shapes import ShapesWorld, concept_mask, scene_from_meta
from mmsae.errors import MmsaeError
from mmsae.index import IndexWriter
from mmsae.score import ScoreConfig, score
from mmsae.score.segmenters import OracleSegmenter
from mmsae.score.shared import MISSING
from test_score_pipeline import SIZE, coverage, grid_layout

OUTPUTS = ("scores.jsonl", "scores.md", "scores.csv", "scores_config.json")
# two runs over the same images, like the demo's language-model and vision-tower runs: some
# concepts in common (so some (image, phrase) pairs are asked by both), some not
LM = [("red", "colour"), ("circle", "object"), ("grass", "scene"), ("striped", "texture")]
VISION = [("red", "colour"), ("square", "object"), ("sky", "scene"), ("blue", "colour")]


class CountingSegmenter:
    """The oracle, recording every (image pixels, phrase) it is asked to segment."""

    name = "oracle"

    def __init__(self):
        self.asked: list[tuple[bytes, str]] = []

    def segment(self, image, phrase, meta=None):
        self.asked.append((image.tobytes(), phrase))
        return OracleSegmenter().segment(image, phrase, meta)


def make_run(root, concepts, world_seed=1, n=48):
    """A run folder: an index of ``n`` shapes-world scenes whose feature f fires on concept f, and
    an explanation per feature naming its concept."""
    world = ShapesWorld(seed=world_seed, size=SIZE)
    writer = IndexWriter(root / "index", num_latents=len(concepts), top_n=4)
    tops = [0] * len(concepts)
    for i in range(n):
        sample = world.sample(i)
        scene = scene_from_meta(sample.meta)
        writer.add_sample(i, sample.image, grid_layout(), meta=sample.meta)
        for f, (concept, _) in enumerate(concepts):
            mask = concept_mask(scene, concept)
            if mask is None or not mask.any():
                continue
            top = mask.sum() > 40 and tops[f] < 4
            tops[f] += top
            writer.add_example(f, i, coverage(mask), kind="top" if top else "random")
    writer.finish()
    rows = [{"feature": f, "explanation": f"{c} regions", "concept": c, "category": cat}
            for f, (c, cat) in enumerate(concepts)]
    (root / "explanations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def config(run, **kw):
    return ScoreConfig(run=run, segmenter="oracle", scorers=["iou", "detection"], judge="oracle", n_boot=50,
                       netdissect_images=4, **kw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {"lm": make_run(root / "lm", LM), "vision": make_run(root / "vision", VISION),
            "other": make_run(root / "other", LM, world_seed=7)}  # the same ids, other pictures


def copies(runs, tmp_path, names, where):
    """Fresh copies of the named runs (their index and explanations), under tmp_path/where."""
    return [shutil.copytree(runs[n], tmp_path / where / n) for n in names]


def score_alone_and_together(runs, tmp_path, names, capsys):
    alone, together = copies(runs, tmp_path, names, "alone"), copies(runs, tmp_path, names, "together")
    counters = [CountingSegmenter() for _ in names]
    summaries = [score(config(str(run)), segmenter=c) for run, c in zip(alone, counters)]
    shared = CountingSegmenter()
    capsys.readouterr()
    result = score(config([str(r) for r in together]), segmenter=shared)
    printed = capsys.readouterr().out
    for a, t in zip(alone, together):
        for name in OUTPUTS:
            assert (t / name).read_bytes() == (a / name).read_bytes(), (t, name)
    assert list(result) == [str(t) for t in together]  # per run, in --run order
    assert list(result.values()) == summaries
    assert all(f"[{t}] Scores of " in printed for t in together)
    return counters, shared


def test_two_runs_of_one_image_set_write_what_each_writes_alone_and_segment_once(runs, tmp_path, capsys):
    counters, shared = score_alone_and_together(runs, tmp_path, ["lm", "vision"], capsys)
    # a call segments each distinct (image, phrase) once: alone, once per call; together, once for both
    for c in counters:
        assert len(c.asked) == len(set(c.asked))
    both = set(counters[0].asked) | set(counters[1].asked)
    assert len(shared.asked) == len(both) < len(counters[0].asked) + len(counters[1].asked)


def test_runs_whose_indexes_hold_other_pictures_under_the_same_ids(runs, tmp_path, capsys):
    # the same sample ids and phrases, other scenes: a cache keyed by id would hand one run the other's masks
    counters, shared = score_alone_and_together(runs, tmp_path, ["lm", "other"], capsys)
    assert len(shared.asked) == len(set(counters[0].asked) | set(counters[1].asked))


def test_bad_runs_are_one_line_errors_before_any_run_is_written(runs, tmp_path, capsys):
    lm, vision = copies(runs, tmp_path, ["lm", "vision"], "bad")
    (tmp_path / "empty").mkdir()
    for run, match in (([str(lm), str(vision), str(lm)], "--run lists .*lm twice$"),
                       ([str(lm), str(lm) + "/"], r"--run lists .*lm twice \(also as .*lm/\)"),
                       ([str(lm), str(tmp_path / "empty")], "feature index .*empty/index does not exist")):
        with pytest.raises(MmsaeError, match=match) as e:
            score(config(run))
        assert "\n" not in str(e.value)
    with pytest.raises(MmsaeError, match="--out name one run's files"):
        score(config([str(lm), str(vision)], out=str(tmp_path / "x")))
    # the second run's user file is refused before the first run is scored
    (vision / "scores.md").write_text("# my notes\n")
    with pytest.raises(MmsaeError, match="scores.md exists and was not written by mmsae"):
        score(config([str(lm), str(vision)]))
    assert not (lm / "scores.jsonl").exists() and (vision / "scores.md").read_text() == "# my notes\n"
    # the CLI takes several folders after --run and says the same in one line
    capsys.readouterr()
    assert main(["score", "--run", str(lm), str(lm), "--segmenter", "oracle", "--scorers", "iou"]) == 2
    assert capsys.readouterr().err.strip().startswith("mmsae score: error: --run lists")


def test_mask_cache_keeps_the_most_recently_used_within_its_bytes():
    from mmsae.score.shared import ENTRY_BYTES, MaskCache

    rng = np.random.default_rng(0)
    masks = {k: rng.random((64, 48)) > 0.5 for k in "abc"}
    cache = MaskCache(max_bytes=2 * (ENTRY_BYTES + 64 * 48 // 8))  # room for two such masks
    cache.put("a", masks["a"])
    cache.put("b", masks["b"])
    got = cache.get("a")  # a is now the most recently used
    assert got.dtype == bool and np.array_equal(got, masks["a"])
    got[:] = False  # the caller's copy, not the cache's
    cache.put("c", masks["c"])
    assert cache.get("b") is MISSING and len(cache) == 2
    assert np.array_equal(cache.get("a"), masks["a"]) and np.array_equal(cache.get("c"), masks["c"])
    cache.put("none", None)  # a failed segmentation is remembered too, and costs its entry
    assert cache.get("none") is None and len(cache) == 2 and cache.get("a") is MISSING
