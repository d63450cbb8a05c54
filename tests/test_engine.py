"""The generation engine: continuous batching on the latent cache, sampling, stops, MTP speculation."""

import json
from dataclasses import replace

import pytest
import torch

from nanoseek import Transformer
from nanoseek.engine import Engine, IdsOnly
from nanoseek.sampling import (RowSettings, SamplingError, SamplingParams, draw_rows, probabilities,
                               speculative_accept)

from .conftest import tiny_config



@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return Transformer(tiny_config(vocab_size=tok.vocab_size, num_nextn_predict_layers=1)).eval()


def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by full forwards without any cache."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


PROMPTS = [[0, 3, 20, 21, 22], [0, 3, 30], [0, 3, 40, 41, 42, 43, 44, 45, 46], [0, 9], [0, 3, 50, 51]]


def test_greedy_matches_full_forward_at_every_batch_size(model, tok):
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    expected = [reference_greedy(model, p, 12) for p in PROMPTS]
    for max_batch in (1, 2, 5):  # 2: requests wait and join as slots free up
        got = Engine(model, tok, max_batch=max_batch, max_len=64).generate(PROMPTS, params)
        assert [c.token_ids for c in got] == expected
        assert all(c.finish_reason == "length" and len(c.logprobs) == 12 for c in got)


def test_chunked_prefill_gives_the_same_tokens(model, tok):
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    whole = Engine(model, tok, max_batch=5, max_len=64).generate(PROMPTS, params)
    chunked = Engine(model, tok, max_batch=5, max_len=64, prefill_chunk=3).generate(PROMPTS, params)
    assert [c.token_ids for c in chunked] == [c.token_ids for c in whole]
    assert all(torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)
               for a, b in zip(chunked, whole))


@pytest.mark.parametrize("speculative", [False, True])
def test_cache_bounds_in_blocks_give_the_same_tokens(model, tok, speculative):
    """A GPU engine rounds each step's cache bound up to a block (one CUDA graph per block): positions past a row's
    own are masked, so its tokens and log-probs stay those of the exact bound."""
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    exact = Engine(model, tok, max_batch=5, max_len=64, speculative=speculative)
    blocked = Engine(model, tok, max_batch=5, max_len=64, speculative=speculative)
    blocked.cache_block = 16
    assert [blocked._bound(r) for r in (1, 16, 17, 60)] == [16, 16, 32, 64]
    a, b = exact.generate(PROMPTS, params), blocked.generate(PROMPTS, params)
    assert [c.token_ids for c in b] == [c.token_ids for c in a]
    assert torch.allclose(torch.tensor([c.logprobs for c in b]), torch.tensor([c.logprobs for c in a]), atol=1e-5)


def test_rows_of_different_lengths_join_mid_flight(model, tok):
    engine = Engine(model, tok, max_batch=4, max_len=64)
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    first = engine.submit(PROMPTS[0], params)
    for _ in range(4):
        engine.step()
    late = engine.submit(PROMPTS[2], params)
    while engine.has_work():
        engine.step()
    assert first.token_ids == reference_greedy(model, PROMPTS[0], 10)
    assert late.token_ids == reference_greedy(model, PROMPTS[2], 10)


def test_seeded_sampling_does_not_depend_on_the_batch(model, tok):
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
    alone = Engine(model, tok, max_batch=1, max_len=64).generate([PROMPTS[0]], params)[0]
    crowd = Engine(model, tok, max_batch=5, max_len=64).generate(
        PROMPTS, [params] + [SamplingParams(max_new_tokens=16, temperature=1.0, seed=s) for s in range(4)])[0]
    assert alone.token_ids == crowd.token_ids
    other = Engine(model, tok, max_batch=1, max_len=64).generate(
        [PROMPTS[0]], SamplingParams(max_new_tokens=16, temperature=1.0, seed=8, ignore_eos=True))[0]
    assert other.token_ids != alone.token_ids


