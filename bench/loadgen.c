/* zbench-loadgen: the request/response server and load generator of the benchmark suite.
 *
 * A C program so that the generator is never the bottleneck (a Python client would be).
 * Compiled at run time by `bench` with `gcc -O2`; every mode prints one JSON object
 * on stdout and every loop is bounded by a duration or a count.
 *
 * Wire protocol (ours): a request is an 8-byte header {u32 request_len, u32 response_len}
 * in network order followed by request_len bytes; the server answers with response_len
 * bytes. Connections are persistent: a client may send the next request after the answer.
 *
 *   loadgen server --port P [--threads N]
 *   loadgen rr   --host H --port P --conns C --duration S [--rate R] [--req B] [--resp B]
 *   loadgen cps  --host H --port P --conns C --duration S [--req B] [--resp B]
 *   loadgen hold --host H --port P --conns N --hold S [--setup S] [--req B] [--resp B]
 *
 * rr without --rate: closed loop, each connection keeps one request in flight (max req/s).
 * rr with --rate: open loop, requests scheduled at a fixed total rate over the connections,
 *   latency measured from the scheduled time (so queueing behind a slow proxy counts).
 * cps: C concurrent workers, each connect -> one request -> answer -> close, repeated.
 * hold: open N connections (one request each, so the whole path is established), print a
 *   JSON line, keep them open until stdin closes or S seconds pass, then close them.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define MAX_EVENTS 1024
#define MAX_SAMPLES (8u * 1024u * 1024u)
#define MAX_PAYLOAD (1u << 20)

static uint8_t zeros[MAX_PAYLOAD];

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *what) {
    fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void raise_nofile(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

static void set_nonblock(int fd) {
    int fl = fcntl(fd, F_GETFL, 0);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) die("fcntl");
}

static void set_nodelay(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

/* ---------------------------------------------------------------- options */

struct opts {
    const char *mode, *host;
    int port, conns, threads;
    double duration, rate, hold, setup;
    uint32_t req, resp;
};

static void usage(void) {
    fprintf(stderr, "usage: loadgen server|rr|cps|hold [--host H] [--port P] [--conns C] "
                    "[--threads N] [--duration S] [--rate R] [--hold S] [--setup S] [--req B] "
                    "[--resp B]\n");
    exit(2);
}

static struct opts parse(int argc, char **argv) {
    struct opts o = {.host = "127.0.0.1", .port = 7000, .conns = 8, .threads = 2,
                     .duration = 3.0, .rate = 0, .hold = 30, .setup = 60, .req = 1024,
                     .resp = 1024};
    if (argc < 2) usage();
    o.mode = argv[1];
    for (int i = 2; i < argc; i++) {
        const char *k = argv[i];
        if (i + 1 >= argc) usage();
        const char *v = argv[++i];
        if (!strcmp(k, "--host")) o.host = v;
        else if (!strcmp(k, "--port")) o.port = atoi(v);
        else if (!strcmp(k, "--conns")) o.conns = atoi(v);
        else if (!strcmp(k, "--threads")) o.threads = atoi(v);
        else if (!strcmp(k, "--duration")) o.duration = atof(v);
        else if (!strcmp(k, "--rate")) o.rate = atof(v);
        else if (!strcmp(k, "--hold")) o.hold = atof(v);
        else if (!strcmp(k, "--setup")) o.setup = atof(v);
        else if (!strcmp(k, "--req")) o.req = (uint32_t)atol(v);
        else if (!strcmp(k, "--resp")) o.resp = (uint32_t)atol(v);
        else usage();
    }
    if (o.conns < 1 || o.conns > 200000 || o.threads < 1 || o.threads > 64) usage();
    if (o.req > MAX_PAYLOAD || o.resp > MAX_PAYLOAD) usage();
    if (o.duration <= 0 || o.duration > 3600 || o.hold < 0 || o.hold > 3600 || o.setup <= 0 ||
        o.setup > 600)
        usage();
    return o;
}

/* ---------------------------------------------------------------- server */

struct sconn {
    int fd;
    uint8_t hdr[8];
    uint32_t hdr_got;
    uint64_t req_left;   /* request payload bytes still to read */
    uint64_t resp_left;  /* response bytes still to write */
    int want_out;
};

