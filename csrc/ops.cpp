// The one binding file of tlcore's compiled extension, `tlcore._C`.
//
// Kernels live in csrc/cpu/*.cpp and csrc/cuda/*.cu behind plain C++ entry points
// (csrc/*.h, light headers so nvcc stays fast); this file declares each op once in
// the `tlcore` namespace, wraps tensors, and registers the CPU and CUDA kernels.
// Ops named `_x_cpu` / `_x_cuda` are the compiled backends of the public Python ops
// in tlcore/ops, which choose a backend and hold the fake (shape-only) twins.
#include <Python.h>
#include <torch/library.h>

// ---- int8 convolution (csrc/int8_conv.h) -------------------------------------------------------
#include <ATen/ATen.h>

#include "int8_conv.h"
#include "int8_layers.h"
#ifdef TLCORE_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace {

// The op's isa argument (0 auto .. kAmx, the enum's last value), checked to be one this CPU runs.
tlcore::Int8Isa checked_isa(int64_t isa) {
  TORCH_CHECK(isa >= 0 && isa <= static_cast<int64_t>(tlcore::Int8Isa::kAmx) &&
                  tlcore::int8_isa_supported(static_cast<tlcore::Int8Isa>(isa)),
              "tlcore int8 conv: instruction set ", isa, " is not available on this CPU");
  return static_cast<tlcore::Int8Isa>(isa);
}

tlcore::Int8Algorithm checked_algorithm(int64_t algorithm) {
  // kSplit: the enum's last value.
  TORCH_CHECK(algorithm >= 0 && algorithm <= static_cast<int64_t>(tlcore::Int8Algorithm::kSplit),
              "tlcore int8 conv: unknown algorithm ", algorithm);
  return static_cast<tlcore::Int8Algorithm>(algorithm);
}

// Checks the arguments (Int8Conv2d calls the CPU op directly, without the Python op's checks in
// tlcore/ops/int8.py), then views the tensors.
tlcore::Int8ConvArgs int8_conv_args(const at::Tensor& x, int64_t x_zero, const at::Tensor& weight,
                                    const at::Tensor& multiplier, const at::Tensor& offset, int64_t shift,
                                    const std::optional<at::Tensor>& residual, int64_t res_multiplier,
                                    int64_t out_zero, bool relu, at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation, const at::Tensor& out, int64_t groups = 1) {
  const auto nhwc = at::MemoryFormat::ChannelsLast;
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kChar && x.is_contiguous(nhwc),
              "tlcore int8 conv: x must be a channels_last int8 (N, C, H, W) tensor");
  TORCH_CHECK(groups >= 1 && weight.dim() == 4 && weight.size(0) % groups == 0,
              "tlcore int8 conv: groups must be >= 1 and divide the output channels");
  TORCH_CHECK(weight.scalar_type() == at::kChar && weight.is_contiguous(nhwc),
              "tlcore int8 conv: weight must be a channels_last int8 (K, C / groups, R, S) tensor");
  TORCH_CHECK(weight.size(1) * groups == x.size(1), "tlcore int8 conv: x has ", x.size(1),
              " channels but weight expects ", weight.size(1), " per group x ", groups, " groups");
  const int64_t k = weight.size(0);
  TORCH_CHECK(multiplier.scalar_type() == at::kInt && multiplier.numel() == k && multiplier.is_contiguous() &&
                  offset.scalar_type() == at::kLong && offset.numel() == k && offset.is_contiguous(),
              "tlcore int8 conv: multiplier must be int32 (K,) and offset int64 (K,)");
  TORCH_CHECK(shift >= 0 && shift <= 62, "tlcore int8 conv: shift must be in [0, 62]");
  TORCH_CHECK(x_zero >= -128 && x_zero <= 127 && out_zero >= -128 && out_zero <= 127,
              "tlcore int8 conv: x_zero and out_zero must be in [-128, 127]");
  TORCH_CHECK(res_multiplier > -(int64_t{1} << 31) && res_multiplier < (int64_t{1} << 31),
              "tlcore int8 conv: |res_multiplier| must be below 2**31");
  // |acc| <= 128 * 128 * C * R * S must fit int32 (tlcore.ops.int8.MAX_REDUCTION).
  TORCH_CHECK(weight.size(1) * weight.size(2) * weight.size(3) <= (int64_t{1} << 31) / (128 * 128) - 1,
              "tlcore int8 conv: C*R*S exceeds the int32-exact reduction limit");
  TORCH_CHECK(weight.device() == x.device() && multiplier.device() == x.device() && offset.device() == x.device() &&
                  (!residual.has_value() || residual->device() == x.device()),
              "tlcore int8 conv: all tensors must be on x's device");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "tlcore int8 conv: stride, padding and dilation must be pairs");
  if (residual.has_value()) {
    TORCH_CHECK(residual->scalar_type() == at::kChar && residual->is_contiguous(nhwc) &&
                    residual->sizes() == out.sizes(),
                "tlcore int8 conv: residual must be channels_last int8 shaped like the output");
  }
  return tlcore::Int8ConvArgs{
      x.data_ptr<int8_t>(), x.size(0), x.size(2), x.size(3), x.size(1), static_cast<int32_t>(x_zero),
      weight.data_ptr<int8_t>(), k, weight.size(2), weight.size(3),
      multiplier.data_ptr<int32_t>(), offset.data_ptr<int64_t>(), static_cast<int32_t>(shift),
      residual.has_value() ? residual->data_ptr<int8_t>() : nullptr, res_multiplier,
      static_cast<int32_t>(out_zero), relu,
      stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], out.size(2), out.size(3),
      out.data_ptr<int8_t>(), nullptr, 127, 0, groups};
}

