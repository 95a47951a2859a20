"""The command line: accounts, exit codes, first-admin bootstrap."""

import subprocess
import sys

import pytest

from store import Store

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def cli(tmp_path, *args, stdin=""):
    return subprocess.run(
        [sys.executable, str(ROOT / "app.py"), "--data-dir", str(tmp_path), *args],
        input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=120,
    )


def test_users_add_list_passwd_admin(tmp_path):
    r = cli(tmp_path, "users", "add", "carol", "--password-stdin", stdin="carol-password\n")
    assert r.returncode == 0, r.stderr
    r = cli(tmp_path, "users", "add", "carol", "--password-stdin", stdin="carol-password\n")
    assert r.returncode == 3 and "already exists" in r.stderr
    r = cli(tmp_path, "users", "add", "dave", "--password-stdin", stdin="short\n")
    assert r.returncode == 3 and "at least 8" in r.stderr
    assert cli(tmp_path, "users", "admin", "carol").returncode == 0
    listing = cli(tmp_path, "users", "list").stdout
    assert "carol\tadmin" in listing and "dave" not in listing
    assert cli(tmp_path, "users", "passwd", "nobody", "--password-stdin", stdin="whatever-pw\n").returncode == 3
    store = Store(tmp_path / "assistant.db")
    assert store.verify_password("carol", "carol-password") and store.is_admin("carol")


def test_unknown_command_is_a_usage_error(tmp_path):
    r = cli(tmp_path, "users", "frobnicate")
    assert r.returncode == 2


def test_first_admin_is_created_once(tmp_path, capsys, monkeypatch):
    from app import ensure_first_admin

    store = Store(tmp_path / "a.db")
    monkeypatch.delenv("ASSISTANT_ADMIN_PASSWORD", raising=False)
    ensure_first_admin(store)
    out = capsys.readouterr().out
    password = out.split("password '")[1].split("'")[0]
    assert store.is_admin("admin") and store.verify_password("admin", password)
    ensure_first_admin(store)
    assert capsys.readouterr().out == ""  # shown only once

    other = Store(tmp_path / "b.db")
    monkeypatch.setenv("ASSISTANT_ADMIN_PASSWORD", "chosen-by-me")
    ensure_first_admin(other)
    assert capsys.readouterr().out == "" and other.verify_password("admin", "chosen-by-me")


def test_train_from_the_command_line_refuses_while_another_job_is_active(tmp_path):
    store = Store(tmp_path / "assistant.db")
    store.create_user("root", "root-password", is_admin=True)
    queued = store.create_job("root", {}, status="queued")  # e.g. launched by the console a moment ago
    r = cli(tmp_path, "train", "--as", "root")
    assert r.returncode == 3 and f"Training job {queued} is still queued; wait or cancel it." in r.stderr
    assert [j["id"] for j in store.jobs()] == [queued]  # no second job row, nothing trained


def test_a_job_asking_for_a_rank_serving_would_refuse_is_refused_before_it_trains(tmp_path):
    store = Store(tmp_path / "assistant.db")
    store.create_user("root", "root-password", is_admin=True)
    r = cli(tmp_path, "train", "--as", "root", "--set", "rank=48", "--priority", "normal")
    assert r.returncode == 2 and "rank 48 exceeds the served LoRA rank limit max_rank=32" in r.stderr
    assert store.jobs() == []  # no job row: nothing was queued, nothing trained
    queued = store.create_job("root", {"rank": 48}, status="queued")  # e.g. a job queued before the limit
    r = cli(tmp_path, "train", "--as", "root", "--job", queued, "--priority", "normal")
    job = store.job(queued)
    assert r.returncode == 2 and job["status"] == "failed" and "served LoRA rank limit" in job["error"]
    assert job["started_utc"] is None  # failed before it started training


def test_a_user_named_scheduler_cannot_start_training_as_the_app(tmp_path):
    store = Store(tmp_path / "assistant.db")
    store.create_user("root", "root-password", is_admin=True)
    # An account named "scheduler" from before that name was reserved; it is no admin.
    store.db["users"].insert({"name": "scheduler", "password_hash": "x", "is_admin": 0, "disabled": 0,
                              "created_utc": "2026-01-01T00:00:00+00:00"})
    r = cli(tmp_path, "train", "--as", "scheduler", "--priority", "normal")
    assert r.returncode == 3 and "'scheduler' is not an admin account" in r.stderr
    # The app's own actors are refused when typed, unless they run a job the app queued.
    for actor in ("system:scheduler", "system:launcher"):
        r = cli(tmp_path, "train", "--as", actor, "--priority", "normal")
        assert r.returncode == 3 and "one of the app's own actors" in r.stderr
    r = cli(tmp_path, "train", "--as", "system:launcher", "--job", "nope", "--priority", "normal")
    assert r.returncode == 3 and "no training job 'nope'" in r.stderr
    assert store.jobs() == []
    done = store.create_job("root", {}, status="succeeded")
    r = cli(tmp_path, "train", "--as", "system:launcher", "--job", done, "--priority", "normal")
    assert r.returncode == 3 and "is succeeded, not queued" in r.stderr
    # What the app's launcher runs: a job the console queued (here without data to train on).
    queued = store.create_job("root", {}, status="queued")
    r = cli(tmp_path, "train", "--as", "system:launcher", "--job", queued, "--priority", "normal")
    assert r.returncode == 1 and "not enough preference data" in r.stderr
    r = cli(tmp_path, "users", "add", "scheduler", "--password-stdin", stdin="long-enough-pw\n")
    assert r.returncode == 3 and "app's own actions" in r.stderr


