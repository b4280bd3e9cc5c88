/* TCP-lite inside the responder (xdp mode): the same design as the AF_XDP workers' Rust TCP-lite
 * (userspace/src/tcp_lite), with its state in BPF maps and every answer sent with XDP_TX.
 *
 * - SYN: a SYN-ACK whose sequence number is a SYN cookie (5-bit 64 s slot, 3-bit MSS index,
 *   24 bits of SipHash-1-3 over the flow, the client's ISN and the slot), no state. The cookie is
 *   the one userspace's tcp_lite::cookie computes for the same key: the tests compare them.
 * - The first ACK whose cookie checks out creates the connection in tcp_conns; a full table refuses
 *   it with RST. A segment for no connection whose cookie fails gets RST and never reaches a counter.
 * - In-order data is framed and verified as on the kernel path (counter frames one by one with an
 *   atomic add each, echo bytes, sockperf headers); replies wait in the connection's ring until the
 *   client acknowledges them, and the advertised window is the room left (at most one client MSS).
 * - Every answer starts at the oldest unacknowledged reply byte and carries all that fit, so a lost
 *   reply is repeated by the next answer: the program needs no timer.
 *
 * Included by ricochet.bpf.c after its maps, parsing and checksum helpers.
 */

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_PSH 0x08
#define TCP_ACK 0x10

/* The MSS a client that sends none is assumed to accept (RFC 9293). */
#define TCP_DEFAULT_MSS 536
#define TCP_COOKIE_SLOT_SECONDS 64
/* The largest sockperf message a stream accepts (core::MAX_SOCKPERF_STREAM_MESSAGE). */
#define SOCKPERF_MAX_STREAM_MESSAGE (1 << 20)
#define SOCKPERF_HEADER 14

/* Not preallocated: an entry is allocated when a connection is created and freed an RCU grace
 * period after it is deleted, so a CPU still answering on an entry that the expiry program (or a
 * RST) deleted never writes into another connection's. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096); /* userspace sets --tcp-max-conns before loading */
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct tcp_flow);
	__type(value, struct tcp_conn);
} tcp_conns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct tcp_settings);
} tcp_settings SEC(".maps");

/* A new connection is built here, then copied into tcp_conns (it is too large for the stack). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct tcp_conn);
} tcp_scratch SEC(".maps");

/* A segment for a TCP listener, located in the frame. Offsets are from the frame's start. It lives
 * in the per-CPU tcp_segs map, not on the stack: the verifier allows 512 bytes of stack for the
 * deepest chain of calls, and the UDP path's frame is already on it. */
struct tcp_seg {
	struct tcp_flow flow;
	__u32 l3_off;
	__u32 l4_off;
	__u32 payload_off;
	__u32 payload_len;
	__u32 seq;
	__u32 ack;
	__u16 window;
	__u8 flags;
	__u8 protocol;
	__u32 now; /* seconds of CLOCK_MONOTONIC_COARSE */
	__u8 headers[96]; /* the frame's headers while tcp_room moves them */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct tcp_seg);
} tcp_segs SEC(".maps");

/* The segment to send back on the segment's flow. */
struct tcp_out {
	__u32 seq;
	__u32 ack;
	__u16 window;
	__u16 mss;  /* an MSS option when non-zero (SYN-ACK) */
	__u8 flags;
	__u8 pad[3];
	__u32 len;  /* reply bytes from the connection's ring */
	__u32 ring; /* ring index of the first */
};

/* What a connection does with one segment (as tcp_lite::conn::Step). */
enum tcp_step {
	STEP_ANSWER,
	STEP_QUIET,
	STEP_RESET,
	STEP_ANSWER_THEN_FORGET,
	STEP_FORGET,
};

static __always_inline int seq_before(__u32 a, __u32 b)
{
	return (__s32)(a - b) < 0;
}

static __always_inline void count_atomic(__u32 stat)
{
	__u64 *v = bpf_map_lookup_elem(&xdp_stats, &stat);
	if (v)
		__sync_fetch_and_add(v, 1);
}

/* Locates a TCP segment for a TCP listener: 1 (seg filled in), 0 when the frame is not one (the
 * kernel's), or the negated statistic of a drop (a segment for a listener that does not fit its
 * frame). IPv4 with options or fragmented, and IPv6 with extension headers, are the kernel's. */
