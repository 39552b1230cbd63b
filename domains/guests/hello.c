/* hello: the smallest guest.  Prints its name and domid. */
#include "isovisor.h"

int main(void)
{
    printf("Hello from %s (domid %lu)!\n", domain_name(), (unsigned long)domid());
    printf("hello: done\n");
    return 0;
}
