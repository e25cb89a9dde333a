"""What runs ahead of our programs on a hook, and what to do about it (pure, no I/O).

A packet entering an interface meets, in this order (net/core/dev.c): the XDP program of
the device, then the tcx chain of its ingress hook (Linux 6.6+, `bpf_mprog`, in chain order),
then -- only if every tcx program returned TCX_NEXT -- the filters of the clsact qdisc's
ingress hook, by ascending priority and, within one priority, in the order the kernel lists
them. Anything that runs before our program on a hook we depend on can pass, drop or
redirect a packet before we see it, so an enrolled pod behind such a hook is not safely
captured. `analyse()` lists those attachments from a `HookView` (what attach.py read from
the kernel); `decide()` turns the list into a `Verdict`, given what the kernel lets us
re-order and what the operator accepted (`AcceptPolicy`); `ReassertBudget` bounds how often
we move ours back to the front (another agent insisting on the front must not make us
flap forever); `hook_detail()` / `pod_capture()` write what people and the controller read.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


class AttachMode(enum.Enum):
    """How our ingress programs are attached: tcx links (6.6+) or cls_bpf filters."""

    TCX = "tcx"
    CLS_BPF = "cls_bpf"


class Layer(enum.Enum):
    """Where on a hook an attachment sits, in the order the kernel runs them."""

    XDP = "xdp"
    TCX = "tcx"
    TC = "tc"


@dataclass(frozen=True, slots=True)
class Attachment:
    """One program (or non-BPF tc filter) on a hook.

    `name` is the BPF program's name, or the filter kind for a non-BPF tc filter (u32,
    flower, matchall), which has no program (`prog_id` 0).
    """

    layer: Layer
    name: str
    prog_id: int = 0
    priority: int = 0  # tc: the filter's priority (lower runs first)
    handle: int = 0  # tc: the filter's handle
    link_id: int = 0  # tcx: the link holding it (0: attached without a link)
    position: int = 0  # tcx: index in the chain; tc: index in the listing

    def describe(self) -> str:
        """How people find it: `bpftool prog show id N`, `tc filter show dev X ingress`."""
        prog = f"program {self.name!r} (id {self.prog_id})" if self.prog_id else ""
        if self.layer is Layer.XDP:
            return f"XDP {prog}"
        if self.layer is Layer.TCX:
            link = f", link id {self.link_id}" if self.link_id else ", no link"
            return f"tcx {prog} at position {self.position}{link}"
        what = prog or f"{self.name} filter"
        return f"tc {what} at priority {self.priority} handle {self.handle:#x}"


@dataclass(frozen=True, slots=True)
class HookView:
    """What is attached to one ingress hook, each layer in run order.

    `tcx` is None on kernels without tcx; `tc` lists chain 0 of the clsact ingress hook
    (other chains run only when a chain-0 filter jumps there).
    """

    ifname: str
    ifindex: int
    xdp: tuple[Attachment, ...] = ()
    tcx: tuple[Attachment, ...] | None = None
    tc: tuple[Attachment, ...] = ()
    tcx_revision: int = 0


@dataclass(frozen=True, slots=True)
class Ours:
    """How to recognise our own attachments: the kernel ids of our loaded programs."""

    prog_ids: frozenset[int]

    def owns(self, att: Attachment) -> bool:
        return att.prog_id != 0 and att.prog_id in self.prog_ids


@dataclass(frozen=True, slots=True)
class HookAnalysis:
    """Our attachment on a hook (None: missing) and everything that runs before it."""

    ours: Attachment | None
    ahead: tuple[Attachment, ...]

    @property
    def safe(self) -> bool:
        return self.ours is not None and not self.ahead


def analyse(view: HookView, mode: AttachMode, ours: Ours) -> HookAnalysis:
    """Finds our program in the run order of a hook and what runs before it.

    In tcx mode ours is the first of our programs in the tcx chain; the clsact filters
    run after the whole chain, so they are never ahead. In cls_bpf mode ours is the first
    of our filters in the clsact listing, and every tcx program runs ahead of it.
    When ours is missing, everything on the hook counts as ahead.
    """
    run_order: list[Attachment] = list(view.xdp)
    tcx = list(view.tcx or ())
    layer_of_ours = tcx if mode is AttachMode.TCX else list(view.tc)
    run_order += tcx
    if mode is AttachMode.CLS_BPF:
        run_order += view.tc
    for index, att in enumerate(run_order):
        if ours.owns(att) and any(att is a for a in layer_of_ours):
            return HookAnalysis(att, tuple(a for a in run_order[:index] if not ours.owns(a)))
    return HookAnalysis(None, tuple(a for a in run_order if not ours.owns(a)))


class Verdict(enum.Enum):
    """What a check concludes for one hook."""

    SAFE = "safe"  # ours runs first
    REATTACH = "reattach"  # ours is gone (qdisc flushed, filter deleted): attach again
    REORDER = "reorder"  # something is ahead and we may move ours back to the front
    ACCEPTED = "accepted"  # something is ahead, we cannot move, the operator accepted it
    REFUSED = "refused"  # something is ahead, we cannot move: fail closed


@dataclass(frozen=True, slots=True)
class AcceptPolicy:
    """Which programs the operator accepts ahead of ours (`--capture-allow-ahead`).

    Empty (the default) accepts nothing; "*" accepts anything. Names are BPF program
    names as `bpftool prog` shows them, or tc filter kinds (u32, flower, ...) for
    non-BPF filters.
    """

    names: frozenset[str] = frozenset()

    ANY = "*"

    @property
    def accepts_any(self) -> bool:
        return self.ANY in self.names

    def accepts(self, att: Attachment) -> bool:
        return self.accepts_any or att.name in self.names

    def accepts_all(self, atts: Iterable[Attachment]) -> bool:
        return all(self.accepts(a) for a in atts)


def can_reorder(analysis: HookAnalysis, mode: AttachMode, our_priority: int) -> bool:
    """Whether attaching ours again can put it in front of everything ahead.

    tcx: yes unless an XDP program is ahead (XDP always runs first). cls_bpf: only when
    everything ahead is a filter of our own priority (the kernel runs a filter added later
    to a priority before the older ones; whether it did is checked afterwards); never past
    XDP, tcx or a lower priority.
    """
    if analysis.ours is None:
        return False
    if mode is AttachMode.TCX:
        return all(a.layer is Layer.TCX for a in analysis.ahead)
    return all(a.layer is Layer.TC and a.priority == our_priority for a in analysis.ahead)


def decide(
    analysis: HookAnalysis,
    mode: AttachMode,
    our_priority: int,
    policy: AcceptPolicy,
    may_reorder: bool,
) -> Verdict:
    """The verdict for one hook. `may_reorder` is False when the re-assert budget is spent
    or a re-order was just tried and did not put ours first."""
    if analysis.ours is None:
        return Verdict.REATTACH
    if not analysis.ahead:
        return Verdict.SAFE
    if may_reorder and can_reorder(analysis, mode, our_priority):
        return Verdict.REORDER
    if policy.accepts_all(analysis.ahead):
        return Verdict.ACCEPTED
    return Verdict.REFUSED


@dataclass
class ReassertBudget:
    """At most `limit` re-orders of one hook per `window` seconds (time is passed in).

    Another component that also insists on the front of the chain would otherwise make
    both of us re-insert forever; once the budget is spent the hook is refused (or
    accepted) until the window has moved on.
    """

    limit: int = 3
    window: float = 60.0
    _times: deque[float] = field(default_factory=deque)

    def allows(self, now: float) -> bool:
        while self._times and now - self._times[0] >= self.window:
            self._times.popleft()
        return len(self._times) < self.limit

    def spend(self, now: float) -> None:
        self._times.append(now)

    @property
    def spent(self) -> int:
        return len(self._times)


class HookKind(enum.Enum):
    POD = "pod"  # node side of a pod veth: the pod's outbound, and inbound from the node
    UPLINK = "uplink"  # the node's uplink: inbound from other nodes


@dataclass(frozen=True, slots=True)
class HookStatus:
    """The outcome of the last check of one hook, as reported everywhere."""

    ifname: str
    kind: HookKind
    mode: AttachMode
    verdict: Verdict
    ahead: tuple[Attachment, ...] = ()
    reorders: int = 0  # re-orders of this hook within the budget window
    note: str = ""  # e.g. why a re-order did not help

    @property
    def ok(self) -> bool:
        """Whether traffic behind this hook is captured (or the operator accepted the risk)."""
        return self.verdict in (Verdict.SAFE, Verdict.ACCEPTED)

    @property
    def refused(self) -> bool:
        return self.verdict is Verdict.REFUSED

    def to_json(self) -> dict[str, object]:
        return {
            "interface": self.ifname,
            "hook": self.kind.value,
            "mode": self.mode.value,
            "state": self.verdict.value,
            "ok": self.ok,
            "ahead": [a.describe() for a in self.ahead],
            "reorders": self.reorders,
            "detail": hook_detail(self),
        }


def _names(ahead: Sequence[Attachment]) -> str:
    return ", ".join(a.describe() for a in ahead)


def _fix(status: HookStatus) -> str:
    names = sorted({a.name for a in status.ahead})
    layers = {a.layer for a in status.ahead}
    if Layer.XDP in layers:
        how = (
            f"detach the XDP program from {status.ifname}"
            f" (`ip link set dev {status.ifname} xdp off`)"
        )
    elif status.mode is AttachMode.CLS_BPF and Layer.TCX in layers:
        how = (
            "let ztunnel use tcx (--capture-attach auto/tcx): on this kernel tcx programs run"
            " before every clsact filter"
        )
    elif status.mode is AttachMode.CLS_BPF:
        how = (
            "move the other filter behind ztunnel's priority"
            f" (tc filter show dev {status.ifname} ingress)"
        )
    else:
        how = "stop the other component from attaching ahead of ztunnel at the front of the chain"
    return (
        f"fix: {how}; or accept the risk explicitly with"
        f" --capture-allow-ahead={','.join(names) or '*'}"
    )


def hook_detail(status: HookStatus) -> str:
    """One line for logs, readiness, `ztunnel ctl capture` and the enrolment records."""
    where = f"{status.ifname} ingress ({status.kind.value} hook, {status.mode.value})"
    if status.verdict is Verdict.SAFE:
        return f"{where}: ztunnel runs first"
    if status.verdict is Verdict.REATTACH:
        return f"{where}: ztunnel's program is missing and is being attached again"
    ahead = _names(status.ahead)
    if status.verdict is Verdict.REORDER:
        return f"{where}: {ahead} runs ahead of ztunnel; moving ztunnel back to the front"
    if status.verdict is Verdict.ACCEPTED:
        return (
            f"{where}: {ahead} runs ahead of ztunnel and may see, pass or redirect packets"
            " before capture (risk accepted with --capture-allow-ahead)"
        )
    note = f" ({status.note})" if status.note else ""
    return (
        f"{where}: {ahead} runs ahead of ztunnel and cannot be moved behind it{note};"
        " new connections of the pods behind this hook are refused (fail closed). " + _fix(status)
    )


@dataclass(frozen=True, slots=True)
class PodCapture:
    """The `"capture"` member of a pod record of the enrolment API."""

    ok: bool
    detail: str

    def to_json(self) -> dict[str, object]:
        return {"ok": self.ok, "detail": self.detail}


def pod_capture(
    enrolled: bool, pod_hook: HookStatus | None, uplink: HookStatus | None
) -> PodCapture:
    """Whether a pod's traffic is (or, not enrolled, would be) safely captured, and why.

    A pod depends on its own veth hook (its outbound, and inbound from pods of the node)
    and on the uplink hook (inbound from other nodes). `ok` is False while either is
    refused or not yet checked, and True when both are safe or their risk was accepted.
    """
    hooks = [h for h in (pod_hook, uplink) if h is not None]
    problems = [h for h in hooks if not h.ok]
    accepted = [h for h in hooks if h.verdict is Verdict.ACCEPTED]
    if pod_hook is None:
        return PodCapture(False, "the pod's veth has not been checked yet")
    if problems:
        return PodCapture(False, " | ".join(hook_detail(h) for h in problems))
    state = "captured" if enrolled else "not enrolled; capture would be safe"
    if accepted:
        return PodCapture(True, f"{state}; " + " | ".join(hook_detail(h) for h in accepted))
    return PodCapture(True, f"{state}: ztunnel runs first on {', '.join(h.ifname for h in hooks)}")
