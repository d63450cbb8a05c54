"""Products too long to work in one's head, with a calculator to call (DeepSeek-V3's tool-call format).

A problem offers one tool, `calculator`. Its worked solution is a conversation: the reply calls the tool with the
product as an expression, the tool's result comes back, and the reply ends with that result as the answer:

    <User>What is 482*37?<Assistant><tool call: calculator {"expression": "482*37"}><eos><tool output: 17834>
    <think> 482*37=17834 </think> <answer>17834</answer>

`meta["tools"]` holds the tool and `meta["turns"]` the call and its result (the turns before the final reply, which
is `solution`). The verifier reads the final answer as for any family; a model answers right only by copying the
tool's result, since multiplication is not among what the demo's model learns to work. `calculate` is the tool.
Levels 1..4: 3x2, 3x3, 4x3 and 4x4 digits.
"""

from __future__ import annotations

import json
import random

from .arithmetic import operand
from .base import TaskFamily, worked
from .expr import evaluate

CALCULATOR = {"type": "function", "function": {
    "name": "calculator", "description": "exact arithmetic: + - * / and parentheses",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}
DIGITS = {1: (3, 2), 2: (3, 3), 3: (4, 3), 4: (4, 4)}


def calculate(arguments: str) -> str:
    """The calculator: the call's JSON arguments -> the exact value (an integer, or a fraction a/b), or a message
    saying what is wrong. Never evaluates anything but arithmetic (see expr.py)."""
    try:
        expression = json.loads(arguments).get("expression")
    except (json.JSONDecodeError, AttributeError):
        return "error: the arguments must be a JSON object with an `expression` string"
    result = evaluate(expression, unary_minus=True, decimals=True) if isinstance(expression, str) else None
    if result is None:
        return "error: not an arithmetic expression"
    value = result[0]
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


class Calculator(TaskFamily):
    name = "calculator"
    description = "a*b answered by calling a calculator tool; levels 1..4: 3x2, 3x3, 4x3, 4x4 digits"
    max_difficulty = len(DIGITS)
    tool_functions = {"calculator": calculate}

    def make(self, rng: random.Random, difficulty: int):
        da, db = DIGITS[difficulty]
        a, b = operand(rng, da), operand(rng, db)
        arguments = json.dumps({"expression": f"{a}*{b}"})
        call = {"type": "function", "function": {"name": "calculator", "arguments": arguments}}
        turns = [{"role": "assistant", "content": "", "tool_calls": [call]},
                 {"role": "tool", "content": calculate(arguments)}]
        return self.problem(f"What is {a}*{b}?", a * b, worked(f"{a}*{b}={a * b}", a * b), difficulty,
                            tools=[CALCULATOR], turns=turns)
