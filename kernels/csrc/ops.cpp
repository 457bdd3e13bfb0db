// Torch bindings of the CUDA kernels: operator schemas (namespace miro_kernels), input checks with clear messages,
// output allocation, and launches on the current stream of the inputs' device. kernels/cuda.py adds the autograd
// and fake-tensor rules in Python, so the ops work under autograd and torch.compile.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "launchers.h"

namespace {

using at::Tensor;

// "[2, 5, 64]": shapes and strides for the error messages, spelled out with std::to_string. Every number in a
// message goes through it or std::to_string: TORCH_CHECK streams its arguments into a std::ostream, and inserting an
// integer there segfaulted inside this library on the H200 machine (torch 2.11, CUDA 13; backtrace in
// std::basic_ostream::_M_insert<long>) instead of raising the error.
std::string dims_str(at::IntArrayRef dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

miro::DType dtype_tag(const Tensor& x, const char* op) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": the CUDA kernels take float32 or bfloat16, got ",
              c10::toString(x.scalar_type()));
  return x.scalar_type() == at::kBFloat16 ? miro::DType::kBFloat16 : miro::DType::kFloat32;
}

// x (or h): the reference input. CUDA, contiguous, float32/bfloat16, at least `dims` dimensions.
void check_main(const Tensor& x, const char* op, const char* name, int64_t dims) {
  TORCH_CHECK(x.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", x.device().str());
  TORCH_CHECK(dims < 0 ? x.dim() >= 1 : x.dim() == dims, op, ": ", name, " must have ",
              dims < 0 ? "at least 1" : std::to_string(dims), " dimensions, got shape ", dims_str(x.sizes()));
  TORCH_CHECK(x.is_contiguous(), op, ": ", name, " must be contiguous (call .contiguous()), got strides ",
              dims_str(x.strides()));
}

void check_like(const Tensor& ref, const Tensor& t, const char* op, const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device().str(), " but ", ref_name, " is on ",
              ref.device().str());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " is ", c10::toString(t.scalar_type()), " but ",
              ref_name, " is ", c10::toString(ref.scalar_type()), " (cast the inputs to one dtype)");
}

// A (B, N, D) tensor shaped and laid out like x.
void check_tokens(const Tensor& x, const Tensor& t, const char* op, const char* name) {
  check_like(x, t, op, name, "x");
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", name, " must have x's shape ", dims_str(x.sizes()), ", got ",
              dims_str(t.sizes()));
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (call .contiguous()), got strides ",
              dims_str(t.strides()));
}

// A per-sample (B, D) vector for x (B, N, D): unit stride along D, any stride along B (0 broadcasts one vector).
void check_per_sample(const Tensor& x, const Tensor& v, const char* op, const char* name, const char* x_name = "x") {
  check_like(x, v, op, name, x_name);
  TORCH_CHECK(v.dim() == 2 && v.size(0) == x.size(0) && v.size(1) == x.size(2), op, ": ", name, " must be (B, D) = ",
              dims_str({x.size(0), x.size(2)}), " for ", x_name, " of shape ", dims_str(x.sizes()), ", got ",
              dims_str(v.sizes()));
  TORCH_CHECK(v.stride(1) == 1 || v.size(1) == 1, op, ": ", name, " must have unit stride along D, got strides ",
              dims_str(v.strides()));
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA error ", cudaGetErrorString(err));
}

Tensor sum_chunks(const Tensor& part, const Tensor& like, const Tensor* mul, const char* op) {
  Tensor out = at::empty({part.size(0), part.size(2)}, like.options());
  check_launch(miro::launch_sum_chunks({part.data_ptr<float>(), mul ? mul->data_ptr() : nullptr, out.data_ptr(),
                                        part.size(0), part.size(1), part.size(2), dtype_tag(like, op)},
                                       c10::cuda::getCurrentCUDAStream()),
               op);
  return out;
}

// ---- norm + adaLN modulation ----

constexpr const char* kNormModulate = "miro_kernels.norm_modulate";

// After check_main(x) and a device guard for x (the width limit is the current device's).
void check_norm_modulate(const Tensor& x, const Tensor& scale, const std::optional<Tensor>& weight) {
  const char* op = kNormModulate;
  dtype_tag(x, op);
  check_per_sample(x, scale, op, "scale");
  if (weight.has_value()) {
    check_like(x, *weight, op, "weight", "x");
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == x.size(2) && weight->is_contiguous(), op,
                ": weight must be a contiguous (D,) = ", dims_str({x.size(2)}), " tensor, got shape ",
                dims_str(weight->sizes()));
  }
  const int64_t max_width = miro::norm_modulate_max_width();
  TORCH_CHECK(x.size(2) <= max_width, op, ": width D = ", std::to_string(x.size(2)),
              " exceeds the kernels' maximum of ", std::to_string(max_width),
              " on this GPU (shared memory); use the PyTorch reference (impl='torch')");
}

