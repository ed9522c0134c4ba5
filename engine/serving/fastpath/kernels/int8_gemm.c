/* An int8 linear layer: float32 rows in, each row quantized to 8 bits on the fly, int8 weights
 * packed for AVX-512 VNNI, float32 out (AVX-512 F/BW/VL/DQ + VNNI: Intel since Cascade Lake,
 * AMD since Zen 4; op.cpp checks the CPU has them); an AVX2 path below for every other x86-64
 * CPU the library builds for, with the same numbers.
 *
 * Why: a lone chat's decode step is one row times every weight, memory-bound, and fbgemm's
 * dynamic-int8 call (what torch offers) pays per call for its generality; at 1 to 300 rows this
 * ran 12-25 % faster on SmolLM2-135M's 121 matrices a step (docs/BENCHMARKS.md, issue 23).
 * Calls of 16 rows or more (a prefill, a busy decode step) use AMX where the CPU has it (below):
 * 3-4x VNNI on one matrix, a 16-context prefill's matrix products 1.7x.
 * Each row gets its own scale and zero point (fbgemm: one per call), so a row's outputs do not
 * depend on which other chats share its batch.
 *
 * Numbers (the reference in __init__.py computes the same):
 *   row r: lo = min(0, min x), hi = max(0, max x), s = (hi - lo) / 255 (1 if that is not > 0),
 *          z = clamp(round(-lo / s), 0, 255), q = clamp(round(x * (1 / s)) + z, 0, 255)
 *   y[r, n] = (sum_k q[k] w[n, k] - z * w_sum[n]) * (s * w_scale[n]) + bias[n]
 * with w int8 rows (symmetric: no weight zero point), w_sum[n] = sum_k w[n, k], rounding to
 * nearest even.
 *
 * Packed weight layout: output columns in panels of 64 (n padded to a multiple of 64 with
 * zero rows), inputs in groups of 4 (k padded to kp, a multiple of 4, with zeros); panel p,
 * group g is 256 contiguous bytes: column c of the panel at byte 4c, its 4 inputs in order.
 * One 64-byte load is then 16 columns x 4 inputs: what VPDPBUSD multiplies by one row's 4
 * quantized inputs broadcast, no horizontal sums. w_sum, w_scale and bias are padded to the
 * panels' width too.
 */
#include <cpuid.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <unistd.h>

#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
#define AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,amx-tile,amx-int8")))

/* A row's scale and zero point from its min (lo <= 0) and max (hi >= 0), and one value quantized with them:
 * the numbers every path shares (the header's formula). */
static inline void row_scale(float lo, float hi, float *scale, int32_t *zero) {
    float s = (hi - lo) / 255.0f;
    if (!(s > 0.0f) || !isfinite(s)) s = 1.0f;  /* all zeros, or a non-finite row: garbage out, no crash */
    const int32_t z = (int32_t)nearbyintf(-lo / s);
    *scale = s;
    *zero = z < 0 ? 0 : z > 255 ? 255 : z;
}

static inline int32_t quantize_one(float x, float inv, int32_t z) {
    const int32_t v = (int32_t)nearbyintf(x * inv) + z;
    return v < 0 ? 0 : v > 255 ? 255 : v;
}