at::Tensor int8_conv_out(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4 && stride.size() == 2 && padding.size() == 2 &&
                  dilation.size() == 2, "tlcore int8 conv: x and weight must be 4-d, stride/padding/dilation pairs");
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1 && dilation[0] >= 1 && dilation[1] >= 1 && padding[0] >= 0 &&
                  padding[1] >= 0,
              "tlcore int8 conv: need stride >= 1, dilation >= 1 and padding >= 0");
  const int64_t oh = (x.size(2) + 2 * padding[0] - dilation[0] * (weight.size(2) - 1) - 1) / stride[0] + 1;
  const int64_t ow = (x.size(3) + 2 * padding[1] - dilation[1] * (weight.size(3) - 1) - 1) / stride[1] + 1;
  TORCH_CHECK(oh > 0 && ow > 0 && x.size(2) + 2 * padding[0] >= dilation[0] * (weight.size(2) - 1) + 1 &&
                  x.size(3) + 2 * padding[1] >= dilation[1] * (weight.size(3) - 1) + 1,
              "tlcore int8 conv: the input is smaller than the (dilated) kernel with this padding");
  return at::empty({x.size(0), weight.size(0), oh, ow},
                   x.options().memory_format(at::MemoryFormat::ChannelsLast));
}

at::Tensor int8_conv_cpu(const at::Tensor& x, int64_t x_zero, const at::Tensor& weight,
                         const at::Tensor& multiplier, const at::Tensor& offset, int64_t shift,
                         const std::optional<at::Tensor>& residual, int64_t res_multiplier, int64_t out_zero,
                         bool relu, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                         int64_t out_max, const std::optional<at::Tensor>& packed_weight, int64_t isa,
                         int64_t algorithm, int64_t groups) {
  const tlcore::Int8Isa wanted = checked_isa(isa);
  TORCH_CHECK(out_max >= out_zero && out_max <= 127, "tlcore int8 conv: need out_zero <= out_max <= 127");
  at::Tensor out = int8_conv_out(x, weight, stride, padding, dilation);
  auto args = int8_conv_args(x, x_zero, weight, multiplier, offset, shift, residual, res_multiplier,
                             out_zero, relu, stride, padding, dilation, out, groups);
  args.out_max = static_cast<int32_t>(out_max);
  const tlcore::Int8Algorithm chosen = checked_algorithm(algorithm);
  TORCH_CHECK(tlcore::int8_algorithm_supported(chosen, args.k, args.c, args.r, args.s, args.stride_h, args.stride_w,
                                               args.dil_h, args.dil_w, tlcore::int8_resolve_isa(wanted), groups),
              "tlcore int8 conv: algorithm ", algorithm, " cannot run this conv on this instruction set (see "
              "Int8Algorithm in csrc/int8_conv.h)");
  args.algorithm = static_cast<int32_t>(algorithm);
  if (packed_weight.has_value()) {
    TORCH_CHECK(packed_weight->scalar_type() == at::kInt && packed_weight->is_contiguous() &&
                    packed_weight->numel() ==
                        tlcore::int8_packed_weight_words(args.k, args.c, args.r, args.s, wanted, chosen, groups),
                "tlcore int8 conv: packed_weight does not match the weight and instruction set; pack it with "
                "_int8_pack_weight_cpu");
    args.packed_weight = packed_weight->data_ptr<int32_t>();
  }
  if (out.numel() > 0) tlcore::int8_conv2d_cpu(args, wanted);
  return out;
}