static int server_flush(int ep, struct sconn *c) {
    while (c->resp_left > 0) {
        size_t n = c->resp_left > MAX_PAYLOAD ? MAX_PAYLOAD : (size_t)c->resp_left;
        ssize_t w = send(c->fd, zeros, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            return -1;
        }
        c->resp_left -= (uint64_t)w;
    }
    int want = c->resp_left > 0;
    if (want != c->want_out) {
        struct epoll_event ev = {.events = EPOLLIN | (want ? EPOLLOUT : 0), .data.ptr = c};
        epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
        c->want_out = want;
    }
    return 0;
}

static int server_feed(struct sconn *c, const uint8_t *p, size_t n) {
    while (n > 0) {
        if (c->req_left > 0) {
            size_t k = n < c->req_left ? n : (size_t)c->req_left;
            c->req_left -= k;
            p += k;
            n -= k;
            continue;
        }
        size_t k = 8 - c->hdr_got;
        if (k > n) k = n;
        memcpy(c->hdr + c->hdr_got, p, k);
        c->hdr_got += (uint32_t)k;
        p += k;
        n -= k;
        if (c->hdr_got == 8) {
            uint32_t rq, rs;
            memcpy(&rq, c->hdr, 4);
            memcpy(&rs, c->hdr + 4, 4);
            c->req_left = ntohl(rq);
            c->resp_left += ntohl(rs);
            c->hdr_got = 0;
        }
    }
    /* The response of a request is due once its payload is in; with a payload still
     * arriving, the answer is held back (resp_left counts it, flushed when req_left is 0). */
    return 0;
}

struct server_arg {
    int port;
};

static void *server_thread(void *argp) {
    struct server_arg *a = argp;
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    if (ls < 0) die("socket");
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(ls, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)a->port)};
    sa.sin_addr.s_addr = htonl(INADDR_ANY);
    if (bind(ls, (struct sockaddr *)&sa, sizeof sa) < 0) die("bind");
    if (listen(ls, 4096) < 0) die("listen");
    set_nonblock(ls);
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    static __thread uint8_t buf[65536];
    struct epoll_event evs[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(ep, evs, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            struct sconn *c = evs[i].data.ptr;
            if (c == NULL) {
                for (int k = 0; k < 256; k++) {
                    int fd = accept4(ls, NULL, NULL, SOCK_NONBLOCK);
                    if (fd < 0) break;
                    set_nodelay(fd);
                    struct sconn *nc = calloc(1, sizeof *nc);
                    if (!nc) die("calloc");
                    nc->fd = fd;
                    struct epoll_event e2 = {.events = EPOLLIN, .data.ptr = nc};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e2);
                }
                continue;
            }
            int dead = 0;
            if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
                for (int k = 0; k < 16; k++) {
                    ssize_t r = recv(c->fd, buf, sizeof buf, 0);
                    if (r > 0) {
                        server_feed(c, buf, (size_t)r);
                        if ((size_t)r < sizeof buf) break;
                        continue;
                    }
                    if (r == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR))
                        dead = 1;
                    break;
                }
            }
            if (!dead && c->req_left == 0 && server_flush(ep, c) < 0) dead = 1;
            if (dead) {
                epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                close(c->fd);
                free(c);
            }
        }
    }
    return NULL;
}

static int run_server(struct opts *o) {
    signal(SIGPIPE, SIG_IGN);
    pthread_t th[64];
    struct server_arg a = {.port = o->port};
    for (int i = 0; i < o->threads; i++)
        if (pthread_create(&th[i], NULL, server_thread, &a) != 0) die("pthread_create");
    printf("{\"serving\": %d, \"threads\": %d}\n", o->port, o->threads);
    fflush(stdout);
    for (int i = 0; i < o->threads; i++) pthread_join(th[i], NULL);
    return 0;
}

/* ---------------------------------------------------------------- client side */

struct samples {
    uint32_t *us;  /* latencies in 1/10 microseconds, capped */
    uint32_t n, cap;
};

