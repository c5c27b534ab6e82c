"""Intervals and paired tests for the reports: numpy only, seeded, no printing; plain floats and dicts out.

Which tool for which quantity (the unit of resampling is always the problem; pairs are by position, so the caller
aligns two runs by problem id first):

    mean_ci                 mean of a continuous per-problem score (F, tokens): bootstrap over problems,
                            percentile interval (method="bca" for BCa), Efron & Tibshirani 1993, ch. 13 and 14.
    ratio_ci                a ratio of sums over items (perplexity = exp(sum nll / sum tokens) over traces):
                            bootstrap over the items, both sums from the same resample; paired, pass
                            num = nll_b - nll_a for the change in nll per token.
    rate_ci                 a share of problems (accuracy, trap rate, cut-off share): exact Clopper-Pearson
                            interval, Clopper & Pearson 1934. Conservative: coverage >= level for every p.
    paired_bootstrap        difference of two means over the same problems (b - a): paired bootstrap, percentile
                            interval and a bootstrap p-value. paired_permutation_p is the sign-flip test of the
                            same difference, exact by enumeration when few differences are non-zero.
    mcnemar_exact           two paired booleans (correct, trapped): exact McNemar test on the discordant pairs,
                            McNemar 1947 (the binomial form of the test).
    holm                    many p-values in one table: Holm-Bonferroni step-down adjustment, Holm 1979.
    resampled_correlation   a correlation between a fixed per-model metric x and a per-model mean over shared
                            problems (dF_m = mean F_dense - mean F_m): the problems are resampled (the same
                            resample for every model), the target and the coefficient recomputed; percentile CI.
    compare_correlations    does metric A track the target better than B: same resamples, |r_A| - |r_B|.
    min_detectable_difference   what a run of N problems can resolve (normal approximation), for the write-up.

Conventions: `level` is the two-sided confidence level; intervals are {"lo", "hi"}; a quantity that does not
exist (the spread of fewer than two values) is float("nan"), never None, so the dicts stay numeric (the reports
turn nan into null when they write JSON). Same seed, same data: same numbers; and for one seed and one problem
count every bootstrap here draws the same resamples of the problems, so the intervals of one report agree with each
other. Non-finite scores are an error: drop or fill problems missing a score before calling.
"""
import math

import numpy as np

_CHUNK = 1 << 20  # resampled indices held at once (8 MiB of int64): 10,000 x 1,000 problems runs in ~10 chunks


# ------------------------------------------------------------------------------------------ normal distribution