at::Tensor int8_pack_weight_cpu(const at::Tensor& weight, int64_t isa, int64_t algorithm, int64_t groups) {
  TORCH_CHECK(weight.dim() == 4 && weight.scalar_type() == at::kChar &&
                  weight.is_contiguous(at::MemoryFormat::ChannelsLast),
              "tlcore int8 conv: weight must be a channels_last int8 (K, C / groups, R, S) tensor");
  TORCH_CHECK(groups >= 1 && weight.size(0) % groups == 0,
              "tlcore int8 conv: groups must be >= 1 and divide the output channels");
  const tlcore::Int8Isa wanted = checked_isa(isa);
  const int64_t k = weight.size(0), c = weight.size(1) * groups, r = weight.size(2), s = weight.size(3);
  const tlcore::Int8Algorithm chosen = checked_algorithm(algorithm);
  at::Tensor packed = at::empty({tlcore::int8_packed_weight_words(k, c, r, s, wanted, chosen, groups)},
                                weight.options().dtype(at::kInt));
  tlcore::pack_int8_weight_cpu(weight.data_ptr<int8_t>(), k, c, r, s, wanted, chosen, packed.data_ptr<int32_t>(),
                               groups);
  return packed;
}

// c: the input's channels (C / groups per weight row).
int64_t int8_cpu_best_algorithm(int64_t k, int64_t c, int64_t r, int64_t s, at::IntArrayRef stride,
                                at::IntArrayRef dilation, int64_t isa, int64_t groups) {
  TORCH_CHECK(stride.size() == 2 && dilation.size() == 2, "tlcore int8 conv: stride and dilation must be pairs");
  return static_cast<int64_t>(tlcore::int8_best_algorithm(k, c, r, s, stride[0], stride[1], dilation[0], dilation[1],
                                                          tlcore::int8_resolve_isa(checked_isa(isa)), groups));
}

// The packed weight's size in int32 words (the fake of _int8_pack_weight_cpu); c: the input's channels.
int64_t int8_cpu_packed_words(int64_t k, int64_t c, int64_t r, int64_t s, int64_t isa, int64_t algorithm,
                              int64_t groups) {
  return tlcore::int8_packed_weight_words(k, c, r, s, checked_isa(isa), checked_algorithm(algorithm), groups);
}

int64_t int8_cpu_resolve_isa(int64_t isa) {
  return static_cast<int64_t>(tlcore::int8_resolve_isa(checked_isa(isa)));
}

bool int8_cpu_isa_supported(int64_t isa) {
  return isa >= 0 && isa <= 6 && tlcore::int8_isa_supported(static_cast<tlcore::Int8Isa>(isa));
}

// ---- the int8 model's other layers (csrc/int8_layers.h) ------------------------------------------

// reject_non_finite: raise ValueError if x holds a NaN or an infinity (the int8 model's input check, found in
// the same pass).
at::Tensor quantize_cpu(const at::Tensor& x, double inv_scale, int64_t zero_point, bool reject_non_finite) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "tlcore quantize: x must be a CPU fp32 (N, C, H, W) tensor");
  TORCH_CHECK(zero_point >= -128 && zero_point <= 127, "tlcore quantize: zero_point must be in [-128, 127]");
  const bool channels_last = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor src = channels_last ? x : x.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kChar).memory_format(at::MemoryFormat::ChannelsLast));
  const bool non_finite = tlcore::quantize_to_nhwc_cpu(
      src.data_ptr<float>(), x.size(0), x.size(1), x.size(2) * x.size(3), channels_last, static_cast<float>(inv_scale),
      static_cast<int32_t>(zero_point), out.data_ptr<int8_t>());
  TORCH_CHECK_VALUE(!(reject_non_finite && non_finite),
                    "tlcore int8 model: the input contains NaN or inf (or a stem or block left float produced one)");
  return out;
}

