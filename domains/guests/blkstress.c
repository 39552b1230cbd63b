/* blkstress: random read/write stress of a block device, verifying every byte.
 *
 * Params (the domain's `extra`):
 *   disk=NAME     the disk (default: the first block device in the device table)
 *   ops=N         random operations (default 2000)
 *   seconds=S     end the random phase after S seconds even if fewer than ops
 *                 were done (default 0: no time limit); for fault campaigns
 *   bs=BYTES      block size, a multiple of 512 up to 128K (default 4096)
 *   qd=N          requests kept in flight, 1..32 (default 32)
 *   mix=PCT       percentage of writes, 0..100 (default 50)
 *   seed=N        data and operation seed (default 1)
 *   blocks=N      working set: blocks 0..N-1, block b at byte b * bs of the disk
 *                 (default min(disk blocks, 1024))
 *   prefill=0|1   first write every block of the working set (default 0; not
 *                 counted in ops)
 *   verify_all=0|1  after the random phase, read back every block written in
 *                 this run and verify it (default 1)
 *   timeout=MS    give up when no response arrives for MS ms (default 60000;
 *                 0: wait forever)
 *
 * Block format (tests/blkdata.py mirrors it), little-endian:
 *   +0  u64 magic     BLK_MAGIC = 0x31304B4C42565349 (the bytes "ISVBLK01")
 *   +8  u64 block     block number b
 *   +16 u64 gen       generation: a run-wide write counter (first write = 1)
 *   +24 u32 checksum  word checksum of the payload (below)
 *   +28 u32 bs        block size
 *   +32 payload       (bs-32)/8 u64 words: s = payload_seed(seed, b, gen), then per
 *                     word s ^= s << 13; s ^= s >> 7; s ^= s << 17; word = s
 * payload_seed: x = seed ^ b * 0x9E3779B97F4A7C15 ^ gen * 0xC2B2AE3D27D4EB4F,
 * then the splitmix64 finalizer (x ^= x >> 30; x *= 0xBF58476D1CE4E5B9;
 * x ^= x >> 27; x *= 0x94D049BB133111EB; x ^= x >> 31); 0x9E3779B97F4A7C15 if 0.
 * Word checksum (FNV-1a over u64 words, folded): h = 0xCBF29CE484222325; per
 * payload word h ^= word; h *= 0x100000001B3 (mod 2^64); checksum = (u32)(h ^ (h >> 32)).
 * (Word-wise, so filling a block costs one pass over it, not a byte loop.)
 *
 * Random phase: each op is a write with probability mix% (else a read) of a
 * random block not already in flight (one xorshift64 stream seeded with
 * payload_seed(seed, ~0, 0): op = next % 100 < mix, block = next % blocks,
 * probing upwards past busy blocks).  The generation of every block is kept
 * in RAM; a read of a block written in this run (or any block, with prefill)
 * is compared byte for byte with what was written.  A write that fails makes
 * its block unverifiable.  Errors: mismatches, responses other than OKAY,
 * driver faults and timeouts (the last two end the run).
 *
 * Output: a first line with the parameters and the disk geometry, a line per
 * extra phase, the first mismatches in detail, and finally
 *   blkstress: ops=N errors=E reads=R writes=W bytes=B ns=T iops=I kicks=K waits=W upcalls=U
 *              max_gap_us=G gaps_1ms=A gaps_10ms=B mismatches=M
 * (one line) where every figure covers the random phase only (ns from time_ns;
 * iops = ops * 1e9 / ns); max_gap_us is the longest time between two polls
 * that completed requests (the longest guest-visible I/O stall), gaps_1ms and
 * gaps_10ms count the gaps longer than 1 and 10 ms.  Exit code: 0 if no
 * errors, 1 if errors, 2 if the disk cannot be opened or the parameters are
 * bad.
 */
#include "isovisor.h"

/* Freestanding code gets no builtin memcpy: ask for it, so the fixed 4- and 8-byte copies below
 * compile to single loads and stores instead of a call per word. */
#define memcpy __builtin_memcpy

#define BLK_MAGIC 0x31304B4C42565349ULL
#define HDR_BYTES 32
#define GEN_UNKNOWN (~(u64)0)
#define MAX_PRINTED 5
#define PUSH_EVERY 8

