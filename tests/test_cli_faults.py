"""The `sdlite` command as a careless user and a hostile file meet it: every expected failure is one line on stderr
and exit code 2, before any model loads where it can be, and leaves no new file behind; outputs appear whole or not
at all; nothing existing is overwritten without --force. Generation is replaced by a fast fake where the test is
about the command, not the model."""
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import sdlite.pipeline
from sdlite.cli import main

STORY = "[Lily] a girl\n[Lily] standing in the park # Hi.\n[Lily] walking in the city # Go.\n"


@pytest.fixture
def fake_model(monkeypatch):
    """load_pipeline and generate_story replaced: a panel is a 64x64 picture of its index. Records the calls."""
    calls = {"load": 0, "generate": 0}

    def load(model, device="cpu", dtype=None):
        calls["load"] += 1
        return object()

    def generate(pipe, story, **kw):
        calls["generate"] += 1
        return types.SimpleNamespace(images=[Image.new("RGB", (64, 64), (10 * i, 0, 0)) for i in range(len(story))])

    monkeypatch.setattr(sdlite.pipeline, "load_pipeline", load)
    monkeypatch.setattr(sdlite.pipeline, "generate_story", generate)
    return calls


def story_file(tmp_path, text=STORY, name="s.txt", encoding="utf-8"):
    path = tmp_path / name
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return path


def files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_a_good_run_writes_page_and_panels(tmp_path, fake_model, capsys):
    assert main(["story", str(story_file(tmp_path)), "--out", str(tmp_path / "o" / "page.png")]) == 0
    assert files(tmp_path / "o") == ["page.png", "page_panels", "page_panels/panel_01.png", "page_panels/panel_02.png"]


@pytest.mark.parametrize("options, message", [
    (["--columns", "0"], "--columns"), (["--panel-size", "8"], "--panel-size"), (["--size", "0"], "--size"),
    (["--size", "100"], "multiple of 8"), (["--guidance", "nan"], "--guidance"), (["--steps", "0"], "--steps"),
    (["--rate", "1.5"], "--rate"), (["--out", "x.jpg"], ".png"), (["--video", "v.avi"], ".mp4 or .gif"),
])
def test_bad_options_fail_before_the_model_loads_and_leave_nothing(tmp_path, fake_model, capsys, options, message):
    story = story_file(tmp_path)
    out = tmp_path / "o" / "page.png"
    args = ["story", str(story), "--out", str(out), *options]
    if "--out" in options:
        args = ["story", str(story), *options]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert fake_model["load"] == 0 and not (tmp_path / "o").exists()


