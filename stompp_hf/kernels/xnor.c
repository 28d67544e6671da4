/* Exact XNOR-popcount CPU kernels for binary-input x binary-weight layers (stompp_hf.kernels.xnor / .bconv).

   xnor_linear_f32 computes, bit for bit, what the dense torch path computes:

       sx = where(x >= 0, 1, -1)                          sign(0) = sign(-0.0) = +1, +-inf -> +-1
       sw = unpack_signs(weight_packed, K) * 2 - 1        +-1, [N, K]
       y  = F.linear(sx, sw)                              exact integers (|y| <= K < 2**24)
       y  = y * out_scale                                 optional, one float32 rounding
       y  = y + bias                                      optional, one float32 rounding

   and xnor_conv2d_f32 (xnor_conv.c) the same for F.conv2d with zero padding, any stride, dilation and groups.
   Every dot product is K - 2 * popcount(signs(x) ^ w) over sign words. The epilogue does the multiply and the add as
   two separately rounded float32 operations (the kernel is built with -ffp-contract=off, so no fused multiply-add),
   which is what makes the result identical to torch's. A NaN in x has no sign: packing the activations ORs an
   `x != x` test into a flag, and the call then returns XN_NAN without computing y (the Python wrapper raises
   ValueError). With `strict` set, the inputs must already be +-1 (the output of a binary activation) and any other
   value, NaN included, returns XN_NOT_PM1 (the wrapper then falls back to the dense path).

   Three code paths, chosen at run time from the CPU's features (xnor_paths; `path` forces one, for tests):

   * avx512 (AVX-512 F/BW/DQ/VL + VPOPCNTDQ, xnor_avx512.c): weights in 16-row panels, one 32-bit word of 16 rows
     per 512-bit vector; a register tile of 8 activation rows x 2 panels broadcasts each activation word against the
     panel words (vpxord, vpopcntd, vpaddd), so 32 outputs accumulate in 16 registers with no horizontal sums. Tiles
     sweep one panel pair over a block of rows (the panel stays in L1, the rows in L2).
   * avx2 (from simd_min_rows rows on; K <= 65535): every 4 bits are one table lookup. An activation nibble selects
     one of 16 tables (popcount(a ^ v) for v = 0..15), and vpshufb looks up the nibbles of 32 weight rows at once,
     laid out one byte each per call; register tiles of 3 rows x 96 weight rows, byte counts widened every 63 steps.
   * scalar (any CPU): popcnt on register tiles of 4 activation rows x 2 weight rows, read from the packed weights.

   The AVX2 and AVX-512 code is compiled with `target` attributes, so every path is built whatever -march says and
   the CPU check alone decides what runs. The panel layout of the avx512 path can be built once per weight
   (xnor_prepare_weights, kept by the packed modules); without it a call builds it in scratch memory.

   Work is split over weight rows (or over activation rows when there are many) between the calling thread and up to
   nthreads - 1 workers of a process-wide pthread pool. The pool starts on first need and is kept, because starting
   threads per call costs tens of microseconds; idle workers spin for about 20 us, then sleep. A problem too small to
   repay waking a worker, or a call made while another thread's call holds the pool, runs on the calling thread alone.

   This file is compiled on first use with the system C compiler ($CC, else cc) into a per-user cache directory by
   stompp_hf.kernels.build, then loaded with ctypes: no Python headers, no torch headers. The build reads the sibling
   files it #includes (xnor_avx512.c, xnor_amx.c, xnor_conv.c, and xnor_train.c: the fused elementwise passes of a
   training step, stompp_hf.kernels.elementwise) into one translation unit. Multi-threaded calls run on torch's own
   GNU OpenMP threads when xnor.py hands the runtime's entry points over (xnor_use_openmp), else on this file's
   pthread pool; nothing is linked at build time. ctypes releases the GIL during a call. It must compile without
   warnings under -Wall -Wextra (tests/test_xnor.py checks with -Werror, also with -DXN_NO_SIMD and -march=x86-64). */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <float.h>
#include <sched.h>
#include <signal.h>
#include <time.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__)) && !defined(XN_NO_SIMD)
#define XN_X86_SIMD 1   /* the AVX2 and AVX-512 paths are compiled (and chosen at run time) */
#include <immintrin.h>
#else
#define XN_X86_SIMD 0
#if defined(__AVX__)
#include <immintrin.h>  /* the sign loop of the portable path */
#endif
#endif

#define XN_PATH_AUTO (-1)
#define XN_PATH_SCALAR 0
#define XN_PATH_AVX2 1
#define XN_PATH_AVX512 2

/* Status codes of the entry points (the Python wrappers map them to exceptions). */
#define XN_OK 0
#define XN_NOMEM 1        /* scratch memory could not be allocated */
#define XN_NAN 2          /* x has a NaN (y: nothing to use) */
#define XN_NOT_PM1 3      /* strict: x has a value other than +-1 (y: nothing to use) */
#define XN_NO_PATH 4      /* the requested path is not compiled or not supported by this CPU */
#define XN_BAD_ARGS 5     /* a shape the kernel does not handle */

#if XN_X86_SIMD
/* AVX512-BF16's conversion instructions (VCVTNEPS2BF16), where the compiler knows them (GCC 10, clang 11): the
   avx512 path's bfloat16 epilogue rounds with them on CPUs that have them (xz_native_ok). The target only makes
   them available; nothing else of the avx512 path changes, and they run only where the CPU has them. */
#if (defined(__clang__) && __clang_major__ >= 11) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 10)
#define XN_HAVE_BF16 1
#define XN_BF16_TARGET ",avx512bf16"
#else
#define XN_HAVE_BF16 0
#define XN_BF16_TARGET ""
#endif
#define XN_AVX2_FN __attribute__((target("avx2,popcnt")))
#define XN_AVX512_FN \
    __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vpopcntdq,avx2,popcnt" XN_BF16_TARGET)))
#endif

/* Scalar path: register tile of XN_MR activation rows x XN_NR weight rows, read straight from the packed weights. */
#define XN_MR 4
#define XN_NR 2
/* AVX2 path: register tile of XT_R activation rows x XT_C groups of 32 weight rows (a panel), byte counts flushed to
   16-bit sums every XT_RUN nibble steps (at most 4 a step: 63 x 4 = 252 < 256). */
#define XT_R 3
#define XT_C 3
#define XT_RUN 63
#define XT_MAX_K 65535          /* 16-bit sums: K above this goes to the scalar path */
#define XT_ROWS_BYTES 262144    /* activation offset bytes per row block (kept in L2 while the panels sweep it) */
#define XN_BLOCK_BYTES 131072   /* scalar path: weight bytes per cache block */
#define XN_MAX_THREADS 256

/* The bitmask of paths this build and this CPU support: bit XN_PATH_* set where that path can run. */
int xnor_paths(void)
{
    int paths = 1 << XN_PATH_SCALAR;
#if XN_X86_SIMD
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt")) paths |= 1 << XN_PATH_AVX2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512vpopcntdq"))
        paths |= 1 << XN_PATH_AVX512;
#endif
    return paths;
}

/* Whether outputs get the huge-page advice below. On a VM whose balloon reports free memory to the host, a huge
   page can fault back in from the host and stall a call, so xnor.py turns it off there (`set_hugepages`). Returns
   the previous setting. */
static int xn_hugepages = 1;

int xnor_set_hugepages(int on) { return __atomic_exchange_n(&xn_hugepages, on != 0, __ATOMIC_RELAXED); }

