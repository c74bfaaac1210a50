/* What this machine's memory gives to random reads: the floor under the kernels'
 * gathers (docs/distributed.md, "How far 20x on ml-tag is").
 *
 * For each working set (MiB, default 1 6 12 48 512) prints:
 *   chase_ns        latency: a pointer chase through the set's cache lines in a random
 *                   cycle (each load waits for the one before);
 *   independent_ns  throughput: loads of random lines whose addresses are known ahead
 *                   (a precomputed index array), as many in flight as the core allows;
 * then, for a window of 524,288 rows of 3 int32 ids and a float label (bench/
 * distributed.py's ml-tag store window), the ns per row of copying the rows in a
 * shuffled order into a batch buffer, 4,096 rows a batch with the ids and label
 * prefetched 16 rows ahead (the FM kernel's batch-order copy): alone, and with 25,000
 * random updates of a 12 MiB table between batches (the rest of a step, which takes the
 * caches and TLB entries the copy would find warm otherwise).
 * Last, the table traffic of an FM k=16 batch of that set, without its arithmetic:
 * 4,096 rows of 3 ids drawn as bench_common.synthetic_mltag draws them (Zipf-like over
 * fields of 17,000, 23,500 and 49,500 ids), V and its accumulator 90,000 x 16 floats
 * each; ms a batch of loading the rows' V rows (the forward pass's loads) and of
 * updating the V and accumulator rows of the batch's distinct ids once each (the
 * feature updates' traffic), each with its own 16 rows or 6 ids of prefetch, the same
 * 25,000 table updates between batches, and the distinct ids per batch. Then the same
 * two figures for two variants that docs/distributed.md weighs: the distinct ids
 * updated in ascending order (sorted first, the sort not timed), and V and its
 * accumulator interleaved in one table (a feature's two rows side by side).
 *
 * Build: cc -O2 bench/random_lines.c -o random_lines -lm && ./random_lines [MiB ...]
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define LINE 64
#define CHASE_STEPS 2000000L
#define RANDOM_LOADS 4000000L
#define WINDOW_ROWS 524288L
#define BATCH 4096
#define PREFETCH_ROWS 16
#define TABLE_BYTES (12L << 20)
#define TABLE_UPDATES 25000
#define REPEATS 5
#define FEATURES 90000
#define K 16
#define FM_BATCHES 200

static uint64_t state = 88172645463325252ull;
static volatile long sink;  /* keeps the copies' results live */