static __always_inline int tcp_locate(struct xdp_md *ctx, struct tcp_seg *seg)
{
	struct cursor c = { .pos = (void *)(long)ctx->data, .end = (void *)(long)ctx->data_end };
	int proto = parse_eth(&c);
	struct listener_key key = { .transport = IPPROTO_TCP };
	struct tcphdr *tcp;
	__u32 ip_payload;
	__builtin_memset(seg, 0, sizeof(*seg));
	if (proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = c.pos;
		if ((void *)(ip + 1) > c.end)
			return 0;
		if (ip->version != 4 || ip->ihl != 5 || ip->protocol != IPPROTO_TCP)
			return 0;
		if (bpf_ntohs(ip->frag_off) & (IP_MF_ | IP_OFFSET_))
			return 0;
		tcp = (void *)(ip + 1);
		__u32 total = bpf_ntohs(ip->tot_len);
		/* A length below the header's own: the kernel drops it. */
		if (total < sizeof(*ip))
			return 0;
		ip_payload = total - sizeof(*ip);
		key.family = 4;
		__builtin_memcpy(key.addr, &ip->daddr, 4);
		__builtin_memcpy(seg->flow.client, &ip->saddr, 4);
		__builtin_memcpy(seg->flow.server, &ip->daddr, 4);
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = c.pos;
		if ((void *)(ip6 + 1) > c.end)
			return 0;
		if (ip6->version != 6 || ip6->nexthdr != IPPROTO_TCP)
			return 0;
		tcp = (void *)(ip6 + 1);
		ip_payload = bpf_ntohs(ip6->payload_len);
		key.family = 6;
		__builtin_memcpy(key.addr, &ip6->daddr, 16);
		__builtin_memcpy(seg->flow.client, &ip6->saddr, 16);
		__builtin_memcpy(seg->flow.server, &ip6->daddr, 16);
		seg->flow.ipv6 = 1;
	} else {
		return 0;
	}
	if ((void *)(tcp + 1) > c.end)
		return 0;
	key.port = tcp->dest;
	struct listener_value *listener = find_listener(&key);
	if (!listener)
		return 0;
	__u32 doff = tcp->doff * 4;
	if (doff < sizeof(*tcp) || doff > ip_payload || (void *)tcp + ip_payload > c.end)
		return -STAT_DROP_TRUNCATED;
	seg->l3_off = c.off;
	seg->l4_off = c.off + (seg->flow.ipv6 ? sizeof(struct ipv6hdr) : sizeof(struct iphdr));
	seg->payload_off = seg->l4_off + doff;
	seg->payload_len = ip_payload - doff;
	seg->seq = bpf_ntohl(tcp->seq);
	seg->ack = bpf_ntohl(tcp->ack_seq);
	seg->window = bpf_ntohs(tcp->window);
	seg->flags = ((__u8 *)tcp)[13];
	seg->protocol = listener->protocol;
	seg->flow.client_port = bpf_ntohs(tcp->source);
	seg->flow.server_port = bpf_ntohs(tcp->dest);
	return 1;
}

/* The MSS option of the TCP header at l4_offset, or -1 when it has none. */
__attribute__((noinline)) int tcp_mss_option(struct xdp_md *ctx, __u32 l4_offset)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	if (l4_offset > MAX_UDP_OFFSET)
		return -1;
	__u8 *th = data + l4_offset;
	if ((void *)(th + 20) > data_end)
		return -1;
	__u32 doff = (th[12] >> 4) * 4;
	__u32 i = 20;
	for (int k = 0; k < 40; k++) {
		if (i >= doff || i > 59)
			break;
		__u8 *p = th + i;
		if ((void *)(p + 2) > data_end)
			return -1;
		if (p[0] == 0)
			break;
		if (p[0] == 1) {
			i++;
			continue;
		}
		if (p[1] < 2)
			break;
		if (p[0] == 2 && p[1] == 4 && i + 4 <= doff) {
			if ((void *)(p + 4) > data_end)
				return -1;
			return (p[2] << 8) | p[3];
		}
		i += p[1];
	}
	return -1;
}

/* SipHash-1-3 (as the siphasher crate computes it) of the 45-byte message the Rust cookie hashes:
 * both addresses, the ports (little-endian u16s), the IPv6 flag, the client's ISN and the slot
 * (little-endian u32s). Returns its low 24 bits. */
#define SIPROUND                                                                                   \
	do {                                                                                       \
		v0 += v1; v1 = rotl64(v1, 13); v1 ^= v0; v0 = rotl64(v0, 32);                      \
		v2 += v3; v3 = rotl64(v3, 16); v3 ^= v2;                                           \
		v0 += v3; v3 = rotl64(v3, 21); v3 ^= v0;                                           \
		v2 += v1; v1 = rotl64(v1, 17); v1 ^= v2; v2 = rotl64(v2, 32);                      \
	} while (0)

__attribute__((noinline)) int tcp_cookie_hash(struct tcp_flow *flow, __u32 isn, __u32 slot)
{
	__u32 zero = 0;
	struct tcp_settings *s = bpf_map_lookup_elem(&tcp_settings, &zero);
	if (!s || !flow)
		return 0;
	__u64 v0 = s->k0 ^ 0x736f6d6570736575ULL;
	__u64 v1 = s->k1 ^ 0x646f72616e646f6dULL;
	__u64 v2 = s->k0 ^ 0x6c7967656e657261ULL;
	__u64 v3 = s->k1 ^ 0x7465646279746573ULL;
	__u64 m[6];
	__builtin_memcpy(&m[0], flow->client, 8);
	__builtin_memcpy(&m[1], flow->client + 8, 8);
	__builtin_memcpy(&m[2], flow->server, 8);
	__builtin_memcpy(&m[3], flow->server + 8, 8);
	m[4] = (__u64)flow->client_port | (__u64)flow->server_port << 16 | (__u64)flow->ipv6 << 32 |
	       (__u64)(isn & 0xffffff) << 40;
	/* The last 5 bytes and the length (45) in the top byte. */
	m[5] = (__u64)(isn >> 24) | (__u64)slot << 8 | 45ULL << 56;
#pragma unroll
	for (int i = 0; i < 6; i++) {
		v3 ^= m[i];
		SIPROUND;
		v0 ^= m[i];
	}
	v2 ^= 0xff;
	SIPROUND;
	SIPROUND;
	SIPROUND;
	return (v0 ^ v1 ^ v2 ^ v3) & 0xffffff;
}

