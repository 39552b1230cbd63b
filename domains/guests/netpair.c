/* netpair: two guests exchange sequenced Ethernet frames and check order, loss,
 * duplication and every byte.  Run it in both guests, each naming the other.
 *
 * Params (the domain's `extra`):
 *   peer=MAC      the other guest's MAC, e.g. 02:00:00:00:00:02 (required)
 *   count=N       data frames each side sends (default 1000)
 *   size=S        bytes per data frame, 60..1514 (default 512); both sides
 *                 must use the same size
 *   timeout=MS    stop waiting when the peer's frames stop arriving for MS ms;
 *                 what is missing then counts as lost (default 5000)
 *   start_timeout=MS  give up if the peer shows no sign of life within MS ms
 *                 of start (default 60000)
 *   window=W      send at most W data frames beyond the highest one the peer
 *                 has acknowledged (default 32, below the peer's 64 rx
 *                 buffers, so a switch that drops frames for a full rx ring
 *                 drops none of them; 0: no limit).  If the peer keeps acking
 *                 the same seq for 1 s while the window is shut, the frames in
 *                 it are taken as lost (printed) and sending goes on.
 *   resend=MS     retransmit (go-back-N, as a reliable transport does): when
 *                 the peer's ack has not moved for MS ms while frames are
 *                 unacknowledged, send again from the first of them.  The
 *                 receiver then takes data frames in order only: a frame past
 *                 a gap is dropped (counted gaps=), one it has (a resend)
 *                 ignored (counted resent_seen=); neither is an error, and the
 *                 window is never reopened as lost.  So a guest whose frames
 *                 are lost for a while (its peer saved, restored or migrated:
 *                 frames in flight then are gone, as on any network) still
 *                 receives every one exactly once.  Sending is over when the
 *                 peer has acknowledged all, and acks go on until the peer's
 *                 done (default 0: no retransmission; loss counts as lost).
 *   dev=NAME      the interface (default eth0)
 *
 * Frames (EtherType 0x88B5, local experimental; fields big-endian):
 *   +0  dst = peer, +6 src = this guest's MAC, +12 u16 0x88B5
 *   +14 u32 magic 0x4E505231 ("NPR1")
 *   +18 u32 seq: data frames 0..count-1, in order; control frames
 *       0xFFFFFFFF done, 0xFFFFFFFE hello, 0xFFFFFFFD ack
 *   data: +22 .. size: a pattern of the sender's MAC and seq:
 *       m = the MAC as a 48-bit big-endian number,
 *       x = m * 0x9E3779B97F4A7C15 ^ seq * 0xC2B2AE3D27D4EB4F (mod 2^64),
 *       then the splitmix64 finalizer (x ^= x >> 30; x *= 0xBF58476D1CE4E5B9;
 *       x ^= x >> 27; x *= 0x94D049BB133111EB; x ^= x >> 31), 0x9E3779B97F4A7C15
 *       if 0; then per 8 bytes: x ^= x << 13; x ^= x >> 7; x ^= x << 17, and
 *       the bytes are x little-endian (the last chunk cut at the frame's end).
 *   control: 60 bytes; +22 u32 arg (done: data frames received from the peer;
 *       hello: 0; ack: the highest data seq received + 1), then zeros.
 *
 * Protocol: each side sends hello every 100 ms until anything arrives from the
 * peer (a frame sent before the peer's vif is connected would be lost), then
 * its data frames as fast as tx buffers and the window allow, polling rx
 * between batches of 16; the receiver acks every window/4 frames and every
 * 100 ms until it has received everything.  Sending is over when all count
 * frames are queued, or nothing could be queued for timeout ms (the window
 * stayed shut, or no tx buffer came free: printed; the rest is not sent).
 * Receiving is over when all count frames are in, or no data frame came for
 * timeout ms, or the peer said done and no data frame came for 100 ms.  When
 * both are over, a side sends done, repeated every 100 ms until the peer's
 * done arrives (a repeated done counts as nothing), answers the peer's done
 * with one more, and exits once its tx responses are in, so neither side
 * leaves while the other still waits for frames.  If that does not happen
 * within timeout ms, it stops anyway (printed, not an error).
 *
 * Receive checks: a data frame from the peer is corrupt if its length is not
 * size, its magic or seq is invalid, or a byte differs from the pattern;
 * otherwise seq already seen is dup, seq below the highest seen + 1 (but
 * unseen) is reordered, and seqs never received are lost.  Frames of other
 * EtherTypes, or of 0x88B5 from another MAC, count as other.
 *
 * Output:
 *   netpair: up mac=<ours> peer=<mac> count=N size=S window=W
 *   netpair: frontend tx_frames=.. tx_errors=.. rx_frames=.. rx_bad=.. kicks=.. waits=.. holds=.. ns=.. peer_received=.. window_reopened=.. resent=.. gaps=.. resent_seen=..
 *   netpair: sent=N received=M lost=L dup=D reordered=R corrupt=C other=O errors=E
 * (M: distinct data frames received intact; E: frontend failures, tx errors,
 * a peer that never appeared.)  Exit code 0 iff lost, dup, reordered, corrupt
 * and errors are 0 and M == count; 1 otherwise; 2 for bad parameters or an
 * interface that cannot be opened.
 */