/* Outputs of at least this many bytes are written with streaming (non-temporal) stores where their layout allows
   (`xnor_set_stream_min_bytes`; see xz_stream_ok). Such an output is too large to still be in L2 when the next op
   reads it, and a normal store first reads every line it writes (read for ownership): streaming skips that read,
   a third of the memory traffic of a layer whose input and output are the same size. */
static int64_t xn_stream_min_bytes = (int64_t)1 << 22;

int64_t xnor_set_stream_min_bytes(int64_t bytes)
{
    return __atomic_exchange_n(&xn_stream_min_bytes, bytes < 0 ? INT64_MAX : bytes, __ATOMIC_RELAXED);
}

/* Ask the kernel to back the 2 MiB-aligned interior of a large output buffer with transparent huge pages (Linux,
   THP "madvise" or "always" mode; a no-op elsewhere). A fresh output of a few MiB is otherwise first touched 4 KiB
   at a time: at batch 32 those page faults cost as much as the popcounts (768 -> 3072 at 4096 rows: 61 -> 37 ms on
   one EPYC core). Only the faults change: no byte is read or written here. */
static void xn_hugepage_hint(void *p, int64_t bytes)
{
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = (uintptr_t)1 << 21;
    if (bytes < (int64_t)(2 * huge) || !__atomic_load_n(&xn_hugepages, __ATOMIC_RELAXED)) return;
    const uintptr_t lo = ((uintptr_t)p + huge - 1) & ~(huge - 1), hi = ((uintptr_t)p + (uintptr_t)bytes) & ~(huge - 1);
    if (hi > lo) (void)madvise((void *)lo, hi - lo, MADV_HUGEPAGE);
#else
    (void)p;
    (void)bytes;
#endif
}

static int xn_supported(int path) { return path >= 0 && path <= 2 && ((xnor_paths() >> path) & 1); }

/* ------------------------------------------------------------------------------------------------------------
   The worker pool runs tasks: a task is a struct that starts with xn_task, whose `run` each thread calls with its
   id. A task packs its operands, meets the other threads at xn_barrier, then computes its share of the outputs. */

typedef struct xn_task xn_task;
struct xn_task {
    void (*run)(xn_task *task, int tid);
    int nthreads;
    int arrived;             /* threads done packing their share of the operands */
    int status;              /* XN_NAN / XN_NOT_PM1 if some share of x has one (only ever set to one of them) */
};

static void xn_fail(xn_task *t, int status) { __atomic_store_n(&t->status, status, __ATOMIC_RELAXED); }

static int xn_failed(xn_task *t) { return __atomic_load_n(&t->status, __ATOMIC_RELAXED); }

static inline void xn_pause(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Wait until every thread of the task has arrived (has packed its share). */
static void xn_barrier(xn_task *t)
{
    if (t->nthreads <= 1) return;
    __atomic_add_fetch(&t->arrived, 1, __ATOMIC_ACQ_REL);
    for (long spins = 0; __atomic_load_n(&t->arrived, __ATOMIC_ACQUIRE) < t->nthreads; spins++) {
        if (spins < 4096) xn_pause();
        else sched_yield();
    }
}

/* Share `tid` of `nthreads` of `total` items, in whole units of `unit` items. */
static void xn_share(int64_t total, int64_t unit, int tid, int nthreads, int64_t *lo, int64_t *hi)
{
    const int64_t units = (total + unit - 1) / unit;
    const int64_t a = units * tid / nthreads * unit, b = units * (tid + 1) / nthreads * unit;
    *lo = a < total ? a : total;
    *hi = b < total ? b : total;
}

/* Threads for `work` (row, column, word) triples: at most `nthreads`, each with at least `min_work`, at most
   `units` (the number of pieces the work splits into). */
static int xn_threads(int nthreads, int64_t work, int64_t min_work, int64_t units)
{
    int64_t t = nthreads < 1 ? 1 : nthreads > XN_MAX_THREADS ? XN_MAX_THREADS : nthreads;
    if (min_work > 0 && work / min_work < t) t = work / min_work;
    if (units < t) t = units;
    return t < 1 ? 1 : (int)t;
}

/* torch's OpenMP runtime, when xnor_use_openmp has handed it over (GNU libgomp's ABI: GOMP_parallel is what
   `#pragma omp parallel` compiles to). The kernels then run on torch's own intra-op threads instead of this file's
   pool: between two torch ops those threads spin (libgomp's default wait policy), so a second pool's worker would
   share a core with a spinning torch thread, and a 2-thread call ran slower than a 1-thread one inside a model
   (docs/design.md, "Threads"). Set once, before the first call. */
typedef void (*xn_gomp_parallel_fn)(void (*)(void *), void *, unsigned, unsigned);
static xn_gomp_parallel_fn xn_gomp_parallel;
static int (*xn_omp_thread_num)(void);
static int (*xn_omp_num_threads)(void);
static void (*xn_gomp_barrier)(void);

/* A process-wide pool of worker threads, started on demand and kept: starting threads on every call costs tens of
   microseconds. One call at a time uses it (a concurrent call runs on its own thread); idle workers spin for
   XN_SPIN_NS, then sleep on a condition variable. A forked child starts with an empty pool. */
#define XN_SPIN_NS 20000

static pthread_mutex_t xn_busy = PTHREAD_MUTEX_INITIALIZER;   /* held by the call that owns the pool */
static pthread_mutex_t xn_mu = PTHREAD_MUTEX_INITIALIZER;     /* guards the fields below */
static pthread_cond_t xn_wake = PTHREAD_COND_INITIALIZER;
static pthread_cond_t xn_done = PTHREAD_COND_INITIALIZER;
static int xn_size;                 /* workers started (tids 1..xn_size) */
static unsigned long xn_gen;        /* bumped for every task */
static xn_task *xn_current;
static int xn_active;               /* threads on the current task, the caller included */
static int xn_pending;              /* workers not yet done with the current task */
static unsigned long xn_start_gen[XN_MAX_THREADS];
static pthread_once_t xn_once = PTHREAD_ONCE_INIT;

static void xn_after_fork_child(void)
{
    xn_gomp_parallel = NULL;   /* libgomp's team does not survive fork(): a child runs on a fresh pool of its own */
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
        xn_task *t = tid < xn_active ? xn_current : NULL;   /* workers past the task's thread count sit it out */
        pthread_mutex_unlock(&xn_mu);
        if (!t) continue;
        t->run(t, tid);
        pthread_mutex_lock(&xn_mu);
        if (__atomic_sub_fetch(&xn_pending, 1, __ATOMIC_ACQ_REL) == 0) pthread_cond_signal(&xn_done);
        pthread_mutex_unlock(&xn_mu);
    }
    return NULL;
}

/* One thread of an OpenMP team: the team may be smaller than asked, so thread 0 shrinks the task to it before any
   thread splits the work. */
static void xn_omp_body(void *arg)
{
    xn_task *t = (xn_task *)arg;
    const int tid = xn_omp_thread_num();
    if (tid == 0) {
        const int n = xn_omp_num_threads();
        if (n < t->nthreads) t->nthreads = n;
    }
    xn_gomp_barrier();
    if (tid < t->nthreads) t->run(t, tid);
}

/* Run `t` on the calling thread plus t->nthreads - 1 workers: torch's OpenMP threads when handed over, else this
   file's pool (fewer if the pool is busy or cannot grow). */
