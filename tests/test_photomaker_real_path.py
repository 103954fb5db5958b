"""PhotoMaker on a real-layout SDXL folder, loaded as a user with real weights loads it (sdlite.pipeline.load_pipeline):
a tiny random SDXL saved in the published diffusers layout, its tokenizers as vocab.json + merges.txt that do not know
the trigger word, its text encoders of exactly CLIP's 49408 tokens (issue #15, "The real PhotoMaker path, fixed").

1. the trigger word is registered for the ID path (on copies: the pipeline's tokenizers and its plain runs unchanged);
2. a checkpoint's `lora_weights` (PhotoMaker v1's key format) are fused into the UNet: W + up @ down, nothing else;
3. delayed conditioning: the text-only prompt and pooled embedding while step <= start_merge_step, then the ID
   prompt's fused tokens and its pooled embedding;
4. non-square ID photos are resized and centre-cropped as CLIPImageProcessor does, never squashed;
5. a v2 checkpoint is refused with the reason (face-recognition embeddings cannot be had offline).
"""
import numpy as np
import pytest
import torch
from transformers import CLIPImageProcessor

from sdlite.id_encoder import (
    IDEncoder,
    IDEncoderConfig,
    delayed_conditioning_schedule,
    fuse_photomaker_lora,
    id_pixel_values,
    load_photomaker_id_encoder,
    photomaker_tokenizers,
    save_photomaker_checkpoint,
    start_merge_step,
)
from sdlite.pipeline import CSAConfig, generate_story, load_pipeline
from sdlite.story import parse_story
from sdlite.tiny import tiny_sdxl_pipeline
from sdlite.tokenization import TRIGGER_WORD, encode_with_trigger_sdxl

