// XLA:CPU FFI kernels for KV-cached decode, reading weights and cache rows in place from their layer stacks
// (a layer scan's dynamic slice, or a gather, is a copy as large as the read). Built on first use by
// qwen3_jax/cpu_kernels.py.
//
// 1. Qwen3MoeGatherSwiglu*: SwiGLU experts of a few tokens; 2. Qwen3StackedMatmul*: x @ W[l] (the output
// projection, the router), 2b. Qwen3StackedMatmulNT*: x @ W[l]^T (the q/k/v projections, stored [N, K]); 3. Qwen3DecodeAttention*: attention of one new token per row over its cache row.
//
// 1. Qwen3MoeGatherSwiglu*:
//   y[t] = sum_j w[t, j] * down[l, e] @ (silu(x[t] @ gate[l, e]) * (x[t] @ up[l, e])),  e = e_tk[t, j]
//
//   x_td [T, D] f32, w_tk [T, k] f32, e_tk [T, k] s32, layer [] s32,
//   gate/up [L, E, D, F], down [L, E, F, D] (f32 or bf16)  ->  y_td [T, D] f32
//
// The (token, slot) pairs are grouped by expert, so each distinct expert's weights stream through once for all of
// its tokens (blocks of up to kRows tokens share each weight row). The work is cut into chunks (ranges of whole
// experts; column pieces of each expert when there are fewer experts than chunks) run by the calling thread and
// XLA's intra-op pool (parallel_chunks); each chunk adds into its own partial y, summed at the end. Indices are
// clamped as XLA's gather clamps them.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kRows = 4;  // tokens sharing one pass over an expert's weight rows

