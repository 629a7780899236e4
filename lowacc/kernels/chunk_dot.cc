// order='chunk' on the CPU as one XLA FFI kernel: y = the simulated dot x (B, M, K) . w (B, K, N).
//
// The chain of spec section 3, per output element: chunk partials P = the float32 sum of C
// consecutive products, s = Q_acc(P), and the combine T <- Q_comb(T + s) taken exactly (TwoSum,
// then one rounding), or T + s in float32 without a combine format. lowacc.dot's XLA path runs a
// scan of per-chunk dots that streams the whole M x N total through memory once per chunk; here
// each 8 x 32 output tile keeps its chunk partials in AVX-512 registers and its total in L1 for the
// whole contraction. Work items (batch, 256-row block, 32-column panel) are shared out over XLA's
// intra-op thread pool.
//
// Formats (lowacc.kernels.native.supports): deterministic rounding, man_bits < 23, underflow
// 'flush' with min_exp > -126 or 'none'. With float32 subnormals flushed (FTZ/DAZ, set here as XLA
// sets them on the CPU) every nonzero sum is a float32 normal, so a rounding drops exactly
// 23 - man_bits significand bits: the fixed-mask rounding of lowacc.quantize.round_exact.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#define LOWACC_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,fma")))

namespace {

constexpr int kRows = 8;             // rows of a register tile
constexpr int kCols = 32;            // columns: two 16-lane vectors
constexpr int64_t kBlockRows = 256;  // rows of one work item

enum Rounding : int64_t { kNearestEven = 0, kTowardZero = 1, kUp = 2, kDown = 3 };
enum Overflow : int64_t { kOverflowNone = 0, kOverflowInf = 1, kSaturate = 2 };

// A format as lowacc.kernels.native encodes it:
// [man_bits, rounding, overflow, flush_below, limit, m0_parity].
struct Format {
  uint32_t dropped, mask, half, flush_below, limit, parity;
  int64_t rounding, overflow;
  bool m0;

