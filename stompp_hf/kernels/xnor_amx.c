/* The AMX int8 path: binary layers as +-1 int8 matrix products on Intel AMX tiles (TDPBSSD), exact like the
   popcount paths. Part of xnor.c's translation unit (it #includes this file after xnor_avx512.c), not compiled
   alone; every function carries the target attribute, and it runs only where xnor_amx_available says.

   Why: one TDPBSSD multiplies a 16 x 64 int8 tile by a 64 x 16 one into 16 x 16 int32 sums, 16,384 multiply-adds in
   about 16 cycles, so a core does about 1024 int8 multiply-adds per cycle against the 512 binary ones of a 512-bit
   VPOPCNTQ. With operands in {-1, 0, +1} every product and every int32 sum is exact (|sum| <= K < 2**24), and the
   epilogue is the popcount paths' (the integer converted exactly, then the scale and the bias as two roundings),
   so the outputs are the same bits.

   Layouts.
   * Weights (xnor_amx_prepare): the +-1 signs as int8 in TDPBSSD's B layout, blocks of 16 output channels:
     [O32 / 16][KC][16 rows][64 bytes], row r of chunk kc holding, for each of the 16 channels, the 4 consecutive
     entries 4r .. 4r + 3 of the chunk. The K order is (tap, channel), channels padded with 0 to Cp = a multiple of
     64, so chunk kc = tap * Cp / 64 + channel chunk; outputs padded with 0 to a multiple of 32. 8 bits per weight.
   * Linear activations: the signs of x as int8 (K padded with 0 to Kp), rows padded to a multiple of 32 (their
     sums are computed and dropped), tile-major: each 16-row x 64-byte A tile is one contiguous KiB.
   * Convolution activations: a zero-bordered int8 image per input image, in planes of 64 channels,
     [Cp / 64][Hp][Wp][64] (Hp = H + 2 ph, ...), so a pixel's 64 bytes of a plane are one cache line. The border and
     the padded channels hold 0, which is exactly the zero padding: no correction term. An A tile is 16 output
     pixels at a constant distance in this image (one line of each for every tap and plane): with stride 1, 16
     consecutive positions of the padded grid (positions past the output columns are computed and dropped:
     (Wp - Wo) / Wp of the work, 2 / 58 at 56 x 56), which makes each A tile one contiguous KiB; with other
     strides, 16 consecutive output columns of one row. The image has a tail of zeros for the last tiles' reach.

   Work: 2 x 2 tiles of 16 x 16 outputs (32 rows or pixels x 32 channels) per unit, sums over all of K in the 4
   accumulator tiles, stored into one of the thread's two pending buffers; their epilogue runs between the next
   unit's tile products (xa_unit). Threads split the rows (images) when
   there are many, each packing its own blocks of them into a buffer of its own that stays in L2 (xa_scratch), else
   they pack together and split the output channels (pixels). Each thread configures its own tiles. */

#define XA_TILE_BYTES 1024
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#include <cpuid.h>

#define XA_FN                                                                                                \
    __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512dq,avx512vl,avx512vpopcntdq,avx2,popcnt" \
                          XN_BF16_TARGET)))
#define XA_INLINE static inline __attribute__((always_inline)) XA_FN

/* 1 where the CPU has AMX tiles and int8 (and the avx512 path, which packs and finishes for it) and the OS lets
   this process use the tile data (Linux: arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA, granted once per
   process), 0 elsewhere. Decided on the first call. */
static int xa_state = -1;

static int xa_detect(void)
{
    if (!((xnor_paths() >> XN_PATH_AVX512) & 1)) return 0;
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    if (!((d >> 24) & 1) || !((d >> 25) & 1)) return 0;   /* AMX-TILE, AMX-INT8 */
#if defined(__linux__) && defined(SYS_arch_prctl)
    const long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
#else
    return 0;
#endif
}

int xnor_amx_available(void)
{
    int s = __atomic_load_n(&xa_state, __ATOMIC_ACQUIRE);
    if (s < 0) {
        s = xa_detect();
        __atomic_store_n(&xa_state, s, __ATOMIC_RELEASE);
    }
    return s;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} xa_config;

/* Tiles 0-3: the 2 x 2 accumulators; 4, 5: two A tiles; 6, 7: two B tiles; all 16 rows x 64 bytes. */
XA_FN static void xa_configure(void)
{
    xa_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    _tile_loadconfig(&cfg);
}

