// Simulated GEMMs on the CPU, one XLA FFI kernel: y = the simulated dot x (B, M, K) . w (B, K, N).
//
// The chain of spec section 3, per output element, for both orders:
// - 'fma' (the paper's FMAq): p_k = Q_prod(fl32(x_k w_k)) (or fl32 without product rounding),
//   s <- Q_acc(s + p_k) taken exactly (TwoSum, then one rounding), from s = +0 in every chunk;
// - 'chunk': P = the float32 sum of the chunk's products, s = Q_acc(P);
// then the combine T <- Q_comb(T + s) taken exactly, or T + s in float32 without a combine format.
// Order 'fma' and 'chunk' with product rounding add in the order of lowacc.dot's XLA path and with
// its operations (float32_sum, two_sum, round_exact), so they give its bits on any operands.
// lowacc.dot's XLA path streams the whole M x N state through memory once per step; here each
// output tile keeps its chain in AVX-512 registers and its total in L1 for the whole contraction.
// Work items (batch, 256-row block, 32-column panel) are shared out over XLA's intra-op pool.
// A convolution's patch GEMM reads its patches from the padded input (ConvGeometry).
// A matrix unit's fused dot products (lowacc.hardware.FusedDotProduct) take their own chain,
// in integers (Fused, FusedTile).
//
// Formats (lowacc.kernels.native.supports): deterministic rounding, man_bits < 23, underflow
// 'flush' with min_exp > -126 or 'none'. With float32 subnormals flushed (FTZ/DAZ, set here as XLA
// sets them on the CPU) every nonzero sum is a float32 normal, so a rounding drops exactly
// 23 - man_bits significand bits: the fixed-mask rounding of lowacc.quantize.round_exact.
// Where lowacc.kernels.native.exact_sum proves every float32 sum of a step exact, the step skips
// TwoSum and the sticky bit (Step); elsewhere a directed acc rounding (toward_zero, up, down)
// rounds the float32 sum in its own direction instead (DirectedStep: the paper's stage 1, with
// underflow 'none', and every E5 accumulator); where lowacc.kernels.native.scaled holds (the
// paper's preset), order 'fma' carries values scaled so that flush-to-zero flushes them
// (ScaledFormat).

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

#define LOWACC_AVX512 \
  __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx512cd,fma")))

namespace {

constexpr int kRows = 8;             // rows of a register tile
constexpr int kCols = 32;            // columns: two 16-lane vectors
constexpr int64_t kBlockRows = 256;  // rows of one work item

enum Rounding : int64_t { kNearestEven = 0, kTowardZero = 1, kUp = 2, kDown = 3 };
enum Overflow : int64_t { kOverflowNone = 0, kOverflowInf = 1, kSaturate = 2 };
// Template arguments in place of a Rounding: chosen at run time (Round switches on f.rounding),
// and no product rounding; in place of an Overflow: any, handled without branches.
constexpr int64_t kAnyRounding = -1, kNoProduct = -2, kAnyOverflow = -1;
constexpr uint32_t kInfBits = 0x7F800000u;

// A format as lowacc.kernels.native encodes it:
// [man_bits, rounding, overflow, flush_below, limit, m0_parity].
struct Format {
  uint32_t dropped, mask, half, flush_below, parity;
  // Overflow without branches: a magnitude above `over` becomes big_pos or big_neg by the sign,
  // except an exact infinity where keep_inf (overflow 'inf' and 'none'). Under 'none', `over` is
  // inf's bits, which no magnitude but NaN's exceeds (and NaN is restored after).
  uint32_t over, big_pos, big_neg;
  __mmask16 keep_inf;
  bool saturate;
  bool m0;
  // A directed rounding (toward_zero, up, down) that overflows to a format limit: a step may
  // round the float32 sum in the same direction instead of taking TwoSum (DirectedStep).
  bool directed;
  int64_t rounding;

  static Format Of(ffi::Span<const int64_t> f) {
    Format r;
    r.dropped = static_cast<uint32_t>(23 - f[0]);
    r.mask = (1u << r.dropped) - 1u;
    r.half = 1u << (r.dropped - 1u);
    r.rounding = f[1];
    r.flush_below = static_cast<uint32_t>(f[3]);
    // A normal M0 result is even when its exponent code is: (a >> 23) + parity is odd then.
    r.parity = f[0] == 0 ? static_cast<uint32_t>(f[5]) : 0u;
    const uint32_t limit = static_cast<uint32_t>(f[4]);
    r.over = f[2] == kOverflowNone ? kInfBits : limit;
    r.saturate = f[2] == kSaturate;
    r.m0 = f[0] == 0;
    r.keep_inf = r.saturate ? 0 : 0xFFFF;
    r.directed = r.rounding != kNearestEven && f[2] != kOverflowNone;
    // IEEE 754's directed-rounding rule: toward_zero gives +-max_normal, `down` +max_normal for
    // positive results and `up` -max_normal for negative ones; +-max_normal under 'saturate'.
    const bool saturate = f[2] == kSaturate, tz = r.rounding == kTowardZero;
    r.big_pos = saturate || tz || r.rounding == kDown ? limit : kInfBits;
    r.big_neg = saturate || tz || r.rounding == kUp ? limit : kInfBits;
    return r;
  }
};

// v[i] <- the exact value v[i] + lo[i] (|lo| <= ulp(v) / 2) rounded once into f, for n vectors
// (with_lo=false: v[i] alone): lowacc.quantize.round_exact. kR: f.rounding, fixed at compile
// time so that the hot loops have no branches, or kAnyRounding (which also picks kSaturate where
// it applies); kO: kSaturate where f saturates and has man_bits >= 1, else kAnyOverflow.
template <int64_t kR, int64_t kO, bool with_lo, int n>
LOWACC_AVX512 inline void Round(__m512* v, const __m512* lo, const Format& f) {
  if constexpr (kR == kAnyRounding) {
    if constexpr (kO == kAnyOverflow && !with_lo) {
      if (f.saturate && !f.m0) return Round<kAnyRounding, kSaturate, with_lo, n>(v, lo, f);
    }
    switch (f.rounding) {
      case kNearestEven: return Round<kNearestEven, kO, with_lo, n>(v, lo, f);
      case kTowardZero: return Round<kTowardZero, kO, with_lo, n>(v, lo, f);
      case kUp: return Round<kUp, kO, with_lo, n>(v, lo, f);
      default: return Round<kDown, kO, with_lo, n>(v, lo, f);
    }
  } else if constexpr (kO == kSaturate && !with_lo) {
    // Saturating formats on the signed value: rounding up is a carry of an added constant out
    // of the dropped bits (as below), the `and` with `keep` truncates the magnitude and keeps the
    // sign, a masked `and` flushes to a signed zero, min and max saturate (infinities too). NaN
    // lanes take no add, so the `and` leaves them NaN: every value rounded here comes from a
    // float32 multiply or add, which quiets NaN, and man_bits >= 1 (kSaturate is only chosen
    // then) keeps the quiet bit; min and max return their NaN operand.
    const __m512 keep = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(~f.mask)));
    const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(0x80000000u)));
    const __m512 max = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(f.over)));
    const __m512 min = _mm512_or_ps(max, sign);
    const __m512i abs = _mm512_set1_epi32(0x7FFFFFFF), one = _mm512_set1_epi32(1);
    const __m512i mask = _mm512_set1_epi32(static_cast<int>(f.mask));
    const __m512i flush_below = _mm512_set1_epi32(static_cast<int>(f.flush_below));
