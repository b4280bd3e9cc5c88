// SPDX-License-Identifier: MIT OR Apache-2.0
/* XDP_PASS for every frame. A veth interface delivers frames sent to it with XDP_TX (or redirected
 * to it) only when it has an XDP program of its own; the lab attaches this one to the client side. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("xdp")
int ricochet_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
