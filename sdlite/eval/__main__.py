"""`python -m sdlite.eval <table> ...` (the parsers live in `sdlite.cli.eval`)."""
import sys

from ..cli.eval import main

sys.exit(main())
