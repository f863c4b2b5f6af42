import math

from mosaic_core.metrics import Rate, in_context_policy, rate


def test_wilson_interval_known_values():
    r = Rate(8, 10)
    lo, hi = r.ci95
    assert math.isclose(lo, 0.4902, abs_tol=1e-3) and math.isclose(hi, 0.9433, abs_tol=1e-3)  # textbook Wilson 95 %
    assert Rate(0, 20).ci95[0] == 0.0 and Rate(0, 20).ci95[1] > 0.1
    assert Rate(20, 20).ci95[1] == 1.0
    assert math.isnan(Rate(0, 0).value) and Rate(0, 0).fmt() == "–"
    assert rate([True, False, True, True]).to_dict()["rate"] == 0.75


def test_in_context_policy_names_every_active_category():
    p = in_context_policy(["alcohol", "betting"])
    assert "alcohol:" in p and "betting:" in p and "horror" not in p and "I'm sorry, but I can't help with that." in p
