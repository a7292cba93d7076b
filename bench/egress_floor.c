/* egress_floor.c: an empty cgroup_skb egress program, attached beside ctlb_egress by
 * `bench.program_cost --drop --floor`: the kernel's run-time accounting (two clock reads per
 * run, ~50 ns on a VM) is in every program's ns/call, so the egress program's own cost is its
 * figure minus this one's, measured over the same packets. */
#include <uapi/linux/bpf.h>

int ctlb_floor(struct __sk_buff *skb)
{
	return 1;
}
