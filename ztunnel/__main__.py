"""`python -m ztunnel` is the `ztunnel` command."""

import sys

from ztunnel.cli import main

sys.exit(main())
