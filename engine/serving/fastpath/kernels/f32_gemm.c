/* An fp32 linear layer for CPUs where torch's fp32 libraries leave memory bandwidth unused (AVX2, FMA).
 *
 * Why: a lone chat's fp32 decode step is one row times every weight, ~0.5 GB for GPT-2 124M, so it
 * runs at the speed weights stream from memory. On the AMD EPYC (Zen 3) box one thread streamed
 * 15-16.7 GB/s (a plain sum), while the step's matrix products ran at 10.6 GB/s through oneDNN's
 * packed layout (the one Mynah used on non-Intel CPUs) and 12.8 GB/s through MKL; this kernel
 * runs them at 15.3 GB/s, and 1.13-1.31x oneDNN at 16 to 320 rows too (scripts/bench/f32_linear.py,
 * docs/BENCHMARKS.md, issue 23, twelfth pass).
 *
 * Packed weight layout (engine.serving.f32_native): output columns in panels of 16 (n padded to a
 * multiple of 16 with zero rows); panel p is (k, 16) floats, input i's 16 weights contiguous. A
 * one-row call then reads the whole matrix front to back, one stream the prefetcher follows.
 *
 * Numbers: every output is one fused multiply-add chain over the inputs in order, started at 0,
 * the bias added last: y[r, c] = (...((0 + x[r,0] w[c,0]) + x[r,1] w[c,1]) ...) + bias[c]. However
 * many rows a call has and however the rows are tiled, a row's outputs are the same bits (a chat's
 * reply does not depend on which other chats share its batch); the reference in __init__.py gets
 * the same numbers to float32 rounding, not bit for bit.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define AVX2 __attribute__((target("avx2,fma")))

/* 16 outputs, or the first `width` of them (the last panel of an n that is not a multiple of 16), plus the bias. */
static inline AVX2 void store16(float *y, __m256 lo, __m256 hi, const float *bias, int64_t width) {
    if (bias) {
        lo = _mm256_add_ps(lo, _mm256_loadu_ps(bias));
        hi = _mm256_add_ps(hi, _mm256_loadu_ps(bias + 8));
    }
    if (width == 16) {
        _mm256_storeu_ps(y, lo);
        _mm256_storeu_ps(y + 8, hi);
        return;
    }
    float tmp[16];
    _mm256_storeu_ps(tmp, lo);
    _mm256_storeu_ps(tmp + 8, hi);
    memcpy(y, tmp, (size_t)width * sizeof(float));
}

/* R (1-4) rows of x (each k floats) times panel wp (k, 16) into y's rows (n apart): accumulators in named
 * registers (an array of them was kept on the stack, a store per multiply-add: 2-3x slower at 16 rows).
 * `next` (or NULL): the next panel, whose line i (its 16 floats) this tile asks into L2 when i % every == phase.
 * The row tiles of a panel share that fetch, so the next panel streams in while this one is multiplied from
 * cache; without it a 16-row call waited on memory in each panel's first tile and left memory idle in the
 * others (1.24x at 16 rows, 1.12x at 64, Zen 3). A lone tile (<= 4 rows) fetches nothing: it is the
 * stream, and a second one beside it cost a one-row call 0.86x; nor do calls of over 64 rows (a prefill's),
 * which multiply long enough per panel for the hardware's prefetcher (0.94-0.97x with it at 320 rows). */
static inline AVX2 __attribute__((always_inline)) void tile(const int R, const float *x, int64_t k, const float *wp,
                                                           const float *bias, float *y, int64_t n, int64_t width,
                                                           const float *next, int64_t every, int64_t phase) {
    __m256 a0 = _mm256_setzero_ps(), b0 = a0, a1 = a0, b1 = a0, a2 = a0, b2 = a0, a3 = a0, b3 = a0;
    int64_t due = phase + 1;
    for (int64_t i = 0; i < k; i++) {
        if (next && --due == 0) due = every, _mm_prefetch((const char *)(next + i * 16), _MM_HINT_T1);
        const __m256 w0 = _mm256_loadu_ps(wp + i * 16), w1 = _mm256_loadu_ps(wp + i * 16 + 8);
        __m256 v = _mm256_broadcast_ss(x + i);
        a0 = _mm256_fmadd_ps(w0, v, a0), b0 = _mm256_fmadd_ps(w1, v, b0);
        if (R > 1) v = _mm256_broadcast_ss(x + k + i), a1 = _mm256_fmadd_ps(w0, v, a1), b1 = _mm256_fmadd_ps(w1, v, b1);
        if (R > 2) v = _mm256_broadcast_ss(x + 2 * k + i), a2 = _mm256_fmadd_ps(w0, v, a2), b2 = _mm256_fmadd_ps(w1, v, b2);
        if (R > 3) v = _mm256_broadcast_ss(x + 3 * k + i), a3 = _mm256_fmadd_ps(w0, v, a3), b3 = _mm256_fmadd_ps(w1, v, b3);
    }
    store16(y, a0, b0, bias, width);
    if (R > 1) store16(y + n, a1, b1, bias, width);
    if (R > 2) store16(y + 2 * n, a2, b2, bias, width);
    if (R > 3) store16(y + 3 * n, a3, b3, bias, width);
}

/* Panels [p0, p1) of y (m, n) = x (m, k) W^T + bias; w packed (panels, k, 16), bias (NULL or padded to the
 * panels' width). Four rows at a time: 8 independent FMA chains, two weight loads for eight FMAs. */
AVX2 void mynah_linear_f32(const float *x, int64_t m, int64_t k, const float *w, int64_t n, const float *bias,
                           float *y, int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; p++) {
        const float *wp = w + p * k * 16, *b = bias ? bias + p * 16 : NULL;
        const int64_t width = n - p * 16 < 16 ? n - p * 16 : 16;
        float *yp = y + p * 16;
        const int64_t tiles = (m + 3) / 4;
        const float *next = tiles > 1 && tiles <= 16 && p + 1 < p1 ? wp + k * 16 : NULL;
        int64_t r = 0, t = 0;
        for (; r + 4 <= m; r += 4, t++) tile(4, x + r * k, k, wp, b, yp + r * n, n, width, next, tiles, t);
        switch (m - r) {
            case 3: tile(3, x + r * k, k, wp, b, yp + r * n, n, width, next, tiles, t); break;
            case 2: tile(2, x + r * k, k, wp, b, yp + r * n, n, width, next, tiles, t); break;
            case 1: tile(1, x + r * k, k, wp, b, yp + r * n, n, width, next, tiles, t); break;
            default: break;
        }
    }
}
