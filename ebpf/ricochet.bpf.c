// SPDX-License-Identifier: MIT OR Apache-2.0
/* ricochet's XDP programs.
 *
 * ricochet_steer (afxdp mode): frames for a UDP listener, and TCP segments for a TCP listener (the
 *   workers run TCP-lite), go to the AF_XDP socket of their RX queue.
 * ricochet_respond (xdp mode): frames for a UDP listener are verified, counted and answered here,
 *   with XDP_TX; the counter lives in a BPF_F_MMAPABLE array that userspace maps and shares. Segments
 *   for a TCP listener are answered here too, by TCP-lite (tcp_lite.h).
 * ricochet_tcp_expire (xdp mode): run by userspace once a second, forgets idle TCP-lite connections.
 *
 * Both listener programs parse Ethernet (up to two VLAN tags), IPv4 without options and IPv6 without
 * extension headers, then UDP; everything else goes to the kernel untouched. A frame for a listener
 * that cannot hold a valid request (first fragment, truncated, source port 0, wrong payload length
 * for the protocol; for the responder also a bad hash) is dropped and counted by reason, never
 * answered. The responder passes datagrams longer than RESPONDER_MAX_UDP_LEN to the kernel.
 * Minimum kernel: 5.12 for the steering program (BPF atomic fetch-and-add; BPF links need 5.9); 5.18 for the
 * responder (TCP-lite uses bpf_xdp_load_bytes/store_bytes and bpf_loop). Written for 6.x.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "ricochet.h"

#define ETH_P_8021Q_ 0x8100
#define ETH_P_8021AD_ 0x88A8
#define IP_MF_ 0x2000
#define IP_OFFSET_ 0x1FFF
/* Ethernet, two VLAN tags and an IPv6 header: where a UDP header can start at the latest. */
#define MAX_UDP_OFFSET (14 + 2 * 4 + 40)

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
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct counter_value);
} counter SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} xdp_stats SEC(".maps");

