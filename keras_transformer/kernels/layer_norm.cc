// Layer normalization over the last axis and its gradient, one pass over each row: what
// TensorFlow's CPU ops do in about 15 kernels per norm (casts, two means, the centring, the
// scaling, and as many again for the gradient), each a pass over a [tokens, features] tensor.
//
// KerasTransformerLayerNorm(x [N, D] T, gamma [D] f32, beta [D] f32; epsilon)
//   -> y [N, D] T = (x - mean) * rstd * gamma + beta, mean [N] f32, rstd [N] f32
//      (rstd = 1 / sqrt(var + epsilon); float32 arithmetic, y rounded once to T)
// KerasTransformerLayerNormGrad(dy [N, D] T, x, gamma, mean, rstd)
//   -> dx [N, D] T = rstd (g - mean(g) - xhat mean(g xhat)), g = dy gamma,
//      dgamma [D] f32 = sum over rows of dy xhat, dbeta [D] f32 = sum over rows of dy
// The column sums are added per fixed block of rows and then block by block in order, so the
// result does not depend on how many threads ran the blocks.

#include <cmath>

#include "keras_transformer_kernels.h"

namespace keras_transformer {

REGISTER_OP("KerasTransformerLayerNorm")
    .Input("x: T")
    .Input("gamma: float")
    .Input("beta: float")
    .Output("y: T")
    .Output("mean: float")
    .Output("rstd: float")
    .Attr("T: {float, bfloat16}")
    .Attr("epsilon: float")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle x;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &x));
      c->set_output(0, x);
      c->set_output(1, c->Vector(c->Dim(x, 0)));
      c->set_output(2, c->Vector(c->Dim(x, 0)));
      return Status();
    });

REGISTER_OP("KerasTransformerLayerNormGrad")
    .Input("dy: T")
    .Input("x: T")
    .Input("gamma: float")
    .Input("mean: float")
    .Input("rstd: float")
    .Output("dx: T")
    .Output("dgamma: float")
    .Output("dbeta: float")
    .Attr("T: {float, bfloat16}")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle x;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &x));
      c->set_output(0, x);
      c->set_output(1, c->Vector(c->Dim(x, 1)));
      c->set_output(2, c->Vector(c->Dim(x, 1)));
      return Status();
    });

namespace {

// Rows per block of the column sums: fixed, so that the sums' order is too.
constexpr int64_t kBlockRows = 32;

Status CheckShapes(const Tensor& x, const Tensor& gamma, const char* what) {
  if (x.dims() != 2) {
    return tensorflow::errors::InvalidArgument(what, " must be [rows, features]; got ",
                                               x.shape().DebugString());
  }
  if (gamma.NumElements() != x.dim_size(1)) {
    return tensorflow::errors::InvalidArgument("gamma and beta need one value per feature of ",
                                               x.shape().DebugString(), "; got ",
                                               gamma.shape().DebugString());
  }
  return Status();
}

template <typename T>
class LayerNormOp : public OpKernel {
 public:
  explicit LayerNormOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("epsilon", &epsilon_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& x = context->input(0);
    const Tensor& gamma = context->input(1);
    const Tensor& beta = context->input(2);
    OP_REQUIRES_OK(context, CheckShapes(x, gamma, "x"));
    OP_REQUIRES(context, beta.NumElements() == gamma.NumElements(),
                tensorflow::errors::InvalidArgument("beta ", beta.shape().DebugString(),
                                                    " does not match gamma ",
                                                    gamma.shape().DebugString()));
    const int64_t rows = x.dim_size(0), features = x.dim_size(1);
    Tensor *y, *mean, *rstd;
    OP_REQUIRES_OK(context, context->allocate_output(0, x.shape(), &y));
    OP_REQUIRES_OK(context, context->allocate_output(1, TensorShape({rows}), &mean));
    OP_REQUIRES_OK(context, context->allocate_output(2, TensorShape({rows}), &rstd));
    if (features == 0) return;
    const T* in = x.flat<T>().data();
    T* out = y->flat<T>().data();
    float* means = mean->flat<float>().data();
    float* rstds = rstd->flat<float>().data();
    ConstFloatMap g(gamma.flat<float>().data(), features);
    ConstFloatMap b(beta.flat<float>().data(), features);
    const float epsilon = epsilon_;
    auto work = [&](int64_t begin, int64_t end) {
      FloatRow row(features);
      for (int64_t r = begin; r < end; ++r) {
        ToFloat(in + r * features, features, row.data());
        const float m = row.sum() / features;
        row -= m;
        const float s = 1.0f / std::sqrt(row.square().sum() / features + epsilon);
        row = row * s * g + b;
        FromFloat(row.data(), features, out + r * features);
        means[r] = m;
        rstds[r] = s;
      }
    };
    ParallelFor(context, rows, 8 * features, work);
  }

