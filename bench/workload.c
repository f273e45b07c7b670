/* Workloads for `cargo xtask bench`, built with gcc -O2 by the bench.
 *
 *   workload getppid  SECONDS        getppid(2) in a loop
 *   workload read     SECONDS        1-byte read(2)s from /dev/zero
 *   workload pingpong SECONDS        two threads passing a byte over two
 *                                    pipes: two context switches a round,
 *                                    both threads on the last CPU (where the
 *                                    scheduler puts them apart, a round
 *                                    costs up to twice as much, from run to
 *                                    run: a wake-up across CPUs)
 *   workload block    THREADS SLEEP_US SECONDS
 *                                    THREADS threads that each sleep
 *                                    SLEEP_US (relative nanosleep) in a loop;
 *                                    the main thread sleeps the same way
 *                                    until they are done
 *
 * The loops run for SECONDS in ten slices and print "<operations>
 * <nanoseconds>" of the fastest slice, the least disturbed by the other
 * processes of a busy machine, then the operations of all ten (what a
 * tracer's own cost over the run is divided by). block prints the number
 * of sleeps, the main thread's included: every wait of the process longer
 * than a millisecond is one of them, so a tracer's count can be checked.
 * The per-operation cost is kept as low as the syscall itself: no work but
 * the call, the clock read once per 4096 calls.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static unsigned long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (unsigned long long)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static int ping[2], pong[2];

static void *ponger(void *arg) {
    (void)arg;
    char c;
    while (read(ping[0], &c, 1) == 1) {
        if (c == 'q' || write(pong[1], &c, 1) != 1)
            break;
    }
    return NULL;
}

struct blocker {
    long sleep_us;
    unsigned long long until;
    unsigned long long count;
};

static int blockers_done;

static void *block_loop(void *arg) {
    struct blocker *b = arg;
    struct timespec ts = {b->sleep_us / 1000000, (b->sleep_us % 1000000) * 1000};
    while (now_ns() < b->until) {
        nanosleep(&ts, NULL);
        b->count++;
    }
    __atomic_add_fetch(&blockers_done, 1, __ATOMIC_RELEASE);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: workload getppid|read|pingpong SECONDS | block THREADS SLEEP_US SECONDS\n");
        return 2;
    }
    const char *mode = argv[1];
    if (strcmp(mode, "block") == 0) {
        if (argc < 5)
            return 2;
        int n = atoi(argv[2]);
        long sleep_us = atol(argv[3]);
        unsigned long long until = now_ns() + (unsigned long long)(atof(argv[4]) * 1e9);
        pthread_t *t = calloc(n, sizeof *t);
        struct blocker *b = calloc(n, sizeof *b);
        for (int i = 0; i < n; i++) {
            b[i] = (struct blocker){sleep_us, until, 0};
            pthread_create(&t[i], NULL, block_loop, &b[i]);
        }
        /* Not pthread_join, whose wait would be one more slow event
         * (or several) outside the count: the main thread sleeps as the
         * others do, counted, until they are all done. Joining them then
         * waits for no more than their exit. */
        struct timespec ts = {sleep_us / 1000000, (sleep_us % 1000000) * 1000};
        unsigned long long total = 0;
        while (__atomic_load_n(&blockers_done, __ATOMIC_ACQUIRE) < n) {
            nanosleep(&ts, NULL);
            total++;
        }
        for (int i = 0; i < n; i++) {
            pthread_join(t[i], NULL);
            total += b[i].count;
        }
        printf("%llu\n", total);
        return 0;
    }
    unsigned long long budget = (unsigned long long)(atof(argv[2]) * 1e9);
    int fd = -1;
    pthread_t thread;
    if (strcmp(mode, "read") == 0) {
        fd = open("/dev/zero", O_RDONLY);
        if (fd < 0)
            return 1;
    } else if (strcmp(mode, "pingpong") == 0) {
        cpu_set_t one;
        CPU_ZERO(&one);
        CPU_SET(sysconf(_SC_NPROCESSORS_ONLN) - 1, &one);
        /* Before the second thread exists: it inherits the mask. */
        if (sched_setaffinity(0, sizeof(one), &one))
            return 1;
        if (pipe(ping) || pipe(pong) || pthread_create(&thread, NULL, ponger, NULL))
            return 1;
    } else if (strcmp(mode, "getppid") != 0) {
        fprintf(stderr, "unknown mode %s\n", mode);
        return 2;
    }
    char c = 'x';
    unsigned long long best_ops = 0, best_ns = 0, all_ops = 0;
    for (int slice = 0; slice < 10; slice++) {
        unsigned long long ops = 0, start = now_ns(), elapsed = 0;
        while (elapsed < budget / 10) {
            for (int i = 0; i < 4096; i++) {
                if (fd >= 0) {
                    if (read(fd, &c, 1) != 1)
                        return 1;
                } else if (mode[0] == 'p' && mode[1] == 'i') {
                    if (write(ping[1], &c, 1) != 1 || read(pong[0], &c, 1) != 1)
                        return 1;
                } else {
                    syscall(SYS_getppid);
                }
            }
            ops += 4096;
            elapsed = now_ns() - start;
        }
        all_ops += ops;
        if (best_ops == 0 || elapsed * best_ops < best_ns * ops) {
            best_ops = ops;
            best_ns = elapsed;
        }
    }
    if (mode[0] == 'p' && mode[1] == 'i') {
        c = 'q';
        if (write(ping[1], &c, 1) == 1)
            pthread_join(thread, NULL);
    }
    printf("%llu %llu %llu\n", best_ops, best_ns, all_ops);
    return 0;
}