  static Format Of(ffi::Span<const int64_t> f) {
    Format r;
    r.dropped = static_cast<uint32_t>(23 - f[0]);
    r.mask = (1u << r.dropped) - 1u;
    r.half = 1u << (r.dropped - 1u);
    r.rounding = f[1];
    r.overflow = f[2];
    r.flush_below = static_cast<uint32_t>(f[3]);
    r.limit = static_cast<uint32_t>(f[4]);
    r.parity = static_cast<uint32_t>(f[5]);
    r.m0 = f[0] == 0;
    return r;
  }
};

constexpr int kVectors = kRows * 2;  // the 16-lane vectors of a tile
constexpr int kGroup = 4;            // vectors rounded together

// v[i] <- the exact value v[i] + lo[i] (|lo| <= ulp(v) / 2) rounded once into f, for n vectors
// (with_lo=false: v[i] alone). Each step runs over the n vectors before the next, so that their
// independent dependency chains overlap; n = kGroup keeps them all in registers.
template <bool with_lo, int n>
LOWACC_AVX512 inline void Round(__m512* v, const __m512* lo, const Format& f) {
  const __m512i abs = _mm512_set1_epi32(0x7FFFFFFF), inf = _mm512_set1_epi32(0x7F800000);
  const __m512i one = _mm512_set1_epi32(1), mask = _mm512_set1_epi32(static_cast<int>(f.mask));
  __m512i u[n], a[n], mag[n];
  __mmask16 nan[n], infinite[n], negative[n], sticky[n] = {}, up[n] = {};
#pragma GCC unroll 16
  for (int i = 0; i < n; ++i) {
    u[i] = _mm512_castps_si512(v[i]);
    a[i] = _mm512_and_si512(u[i], abs);
    nan[i] = _mm512_cmpgt_epu32_mask(a[i], inf);
    infinite[i] = _mm512_cmpeq_epi32_mask(a[i], inf);  // exact, unless lo is NaN (below)
    negative[i] = _mm512_movepi32_mask(u[i]);
  }
  if (with_lo) {
#pragma GCC unroll 16
    for (int i = 0; i < n; ++i) {
      const __m512i lu = _mm512_castps_si512(lo[i]);
      // lo NaN: a finite sum beyond float32, which overflows as a finite value.
      infinite[i] &= _mm512_cmple_epu32_mask(_mm512_and_si512(lu, abs), inf);
      sticky[i] = _mm512_test_epi32_mask(lu, abs) & _mm512_cmplt_epu32_mask(a[i], inf);
      // lo opposite to hi: the exact value is just below |hi|.
      const __mmask16 below = sticky[i] & _mm512_movepi32_mask(_mm512_xor_si512(lu, u[i]));
      a[i] = _mm512_mask_sub_epi32(a[i], below, a[i], one);
    }
  }
  if (f.rounding == kNearestEven) {  // rem + (sticky | odd) > half
    const __m512i half = _mm512_set1_epi32(static_cast<int>(f.half));
    const __m512i parity = _mm512_set1_epi32(static_cast<int>(f.parity));
    const __m128i dropped = _mm_cvtsi32_si128(static_cast<int>(f.dropped));
#pragma GCC unroll 16
    for (int i = 0; i < n; ++i) {
      const __m512i odd = f.m0 ? _mm512_add_epi32(_mm512_srli_epi32(a[i], 23), parity)
                               : _mm512_srl_epi32(a[i], dropped);
      const __m512i t = _mm512_mask_mov_epi32(_mm512_and_si512(odd, one), sticky[i], one);
      up[i] = _mm512_cmpgt_epu32_mask(_mm512_add_epi32(_mm512_and_si512(a[i], mask), t), half);
    }
  } else if (f.rounding != kTowardZero) {
#pragma GCC unroll 16
    for (int i = 0; i < n; ++i) {
      const __mmask16 inexact = _mm512_test_epi32_mask(a[i], mask) | sticky[i];
      up[i] = inexact & (f.rounding == kDown ? negative[i] : static_cast<__mmask16>(~negative[i]));
    }
  }
  const __m512i ulp = _mm512_set1_epi32(static_cast<int>(f.mask + 1u));
  const __m512i flush_below = _mm512_set1_epi32(static_cast<int>(f.flush_below));
#pragma GCC unroll 16
  for (int i = 0; i < n; ++i) {
    mag[i] = _mm512_andnot_si512(mask, a[i]);
    mag[i] = _mm512_mask_add_epi32(mag[i], up[i], mag[i], ulp);
    mag[i] = _mm512_maskz_mov_epi32(_mm512_cmpge_epu32_mask(mag[i], flush_below), mag[i]);
  }
  if (f.overflow != kOverflowNone) {
    const __m512i limit = _mm512_set1_epi32(static_cast<int>(f.limit));
#pragma GCC unroll 16
    for (int i = 0; i < n; ++i) {
      if (f.overflow == kSaturate) {
        mag[i] = _mm512_min_epu32(mag[i], limit);
        continue;
      }
      // An infinity is exact: only finite results overflow.
      const __mmask16 over = _mm512_cmpgt_epu32_mask(mag[i], limit) & ~infinite[i];
      __m512i big = inf;
      if (f.rounding == kTowardZero) {
        big = limit;
      } else if (f.rounding == kUp || f.rounding == kDown) {
        const __mmask16 to_max =
            f.rounding == kUp ? negative[i] : static_cast<__mmask16>(~negative[i]);
        big = _mm512_mask_mov_epi32(inf, to_max, limit);
      }
      mag[i] = _mm512_mask_mov_epi32(mag[i], over, big);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < n; ++i) {
    const __m512i signed_mag = _mm512_ternarylogic_epi32(u[i], abs, mag[i], 0xBA);  // sign | mag
    v[i] = _mm512_castsi512_ps(_mm512_mask_mov_epi32(signed_mag, nan[i], u[i]));
  }
}

struct Problem {
  const float* x;
  const float* w;
  float* y;
  int64_t m, k, n, chunk;
  Format acc, combine;
  bool has_combine;
};

// One kRows x kCols tile: x (rows, k) with row stride p.k, the packed columns wp (k x kCols).
LOWACC_AVX512 void Tile(const Problem& p, const float* x, const float* wp, float* y, int rows,
                        int cols) {
  const float* xr[kRows];
  for (int r = 0; r < kRows; ++r) xr[r] = x + std::min(r, rows - 1) * p.k;
  alignas(64) float total[kRows][kCols] = {};
  for (int64_t k0 = 0; k0 < p.k; k0 += p.chunk) {
    const int64_t k1 = std::min(p.k, k0 + p.chunk);
    __m512 c00 = _mm512_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
           c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00, c60 = c00,
           c61 = c00, c70 = c00, c71 = c00;
    for (int64_t kk = k0; kk < k1; ++kk) {
      const __m512 w0 = _mm512_load_ps(wp + kk * kCols), w1 = _mm512_load_ps(wp + kk * kCols + 16);
#define LOWACC_ROW(r)                                  \
  {                                                    \
    const __m512 xv = _mm512_set1_ps(xr[r][kk]);       \
    c##r##0 = _mm512_fmadd_ps(xv, w0, c##r##0);        \
    c##r##1 = _mm512_fmadd_ps(xv, w1, c##r##1);        \
  }
      LOWACC_ROW(0) LOWACC_ROW(1) LOWACC_ROW(2) LOWACC_ROW(3)
      LOWACC_ROW(4) LOWACC_ROW(5) LOWACC_ROW(6) LOWACC_ROW(7)
#undef LOWACC_ROW
    }
    const __m512 part[kVectors] = {c00, c01, c10, c11, c20, c21, c30, c31,
                                   c40, c41, c50, c51, c60, c61, c70, c71};
    const __m512i abs = _mm512_set1_epi32(0x7FFFFFFF), inf = _mm512_set1_epi32(0x7F800000);
    const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(0x80000000u)));
#pragma GCC unroll 4
    for (int g = 0; g < kVectors; g += kGroup) {
      __m512 s[kGroup], lo[kGroup];
#pragma GCC unroll 4
      for (int i = 0; i < kGroup; ++i) s[i] = part[g + i];
      Round<false, kGroup>(s, s, p.acc);  // s = Q_acc(P); P, summed from +0, is never -0
      float* t = &total[0][0] + 16 * g;
#pragma GCC unroll 4
      for (int i = 0; i < kGroup; ++i) {
        const __m512 ti = _mm512_load_ps(t + 16 * i);
        if (p.has_combine) {  // TwoSum: hi + lo = t + s exactly, then T = Q_comb(hi + lo)
          __m512 hi = _mm512_add_ps(ti, s[i]);
          if (p.combine.rounding == kDown) {  // an exact zero sum is -0 if t or s is negative
            const __mmask16 zero = _mm512_cmpeq_ps_mask(hi, _mm512_setzero_ps());
            hi = _mm512_mask_mov_ps(hi, zero, _mm512_and_ps(_mm512_or_ps(ti, s[i]), sign));
          }
          const __m512 bb = _mm512_sub_ps(hi, ti);
          lo[i] = _mm512_add_ps(_mm512_sub_ps(ti, _mm512_sub_ps(hi, bb)), _mm512_sub_ps(s[i], bb));
          // An infinite operand: the sum is exactly infinite, lo = 0 (not inf - inf).
          const __mmask16 infinite = _mm512_cmpeq_epi32_mask(
              _mm512_and_si512(_mm512_castps_si512(ti), abs), inf) |
              _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(s[i]), abs), inf);
          lo[i] = _mm512_mask_mov_ps(lo[i], infinite, _mm512_setzero_ps());
          s[i] = hi;
        } else {
          s[i] = _mm512_add_ps(ti, s[i]);
        }
      }
      if (p.has_combine) Round<true, kGroup>(s, lo, p.combine);
#pragma GCC unroll 4
      for (int i = 0; i < kGroup; ++i) _mm512_store_ps(t + 16 * i, s[i]);
    }
  }
  for (int r = 0; r < rows; ++r) std::memcpy(y + r * p.n, total[r], cols * sizeof(float));
}

