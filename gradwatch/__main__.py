"""`python -m gradwatch`: the `gradwatch` command line."""

import sys

from gradwatch.cli import main

sys.exit(main())