static void sample_add(struct samples *s, uint64_t ns) {
    if (s->n >= s->cap) return;
    uint64_t v = ns / 100;
    s->us[s->n++] = v > 0xFFFFFFFFu ? 0xFFFFFFFFu : (uint32_t)v;
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static double pct(struct samples *s, double p) {
    if (s->n == 0) return 0;
    size_t i = (size_t)(p / 100.0 * (double)(s->n - 1) + 0.5);
    return s->us[i] / 10.0;
}

static void print_latency(struct samples *s) {
    qsort(s->us, s->n, sizeof s->us[0], cmp_u32);
    double sum = 0;
    for (uint32_t i = 0; i < s->n; i++) sum += s->us[i] / 10.0;
    printf("\"latency_us\": {\"p50\": %.1f, \"p90\": %.1f, \"p99\": %.1f, \"p999\": %.1f, "
           "\"max\": %.1f, \"mean\": %.1f, \"samples\": %u}",
           pct(s, 50), pct(s, 90), pct(s, 99), pct(s, 99.9), pct(s, 100),
           s->n ? sum / s->n : 0.0, s->n);
}

struct cconn {
    int fd;
    int state;          /* 0 idle, 1 connecting, 2 sending, 3 receiving, 4 dead */
    uint64_t t_start;   /* when the current request (or connection) started */
    uint64_t sent;      /* bytes of the current request sent */
    uint64_t got;       /* bytes of the current response received */
    uint8_t reqbuf[8];
};

static struct sockaddr_in target(struct opts *o) {
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)o->port)};
    if (inet_pton(AF_INET, o->host, &sa.sin_addr) != 1) {
        fprintf(stderr, "loadgen: bad host %s\n", o->host);
        exit(2);
    }
    return sa;
}

/* Starts a non-blocking connect; returns the fd or -1. */
static int start_connect(struct sockaddr_in *sa) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0) return -1;
    set_nodelay(fd);
    if (connect(fd, (struct sockaddr *)sa, sizeof *sa) < 0 && errno != EINPROGRESS) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Sends what is left of the current request; 1 when complete, 0 when blocked, -1 on error. */
static int send_request(struct cconn *c, struct opts *o) {
    uint64_t total = 8ull + o->req;
    while (c->sent < total) {
        struct iovec iov[2];
        int niov = 0;
        if (c->sent < 8) {
            iov[niov].iov_base = c->reqbuf + c->sent;
            iov[niov++].iov_len = 8 - c->sent;
            if (o->req) {
                iov[niov].iov_base = zeros;
                iov[niov++].iov_len = o->req;
            }
        } else {
            iov[niov].iov_base = zeros;
            iov[niov++].iov_len = total - c->sent;
        }
        struct msghdr mh = {.msg_iov = iov, .msg_iovlen = (size_t)niov};
        ssize_t w = sendmsg(c->fd, &mh, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
            return -1;
        }
        c->sent += (uint64_t)w;
    }
    return 1;
}

/* Reads the response; 1 when complete, 0 when more is due, -1 on error/EOF. */
static int recv_response(struct cconn *c, struct opts *o) {
    static uint8_t buf[65536];
    while (c->got < o->resp) {
        ssize_t r = recv(c->fd, buf, sizeof buf, 0);
        if (r > 0) {
            c->got += (uint64_t)r;
            continue;
        }
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return 0;
        return -1;
    }
    return 1;
}

static void begin_request(struct cconn *c, struct opts *o, uint64_t t) {
    uint32_t rq = htonl(o->req), rs = htonl(o->resp);
    memcpy(c->reqbuf, &rq, 4);
    memcpy(c->reqbuf + 4, &rs, 4);
    c->sent = 0;
    c->got = 0;
    c->t_start = t;
    c->state = 2;
}

static void watch(int ep, struct cconn *c, int op, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    epoll_ctl(ep, op, c->fd, &ev);
}

/* Blocking-ish connect of one persistent connection (used by rr before the clock starts). */
static int connect_wait(struct sockaddr_in *sa, int timeout_ms) {
    int fd = start_connect(sa);
    if (fd < 0) return -1;
    struct pollfd p = {.fd = fd, .events = POLLOUT};
    if (poll(&p, 1, timeout_ms) != 1) {
        close(fd);
        return -1;
    }
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) {
        close(fd);
        errno = err;
        return -1;
    }
    return fd;
}