enum { PH_PREFILL, PH_RANDOM, PH_VERIFY };
static const char *const phase_names[] = {"prefill", "random", "verify"};

struct job {
    u64 block;
    u64 gen; /* written, or expected by a read (0 / GEN_UNKNOWN: do not verify) */
    u32 sum; /* the block's checksum field, written or expected */
    u8 op;
};

struct phase {
    int kind;
    u64 total, issued, done;
    u64 cursor; /* prefill / verify: next block to look at */
    int aborted;
};

static struct blkfront bf;
static struct job jobs[BLKIF_RING_SLOTS];
static u64 *gens; /* per block: generation on disk (0 never written, GEN_UNKNOWN) */
static u32 *sums; /* per block: its checksum field, valid with a verifiable gen */
static u8 *busy;
static u8 *scratch;
static u64 seed, bs, qd, mix, nblocks, sectors_per_block;
static u64 gen_counter, rng, inflight;
static u64 errors, mismatches, status_errors;
static u64 reads, writes, bytes_moved;
/* random phase: the longest time between two polls that completed requests, and how many
 * such gaps exceeded 1 ms and 10 ms (guest-visible I/O stalls) */
static u64 last_completion_ns, max_gap_ns, gaps_1ms, gaps_10ms;

/* --- the block format ----------------------------------------------------------- */

static u64 payload_seed(u64 s, u64 block, u64 gen)
{
    u64 x = s ^ (block * 0x9E3779B97F4A7C15ULL) ^ (gen * 0xC2B2AE3D27D4EB4FULL);
    x ^= x >> 30;
    x *= 0xBF58476D1CE4E5B9ULL;
    x ^= x >> 27;
    x *= 0x94D049BB133111EBULL;
    x ^= x >> 31;
    return x ? x : 0x9E3779B97F4A7C15ULL;
}

#define SUM_INIT 0xCBF29CE484222325ULL
#define SUM_PRIME 0x100000001B3ULL
#define SUM_FOLD(h) ((u32)((h) ^ ((h) >> 32)))

static u32 word_sum(const u8 *p, u64 n)
{
    u64 h = SUM_INIT, w;
    for (u64 i = 0; i + 8 <= n; i += 8) {
        memcpy(&w, p + i, 8);
        h ^= w;
        h *= SUM_PRIME;
    }
    return SUM_FOLD(h);
}

static void put_u64(u8 *p, u64 v) { memcpy(p, &v, 8); }
static void put_u32(u8 *p, u32 v) { memcpy(p, &v, 4); }
static u64 get_u64(const u8 *p)
{
    u64 v;
    memcpy(&v, p, 8);
    return v;
}
static u32 get_u32(const u8 *p)
{
    u32 v;
    memcpy(&v, p, 4);
    return v;
}

/* Write block `block` at generation `gen` into buf; returns its checksum. */
static u32 fill_block(u8 *buf, u64 block, u64 gen)
{
    u64 s = payload_seed(seed, block, gen), h = SUM_INIT;
    for (u64 off = HDR_BYTES; off < bs; off += 8) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        put_u64(buf + off, s);
        h ^= s;
        h *= SUM_PRIME;
    }
    put_u64(buf + 0, BLK_MAGIC);
    put_u64(buf + 8, block);
    put_u64(buf + 16, gen);
    u32 sum = SUM_FOLD(h);
    put_u32(buf + 24, sum);
    put_u32(buf + 28, (u32)bs);
    return sum;
}

/* Every byte of got equals the block as written (the checksum field comes
 * from the table, so a read costs no checksum pass). */
static int block_matches(const u8 *got, u64 block, u64 gen, u32 sum)
{
    if (get_u64(got) != BLK_MAGIC || get_u64(got + 8) != block || get_u64(got + 16) != gen ||
        get_u32(got + 24) != sum || get_u32(got + 28) != (u32)bs)
        return 0;
    u64 s = payload_seed(seed, block, gen);
    for (u64 off = HDR_BYTES; off < bs; off += 8) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        if (get_u64(got + off) != s)
            return 0;
    }
    return 1;
}