// q: int8 (N, C, H, W), any layout -> fp32 (N, C, 1, 1) means of the dequantized codes.
at::Tensor int8_global_avg_pool_cpu(const at::Tensor& q, double scale, int64_t zero_point) {
  TORCH_CHECK(q.dim() == 4 && q.scalar_type() == at::kChar && q.device().is_cpu(),
              "tlcore int8 global average pool: q must be a CPU int8 (N, C, H, W) tensor");
  TORCH_CHECK(q.size(2) * q.size(3) > 0, "tlcore int8 global average pool: the feature map is empty");
  const at::Tensor src = q.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor out = at::empty({q.size(0), q.size(1), 1, 1}, q.options().dtype(at::kFloat));
  tlcore::int8_global_avg_pool_cpu(src.data_ptr<int8_t>(), q.size(0), q.size(2) * q.size(3), q.size(1), scale,
                                   static_cast<int32_t>(zero_point), out.data_ptr<float>());
  return out;
}

// x: fp32 (N, C); weight: int8 (K, C); w_scale, bias: fp32 (K,) -> fp32 (N, K). plain: no SIMD.
at::Tensor int8_weight_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& w_scale,
                                  const at::Tensor& bias, bool plain) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "tlcore int8 linear: x must be a CPU fp32 (N, C) tensor");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.size(1) == x.size(1),
              "tlcore int8 linear: weight must be int8 (K, C) with x's C");
  const int64_t k = weight.size(0);
  for (const at::Tensor* t : {&w_scale, &bias}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == k && t->scalar_type() == at::kFloat,
                "tlcore int8 linear: w_scale and bias must be fp32 (K,)");
  }
  const at::Tensor xs = x.contiguous(), ws = weight.contiguous(), scales = w_scale.contiguous(), b = bias.contiguous();
  at::Tensor out = at::empty({x.size(0), k}, x.options());
  const tlcore::Int8LinearArgs args{xs.data_ptr<float>(), x.size(0), x.size(1), ws.data_ptr<int8_t>(), k,
                                    scales.data_ptr<float>(), b.data_ptr<float>(), out.data_ptr<float>()};
  if (out.numel() > 0) tlcore::int8_weight_linear_cpu(args, plain);
  return out;
}

// PyTorch's max-pool output size: with ceil_mode a window may run past the image (not start past it).
int64_t pool_output_size(int64_t size, int64_t kernel, int64_t stride, int64_t pad, int64_t dilation, bool ceil_mode) {
  const int64_t span = size + 2 * pad - dilation * (kernel - 1) - 1 + (ceil_mode ? stride - 1 : 0);
  int64_t out = (span >= 0 ? span / stride : -((-span + stride - 1) / stride)) + 1;  // floor division
  if (ceil_mode && (out - 1) * stride >= size + pad) --out;  // the last window must start inside the image
  TORCH_CHECK(out >= 1, "tlcore int8 max-pool: the input is smaller than the (dilated) kernel with this padding");
  return out;
}

at::Tensor int8_max_pool_cpu(const at::Tensor& x, at::IntArrayRef kernel, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kChar && x.device().is_cpu(),
              "tlcore int8 max-pool: x must be a CPU int8 (N, C, H, W) tensor");
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "tlcore int8 max-pool: kernel, stride, padding and dilation must be pairs");
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK(kernel[i] > 0 && stride[i] > 0 && dilation[i] > 0 && padding[i] >= 0 && 2 * padding[i] <= kernel[i],
                "tlcore int8 max-pool: need kernel, stride, dilation > 0 and 0 <= padding <= kernel / 2");
  }
  const at::Tensor src = x.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t oh = pool_output_size(x.size(2), kernel[0], stride[0], padding[0], dilation[0], ceil_mode);
  const int64_t ow = pool_output_size(x.size(3), kernel[1], stride[1], padding[1], dilation[1], ceil_mode);
  at::Tensor out = at::empty({x.size(0), x.size(1), oh, ow},
                             x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const tlcore::Int8PoolArgs args{src.data_ptr<int8_t>(), x.size(0), x.size(2), x.size(3), x.size(1),
                                  kernel[0], kernel[1], stride[0], stride[1], padding[0], padding[1],
                                  dilation[0], dilation[1], oh, ow, out.data_ptr<int8_t>()};
  if (out.numel() > 0) tlcore::int8_max_pool_cpu(args);
  return out;
}

