// Quantised dot products and dequantisation for Continuum (see ckernels.h).
// Three implementations of each product, chosen at run time: scalar fp32
// (portable, the fallback), AVX2 (two-part int16 activations) and AVX-512
// VNNI (21-bit activations as int8 digits).
//
// Block layouts (ggml):
//   Q4_0: f16 d; u8 qs[16]          w[j] = d*((qs[j]&15)-8), w[j+16] = d*((qs[j]>>4)-8)
//   Q4_1: f16 d; f16 m; u8 qs[16]   w[j] = d*(qs[j]&15)+m,   w[j+16] = d*(qs[j]>>4)+m
//   Q8_0: f16 d; i8 qs[32]          w[j] = d*qs[j]
// Dot products use sum_j w[j] x[j] = d * sum_j q[j] x[j] (+ m * sum_j x[j]),
// with the per-block sums of x computed once per vector, not once per row.
// The SIMD paths for the 32-blocks turn x into integers per block first (see
// dot_i16_avx2 and dot_vnni); the scalar path and the F16/BF16/F32 kernels
// stay in fp32.
#include "ckernels.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#define CK_X86 1
#include <immintrin.h>
#endif

// ---------------------------------------------------------------------------
// Scalar helpers

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1F;
    uint32_t man = h & 0x3FF;
    uint32_t bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { // subnormal: normalise
            int e = -1;
            do { e++; man <<= 1; } while ((man & 0x400) == 0);
            man &= 0x3FF;
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | (man << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7F800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t load_u16(const uint8_t *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

static size_t row_bytes(int type, size_t cols) {
    switch (type) {
    case CK_F32: return cols * 4;
    case CK_F16: case CK_BF16: return cols * 2;
    case CK_Q4_0: return cols / 32 * 18;
    case CK_Q4_1: return cols / 32 * 20;
    case CK_Q8_0: return cols / 32 * 34;
    default: return 0;
    }
}

/// Largest |x| of a 32-block; its exact sum goes to *sum.
static float block_stats(const float *xb, float *sum) {
    float amax = 0, s = 0;
    for (int j = 0; j < 32; j++) {
        float a = fabsf(xb[j]);
        if (a > amax) amax = a;
        s += xb[j];
    }
    *sum = s;
    return amax;
}

// ---------------------------------------------------------------------------
// Scalar path

static float dot_scalar(int type, const uint8_t *row, const float *x, const float *xsum, size_t cols) {
    float acc = 0;
    size_t nb = cols / 32;
    switch (type) {
    case CK_F32: {
        const float *w = (const float *)row;
        for (size_t i = 0; i < cols; i++) acc += w[i] * x[i];
        return acc;
    }
    case CK_F16:
        for (size_t i = 0; i < cols; i++) acc += f16_to_f32(load_u16(row + 2 * i)) * x[i];
        return acc;
    case CK_BF16:
        for (size_t i = 0; i < cols; i++) acc += bf16_to_f32(load_u16(row + 2 * i)) * x[i];
        return acc;
    case CK_Q4_0:
        for (size_t b = 0; b < nb; b++) {
            const uint8_t *blk = row + b * 18;
            float d = f16_to_f32(load_u16(blk));
            const float *xb = x + b * 32;
            float s = 0;
            for (int j = 0; j < 16; j++) {
                s += (float)((blk[2 + j] & 15) - 8) * xb[j];
                s += (float)((blk[2 + j] >> 4) - 8) * xb[j + 16];
            }
            acc += d * s;
        }
        return acc;
    case CK_Q4_1:
        for (size_t b = 0; b < nb; b++) {
            const uint8_t *blk = row + b * 20;
            float d = f16_to_f32(load_u16(blk));
            float m = f16_to_f32(load_u16(blk + 2));
            const float *xb = x + b * 32;
            float s = 0;
            for (int j = 0; j < 16; j++) {
                s += (float)(blk[4 + j] & 15) * xb[j];
                s += (float)(blk[4 + j] >> 4) * xb[j + 16];
            }
            acc += d * s + m * xsum[b];
        }
        return acc;
    case CK_Q8_0:
        for (size_t b = 0; b < nb; b++) {
            const uint8_t *blk = row + b * 34;
            float d = f16_to_f32(load_u16(blk));
            const int8_t *q = (const int8_t *)(blk + 2);
            const float *xb = x + b * 32;
            float s = 0;
            for (int j = 0; j < 32; j++) s += (float)q[j] * xb[j];
            acc += d * s;
        }
        return acc;
    default:
        return NAN;
    }
}

static void dequant_scalar(int type, const uint8_t *row, size_t cols, float *out) {
    size_t nb = cols / 32;
    switch (type) {
    case CK_F32: memcpy(out, row, cols * 4); return;
    case CK_F16: for (size_t i = 0; i < cols; i++) out[i] = f16_to_f32(load_u16(row + 2 * i)); return;
    case CK_BF16: for (size_t i = 0; i < cols; i++) out[i] = bf16_to_f32(load_u16(row + 2 * i)); return;
    case CK_Q4_0:
        for (size_t b = 0; b < nb; b++) {
            const uint8_t *blk = row + b * 18;
            float d = f16_to_f32(load_u16(blk));
            for (int j = 0; j < 16; j++) {
                out[b * 32 + j] = (float)((blk[2 + j] & 15) - 8) * d;
                out[b * 32 + j + 16] = (float)((blk[2 + j] >> 4) - 8) * d;
            }
        }
        return;
    case CK_Q4_1:
        for (size_t b = 0; b < nb; b++) {
            const uint8_t *blk = row + b * 20;
            float d = f16_to_f32(load_u16(blk));
            float m = f16_to_f32(load_u16(blk + 2));
            for (int j = 0; j < 16; j++) {
                out[b * 32 + j] = (float)(blk[4 + j] & 15) * d + m;
                out[b * 32 + j + 16] = (float)(blk[4 + j] >> 4) * d + m;
            }
        }
        return;
    case CK_Q8_0:
        for (size_t b = 0; b < nb; b++) {
            const uint8_t *blk = row + b * 34;
            float d = f16_to_f32(load_u16(blk));
            const int8_t *q = (const int8_t *)(blk + 2);
            for (int j = 0; j < 32; j++) out[b * 32 + j] = (float)q[j] * d;
        }
        return;
    default:
        for (size_t i = 0; i < cols; i++) out[i] = NAN;
    }
}

// ---------------------------------------------------------------------------
// AVX2 + FMA + F16C path

#ifdef CK_X86
#define CK_TARGET __attribute__((target("avx2,fma,f16c")))

CK_TARGET static inline float hsum256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v);
    __m128 hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    __m128 sh = _mm_movehdup_ps(lo);
    lo = _mm_add_ps(lo, sh);
    sh = _mm_movehl_ps(sh, lo);
    lo = _mm_add_ss(lo, sh);
    return _mm_cvtss_f32(lo);
}

CK_TARGET static inline __m256 u8x8_to_ps(__m128i v) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
}