inline float to_f32(float v) { return v; }
inline float to_f32(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// exp(x) that the compiler vectorizes (std::exp is a scalar call per element: 4096 of them in the
// experts of one decode step of the bench config, 4000 per kv head in attention at position 2000): 2^n * 2^f with
// n = round(x log2 e), 2^f = e^y with y = x - n ln 2 (Cody-Waite: ln 2 in two parts), |y| <= ln 2 / 2, by its
// Taylor series to degree 7 (relative error < 2e-7 over [-87, 88]). x < -87 gives 0, x > 88.72 +inf (any x: a
// finite or infinite float, never a wrapped exponent).
inline float exp_approx(float x) {
  // clamped to [-87, 88]: 2^n with n in [-126, 127] is a normal float (above 88 the exponent would wrap into the
  // sign bit: silu(-90) came out as -90); the ends are exact to float precision: 0 below, +inf above 88.72
  const float xc = std::min(std::max(x, -87.f), 88.f);
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  const float y = (xc - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.f / 5040;
  p = p * y + 1.f / 720;
  p = p * y + 1.f / 120;
  p = p * y + 1.f / 24;
  p = p * y + 1.f / 6;
  p = p * y + 0.5f;
  p = p * y + 1.f;
  p = p * y + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  if (x < -87.f) return 0.f;
  if (x > 88.7228f) return std::numeric_limits<float>::infinity();
  return p * scale;
}

// The experts' weight rows are prefetched kPf rows ahead of use with the non-temporal hint: each is read once per
// step; the cache is kept for what every step reads (a decode step of the bench config 0.47-0.55 -> 0.44-0.46 ms).
constexpr int64_t kPf = 16;
template <typename W>
inline void prefetch_row(const W* row, int64_t n) {
  const char* c = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < n * static_cast<int64_t>(sizeof(W)); b += 64) __builtin_prefetch(c + b, 0, 0);
}

struct Shared {
  std::atomic<int> next{0};
  std::atomic<int> in_flight{0};
};

struct Problem {
  const float* x;       // [T, D]
  const float* w;       // [T, k]
  int64_t t, d, f, k;
  std::vector<int32_t> order;   // (t * k + j) pairs sorted by expert
  std::vector<int32_t> starts;  // [n_groups + 1] offsets into order
  std::vector<int32_t> experts; // [n_groups]
};

// Columns [f0, f1) of the chosen experts' groups [g0, g1), added into y_td [T, D].
template <typename W>
void run_chunk(const Problem& p, const W* gate, const W* up, const W* down, int64_t g0, int64_t g1, int64_t f0,
               int64_t f1, float* y_td) {
  const int64_t d = p.d, f = p.f, nf = f1 - f0;
  std::vector<float> g(kRows * nf), u(kRows * nf);
  for (int64_t gi = g0; gi < g1; ++gi) {
    const int64_t e = p.experts[gi];
    const W* ge = gate + e * d * f;
    const W* ue = up + e * d * f;
    const W* de = down + e * f * d;
    for (int32_t r0 = p.starts[gi]; r0 < p.starts[gi + 1]; r0 += kRows) {
      const int nr = std::min<int>(kRows, p.starts[gi + 1] - r0);
      const float* xr[kRows];
      float wr[kRows];
      float* yr[kRows];
      for (int r = 0; r < kRows; ++r) {
        const int32_t pair = p.order[r0 + std::min(r, nr - 1)];
        xr[r] = p.x + (pair / p.k) * d;
        wr[r] = r < nr ? p.w[pair] : 0.f;
        yr[r] = y_td + (pair / p.k) * d;
      }
      std::fill(g.begin(), g.end(), 0.f);
      std::fill(u.begin(), u.end(), 0.f);
      // gate/up: g[r, :] += x[r, dd] * gate[dd, f0:f1], one weight row read once for the block's tokens
      for (int64_t dd = 0; dd < d; ++dd) {
        const W* grow = ge + dd * f + f0;
        const W* urow = ue + dd * f + f0;
        if (dd + kPf < d) {
          prefetch_row(grow + kPf * f, nf);
          prefetch_row(urow + kPf * f, nf);
        } else if (dd + kPf - d < nf) {  // the first rows of down
          prefetch_row(de + (f0 + dd + kPf - d) * d, d);
        }
        for (int r = 0; r < nr; ++r) {
          const float xv = xr[r][dd];
          float* __restrict__ gr = g.data() + r * nf;
          float* __restrict__ ur = u.data() + r * nf;
          for (int64_t c = 0; c < nf; ++c) {
            gr[c] += xv * to_f32(grow[c]);
            ur[c] += xv * to_f32(urow[c]);
          }
        }
      }
      // h = w * silu(g) * u  (into g)
      for (int r = 0; r < nr; ++r) {
        float* gr = g.data() + r * nf;
        const float* ur = u.data() + r * nf;
        for (int64_t c = 0; c < nf; ++c) gr[c] = wr[r] * gr[c] / (1.f + exp_approx(-gr[c])) * ur[c];
      }
      // down: y[r, :] += h[r, c] * down[f0 + c, :]
      for (int64_t c = 0; c < nf; ++c) {
        const W* drow = de + (f0 + c) * d;
        if (c + kPf < nf) prefetch_row(drow + kPf * d, d);
        for (int r = 0; r < nr; ++r) {
          const float hv = g[r * nf + c];
          float* __restrict__ yv = yr[r];
          for (int64_t dd = 0; dd < d; ++dd) yv[dd] += hv * to_f32(drow[dd]);
        }
      }
    }
  }
}

// Work split over the calling thread and XLA's intra-op pool: chunks claimed from an atomic counter. A helper
// registers (in_flight) before it claims and touches the caller's data only for a chunk it claimed; a claim
// succeeds only before the caller's own claim fails, and the caller then waits for in_flight to drain. A helper
// that starts after the caller returned finds no chunk and touches only `shared` (which it co-owns).
// Threads a kernel uses: the caller plus up to 7 of the pool's (the work is memory-bound; more only adds partials).
inline int64_t threads(ffi::ThreadPool& pool) { return std::clamp<int64_t>(pool.num_threads(), 1, 8); }

template <typename Fn>
void parallel_chunks(ffi::ThreadPool& pool, int64_t n_chunks, Fn fn) {
  const int64_t helpers = std::min<int64_t>(threads(pool) - 1, n_chunks - 1);
  if (helpers <= 0) {
    for (int64_t c = 0; c < n_chunks; ++c) fn(c);
    return;
  }
  auto shared = std::make_shared<Shared>();
  auto work = [shared, n_chunks, &fn]() {
    shared->in_flight.fetch_add(1);
    for (int c; (c = shared->next.fetch_add(1)) < n_chunks;) fn(c);
    shared->in_flight.fetch_sub(1);
  };
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([work]() { work(); });
  work();
  while (shared->in_flight.load() > 0) std::this_thread::yield();
}

template <ffi::DataType DT, typename W>
ffi::Error MoeGatherSwiglu(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                           ffi::Buffer<ffi::S32> e_tk, ffi::Buffer<ffi::S32> layer, ffi::Buffer<DT> gate,
                           ffi::Buffer<DT> up, ffi::Buffer<DT> down, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), gd = gate.dimensions(), dd = down.dimensions();
  if (xd.size() != 2 || gd.size() != 4 || dd.size() != 4 || w.dimensions().size() != 2)
    return ffi::Error::InvalidArgument("moe_gather_swiglu: ranks must be x 2, w 2, gate/up/down 4");
  Problem p;
  p.t = xd[0];
  p.d = xd[1];
  p.k = w.dimensions()[1];
  const int64_t n_layers = gd[0], n_exp = gd[1], f = gd[3];
  p.f = f;
  auto ud = up.dimensions();
  if (gd[2] != p.d || dd[0] != n_layers || dd[1] != n_exp || dd[2] != f || dd[3] != p.d ||
      !std::equal(gd.begin(), gd.end(), ud.begin()) || e_tk.dimensions()[0] != p.t || e_tk.dimensions()[1] != p.k ||
      w.dimensions()[0] != p.t)
    return ffi::Error::InvalidArgument("moe_gather_swiglu: gate/up [L,E,D,F] and down [L,E,F,D] do not match x");
  p.x = x.typed_data();
  p.w = w.typed_data();
  const int64_t l = std::clamp<int64_t>(layer.typed_data()[0], 0, n_layers - 1);
  const int32_t* e = e_tk.typed_data();
  const int64_t m = p.t * p.k;
  // counting sort of the (token, slot) pairs by expert
  std::vector<int32_t> count(n_exp + 1, 0);
  std::vector<int32_t> ex(m);
  for (int64_t i = 0; i < m; ++i) {
    ex[i] = static_cast<int32_t>(std::clamp<int64_t>(e[i], 0, n_exp - 1));
    ++count[ex[i] + 1];
  }
  for (int64_t i = 0; i < n_exp; ++i) count[i + 1] += count[i];
  p.order.resize(m);
  {
    std::vector<int32_t> pos(count.begin(), count.end() - 1);
    for (int64_t i = 0; i < m; ++i) p.order[pos[ex[i]]++] = static_cast<int32_t>(i);
  }
  for (int64_t i = 0; i < n_exp; ++i) {
    if (count[i + 1] > count[i]) {
      p.starts.push_back(count[i]);
      p.experts.push_back(static_cast<int32_t>(i));
    }
  }
  p.starts.push_back(static_cast<int32_t>(m));

  const size_t stride = static_cast<size_t>(n_exp) * p.d * f;
  const W* g_l = reinterpret_cast<const W*>(gate.typed_data()) + l * stride;
  const W* u_l = reinterpret_cast<const W*>(up.typed_data()) + l * stride;
  const W* d_l = reinterpret_cast<const W*>(down.typed_data()) + l * stride;
  float* out = y->typed_data();
  const size_t td = static_cast<size_t>(p.t) * p.d;

  // chunks: ranges of whole experts (contiguous weight streams) when there are enough of them, else column
  // pieces of each expert; each chunk adds into its own partial y
  const int64_t n_groups = static_cast<int64_t>(p.experts.size());
  const int64_t want = 2 * threads(pool);
  const int64_t pieces = n_groups >= want ? 1 : std::max<int64_t>(1, std::min<int64_t>(want / std::max<int64_t>(n_groups, 1), f / 64));
  const int64_t n_ranges = n_groups >= want ? want : n_groups;
  const int64_t n_chunks = n_ranges * pieces;
  if (n_chunks <= 1) {
    std::fill(out, out + td, 0.f);
    run_chunk<W>(p, g_l, u_l, d_l, 0, n_groups, 0, f, out);
    return ffi::Error::Success();
  }
  std::vector<float> partial(n_chunks * td, 0.f);
  parallel_chunks(pool, n_chunks, [&](int64_t c) {
    const int64_t r = c / pieces, q = c % pieces;
    const int64_t f0 = (f * q / pieces) & ~int64_t{7}, f1 = q + 1 == pieces ? f : (f * (q + 1) / pieces) & ~int64_t{7};
    run_chunk<W>(p, g_l, u_l, d_l, n_groups * r / n_ranges, n_groups * (r + 1) / n_ranges, f0, f1,
                 partial.data() + c * td);
  });
  std::copy(partial.begin(), partial.begin() + td, out);
  for (int64_t c = 1; c < n_chunks; ++c) {
    const float* src = partial.data() + c * td;
    for (size_t i = 0; i < td; ++i) out[i] += src[i];
  }
  return ffi::Error::Success();
}

