"""What a build accumulates (:class:`IndexState`): each feature's top images and random
activating images with their patch maps, its top text tokens and its statistics; and the merge of
states built from disjoint samples (the ranks under torchrun)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch

from ..errors import MmsaeError
from ..io import save_tensors
from ..models.base import Tile, TokenLayout
from .folder import KEY_SHIFT, _layout_to_json
from .stats import ActivationStats

AFTER_TOKENS = 3  # text tokens of context kept after each top token
NO_KEY = torch.iinfo(torch.int64).max  # the random-example key of an empty slot (above every real key)
_M31 = (1 << 31) - 1


def _mix31(x: torch.Tensor, salt: torch.Tensor | int) -> torch.Tensor:
    """Scramble int64 values in [0, 2**31) with ``salt`` (multiply, fold the high bits down, twice).

    Every product stays below 2**62, so no step overflows and every device gives the same result."""
    x = (x ^ salt) * 0x5BD1E995
    x = (x ^ (x >> 31)) & _M31
    x = x * 0x6A09E667
    return (x ^ (x >> 29)) & _M31


def random_key(seed: int, feature: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """The key that picks a feature's random examples: each feature keeps its activating images with
    the smallest keys, a uniform random sample of them.

    A pseudo-random permutation of the sample ids (a four-round Feistel network on 62 bits, its round
    keys drawn from the seed and the feature): different for every feature, never equal for two
    samples of one feature, and a function of (seed, feature, sample id) alone, so the same images
    are picked whatever order, batches or processes saw them. ``feature`` and ``sample`` broadcast.
    """
    feature, sample = feature.long() & _M31, sample.long()
    left, right = sample >> 31, sample & _M31
    for r in range(4):
        salt = int.from_bytes(hashlib.blake2b(f"{seed}:{r}".encode(), digest_size=4).digest(), "little") & _M31
        left, right = right, left ^ _mix31(right, _mix31(feature, salt))
    return (left << 31) | right


def _ranked(score: torch.Tensor, *ties: torch.Tensor) -> torch.Tensor:
    """Per row, the column order by ``score`` descending, then by each of ``ties`` ascending.

    One order whichever way the candidates arrived, so lists merged in any grouping (batches,
    checkpoints, ranks) come out the same."""
    order = None
    for key in (*reversed(ties), -score):  # stable sorts: the last one decides first
        if order is None:
            order = key.sort(dim=-1, stable=True).indices
        else:
            order = order.gather(-1, key.gather(-1, order).sort(dim=-1, stable=True).indices)
    return order


class IndexState:
    """Everything ``build_index`` accumulates; bounded by features x (top_n + random_n).

    The lists and the statistics live on ``device`` (the SAE's, where the codes are); only the
    patch maps, records and layouts of the kept examples are copied to the host. States built from
    disjoint samples (the ranks under torchrun) ``merge`` into the state of their union.
    """

    def __init__(self, num_latents: int, top_n: int, random_n: int, top_tokens: int, context_tokens: int,
                 image_score: str, seed: int, device: str | torch.device = "cpu"):
        F = num_latents
        self.F, self.N, self.K, self.M = F, top_n, random_n, top_tokens
        self.C, self.W = context_tokens, context_tokens + 1 + AFTER_TOKENS
        self.image_score = image_score
        self.seed = seed
        self.device = torch.device(device)
        self.top_sample = torch.full((F, top_n), -1, dtype=torch.int64, device=device)
        self.top_score = torch.zeros(F, top_n, device=device)
        self.rand_sample = torch.full((F, random_n), -1, dtype=torch.int64, device=device)
        self.rand_score = torch.zeros(F, random_n, device=device)
        self.rand_key = torch.full((F, random_n), NO_KEY, dtype=torch.int64, device=device)  # ascending
        self.tok_act = torch.zeros(F, top_tokens, device=device)
        self.tok_sample = torch.full((F, top_tokens), -1, dtype=torch.int64, device=device)
        self.tok_pos = torch.full((F, top_tokens), -1, dtype=torch.int64, device=device)
        self.tok_ctx = torch.full((F, top_tokens, self.W), -1, dtype=torch.int32, device=device)
        self.stats = ActivationStats(F, device)
        self.maps: dict[int, np.ndarray] = {}
        self.samples: dict[int, dict] = {}
        self.layouts: dict[int, TokenLayout] = {}
        self.next_id = 0
        self.skipped = 0

    _LISTS = ("top_sample", "top_score", "rand_sample", "rand_score", "rand_key", "tok_act", "tok_sample", "tok_pos", "tok_ctx")

    def to(self, device: str | torch.device) -> IndexState:
        """Move the lists and the statistics to ``device`` (in place); returns self."""
        self.device = torch.device(device)
        for name in self._LISTS:
            setattr(self, name, getattr(self, name).to(device))
        self.stats = ActivationStats.from_state(self.stats.state(), device)
        return self

    # --- per batch -----------------------------------------------------------------------------
    def image_scores(self, values: torch.Tensor, indices: torch.Tensor, image: torch.Tensor,
                     sizes: torch.Tensor) -> torch.Tensor:
        """Dense [B, F] scores of B images from their patch codes [P, k] (``image`` [P]: the image of
        each row, ``sizes`` [B]: the patches of each image)."""
        B = sizes.numel()
        v = values.reshape(-1).float().clamp_min(0)
        flat = (image[:, None] * self.F + indices.long()).reshape(-1)
        scores = torch.zeros(B * self.F, device=v.device)
        if self.image_score == "max":
            return scores.scatter_reduce_(0, flat, v, reduce="amax").view(B, self.F)
        return scores.index_add_(0, flat, v).view(B, self.F) / sizes.clamp_min(1)[:, None]

    def add_images(self, sample_ids: list[int], codes: list[tuple[torch.Tensor, torch.Tensor]]) -> list[int]:
        """Merge a batch of images (patch codes [P, k] each) into the statistics, the top lists and
        the random examples, and keep the patch maps of every (feature, image) that entered a list.
        ``sample_ids`` ascend and lie above every id added before (one build streams in id order;
        states built otherwise combine with ``merge``).

        Returns the batch positions of the images that entered some list (their samples must be recorded).
        """
        if not codes:
            return []
        dev = self.device
        values = torch.cat([v for v, _ in codes]).to(dev).float()
        indices = torch.cat([i for _, i in codes]).to(dev).long()
        sizes = [v.shape[0] for v, _ in codes]
        size_t = torch.tensor(sizes, device=dev)
        image = torch.repeat_interleave(torch.arange(len(codes), device=dev), size_t, output_size=sum(sizes))
        self.stats.update_patches(values, indices)
        scores = self.image_scores(values, indices, image, size_t)  # [B, F]
        self.stats.update_images(scores)
        feats = torch.nonzero((scores > 0).any(0), as_tuple=True)[0]  # the lists of no other feature change
        if feats.numel() == 0:
            return []
        score = scores[:, feats].T  # [G, B]
        sids = torch.tensor(sample_ids, dtype=torch.int64, device=dev).expand_as(score)
        entered = torch.zeros_like(score, dtype=torch.bool)
        # only features where an image beats the last kept one merge: the batch's ids are above every
        # kept id (one build sees its samples in id order), so a tied score loses
        bar = torch.where(self.top_sample[feats, -1] >= 0, self.top_score[feats, -1], 0.0)
        g = torch.nonzero((score > bar[:, None]).any(1), as_tuple=True)[0]
        entered[g] = self._merge_top(feats[g], score[g], sids[g], in_id_order=True)
        key = torch.where(score > 0, random_key(self.seed, feats[:, None], sids), NO_KEY)
        g = torch.nonzero((key < self.rand_key[feats, -1:]).any(1), as_tuple=True)[0]
        entered[g] |= self._merge_random(feats[g], key[g], score[g], sids[g])
        b, g = torch.nonzero(entered.T, as_tuple=True)  # by image, then feature
        self._keep_maps(values, indices, image, sizes, sample_ids, b, feats[g])
        return b.unique().tolist()

    def _merge_top(self, rows: torch.Tensor, score: torch.Tensor, sample: torch.Tensor, in_id_order: bool = False) -> torch.Tensor:
        """Merge candidates (score, sample) [G, X] into the top lists of features ``rows`` [G]: best
        score first, ties to the lower sample id; empty slots and zero scores never win.
        ``in_id_order``: the candidates' ids ascend and lie above every kept id (a stream in id order),
        so ties are already in id order. Returns which candidates entered [G, X]."""
        cand_score = torch.cat([self.top_score[rows], score], 1)
        cand_sample = torch.cat([self.top_sample[rows], sample], 1)
        cand_score = torch.where((cand_sample >= 0) & (cand_score > 0), cand_score, -math.inf)
        order = (_ranked(cand_score) if in_id_order else _ranked(cand_score, cand_sample))[:, : self.N]
        best = cand_score.gather(1, order)
        empty = torch.isinf(best)
        self.top_sample[rows] = torch.where(empty, -1, cand_sample.gather(1, order))
        self.top_score[rows] = torch.where(empty, 0.0, best)
        return torch.zeros_like(cand_score, dtype=torch.bool).scatter_(1, order, ~empty)[:, self.N:]

    def _merge_random(self, rows: torch.Tensor, key: torch.Tensor, score: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """Merge candidates (``random_key`` or NO_KEY, score, sample) [G, X] into the random examples of
        features ``rows``: the K smallest keys stay. Returns which candidates entered [G, X]."""
        cand_key = torch.cat([self.rand_key[rows], key], 1)
        order = cand_key.sort(dim=1).indices[:, : self.K]  # (keys of one feature never tie)
        kept = cand_key.gather(1, order)
        empty = kept == NO_KEY
        self.rand_key[rows] = kept
        self.rand_sample[rows] = torch.where(empty, -1, torch.cat([self.rand_sample[rows], sample], 1).gather(1, order))
        self.rand_score[rows] = torch.where(empty, 0.0, torch.cat([self.rand_score[rows], score], 1).gather(1, order))
        return torch.zeros_like(cand_key, dtype=torch.bool).scatter_(1, order, ~empty)[:, self.K:]

    def _keep_maps(self, values: torch.Tensor, indices: torch.Tensor, image: torch.Tensor, sizes: list[int],
                   sample_ids: list[int], image_of: torch.Tensor, feature: torch.Tensor) -> None:
        """Copy to the host the patch maps [P] of the (image, feature) pairs given, from the batch's
        codes [R, k] (``image`` [R]: each row's position in the batch)."""
        if feature.numel() == 0:
            return
        dev, P = values.device, max(sizes)
        start = torch.tensor(np.cumsum([0, *sizes[:-1]]), device=dev)
        patch = (torch.arange(values.shape[0], device=dev) - start[image])[:, None].expand_as(indices)
        row_of = torch.full((len(sizes), self.F), -1, dtype=torch.long, device=dev)
        keys = (feature.cpu() * KEY_SHIFT + torch.tensor(sample_ids)[image_of.cpu()]).tolist()
        ends = np.cumsum(torch.bincount(image_of, minlength=len(sizes)).tolist())  # the pairs come by image
        chunk = max(1, 2**24 // P)  # maps copied at once: bounds the device memory they take
        for lo in range(0, len(keys), chunk):
            b, f = image_of[lo: lo + chunk], feature[lo: lo + chunk]
            row_of[b, f] = torch.arange(b.numel(), device=dev)
            rows = row_of[image[:, None], indices]  # [R, k]: the map each code belongs to, -1 for none
            maps = torch.zeros(b.numel() + 1, P, device=dev)
            maps[torch.where(rows >= 0, rows, b.numel()), patch] = values  # (codes of no map go to a spare row)
            row_of[b, f] = -1
            maps_np = maps.cpu().numpy()
            hi = lo + b.numel()
            for image_b, (first, last) in enumerate(zip([0, *ends[:-1]], ends)):
                first, last = max(first, lo), min(last, hi)
                if first < last:  # this image's maps, each copied out of the block
                    rows_np = maps_np[first - lo: last - lo, : sizes[image_b]]
                    self.maps.update(zip(keys[first:last], map(np.ndarray.copy, rows_np)))

    def add_text(self, sample_id: torch.Tensor, position: torch.Tensor, context: torch.Tensor,
                 values: torch.Tensor, indices: torch.Tensor) -> None:
        """Merge text-token codes [T, k] (with each token's sample, position and context ids [T, W]);
        the samples lie above every sample added before, the tokens come in (sample, position) order."""
        if values.shape[0] == 0:
            return
        self.stats.update_text(values, indices)
        dev = self.device
        T, k = values.shape
        v, f = values.reshape(-1).float().to(dev), indices.reshape(-1).long().to(dev)
        t = torch.arange(T, device=dev).repeat_interleave(k)
        # a token must beat the feature's last kept one: a tie goes to the lower sample id, and one
        # build sees its samples in id order
        thresh = torch.where(self.tok_sample[:, -1] >= 0, self.tok_act[:, -1], 0.0)
        keep = v > thresh[f]
        v, f, t = v[keep], f[keep], t[keep]
        if f.numel() == 0:
            return
        sample, pos = sample_id.to(dev)[t], position.to(dev)[t]
        # the (feature, token) codes by feature, then best first (ties stay in token order): the first M
        # of each feature are its candidates
        order = _ranked(v)
        order = order[f[order].sort(stable=True).indices]
        v, f, t, sample, pos = v[order], f[order], t[order], sample[order], pos[order]
        feats, counts = torch.unique_consecutive(f, return_counts=True)
        row = torch.repeat_interleave(torch.arange(feats.numel(), device=dev), counts, output_size=f.numel())
        rank = torch.arange(f.numel(), device=dev) - (counts.cumsum(0) - counts)[row]
        top = rank < self.M
        row, rank = row[top], rank[top]
        G = feats.numel()
        act = torch.full((G, self.M), -math.inf, device=dev)
        act[row, rank] = v[top]
        cand_sample, cand_pos, cand_t = (torch.zeros(G, self.M, dtype=torch.int64, device=dev).index_put_((row, rank), x[top])
                                         for x in (sample, pos, t))
        self._merge_tokens(feats, act, cand_sample, cand_pos, cand_t, context.to(dev), in_id_order=True)

    def _merge_tokens(self, rows: torch.Tensor, act: torch.Tensor, sample: torch.Tensor, position: torch.Tensor,
                      ctx_index: torch.Tensor, ctx_table: torch.Tensor, in_id_order: bool = False) -> None:
        """Merge candidate tokens (activation, -inf for none; sample; position) [G, X] into the top
        tokens of features ``rows``: highest activation first, ties to the lower (sample, position).
        A candidate's context is ``ctx_table[ctx_index]`` ([W] ids). ``in_id_order``: the candidates'
        ties are in (sample, position) order and their samples lie above every kept one."""
        M, W = self.M, self.W
        old_sample = self.tok_sample[rows]
        cand_act = torch.cat([torch.where(old_sample >= 0, self.tok_act[rows], -math.inf), act], 1)
        cand_sample = torch.cat([old_sample, sample], 1)
        cand_pos = torch.cat([self.tok_pos[rows], position], 1)
        order = (_ranked(cand_act) if in_id_order else _ranked(cand_act, cand_sample, cand_pos))[:, :M]
        best = cand_act.gather(1, order)
        empty = torch.isinf(best)
        old_ctx = self.tok_ctx[rows].gather(1, order.clamp(max=M - 1)[..., None].expand(-1, -1, W))
        new_ctx = ctx_table[ctx_index.gather(1, (order - M).clamp(min=0))]
        ctx = torch.where((order < M)[..., None], old_ctx, new_ctx)
        self.tok_sample[rows] = torch.where(empty, -1, cand_sample.gather(1, order))
        self.tok_pos[rows] = torch.where(empty, -1, cand_pos.gather(1, order))
        self.tok_act[rows] = torch.where(empty, 0.0, best)
        self.tok_ctx[rows] = torch.where(empty[..., None], -1, ctx)

    def merge(self, other: IndexState) -> None:
        """Fold in ``other``, a state built from other samples (another rank's share): the result is
        the state one build over both sets of samples gives (sums of floats up to rounding)."""
        rows = torch.arange(self.F, device=self.device)
        o = {name: getattr(other, name).to(self.device) for name in self._LISTS}
        self._merge_top(rows, o["top_score"], o["top_sample"])
        self._merge_random(rows, o["rand_key"], o["rand_score"], o["rand_sample"])
        self._merge_tokens(rows, torch.where(o["tok_sample"] >= 0, o["tok_act"], -math.inf), o["tok_sample"], o["tok_pos"],
                           torch.arange(self.F * self.M, device=self.device).view(self.F, self.M),
                           o["tok_ctx"].view(self.F * self.M, self.W))
        self.stats.merge(other.stats)
        self.maps.update(other.maps)
        self.samples.update(other.samples)
        self.layouts.update(other.layouts)
        self.skipped += other.skipped
        self.next_id = max(self.next_id, other.next_id)
        self.prune()

    # --- bookkeeping ---------------------------------------------------------------------------
    def referenced_samples(self) -> set[int]:
        return set(self.top_sample[self.top_sample >= 0].tolist()) | set(self.rand_sample[self.rand_sample >= 0].tolist())

    def prune(self) -> None:
        """Forget maps and samples no list refers to any more."""
        keys = set((torch.nonzero(self.top_sample >= 0)[:, 0] * KEY_SHIFT + self.top_sample[self.top_sample >= 0]).tolist())
        keys |= set((torch.nonzero(self.rand_sample >= 0)[:, 0] * KEY_SHIFT + self.rand_sample[self.rand_sample >= 0]).tolist())
        self.maps = {k: v for k, v in self.maps.items() if k in keys}
        refs = self.referenced_samples()
        self.samples = {s: r for s, r in self.samples.items() if s in refs}
        self.layouts = {s: lt for s, lt in self.layouts.items() if s in refs}

    def tensors(self) -> dict[str, torch.Tensor]:
        """The state as CPU tensors (a checkpoint; ``rand_key`` is recomputed from ``rand_sample``)."""
        keys = sorted(self.maps)
        lengths = [len(self.maps[k]) for k in keys]
        sids = sorted(self.layouts)
        lay = [self.layouts[s] for s in sids]
        return {
            **{name: getattr(self, name).cpu() for name in self._LISTS if name != "rand_key"},
            "map_key": torch.tensor(keys, dtype=torch.int64),
            "map_len": torch.tensor(lengths, dtype=torch.int64),
            "map_values": torch.from_numpy(np.concatenate([self.maps[k] for k in keys])) if keys else torch.zeros(0),
            "lay_sample": torch.tensor(sids, dtype=torch.int64),
            "lay_len": torch.tensor([lt.num_image_tokens for lt in lay], dtype=torch.int64),
            **{f"lay_{name}": (torch.cat([getattr(lt, name).cpu().long() for lt in lay]) if lay else torch.zeros(0, dtype=torch.long))
               for name in ("positions", "tile", "row", "col")},
            **self.stats.state(),
        }

    def save(self, path: Path, signature: dict) -> None:
        self.prune()
        meta = {"signature": json.dumps(signature), "next_id": str(self.next_id), "skipped": str(self.skipped),
                "samples": json.dumps({str(s): {**r, "layout": _layout_to_json(self.layouts[s])} for s, r in self.samples.items()})}
        save_tensors(path, self.tensors(), metadata=meta)

    @classmethod
    def load(cls, path: Path, signature: dict, **kwargs) -> IndexState:
        """A saved state (``save``), on ``kwargs["device"]``; refused unless it was started with ``signature``."""
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            t = {k: f.get_tensor(k) for k in f.keys()}
        if json.loads(meta["signature"]) != signature:
            raise MmsaeError(f"{path} was started with other options or another SAE; rerun with the same options, or use another --out")
        state = cls(**kwargs)
        dev = state.device
        for name in cls._LISTS:
            if name != "rand_key":
                setattr(state, name, t[name].to(dev))
        features = torch.arange(state.F, device=dev)[:, None]
        state.rand_key = torch.where(state.rand_sample >= 0, random_key(state.seed, features, state.rand_sample.clamp_min(0)), NO_KEY)
        # (a checkpoint of an older mmsae kept its random examples in draw order; sort them by key)
        state.rand_key, order = state.rand_key.sort(dim=1)
        state.rand_sample, state.rand_score = state.rand_sample.gather(1, order), state.rand_score.gather(1, order)
        offsets = np.concatenate([[0], np.cumsum(t["map_len"].numpy())])
        values = t["map_values"].numpy()
        state.maps = {int(k): values[offsets[i]: offsets[i + 1]].copy() for i, k in enumerate(t["map_key"].tolist())}
        samples = json.loads(meta["samples"])
        lay_off = np.concatenate([[0], np.cumsum(t["lay_len"].numpy())])
        for i, s in enumerate(t["lay_sample"].tolist()):
            rec = samples[str(s)]
            lo, hi = lay_off[i], lay_off[i + 1]
            state.layouts[s] = TokenLayout(
                positions=t["lay_positions"][lo:hi], tile=t["lay_tile"][lo:hi], row=t["lay_row"][lo:hi], col=t["lay_col"][lo:hi],
                tiles=[Tile(tuple(box), r, c) for box, r, c in rec["layout"]["tiles"]],
                image_size=tuple(rec["layout"]["image_size"]) if rec["layout"]["image_size"] is not None else None)
            state.samples[s] = {k: v for k, v in rec.items() if k != "layout"}
        state.stats = ActivationStats.from_state(t, dev)
        state.next_id, state.skipped = int(meta["next_id"]), int(meta["skipped"])
        return state

    def token_rows(self, tokenizer) -> dict[int, list[dict]]:
        """Decode the top text tokens of every feature into ``{"token", "context", ...}`` rows."""
        out: dict[int, list[dict]] = {}
        sample, act, pos, ctx = (t.cpu() for t in (self.tok_sample, self.tok_act, self.tok_pos, self.tok_ctx))
        for f in torch.nonzero((sample >= 0).any(1), as_tuple=True)[0].tolist():
            rows = []
            for sid, a, p, ids in zip(sample[f].tolist(), act[f].tolist(), pos[f].tolist(), ctx[f].tolist()):
                if sid < 0:
                    continue
                before = tokenizer.decode([i for i in ids[: self.C] if i >= 0])
                token = tokenizer.decode([ids[self.C]])
                after = tokenizer.decode([i for i in ids[self.C + 1:] if i >= 0])
                rows.append({"token": token, "context": before + token + after, "before": before, "after": after,
                             "activation": float(a), "sample_id": int(sid), "position": int(p)})
            out[f] = rows
        return out
