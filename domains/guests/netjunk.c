/* netjunk: a hostile guest on a bridge (docs/net.md, "Bad input").
 *
 * Parameters (extra):
 *   victim=MAC   another guest's MAC on the same bridge (required)
 *   spoof=N      frames sent with the victim's MAC as their source (default 200)
 *   junk=N       tx requests with bad sizes, offsets or flags, written raw (default 200)
 *   rxjunk=N     rx requests naming buffers outside the rx area (default 32, at most 32)
 *   breakring=1  finally publish an impossible tx req_prod (default 1)
 *
 * The spoofed frames are EtherType 0x88B5 to the victim and to broadcast, shaped like
 * netpair's, so a switch that let one through would show up in the victim's counters.
 * After the spoofing phase the guest writes its rings raw (it never consumes the responses
 * to its junk: their ids are its own).  It prints
 *   netjunk: spoofed=N junk=J rxjunk=R sent_ok=S
 * before it breaks its ring; the switch is expected to stop serving it (and the kernel to
 * crash it) without harming anyone else.
 */
#include "isovisor.h"
#include "netfront.h"

static u8 frame[NETIF_MAX_FRAME];

static void on_frame(void *ctx, const u8 *f, u32 len)
{
    (void)ctx, (void)f, (void)len;
}

/* Put a raw request into a ring at its shared req_prod and publish it. */
static void raw_put(volatile struct netif_sring_header *h, volatile u8 *slots, const void *req)
{
    u64 i = h->req_prod;
    const u8 *src = req;
    volatile u8 *dst = slots + (i % NETIF_RING_SLOTS) * NETIF_SLOT_SIZE;
    for (u32 k = 0; k < NETIF_SLOT_SIZE; k++)
        dst[k] = src[k];
    __asm__ volatile("" ::: "memory");
    h->req_prod = i + 1;
}

int main(void)
{
    char victim_s[32];
    u8 victim[6];
    param_str("victim", "", victim_s, sizeof victim_s);
    if (netfront_parse_mac(victim_s, victim) != 0) {
        printf("netjunk: victim=%s is not a MAC address\n", victim_s);
        return 2;
    }
    u64 spoof = param_u64("spoof", 200), junk = param_u64("junk", 200);
    u64 rxjunk = param_u64("rxjunk", 32), breakring = param_u64("breakring", 1);
    if (rxjunk > 32)
        rxjunk = 32;

    static struct netfront nf;
    if (netfront_open(&nf, "eth0", 0) != 0)
        return 2;
    printf("netjunk: up mac=%s victim=%s\n", nf.mac_str, victim_s);

    /* 1. spoofing: the victim's MAC as source, to the victim and to everyone */
    u64 sent_ok = 0;
    for (u64 i = 0; i < spoof; i++) {
        static const u8 bcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
        memcpy(frame, (i & 1) ? bcast : victim, 6);
        memcpy(frame + 6, victim, 6);
        frame[12] = 0x88, frame[13] = 0xB5;
        for (u32 k = 14; k < 600; k++)
            frame[k] = (u8)(i + k);
        int r;
        while ((r = netfront_send(&nf, frame, 600)) == NETFRONT_E_BUSY) {
            netfront_push(&nf);
            if (netfront_poll(&nf, on_frame, 0) == 0)
                netfront_wait(&nf, 100000000ULL);
        }
        if (r == 0)
            sent_ok++;
    }
    netfront_push(&nf);
    while (netfront_tx_inflight(&nf)) {
        if (netfront_poll(&nf, on_frame, 0) < 0)
            break;
        if (netfront_tx_inflight(&nf))
            netfront_wait_tx(&nf, 100000000ULL);
    }

    /* 2. junk tx requests, raw: every kind of bad size, offset and flags */
    volatile struct netif_sring_header *txh = nf.tx.sring;
    volatile struct netif_sring_header *rxh = nf.rx.sring;
    for (u64 i = 0; i < junk; i++) {
        /* wait until the switch has answered what is outstanding: never overrun the ring */
        while (txh->req_prod - txh->rsp_prod >= NETIF_RING_SLOTS / 2)
            poll(nf.port_bit, 10000000ULL);
        struct netif_tx_request q = {.id = 0xBAD0000 + i, .offset = NETIF_TX_BUF_OFFSET,
                                     .size = 60, .flags = 0};
        switch (i % 5) {
        case 0: q.size = 9000; break;                      /* oversized */
        case 1: q.size = 3; break;                         /* not even a header */
        case 2: q.offset = NETIF_RX_BUF_OFFSET + 16; break; /* outside the tx area */
        case 3: q.offset = 0; break;                       /* the ring itself */
        default: q.flags = 0x7; break;                     /* unknown flags */
        }
        raw_put(txh, nf.tx.slots, &q);
        hypercall1(HC_EVTCHN_SEND, nf.dev.port);
    }
    while (txh->req_prod != txh->rsp_prod)
        poll(nf.port_bit, 10000000ULL);

    /* 3. junk rx requests: buffers outside the rx area (answered with errors, skipped) */
    for (u64 i = 0; i < rxjunk; i++) {
        struct netif_rx_request q = {.id = 0xBADB000 + i, .offset = NETIF_TX_BUF_OFFSET,
                                     .size = NETIF_BUF_SIZE, .flags = 0};
        if (rxh->req_prod - rxh->rsp_prod >= NETIF_RING_SLOTS)
            break;
        raw_put(rxh, nf.rx.slots, &q);
    }
    hypercall1(HC_EVTCHN_SEND, nf.dev.port);

    printf("netjunk: spoofed=%lu junk=%lu rxjunk=%lu sent_ok=%lu\n", (unsigned long)spoof,
           (unsigned long)junk, (unsigned long)rxjunk, (unsigned long)sent_ok);
    console_flush();
    if (breakring) { /* 4. an impossible index: far more requests than the ring holds */
        txh->req_prod = txh->rsp_prod + 1000;
        hypercall1(HC_EVTCHN_SEND, nf.dev.port);
        for (;;)
            poll(0, 1000000000ULL);
    }
    return 0;
}
