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
	STAT_COUNT = 11,
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
