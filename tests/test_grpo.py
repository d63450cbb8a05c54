"""GRPO: advantages, the clipped objective and KL against hand-computed numbers; runs, resume, dynamic sampling."""

import json
import math

import pytest
import torch

from nanoseek.rewards import RewardResult, combined_reward
from nanoseek.train import grpo, trainer
from nanoseek.train.grpo import group_advantages, grpo_loss, load_policy, run, sequence_logprobs
from nanoseek.train.recipe import load_config

from .conftest import crash_after


def cfg(**kw):
    return load_config(None, {}, data=["x"], **kw).grpo


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    std = math.sqrt(4 * 0.25 / 3)  # Bessel-corrected, as TRL
    a = group_advantages(rewards, "grpo")
    assert torch.allclose(a[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4))
    assert (a[1] == 0).all()  # equal rewards: no signal
    assert torch.allclose(group_advantages(rewards, "dr_grpo")[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))


LOGP = torch.log(torch.tensor([[0.5, 0.25], [0.4, 0.1]]))
OLD = torch.log(torch.tensor([[0.4, 0.25], [0.5, 0.1]]))  # ratios [[1.25, 1], [0.8, 1]]
ADV = torch.tensor([1.0, -1.0])
MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0]])


@pytest.mark.parametrize("loss_type, expected", [
    # per-token losses: row 0: -min(1.25, 1.2) = -1.2, -1; row 1: -min(-0.8, -0.8) = 0.8, (masked)
    ("grpo", ((-1.2 - 1.0) / 2 + 0.8) / 2),
    ("dapo", (-1.2 - 1.0 + 0.8) / 3),
    ("dr_grpo", (-1.2 - 1.0 + 0.8) / (2 * 4)),
])
def test_clipped_objective_by_hand(loss_type, expected):
    c = cfg(loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.2, max_new_tokens=4)
    loss, stats = grpo_loss(LOGP, OLD, None, ADV, MASK, c)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["clip_fraction"] == pytest.approx(1 / 3)  # only row 0, token 0 is clipped (1.25 > 1.2, A > 0)
    assert stats["kl"] == 0


def test_clip_higher_and_kl_by_hand():
    loss, _ = grpo_loss(LOGP, OLD, None, ADV, MASK, cfg(loss_type="dapo", epsilon_high=0.28))
    assert loss.item() == pytest.approx((-1.25 - 1.0 + 0.8) / 3, abs=1e-6)  # 1.25 < 1.28: no longer clipped
    ref = torch.log(torch.tensor([[0.25, 0.25], [0.4, 0.1]]))  # differs from the policy at row 0, token 0 only
    k3 = 0.5 - math.log(0.5) - 1  # pi_ref/pi - log(pi_ref/pi) - 1 with pi_ref/pi = 0.5
    loss_kl, stats = grpo_loss(LOGP, OLD, ref, ADV, MASK, cfg(loss_type="dapo", beta=0.1))
    assert stats["kl"] == pytest.approx(k3 / 3, rel=1e-5)
    assert loss_kl.item() == pytest.approx((-1.2 - 1.0 + 0.8 + 0.1 * k3) / 3, abs=1e-6)


def test_one_update_has_the_policy_gradient():
    """With pi_old = pi (one update per batch) the gradient is -A / |o| per completion token (grpo)."""
    logp = LOGP.clone().requires_grad_(True)
    loss, _ = grpo_loss(logp, logp.detach(), None, ADV, MASK, cfg(loss_type="grpo"))
    loss.backward()
    expected = torch.tensor([[-1 / 2, -1 / 2], [1 / 1, 0.0]]) / 2  # -A / tokens in the row, mean over 2 rows
    assert torch.allclose(logp.grad, expected)


def test_length_sorted_micro_batches_give_the_padded_batch_log_probs(base):
    """sequence_logprobs cuts the rollouts into micro-batches by length; every real target's log-prob and entropy,
    and the experts' token counts, equal those of one padded batch."""
    policy = load_policy(base)
    torch.manual_seed(0)
    lengths = [9, 30, 5, 17, 12, 30, 6]
    ids = torch.full((len(lengths), max(lengths)), policy.pad_id)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(3, 300, (n,))
    real = torch.arange(ids.shape[1])[None] < torch.tensor(lengths)[:, None]
    targets = real[:, 1:]
    with torch.no_grad():
        whole = policy.logprobs(ids, 0.7, token_mask=real)
        for budget in (1, 40, 10_000):  # every row alone; a few per micro-batch; one batch
            parts = sequence_logprobs(policy, ids, real, 0.7, budget)
            assert torch.allclose(parts[0][targets], whole[0][targets], atol=1e-5)
            assert torch.allclose(parts[1][targets], whole[1][targets], atol=1e-5)
            assert [c.tolist() for c in parts[2]] == [c.tolist() for c in whole[2]]