/* rr: persistent connections; closed loop (rate 0) or open loop at a fixed rate. */
static int run_rr(struct opts *o) {
    struct sockaddr_in sa = target(o);
    struct cconn *cs = calloc((size_t)o->conns, sizeof *cs);
    int *idle = calloc((size_t)o->conns, sizeof(int));
    struct samples s = {.cap = MAX_SAMPLES};
    s.us = malloc(sizeof(uint32_t) * s.cap);
    if (!cs || !idle || !s.us) die("alloc");
    int ep = epoll_create1(0);
    int nidle = 0;
    for (int i = 0; i < o->conns; i++) {
        cs[i].fd = connect_wait(&sa, 5000);
        if (cs[i].fd < 0) {
            printf("{\"mode\": \"rr\", \"error\": \"connect: %s\"}\n", strerror(errno));
            return 1;
        }
        cs[i].state = 0;
        watch(ep, &cs[i], EPOLL_CTL_ADD, EPOLLIN);
        idle[nidle++] = i;
    }
    int tfd = -1;
    uint64_t t0 = now_ns(), t_end = t0 + (uint64_t)(o->duration * 1e9);
    uint64_t next_due = t0;
    uint64_t scheduled = 0, backlog = 0, max_backlog = 0;
    if (o->rate > 0) {
        tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
        epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &ev);
    }
    uint64_t done = 0, errors = 0;
    /* Queue of scheduled-but-unsent request times (open loop): a ring buffer. */
    size_t qcap = 1u << 20, qh = 0, qt = 0;
    uint64_t *q = o->rate > 0 ? malloc(sizeof(uint64_t) * qcap) : NULL;
    struct epoll_event evs[MAX_EVENTS];
    int alive = o->conns;
    for (;;) {
        uint64_t t = now_ns();
        if (t >= t_end || alive == 0) break;
        if (o->rate > 0) {
            while (next_due <= t && next_due < t_end) {
                if (qt - qh < qcap) q[qt++ % qcap] = next_due;
                scheduled++;
                next_due = t0 + (uint64_t)((double)scheduled * 1e9 / o->rate);
            }
            while (qt > qh && nidle > 0) {
                struct cconn *c = &cs[idle[--nidle]];
                begin_request(c, o, q[qh++ % qcap]);
                int r = send_request(c, o);
                if (r < 0) { c->state = 4; alive--; errors++; close(c->fd); continue; }
                if (r == 0) watch(ep, c, EPOLL_CTL_MOD, EPOLLIN | EPOLLOUT);
                else c->state = 3;
            }
            backlog = qt - qh;
            if (backlog > max_backlog) max_backlog = backlog;
            struct itimerspec its = {0};
            uint64_t due = next_due < t_end ? next_due : t_end;
            its.it_value.tv_sec = (time_t)(due / 1000000000ull);
            its.it_value.tv_nsec = (long)(due % 1000000000ull);
            timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);
        } else {
            while (nidle > 0) {
                struct cconn *c = &cs[idle[--nidle]];
                begin_request(c, o, now_ns());
                int r = send_request(c, o);
                if (r < 0) { c->state = 4; alive--; errors++; close(c->fd); continue; }
                if (r == 0) watch(ep, c, EPOLL_CTL_MOD, EPOLLIN | EPOLLOUT);
                else c->state = 3;
            }
        }
        uint64_t left_ms = (t_end - t) / 1000000ull + 1;
        int n = epoll_wait(ep, evs, MAX_EVENTS, (int)(left_ms > 1000 ? 1000 : left_ms));
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            struct cconn *c = evs[i].data.ptr;
            if (c == NULL) {
                uint64_t exp;
                while (read(tfd, &exp, sizeof exp) > 0) {}
                continue;
            }
            if (c->state == 4) continue;
            int r = 1;
            if (c->state == 2 && (evs[i].events & EPOLLOUT)) {
                r = send_request(c, o);
                if (r == 1) {
                    c->state = 3;
                    watch(ep, c, EPOLL_CTL_MOD, EPOLLIN);
                }
            }
            if (r >= 0 && c->state == 3 && (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))) {
                r = recv_response(c, o);
                if (r == 1) {
                    sample_add(&s, now_ns() - c->t_start);
                    done++;
                    c->state = 0;
                    idle[nidle++] = (int)(c - cs);
                }
            } else if (r >= 0 && c->state == 0 && (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))) {
                r = -1;  /* data or EOF on an idle connection: the path broke it */
            }
            if (r < 0) {
                c->state = 4;
                alive--;
                errors++;
                epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                close(c->fd);
            }
        }
    }
    double secs = (double)(now_ns() - t0) / 1e9;
    printf("{\"mode\": \"rr\", \"conns\": %d, \"rate_target\": %.1f, \"duration_s\": %.3f, "
           "\"requests\": %llu, \"errors\": %llu, \"rps\": %.1f, \"scheduled\": %llu, "
           "\"unsent_at_end\": %llu, \"max_backlog\": %llu, \"req_bytes\": %u, "
           "\"resp_bytes\": %u, ",
           o->conns, o->rate, secs, (unsigned long long)done, (unsigned long long)errors,
           done / secs, (unsigned long long)scheduled, (unsigned long long)backlog,
           (unsigned long long)max_backlog, o->req, o->resp);
    print_latency(&s);
    printf("}\n");
    for (int i = 0; i < o->conns; i++)
        if (cs[i].state != 4) close(cs[i].fd);
    return 0;
}