#pragma GCC unroll 16
    for (int i = 0; i < n; ++i) {
      __m512i u = _mm512_castps_si512(v[i]);
      if constexpr (kR != kTowardZero) {
        const __mmask16 number = _mm512_cmp_ps_mask(v[i], v[i], _CMP_ORD_Q);
        if constexpr (kR == kNearestEven) {  // + half - 1 + odd
          const __mmask16 odd = _mm512_mask_test_epi32_mask(
              number, u, _mm512_set1_epi32(static_cast<int>(f.mask + 1u)));
          u = _mm512_mask_add_epi32(u, number, u,
                                    _mm512_set1_epi32(static_cast<int>(f.half - 1u)));
          u = _mm512_mask_add_epi32(u, odd, u, one);
        } else {  // + mask where the rounding is away from zero
          const __mmask16 negative = _mm512_movepi32_mask(u);
          u = _mm512_mask_add_epi32(
              u, number & (kR == kDown ? negative : static_cast<__mmask16>(~negative)), u, mask);
        }
      }
      __m512 t = _mm512_and_ps(_mm512_castsi512_ps(u), keep);
      const __mmask16 tiny =
          _mm512_cmplt_epu32_mask(_mm512_and_si512(_mm512_castps_si512(t), abs), flush_below);
      t = _mm512_mask_and_ps(t, tiny, t, sign);
      v[i] = _mm512_max_ps(min, _mm512_min_ps(max, t));
    }
  } else {
    const __m512i abs = _mm512_set1_epi32(0x7FFFFFFF), inf = _mm512_set1_epi32(kInfBits);
    const __m512i one = _mm512_set1_epi32(1), mask = _mm512_set1_epi32(static_cast<int>(f.mask));
#pragma GCC unroll 16
    for (int i = 0; i < n; ++i) {
      const __m512i u = _mm512_castps_si512(v[i]);
      __m512i a = _mm512_and_si512(u, abs);
      const __mmask16 nan = _mm512_cmpgt_epu32_mask(a, inf);
      // An exact infinity, unless lo is NaN: a finite sum beyond float32, overflowing as one.
      __mmask16 infinite = _mm512_cmpeq_epi32_mask(a, inf), sticky = 0;
      const __mmask16 negative = _mm512_movepi32_mask(u);
      if constexpr (with_lo) {
        const __m512i lu = _mm512_castps_si512(lo[i]);
        infinite &= _mm512_cmple_epu32_mask(_mm512_and_si512(lu, abs), inf);
        sticky = _mm512_test_epi32_mask(lu, abs) & _mm512_cmplt_epu32_mask(a, inf);
        // lo opposite to hi: the exact value is just below |hi|.
        const __mmask16 below = sticky & _mm512_movepi32_mask(_mm512_xor_si512(lu, u));
        a = _mm512_mask_sub_epi32(a, below, a, one);
      }
      // Rounding up is a carry out of the dropped bits rem into the kept ones (and on into the
      // exponent): nearest_even rounds up iff rem + (sticky | odd) > half, i.e. iff adding
      // half - 1 + (sticky | odd) carries; up/down round away iff rem or sticky is nonzero, i.e.
      // iff adding mask + sticky carries. An infinity has rem = 0 and odd = 0 (man_bits > 0; for
      // M0 a carry out of inf's exponent lands in the quiet bit, which mask drops).
      if constexpr (kR == kNearestEven) {
        const __m512i odd = _mm512_and_si512(
            _mm512_add_epi32(_mm512_srl_epi32(a, _mm_cvtsi32_si128(static_cast<int>(f.dropped))),
                             _mm512_set1_epi32(static_cast<int>(f.parity))), one);
        const __m512i t = with_lo ? _mm512_mask_mov_epi32(odd, sticky, one) : odd;
        const __m512i below_half = _mm512_set1_epi32(static_cast<int>(f.half - 1u));
        a = _mm512_add_epi32(_mm512_add_epi32(a, below_half), t);
      } else if constexpr (kR != kTowardZero) {
        const __mmask16 away = kR == kDown ? negative : static_cast<__mmask16>(~negative);
        a = _mm512_mask_add_epi32(a, away, a, mask);
        if constexpr (with_lo) a = _mm512_mask_add_epi32(a, away & sticky, a, one);
      }
      __m512i mag = _mm512_andnot_si512(mask, a);
      mag = _mm512_maskz_mov_epi32(
          _mm512_cmpge_epu32_mask(mag, _mm512_set1_epi32(static_cast<int>(f.flush_below))), mag);
      if constexpr (kO == kSaturate) {  // infinities too become +-max_normal
        mag = _mm512_min_epu32(mag, _mm512_set1_epi32(static_cast<int>(f.over)));
      } else {
        const __mmask16 over =
            _mm512_mask_cmpgt_epu32_mask(static_cast<__mmask16>(~(infinite & f.keep_inf)), mag,
                                         _mm512_set1_epi32(static_cast<int>(f.over)));
        const __m512i big = _mm512_mask_mov_epi32(
            _mm512_set1_epi32(static_cast<int>(f.big_pos)), negative,
            _mm512_set1_epi32(static_cast<int>(f.big_neg)));
        mag = _mm512_mask_mov_epi32(mag, over, big);
      }
      const __m512i signed_mag = _mm512_ternarylogic_epi32(u, abs, mag, 0xBA);  // sign | mag
      v[i] = _mm512_castsi512_ps(_mm512_mask_mov_epi32(signed_mag, nan, u));
    }
  }
}

// a + b as lowacc.dot.float32_sum: an exact zero sum is -0 when a and b are both -0 (or, under
// `down`, when either is negative), else +0. `fix`=false skips that where the caller has proven
// plain IEEE addition gives the same bits (see Step). kMode: the float32 addition's rounding
// (_MM_FROUND_CUR_DIRECTION: MXCSR's nearest-even; a directed one for DirectedStep).
template <int kMode = _MM_FROUND_CUR_DIRECTION>
LOWACC_AVX512 inline __m512 Sum(__m512 a, __m512 b, bool down, bool fix = true) {
  const __m512 hi = _mm512_add_round_ps(a, b, kMode);
  if (!fix) return hi;
  const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(0x80000000u)));
  const __m512 zero = _mm512_and_ps(down ? _mm512_or_ps(a, b) : _mm512_and_ps(a, b), sign);
  return _mm512_mask_mov_ps(hi, _mm512_cmpeq_ps_mask(hi, _mm512_setzero_ps()), zero);
}

// The error of hi = Sum(a, b) as lowacc.dot.two_sum computes it, operation for operation: hi + lo
// = a + b exactly; lo = 0 where a or b is infinite (the sum is exactly infinite), NaN where a
// finite sum overflowed float32 (Round overflows it as a finite value).
LOWACC_AVX512 inline __m512 SumError(__m512 a, __m512 b, __m512 hi) {
  const __m512i abs = _mm512_set1_epi32(0x7FFFFFFF), inf = _mm512_set1_epi32(kInfBits);
  const __m512 bb = _mm512_sub_ps(hi, a);
  const __m512 lo = _mm512_add_ps(_mm512_sub_ps(a, _mm512_sub_ps(hi, bb)), _mm512_sub_ps(b, bb));
  const __mmask16 infinite =
      _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(a), abs), inf) |
      _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(b), abs), inf);
  return _mm512_mask_mov_ps(lo, infinite, _mm512_setzero_ps());
}

// One accumulation step of lowacc.dot._step for n vectors: s[i] <- Q_f(s[i] + u[i]), the sum
// taken exactly and rounded once. exact: lowacc.kernels.native.exact_sum proved every float32
// sum of a value of s's format and one of u's exact, so the TwoSum error is 0 and Round needs no
// sticky bit; the sum is then also never a flushed float32 subnormal, so its zero is IEEE's
// (x + -x = +0, -0 + -0 = -0), float32_sum's sign except under `down`.
template <int64_t kR, int64_t kO, int n>
LOWACC_AVX512 inline void Step(__m512* s, const __m512* u, const Format& f, bool exact) {
  const bool down = kR == kAnyRounding ? f.rounding == kDown : kR == kDown;
  if (exact) {
#pragma GCC unroll 16
    for (int i = 0; i < n; ++i) s[i] = Sum(s[i], u[i], down, down);
    Round<kR, kO, false, n>(s, s, f);
    return;
  }
  __m512 lo[n];
#pragma GCC unroll 16
  for (int i = 0; i < n; ++i) {
    const __m512 hi = Sum(s[i], u[i], down);
    lo[i] = SumError(s[i], u[i], hi);
    s[i] = hi;
  }
  Round<kR, kO, true, n>(s, lo, f);
}

// Step for a directed rounding kR (toward_zero, up or down) of a format with f.directed: the
// float32 sum rounded in kR's direction, then rounded into f alone, without TwoSum.
// Why that is the exact rounding: a directed rounding R onto a grid G composes with the same
// directed rounding onto any grid containing G (R_G(R_F(v)) = R_G(v): R_F(v) lies between v and
// R_G(v), since R_G(v) is in F, and no point of G lies strictly between v and R_F(v)). A float32
// normal result's binade holds f's grid for that binade (man_bits <= 23), and so does every
// binade above, up to f's overflow limit, which f.directed requires to be a format limit below
// float32's: a finite sum beyond float32 rounds to float32's max (toward_zero, or away from the
// rounding's direction) or to an infinity (toward it), and Round overflows either as the exact
// sum. Sums below float32's normals are exact (every operand is a multiple of 2^-149, the sum
// below 2^-125 then fits 24 bits), flushed by FTZ to a zero that Sum's fix signs as
// float32_sum does; an exact zero sum is already signed so by IEEE 754 in a directed mode
// (x + -x is -0 only toward -inf). Infinities and NaN add exactly in every mode.
template <int64_t kR, int64_t kO, int n>
LOWACC_AVX512 inline void DirectedStep(__m512* s, const __m512* u, const Format& f) {
  static_assert(kR == kTowardZero || kR == kUp || kR == kDown);
  constexpr int kMode = (kR == kTowardZero ? _MM_FROUND_TO_ZERO
                         : kR == kUp       ? _MM_FROUND_TO_POS_INF
                                           : _MM_FROUND_TO_NEG_INF) |
                        _MM_FROUND_NO_EXC;
#pragma GCC unroll 16
  for (int i = 0; i < n; ++i) s[i] = Sum<kMode>(s[i], u[i], kR == kDown);
  Round<kR, kO, false, n>(s, s, f);
}

