// Weight-only quantized matrix products for small row counts (decode steps) on x86 CPUs with AVX2
// (W = 8 floats a vector) or AVX-512 (W = 16), whichever the compiler is told the machine has
// (-march=native; LP_FORCE_AVX2 builds the AVX2 form anywhere, and the tests check both).
//
//   out[m, n] = sum_k x[m, k] * w[n, k]        x fp32 [M, K] row-major, out fp32 [M, N] row-major
//
// The weights are stored in blocks of W output rows, interleaved along k ("row blocks"): block b holds,
// for every k, the W weights w[bW .. bW + W - 1, k] side by side. One vector load and widen gives the
// weights of W outputs at one k; each row of x multiplies it by x[m, k] broadcast and accumulates into
// its own vector of W outputs. So a vector lane never needs a horizontal sum (the row-major layout this
// replaced spent about half of an 8-row product summing lanes and adding group offsets one output at a
// time), and a weight byte is read from memory once per call whatever M is. Activations stay fp32
// (torch's int kernels want bf16 ones, which costs greedy agreement); accumulation is fp32.
//
//   u8g  q uint8 [N/W, K, W], scale/min fp32 [N/W, K/G, W]      w = q * scale + min    (G even)
//   u4g  q uint8 [N/W, K/2, W]: byte (b, p, j) holds k = 2p (low nibble) and k = 2p + 1 (high nibble)
//        of row bW + j; scale/min fp16 [N/W, K/G, W] (fp16 rounds a scale to 1 part in 2,048, far inside
//        one step)                                              w = q * scale + min
//   i8c  q int8 [N/W, K, W], scale fp32 [N]                     w = q * scale[n]
//
// N is padded to whole blocks (zero weights; the padded outputs are never written). The group offsets
// never enter the inner loop: sum_k x_k (q_k s + min) = sum_k x_k (q_k s) + min sum_k x_k, and the
// per-group sums of x are computed once per call. Row blocks are split across OpenMP threads; the library
// is linked against the libgomp torch has already loaded (same soname), so it shares torch's thread pool.
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#include <vector>

#define LP_INLINE inline __attribute__((always_inline))

namespace {

#if defined(__AVX512F__) && !defined(LP_FORCE_AVX2)
constexpr int W = 16;  // floats per vector, rows per block
using vf = __m512;
LP_INLINE vf vzero() { return _mm512_setzero_ps(); }
LP_INLINE vf vset1(float s) { return _mm512_set1_ps(s); }
LP_INLINE vf vload(const float* p) { return _mm512_loadu_ps(p); }
LP_INLINE void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
LP_INLINE vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
LP_INLINE vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
LP_INLINE vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
LP_INLINE __m128i load_w(const void* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }  // W bytes
LP_INLINE vf bytes_u8(__m128i b) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b)); }
LP_INLINE vf bytes_i8(__m128i b) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)); }
LP_INLINE vf halves(const uint16_t* p) {  // W fp16 values -> W floats
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#else
constexpr int W = 8;
using vf = __m256;
LP_INLINE vf vzero() { return _mm256_setzero_ps(); }
LP_INLINE vf vset1(float s) { return _mm256_set1_ps(s); }
LP_INLINE vf vload(const float* p) { return _mm256_loadu_ps(p); }
LP_INLINE void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
LP_INLINE vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
LP_INLINE vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
LP_INLINE vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
LP_INLINE __m128i load_w(const void* p) { return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)); }  // W bytes
LP_INLINE vf bytes_u8(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)); }
LP_INLINE vf bytes_i8(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)); }
LP_INLINE vf halves(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
#endif

LP_INLINE __m128i low_nibbles(__m128i b) { return _mm_and_si128(b, _mm_set1_epi8(0x0F)); }
LP_INLINE __m128i high_nibbles(__m128i b) { return _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0x0F)); }

// One row block's outputs for MB rows of x: acc[0][i] (+ acc[1][i]) holds out[m0 + i, bW .. bW + W - 1].
// With one or two rows there are too few independent FMA chains to hide the FMA latency, so even and odd
// k accumulate apart (SPLIT) and are added at the end; with more rows the rows are the chains.
template <int MB>
constexpr int SPLIT = MB <= 2 ? 2 : 1;

struct Rows {
  const float* x; const float* xsum; int64_t K, groups;
};

template <int MB>
LP_INLINE void zero(vf (&acc)[MB]) {
#pragma GCC unroll 16
  for (int i = 0; i < MB; ++i) acc[i] = vzero();
}

