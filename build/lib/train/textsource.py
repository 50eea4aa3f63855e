"""Caption -> T5 states for the trainer and the sampler: the embedding cache first, else the encoder."""
from __future__ import annotations

import torch

from pipeline.contract import cli


class TextSource:
    """Caption -> T5 states: the cache first (model.text.TextEmbeddingCache), else the T5 encoder."""

    def __init__(self, cache: str | None, encoder: str | None, max_length: int, device: str = "cpu"):
        from model.text import T5TextEncoder, TextEmbeddingCache
        if not cache and not encoder:
            raise cli.BadInput("no text source: set data.text_cache (python -m model.text build ...) or "
                               "data.text_encoder (a local T5 folder; python -m model.text tiny DIR for tests)")
        self.cache = TextEmbeddingCache(cache) if cache else None
        self.encoder = T5TextEncoder(encoder, max_length=max_length, device=device) if encoder else None
        self.memo: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def embed(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (B, L, D) float, (B, L) bool."""
        todo = [c for c in dict.fromkeys(captions) if c not in self.memo]
        if todo and self.cache is not None and (self.encoder is None or all(c in self.cache for c in todo)):
            for c in todo:
                self.memo[c] = self.cache.get(c)
        elif todo:
            emb, mask = self.encoder.encode(todo)
            for c, e, m in zip(todo, emb.cpu(), mask.cpu()):
                self.memo[c] = (e, m)
        embs, masks = zip(*(self.memo[c] for c in captions))
        return torch.stack(embs), torch.stack(masks)
