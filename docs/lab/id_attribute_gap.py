"""Which identity attributes does an ID encoder pass on? The ID encoder's training loss on held-out pairs, with the
target's own reference and with a reference that differs in ONE attribute (shirt, hair, trousers or hat): an
attribute the encoder + UNet use makes the loss rise when it is wrong; one they ignore leaves it unchanged.

    python docs/lab/id_attribute_gap.py data/storyworld/id_encoder results/id_attribute_gap.json

Measured at timesteps drawn from [100, 900) and from the noisiest ones, [850, 999) (fixed noise, 24 pairs x 4
timesteps, character-weighted epsilon MSE without the min-SNR or noise weights). With the first recipe (plain
min-SNR loss) shirt and trousers did not move the loss at all: see docs/storyworld-recipe.md, "The ID encoder".
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sdlite.id_encoder import encode_id_prompts, fuse_id_embeddings, fuse_photomaker_lora, load_id_encoder
from sdlite.images import to_tensor
from sdlite.pipeline import load_pipeline
from sdlite.storyworld import world as sw
from sdlite.storyworld.datasets import IDPairDataset, character_mask, id_caption
from sdlite.train.storyworld import TrainConfig
from sdlite.train.unet import UnetTrainer

VALUES = {"shirt": sw.SHIRT_COLOURS, "hair": sw.HAIR_COLOURS, "trousers": sw.TROUSERS_COLOURS, "hat": sw.HATS}


@torch.no_grad()
def attribute_gaps(encoder, pairs: int = 24, t_range=(100, 900)) -> dict[str, float]:
    pipe = load_pipeline("storyworld")
    fuse_photomaker_lora(pipe, encoder.lora_weights)
    trainer = UnetTrainer(pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer, pipe.tokenizer_2,
                          TrainConfig(steps=1, batch_size=1, lr=1.0, character_weight=4.0, min_snr_gamma=1e9), "cpu")
    ds = IDPairDataset(pairs, 1, seed=5, held_out=True)
    out = {}
    for attr in ("none", *VALUES):
        losses = []
        for i in range(pairs):
            refs, target = ds.panels(i)
            ch = target.character
            if attr != "none":
                vals = VALUES[attr]
                ch = dataclasses.replace(ch, **{attr: vals[(vals.index(getattr(ch, attr)) + 1) % len(vals)]})
            reference = sw.render(dataclasses.replace(refs[0], character=ch))
            text, pooled, mask = encode_id_prompts(pipe.text_encoder, pipe.text_encoder_2,
                                                   (pipe.tokenizer, pipe.tokenizer_2), [id_caption(target)], 1)
            fused = fuse_id_embeddings(text, encoder.id_embeddings(encoder.pixel_values([reference])[None]), mask,
                                       encoder.fuse_module)
            latent = pipe.vae.encode(to_tensor(sw.render(target))[None]).latent_dist.mean * pipe.vae.config.scaling_factor
            g = torch.Generator().manual_seed(i)
            t = torch.randint(*t_range, (4,), generator=g)
            noise = torch.randn((4, *latent.shape[1:]), generator=g)
            time_ids = torch.tensor([[64, 64, 0, 0, 64, 64]], dtype=torch.float32).repeat(4, 1)
            masks = character_mask(target)[None].repeat(4, 1, 1)
            losses.append(float(trainer.loss(pipe.unet, latent.repeat(4, 1, 1, 1), fused.repeat(4, 1, 1),
                                              pooled.repeat(4, 1), time_ids, masks, g, t, noise)))
        out[attr] = float(np.mean(losses))
    return {"own_reference": round(out["none"], 6),
            **{f"{a}_changed": round(out[a] / out["none"], 4) for a in VALUES}}


if __name__ == "__main__":
    torch.set_num_threads(1)
    folder, dest = Path(sys.argv[1]), Path(sys.argv[2])
    t0 = time.time()
    encoder = load_id_encoder(folder).eval()
    result = {"encoder": str(folder), "pairs": 24,
              "note": "loss with the own reference, and the ratio loss(one attribute changed) / loss(own)",
              "timesteps_100_900": attribute_gaps(encoder), "timesteps_850_999": attribute_gaps(encoder, t_range=(850, 999)),
              "command": f"python docs/lab/id_attribute_gap.py {' '.join(sys.argv[1:])}"}
    result["seconds"] = round(time.time() - t0, 1)
    dest.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
