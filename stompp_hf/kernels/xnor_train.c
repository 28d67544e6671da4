/* Fused elementwise passes of a training step (stompp_hf.kernels.elementwise; docs/design.md, "Fused passes").

   A binarized input costs a training step several activation-sized passes when written as torch ops: the sign
   (a comparison and an add), the sum of |x| for the scale beta (|x| into a temporary, then the sum), the clip, the
   window 1{|x| <= c} and the product with the gradient. Each is memory-bound, so on a CPU the step pays for the
   passes, not for the arithmetic. These entry points do the same arithmetic in one pass each:

   * xnor_ew_sign:        out = x >= 0 ? 1 : -1 (NaN -> -1), and optionally sum |x| in the same read; with out
                          NULL, the sum alone (read only).
   * xnor_ew_window_grad: out = (lo < x && x < hi) ? g : 0, times `mult` when given. With lo, hi one ulp outside
                          -c, c this is the clipped identity 1{|x| <= c} * g as aten's hardtanh_backward computes it
                          (a NaN x is outside), then the product with the factored form's 1 / scale.
   * xnor_ew_masked:      out = M ? (x >= 0 ? a : -a) : clamp(x, -b, b), and the int8 window (lo < x && x < hi):
                          the forward of a transitioning input, whose mask M repeats every `period` elements (the
                          per-sample mask of a contiguous batch); without a mask, the clamp of a continuous input.
   * xnor_ew_scale_bias:  y = y * s + b in place, per column of a row-major y (s, b of length cols, or s of length
                          1), two roundings in y's dtype: the factored form's epilogue (Eq. 5) as torch's
                          `y.mul_(s).add_(b)` computes it, in one pass instead of two.
   * xnor_ew_window_apply: out = g * w, w that int8 window (0 or 1, as float): the backward of a transitioning
                          input under "stompp_ste" (the product, so a NaN or negative g times 0 gives what torch's
                          `grad * window.to(dtype)` gives).
   * xnor_ew_row_sign:    out[r, :] = x[r, :] >= 0 ? s[r] : -s[r] (NaN -> -s[r]) in dtype odt: a frozen weight's
                          alpha * sign(W) as the operand of the input gradient's matmul (torch's
                          `(binary_sign(W) * alpha).to(dtype)`: +-alpha is exact before the one rounding).
   * xnor_ew_clip_bits:   out = clamp(x, -b, b) and the window (lo < x && x < hi) as bits, entry i bit i % 8 of byte
                          i / 8 (least significant first): the forward of a continuous input, whose backward then
                          reads one bit per entry instead of x.
   * xnor_ew_bits_grad:   out = bit i ? g : 0, g widened to out's dtype: that backward, the select of
                          hardtanh_backward (a NaN g outside the window gives 0).
   * xnor_ew_clip_inplace: x = clamp(x, -b, b) in place where mask (everywhere without one): BinaryConnect's clip of
                          the latent weights after each optimizer step. Read-mostly: a block of XE_CLIP_BLOCK
                          entries is written only if one of its entries lies outside [-b, b] (the clip of
                          pretrained transformer weights, |w| ~ 0.05, writes nothing), where torch's `clamp_`
                          writes every entry and a masked clip is a clamp, a `where` and a copy.

   Values are float32 or bfloat16 (`dt`), read and written in that dtype. bfloat16 is widened to float32 (exact),
   computed in float32 and rounded back to nearest even (NaN -> 0x7FC0), as torch computes a bfloat16 op. Under
   autocast a layer's op reads its operand in bfloat16 and hands back a bfloat16 gradient, so the passes that feed
   it or read its gradient also take a float32 x with a bfloat16 out (`odt`; the value of the float32 pass, then
   rounded as `.to(torch.bfloat16)` rounds it) or gradient (`gdt`, widened exactly): one pass instead of the
   float32 pass plus the cast. Sums of
   |x| accumulate in 16 float32 lanes for XE_FLUSH elements, then in double, in XE_PARTS fixed pieces added in
   order: the result does not depend on the thread count. The loops are plain C, which the compiler vectorizes;
   they compile on any CPU. */