// 2. Qwen3StackedMatmul*: y[b, m, n] = sum_k x[b, m, k] * W[l, b, k, n]
//    x [B, M, K] f32, layer [] s32, W [L, Bw, K, N] -> y [B, M, N] f32; Bw = 1 shares W over b (projection weights
//    [L, K, N]), Bw = B gives each b its own matrix. Chunks of N columns run in parallel.
constexpr int kTileN = 64;  // output columns per register tile

// y[r, j0:j0+nj] = sum_c x[r, c] * w[c, j0:j0+nj] for NR rows (nj <= kTileN): NR x kTileN accumulators stay in
// registers while the weight rows stream by (one weight load per kTileN / vector columns, NR FMAs on each).
template <int NR, typename W>
void matmul_tile(const float* x, int64_t k, const W* w, int64_t n, int64_t j0, int64_t nj, float* y) {
  float acc[NR][kTileN] = {};
  if (nj == kTileN) {
    for (int64_t c = 0; c < k; ++c) {
      const W* __restrict__ wr = w + c * n + j0;
      float wv[kTileN];
      for (int jj = 0; jj < kTileN; ++jj) wv[jj] = to_f32(wr[jj]);
      for (int r = 0; r < NR; ++r) {
        const float xv = x[r * k + c];
        for (int jj = 0; jj < kTileN; ++jj) acc[r][jj] += xv * wv[jj];
      }
    }
  } else {
    for (int64_t c = 0; c < k; ++c) {
      const W* __restrict__ wr = w + c * n + j0;
      for (int r = 0; r < NR; ++r) {
        const float xv = x[r * k + c];
        for (int64_t jj = 0; jj < nj; ++jj) acc[r][jj] += xv * to_f32(wr[jj]);
      }
    }
  }
  for (int r = 0; r < NR; ++r) std::copy(acc[r], acc[r] + nj, y + r * n + j0);
}