static void verify(const u8 *got, u64 block, u64 gen, u32 sum)
{
    if (block_matches(got, block, gen, sum))
        return;
    fill_block(scratch, block, gen);
    errors++;
    mismatches++;
    if (mismatches > MAX_PRINTED) {
        if (mismatches == MAX_PRINTED + 1)
            printf("blkstress: (further mismatches not shown)\n");
        return;
    }
    u64 first = 0, ndiff = 0;
    for (u64 i = 0; i < bs; i++) {
        if (got[i] != scratch[i]) {
            if (!ndiff)
                first = i;
            ndiff++;
        }
    }
    printf("blkstress: MISMATCH block %lu (sector %lu) gen %lu: %lu of %lu bytes differ, first at"
           " byte %lu (got 0x%02x, expected 0x%02x)\n",
           (unsigned long)block, (unsigned long)(block * sectors_per_block), (unsigned long)gen,
           (unsigned long)ndiff, (unsigned long)bs, (unsigned long)first, got[first],
           scratch[first]);
    printf("blkstress:   found header magic=0x%016lx block=%lu gen=%lu checksum=0x%08x bs=%u"
           " (payload checksum 0x%08x)\n",
           (unsigned long)get_u64(got), (unsigned long)get_u64(got + 8),
           (unsigned long)get_u64(got + 16), get_u32(got + 24), get_u32(got + 28),
           word_sum(got + HDR_BYTES, bs - HDR_BYTES));
}

/* --- the engine ----------------------------------------------------------------- */

static u64 next_rand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static int verifiable(u64 gen) { return gen != 0 && gen != GEN_UNKNOWN; }

static u64 pick_block(void)
{
    u64 b = next_rand() % nblocks;
    while (busy[b])
        b = b + 1 == nblocks ? 0 : b + 1;
    return b;
}

/* Queue one request of the phase (a free tag and block are guaranteed). */
static void issue_one(struct phase *ph)
{
    u8 op;
    u64 block;
    switch (ph->kind) {
    case PH_PREFILL:
        op = BLKIF_OP_WRITE;
        block = ph->cursor++;
        break;
    case PH_RANDOM:
        op = next_rand() % 100 < mix ? BLKIF_OP_WRITE : BLKIF_OP_READ;
        block = pick_block();
        break;
    default: /* PH_VERIFY */
        op = BLKIF_OP_READ;
        while (!verifiable(gens[ph->cursor]))
            ph->cursor++;
        block = ph->cursor++;
        break;
    }
    int tag = blkfront_get_tag(&bf);
    if (tag < 0)
        crashf("blkstress: no free tag with %lu requests in flight (qd %lu)",
               (unsigned long)inflight, (unsigned long)qd);
    struct job *j = &jobs[tag];
    j->block = block;
    j->op = op;
    if (op == BLKIF_OP_WRITE) {
        j->gen = ++gen_counter;
        j->sum = fill_block(blkfront_tag_buf(&bf, tag), block, j->gen);
    } else {
        j->gen = gens[block];
        j->sum = sums[block];
    }
    busy[block] = 1;
    blkfront_queue(&bf, tag, op, block * sectors_per_block, bs);
    inflight++;
    ph->issued++;
}

static void on_done(void *ctx, int tag, int status)
{
    struct phase *ph = ctx;
    struct job *j = &jobs[tag];
    busy[j->block] = 0;
    inflight--;
    ph->done++;
    int counted = ph->kind == PH_RANDOM;
    if (j->op == BLKIF_OP_WRITE)
        writes += counted;
    else
        reads += counted;
    if (status != BLKIF_STATUS_OKAY) {
        errors++;
        status_errors++;
        if (status_errors <= MAX_PRINTED)
            printf("blkstress: %s %s of block %lu (sector %lu) failed: status %d\n",
                   phase_names[ph->kind], j->op == BLKIF_OP_WRITE ? "write" : "read",
                   (unsigned long)j->block, (unsigned long)(j->block * sectors_per_block),
                   status);
        if (j->op == BLKIF_OP_WRITE)
            gens[j->block] = GEN_UNKNOWN; /* old, new or torn: cannot tell */
        return;
    }
    if (counted)
        bytes_moved += bs;
    if (j->op == BLKIF_OP_WRITE) {
        gens[j->block] = j->gen;
        sums[j->block] = j->sum;
    } else if (verifiable(j->gen)) {
        verify(blkfront_tag_buf(&bf, tag), j->block, j->gen, j->sum);
    }
}

