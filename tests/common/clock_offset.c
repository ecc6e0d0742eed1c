/*
 * A wall clock that steps, for tests: loaded into pgward with LD_PRELOAD, it adds a number of
 * seconds to every CLOCK_REALTIME reading (clock_gettime, gettimeofday, time). The number is
 * the 8-byte signed integer (native byte order) at the start of the file $CLOCK_OFFSET_FILE,
 * mapped shared, so the test steps the clock of the running process by rewriting the file.
 * The monotonic clocks are left alone, as NTP or a resumed VM leaves them.
 *
 * Built by the test with `cc -shared -fPIC`.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

typedef int (*clock_gettime_fn)(clockid_t, struct timespec *);

static volatile int64_t *offset_map(void) {
    static volatile int64_t *map;
    static int tried;
    if (!tried) {
        tried = 1;
        const char *path = getenv("CLOCK_OFFSET_FILE");
        int fd = path ? open(path, O_RDONLY | O_CLOEXEC) : -1;
        if (fd >= 0) {
            void *m = mmap(NULL, sizeof(int64_t), PROT_READ, MAP_SHARED, fd, 0);
            close(fd);
            if (m != MAP_FAILED) map = m;
        }
    }
    return map;
}

static int64_t offset(void) {
    volatile int64_t *m = offset_map();
    return m ? *m : 0;
}

int clock_gettime(clockid_t clk, struct timespec *tp) {
    static clock_gettime_fn real;
    if (!real) real = (clock_gettime_fn)dlsym(RTLD_NEXT, "clock_gettime");
    int r = real(clk, tp);
    if (r == 0 && tp && (clk == CLOCK_REALTIME || clk == CLOCK_REALTIME_COARSE)) tp->tv_sec += offset();
    return r;
}

int gettimeofday(struct timeval *tv, void *tz) {
    struct timespec ts;
    (void)tz;
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0) return -1;
    if (tv) {
        tv->tv_sec = ts.tv_sec;
        tv->tv_usec = ts.tv_nsec / 1000;
    }
    return 0;
}

time_t time(time_t *t) {
    struct timespec ts;
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0) return (time_t)-1;
    if (t) *t = ts.tv_sec;
    return ts.tv_sec;
}