/* Rows [0, m) of x (m, k) into q (m, kp): u8 with each row's own scale and zero point. */
VNNI void mynah_quantize_rows(const float *x, int64_t m, int64_t k, int64_t kp, uint8_t *q, float *scale,
                              int32_t *zero) {
    for (int64_t r = 0; r < m; r++) {
        const float *xr = x + r * k;
        uint8_t *qr = q + r * kp;
        __m512 lo = _mm512_setzero_ps(), hi = _mm512_setzero_ps();
        int64_t i = 0;
        for (; i + 16 <= k; i += 16) {
            const __m512 v = _mm512_loadu_ps(xr + i);
            lo = _mm512_min_ps(lo, v);
            hi = _mm512_max_ps(hi, v);
        }
        if (i < k) {
            const __m512 v = _mm512_maskz_loadu_ps((__mmask16)((1u << (k - i)) - 1), xr + i);  /* zeros elsewhere */
            lo = _mm512_min_ps(lo, v);
            hi = _mm512_max_ps(hi, v);
        }
        row_scale(_mm512_reduce_min_ps(lo), _mm512_reduce_max_ps(hi), scale + r, zero + r);
        const float inv = 1.0f / scale[r];
        const int32_t z = zero[r];
        const __m512 vinv = _mm512_set1_ps(inv);
        const __m512i vz = _mm512_set1_epi32(z), zeros = _mm512_setzero_si512();
        for (i = 0; i + 16 <= k; i += 16) {
            __m512i v = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xr + i), vinv)), vz);
            _mm_storeu_si128((__m128i *)(qr + i), _mm512_cvtusepi32_epi8(_mm512_max_epi32(v, zeros)));  /* clamps */
        }
        for (; i < k; i++) qr[i] = (uint8_t)quantize_one(xr[i], inv, z);
        for (; i < kp; i++) qr[i] = (uint8_t)z;  /* padding: times zero weights */
    }
}

/* rows (at most 4) x one panel of 64 columns; cols: how many of the panel's columns are real. */
static inline __attribute__((always_inline)) VNNI void tile(const uint8_t *q, int64_t kp, const int8_t *w, const int rows,
                                                            const float *scale, const int32_t *zero, const int32_t *w_sum,
                                                            const float *w_scale, const float *bias, float *y, int64_t ldy,
                                                            int64_t cols) {
    __m512i acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_si512();
    for (int64_t g = 0; g < kp / 4; g++) {
        const int8_t *wg = w + g * 256;
        const __m512i w0 = _mm512_loadu_si512(wg), w1 = _mm512_loadu_si512(wg + 64);
        const __m512i w2 = _mm512_loadu_si512(wg + 128), w3 = _mm512_loadu_si512(wg + 192);
        for (int r = 0; r < rows; r++) {
            const __m512i xb = _mm512_set1_epi32(*(const int32_t *)(q + r * kp + 4 * g));
            acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], xb, w0);
            acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], xb, w1);
            acc[r][2] = _mm512_dpbusd_epi32(acc[r][2], xb, w2);
            acc[r][3] = _mm512_dpbusd_epi32(acc[r][3], xb, w3);
        }
    }
    for (int c = 0; c < 4 && 16 * c < cols; c++) {
        const int64_t left = cols - 16 * c;
        const __mmask16 mask = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
        const __m512 sums = _mm512_cvtepi32_ps(_mm512_loadu_si512(w_sum + 16 * c));
        const __m512 ws = _mm512_loadu_ps(w_scale + 16 * c);
        const __m512 b = bias ? _mm512_loadu_ps(bias + 16 * c) : _mm512_setzero_ps();
        for (int r = 0; r < rows; r++) {
            const __m512 a = _mm512_fnmadd_ps(_mm512_set1_ps((float)zero[r]), sums, _mm512_cvtepi32_ps(acc[r][c]));
            _mm512_mask_storeu_ps(y + r * ldy + 16 * c, mask, _mm512_fmadd_ps(a, _mm512_mul_ps(ws, _mm512_set1_ps(scale[r])), b));
        }
    }
}

