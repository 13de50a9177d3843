// Weight-only quantized matrix products for small row counts (decode steps) on x86 CPUs with AVX2.
//
//   out[m, n] = sum_k x[m, k] * w[n, k]        x fp32 [M, K] row-major, out fp32 [M, N] row-major
//
// w is never materialised: each kernel widens eight quantized weights at a time to fp32 in registers,
// scales them, and uses them for every row of x before moving on, so a weight byte is read from memory
// once per call whatever M is. Activations stay fp32 (torch's int kernels want bf16 ones, which costs
// greedy agreement); accumulation is fp32.
//
//   u8g  q uint8 [N, K], scale/min fp32 [N, K / G]     w = q * scale + min           (G % 8 == 0)
//   u4g  q uint8 [N, K / 2] in blocks of 32 weights:   w = q * scale + min           (G % 32 == 0)
//        byte j of block b holds k = 32b + j (low nibble) and k = 32b + 16 + j (high nibble);
//        scale/min fp16 [N, K / G] (fp16 rounds a scale to 1 part in 2,048, far inside one step)
//   i8c  q int8 [N, K], scale fp32 [N]                 w = q * scale[n]              (K % 8 == 0)
//
// The group offsets never enter the inner loop: sum_k x_k (q_k s + min) = s sum_k x_k q_k + min sum_k x_k,
// and the per-group sums of x are computed once per call. Register blocking: MB rows of x by NB rows of
// w, MB * NB accumulators, chosen so that accumulators, scales and one widened weight vector per row of
// w fit the 16 ymm registers (a single accumulator at M = 1 would wait on the FMA latency). Rows of w are
// split across OpenMP threads; the library is linked against the libgomp torch has already loaded (same
// soname), so it shares torch's thread pool instead of starting a second one.
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#include <vector>

#define LP_INLINE inline __attribute__((always_inline))

namespace {

LP_INLINE float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

LP_INLINE __m256 widen_u8(const uint8_t* p) {  // 8 bytes -> 8 floats
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

LP_INLINE __m256 widen_i8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// 8 nibbles -> 8 floats: the low (shift 0) or high (shift 4) nibbles of the 8 bytes at p
LP_INLINE __m256 widen_u4(const uint8_t* p, int shift) {
  __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  b = _mm_and_si128(_mm_srli_epi16(b, shift), _mm_set1_epi8(0x0F));
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
}

template <int MB, int NB>
LP_INLINE void fma_rows(__m256 (&acc)[MB][NB], const __m256 (&w)[NB], const float* x, int64_t K, int64_t k) {
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i) {
    const __m256 xv = _mm256_loadu_ps(x + i * K + k);
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_fmadd_ps(w[j], xv, acc[i][j]);
  }
}

template <int MB, int NB>
LP_INLINE void zero(__m256 (&acc)[MB][NB]) {
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_setzero_ps();
}

// What every kind's block needs: x and out at the block's first row, the per-group sums of x.
struct Rows {
  const float* x; const float* xsum; float* out; int64_t K, N, groups;
};

// out = sum(acc) + sum_g min[n, g] * xsum[m, g], the group offsets folded out of the inner loop;
// `min_of(n, g)` reads one offset in the kind's own storage
template <int MB, int NB, class MinOf>
LP_INLINE void finish_with_offsets(const __m256 (&acc)[MB][NB], const Rows& r, int64_t n0, MinOf&& min_of) {
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) {
      float offset = 0.f;
      for (int64_t g = 0; g < r.groups; ++g) offset += min_of(n0 + j, g) * r.xsum[i * r.groups + g];
      r.out[i * r.N + n0 + j] = hsum(acc[i][j]) + offset;
    }
}

struct U8g {
  const uint8_t* q; const float* scale; const float* mins; int64_t G;
  template <int MB, int NB>
  LP_INLINE void block(const Rows& r, int64_t n0) const {
    __m256 acc[MB][NB];
    zero(acc);
    for (int64_t g = 0; g < r.groups; ++g) {
      __m256 s[NB];
#pragma GCC unroll 8
      for (int j = 0; j < NB; ++j) s[j] = _mm256_broadcast_ss(scale + (n0 + j) * r.groups + g);
      for (int64_t k = g * G; k < (g + 1) * G; k += 8) {
        __m256 w[NB];
#pragma GCC unroll 8
        for (int j = 0; j < NB; ++j) w[j] = _mm256_mul_ps(widen_u8(q + (n0 + j) * r.K + k), s[j]);
        fma_rows<MB, NB>(acc, w, r.x, r.K, k);
      }
    }
    finish_with_offsets(acc, r, n0, [&](int64_t n, int64_t g) { return mins[n * r.groups + g]; });
  }
};