def norm_cdf(x):
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def norm_ppf(p):
    """Standard normal quantile by bisection on erfc (to the last bit); the upper half by symmetry, since
    1 - p is exact for p >= 0.5 and the lower tail of erfc keeps its relative precision."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"norm_ppf needs 0 <= p <= 1, got {p}")
    if p > 0.5:
        return -norm_ppf(1.0 - p)
    if p == 0.0:
        return -math.inf
    lo, hi = -40.0, 0.0  # Phi(-40) ~ 1e-350 is below the smallest double
    while True:
        mid = 0.5 * (lo + hi)
        if not lo < mid < hi:
            return hi
        lo, hi = (mid, hi) if norm_cdf(mid) < p else (lo, mid)


# ------------------------------------------------------------------------------------------------ helpers

def _scores(x, name="x"):
    x = np.asarray(x, dtype=float)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} has non-finite values: drop or fill the problems missing a score first")
    return x


def _check_level(level):
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return (1.0 - level) / 2.0


def _resampled_means(X, n_boot, seed):
    """Means over problems of bootstrap resamples: X [rows, n] -> [n_boot, rows]; the same problem indices for
    every row (the problems are shared), drawn in chunks so memory stays flat."""
    rows, n = X.shape
    rng = np.random.default_rng(seed)
    out = np.empty((n_boot, rows))
    step = max(1, _CHUNK // n)
    for s in range(0, n_boot, step):
        idx = rng.integers(0, n, size=(min(step, n_boot - s), n))  # [b, n]
        out[s:s + len(idx)] = X[:, idx].mean(axis=-1).T
    return out


def _percentile_ci(boot, level):
    a = _check_level(level)
    lo, hi = np.quantile(boot, [a, 1.0 - a])
    return float(lo), float(hi)


# ------------------------------------------------------------------------------------------------ means, rates

def mean_ci(x, level=0.95, n_boot=10000, seed=0, method="percentile"):
    """Mean of per-problem scores with a bootstrap CI over problems -> {"n", "mean", "lo", "hi"}.

    method "percentile": the level-quantiles of the resampled means. "bca": bias-corrected and accelerated
    (Efron & Tibshirani 1993, eq. 14.10), acceleration from the jackknife, which for the mean is
    sum(d^3) / (6 sum(d^2)^1.5) with d = x - mean. n < 2: lo = hi = nan (n = 0: the mean is nan too).
    """
    x = _scores(x).ravel()
    n = len(x)
    mean = float(x.mean()) if n else math.nan
    if n < 2:
        _check_level(level)
        return {"n": n, "mean": mean, "lo": math.nan, "hi": math.nan}
    boot = _resampled_means(x[None, :], n_boot, seed)[:, 0]
    if method == "percentile":
        lo, hi = _percentile_ci(boot, level)
    elif method == "bca":
        lo, hi = _bca_ci(x, boot, level)
    else:
        raise ValueError(f"method must be 'percentile' or 'bca', got {method!r}")
    return {"n": n, "mean": mean, "lo": lo, "hi": hi}


def ratio_ci(num, den, level=0.95, n_boot=10000, seed=0):
    """sum(num) / sum(den) over items with a bootstrap CI over the items -> {"n", "ratio", "lo", "hi"}.

    Each resample draws items with replacement and divides the resampled sums (the means' ratio is the same
    number), so a trace's nll and its token count move together. den must be positive. n < 2: lo = hi = nan.
    """
    num, den = _scores(num, "num").ravel(), _scores(den, "den").ravel()
    if len(num) != len(den):
        raise ValueError(f"num and den need equal lengths, got {len(num)} and {len(den)}")
    if np.any(den <= 0):
        raise ValueError("den must be positive for every item")
    n = len(num)
    ratio = float(num.sum() / den.sum()) if n else math.nan
    if n < 2:
        _check_level(level)
        return {"n": n, "ratio": ratio, "lo": math.nan, "hi": math.nan}
    boot = _resampled_means(np.stack([num, den]), n_boot, seed)  # [n_boot, 2]
    lo, hi = _percentile_ci(boot[:, 0] / boot[:, 1], level)
    return {"n": n, "ratio": ratio, "lo": lo, "hi": hi}


def _bca_ci(x, boot, level):
    a = _check_level(level)
    d = x - x.mean()
    ss = float(d @ d)
    if ss == 0.0:  # constant data: every resample has the same mean
        return float(x[0]), float(x[0])
    acc = float(np.sum(d ** 3)) / (6.0 * ss ** 1.5)
    # Ties count half, so 0/1 scores (many resampled means equal to the mean) get no spurious bias correction.
    below = (np.sum(boot < x.mean()) + 0.5 * np.sum(boot == x.mean())) / len(boot)
    z0 = norm_ppf(min(max(below, 0.5 / len(boot)), 1.0 - 0.5 / len(boot)))
    qs = [norm_cdf(z0 + (z0 + z) / (1.0 - acc * (z0 + z))) for z in (norm_ppf(a), norm_ppf(1.0 - a))]
    lo, hi = np.quantile(boot, qs)
    return float(lo), float(hi)


def _binom_cdf(k, n, p, log_comb):
    """P(X <= k), X ~ Binomial(n, p), summed in log space (exact up to rounding for integer k, n)."""
    j = np.arange(k + 1)
    return float(np.exp(log_comb[:k + 1] + j * math.log(p) + (n - j) * math.log1p(-p)).sum())


def _bisect(f, target):
    """The p in (0, 1) where the increasing f(p) crosses target, to ~1e-18."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
    return 0.5 * (lo + hi)


