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
    int level = ck_effective_level(cap);
    if (ck_is_block_type(type) && level >= 1) return n * ck_digits_stride(type, cols, level);
    return type == CK_Q4_1 ? n * (cols / 32) * sizeof(float) : 0;
}

void ck_prepare(int type, size_t cols, const float *X, size_t ldx, size_t n, void *prepared, int cap) {
    size_t nb = cols / 32;
    int level = ck_effective_level(cap);
    if (ck_is_block_type(type) && level >= 1) {
        size_t stride = ck_digits_stride(type, cols, level);
        for (size_t j = 0; j < n; j++) ck_quantize_digits(type, X + j * ldx, cols, (uint8_t *)prepared + j * stride, level);
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

#ifdef CK_X86
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

#endif

void ck_matmul_t(int type, const void *W, size_t cols, size_t rows, size_t col_begin, size_t col_end,
                 const float *dY, size_t ldy, size_t n, float *dX, size_t ldx, int cap) {
    size_t rb = row_bytes(type, cols);
    const uint8_t *base = (const uint8_t *)W;
    int level = cap < ck_simd_level() ? cap : ck_simd_level();
#ifdef CK_X86
    if (level >= 1 && ck_is_block_type(type)) {
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
// Decode attention: one token's query heads over a run of `count` cache
// positions (all of them, or one part of a split), every head at once so the
// cache rows are read front to back, once.
//   q:      [H, hs]               scores: [H, count] (scratch)
//   k, v:   [count, ldkv] rows, KVH·hs values each (head h reads head h / (H/KVH))
//   out:    [H, hs] = Σ_j e^(s_hj − m_h)·v_j, s = scale · q·Kᵀ (unnormalised)
//   mz:     [H, 2] = (m_h = max_j s_hj, z_h = Σ_j e^(s_hj − m_h))
// Parts combine as out = Σ_p e^(m_p − M)·out_p / Σ_p e^(m_p − M)·z_p.

static void attend_rows_scalar(const float *q, const float *k, const float *v, size_t ldkv, size_t count,
                               size_t heads, size_t kv_heads, size_t hs, float scale, float *scores, float *out,
                               float *mz) {
    size_t group = heads / kv_heads;
    for (size_t h = 0; h < heads; h++) {
        const float *kh = k + h / group * hs, *vh = v + h / group * hs;
        float *row = scores + h * count, m = -INFINITY, z = 0;
        for (size_t j = 0; j < count; j++) {
            float s = 0;
            for (size_t i = 0; i < hs; i++) s += q[h * hs + i] * kh[j * ldkv + i];
            row[j] = s * scale;
            if (row[j] > m) m = row[j];
        }
        for (size_t j = 0; j < count; j++) { row[j] = expf(row[j] - m); z += row[j]; }
        mz[2 * h] = m;
        mz[2 * h + 1] = z;
        for (size_t i = 0; i < hs; i++) out[h * hs + i] = 0;
        for (size_t j = 0; j < count; j++)
            for (size_t i = 0; i < hs; i++) out[h * hs + i] += row[j] * vh[j * ldkv + i];
    }
}

#ifdef CK_X86
/// e^x, x clamped to [−87.3, 88.3] (so e^x stays a normal float): x = n·ln 2
/// + r with |r| ≤ ln 2 / 2 (Cody–Waite), e^r from Cephes' degree-6
/// polynomial (≈1 ulp), times 2^n.
CK_TARGET static inline __m256 exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/// Four dot products q·k0 … q·k3 of hs (multiple of 8) values.
CK_TARGET static inline __m128 dot4(const float *q, const float *k0, const float *k1, const float *k2,
                                    const float *k3, size_t hs) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (size_t i = 0; i < hs; i += 8) {
        __m256 qv = _mm256_loadu_ps(q + i);
        a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + i), a0);
        a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k1 + i), a1);
        a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k2 + i), a2);
        a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k3 + i), a3);
    }
    __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/// Positions per block: a block's K or V rows stay in L1 while every head
