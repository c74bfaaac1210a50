/* The C side of afmfast._reader (csrc/_reader.pyx): number parsing with a fixed "C"
   locale, the SWAR and SSE2/AVX2 token and line scanners, the AVX2 counting pass and the
   reader's thread pool. Included only by _reader's generated C file. */
#ifndef AFMFAST_READER_TEXT_H
#define AFMFAST_READER_TEXT_H
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <locale.h>
/* Exact powers of ten: 10^k is a double without rounding for k <= 22, the
   condition of the Clinger fast path. */
static const double afm_pow10[23] = {
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11,
    1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};
/* strtod follows LC_NUMERIC, which a program may have changed (a decimal comma
   would break "0.5"); the "C" locale keeps it equal to Python's float(). */
static locale_t afm_c_locale = (locale_t)0;
static void afm_init_locale(void) {
    if (!afm_c_locale) afm_c_locale = newlocale(LC_ALL_MASK, "C", (locale_t)0);
}
static double afm_strtod(const char *s, char **end) {
    if (afm_c_locale) return strtod_l(s, end, afm_c_locale);
    return strtod(s, end);
}
/* Leading ASCII digits of the 8 bytes at p: returns their count L (0..8) and, for
   L in 1..7, their value in *val (8 means "8 or more digits": the caller falls back
   to the digit loop). SWAR: t = byte ^ '0' is 0..9 exactly for digits; a byte is a
   non-digit iff t or t + 6 has a high nibble (a carry out of a non-digit byte only
   reaches later bytes, never the first non-digit). The digits, moved to the top
   bytes (zeros below act as leading zeros), are combined by the usual three
   multiply steps of 8-digit parsing. Little-endian only; elsewhere it returns 8. */
static inline int afm_digits8(const char *p, uint64_t *val) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    uint64_t w, t, nd, u;
    int L;
    memcpy(&w, p, 8);
    t = w ^ 0x3030303030303030ULL;
    nd = (t | (t + 0x0606060606060606ULL)) & 0xF0F0F0F0F0F0F0F0ULL;
    if (nd == 0) return 8;
    L = __builtin_ctzll(nd) >> 3;
    if (L == 0) return 0;
    u = t << (64 - 8 * L);
    u = u * 10 + (u >> 8);
    u = (((u & 0x000000FF000000FFULL) * (100 + (1000000ULL << 32)))
         + (((u >> 16) & 0x000000FF000000FFULL) * (1 + (10000ULL << 32)))) >> 32;
    *val = (uint32_t)u;
    return L;
#else
    (void)p; (void)val;
    return 8;
#endif
}
/* The length of the token at p (index of its first byte <= ' ', 16 if none of the
   16 bytes at p is) and, in *colon, the index of its first ':' (16 if none): one
   16-byte load and a few vector compares, so the start of the next token is known
   without walking the bytes of this one. -1 without SSE2 (the callers fall back). */
#if defined(__SSE2__)
#include <emmintrin.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
static inline int afm_token(const char *p, int *colon) {
    __m128i w = _mm_loadu_si128((const __m128i *)p);
    unsigned low = (unsigned)_mm_movemask_epi8(
        _mm_cmpeq_epi8(_mm_min_epu8(w, _mm_set1_epi8(' ')), w)) | 0x10000u;
    unsigned col = (unsigned)_mm_movemask_epi8(
        _mm_cmpeq_epi8(w, _mm_set1_epi8(':'))) | 0x10000u;
    *colon = __builtin_ctz(col);
    return __builtin_ctz(low);
}
/* The line at p, when its LF is among the 64 bytes at p: returns its length (the
   LF's index) and, for its bytes, the masks *tok (bit i: byte i is a token byte,
   above ' ') and *bad (bit i: byte i is a control byte other than a space, tab or
   LF: CR, NUL, ...). -1 when no LF is among those bytes. Reads at most the 64
   bytes at p, 16 at a time, and stops at the block holding the LF. */
