"""`sdlite story`: a story file -> consistent panels -> a comic page (and, with --video, a story video)."""
from __future__ import annotations

import sys
from pathlib import Path

from .video import add_polish_option, check_polish

# sdlite.story.STYLES's names, listed here so that building the parser imports no torch (a test keeps them equal).
STYLE_NAMES = ("plain", "comic", "photo", "cinematic", "watercolour", "manga")


def add_story_parser(subparsers) -> None:
    """Register ``sdlite story`` on an argparse subparsers object (see sdlite/cli/__init__.py)."""
    p = subparsers.add_parser(
        "story", help="story text -> consistent panels -> a comic page (PNG)",
        description="Generate a comic page from a story file with consistent self-attention. Without STORY, the "
                    "bundled example (data/stories/example.txt) is used. Writes the page and the single panels "
                    "(<out stem>_panels/panel_NN.png); never overwrites a file unless --force.")
    p.add_argument("story", nargs="?", default=None, help="story file (default: the bundled example story)")
    p.add_argument("--out", default="out/page.png", help="page PNG to write (default: out/page.png)")
    p.add_argument("--model", default="storyworld",
                   help="'storyworld' (default, CPU), an SDXL or SD1.5 pipeline folder, or a hub id such as "
                        "stabilityai/stable-diffusion-xl-base-1.0 (fp16 on CUDA)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, mps ...")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: 20 storyworld, 35 SDXL)")
    p.add_argument("--guidance", type=float, default=None,
                   help=f"guidance scale (default: 5; {STORYWORLD_ID_GUIDANCE:g} with --ref on storyworld)")
    p.add_argument("--seed", type=int, default=0, help="seed: panel i uses seed + i (default 0)")
    p.add_argument("--shared-seed", action="store_true", help="the same noise seed for every panel (official demo)")
    p.add_argument("--rate", type=float, default=None,
                   help="CSA sampling rate in [0, 1] (default: 1.0 on storyworld, 0.5 on SDXL as the paper)")
    p.add_argument("--tile", type=int, default=None, help="CSA window size in images (default: the whole batch)")
    p.add_argument("--layers", choices=["up", "down", "mid", "all"], default=None,
                   help="self-attention layers with CSA (default: all on storyworld, up on SDXL / SD1.5)")
    p.add_argument("--id-length", type=int, default=None,
                   help="reference panels per character (default: 4 on storyworld, 2 on real models)")
    p.add_argument("--no-csa", action="store_true", help="plain generation, no consistent self-attention")
    p.add_argument("--ref", action="append", default=[], metavar="NAME=IMAGE",
                   help="reference-image mode (PhotoMaker): the panels of character NAME follow IMAGE; repeat for "
                        "several images or characters. NAME's description needs the trigger word after its class "
                        "word ([Lily] a girl img). Adds to the story's own `ref: NAME = IMAGE` lines")
    p.add_argument("--photomaker", default=None, metavar="PATH",
                   help="the ID encoder for --ref: an ID encoder folder or a PhotoMaker v1 checkpoint "
                        "(photomaker-v1.bin); default on storyworld: its own, data/storyworld/id_encoder")
    p.add_argument("--id-strength", type=float, default=None, metavar="R",
                   help="--ref: style strength in %% (PhotoMaker's style_strength_ratio): the first R %% of the "
                        "steps use the text-only prompt, the rest the reference (default 20: PhotoMaker's on real SDXL, "
                        "and on storyworld the value its evaluation chose; lower follows the reference more, "
                        "higher the text)")
    p.add_argument("--candidates", type=int, default=None, metavar="K",
                   help=f"--ref: draw each panel K times and keep the draw whose ID embedding is closest to the "
                        f"reference's (default {STORYWORLD_ID_CANDIDATES} on storyworld, 1 on real models, where "
                        f"each draw costs a full SDXL sampling)")
    p.add_argument("--preset", choices=["official"], default=None,
                   help="official: the official StoryDiffusion demo's settings (official sampling, rates 0.5 at both "
                        "resolutions, no CSA at step 0 then random skips, 1 reference panel, the same seed for every "
                        "panel, 35 steps, guidance 5, 768x768 on real models); options given explicitly win")
    p.add_argument("--sampling", choices=["exact", "official"], default=None,
                   help="exact (default: each image draws exactly rate x pool tokens per layer) or official (one "
                        "random keep-mask per source image and step, shared by a resolution's layers)")
    p.add_argument("--rate-32", type=float, default=None, metavar="R",
                   help="rate of the layers whose tokens span 32 px (the official sa32; default: --rate)")
    p.add_argument("--rate-16", type=float, default=None, metavar="R",
                   help="rate of the layers whose tokens span 16 px (the official sa64; default: --rate)")
    p.add_argument("--skip-schedule", choices=["none", "official"], default=None,
                   help="official: each CSA layer call falls back to plain attention with probability 0.3 before "
                        "step 20 and 0.1 after (default: none)")
    p.add_argument("--bank-steps", type=int, default=None,
                   help="keep the bank for the first N steps only (less memory; default: all on storyworld, 20 on "
                        "real models)")
    p.add_argument("--bank-device", default=None, help="where the bank lives, e.g. cpu (default: with the model)")
    p.add_argument("--bank-dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="the bank's number type (default: the model's)")
    p.add_argument("--save-characters", default=None, metavar="DIR",
                   help="write each character's bank to DIR/<name>.safetensors (go on with --load-characters)")
    p.add_argument("--load-characters", default=None, metavar="DIR",
                   help="read the characters of DIR/<name>.safetensors: they are not generated again, their panels "
                        "read the loaded bank (a long story page by page)")
    p.add_argument("--cpu-offload", action="store_true",
                   help="diffusers' enable_model_cpu_offload: each model on the GPU only while it runs (low VRAM)")
    p.add_argument("--vae-slicing", action="store_true", help="decode the panels one at a time (low VRAM)")
    p.add_argument("--vae-tiling", action="store_true", help="decode each panel in tiles (low VRAM, large sizes)")
    p.add_argument("--style", default=None, help=f"style template: one of {sorted(STYLE_NAMES)} or text with {{prompt}} "
                                                 "(default: the story's, else plain)")
    p.add_argument("--size", type=int, default=None, help="image height = width in px (default: the model's)")
    p.add_argument("--height", type=int, default=None, help="image height in px (default: --size, else the model's)")
    p.add_argument("--width", type=int, default=None, help="image width in px (default: --size, else the model's)")
    p.add_argument("--layout", choices=["grid", "classic"], default="grid", help="page layout (default grid)")
    p.add_argument("--columns", type=int, default=2, help="panels per row in the grid layout (default 2)")
    p.add_argument("--panel-size", type=int, default=256, help="panel size on the page in px (default 256)")
    p.add_argument("--title", default=None, help="a title above the panels")
    p.add_argument("--font", default=None, metavar="PATH",
                   help="a .ttf/.otf font for captions and title (default: the bundled DejaVu Sans, which has no CJK "
                        "or emoji)")
    p.add_argument("--video", default=None,
                   help="also write the whole story as one video (.mp4/.gif): panels as keyframes joined by "
                        "transitions of the semantic motion predictor + video decoder (sdlite.video)")
    add_polish_option(p, "--video-polish")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    p.set_defaults(func=run_story_command)


