// Packed 32-block products: the decode kernels for Q4_0, Q4_1 and Q8_0 (see
// ckernels.h for the interface).
//
// What this is: the weights repacked once (ck_pack) so that a SIMD register
// holds the same four columns of 16 consecutive rows, and two kernels over
// that layout, AVX2 (8 rows per register) and AVX-512 VNNI (16 rows), that
// multiply each weight block with up to 8 prepared activation vectors before
// moving on to the next. Lanes are rows, so a block ends in one vector of 16
// row sums: no horizontal reductions, and the per-block scales are applied to
// 16 rows with one instruction.
// What this is not: the reference. dot_scalar in kernels.c, on the original
// GGUF layout, is what tests check these against.
//
// Packed layout: rows in groups of CK_PACK_ROWS = 16 (the last group padded
// with zero rows); group g, block b starts at (g·nb + b)·16·block_bytes:
//   Q4_1: f16 d[16]; f16 m[16]; u8 q[4][64]
//   Q4_0: f16 d[16];            u8 q[4][64]
//   Q8_0: f16 d[16];            u8 q[8][64]
// Q4: q[c][4r + i] is byte 4c + i of row r's block (low nibble: column
// 4c + i, high nibble: column 16 + 4c + i). Q8_0: q[k][4r + i] is row r's
// weight at column 4k + i plus 128 (as u8). Same size as the GGUF layout.
//
// Prepared activations for Q8_0 on AVX2 (ck_prepare at level 1):
// per 32-block b, X = round(x / s) with |X| < 2^20 (s = max|x_block| /
// (2^20 - 1), error ≤ s/2, about 2^-21 of the block's largest |x|) written
// as three balanced base-128 int8 digits X = d1·2^14 + d2·2^7 + d3,
// d1 ∈ [-64, 64], d2, d3 ∈ [-64, 63]:
//   i8 digits[nb][3][32]; f32 scale[nb]; f32 sum[nb] (exact Σx);
//   i32 corr_hi[nb] = 128·Σd1; i32 corr_lo[nb] = 128·(128·Σd2 + Σd3)
// (the corrections undo Q8_0's +128). Each digit plane is multiplied with the
// u8 weights exactly in integer lanes (vpdpbusd; on AVX2 vpmaddubsw), then
// X·w = 2^14·P1 + 2^7·P2 + P3 per block; the sums reach 2^32, so the top
// plane is scaled in fp32.
//
// 4-bit weights (ck_prepare at levels 1 and 2 for Q4_0 and Q4_1), and Q8_0
// on AVX-512 (level 2): two planes instead. Every plane is a multiply pass
// (vpmaddubsw on AVX2, vpdpbusd on AVX-512), and once several vectors share
// each weight block the planes are the kernel's work (BENCHMARKS.md,
// "AVX-512: two digit planes…": batch-8 decode 605 → 764 tokens/s on one
// Zen 5 thread). On AVX2, 4-bit weights leave int16 room for full
// int8 digits (a pair ≤ 2·15·128, eight pairs ≤ 30720), so X = round(x / s)
// with |X| ≤ 32639 (s = max|x_block| / 32639, error ≤ s/2, about 2^-16 of
// the block's largest |x|) is written as two balanced base-256 digits
// X = d1·2^8 + d2, d1 ∈ [-127, 127], d2 ∈ [-128, 127]:
//   i8 digits[nb][2][32]; f32 scale[nb]; f32 sum[nb] (exact Σx);
//   i32 corr[nb] = 128·ΣX (undoes Q8_0's +128)
// and X·w = 2^8·P1 + P2 per block. Q4_0's −8 enters as m = −8·d. (llama.cpp
// rounds activations to 8 bits.)
// On AVX2, Q8_0's u8 weights (up to 255) would overflow vpmaddubsw's int16
// pairs with full int8 digits, so there it keeps the three base-128 planes.
#include "ckernels.h"
#include "internal.h"

#include <stdlib.h>

