/* netecho: a minimal IPv4 host on a vif (ARP, ICMP echo, UDP echo), and a UDP
 * echo client that measures guest-to-guest round trips.
 *
 * Params (the domain's `extra`):
 *   dev=NAME      the interface (default eth0)
 *   ip=A.B.C.D    this host's address (default: the vif's `ip` store node; one
 *                 of the two is required)
 *   port=N        the UDP echo port (default 7)
 *   mode=server|client  (default server)
 *   server mode:
 *     seconds=S   stop after S seconds of virtual time (default 0: run until
 *                 a datagram whose payload is exactly "quit" arrives on port)
 *   client mode:
 *     peer=A.B.C.D  the echo server (required)
 *     count=N     echo requests, one at a time (default 10)
 *     size=S      UDP payload bytes, 8..1472 (default 64)
 *     interval_us=U  at least U us between the starts of two requests
 *                 (default 0)
 *     timeout=MS  wait this long for each echo before counting it lost
 *                 (default 1000)
 *     arp_timeout=MS  give up resolving the peer's MAC after MS ms (default
 *                 10000); an ARP request goes out every 100 ms until then
 *     quit=0|1    at the end, send the server a "quit" datagram (default 0)
 *
 * Both modes answer ARP requests for ip (and remember who asked: a small ARP
 * cache), answer ICMP echo requests (type 8 -> 0, same id, sequence and
 * payload), echo UDP datagrams sent to port back to their sender (addresses
 * and ports swapped, checksum recomputed), and drop everything else.  Input is
 * checked: IPv4 header checksum and lengths, ICMP checksum, UDP length and (if
 * non-zero) checksum; a frame that fails is dropped and counted as bad.
 * Frames shorter than 60 bytes are padded to 60, as on Ethernet.
 *
 * Client request payload (network byte order): +0 u32 magic 0x4E454348
 * ("NECH"), +4 u32 sequence number (0..count-1), then byte i (i >= 8) =
 * (seq * 31 + i * 7) & 0xFF.  An echo counts if it comes from peer:port to the
 * client's port (49152) and its payload equals the request's byte for byte
 * (a different payload is an error; an echo of an earlier, already lost
 * request is ignored).  Round trips are measured with time_ns (virtual time).
 *
 * Output:
 *   netecho: up ip=A.B.C.D mac=xx:xx:xx:xx:xx:xx        (once connected)
 *   netecho: frontend tx_frames=.. tx_errors=.. rx_frames=.. rx_bad=.. kicks=.. waits=.. holds=..
 *   server, last line:
 *     netecho: arp=A icmp=I udp=U dropped=D bad=B errors=E
 *   (A, I, U: requests answered; D: frames dropped, including answers that
 *   found no free tx buffer; B: malformed frames; E: frontend failures and tx
 *   responses with status ERROR)
 *   client, last line:
 *     netecho: client sent=N received=M lost=L rtt_us_median=X rtt_us_p99=Y errors=E
 *   (X, Y: nearest-rank percentiles of the round trips in whole us; E: frontend
 *   failures, tx errors, corrupt echoes, an unresolved peer)
 * Exit code: server 0 if errors == 0; client 0 if errors == 0 and lost == 0;
 * else 1; 2 if the interface cannot be opened or a parameter is bad.
 *
 * Build the packet code alone on the host, with its self-check:
 *   gcc -std=gnu11 -Wall -Wextra -DNETECHO_SELFTEST domains/guests/netecho.c && ./a.out
 */
#ifdef NETECHO_SELFTEST
#include <stdint.h>
#include <stdio.h>
#include <string.h>
typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;
#include "../runtime/netbytes.h"
#else
#include "netfront.h"
#include "netbytes.h"
/* Freestanding code gets no builtin memcpy: ask for it, so small fixed copies are inlined. */
#define memcpy __builtin_memcpy
#endif

/* --- packets: no runtime dependencies --------------------------------------------------- */

#define ETH_HLEN 14
#define ETH_MIN_FRAME 60 /* without the FCS */
#define ETH_MAX_FRAME 1514
#define ETHERTYPE_IPV4 0x0800
#define ETHERTYPE_ARP 0x0806
#define ARP_LEN 28
#define IP_HLEN 20
#define IP_PROTO_ICMP 1
#define IP_PROTO_UDP 17
#define ICMP_HLEN 8
#define UDP_HLEN 8
#define UDP_MAX_PAYLOAD (1500 - IP_HLEN - UDP_HLEN)
#define ARP_CACHE 8

static const u8 BROADCAST[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};


/* RFC 1071: add len bytes as big-endian 16-bit words (an odd last byte is the high half). */
static u64 csum_add(u64 sum, const u8 *p, u32 len)
{
    u32 i = 0;
    for (; i + 1 < len; i += 2)
        sum += (u32)(p[i] << 8 | p[i + 1]);
    if (i < len)
        sum += (u32)p[i] << 8;
    return sum;
}

/* The one's complement of the folded sum: the checksum field value (and 0 when checking a
 * block that includes a correct checksum). */
static u16 csum_fold(u64 sum)
{
    while (sum >> 16)
        sum = (sum & 0xFFFF) + (sum >> 16);
    return (u16)~sum;
}

