import pytest

from assistant.chat import MAX_MESSAGE_CHARS, ChatInputError
from assistant.engine import Adapter
from store import NotFound


def _send(service, cid, text, user="alice"):
    replies = list(service.send(cid, user, text))
    return replies


def test_answer_streams_and_is_logged(service, engine, store):
    engine.enqueue("Paris is the capital.")
    cid = service.new_conversation("alice", "You are terse.")
    replies = _send(service, cid, "Capital of France?")
    texts = [r.text for r in replies if not r.done]
    assert texts[0] == "Paris" and texts[-1] == "Paris is the capital."  # grows token by token
    final = replies[-1]
    assert final.done and final.answer_id and final.model_label == "fake-model · base"
    row = store.answer(final.answer_id, "alice")
    assert row["content"] == "Paris is the capital."
    assert row["adapter_version"] is None and row["model"] == "fake-model"
    assert row["latency_ms"] >= 0 and row["completion_tokens"] == 4 and row["finish_reason"] == "stop"
    sent = engine.history[-1]["messages"]
    assert sent == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Capital of France?"},
    ]


def test_multi_turn_history_reaches_the_model(service, engine):
    cid = service.new_conversation("alice")
    engine.enqueue("one", "two")
    _send(service, cid, "first")
    _send(service, cid, "second")
    assert engine.history[-1]["messages"] == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "one"},
        {"role": "user", "content": "second"},
    ]


@pytest.mark.parametrize("text", ["", "   \n\t"])
def test_empty_message_is_refused_and_nothing_written(service, engine, store, text):
    cid = service.new_conversation("alice")
    with pytest.raises(ChatInputError, match="empty"):
        _send(service, cid, text)
    assert engine.history == [] and store.count("messages") == 0


def test_huge_message_is_refused_with_the_limit(service, store):
    cid = service.new_conversation("alice")
    with pytest.raises(ChatInputError, match=f"{MAX_MESSAGE_CHARS:,}"):
        _send(service, cid, "x" * (MAX_MESSAGE_CHARS + 1))
    assert store.count("messages") == 0


def test_long_history_is_trimmed_oldest_first_with_a_notice(service, engine, store):
    engine.context_tokens = 120  # 32 kept for the answer: 88 for the prompt
    cid = service.new_conversation("alice", "Persona stays.")
    for i in range(6):
        engine.enqueue(" ".join(["word"] * 10))
        _send(service, cid, f"question {i} " + "filler " * 8)
    replies = _send(service, cid, "last question")
    sent = engine.history[-1]["messages"]
    assert sent[0] == {"role": "system", "content": "Persona stays."}
    assert sent[-1] == {"role": "user", "content": "last question"}
    assert engine.count_tokens(sent) <= 120 - 32
    assert sent[1]["role"] == "user" and not sent[1]["content"].startswith("question 0")
    assert "older message(s) were left out" in replies[-1].notice
    row = store.answer(replies[-1].answer_id, "alice")
    assert row["trimmed_messages"] >= 2 and row["trimmed_messages"] % 2 == 0


def test_message_longer_than_the_context_is_cut_from_the_start(service, engine):
    engine.context_tokens = 100
    cid = service.new_conversation("alice")
    words = [f"w{i}" for i in range(300)]
    replies = _send(service, cid, " ".join(words))
    sent = engine.history[-1]["messages"][-1]["content"]
    assert sent.endswith("w299") and "w0 " not in sent
    assert engine.count_tokens(engine.history[-1]["messages"]) <= 100 - 32
    assert "too long for the model's context" in replies[-1].notice
    assert replies[-1].answer_id  # answered, no crash


def test_retry_answers_the_same_state_as_a_sibling(service, engine, store):
    cid = service.new_conversation("alice")
    engine.enqueue("first", "second")
    first = _send(service, cid, "hi")[-1]
    second = list(service.retry(first.answer_id, "alice"))[-1]
    a1, a2 = store.answer(first.answer_id, "alice"), store.answer(second.answer_id, "alice")
    assert a1["message_id"] == a2["message_id"] and a1["prompt_hash"] == a2["prompt_hash"]
    assert store.turns(cid, "alice")[-1].answer["content"] == "second"


def test_engine_failure_keeps_the_message_and_retry_answers_it(service, engine, store):
    cid = service.new_conversation("alice")
    engine.enqueue(RuntimeError("server died"), "recovered")
    failed = _send(service, cid, "hello")[-1]
    assert failed.done and failed.error and "server died" in failed.error and failed.answer_id is None
    assert store.count("messages") == 1 and store.count("answers") == 0
    ok = list(service.retry_message(failed.message_id, "alice"))[-1]
    assert ok.answer_id and store.answer(ok.answer_id, "alice")["content"] == "recovered"


def test_feedback_round_trip(service, engine, store):
    cid = service.new_conversation("alice")
    aid = _send(service, cid, "hi")[-1].answer_id
    assert service.rate(aid, "alice", 1) is None
    assert service.rate(aid, "alice", -1, "  too vague  ") == 1
    assert list(store.rows("ratings"))[-1]["comment"] == "too vague"
    new = service.edit(aid, "alice", "A better answer.")
    assert store.turns(cid, "alice")[-1].answer["id"] == new
    service.withdraw(new, "alice")
    assert store.turns(cid, "alice")[-1].answer["id"] == aid
    with pytest.raises(ChatInputError):
        service.edit(aid, "alice", "")
    with pytest.raises(NotFound):
        service.rate("01DOESNOTEXIST", "alice", 1)