#define PR CK_PACK_ROWS
// Loops over the vectors of a pass and the chunks of a block: unrolled, so
// that the accumulators stay in registers.
#define CK_UNROLL _Pragma("clang loop unroll(full)")
#define XQ_MAX 1048575
#define XQ16_MAX 32639

/// Whether the vectors for `type` at kernel `level` take the two-plane form.
static int two_planes(int type, int level) { return type == CK_Q8_0 ? level == 2 : level >= 1; }

size_t ck_packed_bytes(int type, size_t rows, size_t cols) {
    if (!ck_is_block_type(type)) return 0;
    return (rows + PR - 1) / PR * PR * (cols / 32) * ck_block_bytes(type);
}

void ck_pack(int type, const void *W, size_t rows, size_t cols, void *packed) {
    size_t nb = cols / 32, bb = ck_block_bytes(type), groups = (rows + PR - 1) / PR;
    const uint8_t *src = (const uint8_t *)W;
    uint8_t *dst = (uint8_t *)packed;
    memset(dst, 0, ck_packed_bytes(type, rows, cols));
    size_t head = type == CK_Q4_1 ? 64 : 32;   // bytes of scales before the weights
    for (size_t g = 0; g < groups; g++)
        for (size_t b = 0; b < nb; b++) {
            uint8_t *blk = dst + (g * nb + b) * PR * bb;
            for (size_t r = 0; r < PR && g * PR + r < rows; r++) {
                const uint8_t *s = src + (g * PR + r) * nb * bb + b * bb;
                memcpy(blk + 2 * r, s, 2);                                   // d
                if (type == CK_Q4_1) memcpy(blk + 32 + 2 * r, s + 2, 2);    // m
                const uint8_t *qs = s + (type == CK_Q4_1 ? 4 : 2);
                uint8_t *q = blk + head;
                if (type == CK_Q8_0) {
                    for (int k = 0; k < 8; k++)
                        for (int i = 0; i < 4; i++) q[64 * k + 4 * r + i] = (uint8_t)(qs[4 * k + i] + 128);
                } else {
                    for (int c = 0; c < 4; c++) memcpy(q + 64 * c + 4 * r, qs + 4 * c, 4);
                }
            }
        }
}

// ---------------------------------------------------------------------------
// Prepared activations

/// Bytes of one prepared vector (64-byte multiple, so vectors stay aligned).
size_t ck_digits_stride(int type, size_t cols, int level) {
    size_t nb = cols / 32;
    return (nb * (two_planes(type, level) ? 64 + 12 : 96 + 16) + 63) & ~(size_t)63;
}

#ifdef CK_X86
/// The digits of one block (the scalar loop below, eight values at a time;
/// cvtps rounds to nearest even like lrintf). Returns Σd1, Σd2, Σd3.
CK_TARGET static void digits_avx2(const float *xb, float inv, int8_t *p1, int8_t *p2, int8_t *p3, int32_t *sums) {
    const __m256i c64 = _mm256_set1_epi32(64), c127 = _mm256_set1_epi32(127);
    const __m256i hi = _mm256_set1_epi32(XQ_MAX), lo = _mm256_set1_epi32(-XQ_MAX);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    __m256i d[3][4], s1 = _mm256_setzero_si256(), s2 = s1, s3 = s1;
    for (int q = 0; q < 4; q++) {
        __m256i X = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + 8 * q), _mm256_set1_ps(inv)));
        X = _mm256_max_epi32(_mm256_min_epi32(X, hi), lo);
        __m256i d3 = _mm256_sub_epi32(_mm256_and_si256(_mm256_add_epi32(X, c64), c127), c64);
        __m256i r = _mm256_srai_epi32(_mm256_sub_epi32(X, d3), 7);
        __m256i d2 = _mm256_sub_epi32(_mm256_and_si256(_mm256_add_epi32(r, c64), c127), c64);
        __m256i d1 = _mm256_srai_epi32(_mm256_sub_epi32(r, d2), 7);
        d[0][q] = d1;
        d[1][q] = d2;
        d[2][q] = d3;
        s1 = _mm256_add_epi32(s1, d1);
        s2 = _mm256_add_epi32(s2, d2);
        s3 = _mm256_add_epi32(s3, d3);
    }
    int8_t *planes[3] = {p1, p2, p3};
    for (int p = 0; p < 3; p++) {
        // packs work within 128-bit lanes: [0-3 8-11 4-7 12-15] then bytes
        // [0-3 8-11 16-19 24-27 | 4-7 12-15 20-23 28-31]; the dword permute restores order.
        __m256i w = _mm256_packs_epi16(_mm256_packs_epi32(d[p][0], d[p][1]), _mm256_packs_epi32(d[p][2], d[p][3]));
        _mm256_storeu_si256((__m256i *)planes[p], _mm256_permutevar8x32_epi32(w, order));
    }
    int32_t t[8];
    __m256i all[3] = {s1, s2, s3};
    for (int p = 0; p < 3; p++) {
        _mm256_storeu_si256((__m256i *)t, all[p]);
        sums[p] = t[0] + t[1] + t[2] + t[3] + t[4] + t[5] + t[6] + t[7];
    }
}
#endif