#define XE_F32 0
#define XE_BF16 1
#define XE_LANES 16
#define XE_PARTS 64          /* pieces of the work (and of a sum), split between the threads */
#define XE_FLUSH 4096        /* elements summed in the float32 lanes before their sums go into a double */
#define XE_MIN_WORK 32768    /* elements per thread below which another thread costs more than it saves */
#define XE_CLIP_BLOCK 64     /* entries of xnor_ew_clip_inplace tested together before any is written */

#define XE_INLINE static inline __attribute__((always_inline))

XE_INLINE float xe_ld(const void *p, const int dt, int64_t i)
{
    if (dt == XE_BF16) {
        const uint32_t b = (uint32_t)((const uint16_t *)p)[i] << 16;
        float f;
        memcpy(&f, &b, 4);
        return f;
    }
    return ((const float *)p)[i];
}

/* float32 -> bfloat16, round to nearest even; NaN -> 0x7FC0 (c10::BFloat16's rule). Branch-free, so loops that
   store bfloat16 vectorize. */
XE_INLINE uint16_t xe_bf16(float f)
{
    uint32_t b;
    memcpy(&b, &f, 4);
    const uint16_t rounded = (uint16_t)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
    return (b & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t)0x7FC0 : rounded;
}

/* f rounded to bfloat16 (as xe_bf16) and widened back */
XE_INLINE float xe_round_bf16(float f)
{
    const uint32_t b = (uint32_t)xe_bf16(f) << 16;
    memcpy(&f, &b, 4);
    return f;
}

XE_INLINE void xe_st(void *p, const int dt, int64_t i, float f)
{
    if (dt == XE_BF16) ((uint16_t *)p)[i] = xe_bf16(f);
    else ((float *)p)[i] = f;
}

enum { XE_SIGN, XE_ABS_SUM, XE_WINDOW_GRAD, XE_MASKED, XE_WINDOW_APPLY, XE_SCALE_BIAS, XE_ROW_SIGN, XE_CLIP,
       XE_CLIP_BITS, XE_BITS_GRAD };

typedef struct {
    xn_task task;
    int op, dt, odt, gdt, want_sum, has_mult;
    const void *x, *g;
    const uint8_t *mask;
    const void *scale, *bias;   /* XE_SCALE_BIAS: per column (scale may have one entry: scale_len 1), dtype dt;
                                   XE_ROW_SIGN: scale per row of `period` elements, float32 */
    int64_t scale_len;
    void *out;
    int8_t *window;
    int64_t n, period;
    float a, b, lo, hi, mult;
    double sums[XE_PARTS];
} xe_job;

/* The first element of piece p: whole groups of XE_LANES, the last piece ending at n. */
static int64_t xe_edge(int64_t n, int p)
{
    if (p >= XE_PARTS) return n;
    return n / XE_LANES * p / XE_PARTS * XE_LANES;
}

/* sign (do_out, in dtype odt) and sum of |x| (do_sum) of x[lo:hi); the flags are constants, so each use compiles its
   own loop. */
XE_INLINE void xe_sign_range(const void *x, void *out, double *sum, int64_t lo, int64_t hi, const int dt,
                             const int odt, const int do_out, const int do_sum)
{
    double total = 0.0;
    int64_t i = lo;
    while (hi - i >= XE_LANES) {
        float acc[XE_LANES] = {0};
        const int64_t span = (hi - i) / XE_LANES * XE_LANES, end = i + (span < XE_FLUSH ? span : XE_FLUSH);
        for (; i < end; i += XE_LANES) {
            for (int l = 0; l < XE_LANES; l++) {
                const float v = xe_ld(x, dt, i + l);
                if (do_sum) acc[l] += __builtin_fabsf(v);
                if (do_out) {
                    if (odt == XE_BF16) ((uint16_t *)out)[i + l] = v >= 0.0f ? 0x3F80 : 0xBF80;
                    else ((float *)out)[i + l] = v >= 0.0f ? 1.0f : -1.0f;
                }
            }
        }
        if (do_sum)
            for (int l = 0; l < XE_LANES; l++) total += acc[l];
    }
    for (; i < hi; i++) {
        const float v = xe_ld(x, dt, i);
        if (do_sum) total += __builtin_fabsf(v);
        if (do_out) xe_st(out, odt, i, v >= 0.0f ? 1.0f : -1.0f);
    }
    if (do_sum) *sum = total;
}

