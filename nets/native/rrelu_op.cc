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
// Inputs:  x (float32: lib_api.h in MXNet 1.9.1 cannot pass bfloat16 tensors, so a
//          bfloat16 network casts around this op), t (float32, one element: 1 in
//          training, 0 at inference; the graph derives it from a Dropout op, see
//          nets/activations.py).
// Outputs: y (float32), seed (float64, one element; 0 at inference).
// Backward inputs (lib_api order): dy, dseed, x, t, y, seed.  Outputs: dx, dt (= 0).
#include <algorithm>
#include <cstdint>
#include <string>
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

void forward_chunk(const float* __restrict x, float* __restrict y, int64_t begin, int64_t end,
                   Key key, float lower, float width) {
  alignas(64) float slope[kBlock];
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t len = std::min(kBlock, end - b);
    slopes(slope, b, len, key, lower, width);
    const float* __restrict xs = x + b;
    float* __restrict ys = y + b;
    for (int64_t j = 0; j < len; ++j) ys[j] = xs[j] >= 0.0f ? xs[j] : xs[j] * slope[j];
  }
}

void backward_chunk(const float* __restrict dy, const float* __restrict x,
                    float* __restrict dx, int64_t begin, int64_t end, Key key, float lower,
                    float width) {
  alignas(64) float slope[kBlock];
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t len = std::min(kBlock, end - b);
    slopes(slope, b, len, key, lower, width);
    const float* __restrict xs = x + b;
    const float* __restrict gs = dy + b;
    float* __restrict out = dx + b;
    for (int64_t j = 0; j < len; ++j) out[j] = xs[j] >= 0.0f ? gs[j] : gs[j] * slope[j];
  }
}

void forward_kernel(const float* x, float* y, int64_t n, uint64_t seed, bool training,
                    float lower, float upper) {
  const Key key(seed);
  // Inference: width 0 makes every slope (l+u)/2 exactly.
  const float lo = training ? lower : 0.5f * (lower + upper), width = training ? upper - lower : 0.0f;
  parallel_for(n, [=](int64_t begin, int64_t end) {
    forward_chunk(x, y, begin, end, key, lo, width);
  });
}

void backward_kernel(const float* dy, const float* x, float* dx, int64_t n, uint64_t seed,
                     bool training, float lower, float upper) {
  const Key key(seed);
  const float lo = training ? lower : 0.5f * (lower + upper), width = training ? upper - lower : 0.0f;
  parallel_for(n, [=](int64_t begin, int64_t end) {
    backward_chunk(dy, x, dx, begin, end, key, lo, width);
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
  const int64_t n = x.size();
  forward_kernel(x.data<float>(), outputs->at(0).data<float>(), n, seed, training, lower,
                 upper);
  return MX_SUCCESS;
}

MXReturnValue backward(const Attrs& attrs, std::vector<MXTensor>* inputs,
                       std::vector<MXTensor>* outputs, const OpResource& res) {
  const float lower = attr(attrs, "lower", 0.125f), upper = attr(attrs, "upper", 1.f / 3.f);
  MXTensor& dy = inputs->at(0);
  MXTensor& x = inputs->at(2);
  const bool training = inputs->at(3).data<float>()[0] != 0.0f;
  const uint64_t seed = static_cast<uint64_t>(inputs->at(5).data<double>()[0]);
  const int64_t n = x.size();
  backward_kernel(dy.data<float>(), x.data<float>(), outputs->at(0).data<float>(), n, seed,
                  training, lower, upper);
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
  if (in->at(0) != kFloat32) {
    MX_ERROR_MSG << "ndsb_rrelu: input must be float32, got type flag " << in->at(0);
    return MX_FAIL;
  }
  (*in)[1] = kFloat32;
  (*out)[0] = kFloat32;
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