static uint64_t next(void) {  /* xorshift64 */
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

static void *zeroed(size_t bytes) {
    void *p = aligned_alloc(4096, (bytes + 4095) / 4096 * 4096);
    if (p == NULL) {
        fprintf(stderr, "random_lines: cannot allocate %zu bytes\n", bytes);
        exit(1);
    }
    memset(p, 0, bytes);
    return p;
}

static void shuffle(int64_t *a, size_t n) {
    for (size_t i = 0; i < n; i++) a[i] = (int64_t)i;
    for (size_t i = n - 1; i > 0; i--) {
        size_t j = next() % (i + 1);
        int64_t t = a[i]; a[i] = a[j]; a[j] = t;
    }
}

static void working_set(size_t mib) {
    size_t lines = (mib << 20) / LINE;
    char *buf = zeroed(lines * LINE);
    int64_t *cycle = zeroed(lines * sizeof(int64_t));
    shuffle(cycle, lines);
    for (size_t i = 0; i < lines; i++)
        *(int64_t *)(buf + cycle[i] * LINE) = cycle[(i + 1) % lines] * LINE;
    int64_t at = cycle[0] * LINE;
    double t = now();
    for (long s = 0; s < CHASE_STEPS; s++) at = *(int64_t *)(buf + at);
    double chase = (now() - t) / CHASE_STEPS * 1e9;
    uint32_t *where = zeroed(RANDOM_LOADS * sizeof(uint32_t));
    for (long i = 0; i < RANDOM_LOADS; i++) where[i] = (uint32_t)(next() % lines);
    int64_t sum = 0;
    t = now();
    for (long i = 0; i < RANDOM_LOADS; i++) sum += *(int64_t *)(buf + (size_t)where[i] * LINE);
    double independent = (now() - t) / RANDOM_LOADS * 1e9;
    printf("%6zu MiB: chase_ns %6.1f  independent_ns %5.1f  (%lld)\n", mib, chase, independent,
           (long long)((sum + at) & 1));
    free(where); free(cycle); free(buf);
}

static double copy_rows(const int32_t *ids, const float *y, const int64_t *rows,
                        float *table, int pollute) {
    static int32_t occ[3 * BATCH];
    static double label[BATCH];
    double best = 1e30, spent_elsewhere;
    long bad = 0;
    for (int r = 0; r < REPEATS; r++) {
        spent_elsewhere = 0;
        double t = now();
        for (long b0 = 0; b0 + BATCH <= WINDOW_ROWS; b0 += BATCH) {
            const int64_t *batch = rows + b0;
            if (pollute) {
                double p = now();
                for (int u = 0; u < TABLE_UPDATES; u++)
                    table[(next() % (TABLE_BYTES / LINE)) * (LINE / sizeof(float))] += 1;
                spent_elsewhere += now() - p;
            }
            for (int b = 0; b < BATCH; b++) {
                if (b + PREFETCH_ROWS < BATCH) {
                    __builtin_prefetch(ids + 3 * batch[b + PREFETCH_ROWS]);
                    __builtin_prefetch(y + batch[b + PREFETCH_ROWS]);
                }
                label[b] = y[batch[b]];
                for (int i = 0; i < 3; i++) {
                    int32_t j = ids[3 * batch[b] + i];
                    occ[3 * b + i] = j;
                    bad += j < 0;
                }
            }
        }
        double ns = (now() - t - spent_elsewhere) / WINDOW_ROWS * 1e9;
        if (ns < best) best = ns;
    }
    sink = bad + occ[0] + (long)label[0];
    return best;
}

/* One id of a field of `size` ids, drawn with probability proportional to
 * 1 / (i + 10)^0.9 (cdf: the field's cumulative weights). */
static int draw(const double *cdf, int size) {
    double u = (next() >> 11) * (1.0 / 9007199254740992.0) * cdf[size - 1];
    int lo = 0, hi = size - 1;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (cdf[mid] < u) lo = mid + 1; else hi = mid;
    }
    return lo;
}

enum { SEPARATE, SORTED, INTERLEAVED };

