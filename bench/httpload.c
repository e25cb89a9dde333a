/* zbench-httpload: the HTTP/1.1 load generator of the L7 benchmark (waypoint vs nginx vs
 * HAProxy). C so that the client is never the bottleneck; compiled at run time by
 * `bench.l7` with `gcc -O2`. Prints one JSON object; bounded by its duration.
 *
 *   httpload --host H --port P --conns C --duration S [--path /x] [--authority A]
 *
 * Closed loop: each of C keep-alive connections keeps one GET in flight; the response must
 * carry Content-Length. Latency is measured per request (send -> last byte of the answer).
 * A connection that breaks is reopened and counted as an error.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONNS 1024
#define MAX_SAMPLES (4u * 1024u * 1024u)
#define BUF 65536

struct conn {
    int fd;
    uint64_t sent_at;
    size_t have;
    char buf[BUF];
};

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static struct sockaddr_in addr;
static char request[1024];
static size_t request_len;
static uint32_t *samples;
static size_t nsamples;
static uint64_t errors;

static int open_conn(int ep, struct conn *c) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        close(fd);
        return -1;
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL, 0) | O_NONBLOCK);
    c->fd = fd;
    c->have = 0;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    return 0;
}

static int send_request(struct conn *c) {
    c->sent_at = now_ns();
    c->have = 0;
    ssize_t n = write(c->fd, request, request_len);
    return n == (ssize_t)request_len ? 0 : -1;
}

/* Returns 1 when a whole response is in the buffer, 0 when more is needed, -1 on error. */
static int response_complete(struct conn *c) {
    c->buf[c->have < BUF ? c->have : BUF - 1] = 0;
    char *end = strstr(c->buf, "\r\n\r\n");
    if (!end) return c->have >= BUF - 1 ? -1 : 0;
    char *cl = strcasestr(c->buf, "\ncontent-length:");
    if (!cl || cl > end) return -1;
    long len = strtol(cl + 16, NULL, 10);
    size_t total = (size_t)(end + 4 - c->buf) + (size_t)len;
    if (total > BUF - 1) return -1;
    return c->have >= total ? 1 : 0;
}

static int cmp(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* Quantile of the sorted samples (nanoseconds) in microseconds. */
static double pct(double q) {
    if (!nsamples) return 0;
    size_t i = (size_t)(q * (double)(nsamples - 1));
    return samples[i] / 1000.0;
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1", *path = "/", *authority = NULL;
    int port = 80, conns = 1;
    double duration = 1.0;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--host")) host = argv[i + 1];
        else if (!strcmp(argv[i], "--port")) port = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--conns")) conns = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--duration")) duration = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--path")) path = argv[i + 1];
        else if (!strcmp(argv[i], "--authority")) authority = argv[i + 1];
    }
    if (conns < 1 || conns > MAX_CONNS || duration <= 0 || duration > 600) {
        fprintf(stderr, "httpload: bad arguments\n");
        return 2;
    }
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
        fprintf(stderr, "httpload: bad host %s\n", host);
        return 2;
    }
    request_len = (size_t)snprintf(request, sizeof request,
                                   "GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: zbench-httpload\r\n\r\n",
                                   path, authority ? authority : host);
    samples = calloc(MAX_SAMPLES, sizeof *samples);
    struct conn *cs = calloc((size_t)conns, sizeof *cs);
    int ep = epoll_create1(0);
    if (!samples || !cs || ep < 0) return 2;
    for (int i = 0; i < conns; i++) {
        if (open_conn(ep, &cs[i]) < 0 || send_request(&cs[i]) < 0) {
            fprintf(stderr, "httpload: connect to %s:%d failed: %s\n", host, port, strerror(errno));
            return 1;
        }
    }
    uint64_t start = now_ns(), stop = start + (uint64_t)(duration * 1e9);
    uint64_t done = 0;
    struct epoll_event evs[256];
    while (now_ns() < stop) {
        int n = epoll_wait(ep, evs, 256, 100);
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            ssize_t got = read(c->fd, c->buf + c->have, BUF - 1 - c->have);
            int state = got > 0 ? (c->have += (size_t)got, response_complete(c)) : -1;
            if (got < 0 && errno == EAGAIN) continue;
            if (state == 0) continue;
            if (state == 1) {
                uint64_t lat = now_ns() - c->sent_at;
                if (nsamples < MAX_SAMPLES) samples[nsamples++] = (uint32_t)(lat > UINT32_MAX ? UINT32_MAX : lat);
                done++;
                if (send_request(c) == 0) continue;
            }
            errors++;
            epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
            close(c->fd);
            if (open_conn(ep, c) < 0 || send_request(c) < 0) {
                fprintf(stderr, "httpload: reconnect failed: %s\n", strerror(errno));
                return 1;
            }
        }
    }
    double secs = (double)(now_ns() - start) / 1e9;
    qsort(samples, nsamples, sizeof *samples, cmp);
    printf("{\"requests\": %llu, \"errors\": %llu, \"seconds\": %.3f, \"rps\": %.1f, "
           "\"latency_us\": {\"p50\": %.1f, \"p90\": %.1f, \"p99\": %.1f}}\n",
           (unsigned long long)done, (unsigned long long)errors, secs, (double)done / secs,
           pct(0.50), pct(0.90), pct(0.99));
    return 0;
}
