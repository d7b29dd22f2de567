/* Steps the wall clock of one process, for tests: LD_PRELOAD=clockshift.so CLOCKSHIFT_FILE=path.
 *
 * The file holds one little-endian int64: nanoseconds added to CLOCK_REALTIME (and so to
 * gettimeofday and time). The test rewrites it while the process runs; the process sees the new
 * offset at once (a shared mapping of the file). Monotonic clocks are left alone, as a real step
 * of the system clock (NTP, `date -s`, a failover to another host) leaves them.
 *
 * The real time is read with the raw system call, never through dlsym: libfaketime's dlsym
 * recursion (jemalloc asks for the time while dlsym allocates) is what makes it crash Debian's
 * redis-server.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static volatile const int64_t *shift_ns;

__attribute__((constructor)) static void clockshift_init(void) {
    const char *path = getenv("CLOCKSHIFT_FILE");
    if (path == NULL)
        return;
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return;
    void *mapped = mmap(NULL, sizeof(int64_t), PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    if (mapped != MAP_FAILED)
        shift_ns = mapped;
}

static int shifted_realtime(clockid_t id, struct timespec *ts) {
    long result = syscall(SYS_clock_gettime, id, ts);
    if (result != 0 || shift_ns == NULL)
        return (int)result;
    if (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE || id == CLOCK_TAI) {
        int64_t ns = (int64_t)ts->tv_sec * 1000000000LL + ts->tv_nsec + *shift_ns;
        ts->tv_sec = ns / 1000000000LL;
        ts->tv_nsec = ns % 1000000000LL;
    }
    return 0;
}

int clock_gettime(clockid_t id, struct timespec *ts) { return shifted_realtime(id, ts); }

int gettimeofday(struct timeval *tv, void *tz) {
    (void)tz;
    struct timespec ts;
    int result = shifted_realtime(CLOCK_REALTIME, &ts);
    if (result == 0) {
        tv->tv_sec = ts.tv_sec;
        tv->tv_usec = ts.tv_nsec / 1000;
    }
    return result;
}

time_t time(time_t *out) {
    struct timespec ts;
    shifted_realtime(CLOCK_REALTIME, &ts);
    if (out != NULL)
        *out = ts.tv_sec;
    return ts.tv_sec;
}
