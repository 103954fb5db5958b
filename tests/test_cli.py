"""The `sdlite story` command: options, outputs, the no-overwrite rule, clear errors."""
import subprocess
import sys

import pytest
from PIL import Image

from sdlite.cli import build_parser, main
from sdlite.storyworld.models import tiny_storyworld_pipeline



@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sw") / "pipe"
    tiny_storyworld_pipeline(folder)
    return folder


def test_help_lists_the_options():
    assert "story" in build_parser().format_help()  # builds without loading any model
    out = subprocess.run([sys.executable, "-m", "sdlite.cli", "story", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for option in ("--out", "--model", "--device", "--steps", "--seed", "--rate", "--tile", "--no-csa", "--force"):
        assert option in out.stdout, option


def test_story_writes_page_and_panels_and_never_overwrites(model_folder, tmp_path, capsys):
    out = tmp_path / "page.png"
    args = ["story", "--model", str(model_folder), "--out", str(out), "--steps", "1", "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"page: {out}" in printed
    panels = sorted((tmp_path / "page_panels").glob("panel_*.png"))
    assert len(panels) == 6  # the bundled example story has 6 panels
    assert Image.open(panels[0]).size == (64, 64) and Image.open(out).format == "PNG"
    before = out.read_bytes()
    assert main(args + ["--seed", "5"]) == 2  # exists: refused, nothing written
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err
    assert out.read_bytes() == before
    assert main(args + ["--seed", "5", "--force"]) == 0
    assert out.read_bytes() != before


def test_existing_panel_file_is_also_protected(model_folder, tmp_path, capsys):
    (tmp_path / "p_panels").mkdir()
    (tmp_path / "p_panels" / "panel_03.png").write_bytes(b"mine")
    code = main(["story", "--model", str(model_folder), "--out", str(tmp_path / "p.png"), "--steps", "1", "--quiet"])
    assert code == 2 and "panel_03.png already exists" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()  # checked before generating anything
    assert (tmp_path / "p_panels" / "panel_03.png").read_bytes() == b"mine"


def test_story_file_no_csa_and_errors(model_folder, tmp_path, capsys):
    story = tmp_path / "s.txt"
    story.write_text("[Max] a boy\n[Max] walking in the park # Off he goes.\n[Max] jumping on the beach\n")
    out = tmp_path / "two.png"
    assert main(["story", str(story), "--model", str(model_folder), "--out", str(out), "--steps", "1", "--no-csa",
                 "--quiet", "--layout", "classic"]) == 0
    assert len(list((tmp_path / "two_panels").glob("*.png"))) == 2
    bad = tmp_path / "bad.txt"
    bad.write_text("[Max] a boy\n[Max] walking\n[Ann] waving\n")
    assert main(["story", str(bad), "--model", str(model_folder), "--out", str(tmp_path / "x.png")]) == 2
    assert "line 3: unknown character [Ann]" in capsys.readouterr().err
    assert main(["story", str(story), "--out", str(tmp_path / "x.jpg")]) == 2
    assert "ending in .png" in capsys.readouterr().err
    oov = tmp_path / "oov.txt"
    oov.write_text("[Max] a boy\n[Max] riding a dragon\n")
    assert main(["story", str(oov), "--model", str(model_folder), "--out", str(tmp_path / "y.png")]) == 2
    assert "does not know: ['riding', 'dragon']" in capsys.readouterr().err


def test_no_subcommand_prints_help(capsys):
    assert main([]) == 2
    assert "story" in capsys.readouterr().out


def test_story_video_option_checks_before_generating(model_folder, tmp_path, capsys):
    base = ["story", "--model", str(model_folder), "--steps", "1", "--quiet", "--out", str(tmp_path / "p.png")]
    assert main(base + ["--video", str(tmp_path / "story.avi")]) == 2
    assert "ending in .mp4 or .gif" in capsys.readouterr().err
    existing = tmp_path / "story.mp4"
    existing.write_bytes(b"user data")
    assert main(base + ["--video", str(existing)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert existing.read_bytes() == b"user data" and not (tmp_path / "p.png").exists()  # nothing generated
    assert main(base + ["--video-polish", "0.3"]) == 2
    assert "--video-polish works with --video" in capsys.readouterr().err
    assert main(base + ["--video", str(tmp_path / "s.gif"), "--video-polish", "2"]) == 2
    assert "--video-polish 2.0" in capsys.readouterr().err and not (tmp_path / "p.png").exists()


def test_video_subcommand_is_registered():
    parser = build_parser()
    assert "video" in parser.format_help()
    args = parser.parse_args(["video", "a.png", "b.png", "--out", "c.mp4"])
    assert args.frames == 16 and args.func.__name__ == "run_video"


def test_the_light_parsers_copies_match_the_library():
    """The command lines list a few library names themselves (so building a parser imports no torch): they must
    stay the library's."""
    from sdlite.cli import eval as cli_eval
    from sdlite.cli import story as cli_story
    from sdlite.cli import video as cli_video
    from sdlite.eval import transitions
    from sdlite.story import STYLES
    from sdlite.video import MODES

    assert cli_story.STYLE_NAMES == tuple(STYLES)
    assert cli_eval.TRANSITION_METHODS == transitions.METHODS and cli_eval.TRANSITION_SEED == transitions.EVAL_SEED
    assert cli_eval.TRANSITION_POLISHED == transitions.POLISHED
    assert cli_video.USER_MODES == MODES[:3] and "true_embeddings" not in cli_video.USER_MODES


def test_train_and_eval_commands_list_their_jobs_and_reject_bad_input(capsys, tmp_path):
    from sdlite.cli.eval import main as eval_main
    from sdlite.cli.train import main as train_main

    for main_, names in ((train_main, ("storyworld", "recognizer", "motion-cache", "motion-predictor",
                                       "video-decoder")),
                         (eval_main, ("storyworld", "consistency", "transitions", "predictor-errors", "check"))):
        with pytest.raises(SystemExit):
            main_(["--help"])
        help_text = capsys.readouterr().out
        assert all(name in help_text for name in names)
    out = tmp_path / "motion.json"
    assert eval_main(["transitions", "--methods", "full,magic", "--out", str(out)]) == 2
    assert "magic" in capsys.readouterr().err and not out.exists()  # refused before any model loads
    rec = tmp_path / "r.safetensors"
    assert train_main(["recognizer", "--threads", "0", "--out", str(rec)]) == 2
    assert "--threads" in capsys.readouterr().err and not rec.exists()
