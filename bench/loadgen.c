/*
 * loadgen: the load generator of the ctlb benchmarks, one program with subcommands.
 *
 *   loadgen serve-tcp --port P [--echo] [--cpu N] [--seconds S]
 *   loadgen serve-udp --port P [--cpu N] [--seconds S]
 *   loadgen tcp-crr   --host H --port P --seconds S [--max N] [--cpu N]
 *   loadgen tcp-rr    --host H --port P --seconds S [--cpu N]
 *   loadgen udp-rr    --host H --port P --seconds S [--unconnected] [--cpu N]
 *
 * Servers bind [::] dual-stack (falling back to 0.0.0.0 without IPv6), print "ready" once they
 * listen, and run until SIGTERM/SIGINT (or for --seconds, if given). Clients run for --seconds
 * (tcp-crr also stops after --max connections). Every subcommand prints one JSON object on stdout
 * when it ends; usage and setup failures go to stderr with exit status 2 or 1.
 *
 * Client latencies are kept one per operation, in nanoseconds, in a growing array; percentiles
 * are exact (nearest rank over the sorted array). Every blocking call has a 1 s timeout, so no
 * loop can hang past its deadline by more than that.
 *
 * Build: gcc -O2 -Wall -Wextra -o loadgen loadgen.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define LISTEN_BACKLOG 4096
#define IO_TIMEOUT_MS 1000      /* connect/recv timeout: a stuck operation counts as an error */
#define RETRY_PAUSE_NS 10000000 /* 10 ms pause after a failed (re)connect in the rr clients */
#define UDP_PAYLOAD 64
#define EPOLL_BATCH 256
#define ACCEPT_BURST 1024       /* accepts per wakeup, so echo connections are served too */
#define STALE_REPLIES_MAX 16    /* late UDP replies skipped while waiting for the current one */
#define NS_PER_S 1000000000ULL

/* ---------------------------------------------------------------------------------------- */
/* Options                                                                                   */

struct opts {
	const char *host;
	int port;
	double seconds;
	long max;
	int echo;
	int unconnected;
	int cpu;
};

static volatile sig_atomic_t stop_requested;

static void on_stop_signal(int sig)
{
	(void)sig;
	stop_requested = 1;
}

/* SIGTERM/SIGINT set a flag; without SA_RESTART they also interrupt blocking calls (EINTR). */
static void install_signals(void)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_stop_signal;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
}