/* x and out in dtype dt, g in gdt */
XE_INLINE void xe_window_grad_range(const xe_job *j, int64_t lo, int64_t hi, const int dt, const int gdt,
                                    const int has_mult)
{
    const float wlo = j->lo, whi = j->hi, mult = j->mult;
    const void *x = j->x, *g = j->g;
    void *out = j->out;
    for (int64_t i = lo; i < hi; i++) {
        const float u = xe_ld(x, dt, i), gv = xe_ld(g, gdt, i);   /* both loaded: the loop vectorizes */
        float o = ((u > wlo) & (u < whi)) ? gv : 0.0f;
        if (has_mult) o = o * mult;
        xe_st(out, dt, i, o);
    }
}

/* y[i] = y[i] * s[col] + b[col], each rounded to dtype dt; columns repeat every `period` elements */
XE_INLINE void xe_scale_bias_range(const xe_job *j, int64_t lo, int64_t hi, const int dt, const int has_scale,
                                   const int has_bias)
{
    void *y = j->out;
    const int64_t per_col = j->scale_len > 1;
    for (int64_t i = lo; i < hi;) {
        const int64_t off = i % j->period, len = hi - i < j->period - off ? hi - i : j->period - off;
        for (int64_t k = 0; k < len; k++) {
            float v = xe_ld(y, dt, i + k);
            if (has_scale) {
                v = v * xe_ld(j->scale, dt, per_col ? off + k : 0);
                if (dt == XE_BF16) v = xe_round_bf16(v);   /* the first rounding */
            }
            if (has_bias) v = v + xe_ld(j->bias, dt, off + k);
            xe_st(y, dt, i + k, v);
        }
        i += len;
    }
}

/* out (dtype dt) = g (dtype gdt) * window */
XE_INLINE void xe_window_apply_range(const xe_job *j, int64_t lo, int64_t hi, const int dt, const int gdt)
{
    const void *g = j->g;
    const int8_t *window = j->window;
    void *out = j->out;
    for (int64_t i = lo; i < hi; i++) xe_st(out, dt, i, xe_ld(g, gdt, i) * (float)window[i]);
}

/* out (dtype odt) = x (dtype dt) >= 0 ? s[row] : -s[row], rows of `period` elements */
XE_INLINE void xe_row_sign_range(const xe_job *j, int64_t lo, int64_t hi, const int dt, const int odt)
{
    const float *s = (const float *)j->scale;
    for (int64_t i = lo; i < hi;) {
        const int64_t r = i / j->period, end = (r + 1) * j->period < hi ? (r + 1) * j->period : hi;
        const float a = s[r];
        for (; i < end; i++) xe_st(j->out, odt, i, xe_ld(j->x, dt, i) >= 0.0f ? a : -a);
    }
}

XE_INLINE float xe_clamp(float u, float b) { return u < -b ? -b : (u > b ? b : u); }

