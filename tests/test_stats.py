"""common/stats.py against independent references: scipy (an oracle here only), exact enumeration, hand-worked
numbers, brute-force loops and seeded coverage simulations. About 5 s on two cores."""
import itertools
import math

import numpy as np
import pytest
from scipy import stats as sps

from common import stats


# ------------------------------------------------------------------------------------------ normal quantile

def test_norm_ppf_matches_scipy():
    ps = [1e-300, 1e-12, 1e-6, 1e-3, 0.01, 0.025, 0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.975, 0.999, 1 - 1e-9, 1 - 1e-12]
    for p in ps:
        assert stats.norm_ppf(p) == pytest.approx(sps.norm.ppf(p), rel=1e-12, abs=1e-12), p
        assert stats.norm_cdf(stats.norm_ppf(p)) == pytest.approx(p, rel=1e-9)
    assert stats.norm_ppf(0.0) == -math.inf and stats.norm_ppf(1.0) == math.inf
    assert stats.norm_ppf(0.975) == pytest.approx(1.959963984540054, abs=1e-12)  # the textbook 1.96


# ------------------------------------------------------------------------------------------ Clopper-Pearson

def test_rate_ci_matches_scipy_exact():
    for n in (1, 2, 3, 10, 37, 100, 501, 2000):
        for k in sorted({0, 1, 2, n // 3, n // 2, n - 2, n - 1, n} & set(range(n + 1))):
            for level in (0.95, 0.9):
                r = stats.rate_ci(k, n, level)
                ref = sps.binomtest(k, n).proportion_ci(confidence_level=level, method="exact")
                assert r["lo"] == pytest.approx(ref.low, abs=1e-6), (k, n, level)
                assert r["hi"] == pytest.approx(ref.high, abs=1e-6), (k, n, level)
                assert r["rate"] == k / n
    assert stats.rate_ci(0, 10)["lo"] == 0.0 and stats.rate_ci(10, 10)["hi"] == 1.0
    # Hand check: k = 0 has the closed form hi = 1 - (alpha/2)^(1/n).
    assert stats.rate_ci(0, 20)["hi"] == pytest.approx(1 - 0.025 ** (1 / 20), abs=1e-12)


def test_rate_ci_coverage_is_at_least_the_level():
    """Exact coverage (sum of the binomial pmf over the k whose interval holds p), on a grid of true p."""
    for n in (10, 30, 100):
        cis = [stats.rate_ci(k, n) for k in range(n + 1)]
        lo, hi = np.array([c["lo"] for c in cis]), np.array([c["hi"] for c in cis])
        cover = [sps.binom.pmf(np.arange(n + 1), n, p)[(lo <= p) & (p <= hi)].sum()
                 for p in np.linspace(0.005, 0.995, 199)]
        assert min(cover) >= 0.95 - 1e-12, n
        assert np.mean(cover) < 0.99, n  # conservative, not absurdly so (e.g. a 99 % interval by mistake)


def test_rate_ci_rejects_bad_counts():
    for k, n in ((3, 2), (-1, 5), (1.5, 4)):
        with pytest.raises(ValueError):
            stats.rate_ci(k, n)
    assert math.isnan(stats.rate_ci(0, 0)["lo"])


# ------------------------------------------------------------------------------------------ bootstrap mean

@pytest.mark.parametrize("method", ["percentile", "bca"])
def test_mean_ci_coverage_on_skewed_data(method):
    """600 seeded datasets of n = 50 from Exp(1) (skewness 2, mean 1): a 95 % interval covers the mean ~93 % of
    the time (92-95 % over other master seeds; the bootstrap is a little narrow at n = 50); SE of the share ~1 %."""
    rng = np.random.default_rng(123)
    hits = 0
    for _ in range(600):
        r = stats.mean_ci(rng.exponential(1.0, 50), n_boot=1000, seed=int(rng.integers(1 << 30)), method=method)
        hits += r["lo"] <= 1.0 <= r["hi"]
    assert 0.90 <= hits / 600 <= 0.98, hits / 600


@pytest.mark.parametrize("method", ["percentile", "bca"])
def test_mean_ci_matches_scipy_bootstrap(method):
    """Different resamples, so equal only up to Monte Carlo error: 2 % of the width at 40,000 resamples, while
    BCa and percentile differ here by more than 5 % (checked below), so the comparison tells them apart."""
    x = np.random.default_rng(7).exponential(size=30)
    r = stats.mean_ci(x, n_boot=40000, method=method)
    ref = sps.bootstrap((x,), np.mean, n_resamples=40000, method=method, random_state=1).confidence_interval
    width = ref.high - ref.low
    assert r["mean"] == pytest.approx(x.mean(), rel=1e-12)
    assert abs(r["lo"] - ref.low) < 0.02 * width and abs(r["hi"] - ref.high) < 0.02 * width
    other = stats.mean_ci(x, n_boot=40000, method="bca" if method == "percentile" else "percentile")
    assert abs(other["hi"] - r["hi"]) > 0.05 * width


def test_mean_ci_edge_cases_and_determinism():
    empty, one = stats.mean_ci([]), stats.mean_ci([0.3])
    assert math.isnan(empty["mean"]) and math.isnan(empty["lo"]) and empty["n"] == 0
    assert one["mean"] == 0.3 and math.isnan(one["lo"]) and math.isnan(one["hi"])
    for method in ("percentile", "bca"):
        assert stats.mean_ci([2.0] * 7, method=method) == {"n": 7, "mean": 2.0, "lo": 2.0, "hi": 2.0}
        r = stats.mean_ci([0, 1, 1, 0, 1, 1, 1, 0, 1, 1], method=method)  # 0/1 scores: ties at the mean
        assert 0.0 <= r["lo"] < r["mean"] < r["hi"] <= 1.0
    # Symmetric 0/1 data: many resampled means equal the mean; counted half below, z0 = 0 and, with zero skew,
    # BCa is the percentile interval (counting them as not below would shift BCa down).
    half = [0, 1] * 10
    assert stats.mean_ci(half, method="bca") == stats.mean_ci(half)
    x = np.random.default_rng(0).normal(size=100)
    assert stats.mean_ci(x, seed=3) == stats.mean_ci(x, seed=3) != stats.mean_ci(x, seed=4)
    with pytest.raises(ValueError):
        stats.mean_ci([1.0, float("nan")])
    with pytest.raises(ValueError):
        stats.mean_ci(x, method="student")


# ------------------------------------------------------------------------------------------ paired tests

def test_paired_bootstrap_against_normal_theory():
    """n = 400 normal differences: the bootstrap is close to mean +- z se and p = 2 Phi(-|mean| / se)."""
    rng = np.random.default_rng(11)
    a = rng.normal(size=400)
    b = a + rng.normal(0.1, 1.0, 400)
    r = stats.paired_bootstrap(a, b)
    d = b - a
    se = d.std() / math.sqrt(len(d))
    assert r["diff"] == pytest.approx(b.mean() - a.mean(), rel=1e-12)  # b - a
    assert r["lo"] == pytest.approx(d.mean() - 1.959964 * se, abs=0.05 * 3.92 * se)
    assert r["hi"] == pytest.approx(d.mean() + 1.959964 * se, abs=0.05 * 3.92 * se)
    assert r["p"] == pytest.approx(2 * sps.norm.sf(abs(d.mean()) / se), abs=0.015)
    same = stats.paired_bootstrap(a, a)
    assert same["p"] == 1.0 and same["lo"] == same["hi"] == 0.0
    with pytest.raises(ValueError):
        stats.paired_bootstrap([1, 2, 3], [1, 2])


def _enumerated_p(d):
    """Sign-flip p by looping over all 2^n sign patterns (zeros included: they double every count alike)."""
    t_obs = abs(sum(d))
    hits = sum(abs(sum(s * v for s, v in zip(signs, d))) >= t_obs - 1e-9
               for signs in itertools.product((-1, 1), repeat=len(d)))
    return hits / 2 ** len(d)


def test_paired_permutation_exact_matches_enumeration():
    rng = np.random.default_rng(5)
    a = rng.normal(size=10)
    b = a + rng.normal(0.5, 1.0, 10)
    r = stats.paired_permutation_p(a, b)
    assert r["exact"] and r["p"] == pytest.approx(_enumerated_p(list(b - a)), abs=1e-12)
    # Integer scores: zero differences and exact ties in |sum|.
    a = rng.integers(0, 3, 12)
    b = a + np.array([1, 0, 2, -1, 0, 1, 1, 0, -2, 1, 0, 1])
    r = stats.paired_permutation_p(a, b)
    assert r["exact"] and r["p"] == pytest.approx(_enumerated_p(list(b - a)), abs=1e-12)
    # Decimal steps: many patterns tie the observed |sum| exactly, yet their float sums differ in the last bit.
    d = [0.1, 0.2, 0.3, -0.1, 0.4, 0.1, 0.2, 0.3, -0.7, 0.1, 0.6, 0.3]
    assert stats.paired_permutation_p(np.zeros(12), d)["p"] == pytest.approx(_enumerated_p(d), abs=1e-12)
    assert stats.paired_permutation_p([1, 2], [1, 2])["p"] == 1.0


def test_paired_permutation_monte_carlo_near_exact():
    rng = np.random.default_rng(9)
    d = rng.normal(0.4, 1.0, 18)
    sums = np.zeros(1)
    for v in d:  # all 2^18 signed sums, built by doubling
        sums = np.concatenate([sums + v, sums - v])
    exact = np.mean(np.abs(sums) >= abs(d.sum()) - 1e-9)
    r = stats.paired_permutation_p(np.zeros(18), d, n_perm=20000)
    assert not r["exact"] and 0.01 < exact < 0.5
    assert abs(r["p"] - exact) < 4 * math.sqrt(exact * (1 - exact) / 20000)


def test_mcnemar_exact_hand_worked():
    # 2 problems only b gets right, 8 only a gets right, 30 both, 10 neither.
    a = [0] * 2 + [1] * 8 + [1] * 30 + [0] * 10
    b = [1] * 2 + [0] * 8 + [1] * 30 + [0] * 10
    r = stats.mcnemar_exact(a, b)
    assert (r["n"], r["n01"], r["n10"]) == (50, 2, 8)
    # P(X <= 2), X ~ Bin(10, 1/2) = (1 + 10 + 45) / 1024 = 0.0546875; two-sided p = 0.109375.
    assert r["p"] == pytest.approx(0.109375, abs=1e-15)
    assert stats.mcnemar_exact([True, False], [True, False])["p"] == 1.0  # no discordant pairs
    assert stats.mcnemar_exact([1, 0, 1, 0], [0, 1, 0, 1])["p"] == 1.0  # 2 vs 2: capped at 1


def test_mcnemar_exact_matches_scipy_binomtest():
    for n01, n10 in itertools.product((0, 1, 3, 7, 20, 150), repeat=2):
        if n01 + n10 == 0:
            continue
        a = np.r_[np.zeros(n01), np.ones(n10), np.ones(5)].astype(bool)
        b = np.r_[np.ones(n01), np.zeros(n10), np.ones(5)].astype(bool)
        ref = sps.binomtest(min(n01, n10), n01 + n10, 0.5).pvalue
        assert stats.mcnemar_exact(a, b)["p"] == pytest.approx(ref, rel=1e-9, abs=1e-300), (n01, n10)


# ------------------------------------------------------------------------------------------ Holm

def test_holm_hand_worked():
    # Sorted: 0.005 x4 = 0.02, 0.01 x3 = 0.03, 0.03 x2 = 0.06, 0.04 x1 = 0.04 -> running max 0.06.
    r = stats.holm([0.01, 0.04, None, 0.03, 0.005, float("nan")])
    assert r["m"] == 4
    assert r["p_adj"][:2] + r["p_adj"][3:5] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert math.isnan(r["p_adj"][2]) and math.isnan(r["p_adj"][5])
    assert r["reject"] == [True, False, False, False, True, False]
    assert stats.holm([0.5, 0.9])["p_adj"] == [1.0, 1.0]


def _holm_step_down(p, alpha):
    """Holm's procedure as written in the paper: walk up the sorted p-values, stop at the first failure."""
    valid = sorted((v, i) for i, v in enumerate(p) if v is not None and not math.isnan(v))
    reject = [False] * len(p)
    for r, (v, i) in enumerate(valid):
        if v > alpha / (len(valid) - r):
            break
        reject[i] = True
    return reject


def test_holm_matches_step_down_at_every_alpha():
    """p_adj is the smallest alpha at which the step-down rejects: check both sides of every threshold."""
    rng = np.random.default_rng(2)
    for trial in range(30):
        p = list(rng.uniform(0, 0.2, 8) ** 2) + [None, float("nan")]
        p[3] = p[5]  # a tie
        rng.shuffle(p)
        adj = stats.holm(p)["p_adj"]
        m = 8
        alphas = [t * f for v in p if v is not None and not math.isnan(v)
                  for t in (v * k for k in range(1, m + 1)) for f in (1 - 1e-9, 1 + 1e-9)]
        for alpha in alphas + list(np.linspace(0.001, 0.2, 40)):
            ref = _holm_step_down(p, alpha)
            assert stats.holm(p, alpha)["reject"] == ref, (trial, alpha)
            assert [a <= alpha for a in adj] == ref


# ------------------------------------------------------------------------------------------ correlations

def test_coefficients_match_scipy_with_ties():
    rng = np.random.default_rng(4)
    x = rng.integers(0, 5, 30).astype(float)
    y = x + rng.integers(0, 3, 30)
    assert np.allclose(stats.rankdata(x), sps.rankdata(x))
    assert stats.pearson(x, y) == pytest.approx(sps.pearsonr(x, y)[0], abs=1e-12)
    assert stats.spearman(x, y) == pytest.approx(sps.spearmanr(x, y)[0], abs=1e-12)
    assert stats.kendall(x, y) == pytest.approx(sps.kendalltau(x, y, variant="b")[0], abs=1e-12)
    assert math.isnan(stats.pearson(x, np.ones(30)))


def _models(rng, n_models=6, n_problems=200, noise=1.0):
    x = rng.uniform(0, 1, n_models)
    base = rng.uniform(0, 1, n_problems)
    scores = base[None, :] - 0.3 * x[:, None] + rng.normal(0, noise, (n_models, n_problems))
    return x, scores, base


@pytest.mark.parametrize("coef", [stats.pearson, stats.spearman, stats.kendall])
def test_resampled_correlation_point_and_exact_case(coef):
    rng = np.random.default_rng(8)
    x, scores, base = _models(rng)
    r = stats.resampled_correlation(x, scores, base, coef, n_boot=500)
    assert r["coef"] == pytest.approx(coef(x, base.mean() - scores.mean(axis=1)), abs=1e-12)  # dF = base - model
    assert r["lo"] <= r["coef"] <= r["hi"] and r["n_boot"] == 500
    # No per-problem noise: dF_m = 0.3 x_m on every resample, so every resampled coefficient is exactly 1.
    x, scores, base = _models(rng, noise=0.0)
    r = stats.resampled_correlation(x, scores, base, coef, n_boot=200)
    assert r["coef"] == pytest.approx(1.0) and r["lo"] == pytest.approx(1.0) and r["hi"] == pytest.approx(1.0)
    c = stats.compare_correlations(x, rng.permutation(x), scores, base, coef, n_boot=200)
    assert c["share"] == 1.0 and c["lo"] > 0


def test_resampled_targets_share_the_problem_resample():
    """The documented contract: same seed and problem count, same resamples. A 'coefficient' returning
    t[1] - t[0] = mean(s0 - s1) must give paired_bootstrap(s1, s0)'s interval, which only holds when both
    models see the same resampled problems (independent resamples would be far wider here)."""
    rng = np.random.default_rng(10)
    x, scores, base = _models(rng, n_models=3, noise=0.2)
    scores[1] = scores[0] + rng.normal(0.05, 0.05, scores.shape[1])  # strongly paired with model 0
    r = stats.resampled_correlation(x, scores, base, lambda x, t: t[1] - t[0], n_boot=1000, seed=6)
    ref = stats.paired_bootstrap(scores[1], scores[0], n_boot=1000, seed=6)
    assert (r["coef"], r["lo"], r["hi"]) == pytest.approx((ref["diff"], ref["lo"], ref["hi"]), abs=1e-12)
    m = stats.resampled_correlation(x, scores, None, lambda x, t: t[2], n_boot=1000, seed=6)
    assert (m["lo"], m["hi"]) == pytest.approx([stats.mean_ci(scores[2], n_boot=1000, seed=6)[k]
                                                for k in ("lo", "hi")], abs=1e-12)


def test_resampled_correlation_coverage():
    """200 seeded studies of 8 models x 100 problems: the percentile CI covers the correlation of x with the
    population dF (known here) a little under 95 % of the time (~92 %: r of noisy means is attenuated, and the
    percentile interval does not correct the bias); 0 % if the problems were not resampled, ~100 % if each model
    had its own resample."""
    rng = np.random.default_rng(12)
    x = np.linspace(0, 1, 8)
    true_drop = 0.3 * x + np.array([0.1, -0.05, 0.0, 0.08, -0.1, 0.02, 0.05, -0.03])
    truth = stats.pearson(x, true_drop)
    hits = 0
    for _ in range(200):
        base = rng.uniform(0, 1, 100)
        scores = base[None, :] - true_drop[:, None] + rng.normal(0, 0.1, (8, 100))
        r = stats.resampled_correlation(x, scores, base, stats.pearson, n_boot=300, seed=int(rng.integers(1 << 30)))
        hits += r["lo"] <= truth <= r["hi"]
    assert 0.86 <= hits / 200 <= 0.98, hits / 200


def test_compare_correlations_same_metric():
    x, scores, base = _models(np.random.default_rng(3))
    c = stats.compare_correlations(x, x, scores, base, stats.spearman, n_boot=200)
    assert c["diff"] == 0.0 and c["lo"] == c["hi"] == 0.0 and c["share"] == 0.0  # ties count for neither
    with pytest.raises(ValueError):
        stats.resampled_correlation(x[:-1], scores, base, stats.pearson)


# ------------------------------------------------------------------------------------------ power

def test_min_detectable_difference():
    z = sps.norm.ppf(0.975) + sps.norm.ppf(0.8)  # 2.8015852...
    assert stats.min_detectable_difference(100, sd=1.0) == pytest.approx(0.28015852, abs=1e-8)
    assert stats.min_detectable_difference(100, sd=1.0, paired=False) == pytest.approx(z * math.sqrt(2 / 100))
    mdd = stats.min_detectable_difference(200, p=0.5)
    assert mdd == pytest.approx(0.14007926, abs=1e-8)  # z * sqrt(2 * 0.25 / 200) = z * 0.05
    se = math.sqrt(2 * 0.25 / 200)  # at the MDD a two-sided z-test has the asked power (both tails counted)
    assert sps.norm.sf(sps.norm.ppf(0.975) - mdd / se) + sps.norm.cdf(-sps.norm.ppf(0.975) - mdd / se) == \
        pytest.approx(0.8, abs=1e-3)
    with pytest.raises(ValueError):
        stats.min_detectable_difference(100)


# ------------------------------------------------------------------------------------------------ ratio of sums

def test_ratio_ci_is_the_ratio_of_resampled_sums_by_brute_force():
    rng = np.random.default_rng(5)
    num, den = rng.gamma(2.0, 50.0, 12), rng.integers(50, 400, 12).astype(float)
    got = stats.ratio_ci(num, den, n_boot=500, seed=3)
    assert got["ratio"] == pytest.approx(num.sum() / den.sum(), rel=1e-12)
    # the same resamples, drawn one by one the way _resampled_means draws them
    idx = np.random.default_rng(3).integers(0, 12, size=(500, 12))
    boot = np.array([num[i].sum() / den[i].sum() for i in idx])
    lo, hi = np.quantile(boot, [0.025, 0.975])
    assert (got["lo"], got["hi"]) == (pytest.approx(lo, rel=1e-12), pytest.approx(hi, rel=1e-12))
    assert got["lo"] < got["ratio"] < got["hi"]


def test_ratio_ci_refuses_what_it_cannot_divide():
    with pytest.raises(ValueError, match="positive"):
        stats.ratio_ci([1.0, 2.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="equal lengths"):
        stats.ratio_ci([1.0, 2.0], [1.0])
    one = stats.ratio_ci([3.0], [2.0])
    assert one["ratio"] == 1.5 and math.isnan(one["lo"])
