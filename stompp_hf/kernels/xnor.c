/* Exact XNOR-popcount CPU kernel for a binary-input x binary-weight linear layer (stompp_hf.kernels.xnor).

   xnor_linear_f32 computes, bit for bit, what the dense torch path computes:

       sx = where(x >= 0, 1, -1)                          sign(0) = sign(-0.0) = +1, +-inf -> +-1
       sw = unpack_signs(weight_packed, K) * 2 - 1        +-1, [N, K]
       y  = F.linear(sx, sw)                              exact integers (|y| <= K < 2**24)
       y  = y * out_scale                                 optional, one float32 rounding
       y  = y + bias                                      optional, one float32 rounding

   The activations are packed into 64-bit sign words, and every dot product is K - 2 * popcount(xa ^ w) summed over
   the words. The epilogue does the multiply and the add as two separately rounded float32 operations (the kernel is
   built with -ffp-contract=off, so no fused multiply-add), which is what makes the result identical to torch's.
   A NaN in x has no sign: packing the activations ORs an `x != x` test into a flag, and the call then returns 2
   without computing y (the Python wrapper raises ValueError).

   There are two code paths. With few rows (M < simd_min_rows, e.g. batch-1 inference) a scalar path reads the
   packed weights in place and runs popcnt on register tiles of 4 activation rows x 2 weight rows. With more rows an
   AVX2 path first copies the weights into nibble planes, 4 rows interleaved per 64-bit word, and counts bits with two
   16-entry byte table lookups (vpshufb) per word on register tiles of 6 activation rows x 4 weight rows.

   Work is split over weight rows (or over activation rows when there are many) between the calling thread and up to
   nthreads - 1 workers of a process-wide pthread pool. The pool starts on first need and is kept, because starting
   threads per call costs tens of microseconds; idle workers spin for about 20 us, then sleep. A problem too small to
   repay waking a worker, or a call made while another thread's call holds the pool, runs on the calling thread alone.

   This file is compiled on first use with the system C compiler ($CC, else cc) into a per-user cache directory by
   stompp_hf.kernels.build, then loaded with ctypes: no Python headers, no torch headers. Threads are plain pthreads
   (not OpenMP, whose runtime torch already bundles); ctypes releases the GIL during a call. It must compile without
   warnings under -Wall -Wextra (tests/test_xnor.py checks with -Werror). */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <time.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif
#if defined(__AVX2__) && !defined(XN_NO_SIMD)
#define XN_SIMD 1
#else
#define XN_SIMD 0
#endif

/* Scalar path: register tile of XN_MR activation rows x XN_NR weight rows, read straight from the packed weights. */
#define XN_MR 4
#define XN_NR 2
/* AVX2 path: XN_VMR activation rows x XN_VNG groups of 4 weight rows, from a nibble-split copy of the weights. */
#define XN_VMR 6
#define XN_VNG 1
#define XN_BLOCK_BYTES 131072   /* weight bytes per cache block */
#define XN_MAX_THREADS 256

static const uint64_t XN_LO4 = 0x0F0F0F0F0F0F0F0FULL;

typedef struct {
    const float *x;
    int64_t ldx;
    const uint8_t *w;
    int64_t nbytes;          /* bytes per packed weight row: ceil(K / 8) */
    const float *scale;
    const float *bias;
    float *y;
    int64_t M, N, K;
    int64_t nw;              /* 64-bit words per row: ceil(K / 64) */
    int64_t nfull;           /* whole words per row: K / 64 */
    int tail_bytes;          /* bytes in the last partial word (0 if none) */
    uint64_t tail_mask;      /* its valid bits */
    int simd;
    int split_m;
    int nthreads;
    uint64_t *xa;            /* scalar: sign words [M, nw]; simd: nibble planes, each word 4 times [Mpad, nw, 2, 4] */
    uint64_t *wv;            /* simd: nibble planes of the weights [Gpad, nw, 2, 4] */
    int64_t mpad, gpad;      /* simd: rows padded to XN_VMR, weight groups of 4 padded to XN_VNG */
    int64_t block;           /* scalar: weight rows per cache block; simd: groups per cache block */
    int arrived;             /* threads done packing their share of the operands */
    int nan;                 /* set by a thread whose share of x has a NaN */
} xn_job;

