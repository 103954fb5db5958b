"""The real-model path as a user with real weights runs it: `sdlite story --model FOLDER` on tiny random SDXL and
SD1.5 pipelines saved in the published diffusers layout (model_index.json, one folder per component, tokenizers as
vocab.json + merges.txt), through the command line's own entry point."""
import json

import numpy as np
import pytest
from PIL import Image

from sdlite.cli import main
from sdlite.tiny import tiny_sd15_pipeline, tiny_sdxl_pipeline

STORY = ("[Bob] a man in a black suit\n"
         "[Bob] reading a newspaper at home # Morning.\n"
         "[Bob] riding a horse over the hills # Noon.\n"
         "[NC] a quiet street at night # Night.\n")
FAST = ["--size", "64", "--steps", "2", "--quiet", "--id-length", "1"]


@pytest.fixture(scope="module", params=["sdxl", "sd15"])
def folder(request, tmp_path_factory):
    """A pipeline folder as `huggingface-cli download` leaves it (no tokenizer.json)."""
    path = tmp_path_factory.mktemp(request.param) / "model"
    build = tiny_sdxl_pipeline if request.param == "sdxl" else tiny_sd15_pipeline
    build(path, seed=0, real_tokenizer_files=True)
    return path


@pytest.fixture(scope="module")
def story_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("story") / "bob.txt"
    path.write_text(STORY)
    return path


def _story(folder, story_file, out, *options):
    return main(["story", str(story_file), "--model", str(folder), "--out", str(out), *FAST, *options])


def _panels(out):
    return np.stack([np.asarray(Image.open(p)).astype(np.int16)
                     for p in sorted(out.parent.glob(out.stem + "_panels/panel_*.png"))])


def test_the_folder_has_the_published_layout(folder):
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] in ("StableDiffusionXLPipeline", "StableDiffusionPipeline")
    tokenizer_files = {p.name for p in (folder / "tokenizer").iterdir()}
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= tokenizer_files
    assert "tokenizer.json" not in tokenizer_files
    assert len(json.loads((folder / "tokenizer" / "vocab.json").read_text())) == 49408
    assert (index["_class_name"] == "StableDiffusionXLPipeline") == (folder / "text_encoder_2").is_dir()


def test_story_with_and_without_csa(folder, story_file, tmp_path, capsys):
    on, off = tmp_path / "on.png", tmp_path / "off.png"
    assert _story(folder, story_file, on) == 0, capsys.readouterr().err
    assert _story(folder, story_file, off, "--no-csa") == 0, capsys.readouterr().err
    a, b = _panels(on), _panels(off)
    assert a.shape == b.shape == (3, 64, 64, 3)
    assert np.abs(a[1] - b[1]).max() > 0  # a read panel attends to the bank: it changes
    np.testing.assert_allclose(a[2], b[2], atol=2)  # [NC]: plain attention in both runs
    assert Image.open(on).format == "PNG"


def test_video_is_refused_on_a_real_model(folder, story_file, tmp_path, capsys):
    code = _story(folder, story_file, tmp_path / "v.png", "--video", str(tmp_path / "v.gif"))
    err = capsys.readouterr().err
    assert code == 2 and "--video works with --model storyworld only" in err
    assert not (tmp_path / "v.png").exists() and not (tmp_path / "v.gif").exists()


def test_official_sampling_and_the_official_preset(folder, story_file, tmp_path, capsys):
    exact, official = tmp_path / "exact.png", tmp_path / "official.png"
    assert _story(folder, story_file, exact, "--rate", "0.5") == 0
    assert _story(folder, story_file, official, "--rate", "0.5", "--sampling", "official") == 0
    assert np.abs(_panels(exact)[1] - _panels(official)[1]).max() > 0  # other tokens sampled
    preset = tmp_path / "preset.png"
    assert _story(folder, story_file, preset, "--preset", "official", "--rate-16", "0.7",
                  "--skip-schedule", "official", "--layers", "up") == 0
    printed = capsys.readouterr().out
    assert "CSA bank (expected size" in printed and "up to 1 reference panel(s)" in printed  # the preset's id_length 1
    again = tmp_path / "again.png"
    assert _story(folder, story_file, again, "--preset", "official", "--rate-16", "0.7") == 0
    np.testing.assert_array_equal(_panels(preset), _panels(again))  # seeded: the same story twice
    # the preset's size is 768 on real models; --size 64 (in FAST) wins, --height / --width too
    wide = tmp_path / "wide.png"
    assert _story(folder, story_file, wide, "--preset", "official", "--width", "96") == 0
    assert _panels(wide).shape == (3, 64, 96, 3)


def test_characters_saved_then_loaded_page_by_page(folder, story_file, tmp_path, capsys):
    chars = tmp_path / "chars"
    page1, page2 = tmp_path / "p1.png", tmp_path / "p2.png"
    assert _story(folder, story_file, page1, "--save-characters", str(chars)) == 0
    assert "characters: " in capsys.readouterr().out and (chars / "Bob.safetensors").is_file()
    page = tmp_path / "page2.txt"
    page.write_text("[Bob] a man in a black suit\n[Bob] sleeping in a hammock # Evening.\n")
    assert main(["story", str(page), "--model", str(folder), "--out", str(page2), *FAST, "--load-characters",
                 str(chars)]) == 0
    printed = capsys.readouterr().out
    assert "Bob " in printed and "(loaded)" in printed
    plain = tmp_path / "plain2.png"
    assert main(["story", str(page), "--model", str(folder), "--out", str(plain), *FAST, "--no-csa"]) == 0
    assert np.abs(_panels(page2) - _panels(plain)).max() > 0  # the loaded bank is read
    # a file made with other settings is refused before generating, in one line
    other = tmp_path / "p3.png"
    assert main(["story", str(page), "--model", str(folder), "--out", str(other), *FAST, "--steps", "3",
                 "--load-characters", str(chars)]) == 2
    assert "made with other settings: steps 2 in the file, 3 now" in capsys.readouterr().err
    assert not other.exists()
