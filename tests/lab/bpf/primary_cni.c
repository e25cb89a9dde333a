/* Stand-in "primary CNI" programs for the capture-coexistence lab tests: what a CNI's own
 * programs do with packets on the hooks ztunnel depends on, in the smallest form. Loaded
 * like ztunnel's programs (bcc in a short-lived loader process, tests/lab/primary_cni.py),
 * pinned, and attached by the test with tc, ip or tcx links.
 *
 *   cni_passN      TC_ACT_OK for everything: the packet skips the rest of the hook
 *   cni_redirectN  IPv4 TCP to or from the watched port goes straight out of another
 *                  interface (bpf_redirect_neigh, as CNIs with BPF host routing do);
 *                  everything else continues
 *   cni_countN     counts and lets everything continue (TC_ACT_UNSPEC = TCX_NEXT)
 *   cni_xdpN       an XDP program that passes everything
 *
 * N makes copies: each copy is its own program with its own slot, so one compile serves
 * a whole test. Per slot, `watch` holds a TCP port (host order) and `target` an ifindex
 * (the test writes both); `seen[2*slot]` counts every packet the copy saw and
 * `seen[2*slot+1]` the IPv4 TCP packets from or to the watched port.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/tcp.h>

#define SLOTS 16

BPF_ARRAY(seen, u64, SLOTS * 2);
BPF_ARRAY(watch, u32, SLOTS);
BPF_ARRAY(target, u32, SLOTS);

/* bcc 0.26 declares bpf_redirect_neigh with three arguments; the kernel helper takes four
 * (ifindex, params, plen, flags: include/uapi/linux/bpf.h). */
static long (*redirect_neigh)(u32, void *, int, u64) = (void *)BPF_FUNC_redirect_neigh;

static __always_inline void bump(u32 key)
{
    u64 *n = seen.lookup(&key);
    if (n)
        __sync_fetch_and_add(n, 1);
}

static __always_inline int watched(void *data, void *data_end, u32 slot)
{
    u32 *port = watch.lookup(&slot);
    if (!port || !*port)
        return 0;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end || eth->h_proto != htons(ETH_P_IP))
        return 0;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > data_end || ip->protocol != IPPROTO_TCP || ip->ihl != 5)
        return 0;
    struct tcphdr *tcp = (void *)(ip + 1);
    if ((void *)(tcp + 1) > data_end)
        return 0;
    return tcp->source == htons(*port) || tcp->dest == htons(*port);
}

static __always_inline int count(void *data, void *data_end, u32 slot)
{
    bump(2 * slot);
    int hit = watched(data, data_end, slot);
    if (hit)
        bump(2 * slot + 1);
    return hit;
}

#define SKB_COUNT(skb, slot) count((void *)(long)(skb)->data, (void *)(long)(skb)->data_end, slot)

static __always_inline int redirect(struct __sk_buff *skb, u32 slot)
{
    if (!SKB_COUNT(skb, slot))
        return TC_ACT_UNSPEC;
    u32 *ifindex = target.lookup(&slot);
    if (!ifindex || !*ifindex)
        return TC_ACT_UNSPEC;
    return redirect_neigh(*ifindex, NULL, 0, 0);
}

#define PASS(n, slot) \
    int cni_pass##n(struct __sk_buff *skb) { SKB_COUNT(skb, slot); return TC_ACT_OK; }
#define COUNT(n, slot) \
    int cni_count##n(struct __sk_buff *skb) { SKB_COUNT(skb, slot); return TC_ACT_UNSPEC; }
#define REDIRECT(n, slot) \
    int cni_redirect##n(struct __sk_buff *skb) { return redirect(skb, slot); }
#define XDP(n, slot) \
    int cni_xdp##n(struct xdp_md *ctx) \
    { count((void *)(long)ctx->data, (void *)(long)ctx->data_end, slot); return XDP_PASS; }

/* Slots: keep in sync with COPIES in tests/lab/primary_cni.py. */
COUNT(0, 0)
COUNT(1, 1)
COUNT(2, 2)
COUNT(3, 3)
COUNT(4, 4)
COUNT(5, 5)
PASS(0, 6)
PASS(1, 7)
PASS(2, 8)
PASS(3, 9)
REDIRECT(0, 10)
REDIRECT(1, 11)
XDP(0, 12)
XDP(1, 13)
