"""Teacher resolution: aliases, GGUF files, local directories, hub ids, and their errors."""

from __future__ import annotations

import pytest

from common.teacher import (
    load_tokenizer,
    resolve_teacher,
    separator_token_id,
    tokenizer_fingerprint,
)


def test_resolution_of_each_spelling(tmp_path, tiny_teacher_dir):
    assert resolve_teacher(str(tiny_teacher_dir)).gguf_file is None
    assert resolve_teacher("gpt2").path == "gpt2"  # a hub id is passed through untouched
    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF")
    src = resolve_teacher(str(g))
    assert (src.path, src.gguf_file) == (str(tmp_path), "m.gguf")


@pytest.mark.parametrize(
    "name,message",
    [("", "empty"), ("./nope", "does not exist"), ("/x/y.gguf", "does not exist"), ("a/b/c", "does not exist")],
)
def test_resolution_errors(name, message):
    with pytest.raises(ValueError, match=message):
        resolve_teacher(name)


def test_file_that_is_not_a_model(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf"):
        resolve_teacher(str(tmp_path / "w.bin"))
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match="neither config.json"):
        resolve_teacher(str(tmp_path / "d"))


def test_separator_and_fingerprint(tiny_tokenizer_dir):
    tok = load_tokenizer(str(tiny_tokenizer_dir))
    assert tok.convert_ids_to_tokens(separator_token_id(tok)) == "<|endoftext|>"
    with pytest.raises(ValueError, match="not in the tokenizer"):
        separator_token_id(tok, "<nope>")
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(load_tokenizer(str(tiny_tokenizer_dir)))


@pytest.mark.slow
def test_smollm2_alias_and_its_cached_tokenizer(tmp_path, monkeypatch):
    monkeypatch.setenv("COCOMIX_CACHE", str(tmp_path))
    fresh = load_tokenizer("smollm2-135m")
    cached = load_tokenizer("smollm2-135m")
    assert list((tmp_path / "tokenizers").iterdir())
    assert len(fresh) == len(cached) == 49152
    assert tokenizer_fingerprint(fresh) == tokenizer_fingerprint(cached)
    text = "Sparse autoencoders <|endoftext|> find\n\n  concepts."
    assert fresh(text, add_special_tokens=False)["input_ids"] == cached(text, add_special_tokens=False)["input_ids"]
    assert separator_token_id(cached) == 0