MAX_CAPTION = 1000  # characters: a caption is a line under a panel, not a chapter


def check_story_options(args) -> None:
    """Every number the command takes, checked before anything is loaded (one clear error naming the option)."""
    import math

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(message)

    need(args.columns >= 1, f"--columns {args.columns}: use 1 or more panels per row")
    need(32 <= args.panel_size <= 4096, f"--panel-size {args.panel_size}: use 32 to 4096 px")
    need(args.steps is None or args.steps >= 1, f"--steps {args.steps}: use 1 or more denoising steps")
    need(args.guidance is None or (math.isfinite(args.guidance) and args.guidance >= 0),
         f"--guidance {args.guidance}: use a finite scale >= 0 (1 or less turns guidance off; 5 is the default)")
    for name in ("size", "height", "width"):
        value = getattr(args, name, None)
        need(value is None or (value >= 64 and value % 8 == 0),
             f"--{name} {value}: use a multiple of 8, at least 64 (storyworld: 64; SD1.5: 512; SDXL: 1024)")
    for name in ("rate", "rate_32", "rate_16"):
        value = getattr(args, name, None)
        need(value is None or 0.0 <= value <= 1.0,
             f"--{name.replace('_', '-')} {value}: the sampling rate is in [0, 1]")
    need(args.tile is None or args.tile >= 1, f"--tile {args.tile}: use 1 or more images per window")
    need(args.id_length is None or args.id_length >= 1, f"--id-length {args.id_length}: use 1 or more reference panels")
    need(getattr(args, "bank_steps", None) is None or args.bank_steps >= 1,
         f"--bank-steps {getattr(args, 'bank_steps', None)}: use 1 or more steps")
    strength = getattr(args, "id_strength", None)
    need(strength is None or (math.isfinite(strength) and 0 <= strength <= 100),
         f"--id-strength {strength}: a percentage of the steps, 0 to 100")
    candidates = getattr(args, "candidates", None)
    need(candidates is None or candidates >= 1, f"--candidates {candidates}: use 1 or more draws per panel")
    need(not (getattr(args, "no_csa", False) and (getattr(args, "save_characters", None)
                                                   or getattr(args, "load_characters", None))),
         "--save-characters / --load-characters need CSA: drop --no-csa")