/// reads them.
#define ATT_BLOCK 16
/// How many rows ahead the AVX-512 kernel prefetches K and V (a steady
/// stream; measured against no prefetch and whole-block bursts).
#define ATT_PREFETCH_ROWS 16

/// Softmax numerators of each head's row of scores, in place, with the
/// row's max and the numerators' sum: mz[h] = (m_h, z_h).
///   scores: [heads, count]   mz: [heads, 2]
CK_TARGET static void softmax_numerators(float *scores, size_t heads, size_t count, float *mz) {
    for (size_t h = 0; h < heads; h++) {
        float *row = scores + h * count;
        __m256 mv = _mm256_set1_ps(-INFINITY);
        size_t i = 0;
        for (; i + 8 <= count; i += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(row + i));
        float lanes[8], m = -INFINITY, z = 0;
        _mm256_storeu_ps(lanes, mv);
        for (int l = 0; l < 8; l++) if (lanes[l] > m) m = lanes[l];
        for (size_t t = i; t < count; t++) if (row[t] > m) m = row[t];
        __m256 zv = _mm256_setzero_ps(), m8 = _mm256_set1_ps(m);
        for (i = 0; i + 8 <= count; i += 8) {
            __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(row + i), m8));
            _mm256_storeu_ps(row + i, e);
            zv = _mm256_add_ps(zv, e);
        }
        for (; i < count; i++) { row[i] = expf(row[i] - m); z += row[i]; }
        mz[2 * h] = m;
        mz[2 * h + 1] = z + hsum256(zv);
    }
}

CK_TARGET static void attend_rows_avx2(const float *q, const float *k, const float *v, size_t ldkv, size_t count,
                                       size_t heads, size_t kv_heads, size_t hs, float scale, float *scores,
                                       float *out, float *mz) {
    size_t group = heads / kv_heads;
    // Scores, block by block of rows, four positions at a time.
    for (size_t j0 = 0; j0 < count; j0 += ATT_BLOCK) {
        size_t j1 = j0 + ATT_BLOCK < count ? j0 + ATT_BLOCK : count;
        for (size_t o = 0; o < ATT_BLOCK * ldkv * 4; o += 64)
            _mm_prefetch((const char *)(k + j1 * ldkv) + o, _MM_HINT_T0);
        for (size_t h = 0; h < heads; h++) {
            const float *kh = k + h / group * hs, *qh = q + h * hs;
            float *row = scores + h * count;
            size_t j = j0;
            for (; j + 4 <= j1; j += 4) {
                const float *kj = kh + j * ldkv;
                _mm_storeu_ps(row + j, _mm_mul_ps(dot4(qh, kj, kj + ldkv, kj + 2 * ldkv, kj + 3 * ldkv, hs),
                                                  _mm_set1_ps(scale)));
            }
            for (; j < j1; j++) {
                const float *kj = kh + j * ldkv;
                row[j] = _mm_cvtss_f32(dot4(qh, kj, kj, kj, kj, hs)) * scale;
            }
        }
    }
    softmax_numerators(scores, heads, count, mz);
    for (size_t d = 0; d < heads * hs; d++) out[d] = 0;
    // out += p·V, block by block of rows, 64 dimensions of a head in registers.
    for (size_t j0 = 0; j0 < count; j0 += ATT_BLOCK) {
        size_t j1 = j0 + ATT_BLOCK < count ? j0 + ATT_BLOCK : count;
        for (size_t o = 0; o < ATT_BLOCK * ldkv * 4; o += 64)
            _mm_prefetch((const char *)(v + j1 * ldkv) + o, _MM_HINT_T0);
        for (size_t h = 0; h < heads; h++) {
            const float *vh = v + h / group * hs, *p = scores + h * count;
            for (size_t d0 = 0; d0 < hs; d0 += 64) {
                size_t w = hs - d0 < 64 ? (hs - d0) / 8 : 8;
                float *o = out + h * hs + d0;
                __m256 acc[8];
                for (size_t c = 0; c < w; c++) acc[c] = _mm256_loadu_ps(o + 8 * c);
                for (size_t j = j0; j < j1; j++) {
                    __m256 pj = _mm256_broadcast_ss(p + j);
                    const float *vj = vh + j * ldkv + d0;
                    for (size_t c = 0; c < w; c++) acc[c] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 8 * c), acc[c]);
                }
                for (size_t c = 0; c < w; c++) _mm256_storeu_ps(o + 8 * c, acc[c]);
            }
        }
    }
}

