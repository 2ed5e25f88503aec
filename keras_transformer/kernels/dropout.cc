// Dropout's mask and its product in one pass: the Philox words of
// StatelessRandomUniformFullIntV2 (the same words for the same key and counter), cut into 8- or
// 16-bit numbers as `dropout_tf`'s bitcast cuts them, compared with the threshold, and the
// input multiplied by 0 or the scale. TensorFlow's ops take five passes for it (the words, the
// bitcast's copy, the comparison, the select into a mask, the product).
//
// KerasTransformerDropout(x [...] T, key [1] uint64, counter [2] uint64, keep bool;
//                         threshold, bits, scale)
//   -> y = x * mask, mask [...] T: scale (rounded to T) where the element's number is at least
//      `threshold` and `keep` is true (`keep` has x's shape, or no elements: all kept), else 0.
// Element i's number is bits [b * (i % k), b * (i % k + 1)) of word i / k (k = 32 / b
// numbers per word), word w being output w % 4 of the Philox block w / 4.

#include "keras_transformer_kernels.h"
#include "tensorflow/core/kernels/random_ops_util.h"
#include "tensorflow/core/lib/random/philox_random.h"

namespace keras_transformer {

REGISTER_OP("KerasTransformerDropout")
    .Input("x: T")
    .Input("key: uint64")
    .Input("counter: uint64")
    .Input("keep: bool")
    .Output("y: T")
    .Output("mask: T")
    .Attr("T: {float, bfloat16}")
    .Attr("threshold: int")
    .Attr("bits: int")
    .Attr("scale: float")
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->input(0));
      c->set_output(1, c->input(0));
      return Status();
    });

