"""sdlite: StoryDiffusion built from scratch."""
__version__ = "0.1.0"