static inline int afm_line(const char *p, uint64_t *tok, uint64_t *bad) {
    const __m128i sp = _mm_set1_epi8(' '), tab = _mm_set1_epi8(9);
    const __m128i lf = _mm_set1_epi8(10);
    uint64_t ctl = 0, sep = 0, in;
    unsigned c, s, n;
    int b = 0, len;
#if defined(__AVX2__) && defined(__x86_64__)
    {   /* most lines of one-hot data fit in one 32-byte block */
        const __m256i sp2 = _mm256_set1_epi8(' '), tab2 = _mm256_set1_epi8(9);
        __m256i w = _mm256_loadu_si256((const __m256i *)p);
        c = (unsigned)_mm256_movemask_epi8(_mm256_cmpeq_epi8(_mm256_min_epu8(w, sp2), w));
        s = (unsigned)_mm256_movemask_epi8(_mm256_or_si256(
            _mm256_cmpeq_epi8(w, sp2), _mm256_cmpeq_epi8(w, tab2)));
        n = (unsigned)_mm256_movemask_epi8(_mm256_cmpeq_epi8(w, _mm256_set1_epi8(10)));
        if (n) {
            len = __builtin_ctz(n);
            in = ((uint64_t)1 << len) - 1;
            *tok = ~(uint64_t)c & in;
            *bad = (uint64_t)(c & ~s) & in;
            return len;
        }
        ctl = c;
        sep = s;
        b = 32;
    }
#endif
    for (; b < 64; b += 16) {
        __m128i w = _mm_loadu_si128((const __m128i *)(p + b));
        c = (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(_mm_min_epu8(w, sp), w));
        s = (unsigned)_mm_movemask_epi8(_mm_or_si128(_mm_cmpeq_epi8(w, sp),
                                                     _mm_cmpeq_epi8(w, tab)));
        n = (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(w, lf));
        ctl |= (uint64_t)c << b;
        sep |= (uint64_t)s << b;
        if (n) {
            len = b + __builtin_ctz(n);
            in = ((uint64_t)1 << len) - 1;  /* len <= 63 */
            *tok = ~ctl & in;
            *bad = ctl & ~sep & in;
            return len;
        }
    }
    return -1;
}
#else
static inline int afm_token(const char *p, int *colon) {
    (void)p; *colon = 16;
    return -1;
}
static inline int afm_line(const char *p, uint64_t *tok, uint64_t *bad) {
    (void)p; *tok = 0; *bad = 0;
    return -1;
}
#endif
/* Newlines, colons and NULs in n bytes at p. With AVX2: 32 bytes per step, byte
   counters (subtracting the all-ones compare results) summed every 255 steps with
   _mm256_sad_epu8, faster than the compiler's vectorisation of the byte loop
   (docs/performance.md, "Reader"). Returns 0 when AVX2 is absent (the caller
   counts). */
#if defined(__AVX2__)
#include <immintrin.h>
static int afm_count_avx2(const unsigned char *p, ptrdiff_t n, ptrdiff_t *nl,
                          ptrdiff_t *co, ptrdiff_t *nu) {
    const __m256i vnl = _mm256_set1_epi8(10), vco = _mm256_set1_epi8(58);
    const __m256i zero = _mm256_setzero_si256();
    __m256i snl = zero, sco = zero, snu = zero;
    ptrdiff_t i = 0, a = 0, b = 0, z = 0;
    int j, k;
    while (n - i >= 32) {
        __m256i anl = zero, aco = zero, anu = zero;
        for (j = 0; j < 255 && n - i >= 32; j++, i += 32) {
            __m256i w = _mm256_loadu_si256((const __m256i *)(p + i));
            anl = _mm256_sub_epi8(anl, _mm256_cmpeq_epi8(w, vnl));
            aco = _mm256_sub_epi8(aco, _mm256_cmpeq_epi8(w, vco));
            anu = _mm256_sub_epi8(anu, _mm256_cmpeq_epi8(w, zero));
        }
        snl = _mm256_add_epi64(snl, _mm256_sad_epu8(anl, zero));
        sco = _mm256_add_epi64(sco, _mm256_sad_epu8(aco, zero));
        snu = _mm256_add_epi64(snu, _mm256_sad_epu8(anu, zero));
    }
    {
        uint64_t l[4], c[4], u[4];  /* stored, not type-punned (strict aliasing) */
        _mm256_storeu_si256((__m256i *)l, snl);
        _mm256_storeu_si256((__m256i *)c, sco);
        _mm256_storeu_si256((__m256i *)u, snu);
        for (k = 0; k < 4; k++) {
            a += (ptrdiff_t)l[k];
            b += (ptrdiff_t)c[k];
            z += (ptrdiff_t)u[k];
        }
    }
    for (; i < n; i++) {
        a += p[i] == 10;
        b += p[i] == 58;
        z += p[i] == 0;
    }
    *nl = a; *co = b; *nu = z;
    return 1;
}
#else
static int afm_count_avx2(const unsigned char *p, ptrdiff_t n, ptrdiff_t *nl,
                          ptrdiff_t *co, ptrdiff_t *nu) {
    (void)p; (void)n; (void)nl; (void)co; (void)nu;
    return 0;
}
#endif
/* ---- Chunk pool: the reader's own threads (see the module docstring).
   afm_parallel(fn, ctx, n, n_threads) calls fn(ctx, c) once for every c in [0, n),
   on the calling thread and on up to n_threads - 1 helper threads. Chunks are
   claimed from an atomic counter; the caller returns once every chunk is done and
   never waits for a helper that has not claimed one, so a helper that the OS has
   not scheduled yet (a loaded machine) costs nothing: the caller does its chunks.
   Helpers are created on first use, sleep on a condition variable between jobs
   (no spinning that would take CPU from the caller), and block signals. The job is
   reference-counted on the heap because a helper may look at it after the caller
   has returned (it then finds no chunk left and never touches ctx). A second
   caller while a job is posted runs its chunks alone on its own thread. */
