/* rngtest: read an entropy device (devices/rng.py) continuously and check what comes back.
 *
 * Params (the domain's `extra`):
 *   device=NAME  the device (default: the first entropy device in the device table)
 *   reads=N      buffers to read (default 2000)
 *   size=S       bytes per buffer, 1..4096 (default 64); a read of more than
 *                RNGIF_MAX_REQUEST_BYTES is split into several requests
 *   qd=Q         requests kept in flight, 1..32 (default 32)
 *   timeout=MS   give up when no response arrives for MS ms (default 60000;
 *                0: wait forever)
 *
 * Checks, per buffer read without error:
 *   constant  all its bytes are equal;
 *   repeated  it equals the previous buffer, or its 64-bit FNV-1a hash equals
 *             one of the last RECENT buffers' (a buffer counts once).
 * Both only for size >= MIN_CHECKED: shorter random buffers are constant or
 * repeat by chance often enough to fail a run.
 * And over all bytes, once more than 64 KiB were read (skewed=1 if not):
 * every byte value occurs, and each within half to twice its expected count
 * (at 64 KiB that is 256 +- 128, eight standard deviations: never by chance).
 * errors counts reads that failed: a STATUS_ERROR response (the run goes on),
 * a driver fault or a timeout (the run stops).
 *
 * Output: a first line with the parameters,
 *   rngtest: device=rng0 reads=N size=S qd=Q timeout_ms=T
 * the first few problems in detail, and finally one summary line
 *   rngtest: reads=N bytes=B errors=E constant=C repeated=R skewed=K
 * (reads: reads done, failed ones included; bytes: bytes received).  Exit
 * code: 0 if E+C+R+K == 0, 1 otherwise, 2 if the device cannot be opened or
 * the parameters are bad.
 */
#include "isovisor.h"
#include "rngfront.h"

#define MAX_SIZE 4096
#define MIN_CHECKED 8
#define RECENT 256
#define SKEW_MIN_BYTES (64u * 1024)
#define MAX_PRINTED 5

static struct rngfront rf;
static u8 bufs[2][MAX_SIZE]; /* this buffer and the previous one */
static u64 recent[RECENT];   /* hashes of the last RECENT good buffers */
static u64 nrecent;          /* how many of them are filled in */
static u64 counts[256];      /* every byte value, over all good buffers */
static u64 problems;

static NORETURN void bad_param(const char *msg)
{
    printf("rngtest: error: %s\n", msg);
    exit(2);
}

static u64 fnv1a(const u8 *p, u64 n)
{
    u64 h = 0xCBF29CE484222325ULL;
    for (u64 i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001B3ULL;
    }
    return h;
}

static void problem(u64 read, const char *what, const u8 *p, u64 n)
{
    if (++problems > MAX_PRINTED) {
        if (problems == MAX_PRINTED + 1)
            printf("rngtest: (further problems not shown)\n");
        return;
    }
    printf("rngtest: read %lu: %s; first bytes", (unsigned long)read, what);
    for (u64 i = 0; i < n && i < 16; i++)
        printf(" %02x", p[i]);
    printf("\n");
}

/* Every byte value seen, each within [expected/2, 2*expected]. */
static int skewed(u64 total)
{
    u64 expected = total / 256;
    for (int v = 0; v < 256; v++) {
        if (counts[v] == 0 || counts[v] < expected / 2 || counts[v] > 2 * expected) {
            printf("rngtest: byte 0x%02x occurs %lu times in %lu bytes (expected about %lu)\n",
                   v, (unsigned long)counts[v], (unsigned long)total, (unsigned long)expected);
            return 1;
        }
    }
    return 0;
}

int main(void)
{
    char name[DE_NAME_MAX];
    const char *want = param_str("device", NULL, name, sizeof name);
    u64 nreads = param_u64("reads", 2000);
    u64 size = param_u64("size", 64);
    u64 qd = param_u64("qd", RNGIF_RING_SLOTS);
    u64 timeout_ms = param_u64("timeout", 60000);
    if (size < 1 || size > MAX_SIZE)
        bad_param("size must be 1..4096");
    if (qd < 1 || qd > RNGIF_RING_SLOTS)
        bad_param("qd must be 1..32");

    int r = rngfront_open(&rf, want, RNGFRONT_HANDSHAKE_TIMEOUT_NS);
    if (r < 0) {
        printf("rngtest: cannot open entropy device %s (error %d)\n", want ? want : "(first)", r);
        exit(2);
    }
    rf.io_timeout_ns = timeout_ms ? timeout_ms * 1000000ULL : POLL_FOREVER;
    if (qd > rf.ntags)
        qd = rf.ntags;
    rf.queue_depth = qd;
    printf("rngtest: device=%s reads=%lu size=%lu qd=%lu timeout_ms=%lu\n", rf.dev.name,
           (unsigned long)nreads, (unsigned long)size, (unsigned long)qd,
           (unsigned long)timeout_ms);

    u64 done = 0, bytes = 0, errors = 0, constant = 0, repeated = 0, good = 0;
    int slot = 0; /* bufs[slot] is read into; bufs[slot ^ 1] holds the last good buffer */
    for (u64 i = 0; i < nreads; i++) {
        u8 *cur = bufs[slot], *prev = bufs[slot ^ 1];
        long n = rngfront_read(&rf, cur, size);
        done++;
        if (n != (long)size) {
            errors++;
            if (errors <= MAX_PRINTED)
                printf("rngtest: read %lu of %lu bytes failed (%ld)\n", (unsigned long)i,
                       (unsigned long)size, n);
            if (n == RNGFRONT_E_IO)
                continue; /* the device said so; it may do better next time */
            printf("rngtest: stopped: %s\n",
                   n == RNGFRONT_E_TIMEOUT ? "no response within the timeout"
                                           : "the frontend failed (a driver fault)");
            break;
        }
        bytes += size;
        for (u64 k = 0; k < size; k++)
            counts[cur[k]]++;
        if (size < MIN_CHECKED)
            continue;
        u64 k = 1;
        while (k < size && cur[k] == cur[0])
            k++;
        if (k == size) {
            constant++;
            problem(i, "all bytes are equal", cur, size);
        }
        u64 h = fnv1a(cur, size);
        int again = good && memcmp(cur, prev, size) == 0;
        for (u64 j = 0; j < nrecent && !again; j++)
            again = recent[j] == h;
        if (again) {
            repeated++;
            problem(i, "a repeat of a recent buffer", cur, size);
        }
        recent[good % RECENT] = h;
        if (nrecent < RECENT)
            nrecent++;
        good++;
        slot ^= 1; /* a failed read never gets here, so prev is always the last good buffer */
    }
    u64 skew = bytes > SKEW_MIN_BYTES ? (u64)skewed(bytes) : 0;
    printf("rngtest: reads=%lu bytes=%lu errors=%lu constant=%lu repeated=%lu skewed=%lu\n",
           (unsigned long)done, (unsigned long)bytes, (unsigned long)errors,
           (unsigned long)constant, (unsigned long)repeated, (unsigned long)skew);
    return errors + constant + repeated + skew ? 1 : 0;
}
