"""Does the video decoder use the frame embeddings when the grid cells also reach it *spatially*? (README, transitions)

The decoder shipped until session 3 read each frame's embedding only as tokens joined to the text in
cross-attention, and its output did not change even with the true embeddings. This lab run (session 3) also turned
the 4 x 4 cell tokens of each frame (`ImageEmbedder(grid=4)`, projected as the decoder projects them) into a
4-channel map (1x1 conv), upsampled to the latent grid and concatenated to the UNet's input (extra input channels
start at zero: the variant starts as the plain decoder). It was a subclass here; it is now the decoder's
`spatial_channels` option (same initialisation, same weights: the step-2000 weights load into
`build_decoder(..., image_grid=4, spatial_channels=4)` unchanged), and the shipped decoder uses it. Trained like the
grid-4 decoder and scored on the same held-out clips, with the true embeddings as a ceiling.

    python docs/lab/spatial_decoder.py runs/motion/train_grid4 runs/motion/export_grid4 results/motion_spatial_grid4.json
    # optional 4th and 5th arguments: training steps (2000) and a file to save the trained weights to
"""
import json
import sys
import time

import torch

from sdlite import video
from sdlite.eval import transitions
from sdlite.train import video as train_video
from sdlite.train.motion import load_cache

torch.set_num_threads(1)
cache_dir, motion_dir, out = sys.argv[1:4]
steps = int(sys.argv[4]) if len(sys.argv) > 4 else 2000
save_to = sys.argv[5] if len(sys.argv) > 5 else None
CHANNELS = 4
t0 = time.time()
models = video.load_video_models(motion_folder=motion_dir)
cache = load_cache(cache_dir)
assert cache["grid"] == models.decoder.config.image_grid == 4
caps = cache["captions"]
text = torch.cat([video.encode_prompts(models, caps[i : i + 256]) for i in range(0, len(caps), 256)])
empty = video.encode_prompts(models, [""])
dec = video.build_decoder("base", image_embed_dim=cache["embeds"].shape[-1], cross_attention_dim=text.shape[-1],
                          sample_size=cache["latents"].shape[-1], seed=0, image_grid=4, spatial_channels=CHANNELS)
cfg = train_video.DecoderTrainConfig(steps=steps, batch_size=4, seed=0)
dec, hist = train_video.train_decoder({"latents": cache["latents"], "embeds": cache["embeds"]}, text, empty, dec,
                                models.scheduler, cfg, progress=True)
models.decoder = dec.eval()
if save_to:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in dec.state_dict().items()}, save_to)
res = transitions.evaluate(models, 100, steps=8, methods=("no_predictor", "temporal_only", "full", "true_embeddings"),
                     recognizer=None, progress=True)
summary = {"command": "python docs/lab/spatial_decoder.py " + " ".join(sys.argv[1:]), "train_steps": steps,
           "psnr": {m: r["psnr"] for m, r in res["per_method"].items()},
           "per_kind_psnr": res["per_kind_psnr"], "final_loss": hist["loss"][-1],
           "seconds": round(time.time() - t0, 1)}
with open(out, "w") as f:
    json.dump(summary, f, indent=1)
print(json.dumps(summary["psnr"], indent=1))
