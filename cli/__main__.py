"""`python -m pdserve.cli` is the `pdserve` command."""

import sys

from pdserve.cli import main

sys.exit(main())
