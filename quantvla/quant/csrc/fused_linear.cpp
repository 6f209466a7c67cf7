// One C++ call for a whole QuantLinear forward on the CPU (quantvla/quant/fused.py builds and loads it).
//
// The eager forward dispatches 40-65 small torch operators per call; on the trained policies' 64-256
// wide layers each costs a few microseconds and the GEMM itself less, so the time is dispatch. This
// runs the same arithmetic in plain loops and calls ATen only where the bits depend on ATen's own
// code: the reflections' block sums (ATen's reduction order) and the integer GEMM (exact anyway).
//
// Bit-identity with the eager path, step by step (every float op is one IEEE op in float32, in the
// eager path's order; built with -ffp-contract=off so no multiply-add is fused):
//   smoothing    x / s                                                (aten::div)
//   reflection   d = x[j] - sum(x_b) * u;  d *= c;  x_b += d * u;  x[j] += -d
//                sum(x_b) by at::sum on the same view, u and c as the eager path casts them (float)
//   permutation  x[:, perm]                                           (aten::index_select)
//   act. grid    lo = min(amin, 0); hi = max(amax, 0); s = max((hi - lo) / L, tiny);
//                z = clamp(round(-lo / s), 0, L) - 2^(b-1);  q = int8(clamp(round(x / s) + z))
//   GEMM         int32, exact (at::_int_mm, or an fp32 GEMM within 2^24: any order is exact)
//   epilogue     y = ((float(acc - z * w_sum) * s_x) * s_w) + bias
// fused.py checks this against the eager path on probe layers before using it, and the tests do
// under Hypothesis.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

namespace {

// A BlockRotation's cached reflection plan, flattened: per group (start, blocks, size, steps) in
// `meta`, its u in `us`, and per step the plan's own tensors (index int64 [1, blocks, 1], coefficient
// float32 [blocks, 1]) in `steps`.
void reflect(at::Tensor& x, const std::vector<int64_t>& meta, const std::vector<double>& us,
             const std::vector<at::Tensor>& steps) {
  const int64_t m = x.size(0), k = x.size(1);
  float* base = x.data_ptr<float>();
  size_t step = 0;
  for (size_t g = 0; 4 * g < meta.size(); ++g) {
    const int64_t start = meta[4 * g], blocks = meta[4 * g + 1], size = meta[4 * g + 2], n = meta[4 * g + 3];
    const float u = static_cast<float>(us[g]);
    at::Tensor view = x.slice(1, start, start + blocks * size).view({m, blocks, size});
    for (int64_t s = 0; s < n; ++s, ++step) {
      const int64_t* jj = steps[2 * step].data_ptr<int64_t>();
      const float* coef = steps[2 * step + 1].data_ptr<float>();
      at::Tensor sums = view.sum(2, /*keepdim=*/true).contiguous();  // [m, blocks, 1]
      const float* sp = sums.data_ptr<float>();
      at::parallel_for(0, m, 64, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          for (int64_t b = 0; b < blocks; ++b) {
            float* xb = base + r * k + start + b * size;
            const int64_t j = jj[b];
            const float su = sp[r * blocks + b] * u;
            float d = xb[j] - su;
            d = d * coef[b];
            const float du = d * u;
            for (int64_t i = 0; i < size; ++i) xb[i] = xb[i] + du;
            xb[j] = xb[j] + (-d);
          }
        }
      });
    }
  }
}

inline float clamp_f(float v, float lo, float hi) { return std::min(std::max(v, lo), hi); }

// The element loops below are compiled for several instruction sets and picked at load time (GCC on
// x86-64), so that the divisions run as vector divides; a vector divide rounds exactly as a scalar
// one, and no loop reorders a float sum.
// (QV_NO_CLONES: one instruction set, the compiler's target; the tests build the baseline and AVX2
// that way to check each clone's bits on any x86 host.)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(QV_NO_CLONES)
#define QV_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define QV_CLONES
#endif

// Eight floats or int32s at a time (GCC/Clang vector extensions, compiled per instruction set by
// QV_CLONES); each lane does exactly the scalar float operation, so vectors change no bit.
typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8x __attribute__((vector_size(32)));

