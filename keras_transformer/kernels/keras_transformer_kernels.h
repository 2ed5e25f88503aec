// What the kernels of this directory share: TensorFlow's op-writing API and row conversions
// between a tensor's dtype and the float32 the kernels compute in.
#ifndef KERAS_TRANSFORMER_KERNELS_H_
#define KERAS_TRANSFORMER_KERNELS_H_

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"
#include "unsupported/Eigen/CXX11/Tensor"

namespace keras_transformer {

using tensorflow::bfloat16;
using tensorflow::DEVICE_CPU;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Status;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using tensorflow::shape_inference::InferenceContext;
using tensorflow::shape_inference::ShapeHandle;

// A row buffer of Eigen's own alignment: Eigen's vectorized sums over a buffer of another
// alignment start their packets at another element, and the sums (so losses and gradients)
// would change in the last bits with the address malloc returned.
using FloatRow = Eigen::ArrayXf;
// A tensor's values in place, for coefficient-wise use only (no sums over them, see above).
using FloatMap = Eigen::Map<Eigen::ArrayXf>;
using ConstFloatMap = Eigen::Map<const Eigen::ArrayXf>;

// Runs `work(begin, end)` over [0, units) on TensorFlow's intra-op threads, in shards sized by
// `cost_per_unit` (what every kernel here does with its rows, blocks or chunks).
template <typename Work>
inline void ParallelFor(OpKernelContext* context, int64_t units, int64_t cost_per_unit,
                        Work&& work) {
  const auto* threads = context->device()->tensorflow_cpu_worker_threads();
  tensorflow::Shard(threads->num_threads, threads->workers, units, cost_per_unit, work);
}

// n values of a row as float32 (bfloat16 is the top half of a float32).
inline void ToFloat(const float* in, int64_t n, float* out) {
  std::memcpy(out, in, n * sizeof(float));
}
inline void ToFloat(const bfloat16* in, int64_t n, float* out) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(in);
  uint32_t* wide = reinterpret_cast<uint32_t*>(out);
  for (int64_t i = 0; i < n; ++i) wide[i] = static_cast<uint32_t>(bits[i]) << 16;
}

inline void FromFloat(const float* in, int64_t n, float* out) {
  std::memcpy(out, in, n * sizeof(float));
}
// Rounded to nearest even, as TensorFlow's Cast to bfloat16 rounds; a NaN stays a quiet NaN.
inline void FromFloat(const float* in, int64_t n, bfloat16* out) {
  const uint32_t* wide = reinterpret_cast<const uint32_t*>(in);
  uint16_t* bits = reinterpret_cast<uint16_t*>(out);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = wide[i];
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    bits[i] = (u & 0x7FFFFFFFu) > 0x7F800000u ? static_cast<uint16_t>((u >> 16) | 0x40u)
                                              : static_cast<uint16_t>(rounded);
  }
}

}  // namespace keras_transformer

#endif  // KERAS_TRANSFORMER_KERNELS_H_
