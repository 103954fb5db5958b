"""`python -m sdlite.cli` is the `sdlite` command."""
import sys

from . import main

sys.exit(main())