static void xn_run(xn_task *t)
{
    if (t->nthreads > 1 && xn_gomp_parallel) {
        xn_gomp_parallel(xn_omp_body, t, (unsigned)t->nthreads, 0);
        return;
    }
    if (t->nthreads > 1 && pthread_mutex_trylock(&xn_busy) != 0) t->nthreads = 1;
    if (t->nthreads <= 1) {
        t->nthreads = 1;
        t->run(t, 0);
        return;
    }
    pthread_once(&xn_once, xn_register_fork);
    pthread_mutex_lock(&xn_mu);
    if (xn_size < t->nthreads - 1) {
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);   /* workers never take signals meant for the interpreter */
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        while (xn_size < t->nthreads - 1) {
            pthread_t th;
            xn_start_gen[xn_size + 1] = xn_gen;
            if (pthread_create(&th, &attr, xn_pool_worker, (void *)(intptr_t)(xn_size + 1)) != 0) break;
            xn_size++;
        }
        pthread_attr_destroy(&attr);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        if (xn_size < t->nthreads - 1) t->nthreads = xn_size + 1;
    }
    xn_current = t;
    xn_active = t->nthreads;
    xn_pending = t->nthreads - 1;
    __atomic_add_fetch(&xn_gen, 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&xn_wake);
    pthread_mutex_unlock(&xn_mu);

    t->run(t, 0);

    for (int i = 0; __atomic_load_n(&xn_pending, __ATOMIC_ACQUIRE) > 0 && i < 2000; i++) xn_pause();
    pthread_mutex_lock(&xn_mu);
    while (xn_pending > 0) pthread_cond_wait(&xn_done, &xn_mu);
    xn_current = NULL;
    xn_active = 0;
    pthread_mutex_unlock(&xn_mu);
    pthread_mutex_unlock(&xn_busy);
}

/* ------------------------------------------------------------------------------------------------------------
   Shared helpers: loads from the packed weights and the portable sign loop. */

static inline uint64_t xn_load64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

/* Bits [32 * k, 32 * k + 32) of a packed row of `nbytes` bytes holding K entries, with bits past K cleared. */
static inline uint32_t xn_word32(const uint8_t *row, int64_t nbytes, int64_t K, int64_t k)
{
    uint32_t v = 0;
    for (int b = 0; b < 4 && 4 * k + b < nbytes; b++) v |= (uint32_t)row[4 * k + b] << (8 * b);
    const int64_t left = K - 32 * k;
    return left >= 32 ? v : v & (((uint32_t)1 << left) - 1);
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

/* Whether p[0..cnt) are all exactly +1 or -1 (the strict mode's check; NaN is not). */
static int xn_all_pm1(const float *p, int64_t cnt)
{
    int ok = 1;
    for (int64_t k = 0; k < cnt; k++) ok &= (p[k] == 1.0f) | (p[k] == -1.0f);
    return ok;
}

/* ------------------------------------------------------------------------------------------------------------
   Linear layer, scalar and AVX2 paths. */

typedef struct {
    xn_task task;
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
    int simd;                /* the AVX2 path */
    int split_m;
    int strict;
    uint64_t *xa;            /* scalar: sign words [M, nw] */
    uint8_t *xt;             /* simd: per row, 4 x each nibble of its signs, one byte a nibble [mpad, 16 * nw] */
    uint8_t *wt;             /* simd: the weights' nibbles, one byte each, in panels of XT_C groups of 32 rows */
    int64_t k4;              /* simd: nibble steps, ceil(K / 4) */
    int64_t mpad, groups;    /* simd: rows padded to XT_R; groups of 32 weight rows, ceil(N / 32) */
    int64_t block;           /* scalar: weight rows per cache block; simd: rows per block */
    int stream;              /* simd: the outputs go out with streaming stores (xt_stream_ok) */
} xn_job;

/* Word `k` of packed weight row `n`, with bits past K cleared. */
static inline uint64_t xn_wword(const xn_job *j, int64_t n, int64_t k)
{
    const uint8_t *p = j->w + n * j->nbytes + 8 * k;
    if (k < j->nfull) return xn_load64(p);
    uint64_t v = 0;
    for (int i = 0; i < j->tail_bytes; i++) v |= (uint64_t)p[i] << (8 * i);
    return v & j->tail_mask;
}

#if XN_X86_SIMD
XN_AVX2_FN static void xt_pack_row(const xn_job *j, const float *r, int64_t m, unsigned *nan);
#endif

/* Pack activation rows [m0, m1) into the layout of the active path (zero rows past M for the simd path); flag a
   NaN (or, strict, a value other than +-1) among them. */
static void xn_pack_x(xn_job *j, int64_t m0, int64_t m1)
{
    unsigned nan = 0;
    int pm1 = 1;
    for (int64_t m = m0; m < m1; m++) {
        const float *r = j->x + m * j->ldx;
        if (j->strict && m < j->M) pm1 &= xn_all_pm1(r, j->K);
#if XN_X86_SIMD
        if (j->simd) {
            xt_pack_row(j, r, m, &nan);
            continue;
        }
#endif
        uint64_t *o = j->xa + m * j->nw;
        for (int64_t k = 0; k < j->nw; k++) o[k] = xn_signs(r + 64 * k, j->K - 64 * k, &nan);
    }
    if (j->strict ? !pm1 : nan != 0) xn_fail(&j->task, j->strict ? XN_NOT_PM1 : XN_NAN);
}

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

#if XN_X86_SIMD
/* AVX2 path. popcount(x ^ w) over 4 bits is a 16-entry table lookup: row a of xt_tab is popcount(a ^ v) for
   v = 0..15 (twice: once per 128-bit lane). An activation nibble picks the row (a table register), and vpshufb
   looks up 32 weight nibbles at once (one byte each, a group of 32 weight rows): 128 multiply-adds per shuffle and
   one byte add, against the two lookups, two XORs and two adds per 256 of a popcount table on XORed nibbles. */
#define XT_P(v) (((v) & 1) + (((v) >> 1) & 1) + (((v) >> 2) & 1) + (((v) >> 3) & 1))
#define XT_ROW8(a, v) XT_P((a) ^ (v)), XT_P((a) ^ ((v) + 1)), XT_P((a) ^ ((v) + 2)), XT_P((a) ^ ((v) + 3)), \
                      XT_P((a) ^ ((v) + 4)), XT_P((a) ^ ((v) + 5)), XT_P((a) ^ ((v) + 6)), XT_P((a) ^ ((v) + 7))
#define XT_ROW(a) XT_ROW8(a, 0), XT_ROW8(a, 8), XT_ROW8(a, 0), XT_ROW8(a, 8)
static const uint8_t xt_tab[16 * 32] __attribute__((aligned(32))) = {
    XT_ROW(0),  XT_ROW(1),  XT_ROW(2),  XT_ROW(3),  XT_ROW(4),  XT_ROW(5),  XT_ROW(6),  XT_ROW(7),
    XT_ROW(8),  XT_ROW(9),  XT_ROW(10), XT_ROW(11), XT_ROW(12), XT_ROW(13), XT_ROW(14), XT_ROW(15)};

/* Bytes before panel p (XT_C groups, each k4 steps of 32 bytes; the last panel may have fewer groups). */
static inline int64_t xt_panel_at(const xn_job *j, int64_t p) { return p * XT_C * j->k4 * 32; }
static inline int xt_panel_groups(const xn_job *j, int64_t p)
{
    return j->groups - XT_C * p < XT_C ? (int)(j->groups - XT_C * p) : XT_C;
}

/* 8 bytes (64 entries of packed signs) -> their 16 nibbles, one byte each, in order. */
XN_AVX2_FN static inline __m128i xt_nibbles(uint64_t b)
{
    const __m128i v = _mm_cvtsi64_si128((long long)b), lo4 = _mm_set1_epi8(0x0F);
    return _mm_unpacklo_epi8(_mm_and_si128(v, lo4), _mm_and_si128(_mm_srli_epi16(v, 4), lo4));
}

/* The avx2 epilogues' output vector: (float)d * scale + bias, torch's two roundings. A layer without a scale gets
   1.0 and without a bias -0.0 (xt_scale8, xt_bias8), both exact identities (x + -0.0 keeps a -0.0 product). */
XN_AVX2_FN static inline __m256 xt_affine8(__m256i d, __m256 sc, __m256 bi)
{
    return _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(d), sc), bi);
}
XN_AVX2_FN static inline __m256 xt_scale8(const float *scale, int64_t col)
{
    return scale ? _mm256_loadu_ps(scale + col) : _mm256_set1_ps(1.0f);
}
XN_AVX2_FN static inline __m256 xt_bias8(const float *bias, int64_t col)
{
    return bias ? _mm256_loadu_ps(bias + col) : _mm256_set1_ps(-0.0f);
}

