/* One decode step's attention on a float16 KV cache, float32 arithmetic (AVX2, FMA, F16C).
 *
 * Why: a decode step's attention reads every cached key and value; at 16 chats that read is
 * memory-bound (GPT-2 124M: 7.4 MB a layer in float32, ~40 % of an int8 step), and a float16
 * cache halves both it and the cache's memory. torch's CPU SDPA on float16 converts and ran
 * ~2x slower than on float32; this reads float16 and converts in registers.
 *
 * Layout (row-major, contiguous in the last dimension):
 *   q     (B, Hq, D) float32           the new token's queries
 *   k, v  row r, kv head g, column t at base + r*row_stride + g*head_stride + t*D  (float16)
 *   lengths (B) int64                  columns each row attends to (its new one included)
 *   out   (B, Hq, D) float32
 * Query head h reads kv head h / (Hq / Hkv) (grouped-query attention). D is a multiple of 8.
 * Every length must be in 1 … t_cap (checked: -2 otherwise); scratch holds at least t_cap * Hq / Hkv floats.
 * Rows [row_begin, row_end) only, so callers may split a step's rows across threads.
 */
#pragma GCC target("avx2,fma,f16c")  /* this file only: the loader checks the CPU has them */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

static inline float hsum(__m256 x) {
    __m128 lo = _mm256_castps256_ps128(x), hi = _mm256_extractf128_ps(x, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

/* The eight sums of a[0..7] as one vector (lane i = sum of a[i]'s lanes). */
static inline __m256 hsum8(const __m256 *a) {
    __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
    __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
    __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
    /* s0123: lanes (0,1,2,3 | 0,1,2,3) from each 128-bit half; same for 4567 */
    __m256 lo = _mm256_permute2f128_ps(s0123, s4567, 0x20), hi = _mm256_permute2f128_ps(s0123, s4567, 0x31);
    return _mm256_add_ps(lo, hi);
}

static inline __m256 load8(const uint16_t *p) {  /* eight float16 as float32 */
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

/* e^x for eight lanes, x clamped to [-87.3, 88.3]: Cephes' expf, 2^n times a degree-5 polynomial, ~1 ulp. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500E-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* q (already scaled) against one key: a dot product of `chunks` x 8 lanes. */
static inline __m256 dot_lanes(const __m256 *qv, const uint16_t *kt, int64_t chunks) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t c = 0; c < chunks; c++)
        acc = _mm256_fmadd_ps(qv[c], _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(kt + 8 * c))), acc);
    return acc;
}

int mynah_decode_attention(const float *q, const uint16_t *k, const uint16_t *v, const int64_t *lengths,
                           float *out, int64_t row_begin, int64_t row_end, int64_t hq, int64_t hkv, int64_t d,
                           int64_t t_cap, int64_t row_stride, int64_t head_stride, float scale, float *scratch,
                           int64_t scratch_len) {
    if (d % 8 || d > 256 || hkv <= 0 || hq % hkv || t_cap * (hq / hkv) > scratch_len) return -1;
    const int64_t group = hq / hkv, chunks = d / 8;
    for (int64_t r = row_begin; r < row_end; r++) {
        const int64_t n = lengths[r];
        if (n <= 0 || n > t_cap) return -2;
        for (int64_t g = 0; g < hkv; g++) {
            const uint16_t *kr = k + r * row_stride + g * head_stride, *vr = v + r * row_stride + g * head_stride;
            /* scores: every query head of this kv head against each key, the key read once */
            for (int64_t j = 0; j < group; j++) {
                const float *qh = q + (r * hq + g * group + j) * d;
                float *s = scratch + j * n;
                __m256 qv[32];
                for (int64_t c = 0; c < chunks; c++) qv[c] = _mm256_mul_ps(_mm256_loadu_ps(qh + 8 * c), _mm256_set1_ps(scale));
                int64_t t = 0;
                for (; t + 8 <= n; t += 8) {  /* eight keys, then one horizontal reduction for all eight */
                    __m256 acc[8];  /* eight independent chains: the FMA latency overlaps */
                    for (int64_t i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();
                    for (int64_t c = 0; c < chunks; c++)
                        for (int64_t i = 0; i < 8; i++)
                            acc[i] = _mm256_fmadd_ps(qv[c], load8(kr + (t + i) * d + 8 * c), acc[i]);
                    _mm256_storeu_ps(s + t, hsum8(acc));
                }
                for (; t < n; t++) s[t] = hsum(dot_lanes(qv, kr + t * d, chunks));
                float m = s[0];
                for (int64_t t = 1; t < n; t++) m = s[t] > m ? s[t] : m;
                float total = 0.f;
                int64_t u = 0;
                __m256 sum8 = _mm256_setzero_ps();
                for (; u + 8 <= n; u += 8) {
                    __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + u), _mm256_set1_ps(m)));
                    _mm256_storeu_ps(s + u, e);
                    sum8 = _mm256_add_ps(sum8, e);
                }
                total = hsum(sum8);
                for (; u < n; u++) { s[u] = expf(s[u] - m); total += s[u]; }
                const float inv = 1.f / total;
                for (int64_t t = 0; t < n; t++) s[t] *= inv;
            }
            /* outputs: each value row read once for every query head of the group */
            for (int64_t j = 0; j < group; j++) {
                float *o = out + (r * hq + g * group + j) * d;
                const float *s = scratch + j * n;
                __m256 acc[32];
                for (int64_t c = 0; c < chunks; c++) acc[c] = _mm256_setzero_ps();
                for (int64_t t = 0; t < n; t++) {
                    const uint16_t *vt = vr + t * d;
                    const __m256 p = _mm256_set1_ps(s[t]);
                    for (int64_t c = 0; c < chunks; c++)
                        acc[c] = _mm256_fmadd_ps(p, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(vt + 8 * c))), acc[c]);
                }
                for (int64_t c = 0; c < chunks; c++) _mm256_storeu_ps(o + 8 * c, acc[c]);
            }
        }
    }
    return 0;
}

