/* Transparent TCP capture for the node agent: tc (SCHED_CLS, direct-action) programs that hand
 * packets of enrolled pods to the agent's IP_TRANSPARENT listeners with bpf_sk_assign.
 *
 * Attach points, in the node network namespace (ztunnel/capture/attach.py): with tcx links
 * (Linux 6.6+, at the front of the hook's chain) or as cls_bpf filters of a clsact qdisc
 * (the first priority) on older kernels:
 *   capture_pod    node side of every pod veth, ingress (= packets leaving the pod);
 *   capture_uplink the node's uplink, ingress (packets arriving from other nodes);
 *   capture_guard  egress of both (packets the node forwards), a second line of defence.
 * capture_pod2 and capture_uplink2 are the same code under another program: a bpf_mprog
 * (tcx) chain holds a program only once, so moving ours back to the front of a chain
 * (after something was inserted ahead of it) attaches the other copy first and then
 * releases the old link, without a moment in which neither runs.
 *
 * How a packet is captured (the sk_assign recipe of shared/PLATFORM.md): look up a socket of
 * the node namespace for the packet's 4-tuple (bpf_skc_lookup_tcp). A non-listening socket
 * (established, SYN-RECV, TIME-WAIT, or the agent's own spoofed-source SYN-SENT socket) gets
 * the packet; a new connection (a bare SYN) gets the right agent listener taken from the
 * `listeners` sockmap. The packet is then marked with CAPTURE_MARK so that the node's policy
 * routing (`ip rule fwmark CAPTURE_MARK lookup T` + `local 0.0.0.0/0 dev lo table T`) delivers
 * it locally instead of forwarding it; the accepted socket keeps the original destination as
 * its local address, which is how the agent learns it (getsockname()).
 *
 * Fail mode, when the listener slot is empty (the agent is not running: closing a socket
 * removes it from a sockmap):
 *   FAIL_CLOSED (default) the SYN is dropped, so an enrolled pod never talks in plaintext past
 *                         the agent, and nothing reaches an enrolled pod around the agent;
 *   FAIL_OPEN             the SYN passes untouched and the connection goes direct.
 * Only new connections are affected: a non-SYN segment without a socket always passes, so
 * connections that existed before a pod was enrolled keep working.
 *
 * Refused pods (the agent found another program running ahead of ours on a hook we depend
 * on and could not move ours back to the front; see ztunnel/capture/ordering.py): the
 * `unsafe_pods` map holds the addresses of pods whose veth hook is not safe, and the
 * capture_config slot CONFIG_GUARD says whether any pod is unsafe (GUARD_PODS) or the uplink
 * hook is (GUARD_UPLINK, which makes every enrolled pod unsafe). A new connection between an
 * unsafe address and an enrolled pod is dropped wherever our programs see it, and
 * capture_guard drops every forwarded TCP segment (no local socket) of such pairs on egress:
 * what bypassed our ingress programs (passed or redirected by the program ahead) cannot leave
 * the node in plaintext, nor reach an enrolled pod around the agent. Independently of any
 * check, capture_guard also drops what visibly escaped capture (see there), which closes the
 * window between a program being inserted ahead of ours and the next check.
 *
 * Known limits: a SYN that reuses the 4-tuple of an agent socket still in TIME-WAIT goes to
 * that socket, which answers with its TIME-WAIT ACK; the client's RST clears it and the
 * retransmitted SYN (about 1 s later) is captured normally. SYN cookies cannot work for
 * captured connections (the cookie's ACK finds no socket, so it passes). A program ahead of
 * ours that hands packets straight to another namespace (bpf_redirect_peer) bypasses the
 * guard too: only the ordering check catches that case.
 *
 * Everything the programs do not take is returned with TC_ACT_UNSPEC (= TCX_NEXT), which lets
 * the next program of the same hook (a primary CNI's) run; captured packets end the chain
 * with TC_ACT_OK (= TCX_PASS) because a later redirect would undo the socket assignment. The
 * TC_ACT_* and TCX_* verdicts have the same values (include/uapi/linux/bpf.h, enum
 * tcx_action_base), so one program serves both attach kinds.
 *
 * Configuration comes only from -D flags (CaptureConfig.cflags in ztunnel/capture/config.py):
 * CAPTURE_MARK, HBONE_PORT, MAX_PODS, MAX_NODE_ADDRS, and PIN_DIR (a string; when set, every
 * map is pinned there, and reused if already pinned, so a restarted agent finds the live
 * state). The loader process (ztunnel/capture/loader.py) pins the programs next to the
 * maps, under their function names; the agent opens all of them from there.
 * IPv4 only: IPv6 packets are never captured.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/tcp.h>

#ifndef CAPTURE_MARK
#error "CAPTURE_MARK must be given with -DCAPTURE_MARK=<mark>"
#endif
#ifndef HBONE_PORT
#define HBONE_PORT 15008
#endif
#ifndef MAX_PODS
#define MAX_PODS 4096
#endif
#ifndef MAX_NODE_ADDRS
#define MAX_NODE_ADDRS 64
#endif

/* Sockmap slots; keep in sync with ListenerSlot in ztunnel/capture/config.py. */
#define SLOT_OUTBOUND 0
#define SLOT_INBOUND 1
#define SLOT_HBONE 2
#define SLOT_COUNT 3

