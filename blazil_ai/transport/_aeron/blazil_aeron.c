/*
 * Blazil AI's native layer over Aeron's C client (aeronc.h): the hot paths that would drown in Python overhead.
 *
 * - offers: one frame from an iovec list (numpy buffers offered in place), many small frames in one call,
 *   and frames longer than one Aeron message sent as a sequence of chunks that the subscriber reassembles;
 * - polls: fragments reassembled by Aeron's fragment assembler, chunk sequences by us, whole frames gathered
 *   into one batch that Python reads after the call;
 * - waits: backing-off loops that run with the GIL released (cffi releases it around every call) and notice
 *   a dead media driver quickly (its pid is watched, besides Aeron's own keepalive timeout);
 * - an error handler that records errors instead of exiting the process (Aeron's default one calls exit()).
 */
#include "blazil_aeron.h"

#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define BLZ_FRAME_MAGIC 0x4D5A4C42u /* "BLZM" read as little-endian uint32 */
#define BLZ_CHUNK_MAGIC 0x435A4C42u /* "BLZC" */
#define BLZ_FRAME_HEADER 20
#define BLZ_CHUNK_HEADER 16
#define BLZ_MAX_PARTIALS 64
#define BLZ_PID_CHECK_NS (100LL * 1000 * 1000)
#define BLZ_CHUNK_FINISH_NS (10LL * 1000 * 1000 * 1000)

struct blz_client_stct
{
    aeron_context_t *ctx;
    aeron_t *aeron;
    pthread_mutex_t error_lock;
    pthread_mutex_t send_lock; /* a chunk sequence must not interleave with other frames of the same session */
    char last_error[1024];
    int last_errcode;
    int fatal;
    int driver_gone;
    int64_t driver_pid;
    int64_t next_pid_check_ns;
};

/* IPC doorbell: a futex word in a small shared file in the driver directory, one per stream. Aeron's IPC has
 * no wake-up: a subscriber polls. Publications ring the bell after they write, and a subscriber that found
 * nothing sleeps on it, so a message wakes it at once instead of at the end of its next park, which on a
 * crowded host is the difference between microseconds and a scheduler time slice. */
typedef struct
{
    uint32_t seq;
    uint32_t waiters;
}
blz_doorbell_t;

#define BLZ_DOORBELL_MAP 4096
#define BLZ_DOORBELL_WAIT_NS (100LL * 1000 * 1000) /* a sleeper still wakes this often to check the driver */

static blz_doorbell_t *blz_doorbell_map(const char *path)
{
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0)
    {
        return NULL;
    }
    void *m = MAP_FAILED;
    if (ftruncate(fd, BLZ_DOORBELL_MAP) == 0)
    {
        m = mmap(NULL, BLZ_DOORBELL_MAP, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    }
    close(fd);
    return m == MAP_FAILED ? NULL : (blz_doorbell_t *)m;
}

static void blz_doorbell_unmap(blz_doorbell_t *d)
{
    if (d)
    {
        munmap(d, BLZ_DOORBELL_MAP);
    }
}

static void blz_ring(blz_doorbell_t *d)
{
    if (NULL == d)
    {
        return;
    }
    __atomic_add_fetch(&d->seq, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&d->waiters, __ATOMIC_SEQ_CST) > 0)
    {
        syscall(SYS_futex, &d->seq, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
    }
}

struct blz_pub_stct
{
    blz_doorbell_t *doorbell;
    blz_client_t *client;
    aeron_publication_t *pub;
    size_t max_message;
};

typedef struct
{
    int active;
    int32_t session_id;
    uint8_t *buf;
    uint64_t total;
    uint64_t filled;
    uint32_t next_index;
}
blz_partial_t;

struct blz_sub_stct
{
    blz_doorbell_t *doorbell;
    blz_client_t *client;
    aeron_subscription_t *sub;
    aeron_fragment_assembler_t *assembler;
    uint8_t *arena;
    size_t arena_cap;
    size_t arena_used;
    blz_msg_t *msgs;
    size_t n_msgs;
    size_t cap_msgs;
    int alloc_failed;
    uint64_t max_size;
    uint64_t dropped;
    blz_partial_t partials[BLZ_MAX_PARTIALS];
};