// The scaled path (where lowacc.kernels.native.scaled says): of order 'fma', acc and product
// toward_zero or nearest_even, flush, saturate, man_bits >= 1, min_normal at most 1, and exact
// steps (p.exact_step); of order 'chunk', the product alone (the chunk's float32 sum adds each
// product unscaled by a fused multiply-add p 2^-P + s, exactly fl32(s + p): the scaling of a
// product, a normal in its scale, is exact, and the sum's zeros are IEEE's as float32's). A value
// of a format is carried scaled by the power of two that puts the format's min_normal at
// float32's, 2^-126: the product's scale 2^P, the acc's 2^A. An operation that yields a value in
// that scale then also flushes it as the format would, by the CPU's flush-to-zero, which zeroes
// an exact result below 2^-126 and keeps its sign; so roundings need no compare for the flush.
// - toward_zero: the truncation of v is below min_normal iff v is (min_normal is a power of two
//   on the grid), so the flush may come first: the scaling multiply (for the product) or the
//   step's fused multiply-add, p 2^(A - P) + s, exact where not flushed (exact_step proves s + p
//   a float32), flushes, and an `and` truncates (scaling keeps the dropped bits).
// - nearest_even: Veltkamp's splitting c = v (2^d + 1), hi = c - (c - v) is v rounded to
//   nearest even on 24 - d significant bits (checked exhaustively for d = 23 - man_bits, every
//   man_bits from 1 to 22, both signs). With c and c - v scaled into the output's scale, the last
//   subtraction, which is exact, flushes. That is right except where c is a float32 normal and
//   c - v is not: v in [min_normal 2^-d / (1 + 2^-d), min_normal 2^-d), whose correct result is
//   a zero. The product runs it in twice its scale and then multiplies by 1/2, which flushes
//   every |hi| < 2^-125, the wrong results included. The step sums s 2^(P - A) + p in the
//   product's scale, which holds every sum down to the acc's min_normal / 2 unflushed
//   (P >= A + 1), and rounds it into the acc's scale directly: native.scaled takes this
//   only where no nonzero sum lies in that band, the smallest quantum of the two formats being
//   at least min_normal 2^-d.
// Saturation clamps the product before rounding (infinite products become finite before
// Veltkamp's splitting) and the step after it: clamping to max_normal, which lies on the grid,
// commutes with a monotone rounding. min returns v where v is NaN, and max its NaN; the `and`
// keeps a quiet NaN (man_bits >= 1). Where x and w are finite (kFinite), no product is NaN and,
// saturated, no sum is infinite or NaN: the clamp is then one range operation (abs-min with
// max_normal, v's sign), which would turn a NaN into max_normal.
struct ScaledFormat {
  float max;    // max_normal in the scale it is clamped in
  float scale;  // into the output's scale (the product's nearest_even: twice it)
  float split;  // nearest_even: Veltkamp's 2^(23 - man_bits) + 1, times scale
  uint32_t keep;

  // f's constants: max_normal scaled by 2^max_exp, scale 2^scale_exp.
  static ScaledFormat Of(const Format& f, int max_exp, int scale_exp) {
    const float scale = Pow2(scale_exp);
    return {Pow2(max_exp) * Bits(f.over), scale,
            (static_cast<float>(1u << f.dropped) + 1.0f) * scale, ~f.mask};
  }
  static float Bits(uint32_t u) {
    float v;
    std::memcpy(&v, &u, sizeof v);
    return v;
  }
  static float Pow2(int e) { return Bits(static_cast<uint32_t>(e + 127) << 23); }  // normal e
  // The exponent of f's min_normal.
  static int MinExp(const Format& f) { return static_cast<int>(f.flush_below >> 23) - 127; }
};

template <bool kFinite>
LOWACC_AVX512 inline __m512 Clamp(__m512 v, float max) {
  if constexpr (kFinite) return _mm512_range_ps(v, _mm512_set1_ps(max), 0x02);
  return _mm512_max_ps(_mm512_set1_ps(-max), _mm512_min_ps(_mm512_set1_ps(max), v));
}

// Veltkamp's c - (c - v), scaled: c = v split, then c - (c - v scale) (see ScaledFormat).
LOWACC_AVX512 inline __m512 Split(__m512 v, const ScaledFormat& f) {
  const __m512 c = _mm512_mul_ps(v, _mm512_set1_ps(f.split));
  return _mm512_sub_ps(c, _mm512_fmadd_ps(v, _mm512_set1_ps(-f.scale), c));
}

// A float32 product v rounded into the product format f, in its scale. kR: kTowardZero or
// kNearestEven.
template <int64_t kR, bool kFinite>
LOWACC_AVX512 inline __m512 ScaledProduct(__m512 v, const ScaledFormat& f) {
  v = Clamp<kFinite>(v, f.max);
  if constexpr (kR == kTowardZero) {
    return _mm512_and_ps(_mm512_mul_ps(v, _mm512_set1_ps(f.scale)),
                         _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(f.keep))));
  } else {
    return _mm512_mul_ps(Split(v, f), _mm512_set1_ps(0.5f));
  }
}

// One step s <- Q_f(s + p), s in the acc's scale, p in the product's; across: 2^(A - P)
// (toward_zero) or 2^(P - A) (nearest_even).
template <int64_t kR, bool kFinite>
LOWACC_AVX512 inline __m512 ScaledStep(__m512 s, __m512 p, __m512 across, const ScaledFormat& f) {
  __m512 t;
  if constexpr (kR == kTowardZero) {
    t = _mm512_and_ps(_mm512_fmadd_ps(p, across, s),
                      _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(f.keep))));
  } else {
    t = Split(_mm512_fmadd_ps(s, across, p), f);
  }
  return Clamp<kFinite>(t, f.max);
}

enum Order : int64_t { kOrderChunk = 0, kOrderFma = 1 };

// A matrix unit's fused dot product (lowacc.hardware.FusedDotProduct, whose doc is the semantics)
// as lowacc.kernels.native encodes it: [group, fraction_bits, e_zero, a_frac, a_min, b_frac,
// b_min, out_frac, out_min, out_max, nearest_even, c_frac, c_min, nan_bits]; a_* for x's type,
// b_* for w's. Each output's chain takes K in groups of `group` products from c = +0 (one chunk,
// no combine); x and w hold values of their input types (native.py rounds them into those).
// Everything is integer arithmetic on the float32 bits, so FTZ/DAZ does not touch it.
struct Fused {
  int64_t group;
  int f, e_zero, a_frac, a_min, b_frac, b_min, p, out_min, out_max, c_frac, c_min;
  bool nearest;
  uint32_t nan_bits;
  // Left shifts after which every term's truncation to a multiple of 2^(e_max - F) is a right
  // shift by a nonnegative count: a product's q + F - e_max is at most F - a_frac - b_frac, c's
  // at most F - c_frac (q <= e - frac for every value of a type).
  int sp, sc;

  static Fused Of(ffi::Span<const int64_t> v) {
    Fused r;
    r.group = v[0];
    int* fields[] = {&r.f, &r.e_zero, &r.a_frac, &r.a_min, &r.b_frac, &r.b_min, &r.p,
                     &r.out_min, &r.out_max};
    for (int i = 0; i < 9; ++i) *fields[i] = static_cast<int>(v[1 + i]);
    r.nearest = v[10] != 0;
    r.c_frac = static_cast<int>(v[11]);
    r.c_min = static_cast<int>(v[12]);
    r.nan_bits = static_cast<uint32_t>(v[13]);
    r.sp = std::max(r.f - r.a_frac - r.b_frac, 0);
    r.sc = std::max(r.f - r.c_frac, 0);
    return r;
  }
};

constexpr uint32_t kAbs = 0x7FFFFFFFu, kSign = 0x80000000u;
// An exponent below every product's, for a zero operand: its products never set e_max.
constexpr int32_t kNoExponent = -(1 << 20);

// A value of a type with `frac` fraction bits and smallest normal exponent emin, from its float32
// bits u (finite): |v| = m 2^q, e = max(floor(log2 |v|), emin), or e_zero for a zero
// (hardware.py's _decompose).
struct Term {
  uint32_t m;
  int32_t q, e;
  static Term Of(uint32_t u, int frac, int emin, int32_t e_zero) {
    const uint32_t a = u & kAbs;
    const int32_t biased = static_cast<int32_t>(a >> 23), drop = 23 - frac;
    const uint32_t m24 = biased ? (a & 0x7FFFFFu) | 0x800000u : a;
    return {m24 >> drop, std::max(biased, 1) - 150 + drop,
            a == 0 ? e_zero : std::max(biased - 127, emin)};
  }
};

inline uint32_t Shift(uint32_t m, int k) {  // m 2^k truncated toward zero
  return k >= 0 ? m << std::min(k, 31) : m >> std::min(-k, 31);
}

inline int BitLength(uint32_t v) { return v ? 32 - __builtin_clz(v) : 0; }

// The float32 bits of |total 2^base| rounded into f's output type (hardware.py's _round, then
// overflow to inf); 0 where it rounds to zero.
inline uint32_t FusedMagnitude(uint32_t total, int base, const Fused& f) {
  if (total == 0) return 0;
  const int quantum = std::max(base + BitLength(total) - 1, f.out_min) - f.p;
  const int drop = quantum - base;
  uint32_t r;
  if (drop <= 0) {
    r = total << std::min(-drop, 31);
  } else {
    const int d = std::min(drop, 32);
    r = d >= 32 ? 0 : total >> d;
    if (f.nearest) {
      const uint32_t rem = d >= 32 ? total : total & ((1u << d) - 1u), half = 1u << (d - 1);
      r += rem > half || (rem == half && (r & 1u));
    }
  }
  if (r == 0) return 0;
  const int lead = quantum + BitLength(r) - 1;
  if (lead > f.out_max) return kInfBits;
  if (lead < -126) return r << std::clamp(quantum + 149, 0, 31);
  const float v = static_cast<float>(r);
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return bits + (static_cast<uint32_t>(quantum) << 23);
}

