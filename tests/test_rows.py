"""The forms values have in stored rows (store.rows) stay the ones existing databases hold.

The literal strings and hashes below are what the code wrote before store/rows.py existed
(store.store.hash_prompt and canonical_json, unchanged since the first commit): rows
recorded then must mean the same thing now.
"""

import json

from store.rows import canonical_json, decode_json, encode_json, hash_prompt

PROMPT = [{"role": "system", "content": "Réponds en français."}, {"role": "user", "content": "Où est Paris ? 🗼"}]
# answers.prompt_json and answers.prompt_hash for PROMPT, as the first version stored them.
STORED_JSON = '[{"content":"Réponds en français.","role":"system"},{"content":"Où est Paris ? 🗼","role":"user"}]'
STORED_HASH = "21597b6765693cd5658df57afa47bf72c53fc36a522aedae725262e97d308b04"


def test_the_prompt_hash_is_the_one_rows_already_hold():
    assert canonical_json(PROMPT) == STORED_JSON
    assert hash_prompt(PROMPT) == STORED_HASH
    assert hash_prompt(json.loads(STORED_JSON)) == STORED_HASH  # read back from a row


def test_json_columns_are_stored_canonically_and_read_back_decoded(store):
    job = store.create_job("alice", {"b": 1, "a": "é"})
    store.update_job(job, progress_json={"step": 2, "loss": 0.5}, error=None)
    raw = store.db.execute("SELECT config_json, progress_json FROM training_jobs").fetchone()
    assert raw == ('{"a":"é","b":1}', '{"loss":0.5,"step":2}')
    assert store.job(job)["config_json"] == {"a": "é", "b": 1}
    assert encode_json({"x_json": "[1, 2]", "y_json": None, "z": [1]}) == {"x_json": "[1, 2]", "y_json": None, "z": [1]}
    assert decode_json({"x_json": "[1, 2]", "y_json": None}) == {"x_json": [1, 2], "y_json": None}
