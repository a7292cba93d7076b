/* ctlb.h: every map, struct, flag and constant the ctlb programs share with user space.
 *
 * Python never re-declares these layouts: it reads them from the ctypes types bcc generates
 * from this file. A layout change means a new map name (suffix _v2, ...), because pinned maps
 * outlive the agent and a new agent must not misread an old map.
 *
 * Cost rule: on this kind of machine every kernel function call a program makes (a helper, a
 * hash-map lookup, which also calls memcmp) costs ~30 ns, with return thunks. The per-connection
 * path therefore uses only ARRAY maps, whose lookups the verifier inlines, and one helper call:
 * the socket cookie. Frontends live in an open-addressed hash table laid out in an array,
 * backends in contiguous ranges of an array, and per-socket reverse NAT in an array indexed by
 * the socket cookie.
 *
 * Knobs arrive as -D cflags:
 *   CTLB_PIN_DIR        "..." bpffs folder the maps are pinned in (string literal)
 *   CTLB_FRONTENDS_MAX  frontends per address family; the frontend tables have twice as many slots
 *   CTLB_BACKENDS_MAX   backend slots per address family
 *   CTLB_SOCK_SLOTS     slots of each per-socket reverse-NAT table (a power of two)
 *   CTLB_REVNAT_MAX     entries of each spill reverse-NAT map (LRU)
 *   CTLB_AFFINITY_SLOTS slots of each session-affinity table (a power of two, at least
 *                       CTLB_AFFINITY_WAYS)
 *   CTLB_PODS_MAX       pods of this node the programs know (mesh mode, addresses)
 *   CTLB_MESH_RULES_MAX entries of each mesh exclusion map (ranges, ports)
 *   CTLB_MESH_CONN_SLOTS slots of each original-destination table (a power of two, at least
 *                       CTLB_MESH_WAYS)
 *   CTLB_SOURCE_RANGES_MAX entries of each loadBalancerSourceRanges map (LPM)
 *   CTLB_HZ             the running kernel's CONFIG_HZ (jiffies a second), when user space
 *                       could read it: session affinity then keeps time in jiffies, which the
 *                       verifier inlines, instead of calling for the coarse clock
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
#ifndef CTLB_SOCK_SLOTS
#define CTLB_SOCK_SLOTS 262144
#endif
#ifndef CTLB_REVNAT_MAX
#define CTLB_REVNAT_MAX 32768
#endif
#ifndef CTLB_AFFINITY_SLOTS
#define CTLB_AFFINITY_SLOTS 131072
#endif
/* Slots of a session-affinity table one client's entry may sit in (see struct lb4_affinity). */
#define CTLB_AFFINITY_WAYS 4
#ifndef CTLB_PODS_MAX
#define CTLB_PODS_MAX 4096
#endif
#ifndef CTLB_MESH_RULES_MAX
#define CTLB_MESH_RULES_MAX 65536
#endif
#ifndef CTLB_MESH_CONN_SLOTS
#define CTLB_MESH_CONN_SLOTS 65536
#endif
/* Slots of the original-destination table a connection may sit in (see struct mesh_conn4). */
#define CTLB_MESH_WAYS 4

#ifndef CTLB_SOURCE_RANGES_MAX
#define CTLB_SOURCE_RANGES_MAX 65536
#endif

/* Slots of each frontend table: at most half full, so probe sequences stay short. */
#define CTLB_FE_SLOTS (2 * CTLB_FRONTENDS_MAX)
/* A frontend sits at most this many slots after its home slot (user space guarantees it). */
#define CTLB_FE_PROBES 16
/* Times a reader re-reads a frontend slot that changed under it before it gives up. */
#define CTLB_FE_RETRIES 3
/* Peers a socket's reverse-NAT slot holds; more spill into ctlb_revnat4/6. */
#define CTLB_SOCK_PEERS 2

/* The most backends one frontend may have: bounds the pick so the verifier and a corrupt map
 * can never make us index past what user space can write. */
