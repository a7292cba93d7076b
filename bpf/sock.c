/* sock.c: connect-time load balancing on the cgroup sock_addr hooks, IPv4 and IPv6.
 *
 * connect/sendmsg rewrite a Service frontend to one backend before the socket ever sends, so no
 * packet is NATed. recvmsg/getpeername rewrite the backend back to the frontend, so UDP clients
 * (DNS resolvers above all) and getpeername() see the address they asked for.
 *
 * In a pod of a meshed namespace, ctlb_meshconn4/6 (attached to that pod's cgroup) send TCP to
 * the pod's sidecar first (see "Pods and the sidecar mesh"); ctlb_sockops and ctlb_getsockopt
 * then hand the sidecar the destination the application asked for, as SO_ORIGINAL_DST.
 *
 * Entry points (ctlb_*) are thin: the workers return 0 (translated), -ENOENT (not a frontend:
 * leave the socket alone) or another -errno, and only the entry point turns that into a verdict.
 *
 * Dropping is a translation too: the socket is sent to the drop address (ctlb.h), where
 * ctlb_egress (drop.c) discards its packets. See lb4_drop_dest() below.
 *
 * Cost: see the header. The translating path reads ARRAY maps only (lookups inlined by the
 * verifier) and calls one helper, bpf_get_socket_cookie(); bpf_jiffies64() is inlined too. The
 * pick mixes the cookie (new for every socket) with jiffies instead of calling
 * bpf_get_prandom_u32(). Session affinity adds a helper call (~40 ns on this kind of VM), the
 * client's netns cookie, and reads its table's slots inline; where the kernel's HZ is unknown,
 * the coarse clock is a second call (see affinity_now()).
 */
#include "ctlb.h"

#define SYS_REJECT 0
#define SYS_PROCEED 1

/* Keeps clang from merging or reordering context accesses: the verifier accepts only the
 * 32-bit loads and stores the sock_addr context defines. Also orders the reads of a slot that
 * user space or another CPU may be writing. */
#ifndef barrier
#define barrier() asm volatile("" ::: "memory")
#endif

/* The peer choice below (replace the least recently used, search the most recent first)
 * is written for two peers. */
_Static_assert(CTLB_SOCK_PEERS == 2, "sock.c handles exactly two peers per socket slot");

#define READ_U32(p) (*(volatile __u32 *)(p))
#define READ_U64(p) (*(volatile __u64 *)(p))

/* A frontend key as the one word a slot is compared by. */
union lb4_key_word {
	struct lb4_key key;
	__u64 word;
};

/* ::ffff:0:0/96, in network order words: an IPv4 peer on an IPv6 socket. */
static __always_inline bool v4mapped(__be32 a0, __be32 a1, __be32 a2)
{
	return a0 == 0 && a1 == 0 && a2 == bpf_htonl(0x0000ffff);
}

/* user_port holds the port in network order in its low 16 bits. */
static __always_inline __be16 ctx_port(const struct bpf_sock_addr *ctx)
{
	volatile __u32 port = ctx->user_port;

	return (__be16)port;
}

static __always_inline void ctx_set_port(struct bpf_sock_addr *ctx, __be16 port)
{
	ctx->user_port = (__u32)port;
}

static __always_inline void ctx_get_ip6(const struct bpf_sock_addr *ctx, __be32 *addr)
{
	addr[0] = ctx->user_ip6[0];
	barrier();
	addr[1] = ctx->user_ip6[1];
	barrier();
	addr[2] = ctx->user_ip6[2];
	barrier();
	addr[3] = ctx->user_ip6[3];
	barrier();
}

static __always_inline void ctx_set_ip6(struct bpf_sock_addr *ctx, const __be32 *addr)
{
	ctx->user_ip6[0] = addr[0];
	barrier();
	ctx->user_ip6[1] = addr[1];
	barrier();
	ctx->user_ip6[2] = addr[2];
	barrier();
	ctx->user_ip6[3] = addr[3];
	barrier();
}

static __always_inline void copy_ip6(__be32 *dst, const __be32 *src)
{
	dst[0] = src[0];
	dst[1] = src[1];
	dst[2] = src[2];
	dst[3] = src[3];
}

/* An IPv6 address from a context (sock_ops, bpf_sock): only 32-bit loads are allowed there. */
static __always_inline void ctx_read_ip6(const __u32 *src, __be32 *dst)
{
	dst[0] = READ_U32(&src[0]);
	dst[1] = READ_U32(&src[1]);
	dst[2] = READ_U32(&src[2]);
	dst[3] = READ_U32(&src[3]);
}

