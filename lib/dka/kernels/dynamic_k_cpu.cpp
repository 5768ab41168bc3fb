// Fused Dynamic-K on the CPU: y[r, c] = sum of the K largest products W[c, i] * x[r, i] over i.
//
// Built by dka/kernels/cpu.py at first use (c++ -O3 -march=native -fopenmp, about two seconds) and
// called through ctypes with raw pointers: no PyTorch headers, no Python objects.
//
// Forward. A task is one row r and L consecutive outputs (L = lanes of one native vector, e.g.
// 16 float32 with AVX-512), one output per vector lane, so every step below is a vector
// operation over L independent (row, output) pairs and nothing needs a horizontal reduction:
//   1. products W^T[i, c..c+L] * x[r, i] for all i, rounded to the storage dtype exactly as
//      PyTorch's elementwise multiply rounds them (bfloat16: exact fp32 product, then
//      round-to-nearest-even), into a per-thread buffer of `in` vectors (never the whole
//      (rows, out, in) tensor); with each an integer key whose order is the float order (-0.0
//      counts as +0.0, NaN above everything, as in torch.topk);
//   2. the K-th largest key per lane by bisection between a lower bound (the smallest of the
//      maxima of K disjoint chunks: K distinct products reach it) and the largest key. Each step
//      counts the keys at or above the midpoint and snaps the bounds to the nearest actual keys,
//      so runs of equal products (zeros after a ReLU) end the search at once. Only inputs where
//      some lane reaches its lower bound are visited again (few of them when K << in);
//   3. the sum of the keys above that threshold plus the ties taken (lowest input index first:
//      the package's tie rule, see dka._core), and, when asked, the selected indices.
// Vectors are GCC/Clang vector extensions of the target's native width (64 bytes with AVX-512,
// 32 with AVX, 16 otherwise: -march=native where it is built), so nothing assumes an instruction
// set; only the lane-mask extraction uses an x86 intrinsic where there is one.
//
// Backward scatters through the saved indices: dx parallel over rows, dW parallel over output
// blocks, so no two threads ever add into the same element; the routing mask likewise.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace {

enum Dtype { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2 };

// One native vector: wider vector-extension types than the target has are lowered lane by lane.
#if defined(__AVX512F__) && defined(__AVX512DQ__)
constexpr int kVectorBytes = 64;
#elif defined(__AVX__)
constexpr int kVectorBytes = 32;
#else
constexpr int kVectorBytes = 16;
#endif

template <typename To, typename From>
inline To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between different sizes");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

inline float bf16_to_float(uint16_t h) { return bit_cast<float>(uint32_t(h) << 16); }

// Per storage type: the value type products are compared and summed in, the key type, their
// vectors, and the product with PyTorch's rounding.
template <typename S> struct Traits;

template <> struct Traits<float> {
  using Val = float;
  using Key = int32_t;
  using UKey = uint32_t;
  typedef float VVal __attribute__((vector_size(kVectorBytes)));
  typedef int32_t VKey __attribute__((vector_size(kVectorBytes)));
  typedef uint32_t VUKey __attribute__((vector_size(kVectorBytes)));
  static float widen(float v) { return v; }
  static VVal product(VVal x, VVal w) { return x * w; }
};

template <> struct Traits<double> {
  using Val = double;
  using Key = int64_t;
  using UKey = uint64_t;
  typedef double VVal __attribute__((vector_size(kVectorBytes)));
  typedef int64_t VKey __attribute__((vector_size(kVectorBytes)));
  typedef uint64_t VUKey __attribute__((vector_size(kVectorBytes)));
  static double widen(double v) { return v; }
  static VVal product(VVal x, VVal w) { return x * w; }
};

template <> struct Traits<uint16_t> {  // bfloat16, passed as its bits
  using Val = float;
  using Key = int32_t;
  using UKey = uint32_t;
  typedef float VVal __attribute__((vector_size(kVectorBytes)));
  typedef int32_t VKey __attribute__((vector_size(kVectorBytes)));
  typedef uint32_t VUKey __attribute__((vector_size(kVectorBytes)));
  static float widen(uint16_t v) { return bf16_to_float(v); }
  // The fp32 product of two bfloat16 values is exact; c10::BFloat16 then rounds it to nearest
  // even. NaN stays NaN (rounding could carry a low-payload NaN into infinity).
  static VVal product(VVal x, VVal w) {
    const VVal p = x * w;
    const VUKey u = bit_cast<VUKey>(p);
    const VUKey rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    return p != p ? p : bit_cast<VVal>(rounded);
  }
};

