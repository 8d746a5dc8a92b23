"""The loop's text generation helper (`ovlt.iterate.generation.generate_texts`) on the built-in
engine of a tiny random model: sampled continuations do not depend on how requests are batched."""
import dataclasses

from ovlt.iterate.generation import generate_texts
from tests.unit.test_rollout_continuous import _engine, _requests, small  # noqa: F401


class Recording:
    """The engine, with each completion's tokens and each request's seed kept (the tiny engine
    has no tokenizer, so its texts are empty)."""

    def __init__(self, engine):
        self.engine, self.ids, self.seeds = engine, [], []

    def generate(self, requests, params):
        out = self.engine.generate(requests, params)
        self.seeds += [r.seed for r in requests]
        self.ids += [[c.token_ids for c in cs] for cs in out]
        return out


def test_samples_do_not_depend_on_the_batch_size(small):  # noqa: F811
    reqs = [dataclasses.replace(r, seed=None) for r in _requests(7, seed=4)]
    runs = []
    for batch_size in (2, 3, 100):
        rec = Recording(_engine(small, max_batch_size=4))
        texts = generate_texts(rec, reqs, n=2, temperature=1.0, top_p=1.0, max_new_tokens=6,
                               seed=11, batch_size=batch_size)
        assert len(texts) == 7 and all(len(t) == 2 for t in texts)
        runs.append(rec)
    assert runs[0].ids == runs[1].ids == runs[2].ids
    assert runs[0].seeds == runs[2].seeds and len(set(runs[0].seeds)) == 7
    # a request's own seed is kept
    rec = Recording(_engine(small, max_batch_size=4))
    generate_texts(rec, [dataclasses.replace(reqs[0], seed=99)], 1, 1.0, 1.0, 4, seed=11)
    assert rec.seeds == [99]
