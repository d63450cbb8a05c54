import json
import random
from fractions import Fraction

import pytest

from nanoseek.cli import main
from nanoseek.errors import NanoseekError, TaskError
from nanoseek.rewards import combined_reward
from nanoseek.tasks import Mixture, MixtureEntry, Problem, extract_answer, families, get_family
from nanoseek.tasks.base import parse_int

LEVELS = [(name, d) for name in families() for d in range(1, get_family(name).max_difficulty + 1)]


def perturb(p: Problem) -> str:
    """A wrong final answer close to the right one."""
    if p.family == "sorting":
        xs = sorted(p.meta["numbers"])
        xs[0], xs[1] = xs[1], xs[0]
        return ", ".join(map(str, xs))
    if p.family == "parity":
        return {"even": "odd", "odd": "even"}[p.answer]
    if p.family == "countdown":
        return f"({p.answer})+1"
    return str(Fraction(p.answer) + 1)


def completion(answer: str) -> str:
    return f"<think> ... </think> <answer>{answer}</answer>"


@pytest.mark.parametrize("name,difficulty", LEVELS)
def test_solutions_score_one_and_perturbed_answers_zero(name, difficulty):
    family, rng = get_family(name), random.Random(difficulty)
    for _ in range(25):
        p = family.generate(rng, difficulty)
        assert (p.family, p.difficulty) == (name, difficulty)
        assert p.solution.startswith("<think> ") and p.solution.endswith(f"<answer>{p.answer}</answer>")
        assert extract_answer(p.solution) == p.answer
        assert family.score(p, p.solution) == 1.0, (p.prompt, p.solution)
        assert family.score(p, completion(perturb(p))) == 0.0, (p.prompt, perturb(p))
        assert combined_reward(p, p.solution).value == 1.0


@pytest.mark.parametrize("name", families())
def test_same_seed_same_problems_and_json_round_trip(name):
    family = get_family(name)
    for d in range(1, family.max_difficulty + 1):
        a = [family.generate(random.Random(3), d) for _ in range(3)]
        b = [family.generate(random.Random(3), d) for _ in range(3)]
        assert a == b
        again = Problem.from_dict(json.loads(json.dumps(a[0].to_dict())))
        assert again == a[0] and family.score(again, a[0].solution) == 1.0


PINNED = [  # seed 7, difficulty 2: the same on every machine and Python version
    ("addition", "What is 6+51?", "<think> 6+1=7, 0+5=5, so 57 </think> <answer>57</answer>"),
    ("subtraction", "What is 6-51?",
     "<think> 6<51 so negate 51-6: 11-6=5 borrow 1, 5-1-0=4, so -45 </think> <answer>-45</answer>"),
    ("multiplication", "What is 51*2?", "<think> 51*2: 1*2=2, 5*2=10, so 102 </think> <answer>102</answer>"),
    ("chain_sum", "What is 5+6+1+5?", "<think> 5+6=11, 11+1=12, 12+5=17 </think> <answer>17</answer>"),
    ("countdown", "Using the numbers [11, 5, 13], make 19. Use + - * / and each number exactly once.",
     "<think> 13+11=24, 24-5=19 </think> <answer>(13+11)-5</answer>"),
    ("linear_equation", "Solve for x: 2x-5=1", "<think> 2x=1+5, 2x=6, x=6/2, x=3 </think> <answer>3</answer>"),
    ("sorting", "Sort ascending: 41, 19, 50, 83, 6",
     "<think> 41 19 50 83 6 -> 6; 41 19 50 83 -> 19; 41 50 83 -> 41; 50 83 -> 50; 83 -> 83 </think> "
     "<answer>6, 19, 41, 50, 83</answer>"),
    ("counting", "Count the letter k in kkmkekku.", "<think> k1 k2 m2 k3 e3 k4 k5 u5 </think> <answer>5</answer>"),
    ("parity", "Is the number of 1s in 10100010 even or odd?",
     "<think> 1 odd, 0 odd, 1 even, 0 even, 0 even, 0 even, 1 odd, 0 odd </think> <answer>odd</answer>"),
]


@pytest.mark.parametrize("name,prompt,solution", PINNED)
def test_pinned_problems(name, prompt, solution):
    p = get_family(name).generate(random.Random(7), 2)
    assert (p.prompt, p.solution) == (prompt, solution)


@pytest.mark.parametrize("name", families())
def test_level_one_is_short_for_a_tiny_model(name):
    rng = random.Random(0)
    longest = max(len(p.prompt) + len(p.solution) for p in (get_family(name).generate(rng, 1) for _ in range(200)))
    assert longest < 200


