/* The AVX-512 (F/BW/DQ/VL + VPOPCNTDQ) path of the XNOR kernels: sign packing, the register tile, the epilogue and
   the linear driver. Part of xnor.c's translation unit (it #includes this file), not compiled alone; every
   function carries the target attribute, so it builds whatever -march says, and runs only where xnor_paths says.

   Weights are panels of 16 output channels: step u of a panel is one 512-bit vector holding 32-bit word u of each
   of its 16 channels (xn_fill_panels). An activation row (a pixel, for the conv kernel) is a run of 32-bit sign
   words; `off[u]` says where its word for step u is (u itself for linear; a tap and channel-word offset into the
   packed image for conv). The register tile broadcasts the word of each of its XZ_MR rows against the words of
   XZ_NG panels, so 16 outputs accumulate per register with no horizontal sums:

       acc[i][h] += popcount(broadcast(x_i[off[u]]) ^ panel_h[u])        vpxord (embedded broadcast), vpopcntd, vpaddd

   which is three vector operations per 512 binary multiply-adds. */

#define XZ_MR 8                 /* activation rows (pixels) per register tile */
#define XZ_NG 2                 /* panels of 16 output channels per register tile */
#define XZ_X_BLOCK 16384        /* bytes of packed activation rows per cache block (L1) */
#define XZ_W_BLOCK 131072       /* bytes of weight panels per cache block (L2) */
#define XZ_INLINE static inline __attribute__((always_inline)) XN_AVX512_FN
#include <cpuid.h>

/* The `bf16` argument of the epilogue: 0 float32; 1 bfloat16, each step rounded by xz_round_bf16; XZ_BF16_TAME
   bfloat16 with scales and biases that xz_tame accepts, rounded without the NaN case (the same bits);
   XZ_BF16_NATIVE bfloat16 with scales and biases that xz_native_ok accepts, each step rounded by the CPU's
   VCVTNEPS2BF16, the last one as the store converts (the same bits). */
#define XZ_BF16_TAME 2
#define XZ_BF16_NATIVE 3

XZ_INLINE __mmask16 xz_lanes(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }

/* bfloat16 activations (`bf16` set): the kernels read x and write y as bf16, everything else as for float32. A
   bf16 value is the top half of a float32, so reading one is exact; writing one rounds to nearest even, as torch
   does (c10::BFloat16; NaN -> 0x7FC0). */
XZ_INLINE __m512 xz_load(const void *p, int64_t i, __mmask16 lanes, int bf16)
{
    if (bf16)
        return _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, (const uint16_t *)p + i)), 16));
    return _mm512_maskz_loadu_ps(lanes, (const float *)p + i);
}

/* f rounded to the nearest bfloat16 (ties to even), kept as float32. */
XZ_INLINE __m512 xz_round_bf16(__m512 f)
{
    const __m512i u = _mm512_castps_si512(f);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb);
    r = _mm512_and_si512(r, _mm512_set1_epi32((int)0xFFFF0000u));
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC00000));
    return _mm512_castsi512_ps(r);
}

/* xz_round_bf16 for a float that is not a NaN (XZ_BF16_TAME): the same bits, two operations fewer. */
XZ_INLINE __m512 xz_round_bf16_finite(__m512 f)
{
    const __m512i u = _mm512_castps_si512(f);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb);
    return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32((int)0xFFFF0000u)));
}

/* The top halves (bfloat16s, already rounded) of a's 16 lanes then b's, as one vector of 32: one permute. */
XZ_INLINE __m512i xz_bf16_pair(__m512 a, __m512 b)
{
    const __m512i odd = _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33, 31, 29, 27,
                                         25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    return _mm512_permutex2var_epi16(_mm512_castps_si512(a), odd, _mm512_castps_si512(b));
}

#if XN_HAVE_BF16
/* f rounded to the nearest bfloat16 (ties to even) by VCVTNEPS2BF16, widened back to float32 (exact). The
   instruction reads subnormals as zero and writes zero for them, and quiets NaNs keeping their payload, so it
   gives xz_round_bf16's bits only where no subnormal or NaN comes in or out: XZ_BF16_NATIVE (xz_native_ok). */
XZ_INLINE __m512 xz_round_bf16_native(__m512 f)
{
    const __m256i h = (__m256i)_mm512_cvtneps_pbh(f);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#endif

/* Store the `lanes` of f at element i of y: float32, or (bf16) the top halves of f, already rounded
   (XZ_BF16_NATIVE: rounded here). */
XZ_INLINE void xz_store(void *y, int64_t i, __mmask16 lanes, __m512 f, int bf16)
{
#if XN_HAVE_BF16
    if (bf16 == XZ_BF16_NATIVE) {
        _mm256_mask_storeu_epi16((uint16_t *)y + i, lanes, (__m256i)_mm512_cvtneps_pbh(f));
        return;
    }
#endif
    if (bf16)
        _mm256_mask_storeu_epi16((uint16_t *)y + i, lanes,
                                 _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(f), 16)));
    else
        _mm512_mask_storeu_ps((float *)y + i, lanes, f);
}

/* Store 32 bfloat16s (two panels' channels, `lanes` of each) at element `at` of y: one 64-byte line, streamed with
   `stream` (xz_store_row). */
XZ_INLINE void xz_store_pair(void *y, int64_t at, __m512i pair, const __mmask16 *lanes, int stream)
{
    if (stream) _mm512_stream_si512((__m512i *)((uint16_t *)y + at), pair);
    else _mm512_mask_storeu_epi16((uint16_t *)y + at, (__mmask32)lanes[0] | (__mmask32)lanes[1] << 16, pair);
}