// Lane-wise select: a where the mask lane is set (all ones), else b. The vector `?:` lets the
// compiler emit one blend (or a masked move) and recognise min/max.
template <typename V, typename M>
inline V blend(M mask, V a, V b) { return mask ? a : b; }

template <typename VK>
inline VK vmax(VK a, VK b) { return a > b ? a : b; }
template <typename VK>
inline VK vmin(VK a, VK b) { return a < b ? a : b; }

// Keys ordered like the values: v + 0.0 turns -0.0 into +0.0, any NaN becomes the largest key.
template <typename T>
inline typename T::VKey keys_of(typename T::VVal v) {
  using VKey = typename T::VKey;
  using Key = typename T::Key;
  constexpr int kBits = 8 * sizeof(Key);
  const Key canonical_nan = std::numeric_limits<Key>::max() & ~((Key(1) << (std::numeric_limits<typename T::Val>::digits - 2)) - 1);
  VKey b = bit_cast<VKey>(v + typename T::Val(0));
  b = blend(VKey(v != v), VKey{} + canonical_nan, b);
  return b ^ ((b >> (kBits - 1)) & std::numeric_limits<Key>::max());
}

template <typename T>
inline typename T::Val value_of(typename T::Key key) {  // the inverse of keys_of (+-0.0 -> +0.0)
  using Key = typename T::Key;
  constexpr int kBits = 8 * sizeof(Key);
  const Key b = key ^ ((key >> (kBits - 1)) & std::numeric_limits<Key>::max());
  return bit_cast<typename T::Val>(b);
}

// Bit l set where lane l of the mask is set. Where the compiler targets x86 vector extensions
// this is one or a few movemask instructions; elsewhere a loop the compiler vectorises.
template <typename VK>
inline uint32_t lane_bits(VK m) {
  constexpr int kLanes = sizeof(VK) / sizeof(m[0]);
#if defined(__AVX512F__) && defined(__AVX512DQ__)
  if constexpr (kLanes == 16) return _mm512_movepi32_mask(bit_cast<__m512i>(m));
  if constexpr (kLanes == 8) return _mm512_movepi64_mask(bit_cast<__m512i>(m));
#elif defined(__AVX__)
  if constexpr (kLanes == 8) return uint32_t(_mm256_movemask_ps(bit_cast<__m256>(m)));
  if constexpr (kLanes == 4) return uint32_t(_mm256_movemask_pd(bit_cast<__m256d>(m)));
#elif defined(__SSE2__)
  if constexpr (kLanes == 4) return uint32_t(_mm_movemask_ps(bit_cast<__m128>(m)));
  if constexpr (kLanes == 2) return uint32_t(_mm_movemask_pd(bit_cast<__m128d>(m)));
#endif
  uint32_t bits = 0;
  for (int l = 0; l < kLanes; ++l) bits |= uint32_t(m[l] & 1) << l;
  return bits;
}