def test_log_probs_of_the_completions_alone_match_the_whole_rows_and_carry_their_gradient(base):
    """With `targets` the head runs only where a log-prob is wanted (GRPO's completions): those log-probs, entropies
    and the gradient they pass to the model equal the whole rows' ones, and every other position is zero."""
    policy = load_policy(base)
    torch.manual_seed(0)
    ids = torch.randint(3, 300, (3, 12))
    targets = torch.zeros(3, 11, dtype=torch.bool)
    targets[0, 4:] = targets[1, 7:9] = True  # the last row wants none
    grads = []
    for wanted in (None, targets):
        policy.model.zero_grad()
        logp, entropy, _ = policy.logprobs(ids, 0.7, targets=wanted)
        (logp * targets).sum().backward()
        grads.append(policy.model.layers[0].self_attn.kv_a_proj_with_mqa.weight.grad.clone())
        if wanted is None:
            whole = logp.detach(), entropy
    assert torch.allclose(logp[targets], whole[0][targets], atol=1e-5)
    assert torch.allclose(entropy[targets], whole[1][targets], atol=1e-5) and not entropy.requires_grad
    assert not logp[~targets].any() and not entropy[~targets].any()
    assert grads[0].abs().max() > 0 and torch.allclose(grads[1], grads[0], atol=1e-6)


def grpo_settings(corpus, out, base, **kw):
    return load_config(None, {}, **{**dict(stage="grpo", init=str(base), tasks="tasks-cpu-demo",
                                           data=[str(corpus.with_name("tasks-held-out.jsonl"))], eval_n=4,
                                           group_size=4, prompts_per_step=2, max_new_tokens=12, max_steps=4,
                                           save_every=2, lr=1e-3, out=str(out), warmup_steps=1), **kw})


def test_grpo_runs_logs_and_resumes_exactly(corpus, base, tmp_path, monkeypatch):
    summary = run(grpo_settings(corpus, tmp_path / "straight", base))
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    assert {"reward", "accuracy", "format_rate", "response_length", "kl", "clip_fraction", "entropy",
            "rollout_seconds"} <= set(rows[0])
    assert 0 < rows[0]["rollout_seconds"] < rows[0]["seconds"]
    assert summary["held_out_before"]["n"] == summary["held_out"]["n"] == 4
    crash_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        run(grpo_settings(corpus, tmp_path / "resumed", base))
    run(grpo_settings(corpus, tmp_path / "resumed", base, resume=True))
    resumed = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["loss"], r["reward"]) for r in resumed] == [(r["loss"], r["reward"]) for r in rows]


def test_dynamic_sampling_drops_groups_without_signal(corpus, base, tmp_path):
    run(grpo_settings(corpus, tmp_path, base, dynamic_sampling=True, loss_type="dapo", max_steps=2, eval_n=0,
                      data=[]))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for r in rows:  # a group is kept only if its rewards differ, so the loss is 0 exactly when none was kept
        assert (r["groups_kept"] == 0) == (r["loss"] == 0.0)


# ---- a transformers causal LM as the policy -------------------------------------------------------------------------
def tiny_hf_model(kind: str, tok, path):
    """A random 2-layer, 32-wide Llama (untied head) or Qwen2 (tied head) with the `tok` fixture's vocabulary and its
    tokenizer (which carries a chat template), saved as a Hugging Face directory."""
    transformers = pytest.importorskip("transformers")
    shape = dict(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tok.bos_id,
                 eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shape, tie_word_embeddings=True))
    model.save_pretrained(path)
    tok.save(path)
    return path


def hf_settings(corpus, out, init, **kw):
    return grpo_settings(corpus, out, init, max_steps=3, max_new_tokens=8, eval_n=2, lr=1e-2, mask_truncated=False,
                         **kw)  # a random model seldom stops within 8 tokens: count truncated completions too