CK_TARGET static inline __m256 i8x8_to_ps(__m128i v) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
}

// Decode path for the 32-blocks: activations split per block into two int16
// parts, x ≈ s1·q1 + s2·q2 with s2 = s1/65534 (error ≤ max|x_block|·2^-32,
// below fp32 rounding), multiplied with the weights' small integers exactly in
// 32-bit integer lanes (vpmaddwd), then scaled once per block.
typedef struct {
    float scale_hi;   // s1
    float scale_lo;   // s2
    float sum;        // exact Σ x[j] (for Q4_1's offsets)
    float pad;
    int16_t hi[32];   // q1
    int16_t lo[32];   // q2
} xblock;

static void quantize_x(const float *x, size_t nb, xblock *out) {
    for (size_t b = 0; b < nb; b++) {
        const float *xb = x + b * 32;
        float sum;
        float amax = block_stats(xb, &sum);
        float s1 = amax / 32767.0f, s2 = s1 / 65534.0f;
        for (int j = 0; j < 32; j++) {
            float q1 = s1 > 0 ? rintf(xb[j] / s1) : 0;
            float r = xb[j] - q1 * s1;
            float q2 = s2 > 0 ? rintf(r / s2) : 0;
            out[b].hi[j] = (int16_t)q1;
            out[b].lo[j] = (int16_t)(q2 > 32767 ? 32767 : q2 < -32767 ? -32767 : q2);
        }
        out[b].scale_hi = s1;
        out[b].scale_lo = s2;
        out[b].sum = sum;
    }
}

CK_TARGET static float dot_i16_avx2(int type, const uint8_t *row, const xblock *xq, size_t nb) {
    const __m128i m4 = _mm_set1_epi8(15);
    const __m128i eight = _mm_set1_epi8(8);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    __m128 tail = _mm_setzero_ps();   // lane 2 accumulates m·Σx (Q4_1)
    for (size_t b = 0; b < nb; b++) {
        const xblock *xb = xq + b;
        __m256i w0, w1;
        __m128 dm;   // [d, d, m, 0]
        if (type == CK_Q8_0) {
            const uint8_t *blk = row + b * 34;
            dm = _mm_cvtph_ps(_mm_cvtsi32_si128(load_u16(blk)));            // [d, 0, 0, 0]
            w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(blk + 2)));
            w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(blk + 18)));
        } else if (type == CK_Q4_1) {
            const uint8_t *blk = row + b * 20;
            uint32_t dmBits;
            memcpy(&dmBits, blk, 4);
            dm = _mm_cvtph_ps(_mm_cvtsi32_si128((int)dmBits));              // [d, m, 0, 0]
            __m128i q = _mm_loadu_si128((const __m128i *)(blk + 4));
            w0 = _mm256_cvtepu8_epi16(_mm_and_si128(q, m4));
            w1 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(q, 4), m4));
        } else { // CK_Q4_0: the -8 is applied to the integers
            const uint8_t *blk = row + b * 18;
            dm = _mm_cvtph_ps(_mm_cvtsi32_si128(load_u16(blk)));            // [d, 0, 0, 0]
            __m128i q = _mm_loadu_si128((const __m128i *)(blk + 2));
            w0 = _mm256_cvtepi8_epi16(_mm_sub_epi8(_mm_and_si128(q, m4), eight));
            w1 = _mm256_cvtepi8_epi16(_mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(q, 4), m4), eight));
        }
        dm = _mm_shuffle_ps(dm, dm, _MM_SHUFFLE(3, 1, 0, 0));               // [d, d, m, 0]
        __m128 prod = _mm_mul_ps(dm, _mm_loadu_ps(&xb->scale_hi));          // [d·s1, d·s2, m·Σx, 0]
        tail = _mm_add_ps(tail, prod);
        __m256i ph = _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)xb->hi)),
                                      _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i *)(xb->hi + 16))));
        __m256i pl = _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)xb->lo)),
                                      _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i *)(xb->lo + 16))));
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ph), _mm256_broadcastss_ps(prod), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pl), _mm256_broadcastss_ps(_mm_movehdup_ps(prod)), acc1);
    }
    float lanes[4];
    _mm_storeu_ps(lanes, tail);
    return hsum256(_mm256_add_ps(acc0, acc1)) + lanes[2];
}

