"""Tool use, measured: problems of a tool-using family (the calculator) answered through a tool loop on the engine.

Round 1 decodes each problem's chat prompt with its tools described in the system prompt, or, for the control,
without them (the model must then answer alone). The calls in a reply (DeepSeek-V3's format, `parse_tool_calls`)
are run by the family's tool functions, their results go back as `tool` messages and the reply continues, for up
to `max_rounds` rounds; the family's verifier grades the last reply. Greedy decoding, one reply per problem:
pass@1 with its standard error, the share of problems that called a tool, and the share of calls the tool accepted.
This is what a client of `nanoseek serve` does with `tools`, without the HTTP in between.
"""

from __future__ import annotations

from .engine import Engine
from .evaluate import standard_error
from .sampling import SamplingParams
from .tasks import Problem, get_family
from .tokenizer import Tokenizer, parse_tool_calls


def tool_use(model, tok: Tokenizer, problems: list[Problem], offer_tools: bool = True, max_new_tokens: int = 80,
             max_rounds: int = 2, batch_size: int = 64) -> dict:
    """pass@1 (and its standard error), tool-call and accepted-call rates, per problem scores and examples."""
    n = len(problems)
    conversations = [[{"role": "user", "content": p.prompt}] for p in problems]
    tools = [p.meta.get("tools") if offer_tools else None for p in problems]
    replies, calls, accepted = [""] * n, [0] * n, [0] * n
    engine = Engine(model, tok, max_batch=batch_size, max_len=model.cfg.max_position_embeddings)
    params = SamplingParams(max_new_tokens=max_new_tokens)
    active = list(range(n))
    for round_ in range(max_rounds):
        prompts = [tok.apply_chat_template(conversations[i], add_generation_prompt=True, tools=tools[i])
                   for i in active]
        going_on = []
        for i, completion in zip(active, engine.generate(prompts, params)):
            replies[i] = completion.text
            content, made = parse_tool_calls(completion.text) if tools[i] else (completion.text, [])
            if not made or round_ == max_rounds - 1:
                continue
            family = get_family(problems[i].family)
            conversations[i].append({"role": "assistant", "content": content, "tool_calls": [
                {"type": "function", "function": {"name": name, "arguments": arguments}} for name, arguments in made]})
            for name, arguments in made:
                result = family.run_tool(name, arguments)
                calls[i] += 1
                accepted[i] += not result.startswith("error:")
                conversations[i].append({"role": "tool", "content": result})
            going_on.append(i)
        active = going_on
    scores = [get_family(p.family).score(p, reply) for p, reply in zip(problems, replies)]
    return {"n": n, "tools_offered": offer_tools, "pass@1": sum(scores) / n, "pass@1_se": standard_error(scores),
            "tool_call_rate": sum(c > 0 for c in calls) / n,
            "accepted_call_rate": sum(accepted) / sum(calls) if sum(calls) else None,
            "per_problem": scores,
            "examples": [{"conversation": conversations[i], "reply": replies[i], "answer": problems[i].answer}
                         for i in range(min(3, n))]}