static void die(const char *what)
{
	fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void usage(const char *msg)
{
	fprintf(stderr,
		"loadgen: %s\n"
		"usage: loadgen serve-tcp --port P [--echo] [--cpu N] [--seconds S]\n"
		"       loadgen serve-udp --port P [--cpu N] [--seconds S]\n"
		"       loadgen tcp-crr --host H --port P --seconds S [--max N] [--cpu N]\n"
		"       loadgen tcp-rr --host H --port P --seconds S [--cpu N]\n"
		"       loadgen udp-rr --host H --port P --seconds S [--unconnected] [--cpu N]\n",
		msg);
	exit(2);
}

static long parse_long(const char *text, const char *name, long lo, long hi)
{
	char *end;
	long value;

	errno = 0;
	value = strtol(text, &end, 10);
	if (errno || end == text || *end || value < lo || value > hi) {
		fprintf(stderr, "loadgen: bad %s: %s\n", name, text);
		exit(2);
	}
	return value;
}

static double parse_seconds(const char *text)
{
	char *end;
	double value;

	errno = 0;
	value = strtod(text, &end);
	if (errno || end == text || *end || !(value > 0) || value > 86400) {
		fprintf(stderr, "loadgen: bad --seconds: %s\n", text);
		exit(2);
	}
	return value;
}

static void parse_opts(int argc, char **argv, struct opts *o)
{
	static const struct option longopts[] = {
		{ "host", required_argument, NULL, 'h' },
		{ "port", required_argument, NULL, 'p' },
		{ "seconds", required_argument, NULL, 's' },
		{ "max", required_argument, NULL, 'm' },
		{ "cpu", required_argument, NULL, 'c' },
		{ "echo", no_argument, NULL, 'e' },
		{ "unconnected", no_argument, NULL, 'u' },
		{ NULL, 0, NULL, 0 },
	};
	int ch;

	memset(o, 0, sizeof(*o));
	o->cpu = -1;
	while ((ch = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
		switch (ch) {
		case 'h': o->host = optarg; break;
		case 'p': o->port = (int)parse_long(optarg, "--port", 1, 65535); break;
		case 's': o->seconds = parse_seconds(optarg); break;
		case 'm': o->max = parse_long(optarg, "--max", 1, 1000000000L); break;
		case 'c': o->cpu = (int)parse_long(optarg, "--cpu", 0, CPU_SETSIZE - 1); break;
		case 'e': o->echo = 1; break;
		case 'u': o->unconnected = 1; break;
		default: usage("unknown option");
		}
	}
	if (optind != argc)
		usage("unexpected argument");
	if (o->port == 0)
		usage("--port is required");
}

static void require_client_opts(const struct opts *o)
{
	if (!o->host)
		usage("--host is required");
	if (o->seconds <= 0)
		usage("--seconds is required");
}

/* Pin the whole process to one CPU, so client and server do not share a core. */
static void pin_cpu(int cpu)
{
	cpu_set_t set;

	if (cpu < 0)
		return;
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	if (sched_setaffinity(0, sizeof(set), &set) != 0)
		die("sched_setaffinity");
}

/* ---------------------------------------------------------------------------------------- */
/* Time and latency statistics                                                              */

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * NS_PER_S + (uint64_t)ts.tv_nsec;
}

static void pause_ns(long ns)
{
	struct timespec ts = { .tv_sec = 0, .tv_nsec = ns };

	nanosleep(&ts, NULL);
}

/* Latencies in ns. uint32 holds 4.29 s, far above the 1 s timeout of any measured call. */
struct samples {
	uint32_t *v;
	size_t n, cap;
};

static void samples_add(struct samples *s, uint64_t ns)
{
	if (s->n == s->cap) {
		size_t cap = s->cap ? s->cap * 2 : (size_t)1 << 16;
		uint32_t *v = realloc(s->v, cap * sizeof(*v));

		if (!v)
			die("realloc");
		s->v = v;
		s->cap = cap;
	}
	s->v[s->n++] = ns > UINT32_MAX ? UINT32_MAX : (uint32_t)ns;
}

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

	return (x > y) - (x < y);
}

/* Nearest-rank percentile of sorted samples, in microseconds. */
static double percentile_us(const struct samples *s, double p)
{
	size_t rank;

	if (s->n == 0)
		return 0;
	rank = (size_t)(p / 100.0 * (double)s->n + 0.999999);
	if (rank < 1)
		rank = 1;
	if (rank > s->n)
		rank = s->n;
	return s->v[rank - 1] / 1000.0;
}

/* What every client reports: operations done, errors, elapsed time, latency distribution. */
struct result {
	const char *mode;
	const char *count_name; /* "connections" or "transactions" */
	long ops;
	long errors;
	int first_errno;
	long source_mismatch;   /* udp-rr --unconnected: replies not from the address sent to */
	uint64_t start_ns, end_ns;
	struct samples lat;
};

static void note_error(struct result *r, int err)
{
	if (r->errors++ == 0)
		r->first_errno = err;
}

static void print_result(struct result *r)
{
	double secs = (double)(r->end_ns - r->start_ns) / NS_PER_S;
	double sum = 0;
	size_t i;

	qsort(r->lat.v, r->lat.n, sizeof(*r->lat.v), cmp_u32);
	for (i = 0; i < r->lat.n; i++)
		sum += r->lat.v[i];
	printf("{\"mode\": \"%s\", \"%s\": %ld, \"errors\": %ld, \"first_errno\": %d, "
	       "\"first_error\": \"%s\", ",
	       r->mode, r->count_name, r->ops, r->errors, r->first_errno,
	       r->first_errno ? strerror(r->first_errno) : "");
	if (strcmp(r->mode, "udp-rr") == 0)
		printf("\"source_mismatch\": %ld, ", r->source_mismatch);
	printf("\"seconds\": %.6f, \"rate\": %.1f, \"p50_us\": %.3f, \"p90_us\": %.3f, "
	       "\"p99_us\": %.3f, \"mean_us\": %.3f, \"min_us\": %.3f, \"max_us\": %.3f}\n",
	       secs, secs > 0 ? (double)r->ops / secs : 0.0,
	       percentile_us(&r->lat, 50), percentile_us(&r->lat, 90), percentile_us(&r->lat, 99),
	       r->lat.n ? sum / (double)r->lat.n / 1000.0 : 0.0,
	       r->lat.n ? r->lat.v[0] / 1000.0 : 0.0,
	       r->lat.n ? r->lat.v[r->lat.n - 1] / 1000.0 : 0.0);
	fflush(stdout);
	free(r->lat.v);
}