STORY = "[Bob] a man img\n[Bob] reading a newspaper at home\n[Bob] riding a horse over the hills\n"
FAST = dict(height=64, width=64, progress=False, csa=CSAConfig(enabled=False))
RNG = np.random.default_rng(0)
FACE = RNG.integers(0, 256, (48, 32, 3), dtype=np.uint8)  # a portrait photo: taller than wide
FACE_2 = RNG.integers(0, 256, (32, 40, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("photomaker") / "sdxl"
    tiny_sdxl_pipeline(path, seed=0, real_tokenizer_files=True, real_vocab=True)
    return path


@pytest.fixture(scope="module")
def pipe(folder):
    return load_pipeline(folder)


def encoder(pipe, seed=0) -> IDEncoder:
    torch.manual_seed(seed)
    width = pipe.text_encoder.config.hidden_size  # both tiny encoders have this width (SDXL: 768 and 1280)
    return IDEncoder(IDEncoderConfig.tiny(width, pipe.text_encoder_2.config.hidden_size, image_size=32)).eval()


class UNetInputs:
    """Records the conditional half of what the UNet is given at every denoising step."""

    def __init__(self, unet):
        self.embeds, self.pooled = [], []
        self.handle = unet.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, _module, _args, kwargs):
        half = kwargs["encoder_hidden_states"].shape[0] // 2  # [negative, prompt] (guidance on)
        self.embeds.append(kwargs["encoder_hidden_states"][half:].clone())
        self.pooled.append(kwargs["added_cond_kwargs"]["text_embeds"][half:].clone())


def test_the_folder_does_not_know_the_trigger_word(pipe):
    assert TRIGGER_WORD not in pipe.tokenizer.get_added_vocab() and TRIGGER_WORD not in pipe.tokenizer_2.get_added_vocab()
    assert len(pipe.tokenizer) == pipe.text_encoder.config.vocab_size == 49408  # as SDXL: no row for the trigger
    assert pipe.text_encoder_2.config.vocab_size == 49408


def test_the_id_path_registers_the_trigger_word_and_leaves_plain_runs_alone(pipe):
    story = parse_story(STORY)
    before = generate_story(pipe, story, steps=2, **FAST).arrays()
    with_id = generate_story(pipe, story, steps=2, id_images={"Bob": [FACE]}, id_encoder=encoder(pipe), **FAST)
    assert len(with_id.images) == 2
    # the pipeline's own tokenizers are untouched: a plain run after the ID run is the same as before it
    assert TRIGGER_WORD not in pipe.tokenizer.get_added_vocab() and len(pipe.tokenizer) == 49408
    np.testing.assert_array_equal(generate_story(pipe, story, steps=2, **FAST).arrays(), before)
    tok1, tok2 = photomaker_tokenizers(pipe)
    assert tok1.tokenize("a man img") == ["a</w>", "man</w>", "img"] and TRIGGER_WORD in tok2.get_added_vocab()
    assert photomaker_tokenizers(pipe)[0] is tok1  # registered once per tokenizer
    # the trigger never reaches the 49408-token text encoders: no embedding row needed for it
    e1, e2 = encode_with_trigger_sdxl((tok1, tok2), story.panels[0].id_prompt)
    assert int(e1.input_ids.max()) < 49408 and int(e2.input_ids.max()) < 49408


def tiny_photomaker_lora(unet, rank=2, seed=0) -> dict:
    """A LoRA for `unet` in PhotoMaker v1's key format (diffusers' old attention-processor format, as in
    photomaker-v1.bin): unet.<attention>.processor.to_{q,k,v,out}_lora.{down,up}.weight on every attention."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in unet.named_modules():
        if not name.endswith(("attn1", "attn2")):
            continue
        for proj, linear in (("to_q", module.to_q), ("to_k", module.to_k), ("to_v", module.to_v),
                             ("to_out", module.to_out[0])):
            state[f"unet.{name}.processor.{proj}_lora.down.weight"] = torch.randn(rank, linear.in_features, generator=g)
            state[f"unet.{name}.processor.{proj}_lora.up.weight"] = torch.randn(linear.out_features, rank, generator=g)
    return state


def test_the_checkpoints_lora_is_fused_into_the_unet(folder, tmp_path):
    pipe = load_pipeline(folder)  # its own pipeline: fusing changes the UNet for good
    lora = tiny_photomaker_lora(pipe.unet)
    path = save_photomaker_checkpoint(encoder(pipe), tmp_path / "photomaker-tiny.bin", lora_weights=lora)
    enc = load_photomaker_id_encoder(path, encoder(pipe).config).eval()
    assert set(enc.lora_weights) == set(lora)  # kept, not dropped
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    story = parse_story(STORY)
    generate_story(pipe, story, steps=2, id_images={"Bob": [FACE]}, id_encoder=enc, **FAST)
    after = pipe.unet.state_dict()
    assert set(after) == set(before)  # plain layers again (the LoRA unloaded after fusing)
    expected = dict(before)
    for key, down in lora.items():
        if key.endswith(".down.weight"):
            module, proj = key[len("unet."):].split(".processor.")
            proj = proj.split("_lora.")[0]
            weight = f"{module}.{'to_out.0' if proj == 'to_out' else proj}.weight"
            expected[weight] = before[weight] + lora[key.replace(".down.", ".up.")] @ down
    changed = [k for k in before if not torch.equal(before[k], expected[k])]
    assert len(changed) == len(lora) // 2 > 0
    for k in before:
        torch.testing.assert_close(after[k], expected[k], rtol=1e-5, atol=1e-5)
    # the same LoRA again is not fused twice; another one is refused
    generate_story(pipe, story, steps=2, id_images={"Bob": [FACE]}, id_encoder=enc, **FAST)
    torch.testing.assert_close(pipe.unet.state_dict(), after, rtol=0, atol=0)
    with pytest.raises(ValueError, match="another PhotoMaker LoRA fused into it already"):
        fuse_photomaker_lora(pipe, tiny_photomaker_lora(pipe.unet, seed=1))
    # saving the loaded encoder keeps its LoRA
    again = load_photomaker_id_encoder(save_photomaker_checkpoint(enc, tmp_path / "again.bin"), enc.config)
    assert all(torch.equal(again.lora_weights[k], lora[k]) for k in lora)


def test_a_lora_diffusers_cannot_read_is_refused(pipe):
    with pytest.raises(ValueError, match="no UNet LoRA that diffusers can read"):
        fuse_photomaker_lora(pipe, {"something.else.weight": torch.zeros(2, 2)})
    assert getattr(pipe.unet, "photomaker_lora", None) is None


@pytest.mark.parametrize("steps, ratio", [(4, 50), (3, 0)])
def test_delayed_conditioning_switches_after_start_merge_step_with_the_pooled_embedding(pipe, steps, ratio):
    story = parse_story(STORY)
    enc = encoder(pipe)
    recorder = UNetInputs(pipe.unet)
    try:  # two photos: the ID prompt repeats the class token twice, so its pooled embedding is not the text-only one
        generate_story(pipe, story, steps=steps, id_images={"Bob": [FACE, FACE_2]}, id_encoder=enc,
                       style_strength_ratio=ratio, **FAST)
    finally:
        recorder.handle.remove()
    merge = start_merge_step(steps, ratio)
    assert len(recorder.embeds) == steps
    # what each panel's text-only and ID prompts are, through the public pieces
    text, _, text_pooled, _ = pipe.encode_prompt([p.prompt for p in story.panels], device="cpu",
                                                 num_images_per_prompt=1, do_classifier_free_guidance=True,
                                                 negative_prompt=None)
    tokenizers = photomaker_tokenizers(pipe)
    fused, id_pooled = [], []
    with torch.no_grad():
        for p in story.panels:
            e1, e2 = encode_with_trigger_sdxl(tokenizers, p.id_prompt, num_id_images=2)
            h1 = pipe.text_encoder(e1.input_ids[None], output_hidden_states=True).hidden_states[-2]
            out2 = pipe.text_encoder_2(e2.input_ids[None], output_hidden_states=True)
            pix = id_pixel_values([FACE, FACE_2], 32)[None]
            fused.append(enc(pix, torch.cat([h1, out2.hidden_states[-2]], -1), e1.class_tokens_mask[None])[0])
            id_pooled.append(out2.text_embeds[0])
    fused, id_pooled = torch.stack(fused), torch.stack(id_pooled)
    assert not torch.allclose(fused, text) and not torch.allclose(id_pooled, text_pooled)
    for step, uses_id in enumerate(delayed_conditioning_schedule(steps, merge)):
        assert uses_id == (step > merge)
        want, want_pooled = (fused, id_pooled) if uses_id else (text, text_pooled)
        torch.testing.assert_close(recorder.embeds[step], want, msg=f"prompt embeddings at step {step}")
        torch.testing.assert_close(recorder.pooled[step], want_pooled, msg=f"pooled embedding at step {step}")
    assert sum(delayed_conditioning_schedule(steps, merge)) == steps - merge - 1  # the ID prompt was used


def test_non_square_id_photos_are_resized_and_centre_cropped_like_clip(pipe):
    reference = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    for shape in [(48, 32, 3), (32, 80, 3), (37, 37, 3), (200, 61, 3)]:
        photo = RNG.integers(0, 256, shape, dtype=np.uint8)
        want = torch.as_tensor(np.asarray(reference(photo, return_tensors="np").pixel_values))
        torch.testing.assert_close(id_pixel_values([photo], 32), want, rtol=0, atol=1e-5)
    # a tall photo: green in its centre square, red bands above and below: the crop keeps only green
    tall = np.zeros((96, 48, 3), np.uint8)
    tall[:, :, 1] = 200
    tall[:20, :, 0] = tall[-20:, :, 0] = 255
    x = id_pixel_values([tall], 32)[0]
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    rgb = x.permute(1, 2, 0) * std + mean
    assert float(rgb[..., 0].max()) < 1e-4 and float(rgb[..., 1].min()) > 0.78
    # generate_story feeds the ID encoder exactly this
    enc = encoder(pipe)
    seen = []
    hook = enc.vision_model.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["pixel_values"].clone()),
                                                      with_kwargs=True)
    try:
        generate_story(pipe, parse_story(STORY), steps=2, id_images={"Bob": [tall]}, id_encoder=enc, **FAST)
    finally:
        hook.remove()
    assert seen and all(torch.equal(s, x[None]) for s in seen)


def test_bad_id_photos_say_what_to_pass():
    with pytest.raises(ValueError, match="non-empty list of ID photos"):
        id_pixel_values([], 32)
    with pytest.raises(ValueError, match="size=0 must be a positive int"):
        id_pixel_values([FACE], 0)


def test_a_v2_checkpoint_is_refused_with_the_reason():
    state = IDEncoder(IDEncoderConfig.tiny()).state_dict()
    state["qformer_perceiver.token_proj.0.weight"] = torch.zeros(4, 4)
    with pytest.raises(ValueError, match="PhotoMaker v2.*face-recognition.*offline.*photomaker-v1.bin"):
        load_photomaker_id_encoder({"id_encoder": state, "lora_weights": {}}, IDEncoderConfig.tiny())
    with pytest.raises(ValueError, match="lora_weights must be a dict of name -> tensor"):
        load_photomaker_id_encoder({"id_encoder": IDEncoder(IDEncoderConfig.tiny()).state_dict(),
                                    "lora_weights": {"a": 1}}, IDEncoderConfig.tiny())


def test_story_ref_runs_on_a_real_layout_sdxl_folder_with_photomaker_path(folder, tmp_path, capsys, monkeypatch):
    """`sdlite story --ref NAME=IMAGE --photomaker PATH` on the real-layout folder: the trigger registered, the
    encoder's LoRA fused, panels written; without --photomaker a real model is refused before it loads. (PATH is an
    ID encoder folder here: a real photomaker-v1.bin holds a 300 M-parameter ViT-L tower, too large for a test.)"""
    from PIL import Image

    from sdlite.cli import main
    from sdlite.id_encoder import save_id_encoder

    enc = encoder(load_pipeline(folder))
    enc.lora_weights = tiny_photomaker_lora(load_pipeline(folder).unet)
    save_id_encoder(enc, tmp_path / "photomaker")
    Image.fromarray(FACE).save(tmp_path / "bob.png")
    (tmp_path / "s.txt").write_text(STORY)
    common = ["story", str(tmp_path / "s.txt"), "--model", str(folder), "--ref", f"Bob={tmp_path / 'bob.png'}",
              "--size", "64", "--steps", "2", "--no-csa", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "a" / "page.png")]) == 2
    assert "--photomaker PATH" in capsys.readouterr().err and not (tmp_path / "a").exists()
    import sdlite.pipeline

    seen, generate = [], sdlite.pipeline.generate_story

    def spy(*args, **kwargs):
        seen.append(kwargs.get("candidates"))
        return generate(*args, **kwargs)

    monkeypatch.setattr(sdlite.pipeline, "generate_story", spy)
    assert main([*common, "--photomaker", str(tmp_path / "photomaker"), "--out", str(tmp_path / "b" / "page.png")]) == 0
    assert sorted(p.name for p in (tmp_path / "b" / "page_panels").iterdir()) == ["panel_01.png", "panel_02.png"]
    assert seen == [1]  # one draw per panel on a real model unless asked: each draw is a full SDXL sampling
    assert main([*common, "--photomaker", str(tmp_path / "photomaker"), "--candidates", "2",
                 "--out", str(tmp_path / "c" / "page.png")]) == 0
    assert seen[1] == 2 and len(seen) == 1 + 1 + 2  # the call, then its two draws
    assert (tmp_path / "c" / "page_panels" / "panel_02.png").is_file()