def run_story_command(args) -> int:
    """``sdlite story``: check everything cheap first (options, story, output paths), load the models (the video
    decoder too, when --video is asked), generate, then write page, panels and video as one unit."""
    check_story_options(args)  # before any import of torch: a bad option is answered at once
    from ..comic import make_page, missing_glyphs, page_geometry
    from ..paths import check_target, write_all_or_nothing
    from ..quiet import quiet_libraries
    from ..story import check_story_prompts, example_story_path, is_small_vocabulary, read_story

    path = Path(args.story) if args.story else example_story_path()
    story = read_story(path, style=args.style)
    for panel in story.panels:
        if len(panel.caption) > MAX_CAPTION:
            raise ValueError(f"{path}: line {panel.line}: the caption is {len(panel.caption)} characters; keep it "
                             f"under {MAX_CAPTION} (it is printed under one panel)")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out {out}: the page is a PNG, use a path ending in .png")
    panel_dir = out.with_name(out.stem + "_panels")
    if panel_dir.exists() and not panel_dir.is_dir():
        raise FileExistsError(f"{panel_dir} is a file, where the panels' folder goes: move it or choose another --out")
    width = max(2, len(str(len(story))))  # panel_01 .. panel_99, panel_001 .. for longer stories: names sort
    panel_paths = [panel_dir / f"panel_{i + 1:0{width}d}.png" for i in range(len(story))]
    video_path = Path(args.video) if getattr(args, "video", None) else None
    check_polish(getattr(args, "video_polish", 0.0), "--video-polish")
    if getattr(args, "video_polish", 0.0) and video_path is None:
        raise ValueError("--video-polish works with --video: add --video story.gif")
    if video_path is not None and video_path.suffix.lower() not in (".mp4", ".gif"):
        raise ValueError(f"--video {video_path}: use a path ending in .mp4 or .gif")
    if video_path is not None and len(story) < 2:
        raise ValueError("--video needs a story of at least 2 panels (one transition)")
    for target in [out, *panel_paths, *([video_path] if video_path else [])]:  # fail before the slow part
        check_target(target, args.force, "--video" if target == video_path else "--out")
    geometry = page_geometry(story.captions, args.layout, args.panel_size, args.columns, args.title,
                             font_path=args.font)  # a page too large, or a bad font file, fails now
    lacking = missing_glyphs(" ".join([*story.captions, args.title or ""]), geometry.font)
    if lacking:
        shown = "".join(lacking[:10]) + (" ..." if len(lacking) > 10 else "")
        print(f"sdlite story: warning: the caption font has no glyph for {len(lacking)} character(s) ({shown}): they "
              "print as empty boxes; pass --font PATH to a font that has them", file=sys.stderr)
    story_refs = [(f"{path}: line {r.line}: ref: {r.name} = {r.image}", r.name, r.image) for r in story.references]
    cli_refs = [(f"--ref {ref!r}", *parse_reference_option(ref)) for ref in getattr(args, "ref", [])]
    check_reference_options(args, bool(story_refs or cli_refs))
    references = check_references(story, story_refs + cli_refs)  # names, trigger words, readable pictures
    load_dir = Path(args.load_characters) if getattr(args, "load_characters", None) else None
    if load_dir is not None and not load_dir.is_dir():
        raise FileNotFoundError(f"--load-characters {load_dir}: no such folder (write one with --save-characters)")
    save_paths = {}
    if getattr(args, "save_characters", None):
        save_paths = {name: Path(args.save_characters) / f"{name}.safetensors" for name in story.characters}
        for target in save_paths.values():
            check_target(target, args.force, "--save-characters")
    quiet_libraries()  # the cheap checks are done: from here on, libraries load (without their bars)
    from ..pipeline import generate_story, load_pipeline, load_tokenizer

    tokenizer = load_tokenizer(args.model)  # words and prompt lengths checked before the model loads
    if tokenizer is not None:
        import warnings

        with warnings.catch_warnings():  # said once, as sdlite's own line
            warnings.simplefilter("ignore")
            cut = check_story_prompts(story, tokenizer)
        for line in cut:
            print(f"sdlite story: warning: {line}", file=sys.stderr)
    if video_path is not None and (tokenizer is None or not is_small_vocabulary(tokenizer)):
        raise ValueError(f"--video works with --model storyworld only: its motion predictor and video decoder are "
                         f"storyworld's 64-px models, trained on storyworld's world, not on {args.model}'s panels; "
                         "drop --video for a real model")
    video_models = None
    if video_path is not None:  # a broken decoder fails now, not after every panel was generated
        from ..video import load_video_models

        video_models = load_video_models()
    real = tokenizer is None or not is_small_vocabulary(tokenizer)
    csa, run = story_settings(args, real)
    id_kwargs = reference_mode(args, references, real)  # the ID encoder loads (and fails) before the pipeline
    if id_kwargs and not real and run["guidance"] is None:
        run["guidance"] = STORYWORLD_ID_GUIDANCE  # storyworld's reference mode has its own tuned default
    pipe = load_pipeline(args.model, args.device)
    low_vram(pipe, args)
    bank = load_characters(pipe, story, csa, run, load_dir) if load_dir is not None else None
    report_bank_estimate(pipe, story, csa, run, bank)
    if bank is None and save_paths:
        bank = new_bank_for(csa)  # kept after the story, to be saved
    import warnings

    with warnings.catch_warnings():  # a cut prompt was reported above, once
        warnings.filterwarnings("ignore", message=".*the text encoder reads")
        result = generate_story(pipe, story, csa=csa, steps=run["steps"], guidance_scale=run["guidance"],
                                seed=args.seed, seed_policy=run["seed_policy"], height=run["height"],
                                width=run["width"], progress=not args.quiet, bank=bank, **id_kwargs)
    page = make_page(result.images, story.captions, layout=args.layout, columns=args.columns,
                     panel_size=args.panel_size, title=args.title, font_path=args.font)
    writers = {out: lambda p: page.save(p, format="PNG")}
    writers.update({target: (lambda p, im=image: im.save(p, format="PNG"))
                    for target, image in zip(panel_paths, result.images)})
    if video_path is not None:
        from ..video import story_video, write_video

        polish = args.video_polish  # with it, transition k is redrawn with panel k's prompt
        video = story_video(result.images, video_models, seed=args.seed, polish=polish, pipe=pipe,
                            prompts=[p.prompt for p in story.panels[:-1]] if polish else None)
        writers[video_path] = lambda p: write_video(p, video, force=True)
    writers.update(character_writers(pipe, bank, csa, run, save_paths))
    write_all_or_nothing(writers, force=args.force)
    print(f"page: {out}")
    print(f"panels: {panel_dir}/ ({len(panel_paths)} files: {panel_paths[0].name} .. {panel_paths[-1].name})")
    if video_path is not None:
        print(f"video: {video_path}")
    if save_paths:
        print(f"characters: {', '.join(str(t) for t in save_paths.values())}")
    return 0