/* x in dtype dt, out in odt; without a mask (has_mask 0) every entry is continuous: the clamp alone */
XE_INLINE void xe_masked_range(const xe_job *j, int64_t lo, int64_t hi, const int dt, const int odt,
                               const int do_window, const int has_mask)
{
    const float a = j->a, b = j->b, wlo = j->lo, whi = j->hi;
    const void *x = j->x;
    void *out = j->out;
    int8_t *window = j->window;
    if (!has_mask) {
        for (int64_t i = lo; i < hi; i++) {
            const float u = xe_ld(x, dt, i);
            xe_st(out, odt, i, xe_clamp(u, b));
            if (do_window) window[i] = (int8_t)((u > wlo) & (u < whi));
        }
        return;
    }
    for (int64_t i = lo; i < hi;) {
        const int64_t off = i % j->period, len = hi - i < j->period - off ? hi - i : j->period - off;
        const uint8_t *m = j->mask + off;
        for (int64_t k = 0; k < len; k++) {
            const float u = xe_ld(x, dt, i + k);
            const float hard = u >= 0.0f ? a : -a;
            xe_st(out, odt, i + k, m[k] ? hard : xe_clamp(u, b));
            if (do_window) window[i + k] = (int8_t)((u > wlo) & (u < whi));
        }
        i += len;
    }
}

/* The window as bits goes through a byte per entry in a chunk of XE_BIT_CHUNK entries that stays in L1, so the
   elementwise loops vectorize as the int8 window's do; bytes <-> bits eight at a time with one 64-bit product
   (each byte 0 or 1, the first entry in the least significant byte and bit). */
#define XE_BIT_CHUNK 2048
#if XN_X86_SIMD && defined(__AVX512BW__)
#define XE_BITS64 1  /* the host has AVX-512 BW (-march=native): 64 bytes <-> 64 bits in one instruction */
#else
#define XE_BITS64 0
#endif

XE_INLINE uint8_t xe_gather8(const int8_t *w)
{
    uint64_t v;
    memcpy(&v, w, 8);
    return (uint8_t)((v * 0x0102040810204080ULL) >> 56);
}

XE_INLINE void xe_spread8(uint8_t b, int8_t *w)
{
    const uint64_t v = ((((uint64_t)b * 0x0101010101010101ULL) & 0x8040201008040201ULL) + 0x7F7F7F7F7F7F7F7FULL) >> 7;
    const uint64_t bytes = v & 0x0101010101010101ULL;
    memcpy(w, &bytes, 8);
}

/* out (dtype odt) = clamp(x, -b, b); bits = the window lo < x < hi. A piece starts at a multiple of XE_LANES, so
   every chunk starts on a byte of bits and no two threads write one byte. */
XE_INLINE void xe_clip_bits_range(const xe_job *j, int64_t lo, int64_t hi, const int dt, const int odt)
{
    const float b = j->b, wlo = j->lo, whi = j->hi;
    uint8_t *bits = (uint8_t *)j->window;
    int8_t w[XE_BIT_CHUNK + 8];
    for (int64_t c = lo; c < hi; c += XE_BIT_CHUNK) {
        const int64_t e = hi - c < XE_BIT_CHUNK ? hi - c : XE_BIT_CHUNK;
        for (int64_t k = 0; k < e; k++) {
            const float u = xe_ld(j->x, dt, c + k);
            xe_st(j->out, odt, c + k, xe_clamp(u, b));
            w[k] = (int8_t)((u > wlo) & (u < whi));
        }
        memset(w + e, 0, 8);  /* the last byte of bits past the end */
        int64_t k = 0;
#if XE_BITS64
        for (; k + 64 <= e; k += 64) {
            const __m512i v = _mm512_loadu_si512((const void *)(w + k));
            const uint64_t m = (uint64_t)_mm512_test_epi8_mask(v, v);
            memcpy(bits + ((c + k) >> 3), &m, 8);
        }
#endif
        for (; k < e; k += 8) bits[(c + k) >> 3] = xe_gather8(w + k);
    }
}