static int64_t blz_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int64_t blz_deadline(int64_t timeout_ms)
{
    if (timeout_ms < 0)
    {
        return INT64_MAX;
    }
    return blz_now_ns() + timeout_ms * 1000000LL;
}

/* A backoff idle strategy after Aeron's: spin (polls), yield, then park with a doubling sleep. Parks stay short
 * (<= short_park_ns) for the first short_phase_ns of a wait, when a reply is most likely, then grow to 1 ms,
 * so a long-idle waiter costs almost nothing. On a crowded host spinning and yielding hand the core to other
 * work for a whole time slice, while a short sleep is woken promptly: hence few spins, many short parks.
 * BLAZIL_AERON_IDLE="spins,yields,short_park_ns,short_phase_ns" overrides the defaults. */
typedef struct
{
    int spins;
    int yields;
    long park_ns;
    int64_t started_ns;
}
blz_idle_t;

static int blz_cfg_spins = 100;
static int blz_cfg_yields = 0;
static long blz_cfg_short_park_ns = 20000;
static int64_t blz_cfg_short_phase_ns = 5000000;
/* A subscriber that waits polls without a pause for this long before it sleeps on the doorbell: a reply that
 * comes within it is seen in well under a microsecond, with no system call on either side. Polling shared
 * memory takes no lock the publisher needs, so unlike a socket the spin costs the sender nothing.
 * BLAZIL_AERON_SPIN_US overrides it (0 = sleep at once). */
static int64_t blz_cfg_spin_ns = 100000;

static inline void blz_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}
static pthread_once_t blz_cfg_once = PTHREAD_ONCE_INIT;
static __thread int blz_slack_set = 0;

static void blz_cfg_load(void)
{
    const char *spin = getenv("BLAZIL_AERON_SPIN_US");
    if (spin)
    {
        char *end = NULL;
        double us = strtod(spin, &end);
        if (end != spin && us >= 0 && us <= 1e6)
        {
            blz_cfg_spin_ns = (int64_t)(us * 1000);
        }
    }
    const char *v = getenv("BLAZIL_AERON_IDLE");
    if (v)
    {
        long long a, b, c, d;
        if (sscanf(v, "%lld,%lld,%lld,%lld", &a, &b, &c, &d) == 4 && a >= 0 && b >= 0 && c >= 1000 && d >= 0)
        {
            blz_cfg_spins = (int)a;
            blz_cfg_yields = (int)b;
            blz_cfg_short_park_ns = (long)c;
            blz_cfg_short_phase_ns = d;
        }
    }
}

static void blz_idle_reset(blz_idle_t *s)
{
    if (!blz_slack_set)
    {
        /* The default 50 us timer slack would turn every short park into a 50 us sleep: a waiting thread
         * would answer a message tens of microseconds late. */
        prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);
        pthread_once(&blz_cfg_once, blz_cfg_load);
        blz_slack_set = 1;
    }
    s->spins = 0;
    s->yields = 0;
    s->park_ns = 1000;
    s->started_ns = 0;
}

static void blz_idle(blz_idle_t *s)
{
    if (s->spins < blz_cfg_spins)
    {
        s->spins++;
        return;
    }
    if (s->yields < blz_cfg_yields)
    {
        s->yields++;
        sched_yield();
        return;
    }
    int64_t now = blz_now_ns();
    if (s->started_ns == 0)
    {
        s->started_ns = now;
    }
    struct timespec ts = { 0, s->park_ns };
    nanosleep(&ts, NULL);
    long cap = now - s->started_ns < blz_cfg_short_phase_ns ? blz_cfg_short_park_ns : 1000000;
    s->park_ns = s->park_ns * 2 > cap ? cap : s->park_ns * 2;
}

static void blz_copy_error(char *err, size_t errlen, const char *prefix)
{
    if (err && errlen)
    {
        snprintf(err, errlen, "%s: %s", prefix, aeron_errmsg());
    }
}

static void blz_set_error(blz_client_t *c, int errcode, const char *message)
{
    pthread_mutex_lock(&c->error_lock);
    snprintf(c->last_error, sizeof(c->last_error), "%s", message ? message : "");
    c->last_errcode = errcode;
    pthread_mutex_unlock(&c->error_lock);
}