// fn(std::integral_constant<int, NR>) for the row count nr (1..kRows): a register block of NR rows, NR static.
template <typename Fn>
void with_rows(int64_t nr, Fn&& fn) {
  switch (nr) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 3: fn(std::integral_constant<int, 3>{}); break;
    default: fn(std::integral_constant<int, 4>{}); break;
  }
}

// Columns [n0, n1) of y [M, N] = x [M, K] @ w [K, N], in tiles of kRows rows x kTileN columns.
template <typename W>
void matmul_cols(const float* x, const W* w, float* y, int64_t m, int64_t k, int64_t n, int64_t n0, int64_t n1) {
  for (int64_t r0 = 0; r0 < m; r0 += kRows) {
    const int64_t nr = std::min<int64_t>(kRows, m - r0);
    for (int64_t j0 = n0; j0 < n1; j0 += kTileN) {
      const int64_t nj = std::min<int64_t>(kTileN, n1 - j0);
      const float* xr = x + r0 * k;
      float* yr = y + r0 * n;
      with_rows(nr, [&](auto rows) { matmul_tile<decltype(rows)::value, W>(xr, k, w, n, j0, nj, yr); });
    }
  }
}

template <ffi::DataType DT, typename W>
ffi::Error StackedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> layer,
                         ffi::Buffer<DT> w, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 3 || wd.size() != 4)
    return ffi::Error::InvalidArgument("stacked_matmul: x must be [B, M, K] and w [L, Bw, K, N]");
  const int64_t b = xd[0], m = xd[1], k = xd[2], n_layers = wd[0], bw = wd[1];
  const int64_t n = wd[3];
  if (wd[2] != k || (bw != 1 && bw != b))
    return ffi::Error::InvalidArgument("stacked_matmul: w does not match x [B, M, K]");
  const int64_t l = std::clamp<int64_t>(layer.typed_data()[0], 0, n_layers - 1);
  const W* w0 = reinterpret_cast<const W*>(w.typed_data()) + l * bw * k * n;
  const float* x0 = x.typed_data();
  float* y0 = y->typed_data();
  // chunks of >= 32 columns (and >= 16k weights), at most 4 per thread
  const int64_t per_row = std::max<int64_t>(1, std::min<int64_t>(n / 32, (k * n) / 16384));
  const int64_t cols = std::max<int64_t>(1, std::min<int64_t>(per_row, 4 * threads(pool)));
  parallel_chunks(pool, b * cols, [&](int64_t c) {
    const int64_t bi = c / cols, ci = c % cols;
    const int64_t n0 = (n * ci / cols) & ~int64_t{7}, n1 = ci + 1 == cols ? n : (n * (ci + 1) / cols) & ~int64_t{7};
    matmul_cols<W>(x0 + bi * m * k, w0 + (bw == 1 ? 0 : bi) * k * n, y0 + bi * m * n, m, k, n, n0, n1);
  });
  return ffi::Error::Success();
}