/* y (m, n) for panels [p0, p1): q (m, kp) quantized rows, w packed as above, bias may be NULL. */
VNNI void mynah_linear_u8s8(const uint8_t *q, int64_t m, int64_t kp, const int8_t *w, int64_t n, const float *scale,
                            const int32_t *zero, const int32_t *w_sum, const float *w_scale, const float *bias, float *y,
                            int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; p++) {
        const int8_t *panel = w + p * kp * 64;
        const int64_t at = p * 64, cols = n - at < 64 ? n - at : 64;
        const float *b = bias ? bias + at : 0;
        for (int64_t r = 0; r < m; r += 4) {
            const uint8_t *qr = q + r * kp;
            float *yr = y + r * n + at;
            switch (m - r >= 4 ? 4 : (int)(m - r)) {
            case 4: tile(qr, kp, panel, 4, scale + r, zero + r, w_sum + at, w_scale + at, b, yr, n, cols); break;
            case 3: tile(qr, kp, panel, 3, scale + r, zero + r, w_sum + at, w_scale + at, b, yr, n, cols); break;
            case 2: tile(qr, kp, panel, 2, scale + r, zero + r, w_sum + at, w_scale + at, b, yr, n, cols); break;
            default: tile(qr, kp, panel, 1, scale + r, zero + r, w_sum + at, w_scale + at, b, yr, n, cols);
            }
        }
    }
}

/* AVX2 (every x86-64 CPU the library builds for: AMD before Zen 4 has no VNNI). The same numbers, the
 * same packed weights: rows are quantized exactly as above but kept as 16-bit integers, and VPMADDWD
 * multiplies a row's 4 inputs (broadcast) by 4 columns' 4 weights (widened to 16 bits), two inputs
 * summed per 32-bit lane; adjacent lanes are added at the end. 16-bit products cannot saturate (VPMADDUBSW,
 * fbgemm's AVX2 instruction, can, which is why torch's x86 int8 quantizes its inputs to 7 bits), so the
 * integer sums are exact and the outputs VNNI's bit for bit. */
#define AVX2 __attribute__((target("avx2,fma")))

/* mynah_quantize_rows, into 16-bit integers (the same q values). */
AVX2 void mynah_quantize_rows_avx2(const float *x, int64_t m, int64_t k, int64_t kp, int16_t *q, float *scale,
                                   int32_t *zero) {
    for (int64_t r = 0; r < m; r++) {
        const float *xr = x + r * k;
        int16_t *qr = q + r * kp;
        __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 8 <= k; i += 8) {
            const __m256 v = _mm256_loadu_ps(xr + i);
            lo = _mm256_min_ps(lo, v);
            hi = _mm256_max_ps(hi, v);
        }
        float lo_s = 0.0f, hi_s = 0.0f, lanes[16];
        _mm256_storeu_ps(lanes, lo);
        _mm256_storeu_ps(lanes + 8, hi);
        for (int j = 0; j < 8; j++) {
            lo_s = lanes[j] < lo_s ? lanes[j] : lo_s;
            hi_s = lanes[8 + j] > hi_s ? lanes[8 + j] : hi_s;
        }
        for (; i < k; i++) {
            lo_s = xr[i] < lo_s ? xr[i] : lo_s;
            hi_s = xr[i] > hi_s ? xr[i] : hi_s;
        }
        row_scale(lo_s, hi_s, scale + r, zero + r);
        const float inv = 1.0f / scale[r];
        const int32_t z = zero[r];
        const __m256 vinv = _mm256_set1_ps(inv);
        const __m256i vz = _mm256_set1_epi32(z), zeros = _mm256_setzero_si256(), top = _mm256_set1_epi32(255);
        for (i = 0; i + 8 <= k; i += 8) {
            __m256i v = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + i), vinv)), vz);
            v = _mm256_min_epi32(_mm256_max_epi32(v, zeros), top);
            _mm_storeu_si128((__m128i *)(qr + i), _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)));
        }
        for (; i < k; i++) qr[i] = (int16_t)quantize_one(xr[i], inv, z);
        for (; i < kp; i++) qr[i] = (int16_t)z;
    }
}