/* Row m of the avx2 path's activations (zeros past M): per 64 inputs, their signs (a compare and a movemask per 8),
   then their 16 nibbles times 4, one byte each: the offset of the nibble's table row in 8-byte units. */
XN_AVX2_FN static void xt_pack_row(const xn_job *j, const float *r, int64_t m, unsigned *nan)
{
    __m128i *o = (__m128i *)(j->xt + m * j->nw * 16);
    if (m >= j->M) {
        for (int64_t k = 0; k < j->nw; k++) _mm_storeu_si128(o + k, _mm_setzero_si128());
        return;
    }
    const __m256 zero = _mm256_setzero_ps();
    __m256 unord = zero;
    for (int64_t k = 0; k < j->nfull; k++) {
        uint64_t b = 0;
        for (int e = 0; e < 8; e++) {
            const __m256 v = _mm256_loadu_ps(r + 64 * k + 8 * e);
            b |= (uint64_t)(unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_GE_OQ)) << (8 * e);
            unord = _mm256_or_ps(unord, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        }
        _mm_storeu_si128(o + k, _mm_slli_epi16(xt_nibbles(b), 2));
    }
    *nan |= (unsigned)_mm256_movemask_ps(unord);
    if (j->nfull < j->nw) {
        const uint64_t b = xn_signs(r + 64 * j->nfull, j->K - 64 * j->nfull, nan);
        _mm_storeu_si128(o + j->nfull, _mm_slli_epi16(xt_nibbles(b), 2));
    }
}

/* Weight groups [g0, g1) into their panels: per nibble step, the nibble of each of the group's 32 rows (rows past
   N are zero). 16 rows' 16 nibbles are a 16 x 16 byte matrix, transposed with four rounds of unpacks (which leave nibble s in t[s]). */
XN_AVX2_FN static void xn_pack_w(const xn_job *j, int64_t g0, int64_t g1)
{
    for (int64_t g = g0; g < g1; g++) {
        const int64_t p = g / XT_C;
        const int cn = xt_panel_groups(j, p), c = (int)(g % XT_C);
        uint8_t *o = j->wt + xt_panel_at(j, p) + 32 * c;
        const int64_t step = 32 * cn;   /* bytes from one nibble step to the next within the panel */
        for (int64_t k = 0; k < j->nw; k++) {
            const int64_t steps = j->k4 - 16 * k < 16 ? j->k4 - 16 * k : 16;
            for (int half = 0; half < 2; half++) {
                __m128i r[16];
                for (int q = 0; q < 16; q++) {
                    const int64_t n = 32 * g + 16 * half + q;
                    r[q] = n < j->N ? xt_nibbles(xn_wword(j, n, k)) : _mm_setzero_si128();
                }
                for (int q = 0; q < 8; q++) {   /* round 1: bytes of row pairs */
                    const __m128i a = r[2 * q], b = r[2 * q + 1];
                    r[2 * q] = _mm_unpacklo_epi8(a, b);
                    r[2 * q + 1] = _mm_unpackhi_epi8(a, b);
                }
                __m128i t[16];
                for (int q = 0; q < 4; q++)     /* round 2: 16-bit pairs of pairs */
                    for (int h = 0; h < 2; h++) {
                        t[4 * q + 2 * h] = _mm_unpacklo_epi16(r[4 * q + h], r[4 * q + 2 + h]);
                        t[4 * q + 2 * h + 1] = _mm_unpackhi_epi16(r[4 * q + h], r[4 * q + 2 + h]);
                    }
                for (int q = 0; q < 2; q++)     /* round 3 */
                    for (int h = 0; h < 4; h++) {
                        r[8 * q + 2 * h] = _mm_unpacklo_epi32(t[8 * q + h], t[8 * q + 4 + h]);
                        r[8 * q + 2 * h + 1] = _mm_unpackhi_epi32(t[8 * q + h], t[8 * q + 4 + h]);
                    }
                for (int h = 0; h < 8; h++) {   /* round 4 */
                    t[2 * h] = _mm_unpacklo_epi64(r[h], r[8 + h]);
                    t[2 * h + 1] = _mm_unpackhi_epi64(r[h], r[8 + h]);
                }
                for (int s = 0; s < steps; s++)
                    _mm_storeu_si128((__m128i *)(o + (16 * k + s) * step + 16 * half), t[s]);
            }
        }
    }
}

/* One nibble step of the full tile, in assembly (as the convolution's avx2 step: GCC spilled accumulators when given
   the same as intrinsics): the three rows' table rows and the panel's three index vectors, then nine lookups and
   byte adds. The last row's lookups overwrite the index vectors, each row's last one its table. The "memory" clobber
   keeps it after the stores that packed the panels (30 operands leave no room for the panel as an input). */
#define XT_STEP()                                                                                        \
    __asm__("vmovdqa (%[tab],%[x0],8), %[t0]\n\t"                                                          \
            "vmovdqa (%[tab],%[x1],8), %[t1]\n\t"                                                          \
            "vmovdqa (%[tab],%[x2],8), %[t2]\n\t"                                                          \
            "vmovdqa (%[w]), %[i0]\n\t"                                                                    \
            "vmovdqa 32(%[w]), %[i1]\n\t"                                                                  \
            "vmovdqa 64(%[w]), %[i2]\n\t"                                                                  \
            "vpshufb %[i0], %[t0], %[tm]\n\tvpaddb %[tm], %[a00], %[a00]\n\t"                 \
            "vpshufb %[i1], %[t0], %[tm]\n\tvpaddb %[tm], %[a01], %[a01]\n\t"                 \
            "vpshufb %[i2], %[t0], %[t0]\n\tvpaddb %[t0], %[a02], %[a02]\n\t"                 \
            "vpshufb %[i0], %[t1], %[tm]\n\tvpaddb %[tm], %[a10], %[a10]\n\t"                 \
            "vpshufb %[i1], %[t1], %[tm]\n\tvpaddb %[tm], %[a11], %[a11]\n\t"                 \
            "vpshufb %[i2], %[t1], %[t1]\n\tvpaddb %[t1], %[a12], %[a12]\n\t"                 \
            "vpshufb %[i0], %[t2], %[i0]\n\tvpaddb %[i0], %[a20], %[a20]\n\t"                 \
            "vpshufb %[i1], %[t2], %[i1]\n\tvpaddb %[i1], %[a21], %[a21]\n\t"                 \
            "vpshufb %[i2], %[t2], %[i2]\n\tvpaddb %[i2], %[a22], %[a22]"                     \
            : [a00] "+x"(acc00), [a01] "+x"(acc01), [a02] "+x"(acc02), [a10] "+x"(acc10), [a11] "+x"(acc11), \
              [a12] "+x"(acc12), [a20] "+x"(acc20), [a21] "+x"(acc21), [a22] "+x"(acc22), [t0] "=&x"(t0),    \
              [t1] "=&x"(t1), [t2] "=&x"(t2), [i0] "=&x"(i0), [i1] "=&x"(i1), [i2] "=&x"(i2), [tm] "=&x"(tm) \
            : [tab] "r"(xt_tab), [x0] "r"((int64_t)x0[u]), [x1] "r"((int64_t)x1[u]), [x2] "r"((int64_t)x2[u]), \
              [w] "r"(wp + 96 * u)                                                                       \
            : "memory")