/// fp32 dot products for the unquantised formats (F16, BF16, F32).
CK_TARGET static float dot_avx2(int type, const uint8_t *row, const float *x, size_t cols) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    float tail = 0;
    switch (type) {
    case CK_F16: {
        size_t i = 0;
        for (; i + 16 <= cols; i += 16) {
            acc0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + 2 * i))), _mm256_loadu_ps(x + i), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + 2 * i + 16))), _mm256_loadu_ps(x + i + 8), acc1);
        }
        for (; i < cols; i++) tail += f16_to_f32(load_u16(row + 2 * i)) * x[i];
        break;
    }
    case CK_BF16: {
        size_t i = 0;
        for (; i + 8 <= cols; i += 8) {
            __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(row + 2 * i))), 16);
            acc0 = _mm256_fmadd_ps(_mm256_castsi256_ps(w), _mm256_loadu_ps(x + i), acc0);
        }
        for (; i < cols; i++) tail += bf16_to_f32(load_u16(row + 2 * i)) * x[i];
        break;
    }
    case CK_F32: {
        const float *w = (const float *)row;
        size_t i = 0;
        for (; i + 16 <= cols; i += 16) {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), acc1);
        }
        for (; i < cols; i++) tail += w[i] * x[i];
        break;
    }
    default:
        return NAN;
    }
    return hsum256(_mm256_add_ps(acc0, acc1)) + tail;
}

CK_TARGET static void dequant_avx2(int type, const uint8_t *row, size_t cols, float *out) {
    size_t nb = cols / 32;
    const __m128i m4 = _mm_set1_epi8(15);
    switch (type) {
    case CK_Q4_1:
        for (size_t b = 0; b < nb; b++) {
            const uint8_t *blk = row + b * 20;
            __m256 d = _mm256_set1_ps(_cvtsh_ss(load_u16(blk)));
            __m256 m = _mm256_set1_ps(_cvtsh_ss(load_u16(blk + 2)));
            __m128i q = _mm_loadu_si128((const __m128i *)(blk + 4));
            __m128i lo = _mm_and_si128(q, m4);
            __m128i hi = _mm_and_si128(_mm_srli_epi16(q, 4), m4);
            float *o = out + b * 32;
            _mm256_storeu_ps(o, _mm256_fmadd_ps(u8x8_to_ps(lo), d, m));
            _mm256_storeu_ps(o + 8, _mm256_fmadd_ps(u8x8_to_ps(_mm_srli_si128(lo, 8)), d, m));
            _mm256_storeu_ps(o + 16, _mm256_fmadd_ps(u8x8_to_ps(hi), d, m));
            _mm256_storeu_ps(o + 24, _mm256_fmadd_ps(u8x8_to_ps(_mm_srli_si128(hi, 8)), d, m));
        }
        return;
    case CK_Q8_0:
        for (size_t b = 0; b < nb; b++) {
            const uint8_t *blk = row + b * 34;
            __m256 d = _mm256_set1_ps(_cvtsh_ss(load_u16(blk)));
            float *o = out + b * 32;
            for (int k = 0; k < 4; k++)
                _mm256_storeu_ps(o + 8 * k, _mm256_mul_ps(i8x8_to_ps(_mm_loadl_epi64((const __m128i *)(blk + 2 + 8 * k))), d));
        }
        return;
    case CK_F16: {
        size_t i = 0;
        for (; i + 8 <= cols; i += 8) _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + 2 * i))));
        for (; i < cols; i++) out[i] = f16_to_f32(load_u16(row + 2 * i));
        return;
    }
    default:
        dequant_scalar(type, row, cols, out);
    }
}


// AVX-512 VNNI path for the 32-blocks. Activations become integers per block,
// X = round(x / s) with |X| < 2^20 (s = max|x_block| / (2^20 - 1), error
// ≤ s/2, about 2^-21 of the block's largest |x|), written as three balanced
// base-128 int8 digits X = q1·2^14 + q2·2^7 + q3. vpdpbusd multiplies 64
// weights (as u8) with each digit plane exactly in int32 lanes; Horner steps
// combine the planes. Q8_0 weights are offset to u8 by +128 and corrected
// with 128·ΣX per lane. Plane order per pair of blocks A, B (64 values):
//   Q4_*: [A0..15, B0..15, A16..31, B16..31] (how their nibbles unpack)
//   Q8_0: [A0..31, B0..31]
#define XQ_MAX 1048575

static int q4_position(size_t b, int j) {
    size_t k = b / 2;
    int chunk = (j < 16 ? 0 : 2) + (int)(b & 1);
    return (int)(k * 64 + chunk * 16 + (j & 15));
}

/// Prepared activations for one vector: 3 planes of cols int8, then per block
/// (scale, exact sum) float pairs, then (nb/2)*16 int32 corrections.
static size_t xq8_bytes(size_t cols) {
    size_t nb = cols / 32;
    return 3 * cols + nb * 4 * 2 + (nb / 2) * 16 * 4;
}