// acc[i] += w * x[i, k]
template <int MB>
LP_INLINE void fma_rows(vf (&acc)[MB], vf w, const Rows& r, int64_t k) {
#pragma GCC unroll 16
  for (int i = 0; i < MB; ++i) acc[i] = vfma(w, vset1(r.x[i * r.K + k]), acc[i]);
}

// acc[i] += sum_g min[g] * xsum[i, g]: the group offsets, W outputs at a time; `mins(g)` loads W of them
template <int MB, class Mins>
LP_INLINE void add_offsets(vf (&acc)[MB], const Rows& r, Mins&& mins) {
  for (int64_t g = 0; g < r.groups; ++g) {
    const vf mn = mins(g);
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) acc[i] = vfma(mn, vset1(r.xsum[i * r.groups + g]), acc[i]);
  }
}

struct U8g {  // G even
  const uint8_t* q; const float* scale; const float* mins; int64_t G;
  template <int MB>
  LP_INLINE void block(vf (&acc)[SPLIT<MB>][MB], const Rows& r, int64_t b) const {
    const uint8_t* qb = q + b * r.K * W;
    const float* sb = scale + b * r.groups * W;
    for (int64_t g = 0; g < r.groups; ++g) {
      const vf s = vload(sb + g * W);
      for (int64_t k = g * G; k < (g + 1) * G; k += 2) {
        fma_rows<MB>(acc[0], vmul(bytes_u8(load_w(qb + k * W)), s), r, k);
        fma_rows<MB>(acc[SPLIT<MB> - 1], vmul(bytes_u8(load_w(qb + (k + 1) * W)), s), r, k + 1);
      }
    }
    const float* mb = mins + b * r.groups * W;
    add_offsets<MB>(acc[0], r, [&](int64_t g) { return vload(mb + g * W); });
  }
  // block b's weights, transposed: out[k * ld + j] = w[bW + j, k]
  LP_INLINE void dequant(int64_t b, int64_t K, float* out, int64_t ld) const {
    const int64_t groups = K / G;
    const uint8_t* qb = q + b * K * W;
    for (int64_t g = 0; g < groups; ++g) {
      const vf s = vload(scale + (b * groups + g) * W), mn = vload(mins + (b * groups + g) * W);
      for (int64_t k = g * G; k < (g + 1) * G; ++k) vstore(out + k * ld, vfma(bytes_u8(load_w(qb + k * W)), s, mn));
    }
  }
};

struct U4g {
  const uint8_t* q; const uint16_t* scale; const uint16_t* mins; int64_t G;
  template <int MB>
  LP_INLINE void block(vf (&acc)[SPLIT<MB>][MB], const Rows& r, int64_t b) const {
    const uint8_t* qb = q + b * (r.K / 2) * W;
    const uint16_t* sb = scale + b * r.groups * W;
    for (int64_t g = 0; g < r.groups; ++g) {
      const vf s = halves(sb + g * W);
      for (int64_t k = g * G; k < (g + 1) * G; k += 2) {
        const __m128i bytes = load_w(qb + (k / 2) * W);
        fma_rows<MB>(acc[0], vmul(bytes_u8(low_nibbles(bytes)), s), r, k);
        fma_rows<MB>(acc[SPLIT<MB> - 1], vmul(bytes_u8(high_nibbles(bytes)), s), r, k + 1);
      }
    }
    const uint16_t* mb = mins + b * r.groups * W;
    add_offsets<MB>(acc[0], r, [&](int64_t g) { return halves(mb + g * W); });
  }
  LP_INLINE void dequant(int64_t b, int64_t K, float* out, int64_t ld) const {
    const int64_t groups = K / G;
    const uint8_t* qb = q + b * (K / 2) * W;
    for (int64_t g = 0; g < groups; ++g) {
      const vf s = halves(scale + (b * groups + g) * W), mn = halves(mins + (b * groups + g) * W);
      for (int64_t k = g * G; k < (g + 1) * G; k += 2) {
        const __m128i bytes = load_w(qb + (k / 2) * W);
        vstore(out + k * ld, vfma(bytes_u8(low_nibbles(bytes)), s, mn));
        vstore(out + (k + 1) * ld, vfma(bytes_u8(high_nibbles(bytes)), s, mn));
      }
    }
  }
};