/* Flush byte counts into 16-bit sums: lo gets bytes 0-7 | 16-23 of each lane pair, hi bytes 8-15 | 24-31. Expects
   `sum[][][2]`, `zero` and `first` (the first run sets the sums) in scope; the convolution's table path uses it too. */
#define XT_FLUSH(acc, r, c)                                                                                \
    {                                                                                                      \
        const __m256i lo = _mm256_unpacklo_epi8(acc, zero), hi = _mm256_unpackhi_epi8(acc, zero);          \
        sum[r][c][0] = first ? lo : _mm256_add_epi16(sum[r][c][0], lo);                                    \
        sum[r][c][1] = first ? hi : _mm256_add_epi16(sum[r][c][1], hi);                                    \
    }

/* 16-bit sums of the tile: rows [m, m + 3) x the cn groups of panel p, over all k4 steps. */
XN_AVX2_FN static void xt_sums(const xn_job *j, int64_t m, int64_t p, int cn, __m256i sum[XT_R][XT_C][2])
{
    const uint8_t *x0 = j->xt + m * j->nw * 16, *x1 = x0 + j->nw * 16, *x2 = x1 + j->nw * 16;
    const uint8_t *w = j->wt + xt_panel_at(j, p);
    const __m256i zero = _mm256_setzero_si256();
    for (int64_t u0 = 0; u0 < j->k4; u0 += XT_RUN) {
        const int64_t u1 = j->k4 - u0 < XT_RUN ? j->k4 : u0 + XT_RUN;
        const int first = u0 == 0;
        if (cn == XT_C) {
            __m256i acc00 = zero, acc01 = zero, acc02 = zero, acc10 = zero, acc11 = zero, acc12 = zero;
            __m256i acc20 = zero, acc21 = zero, acc22 = zero;
            const uint8_t *wp = w;
            for (int64_t u = u0; u < u1; u++) {
                __m256i t0, t1, t2, i0, i1, i2, tm;
                XT_STEP();
            }
            XT_FLUSH(acc00, 0, 0) XT_FLUSH(acc01, 0, 1) XT_FLUSH(acc02, 0, 2)
            XT_FLUSH(acc10, 1, 0) XT_FLUSH(acc11, 1, 1) XT_FLUSH(acc12, 1, 2)
            XT_FLUSH(acc20, 2, 0) XT_FLUSH(acc21, 2, 1) XT_FLUSH(acc22, 2, 2)
        } else {   /* the last panel's one or two groups */
            __m256i acc[XT_R][XT_C - 1];
            for (int r = 0; r < XT_R; r++)
                for (int c = 0; c < XT_C - 1; c++) acc[r][c] = zero;
            for (int64_t u = u0; u < u1; u++) {
                const __m256i t0 = _mm256_load_si256((const __m256i *)(xt_tab + 8 * (int64_t)x0[u]));
                const __m256i t1 = _mm256_load_si256((const __m256i *)(xt_tab + 8 * (int64_t)x1[u]));
                const __m256i t2 = _mm256_load_si256((const __m256i *)(xt_tab + 8 * (int64_t)x2[u]));
                for (int c = 0; c < cn; c++) {
                    const __m256i i = _mm256_loadu_si256((const __m256i *)(w + (u * cn + c) * 32));
                    acc[0][c] = _mm256_add_epi8(acc[0][c], _mm256_shuffle_epi8(t0, i));
                    acc[1][c] = _mm256_add_epi8(acc[1][c], _mm256_shuffle_epi8(t1, i));
                    acc[2][c] = _mm256_add_epi8(acc[2][c], _mm256_shuffle_epi8(t2, i));
                }
            }
            for (int r = 0; r < XT_R; r++)
                for (int c = 0; c < cn; c++) XT_FLUSH(acc[r][c], r, c)
        }
    }
}

/* Rows [m, m + 3) x panel p: the sums, then y = (K - 2 * count) * scale + bias per output, 8 at a time. Per group
   of 32 columns the scales and biases are loaded once for the three rows, and each row's 32 outputs are stored in
   column order (two whole lines, which a streaming store needs to fill). The job's fields are read into locals:
   a vector store may alias them, so the compiler would otherwise reload them after every store. */
XN_AVX2_FN static void xt_tile(const xn_job *j, int64_t m, int64_t p)
{
    const int cn = xt_panel_groups(j, p);
    __m256i sum[XT_R][XT_C][2];
    xt_sums(j, m, p, cn, sum);
    const int64_t N = j->N;
    const float *const scale = j->scale, *const bias = j->bias;
    const int rows = j->M - m < XT_R ? (int)(j->M - m) : XT_R, stream = j->stream;
    float *const y = j->y + m * N;
    const __m256i kk = _mm256_set1_epi32((int)j->K);
    for (int c = 0; c < cn; c++) {
        const int64_t n0 = 32 * (XT_C * p + c);
        for (int r = 0; r < rows && n0 + 32 > N; r++)   /* the last group, past N: one output at a time */
            for (int q = 0; q < 4; q++) {   /* columns 8q ..: sum half q & 1, 128-bit lane q >> 1 */
                const __m256i s = sum[r][c][q & 1];
                int32_t c32[8];
                _mm256_storeu_si256((__m256i *)c32, _mm256_cvtepu16_epi32(q >> 1 ? _mm256_extracti128_si256(s, 1)
                                                                                      : _mm256_castsi256_si128(s)));
                for (int e = 0; n0 + 8 * q + e < N && e < 8; e++) xn_store(j, m + r, n0 + 8 * q + e, (uint64_t)c32[e]);
            }
        if (n0 + 32 > N) continue;
        __m256 sc[4], bi[4];
        for (int q = 0; q < 4; q++) {
            sc[q] = xt_scale8(scale, n0 + 8 * q);
            bi[q] = xt_bias8(bias, n0 + 8 * q);
        }
        for (int r = 0; r < rows; r++) {
            float *const yr = y + r * N + n0;
            for (int q = 0; q < 4; q++) {
                const __m256i s = sum[r][c][q & 1];
                const __m256i cnt = _mm256_cvtepu16_epi32(q >> 1 ? _mm256_extracti128_si256(s, 1)
                                                                 : _mm256_castsi256_si128(s));
                const __m256 d = xt_affine8(_mm256_sub_epi32(kk, _mm256_add_epi32(cnt, cnt)), sc[q], bi[q]);
                if (stream) _mm256_stream_ps(yr + 8 * q, d);
                else _mm256_storeu_ps(yr + 8 * q, d);
            }
        }
    }
}