/* out (dtype dt) = bit i of bits ? g (dtype gdt) : 0 */
XE_INLINE void xe_bits_grad_range(const xe_job *j, int64_t lo, int64_t hi, const int dt, const int gdt)
{
    const uint8_t *bits = (const uint8_t *)j->window;
    int8_t w[XE_BIT_CHUNK + 8];
    for (int64_t c = lo; c < hi; c += XE_BIT_CHUNK) {
        const int64_t e = hi - c < XE_BIT_CHUNK ? hi - c : XE_BIT_CHUNK;
        int64_t k = 0;
#if XE_BITS64
        for (; k + 64 <= e; k += 64) {
            uint64_t m;
            memcpy(&m, bits + ((c + k) >> 3), 8);
            _mm512_storeu_si512((void *)(w + k), _mm512_movm_epi8((__mmask64)m));
        }
#endif
        for (; k < e; k += 8) xe_spread8(bits[(c + k) >> 3], w + k);
        for (k = 0; k < e; k++) {
            const float gv = xe_ld(j->g, gdt, c + k);   /* loaded either way: the loop vectorizes */
            xe_st(j->out, dt, c + k, w[k] ? gv : 0.0f);
        }
    }
}

/* x (dtype dt) = clamp(x, -b, b) in place on mask entries (all without a mask, has_mask 0); a block is written
   only when one of its entries lies outside (a NaN does not: the clamp keeps it) */
XE_INLINE void xe_clip_range(const xe_job *j, int64_t lo, int64_t hi, const int dt, const int has_mask)
{
    const float b = j->b;
    void *x = j->out;
    for (int64_t i = lo; i < hi; i += XE_CLIP_BLOCK) {
        const int64_t end = hi - i < XE_CLIP_BLOCK ? hi : i + XE_CLIP_BLOCK;
        int outside = 0;
        for (int64_t k = i; k < end; k++) {
            const float u = xe_ld(x, dt, k);
            outside |= (u < -b) | (u > b);
        }
        if (!outside) continue;
        for (int64_t k = i; k < end; k++) {
            const float u = xe_ld(x, dt, k);
            if ((!has_mask || j->mask[k]) && ((u < -b) | (u > b))) xe_st(x, dt, k, u < -b ? -b : b);
        }
    }
}

/* fn(j, lo, hi, x's dtype, the other operand's) for a piece's dtype pair: bf16, float32 with bf16, or float32. */
#define XE_BY_PAIR(fn)                                  \
    do {                                                \
        if (bf) fn(j, lo, hi, XE_BF16, XE_BF16);        \
        else if (mixed) fn(j, lo, hi, XE_F32, XE_BF16); \
        else fn(j, lo, hi, XE_F32, XE_F32);             \
    } while (0)