/* Columns [0, min(cols, 8)) of `rows` rows of y from their accumulators: acc[r * stride] holds columns
 * 0-3 and acc[r * stride + 1] columns 4-7, lanes (c0 c0 c1 c1 | c2 c2 c3 c3); summed pairwise into column
 * order, then scaled as the VNNI path does. Plain stores but for a short last group (a masked store is
 * slow on AMD: a 3,072 x 576 one-row product took 84 us with masked stores, 38 without). */
static inline __attribute__((always_inline)) AVX2 void finish8(const __m256i *acc, int stride, int rows,
                                                               const float *scale, const int32_t *zero,
                                                               const int32_t *w_sum, const float *w_scale,
                                                               const float *bias, float *y, int64_t ldy, int64_t cols) {
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(cols < 8 ? cols : 8)),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256 sums = _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)w_sum));
    const __m256 ws = _mm256_loadu_ps(w_scale);
    const __m256 b = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
    for (int r = 0; r < rows; r++) {
        const __m256i sum = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[r * stride], acc[r * stride + 1]), 0xd8);
        const __m256 a = _mm256_fnmadd_ps(_mm256_set1_ps((float)zero[r]), sums, _mm256_cvtepi32_ps(sum));
        const __m256 out = _mm256_fmadd_ps(a, _mm256_mul_ps(ws, _mm256_set1_ps(scale[r])), b);
        if (cols >= 8)
            _mm256_storeu_ps(y + r * ldy, out);
        else
            _mm256_maskstore_ps(y + r * ldy, mask, out);
    }
}

/* rows (1 or 2) x 16 columns: w the first column's 4 bytes of group 0, groups `step` bytes apart. */
static inline __attribute__((always_inline)) AVX2 void tile_avx2(const int16_t *q, int64_t kp, const int8_t *w,
                                                                 int64_t step, const int rows, const float *scale,
                                                                 const int32_t *zero, const int32_t *w_sum,
                                                                 const float *w_scale, const float *bias, float *y,
                                                                 int64_t ldy, int64_t cols) {
    __m256i acc[2][4];
    for (int r = 0; r < 2; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = _mm256_setzero_si256();
    for (int64_t g = 0; g < kp / 4; g++) {
        const int8_t *wg = w + g * step;  /* 4 columns x 4 inputs per 16 bytes */
        const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)wg));
        const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wg + 16)));
        const __m256i w2 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wg + 32)));
        const __m256i w3 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wg + 48)));
        for (int r = 0; r < rows; r++) {
            const __m256i xb = _mm256_set1_epi64x(*(const int64_t *)(q + r * kp + 4 * g));
            acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(xb, w0));
            acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(xb, w1));
            acc[r][2] = _mm256_add_epi32(acc[r][2], _mm256_madd_epi16(xb, w2));
            acc[r][3] = _mm256_add_epi32(acc[r][3], _mm256_madd_epi16(xb, w3));
        }
    }
    for (int h = 0; h < 2 && 8 * h < cols; h++)  /* columns 8h … 8h+7 */
        finish8(&acc[0][2 * h], 4, rows, scale, zero, w_sum + 8 * h, w_scale + 8 * h, bias ? bias + 8 * h : 0,
                y + 8 * h, ldy, cols - 8 * h);
}

/* 4 rows x 8 columns (w as in tile_avx2, the strip's first or second 8 columns): more rows per weight load.
 * `next` (or NULL): the next strip (groups 64 bytes apart), whose group g this pass asks into L2 when
 * g % every == phase: a strip's passes share the fetch of the next one, as in f32_gemm.c's tile. */