#define CTLB_SET_MAX 65535

#define CTLB_NSEC_PER_SEC 1000000000ULL

/* Frontend flags (struct lb_frontend.flags). */
enum lb_flags {
	LB_F_AFFINITY = 1 << 0, /* ClientIP session affinity; timeout in affinity_timeout */
	LB_F_DROP = 1 << 1,     /* with count 0: drop (the client times out) instead of refusing */
	/* A LoadBalancer IP with loadBalancerSourceRanges: a client whose address is in none of
	 * the service port's ranges (ctlb_lb_src4/6 under svc_id) is dropped. */
	LB_F_SOURCE_RANGES = 1 << 2,
	/* With LB_F_SOURCE_RANGES: a range holds one of the node's addresses, so the node's own
	 * processes (and pods ctlb does not know) pass. */
	LB_F_SOURCE_NODE = 1 << 3,
};

/* The drop destination. A connection that must be dropped is not refused: it is sent here, port
 * kept, and ctlb_egress (bpf/drop.c), attached to the same cgroup, discards every packet to it
 * before it leaves the socket's network namespace, so the client sees what a DROP rule gives it.
 * A socket always reaches this address through its default route (connect() and sendmsg() do a
 * route lookup), so these must be ordinary unicast addresses to Linux, yet never a real peer:
 *   - IPv4 192.0.0.8: the "IPv4 dummy address" (RFC 7600), which IANA's special-purpose registry
 *     (RFC 6890) marks valid as a source only, never as a destination, and not forwardable. No
 *     host can be reached at it and routers must not pass it on; it lies outside 192.0.0.0/29,
 *     which DS-Lite and 464XLAT (192.0.0.4) do use as addresses. The rest of the candidates are
 *     in real use: 0/8 is "this host" to Linux, 127/8 reaches the pod's own listeners, 240/4,
 *     100.64/10, 198.18/15 and the TEST-NETs serve as pod, CGNAT, fake-IP and lab ranges.
 *   - IPv6 100::1: in 100::/64, the discard-only prefix (RFC 6666), which networks route to a
 *     blackhole by design.
 * The programs hold them in host byte order; the IPv6 address as four 32-bit words. */
#define CTLB_DROP_ADDR4 0xc0000008U /* 192.0.0.8 */
#define CTLB_DROP_ADDR6_0 0x01000000U /* 100::1 */
#define CTLB_DROP_ADDR6_1 0x00000000U
#define CTLB_DROP_ADDR6_2 0x00000000U
#define CTLB_DROP_ADDR6_3 0x00000001U

/* Frontend flags under which a connection may be sent to the drop address: user space keeps
 * ctlb_egress attached while some frontend carries one. */
#define CTLB_NEEDS_EGRESS (LB_F_DROP | LB_F_SOURCE_RANGES)

/* State of a frontend table slot (lb4_key.state, lb6_key.state). */
enum lb_slot_state {
	LB_SLOT_EMPTY = 0, /* never used (or cleaned up): a probe sequence ends here */
	LB_SLOT_USED = 1,  /* holds a frontend */
	LB_SLOT_TOMB = 2,  /* deleted, or being filled: probing goes on past it */
};

/* Per-socket slot flags (lb4_sock.flags, lb6_sock.flags). */
enum lb_sock_flags {
	LB_SOCK_SPILLED = 1 << 0, /* a peer of this socket was moved to ctlb_revnat4/6 */
	LB_SOCK_MRU1 = 1 << 1,    /* peer[1] was used last (else peer[0]) */
	LB_SOCK_MESH = 1 << 2,    /* peer[0] is a redirect to the pod's sidecar, not a backend */
};

/* IPv4 frontend: a Service address a client dials, and the state of the slot holding it. The
 * eight bytes are read as one word, so a reader sees a key whole. */
struct lb4_key {
	__be32 addr;
	__be16 port;
	__u8 proto; /* IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP */
	__u8 state; /* enum lb_slot_state */
};

