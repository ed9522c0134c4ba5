// torch's CPU kernel for mynah::decode_attention (the schema is defined in __init__.py): checks, then
// the C kernel (decode_attention.c) over the rows, split across torch's threads. Native, so the fast
// paths' TorchScript-compiled layers call it without taking Python's GIL (a Python-implemented op
// waited for the GIL behind the event loop on every layer of every step while replies streamed).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

extern "C" int mynah_decode_attention(const float *q, const uint16_t *k, const uint16_t *v, const int64_t *lengths,
                                      float *out, int64_t row_begin, int64_t row_end, int64_t hq, int64_t hkv,
                                      int64_t d, int64_t t_cap, int64_t row_stride, int64_t head_stride, float scale,
                                      float *scratch, int64_t scratch_len);
extern "C" void mynah_gelu_tanh(float *x, int64_t n);

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

TORCH_LIBRARY_IMPL(mynah, CPU, m) {
    m.impl("decode_attention", decode_attention);
    m.impl("gelu_tanh_", gelu_tanh_);
}
