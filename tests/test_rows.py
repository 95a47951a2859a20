"""The forms values have in stored rows (store.rows) stay the ones existing databases hold.

The literal strings and hashes below are what the code wrote before store/rows.py existed
(store.store.hash_prompt and canonical_json since the first commit, tuning.pairs' ids since
they were made): rows and versions recorded then must mean the same thing now.
"""

import json

import pytest

from feedback_scenario import TopicEmbedder
from store.rows import canonical_json, decode_json, encode_json, hash_prompt
from tuning.grouping import group_prompts
from tuning.pairs import build_preferences

PROMPT = [{"role": "system", "content": "Réponds en français."}, {"role": "user", "content": "Où est Paris ? 🗼"}]
# answers.prompt_json and answers.prompt_hash for PROMPT, as the first version stored them.
STORED_JSON = '[{"content":"Réponds en français.","role":"system"},{"content":"Où est Paris ? 🗼","role":"user"}]'
STORED_HASH = "21597b6765693cd5658df57afa47bf72c53fc36a522aedae725262e97d308b04"
# The id tuning.pairs gave the edit pair (chosen "À Paris.", rejected "Lyon.") on PROMPT,
# as versions recorded it in adapters.pair_ids_json.
RECORDED_PAIR_ID = "810634acbcb42dcf246a"


def _edited(store):
    cid = store.create_conversation("alice", system_prompt=PROMPT[0]["content"])
    mid = store.add_message(cid, "alice", PROMPT[1]["content"])
    aid = store.log_answer(message_id=mid, user_id="alice", prompt=PROMPT, content="Lyon.", model="m")
    store.edit_answer(aid, "alice", "À Paris.")
    return aid


@pytest.fixture
def store(store_on_each):  # the same forms on SQLite and on PostgreSQL
    return store_on_each


def test_the_prompt_hash_is_the_one_rows_already_hold():
    assert canonical_json(PROMPT) == STORED_JSON
    assert hash_prompt(PROMPT) == STORED_HASH
    assert hash_prompt(json.loads(STORED_JSON)) == STORED_HASH  # read back from a row


def test_every_stored_prompt_hash_is_the_hash_of_its_prompt_and_grouping_uses_it(store):
    _edited(store)
    rows = list(store.rows("answers"))
    assert len(rows) == 2 and {r["prompt_json"] for r in rows} == {STORED_JSON}
    assert all(r["prompt_hash"] == STORED_HASH for r in rows)
    answers = store.training_feedback()["answers"]
    assert [hash_prompt(a["prompt"]) for a in answers] == [a["prompt_hash"] for a in answers]
    grouping = group_prompts([a["prompt"] for a in answers], TopicEmbedder(), 0.9, 1000, True)
    assert set(grouping.group_of) == {STORED_HASH}  # paraphrase groups are keyed by the stored hash


def test_a_rebuilt_pair_keeps_the_id_versions_recorded_for_it(store):
    aid = _edited(store)
    pairs = build_preferences(store, embedder=TopicEmbedder()).pairs
    assert [(p.id, p.rejected_answer_id) for p in pairs] == [(RECORDED_PAIR_ID, aid)]


def test_json_columns_are_stored_canonically_and_read_back_decoded(store):
    job = store.create_job("alice", {"b": 1, "a": "é"})
    store.update_job(job, progress_json={"step": 2, "loss": 0.5}, error=None)
    raw = store.db.execute("SELECT config_json, progress_json FROM training_jobs").fetchone()
    assert raw == ('{"a":"é","b":1}', '{"loss":0.5,"step":2}')
    assert store.job(job)["config_json"] == {"a": "é", "b": 1}
    assert encode_json({"x_json": "[1, 2]", "y_json": None, "z": [1]}) == {"x_json": "[1, 2]", "y_json": None, "z": [1]}
    assert decode_json({"x_json": "[1, 2]", "y_json": None}) == {"x_json": [1, 2], "y_json": None}