static void note_completions(void)
{
    u64 now = time_ns();
    if (last_completion_ns) {
        u64 gap = now - last_completion_ns;
        if (gap > max_gap_ns)
            max_gap_ns = gap;
        gaps_1ms += gap > 1000000;
        gaps_10ms += gap > 10000000;
    }
    last_completion_ns = now;
}

/* Run a phase to completion: 0, or -1 if it had to stop (fault, timeout). */
static u64 stop_at_ns; /* seconds=: the random phase issues nothing new after this */

static int run_phase(struct phase *ph)
{
    u64 rounds = 0;
    while (ph->done < ph->total) {
        if (stop_at_ns && ph->kind == PH_RANDOM && (++rounds & 63) == 0 &&
            time_ns() >= stop_at_ns)
            ph->total = ph->issued; /* time is up: finish what is in flight */
        int queued = 0;
        while (ph->issued < ph->total && inflight < qd) {
            issue_one(ph);
            /* Publish in small groups: the backend starts on them while we prepare more. */
            if (++queued == PUSH_EVERY) {
                blkfront_push(&bf);
                queued = 0;
            }
        }
        if (queued)
            blkfront_push(&bf);
        int n = blkfront_poll(&bf, on_done, ph);
        if (n > 0 && ph->kind == PH_RANDOM)
            note_completions();
        if (n < 0) {
            errors++;
            printf("blkstress: %s phase stopped: the driver broke the protocol (fault %d)\n",
                   phase_names[ph->kind], bf.failed);
            ph->aborted = 1;
            return -1;
        }
        if (n == 0 && ph->done < ph->total) {
            int w = blkfront_wait(&bf);
            if (w == BLKFRONT_E_TIMEOUT) {
                errors++;
                printf("blkstress: %s phase stopped: no response for %lu ms with %lu requests in"
                       " flight\n",
                       phase_names[ph->kind], (unsigned long)(bf.io_timeout_ns / 1000000),
                       (unsigned long)inflight);
                ph->aborted = 1;
                return -1;
            }
            if (w < 0) {
                errors++;
                printf("blkstress: %s phase stopped: wait failed (%d)\n", phase_names[ph->kind],
                       w);
                ph->aborted = 1;
                return -1;
            }
        }
    }
    return 0;
}

static void *alloc_or_die(u64 size, const char *what)
{
    void *p = heap_alloc(size ? size : 1, 64);
    if (!p)
        crashf("blkstress: %s (%lu bytes) does not fit in this domain (%lu bytes free, mem=%lu):"
               " lower blocks/bs or give the domain more memory",
               what, (unsigned long)size, (unsigned long)heap_free_bytes(),
               (unsigned long)mem_bytes());
    return p;
}

static NORETURN void bad_param(const char *msg)
{
    printf("blkstress: error: %s\n", msg);
    exit(2);
}