#ifdef CK_X86
/// The two base-256 digits of one block (the scalar loop in
/// ck_quantize_digits, eight values at a time).
CK_TARGET static void digits16_avx2(const float *xb, float inv, int8_t *p1, int8_t *p2) {
    const __m256i c128 = _mm256_set1_epi32(128), c255 = _mm256_set1_epi32(255);
    const __m256i hi = _mm256_set1_epi32(XQ16_MAX), lo = _mm256_set1_epi32(-XQ16_MAX);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    __m256i d[2][4];
    for (int q = 0; q < 4; q++) {
        __m256i X = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + 8 * q), _mm256_set1_ps(inv)));
        X = _mm256_max_epi32(_mm256_min_epi32(X, hi), lo);
        __m256i d2 = _mm256_sub_epi32(_mm256_and_si256(_mm256_add_epi32(X, c128), c255), c128);
        d[0][q] = _mm256_srai_epi32(_mm256_sub_epi32(X, d2), 8);
        d[1][q] = d2;
    }
    int8_t *planes[2] = {p1, p2};
    for (int p = 0; p < 2; p++) {
        __m256i w = _mm256_packs_epi16(_mm256_packs_epi32(d[p][0], d[p][1]), _mm256_packs_epi32(d[p][2], d[p][3]));
        _mm256_storeu_si256((__m256i *)planes[p], _mm256_permutevar8x32_epi32(w, order));
    }
}
#endif

/// The two-plane form of one vector (the layout at the top of this file).
static void quantize_digits16(int type, const float *x, size_t cols, uint8_t *buf) {
    size_t nb = cols / 32;
    int8_t *digits = (int8_t *)buf;
    float *scale = (float *)(buf + nb * 64), *sum = scale + nb;
    int32_t *corr = (int32_t *)(sum + nb);
    for (size_t b = 0; b < nb; b++) {
        const float *xb = x + b * 32;
        float s;
        float amax = ck_block_stats(xb, &s);
        float inv = amax > 0 ? (float)XQ16_MAX / amax : 0;
        scale[b] = amax / (float)XQ16_MAX;
        sum[b] = s;
        int8_t *p1 = digits + b * 64, *p2 = p1 + 32;
#ifdef CK_X86
        digits16_avx2(xb, inv, p1, p2);   // level 1 runs on AVX2 CPUs only
#else
        for (int j = 0; j < 32; j++) {
            long v = lrintf(xb[j] * inv);
            if (v > XQ16_MAX) v = XQ16_MAX;
            if (v < -XQ16_MAX) v = -XQ16_MAX;
            int32_t X = (int32_t)v;
            int32_t d2 = ((X + 128) & 255) - 128;
            p1[j] = (int8_t)((X - d2) >> 8);
            p2[j] = (int8_t)d2;
        }
#endif
        if (type == CK_Q8_0) {   // 4-bit weights need no correction
            int32_t total = 0;   // Σ X = Σ (2^8·d1 + d2)
            for (int j = 0; j < 32; j++) total += 256 * p1[j] + p2[j];
            corr[b] = 128 * total;
        }
    }
}

