"""Sign-in checks without a server: the password check's cost, the backoff, sessions."""

import hashlib

import store.passwords as passwords


def test_unknown_and_known_names_cost_one_scrypt_of_the_same_size(store, monkeypatch):
    """Audit item 9: an unknown name took two scrypt runs (83 ms vs 42 ms), telling which
    names exist. Now every check runs exactly one, with the same parameters."""
    store.create_user("alice", "alice-password")
    calls = []
    real = hashlib.scrypt

    def counting(password, **kw):
        calls.append((kw["n"], kw["r"], kw["p"], kw["dklen"]))
        return real(password, **kw)

    monkeypatch.setattr(passwords.hashlib, "scrypt", counting)
    passwords.dummy_hash()  # made once per process; not part of any check
    for name, password, ok in [("alice", "alice-password", True), ("alice", "wrong-password", False),
                               ("nobody", "whatever-pw", False)]:
        calls.clear()
        assert store.verify_password(name, password) is ok
        assert calls == [(passwords.N, passwords.R, passwords.P, 32)], name