namespace {

using tensorflow::random::PhiloxRandom;

// Philox4x32-10 of `lanes` consecutive counters at once, as PhiloxRandom computes one (its
// constants, rounds and counter increment), written over arrays so that the compiler
// vectorizes the lanes: one block at a time, PhiloxRandom cost most of dropout's time.
constexpr int kLanes = 16;

inline void PhiloxBlocks(const PhiloxRandom::ResultType& base_counter,
                         const PhiloxRandom::Key& base_key, uint64_t first_block,
                         uint32_t words[4 * kLanes]) {
  const uint64_t low = (static_cast<uint64_t>(base_counter[1]) << 32) | base_counter[0];
  const uint64_t high = (static_cast<uint64_t>(base_counter[3]) << 32) | base_counter[2];
  const uint32_t key0 = base_key[0], key1 = base_key[1];
#pragma GCC ivdep
  for (int l = 0; l < kLanes; ++l) {
    // The 128-bit counter plus the block's index, as PhiloxRandom::Skip adds it.
    const uint64_t sum = low + (first_block + l);
    const uint64_t top = high + (sum < low ? 1 : 0);
    uint32_t c0 = static_cast<uint32_t>(sum), c1 = static_cast<uint32_t>(sum >> 32);
    uint32_t c2 = static_cast<uint32_t>(top), c3 = static_cast<uint32_t>(top >> 32);
    uint32_t k0 = key0, k1 = key1;
#pragma GCC unroll 10
    for (int round = 0; round < 10; ++round) {
      const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
      const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
      c0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
      c1 = static_cast<uint32_t>(p1);
      c2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
      c3 = static_cast<uint32_t>(p0);
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    // Word r of block l is word 4 l + r of the stream, as FillPhiloxRandom lays them out.
    words[4 * l] = c0;
    words[4 * l + 1] = c1;
    words[4 * l + 2] = c2;
    words[4 * l + 3] = c3;
  }
}

// The 0-or-scale factors of one chunk of `4 * kLanes` words: element j's number is number j
// of the words read as kBits-bit integers, the order of `dropout_tf`'s bitcast (both
// little-endian).
template <typename Number>
inline void Factors(const uint32_t words[4 * kLanes], uint32_t threshold, float scale,
                    float* factor) {
  constexpr int kCount = 4 * kLanes * sizeof(uint32_t) / sizeof(Number);
  Number numbers[kCount];
  std::memcpy(numbers, words, sizeof(numbers));
  for (int j = 0; j < kCount; ++j) factor[j] = numbers[j] >= threshold ? scale : 0.0f;
}

template <typename T>
class DropoutOp : public OpKernel {
 public:
  explicit DropoutOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("threshold", &threshold_));
    OP_REQUIRES_OK(context, context->GetAttr("bits", &bits_));
    float scale;
    OP_REQUIRES_OK(context, context->GetAttr("scale", &scale));
    OP_REQUIRES(context, bits_ == 8 || bits_ == 16,
                tensorflow::errors::InvalidArgument("bits must be 8 or 16; got ", bits_));
    OP_REQUIRES(context, threshold_ >= 0 && threshold_ < (1 << bits_),
                tensorflow::errors::InvalidArgument("threshold ", threshold_,
                                                    " is outside [0, 2^", bits_, ")"));
    // The mask holds the scale in T, as the ops path's constant does.
    scale_ = static_cast<float>(static_cast<T>(scale));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& x = context->input(0);
    const Tensor& key = context->input(1);
    const Tensor& counter = context->input(2);
    const Tensor& keep = context->input(3);
    OP_REQUIRES(context, key.NumElements() == 1 && counter.NumElements() == 2,
                tensorflow::errors::InvalidArgument(
                    "key must hold 1 and counter 2 values (Philox); got ",
                    key.shape().DebugString(), " and ", counter.shape().DebugString()));
    const bool masked = keep.NumElements() > 0;
    OP_REQUIRES(context, !masked || keep.shape() == x.shape(),
                tensorflow::errors::InvalidArgument("keep ", keep.shape().DebugString(),
                                                    " must have the shape of x ",
                                                    x.shape().DebugString()));
    Tensor *y, *mask;
    OP_REQUIRES_OK(context, context->allocate_output(0, x.shape(), &y));
    OP_REQUIRES_OK(context, context->allocate_output(1, x.shape(), &mask));
    const int64_t size = x.NumElements();
    if (size == 0) return;
    const PhiloxRandom base = tensorflow::GetPhiloxRandomFromCounterKeyMem(
        counter.flat<uint64_t>().data(), key.flat<uint64_t>().data());
    const PhiloxRandom::ResultType base_counter = base.counter();
    const PhiloxRandom::Key base_key = base.key();
    const int bits = bits_;
    const int per_word = 32 / bits;
    const int chunk = kLanes * 4 * per_word;  // elements of kLanes Philox blocks
    const uint32_t threshold = static_cast<uint32_t>(threshold_);
    const float scale = scale_;
    const T* in = x.flat<T>().data();
    const bool* kept = masked ? keep.flat<bool>().data() : nullptr;
    T* out = y->flat<T>().data();
    T* factors = mask->flat<T>().data();
    const int64_t chunks = (size + chunk - 1) / chunk;
    auto work = [&](int64_t begin, int64_t end) {
      uint32_t words[4 * kLanes];
      float factor[kLanes * 16], values[kLanes * 16];
      for (int64_t c = begin; c < end; ++c) {
        PhiloxBlocks(base_counter, base_key, static_cast<uint64_t>(c) * kLanes, words);
        const int64_t first = c * chunk;
        const int64_t count = std::min<int64_t>(chunk, size - first);
        if (bits == 8) {
          Factors<uint8_t>(words, threshold, scale, factor);
        } else {
          Factors<uint16_t>(words, threshold, scale, factor);
        }
        if (kept != nullptr) {
          // A bool is a byte holding 0 or 1: a product, not a branch per element (a select
          // here compiled to branches that mispredicted half the time, 6x slower).
          const uint8_t* keep_chunk = reinterpret_cast<const uint8_t*>(kept + first);
          for (int64_t j = 0; j < count; ++j) factor[j] *= static_cast<float>(keep_chunk[j]);
        }
        ToFloat(in + first, count, values);
        for (int64_t j = 0; j < count; ++j) values[j] *= factor[j];
        FromFloat(values, count, out + first);
        FromFloat(factor, count, factors + first);
      }
    };
    ParallelFor(context, chunks, 40 * chunk, work);
  }

 private:
  int threshold_;
  int bits_;
  float scale_;
};

}  // namespace

#define REGISTER(T)                                                                   \
  REGISTER_KERNEL_BUILDER(                                                            \
      Name("KerasTransformerDropout").Device(DEVICE_CPU).TypeConstraint<T>("T"),       \
      DropoutOp<T>);

REGISTER(float);
REGISTER(bfloat16);

}  // namespace keras_transformer