static void quantize_x8(int type, const float *x, size_t cols, uint8_t *buf) {
    size_t nb = cols / 32;
    int8_t *p1 = (int8_t *)buf, *p2 = p1 + cols, *p3 = p2 + cols;
    float *ss = (float *)(buf + 3 * cols);
    int32_t *corr = (int32_t *)(ss + 2 * nb);
    int32_t Xs[32];
    for (size_t b = 0; b < nb; b++) {
        const float *xb = x + b * 32;
        float s;
        float amax = block_stats(xb, &s);
        float sc = amax / (float)XQ_MAX;
        float inv = amax > 0 ? (float)XQ_MAX / amax : 0;
        ss[2 * b] = sc;
        ss[2 * b + 1] = s;
        for (int j = 0; j < 32; j++) {
            long v = lrintf(xb[j] * inv);
            if (v > XQ_MAX) v = XQ_MAX;
            if (v < -XQ_MAX) v = -XQ_MAX;
            int32_t X = (int32_t)v;
            Xs[j] = X;
            int32_t d3 = ((X + 64) & 127) - 64;
            int32_t r = (X - d3) >> 7;
            int32_t d2 = ((r + 64) & 127) - 64;
            int32_t d1 = (r - d2) >> 7;
            int pos = type == CK_Q8_0 ? (int)(b * 32 + j) : q4_position(b, j);
            p1[pos] = (int8_t)d1;
            p2[pos] = (int8_t)d2;
            p3[pos] = (int8_t)d3;
        }
        if (type == CK_Q8_0) {
            // Lane l of pair b/2 covers plane positions 4l..4l+3 of the pair.
            for (int l = 0; l < 8; l++) {
                int32_t t = Xs[4 * l] + Xs[4 * l + 1] + Xs[4 * l + 2] + Xs[4 * l + 3];
                corr[(b / 2) * 16 + (b & 1) * 8 + l] = 128 * t;
            }
        }
    }
}

#define CK_TARGET512 __attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma,f16c")))

/// One or two prepared vectors (`two` is a compile-time constant at each call
/// site) against one row; each pair of weight blocks is unpacked once.
CK_TARGET512 static inline __attribute__((always_inline))
void vnni_row(int type, const uint8_t *row, const uint8_t *buf, const uint8_t *buf2, size_t cols, float *out,
              const int two) {
    size_t nb = cols / 32;
    const uint8_t *bufs[2] = {buf, two ? buf2 : buf};
    const __m256i m4 = _mm256_set1_epi8(15);
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    const __m128 q40 = _mm_setr_ps(1, -8, 1, -8);
    // Which 32-bit lanes belong to block B of the pair.
    const __mmask16 laneB = type == CK_Q8_0 ? 0xFF00 : 0xF0F0;
    __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    __m128 tail[2] = {_mm_setzero_ps(), _mm_setzero_ps()};   // lanes 1 and 3 accumulate m·Σx
    for (size_t k = 0; k < nb / 2; k++) {
        __m512i w;
        __m128 dm;   // [dA, mA, dB, mB]
        if (type == CK_Q8_0) {
            const uint8_t *blkA = row + 2 * k * 34, *blkB = blkA + 34;
            // Each 32-bit lane holds one half (d) and a zero half: [dA, 0, dB, 0].
            dm = _mm_cvtph_ps(_mm_setr_epi32(load_u16(blkA), load_u16(blkB), 0, 0));
            w = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(blkA + 2))),
                                   _mm256_loadu_si256((const __m256i *)(blkB + 2)), 1);
            w = _mm512_xor_si512(w, flip);
        } else {
            const uint8_t *blkA, *blkB, *qA, *qB;
            if (type == CK_Q4_1) {
                blkA = row + 2 * k * 20; blkB = blkA + 20; qA = blkA + 4; qB = blkB + 4;
                uint32_t a, b;
                memcpy(&a, blkA, 4);
                memcpy(&b, blkB, 4);
                dm = _mm_cvtph_ps(_mm_setr_epi32((int)a, (int)b, 0, 0));   // [dA, mA, dB, mB]
            } else {   // Q4_0: m = -8·d
                blkA = row + 2 * k * 18; blkB = blkA + 18; qA = blkA + 2; qB = blkB + 2;
                dm = _mm_cvtph_ps(_mm_setr_epi32(load_u16(blkA), load_u16(blkB), 0, 0));   // [dA, 0, dB, 0]
                dm = _mm_mul_ps(_mm_moveldup_ps(dm), q40);
            }
            __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)qA)),
                                                _mm_loadu_si128((const __m128i *)qB), 1);
            __m256i lo = _mm256_and_si256(v, m4);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
            w = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
        }
        for (int j = 0; j <= two; j++) {
            const int8_t *p1 = (const int8_t *)bufs[j], *p2 = p1 + cols, *p3 = p2 + cols;
            const float *ss = (const float *)(bufs[j] + 3 * cols);   // [scale, sum] per block
            __m128 prod = _mm_mul_ps(dm, _mm_loadu_ps(ss + 4 * k));  // [dA·sA, mA·ΣA, dB·sB, mB·ΣB]
            tail[j] = _mm_add_ps(tail[j], prod);
            __m512i t = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, _mm512_loadu_si512(p1 + 64 * k));
            t = _mm512_slli_epi32(t, 7);
            t = _mm512_dpbusd_epi32(t, w, _mm512_loadu_si512(p2 + 64 * k));
            t = _mm512_slli_epi32(t, 7);
            t = _mm512_dpbusd_epi32(t, w, _mm512_loadu_si512(p3 + 64 * k));
            if (type == CK_Q8_0) t = _mm512_sub_epi32(t, _mm512_loadu_si512((const int32_t *)(ss + 2 * nb) + 16 * k));
            __m512 sv = _mm512_mask_blend_ps(laneB, _mm512_broadcastss_ps(prod),
                                             _mm512_broadcastss_ps(_mm_movehl_ps(prod, prod)));
            acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), sv, acc[j]);
        }
    }
    for (int j = 0; j <= two; j++) {
        float lanes[4];
        _mm_storeu_ps(lanes, tail[j]);
        out[j] = _mm512_reduce_add_ps(acc[j]) + lanes[1] + lanes[3];
    }
}

