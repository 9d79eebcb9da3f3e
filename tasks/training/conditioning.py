"""Text conditioning per batch: from the trained encoders each step, or from cached embeddings when frozen."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from tasks.sd import text
from tasks.training.job import TrainJob


class Conditioner:
    """The prompts of a batch as the UNet's conditioning; every prompt is tokenized (or loaded) once."""

    def __init__(self, job: TrainJob, encoders: list[torch.nn.Module] | None, device: torch.device) -> None:
        self.family, self.encoders = job.family, encoders
        prompts = job.prompts()
        if encoders is None:
            cached = {p: {name: t.to(device) for name, t in load_file(job.text_embeds[p]).items()} for p in prompts}
            self.cached = {p: text.Conditioning(t["hidden"], t.get("pooled")) for p, t in cached.items()}
        else:
            tokenizers = text.load_tokenizers(job.base, job.family)
            self.ids = {p: text.tokenize(tokenizers, p) for p in prompts}

    def __call__(self, prompts: list[str]) -> text.Conditioning:
        if self.encoders is None:
            parts = [self.cached[p] for p in prompts]
            pooled = None if parts[0].pooled is None else torch.cat([c.pooled for c in parts])
            return text.Conditioning(torch.cat([c.hidden for c in parts]), pooled)
        ids = [torch.cat(per_encoder) for per_encoder in zip(*(self.ids[p] for p in prompts), strict=True)]
        return text.encode(self.family, self.encoders, ids)