inline f8 splat(float v) { return f8{v, v, v, v, v, v, v, v}; }
inline f8 vmin(f8 a, f8 b) { return a < b ? a : b; }
inline f8 vmax(f8 a, f8 b) { return a > b ? a : b; }

// Round half to even, as torch.round (std::nearbyint) does, for |v| < 2^22: adding and subtracting
// 1.5 * 2^23 rounds in the FPU's default mode. Callers clamp first, so |v| stays far below that.
// (A zero may come back as +0 instead of -0; every caller converts it to an integer.)
constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23
inline float round_even(float v) { return (v + kMagic) - kMagic; }

QV_CLONES void divide_columns(const float* src, const float* div, float* dst, int64_t k) {
  for (int64_t c = 0; c < k; ++c) dst[c] = src[c] / div[c];
}

// Row minimum and maximum and whether the row holds a NaN (which min/max skip; the caller then
// makes the scale NaN, as amin/amax would). The order of comparisons cannot change a min or max.
QV_CLONES void row_range(const float* xr, int64_t k, float* lo_out, float* hi_out, bool* nan_out) {
  f8 lo8 = splat(std::numeric_limits<float>::infinity()), hi8 = -lo8;
  i8x nan8 = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t c = 0;
  for (; c + 8 <= k; c += 8) {
    f8 v;
    std::memcpy(&v, xr + c, sizeof v);
    nan8 |= (v != v);
    lo8 = vmin(v, lo8);
    hi8 = vmax(v, hi8);
  }
  float lo = lo8[0], hi = hi8[0];
  bool nan = false;
  for (int j = 0; j < 8; ++j) {
    lo = lo8[j] < lo ? lo8[j] : lo;
    hi = hi8[j] > hi ? hi8[j] : hi;
    nan = nan || nan8[j];
  }
  for (; c < k; ++c) {
    const float v = xr[c];
    nan = nan || v != v;
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
  }
  *lo_out = lo;
  *hi_out = hi;
  *nan_out = nan;
}

// q = int8(clamp(round(x / s) + z, qmin, qmax)). x / s is first clamped to [qmin - z - 1, qmax - z + 1]:
// integer bounds, so a value beyond them rounds to beyond them and ends at the same clamp, and the
// rounding trick's range is never left (also for +-Inf from a tiny scale).
QV_CLONES void quantize_row(const float* xr, int64_t k, float s, float z, float qmin, float qmax, int8_t* qr) {
  const float lo = qmin - z - 1.0f, hi = qmax - z + 1.0f;
  const f8 s8 = splat(s), z8 = splat(z), lo8 = splat(lo), hi8 = splat(hi), qmin8 = splat(qmin), qmax8 = splat(qmax);
  const f8 magic8 = splat(kMagic);
  int64_t c = 0;
  for (; c + 8 <= k; c += 8) {
    f8 v;
    std::memcpy(&v, xr + c, sizeof v);
    v = vmin(vmax(v / s8, lo8), hi8);
    v = ((v + magic8) - magic8) + z8;
    v = vmin(vmax(v, qmin8), qmax8);
    const i8x q = __builtin_convertvector(v, i8x);
    for (int j = 0; j < 8; ++j) qr[c + j] = static_cast<int8_t>(q[j]);
  }
  for (; c < k; ++c) {
    float v = std::min(std::max(xr[c] / s, lo), hi);
    v = round_even(v) + z;
    qr[c] = static_cast<int8_t>(std::min(std::max(v, qmin), qmax));
  }
}

QV_CLONES void epilogue_row(const int32_t* ar, const int32_t* w_sum, int32_t z, float s, const float* w_scale,
                            const float* bias, int64_t n, float* yr) {
  if (w_sum) {
    for (int64_t c = 0; c < n; ++c) yr[c] = (static_cast<float>(ar[c] - z * w_sum[c]) * s) * w_scale[c];
  } else {
    for (int64_t c = 0; c < n; ++c) yr[c] = (static_cast<float>(ar[c]) * s) * w_scale[c];
  }
  if (bias) {
    for (int64_t c = 0; c < n; ++c) yr[c] = yr[c] + bias[c];
  }
}

}  // namespace