// FusedDotProduct.step for one output with any operands, infinities and NaN included: c (float32
// bits) fused with the n products x[kk] w[kk * ws], kk < n, and group - n zero products.
uint32_t FusedStep(uint32_t c, const float* x, const float* w, int64_t ws, int64_t n,
                   const Fused& f) {
  const auto bits = [](const float* v) {
    uint32_t u;
    std::memcpy(&u, v, sizeof u);
    return u;
  };
  const auto finite = [](uint32_t u) { return (u & kAbs) < kInfBits ? u : 0u; };
  bool pinf = c == kInfBits, ninf = c == (kInfBits | kSign), nan = (c & kAbs) > kInfBits;
  const uint32_t cf = finite(c);
  const Term tc = Term::Of(cf, f.c_frac, f.c_min, f.e_zero);
  int32_t e_max = n < f.group ? std::max(tc.e, f.e_zero) : tc.e;
  for (int64_t kk = 0; kk < n; ++kk) {
    const uint32_t xu = bits(x + kk), wu = bits(w + kk * ws), xa = xu & kAbs, wa = wu & kAbs;
    const bool prod_nan = xa > kInfBits || wa > kInfBits || (xa == kInfBits && wa == 0) ||
                          (xa == 0 && wa == kInfBits);
    if (!prod_nan && (xa == kInfBits || wa == kInfBits)) ((xu ^ wu) & kSign ? ninf : pinf) = true;
    nan |= prod_nan;
    const Term tx = Term::Of(finite(xu), f.a_frac, f.a_min, f.e_zero);
    const Term tw = Term::Of(finite(wu), f.b_frac, f.b_min, f.e_zero);
    e_max = std::max(e_max, tx.m * tw.m == 0 ? f.e_zero : tx.e + tw.e);
  }
  uint32_t pos = 0, neg = 0;
  (cf & kSign ? neg : pos) += Shift(tc.m, tc.q + f.f - e_max);
  for (int64_t kk = 0; kk < n; ++kk) {
    const uint32_t xu = bits(x + kk), wu = bits(w + kk * ws);
    const Term tx = Term::Of(finite(xu), f.a_frac, f.a_min, f.e_zero);
    const Term tw = Term::Of(finite(wu), f.b_frac, f.b_min, f.e_zero);
    ((xu ^ wu) & kSign ? neg : pos) += Shift(tx.m * tw.m, tx.q + tw.q + f.f - e_max);
  }
  const bool negative = neg > pos;
  const uint32_t mag = FusedMagnitude(negative ? neg - pos : pos - neg, e_max - f.f, f);
  uint32_t out = mag ? mag | (negative ? kSign : 0u) : 0u;
  if (pinf) out = kInfBits;
  else if (ninf) out = kInfBits | kSign;
  return nan || (pinf && ninf) ? f.nan_bits : out;
}


struct Problem;
using TileFn = void (*)(const Problem&, const float*, const float*, float*, int, int);

// A convolution's patch GEMM read from its padded input (N, Hp, Wp, C) instead of im2col
// patches: patch m = (n, ho, wo) of group b starts at ((n Hp + ho sh) Wp + wo sw) C + b cg,
// and its elements kk = (i, j, c), in the patch's (kernel row, kernel column, channel) order,
// are runs of cg channels, tap (i, j)'s (i dh Wp + j dw) C further on (Problem::taps). The
// patches are x's rows (kPatchesX: Item copies a tile's rows into a dense block), or w's columns
// (kPatchesW: y^T = kernel^T patches^T, for a few output channels per group; Item packs them).
struct ConvGeometry {
  int64_t hp, wp, c, cg, kh, kw, sh, sw, dh, dw, ho, wo;
};
enum Operands { kDense, kPatchesX, kPatchesW };

struct Problem {
  const float* x;
  const float* w;
  float* y;
  int64_t m, k, n, chunk;
  Operands operands;  // which operand, if any, is a padded convolution input (geometry)
  ConvGeometry geometry;
  const int64_t* taps;  // tap t's run of cg channels lies taps[t] past the patch's start
  Format acc, product, combine;
  Fused fused;  // the fused dot-product kind (is_fused)
  bool fma, has_product, has_combine, exact_step, exact_combine, scaled, is_fused;
  bool scaled_total;  // order 'chunk': s and the combine's total in the acc's scale (Tile)
  bool finite;  // x and w finite (set where scaled or is_fused)
  TileFn tile;    // the Tile instance for this problem (TileFor)
  int tile_rows;  // its rows
  // The scaled path (scaled; SetScaled): the product's constants, from float32 into its scale; the
  // acc's, in its scale; the step's `across` and the acc's scale back to float32.
  // scaled_total: the acc's constants and `across`, from float32 into its scale.
  ScaledFormat scaled_product, scaled_acc;
  float across, unscale;  // unscale: the chain's scale (the acc's; order 'chunk': the product's)

  // The start of patch m of group b in the padded input `input`.
  const float* Patch(const float* input, int64_t b, int64_t m) const {
    const ConvGeometry& g = geometry;
    const int64_t wo = m % g.wo, ho = m / g.wo % g.ho, n = m / (g.wo * g.ho);
    return input + ((n * g.hp + ho * g.sh) * g.wp + wo * g.sw) * g.c + b * g.cg;
  }
};

// The scaled path's constants (lowacc.kernels.native.scaled and scaled_total decide where they
// apply).
void SetScaled(Problem& p) {
  if (p.scaled_total) {
    const int a = -126 - ScaledFormat::MinExp(p.acc);
    p.scaled_acc = ScaledFormat::Of(p.acc, a, 0);
    p.across = ScaledFormat::Pow2(a);
  }
  if (!p.scaled) return;
  const int q = -126 - ScaledFormat::MinExp(p.product);  // the product's scale 2^P
  p.scaled_product = ScaledFormat::Of(p.product, 0, q + (p.product.rounding == kNearestEven));
  p.unscale = ScaledFormat::Pow2(-q);
  if (!p.fma) return;  // order 'chunk': its acc rounds the chunk sums in Tile
  const int a = -126 - ScaledFormat::MinExp(p.acc);  // the acc's scale 2^A
  p.scaled_acc = ScaledFormat::Of(p.acc, a, a - q);
  p.across = ScaledFormat::Pow2(p.acc.rounding == kNearestEven ? q - a : a - q);
  p.unscale = ScaledFormat::Pow2(-a);
}

// How an order 'fma' step adds (Inner): the float32 sum alone where p.exact_step, the float32
// sum in the acc's direction where p.acc.directed (DirectedStep), else TwoSum.
enum StepKind { kTwoSum, kExactSum, kDirectedSum };

// The inner chains of one chunk, products k0 .. k1 - 1, in c (2R vectors). kStep: the StepKind
// (order 'fma'), fixed here so that the loop has no branch (about 12% faster than testing it per
// row). kScaled: the scaled path (ScaledFormat), c in the acc's scale; kFinite: its operands
// are finite.
template <int R, bool kFma, int64_t kAccR, int64_t kAccO, int64_t kProdR, int64_t kProdO,
          StepKind kStep, bool kScaled, bool kFinite>
LOWACC_AVX512 __attribute__((always_inline)) inline void Inner(
    const Problem& p, const float* const* xr, const float* wp, __m512* c, int64_t k0,
    int64_t k1) {
  const __m512 across = _mm512_set1_ps(p.across), unscale = _mm512_set1_ps(p.unscale);
  for (int64_t kk = k0; kk < k1; ++kk) {
    const __m512 w0 = _mm512_load_ps(wp + kk * kCols), w1 = _mm512_load_ps(wp + kk * kCols + 16);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {  // a row (two vectors) at a time: few live mask registers
      const __m512 xv = _mm512_set1_ps(xr[r][kk]);
      if constexpr (kScaled) {
        const __m512 u0 = ScaledProduct<kProdR, kFinite>(_mm512_mul_ps(xv, w0), p.scaled_product);
        const __m512 u1 = ScaledProduct<kProdR, kFinite>(_mm512_mul_ps(xv, w1), p.scaled_product);
        if constexpr (kFma) {
          c[2 * r] = ScaledStep<kAccR, kFinite>(c[2 * r], u0, across, p.scaled_acc);
          c[2 * r + 1] = ScaledStep<kAccR, kFinite>(c[2 * r + 1], u1, across, p.scaled_acc);
        } else {
          c[2 * r] = _mm512_fmadd_ps(u0, unscale, c[2 * r]);
          c[2 * r + 1] = _mm512_fmadd_ps(u1, unscale, c[2 * r + 1]);
        }
        continue;
      }
      if constexpr (!kFma && kProdR == kNoProduct) {
        c[2 * r] = _mm512_fmadd_ps(xv, w0, c[2 * r]);
        c[2 * r + 1] = _mm512_fmadd_ps(xv, w1, c[2 * r + 1]);
        continue;
      }
      __m512 u[2] = {_mm512_mul_ps(xv, w0), _mm512_mul_ps(xv, w1)};  // p_k of _Chain.products
      if constexpr (kProdR != kNoProduct) Round<kProdR, kProdO, false, 2>(u, u, p.product);
      if constexpr (kFma && kStep == kDirectedSum) {
        DirectedStep<kAccR, kAccO, 2>(c + 2 * r, u, p.acc);
      } else if constexpr (kFma) {
        Step<kAccR, kAccO, 2>(c + 2 * r, u, p.acc, kStep == kExactSum);
      } else {
        c[2 * r] = _mm512_add_ps(c[2 * r], u[0]);
        c[2 * r + 1] = _mm512_add_ps(c[2 * r + 1], u[1]);
      }
    }
  }
}

