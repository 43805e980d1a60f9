// Fused attention with per-row statistics for the CPU: one pass over the keys of every
// (batch, query head, block of query rows), fp32 throughout, nothing of size Sq x Sk.
//
// For query row i of head h, with scaled logits s_j = scale * q_i . k_j over its allowed keys
// (causal: j <= i + Sk - Sq; and the optional bool mask), an online softmax keeps
//   m = max_j s_j,   l = sum_j e^{s_j - m},   a = sum_j e^{s_j - m} (s_j - m),
//   o = sum_j e^{s_j - m} v_j,   c_g = sum_{j in segment g} e^{s_j - m},
// rescaled by e^{m_old - m_new} when m grows (a also gains (m_old - m_new) l_old). At the end
//   out = o / l,  lse = m + ln l,  entropy = -sum p ln p = ln l - a / l,  max logit = m,
//   sink = p at the row's first allowed key = e^{s_first - lse},  mass_g = c_g / l.
// A row with no allowed key gives out 0, entropy 0, max logit -inf, sink 0, masses 0; a row
// with a NaN or +Inf logit among its allowed keys gives NaN in every output.
//
// Compiled on first use by avss_fast/native.py (g++ -O3 -march=native) and called through
// ctypes, which releases the GIL; work items (query blocks, longest first) are shared among
// pthreads by an atomic counter. GCC/Clang vector extensions, no intrinsics: the same source
// builds for AVX2, AVX-512 or NEON.
#include <pthread.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

namespace {

#ifndef AVSS_VL
#if defined(__AVX512F__)
#define AVSS_VL 16
#else
#define AVSS_VL 8
#endif
#endif
constexpr int VL = AVSS_VL;  // floats per vector: 16 with AVX-512, else 8 (AVX2, NEON pairs)
constexpr int BQ = 32;  // query rows per work item
constexpr int BK = 64;  // keys per block
typedef float vf __attribute__((vector_size(VL * 4)));
typedef int32_t vi __attribute__((vector_size(VL * 4)));
typedef float vfu __attribute__((vector_size(VL * 4), aligned(4), may_alias));

inline vf load(const float* p) { return *reinterpret_cast<const vfu*>(p); }
inline void store(float* p, vf x) { *reinterpret_cast<vfu*>(p) = x; }
inline vf splat(float x) { return vf{} + x; }

inline float hmax(vf x) {
  float r = x[0];
  for (int t = 1; t < VL; ++t) r = x[t] > r ? x[t] : r;
  return r;
}
inline float hsum(vf x) {
  float r = 0.f;
  for (int t = 0; t < VL; ++t) r += x[t];
  return r;
}

// e^x for x <= 0 (Cephes expf polynomial, ~1 ulp); 0 below -87.3, where fp32 underflows.
inline vf vexp(vf x) {
  const vf lo = splat(-87.3f);
  vi under = x < lo;
  x = x < lo ? lo : x;
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  vf t = x * 1.44269504088896341f + magic;
  vi n = reinterpret_cast<vi>(t) - 0x4B400000;
  vf fn = t - magic;
  vf r = x - fn * 0.693359375f + fn * 2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  vi bits = (n + 127) << 23;
  vf res = p * reinterpret_cast<vf>(bits);
  return under ? vf{} : res;
}

struct Args {
  const float* q; int64_t q_sb, q_sh, q_ss;
  const float* kt;  // [B, Hk, D, Skp]
  const float* v;   // [B, Hv, Sk, Dp]
  const uint8_t* mask; int64_t m_sb, m_sh, m_ss;
  const int32_t* seg;  // [B, Sk] segment of each key, or null
  int S;
  float* out; int64_t o_sb, o_sh, o_ss;
  float* stats;  // [B, Hq, Sq, 3]
  float* mass;   // [B, Hq, Sq, S] or null
  int B, Hq, Hk, Hv, Sq, Sk, Skp, D, Dp, causal;
  float scale;
  int n_items, n_qblocks;
  int next;  // atomic work counter
  int failed;
};

// sc[r][0 .. nvk*VL) = q_r . k_j for the block's keys (4 rows x 16 keys a micro tile)
void scores(const Args& A, const float* const* qrow, int nrows, const float* kt, int j0, int nvk,
            float (*sc)[BK]) {
  for (int r4 = 0; r4 < nrows; r4 += 4) {
    const float* qr[4];
    for (int r = 0; r < 4; ++r) qr[r] = qrow[r4 + r < nrows ? r4 + r : nrows - 1];
    for (int c = 0; c < nvk; c += 2) {
      vf a00{}, a01{}, a10{}, a11{}, a20{}, a21{}, a30{}, a31{};
      const float* kp = kt + j0 + c * VL;
      for (int d = 0; d < A.D; ++d, kp += A.Skp) {
        vf k0 = load(kp), k1 = load(kp + VL);
        float x0 = qr[0][d], x1 = qr[1][d], x2 = qr[2][d], x3 = qr[3][d];
        a00 += x0 * k0; a01 += x0 * k1;
        a10 += x1 * k0; a11 += x1 * k1;
        a20 += x2 * k0; a21 += x2 * k1;
        a30 += x3 * k0; a31 += x3 * k1;
      }
      vf acc[4][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}};
      for (int r = 0; r < 4 && r4 + r < nrows; ++r) {
        store(&sc[r4 + r][c * VL], acc[r][0]);
        store(&sc[r4 + r][c * VL + VL], acc[r][1]);
      }
    }
  }
}