def parse_reference_option(ref: str) -> tuple[str, str]:
    """``--ref NAME=IMAGE`` -> (name, image), the form checked (read as the story's ``ref:`` lines are)."""
    from ..story import split_reference

    parts = split_reference(ref)
    if parts is None:
        raise ValueError(f"--ref {ref!r}: write NAME=IMAGE, e.g. --ref Lily=lily.png")
    return parts


def check_reference_options(args, has_references: bool) -> None:
    """The reference mode's options need references: ``--ref`` or the story's ``ref:`` lines."""
    for option, value in (("--id-strength", getattr(args, "id_strength", None)),
                          ("--candidates", getattr(args, "candidates", None)),
                          ("--photomaker", getattr(args, "photomaker", None))):
        if value is not None and not has_references:
            raise ValueError(f"{option} works with reference pictures: add --ref NAME=IMAGE, or a line "
                             "`ref: NAME = IMAGE` to the story")


def check_references(story, refs: list[tuple[str, str, str]]) -> dict[str, list]:
    """References (where, name, image) -> {name: [RGB pictures]}, checked before any model loads: a character of the
    story, the trigger word in its description and once in each of its panels' prompts, and a whole, readable
    picture. `where` starts each error: the ``--ref`` option or the story's ``ref:`` line."""
    from ..images import read_picture
    from ..tokenization import TRIGGER_WORD, count_trigger_words

    references: dict[str, list] = {}
    for where, name, image in refs:
        if name not in story.characters:
            raise ValueError(f"{where}: the story has no character {name!r} (its characters: "
                             f"{', '.join(story.characters) or 'none'})")
        ch = story.characters[name]
        if not count_trigger_words(ch.description):
            raise ValueError(f"{where}: line {ch.line}: [{name}] {ch.description!r} has no trigger word: write "
                             f"{TRIGGER_WORD!r} right after the class word, e.g. [{name}] a girl {TRIGGER_WORD}")
        for panel in story.panels:  # the description joins every panel's prompt: the trigger must not come twice
            if name in panel.characters and count_trigger_words(panel.id_prompt) > 1:
                raise ValueError(f"{where}: line {panel.line}: the prompt {panel.id_prompt!r} has the trigger "
                                 f"word {TRIGGER_WORD!r} more than once. [{name}]'s description already brings it: "
                                 f"write the line without the description, e.g. [{name}] waving on the beach")
        try:
            picture = read_picture(image, "reference image")  # checked, then read
        except (OSError, ValueError) as err:  # the same error, told where the picture was named
            raise type(err)(f"{where}: {err}") from None
        references.setdefault(name, []).append(picture)
    return references