/* A thread's own operand buffer, kept between calls and grown on demand: refilled block by block, it stays in the
   thread's L2, where a fresh buffer of the whole operand (12 MiB of int8 at 4096 x 3072) would fault in page by
   page on every call and stream through memory. Freed only with the process (the threads are pool or OpenMP
   threads, which live as long). */
static __thread int8_t *xa_tls_buf;
static __thread int64_t xa_tls_size;

static int8_t *xa_scratch(int64_t bytes)
{
    if (bytes > xa_tls_size) {
        free(xa_tls_buf);
        xa_tls_buf = (int8_t *)aligned_alloc(64, (size_t)xa_round(bytes, 64));
        xa_tls_size = xa_tls_buf ? bytes : 0;
    }
    return xa_tls_buf;
}

/* Fill the layout from the packed signs (pack_signs layout of the weight [O, Cg, taps] flattened per output). */
static void xa_fill_weights(const uint8_t *w, int64_t O, int64_t Cg, int64_t taps, int8_t *out)
{
    const int64_t Cp = xa_round(Cg, 64), KC = taps * Cp / 64, nbytes = (Cg * taps + 7) / 8;
    memset(out, 0, (size_t)xa_weight_bytes(O, Cg, taps));
    for (int64_t o = 0; o < O; o++) {
        const uint8_t *row = w + o * nbytes;
        int8_t *blk = out + (o / 16) * KC * XA_TILE_BYTES + (o % 16) * 4;
        for (int64_t c = 0; c < Cg; c++)
            for (int64_t t = 0; t < taps; t++) {
                const int64_t bit = c * taps + t, k = t * Cp + c;   /* the kernel's K order: (tap, channel) */
                const int8_t v = (row[bit >> 3] >> (bit & 7)) & 1 ? 1 : -1;
                blk[(k / 64) * XA_TILE_BYTES + ((k % 64) / 4) * 64 + (k % 4)] = v;
            }
    }
}

/* The signs of `cnt` floats (bf16: bfloat16s) from element i0 of p as int8 +-1 into out[0 .. cnt), 0 in
   out[cnt .. padded). Returns XN_NAN / XN_NOT_PM1 (strict: not exactly +-1) / 0, as xz_signs. */
XA_INLINE int xa_signs(const void *p, int64_t i0, int64_t cnt, int64_t padded, int8_t *out, int strict, int bf16)
{
    const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
    const __m128i pos = _mm_set1_epi8(1), neg = _mm_set1_epi8(-1);
    __mmask16 bad = 0;
    int64_t k = 0;
    for (; k < cnt; k += 16) {
        const __mmask16 lanes = xz_lanes(cnt - k);
        const __m512 a = xz_load(p, i0 + k, lanes, bf16);
        const __mmask16 ge = _mm512_mask_cmp_ps_mask(lanes, a, zero, _CMP_GE_OQ);
        _mm_mask_storeu_epi8(out + k, lanes, _mm_mask_blend_epi8(ge, neg, pos));
        if (strict) bad |= _mm512_mask_cmp_ps_mask(lanes, _mm512_abs_ps(a), one, _CMP_NEQ_UQ);
        else bad |= _mm512_mask_cmp_ps_mask(lanes, a, a, _CMP_UNORD_Q);
    }
    if (padded > cnt) memset(out + cnt, 0, (size_t)(padded - cnt));
    return bad ? (strict ? XN_NOT_PM1 : XN_NAN) : 0;
}

/* Where and how a call's outputs go: y = float(sum) * scale + bias (each where it exists), bf16 outputs (y is
   bfloat16, every step rounded as in xz_finish; `bf16` is xz_finish's mode, `exact` its flag), and `stream`:
   xz_store_row's streaming stores (xz_stream_ok held). */
typedef struct {
    const float *scale, *bias;
    void *y;
    int bf16, exact, stream;
} xa_out;

/* The outputs of a call with `n` channels and sums of `K` products (`parity`: as xz_exact_ints takes it). */
static xa_out xa_output(const float *scale, const float *bias, void *y, int bf16, int64_t n, int64_t K, int parity,
                        int stream)
{
    return (xa_out){.scale = scale, .bias = bias, .y = y, .bf16 = xz_bf16_mode(bf16, scale, bias, n),
                    .exact = xz_exact_ints(K, parity), .stream = stream};
}