// One rows x kCols tile (rows <= R): x (rows, k) with row stride p.k, the packed columns wp
// (k x kCols). Each chunk's inner chain keeps its 2R vectors in registers: order 'chunk' sums
// the products in float32 (fused multiply-adds without product rounding) and rounds the partial
// once; order 'fma' takes one Step per product. The combine chain's total stays in L1.
// kAccR, kAccO, kProdR, kProdO: the roundings and overflows of acc (order 'fma') and product,
// fixed for the inner loop; kScaled: the scaled path (p.scaled), kFinite: with finite operands;
// kScaledTotal: order 'chunk''s roundings s = Q_acc(+0 + P) and T <- Q_acc(T + s) in the acc's
// scale (p.scaled_total), each one ScaledStep: toward_zero, the sums exact where not flushed
// (native.scaled_total), float32_sum(+0, P) the fused multiply-add P 2^A + +0; T is unscaled
// once, at the end.
template <int R, bool kFma, int64_t kAccR, int64_t kAccO, int64_t kProdR, int64_t kProdO,
          bool kScaled = false, bool kFinite = false, bool kScaledTotal = false>
LOWACC_AVX512 void Tile(const Problem& p, const float* x, const float* wp, float* y, int rows,
                        int cols) {
  constexpr int kVectors = 2 * R;
  const float* xr[R];
  // (Computed here from x, not read from elsewhere: the chains then stay in registers.)
  for (int r = 0; r < R; ++r) xr[r] = x + std::min(r, rows - 1) * p.k;
  alignas(64) float total[R][kCols] = {};
  for (int64_t k0 = 0; k0 < p.k; k0 += p.chunk) {
    const int64_t k1 = std::min(p.k, k0 + p.chunk);
    __m512 c[kVectors];
#pragma GCC unroll 16
    for (int i = 0; i < kVectors; ++i) c[i] = _mm512_setzero_ps();
    constexpr bool kDirected = kFma && (kAccR == kTowardZero || kAccR == kUp || kAccR == kDown);
    if constexpr (kScaled) {
      Inner<R, kFma, kAccR, kAccO, kProdR, kProdO, kExactSum, true, kFinite>(p, xr, wp, c, k0,
                                                                             k1);
      if constexpr (kFma) {
#pragma GCC unroll 16
        for (int i = 0; i < kVectors; ++i) c[i] = _mm512_mul_ps(c[i], _mm512_set1_ps(p.unscale));
      }
    } else if (kFma && p.exact_step) {
      Inner<R, kFma, kAccR, kAccO, kProdR, kProdO, kExactSum, false, false>(p, xr, wp, c, k0, k1);
    } else if (kDirected && p.acc.directed) {
      Inner<R, kFma, kAccR, kAccO, kProdR, kProdO, kDirected ? kDirectedSum : kTwoSum, false,
            false>(p, xr, wp, c, k0, k1);
    } else {
      Inner<R, kFma, kAccR, kAccO, kProdR, kProdO, kTwoSum, false, false>(p, xr, wp, c, k0, k1);
    }
    if constexpr (kScaledTotal) {
      const __m512 into = _mm512_set1_ps(p.across), one = _mm512_set1_ps(1.0f);
#pragma GCC unroll 16
      for (int i = 0; i < kVectors; ++i) {
        float* t = &total[0][0] + 16 * i;
        const __m512 s = ScaledStep<kTowardZero, false>(_mm512_setzero_ps(), c[i], into,
                                                        p.scaled_acc);
        _mm512_store_ps(t, ScaledStep<kTowardZero, false>(_mm512_load_ps(t), s, one,
                                                          p.scaled_acc));
      }
      continue;
    }
    constexpr int kGroup = 4;  // vectors rounded together: their dependency chains overlap
#pragma GCC unroll 16
    for (int g = 0; g < kVectors; g += kGroup) {
      __m512* s = c + g;
      if constexpr (!kFma) {
        // s = Q_acc(P), P summed from +0: float32_sum(+0, P), whose zero is +0, is IEEE's
        // +0 + P (P is a float32 normal or a zero, so the sum is never a flushed subnormal).
#pragma GCC unroll 16
        for (int i = 0; i < kGroup; ++i) s[i] = Sum(_mm512_setzero_ps(), s[i], false, false);
        Round<kAnyRounding, kAnyOverflow, false, kGroup>(s, s, p.acc);
      }
      float* t = &total[0][0] + 16 * g;
      __m512 ts[kGroup];
#pragma GCC unroll 16
      for (int i = 0; i < kGroup; ++i) ts[i] = _mm512_load_ps(t + 16 * i);
      if (p.has_combine) {
        Step<kAnyRounding, kAnyOverflow, kGroup>(ts, s, p.combine, p.exact_combine);
      } else {
#pragma GCC unroll 16
        for (int i = 0; i < kGroup; ++i) ts[i] = Sum(ts[i], s[i], false);
      }
#pragma GCC unroll 16
      for (int i = 0; i < kGroup; ++i) _mm512_store_ps(t + 16 * i, ts[i]);
    }
  }
  if constexpr (kScaledTotal) {
    const float unscale = 1.0f / p.across;  // a power of two
    for (int r = 0; r < rows; ++r)
      for (int j = 0; j < cols; ++j) y[r * p.n + j] = total[r][j] * unscale;
    return;
  }
  for (int r = 0; r < rows; ++r) std::memcpy(y + r * p.n, total[r], cols * sizeof(float));
}

// The Tile instance of order 'chunk' with R rows, with or without p.scaled_total.
template <int R, int64_t kProdR, int64_t kProdO, bool kScaled = false, bool kFinite = false>
void TileForChunk(Problem& p) {
  p.tile_rows = R;
  p.tile = p.scaled_total
               ? &Tile<R, false, kAnyRounding, kAnyOverflow, kProdR, kProdO, kScaled, kFinite, true>
               : &Tile<R, false, kAnyRounding, kAnyOverflow, kProdR, kProdO, kScaled, kFinite>;
}

// The Tile instance for p's order, roundings and overflows: 8 rows for 'chunk' without product
// rounding (16 partials and two w vectors fill the registers), 4 where roundings need room.
template <int64_t kProdR, int64_t kProdO, int64_t kAccR>
void TileForAcc(Problem& p) {
  p.tile = p.acc.saturate && !p.acc.m0 ? &Tile<kRows / 2, true, kAccR, kSaturate, kProdR, kProdO>
                          : &Tile<kRows / 2, true, kAccR, kAnyOverflow, kProdR, kProdO>;
}

template <int64_t kProdR, int64_t kProdO>
void TileForProduct(Problem& p) {
  if (!p.fma) return TileForChunk<kRows / 2, kProdR, kProdO>(p);
  p.tile_rows = kRows / 2;
  switch (p.acc.rounding) {
    case kNearestEven: return TileForAcc<kProdR, kProdO, kNearestEven>(p);
    case kTowardZero: return TileForAcc<kProdR, kProdO, kTowardZero>(p);
    case kUp: return TileForAcc<kProdR, kProdO, kUp>(p);
    default: return TileForAcc<kProdR, kProdO, kDown>(p);
  }
}

template <int64_t kProdR>
void TileForProductRounding(Problem& p) {
  if (p.product.saturate && !p.product.m0) return TileForProduct<kProdR, kSaturate>(p);
  TileForProduct<kProdR, kAnyOverflow>(p);
}

template <int64_t kProdR, bool kFinite>
void TileForScaled(Problem& p) {
  // A product's 5 operations leave room for 8 rows, as without products.
  if (!p.fma) return TileForChunk<kRows, kProdR, kSaturate, true, kFinite>(p);
  p.tile_rows = kRows / 2;
  p.tile = p.acc.rounding == kTowardZero
               ? &Tile<kRows / 2, true, kTowardZero, kSaturate, kProdR, kSaturate, true, kFinite>
               : &Tile<kRows / 2, true, kNearestEven, kSaturate, kProdR, kSaturate, true, kFinite>;
}

template <int64_t kProdR>
void TileForScaledProduct(Problem& p) {
  if (p.finite) return TileForScaled<kProdR, true>(p);
  TileForScaled<kProdR, false>(p);
}

// Whether the n floats at v are all finite.
LOWACC_AVX512 bool AllFinite(const float* v, int64_t n) {
  const __m512i inf = _mm512_set1_epi32(kInfBits);
  __mmask16 special = 0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i u = _mm512_loadu_si512(v + i);
    special |= _mm512_cmpeq_epi32_mask(_mm512_and_si512(u, inf), inf);
  }
  const __m512i u = _mm512_maskz_loadu_epi32(static_cast<__mmask16>((1u << (n - i)) - 1u), v + i);
  special |= _mm512_cmpeq_epi32_mask(_mm512_and_si512(u, inf), inf);
  return special == 0;
}