def test_a_thumb_pressed_twice_clears_the_vote(service, store):
    cid = service.new_conversation("alice")
    aid = _send(service, cid, "hi")[-1].answer_id
    assert service.press_thumb(aid, "alice", 1) == (1, None)
    assert service.press_thumb(aid, "alice", 1) == (0, 1)  # the same thumb again: cleared
    assert service.press_thumb(aid, "alice", -1) == (-1, 0)
    assert service.press_thumb(aid, "alice", 1) == (1, -1)  # the other thumb replaces it
    assert store.current_rating(aid, "alice") == 1


def test_answers_record_the_adapter_that_made_them(store, engine):
    from assistant.chat import ChatService

    adapter = Adapter("v2-0123abcd", "/adapters/v2", 2)
    service = ChatService(store=store, engine=engine, adapter_for=lambda user: adapter)
    cid = service.new_conversation("bob")
    final = list(service.send(cid, "bob", "hello"))[-1]
    assert final.model_label == "fake-model · v2 (v2-0123abcd)"
    row = store.answer(final.answer_id, "bob")
    assert (row["adapter_name"], row["adapter_version"]) == ("v2-0123abcd", 2)
    assert engine.history[-1]["adapter"] == adapter


def test_persona_too_long_is_refused(service):
    with pytest.raises(ChatInputError, match="persona"):
        service.new_conversation("alice", "x" * 10_000)


def _hold_write_lock(path):
    import sqlite3

    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process writing for longer than the busy timeout
    return other


def test_a_database_too_busy_to_write_gives_a_clear_message_and_keeps_what_was_saved(
        tmp_path, engine, monkeypatch):
    import store.store as store_module
    from assistant.chat import ChatService, NotSaved
    from assistant.engine import Sampling
    from store import Store

    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_S", 0.2)
    db = Store(tmp_path / "a.db")
    service = ChatService(store=db, engine=engine, sampling=Sampling(max_new_tokens=32))
    cid = service.new_conversation("alice")
    engine.enqueue("first answer")
    first = _send(service, cid, "hello")[-1]

    lock = _hold_write_lock(tmp_path / "a.db")
    with pytest.raises(NotSaved, match=r"Your message could not be saved: the database said \"database is locked\""):
        _send(service, cid, "not saved")
    with pytest.raises(NotSaved, match="Your vote could not be saved"):
        service.rate(first.answer_id, "alice", 1)
    with pytest.raises(NotSaved, match="Your edit could not be saved"):
        service.edit(first.answer_id, "alice", "better")
    lock.rollback()

    engine.enqueue("second answer")
    replies = []
    for reply in service.send(cid, "alice", "saved, then its answer is not"):
        if not replies:  # the message is saved and the answer streams; then the database locks
            lock = _hold_write_lock(tmp_path / "a.db")
        replies.append(reply)
    lock.rollback()
    final = replies[-1]
    assert final.done and final.answer_id is None and final.text == "second answer"
    assert final.error.startswith("The answer could not be saved") and final.error.endswith("press retry.")
    turns = db.turns(cid, "alice")
    assert [t.message["content"] for t in turns] == ["hello", "saved, then its answer is not"]
    assert turns[0].answer["content"] == "first answer" and turns[1].answer is None
    assert db.current_rating(first.answer_id, "alice") is None and db.count("answers") == 1
    engine.enqueue("third answer")
    retried = list(service.retry_message(turns[1].message["id"], "alice"))[-1]  # retry works once free
    assert retried.answer_id and db.answer(retried.answer_id, "alice")["content"] == "third answer"


class CountingEngine:
    """The fake engine, counting how many characters the tokenizer is given."""

    def __init__(self, engine):
        self.engine, self.chars, self.calls = engine, 0, 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def count_tokens(self, messages):
        self.calls += 1
        self.chars += sum(len(m["content"]) for m in messages)
        return self.engine.count_tokens(messages)


def test_fitting_a_long_conversation_counts_each_message_once(store, engine):
    from assistant.chat import ChatService
    from assistant.engine import Sampling

    counting = CountingEngine(engine)
    service = ChatService(store=store, engine=counting, sampling=Sampling(max_new_tokens=32))
    history = []
    for i in range(100):  # the audit's 100 turns, each too long to keep many
        history += [{"role": "user", "content": f"question {i} " + "word " * 40},
                    {"role": "assistant", "content": f"answer {i} " + "word " * 40}]
    chars = sum(len(m["content"]) for m in history)
    prompt = service.build_prompt("Be brief.", history, "the last question")
    assert counting.chars <= 3 * chars + 1000  # linear: before, each dropped exchange re-counted the rest (~50x)
    budget = engine.context_tokens - 32
    assert engine.count_tokens(prompt.messages) <= budget  # it fits...
    kept = prompt.messages[1:-1]
    assert kept == history[len(history) - len(kept):] and kept[0]["role"] == "user"  # the newest exchanges...
    one_more = prompt.messages[:1] + history[len(history) - len(kept) - 2:] + prompt.messages[-1:]
    assert engine.count_tokens(one_more) > budget  # ...and no fewer than fit
    assert prompt.trimmed_messages == len(history) - len(kept)


def test_each_user_has_at_most_two_answers_generating_at_once(service, store):
    cid = service.new_conversation("alice")
    first, second = service.send(cid, "alice", "one"), service.send(cid, "alice", "two")
    next(first), next(second)  # both answers are streaming
    with pytest.raises(ChatInputError, match="You already have 2 answers being written"):
        next(service.send(cid, "alice", "three"))
    assert [t.message["content"] for t in store.turns(cid, "alice")] == ["one", "two"]  # the third not saved
    bob = service.new_conversation("bob")
    assert list(service.send(bob, "bob", "hi"))[-1].answer_id  # others are not held up
    list(first)  # one finishes: alice may send again
    assert list(service.send(cid, "alice", "three"))[-1].answer_id
    second.close()  # a stream the client dropped frees its place too
    assert list(service.send(cid, "alice", "four"))[-1].answer_id