def test_worked_steps_carry_borrow_and_partial_products():
    from nanoseek.tasks.arithmetic import column_add, column_multiply, column_subtract
    assert column_add([47, 85]) == "7+5=12, 4+8+1=13"
    assert column_add([999, 1, 5]) == "9+1+5=15, 9+0+0+1=10, 9+0+0+1=10"
    assert column_subtract(305, 7) == "15-7=8 borrow 1, 10-1-0=9 borrow 1, 3-1-0=2"
    assert column_multiply(47, 85) == ("47*5: 7*5=35, 4*5+3=23, so 235; 47*80: 7*8=56, 4*8+5=37, so 3760; "
                                       "235+3760: 5+0=5, 3+6=9, 2+7=9, 0+3=3, so 3995")
    assert column_multiply(47, 0) == "47*0=0"
    assert column_multiply(12, 101) == "12*1: 2*1=2, 1*1=1, so 12; 12*100: 2*1=2, 1*1=1, so 1200; 12+1200: 2+0=2, " \
                                       "1+0=1, 0+2=2, 0+1=1, so 1212"


def test_extract_answer_takes_the_last_block_stripped():
    assert extract_answer("<answer>1</answer> <answer> 2 \n</answer>") == "2"
    assert extract_answer("<answer>1</answer> <answer>2") == "1"
    assert extract_answer("</answer><answer>") is None
    assert extract_answer("no tags") is None
    assert extract_answer("<answer></answer>") == ""


def test_parse_int_is_ascii_only_and_bounded():
    assert [parse_int(s) for s in ("7", "-12", "007")] == [7, -12, 7]
    for bad in ("٣", "３", "²", "+5", "--1", "-", "", "1 2", "1_000", "1e3", "nan", "9" * 65):
        assert parse_int(bad) is None, bad


