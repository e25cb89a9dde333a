"""`python -m ztunnel.capture load`: the short-lived BPF loader process (see `loader`)."""

from __future__ import annotations

import sys

from ztunnel.capture.loader import main

if __name__ == "__main__":
    if sys.argv[1:] != ["load"]:
        sys.exit("usage: python -m ztunnel.capture load  (a JSON request on stdin)")
    sys.exit(main())