static void xe_piece(xe_job *j, int p)
{
    const int64_t lo = xe_edge(j->n, p), hi = xe_edge(j->n, p + 1);
    const int reads_g = j->op == XE_WINDOW_GRAD || j->op == XE_WINDOW_APPLY || j->op == XE_BITS_GRAD;
    const int bf = j->dt == XE_BF16, mixed = j->dt == XE_F32 && (reads_g ? j->gdt : j->odt) == XE_BF16;
    double *sum = j->want_sum ? &j->sums[p] : NULL;
    switch (j->op) {
    case XE_SIGN:
        if (bf && sum) xe_sign_range(j->x, j->out, sum, lo, hi, XE_BF16, XE_BF16, 1, 1);
        else if (bf) xe_sign_range(j->x, j->out, sum, lo, hi, XE_BF16, XE_BF16, 1, 0);
        else if (mixed && sum) xe_sign_range(j->x, j->out, sum, lo, hi, XE_F32, XE_BF16, 1, 1);
        else if (mixed) xe_sign_range(j->x, j->out, sum, lo, hi, XE_F32, XE_BF16, 1, 0);
        else if (sum) xe_sign_range(j->x, j->out, sum, lo, hi, XE_F32, XE_F32, 1, 1);
        else xe_sign_range(j->x, j->out, sum, lo, hi, XE_F32, XE_F32, 1, 0);
        break;
    case XE_ABS_SUM:
        if (bf) xe_sign_range(j->x, NULL, sum, lo, hi, XE_BF16, XE_BF16, 0, 1);
        else xe_sign_range(j->x, NULL, sum, lo, hi, XE_F32, XE_F32, 0, 1);
        break;
    case XE_WINDOW_GRAD:
        if (bf && j->has_mult) xe_window_grad_range(j, lo, hi, XE_BF16, XE_BF16, 1);
        else if (bf) xe_window_grad_range(j, lo, hi, XE_BF16, XE_BF16, 0);
        else if (mixed && j->has_mult) xe_window_grad_range(j, lo, hi, XE_F32, XE_BF16, 1);
        else if (mixed) xe_window_grad_range(j, lo, hi, XE_F32, XE_BF16, 0);
        else if (j->has_mult) xe_window_grad_range(j, lo, hi, XE_F32, XE_F32, 1);
        else xe_window_grad_range(j, lo, hi, XE_F32, XE_F32, 0);
        break;
    case XE_SCALE_BIAS: {
        const int s = j->scale != NULL, b = j->bias != NULL;
        if (bf && s && b) xe_scale_bias_range(j, lo, hi, XE_BF16, 1, 1);
        else if (bf && s) xe_scale_bias_range(j, lo, hi, XE_BF16, 1, 0);
        else if (bf) xe_scale_bias_range(j, lo, hi, XE_BF16, 0, 1);
        else if (s && b) xe_scale_bias_range(j, lo, hi, XE_F32, 1, 1);
        else if (s) xe_scale_bias_range(j, lo, hi, XE_F32, 1, 0);
        else xe_scale_bias_range(j, lo, hi, XE_F32, 0, 1);
        break;
    }
    case XE_ROW_SIGN:
        XE_BY_PAIR(xe_row_sign_range);
        break;
    case XE_CLIP_BITS:
        XE_BY_PAIR(xe_clip_bits_range);
        break;
    case XE_BITS_GRAD:
        XE_BY_PAIR(xe_bits_grad_range);
        break;
    case XE_CLIP:
        if (bf && j->mask) xe_clip_range(j, lo, hi, XE_BF16, 1);
        else if (bf) xe_clip_range(j, lo, hi, XE_BF16, 0);
        else if (j->mask) xe_clip_range(j, lo, hi, XE_F32, 1);
        else xe_clip_range(j, lo, hi, XE_F32, 0);
        break;
    case XE_WINDOW_APPLY:
        XE_BY_PAIR(xe_window_apply_range);
        break;
    default: {
        /* the dtype pair (f32 / bf16 / f32 -> bf16) x window x mask, each its own loop */
        const int w = j->window != NULL, m = j->mask != NULL;
        switch ((bf ? 1 : mixed ? 2 : 0) * 4 + w * 2 + m) {
        case 0: xe_masked_range(j, lo, hi, XE_F32, XE_F32, 0, 0); break;
        case 1: xe_masked_range(j, lo, hi, XE_F32, XE_F32, 0, 1); break;
        case 2: xe_masked_range(j, lo, hi, XE_F32, XE_F32, 1, 0); break;
        case 3: xe_masked_range(j, lo, hi, XE_F32, XE_F32, 1, 1); break;
        case 4: xe_masked_range(j, lo, hi, XE_BF16, XE_BF16, 0, 0); break;
        case 5: xe_masked_range(j, lo, hi, XE_BF16, XE_BF16, 0, 1); break;
        case 6: xe_masked_range(j, lo, hi, XE_BF16, XE_BF16, 1, 0); break;
        case 7: xe_masked_range(j, lo, hi, XE_BF16, XE_BF16, 1, 1); break;
        case 8: xe_masked_range(j, lo, hi, XE_F32, XE_BF16, 0, 0); break;
        case 9: xe_masked_range(j, lo, hi, XE_F32, XE_BF16, 0, 1); break;
        case 10: xe_masked_range(j, lo, hi, XE_F32, XE_BF16, 1, 0); break;
        default: xe_masked_range(j, lo, hi, XE_F32, XE_BF16, 1, 1);
        }
    }
    }
}
#undef XE_BY_PAIR

