"""EleutherAI's lm-evaluation-harness against the server, as its users run it: `local-completions` on a
multiple-choice task (log-likelihoods through echo + logprobs) and `local-chat-completions` on a generation task.
The log-likelihoods it reads equal the model's own, computed on the token ids lm-eval itself sends."""

import json

import lm_eval
import pytest
import torch
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager

from nanoseek import ModelConfig, Transformer
from nanoseek.serve import create_app, running

PROBLEMS = [{"question": f"What is {a}+{b}?", "choices": [str(a + b), str(a + b + 1), str(a * b)], "answer": 0}
            for a, b in [(1, 2), (3, 4), (5, 6), (2, 7)]]
TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {kind}
doc_to_text: "{{{{question}}}}"
{extra}
"""
MC = """doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}"""
GEN = """doc_to_target: "{{choices[0]}}"
generation_kwargs: {until: ["\\n"], max_gen_toks: 8}
metric_list:
  - {metric: exact_match, aggregation: mean, higher_is_better: true}"""


@pytest.mark.slow
def test_lm_eval_log_likelihoods_and_generation_against_the_server(tok, tmp_path):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size)).eval()
    model.save_pretrained(tmp_path / "model")
    tok.save(tmp_path / "model")
    (tmp_path / "problems.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name, kind, extra in (("tiny_mc", "multiple_choice", MC), ("tiny_gen", "generate_until", GEN)):
        (tasks / f"{name}.yaml").write_text(TASK.format(name=name, data=tmp_path / "problems.jsonl", kind=kind,
                                                        extra=extra))
    manager = TaskManager(include_path=str(tasks))
    with running(create_app(model, tok, "tiny-test")) as url:
        args = (f"model=tiny-test,base_url={url}/v1/completions,tokenizer={tmp_path / 'model'},"
                "tokenizer_backend=huggingface,num_concurrent=1,max_retries=1")
        mc = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=["tiny_mc"],
                                     task_manager=manager, log_samples=True)
        gen = lm_eval.simple_evaluate(
            model="local-chat-completions", tasks=["tiny_gen"], task_manager=manager, apply_chat_template=True,
            model_args=f"model=tiny-test,base_url={url}/v1/chat/completions,num_concurrent=1,max_retries=1",
            log_samples=True)
    lm = get_model("local-completions").create_from_arg_string(args)
    samples = mc["samples"]["tiny_mc"]
    assert len(samples) == len(PROBLEMS) and 0 <= mc["results"]["tiny_mc"]["acc,none"] <= 1
    for sample in samples:
        for (context, continuation), [(loglikelihood, _)] in zip(sample["arguments"], sample["resps"]):
            ctx, cont = lm._encode_pair(context, continuation)  # the ids lm-eval sent
            with torch.no_grad():
                logp = model(torch.tensor([ctx + cont])).logits[0, :-1].log_softmax(-1)
            expected = sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
            assert loglikelihood == pytest.approx(expected, abs=1e-5)
    assert len(gen["samples"]["tiny_gen"]) == len(PROBLEMS) and "exact_match,none" in gen["results"]["tiny_gen"]