/* Store one row's outputs of `ng` consecutive panels: f[h] holds the `lanes[h]` channels from element at + 16 h.
   With `stream` (xz_stream_ok held for the call) each 64-byte line is written whole with a non-temporal store: a
   float32 panel is one line; bf16 panels go in pairs (a lone bf16 panel is stored normally). The caller ends its
   stores with _mm_sfence before another thread may read them. */
XZ_INLINE void xz_store_row(void *y, int64_t at, const __m512 *f, const __mmask16 *lanes, int ng, int bf16, int stream)
{
    if (bf16 && ng == XZ_NG) {   /* two bf16 panels: one 64-byte store */
#if XN_HAVE_BF16
        const __m512i pair =
            bf16 == XZ_BF16_NATIVE ? (__m512i)_mm512_cvtne2ps_pbh(f[1], f[0]) : xz_bf16_pair(f[0], f[1]);
#else
        const __m512i pair = xz_bf16_pair(f[0], f[1]);
#endif
        xz_store_pair(y, at, pair, lanes, stream);
        return;
    }
    for (int h = 0; h < ng; h++) {
        if (stream && !bf16) _mm512_stream_ps((float *)y + at + 16 * h, f[h]);
        else xz_store(y, at + 16 * h, lanes[h], f[h], bf16);
    }
}

/* Whether an output may be written by xz_store_row's streaming stores: at least xn_stream_min_bytes in all (smaller
   ones may still be in cache for the next op), 64-byte aligned, and every row a whole number of panel groups (16
   float32 or 32 bf16 channels), so that every store covers whole lines. `row` is the channels per row, `group` the
   channels per group (rows are split into groups of `group`, each starting on a line; `row` for linear). */
static int xz_stream_ok(const void *y, int64_t elems, int64_t row, int64_t group, int bf16)
{
    const int64_t unit = bf16 ? 32 : 16;
    return elems * (bf16 ? 2 : 4) >= __atomic_load_n(&xn_stream_min_bytes, __ATOMIC_RELAXED) &&
           ((uintptr_t)y & 63) == 0 && row % unit == 0 && group % unit == 0;
}

/* One sign word of the `cnt` <= 32 bfloat16s from element i0 of p, as xz_signs; ORs the lanes that are NaN (or,
   with `strict`, not +-1) into *bad. On the 16-bit patterns: negative = sign bit set and not -0.0 (0x8000); NaN =
   magnitude bits above 0x7F80; +-1 = magnitude bits 0x3F80. */
XZ_INLINE uint32_t xz_sign_word_bf16(const uint16_t *p, int64_t cnt, int strict, __mmask32 *bad)
{
    const __mmask32 l = cnt >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << cnt) - 1);
    const __m512i v = _mm512_maskz_loadu_epi16(l, p);
    const __mmask32 neg = _mm512_mask_cmplt_epi16_mask(l, v, _mm512_setzero_si512()) &
                          ~_mm512_cmpeq_epi16_mask(v, _mm512_set1_epi16((short)0x8000));
    const __m512i mag = _mm512_and_si512(v, _mm512_set1_epi16(0x7FFF));
    if (strict) *bad |= _mm512_mask_cmpneq_epi16_mask(l, mag, _mm512_set1_epi16(0x3F80));
    else *bad |= _mm512_mask_cmpgt_epu16_mask(l, mag, _mm512_set1_epi16(0x7F80));
    return (uint32_t)(l & ~neg);
}

/* xz_sign_word_bf16 for 32 values outside strict mode, with one comparison: v minus 0x8000, saturating, is 0
   exactly for the patterns 0x0000 .. 0x8000 (+0 up, and -0.0), the values that count +1. NaNs are found from *mag,
   the running maximum of the magnitude bits, once the caller has read all its words (xz_nan_lanes). */
XZ_INLINE uint32_t xz_sign_word_bf16_full(const uint16_t *p, __m512i *mag)
{
    const __m512i v = _mm512_loadu_si512((const void *)p);
    *mag = _mm512_max_epu16(*mag, _mm512_and_si512(v, _mm512_set1_epi16(0x7FFF)));
    const __m512i over = _mm512_subs_epu16(v, _mm512_set1_epi16((short)0x8000));
    return (uint32_t)_mm512_testn_epi16_mask(over, over);
}

/* The lanes of xz_sign_word_bf16_full's running maximum that saw a NaN (magnitude bits above 0x7F80). */
XZ_INLINE __mmask32 xz_nan_lanes(__m512i mag) { return _mm512_cmpgt_epu16_mask(mag, _mm512_set1_epi16(0x7F80)); }

/* Sign words of the `cnt` floats (bf16: bfloat16s) from element `i0` of p: bit b of word k is p[i0 + 32 k + b] >= 0
   (-0.0 -> 1), bits past cnt are 0. Returns XN_NAN if one of them is a NaN, or, with `strict`, XN_NOT_PM1 if one is
   not exactly +-1; else 0. */