// 2b. Qwen3StackedMatmulNT*: y[b, m, n] = sum_k x[b, m, k] * W[l, n, k]
//    x [B, M, K] f32, layer [] s32, W [L, N, K] (the weight stored output-major, as the q/k/v projections
//    [L, H, hd, D] are) -> y [B, M, N] f32. Rows of W are contiguous in k: each output is a dot product, kept in
//    kLanes partial sums per row (a fixed-width vector loop, no reassociation) for NR rows of x at a time.
constexpr int kLanes = 16;

template <int NR, typename W>
void matmul_nt_rows(const float* x, int64_t k, const W* __restrict__ wr, float* out, int64_t stride) {
  float acc[NR][kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= k; c += kLanes) {
    float wv[kLanes];
    for (int jj = 0; jj < kLanes; ++jj) wv[jj] = to_f32(wr[c + jj]);
    for (int r = 0; r < NR; ++r) {
      const float* __restrict__ xr = x + r * k + c;
      for (int jj = 0; jj < kLanes; ++jj) acc[r][jj] += xr[jj] * wv[jj];
    }
  }
  for (int r = 0; r < NR; ++r) {
    float sum = 0.f;
    for (int jj = 0; jj < kLanes; ++jj) sum += acc[r][jj];
    for (int64_t cc = c; cc < k; ++cc) sum += x[r * k + cc] * to_f32(wr[cc]);
    out[r * stride] = sum;
  }
}

template <ffi::DataType DT, typename W>
ffi::Error StackedMatmulNT(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> layer,
                           ffi::Buffer<DT> w, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 3 || wd.size() != 3)
    return ffi::Error::InvalidArgument("stacked_matmul_nt: x must be [B, M, K] and w [L, N, K]");
  const int64_t b = xd[0], m = xd[1], k = xd[2], n_layers = wd[0], n = wd[1];
  if (wd[2] != k) return ffi::Error::InvalidArgument("stacked_matmul_nt: w [L, N, K] does not match x [B, M, K]");
  const int64_t l = std::clamp<int64_t>(layer.typed_data()[0], 0, n_layers - 1);
  const W* w0 = reinterpret_cast<const W*>(w.typed_data()) + l * n * k;
  const int64_t rows = b * m;  // every row shares W
  const float* x0 = x.typed_data();
  float* y0 = y->typed_data();
  const int64_t per_row = std::max<int64_t>(1, std::min<int64_t>(n / 32, (k * n) / 16384));
  const int64_t cols = std::max<int64_t>(1, std::min<int64_t>(per_row, 4 * threads(pool)));
  parallel_chunks(pool, cols, [&](int64_t ci) {
    const int64_t n0 = n * ci / cols, n1 = n * (ci + 1) / cols;
    for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
      const int64_t nr = std::min<int64_t>(kRows, rows - r0);
      const float* xr = x0 + r0 * k;
      for (int64_t j = n0; j < n1; ++j) {
        const W* wr = w0 + j * k;
        float* out = y0 + r0 * n + j;
        with_rows(nr, [&](auto rows_nr) { matmul_nt_rows<decltype(rows_nr)::value, W>(xr, k, wr, out, n); });
      }
    }
  });
  return ffi::Error::Success();
}

