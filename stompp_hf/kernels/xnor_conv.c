/* Binary convolution: xnor_conv2d_f32 computes, bit for bit, what the dense torch path of a packed conv computes,

       y = F.conv2d(sign(x), sign(W), None, stride, padding, dilation, groups) * out_scale + bias

   with zero padding (the padded entries count 0, not -1 or +1). Part of xnor.c's translation unit, not compiled
   alone.

   Layout. The signs of x are packed into a zero-bordered bit image, one 32-bit word per pixel per 32 input channels
   of a group, channel-word planes [B][groups * cw][H + 2 * ph][W + 2 * pw] (cw = ceil(Cg / 32)). Each output pixel
   is then an implicit im2col row: its word for step u = (tap, channel word) sits at a fixed offset `off[u]` from the
   pixel's corner, for every pixel, border pixels included. The weights are the linear kernel's panels (16 output
   channels of a group, step u holding the tap's channel words; xn_fill_panels), so the same register tile runs
   both: 8 output pixels x 2 panels on the avx512 path, a plain loop on the scalar path.

   Padding. The border words are 0, i.e. the padded entries read as -1, and every dot product runs over all
   kh * kw taps: the inner loop has no bounds tests, and border pixels cost what interior ones cost (at 7x7 maps half
   the pixels touch the border, at 1x1 all of them). A padded tap then contributes -S[o][tap] instead of 0, where
   S[o][tap] = sum over its input channels of sign(w) (built with the panels), so the epilogue adds back
       corr = sum over the pixel's padded taps of S[o][tap].
   Which taps are padded depends only on the output row's class (which kernel rows fall outside the input) and the
   output column's class; the classes are few (about 2 * ceil(padding / stride) + 1 each), and one table of
   corr[row class][column class][O] int32 is built per call: one vector load and add per 16 outputs. Channel words
   past Cg are 0 in both operands, so they never count; the count is K = Cg * kh * kw.

   Inputs in NCHW order pack 16 pixels of a row per vector (one compare and one masked OR per channel); channels-last
   inputs pack 32 channels of a pixel per word. Outputs go out in the input's memory format: channels-last directly,
   NCHW through an 8 x 16 transpose in registers. With `strict` the input must already be +-1 (the output of a
   binary activation), else XN_NOT_PM1.

   Threads. Where the batch shares out evenly enough (B >= threads, and B a multiple of them or at least four per
   thread), the avx512 path gives each thread whole images: it packs one into its own bit image (a few KiB to a
   few hundred, in L1 or L2), computes all of its outputs, and prefetches the next image's input meanwhile (no
   barrier; the input's trip from memory overlaps the popcounts; the pixel table is one image's). Otherwise the
   threads pack shares of the whole batch, meet at the barrier, and split (group, panel pair, tile) units. */

#define XN_CONV_GEOM 18   /* B, C, H, W, stride of B, C, H, W (elements), O, kh, kw, sh, sw, ph, pw, dh, dw, groups */
#define XN_CONV_TILE 8    /* output pixels per tile (XZ_MR on the avx512 path) */
#define XN_CONV_NG 2      /* panels per tile (XZ_NG on the avx512 path) */
#define XV_PAIRS 1        /* xn_conv_job.avx2: the avx2 nibble-pair path (xv_) */
#define XV_TABLE 2        /* xn_conv_job.avx2: the avx2 table path (xw_) */

typedef struct {
    xn_task task;
    const float *x;
    int64_t B, C, H, W, sB, sC, sH, sW;
    int64_t O, kh, kw, sh, sw, ph, pw, dh, dw, G;
    int64_t Cg, Og, cw, Gcw, Hp, Wp, PS, IS;  /* words per group's channels, planes, padded size, plane / image size */
    int64_t Ho, Wo, HWo, P, K;                /* output size, pixels per image, all pixels, inputs per output */
    int64_t P16, NQ, PT, T, units;            /* panels per group, panel pairs (avx2 table path: quads of 64
                                                 channels), pixel tiles, steps, work units */
    const uint32_t *wp;
    const float *scale, *bias;
    float *y;
    int nchw_out, strict, simd, bf16;         /* bf16: x and y are bfloat16 (avx512 path, channels-last only) */
    int avx2;                                 /* the avx2 path: XV_PAIRS or XV_TABLE (simd: the avx512 one) */
    uint32_t *wn;                             /* avx2: the panels as nibble pairs, [G * P16][T][lo 16, hi 16]; table
                                                 path: bytes [G * NQ][T][8 nibbles][64 channels] */
    int exact;                                /* xz_exact_ints: the integers need no bf16 rounding */
    int stream;                               /* channels-last y by streaming stores (xz_store_row, xw_finish64) */
    int by_image;                             /* each thread packs and computes whole images (xz_conv_images) */
    uint32_t *xb;                             /* the packed bit images: [B][IS], or by_image one per thread */
    int32_t *off;                             /* [T] */
    int32_t *corr;                            /* [row classes][column classes][O], or NULL without padding */
    float *kcorr;                             /* avx512: K + corr as floats (the same layout), or NULL */
    int32_t *rcls, *ccls;                     /* class of each output row / column */
    int64_t ncc;                              /* column classes */
    struct xn_conv_pix *pix;                  /* [P] (by_image: [HWo], image 0's): output pixels' coordinates */
} xn_conv_job;

/* An output pixel: its corner in the packed image (group 0's planes), image, offset in the image's output plane,
   and row of the padding correction table. Filled once per call (the batch's, in parallel with the packing; by
   image, image 0's before the threads start), so the tiles of every panel pair read them instead of dividing
   (three 64-bit divisions per tile and panel pair cost about half the time of a 64-channel layer). */
typedef struct xn_conv_pix {
    int64_t xoff, b, r, cls;
} xn_conv_pix;

/* Coordinates of output pixels [p0, p1): one division, then they advance. */
static void xn_conv_fill_pixels(const xn_conv_job *j, int64_t p0, int64_t p1)
{
    if (p0 >= p1) return;
    int64_t bi = p0 / j->HWo, ri = p0 % j->HWo, ho = ri / j->Wo, wo = ri % j->Wo;
    for (int64_t p = p0; p < p1; p++) {
        xn_conv_pix *q = j->pix + p;
        q->xoff = bi * j->IS + ho * j->sh * j->Wp + wo * j->sw;
        q->b = bi;
        q->r = ri;
        q->cls = j->corr ? (j->rcls[ho] * j->ncc + j->ccls[wo]) * j->O : 0;
        ri++;
        if (++wo == j->Wo) {
            wo = 0;
            if (++ho == j->Ho) ho = 0, ri = 0, bi++;
        }
    }
}

/* Pack input rows: padded rows [r0, r1) of the flattened [B][Hp] (each with every channel-word plane), portable C
   for any strides. Border rows and columns are zeroed. Returns XN_NAN / XN_NOT_PM1 / 0. */
static int xn_conv_pack_scalar(const xn_conv_job *j, int64_t r0, int64_t r1)
{
    unsigned nan = 0;
    int pm1 = 1;
    for (int64_t r = r0; r < r1; r++) {
        const int64_t b = r / j->Hp, hp = r % j->Hp, h = hp - j->ph;
        for (int64_t k = 0; k < j->Gcw; k++) {
            uint32_t *row = j->xb + b * j->IS + k * j->PS + hp * j->Wp;
            memset(row, 0, (size_t)j->Wp * sizeof(uint32_t));
            if (h < 0 || h >= j->H) continue;
            const int64_t g = k / j->cw, c0 = g * j->Cg + 32 * (k % j->cw);
            const int64_t cnt = j->Cg - 32 * (k % j->cw) < 32 ? j->Cg - 32 * (k % j->cw) : 32;
            for (int64_t w = 0; w < j->W; w++) {
                const float *p = j->x + b * j->sB + c0 * j->sC + h * j->sH + w * j->sW;
                uint32_t word = 0;
                for (int64_t c = 0; c < cnt; c++) {
                    const float v = p[c * j->sC];
                    word |= (uint32_t)(v >= 0.0f) << c;
                    nan |= v != v;
                    pm1 &= (v == 1.0f) | (v == -1.0f);
                }
                row[j->pw + w] = word;
            }
        }
    }
    if (j->strict) return pm1 ? 0 : XN_NOT_PM1;
    return nan ? XN_NAN : 0;
}

/* The pixels of tile `tile` of a run of `npix` pixels in j->pix (the batch's, or by_image one image's): their
   corners in the bit image whose group-g planes start at `base` (tap (0, 0), channel word 0), image (the table's,
   plus `image`), offset in the image's output plane, and row of the padding correction table; returns how many are
   real (the rest repeat the first). */