static inline uint64_t xn_load64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

/* Word `k` of packed weight row `n`, with bits past K cleared. */
static inline uint64_t xn_wword(const xn_job *j, int64_t n, int64_t k)
{
    const uint8_t *p = j->w + n * j->nbytes + 8 * k;
    if (k < j->nfull) return xn_load64(p);
    uint64_t v = 0;
    for (int i = 0; i < j->tail_bytes; i++) v |= (uint64_t)p[i] << (8 * i);
    return v & j->tail_mask;
}

/* Sign bits of 64 (or `cnt` < 64) floats: bit k is p[k] >= 0 (-0.0 -> 1, NaN -> 0), bits past cnt are 0.
   `*nan` becomes nonzero if one of the floats is a NaN (it is only ever ORed into). */
static inline uint64_t xn_signs(const float *p, int64_t cnt, unsigned *nan)
{
    uint64_t bits = 0;
    if (cnt >= 64) {
#if defined(__AVX__)
        const __m256 zero = _mm256_setzero_ps();
        __m256 unord = zero;
        for (int b = 0; b < 8; b++) {
            __m256 v = _mm256_loadu_ps(p + 8 * b);
            bits |= (uint64_t)(unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_GE_OQ)) << (8 * b);
            unord = _mm256_or_ps(unord, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        }
        *nan |= (unsigned)_mm256_movemask_ps(unord);
#else
        for (int k = 0; k < 64; k++) {
            bits |= (uint64_t)(p[k] >= 0.0f) << k;
            *nan |= p[k] != p[k];
        }
#endif
    } else {
        for (int64_t k = 0; k < cnt; k++) {
            bits |= (uint64_t)(p[k] >= 0.0f) << k;
            *nan |= p[k] != p[k];
        }
    }
    return bits;
}

/* Pack activation rows [m0, m1) into the layout of the active path (zero rows past M for the simd path); flag a
   NaN among them in j->nan. */
static void xn_pack_x(xn_job *j, int64_t m0, int64_t m1)
{
    const int64_t nw = j->nw;
    unsigned nan = 0;
    for (int64_t m = m0; m < m1; m++) {
        const float *r = j->x + m * j->ldx;
        if (j->simd) {
            uint64_t *o = j->xa + m * nw * 8;
            for (int64_t k = 0; k < nw; k++) {
                const uint64_t b = m < j->M ? xn_signs(r + 64 * k, j->K - 64 * k, &nan) : 0;
                for (int q = 0; q < 4; q++) {
                    o[8 * k + q] = b & XN_LO4;
                    o[8 * k + 4 + q] = (b >> 4) & XN_LO4;
                }
            }
        } else {
            uint64_t *o = j->xa + m * nw;
            for (int64_t k = 0; k < nw; k++) o[k] = xn_signs(r + 64 * k, j->K - 64 * k, &nan);
        }
    }
    if (nan) __atomic_store_n(&j->nan, 1, __ATOMIC_RELAXED);
}

#if XN_SIMD
/* simd path: nibble planes of weight groups [g0, g1), 4 rows interleaved per word (zero rows past N). */
static void xn_pack_w(const xn_job *j, int64_t g0, int64_t g1)
{
    const int64_t nw = j->nw, nfull = j->nfull;
    for (int64_t g = g0; g < g1; g++) {
        uint64_t *o = j->wv + g * nw * 8;
        const uint8_t *row[4];
        uint64_t keep[4];
        int64_t n[4];
        for (int q = 0; q < 4; q++) {
            n[q] = 4 * g + q < j->N ? 4 * g + q : 4 * g;   /* a row past N reads row 4g and is zeroed */
            keep[q] = 4 * g + q < j->N ? ~(uint64_t)0 : 0;
            row[q] = j->w + n[q] * j->nbytes;
        }
        for (int64_t k = 0; k < nfull; k++) {
            for (int q = 0; q < 4; q++) {
                const uint64_t b = xn_load64(row[q] + 8 * k) & keep[q];
                o[8 * k + q] = b & XN_LO4;
                o[8 * k + 4 + q] = (b >> 4) & XN_LO4;
            }
        }
        if (nfull < nw) {
            for (int q = 0; q < 4; q++) {
                const uint64_t b = xn_wword(j, n[q], nfull) & keep[q];
                o[8 * nfull + q] = b & XN_LO4;
                o[8 * nfull + 4 + q] = (b >> 4) & XN_LO4;
            }
        }
    }
}
#endif