int main(void)
{
    char disk[DE_NAME_MAX];
    const char *want = param_str("disk", NULL, disk, sizeof disk);
    u64 ops = param_u64("ops", 2000);
    u64 seconds = param_u64("seconds", 0);
    bs = param_u64("bs", 4096);
    qd = param_u64("qd", 32);
    mix = param_u64("mix", 50);
    seed = param_u64("seed", 1);
    u64 prefill = param_u64("prefill", 0);
    u64 verify_all = param_u64("verify_all", 1);
    u64 timeout_ms = param_u64("timeout", 60000);

    if (bs < BLKIF_SECTOR_SIZE || bs % BLKIF_SECTOR_SIZE || bs > BLKIF_MAX_REQUEST_BYTES)
        bad_param("bs must be a multiple of 512 from 512 to 131072");
    if (qd < 1 || qd > BLKIF_RING_SLOTS)
        bad_param("qd must be 1..32");
    if (mix > 100)
        bad_param("mix must be 0..100 (percent writes)");

    int r = blkfront_open(&bf, want);
    if (r < 0) {
        printf("blkstress: cannot open disk %s (error %d)\n", want ? want : "(first)", r);
        exit(2);
    }
    bf.io_timeout_ns = timeout_ms ? timeout_ms * 1000000ULL : POLL_FOREVER;
    sectors_per_block = bs / BLKIF_SECTOR_SIZE;
    u64 disk_blocks = bf.sectors / sectors_per_block;
    nblocks = param_u64("blocks", disk_blocks < 1024 ? disk_blocks : 1024);
    if (qd > bf.ntags)
        qd = bf.ntags;
    if (qd > nblocks)
        qd = nblocks ? nblocks : 1;

    printf("blkstress: disk=%s sectors=%lu sector_size=%lu ro=%d flush=%d discard=%d bs=%lu"
           " blocks=%lu qd=%lu ops=%lu mix=%lu seed=%lu prefill=%lu verify_all=%lu\n",
           bf.dev.name, (unsigned long)bf.sectors, (unsigned long)bf.sector_size, bf.read_only,
           bf.feature_flush, bf.feature_discard, (unsigned long)bs, (unsigned long)nblocks,
           (unsigned long)qd, (unsigned long)ops, (unsigned long)mix, (unsigned long)seed,
           (unsigned long)prefill, (unsigned long)verify_all);
    if (nblocks > disk_blocks)
        bad_param("blocks is larger than the disk");
    if ((ops || prefill) && nblocks == 0)
        bad_param("the working set is empty (the disk is smaller than one block?)");
    if (bf.read_only && (prefill || (ops && mix)))
        bad_param("the disk is read-only: use mix=0 and prefill=0");

    gens = alloc_or_die(nblocks * sizeof *gens, "the generation table");
    sums = alloc_or_die(nblocks * sizeof *sums, "the checksum table");
    busy = alloc_or_die(nblocks, "the busy table");
    scratch = alloc_or_die(bs, "the verify buffer");
    memset(gens, 0, nblocks * sizeof *gens);
    memset(busy, 0, nblocks);
    rng = payload_seed(seed, ~(u64)0, 0);

    int stopped = 0;
    if (prefill && nblocks) {
        struct phase ph = {PH_PREFILL, nblocks, 0, 0, 0, 0};
        u64 t0 = time_ns();
        stopped = run_phase(&ph) < 0;
        printf("blkstress: prefill blocks=%lu ns=%lu\n", (unsigned long)ph.done,
               (unsigned long)(time_ns() - t0));
    }

    u64 k0 = bf.kicks, w0 = bf.waits;
    u64 u0 = evtchn_upcalls(bf.dev.port) - bf.upcalls_base;
    u64 t0 = time_ns();
    last_completion_ns = t0;
    if (seconds)
        stop_at_ns = t0 + seconds * 1000000000ULL;
    struct phase rnd = {PH_RANDOM, ops, 0, 0, 0, 0};
    if (!stopped && ops)
        stopped = run_phase(&rnd) < 0;
    u64 ns = time_ns() - t0;
    u64 kicks = bf.kicks - k0, waits = bf.waits - w0;
    u64 upcalls = evtchn_upcalls(bf.dev.port) - bf.upcalls_base - u0;

    if (!stopped && verify_all) {
        u64 n = 0;
        for (u64 b = 0; b < nblocks; b++)
            n += verifiable(gens[b]);
        u64 before = mismatches, vt0 = time_ns();
        struct phase ph = {PH_VERIFY, n, 0, 0, 0, 0};
        if (n)
            run_phase(&ph);
        printf("blkstress: verify blocks=%lu mismatches=%lu ns=%lu\n", (unsigned long)ph.done,
               (unsigned long)(mismatches - before), (unsigned long)(time_ns() - vt0));
    }

    u64 done = rnd.done;
    u64 iops = ns ? (u64)((unsigned __int128)done * 1000000000u / ns) : 0;
    printf("blkstress: ops=%lu errors=%lu reads=%lu writes=%lu bytes=%lu ns=%lu iops=%lu"
           " kicks=%lu waits=%lu upcalls=%lu max_gap_us=%lu gaps_1ms=%lu gaps_10ms=%lu"
           " mismatches=%lu\n",
           (unsigned long)done, (unsigned long)errors, (unsigned long)reads,
           (unsigned long)writes, (unsigned long)bytes_moved, (unsigned long)ns,
           (unsigned long)iops, (unsigned long)kicks, (unsigned long)waits,
           (unsigned long)upcalls, (unsigned long)(max_gap_ns / 1000), (unsigned long)gaps_1ms,
           (unsigned long)gaps_10ms, (unsigned long)mismatches);
    return errors ? 1 : 0;
}