/* Config array slots; keep in sync with CONFIG_* and GUARD_* in ztunnel/capture/objects.py. */
#define CONFIG_FAIL_MODE 0
#define CONFIG_GUARD 1
#define CONFIG_COUNT 4
#define FAIL_CLOSED 0
#define FAIL_OPEN 1
#define GUARD_UPLINK 1 /* the uplink hook is not safe: every enrolled pod is refused */
#define GUARD_PODS 2   /* some address is in unsafe_pods */

/* Value of the enrolled-pods map, keyed by the pod's IPv4 address (network byte order);
 * keep in sync with MAP_LAYOUTS in ztunnel/capture/objects.py. */
struct pod_info {
    u32 host_ifindex; /* node side of the pod's veth, for diagnostics */
    u32 flags;        /* reserved */
};

#ifdef PIN_DIR
#define CAPTURE_TABLE(_type, _key, _leaf, _name, _max) \
    BPF_TABLE_PINNED(_type, _key, _leaf, _name, _max, PIN_DIR "/" #_name)
#else
#define CAPTURE_TABLE(_type, _key, _leaf, _name, _max) BPF_TABLE(_type, _key, _leaf, _name, _max)
#endif

CAPTURE_TABLE("hash", u32, struct pod_info, enrolled_pods, MAX_PODS);
CAPTURE_TABLE("hash", u32, u32, node_addrs, MAX_NODE_ADDRS);
CAPTURE_TABLE("array", u32, u32, capture_config, CONFIG_COUNT);
/* Pods (IPv4, network byte order) whose veth hook is not safe -> that veth's ifindex. */
CAPTURE_TABLE("hash", u32, u32, unsafe_pods, MAX_PODS);
/* bcc 0.26: BPF_SOCKMAP has no lookup in C; a plain sockmap table does (PLATFORM.md). */
CAPTURE_TABLE("sockmap", u32, u32, listeners, SLOT_COUNT);

struct flow {
    struct bpf_sock_tuple tuple; /* addresses and ports in network byte order */
    int syn;                     /* SYN without ACK: the first packet of a connection */
};

/* Parses Ethernet/IPv4/TCP; returns 0 for anything else (and for non-first fragments). */
static __always_inline int parse_flow(struct __sk_buff *skb, struct flow *f)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end || eth->h_proto != htons(ETH_P_IP))
        return 0;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > data_end || ip->protocol != IPPROTO_TCP || ip->ihl < 5)
        return 0;
    if (ip->frag_off & htons(0x1fff)) /* IP_OFFSET: no TCP header in this fragment */
        return 0;
    struct tcphdr *tcp = (void *)ip + ip->ihl * 4;
    if ((void *)(tcp + 1) > data_end)
        return 0;
    f->tuple.ipv4.saddr = ip->saddr;
    f->tuple.ipv4.daddr = ip->daddr;
    f->tuple.ipv4.sport = tcp->source;
    f->tuple.ipv4.dport = tcp->dest;
    f->syn = tcp->syn && !tcp->ack;
    return 1;
}

