// CKernels: the hot inner loops of Continuum's quantised matrix products.
//
// What this is: dot products, transposed products (for the backward pass)
// and row dequantisation for the GGUF block formats (Q4_0, Q4_1, Q8_0, F16,
// BF16) against fp32 activations, with AVX-512 VNNI and AVX2/FMA/F16C paths
// chosen at run time and a portable scalar fallback.
// What this is not: a BLAS. Only the Tensor module imports this; the naive
// Swift reference kernels in Tensor/Reference.swift are what tests check these
// against.
#ifndef CONTINUUM_CKERNELS_H
#define CONTINUUM_CKERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/// ggml type numbers of the formats these kernels understand.
enum ck_type {
    CK_F32 = 0,
    CK_F16 = 1,
    CK_Q4_0 = 2,
    CK_Q4_1 = 3,
    CK_Q8_0 = 8,
    CK_BF16 = 30,
};

/// Kernel levels: 0 scalar fp32; 1 AVX2+FMA+F16C; 2 AVX-512 (F, BW, VNNI).
/// Returns the best level this CPU runs, capped by the environment variable
/// CONTINUUM_KERNELS=avx2|scalar when set.
int ck_simd_level(void);

/// Bytes of scratch `ck_prepare` needs for n vectors of cols values.
size_t ck_prepared_bytes(int type, size_t cols, size_t n, int cap);

/// Prepares activations X (n x cols fp32, row stride ldx) once for many rows:
/// per-block sums, or the integer forms the SIMD kernels multiply:
///   level 1, Q4_0/Q4_1/Q8_0: two int16 parts per 32-block,
///     x ≈ s1·q1 + s2·q2, error ≤ 2^-32 of the block's largest |x|;
///   level 2, Q4_0/Q4_1/Q8_0: three int8 digits of a 21-bit integer per
///     block, error ≤ 2^-21 of the block's largest |x|.
/// cap limits the level (tests pass lower caps to check every path).
void ck_prepare(int type, size_t cols, const float *X, size_t ldx, size_t n, void *prepared, int cap);

/// Y[j, r] = dot(W row r, X[j, :]) for rows r in [row_begin, row_end) and
/// vectors j in [0, n), using activations prepared by ck_prepare (same type,
/// cols, n and cap).
///   W: rows x cols weights of `type` (row-major, GGUF block layout)
///   X: n x cols fp32, row stride ldx
///   Y: n x rows fp32, row stride ldy
/// cols must be a multiple of the type's block size (32; 1 for F16/BF16/F32).
void ck_matmul_rows(int type, const void *W, size_t cols,
                    size_t row_begin, size_t row_end,
                    const float *X, size_t ldx, size_t n, const void *prepared,
                    float *Y, size_t ldy, int cap);

/// Dequantise rows [row_begin, row_end) of W (rows x cols, `type`) into
/// out (row_end-row_begin) x cols fp32, row-major.
void ck_dequantize_rows(int type, const void *W, size_t cols,
                        size_t row_begin, size_t row_end, float *out, int cap);

/// dX[j, c] += Σ_r dY[j, r] · W[r, c] for c in [col_begin, col_end), every row
/// r in [0, rows) and vectors j in [0, n): the product with the transposed
/// weights, as a backward pass needs it (dL/dx = dL/dy · W). Q4_0/Q4_1/Q8_0
/// blocks are unpacked in registers to exactly the values
/// ck_dequantize_rows gives and never written out; other types, and level
/// 0, dequantise one row at a time.
///   W: rows x cols of `type`   dY: n x rows (stride ldy)   dX: n x cols (stride ldx)
/// For the 32-block types col_begin and col_end are multiples of 32.
void ck_matmul_t(int type, const void *W, size_t cols, size_t rows, size_t col_begin, size_t col_end,
                 const float *dY, size_t ldy, size_t n, float *dX, size_t ldx, int cap);

/// Attention of one token's query heads that share a key/value head:
/// scores = softmax(scale · q·Kᵀ) over `visible` positions, out = scores·V.
///   q: [group, hs]   k, v: `visible` rows of stride ldkv   out: [group, hs]
///   scores: [group, visible] scratch
void ck_attend(const float *q, const float *k, const float *v, size_t ldkv, size_t visible,
               size_t group, size_t hs, float scale, float *scores, float *out, int cap);

/// A spin-wait hint (PAUSE on x86).
void ck_cpu_relax(void);

#ifdef __cplusplus
}
#endif
#endif
