// torch's CPU kernels for the mynah:: ops (the schemas are defined in __init__.py): checks, then the C
// kernels (decode_attention.c, int8_gemm.c, f32_gemm.c) split across torch's threads. Native, so the fast
// paths' TorchScript-compiled layers call it without taking Python's GIL (a Python-implemented op
// waited for the GIL behind the event loop on every layer of every step while replies streamed).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

extern "C" int mynah_decode_attention(const float *q, const uint16_t *k, const uint16_t *v, const int64_t *lengths,
                                      float *out, int64_t row_begin, int64_t row_end, int64_t hq, int64_t hkv,
                                      int64_t d, int64_t t_cap, int64_t row_stride, int64_t head_stride, float scale,
                                      float *scratch, int64_t scratch_len);
extern "C" void mynah_gelu_tanh(float *x, int64_t n);
extern "C" void mynah_silu_mul(const float *gate_up, int64_t rows, int64_t width, float *out);
extern "C" void mynah_rms_norm(const float *x, const float *weight, int64_t rows, int64_t width, float eps, float *out);
extern "C" void mynah_quantize_rows(const float *x, int64_t m, int64_t k, int64_t kp, uint8_t *q, float *scale,
                                    int32_t *zero);
extern "C" void mynah_linear_u8s8(const uint8_t *q, int64_t m, int64_t kp, const int8_t *w, int64_t n, const float *scale,
                                  const int32_t *zero, const int32_t *w_sum, const float *w_scale, const float *bias,
                                  float *y, int64_t p0, int64_t p1);
extern "C" void mynah_quantize_rows_avx2(const float *x, int64_t m, int64_t k, int64_t kp, int16_t *q, float *scale,
                                         int32_t *zero);
extern "C" void mynah_linear_u8s8_avx2(const int16_t *q, int64_t m, int64_t kp, const int8_t *w, int64_t width, int64_t n,
                                       const float *scale, const int32_t *zero, const int32_t *w_sum,
                                       const float *w_scale, const float *bias, float *y, int64_t p0, int64_t p1);
extern "C" void mynah_linear_f32(const float *x, int64_t m, int64_t k, const float *w, int64_t n, const float *bias,
                                 float *y, int64_t p0, int64_t p1);
extern "C" int mynah_amx_enable(void);
extern "C" void mynah_linear_u8s8_amx(const uint8_t *q, int64_t blocks, int64_t kp, const int8_t *w, int64_t n,
                                      const float *scale, const int32_t *zero, const int32_t *w_sum,
                                      const float *w_scale, const float *bias, float *y, int64_t p0, int64_t p1);

// AVX-512 VNNI where the CPU has it (weights packed 64 columns wide by int8_native there; 16 wide: AVX2's).
static bool vnni_ready() {
    static const bool ready = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw")
                              && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    return ready;
}

// AMX for calls of 16 rows or more, where the CPU has it, Linux lends it and MYNAH_AMX is not "off".
static bool amx_ready() {
    static const bool ready = [] {
        if (!vnni_ready()) return false;
        const char *env = std::getenv("MYNAH_AMX");
        return !(env && std::string(env) == "off") && mynah_amx_enable() != 0;
    }();
    return ready;
}

static at::Tensor decode_attention(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
                                   const at::Tensor &lengths, double scale) {
    TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() && lengths.device().is_cpu(),
                "decode_attention: CPU tensors only");
    TORCH_CHECK(q.scalar_type() == at::kFloat && q.dim() == 3, "decode_attention: q must be (B, Hq, D) float32");
    TORCH_CHECK(k.scalar_type() == at::kHalf && v.scalar_type() == at::kHalf && k.dim() == 4 && k.sizes() == v.sizes()
                    && k.strides() == v.strides(), "decode_attention: k and v must be (Bcap, Hkv, Tcap, D) float16 alike");
    TORCH_CHECK(k.stride(3) == 1 && k.stride(2) == k.size(3), "decode_attention: each head's columns must be contiguous");
    TORCH_CHECK(q.size(2) == k.size(3) && q.size(0) <= k.size(0) && k.size(1) > 0 && q.size(1) % k.size(1) == 0,
                "decode_attention: q's rows, heads or width do not fit the cache");
    TORCH_CHECK(lengths.scalar_type() == at::kLong && lengths.dim() == 1 && lengths.size(0) == q.size(0),
                "decode_attention: lengths must be (B,) int64");
    const at::Tensor qc = q.contiguous(), lc = lengths.contiguous();
    at::Tensor out = at::empty_like(qc);
    const int64_t rows = qc.size(0), hq = qc.size(1), hkv = k.size(1), d = qc.size(2), t_cap = k.size(2);
    const int64_t scratch_len = t_cap * (hq / hkv);
    std::atomic<int> status{0};
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> scratch(static_cast<size_t>(std::max<int64_t>(scratch_len, 1)));
        const int rc = mynah_decode_attention(
            qc.data_ptr<float>(), reinterpret_cast<const uint16_t *>(k.data_ptr<at::Half>()),
            reinterpret_cast<const uint16_t *>(v.data_ptr<at::Half>()), lc.data_ptr<int64_t>(), out.data_ptr<float>(),
            begin, end, hq, hkv, d, t_cap, k.stride(0), k.stride(1), static_cast<float>(scale), scratch.data(),
            scratch_len);
        if (rc) status = rc;
    });
    TORCH_CHECK(status == 0, status == -2 ? "decode_attention: a length outside 1 … the cache's columns"
                                          : "decode_attention: head width must be a multiple of 8, at most 256");
    return out;
}