static __always_inline int is_enrolled(u32 addr)
{
    return enrolled_pods.lookup(&addr) != NULL;
}

static __always_inline int is_node_addr(u32 addr)
{
    return node_addrs.lookup(&addr) != NULL;
}

static __always_inline int fail_open(void)
{
    u32 key = CONFIG_FAIL_MODE;
    u32 *mode = capture_config.lookup(&key);
    return mode && *mode == FAIL_OPEN;
}

static __always_inline int fail_verdict(void)
{
    return fail_open() ? TC_ACT_UNSPEC : TC_ACT_SHOT;
}

static __always_inline u32 guard_flags(void)
{
    u32 key = CONFIG_GUARD;
    u32 *flags = capture_config.lookup(&key);
    return flags ? *flags : 0;
}

/* Whether new connections of `addr` with enrolled pods are refused (see the header). */
static __always_inline int is_refused(u32 addr, u32 guard)
{
    if ((guard & GUARD_UPLINK) && is_enrolled(addr))
        return 1;
    return (guard & GUARD_PODS) && unsafe_pods.lookup(&addr) != NULL;
}

static __always_inline int refused_pair(struct flow *f, u32 guard)
{
    return guard && (is_refused(f->tuple.ipv4.saddr, guard) ||
                     is_refused(f->tuple.ipv4.daddr, guard));
}

/* Gives the packet to a non-listening socket of its own 4-tuple, if there is one.
 * Returns 1 when assigned, 0 when no such socket, -1 when the assignment failed.
 * Listening sockets are skipped: a 0.0.0.0 listener matches any destination address, and a
 * new connection must go to the agent listener chosen by direction, not to whatever
 * happens to listen on the destination port in the node namespace. */
static __always_inline int assign_existing(struct __sk_buff *skb, struct flow *f)
{
    struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &f->tuple, sizeof(f->tuple.ipv4),
                                             BPF_F_CURRENT_NETNS, 0);
    if (!sk)
        return 0;
    int ret = 0;
    if (sk->state != BPF_TCP_LISTEN)
        ret = bpf_sk_assign(skb, sk, 0) == 0 ? 1 : -1;
    bpf_sk_release(sk);
    return ret;
}

/* Gives a new connection's SYN to the agent listener in `slot`, or applies the fail mode. */
static __always_inline int assign_listener(struct __sk_buff *skb, u32 slot)
{
    struct bpf_sock *sk = (struct bpf_sock *)listeners.lookup(&slot);
    if (!sk)
        return fail_verdict();
    long err = bpf_sk_assign(skb, sk, 0);
    bpf_sk_release(sk);
    if (err)
        return fail_verdict();
    skb->mark |= CAPTURE_MARK;
    return TC_ACT_OK;
}

/* A packet that is part of the mesh: existing socket first, then a listener for a SYN. */
static __always_inline int capture(struct __sk_buff *skb, struct flow *f, u32 slot)
{
    int found = assign_existing(skb, f);
    if (found > 0) {
        skb->mark |= CAPTURE_MARK;
        return TC_ACT_OK;
    }
    if (!f->syn)
        return TC_ACT_UNSPEC;
    if (found < 0)
        return fail_verdict();
    return assign_listener(skb, slot);
}

static __always_inline u32 inbound_slot(struct flow *f)
{
    return f->tuple.ipv4.dport == htons(HBONE_PORT) ? SLOT_HBONE : SLOT_INBOUND;
}