static int compare_ids(const void *a, const void *b) {
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

static void fm_batches(float *table, int variant) {
    static const int fields[3] = {17000, 23500, 49500};
    double *cdf[3];
    for (int f = 0; f < 3; f++) {
        cdf[f] = malloc(fields[f] * sizeof(double));
        double acc = 0;
        for (int i = 0; i < fields[f]; i++) cdf[f][i] = acc += 1.0 / pow(i + 10.0, 0.9);
    }
    /* a row of V and of G is RS floats from the next: K in separate tables, 2K when
       interleaved (G's row right after V's) */
    size_t RS = variant == INTERLEAVED ? 2 * K : K;
    float *V = zeroed((size_t)FEATURES * RS * sizeof(float));
    float *G = variant == INTERLEAVED ? V + K : zeroed((size_t)FEATURES * K * sizeof(float));
    int32_t *ids = zeroed((size_t)FM_BATCHES * BATCH * 3 * sizeof(int32_t));
    for (long q = 0; q < (long)FM_BATCHES * BATCH; q++)
        for (int f = 0, offset = 0; f < 3; offset += fields[f], f++)
            ids[3 * q + f] = offset + draw(cdf[f], fields[f]);
    int32_t *distinct = zeroed(3 * BATCH * sizeof(int32_t));
    uint8_t *seen = zeroed(FEATURES);
    float *S = zeroed((size_t)BATCH * K * sizeof(float));
    double load_s = 0, update_s = 0;
    long n_distinct = 0;
    for (int pass = 0; pass < 2; pass++) {  /* the first pass warms up */
        load_s = update_s = 0;
        n_distinct = 0;
        for (int batch = 0; batch < FM_BATCHES; batch++) {
            const int32_t *b_ids = ids + (size_t)batch * BATCH * 3;
            /* between batches the data's rows and the other phases take the caches */
            for (int u = 0; u < TABLE_UPDATES; u++)
                table[(next() % (TABLE_BYTES / LINE)) * (LINE / sizeof(float))] += 1;
            double t = now();
            for (int b = 0; b < BATCH; b++) {
                if (b + PREFETCH_ROWS < BATCH)
                    for (int i = 0; i < 3; i++)
                        __builtin_prefetch(V + (size_t)b_ids[3 * (b + PREFETCH_ROWS) + i] * RS);
                for (int c = 0; c < K; c++) S[b * K + c] = 0;
                for (int i = 0; i < 3; i++)
                    for (int c = 0; c < K; c++)
                        S[b * K + c] += V[(size_t)b_ids[3 * b + i] * RS + c];
            }
            load_s += now() - t;
            int U = 0;
            for (int q = 0; q < 3 * BATCH; q++)
                if (!seen[b_ids[q]]) { seen[b_ids[q]] = 1; distinct[U++] = b_ids[q]; }
            if (variant == SORTED) qsort(distinct, U, sizeof(int32_t), compare_ids);
            t = now();
            for (int u = 0; u < U; u++) {
                if (u + 6 < U) {
                    __builtin_prefetch(V + (size_t)distinct[u + 6] * RS);
                    __builtin_prefetch(G + (size_t)distinct[u + 6] * RS);
                }
                float *v = V + (size_t)distinct[u] * RS, *g = G + (size_t)distinct[u] * RS;
                for (int c = 0; c < K; c++) {
                    float grad = S[(u % BATCH) * K + c] * 1e-3f;
                    g[c] += grad * grad;
                    v[c] -= grad;
                }
            }
            update_s += now() - t;
            for (int u = 0; u < U; u++) seen[distinct[u]] = 0;
            n_distinct += U;
        }
    }
    static const char *names[] = {"", " (distinct ids sorted first)",
                                  " (V and accumulator interleaved)"};
    printf("FM k=%d batches of %d ml-tag rows%s: V rows loaded %.3f ms a batch, V and "
           "accumulator rows of %ld distinct ids updated %.3f ms a batch\n", K, BATCH,
           names[variant], 1e3 * load_s / FM_BATCHES, n_distinct / FM_BATCHES,
           1e3 * update_s / FM_BATCHES);
    sink = (long)(S[0] + V[0] + G[0]);
    for (int f = 0; f < 3; f++) free(cdf[f]);
    if (variant != INTERLEAVED) free(G);
    free(V);
    free(ids);
    free(distinct);
    free(seen);
    free(S);
}

int main(int argc, char **argv) {
    size_t defaults[] = {1, 6, 12, 48, 512};
    if (argc > 1)
        for (int i = 1; i < argc; i++) working_set((size_t)atol(argv[i]));
    else
        for (size_t i = 0; i < sizeof defaults / sizeof *defaults; i++) working_set(defaults[i]);
    int32_t *ids = zeroed(3 * WINDOW_ROWS * sizeof(int32_t));
    float *y = zeroed(WINDOW_ROWS * sizeof(float));
    int64_t *rows = zeroed(WINDOW_ROWS * sizeof(int64_t));
    float *table = zeroed(TABLE_BYTES);
    for (long i = 0; i < 3 * WINDOW_ROWS; i++) ids[i] = (int32_t)(i % 90000);
    shuffle(rows, WINDOW_ROWS);
    printf("shuffled window of %ld rows, batch-order copy: %.1f ns/row alone, %.1f ns/row "
           "between updates of a 12 MiB table\n", WINDOW_ROWS,
           copy_rows(ids, y, rows, table, 0), copy_rows(ids, y, rows, table, 1));
    for (int variant = SEPARATE; variant <= INTERLEAVED; variant++) fm_batches(table, variant);
    return 0;
}