static void xe_run_share(xn_task *task, int tid)
{
    xe_job *j = (xe_job *)task;
    int64_t p0, p1;
    xn_share(XE_PARTS, 1, tid, task->nthreads, &p0, &p1);
    for (int64_t p = p0; p < p1; p++) xe_piece(j, (int)p);
}

/* Run the job on up to nthreads threads; returns the sum of |x| when the job computes one (else 0). */
static double xe_run(xe_job *j, int nthreads)
{
    j->task.run = xe_run_share;
    j->task.arrived = 0;
    j->task.status = 0;
    j->task.nthreads = xn_threads(nthreads, j->n, XE_MIN_WORK, XE_PARTS);
    xn_run(&j->task);
    double total = 0.0;
    if (j->want_sum)
        for (int p = 0; p < XE_PARTS; p++) total += j->sums[p];
    return total;
}

static int xe_bad(int64_t n, int dt) { return n < 0 || (dt != XE_F32 && dt != XE_BF16); }

/* A second dtype of a pass: dt itself, or bfloat16 for a float32 dt. */
static int xe_bad_pair(int dt, int other) { return other != dt && !(dt == XE_F32 && other == XE_BF16); }

/* out = sign(x) in dtype odt (out may be NULL: the sum alone); *sum = sum |x| when sum is not NULL. */
int xnor_ew_sign(const void *x, void *out, int64_t n, int dt, int odt, double *sum, int nthreads)
{
    if (xe_bad(n, dt) || xe_bad_pair(dt, odt) || (!out && !sum)) return XN_BAD_ARGS;
    xe_job j = {.op = out ? XE_SIGN : XE_ABS_SUM, .dt = dt, .odt = odt, .x = x, .out = out, .n = n,
                .want_sum = sum != NULL};
    const double total = xe_run(&j, nthreads);
    if (sum) *sum = total;
    return XN_OK;
}

/* out = (lo < x && x < hi) ? g : 0, then times mult when has_mult (one rounding in the dtype); x and out in dtype
   dt, g in gdt (out may be g itself when gdt is dt). */
int xnor_ew_window_grad(const void *g, const void *x, void *out, int64_t n, int dt, int gdt, float lo, float hi,
                        int has_mult, float mult, int nthreads)
{
    if (xe_bad(n, dt) || xe_bad_pair(dt, gdt)) return XN_BAD_ARGS;
    xe_job j = {.op = XE_WINDOW_GRAD, .dt = dt, .gdt = gdt, .x = x, .g = g, .out = out, .n = n,
                .lo = lo, .hi = hi, .has_mult = has_mult != 0, .mult = mult};
    xe_run(&j, nthreads);
    return XN_OK;
}

/* out (dtype odt) = mask[i % period] ? (x >= 0 ? a : -a) : clamp(x, -b, b), clamp(x, -b, b) alone without a mask;
   window (may be NULL) = lo < x && x < hi. */
int xnor_ew_masked(const void *x, const uint8_t *mask, int64_t period, void *out, int8_t *window, int64_t n, int dt,
                   int odt, float a, float b, float lo, float hi, int nthreads)
{
    if (xe_bad(n, dt) || xe_bad_pair(dt, odt) || period < 1 || n % period) return XN_BAD_ARGS;
    xe_job j = {.op = XE_MASKED, .dt = dt, .odt = odt, .x = x, .mask = mask, .period = period, .out = out,
                .window = window, .n = n, .a = a, .b = b, .lo = lo, .hi = hi};
    xe_run(&j, nthreads);
    return XN_OK;
}