/// Σ of each of four vectors' lanes: (Σa0, Σa1, Σa2, Σa3).
CK_TARGET static inline __m128 reduce4_256(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/// AVX2, grouped: scores of G (a compile-time constant, ≤ 3) query heads qg
/// (each [hs]) against the four rows kr[0..3] of their key/value head
/// (offset kh); each K value is loaded once for the G heads.
CK_TARGET static inline __attribute__((always_inline))
void scores4_256(const float *qg, const float *const *kr, size_t kh, size_t hs, const int G, __m128 sc, float *s4) {
    __m256 acc[3][4];
    for (int g = 0; g < G; g++)
        for (int p = 0; p < 4; p++) acc[g][p] = _mm256_setzero_ps();
    for (size_t c = 0; c < hs; c += 8) {
        __m256 kz[4];
        for (int p = 0; p < 4; p++) kz[p] = _mm256_loadu_ps(kr[p] + kh + c);
        for (int g = 0; g < G; g++) {
            __m256 qz = _mm256_loadu_ps(qg + g * hs + c);
            for (int p = 0; p < 4; p++) acc[g][p] = _mm256_fmadd_ps(qz, kz[p], acc[g][p]);
        }
    }
    for (int g = 0; g < G; g++) _mm_storeu_ps(s4 + 4 * g, _mm_mul_ps(reduce4_256(acc[g][0], acc[g][1], acc[g][2], acc[g][3]), sc));
}

/// AVX2, grouped: out[g] += Σ_j p[g·count + j]·v_j for j in [j0, j1), 32
/// dimensions, G (a compile-time constant, ≤ 3) query heads; each V value is
/// loaded once for the G heads.
CK_TARGET static inline __attribute__((always_inline))
void pv_256(const float *p, size_t count, size_t j0, size_t j1, const float *v, size_t ldkv, float *out, size_t hs,
            const int G) {
    __m256 acc[3][4];
    for (int g = 0; g < G; g++)
        for (int c = 0; c < 4; c++) acc[g][c] = _mm256_loadu_ps(out + g * hs + 8 * c);
    for (size_t j = j0; j < j1; j++) {
        const float *vj = v + j * ldkv;
        __m256 pj[3];
        for (int g = 0; g < G; g++) pj[g] = _mm256_broadcast_ss(p + g * count + j);
        for (int c = 0; c < 4; c++) {
            __m256 vz = _mm256_loadu_ps(vj + 8 * c);
            for (int g = 0; g < G; g++) acc[g][c] = _mm256_fmadd_ps(pj[g], vz, acc[g][c]);
        }
    }
    for (int g = 0; g < G; g++)
        for (int c = 0; c < 4; c++) _mm256_storeu_ps(out + g * hs + 8 * c, acc[g][c]);
}

/// AVX2 attention for hs a multiple of 32: the query heads that share a
/// key/value head (up to 3 at a time) read each K and V row once, as the
/// AVX-512 kernel below does (attend_rows_avx2 reads them once per head).
CK_TARGET static void attend_rows_avx2_grouped(const float *q, const float *k, const float *v, size_t ldkv, size_t count,
                                               size_t heads, size_t kv_heads, size_t hs, float scale, float *scores,
                                               float *out, float *mz) {
    size_t group = heads / kv_heads;
    const __m128 sc = _mm_set1_ps(scale);
    // Scores, four positions × up to three heads of a group at a time.
    for (size_t j0 = 0; j0 < count; j0 += 4) {
        size_t np = count - j0 < 4 ? count - j0 : 4;
        for (size_t o = 0; o < 4 * ldkv * 4; o += 64)
            _mm_prefetch((const char *)(k + (j0 + ATT_PREFETCH_ROWS) * ldkv) + o, _MM_HINT_T0);
        const float *kr[4];
        for (size_t p = 0; p < 4; p++) kr[p] = k + (j0 + (p < np ? p : 0)) * ldkv;
        for (size_t kvh = 0; kvh < kv_heads; kvh++)
            for (size_t g0 = 0; g0 < group; g0 += 3) {
                size_t gn = group - g0 < 3 ? group - g0 : 3;
                const float *qg = q + (kvh * group + g0) * hs;
                float s4[12];
                switch (gn) {
                case 1: scores4_256(qg, kr, kvh * hs, hs, 1, sc, s4); break;
                case 2: scores4_256(qg, kr, kvh * hs, hs, 2, sc, s4); break;
                default: scores4_256(qg, kr, kvh * hs, hs, 3, sc, s4); break;
                }
                for (size_t g = 0; g < gn; g++)
                    for (size_t p = 0; p < np; p++) scores[(kvh * group + g0 + g) * count + j0 + p] = s4[4 * g + p];
            }
    }
    softmax_numerators(scores, heads, count, mz);
    // out = p·V, block by block of rows (read once, front to back); per key/value
    // head, up to three of its query heads × 32 dimensions in registers.
    for (size_t h = 0; h < heads * hs; h++) out[h] = 0;
    for (size_t j0 = 0; j0 < count; j0 += ATT_BLOCK) {
        size_t j1 = j0 + ATT_BLOCK < count ? j0 + ATT_BLOCK : count;
        for (size_t o = 0; o < ATT_BLOCK * ldkv * 4; o += 64)
            _mm_prefetch((const char *)(v + (j0 + ATT_PREFETCH_ROWS) * ldkv) + o, _MM_HINT_T0);
        for (size_t kvh = 0; kvh < kv_heads; kvh++)
            for (size_t g0 = 0; g0 < group; g0 += 3) {
                size_t gn = group - g0 < 3 ? group - g0 : 3;
                for (size_t d0 = 0; d0 < hs; d0 += 32) {
                    const float *p0 = scores + (kvh * group + g0) * count, *vh = v + kvh * hs + d0;
                    float *o = out + (kvh * group + g0) * hs + d0;
                    switch (gn) {
                    case 1: pv_256(p0, count, j0, j1, vh, ldkv, o, hs, 1); break;
                    case 2: pv_256(p0, count, j0, j1, vh, ldkv, o, hs, 2); break;
                    default: pv_256(p0, count, j0, j1, vh, ldkv, o, hs, 3); break;
                    }
                }
            }
    }
}

/// AVX-512: the query heads that share a key/value head (up to 4 at a time)
/// read each K and V row once; 64 dimensions per pass.
CK_TARGET512 static inline __m128 reduce4_512(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
#define HALVES(a) _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)))
    __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(HALVES(a0), HALVES(a1)), _mm256_hadd_ps(HALVES(a2), HALVES(a3)));
#undef HALVES
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/// Scores of G (a compile-time constant) query heads qg (each [hs]) against
/// the four rows kr[0..3] of their key/value head (offset kh).
CK_TARGET512 static inline __attribute__((always_inline))
void scores4_512(const float *qg, const float *const *kr, size_t kh, size_t hs, const int G, __m128 sc, float *s4) {
    __m512 acc[4][4];
    for (int g = 0; g < G; g++)
        for (int p = 0; p < 4; p++) acc[g][p] = _mm512_setzero_ps();
    for (size_t c = 0; c < hs; c += 16) {
        __m512 kz[4];
        for (int p = 0; p < 4; p++) kz[p] = _mm512_loadu_ps(kr[p] + kh + c);
        for (int g = 0; g < G; g++) {
            __m512 qz = _mm512_loadu_ps(qg + g * hs + c);
            for (int p = 0; p < 4; p++) acc[g][p] = _mm512_fmadd_ps(qz, kz[p], acc[g][p]);
        }
    }
    for (int g = 0; g < G; g++) _mm_storeu_ps(s4 + 4 * g, _mm_mul_ps(reduce4_512(acc[g][0], acc[g][1], acc[g][2], acc[g][3]), sc));
}

/// out[g] += Σ_j p[g·count + j]·v_j for j in [j0, j1), 64 dimensions, G (a
/// compile-time constant) query heads.
CK_TARGET512 static inline __attribute__((always_inline))
void pv_512(const float *p, size_t count, size_t j0, size_t j1, const float *v, size_t ldkv, float *out, size_t hs,
            const int G) {
    __m512 acc[4][4];
    for (int g = 0; g < G; g++)
        for (int c = 0; c < 4; c++) acc[g][c] = _mm512_loadu_ps(out + g * hs + 16 * c);
    for (size_t j = j0; j < j1; j++) {
        const float *vj = v + j * ldkv;
        __m512 vz[4];
        for (int c = 0; c < 4; c++) vz[c] = _mm512_loadu_ps(vj + 16 * c);
        for (int g = 0; g < G; g++) {
            __m512 pj = _mm512_set1_ps(p[g * count + j]);
            for (int c = 0; c < 4; c++) acc[g][c] = _mm512_fmadd_ps(pj, vz[c], acc[g][c]);
        }
    }
    for (int g = 0; g < G; g++)
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(out + g * hs + 16 * c, acc[g][c]);
}

/// AVX-512 attention for hs a multiple of 64: the query heads that share a
/// key/value head (up to 4 at a time) read each K and V row once.
CK_TARGET512 static void attend_rows_512(const float *q, const float *k, const float *v, size_t ldkv, size_t count,
                                         size_t heads, size_t kv_heads, size_t hs, float scale, float *scores,
                                         float *out, float *mz) {
    size_t group = heads / kv_heads;
    const __m128 sc = _mm_set1_ps(scale);
    // Scores, four positions × up to four heads of a group at a time.
    for (size_t j0 = 0; j0 < count; j0 += 4) {
        size_t np = count - j0 < 4 ? count - j0 : 4;
        for (size_t o = 0; o < 4 * ldkv * 4; o += 64)
            _mm_prefetch((const char *)(k + (j0 + ATT_PREFETCH_ROWS) * ldkv) + o, _MM_HINT_T0);
        const float *kr[4];
        for (size_t p = 0; p < 4; p++) kr[p] = k + (j0 + (p < np ? p : 0)) * ldkv;
        for (size_t kvh = 0; kvh < kv_heads; kvh++)
            for (size_t g0 = 0; g0 < group; g0 += 4) {
                size_t gn = group - g0 < 4 ? group - g0 : 4;
                const float *qg = q + (kvh * group + g0) * hs;
                float s4[16];
                switch (gn) {
                case 1: scores4_512(qg, kr, kvh * hs, hs, 1, sc, s4); break;
                case 2: scores4_512(qg, kr, kvh * hs, hs, 2, sc, s4); break;
                case 3: scores4_512(qg, kr, kvh * hs, hs, 3, sc, s4); break;
                default: scores4_512(qg, kr, kvh * hs, hs, 4, sc, s4); break;
                }
                for (size_t g = 0; g < gn; g++)
                    for (size_t p = 0; p < np; p++) scores[(kvh * group + g0 + g) * count + j0 + p] = s4[4 * g + p];
            }
    }
    softmax_numerators(scores, heads, count, mz);
    // out = p·V, block by block of rows (read once, front to back); per key/value
    // head, up to four of its query heads × 64 dimensions in registers.
    for (size_t h = 0; h < heads * hs; h++) out[h] = 0;
    for (size_t j0 = 0; j0 < count; j0 += ATT_BLOCK) {
        size_t j1 = j0 + ATT_BLOCK < count ? j0 + ATT_BLOCK : count;
        for (size_t o = 0; o < ATT_BLOCK * ldkv * 4; o += 64)
            _mm_prefetch((const char *)(v + (j0 + ATT_PREFETCH_ROWS) * ldkv) + o, _MM_HINT_T0);
        for (size_t kvh = 0; kvh < kv_heads; kvh++)
            for (size_t g0 = 0; g0 < group; g0 += 4) {
                size_t gn = group - g0 < 4 ? group - g0 : 4;
                for (size_t d0 = 0; d0 < hs; d0 += 64) {
                    const float *p0 = scores + (kvh * group + g0) * count, *vh = v + kvh * hs + d0;
                    float *o = out + (kvh * group + g0) * hs + d0;
                    switch (gn) {
                    case 1: pv_512(p0, count, j0, j1, vh, ldkv, o, hs, 1); break;
                    case 2: pv_512(p0, count, j0, j1, vh, ldkv, o, hs, 2); break;
                    case 3: pv_512(p0, count, j0, j1, vh, ldkv, o, hs, 3); break;
                    default: pv_512(p0, count, j0, j1, vh, ldkv, o, hs, 4); break;
                    }
                }
            }
    }
}

/// ck_swiglu's vector part; returns how many values it did.
CK_TARGET static inline void swiglu8(float *gate, const float *up) {
    __m256 g = _mm256_loadu_ps(gate);
    __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), g));
    _mm256_storeu_ps(gate, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1), e)), _mm256_loadu_ps(up)));
}

