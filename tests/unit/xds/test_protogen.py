"""The generated protobuf code in ztunnel/xds/gen matches what proto/ generates now."""

from __future__ import annotations

import pytest

from ztunnel.xds import protogen

pytestmark = pytest.mark.unit


def test_committed_generated_code_is_current() -> None:
    stale = protogen.stale()
    assert not stale, (
        f"ztunnel/xds/gen is stale ({', '.join(stale)}): run `python -m ztunnel.xds.protogen`"
    )