/* out (dtype dt) = g (dtype gdt) * window (out may be g itself when gdt is dt). */
int xnor_ew_window_apply(const void *g, const int8_t *window, void *out, int64_t n, int dt, int gdt, int nthreads)
{
    if (xe_bad(n, dt) || xe_bad_pair(dt, gdt)) return XN_BAD_ARGS;
    xe_job j = {.op = XE_WINDOW_APPLY, .dt = dt, .gdt = gdt, .g = g, .window = (int8_t *)window, .out = out, .n = n};
    xe_run(&j, nthreads);
    return XN_OK;
}

/* y (rows x cols, row-major, dtype dt) = y * scale + bias in place, two roundings; scale has scale_len entries
   (cols, or 1 for one scale of all), bias cols; either may be NULL, not both. */
int xnor_ew_scale_bias(void *y, int64_t rows, int64_t cols, int dt, const void *scale, int64_t scale_len,
                       const void *bias, int nthreads)
{
    if (xe_bad(rows, dt) || cols < 1 || (!scale && !bias) || (scale && scale_len != 1 && scale_len != cols))
        return XN_BAD_ARGS;
    xe_job j = {.op = XE_SCALE_BIAS, .dt = dt, .out = y, .n = rows * cols, .period = cols, .scale = scale,
                .scale_len = scale_len, .bias = bias};
    xe_run(&j, nthreads);
    return XN_OK;
}

/* out (rows x cols, row-major, dtype odt) = x (dtype dt) >= 0 ? scale[row] : -scale[row], scale float32 per row. */
int xnor_ew_row_sign(const void *x, const float *scale, int64_t rows, int64_t cols, int dt, int odt, void *out,
                     int nthreads)
{
    if (xe_bad(rows, dt) || xe_bad_pair(dt, odt) || cols < 1 || !scale) return XN_BAD_ARGS;
    xe_job j = {.op = XE_ROW_SIGN, .dt = dt, .odt = odt, .x = x, .scale = scale, .out = out, .n = rows * cols,
                .period = cols};
    xe_run(&j, nthreads);
    return XN_OK;
}

/* x (n entries, dtype dt) = clamp(x, -b, b) in place where mask (n bools; NULL: everywhere), b >= 0. */
int xnor_ew_clip_inplace(void *x, const uint8_t *mask, int64_t n, int dt, float b, int nthreads)
{
    if (xe_bad(n, dt) || !(b >= 0.0f)) return XN_BAD_ARGS;
    xe_job j = {.op = XE_CLIP, .dt = dt, .out = x, .mask = mask, .n = n, .b = b};
    xe_run(&j, nthreads);
    return XN_OK;
}

/* out (dtype odt) = clamp(x, -b, b); bits (ceil(n / 8) bytes) = the window lo < x < hi, one bit per entry. */
int xnor_ew_clip_bits(const void *x, void *out, uint8_t *bits, int64_t n, int dt, int odt, float b, float lo,
                      float hi, int nthreads)
{
    if (xe_bad(n, dt) || xe_bad_pair(dt, odt) || !bits) return XN_BAD_ARGS;
    xe_job j = {.op = XE_CLIP_BITS, .dt = dt, .odt = odt, .x = x, .out = out, .window = (int8_t *)bits, .n = n,
                .b = b, .lo = lo, .hi = hi};
    xe_run(&j, nthreads);
    return XN_OK;
}

/* out (dtype dt) = bit i of bits ? g (dtype gdt) : 0 (out may be g itself when gdt is dt). */
int xnor_ew_bits_grad(const void *g, const uint8_t *bits, void *out, int64_t n, int dt, int gdt, int nthreads)
{
    if (xe_bad(n, dt) || xe_bad_pair(dt, gdt) || !bits) return XN_BAD_ARGS;
    xe_job j = {.op = XE_BITS_GRAD, .dt = dt, .gdt = gdt, .g = g, .window = (int8_t *)bits, .out = out, .n = n};
    xe_run(&j, nthreads);
    return XN_OK;
}