// Work item: batch b, rows [i0, i0 + kBlockRows), columns [j0, j0 + kCols); wp: scratch.
LOWACC_AVX512 void Item(const Problem& p, int64_t b, int64_t i0, int64_t j0, float* wp) {
  const int cols = static_cast<int>(std::min<int64_t>(kCols, p.n - j0));
  const float* w = p.w + b * p.k * p.n;
  for (int64_t kk = 0; kk < p.k; ++kk) {
    std::memcpy(wp + kk * kCols, w + kk * p.n + j0, cols * sizeof(float));
    std::memset(wp + kk * kCols + cols, 0, (kCols - cols) * sizeof(float));
  }
  const int64_t i1 = std::min(p.m, i0 + kBlockRows);
  for (int64_t i = i0; i < i1; i += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, i1 - i));
    Tile(p, p.x + (b * p.m + i) * p.k, wp, p.y + (b * p.m + i) * p.n + j0, rows, cols);
  }
}

ffi::Error ChunkDot(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                    ffi::ResultBuffer<ffi::F32> y, int64_t chunk, ffi::Span<const int64_t> acc,
                    ffi::Span<const int64_t> combine) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 3 || wd.size() != 3 || xd[0] != wd[0] || xd[2] != wd[1])
    return ffi::Error::InvalidArgument("lowacc_chunk_dot: expected x (B, M, K), w (B, K, N)");
  if (acc.size() != 6 || (combine.size() != 0 && combine.size() != 6) || chunk < 1)
    return ffi::Error::InvalidArgument("lowacc_chunk_dot: malformed attributes");
  Problem p{x.typed_data(), w.typed_data(), y->typed_data(), xd[1], xd[2], wd[2], chunk,
            Format::Of(acc), Format{}, combine.size() != 0};
  if (p.has_combine) p.combine = Format::Of(combine);
  const int64_t batch = xd[0];
  if (batch * p.m * p.n == 0) return ffi::Error::Success();
  if (p.k == 0) {  // an empty contraction is +0, as the XLA path's
    std::fill(p.y, p.y + batch * p.m * p.n, 0.0f);
    return ffi::Error::Success();
  }
  // Items are claimed from a shared counter by the calling thread and by helpers scheduled on
  // XLA's pool. The caller waits only for claimed items: a helper that starts late (its pool
  // threads busy, maybe with another of these calls) finds nothing left and touches only the
  // shared state it holds. Waiting for helpers to start could deadlock.
  struct Shared {
    Problem p;
    int64_t row_blocks, panels, items;
    std::atomic<int64_t> next{0}, finished{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto shared = std::make_shared<Shared>();
  shared->p = p;
  shared->row_blocks = (p.m + kBlockRows - 1) / kBlockRows;
  shared->panels = (p.n + kCols - 1) / kCols;
  shared->items = batch * shared->row_blocks * shared->panels;
  auto work = [](Shared& st) {
    if (st.next.load() >= st.items) return;
    const unsigned csr = _mm_getcsr();
    _mm_setcsr(csr | _MM_FLUSH_ZERO_ON | _MM_DENORMALS_ZERO_ON);  // as XLA on the CPU
    float* wp = static_cast<float*>(std::aligned_alloc(64, st.p.k * kCols * sizeof(float)));
    for (int64_t t; (t = st.next.fetch_add(1)) < st.items;) {
      const int64_t j = t % st.panels, i = (t / st.panels) % st.row_blocks;
      Item(st.p, t / (st.panels * st.row_blocks), i * kBlockRows, j * kCols, wp);
      if (st.finished.fetch_add(1) + 1 == st.items) {
        std::lock_guard<std::mutex> lock(st.mu);
        st.cv.notify_all();
      }
    }
    std::free(wp);
    _mm_setcsr(csr);
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), shared->items) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([shared, work] { work(*shared); });
  work(*shared);
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->cv.wait(lock, [&] { return shared->finished.load() == shared->items; });
  return ffi::Error::Success();
}

}  // namespace

// Whether this CPU runs the kernel (AVX-512 F, DQ, BW and VL).
extern "C" int LowaccChunkDotSupported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(LowaccChunkDot, ChunkDot,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("chunk")
                                  .Attr<ffi::Span<const int64_t>>("acc")
                                  .Attr<ffi::Span<const int64_t>>("combine"));
