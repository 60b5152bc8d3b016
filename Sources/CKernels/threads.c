// Thread attributes the scheduler needs and Swift cannot reach directly: a
// thread-local "background" flag and a per-thread niceness.
#define _GNU_SOURCE
#include "ckernels.h"
#ifdef __linux__
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

static _Thread_local int ck_background = 0;

void ck_set_background_thread(int on) { ck_background = on != 0; }

int ck_is_background_thread(void) { return ck_background; }

int ck_set_thread_nice(int nice) {
#ifdef __linux__
    return setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), nice);
#else
    (void)nice;
    return -1;
#endif
}
