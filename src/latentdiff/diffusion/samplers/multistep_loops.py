"""UniPC and DEIS as pure loops on sigmas, in the manner of `sigma_loops` (same model protocol, same callback).

Both are exponential integrators of the probability-flow ODE that reuse the model's past outputs (multistep). They
run here in the variance-exploding form x = x_t / alpha_t of `sigma_loops`, with lambda = -log sigma (the half
log-SNR) and h = lambda_{i+1} - lambda_i; the papers' x_t forms divided by alpha_{i+1} give these updates, and
`MultistepSigmaSampler` maps x_T and the result to and from x_t as diffusers' schedulers of the same name hold it.
Coefficients are computed on the host in float64.

UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models",
Algorithms 1-2 with B(h)): the predictor UniP-p and the corrector UniC-p, which corrects x_{i+1} with the model
output at x_{i+1} that the next predictor needs anyway (no extra model call). DEIS (Zhang & Chen 2023, "Fast
Sampling of Diffusion Models with Exponential Integrator", eq. 15 with the log-rho polynomial of diffusers'
"logrho" solver): eps extrapolated by a Lagrange polynomial in log sigma over the last `order` outputs and integrated
exactly in sigma.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from numpy.polynomial import polynomial as P

from .base import StepCallback, after_step, as_step_callback, progress_range
from .sigma_loops import SigmaDenoiser


def multistep_order(i: int, n: int, *, solver_order: int, lower_order_final: bool) -> int:
    """The order of step i of n: warm-up (at most i + 1: the outputs there are), and with `lower_order_final` at most
    n - i, so the last steps fall to first order (stabler for few steps: DPM-Solver sec. 3.3, UniPC, DEIS)."""
    return min(solver_order, i + 1, n - i if lower_order_final else solver_order)


# ---- UniPC ----------------------------------------------------------------------------------------------
def unipc_coefficients(rks: Sequence[float], hh: float, b_h: float, *, corrector: bool) -> list[float]:
    """The weights rho of the differences D1_k = (m_k - m_0) / r_k in UniP / UniC (Zhao et al. 2023, Algorithm 1):
    the solution of sum_k rho_k r_k^(j-1) = j! phi_{j+1}(hh) / B(h), j = 1 .. p, with phi_{k+1}(x) =
    (phi_k(x) - 1/k!) / x, phi_1(x) = (e^x - 1) / x. `rks`: the r_k = (lambda_{s_k} - lambda_{s_0}) / h of the past
    outputs, and (corrector) r = 1 of the new one. Second-order UniP and first-order UniC take rho = 1/2, the paper's
    choice where one difference gives no system (Algorithm 1, "if p = 1"; diffusers does the same). p = len(rks) + 1."""
    order = len(rks) + 1
    if (order == 2 and not corrector) or (order == 1 and corrector):
        return [0.5]
    b, h_phi_k, factorial = [], math.expm1(hh) / hh - 1, 1
    for j in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= j + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R = np.vander(np.asarray([*rks, 1.0]), order, increasing=True).T     # R[j, k] = r_k^j, r = 1: the new point
    if not corrector:                                        # UniP: the system without the (unknown) new point
        return np.linalg.solve(R[:-1, :-1], np.asarray(b[:-1])).tolist()
    return np.linalg.solve(R, np.asarray(b)).tolist()


def unipc_update(x: torch.Tensor, ms: Sequence[torch.Tensor], lambdas: Sequence[float], sigma: float,
                 sigma_next: float, *, predict_x0: bool, variant: str, m_next: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """x at sigma -> x at sigma_next (> 0) by UniP (m_next None) or UniC (m_next: the output at the predicted x).

    ms: the last p outputs, oldest first (D for data prediction, eps otherwise), ms[-1] at sigma; lambdas their -log
    sigma. With h = lambda_next - lambda_0, hh = -h (data) or h (noise), B(h) = hh ("bh1") or e^hh - 1 ("bh2"):
      data:   x' = (sigma_next / sigma) x - (e^hh - 1) m_0 - B(h) sum_k rho_k D1_k
      noise:  x' = x - sigma_next ((e^hh - 1) m_0 + B(h) sum_k rho_k D1_k)
    """
    h = -math.log(sigma_next) - lambdas[-1]
    hh = -h if predict_x0 else h
    b_h = hh if variant == "bh1" else math.expm1(hh)
    m0 = ms[-1]
    rks = [(lam - lambdas[-1]) / h for lam in reversed(lambdas[:-1])]           # newest past output first
    d1s = [(m - m0) / r for m, r in zip(reversed(ms[:-1]), rks, strict=True)]
    if m_next is not None:
        d1s.append(m_next - m0)                                                  # r = 1
    res = None
    if d1s:
        rhos = unipc_coefficients(rks, hh, b_h, corrector=m_next is not None)
        res = sum((rho * d for rho, d in zip(rhos, d1s, strict=True)), torch.zeros_like(m0))
    if predict_x0:
        x_next = x * (sigma_next / sigma) - m0 * math.expm1(hh)
        return x_next if res is None else x_next - res * b_h
    x_next = x - m0 * (sigma_next * math.expm1(hh))
    return x_next if res is None else x_next - res * (sigma_next * b_h)


def sample_unipc(model: SigmaDenoiser, x: torch.Tensor, sigmas: Sequence[float], *, solver_order: int = 2,
                 variant: str = "bh2", predict_x0: bool = True, lower_order_final: bool = True,
                 disable_corrector: Sequence[int] = (), callback: StepCallback | None = None,
                 progress: bool = False) -> torch.Tensor:
    """UniPC (Zhao et al. 2023): UniP-p to sigma_{i+1}, then, with the model output there, UniC-p corrects x_{i+1}
    before the next step (not after the last step: no output is computed there). `disable_corrector`: the steps i
    whose result is not corrected (diffusers' list). A step to sigma = 0 is x = D (the limit of the first-order
    update; a higher order divides by r_k = 0 there). The callback's x is the predicted x_{i+1}; a replacement it
    returns is used as the model's input, while the corrector rebuilds x_{i+1} from x_i, as in diffusers."""
    callback = as_step_callback(callback)
    n = len(sigmas) - 1
    ms: list[torch.Tensor] = []
    last_x, last_order = None, 0
    for i in progress_range(n, progress):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        m = denoised if predict_x0 else (x - denoised) / sigma
        if last_x is not None and i - 1 not in disable_corrector:
            x = unipc_update(last_x, ms[-last_order:], [-math.log(s) for s in sigmas[i - last_order:i]],
                             sigmas[i - 1], sigma, predict_x0=predict_x0, variant=variant, m_next=m)
        ms = (ms + [m])[-solver_order:]
        order = multistep_order(i, n, solver_order=solver_order, lower_order_final=lower_order_final)
        last_x, last_order = x, order
        if sigma_next == 0:
            x = denoised
        elif sigma_next == sigma:   # h = 0 (a "sigma_min" final sigma equal to the last one): x stays
            pass
        else:
            x = unipc_update(x, ms[-order:], [-math.log(s) for s in sigmas[i + 1 - order:i + 1]], sigma, sigma_next,
                             predict_x0=predict_x0, variant=variant)
        x = after_step(callback, x, i, sigma, denoised)
    return x


