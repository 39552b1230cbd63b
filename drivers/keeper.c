/* The keeper of a driver process's address space (drivers/keeper.py; docs/recovery.md).
 *
 * A driver process starts it with clone(CLONE_VM): a second process that shares the driver's
 * memory and does nothing but wait for the driver to end.  While it lives, the memory has two
 * users, so a driver that dies (SIGKILL, SIGSEGV, exit) does not tear it down on its way out:
 * its pidfd becomes readable as soon as its files are closed, and the supervisor starts the
 * recovery at once.  The keeper then waits LINGER_NS more, while the recovery runs, and ends: it
 * pays for the teardown, at nice 19.  (Ending at once would start the teardown on the CPU the
 * supervisor is being woken on, just when it should start the recovery.)
 *
 * It runs on a stack of its own inside the driver's address space, with every signal blocked,
 * so it uses raw system calls only: no errno (that would be the driver's thread's), no libc
 * state.  It closes every file it inherited but the driver's pidfd, so it holds no lock, no
 * socket and no segment of the driver's.
 */
#include <poll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>

#define LINGER_NS 250000000L

static long sys3(long n, long a, long b, long c)
{
    long ret;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(n), "D"(a), "S"(b), "d"(c)
                     : "rcx", "r11", "memory");
    return ret;
}

/* arg: the driver's pidfd, inherited (the keeper's copy of the driver's file table). */
int isovisor_keeper(void *arg)
{
    long pidfd = (long)arg;
    struct pollfd p = {.fd = (int)pidfd, .events = POLLIN, .revents = 0};
    struct timespec linger = {.tv_sec = 0, .tv_nsec = LINGER_NS};

    /* named first: once its inherited files are closed (which a test can see as the end of a
     * pipe), it is recognisable */
    sys3(SYS_prctl, PR_SET_NAME, (long)"iv-keeper", 0);
    if (pidfd > 0)
        sys3(SYS_close_range, 0, pidfd - 1, 0);
    sys3(SYS_close_range, pidfd + 1, ~0U, 0);
    sys3(SYS_setpriority, PRIO_PROCESS, 0, 19);
    /* Signals are blocked, so poll returns only when the driver has ended (or on an error,
     * such as a bad pidfd: then end at once, as a keeper without a driver should). */
    if (sys3(SYS_poll, (long)&p, 1, -1) == 1)
        sys3(SYS_nanosleep, (long)&linger, 0, 0);
    sys3(SYS_exit, 0, 0, 0);
    return 0;
}
