"""The calculator family, its conversations as training documents, and the tool loop that measures tool use."""

import random

import pytest

from nanoseek.tasks import get_family
from nanoseek.tasks.calculator import CALCULATOR, calculate
from nanoseek.tokenizer import CALLS_BEGIN, OUTPUTS_END, render_chat
from nanoseek.tool_use import tool_use
from nanoseek.train.lm_data import chat_document, conversation, tokenizer_texts

from .conftest import memorised

FAMILY = get_family("calculator")


def test_the_calculator_is_exact_and_says_what_is_wrong():
    assert calculate('{"expression": "482*37"}') == "17834"
    assert calculate('{"expression": "(1 + 2) * -3 / 4"}') == "-9/4"
    assert calculate('{"expression": "2.5*4"}') == "10"
    assert calculate('{"expression": "__import__(\'os\')"}') == "error: not an arithmetic expression"
    assert calculate('{"expression": "1/0"}') == "error: not an arithmetic expression"
    assert calculate("not json").startswith("error: the arguments must be")
    assert calculate('{"expr": "1+1"}') == "error: not an arithmetic expression"
    assert FAMILY.run_tool("python", "{}") == "error: no tool named 'python'"


@pytest.mark.parametrize("difficulty, digits", [(1, (3, 2)), (4, (4, 4))])
def test_a_calculator_problem_is_a_conversation_whose_answer_is_the_tools_result(difficulty, digits):
    p = FAMILY.generate(random.Random(difficulty), difficulty)
    a, b = map(int, p.prompt.removeprefix("What is ").removesuffix("?").split("*"))
    assert (len(str(a)), len(str(b))) == digits and p.answer == str(a * b)
    call, result = p.meta["turns"]
    assert call["tool_calls"][0]["function"]["name"] == "calculator" and p.meta["tools"] == [CALCULATOR]
    assert FAMILY.run_tool("calculator", call["tool_calls"][0]["function"]["arguments"]) == result["content"] == \
        p.answer
    assert FAMILY.score(p, p.solution) == 1.0


def test_tool_conversations_become_documents_with_their_tools(tok, tmp_path):
    p = FAMILY.generate(random.Random(0), 1)
    row = p.to_dict()
    ids, mask = chat_document(tok, p.prompt, p.solution, *conversation(row))
    text = render_chat([{"role": "user", "content": p.prompt}, *p.meta["turns"],
                        {"role": "assistant", "content": p.solution}], tools=p.meta["tools"])
    assert tok.decode(ids) + tok.eos_token == text  # the shards add the final end-of-sentence
    prompt = tok.apply_chat_template([{"role": "user", "content": p.prompt}], True, tools=p.meta["tools"])
    assert mask == [0] * len(prompt) + [1] * (len(ids) - len(prompt))
    assert conversation({"prompt": "x", "solution": "y"}) == (None, [])
    path = tmp_path / "rows.jsonl"
    path.write_text(__import__("json").dumps(row) + "\n")
    assert CALLS_BEGIN in next(tokenizer_texts([path]))  # the tokenizer learns the markers it will read


def test_the_tool_loop_runs_the_calls_and_grades_the_final_reply(tok):
    p = FAMILY.generate(random.Random(0), 1)
    user = [{"role": "user", "content": p.prompt}]
    called = user + p.meta["turns"]
    call_text = render_chat(user + p.meta["turns"][:1], tools=p.meta["tools"]).split("<｜Assistant｜>")[1]
    turns = [(tok.apply_chat_template(user, True, tools=p.meta["tools"]), call_text.removesuffix(tok.eos_token)),
             (tok.apply_chat_template(called, True, tools=p.meta["tools"]), p.solution)]
    assert tok.decode(turns[1][0]).endswith(OUTPUTS_END)
    model = memorised(tok, turns, max_position_embeddings=1024)
    with_tools = tool_use(model, tok, [p], max_new_tokens=300)
    assert with_tools["pass@1"] == 1.0 and with_tools["tool_call_rate"] == 1.0
    assert with_tools["accepted_call_rate"] == 1.0 and with_tools["examples"][0]["reply"] == p.solution
    without = tool_use(model, tok, [p], offer_tools=False, max_new_tokens=300)
    assert without["tool_call_rate"] == 0.0 and without["pass@1"] == 0.0
