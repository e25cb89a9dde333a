"""Running `ztunnel analyze` in-process, as a user would, with its three outputs captured."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from ztunnel.analyze import command, kube

TESTDATA = Path(__file__).parent / "testdata"


@dataclass
class Run:
    rc: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()


class _Stdin(io.StringIO):
    def isatty(self) -> bool:
        return False


Analyze = Callable[..., Run]


@pytest.fixture
def analyze(monkeypatch: pytest.MonkeyPatch) -> Analyze:
    """`analyze(*args, stdin="", fetch=None)`, run in the testdata directory so that file
    references read as a user who typed the name would see them."""
    monkeypatch.chdir(TESTDATA)
    monkeypatch.setenv("TERM", "dumb")

    def run(*args: str, stdin: str = "", fetch: kube.Fetch | None = None) -> Run:
        out, err = io.StringIO(), io.StringIO()
        rc = command.main(list(args), _Stdin(stdin), out, err, fetch)
        return Run(rc, out.getvalue(), err.getvalue())

    return run