void ck_quantize_digits(int type, const float *x, size_t cols, uint8_t *buf, int level) {
    if (two_planes(type, level)) {
        quantize_digits16(type, x, cols, buf);
        return;
    }
    size_t nb = cols / 32;
    int8_t *digits = (int8_t *)buf;
    float *scale = (float *)(buf + nb * 96), *sum = scale + nb;
    int32_t *corr_hi = (int32_t *)(sum + nb), *corr_lo = corr_hi + nb;
    for (size_t b = 0; b < nb; b++) {
        const float *xb = x + b * 32;
        float s;
        float amax = ck_block_stats(xb, &s);
        float inv = amax > 0 ? (float)XQ_MAX / amax : 0;
        scale[b] = amax / (float)XQ_MAX;
        sum[b] = s;
        int8_t *p1 = digits + b * 96, *p2 = p1 + 32, *p3 = p2 + 32;
        int32_t sums[3] = {0, 0, 0};
#ifdef CK_X86
        digits_avx2(xb, inv, p1, p2, p3, sums);   // levels ≥ 1 run on AVX2 CPUs only
#else
        for (int j = 0; j < 32; j++) {
            long v = lrintf(xb[j] * inv);
            if (v > XQ_MAX) v = XQ_MAX;
            if (v < -XQ_MAX) v = -XQ_MAX;
            int32_t X = (int32_t)v;
            int32_t d3 = ((X + 64) & 127) - 64;
            int32_t r = (X - d3) >> 7;
            int32_t d2 = ((r + 64) & 127) - 64;
            int32_t d1 = (r - d2) >> 7;
            p1[j] = (int8_t)d1;
            p2[j] = (int8_t)d2;
            p3[j] = (int8_t)d3;
            sums[0] += d1;
            sums[1] += d2;
            sums[2] += d3;
        }
#endif
        corr_hi[b] = 128 * sums[0];
        corr_lo[b] = 128 * (128 * sums[1] + sums[2]);
    }
}

#ifdef CK_X86
// How far ahead of the block being multiplied the weights are prefetched
// (the hardware prefetcher stops at page boundaries). One decode token's
// products, single thread (AMD EPYC, Zen 5): 2 KiB 3.1 ms, 4 KiB 2.9 ms,
// 8 KiB 2.3 ms, 16 KiB 2.3 ms, 32 KiB 2.5 ms; NTA hints no better.
#define PREFETCH_BYTES 8192

// ---------------------------------------------------------------------------
// AVX-512 VNNI: 16 rows per register, up to 8 vectors per pass.

