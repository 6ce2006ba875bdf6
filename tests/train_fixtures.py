"""Shard sets for the training tests, written through the shards package (no backbone involved)."""

from __future__ import annotations

import numpy as np

from regionspot.shards.identity import run_identity
from regionspot.shards.location import Location
from regionspot.shards.schema import Sample
from regionspot.shards.writer import ShardSetWriter

GRID = 16  # cells of the synthetic image (a 4 x 4 patch grid); the CLIP map has 1 + GRID tokens
C, D, K = 32, 16, 4  # CLIP map width, embedding width, classes


def write_shardset(
    path, samples, text, fingerprint="fp", shard_size=20, clip_model="synthetic", storage="wds"
):
    """A shard set in the layout `regionspot extract` writes (through the same writer): shards, records,
    manifest, text embeddings."""
    first = samples[0]
    backbones = {
        "sam": {"model": "synthetic", "tokens": int(first.sam_tokens.shape[1])},
        "clip": {
            "model": clip_model,
            "image_size": 32,
            "width": int(first.clip_map.shape[1]),
            "embed_dim": int(text.shape[1]),
            "logit_scale": 100.0,
        },
        "fingerprint": fingerprint,
    }
    where = Location.parse(path)  # a directory, or a URL
    if where.is_local:
        where.local_path.mkdir(parents=True)  # a fresh directory: refuse to write over an earlier set
    writer = ShardSetWriter(where, storage)
    writer.claim(run_identity(dataset=where.name, sources={}, proposals={"source": "gt"}, backbones=backbones,
                              shard_size=shard_size, storage=storage))  # fmt: skip
    starts = range(0, len(samples), shard_size)
    for index, start in enumerate(starts):
        writer.write_shard(index, samples[start : start + shard_size])
    vocab = [{"id": k + 1, "name": f"c{k}", "synonyms": [], "frequency": "f"} for k in range(len(text))]
    writer.finish(len(starts), vocab, text, templates="synthetic")
    return path


class World:
    """The fixed 'backbones' of the synthetic task: a position code per cell in the CLIP map (as a real
    CLIP map carries its position embeddings), a prototype per class, and a SAM token per cell."""

    def __init__(self, seed=0, k=K, c=C, tokens=1):
        rng = np.random.default_rng(seed)
        self.k, self.c, self.tokens = k, c, tokens
        self.position = rng.normal(size=(GRID, c))
        self.prototype = rng.normal(size=(k, c))
        self.cell_token = rng.normal(size=(GRID, 256))

    def samples(self, n_images, seed, regions=4, shuffle_maps=False, empty_every=0, key_prefix=""):
        """Images whose regions' classes are what the map holds at the region's cell: the SAM token says
        only where, the map only what is where. shuffle_maps gives every image another image's map (the
        control: the class is no longer decidable). empty_every: every n-th image has no region."""
        rng = np.random.default_rng(seed)
        maps, out = [], []
        for i in range(n_images):
            classes = rng.integers(0, self.k, GRID)  # the class at every cell
            cells = self.position + self.prototype[classes] + 0.1 * rng.normal(size=(GRID, self.c))
            maps.append(
                np.concatenate([cells.mean(0, keepdims=True), cells]).astype(np.float16)
            )  # (1 + GRID, C)
            n = 0 if empty_every and i % empty_every == empty_every - 1 else regions
            where = rng.choice(GRID, n, replace=False)
            tokens = self.cell_token[where][:, None] + 0.1 * rng.normal(size=(n, self.tokens, 256))
            out.append(
                Sample(
                    key=f"{key_prefix}{i:05d}",
                    image_id=i,
                    file_name=f"{i}.jpg",
                    width=64,
                    height=64,
                    boxes=np.tile(np.array([0, 0, 16, 16], np.float32), (n, 1)),
                    labels=classes[where].astype(np.int32),
                    scores=np.ones(n, np.float32),
                    sam_tokens=tokens.astype(np.float16),
                    sam_iou=np.tile(np.linspace(0.9, 0.5, self.tokens), (n, 1)).astype(np.float16),
                    clip_map=maps[-1],
                )
            )
        if shuffle_maps:
            for s, j in zip(out, np.roll(np.arange(n_images), 1), strict=True):
                s.clip_map = maps[j]
        return out

    def text(self, d=D, seed=0):
        """K orthonormal class embeddings [K, D]."""
        q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, self.k)))
        return q.T.astype(np.float32)
