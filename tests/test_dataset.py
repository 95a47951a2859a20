"""SFT data sets: each kind of bad upload gets a report naming the problem and nothing is kept;
a clean one is kept under its content hash and reads back the same."""

import json

import pytest

from tiny import tiny_tokenizer
from tuning import dataset as ds


def jsonl(*rows) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


def qa(i, answer="It is blue."):
    return {"prompt": f"What colour is widget {i}?", "completion": answer}


def check(data: bytes, heldout: bytes | None = None, **kw):
    return ds.read_uploaded(data, heldout, name="upload.jsonl", **kw)


def test_both_formats_read_alike_and_hash_the_same():
    msgs = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
            for r in (qa(1), qa(2))]
    a, b = check(jsonl(qa(1), qa(2))), check(jsonl(*msgs))
    assert a.ok and b.ok and a.format == "prompt/completion" and b.format == "messages"
    assert a.rows == b.rows and a.hash == b.hash and len(a.hash) == 64
    assert "OK" in a.text()


@pytest.mark.parametrize("data, words", [
    (b"", "empty"),
    (b"not json\n", "not JSON"),
    (jsonl({"question": "x", "answer": "y"}), "no 'messages'"),
    (jsonl({"messages": [{"role": "user", "content": "hi"}]}), "last message must be the assistant"),
    (jsonl({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}), "role"),
    (jsonl({"prompt": "hi", "completion": "   "}), "empty assistant"),
    (jsonl(qa(1, "NUL\u0000here")), "NUL"),
    (jsonl(qa(1, "\x1b[2Jcleared")), "U+001B"),
    (jsonl('{"prompt": "x\\ud800", "completion": "y"}'), "lone surrogate"),
    (jsonl(qa(1, "x" * (ds.MAX_TEXT_CHARS + 1))), "characters (limit"),
    (jsonl(qa(1), qa(2), {"prompt": "what colour is WIDGET  1?", "completion": "It is blue."}), "duplicate"),
    (b"\xff\xfe bad bytes\n", "not UTF-8"),
])
def test_bad_uploads_are_refused_with_the_reason(data, words):
    report = check(data)
    assert not report.ok and report.hash is None
    assert words in report.text(), report.text()
    assert "REFUSED" in report.text()


def test_a_held_out_question_that_is_a_training_question_is_a_leak():
    report = check(jsonl(qa(1), qa(2)), jsonl({**qa(2), "expect": ["blue"]}))
    assert not report.ok and "also training questions" in report.text()


def test_too_many_rows_and_too_big_files_are_refused_before_reading(tmp_path, monkeypatch):
    monkeypatch.setattr(ds, "MAX_ROWS", 3)
    assert "more than 3 rows" in check(jsonl(*(qa(i) for i in range(5)))).text()
    big = tmp_path / "big.jsonl"
    big.write_bytes(jsonl(qa(1)) * 10)
    monkeypatch.setattr(ds, "MAX_FILE_BYTES", 100)
    opened = []
    monkeypatch.setattr("builtins.open", lambda *a, **k: opened.append(a) or (_ for _ in ()).throw(AssertionError))
    report = ds.read_dataset(big)
    assert not report.ok and "the limit is 100" in report.text() and not opened


def test_rows_the_context_would_cut_are_a_warning_with_their_lines():
    report = check(jsonl(qa(1), qa(2, "long " * 60)), tokenizer=tiny_tokenizer(), max_length=100)
    assert report.ok  # cut, not refused
    assert report.stats["cut_rows"] == 1 and "line 2" in report.text() and "will be cut" in report.text()


def test_a_clean_set_is_kept_under_its_hash_and_reads_back(tmp_path):
    report = check(jsonl(qa(1), qa(2)), jsonl({"prompt": "Which colour has widget 1?", "completion": "Blue.",
                                                "expect": "blue"}))
    digest = ds.store_dataset(tmp_path, report)
    train, held = ds.load_dataset(tmp_path, digest)
    assert [r["messages"][-1]["content"] for r in train] == ["It is blue.", "It is blue."]
    assert held[0]["expect"] == ["blue"] and held[0]["split"] == "heldout"
    assert ds.dataset_report(tmp_path, digest)["rows"] == 2
    (tmp_path / "datasets" / f"{digest}.jsonl").write_text("tampered\n")
    with pytest.raises(ValueError, match="changed on disk"):
        ds.load_dataset(tmp_path, digest)
    with pytest.raises(ValueError, match="not a data set hash"):
        ds.load_dataset(tmp_path, "../../etc/passwd")
    with pytest.raises(ValueError, match="report is clean"):
        ds.store_dataset(tmp_path, check(b""))


def test_a_datasets_folder_reads_its_train_and_test_splits(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list([qa(1), qa(2)]),
                 "test": Dataset.from_list([{"prompt": "Widget 1's colour?", "completion": "Blue."}])}
                ).save_to_disk(str(tmp_path / "set"))
    report = ds.read_dataset(tmp_path / "set")
    assert report.ok and len(report.rows) == 2 and len(report.heldout) == 1
    assert not ds.read_dataset(tmp_path / "nothing-here").ok


def test_users_edits_become_sft_rows_checked_like_the_file(store, tmp_path):
    from feedback_scenario import SAME, TopicEmbedder, build_scenario
    from tuning.pairs import build_preferences

    build_scenario(store)
    rows = ds.edit_rows(store, TopicEmbedder(SAME))
    edits = [p for p in build_preferences(store, embedder=TopicEmbedder(SAME)).train_pairs if p.signal == "edit"]
    assert rows and len(rows) == len(edits)
    assert [r["messages"][-1] for r in rows] == [p.chosen[0] for p in edits]  # the user's rewrite is the answer
    path = tmp_path / "file.jsonl"
    path.write_bytes(jsonl(qa(1), qa(2)))
    report = ds.read_dataset(path, extra=rows)
    assert report.ok and len(report.rows) == 2 + len(rows) and "from users' edits" in report.text()
    assert {r["id"] for r in report.rows[2:]} == {r["id"] for r in rows}