#include "netfront.h"
#include "netbytes.h"

/* Freestanding code gets no builtin memcpy: ask for it, so 8-byte copies are single moves. */
#define memcpy __builtin_memcpy

#define ETHERTYPE_NETPAIR 0x88B5
#define MAGIC 0x4E505231u
#define SEQ_DONE 0xFFFFFFFFu
#define SEQ_HELLO 0xFFFFFFFEu
#define SEQ_ACK 0xFFFFFFFDu
#define HDR_BYTES 22
#define CTL_BYTES 60
#define NS_PER_MS 1000000ULL
#define TICK_NS (100 * NS_PER_MS)
#define SEND_BATCH 16
/* The window is reopened when the peer keeps acking the same seq this long. */
#define ACK_STALL_NS (1000 * NS_PER_MS)

static struct netfront nf;
static u8 peer[6];
static u64 peer_m48, my_m48;
static u64 count, size, window, resend_ns;
static u8 *seen; /* count bits */

/* receive side */
static int peer_up, peer_done;
static u64 received, dup, reordered, corrupt, other;
static u64 rx_next;        /* highest data seq received + 1 */
static u64 last_data_ns;   /* when the last data frame from the peer arrived (or it came up) */
static u64 peer_ack;       /* the peer's latest ack (or where a stalled window was reopened) */
static u64 ack_seen_ns;    /* when an ack last arrived */
static u64 ack_moved_ns;   /* when peer_ack last moved */
static u64 peer_received;  /* the arg of the peer's done */
static u64 unacked;        /* data frames received since our last ack */
static u64 gaps, resent_seen; /* resend mode: frames past a gap dropped, resent ones ignored */
static u64 errors;


static u64 mac48(const u8 m[6])
{
    u64 v = 0;
    for (int i = 0; i < 6; i++)
        v = v << 8 | m[i];
    return v;
}

static u64 pattern_seed(u64 m, u32 seq)
{
    u64 x = m * 0x9E3779B97F4A7C15ULL ^ (u64)seq * 0xC2B2AE3D27D4EB4FULL;
    x ^= x >> 30;
    x *= 0xBF58476D1CE4E5B9ULL;
    x ^= x >> 27;
    x *= 0x94D049BB133111EBULL;
    x ^= x >> 31;
    return x ? x : 0x9E3779B97F4A7C15ULL;
}

static u64 next_word(u64 *s)
{
    u64 x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *s = x;
    return x;
}

static void fill_pattern(u8 *f, u64 len, u64 m, u32 seq)
{
    u64 s = pattern_seed(m, seq), k = HDR_BYTES;
    for (; k + 8 <= len; k += 8) {
        u64 w = next_word(&s);
        memcpy(f + k, &w, 8);
    }
    if (k < len) {
        u64 w = next_word(&s);
        for (; k < len; k++, w >>= 8)
            f[k] = (u8)w;
    }
}

