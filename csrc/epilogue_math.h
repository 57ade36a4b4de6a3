// Preference-loss epilogue math shared by the CPU (ops.cpp) and CUDA (ops_cuda.cu) kernels.
//
// The formulas are those of engine/losses.py (the single source of truth; see its
// docstrings); this header holds their per-pair terms and exact derivatives so that both
// devices evaluate the same expressions. Everything is in double: P is small (pairs of a
// micro-batch), so the cost is nil and the result is at least as accurate as the fp32
// PyTorch reference it is tested against.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define DDPO_HD __host__ __device__ __forceinline__
#else
#define DDPO_HD inline
#endif

namespace ddpo {

enum Objective : int { kDPO = 0, kDDPO = 1, kORPO = 2, kDORPO = 3, kSFT = 4 };

// engine.losses.LOG1MEXP_MAX_ARG: arguments above it are clamped (zero gradient there).
constexpr double kLog1mexpMaxArg = -1e-7;
constexpr double kLn2 = 0.69314718055994530942;

// log(1 - exp(x)) for x <= kLog1mexpMaxArg, switching form at -ln 2 (Maechler 2012).
DDPO_HD double log1mexp(double x) {
  x = x < kLog1mexpMaxArg ? x : kLog1mexpMaxArg;
  return x < -kLn2 ? log1p(-exp(x)) : log(-expm1(x));
}

// d/dx log1mexp(x) = -exp(x) / (1 - exp(x)) = -1 / expm1(-x); 0 where the clamp is active.
// torch.clamp(max=m) passes the gradient at x == m, so the boundary counts as unclamped.
DDPO_HD double dlog1mexp(double x) { return x <= kLog1mexpMaxArg ? -1.0 / expm1(-x) : 0.0; }

// log(sigmoid(y)) without overflow for either sign of y.
DDPO_HD double logsigmoid(double y) { return y < 0 ? y - log1p(exp(y)) : -log1p(exp(-y)); }

// sigmoid(y) without overflow for either sign of y.
DDPO_HD double sigmoid(double y) {
  if (y >= 0) return 1.0 / (1.0 + exp(-y));
  const double e = exp(y);
  return e / (1.0 + e);
}

// One pair of DPO/DDPO: loss term w * -logsigmoid(z), z = beta * ((pc - rc) - (pr - rr)).
// Writes d term / d pc and d term / d pr (before the 1/P of the mean).
DDPO_HD double ddpo_pair(double pc, double pr, double rc, double rr, double w, double beta, double* d_pc,
                         double* d_pr) {
  const double z = beta * ((pc - rc) - (pr - rr));
  const double s = sigmoid(-z);  // d(-logsigmoid(z))/dz = -sigmoid(-z)
  *d_pc = -w * beta * s;
  *d_pr = w * beta * s;
  return -w * logsigmoid(z);
}

// One pair of ORPO/DORPO's odds-ratio part: term beta * logsigmoid(w * log_odds) with
// log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar)), ac = sum_c / max(n_c, 1), likewise ar.
// Writes d term / d sum_c and d term / d sum_r (the term enters the loss with sign -1/P).
DDPO_HD double orpo_pair(double sc, double sr, double nc, double nr, double w, double beta, double* d_sc,
                         double* d_sr) {
  const double dc = nc > 1.0 ? nc : 1.0;
  const double dr = nr > 1.0 ? nr : 1.0;
  const double ac = sc / dc;
  const double ar = sr / dr;
  const double log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar));
  const double d_lo = beta * w * sigmoid(-w * log_odds);  // d term / d log_odds
  *d_sc = d_lo * (1.0 - dlog1mexp(ac)) / dc;
  *d_sr = -d_lo * (1.0 - dlog1mexp(ar)) / dr;
  return beta * logsigmoid(w * log_odds);
}

}  // namespace ddpo