static at::Tensor &gelu_tanh_(at::Tensor &x) {
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous(),
                "gelu_tanh_: a contiguous float32 CPU tensor");
    float *data = x.data_ptr<float>();
    at::parallel_for(0, x.numel(), 16384, [&](int64_t begin, int64_t end) { mynah_gelu_tanh(data + begin, end - begin); });
    return x;
}

static at::Tensor silu_mul(const at::Tensor &gate_up) {
    TORCH_CHECK(gate_up.device().is_cpu() && gate_up.scalar_type() == at::kFloat && gate_up.dim() == 2
                    && gate_up.size(1) % 2 == 0, "silu_mul: gate_up must be (N, 2 * I) float32");
    const at::Tensor gu = gate_up.contiguous();
    const int64_t rows = gu.size(0), width = gu.size(1) / 2;
    at::Tensor out = at::empty({rows, width}, gu.options());
    const float *in = gu.data_ptr<float>();
    float *o = out.data_ptr<float>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1)), [&](int64_t begin, int64_t end) {
        mynah_silu_mul(in + begin * 2 * width, end - begin, width, o + begin * width);
    });
    return out;
}

static at::Tensor rms_norm(const at::Tensor &x, const at::Tensor &weight, double eps) {
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2, "rms_norm: x must be (N, E) float32");
    TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.dim() == 1 && weight.size(0) == x.size(1),
                "rms_norm: weight must be (E,) float32");
    const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
    const int64_t rows = xc.size(0), width = xc.size(1);
    at::Tensor out = at::empty_like(xc);
    const float *in = xc.data_ptr<float>(), *w = wc.data_ptr<float>();
    float *o = out.data_ptr<float>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1)), [&](int64_t begin, int64_t end) {
        mynah_rms_norm(in + begin * width, w, end - begin, width, static_cast<float>(eps), o + begin * width);
    });
    return out;
}