/* A bounds-checked cursor over the frame; off is pos's offset from the frame's start. */
struct cursor {
	void *pos;
	void *end;
	__u32 off;
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
	c->off = sizeof(*eth);
	__u16 proto = eth->h_proto;
#pragma unroll
	for (int i = 0; i < 2; i++) {
		if (proto != bpf_htons(ETH_P_8021Q_) && proto != bpf_htons(ETH_P_8021AD_))
			break;
		struct vlan { __be16 tci; __be16 proto; } *vlan = c->pos;
		if ((void *)(vlan + 1) > c->end)
			return -1;
		c->pos = vlan + 1;
		c->off += sizeof(*vlan);
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
	/* No reply can be addressed to port 0 (the kernel's sendto refuses it too). */
	if (udp->source == 0)
		return STAT_DROP_ZERO_SOURCE_PORT;
	__u16 payload = udp_len - sizeof(*udp);
	if (listener->protocol == PROTO_COUNTER && payload != 16)
		return STAT_DROP_WRONG_LENGTH;
	if (listener->protocol == PROTO_SOCKPERF && payload < 14)
		return STAT_DROP_TOO_SHORT;
	return -1;
}

/* A UDP datagram for a listener, located in the frame. */
struct request {
	struct ethhdr *eth;
	struct iphdr *ip;     /* IPv4, or NULL */
	struct ipv6hdr *ip6;  /* IPv6, or NULL */
	struct udphdr *udp;
	__u8 protocol;
};

/* Parses a frame. Returns -1 when it is a datagram for a listener that may be a valid request (req
 * filled in); otherwise the statistic to count, with *action the verdict to return. */
static __always_inline int parse_request(struct xdp_md *ctx, struct request *req, int *action)
{
	struct cursor c = { .pos = (void *)(long)ctx->data, .end = (void *)(long)ctx->data_end };
	*action = XDP_PASS;
	req->eth = c.pos;
	int proto = parse_eth(&c);
	if (proto < 0)
		return STAT_PASSED;

	struct listener_key key = { .transport = IPPROTO_UDP };
	struct udphdr *udp;
	void *ip_payload_end;
	int first_fragment = 0;
	req->ip = 0;
	req->ip6 = 0;

	if (proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = c.pos;
		if ((void *)(ip + 1) > c.end)
			return STAT_PASSED;
		/* Options, non-UDP traffic and anything not IPv4 (which the kernel drops) are the kernel's. */
		if (ip->version != 4 || ip->ihl != 5 || ip->protocol != IPPROTO_UDP)
			return STAT_PASSED;
		__u16 frag = bpf_ntohs(ip->frag_off);
		/* A later fragment carries no UDP header: nothing to match, the kernel reassembles. */
		if (frag & IP_OFFSET_)
			return STAT_PASSED;
		first_fragment = (frag & IP_MF_) != 0;
		udp = (void *)(ip + 1);
		ip_payload_end = (void *)ip + bpf_ntohs(ip->tot_len);
		key.family = 4;
		__builtin_memcpy(key.addr, &ip->daddr, 4);
		req->ip = ip;
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = c.pos;
		if ((void *)(ip6 + 1) > c.end)
			return STAT_PASSED;
		/* Extension headers (UDP not next) are the kernel's, as is anything not IPv6. */
		if (ip6->version != 6 || ip6->nexthdr != IPPROTO_UDP)
			return STAT_PASSED;
		udp = (void *)(ip6 + 1);
		ip_payload_end = (void *)(ip6 + 1) + bpf_ntohs(ip6->payload_len);
		key.family = 6;
		__builtin_memcpy(key.addr, &ip6->daddr, 16);
		req->ip6 = ip6;
	} else {
		return STAT_PASSED;
	}

	if ((void *)(udp + 1) > c.end)
		return STAT_PASSED;
	key.port = udp->dest;
	struct listener_value *listener = find_listener(&key);
	if (!listener)
		return STAT_PASSED;
	*action = XDP_DROP;
	if (first_fragment)
		return STAT_DROP_FRAGMENT;
	int bad = check_udp(&c, udp, ip_payload_end, listener);
	if (bad >= 0)
		return bad;
	req->udp = udp;
	req->protocol = listener->protocol;
	return -1;
}

/* xxh64 (seed 0) of the ASCII decimal string of v, as the counter protocol defines it.
 *
 * The digits are packed into three little-endian words (the string is at most 20 bytes) using only
 * register arithmetic, so the verifier sees no variable stack offsets; every loop is unrolled. */
#define XXH_P1 0x9E3779B185EBCA87ULL
#define XXH_P2 0xC2B2AE3D27D4EB4FULL
#define XXH_P3 0x165667B19E3779F9ULL
#define XXH_P4 0x85EBCA77C2B2AE63ULL
#define XXH_P5 0x27D4EB2F165667C5ULL

static __always_inline __u64 rotl64(__u64 x, int r)
{
	return (x << r) | (x >> (64 - r));
}

static __always_inline __u64 xxh_round(__u64 acc, __u64 input)
{
	acc += input * XXH_P2;
	acc = rotl64(acc, 31);
	return acc * XXH_P1;
}

static __always_inline __u64 decimal_xxh64(__u64 v)
{
	__u8 digit[20] = {};
	__u32 n = 0;
	__u64 t = v;
	/* Least significant digit first. */
#pragma unroll
	for (int i = 0; i < 20; i++) {
		digit[i] = t % 10;
		t /= 10;
		n++;
		if (t == 0)
			break;
	}
	/* Most significant first into the string, byte k at bit 8*(k%8) of word k/8. */
	__u64 w0 = 0, w1 = 0, w2 = 0;
	__u32 pos = 0;
#pragma unroll
	for (int i = 19; i >= 0; i--) {
		if ((__u32)i < n) {
			__u64 b = '0' + digit[i];
			if (pos < 8)
				w0 |= b << (pos * 8);
			else if (pos < 16)
				w1 |= b << ((pos - 8) * 8);
			else
				w2 |= b << ((pos - 16) * 8);
			pos++;
		}
	}
	__u64 h = XXH_P5 + n;
	__u64 tail = w0;
	if (n >= 8) {
		h ^= xxh_round(0, w0);
		h = rotl64(h, 27) * XXH_P1 + XXH_P4;
		tail = w1;
	}
	if (n >= 16) {
		h ^= xxh_round(0, w1);
		h = rotl64(h, 27) * XXH_P1 + XXH_P4;
		tail = w2;
	}
	__u32 rest = n & 7;
	if (rest >= 4) {
		h ^= (tail & 0xffffffffULL) * XXH_P1;
		h = rotl64(h, 23) * XXH_P2 + XXH_P3;
		tail >>= 32;
		rest -= 4;
	}
#pragma unroll
	for (int j = 0; j < 3; j++) {
		if ((__u32)j < rest) {
			h ^= (tail & 0xff) * XXH_P5;
			h = rotl64(h, 11) * XXH_P1;
			tail >>= 8;
		}
	}
	h ^= h >> 33;
	h *= XXH_P2;
	h ^= h >> 29;
	h *= XXH_P3;
	h ^= h >> 32;
	return h;
}

/* The ones' complement sum (RFC 1071) of the len bytes at offset l4_offset in the frame (a UDP
 * datagram or TCP segment, header and payload), added to seed (the pseudo-header's sum), folded and
 * inverted: the checksum to store (UDP sends a computed 0 as its equal 0xffff, as 0 means "none"
 * there; TCP sends it as it is). Returns -1 when the bytes do not lie within the frame or len is
 * above RESPONDER_MAX_UDP_LEN (callers check both).
 *
 * A global function: the verifier checks it once, on its own, rather than once per path that reaches
 * it (each VLAN depth and IP version is a path), which keeps a 1,024-iteration loop within the
 * verifier's budget. So it takes the context and an offset, not packet pointers (kernel 5.6+).
 *
 * The sum is taken over 32-bit words loaded in host order into a 64-bit accumulator, then the last 2
 * and 1 bytes; an odd last byte is the high byte of a word padded with zero. The folded sum does not
 * depend on the word size, and stored in the order it was loaded in it is right on either endianness.
 */
__attribute__((noinline)) int l4_checksum(struct xdp_md *ctx, __u32 l4_offset, __u32 len, __u64 seed)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	if (l4_offset > MAX_UDP_OFFSET || len > RESPONDER_MAX_UDP_LEN)
		return -1;
	__u64 sum = seed;
	__u32 words = len / 4;
	__u32 *w = data + l4_offset;
	for (__u32 i = 0; i < RESPONDER_MAX_UDP_LEN / 4; i++) {
		if (i >= words)
			break;
		/* Opaque to clang, so it keeps one bounds check per word (which the verifier needs)
		 * instead of hoisting them into arithmetic on data_end (which the verifier refuses). */
		asm volatile("" : "+r"(w));
		if ((void *)(w + 1) > data_end)
			return -1;
		sum += *w;
		w++;
	}
	__u8 *tail = (void *)w;
	if (len & 2) {
		if ((void *)(tail + 2) > data_end)
			return -1;
		sum += *(__u16 *)tail;
		tail += 2;
	}
	if (len & 1) {
		if ((void *)(tail + 1) > data_end)
			return -1;
		sum += bpf_htons((__u16)(*tail) << 8);
	}
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return ~sum & 0xffff;
}