CK_TARGET512 static float dot_vnni(int type, const uint8_t *row, const uint8_t *buf, size_t cols) {
    float out[1];
    vnni_row(type, row, buf, buf, cols, out, 0);
    return out[0];
}

CK_TARGET512 static void dot_vnni2(int type, const uint8_t *row, const uint8_t *buf, const uint8_t *buf2, size_t cols,
                                   float *out) {
    vnni_row(type, row, buf, buf2, cols, out, 1);
}

// ---------------------------------------------------------------------------
// Transposed products (the backward pass's dL/dx = dL/dy · W) for the
// 32-blocks: each weight block is unpacked in registers, to exactly the
// values dequant_avx2 writes, and multiplied with a group of vectors whose
// accumulators stay in registers over a stretch of rows; nothing is written
// out but dX. AVX-512 keeps a whole block (2 zmm) for up to 8 vectors,
// AVX2 half a block (2 ymm) for up to 4.
#define T_ROWS 256

CK_TARGET512 static inline __attribute__((always_inline))
void unpack_block512(int type, const uint8_t *blk, __m512 *w0, __m512 *w1) {
    const __m128i m4 = _mm_set1_epi8(15);
    if (type == CK_Q8_0) {
        __m512 d = _mm512_set1_ps(_cvtsh_ss(load_u16(blk)));
        *w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 2)))), d);
        *w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 18)))), d);
    } else if (type == CK_Q4_1) {
        __m512 d = _mm512_set1_ps(_cvtsh_ss(load_u16(blk)));
        __m512 m = _mm512_set1_ps(_cvtsh_ss(load_u16(blk + 2)));
        __m128i q = _mm_loadu_si128((const __m128i *)(blk + 4));
        __m128i lo = _mm_and_si128(q, m4), hi = _mm_and_si128(_mm_srli_epi16(q, 4), m4);
        *w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), d, m);
        *w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), d, m);
    } else {   // Q4_0
        __m512 d = _mm512_set1_ps(_cvtsh_ss(load_u16(blk)));
        const __m512i eight = _mm512_set1_epi32(8);
        __m128i q = _mm_loadu_si128((const __m128i *)(blk + 2));
        __m128i lo = _mm_and_si128(q, m4), hi = _mm_and_si128(_mm_srli_epi16(q, 4), m4);
        *w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(lo), eight)), d);
        *w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(hi), eight)), d);
    }
}

/// dX[j, 32b..32b+32) += Σ_r dY[j, r] · W[r, 32b..32b+32) for J vectors and rows [r0, r1).
CK_TARGET512 static inline __attribute__((always_inline))
void tgroup512(int type, const uint8_t *base, size_t rb, size_t bs, size_t b, size_t r0, size_t r1,
               const float *dY, size_t ldy, float *dX, size_t ldx, const int J, size_t prefetch) {
    __m512 acc[16];
    for (int j = 0; j < J; j++) {
        acc[2 * j] = _mm512_loadu_ps(dX + j * ldx + 32 * b);
        acc[2 * j + 1] = _mm512_loadu_ps(dX + j * ldx + 32 * b + 16);
    }
    for (size_t r = r0; r < r1; r++) {
        __m512 w0, w1;
        // The first pass over a stretch fetches its rows' columns ahead
        // (the hardware prefetcher does not follow this stride across pages).
        for (size_t o = 0; o < prefetch; o += 64) _mm_prefetch((const char *)(base + (r + 8) * rb + b * bs + o), _MM_HINT_T0);
        unpack_block512(type, base + r * rb + b * bs, &w0, &w1);
        for (int j = 0; j < J; j++) {
            __m512 s = _mm512_set1_ps(dY[j * ldy + r]);
            acc[2 * j] = _mm512_fmadd_ps(s, w0, acc[2 * j]);
            acc[2 * j + 1] = _mm512_fmadd_ps(s, w1, acc[2 * j + 1]);
        }
    }
    for (int j = 0; j < J; j++) {
        _mm512_storeu_ps(dX + j * ldx + 32 * b, acc[2 * j]);
        _mm512_storeu_ps(dX + j * ldx + 32 * b + 16, acc[2 * j + 1]);
    }
}

