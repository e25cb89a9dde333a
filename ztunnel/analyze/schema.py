"""Schema messages: resources the config model refused (IST0106 SchemaValidationError, one
per bad resource, naming the field) and what it accepted with a warning, such as fields this
mesh does not implement (IST0133 SchemaWarning). istioctl's texts come from Istio's validation
(pkg/config/validation); these come from the model's, with the field path in front."""

from __future__ import annotations

from ztunnel.analyze import messages as msg
from ztunnel.analyze.context import Analyzer, Context
from ztunnel.analyze.messages import Message
from ztunnel.meshconfig.resource import ResourceMeta


def _text(path: str, reason: str) -> str:
    return f"{path}: {reason}" if path else reason


def validation(ctx: Context) -> None:
    for e in ctx.parse_errors:
        if e.meta is None:
            continue  # not a resource at all: reported as a file that could not be parsed
        text = msg.SchemaValidationError.format(_text(e.field_path, e.reason))
        ctx.messages.append(Message(msg.SchemaValidationError, text, ctx.ref(e.meta), e.line))
    by_label: dict[tuple[str, str], ResourceMeta] = {}
    for r in ctx.cs.resources():
        meta: ResourceMeta = r.meta
        by_label.setdefault((meta.origin.file, meta.label), meta)
    for w in ctx.cs.warnings:
        found = by_label.get((w.file, w.resource))
        if found is None:
            continue  # the resource was refused: its IST0106 says why
        text = msg.SchemaWarning.format(_text(w.path, w.message))
        ctx.messages.append(Message(msg.SchemaWarning, text, ctx.ref(found), w.line))


ANALYZERS = (
    Analyzer(
        "schema.ValidationAnalyzer",
        "Runs schema validation as an analyzer on every resource",
        (),
        validation,
    ),
)