def reference_mode(args, references: dict, real: bool) -> dict:
    """generate_story's PhotoMaker arguments for --ref (empty without it): the ID encoder loaded and checked."""
    if not references:
        return {}
    from ..id_encoder import load_id_encoder
    from ..paths import data_dir

    path = getattr(args, "photomaker", None)
    if path is None:
        if real:
            raise ValueError("--ref on a real SDXL model needs its ID encoder: --photomaker PATH to PhotoMaker v1's "
                             "checkpoint (photomaker-v1.bin)")
        path = data_dir() / "storyworld" / "id_encoder"
    encoder = load_id_encoder(path).to(args.device)
    strength = getattr(args, "id_strength", None)
    default = PHOTOMAKER_ID_STRENGTH if real else STORYWORLD_ID_STRENGTH
    candidates = getattr(args, "candidates", None)
    return {"id_images": references, "id_encoder": encoder,
            "style_strength_ratio": default if strength is None else strength,
            "candidates": (1 if real else STORYWORLD_ID_CANDIDATES) if candidates is None else candidates}


PHOTOMAKER_ID_STRENGTH = 20.0  # PhotoMaker's own default, for real SDXL with photomaker-v1.bin
STORYWORLD_ID_STRENGTH = 20.0  # storyworld's encoder: chosen by `python -m sdlite.eval photomaker` on its tuning stories
STORYWORLD_ID_GUIDANCE = 3.0  # and its guidance scale with --ref (without --guidance), chosen the same way
STORYWORLD_ID_CANDIDATES = 8  # draws per panel with --ref (sdlite.eval.photomaker.STORYWORLD_CANDIDATES; a test keeps
# them equal): a cost fixed beforehand, not tuned


def story_settings(args, real: bool):
    """The CSA setting and the run's numbers (steps, guidance, size, seed policy) from the options and --preset."""
    import dataclasses

    from ..attention import OFFICIAL_SKIP_SCHEDULE
    from ..pipeline import CSAConfig

    official = getattr(args, "preset", None) == "official"
    csa = CSAConfig.official() if official else CSAConfig()
    given = {"rate": args.rate, "tile": args.tile, "layers": args.layers, "id_length": args.id_length,
             "sampling": getattr(args, "sampling", None), "bank_steps": getattr(args, "bank_steps", None),
             "bank_device": getattr(args, "bank_device", None), "bank_dtype": getattr(args, "bank_dtype", None)}
    skips = getattr(args, "skip_schedule", None)
    if skips is not None:
        given["skip_schedule"] = OFFICIAL_SKIP_SCHEDULE if skips == "official" else None
    per_scale = {32: getattr(args, "rate_32", None), 16: getattr(args, "rate_16", None)}
    if any(v is not None for v in per_scale.values()):
        base = dict(csa.rate_by_scale or ())
        base.update({k: v for k, v in per_scale.items() if v is not None})
        given["rate_by_scale"] = base
    csa = dataclasses.replace(csa, enabled=not args.no_csa, **{k: v for k, v in given.items() if v is not None})
    size = 768 if official and real else None  # the official demo's size (storyworld keeps its 64 px)
    size = args.size if args.size is not None else size
    run = {"steps": args.steps if args.steps is not None else (35 if official else None),
           "guidance": args.guidance if args.guidance is not None else (5.0 if official else None),
           "height": getattr(args, "height", None) or size, "width": getattr(args, "width", None) or size,
           "seed_policy": "shared" if args.shared_seed or official else "per_panel"}
    return csa, run