CK_TARGET512 static void tmatmul512(int type, const uint8_t *base, size_t rb, size_t bs, size_t b0, size_t b1,
                                    size_t rows, const float *dY, size_t ldy, size_t n, float *dX, size_t ldx) {
    // Software prefetch only for a matrix beyond the caches (the LM head):
    // smaller ones stay in L2 from one call to the next.
    int big = rows * rb > ((size_t)8 << 20);
    for (size_t r0 = 0; r0 < rows; r0 += T_ROWS) {
        size_t r1 = r0 + T_ROWS < rows ? r0 + T_ROWS : rows;
        for (size_t b = b0; b < b1; b++) {
            for (size_t j0 = 0; j0 < n; j0 += 8) {
                size_t pf = big && b == b0 && j0 == 0 && r1 + 8 <= rows ? (b1 - b0) * bs : 0;
                const float *y = dY + j0 * ldy;
                float *x = dX + j0 * ldx;
                switch (n - j0 < 8 ? n - j0 : 8) {
#define T512(J) case J: tgroup512(type, base, rb, bs, b, r0, r1, y, ldy, x, ldx, J, pf); break;
                T512(1) T512(2) T512(3) T512(4) T512(5) T512(6) T512(7) T512(8)
#undef T512
                }
            }
        }
    }
}

/// Half `h` of a block (16 values) as two ymm, as dequant_avx2 computes them.
CK_TARGET static inline __attribute__((always_inline))
void unpack_half256(int type, const uint8_t *blk, int h, __m256 *w0, __m256 *w1) {
    const __m128i m4 = _mm_set1_epi8(15);
    __m256 d = _mm256_set1_ps(_cvtsh_ss(load_u16(blk)));
    if (type == CK_Q8_0) {
        *w0 = _mm256_mul_ps(i8x8_to_ps(_mm_loadl_epi64((const __m128i *)(blk + 2 + 16 * h))), d);
        *w1 = _mm256_mul_ps(i8x8_to_ps(_mm_loadl_epi64((const __m128i *)(blk + 10 + 16 * h))), d);
        return;
    }
    __m128i q = _mm_loadu_si128((const __m128i *)(blk + (type == CK_Q4_1 ? 4 : 2)));
    __m128i nib = h ? _mm_and_si128(_mm_srli_epi16(q, 4), m4) : _mm_and_si128(q, m4);
    if (type == CK_Q4_1) {
        __m256 m = _mm256_set1_ps(_cvtsh_ss(load_u16(blk + 2)));
        *w0 = _mm256_fmadd_ps(u8x8_to_ps(nib), d, m);
        *w1 = _mm256_fmadd_ps(u8x8_to_ps(_mm_srli_si128(nib, 8)), d, m);
    } else {   // Q4_0
        const __m256i eight = _mm256_set1_epi32(8);
        *w0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(nib), eight)), d);
        *w1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(nib, 8)), eight)), d);
    }
}

CK_TARGET static inline __attribute__((always_inline))
void tgroup256(int type, const uint8_t *base, size_t rb, size_t bs, size_t b, int h, size_t r0, size_t r1,
               const float *dY, size_t ldy, float *dX, size_t ldx, const int J, size_t prefetch) {
    __m256 acc[8];
    size_t c = 32 * b + 16 * h;
    for (int j = 0; j < J; j++) {
        acc[2 * j] = _mm256_loadu_ps(dX + j * ldx + c);
        acc[2 * j + 1] = _mm256_loadu_ps(dX + j * ldx + c + 8);
    }
    for (size_t r = r0; r < r1; r++) {
        __m256 w0, w1;
        for (size_t o = 0; o < prefetch; o += 64) _mm_prefetch((const char *)(base + (r + 8) * rb + b * bs + o), _MM_HINT_T0);
        unpack_half256(type, base + r * rb + b * bs, h, &w0, &w1);
        for (int j = 0; j < J; j++) {
            __m256 s = _mm256_set1_ps(dY[j * ldy + r]);
            acc[2 * j] = _mm256_fmadd_ps(s, w0, acc[2 * j]);
            acc[2 * j + 1] = _mm256_fmadd_ps(s, w1, acc[2 * j + 1]);
        }
    }
    for (int j = 0; j < J; j++) {
        _mm256_storeu_ps(dX + j * ldx + c, acc[2 * j]);
        _mm256_storeu_ps(dX + j * ldx + c + 8, acc[2 * j + 1]);
    }
}

CK_TARGET static void tmatmul256(int type, const uint8_t *base, size_t rb, size_t bs, size_t b0, size_t b1,
                                 size_t rows, const float *dY, size_t ldy, size_t n, float *dX, size_t ldx) {
    // Software prefetch only for a matrix beyond the caches (the LM head):
    // smaller ones stay in L2 from one call to the next.
    int big = rows * rb > ((size_t)8 << 20);
    for (size_t r0 = 0; r0 < rows; r0 += T_ROWS) {
        size_t r1 = r0 + T_ROWS < rows ? r0 + T_ROWS : rows;
        for (size_t b = b0; b < b1; b++) {
            for (int h = 0; h < 2; h++) {
                for (size_t j0 = 0; j0 < n; j0 += 4) {
                    size_t pf = big && b == b0 && h == 0 && j0 == 0 && r1 + 8 <= rows ? (b1 - b0) * bs : 0;
                    const float *y = dY + j0 * ldy;
                    float *x = dX + j0 * ldx;
                    switch (n - j0 < 4 ? n - j0 : 4) {
#define T256(J) case J: tgroup256(type, base, rb, bs, b, h, r0, r1, y, ldy, x, ldx, J, pf); break;
                    T256(1) T256(2) T256(3) T256(4)
#undef T256
                    }
                }
            }
        }
    }
}

