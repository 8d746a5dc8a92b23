"""ovlt's chat encoding vs transformers rendering the official Qwen2.5-VL jinja template.

Reference pipeline: HF tokenizer (built by transformers from vocab/merges) `apply_chat_template`
with the official template string (as in Qwen2.5-VL-7B-Instruct's chat_template.json), then
each `<|image_pad|>` replaced by grid.prod() // 4 copies with grids from HF's
`Qwen2VLImageProcessorPil` (what `Qwen2_5_VLProcessor.replace_image_token` does; the processor
itself can't be built here because its video processor needs torchvision), then HF tokenising.
"""
import numpy as np
import pytest
from PIL import Image

from ovlt.data.chat_template import (QWEN2_5_VL_CHAT_TEMPLATE, encode_prompt, encode_sft,
                                     render)
from ovlt.data.image_processing import preprocess
from ovlt.data.tokenizer import load_tokenizer
from tests.unit.test_data_tokenizer import hf_tokenizer_from_files

# Written out independently of ovlt's copy: Qwen2.5-VL-*-Instruct chat_template.json.
OFFICIAL = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for "
    "message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if "
    "message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in "
    "message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in "
    "content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ "
    "image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif "
    "content['type'] == 'video' or 'video' in content %}{% set video_count.value = "
    "video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif "
    "%}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] "
    "}}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt "
    "%}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    return hf_tokenizer_from_files(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def hf_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    return Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=262144)


def _img(w, h, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _to_hf_messages(messages):
    """sharegpt text with <image> -> the list-of-parts content the template expects."""
    out = []
    for m in messages:
        parts = m["content"].split("<image>")
        if len(parts) == 1:
            out.append({"role": m["role"], "content": m["content"]})
            continue
        content = []
        for k, p in enumerate(parts):
            if k:
                content.append({"type": "image"})
            if p:
                content.append({"type": "text", "text": p})
        out.append({"role": m["role"], "content": content})
    return out


def _hf_ids(hf_tok, hf_ip, messages, images, add_generation_prompt=False):
    text = hf_tok.apply_chat_template(_to_hf_messages(messages), chat_template=OFFICIAL,
                                      tokenize=False, add_generation_prompt=add_generation_prompt)
    grids = hf_ip(images=images, return_tensors="np")["image_grid_thw"] if images else []
    pieces = text.split("<|image_pad|>")
    assert len(pieces) == len(grids) + 1
    out = pieces[0]
    for g, p in zip(grids, pieces[1:]):
        out += "<|image_pad|>" * int(np.prod(g) // 4) + p
    return hf_tok.encode(out, add_special_tokens=False), [tuple(int(x) for x in g) for g in grids]


CONVS = [
    ([{"role": "user", "content": "What is 2 + 2?"},
      {"role": "assistant", "content": "2 + 2 = 4.\n<answer>4</answer>"}], []),
    ([{"role": "user", "content": "<image>How many circles are there?"},
      {"role": "assistant", "content": "<think>\nI count 3.\n</think>\n<answer>3</answer>"}],
     [(120, 90)]),
    ([{"role": "system", "content": "You are a careful math tutor."},
      {"role": "user", "content": "Compare <image> and <image>. Which is larger?"},
      {"role": "assistant", "content": "The first.\n\n<answer>A</answer>"}],
     [(300, 200), (56, 500)]),
    ([{"role": "user", "content": "<image>\n三角形的面积是多少？ 😀"},
      {"role": "assistant", "content": "面积 = $\\frac{1}{2} \\times 4 \\times 6 = 12$"},
      {"role": "user", "content": "And the perimeter?  "},
      {"role": "assistant", "content": "  12 + 2\\sqrt{13}"}],
     [(640, 480)]),
    ([{"role": "user", "content": "<image><image><image>tiny, wide, tall"},
      {"role": "assistant", "content": "ok"}], [(5, 5), (1000, 20), (28, 900)]),
]


@pytest.mark.parametrize("k", range(len(CONVS)))
def test_sft_ids_match_hf_template(hf_tok, hf_image_processor, k):
    messages, sizes = CONVS[k]
    images = [_img(w, h, i) for i, (w, h) in enumerate(sizes)]
    ref_ids, ref_grids = _hf_ids(hf_tok, hf_image_processor, messages, images)
    grids = [preprocess(im, 3136, 262144)[1] for im in images]
    assert grids == ref_grids
    ids, mask = encode_sft(messages, grids)
    assert ids == ref_ids
    assert len(mask) == len(ids)
    # The trained tokens are exactly each assistant turn's content + <|im_end|>.
    tok = load_tokenizer()
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    expected = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    assert [tok.decode(r) for r in runs] == expected
    assert sum(i == 151655 for i in ids) == sum(g[0] * g[1] * g[2] // 4 for g in grids)


def test_generation_prompt_matches_hf(hf_tok, hf_image_processor):
    img = _img(200, 150, 7)
    grids = [preprocess(img, 3136, 262144)[1]]
    msgs = [{"role": "user", "content": "<image>What is the value of bar B?"}]
    ref, _ = _hf_ids(hf_tok, hf_image_processor, msgs, [img], add_generation_prompt=True)
    assert encode_prompt("<image>What is the value of bar B?", grids) == ref
    # No placeholder: images go first.
    assert encode_prompt("What is the value of bar B?", grids) == ref
    assert ref[-3:] == [151644, 77091, 198]  # <|im_start|>assistant\n


def test_custom_system_prompt(hf_tok, hf_image_processor):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    ref, _ = _hf_ids(hf_tok, hf_image_processor, msgs, [], add_generation_prompt=True)
    assert encode_prompt("Hi", [], system="Be brief.") == ref


def test_template_constant_is_official():
    assert QWEN2_5_VL_CHAT_TEMPLATE == OFFICIAL


def test_mismatch_errors():
    with pytest.raises(ValueError, match="placeholders but only 0 images"):
        render([{"role": "user", "content": "<image>x"}], [])
    with pytest.raises(ValueError, match="1 <image> placeholders but 2 images"):
        render([{"role": "user", "content": "<image>x"}], [(1, 2, 2), (1, 2, 2)])
    with pytest.raises(ValueError, match="unknown role"):
        render([{"role": "tool", "content": "x"}])