#ifdef TLCORE_WITH_CUDA
at::Tensor int8_conv_cuda(const at::Tensor& x, int64_t x_zero, const at::Tensor& weight,
                          const at::Tensor& multiplier, const at::Tensor& offset, int64_t shift,
                          const std::optional<at::Tensor>& residual, int64_t res_multiplier, int64_t out_zero,
                          bool relu, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                          int64_t out_max) {
  TORCH_CHECK(out_max >= out_zero && out_max <= 127, "tlcore int8 conv: need out_zero <= out_max <= 127");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = int8_conv_out(x, weight, stride, padding, dilation);
  auto args = int8_conv_args(x, x_zero, weight, multiplier, offset, shift, residual, res_multiplier,
                             out_zero, relu, stride, padding, dilation, out);
  args.out_max = static_cast<int32_t>(out_max);
  if (out.numel() > 0) tlcore::int8_conv2d_cuda(args, c10::cuda::getCurrentCUDAStream().stream());
  return out;
}

// Which kernel _int8_conv_cuda launches on the current device now ("mma" or "dp4a"; tests).
std::string int8_cuda_kernel() { return tlcore::int8_cuda_kernel_name(); }
#endif

}  // namespace

// ---- stochastic-rounding optimizers (csrc/sr_optim.h) ---------------------------------------------
#include "sr_optim.h"
#ifdef TLCORE_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace {

int64_t sr_format(at::ScalarType dtype, const char* what) {
  switch (dtype) {
    case at::kFloat: return tlcore::sr::kFloat32;
    case at::kBFloat16: return tlcore::sr::kBFloat16;
    case at::kHalf: return tlcore::sr::kFloat16;
    default: TORCH_CHECK(false, "tlcore sr optimizer: ", what, " must be fp32, bf16 or fp16, got ", dtype);
  }
}

// A tensor the kernels may walk as numel() consecutive elements from data_ptr().
void sr_check_dense(const at::Tensor& t, const at::Tensor& param, at::ScalarType dtype, const char* what) {
  TORCH_CHECK(t.scalar_type() == dtype && t.device() == param.device() && t.sizes() == param.sizes() &&
                  t.strides() == param.strides() && t.is_non_overlapping_and_dense(),
              "tlcore sr optimizer: every ", what, " must be a dense ", dtype, " tensor on ", param.device(),
              " with its parameter's shape and strides");
}

struct SrGroup {
  std::vector<tlcore::sr::Slot> slots;
  int64_t param_format = tlcore::sr::kFloat32;
  int64_t state_format = tlcore::sr::kFloat32;
};