/* Whether xt_tile may write y with streaming stores: at least xn_stream_min_bytes of it (a smaller output may still
   be in cache for the next op), 64-byte aligned, and rows of whole lines (N a multiple of 16), so that a tile's
   consecutive 32-byte stores fill whole lines. */
static int xt_stream_ok(const float *y, int64_t M, int64_t N)
{
    return M * N * 4 >= __atomic_load_n(&xn_stream_min_bytes, __ATOMIC_RELAXED) && ((uintptr_t)y & 63) == 0 &&
           N % 16 == 0;
}

/* AVX2 path: padded rows [m0, m1) x panels [p0, p1); per block of rows, each panel sweeps the block's row tiles. */
XN_AVX2_FN static void xn_vcompute(const xn_job *j, int64_t m0, int64_t m1, int64_t p0, int64_t p1)
{
    for (int64_t b0 = m0; b0 < m1; b0 += j->block) {
        const int64_t b1 = b0 + j->block < m1 ? b0 + j->block : m1;
        for (int64_t p = p0; p < p1; p++)
            for (int64_t m = b0; m < b1; m += XT_R) xt_tile(j, m, p);
    }
    if (j->stream) _mm_sfence();   /* before another thread (or the caller) reads y */
}
#endif

/* Thread `tid`'s share of one call: pack its share of the operands, wait until every thread has packed its own,
   then compute its share of the outputs (nothing if some share of x has a NaN). */