/* The MSS values a SYN-ACK may offer (tcp_lite::cookie::MSS_TABLE): multiples of 16. */
static __always_inline __u32 mss_of_index(__u32 index)
{
	switch (index & 7) {
	case 0: return 256;
	case 1: return 512;
	case 2: return 528;
	case 3: return 1024;
	case 4: return 1216;
	case 5: return 1440;
	case 6: return 1456;
	default: return 3008;
	}
}

/* The index of the largest table entry not above mss (0 if none is). */
static __always_inline __u32 mss_index(__u32 mss)
{
	__u32 index = 0;
#pragma unroll
	for (__u32 i = 1; i < 8; i++)
		if (mss_of_index(i) <= mss)
			index = i;
	return index;
}

static __always_inline __u32 cookie_make(struct tcp_seg *seg, __u32 mss_idx)
{
	__u32 slot = seg->now / TCP_COOKIE_SLOT_SECONDS;
	__u32 hash = tcp_cookie_hash(&seg->flow, seg->seq, slot);
	return ((slot & 31) << 27) | ((mss_idx & 7) << 24) | hash;
}

/* The MSS index of a cookie made for this flow and ISN in this or the previous slot, or -1. */
static __always_inline int cookie_check(struct tcp_seg *seg, __u32 isn, __u32 cookie)
{
	__u32 current = seg->now / TCP_COOKIE_SLOT_SECONDS;
	/* The slot is in the cookie: only the current one or the one before can match. */
	__u32 slot = (current & 31) == cookie >> 27 ? current : current - 1;
	if (current == 0 && slot != current)
		return -1;
	if ((slot & 31) != cookie >> 27)
		return -1;
	if ((__u32)tcp_cookie_hash(&seg->flow, isn, slot) != (cookie & 0xffffff))
		return -1;
	return (cookie >> 24) & 7;
}

/* Ring index of the next reply byte. */
static __always_inline __u32 ring_end(struct tcp_conn *c)
{
	return (c->snd_una + c->out_len - c->iss1) & (TCP_OUT_CAP - 1);
}

/* Appends len request bytes at offset off of the frame to the ring unchanged (echo, sockperf). */
static __always_inline int ring_append(struct xdp_md *ctx, struct tcp_conn *c, __u32 off, __u32 len)
{
	__u32 idx = ring_end(c);
	__u32 first = TCP_OUT_CAP - idx;
	if (first > len)
		first = len;
	asm volatile("" : "+r"(first));
	if (first > TCP_OUT_CAP || len > TCP_OUT_CAP)
		return -1;
	if (first > 0 && bpf_xdp_load_bytes(ctx, off, &c->out[idx], first))
		return -1;
	__u32 rest = len - first;
	asm volatile("" : "+r"(rest));
	if (rest > TCP_OUT_CAP)
		return -1;
	if (rest > 0 && bpf_xdp_load_bytes(ctx, off + first, &c->out[0], rest))
		return -1;
	c->out_len += len;
	return 0;
}

/* Marks the connection rejected for an invalid frame (counted under stat): the replies before it
 * go out, then FIN. */
static __always_inline void reject(struct tcp_conn *c, __u32 stat)
{
	c->state |= TCP_REJECTED | TCP_OUR_FIN;
	c->carry_len = 0;
	c->passthrough = 0;
	count(stat);
	count(STAT_TCP_REJECTED);
}

/* One counter frame: verified, added to the counter, its reply appended to the ring. Returns 0, or
 * the statistic of the drop. */
__attribute__((noinline)) int tcp_counter_frame(struct tcp_conn *c, __u64 value_be, __u64 hash_be)
{
	if (!c)
		return STAT_DROP_TRUNCATED;
	__u64 increment = bpf_be64_to_cpu(value_be);
	if (decimal_xxh64(increment) != bpf_be64_to_cpu(hash_be))
		return STAT_DROP_BAD_HASH;
	__u32 zero = 0;
	struct counter_value *counter_slot = bpf_map_lookup_elem(&counter, &zero);
	if (!counter_slot)
		return STAT_DROP_TRUNCATED;
	__u64 value = __sync_fetch_and_add(&counter_slot->value, increment) + increment;
	/* Counter replies are 16 bytes each, so the ring's end is a multiple of 16. */
	__u32 idx = ring_end(c) & (TCP_OUT_CAP - 16);
	__u64 reply_value = bpf_cpu_to_be64(value);
	__u64 reply_hash = bpf_cpu_to_be64(decimal_xxh64(value));
	__builtin_memcpy(&c->out[idx], &reply_value, 8);
	__builtin_memcpy(&c->out[idx + 8], &reply_hash, 8);
	c->out_len += 16;
	count(STAT_TCP_REPLIES);
	return 0;
}