/* One row of 16 sums -> outputs: float(acc) * scale + bias, two roundings, each only where it exists (with bf16
   outputs each step rounded to bf16 as in xz_finish, XZ_BF16_NATIVE's last one by the store), for the `lanes`
   channels from n0. */
XA_INLINE __m512 xa_finish_row(const int32_t *acc, const xa_out *o, int64_t n0, __mmask16 lanes)
{
    const __m512 f = _mm512_cvtepi32_ps(_mm512_loadu_si512((const void *)acc));   /* exact: |acc| <= K < 2**24 */
    const __m512 sv = o->scale ? _mm512_maskz_loadu_ps(lanes, o->scale + n0) : _mm512_setzero_ps();
    const __m512 bv = o->bias ? _mm512_maskz_loadu_ps(lanes, o->bias + n0) : _mm512_setzero_ps();
    return xz_finish_sum(f, o->scale ? &sv : NULL, o->bias ? &bv : NULL, o->bf16, o->exact);
}

/* A unit's finished sums waiting for the epilogue: 4 tiles of 16 x 16 int32 in `buf`, tile q for the 16 channels
   from n[q] (`lanes` of them real), row r of tile q going to element idx[16 q + r] of y (-1: dropped). */
typedef struct {
    int32_t buf[1024] __attribute__((aligned(64)));
    int64_t idx[64], n[4];
    __mmask16 lanes[4];
    int live;
} xa_pending;

/* Epilogue rows [r0, r1) of a pending unit (0 .. 64 over a whole unit). Streaming bf16 outputs go a row of tiles
   2t and 2t + 1 at a time (32 consecutive channels, one line): rows [r0, r1) then stand for the pairs
   [ceil(r0 / 2), ceil(r1 / 2)), which cover the 32 pairs once over any split of 0 .. 64. */
XA_INLINE void xa_finish_rows(const xa_pending *p, int r0, int r1, const xa_out *o)
{
    if (o->stream && o->bf16) {
        for (int pr = (r0 + 1) >> 1; pr < (r1 + 1) >> 1; pr++) {
            const int r = 32 * (pr >> 4) + (pr & 15);
            if (p->idx[r] < 0) continue;
            const __m512 f[2] = {xa_finish_row(p->buf + 16 * r, o, p->n[r >> 4], p->lanes[r >> 4]),
                                 xa_finish_row(p->buf + 16 * (r + 16), o, p->n[(r >> 4) + 1], p->lanes[(r >> 4) + 1])};
            xz_store_row(o->y, p->idx[r], f, p->lanes + (r >> 4), 2, o->bf16, 1);
        }
        return;
    }
    for (int r = r0; r < r1; r++)
        if (p->idx[r] >= 0) {
            const __m512 f = xa_finish_row(p->buf + 16 * r, o, p->n[r >> 4], p->lanes[r >> 4]);
            xz_store_row(o->y, p->idx[r], &f, p->lanes + (r >> 4), 1, o->bf16, o->stream);
        }
}

/* The 2 x 2 unit: accumulators 0..3 = A(a0) x B(b0), A(a0) x B(b1), A(a1) x B(b0), A(a1) x B(b1) over KC chunks,
   stored into `next->buf`. A tile rows are `as` bytes apart; chunk kc of A tile h starts at a_h + aoff[kc]; B chunks
   are 1 KiB apart. The epilogue of the previous unit (`prev`, if live) runs between the tile products, a few rows
   per chunk: the tile unit works while the vector units finish the last sums (run after them, the epilogue cost
   about as much as the products at K = 576). */
