/* conecho: console output and input through a console driver (docs/console.md).
 *
 * Parameters (extra):
 *   lines=N     print N numbered lines first (default 0):
 *                 conecho: line 000000042 abcdefghijklmnopqrstuvwxyz0123456789
 *   echo=1      then echo console input line by line as "conecho: got <line>"
 *               until a line "quit" arrives (default 0: power off after the lines)
 *   timeout=MS  give up waiting for input after MS ms of no input (default 60000)
 *
 * Prints "conecho: done lines=N echoed=E" at the end.  With the kernel's
 * console (no console driver) there is no input: echo=1 reports it and ends.
 */
#include "isovisor.h"

static const char PATTERN[] = "abcdefghijklmnopqrstuvwxyz0123456789";

int main(void)
{
    u64 lines = param_u64("lines", 0);
    u64 echo = param_u64("echo", 0);
    u64 timeout_ms = param_u64("timeout", 60000);

    for (u64 i = 0; i < lines; i++)
        printf("conecho: line %09lu %s\n", (unsigned long)i, PATTERN);
    u64 echoed = 0;
    if (echo) {
        printf("conecho: ready for input\n");
        console_flush();
        char line[256];
        u64 len = 0;
        for (;;) {
            char buf[64];
            long n = console_read(buf, sizeof buf);
            if (n < 0) {
                printf("conecho: no console input (%ld): the console is not a driver's\n", n);
                break;
            }
            if (n == 0) {
                int w = console_wait_input(timeout_ms * 1000000ULL);
                if (w <= 0) {
                    printf("conecho: no input within %lu ms\n", (unsigned long)timeout_ms);
                    break;
                }
                continue;
            }
            int quit = 0;
            for (long i = 0; i < n && !quit; i++) {
                char c = buf[i];
                if (c == '\r')
                    continue;
                if (c != '\n' && len < sizeof line - 1) {
                    line[len++] = c;
                    continue;
                }
                if (c != '\n')
                    continue; /* over-long line: keep its start */
                line[len] = '\0';
                if (strcmp(line, "quit") == 0)
                    quit = 1;
                else {
                    printf("conecho: got %s\n", line);
                    console_flush();
                    echoed++;
                }
                len = 0;
            }
            if (quit)
                break;
        }
    }
    printf("conecho: done lines=%lu echoed=%lu\n", (unsigned long)lines, (unsigned long)echoed);
    return 0;
}
