// 2-D convolutions (NHWC input, HWIO kernel, any strides, padding and groups,
// depthwise included; no dilation; float32) as XLA FFI handlers running
// oneDNN, the library TensorFlow/Keras use on x86 CPUs. XLA:CPU runs
// convolutions with Eigen, whose kernel gradients take about twice oneDNN's
// time on CPUs with AVX-512. A fused variant adds a bias and a ReLU inside the convolution's
// pass, and computes the bias gradient with the kernel's: each saves a pass
// over a large activation. Built and loaded by melanoma_jax/models/onednn.py;
// every buffer is XLA's own (no copies).
#include <cstdint>
#include <cstdio>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace {

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = memory::format_tag;

// The input's (batch, height, width, channels), the kernel's (height, width,
// output channels), groups, strides (h, w), padding (top, bottom, left,
// right), then whether a bias and ReLU are fused (1) or not (0).
using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                       int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;

struct Geometry {
  int64_t stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right;
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// Streams are not thread-safe; XLA may run two convolutions at once.
dnnl::stream& Stream() {
  thread_local dnnl::stream stream(Engine());
  return stream;
}

// The three primitives of one layer shape. All keep the activations in
// XLA's NHWC layout. The gradients let oneDNN pick the kernel's layout (its
// fast gradient kernels need a blocked one), and so does the forward pass
// where, given the kernel as it is, oneDNN would compute it as an im2col
// matrix product (on CPUs without AVX-512); kernels are reordered.
struct Layer {
  memory::desc src, weights, bias, dst;
  dnnl::convolution_forward forward;
  dnnl::convolution_forward::primitive_desc forward_pd;
  bool forward_reorders = false;
  dnnl::reorder weights_to_forward;
  dnnl::convolution_backward_data::primitive_desc data_pd;
  dnnl::convolution_backward_data backward_data;
  dnnl::reorder weights_to_data;
  dnnl::convolution_backward_weights::primitive_desc weights_pd;
  dnnl::convolution_backward_weights backward_weights;
  dnnl::reorder weights_grad_to_hwio;
  // oneDNN's names for the kernels it chose (forward, input and kernel gradients).
  std::string implementations;
};

bool IsMatrixProduct(const dnnl::primitive_desc_base& pd) {
  return std::string(pd.impl_info_str()).find("gemm") != std::string::npos;
}

std::unique_ptr<Layer> MakeLayer(const Key& key) {
  auto [n, h, w, c, kh, kw, f, groups, sh, sw, pt, pb, pl, pr, fused] = key;
  // A grouped HWIO kernel (kh, kw, c / g, f) is oneDNN's hwigo.
  const memory::dims src{n, c, h, w},
      weights = groups == 1 ? memory::dims{f, c, kh, kw}
                            : memory::dims{groups, f / groups, c / groups, kh, kw},
      dst{n, f, (h + pt + pb - kh) / sh + 1, (w + pl + pr - kw) / sw + 1};
  const memory::dims strides{sh, sw}, pad_l{pt, pl}, pad_r{pb, pr};
  auto desc = [](const memory::dims& dims, Tag tag) {
    return memory::desc(dims, memory::data_type::f32, tag);
  };
  auto layer = std::make_unique<Layer>();
  layer->src = desc(src, Tag::nhwc);
  layer->weights = desc(weights, groups == 1 ? Tag::hwio : Tag::hwigo);
  layer->dst = desc(dst, Tag::nhwc);
  const auto any_weights = desc(weights, Tag::any);
  auto& engine = Engine();
  const auto algorithm = dnnl::algorithm::convolution_direct;
  const auto training = dnnl::prop_kind::forward_training;
  dnnl::primitive_attr attr;
  if (fused) {
    layer->bias = desc({f}, Tag::a);
    dnnl::post_ops relu;
    relu.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
    attr.set_post_ops(relu);
  }
  auto forward_desc = [&](const memory::desc& weights) {
    return fused ? dnnl::convolution_forward::primitive_desc(engine, training, algorithm, layer->src,
                                                             weights, layer->bias, layer->dst,
                                                             strides, pad_l, pad_r, attr)
                 : dnnl::convolution_forward::primitive_desc(engine, training, algorithm, layer->src,
                                                             weights, layer->dst, strides, pad_l,
                                                             pad_r);
  };
  auto forward_pd = forward_desc(layer->weights);
  if (IsMatrixProduct(forward_pd)) {
    auto blocked = forward_desc(any_weights);
    if (!IsMatrixProduct(blocked)) {
      forward_pd = blocked;
      layer->forward_reorders = true;
      layer->weights_to_forward = dnnl::reorder(
          dnnl::reorder::primitive_desc(engine, layer->weights, engine, forward_pd.weights_desc()));
    }
  }
  layer->forward_pd = forward_pd;
  layer->forward = dnnl::convolution_forward(forward_pd);
  layer->data_pd = dnnl::convolution_backward_data::primitive_desc(
      engine, algorithm, layer->src, any_weights, layer->dst, strides, pad_l, pad_r, forward_pd);
  layer->backward_data = dnnl::convolution_backward_data(layer->data_pd);
  layer->weights_to_data = dnnl::reorder(
      dnnl::reorder::primitive_desc(engine, layer->weights, engine, layer->data_pd.weights_desc()));
  layer->weights_pd = fused ? dnnl::convolution_backward_weights::primitive_desc(
                                  engine, algorithm, layer->src, any_weights, layer->bias, layer->dst,
                                  strides, pad_l, pad_r, forward_pd)
                            : dnnl::convolution_backward_weights::primitive_desc(
                                  engine, algorithm, layer->src, any_weights, layer->dst, strides,
                                  pad_l, pad_r, forward_pd);
  layer->backward_weights = dnnl::convolution_backward_weights(layer->weights_pd);
  layer->weights_grad_to_hwio = dnnl::reorder(dnnl::reorder::primitive_desc(
      engine, layer->weights_pd.diff_weights_desc(), engine, layer->weights));
  layer->implementations = forward_pd.impl_info_str() + std::string(" ") +
                           layer->data_pd.impl_info_str() + " " + layer->weights_pd.impl_info_str();
  return layer;
}

// Primitives are built once per shape (building one compiles its kernel).
const Layer& GetLayer(const Key& key) {
  static std::mutex mutex;
  static std::map<Key, std::unique_ptr<Layer>> layers;
  std::lock_guard<std::mutex> lock(mutex);
  auto& layer = layers[key];
  if (!layer) layer = MakeLayer(key);
  return *layer;
}

Key KeyOf(ffi::Span<const int64_t> x, ffi::Span<const int64_t> kernel, const Geometry& g,
          bool fused = false) {
  const int64_t groups = x[3] / kernel[2];
  return {x[0],       x[1],       x[2],       x[3],         kernel[0],  kernel[1],   kernel[3], groups,
          g.stride_h, g.stride_w, g.pad_top,  g.pad_bottom, g.pad_left, g.pad_right, fused};
}

memory Wrap(const memory::desc& desc, void* data) { return memory(desc, Engine(), data); }

template <typename Run>
ffi::Error Guarded(Run run) {
  try {
    run();
    Stream().wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN convolution failed: ") + e.what());
  }
  return ffi::Error::Success();
}

// The kernel as the layer's forward primitive takes it: XLA's buffer, or a reordered copy.
memory ForwardWeights(const Layer& layer, const float* kernel) {
  memory hwio = Wrap(layer.weights, const_cast<float*>(kernel));
  if (!layer.forward_reorders) return hwio;
  memory blocked(layer.forward_pd.weights_desc(), Engine());
  layer.weights_to_forward.execute(Stream(), hwio, blocked);
  return blocked;
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel, Geometry g,
                   ffi::ResultBuffer<ffi::F32> y) {
  return Guarded([&] {
    const Layer& layer = GetLayer(KeyOf(x.dimensions(), kernel.dimensions(), g));
    layer.forward.execute(Stream(), {{DNNL_ARG_SRC, Wrap(layer.src, x.typed_data())},
                                     {DNNL_ARG_WEIGHTS, ForwardWeights(layer, kernel.typed_data())},
                                     {DNNL_ARG_DST, Wrap(layer.dst, y->typed_data())}});
  });
}

// relu(convolution + bias).
ffi::Error ForwardBiasReLU(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                           ffi::Buffer<ffi::F32> bias, Geometry g, ffi::ResultBuffer<ffi::F32> y) {
  return Guarded([&] {
    const Layer& layer = GetLayer(KeyOf(x.dimensions(), kernel.dimensions(), g, true));
    layer.forward.execute(Stream(), {{DNNL_ARG_SRC, Wrap(layer.src, x.typed_data())},
                                     {DNNL_ARG_WEIGHTS, ForwardWeights(layer, kernel.typed_data())},
                                     {DNNL_ARG_BIAS, Wrap(layer.bias, bias.typed_data())},
                                     {DNNL_ARG_DST, Wrap(layer.dst, y->typed_data())}});
  });
}

// The input gradient; `x` only gives the input's shape (XLA passes no data we read).
ffi::Error BackwardData(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                        ffi::Buffer<ffi::F32> dy, Geometry g, ffi::ResultBuffer<ffi::F32> dx) {
  return Guarded([&] {
    const Layer& layer = GetLayer(KeyOf(x.dimensions(), kernel.dimensions(), g));
    memory blocked(layer.data_pd.weights_desc(), Engine());
    memory hwio = Wrap(layer.weights, kernel.typed_data());
    layer.weights_to_data.execute(Stream(), hwio, blocked);
    layer.backward_data.execute(Stream(), {{DNNL_ARG_DIFF_SRC, Wrap(layer.src, dx->typed_data())},
                                           {DNNL_ARG_WEIGHTS, blocked},
                                           {DNNL_ARG_DIFF_DST, Wrap(layer.dst, dy.typed_data())}});
  });
}

// The kernel gradient (and the bias's, given a buffer for it); `kernel` only
// gives its shape.
void KernelGradient(const Layer& layer, const float* x, const float* dy, float* dkernel,
                    float* dbias) {
  memory blocked(layer.weights_pd.diff_weights_desc(), Engine());
  std::unordered_map<int, memory> args{{DNNL_ARG_SRC, Wrap(layer.src, const_cast<float*>(x))},
                                       {DNNL_ARG_DIFF_WEIGHTS, blocked},
                                       {DNNL_ARG_DIFF_DST, Wrap(layer.dst, const_cast<float*>(dy))}};
  if (dbias) args.insert({DNNL_ARG_DIFF_BIAS, Wrap(layer.bias, dbias)});
  layer.backward_weights.execute(Stream(), args);
  memory hwio = Wrap(layer.weights, dkernel);
  layer.weights_grad_to_hwio.execute(Stream(), blocked, hwio);
}

ffi::Error BackwardWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                           ffi::Buffer<ffi::F32> dy, Geometry g,
                           ffi::ResultBuffer<ffi::F32> dkernel) {
  return Guarded([&] {
    KernelGradient(GetLayer(KeyOf(x.dimensions(), kernel.dimensions(), g)), x.typed_data(),
                   dy.typed_data(), dkernel->typed_data(), nullptr);
  });
}

