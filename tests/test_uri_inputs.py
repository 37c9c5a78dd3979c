"""URI inputs (``tag2mask.io.uri_inputs``, ``UriFolderDataset``): a ``file://`` prefix lists the same items,
names and labels as the local folder, and its bytes decode to the same images; fsspec's ``memory://`` file
system (when fsspec is installed) goes through ``pyarrow.fs.FSSpecHandler``. No network."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("pyarrow.fs")  # optional third-party (comes with the extra 'ray')

from tag2mask.data.datasets import FolderDataset, UriFolderDataset, open_image_folder  # noqa: E402
from tag2mask.data.images import ImageDecodeError, load_image  # noqa: E402
from tag2mask.io.uri_inputs import RemoteFile, input_state, is_uri, list_uri, read_uri, relative_input  # noqa: E402


@pytest.fixture()
def folder(tmp_path):
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for name in ("b.png", "a.jpg", "sub/c.png"):
        Image.fromarray(rng.integers(0, 255, (9, 7, 3), dtype=np.uint8)).save(images / name)
    (images / "notes.txt").write_text("not an image")
    labels = {"a.jpg": ["cat"], "sub/c.png": ["dog", "cat"], "gone.png": ["dog"], "../up.png": ["cat"]}
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    return images


def test_is_uri():
    assert is_uri("s3://bucket/prefix") and is_uri("file:///x") and is_uri("gs://b")
    assert not is_uri("hf://user/repo") and not is_uri("/local/path") and not is_uri("C:\\x") and not is_uri(None)


def test_a_file_uri_lists_and_reads_what_the_folder_holds(folder):
    uri = folder.resolve().as_uri()
    files = list_uri(uri, (".png", ".jpg"))
    assert [f.uri for f in files] == [f"{uri}/a.jpg", f"{uri}/b.png"]  # sorted, not recursive, images only
    deep = list_uri(uri, None, recursive=True)
    assert [relative_input(f, uri) for f in deep] == ["a.jpg", "b.png", "notes.txt", "sub/c.png"]
    for f in deep:
        local = folder / relative_input(f, uri)
        assert read_uri(f.uri) == local.read_bytes()
        state = input_state(f)
        assert state == {"path": f.uri, "size": local.stat().st_size, "mtime_ns": local.stat().st_mtime_ns}
    assert files[0].stem == "a" and files[0].name == "a.jpg" and files[0].suffix == ".jpg"
    assert list_uri(f"{uri}/b.png", (".png",)) == [files[1]]  # one object
    with pytest.raises(FileNotFoundError, match="no such object"):
        list_uri(f"{uri}/missing", (".png",))


def test_uri_folder_dataset_matches_the_local_folder(folder):
    uri = folder.resolve().as_uri()
    labels = folder.parent / "labels.json"
    for args in ((), (labels, ["background", "cat", "dog"])):
        local = FolderDataset(folder, *args, strict=False)
        remote = open_image_folder(uri, *args, strict=False)
        assert isinstance(remote, UriFolderDataset) and remote.image_dir == uri
        assert remote.names == local.names and len(remote) == len(local)
        assert [e for e, _ in remote.errors] == [e for e, _ in local.errors]
        # the same name rule as a local folder (tag_files.safe_image_name), its message naming the URI
        assert all("outside the image folder" in m and uri in m for _, m in remote.errors)
        for i in range(len(local)):
            a, b = local[i], remote[i]
            assert isinstance(b.image_path, RemoteFile) and a.label_ids == b.label_ids
            assert relative_input(b.image_path, uri) == relative_input(a.image_path, folder)
            if a.image_path.exists():
                assert np.array_equal(np.asarray(load_image(b.image_path)), np.asarray(load_image(a.image_path)))
            else:  # listed in the label file, not in the bucket: a decode error, as a missing local file
                with pytest.raises(ImageDecodeError, match="file not found"):
                    load_image(b.image_path)


def test_fsspec_memory_file_system(folder):
    fsspec = pytest.importorskip("fsspec")
    memory = fsspec.filesystem("memory")
    memory.pipe("/t2m-test/x.png", (folder / "b.png").read_bytes())
    try:
        files = list_uri("memory://t2m-test", (".png",))
        assert [f.name for f in files] == ["x.png"]
        assert np.array_equal(np.asarray(load_image(files[0])), np.asarray(load_image(folder / "b.png")))
    finally:
        memory.rm("/t2m-test", recursive=True)


def test_an_unknown_scheme_is_one_clear_error():
    with pytest.raises(ValueError, match="no file system for this URI"):
        list_uri("nosuchscheme://bucket/prefix", (".png",))