#include <pthread.h>
#include <signal.h>
typedef void (*afm_chunk_fn)(void *ctx, ptrdiff_t chunk);
typedef struct {
    afm_chunk_fn fn;
    void *ctx;
    ptrdiff_t n;
    ptrdiff_t next;   /* atomic: next chunk to claim */
    ptrdiff_t done;   /* atomic: chunks finished */
    int refs;         /* atomic: the caller + helpers that joined */
    int seats;        /* helpers that may still join (under afm_mu) */
} afm_job;
#define AFM_MAX_HELPERS 255
static pthread_mutex_t afm_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t afm_job_cv = PTHREAD_COND_INITIALIZER;
static pthread_cond_t afm_done_cv = PTHREAD_COND_INITIALIZER;
static afm_job *afm_current = NULL;
static unsigned long afm_gen = 0;
static int afm_helpers = 0;
static int afm_atfork_set = 0;

static void afm_release(afm_job *job) {
    if (__atomic_sub_fetch(&job->refs, 1, __ATOMIC_ACQ_REL) == 0) free(job);
}
static void afm_run(afm_job *job) {
    ptrdiff_t c;
    while ((c = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED)) < job->n) {
        job->fn(job->ctx, c);
        if (__atomic_add_fetch(&job->done, 1, __ATOMIC_ACQ_REL) == job->n) {
            pthread_mutex_lock(&afm_mu);
            pthread_cond_broadcast(&afm_done_cv);
            pthread_mutex_unlock(&afm_mu);
        }
    }
}
static void *afm_helper_main(void *arg) {
    sigset_t all;
    unsigned long seen = 0;
    afm_job *job;
    (void)arg;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);
    pthread_mutex_lock(&afm_mu);
    for (;;) {
        while (afm_current == NULL || afm_gen == seen)
            pthread_cond_wait(&afm_job_cv, &afm_mu);
        seen = afm_gen;
        job = afm_current;
        if (job->seats <= 0) continue;
        job->seats--;
        __atomic_add_fetch(&job->refs, 1, __ATOMIC_RELAXED);
        pthread_mutex_unlock(&afm_mu);
        afm_run(job);
        afm_release(job);
        pthread_mutex_lock(&afm_mu);
    }
    return NULL;
}
static void afm_atfork_prepare(void) { pthread_mutex_lock(&afm_mu); }
static void afm_atfork_parent(void) { pthread_mutex_unlock(&afm_mu); }
static void afm_atfork_child(void) {
    /* only the forking thread survives: no helpers, no job in flight */
    pthread_mutex_init(&afm_mu, NULL);
    pthread_cond_init(&afm_job_cv, NULL);
    pthread_cond_init(&afm_done_cv, NULL);
    afm_current = NULL;
    afm_helpers = 0;
}
/* 0 on success, -1 when the job could not be allocated (nothing was run). */
static int afm_parallel(afm_chunk_fn fn, void *ctx, ptrdiff_t n, int n_threads) {
    afm_job *job;
    ptrdiff_t c;
    pthread_t tid;
    pthread_attr_t attr;
    int want = n_threads - 1, posted = 0;
    if (want > AFM_MAX_HELPERS) want = AFM_MAX_HELPERS;
    if (want > n - 1) want = (int)(n - 1);
    if (want <= 0) {
        for (c = 0; c < n; c++) fn(ctx, c);
        return 0;
    }
    job = (afm_job *)malloc(sizeof(afm_job));
    if (job == NULL) return -1;
    job->fn = fn; job->ctx = ctx; job->n = n;
    job->next = 0; job->done = 0; job->refs = 1; job->seats = want;
    pthread_mutex_lock(&afm_mu);
    if (!afm_atfork_set) {
        pthread_atfork(afm_atfork_prepare, afm_atfork_parent, afm_atfork_child);
        afm_atfork_set = 1;
    }
    while (afm_helpers < want) {
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        if (pthread_create(&tid, &attr, afm_helper_main, NULL) != 0) {
            pthread_attr_destroy(&attr);
            break;
        }
        pthread_attr_destroy(&attr);
        afm_helpers++;
    }
    if (afm_current == NULL && afm_helpers > 0) {
        afm_current = job;
        afm_gen++;
        posted = 1;
        pthread_cond_broadcast(&afm_job_cv);
    }
    pthread_mutex_unlock(&afm_mu);
    afm_run(job);
    pthread_mutex_lock(&afm_mu);
    while (__atomic_load_n(&job->done, __ATOMIC_ACQUIRE) < n)
        pthread_cond_wait(&afm_done_cv, &afm_mu);
    if (posted) afm_current = NULL;
    pthread_mutex_unlock(&afm_mu);
    afm_release(job);
    return 0;
}

#endif /* AFMFAST_READER_TEXT_H */
