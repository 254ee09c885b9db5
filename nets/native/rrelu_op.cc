// Fused randomized leaky ReLU (thesis Eqs. 5.6-5.7) for MXNet 1.9, as a custom-operator
// library (mxnet/lib_api.h, loaded with mx.library.load; built by nets/native.py).
//
//   y = x            for x >= 0
//   y = a * x        for x <  0,   a ~ U(lower, upper) per element in training,
//                                  a = (lower + upper) / 2 at inference.
//
// Why native: composed of MXNet operators, RReLU costs five extra passes over every
// activation forward and three backward, plus MXNet's mt19937 sampler (about 4 ns per
// element on this hardware). Here the slope of element i is a pure function of (seed, i)
// (a counter-based generator: two keyed rounds of murmur3's 32-bit finalizer), so one pass
// computes the forward, nothing but the seed is kept for the backward pass, and the
// backward recomputes each slope. The result does not depend on the number of threads.
//
// Inputs:  x (float32 or bfloat16), t (float32, one element: 1 in training, 0 at inference;
//          the graph derives it from a Dropout op, see nets/activations.py).
// Outputs: y (x's type), seed (float64, one element; 0 at inference).
// Backward inputs (lib_api order): dy, dseed, x, t, y, seed.  Outputs: dx, dt (= 0).
//
// bfloat16: MXNet 1.9.1's lib_api.cc rejects its type flag (12) when it wraps a tensor;
// nets/native.py compiles a copy of lib_api.cc with that one case added, so a bfloat16
// network calls this op directly instead of casting to float32 around it (two extra passes
// over every activation each way). Slopes are computed in float32 and each product is
// rounded to nearest-even, as oneDNN rounds; x >= 0 passes through bit for bit.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <unordered_map>
#include <vector>

#include "mxnet/lib_api.h"

using namespace mxnet::ext;

namespace {

using Attrs = std::unordered_map<std::string, std::string>;

float attr(const Attrs& attrs, const char* key, float fallback) {
  auto it = attrs.find(key);
  return it == attrs.end() ? fallback : std::stof(it->second);
}

// murmur3's 32-bit finalizer: a bijection that mixes every input bit into every output bit.
inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}

// Slope of element i under key (k0, k1): two keyed finalizer rounds (32-bit multiplies, so
// the loops vectorize 16 lanes wide with AVX-512), 24 bits -> 2^24 evenly spaced slopes.
inline float slope_at(uint32_t i, uint32_t k0, uint32_t k1, float lower, float width) {
  const uint32_t h = fmix32(fmix32(i * 0x9e3779b1u + k0) ^ k1);
  return lower + width * (static_cast<float>(h >> 8) * (1.0f / 16777216.0f));
}

// Chunks over MXNet's own OpenMP pool (a second pool would fight its workers for the cores).
template <typename Body>
void parallel_for(int64_t n, Body body) {
  constexpr int64_t kChunk = 1 << 14;
#pragma omp parallel for schedule(static)
  for (int64_t begin = 0; begin < n; begin += kChunk) body(begin, std::min(n, begin + kChunk));
}

struct Key {
  uint32_t k0, k1;
  explicit Key(uint64_t seed)
      : k0(static_cast<uint32_t>(seed)), k1(static_cast<uint32_t>(seed >> 32)) {}
};

// MXNet's type flag for bfloat16 (mshadow::kBfloat16); lib_api.h's MXDType has no name for it.
constexpr int kBfloat16 = 12;

// Storage types: float32 as is; bfloat16 as the upper half of a float32's bits.
struct F32 {
  using T = float;
  static float load(float v) { return v; }
  static float store(float v) { return v; }
};

struct BF16 {
  using T = uint16_t;
  static float load(uint16_t v) {
    const uint32_t bits = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
  static uint16_t store(float f) {  // round to nearest even (products of finite numbers)
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return static_cast<uint16_t>(bits >> 16);
  }
};

// Slopes are computed a block at a time into a buffer, then applied with a select: two
// simple loops that vectorize (16 lanes with AVX-512). In one loop the compiler would
// branch around the hash for positive inputs, which mispredicts on random signs.
constexpr int64_t kBlock = 1024;

void slopes(float* __restrict out, int64_t begin, int64_t len, Key key, float lower,
            float width) {
  if (width == 0.0f) {  // inference: every slope is (l+u)/2, no hashing
    std::fill(out, out + len, lower);
    return;
  }
  const uint32_t base = static_cast<uint32_t>(begin);  // indices wrap past 2^32 elements
  for (uint32_t j = 0; j < static_cast<uint32_t>(len); ++j)
    out[j] = slope_at(base + j, key.k0, key.k1, lower, width);
}

template <typename S>
void forward_chunk(const typename S::T* __restrict x, typename S::T* __restrict y,
                   int64_t begin, int64_t end, Key key, float lower, float width) {
  alignas(64) float slope[kBlock];
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t len = std::min(kBlock, end - b);
    slopes(slope, b, len, key, lower, width);
    const typename S::T* __restrict xs = x + b;
    typename S::T* __restrict ys = y + b;
    for (int64_t j = 0; j < len; ++j) {
      const float v = S::load(xs[j]);
      ys[j] = v >= 0.0f ? xs[j] : S::store(v * slope[j]);
    }
  }
}