/* The UDP pseudo-header (RFC 768) plus the datagram. */
static u16 udp_csum(const u8 src[4], const u8 dst[4], const u8 *udp, u32 len)
{
    u64 sum = csum_add(0, src, 4);
    sum = csum_add(sum, dst, 4);
    sum += IP_PROTO_UDP;
    sum += len;
    return csum_fold(csum_add(sum, udp, len));
}

static u32 put_eth(u8 *f, const u8 dst[6], const u8 src[6], u16 type)
{
    memcpy(f, dst, 6);
    memcpy(f + 6, src, 6);
    put16(f + 12, type);
    return ETH_HLEN;
}

/* A 20-byte IPv4 header with its checksum at ip; payload_len bytes follow it. */
static void put_ipv4(u8 *ip, u16 id, u8 proto, const u8 src[4], const u8 dst[4],
                     u32 payload_len)
{
    ip[0] = 0x45; /* version 4, 5 words */
    ip[1] = 0;
    put16(ip + 2, (u16)(IP_HLEN + payload_len));
    put16(ip + 4, id);
    put16(ip + 6, 0x4000); /* don't fragment */
    ip[8] = 64;            /* TTL */
    ip[9] = proto;
    put16(ip + 10, 0);
    memcpy(ip + 12, src, 4);
    memcpy(ip + 16, dst, 4);
    put16(ip + 10, csum_fold(csum_add(0, ip, IP_HLEN)));
}

/* Pad a frame to the Ethernet minimum with zeros; its final length. */
static u32 pad_frame(u8 *f, u32 len)
{
    for (; len < ETH_MIN_FRAME; len++)
        f[len] = 0;
    return len;
}

static u32 build_arp(u8 *f, u16 oper, const u8 eth_dst[6], const u8 sha[6], const u8 spa[4],
                     const u8 tha[6], const u8 tpa[4])
{
    u8 *a = f + put_eth(f, eth_dst, sha, ETHERTYPE_ARP);
    put16(a, 1);              /* hardware: Ethernet */
    put16(a + 2, ETHERTYPE_IPV4);
    a[4] = 6;
    a[5] = 4;
    put16(a + 6, oper);
    memcpy(a + 8, sha, 6);
    memcpy(a + 14, spa, 4);
    memcpy(a + 18, tha, 6);
    memcpy(a + 24, tpa, 4);
    return pad_frame(f, ETH_HLEN + ARP_LEN);
}

/* A UDP datagram in an IPv4 packet in a frame; the frame's length. */
static u32 build_udp(u8 *f, const u8 eth_dst[6], const u8 eth_src[6], const u8 src[4],
                     const u8 dst[4], u16 ip_id, u16 sport, u16 dport, const u8 *payload,
                     u32 len)
{
    u8 *ip = f + put_eth(f, eth_dst, eth_src, ETHERTYPE_IPV4);
    u8 *udp = ip + IP_HLEN;
    put_ipv4(ip, ip_id, IP_PROTO_UDP, src, dst, UDP_HLEN + len);
    put16(udp, sport);
    put16(udp + 2, dport);
    put16(udp + 4, (u16)(UDP_HLEN + len));
    put16(udp + 6, 0);
    memcpy(udp + UDP_HLEN, payload, len);
    u16 c = udp_csum(src, dst, udp, UDP_HLEN + len);
    put16(udp + 6, c ? c : 0xFFFF); /* 0 would mean "no checksum" */
    return pad_frame(f, ETH_HLEN + IP_HLEN + UDP_HLEN + len);
}

struct arp_entry {
    u8 ip[4];
    u8 mac[6];
    u8 used;
};

/* What host_input made of a frame. */
enum verdict {
    V_DROP,        /* not for us, or nothing we answer */
    V_BAD,         /* malformed: truncated, bad lengths or checksums */
    V_ARP_REQUEST, /* an ARP request for our address: *out_len is the reply */
    V_ARP_REPLY,   /* an ARP reply to us: learned */
    V_ICMP_ECHO,   /* an ICMP echo request: *out_len is the reply */
    V_UDP_ECHO,    /* a datagram to our port: *out_len is the echo (h->udp_* describe it) */
    V_UDP_OTHER,   /* a datagram to another port of ours (h->udp_* describe it) */
};

struct host {
    u8 mac[6];
    u8 ip[4];
    u16 port;
    u16 ip_id;
    struct arp_entry arp[ARP_CACHE];
    u32 arp_next;
    /* the last datagram (V_UDP_ECHO / V_UDP_OTHER), pointing into the input frame */
    const u8 *udp_src;
    u16 udp_sport, udp_dport;
    const u8 *udp_payload;
    u32 udp_len;
};

static struct arp_entry *arp_find(struct host *h, const u8 ip[4])
{
    for (u32 i = 0; i < ARP_CACHE; i++)
        if (h->arp[i].used && memcmp(h->arp[i].ip, ip, 4) == 0)
            return &h->arp[i];
    return NULL;
}

