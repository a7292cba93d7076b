/* sock.c: connect-time load balancing on the cgroup sock_addr hooks, IPv4 and IPv6.
 *
 * connect/sendmsg rewrite a Service frontend to one backend before the socket ever sends, so no
 * packet is NATed. recvmsg/getpeername rewrite the backend back to the frontend, so UDP clients
 * (DNS resolvers above all) and getpeername() see the address they asked for.
 *
 * Entry points (ctlb_*) are thin: the workers return 0 (translated), -ENOENT (not a frontend:
 * leave the socket alone) or another -errno, and only the entry point turns that into a verdict.
 */
#include "ctlb.h"

#define SYS_REJECT 0
#define SYS_PROCEED 1

/* Keeps clang from merging or reordering context accesses: the verifier accepts only the
 * 32-bit loads and stores the sock_addr context defines. */
#ifndef barrier
#define barrier() asm volatile("" ::: "memory")
#endif

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

static __always_inline bool affinity_fresh(const struct lb_frontend *fe, __u64 last_used, __u64 now)
{
	return now - last_used <= (__u64)fe->affinity_timeout * CTLB_NSEC_PER_SEC;
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

/* --- IPv4 ------------------------------------------------------------------------------- */

static __always_inline struct lb_frontend *lb4_lookup_frontend(__be32 addr, __be16 port, __u8 proto)
{
	struct lb4_key key = {};

	key.addr = addr;
	key.port = port;
	key.proto = proto;
	return ctlb_fe4.lookup(&key);
}

/* The affinity entry's backend, if it is fresh and still in the service port's set. */
static __always_inline bool lb4_affinity_backend(const struct lb_frontend *fe,
						 struct lb_affinity_key *akey, __u64 now,
						 struct lb4_backend *out)
{
	struct lb4_affinity *aff = ctlb_aff4.lookup(akey);
	struct lb4_member_key mkey = {};

	if (!aff || !affinity_fresh(fe, aff->last_used_ns, now))
		return false;
	mkey.svc_id = fe->svc_id;
	mkey.addr = aff->addr;
	mkey.port = aff->port;
	if (!ctlb_member4.lookup(&mkey))
		return false;
	aff->last_used_ns = now;
	out->addr = aff->addr;
	out->port = aff->port;
	return true;
}

static __always_inline int lb4_pick_backend(void *ctx, const struct lb_frontend *fe,
					    struct lb4_backend *out)
{
	struct lb_affinity_key akey = {};
	struct lb_backend_key bkey = {};
	struct lb4_affinity aff = {};
	struct lb4_backend *be;
	__u32 count = fe->count;
	__u64 now = 0;

	if (count == 0 || count > CTLB_SET_MAX)
		return -ECONNREFUSED;
	if (fe->flags & LB_F_AFFINITY) {
		akey.client = bpf_get_netns_cookie(ctx);
		akey.svc_id = fe->svc_id;
		now = bpf_ktime_get_ns();
		if (lb4_affinity_backend(fe, &akey, now, out))
			return 0;
	}
	bkey.set_id = fe->set_id;
	bkey.slot = bpf_get_prandom_u32() % count;
	be = ctlb_be4.lookup(&bkey);
	/* Cannot happen while user space writes sets before pointing at them; refuse rather than
	 * let the connection go to the Service address, which nothing answers. */
	if (!be)
		return -EHOSTUNREACH;
	out->addr = be->addr;
	out->port = be->port;
	if (fe->flags & LB_F_AFFINITY) {
		aff.last_used_ns = now;
		aff.addr = be->addr;
		aff.port = be->port;
		ctlb_aff4.update(&akey, &aff);
	}
	return 0;
}

static __always_inline void lb4_remember(void *ctx, const struct lb4_backend *be, __be32 fe_addr,
					 __be16 fe_port, __u32 svc_id)
{
	struct lb4_revnat_key key = {};
	struct lb4_revnat val = {};

	key.cookie = bpf_get_socket_cookie(ctx);
	key.addr = be->addr;
	key.port = be->port;
	val.addr = fe_addr;
	val.port = fe_port;
	val.svc_id = svc_id;
	ctlb_revnat4.update(&key, &val);
}

/* Frontend -> backend. On 0, *out holds the backend to write into the context. */
static __always_inline int __sock4_xlate_fwd(void *ctx, __be32 daddr, __be16 dport, __u8 proto,
					     struct lb4_backend *out)
{
	struct lb_frontend *fe = lb4_lookup_frontend(daddr, dport, proto);
	int ret;

	if (!fe)
		return -ENOENT;
	ret = lb4_pick_backend(ctx, fe, out);
	if (ret)
		return ret;
	lb4_remember(ctx, out, daddr, dport, fe->svc_id);
	return 0;
}

/* Backend -> frontend for a socket that was translated. */
static __always_inline int __sock4_xlate_rev(void *ctx, __be32 saddr, __be16 sport,
					     struct lb4_revnat *out)
{
	struct lb4_revnat_key key = {};
	struct lb4_revnat *rev;

	key.cookie = bpf_get_socket_cookie(ctx);
	key.addr = saddr;
	key.port = sport;
	rev = ctlb_revnat4.lookup(&key);
	if (!rev)
		return -ENOENT;
	*out = *rev;
	return 0;
}

static __always_inline int sock4_fwd(struct bpf_sock_addr *ctx)
{
	struct lb4_backend be = {};
	__be32 daddr = ctx->user_ip4;
	__be16 dport;
	int ret;

	barrier();
	dport = ctx_port(ctx);
	ret = __sock4_xlate_fwd(ctx, daddr, dport, (__u8)ctx->protocol, &be);
	if (ret == 0) {
		ctx->user_ip4 = be.addr;
		barrier();
		ctx_set_port(ctx, be.port);
	}
	return sock_verdict(ret);
}

static __always_inline int sock4_rev(struct bpf_sock_addr *ctx)
{
	struct lb4_revnat rev = {};
	__be32 saddr = ctx->user_ip4;
	__be16 sport;

	barrier();
	sport = ctx_port(ctx);
	if (__sock4_xlate_rev(ctx, saddr, sport, &rev) == 0) {
		ctx->user_ip4 = rev.addr;
		barrier();
		ctx_set_port(ctx, rev.port);
	}
	return SYS_PROCEED;
}

int ctlb_connect4(struct bpf_sock_addr *ctx)
{
	return sock4_fwd(ctx);
}

int ctlb_sendmsg4(struct bpf_sock_addr *ctx)
{
	return sock4_fwd(ctx);
}

int ctlb_recvmsg4(struct bpf_sock_addr *ctx)
{
	return sock4_rev(ctx);
}

int ctlb_getpeer4(struct bpf_sock_addr *ctx)
{
	return sock4_rev(ctx);
}

/* --- IPv6 ------------------------------------------------------------------------------- */

static __always_inline struct lb_frontend *lb6_lookup_frontend(const __be32 *addr, __be16 port,
							       __u8 proto)
{
	struct lb6_key key = {};

	key.addr[0] = addr[0];
	key.addr[1] = addr[1];
	key.addr[2] = addr[2];
	key.addr[3] = addr[3];
	key.port = port;
	key.proto = proto;
	return ctlb_fe6.lookup(&key);
}

static __always_inline void copy_ip6(__be32 *dst, const __be32 *src)
{
	dst[0] = src[0];
	dst[1] = src[1];
	dst[2] = src[2];
	dst[3] = src[3];
}

static __always_inline bool lb6_affinity_backend(const struct lb_frontend *fe,
						 struct lb_affinity_key *akey, __u64 now,
						 struct lb6_backend *out)
{
	struct lb6_affinity *aff = ctlb_aff6.lookup(akey);
	struct lb6_member_key mkey = {};

	if (!aff || !affinity_fresh(fe, aff->last_used_ns, now))
		return false;
	mkey.svc_id = fe->svc_id;
	copy_ip6(mkey.addr, aff->addr);
	mkey.port = aff->port;
	if (!ctlb_member6.lookup(&mkey))
		return false;
	aff->last_used_ns = now;
	copy_ip6(out->addr, aff->addr);
	out->port = aff->port;
	return true;
}

static __always_inline int lb6_pick_backend(void *ctx, const struct lb_frontend *fe,
					    struct lb6_backend *out)
{
	struct lb_affinity_key akey = {};
	struct lb_backend_key bkey = {};
	struct lb6_affinity aff = {};
	struct lb6_backend *be;
	__u32 count = fe->count;
	__u64 now = 0;

	if (count == 0 || count > CTLB_SET_MAX)
		return -ECONNREFUSED;
	if (fe->flags & LB_F_AFFINITY) {
		akey.client = bpf_get_netns_cookie(ctx);
		akey.svc_id = fe->svc_id;
		now = bpf_ktime_get_ns();
		if (lb6_affinity_backend(fe, &akey, now, out))
			return 0;
	}
	bkey.set_id = fe->set_id;
	bkey.slot = bpf_get_prandom_u32() % count;
	be = ctlb_be6.lookup(&bkey);
	if (!be)
		return -EHOSTUNREACH;
	copy_ip6(out->addr, be->addr);
	out->port = be->port;
	if (fe->flags & LB_F_AFFINITY) {
		aff.last_used_ns = now;
		copy_ip6(aff.addr, be->addr);
		aff.port = be->port;
		ctlb_aff6.update(&akey, &aff);
	}
	return 0;
}

static __always_inline void lb6_remember(void *ctx, const struct lb6_backend *be,
					 const __be32 *fe_addr, __be16 fe_port, __u32 svc_id)
{
	struct lb6_revnat_key key = {};
	struct lb6_revnat val = {};

	key.cookie = bpf_get_socket_cookie(ctx);
	copy_ip6(key.addr, be->addr);
	key.port = be->port;
	copy_ip6(val.addr, fe_addr);
	val.port = fe_port;
	val.svc_id = svc_id;
	ctlb_revnat6.update(&key, &val);
}

static __always_inline int __sock6_xlate_fwd(void *ctx, const __be32 *daddr, __be16 dport,
					     __u8 proto, struct lb6_backend *out)
{
	struct lb_frontend *fe = lb6_lookup_frontend(daddr, dport, proto);
	int ret;

	if (!fe)
		return -ENOENT;
	ret = lb6_pick_backend(ctx, fe, out);
	if (ret)
		return ret;
	lb6_remember(ctx, out, daddr, dport, fe->svc_id);
	return 0;
}

static __always_inline int __sock6_xlate_rev(void *ctx, const __be32 *saddr, __be16 sport,
					     struct lb6_revnat *out)
{
	struct lb6_revnat_key key = {};
	struct lb6_revnat *rev;

	key.cookie = bpf_get_socket_cookie(ctx);
	copy_ip6(key.addr, saddr);
	key.port = sport;
	rev = ctlb_revnat6.lookup(&key);
	if (!rev)
		return -ENOENT;
	*out = *rev;
	return 0;
}

/* An IPv6 socket dialling ::ffff:a.b.c.d reaches an IPv4 frontend: translate with the IPv4
 * maps and write the backend back in mapped form. */
static __always_inline int sock6_fwd_mapped(struct bpf_sock_addr *ctx, const __be32 *daddr,
					    __be16 dport)
{
	struct lb4_backend be = {};
	int ret = __sock4_xlate_fwd(ctx, daddr[3], dport, (__u8)ctx->protocol, &be);

	if (ret == 0) {
		ctx->user_ip6[3] = be.addr;
		barrier();
		ctx_set_port(ctx, be.port);
	}
	return sock_verdict(ret);
}

static __always_inline int sock6_fwd(struct bpf_sock_addr *ctx)
{
	struct lb6_backend be = {};
	__be32 daddr[4];
	__be16 dport;
	int ret;

	ctx_get_ip6(ctx, daddr);
	dport = ctx_port(ctx);
	if (v4mapped(daddr[0], daddr[1], daddr[2]))
		return sock6_fwd_mapped(ctx, daddr, dport);
	ret = __sock6_xlate_fwd(ctx, daddr, dport, (__u8)ctx->protocol, &be);
	if (ret == 0) {
		ctx_set_ip6(ctx, be.addr);
		ctx_set_port(ctx, be.port);
	}
	return sock_verdict(ret);
}

static __always_inline int sock6_rev(struct bpf_sock_addr *ctx)
{
	struct lb4_revnat rev4 = {};
	struct lb6_revnat rev6 = {};
	__be32 saddr[4];
	__be16 sport;

	ctx_get_ip6(ctx, saddr);
	sport = ctx_port(ctx);
	if (v4mapped(saddr[0], saddr[1], saddr[2])) {
		if (__sock4_xlate_rev(ctx, saddr[3], sport, &rev4) == 0) {
			ctx->user_ip6[3] = rev4.addr;
			barrier();
			ctx_set_port(ctx, rev4.port);
		}
		return SYS_PROCEED;
	}
	if (__sock6_xlate_rev(ctx, saddr, sport, &rev6) == 0) {
		ctx_set_ip6(ctx, rev6.addr);
		ctx_set_port(ctx, rev6.port);
	}
	return SYS_PROCEED;
}

int ctlb_connect6(struct bpf_sock_addr *ctx)
{
	return sock6_fwd(ctx);
}

int ctlb_sendmsg6(struct bpf_sock_addr *ctx)
{
	return sock6_fwd(ctx);
}

int ctlb_recvmsg6(struct bpf_sock_addr *ctx)
{
	return sock6_rev(ctx);
}

int ctlb_getpeer6(struct bpf_sock_addr *ctx)
{
	return sock6_rev(ctx);
}
