import pytest

from serve_app.engine.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return tiny_model[1]


def stream(tokenizer, text, stop=()):
    detok = IncrementalDetokenizer(tokenizer, stop)
    pieces = []
    for token in tokenizer(text)["input_ids"]:
        pieces.append(detok.add_token(token))
        if detok.stopped:
            break
    if not detok.stopped:
        pieces.append(detok.flush())
    return pieces


def test_multibyte_characters_are_never_split(tokenizer):
    text = "café 東京 😀 naïve"
    pieces = stream(tokenizer, text)
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # Byte-level BPE splits the emoji into several tokens: some steps must release nothing.
    assert "" in pieces


def test_stop_string_is_cut_and_never_streamed(tokenizer):
    pieces = stream(tokenizer, "Hello, world! How are you today?", stop=["How"])
    assert "".join(pieces) == "Hello, world! "
    assert not any("H" in p and "o" in p and "w" in p for p in pieces[1:])


def test_partial_stop_prefix_is_released_when_it_does_not_complete(tokenizer):
    assert "".join(stream(tokenizer, "Hello, world!", stop=["world?"])) == "Hello, world!"
