/* isovisor guest runtime: network byte order (big-endian) loads and stores at any alignment,
 * for the guests that build and parse frames (netecho, netpair).  Needs only u8, u16 and u32,
 * so netecho's host-side self-test can include it too. */
#ifndef ISOVISOR_NETBYTES_H
#define ISOVISOR_NETBYTES_H

static inline u16 get16(const u8 *p) { return (u16)(p[0] << 8 | p[1]); }

static inline u32 get32(const u8 *p)
{
    return (u32)p[0] << 24 | (u32)p[1] << 16 | (u32)p[2] << 8 | (u32)p[3];
}

static inline void put16(u8 *p, u16 v)
{
    p[0] = (u8)(v >> 8);
    p[1] = (u8)v;
}

static inline void put32(u8 *p, u32 v)
{
    p[0] = (u8)(v >> 24);
    p[1] = (u8)(v >> 16);
    p[2] = (u8)(v >> 8);
    p[3] = (u8)v;
}

#endif
