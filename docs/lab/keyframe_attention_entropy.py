"""Does the decoder's self-attention fetch anything? (issue #14: keyframe-reading attention, notebook 06 section 5)

For each spatial self-attention layer of a decoder with keyframe reading, at three noise levels, on held-out clips:
the share of attention each frame gives to its own tokens, the first keyframe's and the last keyframe's, and the
normalised entropy of its attention rows (1 = uniform over all 3N keys: the layer averages; near 0 = each query
reads a few keys: the layer fetches).

    python docs/lab/keyframe_attention_entropy.py results/keyframe_attention_entropy.json [n clips (8)] [decoder]
"""
import json
import math
import sys

import torch

from sdlite import storyworld as sw
from sdlite import video
from sdlite.eval import transitions
from sdlite.keyframe_attention import keyframe_tokens, spatial_self_attention_names


def layer_stats(attn, x: torch.Tensor, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B*L, N, C) entering a layer -> (entropy / log(3N) per row, mean share on own / first / last keys (3,))."""
    q, k = attn.to_q(x), keyframe_tokens(attn.to_k(x), frames)  # (B*L, N, C), (B*L, 3N, C)
    n, h = x.shape[1], attn.heads
    d = q.shape[-1] // h
    w = torch.softmax(q.view(-1, n, h, d).transpose(1, 2) @ k.view(-1, 3 * n, h, d).permute(0, 2, 3, 1) / d**0.5, -1)
    entropy = -(w * w.clamp_min(1e-12).log()).sum(-1) / math.log(3 * n)  # (B*L, h, N)
    return entropy.mean(), w.mean((0, 1, 2)).view(3, n).sum(-1)


@torch.no_grad()
def main(out: str, n_clips: int = 8, folder: str | None = None) -> dict:
    torch.set_num_threads(1)
    models = video.load_video_models()
    dec = video.VideoDecoder.storyworld(folder) if folder else models.decoder
    if not dec.config.keyframe_attention:
        raise SystemExit(f"{folder or 'the shipped decoder'} does not read the keyframes (keyframe_attention=False)")
    clips = sw.ClipDataset(n_clips, frames=16, seed=transitions.EVAL_SEED)
    frames = 16
    seen = {}
    for name in spatial_self_attention_names(dec.unet):
        module = dec.unet.get_submodule(name.rsplit(".processor", 1)[0])
        module.register_forward_hook(lambda m, a, kw, o, n=name: seen.__setitem__(n, (m, a[0])), with_kwargs=True)
    rows: dict[str, dict] = {}
    g = torch.Generator().manual_seed(0)
    for i in range(n_clips):
        item = clips[i]
        x = item["frames"]  # (L, 3, H, W)
        z0, z1 = video.encode_latents(models.vae, x[:1]), video.encode_latents(models.vae, x[-1:])
        e = models.embedder(torch.cat([x[:1], x[-1:]]))
        ehs = dec.condition(video.encode_prompts(models, [item["caption"]]), models.predictor(e[:1], e[1:], frames),
                            frames)
        for t in (900, 500, 100):
            dec(torch.randn(1, frames, 4, 16, 16, generator=g), t, z0, z1, ehs)
            for name, (m, h) in seen.items():
                ent, share = layer_stats(m, h, frames)
                r = rows.setdefault(f"{name.split('.transformer_blocks')[0]} t={t}", {"entropy": [], "share": []})
                r["entropy"].append(float(ent))
                r["share"].append(share.tolist())
    table = {k: {"normalised_entropy": sum(v["entropy"]) / len(v["entropy"]),
                 "share_own_first_last": [sum(s[j] for s in v["share"]) / len(v["share"]) for j in range(3)]}
             for k, v in rows.items()}
    result = {"command": "python docs/lab/keyframe_attention_entropy.py " + " ".join(sys.argv[1:]),
              "n_clips": n_clips, "decoder": folder or "data/motion/decoder", "rows": table}
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    for k, v in table.items():
        print(f"{k:40s} entropy {v['normalised_entropy']:.3f}  own/first/last "
              + " ".join(f"{s:.3f}" for s in v["share_own_first_last"]))
    return result


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 8, sys.argv[3] if len(sys.argv) > 3 else None)
