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
// (splitmix64, a counter-based generator), so one pass computes the forward, nothing but
// the seed is kept for the backward pass, and the backward recomputes each slope. The result
// does not depend on the number of threads.
//
// Inputs:  x (float32: lib_api.h in MXNet 1.9.1 cannot pass bfloat16 tensors, so a
//          bfloat16 network casts around this op), t (float32, one element: 1 in
//          training, 0 at inference; the graph derives it from a Dropout op, see
//          nets/activations.py).
// Outputs: y (float32), seed (float64, one element; 0 at inference).
// Backward inputs (lib_api order): dy, dseed, x, t, y, seed.  Outputs: dx, dt (= 0).
#include <algorithm>
#include <cmath>
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

inline uint64_t splitmix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Slope of element i: 24 random bits, so a takes 2^24 evenly spaced values in [lower, upper).
inline float slope_at(uint64_t seed, int64_t i, float lower, float width) {
  const float u = static_cast<float>(splitmix64(seed + static_cast<uint64_t>(i)) >> 40) *
                  (1.0f / 16777216.0f);
  return lower + width * u;
}

// Chunks over MXNet's own OpenMP pool (a second pool would fight its workers for the cores).
template <typename Body>
void parallel_for(int64_t n, Body body) {
  constexpr int64_t kChunk = 1 << 14;
#pragma omp parallel for schedule(static)
  for (int64_t begin = 0; begin < n; begin += kChunk) body(begin, std::min(n, begin + kChunk));
}

void forward_kernel(const float* x, float* y, int64_t n, uint64_t seed, bool training, float lower,
                    float upper) {
  const float width = upper - lower, mid = 0.5f * (lower + upper);
  parallel_for(n, [=](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float v = x[i];
      y[i] = v >= 0.0f ? v : v * (training ? slope_at(seed, i, lower, width) : mid);
    }
  });
}

void backward_kernel(const float* dy, const float* x, float* dx, int64_t n, uint64_t seed, bool training,
                     float lower, float upper) {
  const float width = upper - lower, mid = 0.5f * (lower + upper);
  parallel_for(n, [=](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      dx[i] = x[i] >= 0.0f ? dy[i] : dy[i] * (training ? slope_at(seed, i, lower, width) : mid);
    }
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