/* cps: connect, one request, answer, close; `conns` workers at a time. */
static int run_cps(struct opts *o) {
    struct sockaddr_in sa = target(o);
    struct cconn *cs = calloc((size_t)o->conns, sizeof *cs);
    struct samples s = {.cap = MAX_SAMPLES};
    s.us = malloc(sizeof(uint32_t) * s.cap);
    if (!cs || !s.us) die("alloc");
    int ep = epoll_create1(0);
    uint64_t t0 = now_ns(), t_end = t0 + (uint64_t)(o->duration * 1e9);
    uint64_t done = 0, errors = 0, connect_errors = 0;
    for (int i = 0; i < o->conns; i++) cs[i].state = 0;
    struct epoll_event evs[MAX_EVENTS];
    int active = 0;
    for (;;) {
        uint64_t t = now_ns();
        int stopping = t >= t_end;
        if (!stopping) {
            for (int i = 0; i < o->conns; i++) {
                struct cconn *c = &cs[i];
                if (c->state != 0) continue;
                c->fd = start_connect(&sa);
                if (c->fd < 0) {
                    connect_errors++;
                    continue;
                }
                begin_request(c, o, now_ns());
                c->state = 1;
                watch(ep, c, EPOLL_CTL_ADD, EPOLLOUT);
                active++;
            }
        }
        if (active == 0 && stopping) break;
        /* Give workers in flight at the end up to one second to finish. */
        if (stopping && t > t_end + 1000000000ull) break;
        int n = epoll_wait(ep, evs, MAX_EVENTS, 100);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            struct cconn *c = evs[i].data.ptr;
            int r = 0;
            if (c->state == 1) {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err) {
                    r = -1;
                    connect_errors++;
                } else {
                    c->state = 2;
                }
            }
            if (r == 0 && c->state == 2) {
                r = send_request(c, o);
                if (r == 1) {
                    c->state = 3;
                    watch(ep, c, EPOLL_CTL_MOD, EPOLLIN);
                    r = 0;
                } else if (r == 0) {
                    watch(ep, c, EPOLL_CTL_MOD, EPOLLOUT);
                }
            }
            if (r == 0 && c->state == 3 && (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))) {
                r = recv_response(c, o);
                if (r == 1) {
                    sample_add(&s, now_ns() - c->t_start);
                    done++;
                }
            }
            if (r != 0) {
                if (r < 0) errors++;
                epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                close(c->fd);
                c->state = 0;
                active--;
            }
        }
    }
    for (int i = 0; i < o->conns; i++)
        if (cs[i].state != 0) close(cs[i].fd);
    double secs = (double)(now_ns() - t0) / 1e9;
    double run = o->duration < secs ? o->duration : secs;
    printf("{\"mode\": \"cps\", \"conns\": %d, \"duration_s\": %.3f, \"connections\": %llu, "
           "\"errors\": %llu, \"connect_errors\": %llu, \"cps\": %.1f, ",
           o->conns, secs, (unsigned long long)done, (unsigned long long)errors,
           (unsigned long long)connect_errors, done / run);
    print_latency(&s);
    printf("}\n");
    return 0;
}

