from collections import Counter

import pytest

from assistant.serving import in_canary
from loop.canary import CanaryConfig, compare, wilson


def test_assignment_is_sticky_and_matches_the_share():
    users = [f"user{i}" for i in range(4000)]
    picked = [u for u in users if in_canary(u, "canary-1", 0.25)]
    assert 0.22 < len(picked) / len(users) < 0.28
    assert picked == [u for u in users if in_canary(u, "canary-1", 0.25)]  # same every time
    other = {u for u in users if in_canary(u, "canary-2", 0.25)}
    assert 0.1 < len(other & set(picked)) / len(picked) < 0.4  # independent between canaries
    assert not in_canary("x", "c", 0.0) and in_canary("x", "c", 1.0)


def test_clearly_worse_candidate_is_flagged():
    v = compare(live_up=80, live_down=20, cand_up=40, cand_down=60)
    assert v.enough_votes and v.clearly_worse and v.p_value < 1e-6
    assert v.summary() == ("Candidate 40% thumbs-up of 100 votes (95% CI 31%-50%); live 80% thumbs-up of 100 votes "
                           f"(95% CI 71%-87%): clearly worse (one-sided Fisher p = {v.p_value:.3g}).")


def test_similar_or_better_candidate_is_not_flagged():
    assert not compare(80, 20, 78, 22).clearly_worse
    assert not compare(50, 50, 90, 10).clearly_worse


def test_small_samples_give_no_verdict():
    v = compare(live_up=10, live_down=0, cand_up=0, cand_down=10)
    assert not v.enough_votes and not v.clearly_worse
    assert v.summary().endswith("Not enough votes yet for a verdict.")
    assert compare(10, 0, 0, 10, CanaryConfig(min_votes=5)).clearly_worse


def test_wilson_interval_contains_the_rate():
    lo, hi = wilson(30, 100)
    assert lo < 0.3 < hi and hi - lo < 0.2
    assert wilson(0, 0) == (0.0, 1.0)


def test_wilson_interval_gives_the_textbook_values():
    # The Wilson score interval at z = 1.96, as the canary computed it by hand before scipy
    # (scipy's z is 1.95996..., the same to 1e-4).
    known = {(30, 100): (0.21895, 0.39585), (0, 10): (0.0, 0.27754), (10, 10): (0.72246, 1.0),
             (1, 2): (0.09453, 0.90547), (45, 60): (0.62768, 0.84224)}
    for (up, total), (lo, hi) in known.items():
        assert wilson(up, total) == pytest.approx((lo, hi), abs=1e-4), (up, total)
        assert 0.0 <= wilson(up, total)[0] and wilson(up, total)[1] <= 1.0