// One task: row `xr`, outputs c0 .. c0 + L - 1 of the transposed, lane-padded weight `wt`
// (in, out_pad), `valid` of them real. vals/keys: per-thread buffers of `in` vectors; cand: of
// `in` input indices.
template <typename S, typename I>
void select_task(const S* __restrict xr, const typename Traits<S>::Val* __restrict wt, int64_t out_pad,
                 int64_t n, int64_t k, int valid, typename Traits<S>::VVal* __restrict vals,
                 typename Traits<S>::VKey* __restrict keys, int32_t* __restrict cand,
                 typename Traits<S>::Val* __restrict sums, I* __restrict idx) {
  using T = Traits<S>;
  using Val = typename T::Val;
  using Key = typename T::Key;
  using VVal = typename T::VVal;
  using VKey = typename T::VKey;
  using VUKey = typename T::VUKey;
  constexpr int kLanes = kVectorBytes / sizeof(Val);
  const VKey kMaxKey = VKey{} + std::numeric_limits<Key>::max();
  const VKey kMinKey = VKey{} + std::numeric_limits<Key>::min();

  // 1. Products and keys; the bounds of the search.
  VKey hi = kMinKey, lo = kMaxKey, chunk_max = kMinKey;
  int64_t chunk = 0, chunk_end = n / k;  // chunk j covers [j n / k, (j + 1) n / k): k chunks
  for (int64_t i = 0; i < n; ++i) {
    VVal w;
    std::memcpy(&w, wt + i * out_pad, sizeof(VVal));
    const VVal p = T::product(VVal{} + T::widen(xr[i]), w);
    const VKey key = keys_of<T>(p);
    vals[i] = p;
    keys[i] = key;
    hi = vmax(hi, key);
    chunk_max = vmax(chunk_max, key);
    if (i + 1 == chunk_end) {
      lo = vmin(lo, chunk_max);
      chunk_max = kMinKey;
      ++chunk;
      chunk_end = (chunk + 1) * n / k;
    }
  }

  // Only inputs where some (real) lane reaches its lower bound can be selected: every later pass
  // visits just those, in input order (for K small against `in`, a fraction of them).
  VKey valid_lanes;
  for (int l = 0; l < kLanes; ++l) valid_lanes[l] = l < valid ? -1 : 0;
  int64_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    cand[m] = int32_t(i);
    m += lane_bits(VKey(keys[i] >= lo) & valid_lanes) != 0;
  }

  // 2. Bisection. Invariants per lane: lo and hi are keys of products, count(keys >= lo) >= k,
  // count(keys > hi) == above < k. `exact`: a midpoint had exactly k keys at or above it; they
  // are the selection (ties cannot straddle it) and lo == hi == the smallest of them.
  VKey above = VKey{}, exact = VKey{};
  const VKey vk = VKey{} + Key(k);
  for (;;) {
    const VKey live = (lo < hi) & valid_lanes;
    if (!lane_bits(live)) break;
    // lo + ceil((hi - lo) / 2) without overflow: the difference of two keys fits unsigned.
    const VKey mid = lo + bit_cast<VKey>((bit_cast<VUKey>(hi) - bit_cast<VUKey>(lo) + 1) >> 1);
    // Two independent accumulator sets: the loop runs at throughput, not at min/max latency.
    VKey count[2] = {}, next[2] = {kMaxKey, kMaxKey}, prev[2] = {kMinKey, kMinKey};
    int64_t j = 0;
    for (; j + 1 < m; j += 2) {
      for (int u = 0; u < 2; ++u) {
        const VKey key = keys[cand[j + u]];
        const VKey ge = key >= mid;
        count[u] -= ge;  // true is -1
        next[u] = vmin(next[u], blend(ge, key, kMaxKey));
        prev[u] = vmax(prev[u], blend(ge, kMinKey, key));
      }
    }
    if (j < m) {
      const VKey key = keys[cand[j]];
      const VKey ge = key >= mid;
      count[0] -= ge;
      next[0] = vmin(next[0], blend(ge, key, kMaxKey));
      prev[0] = vmax(prev[0], blend(ge, kMinKey, key));
    }
    const VKey counted = count[0] + count[1];
    const VKey nearest_above = vmin(next[0], next[1]), nearest_below = vmax(prev[0], prev[1]);
    const VKey enough = counted >= vk, hit = counted == vk;
    lo = blend(live & enough, nearest_above, lo);
    hi = blend(live, blend(enough, blend(hit, nearest_above, hi), nearest_below), hi);
    above = blend(live & ~enough, counted, above);
    exact |= live & hit;
  }

  // 3. Sums: keys above the threshold, plus the ties taken, which share one value.
  const VKey t = lo;
  const VKey ties_left = blend(exact, vk, vk - above);
  VVal sum = VVal{};
  VKey ties = VKey{};
  for (int64_t j = 0; j < m; ++j) {
    const int64_t i = cand[j];
    sum += blend(VKey(keys[i] > t), vals[i], VVal{});
    ties -= keys[i] == t;
  }
  for (int l = 0; l < valid; ++l) {
    const Key taken = std::min(ties[l], ties_left[l]);
    sums[l] = sum[l] + (taken > 0 ? Val(taken) * value_of<T>(t[l]) : Val(0));
  }
  if (!idx) return;
  // Indices in input order per lane: above the threshold, or a tie while ties remain.
  int64_t pos[kLanes] = {};
  VKey seen = VKey{};
  const uint32_t valid_bits = valid == 32 ? ~0u : (1u << valid) - 1u;
  for (int64_t j = 0; j < m; ++j) {
    const int64_t i = cand[j];
    const VKey key = keys[i];
    const VKey eq = key == t;
    const VKey take = (key > t) | (eq & (seen < ties_left));
    seen -= eq;
    for (uint32_t m = lane_bits(take) & valid_bits; m; m &= m - 1) {
      const int l = __builtin_ctz(m);
      idx[l * k + pos[l]++] = I(i);
    }
  }
}