def test_answer_forms():
    lin = get_family("linear_equation")
    p = lin.problem("Solve for x: 2x=3", Fraction(3, 2), None, 4)
    for ok in ("3/2", "x = 3/2", "1.5", "6/4", "-(-3/2)", "\\frac{3}{2}", "x=\\dfrac{3}{2}", "$\\frac{6}{4}$"):
        assert lin.score(p, completion(ok)) == 1.0, ok
    for bad in ("2/3", "1.50001", "y = 3/2", "x = 3/2 = 1.5", "\\frac{2}{3}", "3/2x", "x", "１.5"):
        assert lin.score(p, completion(bad)) == 0.0, bad
    srt = get_family("sorting")
    p = srt.problem("Sort ascending: 5, 2, 9", "2, 5, 9", None, 1, numbers=[5, 2, 9])
    for ok in ("2, 5, 9", "2 5 9", "[2, 5, 9]", "2,5,9"):
        assert srt.score(p, completion(ok)) == 1.0, ok
    for bad in ("2, 5", "2, 5, 9, 9", "9, 5, 2", "[2, 5, 9", "2, 5, ９"):
        assert srt.score(p, completion(bad)) == 0.0, bad
    cd = get_family("countdown")
    p = cd.problem("make 29", "(12*3)-7", None, 1, numbers=[3, 7, 12], target=29)
    for ok in ("(12*3)-7", "12*3-7", "3*12 - 7 = 29", "(3*12)-(7)", " 3 * 12 - 7 "):
        assert cd.score(p, completion(ok)) == 1.0, ok
    for bad in ("12*3-7 = 30", "12*3-7-0", "36-7", "12*3*1-7", "(12*3)-7-3+3", "12**3", "12*3-7=29=29", "29",
                "-7+12*3"):  # no unary minus: each given number is used as it is
        assert cd.score(p, completion(bad)) == 0.0, bad
    par = get_family("parity")
    p = par.problem("?", "odd", None, 1)
    assert [par.score(p, completion(a)) for a in ("odd", "ODD", "even", "0dd")] == [1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("difficulty", [0, 9, -1, "1", 1.0, True, None])
def test_bad_difficulty_names_the_family(difficulty):
    with pytest.raises(TaskError, match="addition: difficulty"):
        get_family("addition").generate(random.Random(0), difficulty)


def test_registry():
    assert families()[:3] == ["addition", "subtraction", "multiplication"] and len(families()) == 11
    assert all(n.startswith("rg:") for n in families(reasoning_gym=True)[11:])
    assert "rg:basic_arithmetic" in families(reasoning_gym=True)
    with pytest.raises(TaskError, match="'nope'.*known: addition"):
        get_family("nope")
    with pytest.raises(NanoseekError, match="reasoning-gym dataset 'nope'"):
        get_family("rg:nope")


def test_reasoning_gym_dataset_through_the_same_score_path():
    family = get_family("rg:basic_arithmetic")
    assert family.max_difficulty > 1 and not family.has_solutions
    rng = random.Random(0)
    for d in (1, family.max_difficulty):
        p = family.generate(rng, d)
        assert not p.has_solution and p.family == "rg:basic_arithmetic" and p.difficulty == d
        assert family.generate(random.Random(0), 1) == family.generate(random.Random(0), 1)
        right, wrong = completion(p.answer), completion(str(int(p.answer) + 1))
        assert family.score(p, right) == 1.0 and family.score(p, wrong) == 0.0
        assert combined_reward(p, right).reason == "accuracy:correct format:ok overlong:ok"
        again = Problem.from_dict(json.loads(json.dumps(p.to_dict())))  # a held-out record scores the same
        assert family.score(again, right) == 1.0 and family.score(again, "<answer></answer>") == 0.0
    easy = [family.generate(rng, 1).prompt for _ in range(20)]
    hard = [family.generate(rng, family.max_difficulty).prompt for _ in range(20)]
    assert sum(map(len, hard)) > 2 * sum(map(len, easy))  # the curriculum level sets the size


def write_recipe(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_mixture_weights_levels_and_determinism(tmp_path):
    path = write_recipe(tmp_path, "tasks:\n  - {family: addition, difficulty: [2, 3], weight: 3}\n"
                                  "  - {family: parity, difficulty: 4}\n")
    mix = Mixture.from_recipe(path)
    assert mix.entries == [MixtureEntry("addition", (2, 3), 3.0), MixtureEntry("parity", (4, 4), 1.0)]
    rng = random.Random(0)
    drawn = [mix.sample(rng) for _ in range(400)]
    assert {(p.family, p.difficulty) for p in drawn} == {("addition", 2), ("addition", 3), ("parity", 4)}
    assert 0.65 < sum(p.family == "addition" for p in drawn) / 400 < 0.85
    again = Mixture.from_recipe(path)
    assert [again.sample(random.Random(5)) for _ in range(5)] == [mix.sample(random.Random(5)) for _ in range(5)]


def test_shipped_recipe_by_name():
    mix = Mixture.from_recipe("tasks-cpu-demo")
    assert {"addition", "countdown", "sorting", "parity", "linear_equation"} <= {e.family for e in mix.entries}
    assert all(e.difficulty[1] <= 3 for e in mix.entries)


@pytest.mark.parametrize("text,match", [
    ("tasks: [", "cannot read"),
    ("- just a list", "mapping with a 'tasks' list"),
    ("tasks: []", "at least one entry"),
    ("tasks:\n  - {family: addition, difficulty: 1}\nextra: 1", r"unknown key\(s\) \['extra'\]"),
    ("tasks:\n  - addition", r"tasks\[0\]: expected a mapping"),
    ("tasks:\n  - {family: addition, difficulty: 1, wieght: 2}", r"tasks\[0\]: unknown key\(s\) \['wieght'\]"),
    ("tasks:\n  - {difficulty: 1}", r"tasks\[0\].family"),
    ("tasks:\n  - {family: adition, difficulty: 1}", r"tasks\[0\].family: unknown task family 'adition'"),
    ("tasks:\n  - {family: addition, difficulty: 9}", r"tasks\[0\].difficulty: \[9, 9\] is not a range within 1..8"),
    ("tasks:\n  - {family: addition, difficulty: [3, 1]}", r"tasks\[0\].difficulty"),
    ("tasks:\n  - {family: addition, difficulty: [1, 2, 3]}", r"tasks\[0\].difficulty: expected"),
    ("tasks:\n  - {family: addition}", r"tasks\[0\].difficulty: expected"),
    ("tasks:\n  - {family: addition, difficulty: easy}", r"tasks\[0\].difficulty: expected"),
    ("tasks:\n  - {family: addition, difficulty: 1, weight: 0}", r"tasks\[0\].weight: must be a positive"),
    ("tasks:\n  - {family: addition, difficulty: 1, weight: lots}", r"tasks\[0\].weight: expected a number"),
    ("tasks:\n  - {family: addition, difficulty: 1, weight: .nan}", r"tasks\[0\].weight"),
])
def test_malformed_recipes_name_the_file_and_field(tmp_path, text, match):
    path = write_recipe(tmp_path, text)
    with pytest.raises(TaskError, match=match) as err:
        Mixture.from_recipe(path)
    assert str(path) in str(err.value)


def test_missing_recipe_and_json_recipe(tmp_path):
    with pytest.raises(TaskError, match="no such file"):
        Mixture.from_recipe(tmp_path / "missing.yaml")
    with pytest.raises(TaskError, match="no shipped recipe"):
        Mixture.from_recipe("no-such-recipe")
    path = write_recipe(tmp_path, json.dumps({"tasks": [{"family": "sorting", "difficulty": [1, 2]}]}), "r.json")
    assert Mixture.from_recipe(path).entries == [MixtureEntry("sorting", (1, 2), 1.0)]


def test_cli_tasks_list_and_sample(capsys):
    assert main(["tasks", "list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in families()) and "1-8" in out and "rg:basic_arithmetic" in out
    assert main(["tasks", "sample", "countdown", "--difficulty", "2", "--n", "2", "--seed", "7"]) == 0
    out = capsys.readouterr().out
    assert out.count("== countdown, difficulty 2") == 2 and "</answer>" in out
    assert main(["tasks", "sample", "rg:leg_counting", "--n", "1"]) == 0
    assert "(no worked solution) answer:" in capsys.readouterr().out


@pytest.mark.parametrize("argv,match", [
    (["tasks", "sample", "nope"], "unknown task family 'nope'"),
    (["tasks", "sample", "sorting", "--difficulty", "7"], "sorting: difficulty must be an integer in 1..6"),
])
def test_cli_bad_task_input_exits_2(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and match in err and "Traceback" not in err