// Returns (y [M, N] float32, ok): ok is false where a token's activation scale is not finite (NaN or
// Inf in the input), or, with a static grid, any transformed activation is; fused.py raises then.
// A layer's arguments, converted from Python once (fused.py caches one per QuantLinear); a call then
// converts only the input, the GEMM choice and the scratch tile.
struct Layer {
  c10::optional<at::Tensor> smooth;                        // [K] float32
  std::vector<int64_t> rot1_meta;                          // see reflect()
  std::vector<double> rot1_u;
  std::vector<at::Tensor> rot1;
  c10::optional<at::Tensor> perm;                          // [K] int32
  std::vector<int64_t> rot2_meta;
  std::vector<double> rot2_u;
  std::vector<at::Tensor> rot2;
  int64_t act_bits;
  bool symmetric, per_token;
  c10::optional<at::Tensor> static_scale, static_zero;     // per-tensor grids: float32 [1], int32 [1]
  double min_scale;
  at::Tensor qweight;                                      // packed int4 uint8 [N, K/2] or int8 [N, K]
  bool packed;
  c10::optional<at::Tensor> w_sum;                         // int32 [N]
  at::Tensor w_scale;                                      // float32 [N]
  c10::optional<at::Tensor> bias;                          // float32 [N]
};

std::tuple<at::Tensor, bool> forward(
    const Layer& layer,
    const at::Tensor& x_in,                     // [M, K] float32, contiguous
    bool fp32_gemm,
    const at::Tensor& scratch) {                // int8, >= N * K bytes (the per-thread unpack tile)
  const auto& smooth = layer.smooth;
  const auto& rot1_meta = layer.rot1_meta;
  const auto& rot1_u = layer.rot1_u;
  const auto& rot1 = layer.rot1;
  const auto& perm = layer.perm;
  const auto& rot2_meta = layer.rot2_meta;
  const auto& rot2_u = layer.rot2_u;
  const auto& rot2 = layer.rot2;
  const auto& act_bits = layer.act_bits;
  const auto& symmetric = layer.symmetric;
  const auto& per_token = layer.per_token;
  const auto& static_scale = layer.static_scale;
  const auto& static_zero = layer.static_zero;
  const auto& min_scale = layer.min_scale;
  const auto& qweight = layer.qweight;
  const auto& packed = layer.packed;
  const auto& w_sum = layer.w_sum;
  const auto& w_scale = layer.w_scale;
  const auto& bias = layer.bias;
  const int64_t m = x_in.size(0), k = x_in.size(1);
  const int64_t n = qweight.size(0);

  // ---- the DuQuant transform, on a temporary of our own
  at::Tensor x;
  if (smooth.has_value()) {
    x = at::empty_like(x_in);
    const float* src = x_in.data_ptr<float>();
    const float* s = smooth->data_ptr<float>();
    float* dst = x.data_ptr<float>();
    at::parallel_for(0, m, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) divide_columns(src + r * k, s, dst + r * k, k);
    });
  } else if (!rot1_meta.empty() || perm.has_value() || !rot2_meta.empty()) {
    x = x_in.clone();
  } else {
    x = x_in;  // no transform: read only
  }
  if (!rot1_meta.empty()) reflect(x, rot1_meta, rot1_u, rot1);
  if (perm.has_value()) {
    at::Tensor y = at::empty_like(x);
    const int32_t* p = perm->data_ptr<int32_t>();
    const float* src = x.data_ptr<float>();
    float* dst = y.data_ptr<float>();
    at::parallel_for(0, m, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = 0; c < k; ++c) dst[r * k + c] = src[r * k + p[c]];
    });
    x = y;
  }
  if (!rot2_meta.empty()) reflect(x, rot2_meta, rot2_u, rot2);

  // ---- the activation grid
  const float qmin = static_cast<float>(-(int64_t(1) << (act_bits - 1)));
  const float qmax = static_cast<float>((int64_t(1) << (act_bits - 1)) - 1);
  const float levels = static_cast<float>((int64_t(1) << act_bits) - 1);
  const float half_range = static_cast<float>(int64_t(1) << (act_bits - 1));
  const float tiny = static_cast<float>(min_scale);
  at::Tensor qx = at::empty({m, k}, x.options().dtype(at::kChar));
  std::vector<float> scale(m);
  std::vector<int32_t> zero(m, 0);
  std::vector<float> zero_f(m, 0.0f);
  bool ok = true;
  const float* xp = x.data_ptr<float>();
  int8_t* qp = qx.data_ptr<int8_t>();
  if (!per_token) {
    const float s = static_scale->data_ptr<float>()[0];
    int32_t z = symmetric ? 0 : static_zero->data_ptr<int32_t>()[0];
    for (int64_t r = 0; r < m; ++r) { scale[r] = s; zero[r] = z; zero_f[r] = static_cast<float>(z); }
    for (int64_t i = 0; i < m * k; ++i)
      if (!std::isfinite(xp[i])) { ok = false; break; }
  }
  std::vector<char> row_ok(m, 1);
  at::parallel_for(0, m, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = xp + r * k;
      if (per_token) {
        bool nan = false;
        float s;
        float lo, hi;
        row_range(xr, k, &lo, &hi, &nan);
        if (symmetric) {
          const float amax = std::max(std::fabs(lo), std::fabs(hi));  // max |x| = max(|min|, |max|)
          s = nan ? std::numeric_limits<float>::quiet_NaN() : std::max(amax / qmax, tiny);
        } else {
          lo = std::min(lo, 0.0f);
          hi = std::max(hi, 0.0f);
          s = nan ? std::numeric_limits<float>::quiet_NaN() : std::max((hi - lo) / levels, tiny);
          if (std::isfinite(s)) {
            zero_f[r] = clamp_f(round_even(clamp_f(-lo / s, -1.0f, levels + 1.0f)), 0.0f, levels) - half_range;
            zero[r] = static_cast<int32_t>(zero_f[r]);
          }
        }
        scale[r] = s;
        if (!std::isfinite(s)) { row_ok[r] = 0; continue; }
      }
      quantize_row(xr, k, scale[r], zero_f[r], qmin, qmax, qp + r * k);
    }
  });
  for (int64_t r = 0; r < m; ++r) ok = ok && row_ok[r];
  if (!ok) return {at::Tensor(), false};

  // ---- the integer GEMM: acc = qx @ W^T, int32, exact
  at::Tensor w;
  if (packed) {
    const int64_t half = qweight.size(1);
    w = scratch.slice(0, 0, n * k).view({n, k});
    const int8_t* pw = reinterpret_cast<const int8_t*>(qweight.data_ptr<uint8_t>());
    int8_t* uw = w.data_ptr<int8_t>();
    at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int8_t* src = pw + r * half;
        int8_t* lo = uw + r * k;
        int8_t* hi = lo + half;
        for (int64_t j = 0; j < half; ++j) {
          lo[j] = static_cast<int8_t>(static_cast<int8_t>(src[j] << 4) >> 4);
          hi[j] = static_cast<int8_t>(src[j] >> 4);
        }
      }
    });
  } else {
    w = qweight;
  }
  at::Tensor acc = fp32_gemm ? at::mm(qx.to(at::kFloat), w.to(at::kFloat).t()).to(at::kInt)
                             : at::_int_mm(qx, w.t());

  // ---- epilogue
  at::Tensor y = at::empty({m, n}, x_in.options());
  const int32_t* ap = acc.data_ptr<int32_t>();
  const int32_t* ws = w_sum.has_value() && !symmetric ? w_sum->data_ptr<int32_t>() : nullptr;
  const float* sw = w_scale.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, m, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      epilogue_row(ap + r * n, ws, zero[r], scale[r], sw, bp, n, yp + r * n);
    }
  });
  return {y, true};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Layer>(m, "Layer", pybind11::module_local())  // local: test builds load beside it
      .def(pybind11::init<c10::optional<at::Tensor>, std::vector<int64_t>, std::vector<double>, std::vector<at::Tensor>,
                          c10::optional<at::Tensor>, std::vector<int64_t>, std::vector<double>, std::vector<at::Tensor>,
                          int64_t, bool, bool, c10::optional<at::Tensor>, c10::optional<at::Tensor>, double, at::Tensor,
                          bool, c10::optional<at::Tensor>, at::Tensor, c10::optional<at::Tensor>>())
      .def("forward", &forward, "QuantLinear forward on the CPU in one call (see the top of this file)");
}
