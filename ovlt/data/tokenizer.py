"""The Qwen2.5(-VL) tokenizer, built offline from the BPE files shipped in `tokenizer_files/`.

Same construction as the official tokenizer: NFC normalisation, the Qwen2 pre-tokenisation
regex, byte-level BPE over 151,643 tokens, then the 22 Qwen2.5-VL added tokens at ids
151643..151664 (matched verbatim inside text, never split). No hub access.

    tok = load_tokenizer()
    tok.encode("<|im_start|>user\nhi")   # -> [151644, 872, 198, 6023]
    save_hf_tokenizer(model_dir)          # vocab/merges/tokenizer.json/tokenizer_config.json
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from ovlt.utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text

FILES_DIR = Path(__file__).resolve().parent / "tokenizer_files"
BPE_VOCAB_SIZE = 151643

PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                     r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

# (content, special) in id order from 151643, exactly as Qwen2.5-VL's tokenizer_config.json.
# "special" only decides what `skip_special_tokens` drops; all of them match inside text.
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True),
    ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
)
ADDED_TOKEN_IDS = {tok: BPE_VOCAB_SIZE + i for i, (tok, _) in enumerate(ADDED_TOKENS)}
SPECIAL_TOKENS = [tok for tok, special in ADDED_TOKENS if special]
# The ids the model config refers to (ModelConfig defaults agree).
ENDOFTEXT_ID = ADDED_TOKEN_IDS["<|endoftext|>"]      # 151643, also the pad token
IM_START_ID = ADDED_TOKEN_IDS["<|im_start|>"]        # 151644
IM_END_ID = ADDED_TOKEN_IDS["<|im_end|>"]            # 151645, the chat eos
VISION_START_ID = ADDED_TOKEN_IDS["<|vision_start|>"]  # 151652
VISION_END_ID = ADDED_TOKEN_IDS["<|vision_end|>"]    # 151653
IMAGE_PAD_ID = ADDED_TOKEN_IDS["<|image_pad|>"]      # 151655
VIDEO_PAD_ID = ADDED_TOKEN_IDS["<|video_pad|>"]      # 151656


def build_backend(files_dir: str | os.PathLike = FILES_DIR) -> Tokenizer:
    """The `tokenizers.Tokenizer` (Rust) of Qwen2.5-VL from vocab.json + merges.txt."""
    d = Path(files_dir)
    vocab, merges = str(d / "vocab.json"), str(d / "merges.txt")
    for p in (vocab, merges):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p}: Qwen tokenizer file missing (reinstall ovlt)")
    tok = Tokenizer(BPE.from_file(vocab, merges, unk_token=None, fuse_unk=False,
                                  byte_fallback=False))
    if tok.get_vocab_size() != BPE_VOCAB_SIZE:
        raise ValueError(f"{vocab}: {tok.get_vocab_size()} tokens, expected {BPE_VOCAB_SIZE}")
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # One at a time so each gets the next id, in the official order.
    for content, special in ADDED_TOKENS:
        t = AddedToken(content, single_word=False, lstrip=False, rstrip=False,
                       normalized=False, special=special)
        (tok.add_special_tokens if special else tok.add_tokens)([t])
    got = {c: tok.token_to_id(c) for c, _ in ADDED_TOKENS}
    if got != ADDED_TOKEN_IDS:
        raise AssertionError(f"added-token ids differ from Qwen2.5-VL: {got}")
    return tok


class QwenTokenizer:
    """Thin wrapper over the Rust tokenizer; picklable (DataLoader workers get a copy)."""

    pad_id = ENDOFTEXT_ID
    eos_id = IM_END_ID
    endoftext_id = ENDOFTEXT_ID
    im_start_id = IM_START_ID
    im_end_id = IM_END_ID
    vision_start_id = VISION_START_ID
    vision_end_id = VISION_END_ID
    image_pad_id = IMAGE_PAD_ID
    video_pad_id = VIDEO_PAD_ID

    def __init__(self, backend: Tokenizer):
        self.backend = backend
        self._special_ids = {ADDED_TOKEN_IDS[t] for t in SPECIAL_TOKENS}

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)   # 151665

    @property
    def vocab_size(self) -> int:
        return len(self)

    def encode(self, text: str) -> list[int]:
        """Ids of `text`; special tokens written in the text become their ids (as HF's
        Qwen2 tokenizer with split_special_tokens=False). No BOS/EOS is added."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        return self.backend.decode(ids, skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(int(i))

    def save_hf(self, out_dir: str | os.PathLike) -> None:
        save_hf_tokenizer(out_dir, self)

    def to_hf(self):
        """A transformers `PreTrainedTokenizerFast` over the same backend (for vLLM / HF code)."""
        from transformers import PreTrainedTokenizerFast
        return PreTrainedTokenizerFast(
            tokenizer_object=self.backend.__class__.from_str(self.backend.to_str()),
            eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None, bos_token=None,
            additional_special_tokens=[t for t in SPECIAL_TOKENS
                                       if t not in ("<|endoftext|>", "<|im_end|>")],
            clean_up_tokenization_spaces=False, model_max_length=131072)


@functools.lru_cache(maxsize=4)
def load_tokenizer(files_dir: str | None = None) -> QwenTokenizer:
    """The Qwen2.5-VL tokenizer (cached per process). `files_dir`: a directory holding
    vocab.json + merges.txt (default: the copy shipped with ovlt)."""
    return QwenTokenizer(build_backend(files_dir or FILES_DIR))


def hf_tokenizer_config() -> dict:
    """tokenizer_config.json as in the official Qwen2.5-VL-*-Instruct directories."""
    from ovlt.data.chat_template import QWEN2_5_VL_CHAT_TEMPLATE
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(ADDED_TOKEN_IDS[c]): {"content": c, "lstrip": False, "normalized": False,
                                      "rstrip": False, "single_word": False, "special": s}
            for c, s in ADDED_TOKENS},
        "additional_special_tokens": [t for t in SPECIAL_TOKENS if t != "<|endoftext|>"],
        "bos_token": None,
        "chat_template": QWEN2_5_VL_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def save_hf_tokenizer(out_dir: str | os.PathLike, tok: QwenTokenizer | None = None) -> list[Path]:
    """Write a transformers-loadable tokenizer into `out_dir` (an HF model directory):
    vocab.json, merges.txt, tokenizer.json, tokenizer_config.json, chat_template.json.
    Each file is written atomically; returns the paths."""
    tok = tok or load_tokenizer()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in ("vocab.json", "merges.txt"):
        atomic_write_bytes(out / name, (FILES_DIR / name).read_bytes())
        written.append(out / name)
    atomic_write_text(out / "tokenizer.json", tok.backend.to_str(pretty=False))
    cfg = hf_tokenizer_config()
    atomic_write_json(out / "tokenizer_config.json", cfg)
    atomic_write_text(out / "chat_template.json",
                      json.dumps({"chat_template": cfg["chat_template"]}, indent=2) + "\n")
    written += [out / "tokenizer.json", out / "tokenizer_config.json", out / "chat_template.json"]
    return written
