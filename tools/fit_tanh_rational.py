#!/usr/bin/env python3
"""Fits the CPU mods' tanh (jit/codegen.cpp fj_tanhf): tanh(x) ~ x P(x^2) / Q(x^2) on |x| <= C,
P of degree NP and Q of degree NQ in x^2 with Q(0) = 1, for minimax relative error.

Method: linearised least squares (P - f Q = 0 with f = tanh(x) / x) on a dense grid in s = (x / C)^2,
reweighted by the previous denominator, with Lawson's multiplicative weight updates toward the
minimax solution; the best iterate is kept. Then the coefficients are rounded to fp32 and the
function is evaluated the way the kernel does (Horner with fused multiply-adds, in fp32) against
float64 tanh. Usage: python3 tools/fit_tanh_rational.py [C NP NQ]   (defaults 9 6 3; needs mpmath)
"""
import sys

import mpmath
import numpy as np


def fit(C, NP, NQ, iters=400):
    mpmath.mp.dps = 30
    xs = np.unique(np.concatenate([np.linspace(0, C, 8000), C * np.sin(np.linspace(0, np.pi / 2, 4000))]))
    f = np.array([float(mpmath.tanh(mpmath.mpf(x)) / x) if x > 0 else 1.0 for x in xs])
    s = (xs / C) ** 2
    w, qv, best = np.ones_like(s), np.ones_like(s), None
    for _ in range(iters):
        A = np.hstack([np.vander(s, NP + 1, increasing=True), -(f[:, None]) * np.vander(s, NQ + 1, increasing=True)[:, 1:]])
        W = np.sqrt(w) / (np.abs(f) * np.abs(qv))
        sol, *_ = np.linalg.lstsq(A * W[:, None], f * W, rcond=None)
        p, q = sol[:NP + 1], np.concatenate([[1.0], sol[NP + 1:]])
        qv = np.polyval(q[::-1], s)
        err = (np.polyval(p[::-1], s) / qv - f) / f
        if best is None or np.abs(err).max() < best[0]:
            best = (np.abs(err).max(), p.copy(), q.copy())
        w = np.maximum(w * np.abs(err) / np.sum(w * np.abs(err)), 1e-15)
    m, p, q = best
    # Back from s = (x / C)^2 to t = x^2.
    return m, p / C ** (2 * np.arange(NP + 1)), q / C ** (2 * np.arange(NQ + 1))


def fp32_tanh(x, P, Q, C):
    fma = lambda a, b, c: (a.astype(np.float64) * b + c).astype(np.float32)  # one rounding, as an FMA
    x = x.astype(np.float32)
    a = np.abs(x)
    xc = np.where(a < C, x, np.float32(0))
    t = (xc * xc).astype(np.float32)
    p = np.full_like(t, P[-1])
    for c in P[-2::-1]:
        p = fma(p, t, c)
    q = np.full_like(t, Q[-1])
    for c in Q[-2::-1]:
        q = fma(q, t, c)
    y = ((xc * p).astype(np.float32) / q).astype(np.float32)
    return np.where(a < C, y, np.sign(x).astype(np.float32))


def main():
    C, NP, NQ = (float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])) if len(sys.argv) > 3 else (9.0, 6, 3)
    m, P, Q = fit(C, NP, NQ)
    P32, Q32 = P.astype(np.float32), Q.astype(np.float32)
    xs = np.concatenate([np.linspace(-20, 20, 400001), np.linspace(-1e-3, 1e-3, 20001),
                         np.linspace(8.0, 10.0, 100001)]).astype(np.float32)
    ref = np.tanh(xs.astype(np.float64))
    got = fp32_tanh(xs, P32, Q32, np.float32(C)).astype(np.float64)
    rel = np.abs(got - ref) / np.maximum(np.abs(ref), 1e-37)
    ulps = np.abs(got - ref) / np.spacing(np.abs(ref).astype(np.float32)).astype(np.float64)
    print(f"|x| <= {C}, degrees {NP}/{NQ} in x^2: max relative error {m:.2e} exact, "
          f"{rel.max():.2e} ({ulps.max():.1f} ulp) in fp32 at x = {xs[np.argmax(rel)]}")
    print("P (t^0 first):", ", ".join(f"{v:.9e}f" for v in P32))
    print("Q (t^0 first):", ", ".join(f"{v:.9e}f" for v in Q32))


if __name__ == "__main__":
    main()