static inline __attribute__((always_inline)) AVX2 void tile4_avx2(const int16_t *q, int64_t kp, const int8_t *w,
                                                                  int64_t step, const float *scale, const int32_t *zero,
                                                                  const int32_t *w_sum, const float *w_scale,
                                                                  const float *bias, float *y, int64_t ldy, int64_t cols,
                                                                  const int8_t *next, int64_t every, int64_t phase) {
    __m256i acc[4][2];
    for (int r = 0; r < 4; r++) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    int64_t due = phase + 1;
#pragma GCC unroll 4
    for (int64_t g = 0; g < kp / 4; g++) {
        if (next && --due == 0) due = every, _mm_prefetch((const char *)(next + g * 64), _MM_HINT_T1);
        const int8_t *wg = w + g * step;
        const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)wg));
        const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wg + 16)));
        for (int r = 0; r < 4; r++) {
            const __m256i xb = _mm256_set1_epi64x(*(const int64_t *)(q + r * kp + 4 * g));
            acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(xb, w0));
            acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(xb, w1));
        }
    }
    if (cols > 0) finish8(&acc[0][0], 2, 4, scale, zero, w_sum, w_scale, bias, y, ldy, cols);
}

/* mynah_linear_u8s8 on AVX2 for panels [p0, p1) `width` columns wide (16: AVX2's own packing, each
 * 16-column strip read front to back; 64: VNNI's, read a strip at a time); q from mynah_quantize_rows_avx2. */
AVX2 void mynah_linear_u8s8_avx2(const int16_t *q, int64_t m, int64_t kp, const int8_t *w, int64_t width, int64_t n,
                                 const float *scale, const int32_t *zero, const int32_t *w_sum, const float *w_scale,
                                 const float *bias, float *y, int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; p++) {
        for (int64_t at = p * width; at < (p + 1) * width && at < n; at += 16) {
            const int8_t *strip = w + p * kp * width + 4 * (at - p * width);
            const int64_t cols = n - at < 16 ? n - at : 16;
            const float *b = bias ? bias + at : 0;
            const int64_t passes = 2 * (m / 4);   /* a lone pass is the stream itself; a prefill's has time enough */
            const int8_t *next = width == 16 && passes > 1 && passes <= 32 && p + 1 < p1 ? strip + kp * 16 : 0;
            int64_t r = 0;
            for (; r + 4 <= m; r += 4)
                for (int h = 0; h < 2; h++)
                    tile4_avx2(q + r * kp, kp, strip + 32 * h, 4 * width, scale + r, zero + r, w_sum + at + 8 * h,
                               w_scale + at + 8 * h, b ? b + 8 * h : 0, y + r * n + at + 8 * h, n, cols - 8 * h,
                               next, passes, r / 2 + h);
            for (; r < m; r += 2) {
                if (m - r >= 2)
                    tile_avx2(q + r * kp, kp, strip, 4 * width, 2, scale + r, zero + r, w_sum + at, w_scale + at, b,
                              y + r * n + at, n, cols);
                else
                    tile_avx2(q + r * kp, kp, strip, 4 * width, 1, scale + r, zero + r, w_sum + at, w_scale + at, b,
                              y + r * n + at, n, cols);
            }
        }
    }
}

/* AMX (Intel since Sapphire Rapids): 16 rows x 16 columns x 64 inputs per instruction, ~16x VNNI's
 * work per cycle, for the calls with 16 rows or more (a prefill, a busy decode step). The packed
 * layout is already what a B tile reads: 16 groups of 4 inputs, 64 bytes of 16 columns each, 256
 * bytes apart. Linux lends a process the tile registers on request (arch_prctl); 1 when granted. */
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
/* Compilers without AMX intrinsics (GCC < 11, Clang < 12) build the rest: AMX is then never enabled. */
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11)
#define MYNAH_HAVE_AMX 1
#endif

#ifndef MYNAH_HAVE_AMX
int mynah_amx_enable(void) { return 0; }
void mynah_linear_u8s8_amx(const uint8_t *q, int64_t blocks, int64_t kp, const int8_t *w, int64_t n, const float *scale,
                           const int32_t *zero, const int32_t *w_sum, const float *w_scale, const float *bias, float *y,
                           int64_t p0, int64_t p1) {}