/// Every value, the last n % 8 too (through a padded copy), takes the same
/// vector arithmetic, so a value's result does not depend on where a
/// caller's chunks begin (a sequence's activations are the same bits
/// whether or not it is batched with others).
CK_TARGET static size_t ck_swiglu_avx2(float *gate, const float *up, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) swiglu8(gate + i, up + i);
    if (i < n) {
        float g[8] = {0}, u[8] = {0};
        for (size_t j = i; j < n; j++) { g[j - i] = gate[j]; u[j - i] = up[j]; }
        swiglu8(g, u);
        for (size_t j = i; j < n; j++) gate[j] = g[j - i];
    }
    return n;
}
#endif

void ck_attend_rows(const float *q, const float *k, const float *v, size_t ldkv, size_t count, size_t heads,
                    size_t kv_heads, size_t hs, float scale, float *scores, float *out, float *mz, int cap) {
#ifdef CK_X86
    if (ck_effective_level(cap) >= 2 && hs % 64 == 0) {
        attend_rows_512(q, k, v, ldkv, count, heads, kv_heads, hs, scale, scores, out, mz);
        return;
    }
    if (ck_effective_level(cap) >= 1 && hs % 32 == 0) {
        attend_rows_avx2_grouped(q, k, v, ldkv, count, heads, kv_heads, hs, scale, scores, out, mz);
        return;
    }
    if (ck_effective_level(cap) >= 1 && hs % 8 == 0) {
        attend_rows_avx2(q, k, v, ldkv, count, heads, kv_heads, hs, scale, scores, out, mz);
        return;
    }
#endif
    attend_rows_scalar(q, k, v, ldkv, count, heads, kv_heads, hs, scale, scores, out, mz);
}

/// gate[i] = silu(gate[i]) · up[i] over n values, silu(z) = z / (1 + e^−z).
void ck_swiglu(float *gate, const float *up, size_t n, int cap) {
    size_t i = 0;
#ifdef CK_X86
    if (ck_effective_level(cap) >= 1) i = ck_swiglu_avx2(gate, up, n);
#endif
    for (; i < n; i++) gate[i] = gate[i] / (1 + expf(-gate[i])) * up[i];
}

void ck_cpu_relax(void) {
#ifdef CK_X86
    _mm_pause();
#endif
}