CK_TARGET512 static inline __attribute__((always_inline))
void group_512(int type, const uint8_t *G, size_t nb, const uint8_t *const *xs, float *const *ys, const int nt,
               __mmask16 rows, int prefetch) {
    const size_t bb = PR * ck_block_bytes(type);
    const __m512i m4 = _mm512_set1_epi8(15);
    const __m512 minus8 = _mm512_set1_ps(-8);
    __m512 acc[8];
    CK_UNROLL
    for (int j = 0; j < nt; j++) acc[j] = _mm512_setzero_ps();
    for (size_t b = 0; b < nb; b++) {
        const uint8_t *blk = G + b * bb;
        if (prefetch)
            for (size_t o = 0; o < bb; o += 64) _mm_prefetch((const char *)(blk + PREFETCH_BYTES + o), _MM_HINT_T0);
        __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)blk));
        __m512i w[8];
        __m512 m = d;
        if (type == CK_Q8_0) {
            CK_UNROLL
            for (int k = 0; k < 8; k++) w[k] = _mm512_loadu_si512(blk + 32 + 64 * k);
        } else {
            m = type == CK_Q4_1 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 32)))
                                : _mm512_mul_ps(d, minus8);
            const uint8_t *q = blk + (type == CK_Q4_1 ? 64 : 32);
            CK_UNROLL
            for (int c = 0; c < 4; c++) {
                __m512i v = _mm512_loadu_si512(q + 64 * c);
                w[c] = _mm512_and_si512(v, m4);
                w[c + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
            }
        }
        CK_UNROLL
        for (int j = 0; j < nt; j++) {
            // Two base-256 planes: X·w = 2^8·P1 + P2 per block.
            const int32_t *dg = (const int32_t *)(xs[j] + b * 64);
            const float *scale = (const float *)(xs[j] + nb * 64), *sum = scale + nb;
            __m512i a1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], _mm512_set1_epi32(dg[0]));
            __m512i a2 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], _mm512_set1_epi32(dg[8]));
            CK_UNROLL
            for (int k = 1; k < 8; k++) {
                a1 = _mm512_dpbusd_epi32(a1, w[k], _mm512_set1_epi32(dg[k]));
                a2 = _mm512_dpbusd_epi32(a2, w[k], _mm512_set1_epi32(dg[8 + k]));
            }
            __m512 ds = _mm512_mul_ps(d, _mm512_set1_ps(scale[b]));
            __m512i t = _mm512_add_epi32(_mm512_slli_epi32(a1, 8), a2);
            if (type == CK_Q8_0) {
                // The weights are q + 128: subtract 128·ΣX. |t| < 32·255·2^15 + 128·32·2^15 < 2^31
                // (vpdpbusd adds in int32, so Q8_0 needs no third plane, unlike vpmaddubsw on AVX2).
                const int32_t *corr = (const int32_t *)(sum + nb);
                t = _mm512_sub_epi32(t, _mm512_set1_epi32(corr[b]));
                acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), ds, acc[j]);
            } else {
                // |t| < 32·15·2^15; Σx·m enters beside it.
                acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), ds, acc[j]);
                acc[j] = _mm512_fmadd_ps(m, _mm512_set1_ps(sum[b]), acc[j]);
            }
        }
    }
    CK_UNROLL
    for (int j = 0; j < nt; j++) _mm512_mask_storeu_ps(ys[j], rows, acc[j]);
}

CK_TARGET512 static void group_512_n(int type, const uint8_t *G, size_t nb, const uint8_t *const *xs,
                                     float *const *ys, int nt, __mmask16 rows, int prefetch) {
    switch (nt) {
#define CASE(N) case N: group_512(type, G, nb, xs, ys, N, rows, prefetch); break;
    CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
    }
}

// ---------------------------------------------------------------------------
// AVX2: 8 rows per register. A pass multiplies nh halves of a group (8 or
// 16 rows) with nt vectors, nh·nt ≤ 3 for 4-bit weights (two digit planes)
// and ≤ 2 for Q8_0 (three), so that the accumulators fit the 16 registers:
// one vector takes both halves at once (twice the independent work per
// weight byte read), more vectors take one half at a time.

#define NT_AVX2 3