def low_vram(pipe, args) -> None:
    """diffusers' own memory switches, asked for on the command line."""
    if getattr(args, "cpu_offload", False):
        if args.device == "cpu":
            raise ValueError("--cpu-offload moves models to the GPU while they run: use it with --device cuda")
        pipe.enable_model_cpu_offload(device=args.device)
    if getattr(args, "vae_slicing", False):
        pipe.vae.enable_slicing()
    if getattr(args, "vae_tiling", False):
        pipe.vae.enable_tiling()


def _resolved(pipe, csa, run):
    from ..pipeline import model_defaults

    defaults = model_defaults(pipe)
    steps = run["steps"] if run["steps"] is not None else defaults["steps"]
    guidance = run["guidance"] if run["guidance"] is not None else defaults["guidance_scale"]
    return csa.with_model_defaults(defaults), steps, guidance


def report_bank_estimate(pipe, story, csa, run, bank) -> None:
    """Print the bank's size per character before generating (the official demo's most common failure is
    running out of GPU memory half-way)."""
    from ..pipeline import estimate_story_bank

    if not csa.enabled or getattr(pipe, "unet", None) is None:  # (no UNet: a stand-in pipeline, nothing to size)
        return
    resolved, steps, guidance = _resolved(pipe, csa, run)
    sizes = estimate_story_bank(pipe, story, resolved, steps, run["height"], run["width"], guidance)
    loaded = set(bank.characters) if bank is not None else set()
    def size(n: int) -> str:
        return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"

    parts = [f"{name} {size(n)}" + (" (loaded)" if name in loaded else "") for name, n in sizes.items()]
    where = resolved.bank_device or "the model's device"
    kind = "expected " if resolved.sampling == "official" else ""
    print(f"CSA bank ({kind}size, on {where}): {', '.join(parts)}; total {size(sum(sizes.values()))} "
          f"(up to {resolved.id_length} reference panel(s) each, {min(resolved.bank_steps or steps, steps)} of {steps} "
          "steps stored; "
          "less: --id-length, --bank-steps, --bank-dtype float16, --bank-device cpu)")


def new_bank_for(csa):
    from ..pipeline import new_bank

    return new_bank(csa)


def load_characters(pipe, story, csa, run, folder: Path):
    """A bank with every character of the story that has a file in ``folder``, checked against this run."""
    from ..pipeline import bank_settings, check_bank_settings, new_bank

    if not csa.enabled:
        raise ValueError("--load-characters needs CSA: drop --no-csa")
    resolved, steps, guidance = _resolved(pipe, csa, run)
    wanted = bank_settings(pipe, resolved, steps, run["height"], run["width"], guidance)
    bank = new_bank(resolved)
    found = []
    for name in story.characters:
        path = folder / f"{name}.safetensors"
        if path.is_file():
            stored, saved = bank.load(path)
            if stored != name:
                raise ValueError(f"{path} holds character {stored!r}, not {name!r}: rename the file")
            check_bank_settings(name, saved, wanted)
            found.append(name)
    if not found:
        raise FileNotFoundError(f"--load-characters {folder}: no file for any character of the story "
                                f"({', '.join(f'{n}.safetensors' for n in story.characters)})")
    return bank


def character_writers(pipe, bank, csa, run, paths: dict) -> dict:
    """Writers of the character files (written with the page and panels, as one unit), with the settings they
    were made under (checked when they are loaded)."""
    from ..pipeline import bank_settings

    if not paths:
        return {}
    resolved, steps, guidance = _resolved(pipe, csa, run)
    settings = bank_settings(pipe, resolved, steps, run["height"], run["width"], guidance)
    return {target: (lambda p, name=name: bank.save(p, name, settings)) for name, target in paths.items()}