XA_INLINE void xa_unit(const int8_t *a0, const int8_t *a1, int64_t as, const int64_t *aoff, const int8_t *b0,
                       const int8_t *b1, int64_t KC, xa_pending *prev, xa_pending *next, const xa_out *o)
{
    const int step = prev->live ? (int)((64 + KC - 1) / KC) : 0;
    int done = 0;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t kc = 0; kc < KC; kc++) {
        _tile_loadd(4, a0 + aoff[kc], as);
        _tile_loadd(6, b0 + kc * XA_TILE_BYTES, 64);
        _tile_loadd(7, b1 + kc * XA_TILE_BYTES, 64);
        _tile_dpbssd(0, 4, 6);
        _tile_loadd(5, a1 + aoff[kc], as);
        _tile_dpbssd(1, 4, 7);
        _tile_dpbssd(2, 5, 6);
        _tile_dpbssd(3, 5, 7);
        if (done < 64 && step) {
            const int end = done + step < 64 ? done + step : 64;
            xa_finish_rows(prev, done, end, o);
            done = end;
        }
    }
    if (prev->live && done < 64) xa_finish_rows(prev, done, 64, o);
    prev->live = 0;
    _tile_stored(0, next->buf, 64);
    _tile_stored(1, next->buf + 256, 64);
    _tile_stored(2, next->buf + 512, 64);
    _tile_stored(3, next->buf + 768, 64);
    next->live = 1;
}

/* Set a pending unit's channels: tiles 0, 2 at n0, tiles 1, 3 at n0 + 16, of N outputs. */
static void xa_pending_channels(xa_pending *p, int64_t n0, int64_t N)
{
    for (int q = 0; q < 4; q++) {
        p->n[q] = n0 + 16 * (q & 1);
        p->lanes[q] = p->n[q] < N ? (__mmask16)(N - p->n[q] >= 16 ? 0xFFFF : (1u << (N - p->n[q])) - 1) : 0;
    }
}

/* ------------------------------------------------------------------------------------------------------------
   Linear layer. */

typedef struct {
    xn_task task;
    const void *x;                /* float32, or bfloat16 with out.bf16 (y too) */
    int64_t ldx, M, N, K;
    const int8_t *w;              /* the weight layout */
    xa_out out;
    int64_t Kp, KC, M32, N32;
    int8_t *xa;                   /* [M32][Kp] */
    int64_t *aoff;                /* [KC]: kc KiB */
    int split_m, strict;
} xa_linear_job;

/* Rows [r0, r1) of x (r0 a multiple of 16) as int8 signs into `out`, tile-major: the 16 x 64 bytes of row tile t,
   chunk kc at (t * KC + kc) KiB, so that every A tile load reads one contiguous KiB. Rows past M are all 0.
   Returns as xa_signs. */
XA_FN static int xa_linear_pack(const xa_linear_job *j, int64_t r0, int64_t r1, int8_t *out)
{
    int bad = 0;
    int8_t row[64] __attribute__((aligned(64)));
    for (int64_t m = r0; m < r1; m++) {
        int8_t *o = out + ((m - r0) / 16) * j->KC * XA_TILE_BYTES + ((m - r0) % 16) * 64;
        if (m >= j->M) {
            for (int64_t kc = 0; kc < j->KC; kc++) memset(o + kc * XA_TILE_BYTES, 0, 64);
            continue;
        }
        for (int64_t kc = 0; kc < j->KC; kc++) {
            const int64_t k0 = 64 * kc, cnt = j->K - k0 < 64 ? j->K - k0 : 64;
            if (cnt == 64) {
                bad |= xa_signs(j->x, m * j->ldx + k0, 64, 64, o + kc * XA_TILE_BYTES, j->strict, j->out.bf16);
            } else {
                bad |= xa_signs(j->x, m * j->ldx + k0, cnt, 64, row, j->strict, j->out.bf16);
                memcpy(o + kc * XA_TILE_BYTES, row, 64);
            }
        }
    }
    return bad;
}

/* Row pairs [m0, m1) (A at `a`, tile-major from row pair m0) against output-channel pairs [n0, n1): blocks of
   channel pairs whose weights fit in about half of L2, each swept by every row pair (whose A tiles stay in L1
   across the block). `pend` / `cur`: the thread's two pending units (xa_unit), carried across calls. */
