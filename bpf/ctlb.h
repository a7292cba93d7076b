/* ctlb.h: every map, struct, flag and constant the ctlb programs share with user space.
 *
 * Python never re-declares these layouts: it reads them from the ctypes types bcc generates
 * from this file. A layout change means a new map name (suffix _v2, ...), because pinned maps
 * outlive the agent and a new agent must not misread an old map.
 *
 * Knobs arrive as -D cflags:
 *   CTLB_PIN_DIR        "..." bpffs folder the maps are pinned in (string literal)
 *   CTLB_FRONTENDS_MAX  entries of each frontend map (per address family)
 *   CTLB_BACKENDS_MAX   entries of each backend map (per address family)
 *   CTLB_REVNAT_MAX     entries of each socket reverse-NAT map (LRU)
 *   CTLB_AFFINITY_MAX   entries of each session-affinity map (LRU)
 *   CTLB_LAYOUT_ONLY    declare the maps unpinned with one entry: lets a read-only command
 *                       learn the layouts without creating or touching any pin.
 */
#ifndef CTLB_H
#define CTLB_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include <uapi/linux/in6.h>
#include <uapi/asm-generic/errno.h>

#ifndef CTLB_FRONTENDS_MAX
#define CTLB_FRONTENDS_MAX 65536
#endif
#ifndef CTLB_BACKENDS_MAX
#define CTLB_BACKENDS_MAX 524288
#endif
#ifndef CTLB_REVNAT_MAX
#define CTLB_REVNAT_MAX 262144
#endif
#ifndef CTLB_AFFINITY_MAX
#define CTLB_AFFINITY_MAX 131072
#endif

/* The most backends one frontend may have: bounds the pick so the verifier and a corrupt map
 * can never make us index past what user space can write. */
#define CTLB_SET_MAX 65535

#define CTLB_NSEC_PER_SEC 1000000000ULL

/* Frontend flags (struct lb_frontend.flags). */
enum lb_flags {
	LB_F_AFFINITY = 1 << 0, /* ClientIP session affinity; timeout in affinity_timeout */
};

/* IPv4 frontend: a Service address a client dials. */
struct lb4_key {
	__be32 addr;
	__be16 port;
	__u8 proto; /* IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP */
	__u8 pad;
};

/* IPv6 frontend. */
struct lb6_key {
	__be32 addr[4];
	__be16 port;
	__u8 proto;
	__u8 pad;
};

/* What a frontend resolves to; the same for both families. User space flips a frontend to a
 * new backend set with one update of this value, after the whole set is written (make before
 * break): a connect never sees a half-written set. */
struct lb_frontend {
	__u32 svc_id;           /* stable id of the service port: affinity and trace key */
	__u32 set_id;           /* backend set the frontend points at (lb_backend_key.set_id) */
	__u32 count;            /* backends in the set; 0 means refuse (ECONNREFUSED) */
	__u32 affinity_timeout; /* seconds; used when LB_F_AFFINITY is set */
	__u32 flags;            /* enum lb_flags */
	__u32 pad;
};

/* Slot of a backend set: slots 0..count-1 are filled. */
struct lb_backend_key {
	__u32 set_id;
	__u32 slot;
};

struct lb4_backend {
	__be32 addr;
	__be16 port;
	__u16 pad;
};

struct lb6_backend {
	__be32 addr[4];
	__be16 port;
	__u16 pad;
};

/* Membership of a backend in a service port's current set: lets an affinity entry be checked
 * against the set in one lookup. Written only for service ports with affinity. */
struct lb4_member_key {
	__u32 svc_id;
	__be32 addr;
	__be16 port;
	__u16 pad;
};

struct lb6_member_key {
	__u32 svc_id;
	__be32 addr[4];
	__be16 port;
	__u16 pad;
};

/* Socket reverse NAT: which frontend a socket dialled when it was sent to this backend. Serves
 * UDP replies (recvmsg) and getpeername(). Keyed by socket cookie, so two sockets never mix. */
struct lb4_revnat_key {
	__u64 cookie;
	__be32 addr; /* backend */
	__be16 port;
	__u16 pad;
};

struct lb4_revnat {
	__be32 addr; /* frontend */
	__be16 port;
	__u16 pad;
	__u32 svc_id;
};

struct lb6_revnat_key {
	__u64 cookie;
	__be32 addr[4];
	__be16 port;
	__u16 pad;
};

struct lb6_revnat {
	__be32 addr[4];
	__be16 port;
	__u16 pad;
	__u32 svc_id;
};

/* Session affinity, per client and service port. The client is the network namespace (its
 * cookie): one pod, one client, as kube-proxy's per-source-IP stickiness is per pod. */
struct lb_affinity_key {
	__u64 client; /* network namespace cookie */
	__u32 svc_id;
	__u32 pad;
};

struct lb4_affinity {
	__u64 last_used_ns; /* bpf_ktime_get_ns() of the last connect that used it */
	__be32 addr;
	__be16 port;
	__u16 pad;
};

struct lb6_affinity {
	__u64 last_used_ns;
	__be32 addr[4];
	__be16 port;
	__u16 pad;
};

#ifdef CTLB_LAYOUT_ONLY
#define CTLB_MAP(_type, _key, _leaf, _name, _max, _flags) \
	BPF_F_TABLE(_type, _key, _leaf, _name, 1, _flags)
#else
#define CTLB_MAP(_type, _key, _leaf, _name, _max, _flags) \
	BPF_TABLE_PINNED7(_type, _key, _leaf, _name, _max, CTLB_PIN_DIR "/" #_name, _flags)
#endif /* CTLB_LAYOUT_ONLY */

/* Frontend and backend maps are filled by user space only: no preallocation, so memory follows
 * what is programmed rather than the configured ceiling. */
CTLB_MAP("hash", struct lb4_key, struct lb_frontend, ctlb_fe4, CTLB_FRONTENDS_MAX, BPF_F_NO_PREALLOC);
CTLB_MAP("hash", struct lb6_key, struct lb_frontend, ctlb_fe6, CTLB_FRONTENDS_MAX, BPF_F_NO_PREALLOC);
CTLB_MAP("hash", struct lb_backend_key, struct lb4_backend, ctlb_be4, CTLB_BACKENDS_MAX, BPF_F_NO_PREALLOC);
CTLB_MAP("hash", struct lb_backend_key, struct lb6_backend, ctlb_be6, CTLB_BACKENDS_MAX, BPF_F_NO_PREALLOC);
CTLB_MAP("hash", struct lb4_member_key, __u8, ctlb_member4, CTLB_BACKENDS_MAX, BPF_F_NO_PREALLOC);
CTLB_MAP("hash", struct lb6_member_key, __u8, ctlb_member6, CTLB_BACKENDS_MAX, BPF_F_NO_PREALLOC);
CTLB_MAP("lru_hash", struct lb4_revnat_key, struct lb4_revnat, ctlb_revnat4, CTLB_REVNAT_MAX, 0);
CTLB_MAP("lru_hash", struct lb6_revnat_key, struct lb6_revnat, ctlb_revnat6, CTLB_REVNAT_MAX, 0);
CTLB_MAP("lru_hash", struct lb_affinity_key, struct lb4_affinity, ctlb_aff4, CTLB_AFFINITY_MAX, 0);
CTLB_MAP("lru_hash", struct lb_affinity_key, struct lb6_affinity, ctlb_aff6, CTLB_AFFINITY_MAX, 0);

#endif /* CTLB_H */