/* The pseudo-header's addresses, protocol and length, summed in host-order 32-bit words. */
static __always_inline __u64 pseudo_header_sum(struct request *req, void *data_end)
{
	__u64 sum = bpf_htons(IPPROTO_UDP) + (__u64)req->udp->len;
	if (req->ip) {
		__u32 *a = (void *)&req->ip->saddr;
		if ((void *)(a + 2) > data_end)
			return 0;
		return sum + a[0] + a[1];
	}
	if (req->ip6) {
		__u32 *a = (void *)&req->ip6->saddr;
		if ((void *)(a + 8) > data_end)
			return 0;
#pragma unroll
		for (int i = 0; i < 8; i++)
			sum += a[i];
	}
	return sum;
}

static __always_inline void swap_bytes(__u8 *a, __u8 *b, int n)
{
#pragma unroll
	for (int i = 0; i < 16; i++) {
		if (i < n) {
			__u8 t = a[i];
			a[i] = b[i];
			b[i] = t;
		}
	}
}

#include "tcp_lite.h"

/* Whether a frame is a TCP segment for a TCP listener (afxdp mode's TCP-lite): tcp_locate's parse,
 * whose answer the AF_XDP worker checks again. A segment that does not fit its frame is steered too:
 * the worker counts it. */
static __always_inline int is_tcp_for_listener(struct xdp_md *ctx)
{
	__u32 zero = 0;
	struct tcp_seg *seg = bpf_map_lookup_elem(&tcp_segs, &zero);
	return seg && tcp_locate(ctx, seg) != 0;
}

static __always_inline int steer(struct xdp_md *ctx)
{
	struct request req;
	int action;
	int stat = parse_request(ctx, &req, &action);
	if (stat == STAT_PASSED && is_tcp_for_listener(ctx))
		stat = -1;
	if (stat >= 0)
		return verdict(stat, action);
	/* XDP_PASS when no AF_XDP socket sits in this queue's slot: the kernel path answers. */
	action = bpf_redirect_map(&xsks, ctx->rx_queue_index, XDP_PASS);
	return verdict(action == XDP_REDIRECT ? STAT_STEERED : STAT_NO_SOCKET, action);
}