static inline void xn_store(const xn_job *j, int64_t m, int64_t n, uint64_t count)
{
    float d = (float)(j->K - 2 * (int64_t)count);
    if (j->scale) d = d * j->scale[n];
    if (j->bias) d = d + j->bias[n];
    j->y[m * j->N + n] = d;
}

/* Scalar register tile: rows [m, m + mr) x weight rows [n, n + nr); mr, nr are constants after inlining. */
static inline __attribute__((always_inline)) void xn_tile(const xn_job *j, int64_t m, int64_t n, const int mr,
                                                           const int nr)
{
    const int64_t nw = j->nw, nfull = j->nfull, nbytes = j->nbytes;
    const uint64_t *xr = j->xa + m * nw;
    const uint8_t *wr = j->w + n * nbytes;
    uint64_t acc[XN_MR][XN_NR];
    for (int i = 0; i < mr; i++)
        for (int q = 0; q < nr; q++) acc[i][q] = 0;
    for (int64_t k = 0; k < nfull; k++) {
        uint64_t wv[XN_NR];
        for (int q = 0; q < nr; q++) wv[q] = xn_load64(wr + q * nbytes + 8 * k);
        for (int i = 0; i < mr; i++) {
            const uint64_t xv = xr[i * nw + k];
            for (int q = 0; q < nr; q++) acc[i][q] += (uint64_t)__builtin_popcountll(xv ^ wv[q]);
        }
    }
    if (nfull < nw) {
        for (int q = 0; q < nr; q++) {
            const uint64_t wv = xn_wword(j, n + q, nfull);
            for (int i = 0; i < mr; i++) acc[i][q] += (uint64_t)__builtin_popcountll(xr[i * nw + nfull] ^ wv);
        }
    }
    for (int i = 0; i < mr; i++)
        for (int q = 0; q < nr; q++) xn_store(j, m + i, n + q, acc[i][q]);
}

static void xn_tile_rows(const xn_job *j, int64_t m, int64_t n, int mr)
{
    switch (mr) {
#if XN_MR > 3
    case 3: xn_tile(j, m, n, 3, XN_NR); break;
#endif
#if XN_MR > 2
    case 2: xn_tile(j, m, n, 2, XN_NR); break;
#endif
    case 1: xn_tile(j, m, n, 1, XN_NR); break;
    default: xn_tile(j, m, n, XN_MR, XN_NR); break;
    }
}

static void xn_tile_col(const xn_job *j, int64_t m, int64_t n, int mr)
{
    switch (mr) {
#if XN_MR > 3
    case 3: xn_tile(j, m, n, 3, 1); break;
#endif
#if XN_MR > 2
    case 2: xn_tile(j, m, n, 2, 1); break;
#endif
    case 1: xn_tile(j, m, n, 1, 1); break;
    default: xn_tile(j, m, n, XN_MR, 1); break;
    }
}

