"""What runs ahead of ztunnel on a hook and what to do about it (ztunnel.capture.ordering),
without a kernel: hook views built by hand, as attach.py reads them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ztunnel.capture.ordering import (
    AcceptPolicy,
    Attachment,
    AttachMode,
    HookAnalysis,
    HookKind,
    HookStatus,
    HookView,
    Layer,
    Ours,
    ReassertBudget,
    Verdict,
    analyse,
    can_reorder,
    decide,
    hook_detail,
    pod_capture,
)

pytestmark = pytest.mark.unit

OURS = Ours(frozenset({100, 101}))
TCX, CLS = AttachMode.TCX, AttachMode.CLS_BPF


def tcx(name: str, prog_id: int, position: int = 0) -> Attachment:
    return Attachment(Layer.TCX, name, prog_id=prog_id, link_id=prog_id + 1000, position=position)


def tc(name: str, prog_id: int, priority: int, handle: int = 1) -> Attachment:
    return Attachment(Layer.TC, name, prog_id=prog_id, priority=priority, handle=handle)


def xdp(name: str, prog_id: int) -> Attachment:
    return Attachment(Layer.XDP, name, prog_id=prog_id)


OUR_TCX = tcx("capture_pod", 100)
OUR_TC = tc("capture_pod", 100, 1, 0xA7)


def view(
    xdp_: tuple[Attachment, ...] = (),
    tcx_: tuple[Attachment, ...] | None = (),
    tc_: tuple[Attachment, ...] = (),
) -> HookView:
    return HookView("vpod0", 7, xdp_, tcx_, tc_)


def test_tcx_mode_ours_first_is_safe_and_clsact_filters_never_count_as_ahead() -> None:
    cilium_legacy = tc("cil_from_container", 5, 1)
    result = analyse(view(tcx_=(OUR_TCX, tcx("other", 6, 1)), tc_=(cilium_legacy,)), TCX, OURS)
    assert result == HookAnalysis(OUR_TCX, ())
    assert result.safe


def test_tcx_mode_programs_before_ours_and_xdp_are_ahead_in_run_order() -> None:
    before = tcx("cni_pass", 7, 0)
    x = xdp("xdp_lb", 9)
    result = analyse(view(xdp_=(x,), tcx_=(before, tcx("capture_pod2", 101, 1))), TCX, OURS)
    assert result.ours is not None and result.ours.prog_id == 101
    assert result.ahead == (x, before)
    assert not can_reorder(result, TCX, 1)  # nothing moves ahead of XDP
    assert can_reorder(HookAnalysis(result.ours, (before,)), TCX, 1)


def test_cls_bpf_mode_every_tcx_program_and_earlier_filters_are_ahead() -> None:
    t = tcx("cni_tcx", 8)
    earlier = tc("cni_pass", 5, 1, 1)
    later = tc("cni_count", 6, 2)
    result = analyse(view(tcx_=(t,), tc_=(earlier, OUR_TC, later)), CLS, OURS)
    assert result.ours == OUR_TC and result.ahead == (t, earlier)
    assert not can_reorder(result, CLS, 1)  # tcx runs before every clsact filter
    same_priority = HookAnalysis(OUR_TC, (earlier,))
    assert can_reorder(same_priority, CLS, 1)
    lower_priority = HookAnalysis(tc("capture_pod", 100, 10), (tc("cni_pass", 5, 5),))
    assert not can_reorder(lower_priority, CLS, 10)


def test_ours_in_the_wrong_layer_or_missing_means_everything_is_ahead() -> None:
    # In cls_bpf mode, our program as a tcx link (an older agent's) is not "ours attached".
    result = analyse(view(tcx_=(OUR_TCX,), tc_=(tc("x", 5, 1),)), CLS, OURS)
    assert result.ours is None and result.ahead == (tc("x", 5, 1),)
    assert decide(result, CLS, 1, AcceptPolicy(frozenset({"*"})), True) is Verdict.REATTACH
    assert analyse(view(tcx_=None), TCX, OURS) == HookAnalysis(None, ())


def test_verdicts() -> None:
    ahead = HookAnalysis(OUR_TCX, (tcx("cni_pass", 7),))
    nothing = AcceptPolicy()
    assert decide(HookAnalysis(OUR_TCX, ()), TCX, 1, nothing, True) is Verdict.SAFE
    assert decide(ahead, TCX, 1, nothing, True) is Verdict.REORDER
    assert decide(ahead, TCX, 1, nothing, False) is Verdict.REFUSED
    assert decide(ahead, TCX, 1, AcceptPolicy(frozenset({"cni_pass"})), False) is Verdict.ACCEPTED
    assert decide(ahead, TCX, 1, AcceptPolicy(frozenset({"*"})), False) is Verdict.ACCEPTED
    assert decide(ahead, TCX, 1, AcceptPolicy(frozenset({"other"})), False) is Verdict.REFUSED
    two = HookAnalysis(OUR_TCX, (tcx("cni_pass", 7), xdp("xdp_lb", 9)))
    # Accepting one of two programs ahead is not accepting the hook.
    assert decide(two, TCX, 1, AcceptPolicy(frozenset({"cni_pass"})), True) is Verdict.REFUSED


def test_non_bpf_filters_are_accepted_by_kind() -> None:
    u32 = Attachment(Layer.TC, "u32", priority=1, handle=0x800)
    assert AcceptPolicy(frozenset({"u32"})).accepts(u32)
    assert "u32 filter at priority 1 handle 0x800" in u32.describe()


@given(st.lists(st.floats(min_value=0, max_value=1000), max_size=40))
def test_budget_never_allows_more_than_its_limit_within_a_window(times: list[float]) -> None:
    budget = ReassertBudget(limit=3, window=60.0)
    spent: list[float] = []
    for now in sorted(times):
        if budget.allows(now):
            budget.spend(now)
            spent.append(now)
    for i, start in enumerate(spent):
        assert sum(1 for t in spent[i:] if t - start < 60.0) <= 3


def test_budget_refills_as_the_window_moves_on() -> None:
    budget = ReassertBudget(limit=2, window=10.0)
    for now in (0.0, 1.0):
        assert budget.allows(now)
        budget.spend(now)
    assert not budget.allows(9.9) and budget.spent == 2
    assert budget.allows(10.0) and budget.spent == 1


def status(verdict: Verdict, ahead: tuple[Attachment, ...] = (), **kw: object) -> HookStatus:
    return HookStatus("vpod0", HookKind.POD, CLS, verdict, ahead, **kw)  # type: ignore[arg-type]


def test_refused_detail_names_interface_program_priority_and_both_ways_out() -> None:
    text = hook_detail(status(Verdict.REFUSED, (tc("cni_pass", 42, 5),), note="why"))
    for word in (
        "vpod0 ingress",
        "pod hook",
        "cls_bpf",
        "program 'cni_pass' (id 42)",
        "priority 5",
        "(why)",
        "refused (fail closed)",
        "tc filter show dev vpod0 ingress",
        "--capture-allow-ahead=cni_pass",
    ):
        assert word in text, (word, text)
    xdp_text = hook_detail(status(Verdict.REFUSED, (xdp("xdp_lb", 9),)))
    assert "ip link set dev vpod0 xdp off" in xdp_text
    tcx_text = hook_detail(status(Verdict.REFUSED, (tcx("cni_tcx", 8),)))
    assert "--capture-attach" in tcx_text and "tcx program 'cni_tcx' (id 8) at position 0" in (
        tcx_text
    )
    assert "risk accepted" in hook_detail(status(Verdict.ACCEPTED, (xdp("xdp_lb", 9),)))
    assert hook_detail(status(Verdict.SAFE)).endswith("ztunnel runs first")


def test_pod_capture_combines_the_pod_hook_and_the_uplink() -> None:
    safe = status(Verdict.SAFE)
    uplink = HookStatus("eth0", HookKind.UPLINK, CLS, Verdict.SAFE)
    refused_uplink = HookStatus("eth0", HookKind.UPLINK, CLS, Verdict.REFUSED, (xdp("x", 3),))
    accepted = status(Verdict.ACCEPTED, (tc("cni", 4, 1),))
    assert pod_capture(True, safe, uplink).ok
    assert pod_capture(True, safe, None).detail == "captured: ztunnel runs first on vpod0"
    assert "not enrolled" in pod_capture(False, safe, uplink).detail
    bad = pod_capture(True, safe, refused_uplink)
    assert not bad.ok and "eth0 ingress (uplink hook" in bad.detail
    ok = pod_capture(True, accepted, uplink)
    assert ok.ok and "risk accepted" in ok.detail
    assert not pod_capture(True, None, uplink).ok  # not checked yet: not safe
    assert pod_capture(True, status(Verdict.REFUSED), uplink).to_json()["ok"] is False


def test_status_json_is_what_ctl_and_the_metrics_read() -> None:
    data = status(Verdict.REFUSED, (tc("cni_pass", 42, 5),), reorders=2).to_json()
    assert data["interface"] == "vpod0" and data["hook"] == "pod" and data["mode"] == "cls_bpf"
    assert data["state"] == "refused" and data["ok"] is False and data["reorders"] == 2
    assert data["ahead"] == ["tc program 'cni_pass' (id 42) at priority 5 handle 0x1"]