void TileFor(Problem& p) {
  SetScaled(p);
  if (p.scaled) {
    return p.product.rounding == kTowardZero ? TileForScaledProduct<kTowardZero>(p)
                                             : TileForScaledProduct<kNearestEven>(p);
  }
  if (!p.has_product && !p.fma) return TileForChunk<kRows, kNoProduct, kAnyOverflow>(p);
  switch (p.has_product ? p.product.rounding : kNoProduct) {
    case kNoProduct: return TileForProduct<kNoProduct, kAnyOverflow>(p);
    case kNearestEven: return TileForProductRounding<kNearestEven>(p);
    case kTowardZero: return TileForProductRounding<kTowardZero>(p);
    case kUp: return TileForProductRounding<kUp>(p);
    default: return TileForProductRounding<kDown>(p);
  }
}

// The fused chain of a rows x cols tile by FusedStep, one output at a time: where an operand is
// an infinity or a NaN (p.finite false).
void FusedTileAnyOperands(const Problem& p, const float* x, const float* wp, float* y, int rows,
                          int cols) {
  const Fused& f = p.fused;
  for (int r = 0; r < rows; ++r) {
    for (int j = 0; j < cols; ++j) {
      uint32_t s = 0;
      for (int64_t k0 = 0; k0 < p.k; k0 += f.group)
        s = FusedStep(s, x + r * p.k + k0, wp + k0 * kCols + j, kCols,
                      std::min(f.group, p.k - k0), f);
      std::memcpy(y + r * p.n + j, &s, sizeof s);
    }
  }
}

// The operands of the vector fused chain, decomposed once: a panel of w (Item: k x kCols) and a
// tile's rows of x (kFusedRows x k). A zero operand's exponent is kNoExponent; `zero` marks the
// groups where an operand is zero, whose zero products bring e_zero into e_max (a short last
// group counts, its padding being zero products).
constexpr int kFusedRows = 4;
struct FusedPanel {  // per column lane: m << sp, q, e; per group a zero mask of each vector
  int32_t *m, *q, *e;
  __mmask16 (*negative)[2][2];  // [kk][x's sign][vector]: lanes where the product is negative
  __mmask16 (*zero)[2];
};
struct FusedRows {
  int32_t *m, *q, *e;  // [r * k + kk]
  uint8_t* negative;
  __mmask16* zero;  // [r * groups + g]: 0 or 0xFFFF
};

// Term::Of for 16 lanes, but kNoExponent for a zero.
LOWACC_AVX512 inline void DecomposeV(__m512i u, int frac, int emin, __m512i* m, __m512i* q,
                                     __m512i* e) {
  const __m512i a = _mm512_and_si512(u, _mm512_set1_epi32(static_cast<int>(kAbs)));
  const __m512i biased = _mm512_srli_epi32(a, 23);
  const __m512i m24 = _mm512_mask_mov_epi32(
      a, _mm512_cmpgt_epi32_mask(biased, _mm512_setzero_si512()),
      _mm512_or_si512(_mm512_and_si512(a, _mm512_set1_epi32(0x7FFFFF)),
                      _mm512_set1_epi32(0x800000)));
  const int drop = 23 - frac;
  *m = _mm512_srl_epi32(m24, _mm_cvtsi32_si128(drop));
  *q = _mm512_add_epi32(_mm512_max_epi32(biased, _mm512_set1_epi32(1)),
                        _mm512_set1_epi32(drop - 150));
  *e = _mm512_mask_mov_epi32(
      _mm512_max_epi32(_mm512_sub_epi32(biased, _mm512_set1_epi32(127)), _mm512_set1_epi32(emin)),
      _mm512_cmpeq_epi32_mask(a, _mm512_setzero_si512()), _mm512_set1_epi32(kNoExponent));
}

LOWACC_AVX512 void DecomposePanel(const Problem& p, const float* wp, const FusedPanel& d) {
  const Fused& f = p.fused;
  const int64_t groups = (p.k + f.group - 1) / f.group;
  for (int64_t g = 0; g < groups; ++g) {
    const bool short_group = (g + 1) * f.group > p.k;
    d.zero[g][0] = d.zero[g][1] = short_group ? 0xFFFF : 0;
  }
  for (int64_t kk = 0; kk < p.k; ++kk) {
    for (int v = 0; v < 2; ++v) {
      const __m512i u = _mm512_load_si512(wp + kk * kCols + 16 * v);
      __m512i m, q, e;
      DecomposeV(u, f.b_frac, f.b_min, &m, &q, &e);
      const int64_t at = kk * kCols + 16 * v;
      _mm512_store_si512(d.m + at, _mm512_sll_epi32(m, _mm_cvtsi32_si128(f.sp)));
      _mm512_store_si512(d.q + at, q);
      _mm512_store_si512(d.e + at, e);
      const __mmask16 negative = _mm512_movepi32_mask(u);
      d.negative[kk][0][v] = negative;
      d.negative[kk][1][v] = static_cast<__mmask16>(~negative);
      d.zero[kk / f.group][v] |= _mm512_cmpeq_epi32_mask(m, _mm512_setzero_si512());
    }
  }
}

LOWACC_AVX512 void DecomposeRows(const Problem& p, const float* x, int rows, const FusedRows& d) {
  const Fused& f = p.fused;
  const int64_t groups = (p.k + f.group - 1) / f.group;
  for (int r = 0; r < kFusedRows; ++r) {
    const float* row = x + std::min(r, rows - 1) * p.k;
    for (int64_t g = 0; g < groups; ++g) d.zero[r * groups + g] = 0;
    for (int64_t k0 = 0; k0 < p.k; k0 += 16) {
      const __mmask16 lanes = p.k - k0 >= 16 ? 0xFFFF : (1u << (p.k - k0)) - 1u;
      const __m512i u = _mm512_maskz_loadu_epi32(lanes, row + k0);
      __m512i m, q, e;
      DecomposeV(u, f.a_frac, f.a_min, &m, &q, &e);
      const int64_t at = r * p.k + k0;
      _mm512_mask_storeu_epi32(d.m + at, lanes, m);
      _mm512_mask_storeu_epi32(d.q + at, lanes, q);
      _mm512_mask_storeu_epi32(d.e + at, lanes, e);
      const __mmask16 negative = _mm512_movepi32_mask(u);
      const __mmask16 zero = _mm512_cmpeq_epi32_mask(m, _mm512_setzero_si512()) & lanes;
      for (int i = 0; i < 16 && k0 + i < p.k; ++i) {
        d.negative[at + i] = (negative >> i) & 1;
        if ((zero >> i) & 1) d.zero[r * groups + (k0 + i) / f.group] = 0xFFFF;
      }
    }
  }
}

// |total 2^base| rounded into f's output type for 16 lanes (FusedMagnitude), signed by
// `negative`; +0 where it rounds to zero.
LOWACC_AVX512 inline __m512i FusedRoundV(__m512i total, __m512i base, __mmask16 negative,
                                         const Fused& f) {
  const __m512i one = _mm512_set1_epi32(1), zero = _mm512_setzero_si512();
  const __m512i bits32 = _mm512_set1_epi32(32);
  const __m512i length = _mm512_sub_epi32(bits32, _mm512_lzcnt_epi32(total));
  const __m512i quantum = _mm512_sub_epi32(
      _mm512_max_epi32(_mm512_add_epi32(base, _mm512_sub_epi32(length, one)),
                       _mm512_set1_epi32(f.out_min)),
      _mm512_set1_epi32(f.p));
  const __m512i drop = _mm512_sub_epi32(quantum, base);
  const __mmask16 left = _mm512_cmple_epi32_mask(drop, zero);
  const __m512i d = _mm512_min_epi32(_mm512_max_epi32(drop, zero), bits32);
  __m512i r = _mm512_srlv_epi32(total, d);  // a count of 32 gives 0
  if (f.nearest) {
    const __m512i rem = _mm512_and_si512(total, _mm512_sub_epi32(_mm512_sllv_epi32(one, d), one));
    const __m512i half = _mm512_sllv_epi32(one, _mm512_sub_epi32(d, one));
    const __mmask16 up = _mm512_mask_cmpgt_epu32_mask(static_cast<__mmask16>(~left), rem, half) |
                         (_mm512_mask_cmpeq_epi32_mask(static_cast<__mmask16>(~left), rem, half) &
                          _mm512_test_epi32_mask(r, one));
    r = _mm512_mask_add_epi32(r, up, r, one);
  }
  r = _mm512_mask_mov_epi32(r, left, _mm512_sllv_epi32(total, _mm512_sub_epi32(zero, drop)));
  const __m512i lead = _mm512_sub_epi32(
      _mm512_add_epi32(quantum, _mm512_sub_epi32(bits32, _mm512_lzcnt_epi32(r))), one);
  __m512i mag = _mm512_add_epi32(_mm512_castps_si512(_mm512_cvtepu32_ps(r)),
                                 _mm512_slli_epi32(quantum, 23));
  const __m512i subnormal = _mm512_sllv_epi32(
      r, _mm512_min_epi32(_mm512_max_epi32(_mm512_add_epi32(quantum, _mm512_set1_epi32(149)),
                                           zero),
                          _mm512_set1_epi32(31)));
  mag = _mm512_mask_mov_epi32(mag, _mm512_cmplt_epi32_mask(lead, _mm512_set1_epi32(-126)),
                              subnormal);
  mag = _mm512_mask_mov_epi32(mag, _mm512_cmpgt_epi32_mask(lead, _mm512_set1_epi32(f.out_max)),
                              _mm512_set1_epi32(static_cast<int>(kInfBits)));
  mag = _mm512_mask_or_epi32(mag, negative, mag, _mm512_set1_epi32(static_cast<int>(kSign)));
  return _mm512_maskz_mov_epi32(_mm512_test_epi32_mask(r, r), mag);
}