/* ---------------------------------------------------------------------------------------- */
/* Sockets                                                                                   */

struct target {
	struct sockaddr_storage addr;
	socklen_t len;
	int family;
};

/* Numeric IPv4 or IPv6 address (IPv6 may carry a %scope); no name lookups in a lab netns. */
static void resolve(const char *host, int port, int socktype, struct target *t)
{
	struct addrinfo hints, *res;
	char service[8];
	int rc;

	memset(&hints, 0, sizeof(hints));
	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = socktype;
	hints.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV;
	snprintf(service, sizeof(service), "%d", port);
	rc = getaddrinfo(host, service, &hints, &res);
	if (rc != 0) {
		fprintf(stderr, "loadgen: bad --host %s: %s\n", host, gai_strerror(rc));
		exit(2);
	}
	memcpy(&t->addr, res->ai_addr, res->ai_addrlen);
	t->len = res->ai_addrlen;
	t->family = res->ai_family;
	freeaddrinfo(res);
}

static void set_int(int fd, int level, int name, int value)
{
	setsockopt(fd, level, name, &value, sizeof(value));
}

static void set_timeout(int fd, int name, int ms)
{
	struct timeval tv = { .tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000 };

	setsockopt(fd, SOL_SOCKET, name, &tv, sizeof(tv));
}

/* Close with an RST instead of a FIN: no TIME_WAIT, so ports never run out in a rate test. */
static void close_abort(int fd)
{
	struct linger lg = { .l_onoff = 1, .l_linger = 0 };

	setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
	close(fd);
}

/* A socket bound to [::]:port accepting IPv4 too, or to 0.0.0.0:port where IPv6 is missing. */
static int bind_any(int type, int port)
{
	struct sockaddr_in6 a6;
	struct sockaddr_in a4;
	int fd;

	fd = socket(AF_INET6, type | SOCK_CLOEXEC, 0);
	if (fd >= 0) {
		memset(&a6, 0, sizeof(a6));
		a6.sin6_family = AF_INET6;
		a6.sin6_addr = in6addr_any;
		a6.sin6_port = htons((uint16_t)port);
		set_int(fd, IPPROTO_IPV6, IPV6_V6ONLY, 0);
		set_int(fd, SOL_SOCKET, SO_REUSEADDR, 1);
		if (bind(fd, (struct sockaddr *)&a6, sizeof(a6)) != 0)
			die("bind [::]");
		return fd;
	}
	if (errno != EAFNOSUPPORT)
		die("socket");
	fd = socket(AF_INET, type | SOCK_CLOEXEC, 0);
	if (fd < 0)
		die("socket");
	memset(&a4, 0, sizeof(a4));
	a4.sin_family = AF_INET;
	a4.sin_addr.s_addr = htonl(INADDR_ANY);
	a4.sin_port = htons((uint16_t)port);
	set_int(fd, SOL_SOCKET, SO_REUSEADDR, 1);
	if (bind(fd, (struct sockaddr *)&a4, sizeof(a4)) != 0)
		die("bind 0.0.0.0");
	return fd;
}

static void announce_ready(void)
{
	fputs("ready\n", stdout);
	fflush(stdout);
}

/* Deadline of a server with --seconds, or 0 for "until signalled". */
static uint64_t server_deadline(const struct opts *o)
{
	return o->seconds > 0 ? now_ns() + (uint64_t)(o->seconds * NS_PER_S) : 0;
}

static int server_done(uint64_t deadline)
{
	return stop_requested || (deadline && now_ns() >= deadline);
}

/* ---------------------------------------------------------------------------------------- */
/* serve-tcp                                                                                 */

/* Echo connections may be many: allow as many descriptors as the hard limit permits. */
static void raise_fd_limit(void)
{
	struct rlimit rl;

	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
		rl.rlim_cur = rl.rlim_max;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
}

/* Write all of buf to a non-blocking socket, waiting (1 s at most per wait) when it is full. */
static int write_all(int fd, const char *buf, size_t len)
{
	struct pollfd pfd = { .fd = fd, .events = POLLOUT };

	while (len > 0) {
		ssize_t n = write(fd, buf, len);

		if (n > 0) {
			buf += n;
			len -= (size_t)n;
		} else if (n < 0 && errno == EAGAIN) {
			if (poll(&pfd, 1, IO_TIMEOUT_MS) <= 0)
				return -1;
		} else if (!(n < 0 && errno == EINTR)) {
			return -1;
		}
	}
	return 0;
}