static int pattern_ok(const u8 *f, u64 len, u64 m, u32 seq)
{
    u64 s = pattern_seed(m, seq), k = HDR_BYTES;
    for (; k + 8 <= len; k += 8) {
        u64 w;
        memcpy(&w, f + k, 8);
        if (w != next_word(&s))
            return 0;
    }
    if (k < len) {
        u64 w = next_word(&s);
        for (; k < len; k++, w >>= 8)
            if (f[k] != (u8)w)
                return 0;
    }
    return 1;
}

static void put_header(u8 *f, u32 seq)
{
    memcpy(f, peer, 6);
    memcpy(f + 6, nf.mac, 6);
    put16(f + 12, ETHERTYPE_NETPAIR);
    put32(f + 14, MAGIC);
    put32(f + 18, seq);
}

/* --- receive ------------------------------------------------------------------------------ */

static void report_corrupt(const char *why, u32 seq, u32 len)
{
    corrupt++;
    if (corrupt <= 5)
        printf("netpair: corrupt frame from the peer (seq %u, %u bytes): %s\n", seq, len, why);
    else if (corrupt == 6)
        printf("netpair: (further corrupt frames not shown)\n");
}

static void on_frame(void *ctx, const u8 *f, u32 len)
{
    (void)ctx;
    if (get16(f + 12) != ETHERTYPE_NETPAIR || memcmp(f + 6, peer, 6) != 0 ||
        memcmp(f, nf.mac, 6) != 0) {
        other++;
        return;
    }
    if (len < CTL_BYTES) {
        report_corrupt("too short", len >= HDR_BYTES ? get32(f + 18) : 0, len);
        return;
    }
    u32 seq = get32(f + 18);
    if (get32(f + 14) != MAGIC) {
        report_corrupt("bad magic", seq, len);
        return;
    }
    if (!peer_up) {
        peer_up = 1;
        last_data_ns = time_ns(); /* the rx timeout counts from here */
    }
    switch (seq) {
    case SEQ_HELLO:
        return;
    case SEQ_ACK: {
        u64 a = get32(f + HDR_BYTES);
        ack_seen_ns = time_ns();
        if (a > peer_ack) {
            peer_ack = a;
            ack_moved_ns = ack_seen_ns;
        }
        return;
    }
    case SEQ_DONE:
        if (!peer_done) {
            peer_done = 1;
            peer_received = get32(f + HDR_BYTES);
            if (resend_ns && peer_received > peer_ack) { /* it has them all: an ack too */
                peer_ack = peer_received;
                ack_moved_ns = time_ns();
            }
        }
        return;
    default:
        break;
    }
    if (seq >= count) {
        report_corrupt("seq beyond count", seq, len);
        return;
    }
    if (len != size) {
        report_corrupt("length is not size", seq, len);
        return;
    }
    if (!pattern_ok(f, len, peer_m48, seq)) {
        report_corrupt("payload differs from the pattern", seq, len);
        return;
    }
    if (resend_ns && seq != rx_next) { /* in order only: the sender goes back to rx_next */
        if (seq < rx_next)
            resent_seen++;
        else
            gaps++;
        last_data_ns = time_ns();
        unacked = ~0ULL >> 1; /* ack at once: the sender learns where to go back to */
        return;
    }
    u8 bit = (u8)(1u << (seq & 7));
    if (seen[seq >> 3] & bit) {
        dup++;
        return;
    }
    seen[seq >> 3] |= bit;
    last_data_ns = time_ns();
    received++;
    unacked++;
    if (seq >= rx_next)
        rx_next = (u64)seq + 1;
    else
        reordered++;
}

/* --- send --------------------------------------------------------------------------------- */

