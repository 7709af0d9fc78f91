"""`python -m accman ...` is the `accman` command."""

import sys

from accman.cli import main

sys.exit(main())