/* Counter frames split at any byte: a partial frame waits in carry. */
__attribute__((noinline)) int tcp_feed_counter(struct xdp_md *ctx, struct tcp_conn *c, __u32 off,
					       __u32 len)
{
	if (!c || len > TCP_OUT_CAP)
		return 0;
	__u32 carry = c->carry_len & 15;
	if (carry > 0) {
		__u32 take = 16 - carry;
		if (take > len)
			take = len;
		if (take == 0 || bpf_xdp_load_bytes(ctx, off, &c->carry[carry], take))
			return 0;
		off += take;
		len -= take;
		c->carry_len = carry + take;
		if (carry + take < 16)
			return 0;
		c->carry_len = 0;
		__u64 head[2];
		__builtin_memcpy(head, c->carry, 16);
		int bad = tcp_counter_frame(c, head[0], head[1]);
		if (bad) {
			reject(c, bad);
			return 0;
		}
	}
	for (int i = 0; i < TCP_OUT_CAP / 16; i++) {
		if (len < 16)
			break;
		__u64 frame[2];
		if (bpf_xdp_load_bytes(ctx, off, frame, 16))
			return 0;
		int bad = tcp_counter_frame(c, frame[0], frame[1]);
		if (bad) {
			reject(c, bad);
			return 0;
		}
		off += 16;
		len -= 16;
	}
	if (len > 0 && len < 16 && bpf_xdp_load_bytes(ctx, off, c->carry, len) == 0)
		c->carry_len = len;
	return 0;
}

/* sockperf messages: the 14-byte header (carried when split) is answered with its reply-request
 * flag cleared, the rest of the message reflected unchanged. One step of bpf_loop takes a header or
 * a run of message bytes (the verifier checks the step once, not once per iteration). */
struct sockperf_feed {
	struct xdp_md *ctx;
	struct tcp_conn *c;
	__u32 off;
	__u32 len;
};

static long sockperf_step(__u64 index, struct sockperf_feed *f)
{
	struct tcp_conn *c = f->c;
	__u32 len = f->len;
	if (len == 0 || len > TCP_OUT_CAP)
		return 1;
	if (c->passthrough > 0) {
		__u32 n = c->passthrough < len ? c->passthrough : len;
		if (ring_append(f->ctx, c, f->off, n))
			return 1;
		f->off += n;
		f->len = len - n;
		c->passthrough -= n;
		return 0;
	}
	__u32 carry = c->carry_len;
	if (carry >= SOCKPERF_HEADER)
		return 1;
	__u32 take = SOCKPERF_HEADER - carry;
	if (take > len)
		take = len;
	if (bpf_xdp_load_bytes(f->ctx, f->off, &c->carry[carry], take))
		return 1;
	f->off += take;
	f->len = len - take;
	c->carry_len = carry + take;
	if (carry + take < SOCKPERF_HEADER)
		return 1;
	c->carry_len = 0;
	__u32 message = (__u32)c->carry[10] << 24 | (__u32)c->carry[11] << 16 |
			(__u32)c->carry[12] << 8 | c->carry[13];
	if (message < SOCKPERF_HEADER || message > SOCKPERF_MAX_STREAM_MESSAGE) {
		reject(c, STAT_DROP_TOO_SHORT);
		return 1;
	}
	c->carry[9] &= ~1;
	__u32 base = ring_end(c);
#pragma unroll
	for (int b = 0; b < SOCKPERF_HEADER; b++)
		c->out[(base + b) & (TCP_OUT_CAP - 1)] = c->carry[b];
	c->out_len += SOCKPERF_HEADER;
	c->passthrough = message - SOCKPERF_HEADER;
	count(STAT_TCP_REPLIES);
	return 0;
}

__attribute__((noinline)) int tcp_feed_sockperf(struct xdp_md *ctx, struct tcp_conn *c, __u32 off,
						__u32 len)
{
	if (!c || len > TCP_OUT_CAP)
		return 0;
	struct sockperf_feed f = { .ctx = ctx, .c = c, .off = off, .len = len };
	/* Each step takes a header or a run of message bytes: 2 per 14 bytes, and one more. */
	bpf_loop(2 * (TCP_OUT_CAP / SOCKPERF_HEADER) + 2, sockperf_step, &f, 0);
	return 0;
}

/* New in-order bytes, at most the window: framed by the listener's protocol, replies appended. */
static __always_inline void tcp_feed(struct xdp_md *ctx, struct tcp_conn *c, __u32 off, __u32 len)
{
	if (c->protocol == PROTO_COUNTER) {
		tcp_feed_counter(ctx, c, off, len);
	} else if (c->protocol == PROTO_SOCKPERF) {
		tcp_feed_sockperf(ctx, c, off, len);
	} else if (ring_append(ctx, c, off, len) == 0) {
		count(STAT_TCP_REPLIES);
	}
	c->rcv_nxt += len;
}

/* The receive window: request bytes that still fit, their replies included. The ring counts at
 * most one client MSS, so every reply waiting fits in one segment; carried bytes count against it,
 * so answering them never moves the window's right edge back. */
static __always_inline __u32 conn_window(struct tcp_conn *c)
{
	__u32 cap = c->mss < TCP_OUT_CAP ? c->mss : TCP_OUT_CAP;
	__u32 used = TCP_SLACK + c->out_len + c->carry_len;
	return cap > used ? cap - used : 0;
}

/* Applies the client's acknowledgement and window; 0 when it acknowledges something never sent. */
static __always_inline int take_ack(struct tcp_conn *c, __u32 ack, __u16 window)
{
	__u32 acked = ack - c->snd_una;
	if ((__s32)acked < 0)
		return 1;
	if (acked > c->snd_max - c->snd_una)
		return 0;
	__u32 data = acked < c->out_len ? acked : c->out_len;
	c->out_len -= data;
	if (acked > data)
		c->state |= TCP_FIN_ACKED;
	c->snd_una = ack;
	c->peer_window = window;
	return 1;
}

