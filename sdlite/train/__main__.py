"""`python -m sdlite.train <what> ...` (the parsers live in `sdlite.cli.train`)."""
import sys

from ..cli.train import main

sys.exit(main())