CK_TARGET static inline __attribute__((always_inline))
void rows_avx2(int type, const uint8_t *G, size_t nb, int h0, const int nh, const uint8_t *const *xs,
               float *const *ys, const int nt, int valid, int prefetch) {
    const size_t bb = PR * ck_block_bytes(type);
    const __m256i m4 = _mm256_set1_epi8(15);
    const __m256i ones = _mm256_set1_epi16(1), two8 = _mm256_set1_epi16(256);
    __m256 acc[2][NT_AVX2];
    CK_UNROLL
    for (int h = 0; h < nh; h++)
        CK_UNROLL
        for (int j = 0; j < nt; j++) acc[h][j] = _mm256_setzero_ps();
    for (size_t b = 0; b < nb; b++) {
        const uint8_t *blk = G + b * bb;
        if (prefetch)
            for (size_t o = 0; o < bb; o += 64) _mm_prefetch((const char *)(blk + PREFETCH_BYTES + o), _MM_HINT_T0);
        __m256 d[2];
        CK_UNROLL
        for (int h = 0; h < nh; h++) d[h] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 16 * (h0 + h))));
        const int32_t *dg[NT_AVX2];
        CK_UNROLL
        for (int j = 0; j < nt; j++) dg[j] = (const int32_t *)(xs[j] + b * (type == CK_Q8_0 ? 96 : 64));
        if (type == CK_Q8_0) {
            __m256i a1[2][NT_AVX2], a2[2][NT_AVX2], a3[2][NT_AVX2];
            CK_UNROLL
            for (int h = 0; h < nh; h++)
                CK_UNROLL
                for (int j = 0; j < nt; j++) a1[h][j] = a2[h][j] = a3[h][j] = _mm256_setzero_si256();
            CK_UNROLL
            for (int k = 0; k < 8; k++) {
                CK_UNROLL
                for (int h = 0; h < nh; h++) {
                    __m256i w = _mm256_loadu_si256((const __m256i *)(blk + 32 + 64 * k + 32 * (h0 + h)));
                    CK_UNROLL
                    for (int j = 0; j < nt; j++) {
                        a1[h][j] = _mm256_add_epi32(a1[h][j], _mm256_madd_epi16(_mm256_maddubs_epi16(w, _mm256_set1_epi32(dg[j][k])), ones));
                        a2[h][j] = _mm256_add_epi32(a2[h][j], _mm256_madd_epi16(_mm256_maddubs_epi16(w, _mm256_set1_epi32(dg[j][8 + k])), ones));
                        a3[h][j] = _mm256_add_epi32(a3[h][j], _mm256_madd_epi16(_mm256_maddubs_epi16(w, _mm256_set1_epi32(dg[j][16 + k])), ones));
                    }
                }
            }
            CK_UNROLL
            for (int j = 0; j < nt; j++) {
                const float *scale = (const float *)(xs[j] + nb * 96), *sum = scale + nb;
                const int32_t *corr_hi = (const int32_t *)(sum + nb), *corr_lo = corr_hi + nb;
                CK_UNROLL
                for (int h = 0; h < nh; h++) {
                    __m256i hi = _mm256_sub_epi32(a1[h][j], _mm256_set1_epi32(corr_hi[b]));
                    __m256i lo = _mm256_sub_epi32(_mm256_add_epi32(_mm256_slli_epi32(a2[h][j], 7), a3[h][j]),
                                                  _mm256_set1_epi32(corr_lo[b]));
                    __m256 v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), _mm256_set1_ps(16384), _mm256_cvtepi32_ps(lo));
                    acc[h][j] = _mm256_fmadd_ps(v, _mm256_mul_ps(d[h], _mm256_set1_ps(scale[b])), acc[h][j]);
                }
            }
        } else {
            __m256 m[2];
            CK_UNROLL
            for (int h = 0; h < nh; h++)
                m[h] = type == CK_Q4_1 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 32 + 16 * (h0 + h))))
                                       : _mm256_mul_ps(d[h], _mm256_set1_ps(-8));
            const uint8_t *q = blk + (type == CK_Q4_1 ? 64 : 32) + 32 * h0;
            __m256i s1[2][NT_AVX2], s2[2][NT_AVX2];   // int16 pair sums, ≤ 8·2·15·128
            CK_UNROLL
            for (int h = 0; h < nh; h++)
                CK_UNROLL
                for (int j = 0; j < nt; j++) s1[h][j] = s2[h][j] = _mm256_setzero_si256();
            CK_UNROLL
            for (int c = 0; c < 4; c++) {
                CK_UNROLL
                for (int h = 0; h < nh; h++) {
                    __m256i v = _mm256_loadu_si256((const __m256i *)(q + 64 * c + 32 * h));
                    __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                    CK_UNROLL
                    for (int j = 0; j < nt; j++) {
                        s1[h][j] = _mm256_add_epi16(s1[h][j], _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(dg[j][c])),
                                                                               _mm256_maddubs_epi16(hi, _mm256_set1_epi32(dg[j][c + 4]))));
                        s2[h][j] = _mm256_add_epi16(s2[h][j], _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(dg[j][8 + c])),
                                                                               _mm256_maddubs_epi16(hi, _mm256_set1_epi32(dg[j][12 + c]))));
                    }
                }
            }
            CK_UNROLL
            for (int j = 0; j < nt; j++) {
                const float *scale = (const float *)(xs[j] + nb * 64), *sum = scale + nb;
                CK_UNROLL
                for (int h = 0; h < nh; h++) {
                    __m256i t = _mm256_add_epi32(_mm256_madd_epi16(s1[h][j], two8), _mm256_madd_epi16(s2[h][j], ones));
                    // Σx·m enters beside X·w, so that each block adds to the accumulator once.
                    __m256 v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_mul_ps(d[h], _mm256_set1_ps(scale[b])),
                                               _mm256_mul_ps(m[h], _mm256_set1_ps(sum[b])));
                    acc[h][j] = _mm256_add_ps(acc[h][j], v);
                }
            }
        }
    }
    CK_UNROLL
    for (int h = 0; h < nh; h++) {
        int left = valid - 8 * h;
        CK_UNROLL
        for (int j = 0; j < nt; j++) {
            if (left >= 8) {
                _mm256_storeu_ps(ys[j] + 8 * (h0 + h), acc[h][j]);
            } else {
                float tmp[8];
                _mm256_storeu_ps(tmp, acc[h][j]);
                for (int r = 0; r < left; r++) ys[j][8 * (h0 + h) + r] = tmp[r];
            }
        }
    }
}