/* Whether sending now would carry reply bytes or a FIN the client has not been sent yet. */
static __always_inline int has_unsent(struct tcp_conn *c)
{
	__u32 fin = (c->state & TCP_OUR_FIN) && !(c->state & TCP_FIN_ACKED);
	__u32 end = c->snd_una + c->out_len + fin;
	__u32 room = c->peer_window < c->mss ? c->peer_window : c->mss;
	if (room > c->out_len)
		room = c->out_len;
	return seq_before(c->snd_max, end) && (room > 0 || c->out_len == 0);
}

/* New in-order data and FIN (conn.rs take_data). */
static __always_inline int take_data(struct xdp_md *ctx, struct tcp_conn *c, __u32 off, __u32 len,
				     int fin)
{
	if (len > 0 && (c->state & (TCP_REJECTED | TCP_PEER_FIN)))
		return STEP_RESET;
	__u32 window = conn_window(c);
	__u32 take = len < window ? len : window;
	fin = fin && take == len;
	if (take > 0)
		tcp_feed(ctx, c, off, take);
	if (fin && !(c->state & TCP_PEER_FIN)) {
		c->rcv_nxt++;
		c->state |= TCP_PEER_FIN | TCP_OUR_FIN;
		/* The stream ended mid-frame, as the kernel path counts it. */
		if ((c->carry_len > 0 || c->passthrough > 0) && !(c->state & TCP_REJECTED))
			count(STAT_DROP_WRONG_LENGTH);
		if (c->state & TCP_FIN_ACKED)
			return STEP_ANSWER_THEN_FORGET;
	}
	return STEP_ANSWER;
}

/* One segment of an established connection, not RST or SYN (conn.rs receive). */
static __always_inline int conn_receive(struct xdp_md *ctx, struct tcp_seg *seg, struct tcp_conn *c)
{
	if (!(seg->flags & TCP_ACK))
		return STEP_QUIET;
	int advanced = seq_before(c->snd_una, seg->ack);
	if (!take_ack(c, seg->ack, seg->window))
		return STEP_ANSWER;
	if ((c->state & TCP_FIN_ACKED) && (c->state & TCP_PEER_FIN))
		return STEP_FORGET;
	int fin = (seg->flags & TCP_FIN) != 0;
	if (seg->payload_len == 0 && !fin) {
		/* A keepalive probe, a duplicate ACK while replies wait, or an ACK after which
		 * something is still to send is answered; any other pure ACK is not. */
		int keepalive = seg->seq == c->rcv_nxt - 1;
		int duplicate = !advanced && c->out_len > 0;
		return keepalive || duplicate || has_unsent(c) ? STEP_ANSWER : STEP_QUIET;
	}
	if (seq_before(c->rcv_nxt, seg->seq)) {
		count(STAT_TCP_OUT_OF_ORDER);
		return STEP_ANSWER;
	}
	/* Bytes already received are never fed again: only what lies beyond rcv_nxt is new. */
	__u32 old = c->rcv_nxt - seg->seq;
	if (old > 0 && seg->payload_len > 0)
		count(STAT_TCP_RETRANSMITTED);
	if (old > seg->payload_len)
		return STEP_ANSWER;
	return take_data(ctx, c, seg->payload_off + old, seg->payload_len - old, fin);
}

/* Reply bytes the connection would send now: the client's MSS and window allow them (conn.rs
 * segment). */
static __always_inline __u32 conn_sendable(struct tcp_conn *c)
{
	__u32 n = c->out_len;
	if (n > c->mss)
		n = c->mss;
	if (n > c->peer_window)
		n = c->peer_window;
	return n;
}

/* The segment a connection sends now, with at most `room` reply bytes (see tcp_room).
 *
 * As conn.rs segment: it acknowledges what was received less the requests whose replies it cannot
 * carry (held by the client's window, or by the room in the frame), never less than it
 * acknowledged before. The client's own retransmission timer then resends those requests, and the
 * answer to that carries the replies left behind: no reply waits on a segment of the client's that
 * may never come, and the server needs no timer. The window's right edge stays where it was. */
static __always_inline void conn_segment(struct tcp_conn *c, struct tcp_out *o, __u32 room)
{
	__u32 sendable = conn_sendable(c);
	__u32 n = sendable < room ? sendable : room;
	__u32 ack = c->rcv_nxt - (c->out_len - n);
	if (seq_before(ack, c->ack_sent))
		ack = c->ack_sent;
	c->ack_sent = ack;
	int fin = (c->state & TCP_OUR_FIN) && !(c->state & TCP_FIN_ACKED) && n == c->out_len;
	o->flags = TCP_ACK | (n > 0 ? TCP_PSH : 0) | (fin ? TCP_FIN : 0);
	__u32 end = c->snd_una + n + fin;
	if (seq_before(c->snd_max, end))
		c->snd_max = end;
	__u32 window = conn_window(c) + (c->rcv_nxt - ack);
	o->seq = c->snd_una;
	o->ack = ack;
	o->window = window < 0xffff ? window : 0xffff;
	o->mss = 0;
	o->len = n;
	o->ring = (c->snd_una - c->iss1) & (TCP_OUT_CAP - 1);
}