// Checks what the Python op (tlcore/ops/optim.py) already validated and builds the slot table.
SrGroup sr_group(at::TensorList params, at::TensorList grads, at::TensorList state0, at::TensorList state1,
                 const at::Tensor& hyper, const at::Tensor& counters) {
  const auto count = static_cast<int64_t>(params.size());
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == count &&
                  (state0.empty() || static_cast<int64_t>(state0.size()) == count) &&
                  (state1.empty() || static_cast<int64_t>(state1.size()) == count),
              "tlcore sr optimizer: params, grads and states must be lists of the same length");
  TORCH_CHECK(hyper.scalar_type() == at::kFloat && hyper.device().is_cpu() && hyper.is_contiguous() &&
                  hyper.sizes() == at::IntArrayRef({count, tlcore::sr::kHyperColumns}),
              "tlcore sr optimizer: hyper must be a contiguous fp32 CPU tensor of shape (len(params), 8)");
  TORCH_CHECK(counters.scalar_type() == at::kLong && counters.device().is_cpu() && counters.is_contiguous() &&
                  counters.sizes() == at::IntArrayRef({count, 3}),
              "tlcore sr optimizer: counters must be a contiguous int64 CPU tensor of shape (len(params), 3)");
  SrGroup group;
  if (count == 0) return group;
  const at::ScalarType dtype = params[0].scalar_type();
  group.param_format = sr_format(dtype, "a parameter");
  const at::ScalarType state_dtype = state0.empty() ? at::kFloat : state0[0].scalar_type();  // unused without states
  group.state_format = sr_format(state_dtype, "an optimizer state");
  const int64_t* counter = counters.data_ptr<int64_t>();
  for (int64_t t = 0; t < count; ++t) {
    const at::Tensor& p = params[t];
    TORCH_CHECK(p.device() == params[0].device(), "tlcore sr optimizer: all parameters must be on one device");
    sr_check_dense(p, p, dtype, "parameter");
    sr_check_dense(grads[t], p, dtype, "gradient");
    if (!state0.empty()) sr_check_dense(state0[t], p, state_dtype, "optimizer state");
    if (!state1.empty()) sr_check_dense(state1[t], p, state_dtype, "optimizer state");
    auto address = [](const at::Tensor& x) { return reinterpret_cast<int64_t>(x.data_ptr()); };
    group.slots.push_back({address(p), address(grads[t]), state0.empty() ? 0 : address(state0[t]),
                           state1.empty() ? 0 : address(state1[t]), p.numel(), counter[3 * t], counter[3 * t + 1],
                           counter[3 * t + 2]});
  }
  return group;
}

void sr_adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                  at::TensorList exp_avg_sqs, const at::Tensor& hyper, const at::Tensor& counters, int64_t seed,
                  bool stochastic) {
  TORCH_CHECK(exp_avgs.size() == params.size() && exp_avg_sqs.size() == params.size(),
              "tlcore sr AdamW: every parameter needs exp_avg and exp_avg_sq");
  const SrGroup group = sr_group(params, grads, exp_avgs, exp_avg_sqs, hyper, counters);
  tlcore::sr_adamw_cpu(group.slots.data(), hyper.data_ptr<float>(), static_cast<int64_t>(group.slots.size()),
                       group.param_format, group.state_format, static_cast<uint64_t>(seed), stochastic);
}

void sr_sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                const at::Tensor& hyper, const at::Tensor& counters, bool nesterov, int64_t seed, bool stochastic) {
  const SrGroup group = sr_group(params, grads, momentum_buffers, {}, hyper, counters);
  tlcore::sr_sgd_cpu(group.slots.data(), hyper.data_ptr<float>(), static_cast<int64_t>(group.slots.size()),
                     group.param_format, group.state_format, !momentum_buffers.empty(), nesterov,
                     static_cast<uint64_t>(seed), stochastic);
}

#ifdef TLCORE_WITH_CUDA
// Elements per CUDA block: the chunk of the multi-tensor launch.
constexpr int64_t kSrChunk = 1 << 16;

// The slot, hyper-parameter and chunk tables, packed into one pinned buffer and copied
// to the device on the current stream (the caching host allocator keeps it alive).
struct SrDeviceTables {
  at::Tensor bytes;
  int64_t num_chunks = 0;
};