// 3. Qwen3DecodeAttention*: one new query per row over its cache row (the slots `old` marks) and its own new key
//    and value, grouped-query, fp32 softmax:
//    q [B, H, hd] f32, kn/vn [B, K, hd] f32, old [B, S] pred, new_ok [B] pred, layer [] s32,
//    k/v stacks [L, B, S, K, hd] (f32 or bf16)  ->  o [B, H, hd] f32
//    Unmarked slots are not read (a row at position 100 of a 2112-slot cache reads 100 rows). A row with nothing
//    to attend to gets zeros. (row, kv head) pairs run in parallel.
template <typename W>
void attend_one(const float* q, const float* kn, const float* vn, const bool* old, bool new_ok, const W* kc,
                const W* vc, int64_t s_len, int64_t kh, int64_t g, int64_t hd, float scale, float* o,
                std::vector<float>& p) {
  // q [G, hd] of this kv head; kc/vc point at slot 0 of this head (row stride kh * hd); o [G, hd]
  p.assign(g * (s_len + 1), 0.f);
  std::vector<float> m(g, -INFINITY);
  for (int64_t s = 0; s < s_len; ++s) {
    if (!old[s]) continue;
    const W* __restrict__ kr = kc + s * kh * hd;
    for (int64_t gi = 0; gi < g; ++gi) {
      const float* __restrict__ qr = q + gi * hd;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t c = 0; c < hd; ++c) acc += qr[c] * to_f32(kr[c]);
      acc *= scale;
      p[gi * (s_len + 1) + s] = acc;
      m[gi] = std::max(m[gi], acc);
    }
  }
  for (int64_t gi = 0; gi < g; ++gi) {
    float* pr = p.data() + gi * (s_len + 1);
    if (new_ok) {
      float acc = 0.f;
      for (int64_t c = 0; c < hd; ++c) acc += q[gi * hd + c] * kn[c];
      pr[s_len] = acc * scale;
      m[gi] = std::max(m[gi], pr[s_len]);
    }
    const float mx = std::isfinite(m[gi]) ? m[gi] : 0.f;
    float denom = 0.f;
#pragma omp simd reduction(+ : denom)
    for (int64_t s = 0; s < s_len; ++s) {
      const float e = exp_approx(pr[s] - mx);
      pr[s] = old[s] ? e : 0.f;
      denom += pr[s];
    }
    pr[s_len] = new_ok ? exp_approx(pr[s_len] - mx) : 0.f;
    denom = std::max(denom + pr[s_len], 1e-30f);
    const float inv = 1.f / denom;
    for (int64_t s = 0; s <= s_len; ++s) pr[s] *= inv;
  }
  std::fill(o, o + g * hd, 0.f);
  for (int64_t s = 0; s < s_len; ++s) {
    if (!old[s]) continue;
    const W* __restrict__ vr = vc + s * kh * hd;
    for (int64_t gi = 0; gi < g; ++gi) {
      const float ps = p[gi * (s_len + 1) + s];
      float* __restrict__ orow = o + gi * hd;
      for (int64_t c = 0; c < hd; ++c) orow[c] += ps * to_f32(vr[c]);
    }
  }
  for (int64_t gi = 0; gi < g; ++gi) {
    const float pn = p[gi * (s_len + 1) + s_len];
    for (int64_t c = 0; c < hd; ++c) o[gi * hd + c] += pn * vn[c];
  }
}

template <ffi::DataType DT, typename W>
ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> kn,
                           ffi::Buffer<ffi::F32> vn, ffi::Buffer<ffi::PRED> old, ffi::Buffer<ffi::PRED> new_ok,
                           ffi::Buffer<ffi::S32> layer, ffi::Buffer<DT> k_stack, ffi::Buffer<DT> v_stack,
                           ffi::ResultBuffer<ffi::F32> o) {
  auto qd = q.dimensions(), kd = k_stack.dimensions(), nd = kn.dimensions();
  if (qd.size() != 3 || kd.size() != 5 || nd.size() != 3)
    return ffi::Error::InvalidArgument("decode_attention: q [B,H,hd], kn/vn [B,K,hd], caches [L,B,S,K,hd]");
  const int64_t b = qd[0], h = qd[1], hd = qd[2], n_layers = kd[0], s_len = kd[2], kh = kd[3];
  if (kd[1] != b || kd[4] != hd || nd[0] != b || nd[1] != kh || nd[2] != hd || h % kh != 0 ||
      old.dimensions()[0] != b || old.dimensions()[1] != s_len ||
      !std::equal(kd.begin(), kd.end(), v_stack.dimensions().begin()))
    return ffi::Error::InvalidArgument("decode_attention: shapes do not match");
  const int64_t g = h / kh;
  const int64_t l = std::clamp<int64_t>(layer.typed_data()[0], 0, n_layers - 1);
  const size_t row = static_cast<size_t>(s_len) * kh * hd;  // one cache row [S, K, hd]
  const W* k0 = reinterpret_cast<const W*>(k_stack.typed_data()) + l * b * row;
  const W* v0 = reinterpret_cast<const W*>(v_stack.typed_data()) + l * b * row;
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  parallel_chunks(pool, b * kh, [&](int64_t c) {
    const int64_t bi = c / kh, j = c % kh;
    std::vector<float> p;
    attend_one<W>(q.typed_data() + (bi * h + j * g) * hd, kn.typed_data() + (bi * kh + j) * hd,
                  vn.typed_data() + (bi * kh + j) * hd, old.typed_data() + bi * s_len, new_ok.typed_data()[bi],
                  k0 + bi * row + j * hd, v0 + bi * row + j * hd, s_len, kh, g, hd, scale,
                  o->typed_data() + (bi * h + j * g) * hd, p);
  });
  return ffi::Error::Success();
}

}  // namespace

