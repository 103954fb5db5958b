"""Everything that steps an optimizer or writes a checkpoint: `python -m sdlite.train <what>`.

- `loop`: the toolkit every trainer uses (checkpoint save/resume in one format, CSV log, schedules, accelerator);
- `storyworld`: storyworld's VAE, CLIP and VAE decoder, and the export of the pipeline; `recipe`: every stage in order;
- `unet`: the UNet's collage pre-training through attention (what makes CSA work in storyworld);
- `recognizer`: the attribute scorers; `motion`: the clip cache and the semantic motion predictor;
- `video`: the video decoder.
"""