/* Runs on the client conductor thread. Never exits: it records the error; timeouts mark the client dead. */
static void blz_error_handler(void *clientd, int errcode, const char *message)
{
    blz_client_t *c = (blz_client_t *)clientd;
    blz_set_error(c, errcode, message);
    if (errcode == AERON_CLIENT_ERROR_DRIVER_TIMEOUT || errcode == AERON_CLIENT_ERROR_CLIENT_TIMEOUT ||
        errcode == AERON_CLIENT_ERROR_CONDUCTOR_SERVICE_TIMEOUT)
    {
        __atomic_store_n(&c->fatal, 1, __ATOMIC_RELEASE);
    }
}

/* 1 while the process lives and is not a zombie (a killed child stays a zombie until its parent reaps it). */
static int blz_pid_alive(int64_t pid)
{
    char path[64];
    snprintf(path, sizeof(path), "/proc/%lld/stat", (long long)pid);
    FILE *f = fopen(path, "r");
    if (NULL == f)
    {
        return 0;
    }
    char buf[512];
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    char *p = strrchr(buf, ')');
    if (NULL == p || p[1] == '\0' || p[2] == '\0')
    {
        return 1;
    }
    char state = p[2];
    return !(state == 'Z' || state == 'X' || state == 'x');
}

/* Whether pid is a media driver as seen from here: a pid from another pid namespace could name anything. */
static int blz_pid_is_driver(int64_t pid)
{
    char path[64];
    snprintf(path, sizeof(path), "/proc/%lld/cmdline", (long long)pid);
    FILE *f = fopen(path, "r");
    if (NULL == f)
    {
        return 0;
    }
    char buf[4096];
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    for (size_t i = 0; i < n; i++)
    {
        if (buf[i] == '\0')
        {
            buf[i] = ' ';
        }
    }
    buf[n] = '\0';
    return strstr(buf, "aeron") != NULL || strstr(buf, "Aeron") != NULL;
}

int blz_client_check(blz_client_t *c)
{
    if (__atomic_load_n(&c->driver_gone, __ATOMIC_ACQUIRE))
    {
        return BLZ_DRIVER_GONE;
    }
    if (__atomic_load_n(&c->fatal, __ATOMIC_ACQUIRE) || aeron_is_closed(c->aeron))
    {
        __atomic_store_n(&c->driver_gone, 1, __ATOMIC_RELEASE);
        return BLZ_DRIVER_GONE;
    }
    if (c->driver_pid > 0)
    {
        int64_t now = blz_now_ns();
        if (now >= __atomic_load_n(&c->next_pid_check_ns, __ATOMIC_RELAXED))
        {
            __atomic_store_n(&c->next_pid_check_ns, now + BLZ_PID_CHECK_NS, __ATOMIC_RELAXED);
            if (!blz_pid_alive(c->driver_pid))
            {
                char msg[128];
                snprintf(msg, sizeof(msg), "the media driver (pid %lld) has exited", (long long)c->driver_pid);
                blz_set_error(c, BLZ_DRIVER_GONE, msg);
                __atomic_store_n(&c->driver_gone, 1, __ATOMIC_RELEASE);
                return BLZ_DRIVER_GONE;
            }
        }
    }
    return 0;
}

int blz_client_last_error(blz_client_t *c, char *buf, size_t len)
{
    pthread_mutex_lock(&c->error_lock);
    snprintf(buf, len, "%s", c->last_error);
    int code = c->last_errcode;
    pthread_mutex_unlock(&c->error_lock);
    return code;
}

int64_t blz_client_driver_pid(blz_client_t *c)
{
    return c->driver_pid;
}

const char *blz_aeron_version(void)
{
    return aeron_version_text();
}