// The fused chain of a tile of finite operands (p.finite): kFusedRows rows x kCols, 8 output
// vectors, each group in two passes over its products: e_max, then the truncated sums. The
// running c stays in L1 (`total`); it can be an infinity only by an overflow, and then stays it.
LOWACC_AVX512 void FusedTile(const Problem& p, const FusedRows& xd, const FusedPanel& wd,
                             float* y, int rows, int cols) {
  constexpr int R = kFusedRows, kVectors = 2 * R;
  const Fused& f = p.fused;
  const int64_t groups = (p.k + f.group - 1) / f.group;
  alignas(64) uint32_t total[R][kCols] = {};
  const __m512i e_zero = _mm512_set1_epi32(f.e_zero), abs = _mm512_set1_epi32(kAbs);
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t k0 = g * f.group, k1 = std::min(p.k, k0 + f.group);
    __m512i base[kVectors];  // e_max, then e_max + sp - F: a product's count is base - q
#pragma GCC unroll 16
    for (int i = 0; i < kVectors; ++i) {
      const __m512i s = _mm512_load_si512(&total[0][0] + 16 * i);
      __m512i m, q, e;
      DecomposeV(s, f.c_frac, f.c_min, &m, &q, &e);
      // A zero c is a zero term (e_zero), as an infinite one is read.
      base[i] = _mm512_mask_mov_epi32(
          e, _mm512_cmpeq_epi32_mask(e, _mm512_set1_epi32(kNoExponent)) |
                 _mm512_cmpeq_epi32_mask(_mm512_and_si512(s, abs),
                                         _mm512_set1_epi32(static_cast<int>(kInfBits))),
          e_zero);
    }
    for (int64_t kk = k0; kk < k1; ++kk) {
      const __m512i e0 = _mm512_load_si512(wd.e + kk * kCols);
      const __m512i e1 = _mm512_load_si512(wd.e + kk * kCols + 16);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m512i ex = _mm512_set1_epi32(xd.e[r * p.k + kk]);
        base[2 * r] = _mm512_max_epi32(base[2 * r], _mm512_add_epi32(ex, e0));
        base[2 * r + 1] = _mm512_max_epi32(base[2 * r + 1], _mm512_add_epi32(ex, e1));
      }
    }
    __m512i all[kVectors], neg[kVectors];
#pragma GCC unroll 16
    for (int i = 0; i < kVectors; ++i) {
      const __mmask16 zero = wd.zero[g][i % 2] | xd.zero[(i / 2) * groups + g];
      base[i] = _mm512_mask_max_epi32(base[i], zero, base[i], e_zero);
      // c's term: m 2^(q + F - e_max), truncated; an infinite c is read as a zero.
      const __m512i s = _mm512_load_si512(&total[0][0] + 16 * i);
      const __m512i cf = _mm512_maskz_mov_epi32(
          _mm512_cmplt_epu32_mask(_mm512_and_si512(s, abs),
                                  _mm512_set1_epi32(static_cast<int>(kInfBits))), s);
      __m512i m, q, e;
      DecomposeV(cf, f.c_frac, f.c_min, &m, &q, &e);
      const __m512i count = _mm512_sub_epi32(
          _mm512_add_epi32(base[i], _mm512_set1_epi32(f.sc - f.f)), q);
      all[i] = _mm512_srlv_epi32(_mm512_sll_epi32(m, _mm_cvtsi32_si128(f.sc)), count);
      neg[i] = _mm512_maskz_mov_epi32(_mm512_movepi32_mask(cf), all[i]);
      base[i] = _mm512_add_epi32(base[i], _mm512_set1_epi32(f.sp - f.f));
    }
    for (int64_t kk = k0; kk < k1; ++kk) {
      const __m512i m0 = _mm512_load_si512(wd.m + kk * kCols);
      const __m512i m1 = _mm512_load_si512(wd.m + kk * kCols + 16);
      const __m512i q0 = _mm512_load_si512(wd.q + kk * kCols);
      const __m512i q1 = _mm512_load_si512(wd.q + kk * kCols + 16);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const int64_t at = r * p.k + kk;
        const __m512i mx = _mm512_set1_epi32(xd.m[at]), qx = _mm512_set1_epi32(xd.q[at]);
        const __mmask16* negative = wd.negative[kk][xd.negative[at]];
        // m 2^(q + F - e_max), truncated: (m << sp) >> (base - q), base = e_max + sp - F.
        const __m512i t0 = _mm512_srlv_epi32(
            _mm512_mullo_epi32(mx, m0), _mm512_sub_epi32(base[2 * r], _mm512_add_epi32(qx, q0)));
        const __m512i t1 = _mm512_srlv_epi32(
            _mm512_mullo_epi32(mx, m1),
            _mm512_sub_epi32(base[2 * r + 1], _mm512_add_epi32(qx, q1)));
        all[2 * r] = _mm512_add_epi32(all[2 * r], t0);
        all[2 * r + 1] = _mm512_add_epi32(all[2 * r + 1], t1);
        neg[2 * r] = _mm512_mask_add_epi32(neg[2 * r], negative[0], neg[2 * r], t0);
        neg[2 * r + 1] = _mm512_mask_add_epi32(neg[2 * r + 1], negative[1], neg[2 * r + 1], t1);
      }
    }
#pragma GCC unroll 16
    for (int i = 0; i < kVectors; ++i) {
      const __m512i pos = _mm512_sub_epi32(all[i], neg[i]);
      const __mmask16 negative = _mm512_cmpgt_epu32_mask(neg[i], pos);
      const __m512i sum = _mm512_mask_sub_epi32(_mm512_sub_epi32(pos, neg[i]), negative, neg[i],
                                                pos);
      const __m512i out = FusedRoundV(
          sum, _mm512_sub_epi32(base[i], _mm512_set1_epi32(f.sp)), negative, f);
      uint32_t* t = &total[0][0] + 16 * i;
      const __m512i s = _mm512_load_si512(t);
      _mm512_store_si512(t, _mm512_mask_mov_epi32(
          out, _mm512_cmpeq_epi32_mask(_mm512_and_si512(s, abs),
                                       _mm512_set1_epi32(static_cast<int>(kInfBits))), s));
    }
  }
  for (int r = 0; r < rows; ++r) std::memcpy(y + r * p.n, total[r], cols * sizeof(float));
}

// Work item: batch b, rows [i0, i0 + kBlockRows), columns [j0, j0 + kCols); wp: scratch of
// p.k x kCols, xs: of kRows x p.k (kPatchesX).
LOWACC_AVX512 void Item(const Problem& p, int64_t b, int64_t i0, int64_t j0, float* wp,
                        float* xs, const FusedPanel& wd, const FusedRows& xd) {
  const int cols = static_cast<int>(std::min<int64_t>(kCols, p.n - j0));
  const int64_t cg = p.geometry.cg, taps = p.geometry.kh * p.geometry.kw;
  if (p.operands == kPatchesW) {  // column j: patch j0 + j
    for (int j = 0; j < kCols; ++j) {
      const float* patch = j < cols ? p.Patch(p.w, b, j0 + j) : nullptr;
      for (int64_t t = 0; t < taps; ++t) {
        for (int64_t c = 0; c < cg; ++c)
          wp[(t * cg + c) * kCols + j] = patch ? patch[p.taps[t] + c] : 0.f;
      }
    }
  } else {
    const float* w = p.w + b * p.k * p.n;
    for (int64_t kk = 0; kk < p.k; ++kk) {
      std::memcpy(wp + kk * kCols, w + kk * p.n + j0, cols * sizeof(float));
      std::memset(wp + kk * kCols + cols, 0, (kCols - cols) * sizeof(float));
    }
  }
  const bool vector_fused = p.is_fused && p.finite;
  if (vector_fused) DecomposePanel(p, wp, wd);
  const int64_t i1 = std::min(p.m, i0 + kBlockRows);
  for (int64_t i = i0; i < i1; i += p.tile_rows) {
    const int rows = static_cast<int>(std::min<int64_t>(p.tile_rows, i1 - i));
    const float* x = p.x + (b * p.m + i) * p.k;
    if (p.operands == kPatchesX) {  // the tile's patches, copied tap by tap
      for (int r = 0; r < rows; ++r) {
        const float* patch = p.Patch(p.x, b, i + r);
        for (int64_t t = 0; t < taps; ++t)
          std::memcpy(xs + r * p.k + t * cg, patch + p.taps[t], cg * sizeof(float));
      }
      x = xs;
    }
    float* y = p.y + (b * p.m + i) * p.n + j0;
    if (vector_fused) {
      DecomposeRows(p, x, rows, xd);
      FusedTile(p, xd, wd, y, rows, cols);
    } else if (p.is_fused) {
      FusedTileAnyOperands(p, x, wp, y, rows, cols);
    } else {
      p.tile(p, x, wp, y, rows, cols);
    }
  }
}

