"""A reader that keeps the journal's segment open is not fooled when that segment is removed: it
gets a gap (and rebuilds), rather than reading the removed file's end as the journal's end and
missing every change after it; a writer in that process appends to the newest segment."""
from __future__ import annotations

import pytest

from morag_remote.store.files.journal import Journal, JournalGap


def test_a_reader_whose_kept_segment_was_removed_sees_a_gap(tmp_path):
    reader, writer = Journal(tmp_path / "j", segment_bytes=200), Journal(tmp_path / "j", segment_bytes=200)
    start = reader.head()
    writer.append(["a"])
    _, position = reader.changes_since(start)  # the reader now keeps segment 1 open
    for i in range(40):  # several segments' worth: segment 1 is removed
        writer.append([f"job-{i}"])
    assert not (tmp_path / "j" / "000000000001.log").exists()
    with pytest.raises(JournalGap):
        reader.changes_since(position)
    end = reader.append(["mine"])  # into the newest segment, where the others read
    assert writer.changes_since((end[0], 0))[0][-1] == ("mine", None)
