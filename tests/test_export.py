"""Exports: JSONL and datasets folders that load directly into TRL's record shapes."""

import json

import pytest
from feedback_scenario import SAME, TopicEmbedder, build_scenario

from store import Store
from tuning import export
from tuning.pairs import PairConfig, build_preferences

CONFIG = PairConfig(per_user_cap=4, eval_fraction=0.25)


@pytest.fixture
def built(store):
    ids = build_scenario(store)
    return ids, build_preferences(store, CONFIG, TopicEmbedder(SAME))


def test_jsonl_loads_with_datasets_in_trl_shapes(built, tmp_path):
    from datasets import load_dataset
    from trl.data_utils import is_conversational, unpair_preference_dataset

    _, data = built
    files = export.export_preferences(data, tmp_path / "out")
    pairs = load_dataset("json", data_files={"train": str(files["pairs_train"]), "eval": str(files["pairs_eval"])})
    assert (len(pairs["train"]), len(pairs["eval"])) == (9, 1)
    row = pairs["eval"][0]
    assert {"prompt", "chosen", "rejected"} <= set(row)
    assert is_conversational(row)
    assert row["chosen"] == [{"role": "assistant", "content": "Joyful."}]
    assert row["rejected"] == [{"role": "assistant", "content": "Sad."}]
    assert row["prompt"][-1] == {"role": "user", "content": "Give me a synonym for happy"}
    # TRL's own converter reads the pair columns and yields its unpaired form.
    as_unpaired = unpair_preference_dataset(pairs["eval"])
    assert as_unpaired["label"] == [True, False]
    assert as_unpaired["completion"][0] == [{"role": "assistant", "content": "Joyful."}]

    unpaired = load_dataset("json", data_files=str(files["unpaired_eval"]), split="train")
    assert sorted(unpaired["label"]) == [False, True]
    assert {"prompt", "completion", "label"} <= set(unpaired.column_names)
    assert is_conversational(unpaired[0])


def test_dataset_folders_hold_both_splits_even_when_one_is_empty(built, tmp_path):
    from datasets import load_from_disk

    _, data = built
    files = export.export_preferences(data, tmp_path / "out")
    pairs = load_from_disk(str(files["pairs"]))
    assert pairs["train"].num_rows == 9 and pairs["eval"].num_rows == 1
    assert set(pairs["train"][0]["chosen"][0]) == {"role", "content"}
    unpaired = load_from_disk(str(files["unpaired"]))
    assert unpaired["train"].num_rows == 0  # both unpaired votes are newest: held out
    assert "label" in unpaired["train"].column_names
    assert unpaired["eval"].features["label"].dtype == "bool"


def test_exports_never_contain_opted_out_text(built, tmp_path):
    _, data = built
    files = export.export_preferences(data, tmp_path / "out")
    for path in files.values():
        for f in [path] if path.is_file() else path.rglob("*"):
            if f.is_file():
                assert b"Marseille" not in f.read_bytes(), f


def test_an_export_never_overwrites_another(built, tmp_path):
    _, data = built
    export.export_preferences(data, tmp_path / "out")
    with pytest.raises(FileExistsError):
        export.export_preferences(data, tmp_path / "out")


def test_admin_export_goes_to_a_new_folder_under_the_data_dir(store, tmp_path):
    build_scenario(store)
    data_dir = tmp_path / "data"
    first, data = export.export_for_admin(store, data_dir, CONFIG, TopicEmbedder(SAME))
    second, _ = export.export_for_admin(store, data_dir, CONFIG, TopicEmbedder(SAME))
    assert first != second
    for path in (first, second):
        assert path.parent == data_dir / "exports"
        assert (path / "pairs_train.jsonl").exists()
    summary = json.loads((first / "summary.json").read_text())
    assert summary["pairs"]["total"] == len(data.pairs) == 10
    assert summary["dropped_pairs"]["user_cap"] == 2
    assert summary["config"]["per_user_cap"] == 4


def test_command_line_prints_the_summary_and_writes_the_folder(tmp_path, capsys):
    data_dir = tmp_path / "data"
    build_scenario(Store(data_dir / "assistant.db"))
    out = export.main(
        ["--data-dir", str(data_dir), "--out", str(tmp_path / "prefs"), "--per-user-cap", "4", "--eval-fraction", "0.25"],
        embedder=TopicEmbedder(SAME),
    )
    printed = capsys.readouterr().out
    assert "Pairs: 10 (1 edit, 7 vote, 2 retry); train 9, eval 1." in printed
    assert f"Wrote {tmp_path / 'prefs'}" in printed
    assert len((out / "pairs_train.jsonl").read_text().splitlines()) == 9
    with pytest.raises(SystemExit):  # refuses a folder that already holds files
        export.main(["--data-dir", str(data_dir), "--out", str(out)], embedder=TopicEmbedder(SAME))
    with pytest.raises(SystemExit):
        export.main(["--data-dir", str(tmp_path / "nowhere")])


def test_admin_export_refuses_an_exports_folder_that_leads_outside(store, tmp_path):
    build_scenario(store)
    data_dir, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    data_dir.mkdir()
    elsewhere.mkdir()
    (data_dir / "exports").symlink_to(elsewhere)
    with pytest.raises(ValueError, match="outside the data folder"):
        export.export_for_admin(store, data_dir, CONFIG, TopicEmbedder(SAME))
    assert list(elsewhere.iterdir()) == []


def test_the_admin_page_never_takes_a_path_for_an_export(store):
    """The button and every admin API endpoint: no input that could name a folder."""
    import gradio as gr

    from loop.control import Controller
    from ui.admin_page import AdminPage

    page = AdminPage(Controller(store, None, adapter_of=None, launcher=None), exporter=lambda: [])
    with gr.Blocks() as demo:
        page.build()
    deps = {d["api_name"]: d for d in demo.config["dependencies"]}
    assert deps["export"]["inputs"] == [] and deps["export"]["api_visibility"] == "private"
    public = demo.get_api_info()["named_endpoints"]
    assert public and not any("export" in name for name in public)  # no scripted export
    for name, info in public.items():
        params = {p["parameter_name"] for p in info["parameters"]}
        assert not {"path", "out", "folder", "dir", "file"} & params, (name, params)


def test_the_export_button_refuses_an_exports_folder_that_leads_outside(store, tmp_path):
    """The same refusal through the admin page's button handler, as an admin sees it."""
    from types import SimpleNamespace

    import gradio as gr

    from loop.control import Controller
    from ui.admin_page import AdminPage

    build_scenario(store)
    store.create_user("root", "root-password", is_admin=True)
    data_dir, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    data_dir.mkdir()
    elsewhere.mkdir()
    (data_dir / "exports").symlink_to(elsewhere)
    page = AdminPage(Controller(store, None, adapter_of=None, launcher=None),
                     exporter=lambda: export.export_for_admin(store, data_dir, CONFIG, TopicEmbedder(SAME)))
    with pytest.raises(gr.Error, match="leads outside the data folder .*nothing was exported"):
        page.export(SimpleNamespace(username="root"))
    assert list(elsewhere.iterdir()) == []