// o[r][dc*VL ..] += sum_j p[r][j] v_j for ND vectors of the head dimension
template <int ND>
void pv_chunk(const float (*p)[BK], int nrows, int nk, const float* v, int Dp, float* o, int dc) {
  for (int r4 = 0; r4 < nrows; r4 += 4) {
    const int nr = nrows - r4 < 4 ? nrows - r4 : 4;
    vf acc[4][ND];
    for (int r = 0; r < 4; ++r)
      for (int x = 0; x < ND; ++x) acc[r][x] = r < nr ? load(o + (r4 + r) * Dp + (dc + x) * VL) : vf{};
    const float* p0 = p[r4];
    const float* p1 = p[r4 + (nr > 1 ? 1 : 0)];
    const float* p2 = p[r4 + (nr > 2 ? 2 : 0)];
    const float* p3 = p[r4 + (nr > 3 ? 3 : 0)];
    const float* vj = v + dc * VL;
    for (int j = 0; j < nk; ++j, vj += Dp) {
      vf vv[ND];
      for (int x = 0; x < ND; ++x) vv[x] = load(vj + x * VL);
      const float w0 = p0[j], w1 = p1[j], w2 = p2[j], w3 = p3[j];
      for (int x = 0; x < ND; ++x) {
        acc[0][x] += w0 * vv[x];
        acc[1][x] += w1 * vv[x];
        acc[2][x] += w2 * vv[x];
        acc[3][x] += w3 * vv[x];
      }
    }
    for (int r = 0; r < nr; ++r)
      for (int x = 0; x < ND; ++x) store(o + (r4 + r) * Dp + (dc + x) * VL, acc[r][x]);
  }
}

void pv(const float (*p)[BK], int nrows, int nk, const float* v, int Dp, float* o) {
  const int nvd = Dp / VL;
  int dc = 0;
  while (dc < nvd) {
    const int left = nvd - dc;
    // chunks of 3 vectors keep 12 accumulators + 3 loads within 16 AVX2 registers
    if (left >= 3 && left != 4) { pv_chunk<3>(p, nrows, nk, v, Dp, o, dc); dc += 3; }
    else if (left >= 2) { pv_chunk<2>(p, nrows, nk, v, Dp, o, dc); dc += 2; }
    else { pv_chunk<1>(p, nrows, nk, v, Dp, o, dc); dc += 1; }
  }
}