/* Scalar path: outputs [m0, m1) x [n0, n1), the weights swept in cache blocks. */
static void xn_compute(const xn_job *j, int64_t m0, int64_t m1, int64_t n0, int64_t n1)
{
    for (int64_t b0 = n0; b0 < n1; b0 += j->block) {
        const int64_t b1 = b0 + j->block < n1 ? b0 + j->block : n1;
        for (int64_t m = m0; m < m1; m += XN_MR) {
            const int mr = m1 - m < XN_MR ? (int)(m1 - m) : XN_MR;
            int64_t n = b0;
            if (mr == XN_MR) {
                for (; n + XN_NR <= b1; n += XN_NR) xn_tile(j, m, n, XN_MR, XN_NR);
            } else {
                for (; n + XN_NR <= b1; n += XN_NR) xn_tile_rows(j, m, n, mr);
            }
            for (; n < b1; n++) xn_tile_col(j, m, n, mr);
        }
    }
}

#if XN_SIMD
/* simd register tile: padded rows [m, m + XN_VMR) x weight groups [g, g + XN_VNG). Per byte, popcount is the sum
   of two 16-entry table lookups (low and high nibble); byte sums are flushed to 64-bit lanes every 31 words. */
static inline __attribute__((always_inline)) void xn_vchunk(const uint64_t *xr, const uint64_t *wr, int64_t nw,
                                                              int64_t k0, int64_t k1,
                                                              __m256i acc[XN_VMR][XN_VNG])
{
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    for (int i = 0; i < XN_VMR; i++)
        for (int h = 0; h < XN_VNG; h++) acc[i][h] = _mm256_setzero_si256();
    for (int64_t k = k0; k < k1; k++) {
        __m256i wl[XN_VNG], wh[XN_VNG];
        for (int h = 0; h < XN_VNG; h++) {
            wl[h] = _mm256_loadu_si256((const __m256i *)(wr + h * nw * 8 + 8 * k));
            wh[h] = _mm256_loadu_si256((const __m256i *)(wr + h * nw * 8 + 8 * k + 4));
        }
        for (int i = 0; i < XN_VMR; i++) {
            const __m256i xl = _mm256_loadu_si256((const __m256i *)(xr + i * nw * 8 + 8 * k));
            const __m256i xh = _mm256_loadu_si256((const __m256i *)(xr + i * nw * 8 + 8 * k + 4));
            for (int h = 0; h < XN_VNG; h++) {
                acc[i][h] = _mm256_add_epi8(acc[i][h], _mm256_shuffle_epi8(lut, _mm256_xor_si256(xl, wl[h])));
                acc[i][h] = _mm256_add_epi8(acc[i][h], _mm256_shuffle_epi8(lut, _mm256_xor_si256(xh, wh[h])));
            }
        }
    }
}

static void xn_vtile(const xn_job *j, int64_t m, int64_t g)
{
    const int64_t nw = j->nw;
    const __m256i zero = _mm256_setzero_si256();
    const uint64_t *xr = j->xa + m * nw * 8;
    const uint64_t *wr = j->wv + g * nw * 8;
    __m256i sum[XN_VMR][XN_VNG], acc[XN_VMR][XN_VNG];
    if (nw <= 31) {   /* one chunk: no running sums to keep in registers */
        xn_vchunk(xr, wr, nw, 0, nw, acc);
        for (int i = 0; i < XN_VMR; i++)
            for (int h = 0; h < XN_VNG; h++) sum[i][h] = _mm256_sad_epu8(acc[i][h], zero);
    } else {
        for (int i = 0; i < XN_VMR; i++)
            for (int h = 0; h < XN_VNG; h++) sum[i][h] = zero;
        for (int64_t k0 = 0; k0 < nw; k0 += 31) {
            xn_vchunk(xr, wr, nw, k0, k0 + 31 < nw ? k0 + 31 : nw, acc);
            for (int i = 0; i < XN_VMR; i++)
                for (int h = 0; h < XN_VNG; h++)
                    sum[i][h] = _mm256_add_epi64(sum[i][h], _mm256_sad_epu8(acc[i][h], zero));
        }
    }
    const __m256i lo32 = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
    const __m128i kk = _mm_set1_epi32((int)j->K);
    for (int i = 0; i < XN_VMR; i++) {
        if (m + i >= j->M) break;
        float *yr = j->y + (m + i) * j->N;
        for (int h = 0; h < XN_VNG; h++) {
            const int64_t n = 4 * (g + h);
            if (n + 4 <= j->N && j->K < ((int64_t)1 << 30)) {
                /* counts <= K < 2**31: the low 32 bits of each lane, then d = K - 2 * count, exactly as floats */
                const __m128i c = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(sum[i][h], lo32));
                __m128 d = _mm_cvtepi32_ps(_mm_sub_epi32(kk, _mm_add_epi32(c, c)));
                if (j->scale) d = _mm_mul_ps(d, _mm_loadu_ps(j->scale + n));
                if (j->bias) d = _mm_add_ps(d, _mm_loadu_ps(j->bias + n));
                _mm_storeu_ps(yr + n, d);
            } else {
                uint64_t c[4];
                _mm256_storeu_si256((__m256i *)c, sum[i][h]);
                for (int q = 0; n + q < j->N; q++) xn_store(j, m + i, n + q, c[q]);
            }
        }
    }
}

