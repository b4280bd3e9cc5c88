// SPDX-License-Identifier: MIT OR Apache-2.0
/* ricochet's XDP steering program: frames for a UDP listener go to the AF_XDP socket of their RX
 * queue; everything else goes to the kernel untouched.
 *
 * Parses Ethernet (up to two VLAN tags), IPv4 without options and IPv6 without extension headers,
 * then UDP. A frame for a listener that cannot hold a valid request (wrong payload length for the
 * protocol, truncated, first fragment) is dropped here and counted by reason; it never reaches
 * userspace. Minimum kernel: 5.9 (BPF link attach), written against 5.15+ helpers only.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "ricochet.h"

#define ETH_P_8021Q_ 0x8100
#define ETH_P_8021AD_ 0x88A8
#define IP_MF_ 0x2000
#define IP_OFFSET_ 0x1FFF

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, MAX_QUEUES);
	__type(key, __u32);
	__type(value, __u32);
} xsks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_LISTENERS);
	__type(key, struct listener_key);
	__type(value, struct listener_value);
} listeners SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} xdp_stats SEC(".maps");

/* A bounds-checked cursor over the frame. */
struct cursor {
	void *pos;
	void *end;
};

static __always_inline void count(__u32 stat)
{
	__u64 *v = bpf_map_lookup_elem(&xdp_stats, &stat);
	if (v)
		*v += 1;
}

static __always_inline int verdict(__u32 stat, int action)
{
	count(stat);
	return action;
}

/* Returns the EtherType after up to two VLAN tags, or -1 when the frame is too short. */
static __always_inline int parse_eth(struct cursor *c)
{
	struct ethhdr *eth = c->pos;
	if ((void *)(eth + 1) > c->end)
		return -1;
	c->pos = eth + 1;
	__u16 proto = eth->h_proto;
#pragma unroll
	for (int i = 0; i < 2; i++) {
		if (proto != bpf_htons(ETH_P_8021Q_) && proto != bpf_htons(ETH_P_8021AD_))
			break;
		struct vlan { __be16 tci; __be16 proto; } *vlan = c->pos;
		if ((void *)(vlan + 1) > c->end)
			return -1;
		c->pos = vlan + 1;
		proto = vlan->proto;
	}
	return proto;
}

static __always_inline struct listener_value *find_listener(struct listener_key *key)
{
	struct listener_value *v = bpf_map_lookup_elem(&listeners, key);
	if (v)
		return v;
	/* Wildcard address. */
	__builtin_memset(key->addr, 0, sizeof(key->addr));
	return bpf_map_lookup_elem(&listeners, key);
}

/* Checks the UDP datagram against the listener's protocol; returns the stat to count on a drop or
 * -1 when the datagram may be a valid request. ip_payload_end is where the IP packet says it ends. */
static __always_inline int check_udp(struct cursor *c, struct udphdr *udp, void *ip_payload_end,
				     struct listener_value *listener)
{
	__u16 udp_len = bpf_ntohs(udp->len);
	if (ip_payload_end > c->end || udp_len < sizeof(*udp) || (void *)udp + udp_len > ip_payload_end)
		return STAT_DROP_TRUNCATED;
	__u16 payload = udp_len - sizeof(*udp);
	if (listener->protocol == PROTO_COUNTER && payload != 16)
		return STAT_DROP_WRONG_LENGTH;
	if (listener->protocol == PROTO_SOCKPERF && payload < 14)
		return STAT_DROP_TOO_SHORT;
	return -1;
}

static __always_inline int steer(struct xdp_md *ctx)
{
	struct cursor c = { .pos = (void *)(long)ctx->data, .end = (void *)(long)ctx->data_end };
	int proto = parse_eth(&c);
	if (proto < 0)
		return verdict(STAT_PASSED, XDP_PASS);

	struct listener_key key = {};
	struct udphdr *udp;
	void *ip_payload_end;
	int first_fragment = 0;

	if (proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = c.pos;
		if ((void *)(ip + 1) > c.end)
			return verdict(STAT_PASSED, XDP_PASS);
		/* Options and non-UDP traffic belong to the kernel. */
		if (ip->ihl != 5 || ip->protocol != IPPROTO_UDP)
			return verdict(STAT_PASSED, XDP_PASS);
		__u16 frag = bpf_ntohs(ip->frag_off);
		/* A later fragment carries no UDP header: nothing to match, the kernel reassembles. */
		if (frag & IP_OFFSET_)
			return verdict(STAT_PASSED, XDP_PASS);
		first_fragment = (frag & IP_MF_) != 0;
		udp = (void *)(ip + 1);
		ip_payload_end = (void *)ip + bpf_ntohs(ip->tot_len);
		key.family = 4;
		__builtin_memcpy(key.addr, &ip->daddr, 4);
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = c.pos;
		if ((void *)(ip6 + 1) > c.end)
			return verdict(STAT_PASSED, XDP_PASS);
		if (ip6->nexthdr != IPPROTO_UDP)
			return verdict(STAT_PASSED, XDP_PASS);
		udp = (void *)(ip6 + 1);
		ip_payload_end = (void *)(ip6 + 1) + bpf_ntohs(ip6->payload_len);
		key.family = 6;
		__builtin_memcpy(key.addr, &ip6->daddr, 16);
	} else {
		return verdict(STAT_PASSED, XDP_PASS);
	}

	if ((void *)(udp + 1) > c.end)
		return verdict(STAT_PASSED, XDP_PASS);
	key.port = udp->dest;
	struct listener_value *listener = find_listener(&key);
	if (!listener)
		return verdict(STAT_PASSED, XDP_PASS);
	if (first_fragment)
		return verdict(STAT_DROP_FRAGMENT, XDP_DROP);
	int bad = check_udp(&c, udp, ip_payload_end, listener);
	if (bad >= 0)
		return verdict(bad, XDP_DROP);

	/* XDP_PASS when no AF_XDP socket sits in this queue's slot: the kernel path answers. */
	int action = bpf_redirect_map(&xsks, ctx->rx_queue_index, XDP_PASS);
	return verdict(action == XDP_REDIRECT ? STAT_STEERED : STAT_NO_SOCKET, action);
}

SEC("xdp")
int ricochet_steer(struct xdp_md *ctx)
{
	return steer(ctx);
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