static inline int xn_conv_pixels(const xn_conv_job *j, const uint32_t *base, int64_t tile, int64_t npix,
                                 int64_t image, const uint32_t *xr[XN_CONV_TILE], int64_t b[XN_CONV_TILE],
                                 int64_t r[XN_CONV_TILE], int64_t cls[XN_CONV_TILE])
{
    const int64_t p0 = tile * XN_CONV_TILE;
    const int np = npix - p0 < XN_CONV_TILE ? (int)(npix - p0) : XN_CONV_TILE;
    for (int i = 0; i < XN_CONV_TILE; i++) {
        const xn_conv_pix *q = j->pix + p0 + (i < np ? i : 0);
        xr[i] = base + q->xoff;
        b[i] = q->b + image;
        r[i] = q->r;
        cls[i] = q->cls;
    }
    return np;
}

/* The scalar epilogue: the outputs of channels [n0, n0 + nl) of group g at a pixel (image b, offset r in the
   image's plane, global index p, row `cls` of the padding correction table) from their counts. */
static void xn_conv_store_scalar(const xn_conv_job *j, int64_t p, int64_t b, int64_t r, int64_t cls, int64_t g,
                                 int64_t n0, int nl, const int64_t *cnt)
{
    for (int q = 0; q < nl; q++) {
        const int64_t oc = g * j->Og + n0 + q;
        float d = (float)(j->K - 2 * cnt[q] + (j->corr ? j->corr[cls + oc] : 0));
        if (j->scale) d = d * j->scale[oc];
        if (j->bias) d = d + j->bias[oc];
        if (j->nchw_out) j->y[(b * j->O + oc) * j->HWo + r] = d;
        else j->y[p * j->O + oc] = d;
    }
}

/* Scalar path: work unit u = (group, panel pair, pixel tile). */
static void xn_conv_unit_scalar(const xn_conv_job *j, int64_t u)
{
    const int64_t tile = u % j->PT, gq = u / j->PT, q = gq % j->NQ, g = gq / j->NQ;
    const uint32_t *xr[XN_CONV_TILE];
    int64_t r[XN_CONV_TILE], b[XN_CONV_TILE], cls[XN_CONV_TILE];
    const int np = xn_conv_pixels(j, j->xb + g * j->cw * j->PS, tile, j->P, 0, xr, b, r, cls);
    for (int i = 0; i < np; i++) {
        for (int64_t panel = q * XN_CONV_NG; panel < (q + 1) * XN_CONV_NG && panel < j->P16; panel++) {
            const uint32_t *wr = j->wp + (g * j->P16 + panel) * j->T * 16;
            int64_t cnt[16] = {0};
            for (int64_t s = 0; s < j->T; s++) {
                const uint32_t xv = xr[i][j->off[s]];
                for (int lane = 0; lane < 16; lane++) cnt[lane] += __builtin_popcount(xv ^ wr[16 * s + lane]);
            }
            const int64_t n0 = 16 * panel;
            xn_conv_store_scalar(j, tile * XN_CONV_TILE + i, b[i], r[i], cls[i], g, n0,
                                 j->Og - n0 < 16 ? (int)(j->Og - n0) : 16, cnt);
        }
    }
}

#if XN_X86_SIMD
/* avx512 packing of padded row hp of image b into the bit image at `img` (see xn_conv_pack_scalar): 16 pixels of
   a row per vector when the width is contiguous (NCHW), 32 channels of a pixel per word when the channels are
   (channels-last). Returns the lanes found bad (NaN, or with strict not +-1). */
XZ_INLINE __mmask16 xz_conv_pack_row(const xn_conv_job *j, int64_t b, int64_t hp, uint32_t *img)
{
    const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
    __mmask16 bad = 0;
    const int64_t h = hp - j->ph;
    uint32_t *rows = img + hp * j->Wp;   /* this row of plane 0; plane k at + k * PS */
    for (int64_t k = 0; k < j->Gcw; k++) memset(rows + k * j->PS, 0, (size_t)j->Wp * sizeof(uint32_t));
    if (h < 0 || h >= j->H) return 0;
    const int64_t xrow = b * j->sB + h * j->sH;   /* element index: x is float32, or bfloat16 with bf16 */
    for (int64_t k = 0; k < j->Gcw; k++) {
        const int64_t kk = k % j->cw, c0 = (k / j->cw) * j->Cg + 32 * kk;
        const int64_t cnt = j->Cg - 32 * kk < 32 ? j->Cg - 32 * kk : 32;
        uint32_t *out = rows + k * j->PS + j->pw;
        if (j->sC == 1 && j->bf16) {
            __mmask32 bad32 = 0;
            const uint16_t *px = (const uint16_t *)j->x + xrow + c0;
            if (cnt == 32 && !j->strict) {
                __m512i mag = _mm512_setzero_si512();
                for (int64_t w = 0; w < j->W; w++) out[w] = xz_sign_word_bf16_full(px + w * j->sW, &mag);
                bad32 = xz_nan_lanes(mag);
            } else {
                for (int64_t w = 0; w < j->W; w++) out[w] = xz_sign_word_bf16(px + w * j->sW, cnt, j->strict, &bad32);
            }
            bad |= (__mmask16)(bad32 | bad32 >> 16);
            continue;
        }
        if (j->sC == 1) {
            const __mmask16 la = xz_lanes(cnt), lb = cnt > 16 ? xz_lanes(cnt - 16) : 0;
            for (int64_t w = 0; w < j->W; w++) {
                const int64_t p = xrow + w * j->sW + c0;
                const __m512 a = xz_load(j->x, p, la, 0), v = xz_load(j->x, p + 16, lb, 0);   /* float32 */
                out[w] = (uint32_t)_mm512_mask_cmp_ps_mask(la, a, zero, _CMP_GE_OQ) |
                         (uint32_t)_mm512_mask_cmp_ps_mask(lb, v, zero, _CMP_GE_OQ) << 16;
                if (j->strict)
                    bad |= _mm512_mask_cmp_ps_mask(la, _mm512_abs_ps(a), one, _CMP_NEQ_UQ) |
                           _mm512_mask_cmp_ps_mask(lb, _mm512_abs_ps(v), one, _CMP_NEQ_UQ);
                else
                    bad |= _mm512_mask_cmp_ps_mask(la, a, a, _CMP_UNORD_Q) |
                           _mm512_mask_cmp_ps_mask(lb, v, v, _CMP_UNORD_Q);
            }
            continue;
        }
        for (int64_t c = 0; c < cnt; c++) {   /* width contiguous: OR channel c's bit into 16 pixels at a time */
            const float *p = j->x + xrow + (c0 + c) * j->sC;   /* float32 only (bf16 comes channels-last) */
            const __m512i bit = _mm512_set1_epi32((int)(1u << c));
            for (int64_t w = 0; w < j->W; w += 16) {
                const __mmask16 lanes = xz_lanes(j->W - w);
                const __m512 v = _mm512_maskz_loadu_ps(lanes, p + w);
                const __mmask16 ge = _mm512_mask_cmp_ps_mask(lanes, v, zero, _CMP_GE_OQ);
                const __m512i acc = _mm512_maskz_loadu_epi32(lanes, out + w);
                _mm512_mask_storeu_epi32(out + w, lanes, _mm512_mask_or_epi32(acc, ge, acc, bit));
                if (j->strict) bad |= _mm512_mask_cmp_ps_mask(lanes, _mm512_abs_ps(v), one, _CMP_NEQ_UQ);
                else bad |= _mm512_mask_cmp_ps_mask(lanes, v, v, _CMP_UNORD_Q);
            }
        }
    }
    return bad;
}

/* Padded rows [r0, r1) of the flattened [B][Hp] into j->xb; XN_NAN / XN_NOT_PM1 / 0. */
XN_AVX512_FN static int xz_conv_pack(const xn_conv_job *j, int64_t r0, int64_t r1)
{
    __mmask16 bad = 0;
    for (int64_t r = r0; r < r1; r++) bad |= xz_conv_pack_row(j, r / j->Hp, r % j->Hp, j->xb + r / j->Hp * j->IS);
    return bad ? (j->strict ? XN_NOT_PM1 : XN_NAN) : 0;
}

#if XN_HAVE_BF16
/* The channels-last bf16 outputs of np pixels x two panels from panel0 on, in XZ_BF16_NATIVE with a scale:
   xz_pair_bf16 in pair mode `mode` (xz_pair_mode). */
