"""GRPO data plumbing with hand-computed expectations: overlong handling, group advantages,
zero-advantage filtering, update splitting, and the packed micro-batch layout."""
import math
from types import SimpleNamespace

import pytest
import torch

from ovlt.grpo.train import assign_advantages, split_updates
from ovlt.grpo.batch import Rollout, pack_rollouts


def _cfg(**kw):
    base = dict(overlong="mask", overlong_penalty=0.0, filter_zero_advantage=True)
    base.update(kw)
    return SimpleNamespace(**base)


def _rolls(spec):
    """spec: (group, reward, finish_reason)."""
    return [Rollout(prompt_ids=[1, 2], response_ids=[3], group=g, reward=r, finish_reason=f)
            for g, r, f in spec]


def test_advantages_filter_and_overlong_mask():
    rs = _rolls([(0, 1.0, "stop"), (0, 0.0, "stop"), (0, 1.0, "length"),
                 (1, 1.0, "stop"), (1, 1.0, "stop")])
    st = assign_advantages(rs, _cfg())
    # group 0: rewards 1, 0, 1 -> mean 2/3, unbiased std sqrt(1/3)
    sd = math.sqrt(1 / 3)
    want = [(1 - 2 / 3) / (sd + 1e-6), (0 - 2 / 3) / (sd + 1e-6), (1 - 2 / 3) / (sd + 1e-6)]
    assert all(abs(r.advantage - w) < 1e-5 for r, w in zip(rs[:3], want))
    assert [r.train for r in rs] == [True, True, False, False, False]  # overlong masked, flat group
    assert st == {"clipped": 1, "groups_dropped": 1}


def test_overlong_penalty_and_no_filter():
    rs = _rolls([(0, 1.0, "length"), (0, 1.0, "stop"), (1, 0.0, "stop"), (1, 0.0, "stop")])
    assign_advantages(rs, _cfg(overlong="penalty", overlong_penalty=0.5, filter_zero_advantage=False))
    assert rs[0].reward == 0.5 and all(r.train for r in rs)
    assert rs[0].advantage < 0 < rs[1].advantage
    assert rs[2].advantage == rs[3].advantage == 0.0


def test_split_updates_same_count_with_filler():
    kept = _rolls([(0, 1.0, "stop")] * 5)
    chunks = split_updates(kept, 3, kept[0])
    assert [len(c) for c in chunks] == [2, 2, 1]
    chunks = split_updates([], 2, kept[0])
    assert len(chunks) == 2 and all(len(c) == 1 and not c[0].train for c in chunks)


def test_pack_layout_targets_and_budget():
    rope = lambda ids, grid: torch.arange(len(ids)).expand(3, -1)  # noqa: E731  (text only)
    a = Rollout(prompt_ids=[10, 11, 12], response_ids=[20, 21], group=0, advantage=0.5)
    b = Rollout(prompt_ids=[13], response_ids=[22, 23, 24], group=1, advantage=-1.0, train=False)
    c = Rollout(prompt_ids=[14, 15, 16, 17], response_ids=[25], group=2, advantage=2.0)
    mbs = pack_rollouts([a, b, c], 9, rope)
    assert sorted(len(mb.rollout_ids) for mb in mbs) == [1, 2]
    assert all(mb.num_tokens <= 9 for mb in mbs)
    one = pack_rollouts([a, b], 100, rope)[0]
    assert one.input_ids.tolist() == [[10, 11, 12, 20, 21, 13, 22, 23, 24]]
    assert one.cu_seqlens.tolist() == [0, 5, 9]
    # position i predicts token i+1: a's response tokens are targets of positions 2, 3
    assert one.targets.tolist() == [[-100, -100, 20, 21, -100, 22, 23, 24, -100]]
    assert one.loss_mask.tolist() == [[0, 0, 1, 1, 0, 0, 0, 0, 0]]  # b is not trained
    assert one.advantages[0, :5].tolist() == [0.5] * 5
    assert one.position_ids.shape == (3, 1, 9) and one.position_ids[0, 0, 5].item() == 0


def test_responses_cut_before_vision_placeholders():
    from ovlt.config import ModelConfig
    from ovlt.grpo.train import cut_at_vision_tokens
    m = ModelConfig()
    ids, lps = [5, 6, m.image_token_id, 7], [-0.1, -0.2, -0.3, -0.4]
    assert cut_at_vision_tokens(ids, lps, m) == ([5, 6], [-0.1, -0.2])
    assert cut_at_vision_tokens([m.vision_start_token_id], [-1.0], m) == ([], [])
    assert cut_at_vision_tokens([1, 2], [-1.0, -2.0], m) == ([1, 2], [-1.0, -2.0])