/* simd path: padded rows [m0, m1) x groups [g0, g1), the weight groups swept in cache blocks. */
static void xn_vcompute(const xn_job *j, int64_t m0, int64_t m1, int64_t g0, int64_t g1)
{
    for (int64_t b0 = g0; b0 < g1; b0 += j->block) {
        const int64_t b1 = b0 + j->block < g1 ? b0 + j->block : g1;
        for (int64_t m = m0; m < m1; m += XN_VMR)
            for (int64_t g = b0; g < b1; g += XN_VNG) xn_vtile(j, m, g);
    }
}
#endif

/* Share `tid` of `nthreads` of `total` items, in whole units of `unit` items. */
static void xn_share(int64_t total, int64_t unit, int tid, int nthreads, int64_t *lo, int64_t *hi)
{
    const int64_t units = (total + unit - 1) / unit;
    const int64_t a = units * tid / nthreads * unit, b = units * (tid + 1) / nthreads * unit;
    *lo = a < total ? a : total;
    *hi = b < total ? b : total;
}

static inline void xn_pause(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Thread `tid`'s share of one call: pack its share of the operands, wait until every thread has packed its own,
   then compute its share of the outputs (nothing if some share of x has a NaN). */
static void xn_run_share(xn_job *j, int tid)
{
    const int T = j->nthreads;
    int64_t lo, hi;
    if (j->simd) {
        xn_share(j->mpad, XN_VMR, tid, T, &lo, &hi);
        xn_pack_x(j, lo, hi);
#if XN_SIMD
        xn_share(j->gpad, XN_VNG, tid, T, &lo, &hi);
        xn_pack_w(j, lo, hi);
#endif
    } else {
        xn_share(j->M, XN_MR, tid, T, &lo, &hi);
        xn_pack_x(j, lo, hi);
    }
    if (T > 1) {
        __atomic_add_fetch(&j->arrived, 1, __ATOMIC_ACQ_REL);
        for (long spins = 0; __atomic_load_n(&j->arrived, __ATOMIC_ACQUIRE) < T; spins++) {
            if (spins < 4096) xn_pause();
            else sched_yield();
        }
    }
    if (__atomic_load_n(&j->nan, __ATOMIC_RELAXED)) return;
#if XN_SIMD
    if (j->simd) {
        if (j->split_m) {
            xn_share(j->mpad, XN_VMR, tid, T, &lo, &hi);
            xn_vcompute(j, lo, hi, 0, j->gpad);
        } else {
            xn_share(j->gpad, XN_VNG, tid, T, &lo, &hi);
            xn_vcompute(j, 0, j->mpad, lo, hi);
        }
        return;
    }
#endif
    if (j->split_m) {
        xn_share(j->M, XN_MR, tid, T, &lo, &hi);
        xn_compute(j, lo, hi, 0, j->N);
    } else {
        xn_share(j->N, XN_NR, tid, T, &lo, &hi);
        xn_compute(j, 0, j->M, lo, hi);
    }
}

/* A process-wide pool of worker threads, started on demand and kept: starting threads on every call costs tens of
   microseconds. One call at a time uses it (a concurrent call runs on its own thread); idle workers spin for
   XN_SPIN_NS, then sleep on a condition variable. A forked child starts with an empty pool. */
#define XN_SPIN_NS 20000

static pthread_mutex_t xn_busy = PTHREAD_MUTEX_INITIALIZER;   /* held by the call that owns the pool */
static pthread_mutex_t xn_mu = PTHREAD_MUTEX_INITIALIZER;     /* guards the fields below */
static pthread_cond_t xn_wake = PTHREAD_COND_INITIALIZER;
static pthread_cond_t xn_done = PTHREAD_COND_INITIALIZER;
static int xn_size;                 /* workers started (tids 1..xn_size) */
static unsigned long xn_gen;        /* bumped for every job */
static xn_job *xn_current;
static int xn_active;               /* threads on the current job, the caller included */
static int xn_pending;              /* workers not yet done with the current job */
static unsigned long xn_start_gen[XN_MAX_THREADS];
static pthread_once_t xn_once = PTHREAD_ONCE_INIT;

static void xn_after_fork_child(void)
{
    pthread_mutex_init(&xn_busy, NULL);
    pthread_mutex_init(&xn_mu, NULL);
    pthread_cond_init(&xn_wake, NULL);
    pthread_cond_init(&xn_done, NULL);
    xn_size = 0;
    xn_active = 0;
    xn_pending = 0;
    xn_current = NULL;
}

static void xn_register_fork(void) { pthread_atfork(NULL, NULL, xn_after_fork_child); }

static int64_t xn_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void *xn_pool_worker(void *arg)
{
    const int tid = (int)(intptr_t)arg;
    unsigned long seen = xn_start_gen[tid];
    for (;;) {
        const int64_t t0 = xn_now_ns();
        for (int i = 0; __atomic_load_n(&xn_gen, __ATOMIC_ACQUIRE) == seen; i++) {
            if ((i & 63) == 63 && xn_now_ns() - t0 > XN_SPIN_NS) break;
            xn_pause();
        }
        pthread_mutex_lock(&xn_mu);
        while (__atomic_load_n(&xn_gen, __ATOMIC_ACQUIRE) == seen) pthread_cond_wait(&xn_wake, &xn_mu);
        seen = xn_gen;
        xn_job *j = tid < xn_active ? xn_current : NULL;   /* workers past the job's thread count sit it out */
        pthread_mutex_unlock(&xn_mu);
        if (!j) continue;
        xn_run_share(j, tid);
        pthread_mutex_lock(&xn_mu);
        if (__atomic_sub_fetch(&xn_pending, 1, __ATOMIC_ACQ_REL) == 0) pthread_cond_signal(&xn_done);
        pthread_mutex_unlock(&xn_mu);
    }
    return NULL;
}

/* Run `j` on the calling thread plus j->nthreads - 1 pool workers (fewer if the pool is busy or cannot grow). */
static void xn_run(xn_job *j)
{
    if (j->nthreads > 1 && pthread_mutex_trylock(&xn_busy) != 0) j->nthreads = 1;
    if (j->nthreads <= 1) {
        j->nthreads = 1;
        xn_run_share(j, 0);
        return;
    }
    pthread_once(&xn_once, xn_register_fork);
    pthread_mutex_lock(&xn_mu);
    if (xn_size < j->nthreads - 1) {
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);   /* workers never take signals meant for the interpreter */
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        while (xn_size < j->nthreads - 1) {
            pthread_t t;
            xn_start_gen[xn_size + 1] = xn_gen;
            if (pthread_create(&t, &attr, xn_pool_worker, (void *)(intptr_t)(xn_size + 1)) != 0) break;
            xn_size++;
        }
        pthread_attr_destroy(&attr);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        if (xn_size < j->nthreads - 1) j->nthreads = xn_size + 1;
    }
    xn_current = j;
    xn_active = j->nthreads;
    xn_pending = j->nthreads - 1;
    __atomic_add_fetch(&xn_gen, 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&xn_wake);
    pthread_mutex_unlock(&xn_mu);

    xn_run_share(j, 0);

    for (int i = 0; __atomic_load_n(&xn_pending, __ATOMIC_ACQUIRE) > 0 && i < 2000; i++) xn_pause();
    pthread_mutex_lock(&xn_mu);
    while (xn_pending > 0) pthread_cond_wait(&xn_done, &xn_mu);
    xn_current = NULL;
    xn_active = 0;
    pthread_mutex_unlock(&xn_mu);
    pthread_mutex_unlock(&xn_busy);
}

