"""`python -m tapestry_cli` is the `tapestry` command."""

import sys

from tapestry_cli.main import main

sys.exit(main())