/* IPv6 frontend. */
struct lb6_key {
	__be32 addr[4];
	__be16 port;
	__u8 proto;
	__u8 state;
};

/* What a frontend resolves to; the same for both families. */
struct lb_frontend {
	__u32 svc_id;           /* stable id of the service port: affinity and trace key */
	__u32 set_id;           /* backend set; every backend slot of the set carries it */
	__u32 set_start;        /* first slot of the set in ctlb_be4_v2/ctlb_be6_v2 (a contiguous range) */
	__u32 count;            /* backends in the set; 0 means refuse (ECONNREFUSED), or drop
				 * when LB_F_DROP is set */
	__u32 affinity_timeout; /* seconds; used when LB_F_AFFINITY is set */
	__u32 flags;            /* enum lb_flags */
};

/* A slot of a frontend table: an open-addressed hash table (linear probing from the home slot
 * the key's hash gives) kept in an ARRAY map, written by user space only.
 *
 * User space rewrites a whole slot per update while programs may be reading it, so each update
 * changes only bytes no reader relies on at that moment, or a single publishing field:
 *   - a new value goes into val[!(gen & 1)], then gen is incremented (the flip);
 *   - a new key is written with state TOMB and both values, then state becomes USED;
 *   - a delete sets state TOMB; a TOMB that ends a chain becomes EMPTY.
 * A reader matches the key, takes gen, copies val[gen & 1], and accepts the copy if gen did not
 * change and the key still matches. So a frontend is served by its old or its new value, never
 * a mix, and never by the value of another key that took the slot over. */
struct lb4_fe_slot {
	struct lb4_key key;
	__u32 gen;
	__u32 pad;
	struct lb_frontend val[2];
};

struct lb6_fe_slot {
	struct lb6_key key;
	__u32 gen;
	struct lb_frontend val[2];
};

/* A backend slot. A set is the range [set_start, set_start + count) of the array; user space
 * writes a whole set into free slots before a frontend points at it (make before break), and
 * zeroes the slots when no frontend points at it any more. The set id in every slot lets a
 * program that read a frontend just before it was flipped notice a slot already reused. */
struct lb4_backend {
	__be32 addr;
	__be16 port;
	__u16 pad;
	__u32 set_id; /* 0: free */
	__u32 pad2;
};