XZ_INLINE int xz_signs(const void *p, int64_t i0, int64_t cnt, uint32_t *out, int strict, int bf16)
{
    if (bf16) {
        __mmask32 bad = 0;
        int64_t k = 0, w = 0;
        if (!strict) {
            __m512i mag = _mm512_setzero_si512();
            for (; k + 32 <= cnt; k += 32, w++) out[w] = xz_sign_word_bf16_full((const uint16_t *)p + i0 + k, &mag);
            bad = xz_nan_lanes(mag);
        }
        for (; k < cnt; k += 32, w++) out[w] = xz_sign_word_bf16((const uint16_t *)p + i0 + k, cnt - k, strict, &bad);
        return bad ? (strict ? XN_NOT_PM1 : XN_NAN) : 0;
    }
    const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
    __mmask16 bad = 0;
    int64_t w = 0;
    for (int64_t k = 0; k < cnt; k += 32, w++) {
        const __mmask16 la = xz_lanes(cnt - k), lb = cnt - k > 16 ? xz_lanes(cnt - k - 16) : 0;
        const __m512 a = xz_load(p, i0 + k, la, 0), b = xz_load(p, i0 + k + 16, lb, 0);   /* float32 */
        out[w] = (uint32_t)_mm512_mask_cmp_ps_mask(la, a, zero, _CMP_GE_OQ) |
                 (uint32_t)_mm512_mask_cmp_ps_mask(lb, b, zero, _CMP_GE_OQ) << 16;
        if (strict)
            bad |= _mm512_mask_cmp_ps_mask(la, _mm512_abs_ps(a), one, _CMP_NEQ_UQ) |
                   _mm512_mask_cmp_ps_mask(lb, _mm512_abs_ps(b), one, _CMP_NEQ_UQ);
        else
            bad |= _mm512_mask_cmp_ps_mask(la, a, a, _CMP_UNORD_Q) | _mm512_mask_cmp_ps_mask(lb, b, b, _CMP_UNORD_Q);
    }
    return bad ? (strict ? XN_NOT_PM1 : XN_NAN) : 0;
}

/* The register tile: acc[i][h] = popcount counts of rows i < XZ_MR against panels h < ng over T steps. Rows past
   the real ones point at a real row (their sums are computed and dropped). `pstride`: words between panels. This
   generic form serves the partial tiles; xz_dot8 is the full one. */
XZ_INLINE void xz_dot(const uint32_t *const xr[XZ_MR], const int32_t *off, int64_t T, const uint32_t *wp,
                      int64_t pstride, const int mr, const int ng, __m512i acc[XZ_MR][XZ_NG])
{
    for (int i = 0; i < XZ_MR; i++)
        for (int h = 0; h < XZ_NG; h++) acc[i][h] = _mm512_setzero_si512();
    for (int64_t u = 0; u < T; u++) {
        const int64_t o = off[u];
        __m512i wv[XZ_NG];
        for (int h = 0; h < ng; h++) wv[h] = _mm512_loadu_si512((const void *)(wp + h * pstride + 16 * u));
        for (int i = 0; i < mr; i++) {
            const __m512i xv = _mm512_set1_epi32((int)xr[i][o]);
            for (int h = 0; h < ng; h++)
                acc[i][h] = _mm512_add_epi32(acc[i][h], _mm512_popcnt_epi32(_mm512_xor_si512(xv, wv[h])));
        }
    }
}

/* The full tile, 8 rows x 2 panels (or 1, `two` = 0), with its 16 accumulators as named variables: GCC keeps
   those in registers, where it spills and copies an accumulator array. */