std::tuple<Tensor, Tensor, Tensor> norm_modulate_fwd(const Tensor& x, const Tensor& shift, const Tensor& scale,
                                                     const std::optional<Tensor>& weight, bool rms, double eps) {
  check_main(x, kNormModulate, "x", 3);
  c10::cuda::CUDAGuard guard(x.device());
  check_norm_modulate(x, scale, weight);
  check_per_sample(x, shift, kNormModulate, "shift");
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  Tensor y = at::empty_like(x);
  Tensor mean = at::empty({B, N}, x.options().dtype(at::kFloat)), rstd = at::empty_like(mean);
  miro::NormModulateFwd a{x.data_ptr(), shift.data_ptr(), scale.data_ptr(), weight ? weight->data_ptr() : nullptr,
                          y.data_ptr(), mean.data_ptr<float>(), rstd.data_ptr<float>(), B, N, D, shift.stride(0),
                          scale.stride(0), rms, static_cast<float>(eps), dtype_tag(x, kNormModulate)};
  check_launch(miro::launch_norm_modulate_fwd(a, c10::cuda::getCurrentCUDAStream()), kNormModulate);
  return {y, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> norm_modulate_bwd(const Tensor& dy, const Tensor& x, const Tensor& scale,
                                                             const std::optional<Tensor>& weight, const Tensor& mean,
                                                             const Tensor& rstd, bool rms) {
  const char* op = kNormModulate;
  check_main(x, op, "x", 3);
  c10::cuda::CUDAGuard guard(x.device());
  check_norm_modulate(x, scale, weight);
  check_tokens(x, dy, op, "grad_output");
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  for (const Tensor* s : {&mean, &rstd})
    TORCH_CHECK(s->scalar_type() == at::kFloat && s->device() == x.device() && s->is_contiguous() &&
                    s->numel() == B * N,
                op, ": mean and rstd must be the contiguous float32 (B, N) statistics of the forward");
  const int64_t R = miro::rows_per_chunk(B, N), chunks = (N + R - 1) / R;
  Tensor part = at::empty({2, B, chunks, D}, x.options().dtype(at::kFloat));  // sums of dy, dy * xhat per chunk
  Tensor dx = at::empty_like(x);
  miro::NormModulateBwd a{dy.data_ptr(), x.data_ptr(), scale.data_ptr(), weight ? weight->data_ptr() : nullptr,
                          mean.data_ptr<float>(), rstd.data_ptr<float>(), dx.data_ptr(), part[0].data_ptr<float>(),
                          part[1].data_ptr<float>(), B, N, D, scale.stride(0), R, rms, dtype_tag(x, op)};
  check_launch(miro::launch_norm_modulate_bwd(a, c10::cuda::getCurrentCUDAStream()), op);
  Tensor dshift = sum_chunks(part[0], x, nullptr, op);
  Tensor dscale = sum_chunks(part[1], x, weight ? &*weight : nullptr, op);  // w * sum_N dy * xhat
  Tensor dweight = weight ? (part[1].sum(1) * (scale.to(at::kFloat) + 1)).sum(0).to(weight->scalar_type())
                          : at::empty({0}, x.options());
  return {dx, dshift, dscale, dweight};
}

// ---- gated residual ----

constexpr const char* kGatedResidual = "miro_kernels.gated_residual";

// x and out in one dtype, gate and y in one dtype (float32 or bfloat16 each): under bf16 autocast the residual stream
// is float32 and the branch (gate, y) bfloat16.
Tensor gated_residual_fwd(const Tensor& x, const Tensor& gate, const Tensor& y) {
  const char* op = kGatedResidual;
  check_main(x, op, "x", 3);
  c10::cuda::CUDAGuard guard(x.device());
  check_main(y, op, "y", 3);
  TORCH_CHECK(y.device() == x.device() && y.sizes() == x.sizes(), op, ": y must have x's shape ", dims_str(x.sizes()),
              " and device ", x.device().str(), ", got ", dims_str(y.sizes()), " on ", y.device().str());
  check_per_sample(y, gate, op, "gate", "y");
  Tensor out = at::empty_like(x);
  miro::GatedResidualFwd a{x.data_ptr(), gate.data_ptr(), y.data_ptr(), out.data_ptr(), x.size(0), x.size(1),
                           x.size(2), gate.stride(0), dtype_tag(x, op), dtype_tag(y, op)};
  check_launch(miro::launch_gated_residual_fwd(a, c10::cuda::getCurrentCUDAStream()), op);
  return out;
}

std::tuple<Tensor, Tensor> gated_residual_bwd(const Tensor& dout, const Tensor& gate, const Tensor& y) {
  const char* op = kGatedResidual;
  check_main(y, op, "y", 3);
  c10::cuda::CUDAGuard guard(y.device());
  check_per_sample(y, gate, op, "gate", "y");
  check_main(dout, op, "grad_output", 3);
  TORCH_CHECK(dout.device() == y.device() && dout.sizes() == y.sizes(), op, ": grad_output must have y's shape ",
              dims_str(y.sizes()), " and device ", y.device().str(), ", got ", dims_str(dout.sizes()), " on ",
              dout.device().str());
  const int64_t B = y.size(0), N = y.size(1), D = y.size(2);
  const int64_t R = miro::rows_per_chunk(B, N), chunks = (N + R - 1) / R;
  Tensor part = at::empty({B, chunks, D}, y.options().dtype(at::kFloat));  // sums of dout * y per chunk
  Tensor dy = at::empty_like(y);
  miro::GatedResidualBwd a{dout.data_ptr(), gate.data_ptr(), y.data_ptr(), dy.data_ptr(), part.data_ptr<float>(),
                           B, N, D, gate.stride(0), R, dtype_tag(dout, op), dtype_tag(y, op)};
  check_launch(miro::launch_gated_residual_bwd(a, c10::cuda::getCurrentCUDAStream()), op);
  return {dy, sum_chunks(part, y, nullptr, op)};
}

// ---- SwiGLU ----

constexpr const char* kSwiGLU = "miro_kernels.swiglu";

void check_swiglu(const Tensor& h) {
  check_main(h, kSwiGLU, "h", -1);
  dtype_tag(h, kSwiGLU);
  TORCH_CHECK(h.size(-1) % 2 == 0, kSwiGLU, ": the last dimension of h must be even ([a | b]), got ",
              std::to_string(h.size(-1)));
}

Tensor swiglu_fwd(const Tensor& h) {
  check_swiglu(h);
  c10::cuda::CUDAGuard guard(h.device());
  std::vector<int64_t> shape = h.sizes().vec();
  const int64_t H = shape.back() / 2;
  shape.back() = H;
  Tensor out = at::empty(shape, h.options());
  miro::SwiGLU p{h.data_ptr(), nullptr, out.data_ptr(), H ? h.numel() / (2 * H) : 0, H, dtype_tag(h, kSwiGLU)};
  check_launch(miro::launch_swiglu_fwd(p, c10::cuda::getCurrentCUDAStream()), kSwiGLU);
  return out;
}

Tensor swiglu_bwd(const Tensor& dout, const Tensor& h) {
  check_swiglu(h);
  c10::cuda::CUDAGuard guard(h.device());
  check_like(h, dout, kSwiGLU, "grad_output", "h");
  std::vector<int64_t> shape = h.sizes().vec();
  const int64_t H = shape.back() / 2;
  shape.back() = H;
  TORCH_CHECK(dout.sizes() == at::IntArrayRef(shape) && dout.is_contiguous(), kSwiGLU,
              ": grad_output must be contiguous with shape ", dims_str(shape), ", got ", dims_str(dout.sizes()));
  Tensor dh = at::empty_like(h);
  miro::SwiGLU p{h.data_ptr(), dout.data_ptr(), dh.data_ptr(), H ? h.numel() / (2 * H) : 0, H, dtype_tag(h, kSwiGLU)};
  check_launch(miro::launch_swiglu_bwd(p, c10::cuda::getCurrentCUDAStream()), kSwiGLU);
  return dh;
}

}  // namespace

TORCH_LIBRARY(miro_kernels, m) {
  m.def("norm_modulate_fwd(Tensor x, Tensor shift, Tensor scale, Tensor? weight, bool rms, float eps)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("norm_modulate_bwd(Tensor grad_y, Tensor x, Tensor scale, Tensor? weight, Tensor mean, Tensor rstd, bool rms)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("gated_residual_fwd(Tensor x, Tensor gate, Tensor y) -> Tensor");
  m.def("gated_residual_bwd(Tensor grad_out, Tensor gate, Tensor y) -> (Tensor, Tensor)");
  m.def("swiglu_fwd(Tensor h) -> Tensor");
  m.def("swiglu_bwd(Tensor grad_out, Tensor h) -> Tensor");
}

TORCH_LIBRARY_IMPL(miro_kernels, CUDA, m) {
  m.impl("norm_modulate_fwd", &norm_modulate_fwd);
  m.impl("norm_modulate_bwd", &norm_modulate_bwd);
  m.impl("gated_residual_fwd", &gated_residual_fwd);
  m.impl("gated_residual_bwd", &gated_residual_bwd);
  m.impl("swiglu_fwd", &swiglu_fwd);
  m.impl("swiglu_bwd", &swiglu_bwd);
}