struct lb6_backend {
	__be32 addr[4];
	__be16 port;
	__u16 pad;
	__u32 set_id;
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

/* Per-socket reverse NAT: which frontend a socket dialled when it was sent to a backend. Serves
 * UDP replies (recvmsg) and getpeername(). The slot of a socket is its cookie modulo the table
 * size; cookies are handed out in sequence, so a slot is taken over by a newer socket only
 * after about CTLB_SOCK_SLOTS more sockets got cookies, much as an LRU of that size would evict
 * it. The full cookie in the slot tells whose it is: a socket never sees another's entry. */
struct lb4_sock_peer {
	__be32 fe_addr; /* frontend the socket dialled */
	__be32 be_addr; /* backend it was sent to */
	__be16 fe_port; /* 0: unused peer */
	__be16 be_port;
	__u32 set_id;   /* the frontend's set when the backend was picked: unconnected sends reuse
			 * the backend while the set is unchanged */
};

struct lb4_sock {
	__u64 cookie;
	__u32 flags; /* enum lb_sock_flags */
	__u32 pad;
	struct lb4_sock_peer peer[CTLB_SOCK_PEERS];
};

struct lb6_sock_peer {
	__be32 fe_addr[4];
	__be32 be_addr[4];
	__be16 fe_port;
	__be16 be_port;
	__u32 set_id;
};

struct lb6_sock {
	__u64 cookie;
	__u32 flags;
	__u32 pad;
	struct lb6_sock_peer peer[CTLB_SOCK_PEERS];
};

/* Spill reverse NAT: the peers of an unconnected UDP socket beyond the CTLB_SOCK_PEERS its slot
 * holds. Keyed by socket cookie and backend, so two sockets never mix. */
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

/* One slot of a session-affinity table: an ARRAY, not an LRU hash, whose lookup is two calls
 * (the hash walk and memcmp, ~70 ns here) where a slot is an inlined load.
 *
 * A client's entry for a service port sits in the set of CTLB_AFFINITY_WAYS adjacent slots its
 * key hashes to: in the slot holding its key, else in the least recently used one (last_used 0:
 * empty), so it is lost only once CTLB_AFFINITY_WAYS other entries of its set were used since.
 * Slots are written without a lock: an entry torn by two writers at once names a backend that
 * the reader checks against the frontend's current set, as it checks every entry, so the
 * client is at worst held to another backend of the set, or balanced afresh.
 *
 * The backend's `slot` is where it sat in the set it was picked from: while that slot of the
 * frontend's current set still holds it, it is still a member, which an inlined ARRAY read shows
 * (a member hash lookup is a call, ~40 ns here). */
struct lb4_affinity {
	struct lb_affinity_key key;
	__u64 last_used; /* affinity_now() (sock.c) of the last connect that used it; 0: empty */
	__be32 addr;
	__be16 port;
	__u16 pad;
	__u32 slot;      /* index in ctlb_be4_v2 */
	__u32 pad2;
};

struct lb6_affinity {
	struct lb_affinity_key key;
	__u64 last_used;
	__be32 addr[4];
	__be16 port;
	__u16 pad;
	__u32 slot;      /* index in ctlb_be6_v2 */
	__u32 pad2;
};

/* A loadBalancerSourceRanges entry of a service port. LPM trie key: prefixlen counts the 32 bits
 * of svc_id (always matched whole) plus the range's prefix length. */
struct lb4_source_key {
	__u32 prefixlen;
	__u32 svc_id;
	__be32 addr;
};

struct lb6_source_key {
	__u32 prefixlen;
	__u32 svc_id;
	__be32 addr[4];
};

/* --- Pods and the sidecar mesh ------------------------------------------------------------ */

/* Cgroup levels (the cgroup2 root is level 0) the programs look for pod cgroups at: kubelet puts
 * guaranteed pods one level above burstable and best-effort ones. */
#define CTLB_POD_LEVELS 8

/* SO_ORIGINAL_DST (linux/netfilter_ipv4.h) and IP6T_SO_ORIGINAL_DST (netfilter_ipv6/ip6_tables.h):
 * the same number at SOL_IP and SOL_IPV6. */
#define CTLB_SO_ORIGINAL_DST 80
#define CTLB_SOL_IP 0
#define CTLB_SOL_IPV6 41
/* Address families (linux/socket.h is not UAPI). */
#define CTLB_AF_INET 2
#define CTLB_AF_INET6 10

/* Node-wide settings, written by user space (one entry). */
struct ctlb_settings {
	__u32 pod_levels;  /* bit L set: pod cgroups exist at level L */
	__u32 meshed_pods; /* pods with POD_F_MESH; 0 lets a connect skip the pod lookup */
	__u32 generation;  /* bumped after every change of ctlb_pods: ends what programs cached of it */
	__u32 pad;
};

/* How a pod's outbound TCP connections are treated (struct pod_info.flags). */
enum pod_flags {
	POD_F_MESH = 1 << 0,           /* redirected to the sidecar (else connect-time LB) */
	POD_F_INCLUDE_ALL = 1 << 1,    /* every destination is captured (includeOutboundIPRanges "*") */
	POD_F_INCLUDE_RANGES = 1 << 2, /* destinations in the pod's INCLUDE ranges are captured */
	POD_F_EXCLUDE_RANGES = 1 << 3, /* destinations in the pod's EXCLUDE ranges are not */
	POD_F_EXCLUDE_PORTS = 1 << 4,  /* destination ports in ctlb_mesh_ports are not */
};

/* A pod of this node, by the id of its pod-level cgroup. */
struct pod_info {
	__u32 pod_id;          /* small id user space gives the pod: the key of its rules */
	__u32 flags;           /* enum pod_flags */
	__u32 sidecar_uid;     /* connections made by this uid (the proxy) are never captured */
	__be16 outbound_port;  /* the sidecar's outbound listener, on loopback */
	__u16 pad;
	__be32 addr4;          /* the pod's addresses: the source its connections leave with */
	__be32 addr6[4];
};

enum mesh_range_kind {
	MESH_RANGE_INCLUDE = 1,
	MESH_RANGE_EXCLUDE = 2,
};

/* A pod's include or exclude range. LPM trie key: prefixlen counts the 64 bits of pod_id and
 * kind (always matched whole) plus the range's prefix length. */
struct mesh_range4_key {
	__u32 prefixlen;
	__u32 pod_id;
	__u32 kind; /* enum mesh_range_kind */
	__be32 addr;
};

struct mesh_range6_key {
	__u32 prefixlen;
	__u32 pod_id;
	__u32 kind;
	__be32 addr[4];
};

/* A destination port a pod's sidecar does not capture (excludeOutboundPorts). */
struct mesh_port_key {
	__u32 pod_id;
	__be16 port;
	__u16 pad;
};

/* A redirected connection as the sidecar's accepted socket sees it, in the pod's network
 * namespace: the sidecar's socket is not the application's, so the original destination is
 * found by the connection, recorded when the application's connect went out. The namespace
 * keeps two pods with the same loopback tuple apart. */
struct mesh_conn4_key {
	__u64 netns;
	__be32 client_addr;
	__be32 proxy_addr;
	__be16 client_port;
	__be16 proxy_port;
	__u32 pad;
};

struct mesh_conn6_key {
	__u64 netns;
	__be32 client_addr[4];
	__be32 proxy_addr[4];
	__be16 client_port;
	__be16 proxy_port;
	__u32 pad;
};

struct mesh_orig4 {
	__be32 addr;
	__be16 port;
	__u16 pad;
};

struct mesh_orig6 {
	__be32 addr[4];
	__be16 port;
	__u16 pad;
};

/* One slot of the original-destination table: an ARRAY, not an LRU hash, because sock_ops
 * records every redirected connection and an LRU hash update cost ~1.5 us there on this kind of
 * VM (a meshed pod's connection rate rose 16% without it); slots are plain stores.
 *
 * A connection hashes to a set of CTLB_MESH_WAYS adjacent slots. It is written into the slot that
 * already holds its key (a reused port), else into the one holding the oldest connection (by
 * the clock: socket cookies come from per-CPU batches and do not tell age; 0 is empty), so an
 * entry is only lost once CTLB_MESH_WAYS newer
 * connections hashed to its set before the sidecar asked. seq is odd while a writer fills the
 * slot: a writer claims it with a compare-and-swap and skips it when another holds it; a reader
 * copies a slot between two equal even reads of seq (64 bits: the only compare-and-swap width
 * these programs are compiled for). */
struct mesh_conn4 {
	__u64 seq;
	__u64 born; /* bpf_ktime_get_ns() when recorded; 0: empty */
	struct mesh_conn4_key key;
	struct mesh_orig4 orig;
};

struct mesh_conn6 {
	__u64 seq;
	__u64 born;
	struct mesh_conn6_key key;
	struct mesh_orig6 orig;
};

/* --- socket-trace ----------------------------------------------------------------------
 *
 * While `ctlb socket-trace` listens (ctlb_trace_ctl.enabled), every decision the socket programs
 * take about a Service address or a meshed pod's connection is sent to user space through the
 * ring buffer ctlb_trace. Nothing is sent for addresses that are not frontends. */

/* The hook that decided (struct trace_event.hook). */
enum trace_hook {
	TRACE_CONNECT4 = 1,
	TRACE_SENDMSG4 = 2,
	TRACE_RECVMSG4 = 3,
	TRACE_GETPEER4 = 4,
	TRACE_CONNECT6 = 5,
	TRACE_SENDMSG6 = 6,
	TRACE_RECVMSG6 = 7,
	TRACE_GETPEER6 = 8,
};

/* What was decided, and why (struct trace_event.verdict). */
enum trace_verdict {
	TRACE_V_BALANCED = 1,       /* a backend of the set, picked from the socket's hash */
	TRACE_V_AFFINITY = 2,       /* the client's backend under sessionAffinity ClientIP */
	TRACE_V_STICKY = 3,         /* an unconnected send: the backend this socket sent to before */
	TRACE_V_REFUSED = 4,        /* no backends: ECONNREFUSED */
	TRACE_V_NO_LOCAL_DROP = 5,  /* no backends, and the frontend drops (LB_F_DROP): sent to the drop address */
	TRACE_V_SOURCE_DENIED = 6,  /* outside loadBalancerSourceRanges: sent to the drop address */
	TRACE_V_MESH = 7,           /* a meshed pod's connection: sent to its sidecar */
	TRACE_V_REVERSE = 8,        /* recvmsg/getpeername: a backend's address shown as the frontend's */
	TRACE_V_STALE_SET = 9,      /* the backend set changed while read: EHOSTUNREACH */
};

/* One decision. Addresses are in network order; an IPv4 address (family CTLB_AF_INET, also
 * for an IPv4-mapped destination on an IPv6 socket) is in word 0. `from` is what the socket
 * asked for (for TRACE_V_REVERSE: the backend it talks to), `to` what it got (zero when
 * refused). */
struct trace_event {
	__u64 ktime_ns;     /* CLOCK_MONOTONIC */
	__u64 cookie;       /* socket cookie */
	__u64 cgroup_id;    /* the calling task's cgroup */
	__u32 tgid;         /* the calling process */
	__u32 pod_id;       /* struct pod_info.pod_id of the task's pod; 0: not a pod ctlb knows */
	__u32 svc_id;       /* the frontend's service port; 0: none looked up (mesh, reverse) */
	__u8 hook;          /* enum trace_hook */
	__u8 verdict;       /* enum trace_verdict */
	__u8 proto;         /* IPPROTO_TCP, IPPROTO_UDP */
	__u8 family;        /* CTLB_AF_INET or CTLB_AF_INET6: of the addresses below */
	__be32 from_addr[4];
	__be32 to_addr[4];
	__be16 from_port;
	__be16 to_port;
	__u32 pad;
	char comm[16];      /* the calling thread's name */
};

/* Written by `ctlb socket-trace` (one entry). */
struct trace_ctl {
	__u32 enabled;   /* non-zero: send events */
	__u32 owner_pid; /* the socket-trace process; the agent turns tracing off when it is gone */
	__u64 lost;      /* events the ring buffer had no room for */
};

/* Bytes of the ring buffer: ~8000 events. */
#define CTLB_TRACE_BYTES (1 << 20)

#ifdef CTLB_LAYOUT_ONLY
#define CTLB_MAP(_type, _key, _leaf, _name, _max, _flags) \
	BPF_F_TABLE(_type, _key, _leaf, _name, 1, _flags)
#else
#define CTLB_MAP(_type, _key, _leaf, _name, _max, _flags) \
	BPF_TABLE_PINNED7(_type, _key, _leaf, _name, _max, CTLB_PIN_DIR "/" #_name, _flags)
#endif /* CTLB_LAYOUT_ONLY */

/* Frontend and backend tables are written by user space only; the per-socket tables by the
 * programs only. Arrays are preallocated: their size is their memory. They are mmap-able so
 * user space reads them whole without a copy per element (it writes through bpf(2)). */
CTLB_MAP("array", __u32, struct lb4_fe_slot, ctlb_fe4_v2, CTLB_FE_SLOTS, BPF_F_MMAPABLE);
CTLB_MAP("array", __u32, struct lb6_fe_slot, ctlb_fe6_v2, CTLB_FE_SLOTS, BPF_F_MMAPABLE);
CTLB_MAP("array", __u32, struct lb4_backend, ctlb_be4_v2, CTLB_BACKENDS_MAX, BPF_F_MMAPABLE);
CTLB_MAP("array", __u32, struct lb6_backend, ctlb_be6_v2, CTLB_BACKENDS_MAX, BPF_F_MMAPABLE);
CTLB_MAP("hash", struct lb4_member_key, __u8, ctlb_member4, CTLB_BACKENDS_MAX, BPF_F_NO_PREALLOC);
CTLB_MAP("hash", struct lb6_member_key, __u8, ctlb_member6, CTLB_BACKENDS_MAX, BPF_F_NO_PREALLOC);
CTLB_MAP("array", __u32, struct lb4_sock, ctlb_sock4, CTLB_SOCK_SLOTS, BPF_F_MMAPABLE);
CTLB_MAP("array", __u32, struct lb6_sock, ctlb_sock6, CTLB_SOCK_SLOTS, BPF_F_MMAPABLE);
CTLB_MAP("lru_hash", struct lb4_revnat_key, struct lb4_revnat, ctlb_revnat4, CTLB_REVNAT_MAX, 0);
CTLB_MAP("lru_hash", struct lb6_revnat_key, struct lb6_revnat, ctlb_revnat6, CTLB_REVNAT_MAX, 0);
CTLB_MAP("array", __u32, struct lb4_affinity, ctlb_aff4_v3, CTLB_AFFINITY_SLOTS, 0);
CTLB_MAP("array", __u32, struct lb6_affinity, ctlb_aff6_v3, CTLB_AFFINITY_SLOTS, 0);
CTLB_MAP("lpm_trie", struct lb4_source_key, __u8, ctlb_lb_src4, CTLB_SOURCE_RANGES_MAX, BPF_F_NO_PREALLOC);
CTLB_MAP("lpm_trie", struct lb6_source_key, __u8, ctlb_lb_src6, CTLB_SOURCE_RANGES_MAX, BPF_F_NO_PREALLOC);
CTLB_MAP("array", __u32, struct ctlb_settings, ctlb_settings_v2, 1, 0);
CTLB_MAP("hash", __u64, struct pod_info, ctlb_pods, CTLB_PODS_MAX, 0);
CTLB_MAP("lpm_trie", struct mesh_range4_key, __u8, ctlb_mesh_range4, CTLB_MESH_RULES_MAX, BPF_F_NO_PREALLOC);
CTLB_MAP("lpm_trie", struct mesh_range6_key, __u8, ctlb_mesh_range6, CTLB_MESH_RULES_MAX, BPF_F_NO_PREALLOC);
CTLB_MAP("hash", struct mesh_port_key, __u8, ctlb_mesh_ports, CTLB_MESH_RULES_MAX, 0);
CTLB_MAP("array", __u32, struct mesh_conn4, ctlb_mesh_conn4_v2, CTLB_MESH_CONN_SLOTS, 0);
CTLB_MAP("array", __u32, struct mesh_conn6, ctlb_mesh_conn6_v2, CTLB_MESH_CONN_SLOTS, 0);

CTLB_MAP("array", __u32, struct trace_ctl, ctlb_trace_ctl, 1, 0);

#ifdef CTLB_LAYOUT_ONLY
/* bcc makes ctypes types for map keys and values only: the event's type reaches Python as the
 * value of a map that exists in the layout compile alone. */
CTLB_MAP("array", __u32, struct trace_event, ctlb_trace_event, 1, 0);
#else
/* bcc's BPF_RINGBUF_OUTPUT, pinned: socket-trace opens it by path. */
struct ctlb_trace_table_t {
	int key;
	__u32 leaf;
	void *(*ringbuf_reserve)(__u64);
	void (*ringbuf_submit)(void *, __u64);
	__u32 max_entries;
};
__attribute__((section("maps/ringbuf:" CTLB_PIN_DIR "/ctlb_trace")))
struct ctlb_trace_table_t ctlb_trace = { .max_entries = CTLB_TRACE_BYTES };
#endif /* CTLB_LAYOUT_ONLY */

#endif /* CTLB_H */
