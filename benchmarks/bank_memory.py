"""The bank's memory: measured on tiny models (generate_story's bank_nbytes) next to the formula
(sdlite.pipeline.estimate_story_bank), then the formula on SDXL / SD1.5 (sdlite.bank.estimate_bank_nbytes over the
self-attention layers of their UNet configs, built on the meta device: no weights). README's memory tables.

    python benchmarks/bank_memory.py      # prints both tables as markdown rows (about a minute on one CPU thread)
"""
from sdlite.quiet import quiet_libraries

quiet_libraries()  # no library warnings between the rows

import torch  # noqa: E402
from diffusers import UNet2DConditionModel
from sdlite.attention import csa_layer_names, layer_scale
from sdlite.bank import BankLayer, estimate_bank_nbytes
from sdlite.pipeline import CSAConfig, estimate_story_bank, generate_story, load_pipeline
from sdlite.story import parse_story
from sdlite.tiny import tiny_sd15_pipeline, tiny_sdxl_pipeline

story = parse_story("[A] a man\n[B] a woman\n" + "\n".join(["[A] walking", "[A] reading", "[B] singing", "[B] running",
                                                            "[A] sleeping", "[B] eating"]))
options = {"real default (2 refs, 20 of 35 steps)": CSAConfig(),
           "4 refs, every step": CSAConfig(id_length=4, bank_steps=None),
           "4 refs, every step, fp16 bank": CSAConfig(id_length=4, bank_steps=None, bank_dtype="float16"),
           "official demo (1 ref, every step)": CSAConfig.official(),
           "bank on CPU (real default)": CSAConfig(bank_device="cpu")}
torch.set_num_threads(1)
print("## tiny models, 64 px, 3 steps (steps scale the bank linearly), float32")
for name, build in (("tiny SDXL", tiny_sdxl_pipeline), ("tiny SD1.5", tiny_sd15_pipeline)):
    pipe = build()
    for label, csa in options.items():
        est = sum(estimate_story_bank(pipe, story, csa, steps=3, height=64, width=64).values())
        r = generate_story(pipe, story, csa=csa, steps=3, height=64, width=64, progress=False)
        print(f"| {name} | {label} | {r.bank_nbytes} | {est} |")

def real(config, size, refs, steps, bytes_per, vae=8):
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    layers = []
    for n in csa_layer_names(unet, "up"):
        s = layer_scale(unet, n, vae)
        layers.append(BankLayer(n, (size // s) ** 2, unet.get_submodule(n).to_q.in_features, 0.5))
    return estimate_bank_nbytes(layers, refs, steps, 2, bytes_per)

sdxl = dict(sample_size=128, in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
sd15 = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8,
            cross_attention_dim=768, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
print("## formula, rate 0.5, up-block layers, guidance (2 halves), per character, GB")
for name, cfg, size in (("SDXL", sdxl, 1024), ("SDXL", sdxl, 768), ("SD1.5", sd15, 512)):
    for label, refs, steps, b in (("4 refs, 35 steps, fp16", 4, 35, 2), ("2 refs, 20 steps, fp16 (real default)", 2, 20, 2),
                                  ("1 ref, 35 steps, fp16 (official demo)", 1, 35, 2), ("2 refs, 20 steps, fp32", 2, 20, 4),
                                  ("2 refs, 10 steps, fp16", 2, 10, 2)):
        print(f"| {name} {size} px | {label} | {real(cfg, size, refs, steps, b) / 1e9:.2f} |")