struct U4g {
  const uint8_t* q; const uint16_t* scale; const uint16_t* mins; int64_t G;
  template <int MB, int NB>
  LP_INLINE void block(const Rows& r, int64_t n0) const {
    __m256 acc[MB][NB];
    zero(acc);
    const int64_t row_bytes = r.K / 2;
    for (int64_t g = 0; g < r.groups; ++g) {
      __m256 s[NB];
#pragma GCC unroll 8
      for (int j = 0; j < NB; ++j) s[j] = _mm256_set1_ps(_cvtsh_ss(scale[(n0 + j) * r.groups + g]));
      for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
        const uint8_t* block_bytes = q + k / 2;
#pragma GCC unroll 4
        for (int lane = 0; lane < 4; ++lane) {  // k .. k+7, k+8 .. k+15 (low nibbles), then the high ones
          __m256 w[NB];
#pragma GCC unroll 8
          for (int j = 0; j < NB; ++j)
            w[j] = _mm256_mul_ps(widen_u4(block_bytes + (n0 + j) * row_bytes + (lane & 1) * 8, (lane >> 1) * 4), s[j]);
          fma_rows<MB, NB>(acc, w, r.x, r.K, k + lane * 8);
        }
      }
    }
    finish_with_offsets(acc, r, n0, [&](int64_t n, int64_t g) { return _cvtsh_ss(mins[n * r.groups + g]); });
  }
};

struct I8c {
  const int8_t* q; const float* scale;
  template <int MB, int NB>
  LP_INLINE void block(const Rows& r, int64_t n0) const {
    __m256 acc[MB][NB];
    zero(acc);
    for (int64_t k = 0; k < r.K; k += 8) {
      __m256 w[NB];
#pragma GCC unroll 8
      for (int j = 0; j < NB; ++j) w[j] = widen_i8(q + (n0 + j) * r.K + k);
      fma_rows<MB, NB>(acc, w, r.x, r.K, k);
    }
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NB; ++j) r.out[i * r.N + n0 + j] = hsum(acc[i][j]) * scale[n0 + j];
  }
};

// Columns n0 .. n1 of rows starting at r: blocks of NB, the last N % NB one at a time.
template <int MB, int NB, class Kind>
void columns(const Kind& kind, const Rows& r, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) kind.template block<MB, NB>(r, n);
  for (; n < n1; ++n) kind.template block<MB, 1>(r, n);
}

constexpr int64_t COLUMN_CHUNK = 16;  // output rows per OpenMP work item (a multiple of every NB)

// groups: of x's K for the offset sums (1 where the kind has none)
template <class Kind>
void gemm(const Kind& kind, const float* x, int64_t M, int64_t K, int64_t N, int64_t group, float* out, int threads) {
  const int64_t groups = K / group;
  std::vector<float> xsum(M * groups);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      float s = 0.f;
      for (int64_t k = g * group; k < (g + 1) * group; ++k) s += x[m * K + k];
      xsum[m * groups + g] = s;
    }
  const int64_t chunks = (N + COLUMN_CHUNK - 1) / COLUMN_CHUNK;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t n0 = c * COLUMN_CHUNK, n1 = n0 + COLUMN_CHUNK < N ? n0 + COLUMN_CHUNK : N;
    int64_t m = 0;
    auto rows = [&](int64_t m0) { return Rows{x + m0 * K, xsum.data() + m0 * groups, out + m0 * N, K, N, groups}; };
    for (; m + 8 <= M; m += 8) columns<8, 1>(kind, rows(m), n0, n1);
    if (m + 4 <= M) { columns<4, 2>(kind, rows(m), n0, n1); m += 4; }
    if (m + 2 <= M) { columns<2, 2>(kind, rows(m), n0, n1); m += 2; }
    if (m < M) columns<1, 4>(kind, rows(m), n0, n1);
  }
}

}  // namespace

extern "C" {

int lp_abi_version() { return 1; }

void lp_gemm_u8g(const float* x, int64_t M, int64_t K, const uint8_t* q, const float* scale, const float* mins,
                 int64_t N, int64_t G, float* out, int threads) {
  gemm(U8g{q, scale, mins, G}, x, M, K, N, G, out, threads);
}

void lp_gemm_u4g(const float* x, int64_t M, int64_t K, const uint8_t* q, const uint16_t* scale,
                 const uint16_t* mins, int64_t N, int64_t G, float* out, int threads) {
  gemm(U4g{q, scale, mins, G}, x, M, K, N, G, out, threads);
}

void lp_gemm_i8c(const float* x, int64_t M, int64_t K, const int8_t* q, const float* scale, int64_t N, float* out,
                 int threads) {
  gemm(I8c{q, scale}, x, M, K, N, K, out, threads);
}

}  // extern "C"