/* hold: many idle connections, each with one request answered. */
static int run_hold(struct opts *o) {
    struct sockaddr_in sa = target(o);
    struct cconn *cs = calloc((size_t)o->conns, sizeof *cs);
    if (!cs) die("alloc");
    int ep = epoll_create1(0);
    const int window = 256;  /* connections being set up at a time */
    int next = 0, inflight = 0, opened = 0, failed = 0;
    uint64_t t0 = now_ns(), deadline = t0 + (uint64_t)(o->setup * 1e9);
    struct epoll_event evs[MAX_EVENTS];
    while ((next < o->conns || inflight > 0) && now_ns() < deadline) {
        while (next < o->conns && inflight < window) {
            struct cconn *c = &cs[next++];
            c->fd = start_connect(&sa);
            if (c->fd < 0) {
                c->state = 4;
                failed++;
                continue;
            }
            begin_request(c, o, now_ns());
            c->state = 1;
            watch(ep, c, EPOLL_CTL_ADD, EPOLLOUT);
            inflight++;
        }
        int n = epoll_wait(ep, evs, MAX_EVENTS, 100);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            struct cconn *c = evs[i].data.ptr;
            int r = 0;
            if (c->state == 1) {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err) r = -1;
                else c->state = 2;
            }
            if (r == 0 && c->state == 2) {
                r = send_request(c, o);
                if (r == 1) {
                    c->state = 3;
                    watch(ep, c, EPOLL_CTL_MOD, EPOLLIN);
                    r = 0;
                } else if (r == 0) {
                    watch(ep, c, EPOLL_CTL_MOD, EPOLLOUT);
                }
            }
            if (r == 0 && c->state == 3 && (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))) {
                r = recv_response(c, o);
                if (r == 1) {
                    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                    c->state = 0;  /* open and idle */
                    opened++;
                    inflight--;
                    r = 0;
                }
            }
            if (r < 0) {
                epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                close(c->fd);
                c->state = 4;
                failed++;
                inflight--;
            }
        }
    }
    double setup = (double)(now_ns() - t0) / 1e9;
    printf("{\"mode\": \"hold\", \"opened\": %d, \"failed\": %d, \"setup_s\": %.3f}\n", opened,
           o->conns - opened, setup);
    fflush(stdout);
    /* Hold until stdin closes (the orchestrator has measured) or the hold time passes. */
    struct pollfd p = {.fd = 0, .events = POLLIN};
    uint64_t until = now_ns() + (uint64_t)(o->hold * 1e9);
    char tmp[256];
    while (now_ns() < until) {
        int left = (int)((until - now_ns()) / 1000000ull) + 1;
        int r = poll(&p, 1, left > 1000 ? 1000 : left);
        if (r > 0) {
            ssize_t k = read(0, tmp, sizeof tmp);
            if (k <= 0) break;
        }
    }
    int still = 0;
    for (int i = 0; i < o->conns; i++) {
        if (cs[i].state == 0) {
            char b;
            if (recv(cs[i].fd, &b, 1, MSG_DONTWAIT) == -1 && errno == EAGAIN) still++;
        }
        if (cs[i].state != 4 && cs[i].fd > 0) close(cs[i].fd);
    }
    printf("{\"mode\": \"hold\", \"still_open\": %d}\n", still);
    return 0;
}

int main(int argc, char **argv) {
    struct opts o = parse(argc, argv);
    raise_nofile();
    signal(SIGPIPE, SIG_IGN);
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (!strcmp(o.mode, "server")) return run_server(&o);
    if (!strcmp(o.mode, "rr")) return run_rr(&o);
    if (!strcmp(o.mode, "cps")) return run_cps(&o);
    if (!strcmp(o.mode, "hold")) return run_hold(&o);
    usage();
    return 2;
}
