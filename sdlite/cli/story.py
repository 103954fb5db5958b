"""`sdlite story`: a story file -> consistent panels -> a comic page (and, with --video, a story video)."""
from __future__ import annotations

import sys
from pathlib import Path

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
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: 5)")
    p.add_argument("--seed", type=int, default=0, help="seed: panel i uses seed + i (default 0)")
    p.add_argument("--shared-seed", action="store_true", help="the same noise seed for every panel (official demo)")
    p.add_argument("--rate", type=float, default=None,
                   help="CSA sampling rate in [0, 1] (default: 1.0 on storyworld, 0.5 on SDXL as the paper)")
    p.add_argument("--tile", type=int, default=None, help="CSA window size in images (default: the whole batch)")
    p.add_argument("--layers", choices=["up", "all"], default=None,
                   help="self-attention layers with CSA (default: all on storyworld, up on SDXL)")
    p.add_argument("--id-length", type=int, default=4, help="reference panels per character (default 4)")
    p.add_argument("--no-csa", action="store_true", help="plain generation, no consistent self-attention")
    p.add_argument("--style", default=None, help=f"style template: one of {sorted(STYLE_NAMES)} or text with {{prompt}} "
                                                 "(default: the story's, else plain)")
    p.add_argument("--size", type=int, default=None, help="image height = width in px (default: the model's)")
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
    need(args.size is None or (args.size >= 64 and args.size % 8 == 0),
         f"--size {args.size}: use a multiple of 8, at least 64 (storyworld: 64; SDXL: 1024)")
    need(args.rate is None or 0.0 <= args.rate <= 1.0, f"--rate {args.rate}: the sampling rate is in [0, 1]")
    need(args.tile is None or args.tile >= 1, f"--tile {args.tile}: use 1 or more images per window")
    need(args.id_length >= 1, f"--id-length {args.id_length}: use 1 or more reference panels")


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
    quiet_libraries()  # the cheap checks are done: from here on, libraries load (without their bars)
    from ..pipeline import CSAConfig, generate_story, load_pipeline, load_tokenizer

    csa = CSAConfig(rate=args.rate, tile=args.tile, layers=args.layers, id_length=args.id_length,
                    enabled=not args.no_csa)

    tokenizer = load_tokenizer(args.model)  # words and prompt lengths checked before the model loads
    if tokenizer is not None:
        check_story_prompts(story, tokenizer)
    if video_path is not None and (tokenizer is None or not is_small_vocabulary(tokenizer)):
        raise ValueError(f"--video works with --model storyworld only: its motion predictor and video decoder are "
                         f"storyworld's 64-px models, trained on storyworld's world, not on {args.model}'s panels; "
                         "drop --video for a real model")
    video_models = None
    if video_path is not None:  # a broken decoder fails now, not after every panel was generated
        from ..video import load_video_models

        video_models = load_video_models()
    pipe = load_pipeline(args.model, args.device)
    result = generate_story(pipe, story, csa=csa, steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                            seed_policy="shared" if args.shared_seed else "per_panel", height=args.size,
                            width=args.size, progress=not args.quiet)
    page = make_page(result.images, story.captions, layout=args.layout, columns=args.columns,
                     panel_size=args.panel_size, title=args.title, font_path=args.font)
    writers = {out: lambda p: page.save(p, format="PNG")}
    writers.update({target: (lambda p, im=image: im.save(p, format="PNG"))
                    for target, image in zip(panel_paths, result.images)})
    if video_path is not None:
        from ..video import story_video, write_video

        video = story_video(result.images, video_models, seed=args.seed)
        writers[video_path] = lambda p: write_video(p, video, force=True)
    write_all_or_nothing(writers, force=args.force)
    print(f"page: {out}")
    print(f"panels: {panel_dir}/ ({len(panel_paths)} files: {panel_paths[0].name} .. {panel_paths[-1].name})")
    if video_path is not None:
        print(f"video: {video_path}")
    return 0