def rate_ci(k, n, level=0.95):
    """Exact Clopper-Pearson interval for k successes in n trials -> {"k", "n", "rate", "lo", "hi"}.

    lo solves P(X >= k | p) = (1 - level) / 2 (0 when k = 0), hi solves P(X <= k | p) = (1 - level) / 2 (1 when
    k = n), by bisection on the binomial tail; the same as the beta-quantile form. n = 0: rate, lo, hi are nan.
    """
    if int(k) != k or int(n) != n or not 0 <= k <= n:
        raise ValueError(f"rate_ci needs integers 0 <= k <= n, got k={k} n={n}")
    k, n, a = int(k), int(n), _check_level(level)
    if n == 0:
        return {"k": 0, "n": 0, "rate": math.nan, "lo": math.nan, "hi": math.nan}
    j = np.arange(n + 1)
    log_comb = np.array([math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) for i in j])
    lo = 0.0 if k == 0 else _bisect(lambda p: 1.0 - _binom_cdf(k - 1, n, p, log_comb), a)
    hi = 1.0 if k == n else _bisect(lambda p: -_binom_cdf(k, n, p, log_comb), -a)
    return {"k": k, "n": n, "rate": k / n, "lo": lo, "hi": hi}


# ------------------------------------------------------------------------------------------------ paired tests

def _paired(a, b):
    a, b = _scores(a, "a").ravel(), _scores(b, "b").ravel()
    if len(a) != len(b):
        raise ValueError(f"paired data need equal lengths (pairs are by position), got {len(a)} and {len(b)}")
    return a, b


def paired_bootstrap(a, b, level=0.95, n_boot=10000, seed=0):
    """Paired difference mean(b) - mean(a) over the same problems -> {"n", "diff", "lo", "hi", "p"}.

    The per-problem differences d = b - a are resampled; lo, hi are the percentile interval. p is two-sided:
    min(1, 2 * (1 + #{d* on the far side of 0, ties included}) / (n_boot + 1)), the interval inverted, so p < 1 - level
    roughly when 0 lies outside (lo, hi). For a test of "no difference" prefer paired_permutation_p. n < 2: nan.
    """
    a, b = _paired(a, b)
    d = b - a
    n = len(d)
    if n < 2:
        _check_level(level)
        return {"n": n, "diff": float(d.mean()) if n else math.nan, "lo": math.nan, "hi": math.nan, "p": math.nan}
    boot = _resampled_means(d[None, :], n_boot, seed)[:, 0]
    lo, hi = _percentile_ci(boot, level)
    far = min(int(np.sum(boot <= 0.0)), int(np.sum(boot >= 0.0)))
    p = min(1.0, 2.0 * (1 + far) / (n_boot + 1))
    return {"n": n, "diff": float(d.mean()), "lo": lo, "hi": hi, "p": p}