XZ_INLINE void xz_conv_pair_rows(const xn_conv_job *j, int64_t g, int64_t panel0, __m512i acc[XZ_MR][XZ_NG],
                                 const int64_t cls[XZ_MR], int np, int64_t pg0, const int mode)
{
    const int64_t oc = g * j->Og + 16 * panel0;
    const __m512 kf = _mm512_set1_ps((float)j->K), two = _mm512_set1_ps(2.0f);
    __mmask16 lanes[XZ_NG];
    xz_pair_epilogue e;
    xz_pair_load(j->scale + oc, j->bias ? j->bias + oc : NULL, j->Og - 16 * panel0, mode, lanes, &e);
    for (int i = 0; i < np; i++) {
        __m512 d[XZ_NG];
        for (int h = 0; h < XZ_NG; h++) {   /* the integer, as in xz_conv_tile */
            const __m512 kc = j->kcorr ? _mm512_maskz_loadu_ps(lanes[h], j->kcorr + cls[i] + oc + 16 * h) : kf;
            d[h] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(acc[i][h]), two, kc);
        }
        xz_store_pair(j->y, (pg0 + i) * j->O + oc, xz_pair_bf16(d[0], d[1], mode, &e), lanes, j->stream);
    }
}
#endif

/* avx512 path: the tile of np <= 8 output pixels (xr: their corners in group g's planes; b, r, cls as
   xn_conv_pixels gives them; consecutive global indices from pg0) x ng panels of panel pair q. `bf16`: j->bf16, a
   constant where the caller knows it (xz_conv_images). */
XZ_INLINE void xz_conv_tile(const xn_conv_job *j, const int bf16, int64_t g, int64_t q, const int ng,
                            const uint32_t *const xr[XZ_MR], const int64_t b[XZ_MR], const int64_t r[XZ_MR],
                            const int64_t cls[XZ_MR], int np, int64_t pg0)
{
    const int64_t panel0 = q * XZ_NG;
    __m512i acc[XZ_MR][XZ_NG];
    xz_dot8(xr, j->off, j->T, j->wp + (g * j->P16 + panel0) * j->T * 16, j->T * 16, ng == XZ_NG, acc);
    /* K - 2 * count + corr as one multiply-add of floats, the same integer (every operand and the result are
       integers below 2**24, so the one rounding is exact; a zero is +0.0 as the conversion of an integer 0) */
    const __m512 kf = _mm512_set1_ps((float)j->K), two = _mm512_set1_ps(2.0f);
#if XN_HAVE_BF16
    if (bf16 == XZ_BF16_NATIVE && ng == XZ_NG && !j->nchw_out) {   /* both panels' roundings at once */
        switch (xz_pair_mode(j->scale != NULL, j->bias != NULL, j->exact)) {
        case XZ_PAIR_RSRB: xz_conv_pair_rows(j, g, panel0, acc, cls, np, pg0, XZ_PAIR_RSRB); return;
        case XZ_PAIR_RS: xz_conv_pair_rows(j, g, panel0, acc, cls, np, pg0, XZ_PAIR_RS); return;
        case XZ_PAIR_SRB: xz_conv_pair_rows(j, g, panel0, acc, cls, np, pg0, XZ_PAIR_SRB); return;
        default: break;
        }
    }
#endif
    /* NCHW stores 8 consecutive pixels of one image as 8 consecutive floats of each channel plane */
    const int planes = j->nchw_out && np == XZ_MR && b[0] == b[XZ_MR - 1];
    __m512 f[XZ_MR][XZ_NG];
    __mmask16 lanes[XZ_NG];
    for (int h = 0; h < ng; h++) {
        const int64_t n = 16 * (panel0 + h), oc = g * j->Og + n;
        const int nl = j->Og - n < 16 ? (int)(j->Og - n) : 16;
        lanes[h] = xz_lanes(nl);
        const __m512 sv = j->scale ? _mm512_maskz_loadu_ps(lanes[h], j->scale + oc) : _mm512_setzero_ps();
        const __m512 bv = j->bias ? _mm512_maskz_loadu_ps(lanes[h], j->bias + oc) : _mm512_setzero_ps();
        __m512 fh[XZ_MR];
        for (int i = 0; i < XZ_MR; i++) {
            const __m512 kc = j->kcorr ? _mm512_maskz_loadu_ps(lanes[h], j->kcorr + cls[i] + oc) : kf;
            const __m512 d = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(acc[i][h]), two, kc);
            f[i][h] = fh[i] = xz_finish_sum(d, j->scale ? &sv : NULL, j->bias ? &bv : NULL, bf16, j->exact);
        }
        if (planes) {
            xz_store_planes(fh, j->y + (b[0] * j->O + oc) * j->HWo + r[0], j->HWo, nl);
        } else if (j->nchw_out) {
            for (int i = 0; i < np; i++) {
                float v[16];
                _mm512_storeu_ps(v, fh[i]);
                for (int c = 0; c < nl; c++) j->y[(b[i] * j->O + oc + c) * j->HWo + r[i]] = v[c];
            }
        }
    }
    if (!j->nchw_out)   /* channels-last: pixel i's channels from oc on are consecutive */
        for (int i = 0; i < np; i++)
            xz_store_row(j->y, (pg0 + i) * j->O + g * j->Og + 16 * panel0, f[i], lanes, ng, bf16, j->stream);
}

/* Work units [u0, u1) of the shared packed images: unit u = (group, panel pair, pixel tile of all P pixels). */
XN_AVX512_FN static void xz_conv_units(const xn_conv_job *j, int64_t u0, int64_t u1)
{
    const uint32_t *xr[XZ_MR];
    int64_t r[XZ_MR], b[XZ_MR], cls[XZ_MR];
    for (int64_t u = u0; u < u1; u++) {
        const int64_t tile = u % j->PT, gq = u / j->PT, q = gq % j->NQ, g = gq / j->NQ;
        const int np = xn_conv_pixels(j, j->xb + g * j->cw * j->PS, tile, j->P, 0, xr, b, r, cls);
        if (j->P16 - q * XZ_NG >= XZ_NG) xz_conv_tile(j, j->bf16, g, q, XZ_NG, xr, b, r, cls, np, tile * XZ_MR);
        else xz_conv_tile(j, j->bf16, g, q, 1, xr, b, r, cls, np, tile * XZ_MR);
    }
}

/* by_image: thread tid packs each of its images into its own bit image and computes all of that image's outputs
   there (every group, panel pair and tile of 8 of its pixels), prefetching the next image's input into L2 while
   it computes: no barrier, no shared packed batch, and the input's trip from memory overlaps the popcounts.
   `bf16`: j->bf16 (xz_conv_images passes the common ones as constants). */
XZ_INLINE void xz_conv_images_as(xn_conv_job *j, int tid, const int bf16)
{
    int64_t b0, b1;
    xn_share(j->B, 1, tid, j->task.nthreads, &b0, &b1);
    uint32_t *img = j->xb + tid * j->IS;
    const int64_t tiles = (j->HWo + XZ_MR - 1) / XZ_MR, units = j->G * j->NQ * tiles;
    const int64_t esize = j->bf16 ? 2 : 4;
    const int64_t span = ((j->C - 1) * j->sC + (j->H - 1) * j->sH + (j->W - 1) * j->sW + 1) * esize;
    const int dense = span <= 2 * j->C * j->H * j->W * esize;
    const uint32_t *xr[XZ_MR];
    int64_t r[XZ_MR], bb[XZ_MR], cls[XZ_MR];
    for (int64_t b = b0; b < b1; b++) {
        __mmask16 bad = 0;
        for (int64_t hp = 0; hp < j->Hp; hp++) bad |= xz_conv_pack_row(j, b, hp, img);
        if (bad) xn_fail(&j->task, j->strict ? XN_NOT_PM1 : XN_NAN);
        if (xn_failed(&j->task)) break;
        const char *pf = NULL, *pf_end = NULL;
        int64_t pf_step = 0;
        if (dense && b + 1 < b1) {
            pf = (const char *)j->x + (b + 1) * j->sB * esize;
            pf_end = pf + span;
            pf_step = (span / 64 + units) / units;
        }
        for (int64_t g = 0; g < j->G; g++) {
            const uint32_t *base = img + g * j->cw * j->PS;
            for (int64_t q = 0; q < j->NQ; q++) {
                const int ng = j->P16 - q * XZ_NG >= XZ_NG ? XZ_NG : 1;
                for (int64_t t = 0; t < tiles; t++) {
                    const int np = xn_conv_pixels(j, base, t, j->HWo, b, xr, bb, r, cls);
                    const int64_t pg0 = b * j->HWo + t * XZ_MR;
                    if (ng == XZ_NG) xz_conv_tile(j, bf16, g, q, XZ_NG, xr, bb, r, cls, np, pg0);
                    else xz_conv_tile(j, bf16, g, q, 1, xr, bb, r, cls, np, pg0);
                    if (pf) xz_prefetch(&pf, pf_end, pf_step);
                }
            }
        }
    }
    if (j->stream) _mm_sfence();
}

/* xz_conv_images_as compiled for float32 outputs and for XZ_BF16_NATIVE's (the epilogue then branches on no
   mode), and for the other bf16 modes read from the job. */