/* Queue a control frame: 0, or NETFRONT_E_BUSY / another error. */
static int send_control(u32 seq, u32 arg)
{
    int tag = netfront_tx_get(&nf);
    if (tag < 0)
        return tag;
    u8 *f = netfront_tx_buf(&nf, tag);
    put_header(f, seq);
    put32(f + HDR_BYTES, arg);
    for (u64 k = HDR_BYTES + 4; k < CTL_BYTES; k++)
        f[k] = 0;
    return netfront_tx_queue(&nf, tag, CTL_BYTES);
}

/* Queue data frame seq: 0, or NETFRONT_E_BUSY / another error. */
static int send_data(u32 seq)
{
    int tag = netfront_tx_get(&nf);
    if (tag < 0)
        return tag;
    u8 *f = netfront_tx_buf(&nf, tag);
    put_header(f, seq);
    fill_pattern(f, size, my_m48, seq);
    return netfront_tx_queue(&nf, tag, (u32)size);
}

static int poll_rx(void)
{
    int n = netfront_poll(&nf, on_frame, NULL);
    if (n < 0 && !errors++)
        printf("netpair: the frontend failed (%d): the driver broke the protocol\n", n);
    return n;
}

static NORETURN void bad_param(const char *msg)
{
    printf("netpair: error: %s\n", msg);
    exit(2);
}

static u64 min_u64(u64 a, u64 b) { return a < b ? a : b; }