static void xn_linear_share(xn_task *task, int tid)
{
    xn_job *j = (xn_job *)task;
    const int T = task->nthreads;
    int64_t lo, hi;
    if (j->simd) {
        xn_share(j->mpad, XT_R, tid, T, &lo, &hi);
        xn_pack_x(j, lo, hi);
#if XN_X86_SIMD
        xn_share(j->groups, 1, tid, T, &lo, &hi);
        xn_pack_w(j, lo, hi);
#endif
    } else {
        xn_share(j->M, XN_MR, tid, T, &lo, &hi);
        xn_pack_x(j, lo, hi);
    }
    xn_barrier(task);
    if (xn_failed(task)) return;
#if XN_X86_SIMD
    if (j->simd) {
        const int64_t panels = (j->groups + XT_C - 1) / XT_C;
        if (j->split_m) {
            xn_share(j->mpad, XT_R, tid, T, &lo, &hi);
            xn_vcompute(j, lo, hi, 0, panels);
        } else {
            xn_share(panels, 1, tid, T, &lo, &hi);
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

/* v rounded up to a multiple of m. */
static int64_t xa_round(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

static int xn_linear_scalar_avx2(const float *x, int64_t M, int64_t ldx, int64_t K, const uint8_t *w, int64_t N,
                                 const float *scale, const float *bias, float *y, int nthreads, int64_t min_work,
                                 int simd, int strict)
{
    xn_job j;
    memset(&j, 0, sizeof j);
    j.task.run = xn_linear_share;
    j.x = x; j.ldx = ldx; j.w = w; j.nbytes = (K + 7) / 8;
    j.scale = scale; j.bias = bias; j.y = y;
    j.M = M; j.N = N; j.K = K;
    j.nw = (K + 63) / 64;
    j.nfull = K / 64;
    j.tail_bytes = (int)(j.nbytes - 8 * j.nfull);
    j.tail_mask = (K % 64) ? ((uint64_t)1 << (K % 64)) - 1 : ~(uint64_t)0;
    j.simd = simd && K <= XT_MAX_K;   /* the avx2 path's 16-bit sums hold counts up to 65535 */
    j.strict = strict;

    int64_t mtiles, ntiles;
    if (j.simd) {
        j.k4 = (K + 3) / 4;
        j.mpad = xa_round(M, XT_R);
        j.groups = (N + 31) / 32;
        j.block = XT_ROWS_BYTES / (j.nw * 16) / XT_R * XT_R;
        if (j.block < XT_R) j.block = XT_R;
        mtiles = j.mpad / XT_R;
        ntiles = (j.groups + XT_C - 1) / XT_C;
#if XN_X86_SIMD
        j.stream = xt_stream_ok(y, M, N);
#endif
        j.xt = (uint8_t *)aligned_alloc(64, (size_t)xa_round(j.mpad * j.nw * 16, 64));
        j.wt = (uint8_t *)aligned_alloc(64, (size_t)xa_round(ntiles * XT_C * j.k4 * 32, 64));
        if (!j.xt || !j.wt) {
            free(j.xt);
            free(j.wt);
            return XN_NOMEM;
        }
    } else {
        j.block = XN_BLOCK_BYTES / j.nbytes / XN_NR * XN_NR;
        if (j.block < XN_NR) j.block = XN_NR;
        mtiles = (M + XN_MR - 1) / XN_MR;
        ntiles = (N + XN_NR - 1) / XN_NR;
        j.xa = (uint64_t *)malloc((size_t)(M * j.nw) * sizeof(uint64_t));
        if (!j.xa) return XN_NOMEM;
    }
    int t = xn_threads(nthreads, M * N * j.nw, min_work, INT64_MAX);
    j.split_m = mtiles >= 8 * t && mtiles >= ntiles;
    t = xn_threads(t, 1, 0, j.split_m ? mtiles : ntiles);
    j.task.nthreads = t;
    xn_run(&j.task);
    free(j.xa);
    free(j.xt);
    free(j.wt);
    return j.task.status;
}

/* ------------------------------------------------------------------------------------------------------------
   The weight panels of the avx512 path (also the conv kernel's weight layout, xnor_conv.c), built by portable C. */

/* Words of the panel layout: panels of 16 output channels (per conv group), each `T = taps * cw` steps of 16
   32-bit words, plus a table S[o][tap] = sum over the tap's input channels of sign(w), as int32. */
static int64_t xn_panel_words(int64_t O, int64_t Cg, int64_t taps, int64_t groups)
{
    const int64_t Og = O / groups, P16 = (Og + 15) / 16, cw = (Cg + 31) / 32;
    return groups * P16 * taps * cw * 16 + O * taps;
}

/* Fill the panels of output channels [o0, o1) (whole panels of one group) and their rows of S. The packed weight
   row of channel o holds entry (c, tap) at bit c * taps + tap (F.conv2d's weight flattened; taps = 1 for linear). */
static void xn_fill_panels(const uint8_t *w, int64_t O, int64_t Cg, int64_t taps, int64_t groups, int64_t panel0,
                           int64_t panel1, uint32_t *out)
{
    const int64_t Og = O / groups, P16 = (Og + 15) / 16, cw = (Cg + 31) / 32, T = taps * cw;
    const int64_t K = Cg * taps, nbytes = (K + 7) / 8;
    int32_t *S = (int32_t *)(out + groups * P16 * T * 16);
    for (int64_t gp = panel0; gp < panel1; gp++) {
        const int64_t g = gp / P16, p = gp % P16;
        uint32_t *panel = out + gp * T * 16;
        memset(panel, 0, (size_t)(T * 16) * sizeof(uint32_t));
        for (int q = 0; q < 16; q++) {
            const int64_t n = 16 * p + q;
            if (n >= Og) break;
            const int64_t o = g * Og + n;
            const uint8_t *row = w + o * nbytes;
            if (taps == 1) {   /* linear / 1x1: the packed row is already the channel words */
                int32_t pos = 0;
                for (int64_t k = 0; k < cw; k++) {
                    const uint32_t v = xn_word32(row, nbytes, K, k);
                    panel[k * 16 + q] = v;
                    pos += __builtin_popcount(v);
                }
                S[o] = 2 * pos - (int32_t)Cg;
                continue;
            }
            for (int64_t t = 0; t < taps; t++) {
                int32_t pos = 0;
                for (int64_t c = 0; c < Cg; c++) {
                    const int64_t k = c * taps + t;
                    const uint32_t bit = (row[k >> 3] >> (k & 7)) & 1u;
                    panel[(t * cw + (c >> 5)) * 16 + q] |= bit << (c & 31);
                    pos += (int32_t)bit;
                }
                S[o * taps + t] = 2 * pos - (int32_t)Cg;
            }
        }
    }
}

/* The AMX path's sizes (xnor_amx.c), needed by its entry points in every build. */

/* Bytes of the AMX weight layout for O outputs, Cg inputs per tap and `taps` taps. */
static int64_t xa_weight_bytes(int64_t O, int64_t Cg, int64_t taps)
{
    return xa_round(O, 32) * taps * xa_round(Cg, 64);
}

#if XN_X86_SIMD
#include "xnor_avx512.c"
#include "xnor_amx.c"
#endif
#include "xnor_conv.c"
#include "xnor_train.c"

/* ------------------------------------------------------------------------------------------------------------
   Entry points (called through ctypes; see xnor.py / bconv.py). */

/* Run multi-threaded calls on an OpenMP runtime (the addresses of libgomp's GOMP_parallel, omp_get_thread_num,
   omp_get_num_threads and GOMP_barrier, from the copy torch has loaded), or, with any of them NULL, on this file's
   pthread pool. Call it before the first kernel call; returns 1 when OpenMP is in use, 0 otherwise. */
int xnor_use_openmp(void *parallel, void *thread_num, void *num_threads, void *barrier)
{
    if (!parallel || !thread_num || !num_threads || !barrier) {
        xn_gomp_parallel = NULL;
        return 0;
    }
    pthread_once(&xn_once, xn_register_fork);
    xn_omp_thread_num = (int (*)(void))thread_num;
    xn_omp_num_threads = (int (*)(void))num_threads;
    xn_gomp_barrier = (void (*)(void))barrier;
    xn_gomp_parallel = (xn_gomp_parallel_fn)parallel;
    return 1;
}

/* 1 while multi-threaded calls run on the OpenMP runtime (not in a forked child), 0 on this file's pool. */
int xnor_openmp_in_use(void) { return xn_gomp_parallel != NULL; }

/* The register loop of the fastest vector path, alone, on the calling thread: xz_popcount_probe (avx512: `steps`
   steps of the register tile's 16 XOR-popcount-adds, registers only) or xw_popcount_probe (avx2: `steps` words of
   the convolution's table tile on L1-resident operands). Returns the binary multiply-adds done; -1 where neither
   path runs here. */
int64_t xnor_popcount_probe(int64_t steps)
{
#if XN_X86_SIMD
    if (xn_supported(XN_PATH_AVX512)) return xz_popcount_probe(steps);
    if (xn_supported(XN_PATH_AVX2)) return xw_popcount_probe(steps);
#endif
    (void)steps;
    return -1;
}

/* A chain of `steps` dependent 64-bit multiplies on the calling thread, for the benchmark's measure of the clock the
   core runs at (the caller times the call: on x86 cores since Intel Sandy Bridge and AMD Zen a 64-bit IMUL takes 3
   cycles, and the loop's counter runs beside it). The empty asm keeps each product opaque, so the compiler can
   neither fold nor split the chain. Returns the chain's last value. */
int64_t xnor_clock_probe(int64_t steps)
{
    uint64_t x = (uint64_t)steps | 1;
    for (int64_t i = 0; i < steps; i++) {
        x *= x;
        __asm__ __volatile__("" : "+r"(x));
    }
    return (int64_t)x;
}

/* Bytes of the prepared weight layout of a layer with O outputs, Cg inputs per group and `taps` kernel taps. */
int64_t xnor_prepared_bytes(int64_t O, int64_t Cg, int64_t taps, int64_t groups)
{
    if (O <= 0 || Cg <= 0 || taps <= 0 || groups <= 0 || O % groups) return -1;
    return xn_panel_words(O, Cg, taps, groups) * (int64_t)sizeof(uint32_t);
}

/* Build the prepared weight layout (the avx512 linear path's panels, the conv kernel's weights) into `out`, of
   xnor_prepared_bytes bytes, on the calling thread. */
int xnor_prepare_weights(const uint8_t *w, int64_t O, int64_t Cg, int64_t taps, int64_t groups, void *out)
{
    if (xnor_prepared_bytes(O, Cg, taps, groups) < 0) return XN_BAD_ARGS;
    const int64_t P16 = (O / groups + 15) / 16;
    xn_fill_panels(w, O, Cg, taps, groups, 0, groups * P16, (uint32_t *)out);
    return XN_OK;
}

/* y[M, N] = epilogue(K - 2 * popcount(signs(x[m]) ^ w[n])), with optional (NULL) scale and bias. `bf16`: x and y
   are bfloat16 (the avx512 path only), the outputs rounded as torch's bf16 matmul and ops round them. `path` is
   XN_PATH_* or XN_PATH_AUTO: avx512 where supported (with `prepared` panels, or from simd_min_rows rows on), else
   avx2 from simd_min_rows rows on, else scalar. `prepared` (NULL, or xnor_prepare_weights' layout of w) is used by
   the avx512 path only. At most `nthreads` threads, each with >= min_work word pairs. `strict`: x must be +-1.
   Returns XN_OK, or XN_NOMEM / XN_NAN / XN_NOT_PM1 / XN_NO_PATH (then y is not written). */
int xnor_linear_f32(const void *x, int64_t M, int64_t ldx, int64_t K, const uint8_t *w, int64_t N,
                    const float *scale, const float *bias, void *y, int nthreads, int64_t min_work,
                    int64_t simd_min_rows, int path, const void *prepared, int strict, int bf16)
{
    if (M <= 0 || N <= 0 || K <= 0) return XN_OK;
    if (path == XN_PATH_AUTO) {
        const int paths = xnor_paths();
        if ((paths >> XN_PATH_AVX512) & 1 && (prepared || M >= simd_min_rows || bf16)) path = XN_PATH_AVX512;
        else if ((paths >> XN_PATH_AVX2) & 1 && M >= simd_min_rows) path = XN_PATH_AVX2;
        else path = XN_PATH_SCALAR;
    } else if (!xn_supported(path)) {
        return XN_NO_PATH;
    }
    if (bf16 && path != XN_PATH_AVX512) return XN_NO_PATH;   /* bfloat16 activations: the avx512 path only */
    xn_hugepage_hint(y, M * N * (int64_t)(bf16 ? 2 : 4));
#if XN_X86_SIMD
    if (path == XN_PATH_AVX512)
        return xz_linear(x, M, ldx, K, w, N, scale, bias, y, nthreads, min_work, (const uint32_t *)prepared, strict,
                         bf16);
#endif
    return xn_linear_scalar_avx2((const float *)x, M, ldx, K, w, N, scale, bias, (float *)y, nthreads, min_work,
                                 path == XN_PATH_AVX2, strict);
}

/* The AMX int8 path (xnor_amx.c; stompp_hf.kernels.int8). xnor_amx_available: 1 where it runs (CPU and OS). */
#if !XN_X86_SIMD
int xnor_amx_available(void) { return 0; }
#endif

/* Bytes of the AMX weight layout of O outputs, Cg inputs per tap, `taps` taps (groups = 1); -1 for bad sizes. */
int64_t xnor_amx_weight_bytes(int64_t O, int64_t Cg, int64_t taps)
{
    if (O <= 0 || Cg <= 0 || taps <= 0) return -1;
    return xa_weight_bytes(O, Cg, taps);
}

/* Fill the AMX weight layout (xnor_amx_weight_bytes bytes at `out`) from packed signs [O, ceil(Cg * taps / 8)]. */
int xnor_amx_prepare(const uint8_t *w, int64_t O, int64_t Cg, int64_t taps, void *out)
{
    if (xnor_amx_weight_bytes(O, Cg, taps) < 0) return XN_BAD_ARGS;
#if XN_X86_SIMD
    xa_fill_weights(w, O, Cg, taps, (int8_t *)out);
    return XN_OK;
#else
    (void)w;
    (void)out;
    return XN_NO_PATH;
#endif
}

/* xnor_linear_f32's product on AMX tiles, from the AMX weight layout `wa`; the same outputs, bit for bit. Returns
   XN_OK, XN_NOMEM / XN_NAN / XN_NOT_PM1, or XN_NO_PATH where AMX is not available. */
int xnor_amx_linear_f32(const void *x, int64_t M, int64_t ldx, int64_t K, const void *wa, int64_t N,
                        const float *scale, const float *bias, void *y, int nthreads, int64_t min_work, int strict,
                        int bf16)
{
    if (M <= 0 || N <= 0 || K <= 0) return XN_OK;
    if (!xnor_amx_available()) return XN_NO_PATH;
#if XN_X86_SIMD
    xn_hugepage_hint(y, M * N * (int64_t)(bf16 ? 2 : 4));
    return xa_linear(x, M, ldx, K, (const int8_t *)wa, N, scale, bias, y, nthreads, min_work, strict, bf16);
#else
    (void)x; (void)ldx; (void)wa; (void)scale; (void)bias; (void)y; (void)nthreads; (void)min_work; (void)strict;
    (void)bf16;
    return XN_NO_PATH;
#endif
}

/* xnor_conv2d_f32 (groups = 1) on AMX tiles, from the AMX weight layout `wa` (taps = kh * kw), for a channels-last
   x (channel stride 1) and a channels-last y; same arguments otherwise. Returns as xnor_amx_linear_f32, or
   XN_BAD_ARGS for groups other than 1 or another layout. */
int xnor_amx_conv2d_f32(const void *x, const int64_t *geometry, const void *wa, const float *scale,
                        const float *bias, void *y, int strict, int nthreads, int64_t min_work, int bf16)
{
    if (!xnor_amx_available()) return XN_NO_PATH;
#if XN_X86_SIMD
    const int64_t *g = geometry;
    xn_hugepage_hint(y, g[0] * g[8] * (int64_t)(bf16 ? 2 : 4) *
                            ((g[2] + 2 * g[13] - g[15] * (g[9] - 1) - 1) / g[11] + 1) *
                            ((g[3] + 2 * g[14] - g[16] * (g[10] - 1) - 1) / g[12] + 1));
    return xa_conv2d(x, geometry, (const int8_t *)wa, scale, bias, y, strict, nthreads, min_work, bf16);
#else
    (void)x; (void)geometry; (void)wa; (void)scale; (void)bias; (void)y; (void)strict;
    (void)nthreads; (void)min_work; (void)bf16;
    return XN_NO_PATH;
#endif
}

/* The int8 path's operands (stompp_hf.kernels.int8): out[m, k] = x[m, k] >= 0 ? 1 : -1 as int8, rows of x `ldx`
   floats apart. Returns XN_OK, or XN_NAN if x has a NaN (out is then partly written). */
int xnor_signs_i8(const float *x, int64_t M, int64_t ldx, int64_t K, int8_t *out)
{
    unsigned nan = 0;
    for (int64_t m = 0; m < M; m++) {
        const float *r = x + m * ldx;
        int8_t *o = out + m * K;
        for (int64_t k = 0; k < K; k++) {
            o[k] = (int8_t)(r[k] >= 0.0f ? 1 : -1);
            nan |= r[k] != r[k];
        }
    }
    return nan ? XN_NAN : XN_OK;
}

/* The sign bits of x[rows, K] (row stride ldx, float32 or, with `bf16`, bfloat16) in the layout of
   stompp_hf.core.packing.pack_signs: out[r, k / 8] bit k % 8 set where x >= 0 (so +-0 give +1, NaN -1:
   binary_sign's values), ceil(K / 8) bytes a row, a short last byte zero-padded. The latent weight of a frozen
   layer in training, packed at every forward (stompp_hf.kernels.elementwise). */
int xnor_pack_signs(const void *x, int64_t rows, int64_t K, int64_t ldx, int bf16, uint8_t *out)
{
    if (rows < 0 || K < 0 || ldx < K) return XN_BAD_ARGS;
    const int64_t nbytes = (K + 7) / 8;
    float buf[64];
    for (int64_t r = 0; r < rows; r++) {
        uint8_t *o = out + r * nbytes;
        for (int64_t k0 = 0; k0 < K; k0 += 64) {
            const int64_t cnt = K - k0 < 64 ? K - k0 : 64;
            const float *p;
            if (bf16) {   /* widened exactly: the bits of a bfloat16 are the high half of its float32 */
                const uint16_t *h = (const uint16_t *)x + r * ldx + k0;
                for (int64_t i = 0; i < cnt; i++) {
                    const uint32_t v = (uint32_t)h[i] << 16;
                    memcpy(&buf[i], &v, sizeof v);
                }
                p = buf;
            } else {
                p = (const float *)x + r * ldx + k0;
            }
            unsigned nan = 0;   /* a NaN packs as -1 here, as binary_sign gives it */
            const uint64_t bits = xn_signs(p, cnt, &nan);
            const int64_t nb = (cnt + 7) / 8;
            for (int64_t b = 0; b < nb; b++) o[k0 / 8 + b] = (uint8_t)(bits >> (8 * b));
        }
    }
    return XN_OK;
}

/* The int8 path's epilogue: y[m, n] = (float)acc[m, n] * scale[n] + bias[n], rounded like torch (two roundings;
   scale and bias optional). Exact integer-to-float conversion for |acc| < 2**24. */
int xnor_epilogue_i32(const int32_t *acc, int64_t M, int64_t N, const float *scale, const float *bias, float *y)
{
    for (int64_t m = 0; m < M; m++) {
        const int32_t *a = acc + m * N;
        float *o = y + m * N;
        if (scale && bias) {
            for (int64_t n = 0; n < N; n++) {
                const float d = (float)a[n] * scale[n];
                o[n] = d + bias[n];
            }
        } else if (scale) {
            for (int64_t n = 0; n < N; n++) o[n] = (float)a[n] * scale[n];
        } else if (bias) {
            for (int64_t n = 0; n < N; n++) o[n] = (float)a[n] + bias[n];
        } else {
            for (int64_t n = 0; n < N; n++) o[n] = (float)a[n];
        }
    }
    return XN_OK;
}
