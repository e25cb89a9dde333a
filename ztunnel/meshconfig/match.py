"""String matching of Istio's traffic-management API (`StringMatch`: exact, prefix, regex) and
of the Gateway API (Exact, PathPrefix, RegularExpression), as immutable matchers.

Regular expressions are RE2 in Istio; Python's `re` accepts the RE2 syntax used in practice
(no backreferences or lookarounds are written in RE2), and matches the whole value as Envoy
does (`fullmatch`)."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any

from ztunnel.meshconfig.resource import Fields


class MatchKind(enum.Enum):
    EXACT = "exact"
    PREFIX = "prefix"
    REGEX = "regex"
    PRESENT = "present"  # Istio: an empty StringMatch on a header means "present"
    SEGMENT_PREFIX = "segment_prefix"  # Gateway API PathPrefix: whole path segments


@dataclass(frozen=True, slots=True)
class StringMatch:
    kind: MatchKind
    value: str = ""
    ignore_case: bool = False
    pattern: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def exact(cls, value: str, ignore_case: bool = False) -> StringMatch:
        return cls(MatchKind.EXACT, value, ignore_case)

    @classmethod
    def prefix(cls, value: str, ignore_case: bool = False) -> StringMatch:
        return cls(MatchKind.PREFIX, value, ignore_case)

    @classmethod
    def present(cls) -> StringMatch:
        return cls(MatchKind.PRESENT)

    @classmethod
    def regex(cls, value: str, ignore_case: bool = False) -> StringMatch:
        flags = re.IGNORECASE if ignore_case else 0
        return cls(MatchKind.REGEX, value, ignore_case, re.compile(value, flags))

    @classmethod
    def segment_prefix(cls, value: str) -> StringMatch:
        return cls(MatchKind.SEGMENT_PREFIX, value.rstrip("/") if value != "/" else "/")

    def matches(self, value: str | None) -> bool:
        if value is None:
            return False
        k = self.kind
        if k is MatchKind.PRESENT:
            return True
        if k is MatchKind.REGEX:
            assert self.pattern is not None
            return self.pattern.fullmatch(value) is not None
        want = self.value
        if self.ignore_case:
            value, want = value.lower(), want.lower()
        if k is MatchKind.EXACT:
            return value == want
        if k is MatchKind.PREFIX:
            return value.startswith(want)
        # Gateway API PathPrefix: `/foo` matches `/foo`, `/foo/` and `/foo/bar`, not `/foobar`.
        if want == "/":
            return value.startswith("/")
        return value == want or value.startswith(want + "/")

    def covers(self, other: StringMatch) -> bool:
        """Whether every value `other` matches is also matched by this (conservative: False
        when unsure). Used to find matches that can never be reached."""
        if self.kind is MatchKind.PRESENT:
            return True
        if self.ignore_case != other.ignore_case and self.kind is not MatchKind.REGEX:
            return False
        if other.kind is MatchKind.EXACT:
            return self.kind is not MatchKind.REGEX and self.matches(other.value)
        if self.kind is MatchKind.PREFIX and other.kind in (
            MatchKind.PREFIX,
            MatchKind.SEGMENT_PREFIX,
        ):
            return other.value.startswith(self.value)
        if self.kind is MatchKind.SEGMENT_PREFIX and other.kind is MatchKind.SEGMENT_PREFIX:
            return self.matches(other.value)
        return self == other

    def __str__(self) -> str:
        return "present" if self.kind is MatchKind.PRESENT else f"{self.kind.value}:{self.value}"


def read_string_match(
    f: Fields, raw: Any, path: str, ignore_case: bool = False, allow_empty: bool = False
) -> StringMatch:
    """Istio `StringMatch`: exactly one of exact, prefix, regex (an empty one only where
    `allow_empty`: header presence)."""
    obj = f.mapping(raw, path, required=True)
    f.check_keys(obj, path, ("exact", "prefix", "regex"))
    present = [k for k in ("exact", "prefix", "regex") if obj.get(k) is not None]
    if not present:
        if allow_empty:
            return StringMatch.present()
        raise f.fail(path, "needs one of exact, prefix, regex")
    if len(present) > 1:
        raise f.fail(path, f"only one of exact, prefix, regex may be set, got {present}")
    kind = present[0]
    value = f.string(obj[kind], f"{path}.{kind}", empty=kind != "regex")
    if kind == "exact":
        return StringMatch.exact(value, ignore_case)
    if kind == "prefix":
        return StringMatch.prefix(value, ignore_case)
    try:
        return StringMatch.regex(value, ignore_case)
    except re.error as e:
        raise f.fail(f"{path}.regex", f"invalid regular expression: {e}") from None