def test_a_repeated_prompt_is_prefilled_once_and_its_samples_stay_seeded(model, tok, monkeypatch):
    prompts = [PROMPTS[2]] * 3 + [PROMPTS[0], PROMPTS[2]]  # GRPO's group: one prompt, several samples
    params = [SamplingParams(max_new_tokens=10, temperature=1.0, seed=s, ignore_eos=True) for s in range(5)]
    alone = [Engine(model, tok, max_batch=1, max_len=64).generate([p], sp)[0].token_ids
             for p, sp in zip(prompts, params)]
    prefill_rows = []
    forward = model.forward

    def counting(input_ids, *args, **kwargs):
        if input_ids.shape[1] > 1:
            prefill_rows.append(input_ids.shape[0])
        return forward(input_ids, *args, **kwargs)

    monkeypatch.setattr(model, "forward", counting)
    together = Engine(model, tok, max_batch=5, max_len=64).generate(prompts, params)
    assert prefill_rows == [1, 2]  # the shared [0, 3] once, then one row per distinct prompt
    assert [c.token_ids for c in together] == alone
    assert len({tuple(t) for t in alone[:3]}) > 1  # the copies of one prompt still sample differently


def test_a_shared_prefix_is_prefilled_once(model, tok, monkeypatch):
    system = [0, 3, 60, 61, 62, 63, 64, 65, 66, 67]  # a system prompt every request starts with
    prompts = [system + [20, 21], system + [30], system + [40, 41, 42]]
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    alone = [Engine(model, tok, max_batch=1, max_len=64).generate([p], params)[0] for p in prompts]
    shapes = []
    forward = model.forward

    def recording(input_ids, *args, **kwargs):
        shapes.append(tuple(input_ids.shape))
        return forward(input_ids, *args, **kwargs)

    monkeypatch.setattr(model, "forward", recording)
    together = Engine(model, tok, max_batch=3, max_len=64, prefill_chunk=4).generate(prompts, params)
    assert shapes[:4] == [(1, 4), (1, 4), (1, 2), (3, 3)]  # the prefix in chunks of 4, one row; then the rest
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert all(torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)
               for a, b in zip(together, alone))
    speculative = Engine(model, tok, max_batch=3, max_len=64, prefill_chunk=4, speculative=True)
    assert [c.token_ids for c in speculative.generate(prompts, params)] == [c.token_ids for c in alone]


def test_stops_and_finish_reasons(model, tok):
    engine = Engine(model, tok, max_batch=2, max_len=64)
    free = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=20, ignore_eos=True))[0]
    token = free.token_ids[3]
    by_token = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=20, stop_token_ids=[token],
                                                            ignore_eos=True))[0]
    assert by_token.finish_reason == "stop" and by_token.token_ids == free.token_ids[:free.token_ids.index(token) + 1]
    middle = len(free.text) // 2
    stop = free.text[middle:middle + 2]
    by_text = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=20, stop=[stop], ignore_eos=True))[0]
    assert by_text.finish_reason == "stop" and by_text.text == free.text[:free.text.find(stop)]
    first = free.token_ids[0]  # a stop on the token the prefill produces
    at_once = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=20, stop_token_ids=[first]))[0]
    assert at_once.finish_reason == "stop" and at_once.token_ids == [first] and at_once.text == ""


def test_streamed_text_adds_up_and_holds_back_stop_prefixes(model, tok):
    engine = Engine(model, tok, max_batch=1, max_len=64)
    c = engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=15, ignore_eos=True, stop=["zzz-never"]))
    pieces = []
    while engine.has_work():
        pieces += [e.new_text for e in engine.step() if e.completion is c]
    assert "".join(pieces) == c.text == tok.decode(c.token_ids)


def test_cancel_frees_the_slot(model, tok):
    engine = Engine(model, tok, max_batch=1, max_len=64)
    a = engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=30, ignore_eos=True))
    b = engine.submit(PROMPTS[1], SamplingParams(max_new_tokens=3, ignore_eos=True))
    engine.step()
    engine.cancel(a)
    while engine.has_work():
        engine.step()
    assert a.finish_reason == "cancelled" and b.finish_reason == "length" and len(b.token_ids) == 3