def shaped_reward(problem, completion, config, length=None):
    """The task reward plus a bonus a random model earns too (by the completion's length), so advantages differ."""
    r = combined_reward(problem, completion, config, length)
    return RewardResult(r.value + len(completion) % 3 / 4, r.reason, r.components)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_grpo_on_a_transformers_model_runs_saves_and_resumes_exactly(kind, tok, corpus, tmp_path, monkeypatch):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setattr(grpo, "combined_reward", shaped_reward)
    monkeypatch.setattr(trainer, "matmul_peak", lambda device: 1e11)  # MFU's yardstick: not what this test is about
    init = tiny_hf_model(kind, tok, tmp_path / "init")
    summary = run(hf_settings(corpus, tmp_path / "straight", init))
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    assert all(r["grad_norm"] > 0 for r in rows)  # the shaped reward gives a gradient
    assert {"reward", "accuracy", "format_rate", "response_length", "kl", "clip_fraction", "entropy",
            "rollout_seconds"} <= set(rows[0])
    assert 0 < rows[0]["rollout_seconds"] < rows[0]["seconds"]
    assert all(r["maxvio"] == [] and r["maxvio_mean"] == 0.0 for r in rows)  # a dense model: no expert loads
    assert summary["held_out_before"]["n"] == summary["held_out"]["n"] == 2
    final = tmp_path / "straight" / "model"
    trained = AutoModelForCausalLM.from_pretrained(final)  # its own format, with its tokenizer beside it
    assert type(trained).__name__ == type(AutoModelForCausalLM.from_pretrained(init)).__name__
    assert AutoTokenizer.from_pretrained(final).eos_token_id == tok.eos_id
    before, after = load_file(init / "model.safetensors"), load_file(final / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # GRPO moved the weights

    crash_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run(hf_settings(corpus, tmp_path / "resumed", init))
    run(hf_settings(corpus, tmp_path / "resumed", init, resume=True))
    resumed = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["loss"], r["reward"], r["grad_norm"]) for r in resumed] == \
        [(r["loss"], r["reward"], r["grad_norm"]) for r in rows]
    again = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    assert all(torch.equal(after[k], again[k]) for k in after)


def test_hf_rollouts_are_seeded_per_sample_and_prompts_use_the_chat_template(tok, tmp_path):
    from nanoseek.sampling import SamplingParams
    from nanoseek.train.grpo import load_policy
    from nanoseek.train.hf_policy import HFPolicy

    policy = load_policy(tiny_hf_model("llama", tok, tmp_path / "m"), max_batch=4, max_len=64)
    assert isinstance(policy, HFPolicy)
    prompt = policy.prompt("What is 1+2?")
    assert prompt == tok.apply_chat_template([{"role": "user", "content": "What is 1+2?"}],
                                             add_generation_prompt=True)
    params = [SamplingParams(max_new_tokens=6, temperature=1.0, seed=s) for s in range(4)]
    batch = policy.generate([prompt, prompt[:-3], prompt, prompt[2:]], params)
    alone = policy.generate([prompt], params[:1])[0]
    assert alone.token_ids == batch[0].token_ids  # the same seed gives the same tokens, whatever the batch
    assert batch[0].token_ids != batch[2].token_ids  # another seed, another sample
    for c in batch:
        assert (c.finish_reason == "stop") == (tok.eos_id in c.token_ids) and len(c.token_ids) <= 6
    policy.model.generation_config.repetition_penalty = 3.0  # the model's own defaults do not leak into sampling
    policy.model.generation_config.min_new_tokens = 5
    assert [c.token_ids for c in policy.generate([prompt], params[:1])] == [alone.token_ids]
    greedy = policy.generate([prompt, prompt[2:]], [SamplingParams(max_new_tokens=6)] * 2)  # left-padded batch
    for p, c in zip([prompt, prompt[2:]], greedy):  # = the argmax of an unpadded forward at every position
        logits = policy.model(torch.tensor([p + c.token_ids])).logits[0, len(p) - 1:-1]
        assert logits.argmax(-1).tolist() == c.token_ids
    policy.tok.chat_template = None  # no template: the plain prompt
    assert policy.prompt("What is 1+2?") == policy.tok("What is 1+2?")["input_ids"]
