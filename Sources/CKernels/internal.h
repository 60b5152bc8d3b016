// Helpers shared by the kernel files of CKernels (not part of its interface).
#ifndef CONTINUUM_CKERNELS_INTERNAL_H
#define CONTINUUM_CKERNELS_INTERNAL_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#define CK_X86 1
#include <immintrin.h>
#define CK_TARGET __attribute__((target("avx2,fma,f16c")))
#define CK_TARGET512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))
#endif

static inline float ck_f16_to_f32(uint16_t h) {
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

static inline uint16_t ck_load_u16(const uint8_t *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

static inline int ck_is_block_type(int type) { return type == 2 || type == 3 || type == 8; }

/// Bytes of one 32-block (Q4_0 18, Q4_1 20, Q8_0 34).
static inline size_t ck_block_bytes(int type) { return type == 2 ? 18 : type == 3 ? 20 : 34; }

/// Largest |x| of a 32-block; its exact sum goes to *sum.
static inline float ck_block_stats(const float *xb, float *sum) {
    float amax = 0, s = 0;
    for (int j = 0; j < 32; j++) {
        float a = fabsf(xb[j]);
        if (a > amax) amax = a;
        s += xb[j];
    }
    *sum = s;
    return amax;
}

/// The kernel level used given the caller's cap: min(cap, ck_simd_level()).
int ck_effective_level(int cap);

/// Bytes of one vector prepared for the packed kernels at `level` (1 or 2) for
/// `type` (packed.c).
size_t ck_digits_stride(int type, size_t cols, int level);

/// Prepares one vector x[cols] for the packed kernels at `level` for `type`
/// into buf (packed.c).
void ck_quantize_digits(int type, const float *x, size_t cols, uint8_t *buf, int level);

#endif