static __always_inline __u16 ipv4_header_checksum(struct iphdr *ip)
{
	__u32 *w = (__u32 *)ip;
	__u64 sum = 0;
#pragma unroll
	for (int i = 0; i < 5; i++)
		sum += w[i];
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return ~sum & 0xffff;
}

/* Rewrites the IP header for the answer (addresses swapped, lengths set, TTL 64); returns the
 * pseudo-header's sum, or 0 when the header is not within the frame. */
static __always_inline __u64 answer_ip(struct xdp_md *ctx, struct tcp_seg *seg, __u32 tcp_len)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 l3 = seg->l3_off;
	if (l3 > 22)
		return 0;
	__u64 sum = bpf_htons(IPPROTO_TCP) + (__u64)bpf_htons(tcp_len);
	if (!seg->flow.ipv6) {
		struct iphdr *ip = data + l3;
		if ((void *)(ip + 1) > data_end)
			return 0;
		__u32 a = ip->saddr;
		ip->saddr = ip->daddr;
		ip->daddr = a;
		ip->tos = 0;
		ip->tot_len = bpf_htons(sizeof(*ip) + tcp_len);
		ip->id = 0;
		ip->frag_off = bpf_htons(0x4000); /* DF, as Linux sends TCP */
		ip->ttl = 64;
		ip->check = 0;
		ip->check = ipv4_header_checksum(ip);
		return sum + ip->saddr + ip->daddr;
	}
	struct ipv6hdr *ip6 = data + l3;
	if ((void *)(ip6 + 1) > data_end)
		return 0;
	swap_bytes((__u8 *)&ip6->saddr, (__u8 *)&ip6->daddr, 16);
	*(__be32 *)ip6 = bpf_htonl(6 << 28); /* no traffic class, no flow label */
	ip6->payload_len = bpf_htons(tcp_len);
	ip6->hop_limit = 64;
	__u32 *w = (__u32 *)&ip6->saddr;
#pragma unroll
	for (int i = 0; i < 8; i++)
		sum += w[i];
	return sum;
}

/* How far an answer may grow at the front: XDP guarantees 256 bytes of headroom, of which the kernel
 * keeps about 40 for its xdp_frame on XDP_TX. */
#define TCP_HEAD_GROWTH 192

/* Makes room in the frame for an answer of `payload` bytes after headers of `options` bytes, and
 * returns the payload it can carry: all of it when the frame has that room or can grow at its tail;
 * otherwise it grows at the front by up to TCP_HEAD_GROWTH bytes, the headers moved along. (Native
 * XDP on veth, for one, hands the program frames cut to the segment's size, with almost no
 * tailroom.) A reply that does not fit goes with the connection's next answer. */
__attribute__((noinline)) int tcp_room(struct xdp_md *ctx, struct tcp_seg *seg, __u32 payload,
				       __u32 options)
{
	if (!seg || payload > TCP_OUT_CAP || options > 4)
		return 0;
	__u32 headers = seg->l4_off + sizeof(struct tcphdr);
	if (headers < sizeof(struct tcphdr) || headers > sizeof(seg->headers))
		return 0;
	int len = ctx->data_end - ctx->data;
	int want = headers + options + payload;
	if (want <= len || bpf_xdp_adjust_tail(ctx, want - len) == 0)
		return payload;
	int grow = want - len;
	if (grow > TCP_HEAD_GROWTH)
		grow = TCP_HEAD_GROWTH;
	int room = len - (int)(headers + options);
	if (bpf_xdp_load_bytes(ctx, 0, seg->headers, headers) || bpf_xdp_adjust_head(ctx, -grow))
		return room > 0 ? room : 0;
	if (bpf_xdp_store_bytes(ctx, 0, seg->headers, headers))
		return -1;
	room += grow;
	return room > 0 ? room : 0;
}

/* Turns the frame into the answer o, with the payload from c's ring: the frame is resized, the
 * Ethernet and IP addresses and the ports are swapped, every checksum is computed in full (veth
 * hands partial ones in). Returns the XDP action. */