def test_only_one_of_many_racing_job_starts_gets_a_job(tmp_path):
    import threading

    from store import JobConflict

    store = Store(tmp_path / "assistant.db")
    barrier, won, refused = threading.Barrier(8), [], []

    def start(i):
        barrier.wait()
        try:
            won.append(store.queue_job(f"admin{i}", {}))
        except JobConflict as e:
            refused.append(str(e))

    threads = [threading.Thread(target=start, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 7 and [j["id"] for j in store.jobs()] == won
    assert all(f"Training job {won[0]} is still queued" in e for e in refused)


def test_a_command_line_job_is_running_with_its_pid_from_the_start_and_failed_when_there_is_no_data(tmp_path):
    store = Store(tmp_path / "assistant.db")
    store.create_user("root", "root-password", is_admin=True)
    r = cli(tmp_path, "train", "--as", "root")
    (job,) = store.jobs()
    assert r.returncode == 1 and "not enough preference data" in r.stderr
    # While it built pairs the row said running, with the process and a heartbeat, so an
    # app starting meanwhile (which fails queued jobs) would have left it alone.
    assert job["status"] == "failed" and job["pid"] and job["started_utc"] and job["heartbeat_utc"]
    assert job["error"].startswith("not enough preference data") and job["created_by"] == "root"


def test_users_disable_and_enable(tmp_path):
    assert cli(tmp_path, "users", "add", "erin", "--password-stdin", stdin="erin-password\n").returncode == 0
    assert cli(tmp_path, "users", "disable", "erin").returncode == 0
    assert "erin\tuser\t" in (listing := cli(tmp_path, "users", "list").stdout) and listing.rstrip().endswith("disabled")
    store = Store(tmp_path / "assistant.db")
    assert not store.verify_password("erin", "erin-password")
    assert cli(tmp_path, "users", "enable", "erin").returncode == 0
    assert store.verify_password("erin", "erin-password")
    assert cli(tmp_path, "users", "disable", "nobody").returncode == 3


def test_train_from_the_command_line_first_fails_a_job_whose_process_died(tmp_path):
    store = Store(tmp_path / "assistant.db")
    store.create_user("root", "root-password", is_admin=True)
    dead = store.create_job("root", {}, status="running")  # its process was SIGKILLed
    store.update_job(dead, pid=999_999_999, started_utc="2026-01-01T00:00:00+00:00")
    r = cli(tmp_path, "train", "--as", "root", "--priority", "normal")
    assert f"job {dead}: marked failed (its process died)" in r.stdout
    assert store.job(dead)["status"] == "failed" and "ended without finishing" in store.job(dead)["error"]
    (new,) = [j for j in store.jobs() if j["id"] != dead]
    assert r.returncode == 1 and new["error"].startswith("not enough preference data")  # not refused: it ran


def test_vllm_servers_come_from_repeated_urls_and_a_file_each_once(tmp_path):
    import app

    listed = tmp_path / "vllm-servers.txt"
    listed.write_text("# the pool\nhttp://10.0.0.6:8000/\n\nhttp://10.0.0.5:8000  # again\nhttp://10.0.0.7:8000\n")
    a = app.parser().parse_args(["serve", "--vllm-url", "http://10.0.0.5:8000", "--vllm-url", "http://10.0.0.6:8000",
                                 "--vllm-urls-file", str(listed)])
    assert app.serve_config(a).vllm_urls == ("http://10.0.0.5:8000", "http://10.0.0.6:8000", "http://10.0.0.7:8000")
    assert app.serve_config(app.parser().parse_args(["serve"])).vllm_urls == ()  # the app starts its own: a pool of one
    listed.write_text("# nobody\n")
    with pytest.raises(SystemExit, match="lists no vLLM server"):
        app.serve_config(app.parser().parse_args(["serve", "--vllm-urls-file", str(listed)]))