void run_item(Args& A, int item, float (*sc)[BK], float* o, float* segacc, int* runs) {
  const int nbh = A.B * A.Hq;
  const int qb = A.n_qblocks - 1 - item / nbh;  // longest (latest) query blocks first
  const int bh = item % nbh;
  const int b = bh / A.Hq, h = bh % A.Hq;
  const int r0 = qb * BQ;
  const int nrows = A.Sq - r0 < BQ ? A.Sq - r0 : BQ;
  const int offset = A.Sk - A.Sq;
  const int S = A.S;
  const float* qrow[BQ];
  for (int r = 0; r < nrows; ++r) qrow[r] = A.q + b * A.q_sb + h * A.q_sh + (int64_t)(r0 + r) * A.q_ss;
  const float* kt = A.kt + ((int64_t)b * A.Hk + h / (A.Hq / A.Hk)) * A.D * A.Skp;
  const float* vbase = A.v + ((int64_t)b * A.Hv + h / (A.Hq / A.Hv)) * A.Sk * A.Dp;
  const uint8_t* mrow0 = A.mask ? A.mask + b * A.m_sb + h * A.m_sh + (int64_t)r0 * A.m_ss : nullptr;
  const int32_t* seg = A.seg ? A.seg + (int64_t)b * A.Sk : nullptr;

  float m[BQ], l[BQ], a[BQ], sfirst[BQ];
  bool seen[BQ], bad[BQ];
  for (int r = 0; r < nrows; ++r) {
    m[r] = -INFINITY; l[r] = 0.f; a[r] = 0.f; sfirst[r] = 0.f; seen[r] = false; bad[r] = false;
  }
  memset(o, 0, sizeof(float) * nrows * A.Dp);
  if (S > 0) memset(segacc, 0, sizeof(float) * nrows * S);

  int hi = A.Sk;
  if (A.causal) {
    const int lim = r0 + nrows - 1 + offset + 1;
    hi = lim < hi ? lim : hi;
  }
  vf iota;
  for (int t = 0; t < VL; ++t) iota[t] = (float)t;
  for (int j0 = 0; j0 < hi; j0 += BK) {
    const int nk = hi - j0 < BK ? hi - j0 : BK;
    const int nvk = ((nk + 2 * VL - 1) / (2 * VL)) * 2;  // even: the micro tile takes 2 vectors
    scores(A, qrow, nrows, kt, j0, nvk, sc);
    // runs of one segment among this block's keys
    int nruns = 0;
    if (S > 0) {
      for (int j = 0; j < nk; ++j) {
        if (j == 0 || seg[j0 + j] != seg[j0 + j - 1]) { runs[3 * nruns] = j; runs[3 * nruns + 2] = seg[j0 + j]; ++nruns; }
        runs[3 * (nruns - 1) + 1] = j + 1;
      }
    }
    for (int r = 0; r < nrows; ++r) {
      const int i = r0 + r;
      int last = nk - 1;  // last key of the block this row may see (block-relative)
      if (A.causal && i + offset - j0 < last) last = i + offset - j0;
      float* s = sc[r];
      if (last < 0) {  // nothing of this block is visible to the row
        for (int c = 0; c < nvk; ++c) store(s + c * VL, vf{});
        continue;
      }
      const vf vlast = splat((float)last);
      const vf ninf = splat(-INFINITY);
      vf mx = ninf;
      for (int c = 0; c < nvk; ++c) {
        vf x = load(s + c * VL) * A.scale;
        x = (iota + (float)(c * VL)) > vlast ? ninf : x;
        store(s + c * VL, x);
      }
      int first = -1;
      if (mrow0) {
        const uint8_t* mr = mrow0 + (int64_t)r * A.m_ss + j0;
        for (int j = 0; j <= last; ++j) {
          if (!mr[j]) s[j] = -INFINITY;
          else if (first < 0) first = j;
        }
      } else {
        first = 0;
      }
      const vf pinf = splat(INFINITY);
      vi fin = iota == iota;  // all lanes true
      for (int c = 0; c < nvk; ++c) {
        const vf x = load(s + c * VL);
        mx = mx > x ? mx : x;
        fin &= x < pinf;  // false for NaN and +Inf (masked keys are -Inf)
      }
      for (int t = 0; t < VL; ++t) bad[r] |= !fin[t];
      if (!seen[r] && first >= 0) { seen[r] = true; sfirst[r] = s[first]; }
      const float mb = hmax(mx);
      if (mb == -INFINITY || bad[r]) {  // every key of the block masked for this row, or a NaN/+Inf logit
        for (int c = 0; c < nvk; ++c) store(s + c * VL, vf{});
        continue;
      }
      const float mnew = mb > m[r] ? mb : m[r];
      const float alpha = m[r] == -INFINITY ? 0.f : expf(m[r] - mnew);
      const vf vm = splat(mnew), floor = splat(-150.f);
      vf sum{}, ws{};
      for (int c = 0; c < nvk; ++c) {
        vf d = load(s + c * VL) - vm;
        d = d < floor ? floor : d;  // masked keys: e^{-150} is 0 in fp32, and 0 * -150 is 0
        vf p = vexp(d);
        store(s + c * VL, p);
        sum += p;
        ws += p * d;
      }
      const float lsum = hsum(sum);
      a[r] = (l[r] > 0.f ? alpha * (a[r] + (m[r] - mnew) * l[r]) : 0.f) + hsum(ws);
      l[r] = alpha * l[r] + lsum;
      m[r] = mnew;
      if (alpha != 1.f) {
        float* orow = o + r * A.Dp;
        for (int x = 0; x < A.Dp; x += VL) store(orow + x, load(orow + x) * alpha);
        for (int g = 0; g < S; ++g) segacc[r * S + g] *= alpha;
      }
      for (int t = 0; t < nruns; ++t) {
        float acc = 0.f;
        for (int j = runs[3 * t]; j < runs[3 * t + 1]; ++j) acc += s[j];
        segacc[r * S + runs[3 * t + 2]] += acc;
      }
    }
    pv(sc, nrows, nk, vbase + (int64_t)j0 * A.Dp, A.Dp, o);
  }
  for (int r = 0; r < nrows; ++r) {
    const int i = r0 + r;
    float* out = A.out + b * A.o_sb + h * A.o_sh + (int64_t)i * A.o_ss;
    float* st = A.stats + (((int64_t)b * A.Hq + h) * A.Sq + i) * 3;
    float* ms = A.mass ? A.mass + (((int64_t)b * A.Hq + h) * A.Sq + i) * S : nullptr;
    if (bad[r]) {  // a NaN or +Inf logit: nothing of the row is meaningful
      for (int x = 0; x < A.Dp; ++x) out[x] = NAN;
      st[0] = st[1] = st[2] = NAN;
      if (ms) for (int g = 0; g < S; ++g) ms[g] = NAN;
      continue;
    }
    if (!(l[r] > 0.f)) {
      for (int x = 0; x < A.Dp; ++x) out[x] = 0.f;
      st[0] = 0.f; st[1] = -INFINITY; st[2] = 0.f;
      if (ms) for (int g = 0; g < S; ++g) ms[g] = 0.f;
      continue;
    }
    const float inv = 1.f / l[r];
    const float* orow = o + r * A.Dp;
    for (int x = 0; x < A.Dp; x += VL) store(out + x, load(orow + x) * inv);
    const float logl = logf(l[r]);
    const float ent = logl - a[r] * inv;
    st[0] = ent > 0.f ? ent : 0.f;
    st[1] = m[r];
    st[2] = expf(sfirst[r] - m[r] - logl);
    if (ms) for (int g = 0; g < S; ++g) ms[g] = segacc[r * S + g] * inv;
  }
}