# ---- DEIS ------------------------------------------------------------------------------------------------
def deis_coefficients(sigmas: Sequence[float], sigma_next: float) -> list[float]:
    """c_j = integral from sigma_0 to sigma_next of l_j(log rho) d rho, l_j the Lagrange basis polynomial in log
    sigma over the nodes `sigmas` (sigma_0 = sigmas[0] the newest, then older ones): the DEIS weights of the past eps
    (Zhang & Chen 2023, eq. 15, "logrho"). Exact: with u = log rho, p(u) e^u has the antiderivative
    e^u (p - p' + p'' - ...)(u)."""
    us = [math.log(s) for s in sigmas]
    if sigma_next == sigmas[0]:
        return [0.0] * len(us)
    coefficients = []
    for j, u_j in enumerate(us):
        others = [u for k, u in enumerate(us) if k != j]
        basis = P.polyfromroots(others) / np.prod([u_j - u for u in others]) if others else np.array([1.0])
        antiderivative, term, sign = np.zeros(1), basis, 1.0
        while term.size and term.any():
            antiderivative = P.polyadd(antiderivative, sign * term)
            term, sign = P.polyder(term), -sign
        coefficients.append(sigma_next * P.polyval(math.log(sigma_next), antiderivative)
                            - sigmas[0] * P.polyval(us[0], antiderivative))
    return coefficients


def sample_deis(model: SigmaDenoiser, x: torch.Tensor, sigmas: Sequence[float], *, solver_order: int = 2,
                lower_order_final: bool = True, callback: StepCallback | None = None,
                progress: bool = False) -> torch.Tensor:
    """DEIS-p multistep (Zhang & Chen 2023): x_{i+1} = x_i + sum_j c_j eps_{i-j}, eps = (x - D) / sigma, over the last
    p = `multistep_order(...)` outputs. First order is DDIM (c = sigma_{i+1} - sigma_i: an Euler step in sigma).
    All sigmas must be positive (DEIS ends at the smallest trained sigma, as diffusers')."""
    callback = as_step_callback(callback)
    n = len(sigmas) - 1
    eps: list[torch.Tensor] = []
    for i in progress_range(n, progress):
        sigma = sigmas[i]
        denoised = model(x, sigma)
        eps = (eps + [(x - denoised) / sigma])[-solver_order:]
        order = multistep_order(i, n, solver_order=solver_order, lower_order_final=lower_order_final)
        weights = deis_coefficients(sigmas[i + 1 - order:i + 1][::-1], sigmas[i + 1])
        x = x + sum((c * e for c, e in zip(weights, reversed(eps[-order:]), strict=True)), torch.zeros_like(x))
        x = after_step(callback, x, i, sigma, denoised)
    return x