static __always_inline bool ip6_eq(const __be32 *a, const __be32 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

/* murmur3's 64-bit finaliser. ctlb/datapath/tables.py computes the same home slots. */
static __always_inline __u64 ctlb_mix64(__u64 x)
{
	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdULL;
	x ^= x >> 33;
	x *= 0xc4ceb9fe1a85ec53ULL;
	x ^= x >> 33;
	return x;
}

/* An IPv6 key's three words folded into one finaliser run (a chain of three costs ~10 ns more):
 * the rotation brings the address's last bytes, where Service addresses differ, down to where
 * the port does not overlap them. */
static __always_inline __u64 fe6_hash(__u64 w0, __u64 w1, __u32 w2)
{
	return ctlb_mix64(w0 ^ ((w1 << 32) | (w1 >> 32)) ^ ((__u64)w2 << 16));
}

/* Maps 32 bits of a hash onto [0, n) with a multiply, not a division. */
static __always_inline __u32 scale32(__u64 hash, __u32 n)
{
	return (__u32)(((hash & 0xffffffffULL) * n) >> 32);
}

static __always_inline __u32 fe_next(__u32 idx)
{
	return idx + 1 >= CTLB_FE_SLOTS ? 0 : idx + 1;
}

/* A backend pick: the socket cookie is new for every socket, jiffies move it along for a socket
 * that sends again, and the frontend's svc_id keeps two Services of one socket apart. */
static __always_inline __u32 pick_slot(const struct lb_frontend *fe, __u64 cookie)
{
	return fe->set_start + scale32(ctlb_mix64(cookie ^ (bpf_jiffies64() << 32) ^ fe->svc_id), fe->count);
}

/* Copies the current value of a slot whose key matched, consistently (see struct lb4_fe_slot):
 * gen unchanged across the copy means no update overlapped it. */
static __always_inline int fe_copy(const __u32 *genp, const struct lb_frontend *val, struct lb_frontend *out)
{
	__u32 gen;

#pragma unroll
	for (int i = 0; i < CTLB_FE_RETRIES; i++) {
		const struct lb_frontend *v;

		gen = READ_U32(genp);
		barrier();
		v = (gen & 1) ? &val[1] : &val[0];
		out->svc_id = v->svc_id;
		out->set_id = v->set_id;
		out->set_start = v->set_start;
		out->count = v->count;
		out->affinity_timeout = v->affinity_timeout;
		out->flags = v->flags;
		barrier();
		if (READ_U32(genp) == gen)
			return 0;
	}
	/* Rewritten three times within a few nanoseconds: user space never does that. */
	return -EAGAIN;
}

/* Affinity time: timeouts are whole seconds, so one tick of resolution is plenty. In jiffies
 * when user space told the kernel's HZ (the verifier inlines bpf_jiffies64(): a load), else
 * from the coarse clock (a helper call, ~40 ns here). An entry written under the other clock
 * (an agent upgrade or downgrade) is misread at most until its client's next pick: nanoseconds
 * read as jiffies lie in the future (stale), jiffies read as nanoseconds may pass for fresh, and
 * its backend is still checked against the current set. */
#if defined(CTLB_HZ) && CTLB_HZ > 0
#define AFFINITY_TICKS_PER_SEC ((__u64)CTLB_HZ)
static __always_inline __u64 affinity_now(void)
{
	return bpf_jiffies64();
}
#else
#define AFFINITY_TICKS_PER_SEC CTLB_NSEC_PER_SEC
static __always_inline __u64 affinity_now(void)
{
	return bpf_ktime_get_coarse_ns();
}
#endif

static __always_inline bool affinity_fresh(const struct lb_frontend *fe, __u64 last_used, __u64 now)
{
	return now - last_used <= (__u64)fe->affinity_timeout * AFFINITY_TICKS_PER_SEC;
}

/* The first slot of the set of a client's entry in the session-affinity tables (struct
 * lb4_affinity). Netns cookies and svc_ids are both small counters: the mix spreads them. */
static __always_inline __u32 affinity_set(const struct lb_affinity_key *key)
{
	__u64 hash = ctlb_mix64(key->client ^ ((__u64)key->svc_id << 32));

	return (__u32)hash & (CTLB_AFFINITY_SLOTS - 1) & ~(__u32)(CTLB_AFFINITY_WAYS - 1);
}

static __always_inline bool affinity_key_eq(const struct lb_affinity_key *slot, const struct lb_affinity_key *key)
{
	return READ_U64(&slot->client) == key->client && READ_U32(&slot->svc_id) == key->svc_id;
}

/* Turns a worker's result into the hook's verdict. */
static __always_inline int sock_verdict(int ret)
{
	if (ret == 0 || ret == -ENOENT)
		return SYS_PROCEED;
	/* The errno the application sees: ECONNREFUSED for "no backends", like kube-proxy's REJECT. */
	bpf_set_retval(ret);
	return SYS_REJECT;
}

/* --- Pods and the sidecar mesh --------------------------------------------------------- */

/* Which pod a socket belongs to, and whether its sidecar captures a connection.
 *
 * A pod is found by the cgroup of the task that connects: the programs hang on the cgroup root,
 * so they ask for the current task's ancestor at each level where user space says pod cgroups
 * exist (ctlb_settings.pod_levels) and look that id up in ctlb_pods. That walk costs a helper
 * call and a hash lookup per level (~130 ns with one level on this VM), so its answer is kept
 * per CPU (ctlb_pod_cache). The mesh redirect runs only in meshed pods (ctlb_meshconn4/6 hang
 * on their own cgroups), and the root programs ask for a pod only when the frontend admits some
 * sources only or socket-trace listens.
 *
 * Capture follows Istio's iptables rules: TCP only; never the sidecar's own uid; never a
 * loopback destination, nor the sidecar's own port (a connection is never captured onto the
 * sidecar itself); never an excluded port; only included ranges, minus excluded ones.
 */
static __always_inline const struct ctlb_settings *ctlb_settings_get(void)
{
	__u32 zero = 0;

	return ctlb_settings_v2.lookup(&zero);
}

/* The answer of the last pod lookup made on this CPU, for the cgroup of the task that asked.
 * Private to these programs (not pinned): a new program load starts with an empty one. */
struct pod_cache {
	__u64 cgroup_id;  /* the task's own cgroup; 0 while the entry is being written */
	__u32 generation; /* ctlb_settings.generation the answer was looked up under */
	__u32 found;      /* 0: no pod */
	struct pod_info pod;
};

BPF_PERCPU_ARRAY(ctlb_pod_cache, struct pod_cache, 1);

/* The pod of the current task, walked up from its cgroup: false for none (a process of the
 * node itself, or a pod ctlb does not know). */
static __always_inline bool pod_walk(__u32 levels, struct pod_info *out)
{
#pragma unroll
	for (int level = 1; level < CTLB_POD_LEVELS; level++) {
		__u64 id;
		struct pod_info *pod;

		if (!(levels & (1u << level)))
			continue;
		id = bpf_get_current_ancestor_cgroup_id(level);
		pod = ctlb_pods.lookup(&id);
		if (pod) {
			*out = *pod;
			return true;
		}
	}
	return false;
}

/* pod_walk() through the per-CPU cache: a hit costs one helper call (the task's cgroup id).
 * The generation is read before the walk, so an answer cached while user space changed a pod
 * carries the generation before the change and is not used after it. Another run of these
 * programs on this CPU (after a preemption) may rewrite the entry while this one reads it, so
 * the entry is read like a seqlock: checked, copied, checked again. */
static __always_inline bool current_pod(const struct ctlb_settings *settings, struct pod_info *out)
{
	__u32 zero = 0;
	__u32 generation = READ_U32(&settings->generation);
	__u64 cgroup_id = bpf_get_current_cgroup_id();
	struct pod_cache *c = ctlb_pod_cache.lookup(&zero);
	bool found;

	if (!c)
		return pod_walk(settings->pod_levels, out);
	if (READ_U64(&c->cgroup_id) == cgroup_id && READ_U32(&c->generation) == generation) {
		found = c->found;
		*out = c->pod;
		barrier();
		if (READ_U64(&c->cgroup_id) == cgroup_id && READ_U32(&c->generation) == generation)
			return found;
	}
	found = pod_walk(settings->pod_levels, out);
	c->cgroup_id = 0;
	barrier();
	c->generation = generation;
	c->found = found;
	if (found)
		c->pod = *out;
	barrier();
	c->cgroup_id = cgroup_id;
	return found;
}

/* The meshed pod of the current task, into *out, when the node has any. */
static __always_inline bool current_meshed_pod(struct pod_info *out)
{
	const struct ctlb_settings *settings = ctlb_settings_get();

	if (!settings || settings->meshed_pods == 0)
		return false;
	return current_pod(settings, out) && (out->flags & POD_F_MESH);
}

/* The client of a connection, for loadBalancerSourceRanges and socket-trace: the pod of the
 * connecting task, as its cgroup tells (ctlb_pods), with the pod's address; or the node itself, for the node's own
 * processes, host-network pods, and pods whose cgroup or address ctlb does not know yet. */
static __always_inline bool source_pod(struct pod_info *out)
{
	const struct ctlb_settings *settings = ctlb_settings_get();

	if (!settings || settings->pod_levels == 0)
		return false;
	return current_pod(settings, out);
}

/* Whether the task is the sidecar itself, whose connections are never captured. */
static __always_inline bool mesh_is_sidecar(const struct pod_info *pod)
{
	return (__u32)bpf_get_current_uid_gid() == pod->sidecar_uid;
}

static __always_inline bool mesh_port_excluded(const struct pod_info *pod, __be16 port)
{
	struct mesh_port_key key = {};

	if (!(pod->flags & POD_F_EXCLUDE_PORTS))
		return false;
	key.pod_id = pod->pod_id;
	key.port = port;
	return ctlb_mesh_ports.lookup(&key) != NULL;
}

static __always_inline bool mesh4_in_ranges(const struct pod_info *pod, __u32 kind, __be32 addr)
{
	struct mesh_range4_key key = {};

	key.prefixlen = 64 + 32;
	key.pod_id = pod->pod_id;
	key.kind = kind;
	key.addr = addr;
	return ctlb_mesh_range4.lookup(&key) != NULL;
}

static __always_inline bool mesh6_in_ranges(const struct pod_info *pod, __u32 kind, const __be32 *addr)
{
	struct mesh_range6_key key = {};

	key.prefixlen = 64 + 128;
	key.pod_id = pod->pod_id;
	key.kind = kind;
	copy_ip6(key.addr, addr);
	return ctlb_mesh_range6.lookup(&key) != NULL;
}

/* 127.0.0.0/8 */
static __always_inline bool ip4_is_loopback(__be32 addr)
{
	return (bpf_ntohl(addr) >> 24) == 127;
}

static __always_inline bool ip6_is_loopback(const __be32 *addr)
{
	return addr[0] == 0 && addr[1] == 0 && addr[2] == 0 && addr[3] == bpf_htonl(1);
}

/* Whether the sidecar captures a TCP connection from `pod` to addr:port (IPv4). */
static __always_inline bool mesh4_captures(const struct pod_info *pod, __be32 addr, __be16 port)
{
	if (ip4_is_loopback(addr) || port == pod->outbound_port || mesh_port_excluded(pod, port))
		return false;
	if (!(pod->flags & POD_F_INCLUDE_ALL) &&
	    !((pod->flags & POD_F_INCLUDE_RANGES) && mesh4_in_ranges(pod, MESH_RANGE_INCLUDE, addr)))
		return false;
	if ((pod->flags & POD_F_EXCLUDE_RANGES) && mesh4_in_ranges(pod, MESH_RANGE_EXCLUDE, addr))
		return false;
	return !mesh_is_sidecar(pod);
}

static __always_inline bool mesh6_captures(const struct pod_info *pod, const __be32 *addr, __be16 port)
{
	if (ip6_is_loopback(addr) || port == pod->outbound_port || mesh_port_excluded(pod, port))
		return false;
	if (!(pod->flags & POD_F_INCLUDE_ALL) &&
	    !((pod->flags & POD_F_INCLUDE_RANGES) && mesh6_in_ranges(pod, MESH_RANGE_INCLUDE, addr)))
		return false;
	if ((pod->flags & POD_F_EXCLUDE_RANGES) && mesh6_in_ranges(pod, MESH_RANGE_EXCLUDE, addr))
		return false;
	return !mesh_is_sidecar(pod);
}

/* --- IPv4 ------------------------------------------------------------------------------- */

/* --- socket-trace ---------------------------------------------------------------------- */

/* Why a frontend translated as it did; filled on the way, sent only while tracing. */
struct lb_why {
	__u32 svc_id;
	__u32 verdict; /* enum trace_verdict */
};

/* Whether `ctlb socket-trace` listens: one ARRAY lookup (inlined), all a decision pays while
 * tracing is off. */
static __always_inline bool trace_on(void)
{
	__u32 zero = 0;
	struct trace_ctl *ctl = ctlb_trace_ctl.lookup(&zero);

	return ctl && READ_U32(&ctl->enabled);
}

/* While tracing, a ring buffer slot with who decided filled in; NULL when not tracing, or when the
 * buffer is full (counted). */
static __always_inline struct trace_event *trace_begin(void *ctx, __u8 hook, __u8 proto,
						       const struct lb_why *why)
{
	struct trace_event *ev;
	struct pod_info pod = {};

	if (!trace_on())
		return NULL;
	ev = ctlb_trace.ringbuf_reserve(sizeof(struct trace_event));
	if (!ev) {
		__u32 zero = 0;
		struct trace_ctl *ctl = ctlb_trace_ctl.lookup(&zero);

		if (ctl)
			__sync_fetch_and_add(&ctl->lost, 1);
		return NULL;
	}
	/* Ring buffer memory is not zeroed: every byte is written, none leaks. */
	__builtin_memset(ev, 0, sizeof(*ev));
	ev->ktime_ns = bpf_ktime_get_ns();
	ev->cookie = bpf_get_socket_cookie(ctx);
	ev->cgroup_id = bpf_get_current_cgroup_id();
	ev->tgid = bpf_get_current_pid_tgid() >> 32;
	ev->pod_id = source_pod(&pod) ? pod.pod_id : 0;
	ev->svc_id = why->svc_id;
	ev->hook = hook;
	ev->verdict = why->verdict;
	ev->proto = proto;
	bpf_get_current_comm(ev->comm, sizeof(ev->comm));
	return ev;
}

static __always_inline void trace4(void *ctx, __u8 hook, __u8 proto, const struct lb_why *why,
				   __be32 from, __be16 from_port, __be32 to, __be16 to_port)
{
	struct trace_event *ev = trace_begin(ctx, hook, proto, why);

	if (!ev)
		return;
	ev->family = CTLB_AF_INET;
	ev->from_addr[0] = from;
	ev->from_port = from_port;
	ev->to_addr[0] = to;
	ev->to_port = to_port;
	ctlb_trace.ringbuf_submit(ev, 0);
}

static __always_inline void trace6(void *ctx, __u8 hook, __u8 proto, const struct lb_why *why,
				   const __be32 *from, __be16 from_port, const __be32 *to, __be16 to_port)
{
	struct trace_event *ev = trace_begin(ctx, hook, proto, why);

	if (!ev)
		return;
	ev->family = CTLB_AF_INET6;
	copy_ip6(ev->from_addr, from);
	ev->from_port = from_port;
	copy_ip6(ev->to_addr, to);
	ev->to_port = to_port;
	ctlb_trace.ringbuf_submit(ev, 0);
}

static __always_inline int lb4_lookup_frontend(__be32 addr, __be16 port, __u8 proto, struct lb_frontend *out)
{
	union lb4_key_word want = {};
	__u32 idx;

	want.key.addr = addr;
	want.key.port = port;
	want.key.proto = proto;
	want.key.state = LB_SLOT_USED;
	idx = scale32(ctlb_mix64(want.word), CTLB_FE_SLOTS);
#pragma unroll
	for (int i = 0; i < CTLB_FE_PROBES; i++) {
		struct lb4_fe_slot *s = ctlb_fe4_v2.lookup(&idx);
		union lb4_key_word k;

		if (!s)
			return -ENOENT;
		k.word = READ_U64(&s->key);
		if (k.word == want.word) {
			if (fe_copy(&s->gen, s->val, out))
				return -ENOENT;
			/* Deleted and taken over by another key while we copied? */
			barrier();
			if (READ_U64(&s->key) != want.word)
				return -ENOENT;
			return 0;
		}
		if (k.key.state == LB_SLOT_EMPTY)
			return -ENOENT;
		idx = fe_next(idx);
	}
	return -ENOENT;
}

static __always_inline struct lb4_sock *lb4_sock_slot(__u64 cookie)
{
	__u32 idx = cookie & (CTLB_SOCK_SLOTS - 1);

	return ctlb_sock4.lookup(&idx);
}

static __always_inline struct lb4_affinity *lb4_affinity_slot(__u32 idx)
{
	return ctlb_aff4_v3.lookup(&idx);
}

/* The slot holding the client's entry, or NULL; and in *victim where the client's new entry
 * would go: that slot, else the least recently used of its set. One walk answers both, since a
 * miss (or a stale entry) is followed by a write. */
static __always_inline struct lb4_affinity *lb4_affinity_find(const struct lb_affinity_key *key,
							  struct lb4_affinity **victim)
{
	__u32 set = affinity_set(key);
	__u64 oldest = ~0ULL;

	*victim = NULL;
#pragma unroll
	for (int i = 0; i < CTLB_AFFINITY_WAYS; i++) {
		struct lb4_affinity *a = lb4_affinity_slot(set + i);
		__u64 used;

		if (!a)
			break;
		if (affinity_key_eq(&a->key, key)) {
			*victim = a;
			return a;
		}
		used = READ_U64(&a->last_used);
		if (used < oldest) {
			oldest = used;
			*victim = a;
		}
	}
	return NULL;
}

/* The affinity entry's backend, if it is fresh and still in the service port's set. The entry
 * is read once into locals: another CPU may rewrite the slot meanwhile (see struct lb4_affinity). */
static __always_inline bool lb4_affinity_backend(const struct lb_frontend *fe,
						 struct lb4_affinity *aff, __u64 now,
						 struct lb4_backend *out)
{
	struct lb4_member_key mkey = {};
	struct lb4_backend *be;
	__be32 addr;
	__be16 port;
	__u32 slot;

	if (!aff || !affinity_fresh(fe, READ_U64(&aff->last_used), now))
		return false;
	addr = READ_U32(&aff->addr);
	port = *(volatile __be16 *)&aff->port;
	slot = READ_U32(&aff->slot);
	be = ctlb_be4_v2.lookup(&slot);
	if (!be || be->set_id != fe->set_id || be->addr != addr || be->port != port) {
		/* The set changed since: is the backend in the new one? */
		mkey.svc_id = fe->svc_id;
		mkey.addr = addr;
		mkey.port = port;
		if (!ctlb_member4.lookup(&mkey))
			return false;
	}
	aff->last_used = now;
	out->addr = addr;
	out->port = port;
	return true;
}

/* Records the client's backend: key first, last_used last, so that a reader seeing a fresh
 * entry of its key sees the backend written with it (or a torn one, which it checks). */
static __always_inline void lb4_affinity_remember(struct lb4_affinity *a,
						  const struct lb_affinity_key *akey, __u64 now,
						  const struct lb4_backend *be, __u32 slot)
{
	if (!a)
		return;
	a->last_used = 0;
	barrier();
	a->key = *akey;
	a->addr = be->addr;
	a->port = be->port;
	a->slot = slot;
	barrier();
	a->last_used = now;
}

static __always_inline int lb4_pick_backend(void *ctx, const struct lb_frontend *fe, __u64 cookie,
					    struct lb_why *why, struct lb4_backend *out)
{
	struct lb_affinity_key akey = {};
	struct lb4_affinity *victim = NULL;
	struct lb4_backend *be;
	__u64 now = 0;
	__u32 slot;

	if (fe->flags & LB_F_AFFINITY) {
		akey.client = bpf_get_netns_cookie(ctx);
		akey.svc_id = fe->svc_id;
		now = affinity_now();
		if (lb4_affinity_backend(fe, lb4_affinity_find(&akey, &victim), now, out)) {
			why->verdict = TRACE_V_AFFINITY;
			return 0;
		}
	}
	slot = pick_slot(fe, cookie);
	be = ctlb_be4_v2.lookup(&slot);
	/* A slot of another set: this program read the frontend just before user space flipped it
	 * and freed its old set. Refuse rather than send the connection to a stranger. */
	if (!be || be->set_id != fe->set_id)
		return -EHOSTUNREACH;
	out->addr = be->addr;
	out->port = be->port;
	if (fe->flags & LB_F_AFFINITY)
		lb4_affinity_remember(victim, &akey, now, out, slot);
	return 0;
}

/* An unconnected send to a frontend this socket sent to before, while the set is unchanged,
 * goes to the same backend: replies then come from a peer the slot knows, and the socket's
 * traffic stays on one backend as kube-proxy's conntrack entry would keep it. */
static __always_inline bool lb4_sock_sticky(struct lb4_sock *sk, __u64 cookie, __be32 daddr,
					    __be16 dport, const struct lb_frontend *fe,
					    struct lb4_backend *out)
{
	if (sk->cookie != cookie)
		return false;
#pragma unroll
	for (int i = 0; i < CTLB_SOCK_PEERS; i++) {
		struct lb4_sock_peer *p = &sk->peer[i];

		if (p->fe_port == dport && p->fe_addr == daddr && p->set_id == fe->set_id) {
			out->addr = p->be_addr;
			out->port = p->be_port;
			if (((sk->flags & LB_SOCK_MRU1) != 0) != (i == 1))
				sk->flags ^= LB_SOCK_MRU1;
			return true;
		}
	}
	return false;
}

static __always_inline void lb4_spill(__u64 cookie, const struct lb4_sock_peer *p)
{
	struct lb4_revnat_key key = {};
	struct lb4_revnat val = {};

	key.cookie = cookie;
	key.addr = p->be_addr;
	key.port = p->be_port;
	val.addr = p->fe_addr;
	val.port = p->fe_port;
	ctlb_revnat4.update(&key, &val);
}

/* Records which frontend the socket dialled when it was sent to *be. A connect (or the first
 * send of a socket) takes the slot over, with this one peer; an unconnected send adds a peer or
 * renews the peer of its frontend, else replaces the least recently used one; a replaced peer
 * moves to the spill map. The cookie is written
 * first: a reader that checks it after reading a peer never takes a peer of another socket. */
static __always_inline void lb4_sock_remember(struct lb4_sock *sk, __u64 cookie, bool connect,
					      __be32 fe_addr, __be16 fe_port,
					      const struct lb_frontend *fe, const struct lb4_backend *be)
{
	struct lb4_sock_peer *p;
	int i;

	if (connect || sk->cookie != cookie) {
		sk->cookie = cookie;
		barrier();
		sk->flags = 0;
		sk->peer[1].fe_port = 0;
		p = &sk->peer[0];
	} else {
		if (sk->peer[0].fe_port == fe_port && sk->peer[0].fe_addr == fe_addr)
			i = 0;
		else if (sk->peer[1].fe_port == fe_port && sk->peer[1].fe_addr == fe_addr)
			i = 1;
		else if (sk->peer[0].fe_port == 0)
			i = 0;
		else if (sk->peer[1].fe_port == 0)
			i = 1;
		else
			i = (sk->flags & LB_SOCK_MRU1) ? 0 : 1;
		p = &sk->peer[i & 1];
		/* The peer it replaces may have a reply in flight: from another frontend, or from
		 * this frontend's backend of before a set change. */
		if (p->fe_port != 0 && !(p->fe_port == fe_port && p->fe_addr == fe_addr &&
					 p->be_port == be->port && p->be_addr == be->addr)) {
			lb4_spill(cookie, p);
			sk->flags |= LB_SOCK_SPILLED;
		}
		if (i)
			sk->flags |= LB_SOCK_MRU1;
		else
			sk->flags &= ~LB_SOCK_MRU1;
	}
	p->fe_addr = fe_addr;
	p->be_addr = be->addr;
	p->be_port = be->port;
	p->set_id = fe->set_id;
	barrier();
	p->fe_port = fe_port;
}

/* The drop action: a connection that must be dropped, not refused, is translated to the drop
 * address (ctlb.h), its port kept, like to a backend. Its packets then never leave the node:
 * ctlb_egress (drop.c) discards them at the socket's cgroup, so a TCP connect times out after
 * its SYN retransmits and a UDP send succeeds with nothing delivered, as behind a DROP rule;
 * nothing ever goes to the Service address or a real host.
 *
 * To drop from another path: fill the backend with lb4_drop_dest() (lb6_drop_dest()) and go on
 * as if it had been picked, so the socket's slot remembers the frontend and getpeername() of a
 * connected UDP socket still shows the address the client dialled. ctlb_egress must be attached
 * while any frontend may drop: user space attaches it while a frontend carries a flag of
 * CTLB_NEEDS_EGRESS (ctlb.h). */
static __always_inline void lb4_drop_dest(__be16 port, struct lb4_backend *out)
{
	out->addr = bpf_htonl(CTLB_DROP_ADDR4);
	out->port = port;
}

/* Whether the client may reach a frontend with LB_F_SOURCE_RANGES: its address is in one of
 * the service port's ranges. kube-proxy checks the source address of the packet; a socket on
 * this node leaves with its pod's address, or with a node address (LB_F_SOURCE_NODE says
 * whether some range holds one). Paid only by frontends that carry ranges: a helper call and a
 * hash lookup per pod cgroup level, and a trie lookup. */
static __always_inline bool lb4_source_allowed(const struct lb_frontend *fe)
{
	struct lb4_source_key key = {};
	struct pod_info pod = {};

	if (!source_pod(&pod) || pod.addr4 == 0)
		return fe->flags & LB_F_SOURCE_NODE;
	key.prefixlen = 32 + 32;
	key.svc_id = fe->svc_id;
	key.addr = pod.addr4;
	return ctlb_lb_src4.lookup(&key) != NULL;
}

/* Frontend -> backend. On 0, *out holds the backend to write into the context: a backend of
 * the set, or the drop address (LB_F_DROP and no backends; a client outside the frontend's
 * source ranges). */
static __always_inline int __sock4_xlate_fwd(void *ctx, __be32 daddr, __be16 dport, __u8 proto,
					     bool connect, struct lb4_backend *out, struct lb_why *why)
{
	struct lb_frontend fe;
	struct lb4_sock *sk;
	__u64 cookie;
	bool drop;
	int ret;

	if (lb4_lookup_frontend(daddr, dport, proto, &fe))
		return -ENOENT;
	why->svc_id = fe.svc_id;
	drop = fe.count == 0 && (fe.flags & LB_F_DROP);
	if ((fe.count == 0 && !drop) || fe.count > CTLB_SET_MAX) {
		why->verdict = TRACE_V_REFUSED;
		return -ECONNREFUSED;
	}
	why->verdict = TRACE_V_NO_LOCAL_DROP;
	/* kube-proxy's firewall only guards a Service that has endpoints: without, it refuses. */
	if (!drop && (fe.flags & LB_F_SOURCE_RANGES))
		if ((drop = !lb4_source_allowed(&fe)))
			why->verdict = TRACE_V_SOURCE_DENIED;
	cookie = bpf_get_socket_cookie(ctx);
	sk = lb4_sock_slot(cookie);
	if (!sk)
		return -ENOENT;
	if (drop) {
		lb4_drop_dest(dport, out);
	} else {
		if (!connect && !(fe.flags & LB_F_AFFINITY) && lb4_sock_sticky(sk, cookie, daddr, dport, &fe, out)) {
			why->verdict = TRACE_V_STICKY;
			return 0;
		}
		why->verdict = TRACE_V_BALANCED;
		ret = lb4_pick_backend(ctx, &fe, cookie, why, out);
		if (ret) {
			why->verdict = TRACE_V_STALE_SET;
			return ret;
		}
	}
	lb4_sock_remember(sk, cookie, connect, daddr, dport, &fe, out);
	return 0;
}

/* Backend -> frontend for a socket that was translated. */
static __always_inline int __sock4_xlate_rev(void *ctx, __be32 saddr, __be16 sport,
					     __be32 *fe_addr, __be16 *fe_port)
{
	struct lb4_revnat_key key = {};
	struct lb4_revnat *rev;
	struct lb4_sock *sk;
	__u32 mru;
	__u64 cookie = bpf_get_socket_cookie(ctx);

	sk = lb4_sock_slot(cookie);
	if (!sk || READ_U64(&sk->cookie) != cookie)
		return -ENOENT;
	mru = (sk->flags & LB_SOCK_MRU1) ? 1 : 0;
	/* Most recently used first: a socket that asks two Services sharing a backend in turn
	 * gets each answer from the Service it asked last. */
#pragma unroll
	for (int i = 0; i < CTLB_SOCK_PEERS; i++) {
		struct lb4_sock_peer *p = &sk->peer[(mru ^ i) & 1];

		if (p->fe_port != 0 && p->be_addr == saddr && p->be_port == sport) {
			__be32 addr = p->fe_addr;
			__be16 port = p->fe_port;

			barrier();
			/* Taken over by a newer socket while we read it? */
			if (READ_U64(&sk->cookie) != cookie)
				return -ENOENT;
			*fe_addr = addr;
			*fe_port = port;
			return 0;
		}
	}
	if (!(sk->flags & LB_SOCK_SPILLED))
		return -ENOENT;
	key.cookie = cookie;
	key.addr = saddr;
	key.port = sport;
	rev = ctlb_revnat4.lookup(&key);
	if (!rev)
		return -ENOENT;
	*fe_addr = rev->addr;
	*fe_port = rev->port;
	return 0;
}

static __always_inline int sock4_fwd(struct bpf_sock_addr *ctx, bool connect)
{
	struct lb4_backend be = {};
	struct lb_why why = {};
	__be32 daddr = ctx->user_ip4;
	__u8 proto = (__u8)ctx->protocol;
	__be16 dport;
	int ret;

	barrier();
	dport = ctx_port(ctx);
	ret = __sock4_xlate_fwd(ctx, daddr, dport, proto, connect, &be, &why);
	if (ret == 0) {
		ctx->user_ip4 = be.addr;
		barrier();
		ctx_set_port(ctx, be.port);
	}
	if (ret != -ENOENT)
		trace4(ctx, connect ? TRACE_CONNECT4 : TRACE_SENDMSG4, proto, &why, daddr, dport, be.addr, be.port);
	return sock_verdict(ret);
}

static __always_inline int sock4_rev(struct bpf_sock_addr *ctx, __u8 hook)
{
	struct lb_why why = { .verdict = TRACE_V_REVERSE };
	__be32 saddr = ctx->user_ip4;
	__be32 fe_addr;
	__be16 sport, fe_port;

	barrier();
	sport = ctx_port(ctx);
	if (__sock4_xlate_rev(ctx, saddr, sport, &fe_addr, &fe_port) == 0) {
		ctx->user_ip4 = fe_addr;
		barrier();
		ctx_set_port(ctx, fe_port);
		trace4(ctx, hook, (__u8)ctx->protocol, &why, saddr, sport, fe_addr, fe_port);
	}
	return SYS_PROCEED;
}

/* Sends a meshed pod's TCP connect to its sidecar on loopback instead of balancing it, and
 * remembers where it was going: getpeername() still answers with that address, and the sidecar
 * learns it through SO_ORIGINAL_DST (see ctlb_sockops and ctlb_getsockopt). */
static __always_inline bool mesh4_redirect(struct bpf_sock_addr *ctx)
{
	struct lb_why mesh_why = { .verdict = TRACE_V_MESH };
	struct lb_frontend none = {};
	struct lb4_backend proxy = {};
	struct pod_info pod = {};
	struct lb4_sock *sk;
	__be32 daddr;
	__be16 dport;
	__u64 cookie;

	if (ctx->protocol != IPPROTO_TCP)
		return false;
	if (!current_meshed_pod(&pod))
		return false;
	daddr = ctx->user_ip4;
	barrier();
	dport = ctx_port(ctx);
	if (!mesh4_captures(&pod, daddr, dport))
		return false;
	cookie = bpf_get_socket_cookie(ctx);
	sk = lb4_sock_slot(cookie);
	if (!sk)
		return false;
	proxy.addr = bpf_htonl(INADDR_LOOPBACK);
	proxy.port = pod.outbound_port;
	lb4_sock_remember(sk, cookie, true, daddr, dport, &none, &proxy);
	sk->flags |= LB_SOCK_MESH;
	ctx->user_ip4 = proxy.addr;
	barrier();
	ctx_set_port(ctx, proxy.port);
	trace4(ctx, TRACE_CONNECT4, IPPROTO_TCP, &mesh_why, daddr, dport, proxy.addr, proxy.port);
	return true;
}

int ctlb_connect4(struct bpf_sock_addr *ctx)
{
	return sock4_fwd(ctx, true);
}

/* Attached to each meshed pod's own cgroup, not to the root: the kernel runs a cgroup's programs
 * before its ancestors', so a captured connect reaches ctlb_connect4 already sent to the sidecar
 * (loopback, not a frontend: left alone), and a connect it does not capture is balanced there.
 * Pods outside the mesh never run it, and never pay for finding their pod. */
int ctlb_meshconn4(struct bpf_sock_addr *ctx)
{
	mesh4_redirect(ctx);
	return SYS_PROCEED;
}

int ctlb_sendmsg4(struct bpf_sock_addr *ctx)
{
	return sock4_fwd(ctx, false);
}

int ctlb_recvmsg4(struct bpf_sock_addr *ctx)
{
	return sock4_rev(ctx, TRACE_RECVMSG4);
}

int ctlb_getpeer4(struct bpf_sock_addr *ctx)
{
	return sock4_rev(ctx, TRACE_GETPEER4);
}

/* --- IPv6 ------------------------------------------------------------------------------- */

/* The key of an IPv6 slot is compared as three loads; state sits in the last one, which is
 * read first (a slot only becomes USED after its address is written). */
static __always_inline int lb6_lookup_frontend(const __be32 *addr, __be16 port, __u8 proto,
					       struct lb_frontend *out)
{
	struct lb6_key want = {};
	__u64 w0, w1;
	__u32 w2, idx;

	copy_ip6(want.addr, addr);
	want.port = port;
	want.proto = proto;
	want.state = LB_SLOT_USED;
	w0 = *(__u64 *)&want.addr[0];
	w1 = *(__u64 *)&want.addr[2];
	w2 = *(__u32 *)&want.port;
	idx = scale32(fe6_hash(w0, w1, w2), CTLB_FE_SLOTS);
#pragma unroll
	for (int i = 0; i < CTLB_FE_PROBES; i++) {
		struct lb6_fe_slot *s = ctlb_fe6_v2.lookup(&idx);
		__u32 k2;

		if (!s)
			return -ENOENT;
		k2 = READ_U32(&s->key.port);
		barrier();
		if (k2 == w2 && READ_U64(&s->key.addr[0]) == w0 && READ_U64(&s->key.addr[2]) == w1) {
			if (fe_copy(&s->gen, s->val, out))
				return -ENOENT;
			barrier();
			if (READ_U32(&s->key.port) != w2 || READ_U64(&s->key.addr[0]) != w0 ||
			    READ_U64(&s->key.addr[2]) != w1)
				return -ENOENT;
			return 0;
		}
		if ((k2 >> 24) == LB_SLOT_EMPTY) /* state: the last byte of the word */
			return -ENOENT;
		idx = fe_next(idx);
	}
	return -ENOENT;
}

static __always_inline struct lb6_sock *lb6_sock_slot(__u64 cookie)
{
	__u32 idx = cookie & (CTLB_SOCK_SLOTS - 1);

	return ctlb_sock6.lookup(&idx);
}

static __always_inline struct lb6_affinity *lb6_affinity_slot(__u32 idx)
{
	return ctlb_aff6_v3.lookup(&idx);
}

static __always_inline struct lb6_affinity *lb6_affinity_find(const struct lb_affinity_key *key,
							  struct lb6_affinity **victim)
{
	__u32 set = affinity_set(key);
	__u64 oldest = ~0ULL;

	*victim = NULL;
#pragma unroll
	for (int i = 0; i < CTLB_AFFINITY_WAYS; i++) {
		struct lb6_affinity *a = lb6_affinity_slot(set + i);
		__u64 used;

		if (!a)
			break;
		if (affinity_key_eq(&a->key, key)) {
			*victim = a;
			return a;
		}
		used = READ_U64(&a->last_used);
		if (used < oldest) {
			oldest = used;
			*victim = a;
		}
	}
	return NULL;
}

static __always_inline bool lb6_affinity_backend(const struct lb_frontend *fe,
						 struct lb6_affinity *aff, __u64 now,
						 struct lb6_backend *out)
{
	struct lb6_member_key mkey = {};
	struct lb6_backend *be;
	__be32 addr[4];
	__be16 port;
	__u32 slot;

	if (!aff || !affinity_fresh(fe, READ_U64(&aff->last_used), now))
		return false;
#pragma unroll
	for (int i = 0; i < 4; i++)
		addr[i] = READ_U32(&aff->addr[i]);
	port = *(volatile __be16 *)&aff->port;
	slot = READ_U32(&aff->slot);
	be = ctlb_be6_v2.lookup(&slot);
	if (!be || be->set_id != fe->set_id || !ip6_eq(be->addr, addr) || be->port != port) {
		/* The set changed since: is the backend in the new one? */
		mkey.svc_id = fe->svc_id;
		copy_ip6(mkey.addr, addr);
		mkey.port = port;
		if (!ctlb_member6.lookup(&mkey))
			return false;
	}
	aff->last_used = now;
	copy_ip6(out->addr, addr);
	out->port = port;
	return true;
}

static __always_inline void lb6_affinity_remember(struct lb6_affinity *a,
						  const struct lb_affinity_key *akey, __u64 now,
						  const struct lb6_backend *be, __u32 slot)
{
	if (!a)
		return;
	a->last_used = 0;
	barrier();
	a->key = *akey;
	copy_ip6(a->addr, be->addr);
	a->port = be->port;
	a->slot = slot;
	barrier();
	a->last_used = now;
}

static __always_inline int lb6_pick_backend(void *ctx, const struct lb_frontend *fe, __u64 cookie,
					    struct lb_why *why, struct lb6_backend *out)
{
	struct lb_affinity_key akey = {};
	struct lb6_affinity *victim = NULL;
	struct lb6_backend *be;
	__u64 now = 0;
	__u32 slot;

	if (fe->flags & LB_F_AFFINITY) {
		akey.client = bpf_get_netns_cookie(ctx);
		akey.svc_id = fe->svc_id;
		now = affinity_now();
		if (lb6_affinity_backend(fe, lb6_affinity_find(&akey, &victim), now, out)) {
			why->verdict = TRACE_V_AFFINITY;
			return 0;
		}
	}
	slot = pick_slot(fe, cookie);
	be = ctlb_be6_v2.lookup(&slot);
	if (!be || be->set_id != fe->set_id)
		return -EHOSTUNREACH;
	copy_ip6(out->addr, be->addr);
	out->port = be->port;
	if (fe->flags & LB_F_AFFINITY)
		lb6_affinity_remember(victim, &akey, now, out, slot);
	return 0;
}

static __always_inline bool lb6_sock_sticky(struct lb6_sock *sk, __u64 cookie, const __be32 *daddr,
					    __be16 dport, const struct lb_frontend *fe,
					    struct lb6_backend *out)
{
	if (sk->cookie != cookie)
		return false;
#pragma unroll
	for (int i = 0; i < CTLB_SOCK_PEERS; i++) {
		struct lb6_sock_peer *p = &sk->peer[i];

		if (p->fe_port == dport && ip6_eq(p->fe_addr, daddr) && p->set_id == fe->set_id) {
			copy_ip6(out->addr, p->be_addr);
			out->port = p->be_port;
			if (((sk->flags & LB_SOCK_MRU1) != 0) != (i == 1))
				sk->flags ^= LB_SOCK_MRU1;
			return true;
		}
	}
	return false;
}

static __always_inline void lb6_spill(__u64 cookie, const struct lb6_sock_peer *p)
{
	struct lb6_revnat_key key = {};
	struct lb6_revnat val = {};

	key.cookie = cookie;
	copy_ip6(key.addr, p->be_addr);
	key.port = p->be_port;
	copy_ip6(val.addr, p->fe_addr);
	val.port = p->fe_port;
	ctlb_revnat6.update(&key, &val);
}

static __always_inline void lb6_sock_remember(struct lb6_sock *sk, __u64 cookie, bool connect,
					      const __be32 *fe_addr, __be16 fe_port,
					      const struct lb_frontend *fe, const struct lb6_backend *be)
{
	struct lb6_sock_peer *p;
	int i;

	if (connect || sk->cookie != cookie) {
		sk->cookie = cookie;
		barrier();
		sk->flags = 0;
		sk->peer[1].fe_port = 0;
		p = &sk->peer[0];
	} else {
		if (sk->peer[0].fe_port == fe_port && ip6_eq(sk->peer[0].fe_addr, fe_addr))
			i = 0;
		else if (sk->peer[1].fe_port == fe_port && ip6_eq(sk->peer[1].fe_addr, fe_addr))
			i = 1;
		else if (sk->peer[0].fe_port == 0)
			i = 0;
		else if (sk->peer[1].fe_port == 0)
			i = 1;
		else
			i = (sk->flags & LB_SOCK_MRU1) ? 0 : 1;
		p = &sk->peer[i & 1];
		if (p->fe_port != 0 && !(p->fe_port == fe_port && ip6_eq(p->fe_addr, fe_addr) &&
					 p->be_port == be->port && ip6_eq(p->be_addr, be->addr))) {
			lb6_spill(cookie, p);
			sk->flags |= LB_SOCK_SPILLED;
		}
		if (i)
			sk->flags |= LB_SOCK_MRU1;
		else
			sk->flags &= ~LB_SOCK_MRU1;
	}
	copy_ip6(p->fe_addr, fe_addr);
	copy_ip6(p->be_addr, be->addr);
	p->be_port = be->port;
	p->set_id = fe->set_id;
	barrier();
	p->fe_port = fe_port;
}

/* The drop action for IPv6 sockets: see lb4_drop_dest(). */
static __always_inline void lb6_drop_dest(__be16 port, struct lb6_backend *out)
{
	out->addr[0] = bpf_htonl(CTLB_DROP_ADDR6_0);
	out->addr[1] = bpf_htonl(CTLB_DROP_ADDR6_1);
	out->addr[2] = bpf_htonl(CTLB_DROP_ADDR6_2);
	out->addr[3] = bpf_htonl(CTLB_DROP_ADDR6_3);
	out->port = port;
}

/* lb4_source_allowed() for IPv6 frontends, with the pod's IPv6 address. */
static __always_inline bool lb6_source_allowed(const struct lb_frontend *fe)
{
	struct lb6_source_key key = {};
	struct pod_info pod = {};

	if (!source_pod(&pod) || (pod.addr6[0] | pod.addr6[1] | pod.addr6[2] | pod.addr6[3]) == 0)
		return fe->flags & LB_F_SOURCE_NODE;
	key.prefixlen = 32 + 128;
	key.svc_id = fe->svc_id;
	copy_ip6(key.addr, pod.addr6);
	return ctlb_lb_src6.lookup(&key) != NULL;
}

static __always_inline int __sock6_xlate_fwd(void *ctx, const __be32 *daddr, __be16 dport,
					     __u8 proto, bool connect, struct lb6_backend *out, struct lb_why *why)
{
	struct lb_frontend fe;
	struct lb6_sock *sk;
	__u64 cookie;
	bool drop;
	int ret;

	if (lb6_lookup_frontend(daddr, dport, proto, &fe))
		return -ENOENT;
	why->svc_id = fe.svc_id;
	drop = fe.count == 0 && (fe.flags & LB_F_DROP);
	if ((fe.count == 0 && !drop) || fe.count > CTLB_SET_MAX) {
		why->verdict = TRACE_V_REFUSED;
		return -ECONNREFUSED;
	}
	why->verdict = TRACE_V_NO_LOCAL_DROP;
	if (!drop && (fe.flags & LB_F_SOURCE_RANGES))
		if ((drop = !lb6_source_allowed(&fe)))
			why->verdict = TRACE_V_SOURCE_DENIED;
	cookie = bpf_get_socket_cookie(ctx);
	sk = lb6_sock_slot(cookie);
	if (!sk)
		return -ENOENT;
	if (drop) {
		lb6_drop_dest(dport, out);
	} else {
		if (!connect && !(fe.flags & LB_F_AFFINITY) && lb6_sock_sticky(sk, cookie, daddr, dport, &fe, out)) {
			why->verdict = TRACE_V_STICKY;
			return 0;
		}
		why->verdict = TRACE_V_BALANCED;
		ret = lb6_pick_backend(ctx, &fe, cookie, why, out);
		if (ret) {
			why->verdict = TRACE_V_STALE_SET;
			return ret;
		}
	}
	lb6_sock_remember(sk, cookie, connect, daddr, dport, &fe, out);
	return 0;
}

static __always_inline int __sock6_xlate_rev(void *ctx, const __be32 *saddr, __be16 sport,
					     __be32 *fe_addr, __be16 *fe_port)
{
	struct lb6_revnat_key key = {};
	struct lb6_revnat *rev;
	struct lb6_sock *sk;
	__u32 mru;
	__u64 cookie = bpf_get_socket_cookie(ctx);

	sk = lb6_sock_slot(cookie);
	if (!sk || READ_U64(&sk->cookie) != cookie)
		return -ENOENT;
	mru = (sk->flags & LB_SOCK_MRU1) ? 1 : 0;
#pragma unroll
	for (int i = 0; i < CTLB_SOCK_PEERS; i++) {
		struct lb6_sock_peer *p = &sk->peer[(mru ^ i) & 1];

		if (p->fe_port != 0 && p->be_port == sport && ip6_eq(p->be_addr, saddr)) {
			__be16 port = p->fe_port;

			copy_ip6(fe_addr, p->fe_addr);
			barrier();
			if (READ_U64(&sk->cookie) != cookie)
				return -ENOENT;
			*fe_port = port;
			return 0;
		}
	}
	if (!(sk->flags & LB_SOCK_SPILLED))
		return -ENOENT;
	key.cookie = cookie;
	copy_ip6(key.addr, saddr);
	key.port = sport;
	rev = ctlb_revnat6.lookup(&key);
	if (!rev)
		return -ENOENT;
	copy_ip6(fe_addr, rev->addr);
	*fe_port = rev->port;
	return 0;
}

/* An IPv6 socket dialling ::ffff:a.b.c.d reaches an IPv4 frontend: translate with the IPv4
 * maps and write the backend back in mapped form. */
static __always_inline int sock6_fwd_mapped(struct bpf_sock_addr *ctx, const __be32 *daddr,
					    __be16 dport, bool connect)
{
	struct lb4_backend be = {};
	struct lb_why why = {};
	__u8 proto = (__u8)ctx->protocol;
	int ret = __sock4_xlate_fwd(ctx, daddr[3], dport, proto, connect, &be, &why);

	if (ret == 0) {
		ctx->user_ip6[3] = be.addr;
		barrier();
		ctx_set_port(ctx, be.port);
	}
	if (ret != -ENOENT)
		trace4(ctx, connect ? TRACE_CONNECT6 : TRACE_SENDMSG6, proto, &why, daddr[3], dport, be.addr, be.port);
	return sock_verdict(ret);
}

static __always_inline int sock6_fwd(struct bpf_sock_addr *ctx, bool connect)
{
	struct lb6_backend be = {};
	struct lb_why why = {};
	__u8 proto = (__u8)ctx->protocol;
	__be32 daddr[4];
	__be16 dport;
	int ret;

	ctx_get_ip6(ctx, daddr);
	dport = ctx_port(ctx);
	if (v4mapped(daddr[0], daddr[1], daddr[2]))
		return sock6_fwd_mapped(ctx, daddr, dport, connect);
	ret = __sock6_xlate_fwd(ctx, daddr, dport, proto, connect, &be, &why);
	if (ret == 0) {
		ctx_set_ip6(ctx, be.addr);
		ctx_set_port(ctx, be.port);
	}
	if (ret != -ENOENT)
		trace6(ctx, connect ? TRACE_CONNECT6 : TRACE_SENDMSG6, proto, &why, daddr, dport, be.addr, be.port);
	return sock_verdict(ret);
}

static __always_inline int sock6_rev(struct bpf_sock_addr *ctx, __u8 hook)
{
	struct lb_why why = { .verdict = TRACE_V_REVERSE };
	__be32 saddr[4], fe6[4];
	__be32 fe4;
	__be16 sport, fe_port;

	ctx_get_ip6(ctx, saddr);
	sport = ctx_port(ctx);
	if (v4mapped(saddr[0], saddr[1], saddr[2])) {
		if (__sock4_xlate_rev(ctx, saddr[3], sport, &fe4, &fe_port) == 0) {
			ctx->user_ip6[3] = fe4;
			barrier();
			ctx_set_port(ctx, fe_port);
			trace4(ctx, hook, (__u8)ctx->protocol, &why, saddr[3], sport, fe4, fe_port);
		}
		return SYS_PROCEED;
	}
	if (__sock6_xlate_rev(ctx, saddr, sport, fe6, &fe_port) == 0) {
		ctx_set_ip6(ctx, fe6);
		ctx_set_port(ctx, fe_port);
		trace6(ctx, hook, (__u8)ctx->protocol, &why, saddr, sport, fe6, fe_port);
	}
	return SYS_PROCEED;
}

/* mesh4_redirect for an IPv6 socket. An IPv4-mapped destination is captured by the pod's IPv4
 * rules and sent to ::ffff:127.0.0.1, and remembered where its IPv4 twin would be. */
static __always_inline bool mesh6_redirect(struct bpf_sock_addr *ctx)
{
	struct lb_why mesh_why = { .verdict = TRACE_V_MESH };
	struct lb_frontend none = {};
	struct pod_info pod = {};
	__be32 daddr[4];
	__be16 dport;
	__u64 cookie;

	if (ctx->protocol != IPPROTO_TCP)
		return false;
	if (!current_meshed_pod(&pod))
		return false;
	ctx_get_ip6(ctx, daddr);
	dport = ctx_port(ctx);
	cookie = bpf_get_socket_cookie(ctx);
	if (v4mapped(daddr[0], daddr[1], daddr[2])) {
		struct lb4_backend proxy = {};
		struct lb4_sock *sk4;

		if (!mesh4_captures(&pod, daddr[3], dport) || !(sk4 = lb4_sock_slot(cookie)))
			return false;
		proxy.addr = bpf_htonl(INADDR_LOOPBACK);
		proxy.port = pod.outbound_port;
		lb4_sock_remember(sk4, cookie, true, daddr[3], dport, &none, &proxy);
		sk4->flags |= LB_SOCK_MESH;
		ctx->user_ip6[3] = proxy.addr;
		trace4(ctx, TRACE_CONNECT6, IPPROTO_TCP, &mesh_why, daddr[3], dport, proxy.addr, proxy.port);
	} else {
		struct lb6_backend proxy = {};
		struct lb6_sock *sk6;

		if (!mesh6_captures(&pod, daddr, dport) || !(sk6 = lb6_sock_slot(cookie)))
			return false;
		proxy.addr[3] = bpf_htonl(1); /* ::1 */
		proxy.port = pod.outbound_port;
		lb6_sock_remember(sk6, cookie, true, daddr, dport, &none, &proxy);
		sk6->flags |= LB_SOCK_MESH;
		ctx_set_ip6(ctx, proxy.addr);
		trace6(ctx, TRACE_CONNECT6, IPPROTO_TCP, &mesh_why, daddr, dport, proxy.addr, proxy.port);
	}
	barrier();
	ctx_set_port(ctx, pod.outbound_port);
	return true;
}

int ctlb_connect6(struct bpf_sock_addr *ctx)
{
	return sock6_fwd(ctx, true);
}

/* ctlb_meshconn4 for IPv6 sockets (IPv4-mapped destinations included). */
int ctlb_meshconn6(struct bpf_sock_addr *ctx)
{
	mesh6_redirect(ctx);
	return SYS_PROCEED;
}

int ctlb_sendmsg6(struct bpf_sock_addr *ctx)
{
	return sock6_fwd(ctx, false);
}

int ctlb_recvmsg6(struct bpf_sock_addr *ctx)
{
	return sock6_rev(ctx, TRACE_RECVMSG6);
}

int ctlb_getpeer6(struct bpf_sock_addr *ctx)
{
	return sock6_rev(ctx, TRACE_GETPEER6);
}

/* --- Sidecar original destination --------------------------------------------------------- */

/* The original-destination tables (struct mesh_conn4): a connection's set, and its slot's
 * seqlock. */
static __always_inline __u32 mesh_conn_set(__u64 hash)
{
	return (__u32)hash & (CTLB_MESH_CONN_SLOTS - 1) & ~(__u32)(CTLB_MESH_WAYS - 1);
}

static __always_inline __u32 mesh4_conn_set(const __u64 *kw)
{
	return mesh_conn_set(fe6_hash(kw[0], kw[1], (__u32)kw[2]));
}

static __always_inline __u32 mesh6_conn_set(const __u64 *kw)
{
	return mesh_conn_set(fe6_hash(kw[0] ^ kw[1] ^ kw[3], kw[2] ^ kw[4], (__u32)kw[5]));
}

static __always_inline bool words_eq(const __u64 *a, const __u64 *b, int n)
{
	bool eq = true;

#pragma unroll
	for (int i = 0; i < n; i++)
		eq &= READ_U64(&a[i]) == b[i];
	return eq;
}

/* False when another writer holds the slot: this record is then lost, which only happens when
 * two connections of one set are recorded at the same instant. */
static __always_inline bool mesh_slot_claim(__u64 *seqp)
{
	__u64 seq = READ_U64(seqp);

	if (seq & 1)
		return false;
	return __sync_val_compare_and_swap(seqp, seq, seq + 1) == seq;
}

static __always_inline void mesh_slot_release(__u64 *seqp)
{
	/* A locked add: the slot's stores are visible before its even seq is. */
	__sync_fetch_and_add(seqp, 1);
}

/* A connection is written into the slot of its set that holds its key, else into the one
 * holding the oldest connection; it is found as the newest record of its key in its set, copied
 * between two equal even reads of the slot's seq. */
static __always_inline void mesh4_conn_write(const struct mesh_conn4_key *key, const struct mesh_orig4 *orig)
{
	const __u64 *kw = (const __u64 *)key;
	struct mesh_conn4 *victim = NULL;
	__u32 set = mesh4_conn_set(kw);
	__u64 oldest = ~0ULL;

#pragma unroll
	for (int i = 0; i < CTLB_MESH_WAYS; i++) {
		__u32 idx = set + i;
		struct mesh_conn4 *s = ctlb_mesh_conn4_v2.lookup(&idx);
		__u64 c;

		if (!s)
			break;
		if (words_eq((const __u64 *)&s->key, kw, 3)) {
			victim = s;
			break;
		}
		c = READ_U64(&s->born);
		if (c < oldest) {
			oldest = c;
			victim = s;
		}
	}
	if (!victim || !mesh_slot_claim(&victim->seq))
		return;
	victim->born = bpf_ktime_get_ns();
	victim->key = *key;
	victim->orig = *orig;
	mesh_slot_release(&victim->seq);
}

static __always_inline bool mesh4_conn_find(const struct mesh_conn4_key *key, struct mesh_orig4 *out)
{
	const __u64 *kw = (const __u64 *)key;
	__u32 set = mesh4_conn_set(kw);
	__u64 newest = 0;

#pragma unroll
	for (int i = 0; i < CTLB_MESH_WAYS; i++) {
		__u32 idx = set + i;
		struct mesh_conn4 *s = ctlb_mesh_conn4_v2.lookup(&idx);
		struct mesh_orig4 orig;
		__u64 seq, born;
		bool eq;

		if (!s)
			break;
		seq = READ_U64(&s->seq);
		if (seq & 1)
			continue;
		barrier();
		eq = words_eq((const __u64 *)&s->key, kw, 3);
		born = s->born;
		orig = s->orig;
		barrier();
		if (eq && READ_U64(&s->seq) == seq && born > newest) {
			newest = born;
			*out = orig;
		}
	}
	return newest != 0;
}

static __always_inline void mesh6_conn_write(const struct mesh_conn6_key *key, const struct mesh_orig6 *orig)
{
	const __u64 *kw = (const __u64 *)key;
	struct mesh_conn6 *victim = NULL;
	__u32 set = mesh6_conn_set(kw);
	__u64 oldest = ~0ULL;

#pragma unroll
	for (int i = 0; i < CTLB_MESH_WAYS; i++) {
		__u32 idx = set + i;
		struct mesh_conn6 *s = ctlb_mesh_conn6_v2.lookup(&idx);
		__u64 c;

		if (!s)
			break;
		if (words_eq((const __u64 *)&s->key, kw, 6)) {
			victim = s;
			break;
		}
		c = READ_U64(&s->born);
		if (c < oldest) {
			oldest = c;
			victim = s;
		}
	}
	if (!victim || !mesh_slot_claim(&victim->seq))
		return;
	victim->born = bpf_ktime_get_ns();
	victim->key = *key;
	victim->orig = *orig;
	mesh_slot_release(&victim->seq);
}

static __always_inline bool mesh6_conn_find(const struct mesh_conn6_key *key, struct mesh_orig6 *out)
{
	const __u64 *kw = (const __u64 *)key;
	__u32 set = mesh6_conn_set(kw);
	__u64 newest = 0;

#pragma unroll
	for (int i = 0; i < CTLB_MESH_WAYS; i++) {
		__u32 idx = set + i;
		struct mesh_conn6 *s = ctlb_mesh_conn6_v2.lookup(&idx);
		struct mesh_orig6 orig;
		__u64 seq, born;
		bool eq;

		if (!s)
			break;
		seq = READ_U64(&s->seq);
		if (seq & 1)
			continue;
		barrier();
		eq = words_eq((const __u64 *)&s->key, kw, 6);
		born = s->born;
		orig = s->orig;
		barrier();
		if (eq && READ_U64(&s->seq) == seq && born > newest) {
			newest = born;
			*out = orig;
		}
	}
	return newest != 0;
}

/* A redirected connection leaves the application's socket: record its tuple, as the sidecar's
 * accepted socket will see it, with the destination the application asked for. The tuple is
 * known once the kernel picked the source port, which TCP_CONNECT_CB follows, and the record
 * is in place before the SYN leaves, so before the sidecar can accept. */
static __always_inline void mesh4_record(struct bpf_sock_ops *skops, __u64 cookie)
{
	struct mesh_conn4_key key = {};
	struct mesh_orig4 orig = {};
	struct lb4_sock *sk = lb4_sock_slot(cookie);

	if (!sk || READ_U64(&sk->cookie) != cookie || !(sk->flags & LB_SOCK_MESH))
		return;
	key.netns = bpf_get_netns_cookie(skops);
	key.client_addr = skops->local_ip4;
	key.proxy_addr = skops->remote_ip4;
	key.client_port = bpf_htons((__u16)skops->local_port);
	/* remote_port holds the port in network order in its upper 16 bits. */
	key.proxy_port = (__be16)(skops->remote_port >> 16);
	orig.addr = sk->peer[0].fe_addr;
	orig.port = sk->peer[0].fe_port;
	mesh4_conn_write(&key, &orig);
}

static __always_inline void mesh6_record(struct bpf_sock_ops *skops, __u64 cookie)
{
	struct mesh_conn6_key key = {};
	struct mesh_orig6 orig = {};
	struct lb6_sock *sk = lb6_sock_slot(cookie);

	if (!sk || READ_U64(&sk->cookie) != cookie || !(sk->flags & LB_SOCK_MESH))
		return;
	key.netns = bpf_get_netns_cookie(skops);
	ctx_read_ip6(skops->local_ip6, key.client_addr);
	ctx_read_ip6(skops->remote_ip6, key.proxy_addr);
	key.client_port = bpf_htons((__u16)skops->local_port);
	key.proxy_port = (__be16)(skops->remote_port >> 16);
	copy_ip6(orig.addr, sk->peer[0].fe_addr);
	orig.port = sk->peer[0].fe_port;
	mesh6_conn_write(&key, &orig);
}

int ctlb_sockops(struct bpf_sock_ops *skops)
{
	__be32 remote[4];
	__u64 cookie;

	if (skops->op != BPF_SOCK_OPS_TCP_CONNECT_CB)
		return 1;
	cookie = bpf_get_socket_cookie(skops);
	ctx_read_ip6(skops->remote_ip6, remote);
	if (skops->family == CTLB_AF_INET6 && !v4mapped(remote[0], remote[1], remote[2]))
		mesh6_record(skops, cookie);
	else
		mesh4_record(skops, cookie);
	return 1;
}

/* Answers getsockopt(SOL_IP, SO_ORIGINAL_DST) on a socket the sidecar accepted. */
static __always_inline void mesh4_original_dst(struct bpf_sockopt *ctx, struct bpf_sock *sk)
{
	struct mesh_conn4_key key = {};
	struct mesh_orig4 orig = {};
	struct sockaddr_in *sin = ctx->optval;

	key.netns = bpf_get_netns_cookie(ctx);
	key.client_addr = sk->dst_ip4;
	key.proxy_addr = sk->src_ip4;
	key.client_port = sk->dst_port;
	key.proxy_port = bpf_htons((__u16)sk->src_port);
	if (!mesh4_conn_find(&key, &orig) || (void *)(sin + 1) > ctx->optval_end)
		return;
	sin->sin_family = CTLB_AF_INET;
	sin->sin_port = orig.port;
	sin->sin_addr.s_addr = orig.addr;
	__builtin_memset(sin->sin_zero, 0, sizeof(sin->sin_zero));
	ctx->optlen = sizeof(*sin);
	/* Kept apart: clang would merge the two stores into one the verifier refuses. */
	barrier();
	ctx->retval = 0;
}

static __always_inline void mesh6_original_dst(struct bpf_sockopt *ctx, struct bpf_sock *sk)
{
	struct mesh_conn6_key key = {};
	struct mesh_orig6 orig = {};
	struct sockaddr_in6 *sin6 = ctx->optval;

	key.netns = bpf_get_netns_cookie(ctx);
	ctx_read_ip6(sk->dst_ip6, key.client_addr);
	ctx_read_ip6(sk->src_ip6, key.proxy_addr);
	key.client_port = sk->dst_port;
	key.proxy_port = bpf_htons((__u16)sk->src_port);
	if (!mesh6_conn_find(&key, &orig) || (void *)(sin6 + 1) > ctx->optval_end)
		return;
	__builtin_memset(sin6, 0, sizeof(*sin6));
	sin6->sin6_family = CTLB_AF_INET6;
	sin6->sin6_port = orig.port;
	copy_ip6(sin6->sin6_addr.in6_u.u6_addr32, orig.addr);
	ctx->optlen = sizeof(*sin6);
	barrier();
	ctx->retval = 0;
}

int ctlb_getsockopt(struct bpf_sockopt *ctx)
{
	struct bpf_sock *sk = ctx->sk;

	if (ctx->optname != CTLB_SO_ORIGINAL_DST || !sk)
		return 1;
	if (ctx->level == CTLB_SOL_IP)
		mesh4_original_dst(ctx, sk);
	else if (ctx->level == CTLB_SOL_IPV6)
		mesh6_original_dst(ctx, sk);
	return 1;
}
