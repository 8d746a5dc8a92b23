"""Qwen2.5-VL chat format: rendering, image-token expansion and the SFT loss mask.

Rendering is the official template (QWEN2_5_VL_CHAT_TEMPLATE below, as shipped in the
Qwen2.5-VL-*-Instruct directories): a default system turn "You are a helpful assistant."
when the first message is not a system message, then `<|im_start|>{role}\n{content}<|im_end|>\n`
per turn. Each `<image>` placeholder of the sharegpt text becomes
`<|vision_start|>` + `<|image_pad|>` x (t*h*w / merge^2) + `<|vision_end|>`, exactly what the
HF processor produces from the template's single `<|image_pad|>`.

The whole conversation is tokenised as ONE string (BPE merges across piece boundaries, e.g.
"\n\n", must be identical to HF's), and the loss mask is derived from character spans: a
token is trained on when it starts inside an assistant turn's content or its `<|im_end|>`.
"""
from __future__ import annotations

from typing import Optional, Sequence

IMAGE_PLACEHOLDER = "<image>"
DEFAULT_SYSTEM = "You are a helpful assistant."

QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def image_token_count(grid, merge_size: int = 2) -> int:
    t, h, w = (int(x) for x in grid)
    return t * h * w // (merge_size * merge_size)


def expand_images(text: str, grids: Sequence, merge_size: int = 2, start: int = 0) -> tuple[str, int]:
    """Replace each `<image>` in `text` by the vision block of grids[start + k]; returns the
    new text and how many placeholders were consumed."""
    parts = text.split(IMAGE_PLACEHOLDER)
    n = len(parts) - 1
    if start + n > len(grids):
        raise ValueError(f"{start + n} <image> placeholders but only {len(grids)} images")
    out = [parts[0]]
    for k in range(n):
        pads = "<|image_pad|>" * image_token_count(grids[start + k], merge_size)
        out.append(f"<|vision_start|>{pads}<|vision_end|>")
        out.append(parts[k + 1])
    return "".join(out), n


def _role(m: dict) -> str:
    # sharegpt files sometimes say human/gpt/from/value; normalise to the chat roles.
    role = m.get("role", m.get("from"))
    return {"human": "user", "gpt": "assistant"}.get(role, role)


def _content(m: dict) -> str:
    c = m.get("content", m.get("value"))
    if not isinstance(c, str):
        raise ValueError(f"message content must be a string, got {type(c).__name__}")
    return c


def render(messages: Sequence[dict], grids: Sequence = (), merge_size: int = 2,
           add_generation_prompt: bool = False, system: Optional[str] = None
           ) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as text (images expanded) + char spans [a, b) that are trained on
    (each assistant turn's content and its closing `<|im_end|>`)."""
    msgs = list(messages)
    chunks: list[str] = []
    spans: list[tuple[int, int]] = []
    length = 0

    def emit(s: str, trained: bool = False):
        nonlocal length
        if trained and s:
            spans.append((length, length + len(s)))
        chunks.append(s)
        length += len(s)

    if not msgs or _role(msgs[0]) != "system":
        emit(f"<|im_start|>system\n{system if system is not None else DEFAULT_SYSTEM}<|im_end|>\n")
    used = 0
    for m in msgs:
        role = _role(m)
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"unknown role {role!r} (expected system/user/assistant)")
        content, n = expand_images(_content(m), grids, merge_size, used)
        used += n
        emit(f"<|im_start|>{role}\n")
        if role == "assistant":
            emit(content + "<|im_end|>", trained=True)
            emit("\n")
        else:
            emit(content + "<|im_end|>\n")
    if used != len(grids):
        raise ValueError(f"{used} <image> placeholders but {len(grids)} images")
    if add_generation_prompt:
        emit("<|im_start|>assistant\n")
    return "".join(chunks), spans


def encode_sft(messages: Sequence[dict], grids: Sequence = (), merge_size: int = 2,
               tokenizer=None, system: Optional[str] = None) -> tuple[list[int], list[int]]:
    """Token ids of a whole conversation and a 0/1 loss mask of the same length (1 on the
    assistant tokens incl. their `<|im_end|>`). `grids`: (t,h,w) per `<image>`, in order."""
    from ovlt.data.tokenizer import load_tokenizer
    tok = tokenizer or load_tokenizer()
    text, spans = render(messages, grids, merge_size, system=system)
    enc = tok.backend.encode(text, add_special_tokens=False)
    mask = [0] * len(enc.ids)
    j = 0
    for i, (a, _) in enumerate(enc.offsets):
        while j < len(spans) and a >= spans[j][1]:
            j += 1
        if j < len(spans) and spans[j][0] <= a < spans[j][1]:
            mask[i] = 1
    return list(enc.ids), mask


def encode_prompt(problem_text: str, grids: Sequence = (), system: Optional[str] = None,
                  merge_size: int = 2, tokenizer=None) -> list[int]:
    """Ids of a one-turn user prompt followed by the generation prompt
    `<|im_start|>assistant\n`. If the text has no `<image>` but images are given, they are
    put first (as the released RL parquet files expect)."""
    from ovlt.data.tokenizer import load_tokenizer
    tok = tokenizer or load_tokenizer()
    if grids and IMAGE_PLACEHOLDER not in problem_text:
        problem_text = IMAGE_PLACEHOLDER * len(grids) + problem_text
    text, _ = render([{"role": "user", "content": problem_text}], grids, merge_size,
                     add_generation_prompt=True, system=system)
    return tok.encode(text)
