"""Write-then-rename helpers: ordinary permissions, and a folder swapped into place only when complete."""

import os
import stat

from medseg.io.atomic import publish_dir, temp_dir_beside, temp_file_beside


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_temporaries_get_ordinary_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        assert _mode(temp_file_beside(tmp_path / "a.json")) == 0o644
        assert _mode(temp_dir_beside(tmp_path / "model")) == 0o755
    finally:
        os.umask(mask)


def test_publish_dir_creates_and_replaces(tmp_path):
    dest = tmp_path / "model"
    first = temp_dir_beside(dest)
    (first / "model.json").write_text("1")
    publish_dir(first, dest)
    assert (dest / "model.json").read_text() == "1" and not first.exists()

    second = temp_dir_beside(dest)
    (second / "model.json").write_text("2")
    publish_dir(second, dest)
    assert (dest / "model.json").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # nothing left beside it