template <typename S, typename I>
void forward(const S* x, const S* w, int64_t rows, int64_t out, int64_t in, int64_t k,
             typename Traits<S>::Val* sums, I* idx, int threads) {
  using T = Traits<S>;
  using Val = typename T::Val;
  constexpr int64_t kLanes = kVectorBytes / sizeof(Val);
  const int64_t out_pad = (out + kLanes - 1) / kLanes * kLanes;
  // W^T (in, out_pad) in the value type, zero-padded: one vector load per (i, task).
  std::vector<Val> wt(in * out_pad, Val(0));
  for (int64_t c = 0; c < out; ++c)
    for (int64_t i = 0; i < in; ++i) wt[i * out_pad + c] = T::widen(w[c * in + i]);
  const int64_t per_row = out_pad / kLanes, tasks = rows * per_row;
#pragma omp parallel num_threads(threads)
  {
    std::vector<typename T::VVal> vals(in);
    std::vector<typename T::VKey> keys(in);
    std::vector<int32_t> cand(in);
    Val lane_sums[kLanes];
#pragma omp for schedule(static)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t r = task / per_row, c0 = (task - r * per_row) * kLanes;
      const int valid = int(std::min(kLanes, out - c0));
      select_task<S, I>(x + r * in, wt.data() + c0, out_pad, in, k, valid, vals.data(), keys.data(),
                        cand.data(), lane_sums, idx ? idx + (r * out + c0) * k : nullptr);
      std::memcpy(sums + r * out + c0, lane_sums, sizeof(Val) * valid);
    }
  }
}

template <typename S, typename I>
void backward(const S* x, const S* w, const S* g, const I* idx, int64_t rows, int64_t out, int64_t in,
              int64_t k, typename Traits<S>::Val* gx, typename Traits<S>::Val* gw, int threads) {
  using T = Traits<S>;
  using Val = typename T::Val;
  if (gx) {  // gx[r, i] += g[r, c] * W[c, i]: each thread owns whole rows
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; ++r) {
      Val* __restrict gxr = gx + r * in;
      for (int64_t c = 0; c < out; ++c) {
        const Val gv = T::widen(g[r * out + c]);
        const I* sel = idx + (r * out + c) * k;
        const S* wc = w + c * in;
        for (int64_t j = 0; j < k; ++j) gxr[sel[j]] += gv * T::widen(wc[sel[j]]);
      }
    }
  }
  if (gw) {  // gw[c, i] += g[r, c] * x[r, i]: each thread owns a block of outputs
#pragma omp parallel num_threads(threads)
    {
      int nt = 1, t = 0;
#ifdef _OPENMP
      nt = omp_get_num_threads();
      t = omp_get_thread_num();
#endif
      const int64_t c0 = out * t / nt, c1 = out * (t + 1) / nt;
      for (int64_t r = 0; r < rows; ++r) {
        const S* xr = x + r * in;
        for (int64_t c = c0; c < c1; ++c) {
          const Val gv = T::widen(g[r * out + c]);
          const I* sel = idx + (r * out + c) * k;
          Val* __restrict gwc = gw + c * in;
          for (int64_t j = 0; j < k; ++j) gwc[sel[j]] += gv * T::widen(xr[sel[j]]);
        }
      }
    }
  }
}

