"""The load test's version check (bench/load_test.py), without servers: which versions an
answer may come from, on the admin's replica and on another one that polls the promotions."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("load_test", ROOT / "bench" / "load_test.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["load_test"] = module  # dataclasses look their module up while being made
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("load_test", None)


@pytest.fixture
def swaps(bench):
    """v1 promoted by a call from 10.0 to 10.2 s, rolled back to base from 20.0 to 20.1 s."""
    return [bench.AdminAction("promote", 1, 10.0, 10.2), bench.AdminAction("rollback", None, 20.0, 20.1)]


def chat(bench, submitted, first, replica=0):
    return bench.Chat("u", submitted, first=first, end=first + 1, replica=replica)


def test_the_admins_replica_allows_only_what_was_live_between_submit_and_first_token(bench, swaps):
    assert bench.allowed_versions(chat(bench, 5.0, 6.0), swaps) == {None}
    assert bench.allowed_versions(chat(bench, 9.0, 10.1), swaps) == {None, 1}  # the promote was under way
    assert bench.allowed_versions(chat(bench, 10.5, 11.0), swaps) == {1}  # promoted: base is wrong now
    assert bench.allowed_versions(chat(bench, 25.0, 26.0), swaps) == {None}


def test_another_replica_may_serve_the_version_before_for_the_lag_after_the_reply(bench, swaps):
    late = chat(bench, 11.5, 11.8, replica=1)
    assert bench.allowed_versions(late, swaps, lag=2.0) == {None, 1}
    assert bench.allowed_versions(late, swaps, lag=0.0) == {1}
    assert bench.late_by(late, swaps) == pytest.approx(1.3)
    past = chat(bench, 12.5, 13.0, replica=1)  # beyond the lag: only v1
    assert bench.allowed_versions(past, swaps, lag=2.0) == {1}
    # The lag never allows a version before it was promoted.
    assert 1 not in bench.allowed_versions(chat(bench, 5.0, 6.0, replica=1), swaps, lag=2.0)


def test_a_failed_admin_call_changes_nothing(bench):
    failed = [bench.AdminAction("promote", 1, 10.0, 10.2, error="refused")]
    assert bench.allowed_versions(chat(bench, 9.0, 12.0), failed) == {None}