#define XZ_POP(a, x, w) a = _mm512_add_epi32(_mm512_popcnt_epi32(_mm512_xor_si512(x, w)), a)
#define XZ_ROW(i)                                                      \
    {                                                                  \
        const __m512i xv = _mm512_set1_epi32((int)x##i[o]);             \
        XZ_POP(a##i##0, xv, w0);                                        \
        if (two) XZ_POP(a##i##1, xv, w1);                               \
    }
#define XZ_OUT(i)             \
    acc[i][0] = a##i##0;      \
    if (two) acc[i][1] = a##i##1;

XZ_INLINE void xz_dot8(const uint32_t *const xr[XZ_MR], const int32_t *off, int64_t T, const uint32_t *wp,
                       int64_t pstride, const int two, __m512i acc[XZ_MR][XZ_NG])
{
    const uint32_t *x0 = xr[0], *x1 = xr[1], *x2 = xr[2], *x3 = xr[3];
    const uint32_t *x4 = xr[4], *x5 = xr[5], *x6 = xr[6], *x7 = xr[7];
    const __m512i z = _mm512_setzero_si512();
    __m512i a00 = z, a10 = z, a20 = z, a30 = z, a40 = z, a50 = z, a60 = z, a70 = z;
    __m512i a01 = z, a11 = z, a21 = z, a31 = z, a41 = z, a51 = z, a61 = z, a71 = z;
    const uint32_t *w = wp;
    for (int64_t u = 0; u < T; u++, w += 16) {
        const int64_t o = off[u];
        const __m512i w0 = _mm512_loadu_si512((const void *)w);
        const __m512i w1 = two ? _mm512_loadu_si512((const void *)(w + pstride)) : w0;
        XZ_ROW(0) XZ_ROW(1) XZ_ROW(2) XZ_ROW(3) XZ_ROW(4) XZ_ROW(5) XZ_ROW(6) XZ_ROW(7)
    }
    XZ_OUT(0) XZ_OUT(1) XZ_OUT(2) XZ_OUT(3) XZ_OUT(4) XZ_OUT(5) XZ_OUT(6) XZ_OUT(7)
    (void)a01; (void)a11; (void)a21; (void)a31; (void)a41; (void)a51; (void)a61; (void)a71;
}

/* One bf16 rounding of the epilogue (`bf16` as xz_finish takes it). */
XZ_INLINE __m512 xz_bf16_step(__m512 f, int bf16)
{
#if XN_HAVE_BF16
    if (bf16 == XZ_BF16_NATIVE) return xz_round_bf16_native(f);
#endif
    return bf16 == XZ_BF16_TAME ? xz_round_bf16_finite(f) : xz_round_bf16(f);
}

/* xz_finish (below) from the sum already converted to float (f, an integer): the scale and the bias, with the
   roundings (the AMX path's epilogue takes it with its int32 sums). */
XZ_INLINE __m512 xz_finish_sum(__m512 f, const __m512 *scale, const __m512 *bias, int bf16, int exact)
{
    const int later = bf16 == XZ_BF16_NATIVE;   /* the last rounding happens in the store */
    if (bf16 && !exact && !(later && !scale && !bias)) f = xz_bf16_step(f, bf16);
    if (scale) {
        f = _mm512_mul_ps(f, *scale);
        if (bf16 && !(later && !bias)) f = xz_bf16_step(f, bf16);
    }
    if (bias) {
        f = _mm512_add_ps(f, *bias);
        if (bf16 && !later) f = xz_bf16_step(f, bf16);
    }
    return f;
}

/* The outputs of 16 channels from their counts: (kc - 2 * count + corr) * scale + bias, the multiply and the add
   rounded separately (no FMA), each step only where its operand exists (adding a zero bias would turn -0.0 into
   +0.0). `corr` is the zero padding's correction (conv) or zero. With bf16 outputs every step is rounded to bf16,
   as torch's bf16 ops round them: the integer (the dense op's bf16 output), the product, the sum. XZ_BF16_NATIVE
   leaves the last of these roundings to the store (xz_store_row converts as it stores). `exact`: every integer is
   a bfloat16 already (xz_exact_ints), so its rounding is skipped. */
XZ_INLINE __m512 xz_finish(__m512i count, __m512i kc, __m512i corr, const __m512 *scale, const __m512 *bias, int bf16,
                           int exact)
{
    const __m512i d = _mm512_add_epi32(_mm512_sub_epi32(kc, _mm512_add_epi32(count, count)), corr);
    return xz_finish_sum(_mm512_cvtepi32_ps(d), scale, bias, bf16, exact);   /* exact: |d| <= K < 2**24 */
}

#if XN_HAVE_BF16
/* The XZ_BF16_NATIVE epilogue of one output row's two panels with a scale, each rounding done for both panels by one
   VCVTNE2PS2BF16 and widened back by two unpacks: the same roundings as xz_finish_sum per panel, in half the
   instructions. The unpacks interleave the channels within 128-bit lanes, so the scales and biases that come after
   a rounding are permuted to match (xz_pair_setup), and the result is put back in channel order by one word
   permute before the store. The steps, as xz_finish_sum takes them (the last rounding is the store's):
     XZ_PAIR_RSRB  round the integer, times the scale, round, plus the bias (integers that need rounding)
     XZ_PAIR_RS    round the integer, times the scale (no bias)
     XZ_PAIR_SRB   times the scale, round, plus the bias (xz_exact_ints) */
#define XZ_PAIR_RSRB 0
#define XZ_PAIR_RS 1
#define XZ_PAIR_SRB 2

typedef struct {
    __m512 scale_lo, scale_hi, bias_lo, bias_hi;   /* as the vectors they meet are ordered (XZ_PAIR_SRB: the scale
                                                      in channel order, panel 0 in _lo) */
    __m512i order;                                 /* the word permute back to channel order */
} xz_pair_epilogue;

/* The constants of xz_pair_bf16 from the two panels' scales (s0: channels 0-15, s1: 16-31) and biases. */
XZ_INLINE void xz_pair_setup(__m512 s0, __m512 s1, __m512 b0, __m512 b1, const int mode, xz_pair_epilogue *e)
{
    /* the words of one rounding of (a, b): a's 16 then b's; unpacking them in 128-bit lanes gives the channels
       lo = a 0-3, a 8-11, b 0-3, b 8-11 and hi = a 4-7, a 12-15, b 4-7, b 12-15 */
    const __m512i lo = _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27);
    const __m512i hi = _mm512_setr_epi32(4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    /* after a second rounding, of (lo, hi): channels 0-3, 16-19, 4-7, 20-23 and 8-11, 24-27, 12-15, 28-31 */
    const __m512i lo2 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i hi2 = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    /* the store's rounding of (lo, hi) after one unpack, or after two, holds channel c at word order[c] */
    const __m512i order1 = _mm512_set_epi16(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8, 23, 22, 21,
                                            20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
    const __m512i order2 = _mm512_set_epi16(31, 30, 29, 28, 23, 22, 21, 20, 15, 14, 13, 12, 7, 6, 5, 4, 27, 26, 25,
                                            24, 19, 18, 17, 16, 11, 10, 9, 8, 3, 2, 1, 0);
    if (mode == XZ_PAIR_SRB) {
        e->scale_lo = s0;
        e->scale_hi = s1;
        e->bias_lo = _mm512_permutex2var_ps(b0, lo, b1);
        e->bias_hi = _mm512_permutex2var_ps(b0, hi, b1);
        e->order = order1;
        return;
    }
    e->scale_lo = _mm512_permutex2var_ps(s0, lo, s1);
    e->scale_hi = _mm512_permutex2var_ps(s0, hi, s1);
    if (mode == XZ_PAIR_RS) {
        e->order = order1;
        return;
    }
    e->bias_lo = _mm512_permutex2var_ps(b0, lo2, b1);
    e->bias_hi = _mm512_permutex2var_ps(b0, hi2, b1);
    e->order = order2;
}

/* One rounding of (a, b), widened back: *lo and *hi as xz_pair_setup describes them. */
XZ_INLINE void xz_pair_round(__m512 a, __m512 b, __m512 *lo, __m512 *hi)
{
    const __m512i z = _mm512_setzero_si512(), w = (__m512i)_mm512_cvtne2ps_pbh(b, a);
    *lo = _mm512_castsi512_ps(_mm512_unpacklo_epi16(z, w));
    *hi = _mm512_castsi512_ps(_mm512_unpackhi_epi16(z, w));
}

/* The 32 bfloat16 outputs of channels 0-31 (in order) from the integers d0 (channels 0-15) and d1 (16-31), as
   floats, by the steps of `mode` (torch's bf16 roundings). */
XZ_INLINE __m512i xz_pair_bf16(__m512 d0, __m512 d1, const int mode, const xz_pair_epilogue *e)
{
    __m512 lo, hi;
    if (mode == XZ_PAIR_SRB) {
        xz_pair_round(_mm512_mul_ps(d0, e->scale_lo), _mm512_mul_ps(d1, e->scale_hi), &lo, &hi);
        lo = _mm512_add_ps(lo, e->bias_lo);
        hi = _mm512_add_ps(hi, e->bias_hi);
    } else {
        xz_pair_round(d0, d1, &lo, &hi);
        lo = _mm512_mul_ps(lo, e->scale_lo);
        hi = _mm512_mul_ps(hi, e->scale_hi);
        if (mode == XZ_PAIR_RSRB) {
            xz_pair_round(lo, hi, &lo, &hi);
            lo = _mm512_add_ps(lo, e->bias_lo);
            hi = _mm512_add_ps(hi, e->bias_hi);
        }
    }
    return _mm512_permutexvar_epi16(e->order, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}

/* The lanes of two panels with `avail` channels from the first on, and the constants of xz_pair_bf16 from their
   scales and (NULL: none) biases at `scale` and `bias`. */
XZ_INLINE void xz_pair_load(const float *scale, const float *bias, int64_t avail, const int mode,
                            __mmask16 lanes[XZ_NG], xz_pair_epilogue *e)
{
    __m512 sv[XZ_NG], bv[XZ_NG];
    for (int h = 0; h < XZ_NG; h++) {
        lanes[h] = xz_lanes(avail - 16 * h);
        sv[h] = _mm512_maskz_loadu_ps(lanes[h], scale + 16 * h);
        bv[h] = bias ? _mm512_maskz_loadu_ps(lanes[h], bias + 16 * h) : _mm512_setzero_ps();
    }
    xz_pair_setup(sv[0], sv[1], bv[0], bv[1], mode, e);
}

/* The pair mode of an epilogue with these operands, or -1 where pairing saves nothing (no scale, or an exact
   integer and no bias: the store's rounding is the only one). */
static inline int xz_pair_mode(int has_scale, int has_bias, int exact)
{
    if (!has_scale) return -1;
    if (!exact) return has_bias ? XZ_PAIR_RSRB : XZ_PAIR_RS;
    return has_bias ? XZ_PAIR_SRB : -1;
}
#endif

/* Whether the n floats of v (NULL: none) are all finite. With finite scales and biases no bf16 epilogue step meets
   a NaN (an integer times a finite scale is finite or overflows to an infinity; adding a finite bias keeps it so),
   so the outputs may take XZ_BF16_TAME's rounding. */
static int xz_tame(const float *v, int64_t n)
{
    for (int64_t i = 0; v && i < n; i++)
        if (!(__builtin_fabsf(v[i]) <= FLT_MAX)) return 0;
    return 1;
}

/* Whether the n floats of v (NULL: none) are all zero or finite of magnitude at least 2**-100, on a CPU with
   AVX512-BF16. Then no bf16 epilogue step meets or makes a subnormal, where VCVTNEPS2BF16 and xz_round_bf16
   differ: the integer is 0 or at least 1; times a scale it is 0, or at least 2**-100 (or an infinity); a sum with
   a bias is of two multiples of 2**-123 (every float of magnitude >= 2**-100 is one), so it is 0 or at least
   2**-123, above the smallest normal 2**-126; and, finite scales and biases, no NaN (xz_tame). */
static int xz_native_ok(const float *v, int64_t n)
{
#if XN_HAVE_BF16
    static int cpu = -1;   /* whether the CPU has AVX512-BF16, once known */
    int has = __atomic_load_n(&cpu, __ATOMIC_RELAXED);
    if (has < 0) {   /* CPUID leaf 7, subleaf 1: EAX bit 5 (read directly: older compilers lack the feature name) */
        unsigned a = 0, b, c, d;
        has = __get_cpuid_count(7, 1, &a, &b, &c, &d) && ((a >> 5) & 1);
        __atomic_store_n(&cpu, has, __ATOMIC_RELAXED);
    }
    if (!has) return 0;
    for (int64_t i = 0; v && i < n; i++) {
        const float a = __builtin_fabsf(v[i]);
        if (!(a == 0.0f || (a >= 0x1p-100f && a <= FLT_MAX))) return 0;
    }
    return 1;
#else
    (void)v; (void)n;
    return 0;
#endif
}

/* Whether every integer an epilogue meets is a bfloat16 (8 significant bits): |d| <= K, and d = K - 2 * count has
   K's parity without a padding correction (`parity`), so K <= 256, or an even K <= 512, is enough. */
static int xz_exact_ints(int64_t K, int parity) { return K <= 256 || (parity && K <= 512 && K % 2 == 0); }

/* The `bf16` argument of a call's epilogue (0 for float32 outputs) from its n scales and biases (NULL: none). */
static int xz_bf16_mode(int bf16, const float *scale, const float *bias, int64_t n)
{
    if (!bf16) return 0;
    if (xz_native_ok(scale, n) && xz_native_ok(bias, n)) return XZ_BF16_NATIVE;
    return xz_tame(scale, n) && xz_tame(bias, n) ? XZ_BF16_TAME : 1;
}

/* Store 8 pixels x 16 channels (f[i] = the channels of pixel i) into channel-major planes: channel c's 8 values go
   to y + c * plane; channels from `nl` on are not stored. A transpose in registers, then 256-bit stores. */
XZ_INLINE void xz_store_planes(const __m512 f[8], float *y, int64_t plane, int nl)
{
    __m512 t[8], s[8];
    for (int p = 0; p < 4; p++) {
        t[2 * p] = _mm512_unpacklo_ps(f[2 * p], f[2 * p + 1]);
        t[2 * p + 1] = _mm512_unpackhi_ps(f[2 * p], f[2 * p + 1]);
    }
    for (int half = 0; half < 2; half++) {   /* s[4 * half + j], 128-bit lane L: pixels 4 * half .. + 3 of 4L + j */
        const __m512 *u = t + 4 * half;
        s[4 * half + 0] = _mm512_shuffle_ps(u[0], u[2], 0x44);
        s[4 * half + 1] = _mm512_shuffle_ps(u[0], u[2], 0xEE);
        s[4 * half + 2] = _mm512_shuffle_ps(u[1], u[3], 0x44);
        s[4 * half + 3] = _mm512_shuffle_ps(u[1], u[3], 0xEE);
    }
    const __m512i lo = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i hi = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int j = 0; j < 4; j++) {
        const __m512 a = _mm512_permutex2var_ps(s[j], lo, s[4 + j]);   /* channels j | 4 + j */
        const __m512 b = _mm512_permutex2var_ps(s[j], hi, s[4 + j]);   /* channels 8 + j | 12 + j */
        if (j < nl) _mm256_storeu_ps(y + j * plane, _mm512_castps512_ps256(a));
        if (4 + j < nl) _mm256_storeu_ps(y + (4 + j) * plane, _mm512_extractf32x8_ps(a, 1));
        if (8 + j < nl) _mm256_storeu_ps(y + (8 + j) * plane, _mm512_castps512_ps256(b));
        if (12 + j < nl) _mm256_storeu_ps(y + (12 + j) * plane, _mm512_extractf32x8_ps(b, 1));
    }
}

/* Prefetch into L2 the next `n` cache lines from *at, up to `end` (the next image's input while this one
   computes: xz_conv_images). */
XZ_INLINE void xz_prefetch(const char **at, const char *end, int64_t n)
{
    for (; n > 0 && *at < end; n--, *at += 64) _mm_prefetch(*at, _MM_HINT_T1);
}

/* ------------------------------------------------------------------------------------------------------------
   Linear layer. */

typedef struct {
    xn_task task;
    const void *x;           /* float32, or bfloat16 with bf16 */
    int64_t ldx, M, N, K;
    const uint8_t *w;
    const uint32_t *wz;      /* panels [P16][T][16]: prepared, or `own` filled by this call */
    uint32_t *own;
    const float *scale, *bias;
    void *y;                 /* float32, or bfloat16 with bf16 */
    int64_t T, P16, NQ;      /* steps (32-bit words per row), panels, panel pairs */
    int64_t mtiles, mblock;  /* row tiles, row tiles per cache block */
    int64_t qblock;          /* panel pairs per cache block */
    uint32_t *xa;            /* sign words [M][T] */
    int32_t *off;            /* 0 .. T - 1 */
    int split_m, strict, bf16, stream;   /* stream: xz_store_row's streaming stores */
    int exact;                           /* xz_exact_ints: the integers need no bf16 rounding */
} xz_linear_job;

#if XN_HAVE_BF16
/* The bf16 outputs of rows m0 .. m0 + mr - 1 x two panels from p0 on, in XZ_BF16_NATIVE with a scale: xz_pair_bf16
   in pair mode `mode` (xz_pair_mode). */
XZ_INLINE void xz_linear_pair_rows(const xz_linear_job *j, int64_t m0, int64_t p0, const int mr,
                                   __m512i acc[XZ_MR][XZ_NG], const int mode)
{
    /* K - 2 * count as one exact multiply-add of floats (integers below 2**24; a zero is +0.0) */
    const __m512 kf = _mm512_set1_ps((float)j->K), two = _mm512_set1_ps(2.0f);
    const int64_t n = 16 * p0;
    __mmask16 lanes[XZ_NG];
    xz_pair_epilogue e;
    xz_pair_load(j->scale + n, j->bias ? j->bias + n : NULL, j->N - n, mode, lanes, &e);
    for (int i = 0; i < mr; i++) {
        const __m512 d0 = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(acc[i][0]), two, kf);
        const __m512 d1 = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(acc[i][1]), two, kf);
        xz_store_pair(j->y, (m0 + i) * j->N + n, xz_pair_bf16(d0, d1, mode, &e), lanes, j->stream);
    }
}
#endif

XZ_INLINE void xz_linear_tile(const xz_linear_job *j, const int bf16, int64_t m0, int64_t p0, const int mr,
                               const int ng)
{
    const uint32_t *xr[XZ_MR];
    for (int i = 0; i < XZ_MR; i++) xr[i] = j->xa + (m0 + (i < mr ? i : 0)) * j->T;
    __m512i acc[XZ_MR][XZ_NG];
    if (mr == XZ_MR) xz_dot8(xr, j->off, j->T, j->wz + p0 * j->T * 16, j->T * 16, ng == XZ_NG, acc);
    else xz_dot(xr, j->off, j->T, j->wz + p0 * j->T * 16, j->T * 16, mr, ng, acc);
#if XN_HAVE_BF16
    if (bf16 == XZ_BF16_NATIVE && ng == XZ_NG) {   /* both panels' roundings at once */
        switch (xz_pair_mode(j->scale != NULL, j->bias != NULL, j->exact)) {
        case XZ_PAIR_RSRB: xz_linear_pair_rows(j, m0, p0, mr, acc, XZ_PAIR_RSRB); return;
        case XZ_PAIR_RS: xz_linear_pair_rows(j, m0, p0, mr, acc, XZ_PAIR_RS); return;
        case XZ_PAIR_SRB: xz_linear_pair_rows(j, m0, p0, mr, acc, XZ_PAIR_SRB); return;
        default: break;
        }
    }
#endif
    const __m512i kc = _mm512_set1_epi32((int)j->K), zero = _mm512_setzero_si512();
    __m512 sv[XZ_NG], bv[XZ_NG];
    __mmask16 lanes[XZ_NG];
    for (int h = 0; h < ng; h++) {
        const int64_t n = 16 * (p0 + h);
        lanes[h] = xz_lanes(j->N - n);
        sv[h] = j->scale ? _mm512_maskz_loadu_ps(lanes[h], j->scale + n) : _mm512_setzero_ps();
        bv[h] = j->bias ? _mm512_maskz_loadu_ps(lanes[h], j->bias + n) : _mm512_setzero_ps();
    }
    for (int i = 0; i < mr; i++) {
        __m512 f[XZ_NG];
        for (int h = 0; h < ng; h++)
            f[h] = xz_finish(acc[i][h], kc, zero, j->scale ? &sv[h] : NULL, j->bias ? &bv[h] : NULL, bf16,
                             j->exact);
        xz_store_row(j->y, (m0 + i) * j->N + 16 * p0, f, lanes, ng, bf16, j->stream);
    }
}

#define XZ_LINEAR_CASE(R)                                            \
    case R:                                                          \
        if (ng == XZ_NG) xz_linear_tile(j, bf16, m0, p0, R, XZ_NG);  \
        else xz_linear_tile(j, bf16, m0, p0, R, 1);                  \
        break;

/* The tile of mr <= XZ_MR rows x ng <= XZ_NG panels; `bf16`: j->bf16, a constant where the caller knows it. */
XZ_INLINE void xz_linear_tile_any(const xz_linear_job *j, const int bf16, int64_t m0, int64_t p0, int mr, int ng)
{
    switch (mr) {
        XZ_LINEAR_CASE(1)
        XZ_LINEAR_CASE(2)
        XZ_LINEAR_CASE(3)
        XZ_LINEAR_CASE(4)
        XZ_LINEAR_CASE(5)
        XZ_LINEAR_CASE(6)
        XZ_LINEAR_CASE(7)
    default:
        if (ng == XZ_NG) xz_linear_tile(j, bf16, m0, p0, XZ_MR, XZ_NG);
        else xz_linear_tile(j, bf16, m0, p0, XZ_MR, 1);
        break;
    }
}

/* A thread's share of a linear call; `bf16`: j->bf16 (xz_linear_share passes the common ones as constants). */
XZ_INLINE void xz_linear_share_as(xn_task *task, int tid, const int bf16)
{
    xz_linear_job *j = (xz_linear_job *)task;
    const int nt = task->nthreads;
    int64_t lo, hi;
    xn_share(j->M, XZ_MR, tid, nt, &lo, &hi);
    int bad = 0;
    for (int64_t m = lo; m < hi; m++) bad |= xz_signs(j->x, m * j->ldx, j->K, j->xa + m * j->T, j->strict, j->bf16);
    if (bad) xn_fail(task, bad);
    if (j->own) {
        xn_share(j->P16, 1, tid, nt, &lo, &hi);
        xn_fill_panels(j->w, j->N, j->K, 1, 1, lo, hi, j->own);
    }
    xn_barrier(task);
    if (xn_failed(task)) return;
    int64_t t0 = 0, t1 = j->mtiles, q0 = 0, q1 = j->NQ;
    if (j->split_m) xn_share(j->mtiles, 1, tid, nt, &t0, &t1);
    else xn_share(j->NQ, 1, tid, nt, &q0, &q1);
    /* A block of panels stays in L2 while blocks of rows (in L1) sweep it, each panel pair from L1 across the
       row block's tiles; the outputs of a (row block, panel block) pair stay in L2 until they are complete. */
    for (int64_t qb = q0; qb < q1; qb += j->qblock) {
        const int64_t qe = qb + j->qblock < q1 ? qb + j->qblock : q1;
        for (int64_t tb = t0; tb < t1; tb += j->mblock) {
            const int64_t te = tb + j->mblock < t1 ? tb + j->mblock : t1;
            for (int64_t q = qb; q < qe; q++) {
                const int64_t p0 = q * XZ_NG;
                const int ng = j->P16 - p0 < XZ_NG ? (int)(j->P16 - p0) : XZ_NG;
                for (int64_t t = tb; t < te; t++) {
                    const int64_t m0 = t * XZ_MR;
                    xz_linear_tile_any(j, bf16, m0, p0, j->M - m0 < XZ_MR ? (int)(j->M - m0) : XZ_MR, ng);
                }
            }
        }
    }
    if (j->stream) _mm_sfence();
}

/* xz_linear_share_as compiled for float32 outputs and for XZ_BF16_NATIVE's (the epilogue then branches on no
   mode), and for the other bf16 modes read from the job. */
XN_AVX512_FN static void xz_linear_share(xn_task *task, int tid)
{
    const int bf16 = ((xz_linear_job *)task)->bf16;
    if (bf16 == 0) xz_linear_share_as(task, tid, 0);
    else if (bf16 == XZ_BF16_NATIVE) xz_linear_share_as(task, tid, XZ_BF16_NATIVE);
    else xz_linear_share_as(task, tid, bf16);
}

static int xz_linear(const void *x, int64_t M, int64_t ldx, int64_t K, const uint8_t *w, int64_t N,
                     const float *scale, const float *bias, void *y, int nthreads, int64_t min_work,
                     const uint32_t *prepared, int strict, int bf16)
{
    xz_linear_job j;
    memset(&j, 0, sizeof j);
    j.task.run = xz_linear_share;
    j.x = x; j.ldx = ldx; j.M = M; j.N = N; j.K = K; j.w = w;
    j.scale = scale; j.bias = bias; j.y = y; j.strict = strict;
    j.bf16 = xz_bf16_mode(bf16, scale, bias, N);
    j.exact = xz_exact_ints(K, 1);
    j.T = (K + 31) / 32;
    j.stream = xz_stream_ok(y, M * N, N, N, bf16);
    j.P16 = (N + 15) / 16;
    j.NQ = (j.P16 + XZ_NG - 1) / XZ_NG;
    j.mtiles = (M + XZ_MR - 1) / XZ_MR;
    j.mblock = XZ_X_BLOCK / (j.T * 4 * XZ_MR);
    if (j.mblock < 1) j.mblock = 1;
    j.qblock = XZ_W_BLOCK / (j.T * 64 * XZ_NG);
    if (j.qblock < 1) j.qblock = 1;
    j.xa = (uint32_t *)malloc((size_t)(M * j.T) * sizeof(uint32_t));
    j.off = (int32_t *)malloc((size_t)j.T * sizeof(int32_t));
    if (!prepared) j.own = (uint32_t *)malloc((size_t)xn_panel_words(N, K, 1, 1) * sizeof(uint32_t));
    if (!j.xa || !j.off || (!prepared && !j.own)) {
        free(j.xa);
        free(j.off);
        free(j.own);
        return XN_NOMEM;
    }
    for (int64_t u = 0; u < j.T; u++) j.off[u] = (int32_t)u;
    j.wz = prepared ? prepared : j.own;
    int t = xn_threads(nthreads, M * N * ((K + 63) / 64), min_work, INT64_MAX);
    j.split_m = j.mtiles >= 8 * t && j.mtiles >= j.NQ;
    j.task.nthreads = xn_threads(t, 1, 0, j.split_m ? j.mtiles : j.NQ);
    xn_run(&j.task);
    free(j.xa);
    free(j.off);
    free(j.own);
    return j.task.status;
}

/* The register tile's inner loop with nothing else (no memory, no epilogue), for the benchmark's measure of what
   this core gives right now: `steps` steps of xz_dot8's vector operations (a broadcast row against two panels,
   XOR, VPOPCNTD, ADD, for 8 rows: 16 x 512 binary multiply-adds), on registers, the panels rotated each step so that
   nothing is computed once. Returns a checksum of the sums (the caller times the call). */
XN_AVX512_FN static int64_t xz_popcount_probe(int64_t steps)
{
    const __m512i z = _mm512_setzero_si512();
    __m512i a00 = z, a10 = z, a20 = z, a30 = z, a40 = z, a50 = z, a60 = z, a70 = z;
    __m512i a01 = z, a11 = z, a21 = z, a31 = z, a41 = z, a51 = z, a61 = z, a71 = z;
    __m512i w0 = _mm512_set1_epi32(0x2545F491), w1 = _mm512_set1_epi32(0x4F6CDD1D);
    const __m512i x0 = _mm512_set1_epi32(0x0BADF00D), x1 = _mm512_set1_epi32(0x12345678);
    const __m512i x2 = _mm512_set1_epi32(0x7FEDCBA9), x3 = _mm512_set1_epi32(0x3C3C3C3C);
    const __m512i x4 = _mm512_set1_epi32(0x55AA55AA), x5 = _mm512_set1_epi32(0x0F0F0F0F);
    const __m512i x6 = _mm512_set1_epi32(0x6B8B4567), x7 = _mm512_set1_epi32(0x327B23C6);
    for (int64_t u = 0; u < steps; u++) {
        XZ_POP(a00, x0, w0); XZ_POP(a01, x0, w1); XZ_POP(a10, x1, w0); XZ_POP(a11, x1, w1);
        XZ_POP(a20, x2, w0); XZ_POP(a21, x2, w1); XZ_POP(a30, x3, w0); XZ_POP(a31, x3, w1);
        XZ_POP(a40, x4, w0); XZ_POP(a41, x4, w1); XZ_POP(a50, x5, w0); XZ_POP(a51, x5, w1);
        XZ_POP(a60, x6, w0); XZ_POP(a61, x6, w1); XZ_POP(a70, x7, w0); XZ_POP(a71, x7, w1);
        w0 = _mm512_rol_epi32(w0, 1);
        w1 = _mm512_rol_epi32(w1, 3);
    }
    __m512i t = _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a00, a01), _mm512_add_epi32(a10, a11)),
                                 _mm512_add_epi32(_mm512_add_epi32(a20, a21), _mm512_add_epi32(a30, a31)));
    t = _mm512_add_epi32(t, _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a40, a41), _mm512_add_epi32(a50, a51)),
                                             _mm512_add_epi32(_mm512_add_epi32(a60, a61), _mm512_add_epi32(a70, a71))));
    __asm__ __volatile__("" : : "x"(t));   /* the sums are used: the loop stays */
    return steps * 16 * 512;
}