__attribute__((noinline)) int tcp_emit(struct xdp_md *ctx, struct tcp_seg *seg, struct tcp_out *o,
				       struct tcp_conn *c)
{
	if (!seg || !o)
		return XDP_ABORTED;
	__u32 l4 = seg->l4_off;
	__u32 n = o->len;
	__u32 options = o->mss ? 4 : 0;
	if (l4 > MAX_UDP_OFFSET || n > TCP_OUT_CAP || (n > 0 && !c))
		return XDP_ABORTED;
	__u32 tcp_len = sizeof(struct tcphdr) + options + n;
	int delta = (int)(l4 + tcp_len) - (int)(ctx->data_end - ctx->data);
	if (delta != 0 && bpf_xdp_adjust_tail(ctx, delta))
		return XDP_DROP;
	if (n > 0) {
		__u32 ring = o->ring & (TCP_OUT_CAP - 1);
		__u32 first = TCP_OUT_CAP - ring;
		if (first > n)
			first = n;
		asm volatile("" : "+r"(first));
		if (first > TCP_OUT_CAP || !c)
			return XDP_ABORTED;
		__u32 at = l4 + sizeof(struct tcphdr) + options;
		if (first > 0 && bpf_xdp_store_bytes(ctx, at, &c->out[ring], first))
			return XDP_ABORTED;
		__u32 rest = n - first;
		asm volatile("" : "+r"(rest));
		if (rest > TCP_OUT_CAP)
			return XDP_ABORTED;
		if (rest > 0 && bpf_xdp_store_bytes(ctx, at + first, &c->out[0], rest))
			return XDP_ABORTED;
	}
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return XDP_ABORTED;
	swap_bytes(eth->h_dest, eth->h_source, 6);
	__u64 seed = answer_ip(ctx, seg, tcp_len);
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	struct tcphdr *th = data + l4;
	if (seed == 0 || (void *)(th + 1) > data_end)
		return XDP_ABORTED;
	__be16 port = th->source;
	th->source = th->dest;
	th->dest = port;
	th->seq = bpf_htonl(o->seq);
	th->ack_seq = bpf_htonl(o->ack);
	((__u8 *)th)[12] = (sizeof(struct tcphdr) + options) / 4 << 4;
	((__u8 *)th)[13] = o->flags;
	th->window = bpf_htons(o->window);
	th->check = 0;
	th->urg_ptr = 0;
	if (options) {
		__u8 *opt = (void *)(th + 1);
		if ((void *)(opt + 4) > data_end)
			return XDP_ABORTED;
		opt[0] = 2;
		opt[1] = 4;
		opt[2] = o->mss >> 8;
		opt[3] = o->mss & 0xff;
	}
	int check = l4_checksum(ctx, l4, tcp_len, seed);
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	th = data + l4;
	if (check < 0 || (void *)(th + 1) > data_end)
		return XDP_ABORTED;
	th->check = check;
	count(STAT_TCP_SEGMENTS_TX);
	return XDP_TX;
}

/* An RST answering a segment that acknowledged ack (RFC 9293: its sequence number is that ACK). */
static __always_inline int send_reset(struct xdp_md *ctx, struct tcp_seg *seg)
{
	struct tcp_out o = { .seq = seg->ack, .flags = TCP_RST };
	count(STAT_TCP_RESETS_SENT);
	return tcp_emit(ctx, seg, &o, 0);
}

/* A SYN for no connection: its SYN-ACK, with a cookie for sequence number and no state. */
static __always_inline int send_syn_ack(struct xdp_md *ctx, struct tcp_seg *seg)
{
	__u32 zero = 0;
	struct tcp_settings *s = bpf_map_lookup_elem(&tcp_settings, &zero);
	if (!s)
		return XDP_ABORTED;
	int option = tcp_mss_option(ctx, seg->l4_off);
	__u32 mss = option < 0 ? TCP_DEFAULT_MSS : option;
	if (mss > s->max_mss)
		mss = s->max_mss;
	if (mss == 0)
		mss = 1;
	__u32 index = mss_index(mss);
	struct tcp_out o = {
		.seq = cookie_make(seg, index),
		.ack = seg->seq + 1,
		.flags = TCP_SYN | TCP_ACK,
		.window = TCP_OUT_CAP - TCP_SLACK,
		.mss = mss_of_index(index),
	};
	/* A SYN without options leaves no room for the MSS option only if the frame cannot grow by
	 * four bytes at either end: the SYN-ACK then goes without it (the client assumes 536). */
	if (tcp_room(ctx, seg, 0, 4) < 0)
		return XDP_ABORTED;
	if (ctx->data_end - ctx->data < seg->l4_off + sizeof(struct tcphdr) + 4)
		o.mss = 0;
	return tcp_emit(ctx, seg, &o, 0);
}

static __always_inline void forget(struct tcp_flow *flow)
{
	struct tcp_flow key = *flow;
	if (bpf_map_delete_elem(&tcp_conns, &key) == 0)
		count(STAT_TCP_CLOSED);
}

/* A connection's answer to a segment (mod.rs established). */
__attribute__((noinline)) int tcp_established(struct xdp_md *ctx, struct tcp_seg *seg,
					      struct tcp_conn *c)
{
	if (!seg || !c)
		return XDP_ABORTED;
	c->last_seen = seg->now;
	int step;
	if (seg->flags & TCP_RST) {
		/* Exact anywhere from the last acknowledgement sent (which may lie behind rcv_nxt,
		 * see conn_segment) to rcv_nxt. */
		__u32 offset = seg->seq - c->rcv_nxt;
		if (!seq_before(seg->seq, c->ack_sent) && !seq_before(c->rcv_nxt, seg->seq))
			step = STEP_FORGET;
		else
			step = offset < conn_window(c) ? STEP_ANSWER : STEP_QUIET;
	} else if (seg->flags & TCP_SYN) {
		/* A new connection on a flow still known, or a stale duplicate: challenge ACK. */
		step = STEP_ANSWER;
	} else {
		step = conn_receive(ctx, seg, c);
	}
	struct tcp_out o = {};
	int room = 0;
	if (step == STEP_ANSWER || step == STEP_ANSWER_THEN_FORGET) {
		room = tcp_room(ctx, seg, conn_sendable(c), 0);
		if (room < 0)
			return XDP_ABORTED;
	}
	switch (step) {
	case STEP_QUIET:
		return XDP_DROP;
	case STEP_FORGET:
		forget(&seg->flow);
		return XDP_DROP;
	case STEP_RESET:
		forget(&seg->flow);
		return send_reset(ctx, seg);
	case STEP_ANSWER_THEN_FORGET: {
		/* The answer is built from the entry before it goes: a preallocated hash map may hand
		 * a deleted element to another CPU's insert at once. */
		conn_segment(c, &o, room);
		int action = tcp_emit(ctx, seg, &o, c);
		forget(&seg->flow);
		return action;
	}
	default:
		conn_segment(c, &o, room);
		return tcp_emit(ctx, seg, &o, c);
	}
}

