"""The digest-memo helper shared by the file-digest and ImageNet-weights memos (featurecache.cache.memo)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from featurecache.cache.memo import read_memo, write_memo


def test_write_then_read_round_trip_leaves_no_temporary_file(tmp_path: Path) -> None:
    memo = tmp_path / "new" / "digests.json"  # the folder does not exist yet
    write_memo(memo, lambda f: json.dump({"a": 1}, f))
    assert read_memo(memo) == {"a": 1}
    assert sorted(p.name for p in memo.parent.iterdir()) == ["digests.json"]


def test_missing_or_torn_memo_reads_as_nothing(tmp_path: Path) -> None:
    memo = tmp_path / "digests.json"
    assert read_memo(memo) is None
    memo.write_text('{"a": ')
    assert read_memo(memo) is None


def test_failed_write_keeps_the_old_memo_and_no_temporary_file(tmp_path: Path) -> None:
    memo = tmp_path / "digests.json"
    write_memo(memo, lambda f: json.dump({"old": True}, f))

    def disk_full(f: object) -> None:
        raise OSError(28, "No space left on device")

    write_memo(memo, disk_full)  # a memo only saves work: an OS error is swallowed
    assert read_memo(memo) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digests.json"]

    def bug(f: object) -> None:
        raise TypeError("not serialisable")

    with pytest.raises(TypeError):  # a programming error is not hidden
        write_memo(memo, bug)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digests.json"]


def test_imagenet_digest_memo_is_written_and_then_used(tmp_path: Path) -> None:
    from importlib import metadata

    from featurecache import backbones
    from featurecache.backbones import identity

    spec = backbones.get_backbone("resnet50")
    key = f"resnet50@keras-{metadata.version('keras')}"
    identity._update_memo(tmp_path, "imagenet", key, "cd" * 32)
    identity._update_memo(tmp_path, "imagenet", "other@keras-0", "ef" * 32)  # merged, not replaced
    doc = json.loads((tmp_path / backbones.MEMO_FILE).read_text())
    assert doc == {"imagenet": {key: "cd" * 32, "other@keras-0": "ef" * 32}}
    # Offline, building would raise: a returned identity proves the written memo was read.
    assert (
        backbones.weights_identity(backbones.WeightsRef("imagenet"), spec, memo_dir=tmp_path)
        == f"imagenet:sha256={'cd' * 32}"
    )
