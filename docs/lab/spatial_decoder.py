"""Does the video decoder use the frame embeddings when the grid cells also reach it *spatially*? (README, transitions)

The shipped decoder reads each frame's embedding only as tokens joined to the text in cross-attention, and its
output does not change even with the true embeddings. This lab variant also turns the 4 x 4 cell tokens of each
frame (`ImageEmbedder(grid=4)`, projected as the decoder projects them) into a 4-channel map (1x1 conv), upsampled to
the latent grid and concatenated to the UNet's input (extra input channels start at zero: the variant starts as the
plain decoder). Trained like the grid-4 decoder and scored on the same held-out clips.

    python docs/lab/spatial_decoder.py runs/motion/train_grid4 runs/motion/export_grid4 results/motion_spatial_grid4.json
    # optional 4th and 5th arguments: training steps (2000) and a file to save the trained weights to
"""
import json
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from sdlite import video
from sdlite.motion import load_cache

torch.set_num_threads(1)
cache_dir, motion_dir, out = sys.argv[1:4]
steps = int(sys.argv[4]) if len(sys.argv) > 4 else 2000
save_to = sys.argv[5] if len(sys.argv) > 5 else None
CHANNELS = 4


class SpatialGridDecoder(video.VideoDecoder):
    """VideoDecoder + the cell tokens as an input map (B, L, 4, h, w) next to the noisy and keyframe latents."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        g, d = self.config.image_grid, self.unet.config.cross_attention_dim
        self.cell_map = nn.Conv2d(d, CHANNELS, 1)
        old = self.unet.conv_in
        new = nn.Conv2d(old.in_channels + CHANNELS, old.out_channels, old.kernel_size, padding=old.padding)
        with torch.no_grad():
            new.weight.zero_()
            new.weight[:, : old.in_channels] = old.weight
            new.bias.copy_(old.bias)
        self.unet.conv_in = new
        self.grid = g

    def forward(self, noisy, timestep, start, end, encoder_hidden_states):
        b, frames, c, h, w = noisy.shape
        g = self.grid
        cells = encoder_hidden_states[:, -g * g :]  # (B*L, g*g, D): the frame's cell tokens (or null tokens)
        maps = self.cell_map(cells.transpose(1, 2).reshape(b * frames, -1, g, g))  # (B*L, 4, g, g)
        maps = F.interpolate(maps, size=(h, w), mode="nearest").view(b, frames, CHANNELS, h, w)
        keys = torch.cat([start, end], dim=1).unsqueeze(1).expand(b, frames, 2 * c, h, w)
        x = torch.cat([noisy, keys, maps], dim=2).permute(0, 2, 1, 3, 4)  # (B, 3C + 4, L, h, w)
        return self.unet(x.to(self.dtype), timestep, encoder_hidden_states).sample.permute(0, 2, 1, 3, 4)


t0 = time.time()
models = video.load_video_models(motion_folder=motion_dir)
cache = load_cache(cache_dir)
assert cache["grid"] == models.decoder.config.image_grid == 4
caps = cache["captions"]
text = torch.cat([video.encode_prompts(models, caps[i : i + 256]) for i in range(0, len(caps), 256)])
empty = video.encode_prompts(models, [""])
base = video.build_decoder("base", image_embed_dim=cache["embeds"].shape[-1], cross_attention_dim=text.shape[-1],
                           sample_size=cache["latents"].shape[-1], seed=0, image_grid=4)
with torch.random.fork_rng(devices=[]):
    torch.manual_seed(0)  # as build_decoder seeds the grid-4 decoder
    dec = SpatialGridDecoder(**{k: v for k, v in base.config.items() if not k.startswith("_")})
cfg = video.DecoderTrainConfig(steps=steps, batch_size=4, seed=0)
dec, hist = video.train_decoder({"latents": cache["latents"], "embeds": cache["embeds"]}, text, empty, dec,
                                models.scheduler, cfg, progress=True)
models.decoder = dec.eval()
if save_to:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in dec.state_dict().items()}, save_to)
res = video.evaluate(models, 100, steps=8, methods=("no_predictor", "temporal_only", "full", "true_embeddings"),
                     recognizer=None, progress=True)
summary = {"command": "python docs/lab/spatial_decoder.py " + " ".join(sys.argv[1:]), "train_steps": steps,
           "psnr": {m: r["psnr"] for m, r in res["per_method"].items()},
           "per_kind_psnr": res["per_kind_psnr"], "final_loss": hist["loss"][-1],
           "seconds": round(time.time() - t0, 1)}
with open(out, "w") as f:
    json.dump(summary, f, indent=1)
print(json.dumps(summary["psnr"], indent=1))
