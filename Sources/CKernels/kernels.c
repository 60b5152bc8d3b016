// Quantised dot products and dequantisation for Continuum (see ckernels.h).
//
// Block layouts (ggml):
//   Q4_0: f16 d; u8 qs[16]          w[j] = d*((qs[j]&15)-8), w[j+16] = d*((qs[j]>>4)-8)
//   Q4_1: f16 d; f16 m; u8 qs[16]   w[j] = d*(qs[j]&15)+m,   w[j+16] = d*(qs[j]>>4)+m
//   Q8_0: f16 d; i8 qs[32]          w[j] = d*qs[j]
// Dot products use sum_j w[j] x[j] = d * sum_j q[j] x[j] (+ m * sum_j x[j]),
// with the per-block sums of x computed once per vector, not once per row.
// The AVX2 path for the 32-blocks quantises x to int16 per block first (see
// dot_i16_avx2); the scalar path and the F16/BF16/F32 kernels stay in fp32.
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
        float amax = 0, sum = 0;
        for (int j = 0; j < 32; j++) {
            float a = fabsf(xb[j]);
            if (a > amax) amax = a;
            sum += xb[j];
        }
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
    float tail = 0;
    for (size_t b = 0; b < nb; b++) {
        const xblock *xb = xq + b;
        __m256i w0, w1;
        float d;
        if (type == CK_Q8_0) {
            const uint8_t *blk = row + b * 34;
            d = _cvtsh_ss(load_u16(blk));
            w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(blk + 2)));
            w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(blk + 18)));
        } else if (type == CK_Q4_1) {
            const uint8_t *blk = row + b * 20;
            d = _cvtsh_ss(load_u16(blk));
            tail += _cvtsh_ss(load_u16(blk + 2)) * xb->sum;
            __m128i q = _mm_loadu_si128((const __m128i *)(blk + 4));
            w0 = _mm256_cvtepu8_epi16(_mm_and_si128(q, m4));
            w1 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(q, 4), m4));
        } else { // CK_Q4_0
            const uint8_t *blk = row + b * 18;
            d = _cvtsh_ss(load_u16(blk));
            __m128i q = _mm_loadu_si128((const __m128i *)(blk + 2));
            w0 = _mm256_cvtepi8_epi16(_mm_sub_epi8(_mm_and_si128(q, m4), eight));
            w1 = _mm256_cvtepi8_epi16(_mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(q, 4), m4), eight));
        }
        __m256i ph = _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)xb->hi)),
                                      _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i *)(xb->hi + 16))));
        __m256i pl = _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)xb->lo)),
                                      _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i *)(xb->lo + 16))));
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ph), _mm256_set1_ps(d * xb->scale_hi), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pl), _mm256_set1_ps(d * xb->scale_lo), acc1);
    }
    return hsum256(_mm256_add_ps(acc0, acc1)) + tail;
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
    if (level < 0) level = detect_avx2();
    return level;
#else
    return 0;
#endif
}

void ck_matmul_rows(int type, const void *W, size_t cols,
                    size_t row_begin, size_t row_end,
                    const float *X, size_t ldx, size_t n,
                    float *Y, size_t ldy, int use_simd) {
    size_t nb = cols / 32;
    size_t rb = row_bytes(type, cols);
    int simd = use_simd && ck_simd_level();
    const uint8_t *base = (const uint8_t *)W;
#ifdef CK_X86
    if (simd && (type == CK_Q4_0 || type == CK_Q4_1 || type == CK_Q8_0)) {
        xblock stackbuf[64];
        xblock *xq = n * nb <= 64 ? stackbuf : (xblock *)malloc(n * nb * sizeof(xblock));
        for (size_t j = 0; j < n; j++) quantize_x(X + j * ldx, nb, xq + j * nb);
        for (size_t r = row_begin; r < row_end; r++)
            for (size_t j = 0; j < n; j++)
                Y[j * ldy + r] = dot_i16_avx2(type, base + r * rb, xq + j * nb, nb);
        if (xq != stackbuf) free(xq);
        return;
    }
#endif
    float stackbuf[512];
    float *xsum = stackbuf;
    int need_sums = (type == CK_Q4_1);
    if (need_sums && n * nb > 512) xsum = (float *)malloc(n * nb * sizeof(float));
    if (need_sums) {
        for (size_t j = 0; j < n; j++)
            for (size_t b = 0; b < nb; b++) {
                const float *xb = X + j * ldx + b * 32;
                float s = 0;
                for (int k = 0; k < 32; k++) s += xb[k];
                xsum[j * nb + b] = s;
            }
    }
    for (size_t r = row_begin; r < row_end; r++) {
        const uint8_t *row = base + r * rb;
        for (size_t j = 0; j < n; j++) {
            const float *x = X + j * ldx;
            const float *xs = need_sums ? xsum + j * nb : NULL;
            float v;
#ifdef CK_X86
            if (simd) v = dot_avx2(type, row, x, cols);
            else
#endif
                v = dot_scalar(type, row, x, xs, cols);
            Y[j * ldy + r] = v;
        }
    }
    if (xsum != stackbuf) free(xsum);
}

void ck_dequantize_rows(int type, const void *W, size_t cols,
                        size_t row_begin, size_t row_end, float *out, int use_simd) {
    size_t rb = row_bytes(type, cols);
    const uint8_t *base = (const uint8_t *)W;
    int simd = use_simd && ck_simd_level();
    for (size_t r = row_begin; r < row_end; r++) {
        float *o = out + (r - row_begin) * cols;
#ifdef CK_X86
        if (simd) { dequant_avx2(type, base + r * rb, cols, o); continue; }
#endif
        dequant_scalar(type, base + r * rb, cols, o);
    }
}