SrDeviceTables sr_device_tables(const SrGroup& group, const at::Tensor& hyper, const at::Device& device) {
  std::vector<int64_t> chunks;
  for (size_t t = 0; t < group.slots.size(); ++t) {
    for (int64_t first = 0; first < group.slots[t].numel; first += kSrChunk) {
      chunks.push_back(static_cast<int64_t>(t));
      chunks.push_back(first);
    }
  }
  const size_t slot_bytes = group.slots.size() * sizeof(tlcore::sr::Slot);
  const size_t hyper_bytes = static_cast<size_t>(hyper.numel()) * sizeof(float);
  const size_t chunk_bytes = chunks.size() * sizeof(int64_t);
  at::Tensor host = at::empty({static_cast<int64_t>(slot_bytes + hyper_bytes + chunk_bytes)},
                              at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  auto* out = host.data_ptr<uint8_t>();
  std::memcpy(out, group.slots.data(), slot_bytes);  // slot_bytes is a multiple of 8: the next tables stay aligned
  std::memcpy(out + slot_bytes, hyper.data_ptr<float>(), hyper_bytes);
  std::memcpy(out + slot_bytes + hyper_bytes, chunks.data(), chunk_bytes);
  return {host.to(device, /*non_blocking=*/true), static_cast<int64_t>(chunks.size() / 2)};
}

void sr_adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, const at::Tensor& hyper, const at::Tensor& counters, int64_t seed,
                   bool stochastic) {
  TORCH_CHECK(exp_avgs.size() == params.size() && exp_avg_sqs.size() == params.size(),
              "tlcore sr AdamW: every parameter needs exp_avg and exp_avg_sq");
  const SrGroup group = sr_group(params, grads, exp_avgs, exp_avg_sqs, hyper, counters);
  if (group.slots.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const SrDeviceTables tables = sr_device_tables(group, hyper, params[0].device());
  const auto* base = tables.bytes.data_ptr<uint8_t>();
  const size_t slot_bytes = group.slots.size() * sizeof(tlcore::sr::Slot);
  const bool known = tlcore::sr_adamw_cuda(
      reinterpret_cast<const tlcore::sr::Slot*>(base), reinterpret_cast<const float*>(base + slot_bytes),
      reinterpret_cast<const int64_t*>(base + slot_bytes + hyper.numel() * sizeof(float)), tables.num_chunks,
      kSrChunk, group.param_format, group.state_format, static_cast<uint64_t>(seed), stochastic,
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(known, "tlcore sr AdamW: unsupported parameter/state dtypes");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void sr_sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                 const at::Tensor& hyper, const at::Tensor& counters, bool nesterov, int64_t seed, bool stochastic) {
  const SrGroup group = sr_group(params, grads, momentum_buffers, {}, hyper, counters);
  if (group.slots.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const SrDeviceTables tables = sr_device_tables(group, hyper, params[0].device());
  const auto* base = tables.bytes.data_ptr<uint8_t>();
  const size_t slot_bytes = group.slots.size() * sizeof(tlcore::sr::Slot);
  const bool known = tlcore::sr_sgd_cuda(
      reinterpret_cast<const tlcore::sr::Slot*>(base), reinterpret_cast<const float*>(base + slot_bytes),
      reinterpret_cast<const int64_t*>(base + slot_bytes + hyper.numel() * sizeof(float)), tables.num_chunks,
      kSrChunk, group.param_format, group.state_format, !momentum_buffers.empty(), nesterov,
      static_cast<uint64_t>(seed), stochastic, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(known, "tlcore sr SGD: unsupported parameter/state dtypes");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#endif

// The kernels report bad arguments with std::invalid_argument, which torch turns into ValueError
// on some versions (2.11) and RuntimeError on others (2.15). Rethrown as c10::ValueError, it is
// Python's ValueError on every version, like the Python ops' own argument checks.
template <auto Fn>
struct ValueErrors;
template <class R, class... Args, R (*Fn)(Args...)>
struct ValueErrors<Fn> {
  static R call(Args... args) {
    try {
      return Fn(args...);
    } catch (const std::invalid_argument& error) {
      C10_THROW_ERROR(ValueError, error.what());
    }
  }
};

}  // namespace

TORCH_LIBRARY(tlcore, m) {
  // int8 convolution: isa is 0 auto, 1 scalar, 2 avx2, 3 avx-vnni, 4 avx512-vnni, 5 avx2 7-bit; algorithm
  // 0 direct, 1 Winograd, 2 rows, 3 stride-2 Winograd (csrc/int8_conv.h).
  m.def("_int8_conv_cpu(Tensor x, int x_zero, Tensor weight, Tensor multiplier, Tensor offset, int shift, "
        "Tensor? residual, int res_multiplier, int out_zero, bool relu, int[] stride, int[] padding, "
        "int[] dilation, int out_max, Tensor? packed_weight, int isa, int algorithm, int groups=1) -> Tensor");
  m.def("_int8_pack_weight_cpu(Tensor weight, int isa, int algorithm, int groups=1) -> Tensor");
  m.def("_int8_cpu_best_algorithm(int k, int c, int r, int s, int[] stride, int[] dilation, int isa, "
        "int groups=1) -> int", &ValueErrors<&int8_cpu_best_algorithm>::call);
  m.def("_int8_cpu_packed_words(int k, int c, int r, int s, int isa, int algorithm, int groups=1) -> int",
        &ValueErrors<&int8_cpu_packed_words>::call);
  m.def("_int8_cpu_resolve_isa(int isa) -> int", &ValueErrors<&int8_cpu_resolve_isa>::call);
  m.def("_quantize_cpu(Tensor x, float inv_scale, int zero_point, bool reject_non_finite=False) -> Tensor");
  m.def("_int8_global_avg_pool_cpu(Tensor q, float scale, int zero_point) -> Tensor");
  m.def("_int8_weight_linear_cpu(Tensor x, Tensor weight, Tensor w_scale, Tensor bias, bool plain=False) -> Tensor");
  m.def("_int8_max_pool_cpu(Tensor x, int[] kernel, int[] stride, int[] padding, int[] dilation, bool ceil_mode) "
        "-> Tensor");
  m.def("_int8_cpu_isa_supported(int isa) -> bool", &ValueErrors<&int8_cpu_isa_supported>::call);
  m.def("_int8_conv_cuda(Tensor x, int x_zero, Tensor weight, Tensor multiplier, Tensor offset, int shift, "
        "Tensor? residual, int res_multiplier, int out_zero, bool relu, int[] stride, int[] padding, "
        "int[] dilation, int out_max) -> Tensor");
#ifdef TLCORE_WITH_CUDA
  // TLCORE_INT8_CUDA_KERNEL resolved (csrc/int8_conv.h)
  m.def("_int8_cuda_kernel() -> str", &ValueErrors<&int8_cuda_kernel>::call);
#endif
  // stochastic-rounding optimizers: hyper is fp32 (T, 8), counters int64 (T, 3) (csrc/sr_optim.h).
  m.def("_sr_adamw_cpu(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor hyper, Tensor counters, int seed, bool stochastic) -> ()");
  m.def("_sr_sgd_cpu(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor hyper, "
        "Tensor counters, bool nesterov, int seed, bool stochastic) -> ()");
  m.def("_sr_adamw_cuda(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor hyper, Tensor counters, int seed, bool stochastic) -> ()");
  m.def("_sr_sgd_cuda(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor hyper, "
        "Tensor counters, bool nesterov, int seed, bool stochastic) -> ()");
}

TORCH_LIBRARY_IMPL(tlcore, CPU, m) {
  m.impl("_int8_conv_cpu", &ValueErrors<&int8_conv_cpu>::call);
  m.impl("_int8_pack_weight_cpu", &ValueErrors<&int8_pack_weight_cpu>::call);
  m.impl("_quantize_cpu", &ValueErrors<&quantize_cpu>::call);
  m.impl("_int8_max_pool_cpu", &ValueErrors<&int8_max_pool_cpu>::call);
  m.impl("_int8_global_avg_pool_cpu", &ValueErrors<&int8_global_avg_pool_cpu>::call);
  m.impl("_int8_weight_linear_cpu", &ValueErrors<&int8_weight_linear_cpu>::call);
}

#ifdef TLCORE_WITH_CUDA
TORCH_LIBRARY_IMPL(tlcore, CUDA, m) {
  m.impl("_int8_conv_cuda", &ValueErrors<&int8_conv_cuda>::call);
}
#endif

TORCH_LIBRARY_IMPL(tlcore, CPU, m) {
  m.impl("_sr_adamw_cpu", &ValueErrors<&sr_adamw_cpu>::call);
  m.impl("_sr_sgd_cpu", &ValueErrors<&sr_sgd_cpu>::call);
}

#ifdef TLCORE_WITH_CUDA
TORCH_LIBRARY_IMPL(tlcore, CUDA, m) {
  m.impl("_sr_adamw_cuda", &ValueErrors<&sr_adamw_cuda>::call);
  m.impl("_sr_sgd_cuda", &ValueErrors<&sr_sgd_cuda>::call);
}
#endif

extern "C" {
// `import tlcore._C` runs this; registration happens in the static initialisers above.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "tlcore's compiled kernels", -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef TLCORE_WITH_CUDA
  PyModule_AddIntConstant(module, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(module, "WITH_CUDA", 0);
#endif
  return module;
}
}