template <typename S>
void backward_chunk(const typename S::T* __restrict dy, const typename S::T* __restrict x,
                    typename S::T* __restrict dx, int64_t begin, int64_t end, Key key,
                    float lower, float width) {
  alignas(64) float slope[kBlock];
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t len = std::min(kBlock, end - b);
    slopes(slope, b, len, key, lower, width);
    const typename S::T* __restrict xs = x + b;
    const typename S::T* __restrict gs = dy + b;
    typename S::T* __restrict out = dx + b;
    for (int64_t j = 0; j < len; ++j)
      out[j] = S::load(xs[j]) >= 0.0f ? gs[j] : S::store(S::load(gs[j]) * slope[j]);
  }
}

// (lower, width) of the slopes: U(lower, upper) in training; at inference width 0 makes
// every slope (l+u)/2 exactly.
inline std::pair<float, float> slope_range(bool training, float lower, float upper) {
  return training ? std::make_pair(lower, upper - lower)
                  : std::make_pair(0.5f * (lower + upper), 0.0f);
}

template <typename S>
void forward_kernel(const MXTensor& x, MXTensor& y, uint64_t seed, bool training, float lower,
                    float upper) {
  const Key key(seed);
  const auto [lo, width] = slope_range(training, lower, upper);
  const auto* xs = static_cast<const typename S::T*>(x.data_ptr);
  auto* ys = static_cast<typename S::T*>(y.data_ptr);
  parallel_for(x.size(), [=](int64_t begin, int64_t end) {
    forward_chunk<S>(xs, ys, begin, end, key, lo, width);
  });
}

template <typename S>
void backward_kernel(const MXTensor& dy, const MXTensor& x, MXTensor& dx, uint64_t seed,
                     bool training, float lower, float upper) {
  const Key key(seed);
  const auto [lo, width] = slope_range(training, lower, upper);
  const auto* gs = static_cast<const typename S::T*>(dy.data_ptr);
  const auto* xs = static_cast<const typename S::T*>(x.data_ptr);
  auto* out = static_cast<typename S::T*>(dx.data_ptr);
  parallel_for(x.size(), [=](int64_t begin, int64_t end) {
    backward_chunk<S>(gs, xs, out, begin, end, key, lo, width);
  });
}

}  // namespace

MXReturnValue forward(const Attrs& attrs, std::vector<MXTensor>* inputs,
                      std::vector<MXTensor>* outputs, const OpResource& res) {
  const float lower = attr(attrs, "lower", 0.125f), upper = attr(attrs, "upper", 1.f / 3.f);
  MXTensor& x = inputs->at(0);
  const bool training = inputs->at(1).data<float>()[0] != 0.0f;
  uint64_t seed = 0;
  if (training) {
    mx_cpu_rand_t* states = res.get_cpu_rand_states();
    // 52 bits, so that the float64 seed output holds it exactly.
    seed = ((static_cast<uint64_t>(states[0]()) << 32) ^ states[0]()) & ((1ULL << 52) - 1);
  }
  outputs->at(1).data<double>()[0] = static_cast<double>(seed);
  if (x.dtype == kBfloat16)
    forward_kernel<BF16>(x, outputs->at(0), seed, training, lower, upper);
  else
    forward_kernel<F32>(x, outputs->at(0), seed, training, lower, upper);
  return MX_SUCCESS;
}

MXReturnValue backward(const Attrs& attrs, std::vector<MXTensor>* inputs,
                       std::vector<MXTensor>* outputs, const OpResource& res) {
  const float lower = attr(attrs, "lower", 0.125f), upper = attr(attrs, "upper", 1.f / 3.f);
  MXTensor& dy = inputs->at(0);
  MXTensor& x = inputs->at(2);
  const bool training = inputs->at(3).data<float>()[0] != 0.0f;
  const uint64_t seed = static_cast<uint64_t>(inputs->at(5).data<double>()[0]);
  if (x.dtype == kBfloat16)
    backward_kernel<BF16>(dy, x, outputs->at(0), seed, training, lower, upper);
  else
    backward_kernel<F32>(dy, x, outputs->at(0), seed, training, lower, upper);
  outputs->at(1).data<float>()[0] = 0.0f;  // t is a switch, not a parameter
  return MX_SUCCESS;
}

MXReturnValue parseAttrs(const Attrs& attrs, int* num_in, int* num_out) {
  *num_in = 2;
  *num_out = 2;
  const float lower = attr(attrs, "lower", 0.125f), upper = attr(attrs, "upper", 1.f / 3.f);
  if (!(0.0f <= lower && lower < upper && upper < 1.0f)) {
    MX_ERROR_MSG << "ndsb_rrelu: need 0 <= lower < upper < 1, got " << lower << ", " << upper;
    return MX_FAIL;
  }
  return MX_SUCCESS;
}

MXReturnValue inferType(const Attrs& attrs, std::vector<int>* in, std::vector<int>* out) {
  if (in->at(0) != kFloat32 && in->at(0) != kBfloat16) {
    MX_ERROR_MSG << "ndsb_rrelu: input must be float32 or bfloat16, got type flag "
                 << in->at(0);
    return MX_FAIL;
  }
  (*in)[1] = kFloat32;
  (*out)[0] = in->at(0);
  (*out)[1] = kFloat64;
  return MX_SUCCESS;
}

MXReturnValue inferShape(const Attrs& attrs, std::vector<std::vector<unsigned int>>* in,
                         std::vector<std::vector<unsigned int>>* out) {
  (*out)[0] = in->at(0);
  (*out)[1] = {1};
  return MX_SUCCESS;
}

REGISTER_OP(ndsb_rrelu)
    .setForward(forward, "cpu")
    .setBackward(backward, "cpu")
    .setParseAttrs(parseAttrs)
    .setInferType(inferType)
    .setInferShape(inferShape);

MXReturnValue initialize(int version) { return version >= 10700 ? MX_SUCCESS : MX_FAIL; }
