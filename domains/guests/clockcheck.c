/* clockcheck: reads the clock continuously and reports whether it ever went
 * backwards, and its largest forward jump between two reads.
 *
 * Every report_ms (default 100) of virtual time it prints
 *   clockcheck: report <k> reads=<n> backward=<b> maxjump_ns=<j>
 *               maxwall_ns=<w> epoch=<e> wall_s=<unix seconds> hc_behind=<h>
 * (one line), and after `seconds` (0: run until stopped) a last line
 *   clockcheck: done reads=<n> backward=<b> maxjump_ns=<j> maxwall_ns=<w>
 *               epoch=<e> hc_behind=<h>
 * then exits 0.  The monotonic clock (time_ns) leaves out the time the guest
 * was paused, saved or moving, so maxjump stays small across a migration; the
 * wall clock does not, so maxwall is the guest's own measure of its downtime.  A backward step is a read smaller than the read before it;
 * hc_behind counts HC_TIME answers (asked every 1024 reads) smaller than the
 * time_ns read just before them: the kernel's clock and the guest's must agree.
 * A save, restore or migration shows as a change of epoch, reported at once as
 *   clockcheck: moved epoch=<e> gap_ns=<wall-clock gap across the move>
 * the guest's own measure of how long it was stopped.
 */
#include "isovisor.h"

int main(void)
{
    u64 report_ns = param_u64("report_ms", 100) * 1000000ULL;
    u64 seconds = param_u64("seconds", 0);
    u64 reads = 0, backward = 0, maxjump = 0, hc_behind = 0, maxwall = 0;
    u64 start = time_ns(), last = start, next_report = start + report_ns;
    u64 last_wall = wall_time_ns(), epoch = clock_epoch();
    for (u64 k = 1;;) {
        u64 now = time_ns(), wall = wall_time_ns();
        reads++;
        if (clock_epoch() != epoch) {
            epoch = clock_epoch();
            printf("clockcheck: moved epoch=%lu gap_ns=%lu\n", (unsigned long)epoch,
                   (unsigned long)(wall > last_wall ? wall - last_wall : 0));
            now = time_ns();
            wall = wall_time_ns();
        }
        if (now < last)
            backward++;
        else if (now - last > maxjump)
            maxjump = now - last;
        if (wall > last_wall && wall - last_wall > maxwall)
            maxwall = wall - last_wall;
        last = now;
        last_wall = wall;
        if ((reads & 1023) == 0) {
            u64 hc = clock_hypercall_ns();
            if (hc < now)
                hc_behind++;
            last = hc > last ? hc : last;
        }
        if (now >= next_report) {
            printf("clockcheck: report %lu reads=%lu backward=%lu maxjump_ns=%lu maxwall_ns=%lu "
                   "epoch=%lu wall_s=%lu hc_behind=%lu\n",
                   (unsigned long)k, (unsigned long)reads, (unsigned long)backward,
                   (unsigned long)maxjump, (unsigned long)maxwall, (unsigned long)clock_epoch(),
                   (unsigned long)(wall_time_ns() / 1000000000ULL), (unsigned long)hc_behind);
            k++;
            next_report += report_ns;
            if (next_report <= now)
                next_report = now + report_ns;
            last = time_ns(); /* printing is not a jump of the clock */
            last_wall = wall_time_ns();
        }
        if (seconds && now - start >= seconds * 1000000000ULL)
            break;
    }
    printf("clockcheck: done reads=%lu backward=%lu maxjump_ns=%lu maxwall_ns=%lu epoch=%lu "
           "hc_behind=%lu\n",
           (unsigned long)reads, (unsigned long)backward, (unsigned long)maxjump,
           (unsigned long)maxwall, (unsigned long)clock_epoch(), (unsigned long)hc_behind);
    return 0;
}