#else
int mynah_amx_enable(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 25))) return 0;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* The sums of rows [r, r + 32) (16 x rows) x columns [at, at + 32) of y, scaled. */
static inline __attribute__((always_inline)) AMX void amx_store(int32_t (*sums)[32], int64_t row0, int64_t rows,
                                                                int64_t at, int64_t cols, const float *scale,
                                                                const int32_t *zero, const int32_t *w_sum,
                                                                const float *w_scale, const float *bias, float *y,
                                                                int64_t n) {
    for (int c = 0; c < 2 && 16 * c < cols; c++) {
        const int64_t left = cols - 16 * c;
        const __mmask16 mask = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
        const __m512 wsum = _mm512_cvtepi32_ps(_mm512_loadu_si512(w_sum + at + 16 * c));
        const __m512 ws = _mm512_loadu_ps(w_scale + at + 16 * c);
        const __m512 b = bias ? _mm512_loadu_ps(bias + at + 16 * c) : _mm512_setzero_ps();
        for (int64_t r = 0; r < rows; r++) {
            const int64_t row = row0 + r;
            const __m512 a = _mm512_fnmadd_ps(_mm512_set1_ps((float)zero[row]), wsum,
                                              _mm512_cvtepi32_ps(_mm512_load_si512(&sums[r][16 * c])));
            _mm512_mask_storeu_ps(y + row * n + at + 16 * c, mask,
                                  _mm512_fmadd_ps(a, _mm512_mul_ps(ws, _mm512_set1_ps(scale[row])), b));
        }
    }
}

/* rows [0, 16 * blocks) of q (by AMX, two blocks of 16 rows x two of 16 columns at a time) x panels
 * [p0, p1); kp a multiple of 64. Tiles 0-3 sums, 4-5 rows of q, 6-7 weights. */
AMX void mynah_linear_u8s8_amx(const uint8_t *q, int64_t blocks, int64_t kp, const int8_t *w, int64_t n,
                               const float *scale, const int32_t *zero, const int32_t *w_sum, const float *w_scale,
                               const float *bias, float *y, int64_t p0, int64_t p1) {
    tile_config cfg = {0};
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) cfg.colsb[t] = 64, cfg.rows[t] = 16;
    _tile_loadconfig(&cfg);
    int32_t sums[32][32] __attribute__((aligned(64)));
    for (int64_t p = p0; p < p1; p++) {
        const int8_t *panel = w + p * kp * 64;
        for (int half = 0; half < 2; half++) {  /* columns 32 * half … of the panel */
            const int64_t at = p * 64 + 32 * half, cols = n - at < 32 ? n - at : 32;
            if (cols <= 0) break;
            for (int64_t blk = 0; blk < blocks; blk += 2) {
                const uint8_t *q0 = q + blk * 16 * kp, *q1 = blk + 1 < blocks ? q0 + 16 * kp : q0;
                _tile_zero(0);
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
                for (int64_t kc = 0; kc < kp / 64; kc++) {
                    const int8_t *wb = panel + kc * 16 * 256 + 128 * half;
                    _tile_loadd(4, q0 + kc * 64, kp);
                    _tile_loadd(6, wb, 256);
                    _tile_dpbusd(0, 4, 6);
                    _tile_loadd(7, wb + 64, 256);
                    _tile_dpbusd(1, 4, 7);
                    _tile_loadd(5, q1 + kc * 64, kp);
                    _tile_dpbusd(2, 5, 6);
                    _tile_dpbusd(3, 5, 7);
                }
                _tile_stored(0, &sums[0][0], 128);
                _tile_stored(1, &sums[0][16], 128);
                _tile_stored(2, &sums[16][0], 128);
                _tile_stored(3, &sums[16][16], 128);
                amx_store(sums, blk * 16, blk + 1 < blocks ? 32 : 16, at, cols, scale, zero, w_sum, w_scale, bias, y, n);
            }
        }
    }
    _tile_release();
}
#endif  /* MYNAH_HAVE_AMX */