XA_FN static void xa_linear_block(const xa_linear_job *j, const int8_t *a, int64_t m0, int64_t m1, int64_t n0,
                                  int64_t n1, xa_pending pend[2], int *cur)
{
    int64_t nblock = 524288 / (32 * j->Kp);
    if (nblock < 1) nblock = 1;
    const int64_t pair_bytes = 2 * j->KC * XA_TILE_BYTES;
    for (int64_t nb = n0; nb < n1; nb += nblock) {
        const int64_t ne = nb + nblock < n1 ? nb + nblock : n1;
        for (int64_t mt = m0; mt < m1; mt++) {
            const int8_t *a0 = a + (mt - m0) * pair_bytes;
            for (int64_t np = nb; np < ne; np++) {
                const int8_t *b0 = j->w + np * pair_bytes;
                xa_pending *next = &pend[*cur];
                xa_unit(a0, a0 + pair_bytes / 2, 64, j->aoff, b0, b0 + pair_bytes / 2, j->KC, &pend[*cur ^ 1], next,
                        &j->out);
                xa_pending_channels(next, 32 * np, j->N);
                for (int r = 0; r < 64; r++) {
                    const int64_t m = 32 * mt + 16 * ((r >> 4) >> 1) + (r & 15), n = next->n[r >> 4];
                    next->idx[r] = m < j->M && n < j->N ? m * j->N + n : -1;
                }
                *cur ^= 1;
            }
        }
    }
}

/* Finish the thread's last pending unit. */
XA_INLINE void xa_flush(xa_pending pend[2], int cur, const xa_out *o)
{
    xa_pending *last = &pend[cur ^ 1];
    if (last->live) xa_finish_rows(last, 0, 64, o);
    last->live = 0;
    if (o->stream) _mm_sfence();
}

/* Split over rows: each thread packs blocks of its own rows into its own buffer (about 512 KiB, L2) and sweeps every
   output channel over each block; no barrier. Split over output channels (few rows): the threads pack the rows
   together into one shared buffer, meet, then each sweeps its channels. */
XA_FN static void xa_linear_share(xn_task *task, int tid)
{
    xa_linear_job *j = (xa_linear_job *)task;
    const int nt = task->nthreads;
    const int64_t mu = j->M32 / 32, nu = j->N32 / 32;
    xa_pending pend[2];
    int cur = 0;
    pend[0].live = pend[1].live = 0;
    if (j->split_m) {
        int64_t m0, m1;
        xn_share(mu, 1, tid, nt, &m0, &m1);
        if (m0 >= m1) return;
        int64_t block = 524288 / (32 * j->Kp);
        if (block < 1) block = 1;
        if (block > m1 - m0) block = m1 - m0;
        int8_t *a = xa_scratch(block * 32 * j->Kp);
        if (!a) {
            xn_fail(task, XN_NOMEM);
            return;
        }
        xa_configure();
        for (int64_t mb = m0; mb < m1 && !xn_failed(task); mb += block) {
            const int64_t me = mb + block < m1 ? mb + block : m1;
            const int bad = xa_linear_pack(j, 32 * mb, 32 * me, a);
            if (bad) {
                xn_fail(task, bad);
                break;
            }
            xa_linear_block(j, a, mb, me, 0, nu, pend, &cur);
        }
        xa_flush(pend, cur, &j->out);
        _tile_release();
        return;
    }
    int64_t lo, hi;
    xn_share(j->M32, 32, tid, nt, &lo, &hi);
    const int bad = xa_linear_pack(j, lo, hi, j->xa + lo * j->KC * 64);
    if (bad) xn_fail(task, bad);
    xn_barrier(task);
    if (xn_failed(task)) return;
    int64_t n0, n1;
    xn_share(nu, 1, tid, nt, &n0, &n1);
    if (n0 >= n1) return;
    xa_configure();
    xa_linear_block(j, j->xa, 0, mu, n0, n1, pend, &cur);
    xa_flush(pend, cur, &j->out);
    _tile_release();
}

static int xa_linear(const void *x, int64_t M, int64_t ldx, int64_t K, const int8_t *w, int64_t N,
                     const float *scale, const float *bias, void *y, int nthreads, int64_t min_work, int strict,
                     int bf16)
{
    xa_linear_job j;
    memset(&j, 0, sizeof j);
    j.task.run = xa_linear_share;
    j.x = x; j.ldx = ldx; j.M = M; j.N = N; j.K = K; j.w = w;
    j.out = xa_output(scale, bias, y, bf16, N, K, 1, xz_stream_ok(y, M * N, N, N, bf16));
    j.strict = strict;
    j.Kp = xa_round(K, 64);
    j.KC = j.Kp / 64;
    j.M32 = xa_round(M, 32);
    j.N32 = xa_round(N, 32);
    const int64_t mu = j.M32 / 32, nu = j.N32 / 32;
    int t = xn_threads(nthreads, M * N * ((K + 63) / 64), min_work, INT64_MAX);
    j.split_m = mu >= 2 * t && (mu >= nu || mu >= 8 * t);
    j.task.nthreads = xn_threads(t, 1, 0, j.split_m ? mu : nu);
    j.xa = j.split_m ? NULL : (int8_t *)aligned_alloc(64, (size_t)(j.M32 * j.Kp));
    j.aoff = (int64_t *)malloc((size_t)j.KC * sizeof(int64_t));
    if ((!j.split_m && !j.xa) || !j.aoff) {
        free(j.xa);
        free(j.aoff);
        return XN_NOMEM;
    }
    for (int64_t kc = 0; kc < j.KC; kc++) j.aoff[kc] = kc * XA_TILE_BYTES;
    xn_run(&j.task);
    free(j.xa);
    free(j.aoff);
    return j.task.status;
}