/* Serve one readable echo connection; closing the fd also drops it from the epoll set. */
static void echo_once(int fd)
{
	char buf[65536];
	ssize_t n = read(fd, buf, sizeof(buf));

	if (n > 0) {
		if (write_all(fd, buf, (size_t)n) != 0)
			close_abort(fd);
	} else if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
		close(fd);
	}
}

struct tcp_server_stats {
	long accepted;
	long accept_errors;
	int first_errno;
};

/*
 * Accept what is queued. Echo mode hands each connection to epoll. Rate mode closes it at once,
 * with a FIN, not an RST: an RST can overtake the client's wakeup from connect(), which then
 * finds its socket reset and fails with ECONNRESET although the handshake succeeded. A FIN only
 * moves the client to CLOSE_WAIT, and connect() still succeeds. The client aborts (RST), so the
 * server keeps no TIME_WAIT either.
 */
static void accept_burst(int lfd, int ep, int echo, struct tcp_server_stats *st)
{
	int i;

	for (i = 0; i < ACCEPT_BURST; i++) {
		int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC | (echo ? SOCK_NONBLOCK : 0));

		if (fd < 0) {
			if (errno == EAGAIN || errno == EINTR)
				return;
			if (st->accept_errors++ == 0)
				st->first_errno = errno;
			if (errno == EMFILE || errno == ENFILE || errno == ENOMEM || errno == ENOBUFS) {
				pause_ns(RETRY_PAUSE_NS); /* out of resources: do not spin */
				return;
			}
			continue; /* ECONNABORTED and the like: that connection is gone, go on */
		}
		st->accepted++;
		if (echo) {
			struct epoll_event ev = { .events = EPOLLIN, .data.fd = fd };

			set_int(fd, IPPROTO_TCP, TCP_NODELAY, 1);
			if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) != 0)
				close_abort(fd);
		} else {
			close(fd);
		}
	}
}

static int serve_tcp(const struct opts *o)
{
	struct epoll_event ev = { .events = EPOLLIN }, events[EPOLL_BATCH];
	struct tcp_server_stats st = { 0, 0, 0 };
	uint64_t deadline = server_deadline(o);
	int lfd, ep, n, i;

	raise_fd_limit();
	lfd = bind_any(SOCK_STREAM | SOCK_NONBLOCK, o->port);
	if (listen(lfd, LISTEN_BACKLOG) != 0)
		die("listen");
	ep = epoll_create1(EPOLL_CLOEXEC);
	if (ep < 0)
		die("epoll_create1");
	ev.data.fd = lfd;
	if (epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev) != 0)
		die("epoll_ctl");
	announce_ready();
	while (!server_done(deadline)) {
		n = epoll_wait(ep, events, EPOLL_BATCH, IO_TIMEOUT_MS);
		if (n < 0 && errno != EINTR)
			die("epoll_wait");
		for (i = 0; i < n; i++) {
			if (events[i].data.fd == lfd)
				accept_burst(lfd, ep, o->echo, &st);
			else
				echo_once(events[i].data.fd);
		}
	}
	printf("{\"mode\": \"serve-tcp\", \"accepted\": %ld, \"accept_errors\": %ld, "
	       "\"first_errno\": %d}\n", st.accepted, st.accept_errors, st.first_errno);
	fflush(stdout);
	return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* serve-udp                                                                                 */