XN_AVX512_FN static void xz_conv_images(xn_conv_job *j, int tid)
{
    if (j->bf16 == 0) xz_conv_images_as(j, tid, 0);
    else if (j->bf16 == XZ_BF16_NATIVE) xz_conv_images_as(j, tid, XZ_BF16_NATIVE);
    else xz_conv_images_as(j, tid, j->bf16);
}
#endif

#if XN_X86_SIMD
/* ------------------------------------------------------------------------------------------------------------
   avx2 path (CPUs with AVX2 but not AVX-512 VPOPCNTDQ). The bit image holds each word as a nibble pair: word w at
   2w (its low nibbles, bits & 0x0F0F0F0F) and 2w + 1 (its high nibbles, shifted down by 4), split once when the
   input is packed instead of once per (tap, panel, pixel tile) that reads it; the weights' panels are split the
   same way per call (xv_split_panels). A tile is 8 output pixels x 8 channels (half a panel, one 8-lane vector):
   per step, each pixel's pair is broadcast, and popcount(x ^ w) per byte is the sum of two 16-entry table lookups
   (vpshufb), added up in bytes (at most 8 per step) for up to 31 steps, then widened to 32-bit counts (vpmaddubsw,
   vpmaddwd). */

#define XV_MR 8   /* output pixels per avx2 tile (a work unit's) */
#define XV_RUN 31 /* steps a byte accumulator takes: 31 x 8 = 248 < 256 */

/* A word's 8 nibbles, one byte each, in order, times 4 (xt_nibbles, xnor.c, of the word; its low 8 bytes). */
XN_AVX2_FN static inline __m128i xw_bytes(uint32_t v) { return _mm_slli_epi16(xt_nibbles(v), 2); }

/* Whether v is bad: a NaN, or with strict a value other than +-1 (one value, and 8 lanes of a vector). */
static inline int xv_bad(float v, int strict) { return strict ? (v != 1.0f) & (v != -1.0f) : v != v; }

XN_AVX2_FN static inline __m256 xv_bad_lanes(__m256 v, int strict)
{
    const __m256 mag = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    return strict ? _mm256_cmp_ps(_mm256_and_ps(v, mag), _mm256_set1_ps(1.0f), _CMP_NEQ_UQ)
                  : _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
}

/* The sign word of 32 (or `cnt`) channels of a pixel whose channels are `sc` floats apart: 8 per comparison where
   they are contiguous and all 32 there. Adds the lanes found bad (xv_bad) to *bad. */
XN_AVX2_FN static inline uint32_t xv_sign_word(const float *p, int64_t sc, int64_t cnt, int strict, int *bad)
{
    uint32_t word = 0;
    if (cnt < 32 || sc != 1) {
        for (int64_t c = 0; c < cnt; c++) {
            word |= (uint32_t)(p[c * sc] >= 0.0f) << c;
            *bad |= xv_bad(p[c * sc], strict);
        }
        return word;
    }
    __m256 b = _mm256_setzero_ps();
    for (int q = 0; q < 4; q++) {
        const __m256 v = _mm256_loadu_ps(p + 8 * q);
        word |= (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GE_OQ)) << (8 * q);
        b = _mm256_or_ps(b, xv_bad_lanes(v, strict));
    }
    *bad |= _mm256_movemask_ps(b);
    return word;
}

/* Padded rows [r0, r1) of the flattened [B][Hp] into j->xb as nibble pairs (border words 0); XN_NAN / XN_NOT_PM1
   / 0. Width-contiguous (NCHW) inputs: 8 pixels of a channel per comparison, its bit ORed into their words; any
   other: xv_sign_word per pixel (8 channels per comparison where they are contiguous). */
XN_AVX2_FN static int xv_conv_pack(const xn_conv_job *j, int64_t r0, int64_t r1)
{
    const __m256 zero = _mm256_setzero_ps();
    const uint32_t lo4 = 0x0F0F0F0Fu;
    uint32_t words[256];
    int bad = 0;
    for (int64_t r = r0; r < r1; r++) {
        const int64_t b = r / j->Hp, hp = r % j->Hp, h = hp - j->ph;
        for (int64_t k = 0; k < j->Gcw; k++) {
            uint32_t *row = j->xb + 2 * (b * j->IS + k * j->PS + hp * j->Wp);
            memset(row, 0, (size_t)(2 * j->Wp) * sizeof(uint32_t));
            if (h < 0 || h >= j->H) continue;
            const int64_t kk = k % j->cw, c0 = (k / j->cw) * j->Cg + 32 * kk;
            const int64_t cnt = j->Cg - 32 * kk < 32 ? j->Cg - 32 * kk : 32;
            const float *px = j->x + b * j->sB + h * j->sH + c0 * j->sC;
            for (int64_t w0 = 0; w0 < j->W; w0 += 256) {   /* the sign words of 256 pixels, then their nibbles */
                const int64_t n = j->W - w0 < 256 ? j->W - w0 : 256;
                if (j->sW == 1 && j->sC != 1) {
                    memset(words, 0, (size_t)n * sizeof(uint32_t));
                    for (int64_t c = 0; c < cnt; c++) {
                        const float *p = px + c * j->sC + w0;
                        const __m256i bit = _mm256_set1_epi32((int)(1u << c));
                        int64_t w = 0;
                        __m256 bv = _mm256_setzero_ps();
                        for (; w + 8 <= n; w += 8) {
                            /* the channel's next row: the planes' 32 or more streams are too many for the
                               hardware prefetchers (without this, the loads took ~85% of the packing time) */
                            if (!(w & 15)) _mm_prefetch((const char *)(p + j->sH + w), _MM_HINT_T0);
                            const __m256 v = _mm256_loadu_ps(p + w);
                            const __m256i ge = _mm256_castps_si256(_mm256_cmp_ps(v, zero, _CMP_GE_OQ));
                            __m256i *o = (__m256i *)(words + w);
                            _mm256_storeu_si256(o, _mm256_or_si256(_mm256_loadu_si256(o), _mm256_and_si256(ge, bit)));
                            bv = _mm256_or_ps(bv, xv_bad_lanes(v, j->strict));
                        }
                        bad |= _mm256_movemask_ps(bv);
                        for (; w < n; w++) {
                            words[w] |= (uint32_t)(p[w] >= 0.0f) << c;
                            bad |= xv_bad(p[w], j->strict);
                        }
                    }
                } else {
                    for (int64_t w = 0; w < n; w++)
                        words[w] = xv_sign_word(px + (w0 + w) * j->sW, j->sC, cnt, j->strict, &bad);
                }
                uint32_t *o = row + 2 * (j->pw + w0);
                if (j->avx2 == XV_TABLE) {
                    for (int64_t w = 0; w < n; w++) _mm_storel_epi64((__m128i *)(o + 2 * w), xw_bytes(words[w]));
                } else {
                    for (int64_t w = 0; w < n; w++) {
                        o[2 * w] = words[w] & lo4;
                        o[2 * w + 1] = (words[w] >> 4) & lo4;
                    }
                }
            }
        }
    }
    return bad ? (j->strict ? XN_NOT_PM1 : XN_NAN) : 0;
}

/* Panels [p0, p1) of all groups' (the prepared layout's) into j->wn as nibble pairs: step u of a panel is its 16
   words' low nibbles, then their high nibbles shifted down. */
XN_AVX2_FN static void xv_split_panels(const xn_conv_job *j, int64_t p0, int64_t p1)
{
    const __m256i lo4 = _mm256_set1_epi8(0x0F);
    for (int64_t i = p0 * j->T; i < p1 * j->T; i++)
        for (int h = 0; h < 2; h++) {
            const __m256i w = _mm256_loadu_si256((const __m256i *)(j->wp + 16 * i + 8 * h));
            _mm256_storeu_si256((__m256i *)(j->wn + 32 * i + 8 * h), _mm256_and_si256(w, lo4));
            _mm256_storeu_si256((__m256i *)(j->wn + 32 * i + 16 + 8 * h),
                                _mm256_and_si256(_mm256_srli_epi16(w, 4), lo4));
        }
}

/* One pixel's step, in assembly: GCC, given the same as intrinsics, reassociated the adds and kept several pixels'
   broadcasts live at once, and spilled accumulators to the stack on every step. */