/* Node side of a pod veth, ingress: packets that leave a pod of this node. */
static __always_inline int pod_hook(struct __sk_buff *skb)
{
    struct flow f = {};
    if (!parse_flow(skb, &f))
        return TC_ACT_UNSPEC;
    /* Node addresses are never captured: kubelet probes and their replies go direct. */
    if (is_node_addr(f.tuple.ipv4.daddr) || is_node_addr(f.tuple.ipv4.saddr))
        return TC_ACT_UNSPEC;
    int from_enrolled = is_enrolled(f.tuple.ipv4.saddr);
    if (!from_enrolled && !is_enrolled(f.tuple.ipv4.daddr))
        return TC_ACT_UNSPEC;
    if (f.syn && refused_pair(&f, guard_flags()))
        return TC_ACT_SHOT;
    if (from_enrolled)
        return capture(skb, &f, SLOT_OUTBOUND);
    return capture(skb, &f, inbound_slot(&f));
}

/* The node's uplink, ingress: packets from other nodes. */
static __always_inline int uplink_hook(struct __sk_buff *skb)
{
    struct flow f = {};
    if (!parse_flow(skb, &f))
        return TC_ACT_UNSPEC;
    if (is_node_addr(f.tuple.ipv4.saddr) || !is_enrolled(f.tuple.ipv4.daddr))
        return TC_ACT_UNSPEC;
    if (f.syn && refused_pair(&f, guard_flags()))
        return TC_ACT_SHOT;
    return capture(skb, &f, inbound_slot(&f));
}

int capture_pod(struct __sk_buff *skb) { return pod_hook(skb); }
int capture_pod2(struct __sk_buff *skb) { return pod_hook(skb); }
int capture_uplink(struct __sk_buff *skb) { return uplink_hook(skb); }
int capture_uplink2(struct __sk_buff *skb) { return uplink_hook(skb); }

/* Whether a socket of the node namespace (the agent's) owns this 4-tuple: then the packet
 * belongs to a captured connection and must never be forwarded. */
static __always_inline int has_captured_socket(struct __sk_buff *skb, struct flow *f)
{
    struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &f->tuple, sizeof(f->tuple.ipv4),
                                             BPF_F_CURRENT_NETNS, 0);
    if (!sk)
        return 0;
    int found = sk->state != BPF_TCP_LISTEN;
    bpf_sk_release(sk);
    return found;
}

/* Egress of the uplink and of every pod veth: TCP segments the node forwards (no local
 * socket; the agent's own traffic always has one) that escaped capture. Captured traffic is
 * delivered locally and never forwarded, so a forwarded segment of an enrolled pod that
 * (1) belongs to a refused pair, (2) opens a new connection from an enrolled pod (FAIL_CLOSED),
 * or (3) belongs to a connection the agent holds a socket for, got past our ingress program
 * (something ahead of it passed or redirected it, or ours was removed): it is dropped, so it
 * never leaves in plaintext. New connections *to* an enrolled pod are not dropped here
 * (NodePort traffic reaches pods through DNAT, after our ingress programs); the check of the
 * hooks refuses those pods instead. Costs one parse and two hash lookups per forwarded TCP
 * segment; segments of the agent itself return at once. */
int capture_guard(struct __sk_buff *skb)
{
    if (skb->sk)
        return TC_ACT_UNSPEC;
    struct flow f = {};
    if (!parse_flow(skb, &f))
        return TC_ACT_UNSPEC;
    if (is_node_addr(f.tuple.ipv4.saddr) || is_node_addr(f.tuple.ipv4.daddr))
        return TC_ACT_UNSPEC;
    int from_enrolled = is_enrolled(f.tuple.ipv4.saddr);
    if (!from_enrolled && !is_enrolled(f.tuple.ipv4.daddr))
        return TC_ACT_UNSPEC;
    if (refused_pair(&f, guard_flags()))
        return TC_ACT_SHOT;
    if (f.syn)
        return from_enrolled && !fail_open() ? TC_ACT_SHOT : TC_ACT_UNSPEC;
    return has_captured_socket(skb, &f) ? TC_ACT_SHOT : TC_ACT_UNSPEC;
}