/* Creates the connection of an ACK whose cookie checked out (MSS index idx); 0 when the table is
 * full. */
static __always_inline int tcp_create(struct tcp_seg *seg, __u32 idx)
{
	__u32 zero = 0;
	struct tcp_conn *fresh = bpf_map_lookup_elem(&tcp_scratch, &zero);
	if (!fresh)
		return 0;
	fresh->rcv_nxt = seg->seq;
	fresh->snd_una = seg->ack;
	fresh->snd_max = seg->ack;
	fresh->iss1 = seg->ack;
	fresh->last_seen = seg->now;
	fresh->passthrough = 0;
	fresh->mss = mss_of_index(idx);
	fresh->peer_window = 0;
	fresh->out_len = 0;
	fresh->protocol = seg->protocol;
	fresh->state = 0;
	fresh->carry_len = 0;
	fresh->ack_sent = seg->seq;
	struct tcp_flow key = seg->flow;
	if (bpf_map_update_elem(&tcp_conns, &key, fresh, BPF_NOEXIST))
		return 0;
	count(STAT_TCP_HANDSHAKES);
	return 1;
}

/* A segment for no connection (mod.rs unknown): the action, or -1 when it created the connection
 * (the segment is then the connection's first). */
__attribute__((noinline)) int tcp_unknown(struct xdp_md *ctx, struct tcp_seg *seg)
{
	if (!seg)
		return XDP_ABORTED;
	if (seg->flags & TCP_RST)
		return XDP_DROP;
	__u8 handshake = seg->flags & (TCP_SYN | TCP_ACK);
	if (handshake == TCP_SYN)
		return send_syn_ack(ctx, seg);
	if (handshake != TCP_ACK)
		return XDP_DROP;
	int idx = cookie_check(seg, seg->seq - 1, seg->ack - 1);
	if (idx < 0) {
		/* No handshake, or a forgotten connection: never reaches a counter; RST tells the
		 * client at once, as Linux answers a segment for a closed port. */
		count(STAT_TCP_COOKIE_FAILURES);
		return send_reset(ctx, seg);
	}
	if (!tcp_create(seg, idx)) {
		count(STAT_TCP_TABLE_FULL);
		return send_reset(ctx, seg);
	}
	/* Created: the caller takes the segment on as the connection's. */
	return -1;
}

/* Whether a connection has been silent for longer than the idle timeout at now. */
static __always_inline int conn_idle(struct tcp_conn *c, __u32 now)
{
	__u32 zero = 0;
	struct tcp_settings *s = bpf_map_lookup_elem(&tcp_settings, &zero);
	/* Signed: another CPU may have stamped the entry a second later than this `now`. */
	return s && (__s32)(now - c->last_seen) > (__s32)s->idle_timeout;
}

/* A TCP segment for a TCP listener in xdp mode. A global function: its stack is not added to the
 * UDP path's. */
__attribute__((noinline)) int tcp_respond(struct xdp_md *ctx)
{
	__u32 zero = 0;
	struct tcp_seg *seg = bpf_map_lookup_elem(&tcp_segs, &zero);
	if (!seg)
		return XDP_ABORTED;
	int found = tcp_locate(ctx, seg);
	if (found == 0)
		return verdict(STAT_PASSED, XDP_PASS);
	if (found < 0)
		return verdict(-found, XDP_DROP);
	seg->now = bpf_ktime_get_coarse_ns() / 1000000000ULL;
	struct tcp_conn *c = bpf_map_lookup_elem(&tcp_conns, &seg->flow);
	if (c && conn_idle(c, seg->now)) {
		/* Expired but not swept yet: as good as gone. */
		if (bpf_map_delete_elem(&tcp_conns, &seg->flow) == 0) {
			count(STAT_TCP_CLOSED);
			count(STAT_TCP_IDLE_CLOSED);
		}
		c = 0;
	}
	if (!c) {
		int action = tcp_unknown(ctx, seg);
		if (action >= 0)
			return action;
		c = bpf_map_lookup_elem(&tcp_conns, &seg->flow);
		if (!c)
			return XDP_DROP;
	}
	return tcp_established(ctx, seg, c);
}

/* ricochet_tcp_expire: run by userspace once a second (BPF_PROG_TEST_RUN on an empty frame), it
 * forgets every connection idle for longer than the timeout. Counts with atomic adds: it may run on
 * a CPU whose XDP traffic interrupts it. */
static long expire_one(void *map, struct tcp_flow *flow, struct tcp_conn *c, __u32 *now)
{
	if (conn_idle(c, *now) && bpf_map_delete_elem(map, flow) == 0) {
		count_atomic(STAT_TCP_CLOSED);
		count_atomic(STAT_TCP_IDLE_CLOSED);
	}
	return 0;
}

static __always_inline int tcp_expire(void)
{
	__u32 now = bpf_ktime_get_coarse_ns() / 1000000000ULL;
	bpf_for_each_map_elem(&tcp_conns, expire_one, &now, 0);
	return XDP_DROP;
}