#define XV_PIX(i)                                                                                  \
    {                                                                                              \
        __m256i t1, t2;                                                                            \
        __asm__("vpbroadcastd %[xl], %[t1]\n\t"                                                    \
                "vpbroadcastd %[xh], %[t2]\n\t"                                                    \
                "vpxor %[wl], %[t1], %[t1]\n\t"                                                    \
                "vpxor %[wh], %[t2], %[t2]\n\t"                                                    \
                "vpshufb %[t1], %[lut], %[t1]\n\t"                                                 \
                "vpshufb %[t2], %[lut], %[t2]\n\t"                                                 \
                "vpaddb %[t1], %[a], %[a]\n\t"                                                     \
                "vpaddb %[t2], %[a], %[a]"                                                         \
                : [a] "+x"(a##i), [t1] "=&x"(t1), [t2] "=&x"(t2)                                   \
                : [xl] "m"(xr[i][o]), [xh] "m"(xr[i][o + 1]), [wl] "x"(wl), [wh] "x"(wh), [lut] "x"(lut)); \
    }
#define XV_WIDEN(i) cnt[i] = _mm256_add_epi32(cnt[i], _mm256_madd_epi16(_mm256_maddubs_epi16(a##i, ones8), ones16));

/* Counts of 8 channels (half `h` of a panel whose T steps start at wp, as nibble pairs) at 8 pixels (xr: their
   corners, in nibble-pair words): cnt[i], one 32-bit lane per channel. 8 byte accumulators, the two weight vectors,
   the table and a pixel's pair fit the 16 vector registers (4 pixels x 16 channels did not: GCC spilled 6 of its 8
   accumulators). */
XN_AVX2_FN static inline __attribute__((always_inline)) void xv_dot8(const uint32_t *const xr[XV_MR],
                                                                      const int32_t *off, int64_t T,
                                                                      const uint32_t *wp, int h, __m256i cnt[XV_MR])
{
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
    for (int i = 0; i < XV_MR; i++) cnt[i] = _mm256_setzero_si256();
    const uint32_t *w = wp + 8 * h;
    for (int64_t u0 = 0; u0 < T; u0 += XV_RUN) {
        const int64_t u1 = T - u0 < XV_RUN ? T : u0 + XV_RUN;
        const __m256i z = _mm256_setzero_si256();
        __m256i a0 = z, a1 = z, a2 = z, a3 = z, a4 = z, a5 = z, a6 = z, a7 = z;
        for (int64_t u = u0; u < u1; u++) {
            const int64_t o = 2 * (int64_t)off[u];
            const __m256i wl = _mm256_loadu_si256((const __m256i *)(w + 32 * u));
            const __m256i wh = _mm256_loadu_si256((const __m256i *)(w + 32 * u + 16));
            XV_PIX(0) XV_PIX(1) XV_PIX(2) XV_PIX(3) XV_PIX(4) XV_PIX(5) XV_PIX(6) XV_PIX(7)
        }
        XV_WIDEN(0) XV_WIDEN(1) XV_WIDEN(2) XV_WIDEN(3) XV_WIDEN(4) XV_WIDEN(5) XV_WIDEN(6) XV_WIDEN(7)
    }
}

/* r[i] = pixel i's 8 channels -> r[c] = channel c's 8 pixels. */
XN_AVX2_FN static inline void xv_transpose8(__m256 r[8])
{
    const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    r[0] = _mm256_permute2f128_ps(s0, s4, 0x20); r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
    r[2] = _mm256_permute2f128_ps(s2, s6, 0x20); r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
    r[4] = _mm256_permute2f128_ps(s0, s4, 0x31); r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
    r[6] = _mm256_permute2f128_ps(s2, s6, 0x31); r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

/* The outputs of 8 channels (n0 .. n0 + nl of group g) at a tile's np pixels from their counts cnt[i] (pixel i's,
   one 32-bit lane per channel): K - 2 * count, plus the padding's correction, then scale and bias; channels-last
   directly, NCHW through an 8 x 8 transpose where the 8 pixels are consecutive ones of one image. */
XN_AVX2_FN static void xv_finish8(const xn_conv_job *j, const __m256i cnt[XV_MR], int np, int64_t tile,
                                  const int64_t b[XN_CONV_TILE], const int64_t r[XN_CONV_TILE],
                                  const int64_t cls[XN_CONV_TILE], int64_t g, int64_t n0, int nl)
{
    const __m256i kc = _mm256_set1_epi32((int)j->K);
    const int64_t oc = g * j->Og + n0;
    const __m256 sv = nl == 8 ? xt_scale8(j->scale, oc) : _mm256_setzero_ps();
    const __m256 bv = nl == 8 ? xt_bias8(j->bias, oc) : _mm256_setzero_ps();
    __m256 f[XV_MR];
    for (int i = 0; i < np; i++) {
        const int64_t p = tile * XN_CONV_TILE + i;
        if (nl < 8) {
            int32_t c32[8];
            int64_t c64[8];
            _mm256_storeu_si256((__m256i *)c32, cnt[i]);
            for (int c = 0; c < 8; c++) c64[c] = c32[c];
            xn_conv_store_scalar(j, p, b[i], r[i], cls[i], g, n0, nl, c64);
            continue;
        }
        __m256i d = _mm256_sub_epi32(kc, _mm256_add_epi32(cnt[i], cnt[i]));
        if (j->corr) d = _mm256_add_epi32(d, _mm256_loadu_si256((const __m256i *)(j->corr + cls[i] + oc)));
        const __m256 v = xt_affine8(d, sv, bv);
        f[i] = v;
        if (!j->nchw_out) _mm256_storeu_ps(j->y + p * j->O + oc, v);
    }
    if (!j->nchw_out || nl < 8) return;
    if (np == XV_MR && b[0] == b[XV_MR - 1]) {   /* 8 consecutive pixels of one image: 8 floats a plane */
        xv_transpose8(f);
        for (int c = 0; c < 8; c++) _mm256_storeu_ps(j->y + (b[0] * j->O + oc + c) * j->HWo + r[0], f[c]);
    } else {
        for (int i = 0; i < np; i++) {
            float v[8];
            _mm256_storeu_ps(v, f[i]);
            for (int c = 0; c < 8; c++) j->y[(b[i] * j->O + oc + c) * j->HWo + r[i]] = v[c];
        }
    }
}

/* Work units [u0, u1) (as the scalar path's: group, panel pair, tile of 8 pixels; consecutive units share the
   tile's pixels, so their bit-image words stay in L1), a tile of 8 channels at a time. */
XN_AVX2_FN static void xv_conv_units(const xn_conv_job *j, int64_t u0, int64_t u1)
{
    const uint32_t *xr[XN_CONV_TILE];
    int64_t r[XN_CONV_TILE], b[XN_CONV_TILE], cls[XN_CONV_TILE];
    for (int64_t u = u0; u < u1; u++) {
        const int64_t q = u % j->NQ, tile = u / j->NQ % j->PT, g = u / j->NQ / j->PT;
        const int np = xn_conv_pixels(j, j->xb, tile, j->P, 0, xr, b, r, cls);
        const uint32_t *xs[XN_CONV_TILE];
        for (int i = 0; i < XN_CONV_TILE; i++) xs[i] = j->xb + 2 * (xr[i] - j->xb + g * j->cw * j->PS);
        for (int64_t panel = q * XN_CONV_NG; panel < (q + 1) * XN_CONV_NG && panel < j->P16; panel++) {
            const uint32_t *wr = j->wn + (g * j->P16 + panel) * j->T * 32;
            for (int h = 0; h < 2; h++) {
                const int64_t n0 = 16 * panel + 8 * h;
                if (n0 >= j->Og) break;
                __m256i cnt[XV_MR];
                xv_dot8(xs, j->off, j->T, wr, h, cnt);
                xv_finish8(j, cnt, np, tile, b, r, cls, g, n0, j->Og - n0 < 8 ? (int)(j->Og - n0) : 8);
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------------------------
   avx2 table path (xw_; the avx2 path's choice where a group has at least 32 output channels and K <= 65535):
   the linear path's lookup (xnor.c, xt_tab) on the convolution's implicit im2col. The bit image holds each word as
   its 8 nibbles, one byte each (times 4: the table row's address in 8-byte units), and the weights of 64 output
   channels of a group (a quad: 4 panels, two halves of 32) are laid out per call as per step u and nibble s, the
   nibble of each channel, one byte each (xw_split). A register tile is 4 pixels x 64 channels: per nibble step,
   each pixel's byte picks its table, and 8 VPSHUFB + 8 VPADDB count 1024 binary multiply-adds; byte counts are
   widened to 16-bit sums every XW_WORDS words (8 steps each, at most 4 a step: 7 x 8 x 4 = 224 < 256). */

#define XW_R 4      /* pixels per register tile: a unit's 8 pixels are two */
#define XW_WORDS 7  /* channel words per run of byte counts */


/* Quads [q0, q1) of all groups (G * NQ of them) into j->wn: for each step u and nibble s, 64 bytes (channel c of
   the quad at byte c: its word's nibble s; channels past the group's are 0). 32 channels' words are a 32 x 4 byte
   matrix: a byte shuffle and a dword permute per 8 channels, then a 4 x 4 transpose of 8-byte rows give each byte
   position's 32 bytes, whose low and high nibbles are steps 2b and 2b + 1. */
XN_AVX2_FN static void xw_split(const xn_conv_job *j, int64_t q0, int64_t q1)
{
    const __m256i gather = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                            0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const __m256i pairs = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7), lo4 = _mm256_set1_epi8(0x0F);
    uint8_t *out = (uint8_t *)j->wn;
    for (int64_t gq = q0; gq < q1; gq++) {
        const int64_t g = gq / j->NQ, quad = gq % j->NQ;
        for (int64_t u = 0; u < j->T; u++) {
            uint8_t *o = out + (gq * j->T + u) * 512;
            for (int h = 0; h < 2; h++) {
                __m256i a[4];
                for (int e = 0; e < 4; e++) {   /* channels 8e .. 8e + 7 of the half: panel 4 quad + 2 h + e / 2 */
                    const int64_t panel = 4 * quad + 2 * h + e / 2;
                    a[e] = panel < j->P16 ? _mm256_loadu_si256((const __m256i *)(j->wp + ((g * j->P16 + panel) * j->T +
                                                                                           u) * 16 + 8 * (e & 1)))
                                          : _mm256_setzero_si256();
                    a[e] = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(a[e], gather), pairs);
                }
                const __m256i lo01 = _mm256_unpacklo_epi64(a[0], a[1]), hi01 = _mm256_unpackhi_epi64(a[0], a[1]);
                const __m256i lo23 = _mm256_unpacklo_epi64(a[2], a[3]), hi23 = _mm256_unpackhi_epi64(a[2], a[3]);
                const __m256i byte[4] = {_mm256_permute2x128_si256(lo01, lo23, 0x20),
                                         _mm256_permute2x128_si256(hi01, hi23, 0x20),
                                         _mm256_permute2x128_si256(lo01, lo23, 0x31),
                                         _mm256_permute2x128_si256(hi01, hi23, 0x31)};
                for (int e = 0; e < 4; e++) {
                    _mm256_storeu_si256((__m256i *)(o + 64 * (2 * e) + 32 * h), _mm256_and_si256(byte[e], lo4));
                    _mm256_storeu_si256((__m256i *)(o + 64 * (2 * e + 1) + 32 * h),
                                        _mm256_and_si256(_mm256_srli_epi16(byte[e], 4), lo4));
                }
            }
        }
    }
}

/* One nibble step s of the 4 x 64 tile, in assembly (as xt's step): each pixel's table, the quad's two index
   vectors, 8 lookups and byte adds; each table is overwritten by its second lookup. */
#define XW_STEP(s)                                                                                       \
    __asm__("vmovdqa (%[tab],%[x0],8), %[t0]\n\t"                                                          \
            "vmovdqa (%[tab],%[x1],8), %[t1]\n\t"                                                          \
            "vmovdqa (%[tab],%[x2],8), %[t2]\n\t"                                                          \
            "vmovdqa (%[tab],%[x3],8), %[t3]\n\t"                                                          \
            "vmovdqa " #s "*64(%[w]), %[i0]\n\t"                                                           \
            "vmovdqa " #s "*64+32(%[w]), %[i1]\n\t"                                                        \
            "vpshufb %[i0], %[t0], %[tm]\n\tvpaddb %[tm], %[a00], %[a00]\n\t"                                \
            "vpshufb %[i1], %[t0], %[t0]\n\tvpaddb %[t0], %[a01], %[a01]\n\t"                                \
            "vpshufb %[i0], %[t1], %[tm]\n\tvpaddb %[tm], %[a10], %[a10]\n\t"                                \
            "vpshufb %[i1], %[t1], %[t1]\n\tvpaddb %[t1], %[a11], %[a11]\n\t"                                \
            "vpshufb %[i0], %[t2], %[tm]\n\tvpaddb %[tm], %[a20], %[a20]\n\t"                                \
            "vpshufb %[i1], %[t2], %[t2]\n\tvpaddb %[t2], %[a21], %[a21]\n\t"                                \
            "vpshufb %[i0], %[t3], %[tm]\n\tvpaddb %[tm], %[a30], %[a30]\n\t"                                \
            "vpshufb %[i1], %[t3], %[t3]\n\tvpaddb %[t3], %[a31], %[a31]"                                    \
            : [a00] "+x"(a00), [a01] "+x"(a01), [a10] "+x"(a10), [a11] "+x"(a11), [a20] "+x"(a20),             \
              [a21] "+x"(a21), [a30] "+x"(a30), [a31] "+x"(a31), [t0] "=&x"(t0), [t1] "=&x"(t1),               \
              [t2] "=&x"(t2), [t3] "=&x"(t3), [i0] "=&x"(i0), [i1] "=&x"(i1), [tm] "=&x"(tm)                   \
            : [tab] "r"(xt_tab), [x0] "r"((int64_t)p0[s]), [x1] "r"((int64_t)p1[s]), [x2] "r"((int64_t)p2[s]), \
              [x3] "r"((int64_t)p3[s]), [w] "r"(wu)                                                          \
            : "memory")

/* Counts of 4 pixels (x: their first byte in the image) x the quad's cn halves (wq: its layout) over all T words,
   as cnt[i][c] (channel c of the quad, 16 bits, natural order). */
XN_AVX2_FN static void xw_counts4(const uint8_t *const x[XW_R], const int32_t *off, int64_t T, const uint8_t *wq,
                                  int cn, uint16_t cnt[XW_R][64])
{
    const __m256i zero = _mm256_setzero_si256();
    __m256i sum[XW_R][2][2];
    for (int64_t w0 = 0; w0 < T; w0 += XW_WORDS) {
        const int64_t w1 = T - w0 < XW_WORDS ? T : w0 + XW_WORDS;
        const int first = w0 == 0;   /* XT_FLUSH (xnor.c): the first run sets the sums */
        if (cn == 2) {
            __m256i a00 = zero, a01 = zero, a10 = zero, a11 = zero, a20 = zero, a21 = zero, a30 = zero, a31 = zero;
            for (int64_t u = w0; u < w1; u++) {
                const int64_t o = 8 * (int64_t)off[u];
                const uint8_t *p0 = x[0] + o, *p1 = x[1] + o, *p2 = x[2] + o, *p3 = x[3] + o, *wu = wq + u * 512;
                __m256i t0, t1, t2, t3, i0, i1, tm;
                XW_STEP(0); XW_STEP(1); XW_STEP(2); XW_STEP(3); XW_STEP(4); XW_STEP(5); XW_STEP(6); XW_STEP(7);
            }
            XT_FLUSH(a00, 0, 0) XT_FLUSH(a01, 0, 1) XT_FLUSH(a10, 1, 0) XT_FLUSH(a11, 1, 1)
            XT_FLUSH(a20, 2, 0) XT_FLUSH(a21, 2, 1) XT_FLUSH(a30, 3, 0) XT_FLUSH(a31, 3, 1)
        } else {   /* one half: 4 accumulators, intrinsics */
            __m256i a[XW_R] = {zero, zero, zero, zero};
            for (int64_t u = w0; u < w1; u++) {
                const int64_t o = 8 * (int64_t)off[u];
                for (int s = 0; s < 8; s++) {
                    const __m256i i0 = _mm256_loadu_si256((const __m256i *)(wq + u * 512 + 64 * s));
                    for (int i = 0; i < XW_R; i++) {
                        const __m256i t = _mm256_load_si256((const __m256i *)(xt_tab + 8 * (int64_t)x[i][o + s]));
                        a[i] = _mm256_add_epi8(a[i], _mm256_shuffle_epi8(t, i0));
                    }
                }
            }
            for (int i = 0; i < XW_R; i++) XT_FLUSH(a[i], i, 0)
        }
    }
    for (int i = 0; i < XW_R; i++)
        for (int h = 0; h < cn; h++) {   /* lo: channels 0-7 | 16-23, hi: 8-15 | 24-31 */
            _mm256_storeu_si256((__m256i *)(cnt[i] + 32 * h), _mm256_permute2x128_si256(sum[i][h][0], sum[i][h][1], 0x20));
            _mm256_storeu_si256((__m256i *)(cnt[i] + 32 * h + 16),
                                _mm256_permute2x128_si256(sum[i][h][0], sum[i][h][1], 0x31));
        }
}

/* The avx2 register loop alone (xnor_popcount_probe): xw_counts4 (4 pixels x 64 channels, one run of XW_WORDS
   words, its flush and its stores included) on operands in L1, until `steps` words are done; returns the binary
   multiply-adds done (4 x 64 x 32 a word). */
XN_AVX2_FN static int64_t xw_popcount_probe(int64_t steps)
{
    static uint8_t image[XW_R * 8 * XW_WORDS], weights[512 * XW_WORDS] __attribute__((aligned(64)));
    int32_t off[XW_WORDS];
    uint16_t cnt[XW_R][64];
    uint32_t v = 0x2545F491u;
    for (int i = 0; i < (int)sizeof weights; i++) weights[i] = (uint8_t)((v = v * 1664525u + 1013904223u) >> 28);
    for (int i = 0; i < (int)sizeof image; i++) image[i] = (uint8_t)(((v = v * 1664525u + 1013904223u) >> 28) << 2);
    for (int u = 0; u < XW_WORDS; u++) off[u] = u;
    const uint8_t *x[XW_R];
    for (int i = 0; i < XW_R; i++) x[i] = image + 8 * XW_WORDS * i;
    __asm__ __volatile__("" : : "r"(off), "r"(x) : "memory");   /* offsets and pixels unknown, as in a layer */
    uint32_t total = 0;
    int64_t done = 0;
    for (; done < steps; done += XW_WORDS) {
        xw_counts4(x, off, XW_WORDS, weights, 2, cnt);
        total += cnt[0][0] + cnt[XW_R - 1][63];   /* every call's counts used */
        __asm__ __volatile__("" : : "r"(total) : "memory");
    }
    return done * XW_R * 64 * 32;
}

/* The table path's outputs for a quad of 64 channels of channels-last y, from channel oc: per pixel its 64 outputs
   (four whole lines) in channel order, streamed where j->stream. The job's fields are read into locals once (a
   vector store may alias them). */
XN_AVX2_FN static void xw_finish64(const xn_conv_job *j, const uint16_t cnt16[][64], int np, int64_t tile,
                                   const int64_t cls[XN_CONV_TILE], int64_t oc)
{
    const float *const scale = j->scale, *const bias = j->bias;
    const int32_t *const corr = j->corr;
    const int stream = j->stream;
    float *const y = j->y + tile * XN_CONV_TILE * j->O + oc;
    const int64_t O = j->O;
    const __m256i kc = _mm256_set1_epi32((int)j->K);
    for (int i = 0; i < np; i++) {
        float *const yp = y + i * O;
        const int32_t *const cr = corr ? corr + cls[i] + oc : NULL;
        for (int q = 0; q < 8; q++) {
            const __m256i cnt = _mm256_cvtepu16_epi32(_mm_load_si128((const __m128i *)(cnt16[i] + 8 * q)));
            __m256i d = _mm256_sub_epi32(kc, _mm256_add_epi32(cnt, cnt));
            if (cr) d = _mm256_add_epi32(d, _mm256_loadu_si256((const __m256i *)(cr + 8 * q)));
            const __m256 v = xt_affine8(d, xt_scale8(scale, oc + 8 * q), xt_bias8(bias, oc + 8 * q));
            if (stream) _mm256_stream_ps(yp + 8 * q, v);
            else _mm256_storeu_ps(yp + 8 * q, v);
        }
    }
}

/* Work units [u0, u1): (group, pixel tile, quad), the quad's 64 channels at the tile's 8 pixels, then their outputs
   through xw_finish64 (channels-last, whole quads) or 8 channels at a time through xv_finish8. */
XN_AVX2_FN static void xw_conv_units(const xn_conv_job *j, int64_t u0, int64_t u1)
{
    const uint32_t *xr[XN_CONV_TILE];
    int64_t r[XN_CONV_TILE], b[XN_CONV_TILE], cls[XN_CONV_TILE];
    uint16_t cnt16[XN_CONV_TILE][64] __attribute__((aligned(32)));
    for (int64_t u = u0; u < u1; u++) {
        const int64_t quad = u % j->NQ, tile = u / j->NQ % j->PT, g = u / j->NQ / j->PT;
        const int np = xn_conv_pixels(j, j->xb, tile, j->P, 0, xr, b, r, cls);
        const uint8_t *xs[XN_CONV_TILE];
        for (int i = 0; i < XN_CONV_TILE; i++) xs[i] = (const uint8_t *)j->xb + 8 * (xr[i] - j->xb + g * j->cw * j->PS);
        const int64_t left = j->Og - 64 * quad;
        const int cn = left > 32 ? 2 : 1;
        const uint8_t *wq = (const uint8_t *)j->wn + (g * j->NQ + quad) * j->T * 512;
        xw_counts4(xs, j->off, j->T, wq, cn, cnt16);
        xw_counts4(xs + XW_R, j->off, j->T, wq, cn, cnt16 + XW_R);
        if (!j->nchw_out && j->Og % 64 == 0) {
            xw_finish64(j, (const uint16_t(*)[64])cnt16, np, tile, cls, g * j->Og + 64 * quad);
            continue;
        }
        for (int q8 = 0; q8 < 4 * cn; q8++) {
            const int64_t n0 = 64 * quad + 8 * q8;
            if (n0 >= j->Og) break;
            __m256i cnt[XV_MR];
            for (int i = 0; i < XV_MR; i++) cnt[i] = _mm256_cvtepu16_epi32(_mm_load_si128((const __m128i *)(cnt16[i] + 8 * q8)));
            xv_finish8(j, cnt, np, tile, b, r, cls, g, n0, j->Og - n0 < 8 ? (int)(j->Og - n0) : 8);
        }
    }
}
#endif

static void xn_conv_share(xn_task *task, int tid)
{
    xn_conv_job *j = (xn_conv_job *)task;
    const int nt = task->nthreads;
    int64_t lo, hi;
#if XN_X86_SIMD
    if (j->by_image) {
        xz_conv_images(j, tid);
        return;
    }
#endif
    xn_share(j->P, 1, tid, nt, &lo, &hi);
    xn_conv_fill_pixels(j, lo, hi);
    xn_share(j->B * j->Hp, 1, tid, nt, &lo, &hi);
    int bad;
#if XN_X86_SIMD
    if (j->simd) bad = xz_conv_pack(j, lo, hi);
    else if (j->avx2) {
        bad = xv_conv_pack(j, lo, hi);
        if (j->avx2 == XV_TABLE) {
            xn_share(j->G * j->NQ, 1, tid, nt, &lo, &hi);
            xw_split(j, lo, hi);
        } else {
            xn_share(j->G * j->P16, 1, tid, nt, &lo, &hi);
            xv_split_panels(j, lo, hi);
        }
    }
    else
#endif
        bad = xn_conv_pack_scalar(j, lo, hi);
    if (bad) xn_fail(task, bad);
    xn_barrier(task);
    if (xn_failed(task)) return;
    xn_share(j->units, 1, tid, nt, &lo, &hi);
#if XN_X86_SIMD
    if (j->simd) {
        xz_conv_units(j, lo, hi);
        if (j->stream) _mm_sfence();
        return;
    }
    if (j->avx2 == XV_TABLE) {
        xw_conv_units(j, lo, hi);
        if (j->stream) _mm_sfence();
        return;
    }
    if (j->avx2) {
        xv_conv_units(j, lo, hi);
        return;
    }
#endif
    for (int64_t u = lo; u < hi; u++) xn_conv_unit_scalar(j, u);
}

/* Bitmask of the kernel rows (or columns) that output row (column) `o` reads from the padding. */
static uint32_t xn_pad_mask(int64_t o, int64_t stride, int64_t pad, int64_t dil, int64_t taps, int64_t size)
{
    uint32_t m = 0;
    for (int64_t i = 0; i < taps; i++) {
        const int64_t at = o * stride - pad + i * dil;
        if (at < 0 || at >= size) m |= (uint32_t)1 << i;
    }
    return m;
}

/* Classes of the output rows (or columns) by their padding mask: cls[o] indexes masks[]; returns the count. */
static int64_t xn_pad_classes(int64_t n, int64_t stride, int64_t pad, int64_t dil, int64_t taps, int64_t size,
                              int32_t *cls, uint32_t *masks)
{
    int64_t count = 0;
    for (int64_t o = 0; o < n; o++) {
        const uint32_t m = xn_pad_mask(o, stride, pad, dil, taps, size);
        int64_t c = 0;
        while (c < count && masks[c] != m) c++;
        if (c == count) masks[count++] = m;
        cls[o] = (int32_t)c;
    }
    return count;
}

/* y = F.conv2d(sign(x), sign(W)) * scale + bias (see the top of this file). `geom`: XN_CONV_GEOM values;
   `prepared`: xnor_prepare_weights' layout of the packed weight [O, ceil(Cg * kh * kw / 8)]; `nchw_out`: write y
   as [B, O, Ho, Wo] contiguous, else [B, Ho, Wo, O]. `path`: XN_PATH_AUTO (avx512 where supported, else scalar),
   XN_PATH_AVX512 or XN_PATH_SCALAR. `bf16`: x and y are bfloat16 (the avx512 path, channels-last x and y only),
   the outputs rounded as torch's bf16 conv and ops round them (xz_finish). Returns XN_OK, or XN_NOMEM / XN_NAN /
   XN_NOT_PM1 / XN_NO_PATH / XN_BAD_ARGS (then y holds nothing to use: by image, the images before the bad one
   may have been written). */
int xnor_conv2d_f32(const void *x, const int64_t *geom, const void *prepared, const float *scale,
                    const float *bias, void *y, int nchw_out, int strict, int nthreads, int64_t min_work, int path,
                    int bf16)
{
    xn_conv_job j;
    memset(&j, 0, sizeof j);
    j.task.run = xn_conv_share;
    j.x = (const float *)x;
    j.B = geom[0]; j.C = geom[1]; j.H = geom[2]; j.W = geom[3];
    j.sB = geom[4]; j.sC = geom[5]; j.sH = geom[6]; j.sW = geom[7];
    j.O = geom[8]; j.kh = geom[9]; j.kw = geom[10]; j.sh = geom[11]; j.sw = geom[12];
    j.ph = geom[13]; j.pw = geom[14]; j.dh = geom[15]; j.dw = geom[16]; j.G = geom[17];
    if (j.G <= 0 || j.C <= 0 || j.O <= 0 || j.C % j.G || j.O % j.G || j.kh <= 0 || j.kw <= 0 || j.kh > 32 ||
        j.kw > 32 || j.sh <= 0 || j.sw <= 0 || j.dh <= 0 || j.dw <= 0 || j.ph < 0 || j.pw < 0 || j.H <= 0 ||
        j.W <= 0 || j.B < 0)
        return XN_BAD_ARGS;
    j.Ho = (j.H + 2 * j.ph - j.dh * (j.kh - 1) - 1) / j.sh + 1;
    j.Wo = (j.W + 2 * j.pw - j.dw * (j.kw - 1) - 1) / j.sw + 1;
    if (j.H + 2 * j.ph - j.dh * (j.kh - 1) - 1 < 0 || j.W + 2 * j.pw - j.dw * (j.kw - 1) - 1 < 0)
        return XN_BAD_ARGS;
    if (bf16 && (nchw_out || j.sC != 1)) return XN_BAD_ARGS;
    if (j.B == 0) return XN_OK;
    if (path == XN_PATH_AUTO)
        path = xn_supported(XN_PATH_AVX512) || bf16 ? XN_PATH_AVX512
               : xn_supported(XN_PATH_AVX2)         ? XN_PATH_AVX2
                                                    : XN_PATH_SCALAR;
    if (!xn_supported(path) || (bf16 && path != XN_PATH_AVX512)) return XN_NO_PATH;
    xn_hugepage_hint(y, j.B * j.O * j.Ho * j.Wo * (int64_t)(bf16 ? 2 : 4));
    j.simd = path == XN_PATH_AVX512;
    j.avx2 = path == XN_PATH_AVX2 ? XV_PAIRS : 0;
    j.scale = scale; j.bias = bias; j.y = (float *)y; j.nchw_out = nchw_out; j.strict = strict; j.bf16 = bf16;
#if XN_X86_SIMD
    j.bf16 = xz_bf16_mode(bf16, scale, bias, j.O);
#endif
    j.Cg = j.C / j.G; j.Og = j.O / j.G;
#if XN_X86_SIMD
    j.stream = j.simd && !nchw_out && xz_stream_ok(y, j.B * j.O * j.Ho * j.Wo, j.O, j.Og, bf16);
#endif
    j.cw = (j.Cg + 31) / 32; j.Gcw = j.G * j.cw;
    j.Hp = j.H + 2 * j.ph; j.Wp = j.W + 2 * j.pw;
    j.PS = j.Hp * j.Wp; j.IS = j.Gcw * j.PS;
    j.HWo = j.Ho * j.Wo; j.P = j.B * j.HWo;
    j.K = j.Cg * j.kh * j.kw;
    j.P16 = (j.Og + 15) / 16;
    j.NQ = (j.P16 + XN_CONV_NG - 1) / XN_CONV_NG;
    /* the table path where a group has a half of 32 channels to fill and the counts fit 16 bits (a depthwise conv's
       one channel per group keeps the nibble pairs' 8-channel tiles) */
    if (j.avx2 && j.Og >= 32 && j.K <= 65535) {
        j.avx2 = XV_TABLE;
        j.NQ = (j.Og + 63) / 64;
#if XN_X86_SIMD   /* whole quads of channels-last outputs: xw_finish64 writes each pixel's lines whole */
        j.stream = !nchw_out && j.Og % 64 == 0 && xz_stream_ok(y, j.B * j.O * j.Ho * j.Wo, j.O, j.Og, 0);
#endif
    }
    j.PT = (j.P + XN_CONV_TILE - 1) / XN_CONV_TILE;
    j.T = j.kh * j.kw * j.cw;
    j.units = j.G * j.NQ * j.PT;
    j.wp = (const uint32_t *)prepared;
    const int32_t *S = (const int32_t *)(j.wp + j.G * j.P16 * j.T * 16);

    const int t = xn_threads(nthreads, j.P * j.O * ((j.K + 63) / 64), min_work, j.units);
    /* whole images per thread where the images share out evenly enough (and the avx512 path runs) */
    j.by_image = j.simd && j.B >= t && (j.B % t == 0 || j.B >= 4 * t);
    j.xb = (uint32_t *)malloc((size_t)((j.by_image ? t : j.B) * j.IS * (j.avx2 ? 2 : 1)) * sizeof(uint32_t));
    j.off = (int32_t *)malloc((size_t)j.T * sizeof(int32_t));
    j.rcls = (int32_t *)malloc((size_t)(j.Ho + j.Wo) * sizeof(int32_t));
    uint32_t *masks = (uint32_t *)malloc((size_t)(j.Ho + j.Wo) * sizeof(uint32_t));
    j.pix = (xn_conv_pix *)malloc((size_t)(j.by_image ? j.HWo : j.P) * sizeof(xn_conv_pix));
    if (j.avx2) {   /* 32-byte aligned: the table path's step loads it with vmovdqa */
        const int64_t words = j.avx2 == XV_TABLE ? j.G * j.NQ * j.T * 128 : j.G * j.P16 * j.T * 32;
        j.wn = (uint32_t *)aligned_alloc(64, (size_t)xa_round(words * (int64_t)sizeof(uint32_t), 64));
    }
    int rc = XN_NOMEM;
    if (!j.xb || !j.off || !j.rcls || !masks || !j.pix || (j.avx2 && !j.wn)) goto done;
    j.ccls = j.rcls + j.Ho;
    for (int64_t i = 0; i < j.kh; i++)
        for (int64_t jj = 0; jj < j.kw; jj++)
            for (int64_t kk = 0; kk < j.cw; kk++)
                j.off[(i * j.kw + jj) * j.cw + kk] = (int32_t)(kk * j.PS + i * j.dh * j.Wp + jj * j.dw);

    /* the padding's correction: corr[rc][cc][o] = sum of S[o][tap] over the taps that row class rc or column
       class cc reads from the padding */
    const int64_t nrc = xn_pad_classes(j.Ho, j.sh, j.ph, j.dh, j.kh, j.H, j.rcls, masks);
    uint32_t *cmasks = masks + nrc;
    j.ncc = xn_pad_classes(j.Wo, j.sw, j.pw, j.dw, j.kw, j.W, j.ccls, cmasks);
    int padded = 0;
    for (int64_t c = 0; c < nrc; c++) padded |= masks[c] != 0;
    for (int64_t c = 0; c < j.ncc; c++) padded |= cmasks[c] != 0;
    if (padded) {
        j.corr = (int32_t *)malloc((size_t)(nrc * j.ncc * j.O) * sizeof(int32_t));
        if (!j.corr) goto done;
        for (int64_t a = 0; a < nrc; a++)
            for (int64_t c = 0; c < j.ncc; c++)
                for (int64_t o = 0; o < j.O; o++) {
                    int32_t s = 0;
                    for (int64_t i = 0; i < j.kh; i++)
                        for (int64_t jj = 0; jj < j.kw; jj++)
                            if (((masks[a] >> i) | (cmasks[c] >> jj)) & 1) s += S[o * j.kh * j.kw + i * j.kw + jj];
                    j.corr[(a * j.ncc + c) * j.O + o] = s;
                }
        if (j.simd) {
            j.kcorr = (float *)malloc((size_t)(nrc * j.ncc * j.O) * sizeof(float));
            if (!j.kcorr) goto done;
            for (int64_t i = 0; i < nrc * j.ncc * j.O; i++) j.kcorr[i] = (float)(j.K + j.corr[i]);
        }
    }
#if XN_X86_SIMD
    j.exact = xz_exact_ints(j.K, !padded);
#endif
    if (j.by_image) xn_conv_fill_pixels(&j, 0, j.HWo);   /* image 0's pixels; an image adds b * IS to xoff */
    j.task.nthreads = t;
    xn_run(&j.task);
    rc = j.task.status;
done:
    free(j.wn);
    free(j.xb);
    free(j.off);
    free(j.rcls);
    free(masks);
    free(j.corr);
    free(j.kcorr);
    free(j.pix);
    return rc;
}