/// One group's rows (valid of them, from row 8·h0) times nt vectors.
CK_TARGET static void rows_avx2_n(int type, const uint8_t *G, size_t nb, int h0, int nh, const uint8_t *const *xs,
                                  float *const *ys, int nt, int valid, int prefetch) {
    if (nh == 2) rows_avx2(type, G, nb, h0, 2, xs, ys, 1, valid, prefetch);
    else if (nt == 1) rows_avx2(type, G, nb, h0, 1, xs, ys, 1, valid, prefetch);
    else if (nt == 2) rows_avx2(type, G, nb, h0, 1, xs, ys, 2, valid, prefetch);
    else rows_avx2(type, G, nb, h0, 1, xs, ys, 3, valid, prefetch);
}
#endif

void ck_matmul_packed(int type, const void *P, size_t cols, size_t rows, size_t row_begin, size_t row_end,
                      size_t n, const void *prepared, float *Y, size_t ldy, int cap) {
#ifdef CK_X86
    int level = ck_effective_level(cap);
    size_t nb = cols / 32, stride = ck_digits_stride(type, cols, level), gbytes = PR * nb * ck_block_bytes(type);
    const uint8_t *prep = (const uint8_t *)prepared;
    if (row_end > rows) row_end = rows;
    for (size_t g = row_begin / PR; g * PR < row_end; g++) {
        const uint8_t *G = (const uint8_t *)P + g * gbytes;
        size_t valid = row_end - g * PR < PR ? row_end - g * PR : PR;
        int tile = level == 2 ? 8 : type == CK_Q8_0 ? 2 : NT_AVX2;
        for (size_t j0 = 0; j0 < n; j0 += tile) {
            int nt = n - j0 < (size_t)tile ? (int)(n - j0) : tile;
            const uint8_t *xs[8];
            float *ys[8];
            CK_UNROLL
            for (int j = 0; j < nt; j++) {
                xs[j] = prep + (j0 + j) * stride;
                ys[j] = Y + (j0 + j) * ldy + g * PR;
            }
            if (level == 2) {
                group_512_n(type, G, nb, xs, ys, nt, (__mmask16)((1u << valid) - 1), j0 == 0);
            } else if (nt == 1 && valid > 8) {
                rows_avx2_n(type, G, nb, 0, 2, xs, ys, 1, (int)valid, j0 == 0);
            } else {
                for (int h = 0; h < 2 && 8 * h < (int)valid; h++)
                    rows_avx2_n(type, G, nb, h, 1, xs, ys, nt, (int)valid - 8 * h, j0 == 0 && h == 0);
            }
        }
    }
#else
    (void)type; (void)P; (void)cols; (void)rows; (void)row_begin; (void)row_end; (void)n; (void)prepared; (void)Y;
    (void)ldy; (void)cap;
    abort();   // packed weights exist only where the SIMD kernels do (ck_simd_level() ≥ 1)
#endif
}