/* y[M, N] = epilogue(K - 2 * popcount(signs(x[m]) ^ w[n])), with optional (NULL) scale and bias. Uses the AVX2
   path when compiled with it and M >= simd_min_rows; at most `nthreads` threads, each with >= min_work word pairs.
   Returns 0 on success, 1 if scratch memory could not be allocated, 2 if x has a NaN (then y is not written). */
int xnor_linear_f32(const float *x, int64_t M, int64_t ldx, int64_t K, const uint8_t *w, int64_t N,
                    const float *scale, const float *bias, float *y, int nthreads, int64_t min_work,
                    int64_t simd_min_rows)
{
    if (M <= 0 || N <= 0 || K <= 0) return 0;
    xn_job j;
    memset(&j, 0, sizeof j);
    j.x = x; j.ldx = ldx; j.w = w; j.nbytes = (K + 7) / 8;
    j.scale = scale; j.bias = bias; j.y = y;
    j.M = M; j.N = N; j.K = K;
    j.nw = (K + 63) / 64;
    j.nfull = K / 64;
    j.tail_bytes = (int)(j.nbytes - 8 * j.nfull);
    j.tail_mask = (K % 64) ? ((uint64_t)1 << (K % 64)) - 1 : ~(uint64_t)0;
    j.simd = XN_SIMD && M >= simd_min_rows;

    int64_t mtiles, ntiles;
    if (j.simd) {
        j.mpad = (M + XN_VMR - 1) / XN_VMR * XN_VMR;
        const int64_t groups = (N + 3) / 4;
        j.gpad = (groups + XN_VNG - 1) / XN_VNG * XN_VNG;
        j.block = XN_BLOCK_BYTES / (j.nw * 64) / XN_VNG * XN_VNG;
        if (j.block < XN_VNG) j.block = XN_VNG;
        mtiles = j.mpad / XN_VMR;
        ntiles = j.gpad / XN_VNG;
        j.xa = (uint64_t *)malloc((size_t)(j.mpad * j.nw * 8) * sizeof(uint64_t));
        j.wv = (uint64_t *)malloc((size_t)(j.gpad * j.nw * 8) * sizeof(uint64_t));
        if (!j.xa || !j.wv) {
            free(j.xa);
            free(j.wv);
            return 1;
        }
    } else {
        j.block = XN_BLOCK_BYTES / j.nbytes / XN_NR * XN_NR;
        if (j.block < XN_NR) j.block = XN_NR;
        mtiles = (M + XN_MR - 1) / XN_MR;
        ntiles = (N + XN_NR - 1) / XN_NR;
        j.xa = (uint64_t *)malloc((size_t)(M * j.nw) * sizeof(uint64_t));
        if (!j.xa) return 1;
    }

    int64_t t = nthreads < 1 ? 1 : nthreads > XN_MAX_THREADS ? XN_MAX_THREADS : nthreads;
    const int64_t work = M * N * j.nw;
    if (min_work > 0 && work / min_work < t) t = work / min_work;
    if (t < 1) t = 1;
    j.split_m = mtiles >= 8 * t && mtiles >= ntiles;
    const int64_t units = j.split_m ? mtiles : ntiles;
    if (units < t) t = units;
    j.nthreads = (int)t;
    xn_run(&j);
    free(j.xa);
    free(j.wv);
    return j.nan ? 2 : 0;
}