struct I8c {
  const int8_t* q; const float* scale;
  template <int MB>
  LP_INLINE void block(vf (&acc)[SPLIT<MB>][MB], const Rows& r, int64_t b) const {
    const int8_t* qb = q + b * r.K * W;
    int64_t k = 0;
    for (; k + 2 <= r.K; k += 2) {
      fma_rows<MB>(acc[0], bytes_i8(load_w(qb + k * W)), r, k);
      fma_rows<MB>(acc[SPLIT<MB> - 1], bytes_i8(load_w(qb + (k + 1) * W)), r, k + 1);
    }
    if (k < r.K) fma_rows<MB>(acc[0], bytes_i8(load_w(qb + k * W)), r, k);
    const vf s = vload(scale + b * W);  // scale is padded to whole blocks too
#pragma GCC unroll 16
    for (int j = 0; j < SPLIT<MB>; ++j)
#pragma GCC unroll 16
      for (int i = 0; i < MB; ++i) acc[j][i] = vmul(acc[j][i], s);
  }
  LP_INLINE void dequant(int64_t b, int64_t K, float* out, int64_t ld) const {
    const int8_t* qb = q + b * K * W;
    const vf s = vload(scale + b * W);
    for (int64_t k = 0; k < K; ++k) vstore(out + k * ld, vmul(bytes_i8(load_w(qb + k * W)), s));
  }
};

// Rows m0 .. m0 + MB - 1 of out for row block b (its first `valid` outputs: the last block may be short).
template <int MB, class Kind>
LP_INLINE void rows_block(const Kind& kind, const float* x, const float* xsum, int64_t K, int64_t groups, float* out,
                          int64_t N, int64_t b, int64_t valid) {
  vf acc[SPLIT<MB>][MB];
  for (int j = 0; j < SPLIT<MB>; ++j) zero(acc[j]);
  kind.template block<MB>(acc, Rows{x, xsum, K, groups}, b);
  for (int i = 0; i < MB; ++i) {
    const vf sum = SPLIT<MB> == 2 ? vadd(acc[0][i], acc[SPLIT<MB> - 1][i]) : acc[0][i];
    float* dst = out + i * N + b * W;
    if (valid == W) {
      vstore(dst, sum);
    } else {
      alignas(64) float tmp[W];
      vstore(tmp, sum);
      for (int64_t j = 0; j < valid; ++j) dst[j] = tmp[j];
    }
  }
}

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
  const int64_t blocks = (N + W - 1) / W;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t valid = N - b * W < W ? N - b * W : W;
    int64_t m = 0;
    // 8 rows at a time: 8 accumulators, the widened weights and a broadcast x fit 16 ymm registers
    for (; m + 8 <= M; m += 8) rows_block<8>(kind, x + m * K, xsum.data() + m * groups, K, groups, out + m * N, N, b, valid);
    if (m + 4 <= M) { rows_block<4>(kind, x + m * K, xsum.data() + m * groups, K, groups, out + m * N, N, b, valid); m += 4; }
    if (m + 2 <= M) { rows_block<2>(kind, x + m * K, xsum.data() + m * groups, K, groups, out + m * N, N, b, valid); m += 2; }
    if (m < M) rows_block<1>(kind, x + m * K, xsum.data() + m * groups, K, groups, out + m * N, N, b, valid);
  }
}

// The whole matrix, transposed and padded to whole blocks: out fp32 [K, ceil(N / W) * W] (long prefill
// chunks multiply x by it with one fp32 GEMM; writing W contiguous floats a store is what makes it fast)
template <class Kind>
void dequant_t(const Kind& kind, int64_t K, int64_t N, float* out, int threads) {
  const int64_t blocks = (N + W - 1) / W, ld = blocks * W;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t b = 0; b < blocks; ++b) kind.dequant(b, K, out + b * W, ld);
}

}  // namespace

extern "C" {

int lp_abi_version() { return 3; }

int lp_vector_width() { return W; }

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

void lp_dequant_u8g(const uint8_t* q, const float* scale, const float* mins, int64_t N, int64_t K, int64_t G,
                    float* out, int threads) {
  dequant_t(U8g{q, scale, mins, G}, K, N, out, threads);
}

void lp_dequant_u4g(const uint8_t* q, const uint16_t* scale, const uint16_t* mins, int64_t N, int64_t K, int64_t G,
                    float* out, int threads) {
  dequant_t(U4g{q, scale, mins, G}, K, N, out, threads);
}

void lp_dequant_i8c(const int8_t* q, const float* scale, int64_t N, int64_t K, float* out, int threads) {
  dequant_t(I8c{q, scale}, K, N, out, threads);
}

}  // extern "C"