@pytest.mark.parametrize("speculative", [False, True])
def test_reported_log_probs_are_the_models_own(model, tok, speculative):
    """With logprobs / prompt_logprobs every generated and prompt token carries log softmax of the model's logits
    (not the sampling temperature's) and the k most likely tokens, each row its own k in one batch (a row that asks
    none gets none); the events hand out each token's report once."""
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[1]]
    params = SamplingParams(max_new_tokens=6, temperature=0.8, seed=1, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    engine = Engine(model, tok, max_batch=3, max_len=64, speculative=speculative)
    done = [engine.submit(p, replace(params, logprobs=k)) for p, k in zip(prompts, (3, 1, None))]
    reported = {c.id: [] for c in done}
    while engine.has_work():
        for e in engine.step():
            reported[e.completion.id] += e.logprobs
    assert not done[2].token_logprobs and not reported[done[2].id] and len(done[2].token_ids) == 6
    for c, generated_k in zip(done[:2], (3, 1)):
        ids = c.prompt_ids + c.token_ids
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)  # for ids[1:]
        assert reported[c.id] == c.token_logprobs and len(c.token_logprobs) == 6
        assert c.prompt_logprobs[0] is None and len(c.prompt_logprobs) == len(c.prompt_ids)
        for at, entry in enumerate(c.prompt_logprobs[1:] + c.token_logprobs, start=1):
            row = expected[at - 1]
            assert entry.token == ids[at] and entry.logprob == pytest.approx(float(row[ids[at]]), abs=1e-5)
            k = 2 if at < len(c.prompt_ids) else generated_k
            assert [t for t, _ in entry.top] == row.topk(k).indices.tolist()
            assert [v for _, v in entry.top] == pytest.approx(row.topk(k).values.tolist(), abs=1e-5)
    plain = Engine(model, tok, max_batch=2, max_len=64).generate(prompts, SamplingParams(max_new_tokens=6))
    assert all(not c.token_logprobs and not c.prompt_logprobs for c in plain)  # nothing when not asked
    with pytest.raises(SamplingError, match="logprobs = 21: must be None or an int in"):
        SamplingParams(logprobs=21)


def test_bad_requests_are_named(model, tok):
    engine = Engine(model, tok, max_batch=1, max_len=16)
    with pytest.raises(SamplingError, match="prompt: 20 tokens"):
        engine.submit([1] * 20)
    with pytest.raises(SamplingError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(SamplingError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)


@pytest.fixture(scope="module")
def cyclic_model():
    """A tiny model trained for a few seconds on a cyclic sequence, so its MTP drafts are mostly right."""
    torch.manual_seed(0)
    model = Transformer(tiny_config(num_nextn_predict_layers=1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    cycle = torch.arange(10, 30)
    for _ in range(120):
        start = torch.randint(0, 20, (8,))
        x = torch.stack([cycle.roll(-int(s)).repeat(3)[:40] for s in start])
        out = model(x)
        loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        loss = loss + torch.nn.functional.cross_entropy(out.mtp_logits[0][:, :-1].flatten(0, 1), x[:, 2:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_speculative_greedy_is_identical_and_mostly_accepted(cyclic_model, model):
    prompts = [list(range(10, 16)), list(range(20, 23)), [0, 5, 9]]
    params = SamplingParams(max_new_tokens=25, ignore_eos=True)
    plain = Engine(cyclic_model, IdsOnly(), max_batch=3, max_len=64).generate(prompts, params)
    spec_engine = Engine(cyclic_model, IdsOnly(), max_batch=3, max_len=64, speculative=True)
    spec = spec_engine.generate(prompts, params)
    assert [c.token_ids for c in spec] == [c.token_ids for c in plain]
    assert spec_engine.acceptance_rate > 0.5
    random_spec = Engine(model, IdsOnly(), max_batch=2, max_len=64, speculative=True)  # drafts mostly wrong
    assert [c.token_ids for c in random_spec.generate(PROMPTS[:2], params)] == \
        [reference_greedy(model, p, 25) for p in PROMPTS[:2]]


def test_speculative_sampling_keeps_the_target_distribution():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.1, 0.2, 0.3, 0.4])
    counts = torch.zeros(4)
    n = 20000
    for _ in range(n):
        draft = int(torch.multinomial(q, 1, generator=g))
        counts[speculative_accept(p[None], q[None], [draft], [g])[1][0]] += 1
    assert torch.allclose(counts / n, p, atol=0.015)
    p, q = probabilities(torch.tensor([[0.1, 2.0, 0.3], [3.0, 0, 0]]), RowSettings.of([SamplingParams()] * 2))
    assert speculative_accept(torch.stack([p, q]), torch.stack([q, q]), [0, 0], [None, None]) == ([False, True], [1, 0])


def test_draw_follows_the_distribution_and_never_picks_an_impossible_token():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0])
    counts = torch.bincount(torch.tensor(draw_rows(p.expand(20000, -1), [g] * 20000)), minlength=6)
    assert torch.allclose(counts / 20000, p, atol=0.015) and counts[p == 0].sum() == 0
    assert draw_rows(torch.tensor([[0.0, 1.0, 0.0]]), [g]) == [1]


def test_top_k_and_top_p_cut_the_distribution():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    settings = [SamplingParams(temperature=1.0, top_k=2), SamplingParams(temperature=1.0, top_p=0.7),
                SamplingParams(temperature=1.0), SamplingParams()]
    top_k, top_p, free, greedy = probabilities(logits.roll(2).expand(4, -1), RowSettings.of(settings)).roll(-2, 1)
    assert (top_k[2:] == 0).all() and torch.isclose(top_k[:2].sum(), torch.tensor(1.0))
    assert top_p[0] > 0 and top_p[1] > 0 and (top_p[2:] == 0).all() and torch.isclose(top_p.sum(), torch.tensor(1.0))
    assert torch.allclose(free, logits.softmax(-1)) and greedy.tolist() == [1.0, 0, 0, 0, 0]


@pytest.mark.slow
def test_compiled_steps_give_the_eager_tokens(model, cyclic_model, tok):
    """torch.compile'd decode, draft and verify steps: the same greedy tokens and log-probs as eager, at batch 1
    and 5, plain and speculative; the compile seconds are counted, and the warm-up builds every graph a batch needs."""
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    for m, speculative in ((model, False), (cyclic_model, True)):
        for prompts in (PROMPTS[:1], PROMPTS):
            eager, fast = (Engine(m, tok, max_batch=len(prompts), max_len=64, speculative=speculative,
                                  compile=compile) for compile in (False, True))
            fast.warmup([params])
            assert fast.drafted == 0 and not fast.has_work()
            expected, got = eager.generate(prompts, params), fast.generate(prompts, params)
            assert [c.token_ids for c in got] == [c.token_ids for c in expected]
            assert all(torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)
                       for a, b in zip(got, expected))
            assert fast.compile
        built = fast.warmup_seconds  # a batch of two (a graph of its own on a CPU) was built in the warm-up
        assert [c.token_ids for c in fast.generate(PROMPTS[:2], params)] == [c.token_ids for c in expected[:2]]
        assert fast.warmup_seconds == built > 0


