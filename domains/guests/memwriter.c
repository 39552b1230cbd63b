/* memwriter: dirties memory at a set rate over a writable working set, and
 * checks at the end that every page holds what it last wrote (as Clark et
 * al.'s MMuncher, for measuring live migration).
 *
 * Parameters: wws_kib (default 1024): the working set; rate (pages per ms of
 * virtual time, default 0 = as fast as it can); seconds (default 5, virtual);
 * report_ms (default 500).  Each write stamps three words of a page (first,
 * middle, last) with a value derived from the page and its generation, and
 * records it in a table; so a page the migration lost or sent stale shows up.
 * Lines:
 *   memwriter: report <k> written=<pages written so far> passes=<p>
 *   memwriter: moved epoch=<e> gap_ns=<wall-clock gap>   (after each move)
 *   memwriter: done written=<n> pages=<wws pages> errors=<e>
 * then exits 0 if errors=0, else 1.
 */
#include "isovisor.h"

#define PAGE 4096ULL

static inline u64 stamp(u64 page, u64 gen) { return (gen << 32) ^ (page * 0x9E3779B97F4A7C15ULL); }

int main(void)
{
    u64 wws = param_u64("wws_kib", 1024) * 1024;
    u64 rate = param_u64("rate", 0);
    u64 seconds = param_u64("seconds", 5);
    u64 report_ns = param_u64("report_ms", 500) * 1000000ULL;
    u64 pages = wws / PAGE;
    if (pages == 0)
        crash("memwriter: wws_kib must be at least 4");
    u64 *expect = heap_alloc(pages * 8, 8);
    u8 *area = heap_alloc(pages * PAGE, PAGE);
    if (!expect || !area)
        crashf("memwriter: %lu KiB does not fit: give the domain more memory",
               (unsigned long)(wws / 1024));
    memset(expect, 0, pages * 8);
    memset(area, 0, pages * PAGE);
    u64 t0 = time_ns(), next_report = t0 + report_ns, end = t0 + seconds * 1000000000ULL;
    u64 written = 0, page = 0, gen = 1, k = 1, epoch = clock_epoch(), last_wall = wall_time_ns();
    for (;;) {
        u64 now = time_ns(), wall = wall_time_ns();
        if (now >= end)
            break;
        if (clock_epoch() != epoch) {
            epoch = clock_epoch();
            printf("memwriter: moved epoch=%lu gap_ns=%lu\n", (unsigned long)epoch,
                   (unsigned long)(wall > last_wall ? wall - last_wall : 0));
            wall = wall_time_ns();
        }
        last_wall = wall;
        if (now >= next_report) {
            printf("memwriter: report %lu written=%lu passes=%lu\n", (unsigned long)k++,
                   (unsigned long)written, (unsigned long)(gen - 1));
            next_report += report_ns;
        }
        if (rate && written >= rate * ((now - t0) / 1000000ULL + 1)) {
            sleep_ns(200000); /* ahead of the rate: wait a little */
            continue;
        }
        for (int burst = 0; burst < 64; burst++) {
            u64 v = stamp(page, gen);
            volatile u64 *w = (volatile u64 *)(area + page * PAGE);
            w[0] = v;
            w[PAGE / 16] = v;
            w[PAGE / 8 - 1] = v;
            expect[page] = v;
            written++;
            if (++page == pages) {
                page = 0;
                gen++;
            }
        }
    }
    u64 errors = 0;
    for (u64 p = 0; p < pages; p++) {
        const u64 *w = (const u64 *)(area + p * PAGE);
        if (w[0] != expect[p] || w[PAGE / 16] != expect[p] || w[PAGE / 8 - 1] != expect[p]) {
            if (errors < 5)
                printf("memwriter: page %lu holds %lx, expected %lx\n", (unsigned long)p,
                       (unsigned long)w[0], (unsigned long)expect[p]);
            errors++;
        }
    }
    printf("memwriter: done written=%lu pages=%lu errors=%lu\n", (unsigned long)written,
           (unsigned long)pages, (unsigned long)errors);
    return errors ? 1 : 0;
}