/* ------------------------------------------------------------------------------------------------------------
   Convolution (groups = 1). */

typedef struct {
    xn_task task;
    const void *x;                /* float32, or bfloat16 with out.bf16 (y too) */
    int64_t B, C, H, W, sB, sC, sH, sW;
    int64_t O, kh, kw, sh, sw, ph, pw, dh, dw;
    int64_t Cp, CC, Hp, Wp, Ho, Wo, KC, O32;
    int64_t plane, image, tail;   /* bytes of a channel-chunk plane (Hp * Wp * 64), of an image (CC planes), tail */
    int64_t flat;                 /* 1: stride 1, tiles over the flattened padded grid; 0: tiles along output rows */
    int64_t spi, ppi;             /* segments and segment pairs per image */
    const int8_t *w;
    xa_out out;
    int strict, by_image;
    int8_t *img;                  /* shared images (not by_image) */
    int64_t *aoff;                /* [KC]: byte offset of chunk kc (tap, channel chunk) from a pixel's corner */
} xa_conv_job;

/* Segment k of image b (16 output pixels): the byte offset of its first pixel's corner in the image, and for each
   of its rows the output pixel index b * Ho * Wo + y * Wo + x, or -1 where the row is outside the output. */
static int64_t xa_conv_segment(const xa_conv_job *j, int64_t b, int64_t k, int64_t out[16])
{
    if (k >= j->spi) {   /* the partner of an odd last segment: nothing to store */
        for (int r = 0; r < 16; r++) out[r] = -1;
        return 0;
    }
    if (j->flat) {
        const int64_t j0 = 16 * k;
        for (int r = 0; r < 16; r++) {
            const int64_t p = j0 + r, yy = p / j->Wp, xx = p % j->Wp;
            out[r] = yy < j->Ho && xx < j->Wo ? (b * j->Ho + yy) * j->Wo + xx : -1;
        }
        return j0 * 64;
    }
    const int64_t per_row = (j->Wo + 15) / 16, yy = k / per_row, x0 = 16 * (k % per_row);
    for (int r = 0; r < 16; r++) out[r] = x0 + r < j->Wo ? (b * j->Ho + yy) * j->Wo + x0 + r : -1;
    return (yy * j->sh * j->Wp + x0 * j->sw) * 64;
}

/* Pack padded rows [r0, r1) (hp) of image b (channels-last) into `im` (that image's planes): the signs as int8, 0
   on the border and in the padded channels. Returns XN_NAN / XN_NOT_PM1 / 0. */
XA_FN static int xa_conv_pack(const xa_conv_job *j, int64_t b, int64_t r0, int64_t r1, int8_t *im)
{
    int bad = 0;
    const int64_t rowbytes = j->Wp * 64;
    int8_t chunk[64] __attribute__((aligned(64)));
    for (int64_t hp = r0; hp < r1; hp++) {
        const int64_t h = hp - j->ph;
        if (h < 0 || h >= j->H) {
            for (int64_t cc = 0; cc < j->CC; cc++) memset(im + cc * j->plane + hp * rowbytes, 0, (size_t)rowbytes);
            continue;
        }
        for (int64_t cc = 0; cc < j->CC; cc++) {
            int8_t *row = im + cc * j->plane + hp * rowbytes;
            memset(row, 0, (size_t)(j->pw * 64));
            memset(row + (j->pw + j->W) * 64, 0, (size_t)(j->pw * 64));
        }
        const int64_t src = b * j->sB + h * j->sH;   /* element index; channels-last: a pixel's channels are contiguous */
        int8_t *first = im + (hp * j->Wp + j->pw) * 64;
        for (int64_t w = 0; w < j->W; w++)
            for (int64_t cc = 0; cc < j->CC; cc++) {
                const int64_t cnt = j->C - 64 * cc < 64 ? j->C - 64 * cc : 64;
                int8_t *dst = first + cc * j->plane + w * 64;
                if (cnt == 64) {
                    bad |= xa_signs(j->x, src + w * j->sW + 64 * cc, 64, 64, dst, j->strict, j->out.bf16);
                } else {
                    bad |= xa_signs(j->x, src + w * j->sW + 64 * cc, cnt, 64, chunk, j->strict, j->out.bf16);
                    memcpy(dst, chunk, 64);
                }
            }
    }
    return bad;
}