def paired_permutation_p(a, b, n_perm=10000, seed=0):
    """Two-sided paired sign-flip test of mean(b) - mean(a) -> {"n", "diff", "p", "exact"}.

    Under "no difference" each d_i = b_i - a_i is as likely as -d_i; p is the share of sign patterns with
    |sum| >= the observed |sum|. Zero differences carry no sign and are dropped; when 2^(non-zero) <= n_perm all
    patterns are enumerated (exact; at most 2^16), else n_perm random patterns with p = (1 + count) / (n_perm + 1).
    """
    a, b = _paired(a, b)
    d = b - a
    n = len(d)
    diff = float(d.mean()) if n else math.nan
    d = d[d != 0.0]
    t_obs = abs(float(d.sum()))
    tol = 1e-9 * float(np.abs(d).sum())  # sums of the same numbers in another order may differ by rounding
    if len(d) <= 16 and 2 ** len(d) <= n_perm:
        bits = (np.arange(2 ** len(d))[:, None] >> np.arange(len(d))) & 1  # [2^m, m]: every sign pattern
        T = (1 - 2 * bits) @ d
        return {"n": n, "diff": diff, "p": float(np.mean(np.abs(T) >= t_obs - tol)), "exact": True}
    rng = np.random.default_rng(seed)
    count, step = 0, max(1, _CHUNK // len(d))
    for s in range(0, n_perm, step):
        signs = rng.choice([-1.0, 1.0], size=(min(step, n_perm - s), len(d)))
        count += int(np.sum(np.abs(signs @ d) >= t_obs - tol))
    return {"n": n, "diff": diff, "p": (1 + count) / (n_perm + 1), "exact": False}


def mcnemar_exact(a, b):
    """Exact McNemar test on paired booleans -> {"n", "n01", "n10", "p"}.

    n01 = #(a false, b true), n10 = #(a true, b false); p = min(1, 2 P(X <= min(n01, n10))), X ~ Bin(n01 + n10,
    1/2), computed with exact integers; p = 1 without discordant pairs.
    """
    a, b = (v != 0 for v in _paired(a, b))
    n01, n10 = int(np.sum(~a & b)), int(np.sum(a & ~b))
    m = n01 + n10
    tail = sum(math.comb(m, i) for i in range(min(n01, n10) + 1)) / 2 ** m  # int / int is correctly rounded
    return {"n": len(a), "n01": n01, "n10": n10, "p": min(1.0, 2.0 * tail)}


def holm(pvalues, alpha=0.05):
    """Holm-Bonferroni step-down -> {"m", "p_adj", "reject"}, lists in the input order.

    With p_(1) <= ... <= p_(m): p_adj_(i) = min(1, max_{j <= i} (m - j + 1) p_(j)); reject = p_adj <= alpha.
    None and nan entries are skipped (not counted in m): their p_adj is nan and reject False.
    """
    p = np.array([math.nan if v is None else float(v) for v in pvalues])
    if np.any((p < 0) | (p > 1)):
        raise ValueError(f"p-values must lie in [0, 1], got {pvalues}")
    ok = np.flatnonzero(~np.isnan(p))
    m = len(ok)
    adj = np.full(len(p), math.nan)
    order = ok[np.argsort(p[ok], kind="stable")]
    adj[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    reject = [bool(v <= alpha) for v in adj]  # nan <= alpha is False
    return {"m": m, "p_adj": [float(v) for v in adj], "reject": reject}


# ------------------------------------------------------------------------------------------------ correlations

def rankdata(x):
    """Ranks 1..n, ties sharing their average rank."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(x)]  # tie group g covers sorted positions starts[g] .. ends[g] - 1
    ranks = np.empty(len(x))
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def pearson(x, y):
    x, y = np.asarray(x, float) - np.mean(x), np.asarray(y, float) - np.mean(y)
    den = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y) / den if den > 0 else math.nan


def spearman(x, y):
    return pearson(rankdata(x), rankdata(y))


def kendall(x, y):
    """Kendall's tau-b over all pairs: (n_c - n_d) / sqrt((n0 - n_x)(n0 - n_y))."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    iu = np.triu_indices(len(x), 1)
    dx, dy = np.sign(x[:, None] - x[None, :])[iu], np.sign(y[:, None] - y[None, :])[iu]
    den = math.sqrt(float(np.sum(dx != 0)) * float(np.sum(dy != 0)))
    return float(np.sum(dx * dy)) / den if den > 0 else math.nan


def _targets(scores, base_scores):
    """Per-model target and its resampling input: [models, problems] -> rows whose means are the target."""
    S = _scores(scores, "scores")
    if S.ndim != 2:
        raise ValueError(f"scores must be [models, problems], got shape {S.shape}")
    if base_scores is None:
        return S
    base = _scores(base_scores, "base_scores").ravel()
    if len(base) != S.shape[1]:
        raise ValueError(f"base_scores has {len(base)} problems, scores has {S.shape[1]}")
    return base[None, :] - S  # mean_i (base_i - S_mi) = dF_m


def _resampled_coefs(xs, scores, base_scores, coef, n_boot, seed):
    rows = _targets(scores, base_scores)
    for x in xs:
        if len(x) != rows.shape[0]:
            raise ValueError(f"x has {len(x)} models, scores has {rows.shape[0]}")
    point = [coef(x, rows.mean(axis=1)) for x in xs]
    boot = _resampled_means(rows, n_boot, seed)  # [n_boot, models]
    return point, np.array([[coef(x, t) for x in xs] for t in boot])  # [n_boot, len(xs)]


def resampled_correlation(x, scores, base_scores, coef, level=0.95, n_boot=2000, seed=0):
    """coef(x, target) with a CI from resampling the problems -> {"coef", "lo", "hi", "n_boot"}.

    x: [models], fixed (a weight metric). scores: [models, problems]. target_m = mean_i(base_scores_i -
    scores_mi), the drop from the base; base_scores=None: target_m = mean_i scores_mi. coef: pearson, spearman,
    kendall or any f(x, y) -> float. Resamples where coef is nan (a constant target) are dropped; n_boot says
    how many were kept.
    """
    x = _scores(x).ravel()
    (point,), boot = _resampled_coefs([x], scores, base_scores, coef, n_boot, seed)
    boot = boot[:, 0][~np.isnan(boot[:, 0])]
    lo, hi = _percentile_ci(boot, level) if len(boot) else (math.nan, math.nan)
    return {"coef": point, "lo": lo, "hi": hi, "n_boot": len(boot)}


def compare_correlations(x_a, x_b, scores, base_scores, coef, level=0.95, n_boot=2000, seed=0):
    """Does metric A track the target better than metric B, on the same resamples of the problems ->
    {"diff", "lo", "hi", "share", "n_boot"}: diff = |coef(A)| - |coef(B)| with its percentile CI, share = the
    fraction of resamples where |coef(A)| > |coef(B)| (ties count for neither)."""
    xs = [_scores(x_a, "x_a").ravel(), _scores(x_b, "x_b").ravel()]
    point, boot = _resampled_coefs(xs, scores, base_scores, coef, n_boot, seed)
    boot = np.abs(boot[~np.isnan(boot).any(axis=1)])
    d = boot[:, 0] - boot[:, 1]
    lo, hi = _percentile_ci(d, level) if len(d) else (math.nan, math.nan)
    share = float(np.mean(d > 0)) if len(d) else math.nan
    return {"diff": abs(point[0]) - abs(point[1]), "lo": lo, "hi": hi, "share": share, "n_boot": len(d)}


def resampled_agreement(a, b, coef, level=0.95, n_boot=2000, seed=0):
    """Do two per-problem measures agree across models? coef(mean_i a_mi, mean_i b_mi) over the models m, with a
    CI from resampling the problems (the same resample for both) -> {"coef", "lo", "hi", "n_boot"}. a, b:
    [models, problems] on the same problems (e.g. keyword F and the early-answering AOC)."""
    A, B = _scores(a, "a"), _scores(b, "b")
    if A.ndim != 2 or A.shape != B.shape:
        raise ValueError(f"a and b must both be [models, problems], got {A.shape} and {B.shape}")
    m = A.shape[0]
    point = coef(A.mean(axis=1), B.mean(axis=1))
    boot = _resampled_means(np.concatenate([A, B]), n_boot, seed)  # [n_boot, 2 models]
    vals = np.array([coef(t[:m], t[m:]) for t in boot])
    vals = vals[~np.isnan(vals)]
    lo, hi = _percentile_ci(vals, level) if len(vals) else (math.nan, math.nan)
    return {"coef": point, "lo": lo, "hi": hi, "n_boot": len(vals)}


# ------------------------------------------------------------------------------------------------ power

def min_detectable_difference(n, sd=None, p=None, alpha=0.05, power=0.8, paired=True):
    """Smallest true difference a two-sided z-test at `alpha` detects with probability `power`, for n problems:
    (z_{1-alpha/2} + z_power) * se (normal approximation; the far tail's share of power is ignored).

    sd given (a mean): paired, sd is the SD of the per-problem differences and se = sd / sqrt(n); unpaired (two
    independent samples of n, common sd), se = sd sqrt(2 / n). p given (a rate near p): se = sqrt(2 p (1 - p) / n),
    the two-sample figure; for paired booleans it is the bound for independent answers, conservative when the two
    runs agree more often than chance (they do on shared problems): pass the sd of the 0/±1 differences instead.
    """
    if (sd is None) == (p is None):
        raise ValueError("give exactly one of sd (a mean) or p (a rate)")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if sd is not None:
        se = sd / math.sqrt(n) if paired else sd * math.sqrt(2.0 / n)
    else:
        se = math.sqrt(2.0 * p * (1.0 - p) / n)
    return (norm_ppf(1.0 - alpha / 2.0) + norm_ppf(power)) * se
