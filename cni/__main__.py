"""`python -m cni`: the `ztunnel-cni` command."""

import sys

from cni.main import main

sys.exit(main())