/* Segment pairs [k0, k1) of image b (its planes at `im`) against output-channel pairs [n0, n1); `pend` / `cur`
   as in xa_linear_block. */
XA_FN static void xa_conv_block(const xa_conv_job *j, const int8_t *im, int64_t b, int64_t k0, int64_t k1,
                                int64_t n0, int64_t n1, xa_pending pend[2], int *cur)
{
    const int64_t as = (j->flat ? 1 : j->sw) * 64, pair_bytes = 2 * j->KC * XA_TILE_BYTES;
    for (int64_t np = n0; np < n1; np++) {
        const int8_t *b0 = j->w + np * pair_bytes;
        for (int64_t k = k0; k < k1; k++) {
            int64_t out[2][16];
            const int8_t *a0 = im + xa_conv_segment(j, b, 2 * k, out[0]);
            const int8_t *a1 = im + xa_conv_segment(j, b, 2 * k + 1, out[1]);
            xa_pending *next = &pend[*cur];
            xa_unit(a0, a1, as, j->aoff, b0, b0 + pair_bytes / 2, j->KC, &pend[*cur ^ 1], next, &j->out);
            xa_pending_channels(next, 32 * np, j->O);
            for (int r = 0; r < 64; r++) {
                const int64_t p = out[(r >> 4) >> 1][r & 15], n = next->n[r >> 4];
                next->idx[r] = p >= 0 && n < j->O ? p * j->O + n : -1;
            }
            *cur ^= 1;
        }
    }
}

/* By image (enough images for every thread): each thread packs its images one at a time into its own buffer
   (an image of 64 channels at 56 x 56 is 215 KiB: it stays in L2) and runs it; no barrier. Otherwise the threads
   pack all images together into one shared buffer, meet, and split the segment pairs (or the output channels). */
XA_FN static void xa_conv_share(xn_task *task, int tid)
{
    xa_conv_job *j = (xa_conv_job *)task;
    const int nt = task->nthreads;
    const int64_t nu = j->O32 / 32;
    xa_pending pend[2];
    int cur = 0;
    pend[0].live = pend[1].live = 0;
    if (j->by_image) {
        int64_t b0, b1;
        xn_share(j->B, 1, tid, nt, &b0, &b1);
        if (b0 >= b1) return;
        int8_t *im = xa_scratch(j->image + j->tail);
        if (!im) {
            xn_fail(task, XN_NOMEM);
            return;
        }
        memset(im + j->image, 0, (size_t)j->tail);
        xa_configure();
        for (int64_t b = b0; b < b1 && !xn_failed(task); b++) {
            const int bad = xa_conv_pack(j, b, 0, j->Hp, im);
            if (bad) {
                xn_fail(task, bad);
                break;
            }
            xa_conv_block(j, im, b, 0, j->ppi, 0, nu, pend, &cur);
        }
        xa_flush(pend, cur, &j->out);
        _tile_release();
        return;
    }
    int64_t lo, hi;
    xn_share(j->B * j->Hp, 1, tid, nt, &lo, &hi);
    int bad = 0;
    for (int64_t r = lo; r < hi;) {   /* rows of one image at a time */
        const int64_t b = r / j->Hp, end = (b + 1) * j->Hp < hi ? (b + 1) * j->Hp : hi;
        bad |= xa_conv_pack(j, b, r - b * j->Hp, end - b * j->Hp, j->img + b * j->image);
        r = end;
    }
    if (bad) xn_fail(task, bad);
    xn_barrier(task);
    if (xn_failed(task)) return;
    const int64_t pairs = j->B * j->ppi;
    int64_t p0 = 0, p1 = pairs, n0 = 0, n1 = nu;
    if (pairs >= 4 * nt || pairs >= nu) xn_share(pairs, 1, tid, nt, &p0, &p1);
    else xn_share(nu, 1, tid, nt, &n0, &n1);
    if (p0 >= p1 || n0 >= n1) return;
    xa_configure();
    for (int64_t p = p0; p < p1;) {   /* the pairs of one image at a time */
        const int64_t b = p / j->ppi, end = (b + 1) * j->ppi < p1 ? (b + 1) * j->ppi : p1;
        xa_conv_block(j, j->img + b * j->image, b, p - b * j->ppi, end - b * j->ppi, n0, n1, pend, &cur);
        p = end;
    }
    xa_flush(pend, cur, &j->out);
    _tile_release();
}