// Scratch of one thread; items taken from the shared counter until none is left.
void work(Args& A) {
  float (*sc)[BK] = static_cast<float (*)[BK]>(aligned_alloc(64, sizeof(float) * BQ * BK));
  float* o = static_cast<float*>(aligned_alloc(64, sizeof(float) * BQ * A.Dp));
  float* segacc = static_cast<float*>(malloc(sizeof(float) * BQ * (A.S > 0 ? A.S : 1)));
  int* runs = static_cast<int*>(malloc(sizeof(int) * 3 * BK));
  if (!sc || !o || !segacc || !runs) {
    __atomic_store_n(&A.failed, 1, __ATOMIC_RELAXED);
  } else {
    for (;;) {
      const int item = __atomic_fetch_add(&A.next, 1, __ATOMIC_RELAXED);
      if (item >= A.n_items) break;
      run_item(A, item, sc, o, segacc, runs);
    }
  }
  free(sc); free(o); free(segacc); free(runs);
}

#ifndef _OPENMP
void* work_thread(void* arg) {
  work(*static_cast<Args*>(arg));
  return nullptr;
}
#endif

}  // namespace

// The vector width the caller pads to: Dp a multiple of it, Skp of twice it.
extern "C" int avss_vector_width() { return VL; }

extern "C" int avss_head_stats_attention(
    const float* q, int64_t q_sb, int64_t q_sh, int64_t q_ss,
    const float* kt, const float* v,
    const uint8_t* mask, int64_t m_sb, int64_t m_sh, int64_t m_ss,
    const int32_t* seg, int S,
    float* out, int64_t o_sb, int64_t o_sh, int64_t o_ss,
    float* stats, float* mass,
    int B, int Hq, int Hk, int Hv, int Sq, int Sk, int Skp, int D, int Dp, int causal,
    float scale, int nthreads) {
  if (Dp % VL || Skp % (2 * VL) || Skp < Sk || Dp < D || Hq % Hk || Hq % Hv) return 2;
  Args A{q, q_sb, q_sh, q_ss, kt, v, mask, m_sb, m_sh, m_ss, seg, S, out, o_sb, o_sh, o_ss,
         stats, mass, B, Hq, Hk, Hv, Sq, Sk, Skp, D, Dp, causal, scale, 0, 0, 0, 0};
  A.n_qblocks = (Sq + BQ - 1) / BQ;
  A.n_items = A.n_qblocks * B * Hq;
  if (nthreads > A.n_items) nthreads = A.n_items;
  if (nthreads < 1) nthreads = 1;
#ifdef _OPENMP
  // torch's own OpenMP runtime when torch loaded it first (same soname): its pool threads do
  // the work, instead of a second set of threads competing with torch's spinning ones
#pragma omp parallel num_threads(nthreads)
  work(A);
#else
  pthread_t th[64];
  if (nthreads > 64) nthreads = 64;
  int started = 0;
  for (int t = 1; t < nthreads; ++t)
    if (pthread_create(&th[started], nullptr, work_thread, &A) == 0) ++started;
  work(A);
  for (int t = 0; t < started; ++t) pthread_join(th[t], nullptr);
#endif
  return A.failed ? 1 : 0;
}