/* Remember ip -> mac (replacing the oldest entry when full); create: also when new. */
static void arp_learn(struct host *h, const u8 ip[4], const u8 mac[6], int create)
{
    static const u8 zero[4] = {0, 0, 0, 0};
    if (mac[0] & 1 || memcmp(ip, zero, 4) == 0)
        return; /* a multicast MAC or an address probe: nothing to learn */
    struct arp_entry *e = arp_find(h, ip);
    if (!e) {
        if (!create)
            return;
        e = &h->arp[h->arp_next++ % ARP_CACHE];
        memcpy(e->ip, ip, 4);
        e->used = 1;
    }
    memcpy(e->mac, mac, 6);
}

static enum verdict arp_input(struct host *h, const u8 *f, u32 len, u8 *out, u32 *out_len)
{
    if (len < ETH_HLEN + ARP_LEN)
        return V_BAD;
    const u8 *a = f + ETH_HLEN;
    if (get16(a) != 1 || get16(a + 2) != ETHERTYPE_IPV4 || a[4] != 6 || a[5] != 4)
        return V_DROP;
    u16 oper = get16(a + 6);
    const u8 *sha = a + 8, *spa = a + 14, *tpa = a + 24;
    int for_us = memcmp(tpa, h->ip, 4) == 0;
    arp_learn(h, spa, sha, for_us); /* RFC 826: update if known, add if it is for us */
    if (!for_us)
        return V_DROP;
    if (oper == 2)
        return V_ARP_REPLY;
    if (oper != 1 || sha[0] & 1)
        return V_DROP;
    *out_len = build_arp(out, 2, sha, h->mac, h->ip, sha, spa);
    return V_ARP_REQUEST;
}

static enum verdict icmp_input(struct host *h, const u8 *f, const u8 *ip, const u8 *icmp,
                               u32 len, u8 *out, u32 *out_len)
{
    if (len < ICMP_HLEN)
        return V_BAD;
    if (csum_fold(csum_add(0, icmp, len)) != 0)
        return V_BAD;
    if (icmp[0] != 8 || icmp[1] != 0)
        return V_DROP;
    u8 *rip = out + put_eth(out, f + 6, h->mac, ETHERTYPE_IPV4);
    put_ipv4(rip, h->ip_id++, IP_PROTO_ICMP, h->ip, ip + 12, len);
    u8 *r = rip + IP_HLEN;
    memcpy(r, icmp, len);
    r[0] = 0; /* echo reply */
    r[1] = 0;
    put16(r + 2, 0);
    put16(r + 2, csum_fold(csum_add(0, r, len)));
    *out_len = pad_frame(out, ETH_HLEN + IP_HLEN + len);
    return V_ICMP_ECHO;
}

static enum verdict udp_input(struct host *h, const u8 *f, const u8 *ip, const u8 *udp,
                              u32 len, u8 *out, u32 *out_len)
{
    if (len < UDP_HLEN)
        return V_BAD;
    u32 ulen = get16(udp + 4);
    if (ulen < UDP_HLEN || ulen > len)
        return V_BAD;
    if (get16(udp + 6) != 0 && udp_csum(ip + 12, ip + 16, udp, ulen) != 0)
        return V_BAD;
    h->udp_src = ip + 12;
    h->udp_sport = get16(udp);
    h->udp_dport = get16(udp + 2);
    h->udp_payload = udp + UDP_HLEN;
    h->udp_len = ulen - UDP_HLEN;
    if (h->udp_dport != h->port)
        return V_UDP_OTHER;
    *out_len = build_udp(out, f + 6, h->mac, h->ip, ip + 12, h->ip_id++, h->port, h->udp_sport,
                         h->udp_payload, h->udp_len);
    return V_UDP_ECHO;
}

/* Look at one frame; an answer, if any, is built in out (ETH_MAX_FRAME bytes) and *out_len
 * set (0: none). */
static enum verdict host_input(struct host *h, const u8 *f, u32 len, u8 *out, u32 *out_len)
{
    *out_len = 0;
    if (len < ETH_HLEN)
        return V_BAD;
    if (memcmp(f, h->mac, 6) != 0 && memcmp(f, BROADCAST, 6) != 0)
        return V_DROP;
    u16 type = get16(f + 12);
    if (type == ETHERTYPE_ARP)
        return arp_input(h, f, len, out, out_len);
    if (type != ETHERTYPE_IPV4)
        return V_DROP;
    const u8 *ip = f + ETH_HLEN;
    u32 avail = len - ETH_HLEN;
    if (avail < IP_HLEN || ip[0] >> 4 != 4)
        return V_BAD;
    u32 hlen = (u32)(ip[0] & 0xF) * 4, total = get16(ip + 2);
    if (hlen < IP_HLEN || hlen > avail || csum_fold(csum_add(0, ip, hlen)) != 0 ||
        total < hlen || total > avail)
        return V_BAD;
    if (memcmp(ip + 16, h->ip, 4) != 0)
        return V_DROP;
    if (get16(ip + 6) & 0x3FFF)
        return V_DROP; /* a fragment (more fragments, or an offset): not reassembled */
    u32 src = get32(ip + 12);
    if (src == 0 || src == 0xFFFFFFFFu || (ip[12] & 0xF0) == 0xE0)
        return V_DROP; /* no unicast sender to answer */
    if (ip[9] == IP_PROTO_ICMP)
        return icmp_input(h, f, ip, ip + hlen, total - hlen, out, out_len);
    if (ip[9] == IP_PROTO_UDP)
        return udp_input(h, f, ip, ip + hlen, total - hlen, out, out_len);
    return V_DROP;
}

