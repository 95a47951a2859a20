import shutil

import pytest

from assistant.adapters import InvalidAdapter, adapter_name, base_model_identity, base_weight_shapes, content_hash
from test_adapters import tiny  # noqa: F401  (module fixture: a tiny base model and adapter)
from loop.versions import resolve_version


@pytest.fixture
def registered(tiny, tmp_path, store):  # noqa: F811
    data = tmp_path / "data"
    folder = data / "adapters" / "v1"
    shutil.copytree(tiny / "adapter", folder)
    digest = content_hash(folder)
    base = base_model_identity(tiny / "base")
    store.add_adapter({"version": 1, "name": adapter_name(1, digest), "content_hash": digest,
                       "base_model": base, "path": "adapters/v1"})
    return data, base, base_weight_shapes(tiny / "base")


def test_a_registered_version_resolves_to_its_folder(store, registered):
    data, base, shapes = registered
    a = resolve_version(store, data, 1, base_shapes=shapes, base_model=base, max_rank=16)
    assert a.version == 1 and a.path == str((data / "adapters" / "v1").resolve())


def test_tampered_foreign_or_escaping_versions_are_refused(store, registered):
    data, base, shapes = registered
    with pytest.raises(InvalidAdapter) as e:
        resolve_version(store, data, 1, base_shapes=shapes, base_model="Other@123", max_rank=16)
    assert e.value.check == "base model"
    (data / "adapters" / "v1" / "adapter_config.json").write_text(
        (data / "adapters" / "v1" / "adapter_config.json").read_text().replace('"r": 4', '"r": 4 ')
    )
    with pytest.raises(InvalidAdapter) as e:
        resolve_version(store, data, 1, base_shapes=shapes, base_model=base, max_rank=16)
    assert e.value.check == "hash"
    store.update_adapter(1, path="adapters/../../etc")
    with pytest.raises(InvalidAdapter) as e:
        resolve_version(store, data, 1, base_shapes=shapes, base_model=base, max_rank=16)
    assert e.value.check == "path"


def test_symlinked_or_absolute_version_folders_are_refused_even_with_the_right_content(store, registered, tmp_path):
    data, base, shapes = registered
    outside = tmp_path / "outside"
    shutil.copytree(data / "adapters" / "v1", outside)  # same files, same hash
    shutil.rmtree(data / "adapters" / "v1")
    (data / "adapters" / "v1").symlink_to(outside)
    for path in ("adapters/v1", str(outside), "adapters", "../outside"):
        store.update_adapter(1, path=path)
        with pytest.raises(InvalidAdapter) as e:
            resolve_version(store, data, 1, base_shapes=shapes, base_model=base, max_rank=16)
        assert e.value.check == "path", path


@pytest.mark.parametrize("text", ["../../etc/passwd", "/etc/passwd", "v1/../2", "adapters/v1", "-1", "v1 ", "1e3", ""])
def test_version_arguments_are_numbers_never_paths(text):
    from loop.commands import parse_version

    if text.strip() == "v1":
        assert parse_version(text) == 1
        return
    with pytest.raises(ValueError, match="never paths"):
        parse_version(text)


def test_the_cli_refuses_a_path_as_a_version_and_a_tampered_folder(store, registered, tiny, capsys):  # noqa: F811
    import app
    from store import Store

    data, base, shapes = registered
    cli_store = Store(data / "assistant.db")  # the one the command line opens
    cli_store.add_adapter({**{k: v for k, v in store.adapter(1).items() if k != "created_utc"}, "gate_passed": 1})
    cli_store.create_user("root", "root-password", is_admin=True)
    store = cli_store
    args = ["--data-dir", str(data), "promote", "--as", "root", "--model", str(tiny / "base")]
    assert app.main(args[:3] + ["../../etc/passwd"] + args[3:]) == app.EXIT_REFUSED
    assert "is not a version" in capsys.readouterr().err
    (data / "adapters" / "v1" / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    assert app.main(args[:3] + ["v1"] + args[3:]) == app.EXIT_REFUSED
    assert "adapter refused (weights)" in capsys.readouterr().err
    assert store.promotions() == [] and store.live_version() is None


def test_the_data_folder_keeps_the_layout_existing_installs_have(tmp_path):
    from assistant.config import ServeConfig
    from assistant.paths import DataPaths

    paths = DataPaths(str(tmp_path))
    assert (paths.database, paths.adapters, paths.models) == (tmp_path / "assistant.db", tmp_path / "adapters", tmp_path / "models")
    config = ServeConfig(data_dir=tmp_path)
    assert (config.db_path, config.adapters_dir, config.models_dir) == (paths.database, paths.adapters, paths.models)