static int serve_udp(const struct opts *o)
{
	uint64_t deadline = server_deadline(o);
	struct sockaddr_storage peer;
	char buf[65536];
	long echoed = 0, errors = 0;
	int fd;

	fd = bind_any(SOCK_DGRAM, o->port);
	set_timeout(fd, SO_RCVTIMEO, IO_TIMEOUT_MS); /* wake up to check stop and deadline */
	announce_ready();
	while (!server_done(deadline)) {
		socklen_t plen = sizeof(peer);
		ssize_t n = recvfrom(fd, buf, sizeof(buf), 0, (struct sockaddr *)&peer, &plen);

		if (n < 0) {
			if (errno != EAGAIN && errno != EINTR)
				errors++;
			continue;
		}
		if (sendto(fd, buf, (size_t)n, 0, (struct sockaddr *)&peer, plen) == n)
			echoed++;
		else
			errors++;
	}
	printf("{\"mode\": \"serve-udp\", \"echoed\": %ld, \"errors\": %ld}\n", echoed, errors);
	fflush(stdout);
	return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* tcp-crr: connections per second, and how long connect() takes                             */

/* One connect; its latency is recorded on success. Returns 0 or an errno. */
static int crr_once(const struct target *t, struct result *r, uint64_t *done_at)
{
	uint64_t t0, t1;
	int fd, rc, err = 0;

	fd = socket(t->family, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		*done_at = now_ns();
		return errno;
	}
	set_timeout(fd, SO_SNDTIMEO, IO_TIMEOUT_MS); /* bounds a blocking connect() */
	t0 = now_ns();
	rc = connect(fd, (const struct sockaddr *)&t->addr, t->len);
	t1 = now_ns();
	if (rc == 0)
		samples_add(&r->lat, t1 - t0);
	else
		err = errno == EINPROGRESS ? ETIMEDOUT : errno; /* EINPROGRESS: SO_SNDTIMEO hit */
	close_abort(fd);
	*done_at = t1;
	return err;
}

static int tcp_crr(const struct opts *o)
{
	struct result r = { .mode = "tcp-crr", .count_name = "connections" };
	struct target t;
	uint64_t deadline, done_at;

	require_client_opts(o);
	resolve(o->host, o->port, SOCK_STREAM, &t);
	r.start_ns = now_ns();
	deadline = r.start_ns + (uint64_t)(o->seconds * NS_PER_S);
	do {
		int err = crr_once(&t, &r, &done_at);

		if (err == 0)
			r.ops++;
		else if (!(err == EINTR && stop_requested))
			note_error(&r, err);
	} while (!stop_requested && done_at < deadline && !(o->max && r.ops >= o->max));
	r.end_ns = now_ns();
	print_result(&r);
	return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* tcp-rr: 1-byte ping-pong over one established connection                                  */

/* Connect with TCP_NODELAY and 1 s timeouts; returns the fd or -errno. */
static int rr_connect(const struct target *t)
{
	int fd = socket(t->family, SOCK_STREAM | SOCK_CLOEXEC, 0);

	if (fd < 0)
		return -errno;
	set_timeout(fd, SO_SNDTIMEO, IO_TIMEOUT_MS);
	set_timeout(fd, SO_RCVTIMEO, IO_TIMEOUT_MS);
	set_int(fd, IPPROTO_TCP, TCP_NODELAY, 1);
	if (connect(fd, (const struct sockaddr *)&t->addr, t->len) != 0) {
		int err = errno == EINPROGRESS ? ETIMEDOUT : errno;

		close(fd);
		return -err;
	}
	return fd;
}

/* One transaction: returns 0 or an errno (EAGAIN from the receive timeout is ETIMEDOUT). */
static int tcp_rr_once(int fd, uint64_t *latency)
{
	char byte = 'x';
	uint64_t t0 = now_ns();
	ssize_t n;

	if (send(fd, &byte, 1, MSG_NOSIGNAL) != 1)
		return errno;
	n = recv(fd, &byte, 1, 0);
	if (n == 0)
		return ECONNRESET; /* the server closed the connection */
	if (n < 0)
		return errno == EAGAIN ? ETIMEDOUT : errno;
	*latency = now_ns() - t0;
	return 0;
}

static int tcp_rr(const struct opts *o)
{
	struct result r = { .mode = "tcp-rr", .count_name = "transactions" };
	struct target t;
	uint64_t deadline, latency = 0;
	int fd = -1, err;

	require_client_opts(o);
	resolve(o->host, o->port, SOCK_STREAM, &t);
	r.start_ns = now_ns();
	deadline = r.start_ns + (uint64_t)(o->seconds * NS_PER_S);
	while (!stop_requested && now_ns() < deadline) {
		if (fd < 0) {
			fd = rr_connect(&t);
			if (fd < 0) {
				note_error(&r, -fd);
				pause_ns(RETRY_PAUSE_NS);
				continue;
			}
		}
		err = tcp_rr_once(fd, &latency);
		if (err == 0) {
			samples_add(&r.lat, latency);
			r.ops++;
		} else if (!(err == EINTR && stop_requested)) {
			note_error(&r, err);
			close_abort(fd); /* a broken exchange: start over on a new connection */
			fd = -1;
		}
	}
	r.end_ns = now_ns();
	if (fd >= 0)
		close_abort(fd);
	print_result(&r);
	return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* udp-rr: 64-byte request/response, on a connected socket or with sendto/recvfrom            */

static int same_endpoint(const struct sockaddr_storage *a, const struct sockaddr_storage *b)
{
	if (a->ss_family != b->ss_family)
		return 0;
	if (a->ss_family == AF_INET) {
		const struct sockaddr_in *x = (const void *)a, *y = (const void *)b;

		return x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
	}
	if (a->ss_family == AF_INET6) {
		const struct sockaddr_in6 *x = (const void *)a, *y = (const void *)b;

		return x->sin6_port == y->sin6_port &&
		       memcmp(&x->sin6_addr, &y->sin6_addr, sizeof(x->sin6_addr)) == 0;
	}
	return 0;
}

/* Send request seq and wait for its reply, skipping late replies to earlier requests.
 * Returns 0 or an errno (the receive timeout is ETIMEDOUT). */
static int udp_rr_once(int fd, const struct target *t, int unconnected, uint64_t seq,
		       struct result *r)
{
	char req[UDP_PAYLOAD], rep[UDP_PAYLOAD];
	struct sockaddr_storage from;
	uint64_t got;
	ssize_t n;
	int i;

	memset(req, 'u', sizeof(req));
	memcpy(req, &seq, sizeof(seq));
	n = unconnected
		? sendto(fd, req, sizeof(req), 0, (const struct sockaddr *)&t->addr, t->len)
		: send(fd, req, sizeof(req), 0);
	if (n != (ssize_t)sizeof(req))
		return n < 0 ? errno : EMSGSIZE;
	for (i = 0; i < STALE_REPLIES_MAX; i++) {
		socklen_t flen = sizeof(from);

		n = unconnected ? recvfrom(fd, rep, sizeof(rep), 0, (struct sockaddr *)&from, &flen)
				: recv(fd, rep, sizeof(rep), 0);
		if (n < 0)
			return errno == EAGAIN ? ETIMEDOUT : errno;
		if (n < (ssize_t)sizeof(got))
			continue;
		memcpy(&got, rep, sizeof(got));
		if (got != seq)
			continue; /* a reply that came after its request timed out */
		if (unconnected && !same_endpoint(&from, &t->addr))
			r->source_mismatch++;
		return 0;
	}
	return EPROTO;
}

static int udp_rr(const struct opts *o)
{
	struct result r = { .mode = "udp-rr", .count_name = "transactions" };
	struct target t;
	uint64_t deadline, t0, seq = 0;
	int fd, err;

	require_client_opts(o);
	resolve(o->host, o->port, SOCK_DGRAM, &t);
	fd = socket(t.family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		die("socket");
	set_timeout(fd, SO_RCVTIMEO, IO_TIMEOUT_MS);
	if (!o->unconnected && connect(fd, (const struct sockaddr *)&t.addr, t.len) != 0)
		die("connect");
	r.start_ns = now_ns();
	deadline = r.start_ns + (uint64_t)(o->seconds * NS_PER_S);
	while (!stop_requested && (t0 = now_ns()) < deadline) {
		err = udp_rr_once(fd, &t, o->unconnected, ++seq, &r);
		if (err == 0) {
			samples_add(&r.lat, now_ns() - t0);
			r.ops++;
		} else if (!(err == EINTR && stop_requested)) {
			note_error(&r, err);
			if (err != ETIMEDOUT)
				pause_ns(RETRY_PAUSE_NS); /* e.g. ECONNREFUSED: do not spin */
		}
	}
	r.end_ns = now_ns();
	close(fd);
	print_result(&r);
	return 0;
}

/* ---------------------------------------------------------------------------------------- */

int main(int argc, char **argv)
{
	static const struct {
		const char *name;
		int (*run)(const struct opts *);
	} commands[] = {
		{ "serve-tcp", serve_tcp }, { "serve-udp", serve_udp }, { "tcp-crr", tcp_crr },
		{ "tcp-rr", tcp_rr },       { "udp-rr", udp_rr },
	};
	struct opts o;
	size_t i;

	if (argc < 2)
		usage("no subcommand");
	for (i = 0; i < sizeof(commands) / sizeof(commands[0]); i++) {
		if (strcmp(argv[1], commands[i].name) == 0) {
			parse_opts(argc - 1, argv + 1, &o);
			install_signals();
			pin_cpu(o.cpu);
			return commands[i].run(&o);
		}
	}
	usage("unknown subcommand");
	return 2;
}