// mask[c, i] = 1 where some row routed output c through input i (the trainer's never_routed
// statistic): each thread owns a block of outputs, so no two threads write one byte.
template <typename I>
void mark_routed(const I* idx, int64_t rows, int64_t out, int64_t in, int64_t k, uint8_t* mask, int threads) {
#pragma omp parallel num_threads(threads)
  {
    int nt = 1, t = 0;
#ifdef _OPENMP
    nt = omp_get_num_threads();
    t = omp_get_thread_num();
#endif
    const int64_t c0 = out * t / nt, c1 = out * (t + 1) / nt;
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = c0; c < c1; ++c) {
        const I* sel = idx + (r * out + c) * k;
        uint8_t* __restrict row = mask + c * in;
        for (int64_t j = 0; j < k; ++j) row[sel[j]] = 1;
      }
    }
  }
}

template <typename F>
int by_dtype(int dtype, int index_bytes, F&& f) {  // f(S*, I*): tags for the storage and index types
  if (index_bytes != 2 && index_bytes != 4) return 2;
  switch (dtype) {
    case kFloat32:
      return index_bytes == 2 ? f((float*)nullptr, (int16_t*)nullptr) : f((float*)nullptr, (int32_t*)nullptr);
    case kFloat64:
      return index_bytes == 2 ? f((double*)nullptr, (int16_t*)nullptr) : f((double*)nullptr, (int32_t*)nullptr);
    case kBFloat16:
      return index_bytes == 2 ? f((uint16_t*)nullptr, (int16_t*)nullptr)
                              : f((uint16_t*)nullptr, (int32_t*)nullptr);
    default:
      return 1;
  }
}

}  // namespace

extern "C" {

// sums: float32 (float64 for float64 inputs), (rows, out). idx: int16 or int32 (index_bytes),
// (rows, out, k), or null. Returns 0 on success, 1 for an unknown dtype, 2 for an index width.
int dka_dynamic_k_forward(int dtype, const void* x, const void* w, int64_t rows, int64_t out, int64_t in,
                          int64_t k, void* sums, void* idx, int index_bytes, int threads) {
  return by_dtype(dtype, index_bytes, [&](auto* s_tag, auto* i_tag) {
    using S = std::remove_pointer_t<decltype(s_tag)>;
    using I = std::remove_pointer_t<decltype(i_tag)>;
    forward<S, I>(static_cast<const S*>(x), static_cast<const S*>(w), rows, out, in, k,
                  static_cast<typename Traits<S>::Val*>(sums), static_cast<I*>(idx), threads);
    return 0;
  });
}

// gx (rows, in) and gw (out, in): zero-initialised, float32 (float64 for float64), or null.
int dka_dynamic_k_backward(int dtype, const void* x, const void* w, const void* g, const void* idx,
                           int index_bytes, int64_t rows, int64_t out, int64_t in, int64_t k, void* gx,
                           void* gw, int threads) {
  return by_dtype(dtype, index_bytes, [&](auto* s_tag, auto* i_tag) {
    using S = std::remove_pointer_t<decltype(s_tag)>;
    using I = std::remove_pointer_t<decltype(i_tag)>;
    using Val = typename Traits<S>::Val;
    backward<S, I>(static_cast<const S*>(x), static_cast<const S*>(w), static_cast<const S*>(g),
                   static_cast<const I*>(idx), rows, out, in, k, static_cast<Val*>(gx),
                   static_cast<Val*>(gw), threads);
    return 0;
  });
}

// mask: bool (out, in), contiguous, OR-ed with the selection in idx (rows, out, k).
int dka_dynamic_k_mark_routed(const void* idx, int index_bytes, int64_t rows, int64_t out, int64_t in,
                              int64_t k, void* mask, int threads) {
  if (index_bytes == 2) {
    mark_routed(static_cast<const int16_t*>(idx), rows, out, in, k, static_cast<uint8_t*>(mask), threads);
  } else if (index_bytes == 4) {
    mark_routed(static_cast<const int32_t*>(idx), rows, out, in, k, static_cast<uint8_t*>(mask), threads);
  } else {
    return 2;
  }
  return 0;
}

int dka_dynamic_k_abi_version() { return 2; }

}  // extern "C"
