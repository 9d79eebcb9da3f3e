"""The latent cache as the child reads it: every sample's distribution in memory, one latent drawn per use."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file

from tasks.core.seeds import generator
from tasks.sd.latent_dist import read_sizes, sample_latent, scale_latent


class LatentData:
    """Cached latent distributions by sample id; draws a latent (and SDXL time ids) per sample and step."""

    def __init__(self, folder: Path) -> None:
        index = pd.read_csv(folder / "index.csv", dtype=str)
        vae = json.loads((folder / "vae.json").read_text())
        self.scaling, self.shift, self.flip = vae["scaling_factor"], vae["shift_factor"], vae["flip"]
        self.tensors = {row.id: load_file(folder / row.file) for row in index.itertuples()}
        self.time_ids = {
            (row.id, suffix): self._time_ids(folder / row.file, suffix)
            for row in index.itertuples()
            for suffix in ("", "_flipped")
        }
        self.ids = {kind: sorted(index[index.kind == kind].id) for kind in ("instance", "class")}

    @staticmethod
    def _time_ids(path: Path, suffix: str) -> torch.Tensor:
        """SDXL's micro-conditioning: (original h, w, crop top, left, target h, w); the crop corner of a
        mirrored image is measured in the mirrored frame."""
        meta = read_sizes(path)
        width, height = (int(v) for v in meta.get("original_size", "0,0").split(","))
        top, left = (int(v) for v in meta.get(f"crop_top_left{suffix}", meta.get("crop_top_left", "0,0")).split(","))
        target_w, target_h = (int(v) for v in meta.get("target_size", "0,0").split(","))
        return torch.tensor([[height, width, top, left, target_h, target_w]], dtype=torch.float32)

    def pick(self, kind: str, position: int, seed: int) -> str:
        """The sample at `position` of an endless sequence of seeded shuffles (one shuffle per epoch)."""
        ids = self.ids[kind]
        epoch, offset = divmod(position, len(ids))
        order = torch.randperm(len(ids), generator=generator(seed, "order", kind, epoch))
        return ids[int(order[offset])]

    def draw(self, sample_id: str, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        item = self.tensors[sample_id]
        suffix = "_flipped" if self.flip and torch.rand((), generator=rng) < 0.5 else ""
        z = sample_latent(item[f"mean{suffix}"][None], item[f"logvar{suffix}"][None], rng)
        return scale_latent(z, self.scaling, self.shift), self.time_ids[sample_id, suffix]