// x (M, K) float32 times int8 weights packed by engine.serving.int8_native (int8_gemm.c's layout): (M, n).
// Panels 64 columns wide go to VNNI (and AMX) where the CPU has them; 16 wide (int8_native packs so where
// it has not) to the AVX2 kernel, as does a 64-wide pack on a CPU without VNNI.
static at::Tensor linear_u8s8(const at::Tensor &x, const at::Tensor &w, const at::Tensor &w_sum, const at::Tensor &w_scale,
                              const std::optional<at::Tensor> &bias, int64_t n) {
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2, "linear_u8s8: x must be (M, K) float32");
    TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 4 && (w.size(2) == 64 || w.size(2) == 16) && w.size(3) == 4
                    && w.is_contiguous(), "linear_u8s8: w must be packed int8 (panels, kp / 4, 64 or 16, 4)");
    const int64_t panels = w.size(0), width = w.size(2), kp = w.size(1) * 4, k = x.size(1), m = x.size(0);
    const int64_t padded = panels * width;
    TORCH_CHECK(k <= kp && kp - k < 4 && n > padded - width && n <= padded, "linear_u8s8: x's width or n does not fit w");
    TORCH_CHECK(w_sum.scalar_type() == at::kInt && w_scale.scalar_type() == at::kFloat && w_sum.is_contiguous()
                    && w_scale.is_contiguous() && w_sum.numel() == padded && w_scale.numel() == padded,
                "linear_u8s8: w_sum (int32) and w_scale (float32) must hold one value per padded column");
    const bool has_bias = bias.has_value() && bias->defined();
    TORCH_CHECK(!has_bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == padded),
                "linear_u8s8: bias must be float32, one value per padded column");
    const at::Tensor xc = x.contiguous();
    at::Tensor y = at::empty({m, n}, xc.options());
    if (m == 0) return y;
    std::vector<float> scale(static_cast<size_t>(m));
    std::vector<int32_t> zero(static_cast<size_t>(m));
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (kp * width * std::min<int64_t>(m, 16)));
    const float *b = has_bias ? bias->data_ptr<float>() : nullptr;
    if (width == 16 || !vnni_ready()) {
        std::vector<int16_t> q16(static_cast<size_t>(m * kp));
        mynah_quantize_rows_avx2(xc.data_ptr<float>(), m, k, kp, q16.data(), scale.data(), zero.data());
        at::parallel_for(0, panels, grain, [&](int64_t begin, int64_t end) {
            mynah_linear_u8s8_avx2(q16.data(), m, kp, w.data_ptr<int8_t>(), width, n, scale.data(), zero.data(),
                                   w_sum.data_ptr<int32_t>(), w_scale.data_ptr<float>(), b, y.data_ptr<float>(), begin, end);
        });
        return y;
    }
    std::vector<uint8_t> q(static_cast<size_t>(m * kp));
    mynah_quantize_rows(xc.data_ptr<float>(), m, k, kp, q.data(), scale.data(), zero.data());
    const int64_t tiled = (m >= 16 && kp % 64 == 0 && amx_ready()) ? m / 16 : 0;  // blocks of 16 rows by AMX
    const int64_t rest = tiled * 16;
    at::parallel_for(0, panels, grain, [&](int64_t begin, int64_t end) {
        if (tiled)
            mynah_linear_u8s8_amx(q.data(), tiled, kp, w.data_ptr<int8_t>(), n, scale.data(), zero.data(),
                                  w_sum.data_ptr<int32_t>(), w_scale.data_ptr<float>(), b, y.data_ptr<float>(), begin, end);
        if (rest < m)
            mynah_linear_u8s8(q.data() + rest * kp, m - rest, kp, w.data_ptr<int8_t>(), n, scale.data() + rest,
                              zero.data() + rest, w_sum.data_ptr<int32_t>(), w_scale.data_ptr<float>(), b,
                              y.data_ptr<float>() + rest * n, begin, end);
    });
    return y;
}

// x (M, K) float32 times fp32 weights packed by engine.serving.f32_native (f32_gemm.c's layout): (M, n).
static at::Tensor linear_f32(const at::Tensor &x, const at::Tensor &w, const std::optional<at::Tensor> &bias, int64_t n) {
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2, "linear_f32: x must be (M, K) float32");
    TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.dim() == 3 && w.size(2) == 16 && w.is_contiguous(),
                "linear_f32: w must be packed float32 (panels, k, 16)");
    const int64_t panels = w.size(0), k = w.size(1), m = x.size(0);
    TORCH_CHECK(x.size(1) == k && n > panels * 16 - 16 && n <= panels * 16, "linear_f32: x's width or n does not fit w");
    const bool has_bias = bias.has_value() && bias->defined();
    TORCH_CHECK(!has_bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == panels * 16),
                "linear_f32: bias must be float32, one value per padded column");
    const at::Tensor xc = x.contiguous();
    at::Tensor y = at::empty({m, n}, xc.options());
    if (m == 0) return y;
    const float *b = has_bias ? bias->data_ptr<float>() : nullptr;
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / (k * 16 * std::min<int64_t>(m, 16)));
    at::parallel_for(0, panels, grain, [&](int64_t begin, int64_t end) {
        mynah_linear_f32(xc.data_ptr<float>(), m, k, w.data_ptr<float>(), n, b, y.data_ptr<float>(), begin, end);
    });
    return y;
}

// How many threads one of these kernels' parallel loops runs on: torch's intra-op threads when the library
// was built with OpenMP, as torch's own loops are (built without it, every kernel ran on one thread).
static int64_t kernel_threads() {
    std::atomic<int64_t> seen{0};
    at::parallel_for(0, 1024, 1, [&](int64_t, int64_t) { seen.fetch_or(int64_t{1} << at::get_thread_num()); });
    return __builtin_popcountll(static_cast<unsigned long long>(seen.load()));
}

TORCH_LIBRARY_IMPL(mynah, CompositeExplicitAutograd, m) {
    m.impl("kernel_threads", kernel_threads);
}

TORCH_LIBRARY_IMPL(mynah, CPU, m) {
    m.impl("linear_f32", linear_f32);
    m.impl("decode_attention", decode_attention);
    m.impl("gelu_tanh_", gelu_tanh_);
    m.impl("linear_u8s8", linear_u8s8);
    m.impl("silu_mul", silu_mul);
    m.impl("rms_norm", rms_norm);
}
