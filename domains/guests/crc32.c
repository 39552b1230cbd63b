/* crc32: a compute guest.
 *
 * Params: bytes (default 4194304), seed (default 1), rounds (default 1).
 * Fills a buffer with xorshift64 output (state = seed, or 1 if seed is 0; per
 * byte: state ^= state << 13; state ^= state >> 7; state ^= state << 17;
 * byte = state & 0xff), then computes zlib's CRC-32 over it `rounds` times,
 * timing only the CRC part.  Prints one line:
 *   crc32: bytes=<N> seed=<S> rounds=<R> crc=0x<8 hex> ns=<elapsed>
 */
#include "isovisor.h"

static u32 table[256];

static void make_table(void)
{
    for (u32 i = 0; i < 256; i++) {
        u32 c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        table[i] = c;
    }
}

static u32 crc32(const u8 *p, u64 n)
{
    u32 c = 0xFFFFFFFFu;
    for (u64 i = 0; i < n; i++)
        c = table[(c ^ p[i]) & 0xff] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

int main(void)
{
    u64 bytes = param_u64("bytes", 4194304);
    u64 seed = param_u64("seed", 1);
    u64 rounds = param_u64("rounds", 1);
    if (rounds == 0)
        crash("crc32: rounds must be at least 1");

    u8 *buf = heap_alloc(bytes ? bytes : 1, 64);
    if (!buf)
        crashf("crc32: bytes=%lu does not fit in this domain (%lu bytes free for data,"
               " mem=%lu): lower bytes or give the domain more memory",
               (unsigned long)bytes, (unsigned long)heap_free_bytes(),
               (unsigned long)mem_bytes());

    u64 state = seed ? seed : 1;
    for (u64 i = 0; i < bytes; i++) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        buf[i] = (u8)state;
    }
    make_table();

    u32 crc = 0;
    u64 t0 = time_ns();
    for (u64 r = 0; r < rounds; r++) {
        const u8 *p = buf;
        OPAQUE(p); /* keep every round */
        crc = crc32(p, bytes);
    }
    u64 t1 = time_ns();

    printf("crc32: bytes=%lu seed=%lu rounds=%lu crc=0x%08x ns=%lu\n", (unsigned long)bytes,
           (unsigned long)seed, (unsigned long)rounds, crc, (unsigned long)(t1 - t0));
    return 0;
}
