// Quantised dot products and dequantisation for Continuum (see ckernels.h).
// Row-by-row products on the GGUF layout: scalar fp32 for every format (the
// portable fallback and the reference the SIMD kernels are tested against)
// and AVX2/FMA/F16C for F16, BF16 and F32. The SIMD products of the 32-block
// formats run on repacked weights (packed.c).
//
// Block layouts (ggml):
//   Q4_0: f16 d; u8 qs[16]          w[j] = d*((qs[j]&15)-8), w[j+16] = d*((qs[j]>>4)-8)
//   Q4_1: f16 d; f16 m; u8 qs[16]   w[j] = d*(qs[j]&15)+m,   w[j+16] = d*(qs[j]>>4)+m
//   Q8_0: f16 d; i8 qs[32]          w[j] = d*qs[j]
// Dot products use sum_j w[j] x[j] = d * sum_j q[j] x[j] (+ m * sum_j x[j]),
// with the per-block sums of x computed once per vector, not once per row.
// The scalar path and the F16/BF16/F32 kernels stay in fp32.
#include "ckernels.h"
#include "internal.h"

#include <stdlib.h>

// ---------------------------------------------------------------------------
// Scalar helpers

#define f16_to_f32 ck_f16_to_f32
#define load_u16 ck_load_u16

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
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


static int detect_avx512vnni(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
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

int ck_effective_level(int cap) { return cap < ck_simd_level() ? cap : ck_simd_level(); }

size_t ck_prepared_bytes(int type, size_t cols, size_t n, int cap) {
    if (ck_is_block_type(type) && ck_effective_level(cap) >= 1) return n * ck_digits_stride(cols);
    return type == CK_Q4_1 ? n * (cols / 32) * sizeof(float) : 0;
}

void ck_prepare(int type, size_t cols, const float *X, size_t ldx, size_t n, void *prepared, int cap) {
    size_t nb = cols / 32;
    if (ck_is_block_type(type) && ck_effective_level(cap) >= 1) {
        for (size_t j = 0; j < n; j++) ck_quantize_digits(X + j * ldx, cols, (uint8_t *)prepared + j * ck_digits_stride(cols));
    } else if (type == CK_Q4_1) {
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

void ck_matmul_rows(int type, const void *W, size_t cols,
                    size_t row_begin, size_t row_end,
                    const float *X, size_t ldx, size_t n, const void *prepared,
                    float *Y, size_t ldy, int cap) {
    size_t nb = cols / 32;
    size_t rb = row_bytes(type, cols);
#ifdef CK_X86
    int simd = ck_effective_level(cap) >= 1 && !ck_is_block_type(type);
#endif
    const uint8_t *base = (const uint8_t *)W;
    const float *xsum = (const float *)prepared;
    for (size_t r = row_begin; r < row_end; r++) {
        const uint8_t *row = base + r * rb;
        for (size_t j = 0; j < n; j++) {
            float v;
#ifdef CK_X86
            if (simd) v = dot_avx2(type, row, X + j * ldx, cols);
            else
#endif
                v = dot_scalar(type, row, X + j * ldx, type == CK_Q4_1 ? xsum + j * nb : NULL, cols);
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
    if (ck_effective_level(cap) >= 1 && hs % 16 == 0) {
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
