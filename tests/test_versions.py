import shutil

import pytest

from assistant.adapters import InvalidAdapter, adapter_name, base_model_identity, base_weight_shapes, content_hash
from test_adapters import tiny  # noqa: F401  (module fixture: a tiny base model and adapter)
from tuning.versions import resolve_version


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