/* A frame for a UDP listener, answered; -1 for any other frame. A global function: the verifier
 * allows 512 bytes of stack along the deepest chain of calls, and this frame's stack is then not on
 * TCP-lite's chain. */
__attribute__((noinline)) int udp_respond(struct xdp_md *ctx)
{
	struct request req;
	int action;
	int stat = parse_request(ctx, &req, &action);
	if (stat == STAT_PASSED)
		return -1;
	if (stat >= 0)
		return verdict(stat, action);
	/* The checksum below covers RESPONDER_MAX_UDP_LEN bytes at most: the kernel answers longer ones. */
	if (bpf_ntohs(req.udp->len) > RESPONDER_MAX_UDP_LEN)
		return verdict(STAT_PASSED_TOO_LONG, XDP_PASS);
	void *data_end = (void *)(long)ctx->data_end;
	__u8 *payload = (void *)(req.udp + 1);

	if (req.protocol == PROTO_COUNTER) {
		if ((void *)(payload + 16) > data_end)
			return verdict(STAT_DROP_TRUNCATED, XDP_DROP);
		__u64 increment, hash;
		__builtin_memcpy(&increment, payload, 8);
		__builtin_memcpy(&hash, payload + 8, 8);
		increment = bpf_be64_to_cpu(increment);
		if (decimal_xxh64(increment) != bpf_be64_to_cpu(hash))
			return verdict(STAT_DROP_BAD_HASH, XDP_DROP);
		__u32 zero = 0;
		struct counter_value *c = bpf_map_lookup_elem(&counter, &zero);
		if (!c)
			return XDP_ABORTED;
		/* BPF_ATOMIC | BPF_FETCH (kernel 5.12): the value before this request's add. */
		__u64 value = __sync_fetch_and_add(&c->value, increment) + increment;
		__u64 reply_value = bpf_cpu_to_be64(value);
		__u64 reply_hash = bpf_cpu_to_be64(decimal_xxh64(value));
		__builtin_memcpy(payload, &reply_value, 8);
		__builtin_memcpy(payload + 8, &reply_hash, 8);
	} else if (req.protocol == PROTO_SOCKPERF) {
		if ((void *)(payload + 14) > data_end)
			return verdict(STAT_DROP_TRUNCATED, XDP_DROP);
		/* Clear the reply-request flag: bit 0x0001 of the big-endian u16 at offset 8. */
		payload[9] &= ~1;
	}

	/* The reply is the request with addresses and ports swapped. Swapping leaves the IPv4 header
	 * checksum valid (a ones' complement sum does not depend on word order). */
	if ((void *)(req.eth + 1) > data_end)
		return XDP_ABORTED;
	swap_bytes(req.eth->h_dest, req.eth->h_source, 6);
	if (req.ip) {
		__u32 a = req.ip->saddr;
		req.ip->saddr = req.ip->daddr;
		req.ip->daddr = a;
	} else if (req.ip6) {
		swap_bytes((__u8 *)&req.ip6->saddr, (__u8 *)&req.ip6->daddr, 16);
	}
	__u16 port = req.udp->source;
	req.udp->source = req.udp->dest;
	req.udp->dest = port;
	req.udp->check = 0;
	__u64 seed = pseudo_header_sum(&req, data_end);
	__u32 udp_offset = (void *)req.udp - (void *)(long)ctx->data;
	int check = l4_checksum(ctx, udp_offset, bpf_ntohs(req.udp->len), seed);
	if (check < 0)
		return XDP_ABORTED;
	/* 0 means "no checksum" in UDP over IPv4 and is not allowed over IPv6: send its equal, 0xffff. */
	req.udp->check = check ? check : 0xffff;
	return verdict(STAT_TX, XDP_TX);
}

SEC("xdp")
int ricochet_steer(struct xdp_md *ctx)
{
	return steer(ctx);
}

SEC("xdp")
int ricochet_respond(struct xdp_md *ctx)
{
	int action = udp_respond(ctx);
	/* Not a UDP listener's: a TCP listener's (TCP-lite), or the kernel's. */
	return action >= 0 ? action : tcp_respond(ctx);
}

SEC("xdp")
int ricochet_tcp_expire(struct xdp_md *ctx)
{
	return tcp_expire();
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