 private:
  float epsilon_;
};

template <typename T>
class LayerNormGradOp : public OpKernel {
 public:
  explicit LayerNormGradOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const Tensor& dy = context->input(0);
    const Tensor& x = context->input(1);
    const Tensor& gamma = context->input(2);
    const Tensor& mean = context->input(3);
    const Tensor& rstd = context->input(4);
    OP_REQUIRES_OK(context, CheckShapes(x, gamma, "x"));
    OP_REQUIRES(context, dy.shape() == x.shape(),
                tensorflow::errors::InvalidArgument("dy ", dy.shape().DebugString(),
                                                    " does not match x ",
                                                    x.shape().DebugString()));
    const int64_t rows = x.dim_size(0), features = x.dim_size(1);
    OP_REQUIRES(context, mean.NumElements() == rows && rstd.NumElements() == rows,
                tensorflow::errors::InvalidArgument("mean and rstd need one value per row of ",
                                                    x.shape().DebugString()));
    Tensor *dx, *dgamma, *dbeta;
    OP_REQUIRES_OK(context, context->allocate_output(0, x.shape(), &dx));
    OP_REQUIRES_OK(context, context->allocate_output(1, TensorShape({features}), &dgamma));
    OP_REQUIRES_OK(context, context->allocate_output(2, TensorShape({features}), &dbeta));
    FloatMap dgamma_sum(dgamma->flat<float>().data(), features);
    FloatMap dbeta_sum(dbeta->flat<float>().data(), features);
    dgamma_sum.setZero();
    dbeta_sum.setZero();
    if (rows == 0 || features == 0) return;
    const int64_t blocks = (rows + kBlockRows - 1) / kBlockRows;
    // Per block: its column sums of dy * xhat, then of dy.
    Eigen::ArrayXXf partial(features, 2 * blocks);
    const T* upstream = dy.flat<T>().data();
    const T* in = x.flat<T>().data();
    T* out = dx->flat<T>().data();
    const float* means = mean.flat<float>().data();
    const float* rstds = rstd.flat<float>().data();
    ConstFloatMap g(gamma.flat<float>().data(), features);
    auto work = [&](int64_t first_block, int64_t end_block) {
      FloatRow d(features), xhat(features), scaled(features);
      for (int64_t block = first_block; block < end_block; ++block) {
        auto dgamma_part = partial.col(2 * block);
        auto dbeta_part = partial.col(2 * block + 1);
        dgamma_part.setZero();
        dbeta_part.setZero();
        const int64_t end = std::min(rows, (block + 1) * kBlockRows);
        for (int64_t r = block * kBlockRows; r < end; ++r) {
          ToFloat(upstream + r * features, features, d.data());
          ToFloat(in + r * features, features, xhat.data());
          xhat = (xhat - means[r]) * rstds[r];
          dgamma_part += d * xhat;
          dbeta_part += d;
          scaled = d * g;
          const float mean_g = scaled.sum() / features;
          const float mean_gx = (scaled * xhat).sum() / features;
          scaled = rstds[r] * (scaled - mean_g - xhat * mean_gx);
          FromFloat(scaled.data(), features, out + r * features);
        }
      }
    };
    ParallelFor(context, blocks, 12 * features * kBlockRows, work);
    for (int64_t block = 0; block < blocks; ++block) {
      dgamma_sum += partial.col(2 * block);
      dbeta_sum += partial.col(2 * block + 1);
    }
  }
};

}  // namespace

#define REGISTER(T)                                                                        \
  REGISTER_KERNEL_BUILDER(                                                                 \
      Name("KerasTransformerLayerNorm").Device(DEVICE_CPU).TypeConstraint<T>("T"),          \
      LayerNormOp<T>);                                                                     \
  REGISTER_KERNEL_BUILDER(                                                                 \
      Name("KerasTransformerLayerNormGrad").Device(DEVICE_CPU).TypeConstraint<T>("T"),      \
      LayerNormGradOp<T>);

REGISTER(float);
REGISTER(bfloat16);

}  // namespace keras_transformer
