// CKernels: the hot inner loops of Continuum's quantised matrix products.
//
// What this is: dot products, transposed products (for the backward pass)
// and row dequantisation for the GGUF block formats (Q4_0, Q4_1, Q8_0, F16,
// BF16) against fp32 activations, with AVX-512 VNNI and AVX2/FMA/F16C paths
// chosen at run time and a portable scalar fallback. The SIMD products of the 32-block formats run on weights
// repacked once (ck_pack), 16 rows interleaved.
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

/// Kernel levels: 0 scalar fp32; 1 AVX2+FMA+F16C; 2 AVX-512 (F, BW, VL, VNNI).
/// Returns the best level this CPU runs, capped by the environment variable
/// CONTINUUM_KERNELS=avx2|scalar when set.
int ck_simd_level(void);

/// Bytes of scratch `ck_prepare` needs for n vectors of cols values.
size_t ck_prepared_bytes(int type, size_t cols, size_t n, int cap);

/// Prepares activations X (n x cols fp32, row stride ldx) once for many rows:
///   level 0: per-block sums (Q4_1; nothing for the other formats);
///   levels 1 and 2, Q4_0/Q4_1/Q8_0: the packed kernels' form, three int8
///     digits of a 21-bit integer per value and block, error ≤ 2^-21 of the
///     block's largest |x|, except Q4_0/Q4_1 at level 1: two digits of a
///     16-bit integer, error ≤ 2^-16 (see packed.c); nothing for F16/BF16/F32.
/// cap limits the level (tests pass lower caps to check every path).
void ck_prepare(int type, size_t cols, const float *X, size_t ldx, size_t n, void *prepared, int cap);

/// Y[j, r] = dot(W row r, X[j, :]) for rows r in [row_begin, row_end) and
/// vectors j in [0, n), on the GGUF layout: the scalar kernels, and AVX2 for
/// F16/BF16/F32 (32-block formats take ck_matmul_packed at levels 1 and 2).
/// Uses activations prepared by ck_prepare (same type, cols and n; cap 0
/// for the 32-block formats).
///   W: rows x cols weights of `type` (row-major, GGUF block layout)
///   X: n x cols fp32, row stride ldx
///   Y: n x rows fp32, row stride ldy
/// cols must be a multiple of the type's block size (32; 1 for F16/BF16/F32).
void ck_matmul_rows(int type, const void *W, size_t cols,
                    size_t row_begin, size_t row_end,
                    const float *X, size_t ldx, size_t n, const void *prepared,
                    float *Y, size_t ldy, int cap);

/// Rows per group of the packed layout.
#define CK_PACK_ROWS 16

/// Bytes of the packed form of a rows x cols Q4_0/Q4_1/Q8_0 matrix (its
/// rows rounded up to CK_PACK_ROWS); 0 for other types.
size_t ck_packed_bytes(int type, size_t rows, size_t cols);

/// Repacks W (rows x cols, GGUF block layout) into `packed`
/// (ck_packed_bytes of them): per group of 16 rows and per block, the rows'
/// scales, then their weights interleaved four columns at a time.
void ck_pack(int type, const void *W, size_t rows, size_t cols, void *packed);

/// ck_matmul_rows for 32-block weights packed by ck_pack, at level 1 (AVX2)
/// or 2 (AVX-512 VNNI): each weight block is multiplied with up to 8 of the
/// n vectors (AVX2: 3, 2 for Q8_0) before the next block is read. row_begin must be a
/// multiple of CK_PACK_ROWS; prepared comes from ck_prepare at the same cap
/// (≥ 1, which this CPU must run).
///   P: the packed rows x cols matrix   Y: n x rows fp32, row stride ldy
void ck_matmul_packed(int type, const void *P, size_t cols, size_t rows, size_t row_begin, size_t row_end,
                      size_t n, const void *prepared, float *Y, size_t ldy, int cap);

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

/// Decode attention of one token's H query heads over `count` cache
/// positions (all of them, or one part of a split), unnormalised so that
/// parts combine (softmax over all of them); every head at once, so each
/// cache row is read once. Head h reads key/value head h / (H / KVH).
///   q: [H, hs]   k, v: `count` rows of stride ldkv (KVH·hs values used)
///   out: [H, hs] = Σ_j e^(s_hj − m_h)·v_j, s = scale · q·Kᵀ
///   mz:  [H, 2] = (m_h = max_j s_hj, z_h = Σ_j e^(s_hj − m_h))
///   scores: [H, count] scratch
void ck_attend_rows(const float *q, const float *k, const float *v, size_t ldkv, size_t count, size_t heads,
                    size_t kv_heads, size_t hs, float scale, float *scores, float *out, float *mz, int cap);

/// gate[i] = silu(gate[i]) · up[i] over n values, silu(z) = z / (1 + e^−z)
/// (AVX2: a polynomial e^x within about 1 ulp of expf, for every value alike,
/// so a result does not depend on where the range begins or ends).
void ck_swiglu(float *gate, const float *up, size_t n, int cap);

/// A spin-wait hint (PAUSE on x86).
void ck_cpu_relax(void);

/// Marks the calling thread as running background work (learning), whose
/// parallel-fors leave the worker pool to foreground steps (generation).
/// A thread-local flag (threads.c).
void ck_set_background_thread(int on);
int ck_is_background_thread(void);

/// Sets the calling thread's scheduling niceness (Linux: per thread; higher
/// is lower priority). Returns 0, or -1 where the system refuses or has none.
int ck_set_thread_nice(int nice);

#ifdef __cplusplus
}
#endif
#endif