static int detect_avx512vnni(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vnni");
}

static int detect_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
#endif

// ---------------------------------------------------------------------------
// Dispatch

int ck_simd_level(void) {
#ifdef CK_X86
    static int level = -1;
    if (level < 0) {
        int found = detect_avx2() ? (detect_avx512vnni() ? 2 : 1) : 0;
        // CONTINUUM_KERNELS=avx2|scalar caps the level (benchmarks, debugging).
        const char *cap = getenv("CONTINUUM_KERNELS");
        if (cap && strcmp(cap, "avx2") == 0 && found > 1) found = 1;
        if (cap && strcmp(cap, "scalar") == 0) found = 0;
        level = found;
    }
    return level;
#else
    return 0;
#endif
}

static int is_block_type(int type) { return type == CK_Q4_0 || type == CK_Q4_1 || type == CK_Q8_0; }

/// The kernel level actually used for `type` given the caller's cap.
static int effective_level(int type, size_t cols, int cap) {
    int level = cap < ck_simd_level() ? cap : ck_simd_level();
    if (level == 2 && !(is_block_type(type) && (cols / 32) % 2 == 0)) level = 1;
    return level;
}

size_t ck_prepared_bytes(int type, size_t cols, size_t n, int cap) {
    switch (effective_level(type, cols, cap)) {
#ifdef CK_X86
    case 2: return n * xq8_bytes(cols);
    case 1: return is_block_type(type) ? n * (cols / 32) * sizeof(xblock) : 0;
#endif
    default: return type == CK_Q4_1 ? n * (cols / 32) * sizeof(float) : 0;
    }
}

void ck_prepare(int type, size_t cols, const float *X, size_t ldx, size_t n, void *prepared, int cap) {
    size_t nb = cols / 32;
    switch (effective_level(type, cols, cap)) {
#ifdef CK_X86
    case 2:
        for (size_t j = 0; j < n; j++) quantize_x8(type, X + j * ldx, cols, (uint8_t *)prepared + j * xq8_bytes(cols));
        return;
    case 1:
        if (is_block_type(type))
            for (size_t j = 0; j < n; j++) quantize_x(X + j * ldx, nb, (xblock *)prepared + j * nb);
        return;
#endif
    default:
        if (type == CK_Q4_1) {
            float *xsum = (float *)prepared;
            for (size_t j = 0; j < n; j++)
                for (size_t b = 0; b < nb; b++) {
                    const float *xb = X + j * ldx + b * 32;
                    float s = 0;
                    for (int k = 0; k < 32; k++) s += xb[k];
                    xsum[j * nb + b] = s;
                }
        }
    }
}

void ck_matmul_rows(int type, const void *W, size_t cols,
                    size_t row_begin, size_t row_end,
                    const float *X, size_t ldx, size_t n, const void *prepared,
                    float *Y, size_t ldy, int cap) {
    size_t nb = cols / 32;
    size_t rb = row_bytes(type, cols);
    int level = effective_level(type, cols, cap);
    const uint8_t *base = (const uint8_t *)W;
    const uint8_t *prep = (const uint8_t *)prepared;
    for (size_t r = row_begin; r < row_end; r++) {
        const uint8_t *row = base + r * rb;
#ifdef CK_X86
        if (r + 4 < row_end)   // the hardware prefetcher does not cross pages
            for (size_t o = 0; o < rb; o += 64) _mm_prefetch((const char *)(row + 4 * rb + o), _MM_HINT_T0);
        if (level == 2) {   // vectors two at a time share the unpacked weights
            size_t stride = xq8_bytes(cols), j = 0;
            for (; j + 2 <= n; j += 2) {
                float out[2];
                dot_vnni2(type, row, prep + j * stride, prep + (j + 1) * stride, cols, out);
                Y[j * ldy + r] = out[0];
                Y[(j + 1) * ldy + r] = out[1];
            }
            if (j < n) Y[j * ldy + r] = dot_vnni(type, row, prep + j * stride, cols);
            continue;
        }
#endif
        for (size_t j = 0; j < n; j++) {
            float v;
#ifdef CK_X86
            if (level == 1 && is_block_type(type)) v = dot_i16_avx2(type, row, (const xblock *)prep + j * nb, nb);
            else if (level == 1) v = dot_avx2(type, row, X + j * ldx, cols);
            else
#endif
                v = dot_scalar(type, row, X + j * ldx, type == CK_Q4_1 ? (const float *)prep + j * nb : NULL, cols);
            Y[j * ldy + r] = v;
        }
    }
}

void ck_dequantize_rows(int type, const void *W, size_t cols,
                        size_t row_begin, size_t row_end, float *out, int cap) {
    size_t rb = row_bytes(type, cols);
    const uint8_t *base = (const uint8_t *)W;
    int simd = (cap < ck_simd_level() ? cap : ck_simd_level()) >= 1;
    for (size_t r = row_begin; r < row_end; r++) {
        float *o = out + (r - row_begin) * cols;
#ifdef CK_X86
        if (simd) { dequant_avx2(type, base + r * rb, cols, o); continue; }
#endif
        dequant_scalar(type, base + r * rb, cols, o);
    }
}