ffi::Error BackwardWeightsBias(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                               ffi::Buffer<ffi::F32> dy, Geometry g,
                               ffi::ResultBuffer<ffi::F32> dkernel,
                               ffi::ResultBuffer<ffi::F32> dbias) {
  return Guarded([&] {
    KernelGradient(GetLayer(KeyOf(x.dimensions(), kernel.dimensions(), g, true)), x.typed_data(),
                   dy.typed_data(), dkernel->typed_data(), dbias->typed_data());
  });
}

}  // namespace

// Runs one tiny convolution: 0 where oneDNN works here, else 1 with the reason
// in `error` (no CPU engine, an unsupported CPU), before any step relies on it.
extern "C" int MjOnednnCheck(char* error, size_t size) {
  try {
    const Layer& layer = GetLayer({1, 3, 3, 1, 3, 3, 1, 1, 1, 1, 0, 0, 0, 0, 0});
    float x[9] = {}, kernel[9] = {}, y[1];
    layer.forward.execute(Stream(), {{DNNL_ARG_SRC, Wrap(layer.src, x)},
                                     {DNNL_ARG_WEIGHTS, ForwardWeights(layer, kernel)},
                                     {DNNL_ARG_DST, Wrap(layer.dst, y)}});
    Stream().wait();
  } catch (const std::exception& e) {
    std::snprintf(error, size, "%s", e.what());
    return 1;
  }
  return 0;
}

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(Geometry, xla::ffi::StructMember<int64_t>("stride_h"),
                                      xla::ffi::StructMember<int64_t>("stride_w"),
                                      xla::ffi::StructMember<int64_t>("pad_top"),
                                      xla::ffi::StructMember<int64_t>("pad_bottom"),
                                      xla::ffi::StructMember<int64_t>("pad_left"),
                                      xla::ffi::StructMember<int64_t>("pad_right"));

// Each gradient takes (input, kernel, output gradient); the forward pass (input, kernel).
auto GradientBinding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Attrs<Geometry>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(MjOnednnConvForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attrs<Geometry>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(MjOnednnConvForwardBiasReLU, ForwardBiasReLU,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attrs<Geometry>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(MjOnednnConvBackwardData, BackwardData, GradientBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(MjOnednnConvBackwardWeights, BackwardWeights, GradientBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(MjOnednnConvBackwardWeightsBias, BackwardWeightsBias,
                              GradientBinding().Ret<ffi::Buffer<ffi::F32>>());

// The kernels oneDNN picked for one layer (`key`: `Key`'s 15 integers), space-separated in
// `names`: 0, or 1 with the reason there.
extern "C" int MjOnednnImplementations(const int64_t* key, char* names, size_t size) {
  try {
    const Layer& layer = GetLayer({key[0], key[1], key[2], key[3], key[4], key[5], key[6], key[7],
                                   key[8], key[9], key[10], key[11], key[12], key[13], key[14]});
    std::snprintf(names, size, "%s", layer.implementations.c_str());
  } catch (const std::exception& e) {
    std::snprintf(names, size, "%s", e.what());
    return 1;
  }
  return 0;
}
