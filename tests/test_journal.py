"""The resume journal read back after damage: a bad line in the middle costs only its own
tiles, a torn last line is ignored, a torn header starts the slide again; each with a warning
that says which."""
import logging

import numpy as np

from detector.inference.journal import JOURNAL_NAME, Journal
from detector.structures.instances import Instances

HEADER = {"slide_size": [100, 100], "tile_size": 256}


def _three_batches(path):
    j = Journal(path, HEADER)
    for k in range(3):
        j.append([2 * k, 2 * k + 1], Instances((100, 100), [[k, k, k + 5, k + 5]], [0.9], [1]))
    return path


def _lines(path):
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def test_bad_line_in_the_middle_keeps_the_later_records(tmp_path, caplog):
    p = _three_batches(str(tmp_path / JOURNAL_NAME))
    lines = _lines(p)
    lines[2] = lines[2][: len(lines[2]) // 2]  # the second batch's record is damaged
    with open(p, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING):
        j = Journal(p, HEADER)
    # the first and third batches are kept; only the damaged batch's tiles are done again
    assert j.done == {0, 1, 4, 5}
    assert sorted(float(i.boxes[0, 0]) for i in j.instances()) == [0.0, 2.0]
    assert "damaged record on line 3 of 4" in caplog.text and "torn last" not in caplog.text
    # the journal was rewritten without it: new records follow valid ones and read back
    assert len(_lines(p)) == 3
    j.append([2, 3], Instances((100, 100), [[1, 1, 6, 6]], [0.8], [1]))
    assert Journal(p, HEADER).done == {0, 1, 2, 3, 4, 5}


def test_torn_last_line_is_ignored_with_its_own_warning(tmp_path, caplog):
    p = _three_batches(str(tmp_path / JOURNAL_NAME))
    with open(p, "a", encoding="utf-8") as f:
        f.write('{"tiles": [99], "boxes": [[1, 2')
    with caplog.at_level(logging.WARNING):
        j = Journal(p, HEADER)
    assert j.done == set(range(6)) and len(j.instances()) == 3
    assert "torn last record" in caplog.text and "damaged" not in caplog.text


def test_a_record_that_is_json_but_not_a_record_is_skipped(tmp_path, caplog):
    p = _three_batches(str(tmp_path / JOURNAL_NAME))
    lines = _lines(p)
    lines[1] = '{"tiles": "x"}'
    with open(p, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING):
        j = Journal(p, HEADER)
    assert j.done == {2, 3, 4, 5} and "damaged record on line 2" in caplog.text


def test_torn_header_starts_the_slide_again_and_says_why(tmp_path, caplog):
    p = _three_batches(str(tmp_path / JOURNAL_NAME))
    lines = _lines(p)
    with open(p, "w", encoding="utf-8") as f:
        f.write(lines[0][:10])  # killed while writing the header
    with caplog.at_level(logging.WARNING):
        j = Journal(p, HEADER)
    assert j.done == set() and j.instances() == []
    assert "header is unreadable" in caplog.text and "other parameters" not in caplog.text
    assert _lines(p) == [lines[0]]  # a fresh journal: the header alone
    j.append([7], Instances((100, 100), np.zeros((0, 4), np.float32), [], []))
    assert Journal(p, HEADER).done == {7}
