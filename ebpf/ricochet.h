/* Shared between the XDP program and userspace: map layouts and statistics indices.
 *
 * userspace/src/xdp/maps.rs mirrors these definitions; a test there parses this header and fails when
 * the two disagree, so they cannot drift apart silently.
 */
#ifndef RICOCHET_H
#define RICOCHET_H

/* Protocols a listener speaks: the numbers of xdp::maps::protocol_id in userspace. */
#define PROTO_COUNTER 0
#define PROTO_ECHO 1
#define PROTO_SOCKPERF 2

/* Listener key: destination address and port as they appear on the wire.
 * family is 4 or 6; transport is the IP protocol (UDP, or TCP for afxdp mode's TCP-lite); IPv4
 * addresses occupy addr[0..4] with the rest zero. An all-zero address is a
 * wildcard (0.0.0.0 or ::) matching any destination address of that family. */
struct listener_key {
	__u8 family;
	__u8 transport;
	__be16 port;
	__u8 addr[16];
};

struct listener_value {
	__u8 protocol;
	__u8 pad[3];
};

/* Per-CPU counters, one slot each in the xdp_stats PERCPU_ARRAY. */
enum xdp_stat {
	STAT_STEERED = 0,        /* redirected to an AF_XDP socket */
	STAT_NO_SOCKET = 1,      /* for a listener, but no socket on this queue: passed to the kernel */
	STAT_PASSED = 2,         /* not for a listener: passed to the kernel */
	STAT_DROP_WRONG_LENGTH = 3, /* counter payload not 16 bytes */
	STAT_DROP_TOO_SHORT = 4, /* sockperf payload shorter than 14 bytes */
	STAT_DROP_TRUNCATED = 5, /* IP or UDP length beyond the frame, or UDP length below 8 */
	STAT_DROP_FRAGMENT = 6,  /* first fragment of a fragmented datagram for a listener */
	STAT_TX = 7,             /* answered in the XDP program (XDP_TX) */
	STAT_DROP_BAD_HASH = 8,  /* counter frame whose hash does not match its value (responder only) */
	STAT_DROP_ZERO_SOURCE_PORT = 9, /* UDP source port 0: no reply can be addressed to it */
	STAT_PASSED_TOO_LONG = 10, /* longer than RESPONDER_MAX_UDP_LEN: passed to the kernel (responder only) */
	/* TCP-lite in the responder (xdp mode). */
	STAT_TCP_REPLIES = 11,   /* requests answered over TCP (frames; an echo segment is one) */
	STAT_TCP_SEGMENTS_TX = 12, /* segments sent with XDP_TX: SYN-ACKs, answers, ACKs and RSTs */
	STAT_TCP_HANDSHAKES = 13, /* connections created by an ACK whose cookie checked out */
	STAT_TCP_CLOSED = 14,    /* connections forgotten, for any reason */
	STAT_TCP_COOKIE_FAILURES = 15, /* segments for no connection whose cookie failed: RST */
	STAT_TCP_RETRANSMITTED = 16, /* data segments carrying bytes already received */
	STAT_TCP_OUT_OF_ORDER = 17, /* data segments beyond the next expected byte: duplicate ACK */
	STAT_TCP_RESETS_SENT = 18,
	STAT_TCP_TABLE_FULL = 19, /* handshakes refused because the table is full */
	STAT_TCP_IDLE_CLOSED = 20, /* connections forgotten after the idle timeout */
	STAT_TCP_REJECTED = 21,  /* connections closed for an invalid frame */
	STAT_COUNT = 22,
};

/* TCP-lite (xdp mode): the program's connection table, keyed by flow. */
#define TCP_OUT_CAP 1024 /* reply bytes kept until acknowledged (a ring) */
#define TCP_SLACK 16     /* room beyond the window: a frame completed now answers earlier bytes */

/* A connection's addresses and ports as the client sends them, ports in host order; IPv4 addresses
 * fill the first four bytes. The SYN cookie hashes these 40 bytes' first 37 (see tcp_cookie_hash). */
struct tcp_flow {
	__u8 client[16];
	__u8 server[16];
	__u16 client_port;
	__u16 server_port;
	__u8 ipv6;
	__u8 pad[3];
};

/* Set by userspace at load: the cookie secret (SipHash key), the idle timeout and the largest MSS. */
struct tcp_settings {
	__u64 k0;
	__u64 k1;
	__u32 idle_timeout;
	__u16 max_mss;
	__u16 pad;
};

/* conn.state bits */
#define TCP_PEER_FIN 1  /* the client sent FIN (counted in rcv_nxt) */
#define TCP_OUR_FIN 2   /* the server closes: FIN follows the last reply byte */
#define TCP_FIN_ACKED 4 /* the client acknowledged the server's FIN */
#define TCP_REJECTED 8  /* an invalid frame arrived: FIN after the replies before it, RST to more data */

/* One connection, the value of the tcp_conns hash map. The reply byte with sequence number s sits at
 * out[(s - iss1) % TCP_OUT_CAP]. out holds twice TCP_OUT_CAP bytes so that the verifier can prove a
 * copy of up to TCP_OUT_CAP bytes from any start index stays inside the value; only the first half
 * is used. */
struct tcp_conn {
	__u32 rcv_nxt;     /* the next byte expected from the client */
	__u32 snd_una;     /* the oldest reply byte not acknowledged */
	__u32 snd_max;     /* the highest sequence number sent, plus one */
	__u32 iss1;        /* the sequence number of reply byte 0 */
	__u32 last_seen;   /* seconds of the program's clock (CLOCK_MONOTONIC_COARSE) */
	__u32 passthrough; /* sockperf: message bytes still to reflect unchanged */
	__u16 mss;         /* the client's MSS (the one the SYN-ACK offered) */
	__u16 peer_window; /* the client's last advertised window */
	__u16 out_len;     /* reply bytes not acknowledged */
	__u8 protocol;
	__u8 state;
	__u8 carry_len;    /* bytes of a partial frame (or sockperf header) in carry */
	__u8 pad[3];
	__u32 ack_sent;    /* the highest acknowledgement sent (see conn_segment) */
	__u8 carry[32];    /* 16 used; the rest lets the verifier prove variable-offset copies */
	__u8 out[2 * TCP_OUT_CAP];
};

/* The longest UDP datagram (header included) the responder answers itself. Without multi-buffer
 * support a frame in native XDP lives in one page, so on 4 KiB pages no datagram it holds is longer
 * (veth refuses native XDP above an MTU of about 3,500). A longer datagram (generic XDP with a large
 * MTU) goes to the kernel, whose socket path answers it. */
#define RESPONDER_MAX_UDP_LEN 4096

/* The global counter: one u64 in a BPF_F_MMAPABLE array, shared with userspace by mmap. */
struct counter_value {
	__u64 value;
};

#define MAX_LISTENERS 64
#define MAX_QUEUES 256

#endif