def test_a_step_that_cannot_compile_runs_eagerly_with_a_warning(model, tok, monkeypatch):
    def broken(fn, cuda=False):
        def fail(*args):
            raise RuntimeError("no C++ compiler\nmore detail")
        return fail

    monkeypatch.setattr("nanoseek.engine.compiled", broken)
    engine = Engine(model, tok, max_batch=2, max_len=64, compile=True)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    with pytest.warns(UserWarning, match="decode_step failed, decoding eagerly: RuntimeError: no C.. compiler$"):
        got = engine.generate(PROMPTS[:2], params)
    assert not engine.compile
    assert [c.token_ids for c in got] == [reference_greedy(model, p, 6) for p in PROMPTS[:2]]


def test_a_grammar_holds_greedy_and_sampled_rows_to_it_in_one_batch(model, tok):
    """Rows with a JSON grammar and rows without share a batch (speculative engine included): the first always end
    in text the grammar accepts, the others decode as they would alone."""
    from nanoseek.grammar import json_grammar
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["n"], "additionalProperties": False}
    free = SamplingParams(max_new_tokens=8, ignore_eos=True)
    alone = Engine(model, tok, max_batch=1, max_len=64).generate([PROMPTS[1]], free)[0].token_ids
    greedy = []
    for speculative in (False, True):
        engine = Engine(model, tok, max_batch=4, max_len=64, speculative=speculative)
        params = [SamplingParams(max_new_tokens=20, temperature=t, seed=s, grammar=json_grammar(schema))
                  for t, s in ((0.0, 0), (1.0, 1), (1.0, 2))] + [free]
        done = engine.generate([PROMPTS[0]] * 3 + [PROMPTS[1]], params)
        for c in done[:3]:
            assert c.finish_reason == "stop" and set(json.loads(c.text)) == {"n"}, c.text
        assert done[3].token_ids == alone
        greedy.append(done[0].token_ids)
    assert greedy[0] == greedy[1] and engine.drafted > 0  # the drafts were checked against the grammar, not skipped
    with pytest.raises(SamplingError, match="grammar"):
        Engine(model, IdsOnly(), max_len=64).submit(PROMPTS[0], SamplingParams(grammar=json_grammar(schema)))
