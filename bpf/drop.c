/* drop.c: the cgroup_skb egress half of the drop action (see lb4_drop_dest() in sock.c).
 *
 * The socket programs send a connection that must be dropped to the drop address (ctlb.h);
 * ctlb_egress, attached to the same cgroup, discards every packet to that address and lets
 * everything else through. It runs on every packet the node's sockets send, so it reads the
 * destination straight from the packet and compares it with a constant: no map, no helper.
 * User space attaches it only while some frontend may drop.
 *
 * Verdicts (kernel/bpf/cgroup.c): bit 0 lets the packet through; bit 1 adds congestion
 * notification, which turns the error the sender gets into NET_XMIT_DROP. Which one a drop
 * returns decides what the application sees, and the right one differs per protocol.
 */
#include "ctlb.h"
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>

#define SKB_DROP 0
#define SKB_PASS 1
#define SKB_DROP_CN 2

/* What a dropped packet's sender is told, so it behaves as if a router had dropped it:
 *   - TCP: a plain drop. tcp_transmit_skb() gets -EPERM; the connect path ignores it and the
 *     retransmit timer counts it as a segment lost on the wire, so the SYN is retransmitted on
 *     the normal schedule (tcp_syn_linear_timeouts, then exponential backoff) until connect()
 *     fails with ETIMEDOUT: ~135 s by default, the same timer sequence as a packet lost in the
 *     network (measured on 6.18). Drop + CN would return NET_XMIT_DROP, which
 *     tcp_retransmit_timer() takes for local congestion: a retry every 500 ms, ETIMEDOUT in ~6 s.
 *   - UDP and the rest: drop + CN. ip_send_skb() turns NET_XMIT_DROP into -ENOBUFS, which
 *     udp_send_skb() swallows unless the socket set IP_RECVERR: the send succeeds and the
 *     datagram is gone. A plain drop would fail the send with EPERM. */
static __always_inline int drop_verdict(__u8 l4proto)
{
	return l4proto == IPPROTO_TCP ? SKB_DROP : SKB_DROP_CN;
}

static __always_inline bool is_drop_addr6(const struct ipv6hdr *ip6)
{
	/* The last word first: it is the one that differs from almost every real address. */
	return ip6->daddr.in6_u.u6_addr32[3] == bpf_htonl(CTLB_DROP_ADDR6_3) &&
	       ip6->daddr.in6_u.u6_addr32[0] == bpf_htonl(CTLB_DROP_ADDR6_0) &&
	       ip6->daddr.in6_u.u6_addr32[1] == bpf_htonl(CTLB_DROP_ADDR6_1) &&
	       ip6->daddr.in6_u.u6_addr32[2] == bpf_htonl(CTLB_DROP_ADDR6_2);
}

/* skb->data is the network header on the cgroup egress hook, and a locally built packet has
 * its IP header in the linear area, so one bounds check gives access to it. */
int ctlb_egress(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = data;

		if ((void *)(ip + 1) > end || ip->daddr != bpf_htonl(CTLB_DROP_ADDR4))
			return SKB_PASS;
		return drop_verdict(ip->protocol);
	}
	if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = data;

		/* A packet of the drop action carries no extension headers: nexthdr is the L4. */
		if ((void *)(ip6 + 1) > end || !is_drop_addr6(ip6))
			return SKB_PASS;
		return drop_verdict(ip6->nexthdr);
	}
	return SKB_PASS;
}