def test_story_errors_name_the_file_and_line_and_leave_no_panel_folder(tmp_path, fake_model, capsys):
    out = tmp_path / "o" / "page.png"
    bad = story_file(tmp_path, b"[Lily] a girl\n[Lily] standing in the p\xe4rk # Hi.\n", "latin1.txt")
    assert main(["story", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "latin1.txt: line 2" in err and "UTF-8" in err
    long_caption = STORY + "[Lily] waving at night # " + "word " * 300_000 + "\n"
    assert main(["story", str(story_file(tmp_path, long_caption, "long.txt")), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "caption" in err and len(err) < 600  # the 1.5 MB line is not echoed back
    assert fake_model["load"] == 0 and not (tmp_path / "o").exists()


def test_a_story_saved_with_a_byte_order_mark_reads_and_line_numbers_ignore_unicode_breaks(tmp_path, fake_model):
    assert main(["story", str(story_file(tmp_path, "\ufeff" + STORY, "bom.txt")), "--out",
                 str(tmp_path / "a.png")]) == 0
    from sdlite.story import parse_story

    with pytest.raises(ValueError, match="line 3: unknown character"):
        parse_story("[Lily] a girl\u2028with a cap\n[Lily] standing in the park\n[Bob] waving\n")


def test_existing_outputs_are_refused_without_force_and_replaced_with_it(tmp_path, fake_model, capsys):
    story, out = story_file(tmp_path), tmp_path / "page.png"
    out.write_bytes(b"mine")
    assert main(["story", str(story), "--out", str(out)]) == 2 and "--force" in capsys.readouterr().err
    assert out.read_bytes() == b"mine" and not (tmp_path / "page_panels").exists() and fake_model["load"] == 0
    assert main(["story", str(story), "--out", str(out), "--force"]) == 0
    assert Image.open(out).size[0] > 64
    (tmp_path / "dir.png").mkdir()
    assert main(["story", str(story), "--out", str(tmp_path / "dir.png"), "--force"]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_a_file_created_during_generation_is_never_overwritten(tmp_path, monkeypatch, fake_model, capsys):
    out = tmp_path / "page.png"
    real = sdlite.pipeline.generate_story

    def generate_while_someone_writes(pipe, story, **kw):
        (tmp_path / "page_panels").mkdir()
        (tmp_path / "page_panels" / "panel_02.png").write_bytes(b"theirs")  # appears after the checks
        return real(pipe, story, **kw)

    monkeypatch.setattr(sdlite.pipeline, "generate_story", generate_while_someone_writes)
    assert main(["story", str(story_file(tmp_path)), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "page_panels" / "panel_02.png").read_bytes() == b"theirs"
    assert files(tmp_path) == ["page_panels", "page_panels/panel_02.png", "s.txt"]  # nothing of ours, no temps


def test_a_failure_while_writing_leaves_nothing_new(tmp_path, monkeypatch, fake_model, capsys):
    calls = {"n": 0}
    real_save = Image.Image.save

    def save_fails_on_the_second_panel(self, fp, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real_save(self, fp, *a, **kw)

    monkeypatch.setattr(Image.Image, "save", save_fails_on_the_second_panel)
    assert main(["story", str(story_file(tmp_path)), "--out", str(tmp_path / "o" / "page.png")]) == 2
    err = capsys.readouterr().err
    assert "No space left" in err and "--debug" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # no page, no panel, no empty folder, no temporary file


def test_debug_shows_the_traceback(tmp_path, fake_model, monkeypatch):
    monkeypatch.setattr(sdlite.pipeline, "generate_story", lambda *a, **k: 1 / 0)
    args = ["story", str(story_file(tmp_path)), "--out", str(tmp_path / "p.png")]
    assert main(args) == 2
    with pytest.raises(ZeroDivisionError):
        main([*args, "--debug"])


def test_a_real_run_shows_sdlites_own_output_and_nothing_from_the_libraries(tmp_path):
    """Finding 8: transformers' torchvision warnings and the libraries' "Loading weights" bars came before sdlite's
    own progress. The real command on storyworld, in its own process (where those libraries print)."""
    story = story_file(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "sdlite.cli", "story", str(story), "--out", str(tmp_path / "p.png"),
                          "--steps", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    shown = [line.strip() for line in run.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert shown and all(line.startswith("panels:") for line in shown), shown  # only the panels' progress bar
    assert [line.split(":")[0] for line in run.stdout.splitlines()] == ["CSA bank (size, on the model's device)",
                                                                        "page", "panels"]


def test_panel_names_sort_in_story_order(tmp_path, fake_model):
    lines = "[Lily] a girl\n" + "".join(f"[Lily] standing in the park # {i}\n" for i in range(101))
    assert main(["story", str(story_file(tmp_path, lines)), "--out", str(tmp_path / "p.png")]) == 0
    names = sorted(os.listdir(tmp_path / "p_panels"))
    assert names[0] == "panel_001.png" and names[-1] == "panel_101.png" and len(names) == 101


def test_a_mistyped_local_model_folder_never_reaches_the_hub(tmp_path, monkeypatch):
    from sdlite.pipeline import is_hub_id, load_pipeline

    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").mkdir()
    assert not is_hub_id("m/nope") and not is_hub_id("./x/y") and not is_hub_id("runs/a/export")
    assert is_hub_id("stabilityai/stable-diffusion-xl-base-1.0")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_pipeline("m/nope")


@pytest.mark.parametrize("content, message", [(b"not a picture", "not a readable picture"), (None, "is a folder")])
def test_video_keyframes_are_checked_before_any_model(tmp_path, capsys, content, message, monkeypatch):
    import sdlite.video

    monkeypatch.setattr(sdlite.video, "load_video_models", lambda *a, **k: pytest.fail("a model was loaded"))
    good = tmp_path / "a.png"
    Image.new("RGB", (64, 64)).save(good)
    bad = tmp_path / "b.png"
    if content is None:
        bad.mkdir()
    else:
        bad.write_bytes(content)
    assert main(["video", str(good), str(bad), "--out", str(tmp_path / "v.gif")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "v.gif").exists()
    truncated = tmp_path / "t.png"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:-40])
    assert main(["video", str(good), str(truncated), "--out", str(tmp_path / "v.gif")]) == 2
    assert "not a readable picture" in capsys.readouterr().err
    assert main(["video", str(good), str(good), "--out", str(tmp_path / "v.gif"), "--fps", "0"]) == 2
    assert "--fps" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from sdlite.storyworld.models import tiny_storyworld_pipeline

    folder = tmp_path_factory.mktemp("sw") / "pipe"
    tiny_storyworld_pipeline(folder)
    return folder


@pytest.mark.parametrize("damage, message", [
    ("layers", "text_encoder: the weights do not match"),
    ("truncate", "text_encoder/model.safetensors is not a readable safetensors file"),
    ("empty", "unet/diffusion_pytorch_model.safetensors is not a readable safetensors file"),
    ("json", "vae/config.json is not valid JSON"),
])
def test_damaged_model_folders_are_one_line_naming_the_component(tmp_path, tiny_folder, capsys, damage, message):
    import json
    import shutil

    folder = tmp_path / "pipe"
    shutil.copytree(tiny_folder, folder)
    if damage == "layers":  # a config that disagrees with its weights: once a silently random layer
        config = json.loads((folder / "text_encoder" / "config.json").read_text())
        config["num_hidden_layers"] += 1
        (folder / "text_encoder" / "config.json").write_text(json.dumps(config))
    elif damage == "truncate":
        f = folder / "text_encoder" / "model.safetensors"
        f.write_bytes(f.read_bytes()[:100])
    elif damage == "empty":
        (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    else:
        (folder / "vae" / "config.json").write_text("{not json")
    out = tmp_path / "o" / "page.png"
    assert main(["story", str(story_file(tmp_path)), "--model", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "o").exists()


def test_a_page_too_large_and_a_font_lacking_glyphs_are_caught_before_generation(tmp_path, fake_model, capsys):
    many = "[Lily] a girl\n" + "".join(f"[Lily] standing in the park # {i}\n" for i in range(60))
    out = tmp_path / "o" / "p.png"
    assert main(["story", str(story_file(tmp_path, many)), "--out", str(out), "--panel-size", "4096"]) == 2
    assert "megapixels" in capsys.readouterr().err and fake_model["load"] == 0 and not (tmp_path / "o").exists()
    cjk = STORY.replace("# Hi.", "# 猫が好き 🙂")
    assert main(["story", str(story_file(tmp_path, cjk, "cjk.txt")), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "no glyph for 5 character(s) (猫が好き🙂)" in err and "--font PATH" in err
    assert main(["story", str(story_file(tmp_path, cjk, "cjk.txt")), "--out", str(tmp_path / "q.png"), "--font",
                 str(tmp_path / "nope.ttf")]) == 2
    assert "no font file" in capsys.readouterr().err


def test_missing_glyphs_finds_exactly_the_uncovered_characters():
    from sdlite.comic import bundled_font, missing_glyphs

    font = bundled_font(16)
    assert missing_glyphs("Lily goes out, déjà vu! 42", font) == []
    assert missing_glyphs("a猫b猫c", font) == ["猫"]


def test_unknown_words_and_long_prompts_fail_before_the_model_loads(tmp_path, fake_model, capsys):
    out = tmp_path / "o" / "p.png"
    bad = STORY.replace("walking in the city", "skateboarding in the city")
    assert main(["story", str(story_file(tmp_path, bad)), "--out", str(out)]) == 2
    assert "skateboarding" in capsys.readouterr().err
    long = STORY.replace("walking in the city", "walking " * 40 + "in the city")
    assert main(["story", str(story_file(tmp_path, long, "long.txt")), "--out", str(out)]) == 2
    assert "tokens" in capsys.readouterr().err
    assert fake_model["load"] == 0 and not (tmp_path / "o").exists()


# A read-only output folder. Root ignores folder permissions (CI and the course machine run as root), so the command
# runs in a subprocess as an unprivileged user there; the fake model is installed in that process the same way.
FAKE_MODEL_RUNS = """
import contextlib, io, json, sys, types
from PIL import Image
import sdlite.pipeline
sdlite.pipeline.load_pipeline = lambda model, device="cpu", dtype=None: object()
sdlite.pipeline.generate_story = lambda pipe, story, **kw: types.SimpleNamespace(
    images=[Image.new("RGB", (64, 64), (10 * i, 0, 0)) for i in range(len(story))])
from sdlite.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


def unprivileged_prefix() -> list[str]:
    """The command prefix that runs a subprocess bound by folder permissions: none when not root; as root, setpriv
    with the capabilities that let root ignore permissions (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER) dropped
    from the bounding set, so the process stays root (it can read the repo and the venv wherever they are) but a
    read-only folder refuses it, as it refuses a user."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv (util-linux): root ignores folder permissions, so a read-only "
                    "folder cannot be made here")
    prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]
    probe = subprocess.run([*prefix, sys.executable, "-c", "import sdlite.cli"], capture_output=True, text=True)
    assert probe.returncode == 0, f"setpriv cannot run {sys.executable} with sdlite: {probe.stderr[-500:]}"
    return prefix


def test_a_read_only_output_folder_is_one_line_and_leaves_nothing():
    prefix = unprivileged_prefix()
    work = Path(tempfile.mkdtemp(prefix="sdlite-readonly-"))  # not tmp_path: its parents are private to root
    home = Path(tempfile.mkdtemp(prefix="sdlite-home-"))  # caches the libraries may write, outside `work`
    locked = work / "locked"
    try:
        work.chmod(0o755)
        home.chmod(0o777)
        story = story_file(work)
        locked.mkdir()
        locked.chmod(0o555)
        before = files(work)
        outs = [locked / "page.png", locked / "new" / "page.png"]  # into the folder; a new folder inside it
        argvs = [["story", str(story), "--out", str(out)] for out in outs]
        env = {**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(home), "MPLCONFIGDIR": str(home)}
        run = subprocess.run([*prefix, sys.executable, "-c", FAKE_MODEL_RUNS, json.dumps(argvs)], capture_output=True,
                             text=True, env=env, cwd=work, timeout=300)
        assert run.returncode == 0, run.stderr
        for code, err in json.loads(run.stdout.splitlines()[-1]):
            assert code == 2, err
            assert err.count("\n") == 1 and "Traceback" not in err and "Permission denied" in err, err
            assert str(locked) in err and ".tmp" not in err and "choose an output folder" in err, err
        assert files(work) == before  # no page, no panel, no temporary file, no folder
    finally:
        locked.chmod(0o755)
        shutil.rmtree(work)
        shutil.rmtree(home)


# Fuzzing the story reader: any text is a Story or one ValueError-family line, never another exception.
STORY_PIECES = ["[Lily]", "[Tom]", "[NC]", "[", "]", "[]", "[Dr. Who]", " a girl", " a boy", " walking in the park",
                " # ", "#", "\n", "\r\n", "\r", " ", "\t", "style:", "style: plain", "style: {prompt}, comic",
                "negative:", "negative: a crown", "//", "\ufeff", "\u2028", "\x85", "\x00", "img", "Zürich", "猫",
                "{prompt}", "{", "}"]
story_texts = st.lists(st.one_of(st.sampled_from(STORY_PIECES), st.text(max_size=12)), max_size=30).map("".join)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(text=story_texts)
def test_any_text_parses_to_a_story_or_one_clear_line(text):
    from sdlite.story import Story, parse_story

    try:
        story = parse_story(text)
    except ValueError as err:
        message = str(err)
        assert message.startswith(("line ", "the story is empty")) and "\n" not in message, message
    else:
        assert isinstance(story, Story) and len(story) >= 1
        assert all(panel.prompt and "\n" not in panel.prompt for panel in story.panels)


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(text=story_texts, tail=st.binary(max_size=6))
def test_the_command_answers_any_story_file_with_a_page_or_one_line(tmp_path_factory, text, tail):
    work = tmp_path_factory.mktemp("fuzz")
    story = story_file(work, text.encode("utf-8") + tail)  # the tail may be bytes that are not UTF-8
    out = work / "o" / "page.png"
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(err), \
            contextlib.redirect_stdout(io.StringIO()):
        patch.setattr(sdlite.pipeline, "load_pipeline", lambda model, device="cpu", dtype=None: object())
        patch.setattr(sdlite.pipeline, "generate_story", lambda pipe, story, **kw: types.SimpleNamespace(
            images=[Image.new("RGB", (64, 64)) for _ in range(len(story))]))
        code = main(["story", str(story), "--out", str(out)])
    lines = err.getvalue().splitlines()
    errors = [line for line in lines if not line.startswith("sdlite story: warning:")]
    if code == 0:
        assert out.is_file() and len(os.listdir(work / "o" / "page_panels")) >= 1 and not errors
    else:
        assert code == 2 and len(errors) == 1 and errors == lines[-1:], lines  # warnings, then one error line
        assert errors[0].startswith("sdlite story: error: ") and "--debug" not in errors[0], errors  # not a crash
        assert not (work / "o").exists()