int main(void)
{
    char text[40], dev[DE_NAME_MAX];
    if (!param_str("peer", NULL, text, sizeof text))
        bad_param("peer=MAC (the other guest's MAC) is required");
    if (netfront_parse_mac(text, peer) < 0 || peer[0] & 1)
        bad_param("peer must be a unicast MAC address like 02:00:00:00:00:02");
    count = param_u64("count", 1000);
    size = param_u64("size", 512);
    window = param_u64("window", 32);
    resend_ns = param_u64("resend", 0) * NS_PER_MS;
    u64 timeout_ns = param_u64("timeout", 5000) * NS_PER_MS;
    u64 start_timeout_ns = param_u64("start_timeout", 60000) * NS_PER_MS;
    const char *want = param_str("dev", "eth0", dev, sizeof dev);
    if (size < CTL_BYTES || size > NETIF_MAX_FRAME)
        bad_param("size must be 60..1514 (frame bytes)");
    if (count >= SEQ_ACK)
        bad_param("count is too large");
    if (!timeout_ns)
        bad_param("timeout must be at least 1 ms");
    seen = heap_alloc(count / 8 + 1, 8);
    if (!seen)
        bad_param("count is too large for this domain's memory");
    memset(seen, 0, count / 8 + 1);

    int r = netfront_open(&nf, want, 0);
    if (r < 0) {
        printf("netpair: cannot open %s (error %d)\n", want, r);
        exit(2);
    }
    if (memcmp(peer, nf.mac, 6) == 0)
        bad_param("peer is this guest's own MAC");
    peer_m48 = mac48(peer);
    my_m48 = mac48(nf.mac);
    char peer_text[18];
    printf("netpair: up mac=%s peer=%s count=%lu size=%lu window=%lu\n", nf.mac_str,
           netfront_format_mac(peer, peer_text), (unsigned long)count, (unsigned long)size,
           (unsigned long)window);

    u64 t0 = time_ns();
    u64 sent = 0, next_hello = t0, next_ack = 0, next_done = 0;
    u64 tx_progress_ns = 0; /* when the last data frame was queued (or the peer came up) */
    u64 finish_at = 0;      /* when both directions were over */
    int done_sent = 0, answered_done = 0, rx_over = 0, tx_over = 0, up_seen = 0;
    int stop_reason = 0; /* 1 no peer, 2 no done from the peer, 3 tx not drained */
    u64 reopened = 0;    /* times a stalled window was reopened */
    u64 resent = 0;      /* data frames sent again (resend mode) */
    u64 went_back_ns = 0; /* when sending last went back (resend mode) */
    for (;;) {
        if (poll_rx() < 0)
            break;
        u64 now = time_ns();

        /* start: hello until the peer shows up */
        if (!peer_up) {
            if (now - t0 >= start_timeout_ns) {
                stop_reason = 1;
                break;
            }
            if (now >= next_hello && send_control(SEQ_HELLO, 0) == 0)
                next_hello = now + TICK_NS;
        } else if (!up_seen) {
            up_seen = 1;
            tx_progress_ns = ack_moved_ns = now;
            printf("netpair: peer up after %lu ms\n", (unsigned long)((now - t0) / NS_PER_MS));
            send_control(SEQ_HELLO, 0); /* so the peer knows at once, even with count=0 */
        }

        /* a shut window while the peer is alive but acks the same seq: the frames in the
         * window are gone (the peer counts them lost); do not wait for them */
        if (!resend_ns && window && up_seen && !tx_over && sent < count &&
            sent >= peer_ack + window &&
            now - ack_moved_ns >= ACK_STALL_NS && now - ack_seen_ns < 3 * TICK_NS) {
            if (!reopened++)
                printf("netpair: the peer acknowledged no frame after seq %lu for %lu ms, but "
                       "frames up to %lu were sent: they are presumably lost; going on\n",
                       (unsigned long)peer_ack, (unsigned long)(ACK_STALL_NS / NS_PER_MS),
                       (unsigned long)(sent - 1));
            peer_ack = sent;
            ack_moved_ns = now;
        }

        /* resend mode: the peer's ack stood still while frames were out: go back to it */
        if (resend_ns && up_seen && !tx_over && sent > peer_ack &&
            now - (ack_moved_ns > went_back_ns ? ack_moved_ns : went_back_ns) >= resend_ns) {
            resent += sent - peer_ack;
            sent = peer_ack;
            went_back_ns = now;
        }

        /* data, interleaved with rx */
        int progressed = 0, queued = 0;
        while (up_seen && !tx_over && sent < count && (!window || sent < peer_ack + window)) {
            int st = send_data((u32)sent);
            if (st == NETFRONT_E_BUSY)
                break;
            if (st < 0) {
                if (!errors++)
                    printf("netpair: send failed (%d)\n", st);
                break;
            }
            sent++;
            progressed = 1;
            if (++queued == SEND_BATCH) {
                netfront_push(&nf);
                queued = 0;
                if (poll_rx() < 0)
                    break;
            }
        }
        if (nf.failed)
            break;
        now = time_ns();
        if (progressed)
            tx_progress_ns = now;
        if (up_seen && !tx_over) {
            if (resend_ns ? peer_ack >= count : sent == count) {
                tx_over = 1;
            } else if (resend_ns ? now - ack_moved_ns >= timeout_ns
                                 : now - tx_progress_ns >= timeout_ns) {
                tx_over = 1; /* the window stayed shut, or no tx buffer came free */
                printf("netpair: %lu frames not sent: no progress for %lu ms (%s)\n",
                       (unsigned long)(count - (resend_ns ? peer_ack : sent)),
                       (unsigned long)(timeout_ns / NS_PER_MS),
                       window && sent >= peer_ack + window ? "the peer stopped acknowledging"
                                                           : "no tx buffer came free");
            }
        }

        /* acks: every window/4 frames, and every tick while frames are still due */
        u64 ack_every = window >= 8 ? window / 4 : 1;
        if (up_seen && (!rx_over || (resend_ns && !peer_done)) &&
            (unacked >= ack_every || now >= next_ack) &&
            send_control(SEQ_ACK, (u32)rx_next) == 0) {
            unacked = 0;
            next_ack = now + TICK_NS;
        }

        /* finished receiving? */
        if (up_seen && !rx_over) {
            u64 quiet = now - last_data_ns;
            if (received == count || quiet >= timeout_ns || (peer_done && quiet >= TICK_NS)) {
                rx_over = 1;
                if (received < count)
                    printf("netpair: %lu frames still missing after %lu ms without a frame from "
                           "the peer%s\n",
                           (unsigned long)(count - received), (unsigned long)(quiet / NS_PER_MS),
                           peer_done ? " (the peer is done)" : "");
            }
        }

        /* done: ours once both directions are over, repeated until the peer's, which gets
         * one more in answer; then leave when the tx responses are in */
        if (rx_over && tx_over) {
            if (!finish_at)
                finish_at = now;
            if ((!done_sent || (!peer_done && now >= next_done) ||
                 (peer_done && !answered_done)) &&
                send_control(SEQ_DONE, (u32)received) == 0) {
                done_sent = 1;
                next_done = now + TICK_NS;
                answered_done = peer_done;
            }
            if (done_sent && peer_done && answered_done && netfront_tx_inflight(&nf) == 0)
                break;
            if (now - finish_at >= timeout_ns) {
                stop_reason = peer_done ? 3 : 2;
                break;
            }
        }
        netfront_push(&nf);
        if (progressed)
            continue;

        /* sleep until something arrives or the next timer */
        u64 wake;
        if (!peer_up) {
            wake = min_u64(next_hello, t0 + start_timeout_ns);
        } else {
            wake = now + TICK_NS;
            if (!tx_over)
                wake = min_u64(min_u64(wake, tx_progress_ns + timeout_ns),
                               resend_ns ? (ack_moved_ns > went_back_ns ? ack_moved_ns
                                                                        : went_back_ns) +
                                               resend_ns
                                         : ack_moved_ns + ACK_STALL_NS);
            if (!rx_over)
                wake = min_u64(min_u64(wake, last_data_ns + timeout_ns), next_ack);
            if (finish_at) {
                wake = min_u64(wake, finish_at + timeout_ns);
                if (done_sent && !peer_done)
                    wake = min_u64(wake, next_done);
            }
        }
        /* tx responses matter when a timer's frame found no tx buffer, and at the end (all
         * said, only the last frames' responses missing): then wait for one of those too */
        int want_tx = wake <= now || (done_sent && peer_done && answered_done);
        if (wake <= now)
            wake = now + NS_PER_MS;
        if ((want_tx ? netfront_wait_tx(&nf, wake - now) : netfront_wait(&nf, wake - now)) ==
            NETFRONT_E_FAILED) {
            if (!errors++)
                printf("netpair: the frontend failed while waiting\n");
            break;
        }
    }
    u64 ns = time_ns() - t0;

    if (stop_reason == 1) {
        errors++;
        printf("netpair: no frame from the peer %s within %lu ms of start\n", peer_text,
               (unsigned long)(start_timeout_ns / NS_PER_MS));
    } else if (stop_reason == 2) {
        printf("netpair: the peer's done did not arrive within %lu ms; stopping\n",
               (unsigned long)(timeout_ns / NS_PER_MS));
    } else if (stop_reason == 3) {
        printf("netpair: %lu tx frames still unanswered after %lu ms; stopping\n",
               (unsigned long)netfront_tx_inflight(&nf), (unsigned long)(timeout_ns / NS_PER_MS));
    }
    errors += nf.tx_errors;
    u64 lost = count - received;
    printf("netpair: frontend tx_frames=%lu tx_errors=%lu rx_frames=%lu rx_bad=%lu kicks=%lu "
           "waits=%lu holds=%lu ns=%lu peer_received=%lu window_reopened=%lu resent=%lu gaps=%lu "
           "resent_seen=%lu\n",
           (unsigned long)nf.tx_frames, (unsigned long)nf.tx_errors, (unsigned long)nf.rx_frames,
           (unsigned long)nf.rx_bad, (unsigned long)nf.kicks, (unsigned long)nf.waits,
           (unsigned long)nf.holds, (unsigned long)ns, (unsigned long)peer_received,
           (unsigned long)reopened, (unsigned long)resent, (unsigned long)gaps,
           (unsigned long)resent_seen);
    printf("netpair: sent=%lu received=%lu lost=%lu dup=%lu reordered=%lu corrupt=%lu other=%lu "
           "errors=%lu\n",
           (unsigned long)sent, (unsigned long)received, (unsigned long)lost, (unsigned long)dup,
           (unsigned long)reordered, (unsigned long)corrupt, (unsigned long)other,
           (unsigned long)errors);
    return lost || dup || reordered || corrupt || errors || received != count ? 1 : 0;
}