/* The client's request payload: magic, seq, pattern (see the header comment). */
#define ECHO_MAGIC 0x4E454348u
#define CLIENT_PORT 49152

static void fill_payload(u8 *p, u32 size, u32 seq)
{
    put32(p, ECHO_MAGIC);
    put32(p + 4, seq);
    for (u32 i = 8; i < size; i++)
        p[i] = (u8)(seq * 31 + i * 7);
}

#ifdef NETECHO_SELFTEST
/* --- host self-check of the packet code ------------------------------------------------- */

static int failures;

#define CHECK(cond)                                                                              \
    do {                                                                                         \
        if (!(cond)) {                                                                           \
            printf("FAIL line %d: %s\n", __LINE__, #cond);                                       \
            failures++;                                                                          \
        }                                                                                        \
    } while (0)

static void hex(const char *what, const u8 *p, u32 n)
{
    printf("%s ", what);
    for (u32 i = 0; i < n; i++)
        printf("%02x", p[i]);
    printf("\n");
}

int main(void)
{
    struct host h;
    memset(&h, 0, sizeof h);
    const u8 mac[6] = {0x02, 0, 0, 0, 0, 0x01}, peer_mac[6] = {0x02, 0, 0, 0, 0, 0x02};
    const u8 ip[4] = {198, 18, 0, 2}, peer_ip[4] = {198, 18, 0, 3};
    const u8 zero6[6] = {0};
    memcpy(h.mac, mac, 6);
    memcpy(h.ip, ip, 4);
    h.port = 7;
    h.ip_id = 0x1234;
    u8 in[ETH_MAX_FRAME], out[ETH_MAX_FRAME];
    u32 n, olen;

    /* RFC 1071 example: words 0001 f203 f4f5 f6f7 sum to ddf2 (checksum 220d) */
    const u8 rfc[8] = {0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7};
    CHECK(csum_fold(csum_add(0, rfc, 8)) == 0x220d);
    /* a textbook IPv4 header (Wikipedia, "IPv4 header checksum"): checksum b861 */
    const u8 wiki[20] = {0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11,
                         0xb8, 0x61, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7};
    CHECK(csum_fold(csum_add(0, wiki, 20)) == 0);
    u8 w2[20];
    memcpy(w2, wiki, 20);
    put16(w2 + 10, 0);
    CHECK(csum_fold(csum_add(0, w2, 20)) == 0xb861);

    /* ARP request from the peer -> reply */
    n = build_arp(in, 1, BROADCAST, peer_mac, peer_ip, zero6, ip);
    CHECK(n == 60);
    hex("arp_request", in, n);
    CHECK(host_input(&h, in, n, out, &olen) == V_ARP_REQUEST);
    CHECK(olen == 60 && memcmp(out, peer_mac, 6) == 0 && memcmp(out + 6, mac, 6) == 0);
    CHECK(get16(out + 12) == ETHERTYPE_ARP && get16(out + 20) == 2);
    CHECK(memcmp(out + 22, mac, 6) == 0 && memcmp(out + 28, ip, 4) == 0);
    CHECK(memcmp(out + 32, peer_mac, 6) == 0 && memcmp(out + 38, peer_ip, 4) == 0);
    hex("arp_reply", out, olen);
    CHECK(arp_find(&h, peer_ip) && memcmp(arp_find(&h, peer_ip)->mac, peer_mac, 6) == 0);
    /* an ARP request for someone else is dropped (and teaches nothing new) */
    const u8 other_ip[4] = {198, 18, 0, 9}, other_mac[6] = {0x02, 9, 9, 9, 9, 9};
    n = build_arp(in, 1, BROADCAST, other_mac, other_ip, zero6, peer_ip);
    CHECK(host_input(&h, in, n, out, &olen) == V_DROP && olen == 0);
    CHECK(!arp_find(&h, other_ip));
    /* truncated ARP */
    CHECK(host_input(&h, in, ETH_HLEN + 20, out, &olen) == V_BAD);

    /* ICMP echo request (id 0x4242, seq 7, 56 bytes of payload) -> reply */
    {
        u8 *ipp = in + put_eth(in, mac, peer_mac, ETHERTYPE_IPV4);
        u32 icmp_len = ICMP_HLEN + 56;
        put_ipv4(ipp, 0x0101, IP_PROTO_ICMP, peer_ip, ip, icmp_len);
        u8 *ic = ipp + IP_HLEN;
        ic[0] = 8;
        ic[1] = 0;
        put16(ic + 2, 0);
        put16(ic + 4, 0x4242);
        put16(ic + 6, 7);
        for (u32 i = 0; i < 56; i++)
            ic[8 + i] = (u8)(i + 0x10);
        put16(ic + 2, csum_fold(csum_add(0, ic, icmp_len)));
        n = ETH_HLEN + IP_HLEN + icmp_len;
        hex("icmp_request", in, n);
        CHECK(host_input(&h, in, n, out, &olen) == V_ICMP_ECHO);
        CHECK(olen == n);
        hex("icmp_reply", out, olen);
        const u8 *rip = out + ETH_HLEN, *ric = rip + IP_HLEN;
        CHECK(memcmp(out, peer_mac, 6) == 0 && memcmp(out + 6, mac, 6) == 0);
        CHECK(csum_fold(csum_add(0, rip, IP_HLEN)) == 0);
        CHECK(memcmp(rip + 12, ip, 4) == 0 && memcmp(rip + 16, peer_ip, 4) == 0);
        CHECK(get16(rip + 2) == IP_HLEN + icmp_len && rip[9] == IP_PROTO_ICMP);
        CHECK(ric[0] == 0 && ric[1] == 0 && get16(ric + 4) == 0x4242 && get16(ric + 6) == 7);
        CHECK(memcmp(ric + 8, ic + 8, 56) == 0);
        CHECK(csum_fold(csum_add(0, ric, icmp_len)) == 0);
        /* the reply's ICMP checksum is the request's + 0x0800 (type 8 -> 0), RFC 1624 */
        u32 inc = (u32)get16(ic + 2) + 0x0800;
        CHECK(get16(ric + 2) == (u16)((inc & 0xFFFF) + (inc >> 16)));
        /* a corrupted IP header checksum is bad */
        in[ETH_HLEN + 10] ^= 1;
        CHECK(host_input(&h, in, n, out, &olen) == V_BAD && olen == 0);
        in[ETH_HLEN + 10] ^= 1;
        /* a corrupted ICMP payload byte is bad */
        in[n - 1] ^= 0x40;
        CHECK(host_input(&h, in, n, out, &olen) == V_BAD);
        in[n - 1] ^= 0x40;
        /* an IP total length beyond the frame is bad */
        CHECK(host_input(&h, in, n - 1, out, &olen) == V_BAD);
        /* addressed to another IP: dropped */
        ipp[19] = 99;
        put16(ipp + 10, 0);
        put16(ipp + 10, csum_fold(csum_add(0, ipp, IP_HLEN)));
        CHECK(host_input(&h, in, n, out, &olen) == V_DROP);
    }

    /* UDP echo: a datagram to port 7 comes back with addresses and ports swapped */
    {
        u8 payload[100];
        fill_payload(payload, sizeof payload, 3);
        n = build_udp(in, mac, peer_mac, peer_ip, ip, 0x2222, CLIENT_PORT, 7, payload,
                      sizeof payload);
        hex("udp_request", in, n);
        const u8 *uu = in + ETH_HLEN + IP_HLEN;
        CHECK(udp_csum(peer_ip, ip, uu, UDP_HLEN + sizeof payload) == 0);
        CHECK(host_input(&h, in, n, out, &olen) == V_UDP_ECHO);
        CHECK(olen == n && h.udp_len == sizeof payload && h.udp_sport == CLIENT_PORT);
        hex("udp_reply", out, olen);
        const u8 *rip = out + ETH_HLEN, *ru = rip + IP_HLEN;
        CHECK(memcmp(out, peer_mac, 6) == 0 && csum_fold(csum_add(0, rip, IP_HLEN)) == 0);
        CHECK(memcmp(rip + 12, ip, 4) == 0 && memcmp(rip + 16, peer_ip, 4) == 0);
        CHECK(get16(ru) == 7 && get16(ru + 2) == CLIENT_PORT);
        CHECK(get16(ru + 4) == UDP_HLEN + sizeof payload);
        CHECK(udp_csum(ip, peer_ip, ru, UDP_HLEN + sizeof payload) == 0);
        CHECK(memcmp(ru + UDP_HLEN, payload, sizeof payload) == 0);
        /* the client sees the reply as a datagram to its port */
        struct host c;
        memset(&c, 0, sizeof c);
        memcpy(c.mac, peer_mac, 6);
        memcpy(c.ip, peer_ip, 4);
        c.port = 7;
        CHECK(host_input(&c, out, olen, in, &n) == V_UDP_OTHER && n == 0);
        CHECK(c.udp_sport == 7 && c.udp_dport == CLIENT_PORT && c.udp_len == sizeof payload);
        CHECK(memcmp(c.udp_payload, payload, sizeof payload) == 0);
        /* a wrong UDP checksum is bad; checksum 0 means none */
        u8 bad[ETH_MAX_FRAME];
        memcpy(bad, out, olen);
        bad[ETH_HLEN + IP_HLEN + UDP_HLEN] ^= 1;
        CHECK(host_input(&c, bad, olen, in, &n) == V_BAD);
        put16(bad + ETH_HLEN + IP_HLEN + 6, 0);
        CHECK(host_input(&c, bad, olen, in, &n) == V_UDP_OTHER);
        /* a short datagram (4-byte payload) is padded to 60 bytes and still parsed right */
        n = build_udp(in, mac, peer_mac, peer_ip, ip, 1, 5000, 7, (const u8 *)"quit", 4);
        CHECK(n == 60);
        CHECK(host_input(&h, in, n, out, &olen) == V_UDP_ECHO && h.udp_len == 4);
        CHECK(memcmp(h.udp_payload, "quit", 4) == 0 && olen == 60);
    }
    /* other EtherTypes, other MACs, runts */
    memset(in, 0, 60);
    memcpy(in, mac, 6);
    put16(in + 12, 0x86DD);
    CHECK(host_input(&h, in, 60, out, &olen) == V_DROP);
    memcpy(in, other_mac, 6);
    put16(in + 12, ETHERTYPE_IPV4);
    CHECK(host_input(&h, in, 60, out, &olen) == V_DROP);
    CHECK(host_input(&h, in, 10, out, &olen) == V_BAD);

    if (failures)
        printf("netecho selftest: %d FAILED\n", failures);
    else
        printf("netecho selftest: ok\n");
    return failures != 0;
}

#else /* the guest program -------------------------------------------------------------- */

#define NS_PER_MS 1000000ULL
#define ARP_RETRY_NS (100 * NS_PER_MS)

static struct netfront nf;
static struct host host;
static u8 reply[ETH_MAX_FRAME + 2] __attribute__((aligned(16)));
static u8 frame[ETH_MAX_FRAME + 2] __attribute__((aligned(16)));
static u64 n_arp, n_icmp, n_udp, n_dropped, n_bad, errors;
static int quit_seen;

/* client state */
static int client;
static u8 peer_ip[4];
static u8 expect_payload[UDP_MAX_PAYLOAD];
static u32 expect_len, expect_seq;
static int awaiting, echo_got;
static u64 echo_ns, late, corrupt;

static NORETURN void bad_param(const char *msg)
{
    printf("netecho: error: %s\n", msg);
    exit(2);
}

static void answer(u32 len)
{
    int r = netfront_send(&nf, reply, len);
    if (r == NETFRONT_E_BUSY)
        n_dropped++; /* every tx buffer in flight: dropped, as a busy NIC would */
    else if (r < 0)
        errors++;
}

static void client_datagram(void)
{
    if (memcmp(host.udp_src, peer_ip, 4) != 0 || host.udp_sport != host.port ||
        host.udp_dport != CLIENT_PORT) {
        n_dropped++;
        return;
    }
    u32 seq = host.udp_len >= 8 ? get32(host.udp_payload + 4) : ~0u;
    if (awaiting && seq == expect_seq) {
        if (host.udp_len != expect_len ||
            memcmp(host.udp_payload, expect_payload, expect_len) != 0) {
            corrupt++;
            errors++;
            printf("netecho: echo %u is corrupt (%u bytes, want %u)\n", seq, host.udp_len,
                   expect_len);
            return;
        }
        echo_ns = time_ns();
        echo_got = 1;
        awaiting = 0;
    } else if (host.udp_len >= 8 && get32(host.udp_payload) == ECHO_MAGIC && seq < expect_seq) {
        late++; /* the echo of a request already counted lost */
    } else {
        n_dropped++;
    }
}

static void on_frame(void *ctx, const u8 *f, u32 len)
{
    (void)ctx;
    u32 olen;
    switch (host_input(&host, f, len, reply, &olen)) {
    case V_BAD:
        n_bad++;
        break;
    case V_DROP:
        n_dropped++;
        break;
    case V_ARP_REQUEST:
        n_arp++;
        answer(olen);
        break;
    case V_ARP_REPLY:
        break;
    case V_ICMP_ECHO:
        n_icmp++;
        answer(olen);
        break;
    case V_UDP_ECHO:
        n_udp++;
        answer(olen);
        if (!client && host.udp_len == 4 && memcmp(host.udp_payload, "quit", 4) == 0)
            quit_seen = 1;
        break;
    case V_UDP_OTHER:
        if (client)
            client_datagram();
        else
            n_dropped++;
        break;
    }
}

/* Serve the interface until deadline (virtual ns; POLL_FOREVER: no limit) or until *until
 * becomes non-zero.  0, or -1 after a frontend failure (counted). */
static int serve(u64 deadline, const int *until)
{
    for (;;) {
        int n = netfront_poll(&nf, on_frame, NULL);
        netfront_push(&nf);
        if (n < 0) {
            errors++;
            printf("netecho: the frontend failed (%d)\n", n);
            return -1;
        }
        if (until && *until)
            return 0;
        u64 now = time_ns();
        if (deadline != POLL_FOREVER && now >= deadline)
            return 0;
        if (n > 0)
            continue;
        int w = netfront_wait(&nf, deadline == POLL_FOREVER ? POLL_FOREVER : deadline - now);
        if (w == NETFRONT_E_FAILED) {
            errors++;
            printf("netecho: the frontend failed while waiting\n");
            return -1;
        }
    }
}

/* Queue a frame, serving rx while every tx buffer is in flight (for at most
 * SEND_LIMIT_NS).  0, or -1 (counted). */
#define SEND_LIMIT_NS (30000 * NS_PER_MS)
static int send_frame(const u8 *f, u32 len)
{
    u64 limit = 0;
    for (;;) {
        int r = netfront_send(&nf, f, len);
        if (r == 0) {
            netfront_push(&nf);
            return 0;
        }
        if (r != NETFRONT_E_BUSY) {
            errors++;
            printf("netecho: send failed (%d)\n", r);
            return -1;
        }
        int n = netfront_poll(&nf, on_frame, NULL);
        if (n < 0) {
            errors++;
            printf("netecho: the frontend failed (%d)\n", n);
            return -1;
        }
        u64 now = time_ns();
        if (!limit)
            limit = now + SEND_LIMIT_NS;
        if (now >= limit) {
            errors++;
            printf("netecho: no tx buffer came free within %lu ms\n",
                   (unsigned long)(SEND_LIMIT_NS / NS_PER_MS));
            return -1;
        }
        if (n == 0 && !netfront_tx_ready(&nf) &&
            netfront_wait(&nf, limit - now) == NETFRONT_E_FAILED) {
            errors++;
            return -1;
        }
    }
}

static void print_frontend(void)
{
    printf("netecho: frontend tx_frames=%lu tx_errors=%lu rx_frames=%lu rx_bad=%lu kicks=%lu "
           "waits=%lu holds=%lu upcalls=%lu\n",
           (unsigned long)nf.tx_frames, (unsigned long)nf.tx_errors,
           (unsigned long)nf.rx_frames, (unsigned long)nf.rx_bad, (unsigned long)nf.kicks,
           (unsigned long)nf.waits, (unsigned long)nf.holds, (unsigned long)nf.upcalls);
}

static void sort_u64(u64 *a, u64 n)
{
    static const u64 gaps[] = {701, 301, 132, 57, 23, 10, 4, 1};
    for (u64 g = 0; g < sizeof gaps / sizeof gaps[0]; g++) {
        u64 gap = gaps[g];
        for (u64 i = gap; i < n; i++) {
            u64 v = a[i], j = i;
            for (; j >= gap && a[j - gap] > v; j -= gap)
                a[j] = a[j - gap];
            a[j] = v;
        }
    }
}

/* Nearest-rank percentile of sorted a[0..n): a[ceil(p/100 * n) - 1]. */
static u64 percentile(const u64 *a, u64 n, u64 p)
{
    if (!n)
        return 0;
    u64 rank = (p * n + 99) / 100;
    return a[rank ? rank - 1 : 0];
}

static int run_client(void)
{
    u64 count = param_u64("count", 10);
    u64 size = param_u64("size", 64);
    u64 interval_ns = param_u64("interval_us", 0) * 1000;
    u64 timeout_ns = param_u64("timeout", 1000) * NS_PER_MS;
    u64 arp_timeout_ns = param_u64("arp_timeout", 10000) * NS_PER_MS;
    int send_quit = param_u64("quit", 0) != 0;
    char text[32];
    if (!param_str("peer", NULL, text, sizeof text))
        bad_param("client mode needs peer=A.B.C.D");
    if (netfront_parse_ipv4(text, peer_ip) < 0)
        bad_param("peer must be an IPv4 address like 198.18.0.3");
    if (size < 8 || size > UDP_MAX_PAYLOAD)
        bad_param("size must be 8..1472 (UDP payload bytes)");
    if (count > 1000000)
        bad_param("count must be at most 1000000");
    u64 *rtt = heap_alloc((count ? count : 1) * sizeof(u64), 8);
    if (!rtt)
        bad_param("count is too large for this domain's memory");

    /* resolve the peer */
    u64 t_end = time_ns() + arp_timeout_ns;
    struct arp_entry *pe = arp_find(&host, peer_ip);
    int resolved = pe != NULL;
    while (!resolved) {
        static const u8 zero6[6] = {0, 0, 0, 0, 0, 0};
        u32 n = build_arp(frame, 1, BROADCAST, host.mac, host.ip, zero6, peer_ip);
        if (send_frame(frame, n) < 0)
            break;
        u64 now = time_ns();
        u64 until = now + ARP_RETRY_NS < t_end ? now + ARP_RETRY_NS : t_end;
        /* serve until the retry time, checking the cache after each poll */
        while (!(pe = arp_find(&host, peer_ip)) && time_ns() < until) {
            int n2 = netfront_poll(&nf, on_frame, NULL);
            if (n2 < 0) {
                errors++;
                break;
            }
            if (n2 == 0) {
                u64 t = time_ns();
                if (t < until)
                    netfront_wait(&nf, until - t);
            }
        }
        resolved = pe != NULL;
        if (resolved || nf.failed || time_ns() >= t_end)
            break;
    }
    char peer_text[16];
    netfront_format_ipv4(peer_ip, peer_text);
    if (!resolved) {
        errors++;
        printf("netecho: client cannot resolve %s: no ARP reply within %lu ms\n", peer_text,
               (unsigned long)(arp_timeout_ns / NS_PER_MS));
        print_frontend();
        printf("netecho: client sent=0 received=0 lost=0 rtt_us_median=0 rtt_us_p99=0 "
               "errors=%lu\n", (unsigned long)errors);
        return 1;
    }
    u8 peer_mac[6];
    memcpy(peer_mac, pe->mac, 6);
    char mac_text[18];
    printf("netecho: client peer=%s mac=%s port=%u count=%lu size=%lu\n", peer_text,
           netfront_format_mac(peer_mac, mac_text), host.port, (unsigned long)count,
           (unsigned long)size);

    u64 sent = 0, received = 0, lost = 0;
    for (u64 i = 0; i < count && !nf.failed; i++) {
        u64 start = time_ns();
        expect_seq = (u32)i;
        expect_len = (u32)size;
        fill_payload(expect_payload, expect_len, expect_seq);
        u32 n = build_udp(frame, peer_mac, host.mac, host.ip, peer_ip, host.ip_id++,
                          CLIENT_PORT, host.port, expect_payload, expect_len);
        echo_got = 0;
        awaiting = 1;
        u64 t0 = time_ns();
        if (send_frame(frame, n) < 0)
            break;
        sent++;
        if (serve(t0 + timeout_ns, &echo_got) < 0)
            break;
        if (echo_got) {
            rtt[received++] = echo_ns - t0;
        } else {
            lost++;
            awaiting = 0;
        }
        if (interval_ns && i + 1 < count && serve(start + interval_ns, NULL) < 0)
            break;
    }
    lost += count - sent; /* not sent: the run stopped early (counted in errors) */
    if (send_quit && !nf.failed) {
        u32 n = build_udp(frame, peer_mac, host.mac, host.ip, peer_ip, host.ip_id++,
                          CLIENT_PORT, host.port, (const u8 *)"quit", 4);
        send_frame(frame, n);
    }
    /* let the tx responses in (and finish answering) before the domain goes */
    u64 drain_end = time_ns() + 100 * NS_PER_MS;
    while (netfront_tx_inflight(&nf) && !nf.failed && time_ns() < drain_end)
        if (netfront_poll(&nf, on_frame, NULL) == 0)
            netfront_wait_tx(&nf, 10 * NS_PER_MS);
    errors += nf.tx_errors;
    sort_u64(rtt, received);
    print_frontend();
    if (late)
        printf("netecho: %lu echoes arrived after their request was counted lost\n",
               (unsigned long)late);
    printf("netecho: client sent=%lu received=%lu lost=%lu rtt_us_median=%lu rtt_us_p99=%lu "
           "errors=%lu\n",
           (unsigned long)sent, (unsigned long)received, (unsigned long)lost,
           (unsigned long)(percentile(rtt, received, 50) / 1000),
           (unsigned long)(percentile(rtt, received, 99) / 1000), (unsigned long)errors);
    return errors || lost ? 1 : 0;
}

static int run_server(void)
{
    u64 seconds = param_u64("seconds", 0);
    u64 end = seconds ? time_ns() + seconds * 1000 * NS_PER_MS : POLL_FOREVER;
    serve(end, &quit_seen);
    /* the answer to "quit" (and any other) is queued: let the backend take it */
    u64 drain_end = time_ns() + 100 * NS_PER_MS;
    while (netfront_tx_inflight(&nf) && !nf.failed && time_ns() < drain_end)
        if (netfront_poll(&nf, on_frame, NULL) == 0)
            netfront_wait_tx(&nf, 10 * NS_PER_MS);
    errors += nf.tx_errors;
    print_frontend();
    printf("netecho: arp=%lu icmp=%lu udp=%lu dropped=%lu bad=%lu errors=%lu\n",
           (unsigned long)n_arp, (unsigned long)n_icmp, (unsigned long)n_udp,
           (unsigned long)n_dropped, (unsigned long)n_bad, (unsigned long)errors);
    return errors ? 1 : 0;
}

int main(void)
{
    char dev[DE_NAME_MAX], mode[16], text[32];
    const char *want = param_str("dev", "eth0", dev, sizeof dev);
    const char *m = param_str("mode", "server", mode, sizeof mode);
    if (strcmp(m, "server") == 0)
        client = 0;
    else if (strcmp(m, "client") == 0)
        client = 1;
    else
        bad_param("mode must be server or client");
    u64 port = param_u64("port", 7);
    if (port == 0 || port > 65535)
        bad_param("port must be 1..65535");

    int r = netfront_open(&nf, want, 0);
    if (r < 0) {
        printf("netecho: cannot open %s (error %d)\n", want, r);
        exit(2);
    }
    memcpy(host.mac, nf.mac, 6);
    host.port = (u16)port;
    host.ip_id = (u16)(domid() << 8);
    if (param_str("ip", NULL, text, sizeof text)) {
        if (netfront_parse_ipv4(text, host.ip) < 0)
            bad_param("ip must be an IPv4 address like 198.18.0.2");
    } else if (nf.has_ip) {
        memcpy(host.ip, nf.ip, 4);
    } else {
        bad_param("no IPv4 address: give ip=A.B.C.D, or ip= in the domain's vif entry");
    }
    char ip_text[16];
    printf("netecho: up ip=%s mac=%s\n", netfront_format_ipv4(host.ip, ip_text), nf.mac_str);
    return client ? run_client() : run_server();
}

#endif /* NETECHO_SELFTEST */