def _micro_batch_with_loss_rows_1_2_5():
    from ovlt.grpo.batch import RLMicroBatch
    T = 7
    mask = torch.tensor([[0, 1, 1, 0, 0, 1, 0]], dtype=torch.float32)
    return RLMicroBatch(input_ids=torch.zeros(1, T, dtype=torch.long),
                        position_ids=torch.zeros(3, 1, T, dtype=torch.long),
                        cu_seqlens=torch.tensor([0, T], dtype=torch.int32),
                        targets=torch.arange(T).view(1, T), loss_mask=mask,
                        advantages=torch.arange(T, dtype=torch.float32).view(1, T) / 10)


def test_loss_rows_picker_gathers_the_loss_tokens_found_on_the_host():
    from ovlt.grpo.passes import loss_rows_picker
    mb = _micro_batch_with_loss_rows_1_2_5()
    rows, pick = loss_rows_picker(mb, torch.device("cpu"))
    assert rows.tolist() == [1, 2, 5]
    assert pick(mb.targets).tolist() == [1, 2, 5]
    assert pick(mb.advantages).tolist() == pytest.approx([0.1, 0.2, 0.5])
    assert pick(mb.loss_mask).tolist() == [1.0, 1.0, 1.0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_micro_batch_moves_and_loss_rows_without_host_sync():
    """What the GRPO passes do per micro-batch (move it, find its loss rows, gather fields from
    the host and from the device) under torch's sync debug mode: any host sync raises."""
    from ovlt.grpo.passes import loss_rows_picker
    mb = _micro_batch_with_loss_rows_1_2_5()
    dev = torch.device("cuda")
    on_dev = torch.arange(7, dtype=torch.float32, device=dev).view(1, 7)  # a pass's output
    pinned = mb.pin_memory()  # as the GRPO step does once per micro-batch
    assert pinned.loss_mask.is_pinned() and pinned.targets.is_pinned()
    torch.cuda.synchronize()
    torch.cuda._sleep(50_000_000)  # keep the stream busy: a sync would have to wait for it
    torch.cuda.set_sync_debug_mode("error")
    try:
        moved, moved_pinned = mb.to(dev), pinned.to(dev)
        rows, pick = loss_rows_picker(pinned, dev)
        got = (pick(mb.targets), pick(mb.advantages), pick(on_dev), moved.input_ids)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert rows.tolist() == [1, 2, 5]
    assert got[0].tolist() == [1, 2, 5] and got[2].tolist() == [1.0, 2.0, 5.0]
    assert got[1].tolist() == pytest.approx([0.1, 0.2, 0.5])
    assert moved.input_ids.device.type == "cuda" and moved_pinned.advantages.is_cuda


def test_engine_logprobs_packed_at_targets_and_their_gap_to_the_trainer():
    """The engine's log-probs sit at the positions whose targets they score (NaN elsewhere and
    for a rollout whose log-probs do not cover its response); the gap metric is |old - engine|
    over the loss tokens that have one (hand-computed)."""
    from ovlt.grpo.passes import engine_logprob_gap
    rope = lambda ids, grid: torch.arange(len(ids)).expand(3, -1)  # noqa: E731
    a = Rollout(prompt_ids=[10, 11, 12], response_ids=[20, 21], group=0,
                engine_logprobs=[-1.0, -2.0])
    b = Rollout(prompt_ids=[13], response_ids=[22, 23], group=1, engine_logprobs=[-0.5])  # short
    c = Rollout(prompt_ids=[14], response_ids=[24, 25], group=2, engine_logprobs=[-3.0, -4.0],
                train=False)
    mb = pack_rollouts([a, b, c], 100, rope)[0]
    nan = float("nan")
    want = [nan, nan, -1.0, -2.0, nan, nan, nan, nan, -3.0, -4.0, nan]
    got = mb.engine_logprobs[0].tolist()
    assert len(got) == len(want)
    assert all((math.isnan(w) and math.isnan(g)) or w == g for w, g in zip(want, got))
    mb.old_logprobs = torch.tensor([[0.0, 0.0, -1.5, -1.0, 0.0, -0.7, -0.9, 0.0, 0.0, 0.0, 0.0]])
    tot, mx, n = engine_logprob_gap([mb])
    # a's two tokens: |-1.5 + 1| + |-1 + 2|; b has no full engine log-probs; c is not trained
    assert n == 2.0 and tot.item() == pytest.approx(1.5) and mx.item() == pytest.approx(1.0)
    assert engine_logprob_gap(pack_rollouts([Rollout([1], [2], 0)], 9, rope)) == (None, None, 0.0)