void ck_matmul_t(int type, const void *W, size_t cols, size_t rows, size_t col_begin, size_t col_end,
                 const float *dY, size_t ldy, size_t n, float *dX, size_t ldx, int cap) {
    size_t rb = row_bytes(type, cols);
    const uint8_t *base = (const uint8_t *)W;
    int level = cap < ck_simd_level() ? cap : ck_simd_level();
#ifdef CK_X86
    if (level >= 1 && is_block_type(type)) {
        size_t bs = row_bytes(type, 32);
        if (level == 2) tmatmul512(type, base, rb, bs, col_begin / 32, col_end / 32, rows, dY, ldy, n, dX, ldx);
        else tmatmul256(type, base, rb, bs, col_begin / 32, col_end / 32, rows, dY, ldy, n, dX, ldx);
        return;
    }
#endif
    // Any other type or level: dequantise the row's columns, then one axpy per vector.
    size_t width = col_end - col_begin, offset = row_bytes(type, col_begin);
    float *w = (float *)malloc((width ? width : 1) * sizeof(float));
    for (size_t r = 0; r < rows; r++) {
#ifdef CK_X86
        if (level >= 1) dequant_avx2(type, base + r * rb + offset, width, w);
        else
#endif
            dequant_scalar(type, base + r * rb + offset, width, w);
        for (size_t j = 0; j < n; j++) {
            float s = dY[j * ldy + r];
            float *x = dX + j * ldx + col_begin;
            for (size_t c = 0; c < width; c++) x[c] += s * w[c];
        }
    }
    free(w);
}

// ---------------------------------------------------------------------------
// Decode attention: one token's query heads that share a key/value head.
//   q:      [group, hs]           scores: [group, visible] (scratch)
//   k, v:   [visible, ldkv] rows, this head's hs values at the row start
//   out:    [group, hs]
// scores = softmax(scale · q·Kᵀ); out = scores·V. Each K and V row is read
// once for the whole group.

static void attend_scalar(const float *q, const float *k, const float *v, size_t ldkv, size_t visible,
                          size_t group, size_t hs, float scale, float *scores, float *out) {
    for (size_t j = 0; j < visible; j++)
        for (size_t g = 0; g < group; g++) {
            float s = 0;
            for (size_t i = 0; i < hs; i++) s += q[g * hs + i] * k[j * ldkv + i];
            scores[g * visible + j] = s * scale;
        }
    for (size_t g = 0; g < group; g++) {
        float *row = scores + g * visible, m = -INFINITY, z = 0;
        for (size_t j = 0; j < visible; j++) if (row[j] > m) m = row[j];
        for (size_t j = 0; j < visible; j++) { row[j] = expf(row[j] - m); z += row[j]; }
        for (size_t j = 0; j < visible; j++) row[j] /= z;
        for (size_t i = 0; i < hs; i++) out[g * hs + i] = 0;
    }
    for (size_t j = 0; j < visible; j++)
        for (size_t g = 0; g < group; g++) {
            float p = scores[g * visible + j];
            for (size_t i = 0; i < hs; i++) out[g * hs + i] += p * v[j * ldkv + i];
        }
}

#ifdef CK_X86
CK_TARGET static void attend_avx2(const float *q, const float *k, const float *v, size_t ldkv, size_t visible,
                                  size_t group, size_t hs, float scale, float *scores, float *out) {
    for (size_t j = 0; j < visible; j++) {
        const float *kj = k + j * ldkv;
        for (size_t g = 0; g < group; g++) {
            const float *qg = q + g * hs;
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
            for (size_t i = 0; i < hs; i += 16) {
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + i), _mm256_loadu_ps(kj + i), a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + i + 8), _mm256_loadu_ps(kj + i + 8), a1);
            }
            scores[g * visible + j] = hsum256(_mm256_add_ps(a0, a1)) * scale;
        }
    }
    for (size_t g = 0; g < group; g++) {
        float *row = scores + g * visible, m = -INFINITY, z = 0;
        for (size_t j = 0; j < visible; j++) if (row[j] > m) m = row[j];
        for (size_t j = 0; j < visible; j++) { row[j] = expf(row[j] - m); z += row[j]; }
        float inv = 1 / z;
        for (size_t j = 0; j < visible; j++) row[j] *= inv;
        for (size_t i = 0; i < hs; i++) out[g * hs + i] = 0;
    }
    for (size_t j = 0; j < visible; j++) {
        const float *vj = v + j * ldkv;
        for (size_t g = 0; g < group; g++) {
            __m256 p = _mm256_set1_ps(scores[g * visible + j]);
            float *o = out + g * hs;
            for (size_t i = 0; i < hs; i += 8)
                _mm256_storeu_ps(o + i, _mm256_fmadd_ps(p, _mm256_loadu_ps(vj + i), _mm256_loadu_ps(o + i)));
        }
    }
}
#endif

void ck_attend(const float *q, const float *k, const float *v, size_t ldkv, size_t visible,
               size_t group, size_t hs, float scale, float *scores, float *out, int cap) {
#ifdef CK_X86
    if ((cap < ck_simd_level() ? cap : ck_simd_level()) >= 1 && hs % 16 == 0) {
        attend_avx2(q, k, v, ldkv, visible, group, hs, scale, scores, out);
        return;
    }
#endif
    attend_scalar(q, k, v, ldkv, visible, group, hs, scale, scores, out);
}

void ck_cpu_relax(void) {
#ifdef CK_X86
    _mm_pause();
#endif
}