// A worker's scratch for the vector fused chain (none unless p.is_fused), 64-byte aligned.
struct FusedScratch {
  FusedPanel panel{};
  FusedRows rows{};
  void* block = nullptr;

  explicit FusedScratch(const Problem& p) {
    if (!p.is_fused) return;
    const int64_t k = p.k, groups = (k + p.fused.group - 1) / p.fused.group;
    const int64_t panel_ints = k * kCols, row_ints = (kFusedRows * k + 15) / 16 * 16;
    const int64_t mask_bytes = (k * 4 + groups * 2 + kFusedRows * groups) * sizeof(__mmask16);
    const int64_t bytes = (3 * panel_ints + 3 * row_ints) * 4 + mask_bytes + kFusedRows * k;
    block = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    int32_t* ints = static_cast<int32_t*>(block);
    panel.m = ints;
    panel.q = ints + panel_ints;
    panel.e = ints + 2 * panel_ints;
    rows.m = ints + 3 * panel_ints;
    rows.q = rows.m + row_ints;
    rows.e = rows.q + row_ints;
    __mmask16* masks = reinterpret_cast<__mmask16*>(rows.e + row_ints);
    panel.negative = reinterpret_cast<__mmask16(*)[2][2]>(masks);
    panel.zero = reinterpret_cast<__mmask16(*)[2]>(masks + k * 4);
    rows.zero = masks + k * 4 + groups * 2;
    rows.negative = reinterpret_cast<uint8_t*>(rows.zero + kFusedRows * groups);
  }
  ~FusedScratch() { std::free(block); }
};

ffi::Error ChunkDot(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                    ffi::ResultBuffer<ffi::F32> y, int64_t chunk, int64_t order,
                    ffi::Span<const int64_t> acc, ffi::Span<const int64_t> product,
                    ffi::Span<const int64_t> combine, int64_t exact_step,
                    int64_t exact_combine, int64_t scaled, int64_t scaled_total,
                    ffi::Span<const int64_t> conv,
                    ffi::Span<const int64_t> fused) {
  auto xd = x.dimensions(), wd = w.dimensions();
  // A FloatFormat chain (acc's 6 fields) or a fused dot-product one (fused's 14, order 'fma',
  // one chunk, no product or combine rounding).
  const bool is_fused = fused.size() != 0;
  if ((is_fused ? fused.size() != 14 || fused[0] < 1 || acc.size() != 0 || order != kOrderFma ||
                      product.size() != 0 || combine.size() != 0
                : acc.size() != 6) ||
      (combine.size() != 0 && combine.size() != 6) ||
      (product.size() != 0 && product.size() != 6) || chunk < 1 ||
      (order != kOrderChunk && order != kOrderFma) || (conv.size() != 0 && conv.size() != 13))
    return ffi::Error::InvalidArgument("lowacc_chunk_dot: malformed attributes");
  Problem p{};
  p.operands = conv.size() == 0 ? kDense : conv[12] ? kPatchesW : kPatchesX;
  if (p.operands == kDense && (xd.size() != 3 || wd.size() != 3 || xd[0] != wd[0] ||
                               xd[2] != wd[1]))
    return ffi::Error::InvalidArgument("lowacc_chunk_dot: expected x (B, M, K), w (B, K, N)");
  int64_t batch = xd[0];
  if (p.operands != kDense) {
    ConvGeometry& g = p.geometry;
    g = {conv[0], conv[1], conv[2], conv[3], conv[4], conv[5],
         conv[6], conv[7], conv[8], conv[9], conv[10], conv[11]};
    // The padded input (N, Hp, Wp, C), the kernel (groups, kh kw cg, O) or its transpose.
    auto in = p.operands == kPatchesX ? xd : wd, kernel = p.operands == kPatchesX ? wd : xd;
    const int64_t k = kernel[p.operands == kPatchesX ? 1 : 2];
    batch = kernel[0];
    if (in.size() != 4 || kernel.size() != 3 || in[1] != g.hp || in[2] != g.wp ||
        in[3] != g.c || g.cg < 1 || g.c != batch * g.cg || k != g.kh * g.kw * g.cg ||
        g.ho < 1 || g.wo < 1 || (g.ho - 1) * g.sh + (g.kh - 1) * g.dh >= g.hp ||
        (g.wo - 1) * g.sw + (g.kw - 1) * g.dw >= g.wp)
      return ffi::Error::InvalidArgument(
          "lowacc_chunk_dot: expected a padded input (N, Hp, Wp, C) and a kernel (groups, "
          "kh kw C / groups, O) or its transpose that the convolution geometry fits");
    const int64_t positions = in[0] * g.ho * g.wo;
    p.m = p.operands == kPatchesX ? positions : xd[1];
    p.k = k;
    p.n = p.operands == kPatchesX ? wd[2] : positions;
  } else {
    p.m = xd[1];
    p.k = xd[2];
    p.n = wd[2];
  }
  auto yd = y->dimensions();
  if (yd.size() != 3 || yd[0] != batch || yd[1] != p.m || yd[2] != p.n)
    return ffi::Error::InvalidArgument("lowacc_chunk_dot: the result's shape is not (B, M, N)");
  const ConvGeometry& g = p.geometry;
  std::unique_ptr<int64_t[]> taps(new int64_t[std::max<int64_t>(g.kh * g.kw, 1)]);
  for (int64_t t = 0; t < g.kh * g.kw; ++t)
    taps[t] = (t / g.kw * g.dh * g.wp + t % g.kw * g.dw) * g.c;
  p.x = x.typed_data();
  p.w = w.typed_data();
  p.y = y->typed_data();
  p.taps = taps.get();
  p.chunk = chunk;
  p.is_fused = is_fused;
  if (is_fused) {
    p.fused = Fused::Of(fused);
  } else {
    p.acc = Format::Of(acc);
  }
  p.fma = order == kOrderFma;
  p.has_product = product.size() != 0;
  p.has_combine = combine.size() != 0;
  p.exact_step = exact_step != 0;
  p.exact_combine = exact_combine != 0;
  p.scaled = scaled != 0;
  p.scaled_total = scaled_total != 0;
  if (p.has_product) p.product = Format::Of(product);
  if (p.has_combine) p.combine = Format::Of(combine);
  int64_t x_size = 1, w_size = 1;
  for (auto d : xd) x_size *= d;
  for (auto d : wd) w_size *= d;
  p.finite = (p.scaled || p.is_fused) && AllFinite(p.x, x_size) && AllFinite(p.w, w_size);
  if (is_fused) {
    p.tile_rows = kFusedRows;
  } else {
    TileFor(p);
  }
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
    std::unique_ptr<int64_t[]> taps;  // p.taps' storage, alive as long as any helper
    int64_t row_blocks, panels, items;
    std::atomic<int64_t> next{0}, finished{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto shared = std::make_shared<Shared>();
  shared->p = p;
  shared->taps = std::move(taps);
  shared->row_blocks = (p.m + kBlockRows - 1) / kBlockRows;
  shared->panels = (p.n + kCols - 1) / kCols;
  shared->items = batch * shared->row_blocks * shared->panels;
  auto work = [](Shared& st) {
    if (st.next.load() >= st.items) return;
    const unsigned csr = _mm_getcsr();
    _mm_setcsr(csr | _MM_FLUSH_ZERO_ON | _MM_DENORMALS_ZERO_ON);  // as XLA on the CPU
    float* wp = static_cast<float*>(std::aligned_alloc(64, st.p.k * kCols * sizeof(float)));
    float* xs = st.p.operands == kPatchesX ? new float[kRows * st.p.k] : nullptr;
    const FusedScratch scratch(st.p);
    for (int64_t t; (t = st.next.fetch_add(1)) < st.items;) {
      const int64_t j = t % st.panels, i = (t / st.panels) % st.row_blocks;
      Item(st.p, t / (st.panels * st.row_blocks), i * kBlockRows, j * kCols, wp, xs,
           scratch.panel, scratch.rows);
      if (st.finished.fetch_add(1) + 1 == st.items) {
        std::lock_guard<std::mutex> lock(st.mu);
        st.cv.notify_all();
      }
    }
    std::free(wp);
    delete[] xs;
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

// Whether this CPU runs the kernel (AVX-512 F, DQ, BW, VL and CD).
extern "C" int LowaccChunkDotSupported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512cd");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(LowaccChunkDot, ChunkDot,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("chunk")
                                  .Attr<int64_t>("order")
                                  .Attr<ffi::Span<const int64_t>>("acc")
                                  .Attr<ffi::Span<const int64_t>>("product")
                                  .Attr<ffi::Span<const int64_t>>("combine")
                                  .Attr<int64_t>("exact_step")
                                  .Attr<int64_t>("exact_combine")
                                  .Attr<int64_t>("scaled")
                                  .Attr<int64_t>("scaled_total")
                                  .Attr<ffi::Span<const int64_t>>("conv")
                                  .Attr<ffi::Span<const int64_t>>("fused"));