static int xa_conv2d(const void *x, const int64_t *g, const int8_t *w, const float *scale, const float *bias,
                     void *y, int strict, int nthreads, int64_t min_work, int bf16)
{
    xa_conv_job j;
    memset(&j, 0, sizeof j);
    j.task.run = xa_conv_share;
    j.x = x;
    j.B = g[0]; j.C = g[1]; j.H = g[2]; j.W = g[3];
    j.sB = g[4]; j.sC = g[5]; j.sH = g[6]; j.sW = g[7];
    j.O = g[8]; j.kh = g[9]; j.kw = g[10]; j.sh = g[11]; j.sw = g[12];
    j.ph = g[13]; j.pw = g[14]; j.dh = g[15]; j.dw = g[16];
    if (g[17] != 1 || j.sC != 1) return XN_BAD_ARGS;   /* groups of 1, channels-last input */
    j.w = w; j.strict = strict;
    j.Cp = xa_round(j.C, 64);
    j.CC = j.Cp / 64;
    j.Hp = j.H + 2 * j.ph;
    j.Wp = j.W + 2 * j.pw;
    j.Ho = (j.Hp - j.dh * (j.kh - 1) - 1) / j.sh + 1;
    j.Wo = (j.Wp - j.dw * (j.kw - 1) - 1) / j.sw + 1;
    /* zero padding makes sums of fewer products, of any parity */
    j.out = xa_output(scale, bias, y, bf16, j.O, j.C * j.kh * j.kw, 0,
                      xz_stream_ok(y, j.B * j.Ho * j.Wo * j.O, j.O, j.O, bf16));
    j.KC = j.kh * j.kw * j.CC;
    j.O32 = xa_round(j.O, 32);
    j.plane = j.Hp * j.Wp * 64;
    j.image = j.CC * j.plane;
    j.flat = j.sh == 1 && j.sw == 1;
    j.spi = j.flat ? (j.Ho * j.Wp + 15) / 16 : j.Ho * ((j.Wo + 15) / 16);
    j.ppi = (j.spi + 1) / 2;
    /* the last plane's overreach: 16 row strides plus the largest tap offset past the last tile's first pixel */
    j.tail = xa_round((16 * (j.flat ? 1 : j.sw) + j.Wp * (j.kh - 1) * j.dh + (j.kw - 1) * j.dw + 1) * 64, 64);
    j.aoff = (int64_t *)malloc((size_t)j.KC * sizeof(int64_t));
    if (!j.aoff) return XN_NOMEM;
    for (int64_t t = 0; t < j.kh * j.kw; t++)
        for (int64_t cc = 0; cc < j.CC; cc++)
            j.aoff[t * j.CC + cc] = cc * j.plane + ((t / j.kw) * j.dh * j.Wp + (t % j.kw) * j.dw) * 64;
    const int t = xn_threads(nthreads, j.B * j.Ho * j.Wo * j.O * j.KC, min_work, INT64_MAX);
    j.by_image = j.B >= t && (t == 1 || j.B >= 2 * t || j.ppi <= 2);
    if (j.by_image) {
        j.task.nthreads = xn_threads(t, 1, 0, j.B);
    } else {
        j.task.nthreads = t;
        j.img = (int8_t *)aligned_alloc(64, (size_t)(j.B * j.image + j.tail));
        if (!j.img) {
            free(j.aoff);
            return XN_NOMEM;
        }
        memset(j.img + j.B * j.image, 0, (size_t)j.tail);
    }
    xn_run(&j.task);
    free(j.img);
    free(j.aoff);
    return j.task.status;
}