blz_client_t *blz_client_open(const char *dir, int64_t driver_timeout_ms, char *err, size_t errlen)
{
    blz_client_t *c = calloc(1, sizeof(blz_client_t));
    if (NULL == c)
    {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    pthread_mutex_init(&c->error_lock, NULL);
    pthread_mutex_init(&c->send_lock, NULL);
    if (aeron_context_init(&c->ctx) < 0)
    {
        blz_copy_error(err, errlen, "aeron_context_init");
        goto fail;
    }
    if (dir && dir[0])
    {
        aeron_context_set_dir(c->ctx, dir);
    }
    if (driver_timeout_ms > 0)
    {
        aeron_context_set_driver_timeout_ms(c->ctx, (uint64_t)driver_timeout_ms);
    }
    aeron_context_set_client_name(c->ctx, "blazil-ai");
    aeron_context_set_error_handler(c->ctx, blz_error_handler, c);
    if (aeron_init(&c->aeron, c->ctx) < 0)
    {
        blz_copy_error(err, errlen, "cannot connect to the media driver");
        aeron_context_close(c->ctx);
        goto fail;
    }
    if (aeron_start(c->aeron) < 0)
    {
        blz_copy_error(err, errlen, "aeron_start");
        aeron_close(c->aeron);
        aeron_context_close(c->ctx);
        goto fail;
    }
    aeron_cnc_t *cnc = NULL;
    if (aeron_cnc_init(&cnc, aeron_context_get_dir(c->ctx), 0) == 0)
    {
        aeron_cnc_constants_t k;
        /* watch the pid only if this process sees that pid as a media driver (same pid namespace) */
        if (aeron_cnc_constants(cnc, &k) == 0 && k.pid > 0 && blz_pid_alive(k.pid) && blz_pid_is_driver(k.pid))
        {
            c->driver_pid = k.pid;
        }
        aeron_cnc_close(cnc);
    }
    return c;

fail:
    pthread_mutex_destroy(&c->error_lock);
    pthread_mutex_destroy(&c->send_lock);
    free(c);
    return NULL;
}

void blz_client_close(blz_client_t *c)
{
    if (NULL == c)
    {
        return;
    }
    aeron_close(c->aeron);
    aeron_context_close(c->ctx);
    pthread_mutex_destroy(&c->error_lock);
    pthread_mutex_destroy(&c->send_lock);
    free(c);
}

/* ---------------------------------------------------------------------------------------------- publications */

blz_pub_t *blz_pub_open(blz_client_t *c, const char *channel, int32_t stream_id, int64_t timeout_ms,
    char *err, size_t errlen)
{
    aeron_async_add_publication_t *async = NULL;
    aeron_publication_t *pub = NULL;
    if (blz_client_check(c))
    {
        snprintf(err, errlen, "the media driver is gone");
        return NULL;
    }
    if (aeron_async_add_publication(&async, c->aeron, channel, stream_id) < 0)
    {
        blz_copy_error(err, errlen, "cannot add publication");
        return NULL;
    }
    int64_t deadline = blz_deadline(timeout_ms);
    for (;;)
    {
        int r = aeron_async_add_publication_poll(&pub, async);
        if (r > 0)
        {
            break;
        }
        if (r < 0)
        {
            blz_copy_error(err, errlen, "the media driver refused the publication");
            return NULL;
        }
        if (blz_client_check(c) || blz_now_ns() > deadline)
        {
            aeron_async_add_publication_cancel(c->aeron, async);
            snprintf(err, errlen, "the media driver did not answer within %lld ms", (long long)timeout_ms);
            return NULL;
        }
        struct timespec ts = { 0, 1000000 };
        nanosleep(&ts, NULL);
    }
    blz_pub_t *p = calloc(1, sizeof(blz_pub_t));
    if (NULL == p)
    {
        aeron_publication_close(pub, NULL, NULL);
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    aeron_publication_constants_t k;
    aeron_publication_constants(pub, &k);
    p->client = c;
    p->pub = pub;
    p->max_message = k.max_message_length;
    return p;
}

void blz_pub_close(blz_pub_t *p)
{
    if (NULL == p)
    {
        return;
    }
    aeron_publication_close(p->pub, NULL, NULL);
    blz_doorbell_unmap(p->doorbell);
    free(p);
}

int blz_pub_set_doorbell(blz_pub_t *p, const char *path)
{
    p->doorbell = blz_doorbell_map(path);
    return p->doorbell ? 0 : -1;
}

int blz_pub_is_connected(blz_pub_t *p)
{
    return aeron_publication_is_connected(p->pub) ? 1 : 0;
}

int64_t blz_pub_max_message(blz_pub_t *p)
{
    return (int64_t)p->max_message;
}

int32_t blz_pub_session_id(blz_pub_t *p)
{
    aeron_publication_constants_t k;
    aeron_publication_constants(p->pub, &k);
    return k.session_id;
}

/* Offer until accepted, refused for good, or the deadline passes; NOT_CONNECTED waits only if asked. */
static int64_t blz_offer_wait(blz_pub_t *p, aeron_iovec_t *iov, size_t n, int64_t deadline_ns, int wait_connect)
{
    blz_idle_t idle;
    blz_idle_reset(&idle);
    int rang = 0;
    for (;;)
    {
        int64_t r = aeron_publication_offerv(p->pub, iov, n, NULL, NULL);
        if (r >= 0)
        {
            blz_ring(p->doorbell);
            return r;
        }
        if (r == AERON_PUBLICATION_ADMIN_ACTION)
        {
            continue;
        }
        int gone = blz_client_check(p->client);
        if (gone)
        {
            return gone;
        }
        if (r != AERON_PUBLICATION_BACK_PRESSURED && !(r == AERON_PUBLICATION_NOT_CONNECTED && wait_connect))
        {
            return r;
        }
        if (blz_now_ns() >= deadline_ns)
        {
            return r;
        }
        if (!rang)
        {
            blz_ring(p->doorbell); /* whatever went before may be what the subscriber must drain first */
            rang = 1;
        }
        blz_idle(&idle);
    }
}

/* A frame longer than one Aeron message goes as chunks: "BLZC", index u32, total u64, then a slice of the frame.
 * Once the first chunk is in, the rest follow (waiting out back pressure up to 10 s more): a partial sequence is only
 * left behind if the subscriber stalls (10 s) or goes away, or the driver does, and the subscriber drops it when the next frame starts. */
static int64_t blz_offer_chunked(blz_pub_t *p, aeron_iovec_t *iov, size_t n, size_t total, int64_t deadline_ns,
    int wait_connect)
{
    size_t chunk = p->max_message - BLZ_CHUNK_HEADER;
    aeron_iovec_t *civ = malloc(sizeof(aeron_iovec_t) * (n + 1));
    if (NULL == civ)
    {
        return AERON_PUBLICATION_ERROR;
    }
    uint8_t hdr[BLZ_CHUNK_HEADER];
    uint32_t magic = BLZ_CHUNK_MAGIC;
    uint64_t total64 = total;
    memcpy(hdr, &magic, 4);
    memcpy(hdr + 8, &total64, 8);
    size_t vi = 0, voff = 0, sent = 0;
    uint32_t index = 0;
    int64_t r = 0;
    while (sent < total)
    {
        size_t want = total - sent < chunk ? total - sent : chunk;
        memcpy(hdr + 4, &index, 4);
        civ[0].iov_base = hdr;
        civ[0].iov_len = BLZ_CHUNK_HEADER;
        size_t k = 1, got = 0;
        size_t svi = vi, svoff = voff;
        while (got < want)
        {
            size_t avail = iov[svi].iov_len - svoff;
            size_t take = avail < want - got ? avail : want - got;
            if (take > 0)
            {
                civ[k].iov_base = iov[svi].iov_base + svoff;
                civ[k].iov_len = take;
                k++;
            }
            got += take;
            svoff += take;
            if (svoff == iov[svi].iov_len)
            {
                svi++;
                svoff = 0;
            }
        }
        int64_t dl = deadline_ns;
        if (index > 0)
        {
            int64_t finish = blz_now_ns() + BLZ_CHUNK_FINISH_NS;
            dl = dl > finish ? dl : finish;
        }
        r = blz_offer_wait(p, civ, k, dl, index == 0 ? wait_connect : 0);
        if (r < 0)
        {
            break;
        }
        vi = svi;
        voff = svoff;
        sent += want;
        index++;
    }
    free(civ);
    return r;
}

int64_t blz_pub_offerv(blz_pub_t *p, aeron_iovec_t *iov, size_t n, int64_t timeout_ms, int wait_connect)
{
    int gone = blz_client_check(p->client);
    if (gone)
    {
        return gone;
    }
    size_t total = 0;
    for (size_t i = 0; i < n; i++)
    {
        total += iov[i].iov_len;
    }
    int64_t deadline = timeout_ms > 0 ? blz_deadline(timeout_ms) : 0;
    pthread_mutex_lock(&p->client->send_lock);
    int64_t r = total <= p->max_message ? blz_offer_wait(p, iov, n, deadline, wait_connect)
                                        : blz_offer_chunked(p, iov, n, total, deadline, wait_connect);
    pthread_mutex_unlock(&p->client->send_lock);
    return r;
}

int64_t blz_pub_offer_bytes(blz_pub_t *p, const char *buf, size_t len, int64_t timeout_ms, int wait_connect)
{
    aeron_iovec_t one = { (uint8_t *)buf, len };
    return blz_pub_offerv(p, &one, 1, timeout_ms, wait_connect);
}

int64_t blz_pub_offer_many(blz_pub_t *p, const uint8_t *buf, const uint64_t *lens, size_t n, int64_t timeout_ms,
    int wait_connect, size_t *accepted)
{
    *accepted = 0;
    int gone = blz_client_check(p->client);
    if (gone)
    {
        return gone;
    }
    int64_t deadline = timeout_ms > 0 ? blz_deadline(timeout_ms) : 0;
    int64_t r = 0;
    const uint8_t *q = buf;
    pthread_mutex_lock(&p->client->send_lock);
    for (size_t i = 0; i < n; i++)
    {
        size_t len = (size_t)lens[i];
        aeron_iovec_t one = { (uint8_t *)q, len };
        if (len <= p->max_message)
        {
            r = aeron_publication_offer(p->pub, q, len, NULL, NULL);
            if (r < 0)
            {
                r = blz_offer_wait(p, &one, 1, deadline, wait_connect);
            }
        }
        else
        {
            r = blz_offer_chunked(p, &one, 1, len, deadline, wait_connect);
        }
        if (r < 0)
        {
            break;
        }
        q += len;
        (*accepted)++;
    }
    if (*accepted > 0)
    {
        blz_ring(p->doorbell);
    }
    pthread_mutex_unlock(&p->client->send_lock);
    return r;
}

/* ------------------------------------------------------------------------------------------- subscriptions */

static int blz_push(blz_sub_t *s, uint8_t *data, uint64_t len, uint64_t off, int32_t session_id, int owned)
{
    if (s->n_msgs == s->cap_msgs)
    {
        size_t cap = s->cap_msgs ? s->cap_msgs * 2 : 256;
        blz_msg_t *m = realloc(s->msgs, cap * sizeof(blz_msg_t));
        if (NULL == m)
        {
            return -1;
        }
        s->msgs = m;
        s->cap_msgs = cap;
    }
    blz_msg_t *m = &s->msgs[s->n_msgs++];
    m->data = data;
    m->len = len;
    m->offset = off;
    m->session_id = session_id;
    m->owned = owned;
    return 0;
}

static blz_partial_t *blz_partial(blz_sub_t *s, int32_t session_id, int create)
{
    blz_partial_t *free_slot = NULL;
    for (int i = 0; i < BLZ_MAX_PARTIALS; i++)
    {
        blz_partial_t *pp = &s->partials[i];
        if (pp->active && pp->session_id == session_id)
        {
            return pp;
        }
        if (!pp->active && NULL == free_slot)
        {
            free_slot = pp;
        }
    }
    if (create && free_slot)
    {
        free_slot->session_id = session_id;
        return free_slot;
    }
    return NULL;
}

static void blz_partial_drop(blz_sub_t *s, blz_partial_t *pp)
{
    free(pp->buf);
    pp->buf = NULL;
    pp->active = 0;
    s->dropped++;
}

static void blz_on_chunk(blz_sub_t *s, const uint8_t *buf, size_t len, int32_t session_id)
{
    uint32_t index;
    uint64_t total;
    memcpy(&index, buf + 4, 4);
    memcpy(&total, buf + 8, 8);
    const uint8_t *data = buf + BLZ_CHUNK_HEADER;
    size_t n = len - BLZ_CHUNK_HEADER;
    blz_partial_t *pp = blz_partial(s, session_id, index == 0);
    if (index == 0)
    {
        if (NULL == pp)
        {
            s->dropped++;
            return;
        }
        if (pp->active)
        {
            blz_partial_drop(s, pp);
        }
        if (total > s->max_size || total < BLZ_FRAME_HEADER || NULL == (pp->buf = malloc(total)))
        {
            s->dropped++;
            return;
        }
        pp->active = 1;
        pp->session_id = session_id;
        pp->total = total;
        pp->filled = 0;
        pp->next_index = 0;
    }
    if (NULL == pp || !pp->active)
    {
        s->dropped++; /* the middle of a sequence whose start we never saw */
        return;
    }
    if (index != pp->next_index || total != pp->total || pp->filled + n > pp->total)
    {
        blz_partial_drop(s, pp);
        return;
    }
    memcpy(pp->buf + pp->filled, data, n);
    pp->filled += n;
    pp->next_index++;
    if (pp->filled == pp->total)
    {
        if (blz_push(s, pp->buf, pp->total, 0, session_id, 1) < 0)
        {
            free(pp->buf);
            s->alloc_failed = 1;
        }
        pp->buf = NULL;
        pp->active = 0;
    }
}

/* Called with whole Aeron messages (the fragment assembler sits in front). */
static void blz_on_message(void *clientd, const uint8_t *buf, size_t len, aeron_header_t *header)
{
    blz_sub_t *s = (blz_sub_t *)clientd;
    aeron_header_values_t hv;
    aeron_header_values(header, &hv);
    int32_t session_id = hv.frame.session_id;
    uint32_t magic = 0;
    if (len >= 4)
    {
        memcpy(&magic, buf, 4);
    }
    if (magic == BLZ_CHUNK_MAGIC && len >= BLZ_CHUNK_HEADER)
    {
        blz_on_chunk(s, buf, len, session_id);
        return;
    }
    blz_partial_t *pp = blz_partial(s, session_id, 0);
    if (pp)
    {
        blz_partial_drop(s, pp); /* a new frame began before the sequence finished: its sender gave up on it */
    }
    if (magic != BLZ_FRAME_MAGIC || len < BLZ_FRAME_HEADER || len > s->max_size)
    {
        s->dropped++;
        return;
    }
    if (s->arena_used + len > s->arena_cap)
    {
        size_t cap = s->arena_cap ? s->arena_cap : 65536;
        while (cap < s->arena_used + len)
        {
            cap *= 2;
        }
        uint8_t *a = realloc(s->arena, cap);
        if (NULL == a)
        {
            s->alloc_failed = 1;
            return;
        }
        s->arena = a;
        s->arena_cap = cap;
    }
    memcpy(s->arena + s->arena_used, buf, len);
    if (blz_push(s, NULL, len, s->arena_used, session_id, 0) < 0)
    {
        s->alloc_failed = 1;
        return;
    }
    s->arena_used += len;
}

blz_sub_t *blz_sub_open(blz_client_t *c, const char *channel, int32_t stream_id, uint64_t max_size,
    int64_t timeout_ms, char *err, size_t errlen)
{
    aeron_async_add_subscription_t *async = NULL;
    aeron_subscription_t *sub = NULL;
    if (blz_client_check(c))
    {
        snprintf(err, errlen, "the media driver is gone");
        return NULL;
    }
    if (aeron_async_add_subscription(&async, c->aeron, channel, stream_id, NULL, NULL, NULL, NULL) < 0)
    {
        blz_copy_error(err, errlen, "cannot add subscription");
        return NULL;
    }
    int64_t deadline = blz_deadline(timeout_ms);
    for (;;)
    {
        int r = aeron_async_add_subscription_poll(&sub, async);
        if (r > 0)
        {
            break;
        }
        if (r < 0)
        {
            blz_copy_error(err, errlen, "the media driver refused the subscription");
            return NULL;
        }
        if (blz_client_check(c) || blz_now_ns() > deadline)
        {
            aeron_async_add_subscription_cancel(c->aeron, async);
            snprintf(err, errlen, "the media driver did not answer within %lld ms", (long long)timeout_ms);
            return NULL;
        }
        struct timespec ts = { 0, 1000000 };
        nanosleep(&ts, NULL);
    }
    blz_sub_t *s = calloc(1, sizeof(blz_sub_t));
    if (NULL == s)
    {
        aeron_subscription_close(sub, NULL, NULL);
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    s->client = c;
    s->sub = sub;
    s->max_size = max_size;
    if (aeron_fragment_assembler_create(&s->assembler, blz_on_message, s) < 0)
    {
        blz_copy_error(err, errlen, "aeron_fragment_assembler_create");
        aeron_subscription_close(sub, NULL, NULL);
        free(s);
        return NULL;
    }
    return s;
}

static void blz_sub_reset(blz_sub_t *s)
{
    for (size_t i = 0; i < s->n_msgs; i++)
    {
        if (s->msgs[i].owned)
        {
            free(s->msgs[i].data);
        }
    }
    s->n_msgs = 0;
    s->arena_used = 0;
    s->alloc_failed = 0;
}

void blz_sub_close(blz_sub_t *s)
{
    if (NULL == s)
    {
        return;
    }
    blz_sub_reset(s);
    aeron_subscription_close(s->sub, NULL, NULL);
    aeron_fragment_assembler_delete(s->assembler);
    blz_doorbell_unmap(s->doorbell);
    for (int i = 0; i < BLZ_MAX_PARTIALS; i++)
    {
        free(s->partials[i].buf);
    }
    free(s->msgs);
    free(s->arena);
    free(s);
}

int blz_sub_poll(blz_sub_t *s, int fragment_limit)
{
    blz_sub_reset(s);
    int gone = blz_client_check(s->client);
    if (gone)
    {
        return gone;
    }
    int r = aeron_subscription_poll(s->sub, aeron_fragment_assembler_handler, s->assembler, (size_t)fragment_limit);
    if (r < 0)
    {
        return BLZ_POLL_ERROR;
    }
    for (size_t i = 0; i < s->n_msgs; i++)
    {
        if (!s->msgs[i].owned)
        {
            s->msgs[i].data = s->arena + s->msgs[i].offset;
        }
    }
    if (s->alloc_failed && s->n_msgs == 0)
    {
        return BLZ_NO_MEMORY;
    }
    return (int)s->n_msgs;
}

int blz_sub_set_doorbell(blz_sub_t *s, const char *path)
{
    s->doorbell = blz_doorbell_map(path);
    return s->doorbell ? 0 : -1;
}

int blz_sub_wait(blz_sub_t *s, int fragment_limit, int64_t timeout_ms)
{
    int64_t deadline = blz_deadline(timeout_ms);
    blz_idle_t idle;
    blz_idle_reset(&idle);
    int64_t spin_until = blz_now_ns() + blz_cfg_spin_ns;
    for (;;)
    {
        int r = blz_sub_poll(s, fragment_limit);
        int64_t now = blz_now_ns();
        if (r != 0 || now >= deadline)
        {
            return r;
        }
        if (now < spin_until)
        {
            blz_cpu_relax();
            continue;
        }
        if (s->doorbell && idle.spins >= blz_cfg_spins)
        {
            blz_doorbell_t *d = s->doorbell;
            /* register, read the bell, poll once more, sleep only if the bell has not rung since: a publisher
             * increments the bell and then looks for sleepers, so one of the two always sees the other */
            __atomic_add_fetch(&d->waiters, 1, __ATOMIC_SEQ_CST);
            uint32_t seq = __atomic_load_n(&d->seq, __ATOMIC_SEQ_CST);
            r = blz_sub_poll(s, fragment_limit);
            if (r == 0)
            {
                int64_t wait_ns = deadline - now < BLZ_DOORBELL_WAIT_NS ? deadline - now : BLZ_DOORBELL_WAIT_NS;
                struct timespec ts = { wait_ns / 1000000000LL, wait_ns % 1000000000LL };
                syscall(SYS_futex, &d->seq, FUTEX_WAIT, seq, &ts, NULL, 0);
            }
            __atomic_sub_fetch(&d->waiters, 1, __ATOMIC_SEQ_CST);
            if (r != 0)
            {
                return r;
            }
            continue;
        }
        blz_idle(&idle);
    }
}

blz_msg_t *blz_sub_messages(blz_sub_t *s)
{
    return s->msgs;
}

uint64_t blz_sub_batch_bytes(blz_sub_t *s)
{
    uint64_t total = 0;
    for (size_t i = 0; i < s->n_msgs; i++)
    {
        total += s->msgs[i].len;
    }
    return total;
}

void blz_sub_copy_batch(blz_sub_t *s, uint8_t *out, uint64_t *lens)
{
    for (size_t i = 0; i < s->n_msgs; i++)
    {
        memcpy(out, s->msgs[i].data, s->msgs[i].len);
        out += s->msgs[i].len;
        lens[i] = s->msgs[i].len;
    }
}

uint64_t blz_sub_dropped(blz_sub_t *s)
{
    return s->dropped;
}

int blz_sub_is_connected(blz_sub_t *s)
{
    return aeron_subscription_is_connected(s->sub) ? 1 : 0;
}

int blz_sub_image_count(blz_sub_t *s)
{
    return aeron_subscription_image_count(s->sub);
}
