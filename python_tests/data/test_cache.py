"""Caches that heal: a damaged entry is reported, deleted and rebuilt; an unwritable folder means no cache."""
import glob
import logging
import os

import numpy as np
import pytest

from s2meta_fast.data import prepare

SMALL = dict(min_items=10, max_items=500, mf_epochs=3, progress=False)


def _same(a, b):
    assert [s.name for s in a.scenarios()] == [s.name for s in b.scenarios()]
    np.testing.assert_array_equal(a.user_emb.numpy(), b.user_emb.numpy())
    np.testing.assert_array_equal(a.item_emb.numpy(), b.item_emb.numpy())


def _damage(path, how):
    data = open(path, "rb").read()
    if how == "truncate":
        data = data[:len(data) // 2]
    else:  # flip bytes in the middle of the archive: a CRC mismatch, not a broken zip directory
        data = data[:len(data) // 2] + bytes(b ^ 0xFF for b in data[len(data) // 2:len(data) // 2 + 8]) \
            + data[len(data) // 2 + 8:]
    with open(path, "wb") as fh:
        fh.write(data)


@pytest.mark.parametrize("kind", ["prepared", "embeddings"])
@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_a_damaged_cache_entry_is_deleted_and_rebuilt(synthetic_dirs, tmp_path, caplog, kind, how):
    folder, _ = synthetic_dirs["ml20m"]
    cache = str(tmp_path / "cache")
    first = prepare("ml20m", folder, cache_dir=cache, **SMALL)
    if kind == "embeddings":   # the prepared entry would hide the embeddings one
        for path in glob.glob(os.path.join(cache, "prepared", "*.npz")):
            os.unlink(path)
    [entry] = glob.glob(os.path.join(cache, kind, "*.npz"))
    _damage(entry, how)
    with caplog.at_level(logging.WARNING, logger="s2meta_fast"):
        again = prepare("ml20m", folder, cache_dir=cache, **SMALL)
    _same(first, again)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
    assert entry in warnings[0].getMessage() and "is damaged" in warnings[0].getMessage()
    assert "rebuilding" in warnings[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="s2meta_fast"):
        _same(first, prepare("ml20m", folder, cache_dir=cache, **SMALL))   # healed: read back, no warning
    assert not caplog.records


def test_an_unwritable_cache_folder_means_no_cache(synthetic_dirs, tmp_path, caplog):
    folder, _ = synthetic_dirs["ml20m"]
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="s2meta_fast"):
        data = prepare("ml20m", folder, cache_dir=str(blocker / "cache"), **SMALL)
    assert len(data.scenarios()) > 0
    assert "is not writable" in caplog.text and "running without a cache" in caplog.text
    assert blocker.read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_cache_folder_means_no_cache(synthetic_dirs, tmp_path, caplog):
    folder, _ = synthetic_dirs["ml20m"]
    cache = tmp_path / "ro"
    cache.mkdir()
    cache.chmod(0o555)
    try:
        with caplog.at_level(logging.WARNING, logger="s2meta_fast"):
            prepare("ml20m", folder, cache_dir=str(cache), **SMALL)
    finally:
        cache.chmod(0o755)
    assert "is not writable" in caplog.text and os.listdir(cache) == []
