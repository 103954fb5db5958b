"""Everything that generates in order to score, or writes results/: `python -m sdlite.eval <table>`.

- `metrics`: the measures of a story (identity agreement across panels, scene/action accuracy, CLIP-I, CLIP-T);
- `video_metrics`: the measures of a transition (PSNR, SSIM, CLIPSIM, motion, frame identity agreement);
- `checks`: quick checks of a trained pipeline (prompt following, VAE, CSA on/off), and `generate_images`;
- `consistency`: the paper's Table 1 in storyworld; `transitions`: its Table 2; `storyworld`: the storyworld bars.
"""