#define QWEN3_MATMUL_BIND(DT)                             \
  ffi::Ffi::Bind()                                        \
      .Ctx<ffi::ThreadPool>()                             \
      .Arg<ffi::Buffer<ffi::F32>>()                       \
      .Arg<ffi::Buffer<ffi::S32>>()                       \
      .Arg<ffi::Buffer<DT>>()                             \
      .Ret<ffi::Buffer<ffi::F32>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(Qwen3StackedMatmulF32, (StackedMatmul<ffi::F32, float>), QWEN3_MATMUL_BIND(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(Qwen3StackedMatmulBF16, (StackedMatmul<ffi::BF16, uint16_t>), QWEN3_MATMUL_BIND(ffi::BF16));
XLA_FFI_DEFINE_HANDLER_SYMBOL(Qwen3StackedMatmulNTF32, (StackedMatmulNT<ffi::F32, float>), QWEN3_MATMUL_BIND(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(Qwen3StackedMatmulNTBF16, (StackedMatmulNT<ffi::BF16, uint16_t>),
                              QWEN3_MATMUL_BIND(ffi::BF16));

#define QWEN3_ATTN_BIND(DT)                               \
  ffi::Ffi::Bind()                                        \
      .Ctx<ffi::ThreadPool>()                             \
      .Arg<ffi::Buffer<ffi::F32>>()                       \
      .Arg<ffi::Buffer<ffi::F32>>()                       \
      .Arg<ffi::Buffer<ffi::F32>>()                       \
      .Arg<ffi::Buffer<ffi::PRED>>()                      \
      .Arg<ffi::Buffer<ffi::PRED>>()                      \
      .Arg<ffi::Buffer<ffi::S32>>()                       \
      .Arg<ffi::Buffer<DT>>()                             \
      .Arg<ffi::Buffer<DT>>()                             \
      .Ret<ffi::Buffer<ffi::F32>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(Qwen3DecodeAttentionF32, (DecodeAttention<ffi::F32, float>), QWEN3_ATTN_BIND(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(Qwen3DecodeAttentionBF16, (DecodeAttention<ffi::BF16, uint16_t>), QWEN3_ATTN_BIND(ffi::BF16));

#define QWEN3_BIND(DT)                                    \
  ffi::Ffi::Bind()                                        \
      .Ctx<ffi::ThreadPool>()                             \
      .Arg<ffi::Buffer<ffi::F32>>()                       \
      .Arg<ffi::Buffer<ffi::F32>>()                       \
      .Arg<ffi::Buffer<ffi::S32>>()                       \
      .Arg<ffi::Buffer<ffi::S32>>()                       \
      .Arg<ffi::Buffer<DT>>()                             \
      .Arg<ffi::Buffer<DT>>()                             \
      .Arg<ffi::Buffer<DT>>()                             \
      .Ret<ffi::Buffer<ffi::F32>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(Qwen3MoeGatherSwigluF32, (MoeGatherSwiglu<ffi::F32, float>), QWEN3_BIND(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(Qwen3MoeGatherSwigluBF16, (MoeGatherSwiglu<ffi::BF16, uint16_t>), QWEN3_BIND(ffi::BF16));
