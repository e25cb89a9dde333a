"""What `istioctl analyze` writes: messages in log, JSON or YAML form on stdout
(istio/istio istioctl/pkg/util/formatting/formatter.go), and on stderr the summary that ends
the run (istioctl/pkg/analyze/analyze.go: `AnalyzerFoundIssuesError`, `FileParseError`, the
"No validation issues found" lines)."""

from __future__ import annotations

import json
from collections.abc import Sequence

import yaml

from ztunnel.analyze.messages import ANALYSIS_REFERENCE, Message

FORMATS = ("log", "json", "yaml")
FILE_PARSE_ERROR = "Some files couldn't be parsed."


def render(messages: Sequence[Message], fmt: str, color: bool = False) -> str:
    """The block istioctl prints with `Println` (so one more newline follows it)."""
    if fmt == "json":
        return _go_json(
            json.dumps(
                [m.unstructured() for m in messages],
                indent="\t",
                sort_keys=True,
                ensure_ascii=False,
            )
        )
    if fmt == "yaml":
        if not messages:
            return "[]\n"
        return yaml.safe_dump(
            [m.unstructured() for m in messages],
            sort_keys=True,
            allow_unicode=True,
            default_flow_style=False,
        )
    return "\n".join(m.render(color) for m in messages)


def _go_json(text: str) -> str:
    """encoding/json escapes HTML characters and the Unicode line separators."""
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(ch, esc)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def target(namespace: str | None) -> str:
    """`analyzeTargetAsString`."""
    return "all namespaces" if namespace is None else f"namespace: {namespace}"


def issues_found(namespace: str | None) -> str:
    """`AnalyzerFoundIssuesError`, as cobra prints a command's error."""
    return (
        f"Error: Analyzers found issues when analyzing {target(namespace)}.\n"
        f"See {ANALYSIS_REFERENCE} for more information about causes and resolutions."
    )


def no_issues(namespace: str | None, files: Sequence[str], parse_errors: int) -> str:
    if parse_errors:
        noun = "file" if parse_errors == 1 else "files"
        return (
            f"No validation issues found when analyzing {target(namespace)} "
            f"(but {parse_errors} {noun} could not be parsed)."
        )
    if len(files) > 1:
        listing = "\n  - ".join(files)
        return f"\u2714 No validation issues found when analyzing:\n  - {listing}"
    if files:
        return f"\u2714 No validation issues found when analyzing {files[0]}."
    return f"\u2714 No validation issues found when analyzing {target(namespace)}."


def adding_files_errors(errors: Sequence[str]) -> str:
    """`Error(s) adding files: ` with go-multierror's list format."""
    head = "1 error occurred" if len(errors) == 1 else f"{len(errors)} errors occurred"
    points = "\n\t".join(f"* {e}" for e in errors)
    return f"Error(s) adding files: {head}:\n\t{points}\n\n"