/* GELU's tanh approximation in place: 0.5 x (1 + tanh(u)) = x / (1 + e^(-2u)), u = sqrt(2/pi) (x + 0.044715 x^3).
 * One pass over the activations (torch's tanh GELU made several and ran ~5x slower on these CPUs: a
 * 16-context GPT-2 prefill spent 14 % of its time there). */
void mynah_gelu_tanh(float *x, int64_t n) {
    const __m256 cube = _mm256_set1_ps(0.044715f), scale = _mm256_set1_ps(-1.5957691216057308f), one = _mm256_set1_ps(1.f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        const __m256 minus_2u = _mm256_mul_ps(_mm256_mul_ps(_mm256_fmadd_ps(_mm256_mul_ps(v, v), cube, one), v), scale);
        _mm256_storeu_ps(x + i, _mm256_div_ps(v, _mm256_add_ps(one, exp8(minus_2u))));
    }
    for (; i < n; i++) {
        const float v = x[i], minus_2u = -1.5957691216057308f * v * (1.f + 0.044715f * v * v);
        x[i] = v / (1.f + expf(minus_2u < 88.3f ? minus_2u : 88.3f));
    }
}

/* SwiGLU's middle for int8 Llama-family MLPs: out (rows, width) = silu(gate) * up, where each row of
 * gate_up (rows, 2 * width) is gate then up (the fused gate/up call's output). One pass instead of
 * torch's silu on a strided half plus a multiply (two passes, two new tensors). */
void mynah_silu_mul(const float *gate_up, int64_t rows, int64_t width, float *out) {
    const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gate_up + r * 2 * width, *u = g + width;
        float *o = out + r * width;
        int64_t i = 0;
        for (; i + 8 <= width; i += 8) {
            const __m256 v = _mm256_loadu_ps(g + i);
            const __m256 silu = _mm256_div_ps(v, _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, v))));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(silu, _mm256_loadu_ps(u + i)));
        }
        for (; i < width; i++) o[i] = g[i] / (1.f + expf(-g[i])) * u[i];
    }
}

/* RMSNorm for int8 Llama-family layers: out = weight * (x * 1 / sqrt(mean(x^2) + eps)), a row at a time,
 * one read of x and one write (torch: six ops, five passes). */
void mynah_rms_norm(const float *x, const float *weight, int64_t rows, int64_t width, float eps, float *out) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * width;
        float *o = out + r * width;
        __m256 acc = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 8 <= width; i += 8) {
            const __m256 v = _mm256_loadu_ps(xr + i);
            acc = _mm256_fmadd_ps(v, v, acc);
        }
        float sum = hsum(acc);
        for (; i < width; i++) sum += xr[i] * xr[i];
        const float inv = 1.f / sqrtf(sum / (float)width + eps);
        const __m256 vinv = _mm256_set1_ps(inv);
        for (i = 0; i + 8 <= width; i += 8)
            _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_loadu_ps(weight + i), _mm256_mul_ps(_mm256_loadu_ps(xr + i), vinv)));
        for (; i < width; i++) o[i] = weight[i] * (xr[i] * inv);
    }
}
