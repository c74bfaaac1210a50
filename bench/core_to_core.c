/* Probe of the two vCPUs bench/compare.py runs on; prints "latency_ns flops_ratio".
 *
 * latency_ns: one-way latency of a cache line between CPU 0 and CPU 1, half the median
 *   round trip of a ping-pong on one line (about 35-45 ns when the VM's two vCPUs share a
 *   chiplet, 160-180 ns when they sit on two: the memory-bound kernels scale far worse
 *   then).
 * flops_ratio: throughput of a floating-point loop on both CPUs at once over CPU 0 alone
 *   (2.00 when the vCPUs have their own physical cores, lower when the host runs other
 *   work, or the other vCPU, on the same core).
 *
 * Build: cc -O2 -pthread bench/core_to_core.c -o core_to_core   (about 0.3 s per run)
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define ROUND_TRIPS 4000
#define LATENCY_SAMPLES 15
#define FLOP_ITERATIONS 20000000L
#define FLOP_SAMPLES 3

static _Alignas(128) atomic_long ball;
static pthread_barrier_t start_line;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

static int pin(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

static int compare_doubles(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* CPU 1 answers every odd value of the ball with the next even one. */
static void *returner(void *unused) {
    (void)unused;
    pin(1);
    for (int s = 0; s < LATENCY_SAMPLES; s++) {
        pthread_barrier_wait(&start_line);
        for (long i = 0; i < ROUND_TRIPS; i++) {
            long serve = 2 * i + 1;
            while (atomic_load_explicit(&ball, memory_order_acquire) != serve) {}
            atomic_store_explicit(&ball, serve + 1, memory_order_release);
        }
    }
    return NULL;
}

static double one_way_latency_ns(void) {
    pthread_t other;
    double samples[LATENCY_SAMPLES];
    pin(0);
    pthread_barrier_init(&start_line, NULL, 2);
    pthread_create(&other, NULL, returner, NULL);
    for (int s = 0; s < LATENCY_SAMPLES; s++) {
        atomic_store(&ball, 0);
        pthread_barrier_wait(&start_line);
        double t0 = now();
        for (long i = 0; i < ROUND_TRIPS; i++) {
            long serve = 2 * i + 1;
            atomic_store_explicit(&ball, serve, memory_order_release);
            while (atomic_load_explicit(&ball, memory_order_acquire) != serve + 1) {}
        }
        samples[s] = (now() - t0) / ROUND_TRIPS / 2 * 1e9;
    }
    pthread_join(other, NULL);
    pthread_barrier_destroy(&start_line);
    qsort(samples, LATENCY_SAMPLES, sizeof samples[0], compare_doubles);
    return samples[LATENCY_SAMPLES / 2];
}

/* Eight independent multiply-add chains: bound by the core's floating-point units. */
static double flop_loop_seconds(void) {
    volatile double seed = 1.0;
    double a0 = seed, a1 = seed, a2 = seed, a3 = seed, a4 = seed, a5 = seed, a6 = seed,
           a7 = seed, m = 0.999999, c = 1e-7;
    double t0 = now();
    for (long i = 0; i < FLOP_ITERATIONS; i++) {
        a0 = a0 * m + c; a1 = a1 * m + c; a2 = a2 * m + c; a3 = a3 * m + c;
        a4 = a4 * m + c; a5 = a5 * m + c; a6 = a6 * m + c; a7 = a7 * m + c;
    }
    double elapsed = now() - t0;
    seed = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7;
    return elapsed;
}

struct flop_job { int cpu; double seconds; };

static void *flop_worker(void *arg) {
    struct flop_job *job = arg;
    pin(job->cpu);
    pthread_barrier_wait(&start_line);
    job->seconds = flop_loop_seconds();
    return NULL;
}

/* Work done per second by CPUs 0 and 1 together over CPU 0 alone (best of a few). */
static double flops_ratio(void) {
    double alone = 1e30, together = 1e30;
    for (int s = 0; s < FLOP_SAMPLES; s++) {
        pin(0);
        double t = flop_loop_seconds();
        if (t < alone) alone = t;

        struct flop_job jobs[2] = {{0, 0.0}, {1, 0.0}};
        pthread_t threads[2];
        pthread_barrier_init(&start_line, NULL, 2);
        for (int j = 0; j < 2; j++) pthread_create(&threads[j], NULL, flop_worker, &jobs[j]);
        for (int j = 0; j < 2; j++) pthread_join(threads[j], NULL);
        pthread_barrier_destroy(&start_line);
        double slowest = jobs[0].seconds > jobs[1].seconds ? jobs[0].seconds : jobs[1].seconds;
        if (slowest < together) together = slowest;
    }
    return 2.0 * alone / together;
}

int main(void) {
    double latency = one_way_latency_ns();
    printf("%.1f %.2f\n", latency, flops_ratio());
    return 0;
}
