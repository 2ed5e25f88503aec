// Label-smoothed cross-entropy over [tokens, vocab] logits in one pass per row, and its
// gradient in one more: what TensorFlow's CPU ops do in about eight passes over the logits
// (cast, max, subtract, exp, sum, gather, multiply, scatter, cast), each reading or writing
// a [tokens, vocab] float32 tensor.
//
// KerasTransformerLogitStatistics(logits [N, V] T)
//   -> log_normalizer = logsumexp(z), max_logit = max(z), mean_logit = mean(z), float32 [N];
//      the loss of smoothing eps is log_normalizer - (1 - eps) z_label - eps mean_logit. It
//      depends on the logits alone, so the loss and the token accuracy (z_label >= max_logit)
//      call one op that the graph optimizer computes once.
// KerasTransformerSmoothedCrossEntropyGrad(logits, labels, log_normalizer, upstream [N] f32)
//   -> gradient [N, V] T = upstream * (exp(z - log_normalizer) - eps / V - (1 - eps) onehot)
// T is float or bfloat16; the arithmetic is float32 either way.

#include <cmath>

#include "keras_transformer_kernels.h"

namespace keras_transformer {

REGISTER_OP("KerasTransformerLogitStatistics")
    .Input("logits: T")
    .Output("log_normalizer: float")
    .Output("max_logit: float")
    .Output("mean_logit: float")
    .Attr("T: {float, bfloat16}")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle logits;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &logits));
      ShapeHandle out = c->Vector(c->Dim(logits, 0));
      for (int i = 0; i < 3; ++i) c->set_output(i, out);
      return Status();
    });

REGISTER_OP("KerasTransformerSmoothedCrossEntropyGrad")
    .Input("logits: T")
    .Input("labels: int32")
    .Input("log_normalizer: float")
    .Input("upstream: float")
    .Output("gradient: T")
    .Attr("T: {float, bfloat16}")
    .Attr("smoothing: float")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle logits;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &logits));
      c->set_output(0, logits);
      return Status();
    });

namespace {

template <typename T>
class LogitStatisticsOp : public OpKernel {
 public:
  explicit LogitStatisticsOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const Tensor& logits = context->input(0);
    OP_REQUIRES(context, logits.dims() == 2,
                tensorflow::errors::InvalidArgument("logits must be [tokens, vocab]; got ",
                                                    logits.shape().DebugString()));
    const int64_t rows = logits.dim_size(0);
    const int64_t vocab = logits.dim_size(1);
    OP_REQUIRES(context, vocab > 0,
                tensorflow::errors::InvalidArgument("logits have an empty vocabulary axis: ",
                                                    logits.shape().DebugString()));
    Tensor* outputs[3];
    for (int i = 0; i < 3; ++i) {
      OP_REQUIRES_OK(context, context->allocate_output(i, TensorShape({rows}), &outputs[i]));
    }
    const T* in = logits.flat<T>().data();
    float* lse = outputs[0]->flat<float>().data();
    float* max_logit = outputs[1]->flat<float>().data();
    float* mean_logit = outputs[2]->flat<float>().data();
    auto work = [&](int64_t begin, int64_t end) {
      FloatRow z(vocab);
      float* buffer = z.data();
      for (int64_t r = begin; r < end; ++r) {
        ToFloat(in + r * vocab, vocab, buffer);
        const float m = z.maxCoeff();
        lse[r] = m + std::log((z - m).exp().sum());
        max_logit[r] = m;
        mean_logit[r] = z.sum() / static_cast<float>(vocab);
      }
    };
    ParallelFor(context, rows, 12 * vocab, work);
  }
};

template <typename T>
class SmoothedCrossEntropyGradOp : public OpKernel {
 public:
  explicit SmoothedCrossEntropyGradOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("smoothing", &smoothing_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& logits = context->input(0);
    const Tensor& labels = context->input(1);
    const Tensor& normalizer = context->input(2);
    const Tensor& upstream = context->input(3);
    OP_REQUIRES(context, logits.dims() == 2,
                tensorflow::errors::InvalidArgument("logits must be [tokens, vocab]; got ",
                                                    logits.shape().DebugString()));
    const int64_t rows = logits.dim_size(0);
    const int64_t vocab = logits.dim_size(1);
    OP_REQUIRES(context, labels.NumElements() == rows && normalizer.NumElements() == rows &&
                             upstream.NumElements() == rows,
                tensorflow::errors::InvalidArgument(
                    "labels, log_normalizer and upstream need one value per row of logits ",
                    logits.shape().DebugString()));
    Tensor* gradient;
    OP_REQUIRES_OK(context, context->allocate_output(0, logits.shape(), &gradient));
    const T* in = logits.flat<T>().data();
    T* out = gradient->flat<T>().data();
    const int32_t* label = labels.flat<int32_t>().data();
    const float* lse = normalizer.flat<float>().data();
    const float* up = upstream.flat<float>().data();
    const float eps = smoothing_;
    auto work = [&](int64_t begin, int64_t end) {
      FloatRow z(vocab);
      float* buffer = z.data();
      for (int64_t r = begin; r < end; ++r) {
        const float u = up[r];
        if (u == 0.0f) {
          // Padding: its token loss is masked out, so its gradient is exactly zero.
          std::memset(out + r * vocab, 0, vocab * sizeof(T));
          continue;
        }
        ToFloat(in + r * vocab, vocab, buffer);
        z = u * (z - lse[r]).exp() - u * (eps / static_cast<float>(vocab));
        const int32_t y = label[r];
        // The forward pass gathered z_label, which refuses labels outside the vocabulary.
        if (y >= 0 && y < vocab) buffer[y] -= u * (1.0f - eps);
        FromFloat(buffer, vocab, out + r * vocab);
      }
    };
    ParallelFor(context, rows, 12 * vocab, work);
  }

 private:
  float smoothing_;
};

}  // namespace

#define REGISTER(T)                                                                 \
  REGISTER_KERNEL_BUILDER(                                                          \
      Name("KerasTransformerLogitStatistics").Device(DEVICE_CPU).TypeConstraint<T>("T"), \
      LogitStatisticsOp<T>);                                                   \
  REGISTER_KERNEL_BUILDER(Name("KerasTransformerSmoothedCrossEntropyGrad")          \
                              .Device(DEVICE_CPU)                                   \
                              .TypeConstraint<T>("T"),                              \
                          SmoothedCrossEntropyGradOp<T>);

REGISTER(float);
REGISTER(bfloat16);

}  // namespace keras_transformer
