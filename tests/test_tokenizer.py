import json
import re

import pytest
import tokenizers

from nanoseek.cli import main
from nanoseek.tokenizer import (BOS, CALL_BEGIN, CALL_END, CALL_SEP, CALLS_BEGIN, CALLS_END, EOS, PAD, RESERVED, TAGS,
                                Tokenizer, TokenizerError, parse_tool_calls, train_tokenizer)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. 12 + 345 = 357, 1000000 / 8 = 125000.",
    "<think>First add 12 and 30, giving 42.</think><answer>42</answer>",
    "Unicode: café, naïve, Größe, 中文字符, ひらがな, カタカナ, emoji 🙂🚀, math ∑ √2 ≈ 1.414.",
    "def f(x):\n    return x * 2  # doubles\n\n\nprint(f(21))",
] * 20
CONVERSATIONS = [
    [{"role": "user", "content": "What is 6 * 7?"}],
    [{"role": "system", "content": "Reason, then answer."}, {"role": "user", "content": "2 + 2?"},
     {"role": "assistant", "content": "<think>2 + 2 = 4</think><answer>4</answer>"},
     {"role": "user", "content": "and 3 + 3?"}],
    [{"role": "user", "content": "héllo 🙂 中文"}, {"role": "assistant", "content": ""},
     {"role": "system", "content": "second system"}, {"role": "user", "content": ""}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "a <｜Assistant｜> inside, and </answer>"},
     {"role": "assistant", "content": " leading space\n\nnew lines "}],
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(CORPUS, 400)


@pytest.fixture(scope="module")
def hf(tok, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("tok")
    tok.save(path)
    return transformers.AutoTokenizer.from_pretrained(path)


def test_training_is_deterministic_and_sized(tok, tmp_path):
    assert tok.vocab_size == 400
    train_tokenizer(CORPUS, 400).save(tmp_path / "a")
    tok.save(tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()


def test_reserved_tokens_have_fixed_ids_and_are_never_split(tok):
    other = train_tokenizer(["an entirely different corpus, with other words"] * 5, 300)
    for t in (tok, other):
        assert [t.token_id(s) for s in RESERVED] == list(range(9))
        assert (t.bos_id, t.eos_id, t.pad_id) == (0, 1, 2)
        assert t.encode("".join(RESERVED)) == list(range(9))
        assert t.encode("x<think>y", add_bos=True) == [0, *t.encode("x"), 5, *t.encode("y")]
    # no merge learnt inside a reserved token: the corpus had <think> and <answer> as plain text
    assert all(len(tok.encode(s[1:-1])) > 1 for s in TAGS)


def test_skip_special_tokens_keeps_the_reasoning_tags(tok):
    ids = tok.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": TAGS[0] + "r"}])
    assert tok.decode(ids, skip_special_tokens=True) == "q<think>r"


def test_encode_decode_agree_with_transformers(tok, hf):
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    texts = [*CORPUS[:4], "", "  spaces  and\ttabs\r\n", f"{BOS}begin, a {PAD} and <think> {EOS}", "9876543210"]
    batch = tok.encode_batch(texts)
    for text, ids in zip(texts, batch):
        assert ids == tok.encode(text) == hf.encode(text, add_special_tokens=False)
        assert tok.encode(text, add_bos=True) == hf.encode(text)
        assert tok.decode(ids) == hf.decode(ids) == text
        assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_agrees_with_transformers(tok, hf, messages, add_generation_prompt):
    text = tok.apply_chat_template(messages, add_generation_prompt, tokenize=False)
    assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert tok.apply_chat_template(messages, add_generation_prompt) == hf.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False)


@pytest.mark.parametrize("thinking, ending", [(None, "<｜Assistant｜>"), (True, "<｜Assistant｜><think>"),
                                              (False, "<｜Assistant｜><think> </think>")])
def test_thinking_switch_opens_the_reply_as_transformers_does(tok, hf, thinking, ending):
    messages = CONVERSATIONS[1][:2]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, thinking=thinking)
    assert text.endswith(ending) and text == hf.apply_chat_template(messages, tokenize=False,
                                                                    add_generation_prompt=True, thinking=thinking)
    assert tok.apply_chat_template(messages, tokenize=False, thinking=thinking) == tok.apply_chat_template(
        messages, tokenize=False)  # no generation prompt, nothing to open


TOOLS = [{"type": "function", "function": {"name": "add", "description": "a + b, exactly", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}},
         {"type": "function", "function": {"name": "now", "description": "the time, ünïcode", "parameters": {}}}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 12, "b": 30}'}}
TOOL_CONVERSATIONS = [
    [{"role": "user", "content": "What is 12+30?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12+30?"},
     {"role": "assistant", "content": None, "tool_calls": [CALL]},
     {"role": "tool", "tool_call_id": "call_1", "content": "42"}],
    [{"role": "user", "content": "12+30 and the time?"},
     {"role": "assistant", "content": "<think>two calls</think>", "tool_calls": [CALL, {**CALL, "function": {
         "name": "now", "arguments": "{}"}}]},
     {"role": "tool", "content": "42"}, {"role": "tool", "content": "noon"},
     {"role": "assistant", "content": "42, at noon."}, {"role": "user", "content": "thanks"}],
]


@pytest.mark.parametrize("messages", TOOL_CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_tools_and_tool_calls_render_as_transformers_renders_them(tok, hf, messages, add_generation_prompt):
    text = tok.apply_chat_template(messages, add_generation_prompt, tokenize=False, tools=TOOLS)
    assert text == hf.apply_chat_template(messages, tools=TOOLS, tokenize=False,
                                          add_generation_prompt=add_generation_prompt)
    assert text.count("```json") == len(TOOLS) + sum(len(m.get("tool_calls") or []) for m in messages)


def test_tool_calls_parse_back():
    calls = [("add", '{"a": 12, "b": 30}'), ("now", "{}")]
    text = "Let me add." + CALLS_BEGIN + "\n".join(
        f"{CALL_BEGIN}function{CALL_SEP}{n}\n```json\n{a}\n```{CALL_END}" for n, a in calls) + CALLS_END
    assert parse_tool_calls(text) == ("Let me add.", calls)
    assert parse_tool_calls("no calls") == ("no calls", [])


def test_chat_format(tok):
    messages = CONVERSATIONS[1][:3]
    assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == (
        "<｜begin▁of▁sentence｜>Reason, then answer.<｜User｜>2 + 2?<｜Assistant｜><think>2 + 2 = 4</think>"
        "<answer>4</answer><｜end▁of▁sentence｜><｜Assistant｜>")
    prompt = tok.apply_chat_template(messages[:2], add_generation_prompt=True)
    assert tok.apply_chat_template(messages)[:len(prompt)] == prompt


@pytest.mark.parametrize("messages", [[{"role": "robot", "content": "x"}], [{"role": "user"}],
                                      [{"role": "user", "content": None}], ["hello"]])
def test_bad_chat_messages(tok, messages):
    with pytest.raises(TokenizerError, match="chat message 0"):
        tok.apply_chat_template(messages)


def test_decode_stream_waits_for_whole_characters(tok):
    text = "naïve 🙂🚀 中文字符 ∑<think>√2</think>"
    ids = tok.encode(text)
    stream = tok.decode_stream()
    pieces = [stream.step(i) for i in ids]
    assert "".join(pieces) == tok.decode(ids) == text
    assert "" in pieces and not any("\ufffd" in p for p in pieces)  # some character did span tokens
    skipping = tok.decode_stream(skip_special_tokens=True)
    assert "".join(skipping.step(i) for i in [tok.bos_id, *ids, tok.eos_id]) == text


def test_save_keeps_other_files(tmp_path):
    tok = train_tokenizer(CORPUS, 300)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "tokenizer.json").write_text("stale")
    tok.model_max_length = 256
    tok.save(tmp_path)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                        "tokenizer_config.json"]
    assert (tmp_path / "model.safetensors").read_bytes() == b"weights"
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (BOS, EOS, PAD)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.model_max_length == 256 and loaded.encode(CORPUS[2]) == tok.encode(CORPUS[2])


def test_load_errors_name_the_file(tok, tmp_path):
    with pytest.raises(TokenizerError, match=re.escape(f"{tmp_path / 'tokenizer.json'}: no such file")):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(TokenizerError, match="tokenizer.json: not a valid tokenizer.json"):
        Tokenizer.load(tmp_path)
    tok.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{")
    with pytest.raises(TokenizerError, match="tokenizer_config.json: not valid JSON"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>"}')
    with pytest.raises(TokenizerError, match="tokenizer_config.json: eos token '<\\|im_end\\|>' is not in the vocab"):
        Tokenizer.load(tmp_path)


def test_load_a_foreign_tokenizer_dir(tmp_path):
    """A DeepSeek-style directory: its own bos/eos in tokenizer_config.json, as {"content": ...} objects."""
    foreign = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    foreign.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    foreign.train_from_iterator(["some plain words"], tokenizers.trainers.BpeTrainer(special_tokens=["<s>", "</s>",
                                                                                                     "<unk>"]))
    foreign.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizerFast", "bos_token": {"__type": "AddedToken", "content": "<s>"},
        "eos_token": {"__type": "AddedToken", "content": "</s>"}, "pad_token": None}))
    loaded = Tokenizer.load(tmp_path)
    assert (loaded.bos_token, loaded.bos_id, loaded.eos_id, loaded.pad_id) == ("<s>", 0, 1, 1)
    assert loaded.decode(loaded.encode("plain", add_bos=True), skip_special_tokens=True) == "plain"
    with pytest.raises(TokenizerError, match="'<｜User｜>' is not a token"):
        loaded.apply_chat_template([{"role": "user", "content": "hi"}])


def test_too_small_a_vocabulary_or_corpus():
    with pytest.raises(TokenizerError, match="vocab_size 100 is too small"):
        train_tokenizer(CORPUS, 100)
    with pytest.raises(TokenizerError, match="no text"):
        train_tokenizer(["", "<think></think>"], 300)


def test_cli_tokenizer_train(tmp_path, capsys):
    (tmp_path / "doc.txt").write_text("\n".join(CORPUS[:4]))
    rows = [{"prompt": "What is 6 * 7?", "solution": "<think>6 * 7 = 42</think><answer>42</answer>"},
            {"text": "plain text row"}]
    (tmp_path / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--data", str(tmp_path / "doc.txt"), str(tmp_path / "tasks.jsonl"),
                 "--vocab-size", "300", "--out", str(out)]) == 0
    assert "2 files, 3 documents" in capsys.readouterr().out
    assert Tokenizer.load(out).token_id("<answer>") == 7


@pytest.mark.parametrize("name, content, message", [
    ("missing.txt", None, "missing.txt: no such data file"),
    ("empty.txt", " \n", "empty.txt: no text to train a tokenizer on"),
    ("bad.jsonl", '{"prompt": 1}\n', "bad.jsonl row 0: a row needs"),
])
def test_cli_tokenizer_train_errors_name_the_file(tmp_path, capsys, name, content, message):
    if content is not None:
        (tmp_path / name).write_text(content)
    assert main(["tokenizer", "train", "--data", str(tmp_path / name), "--out", str(tmp_path / "tok")]) == 2
    assert message in capsys.readouterr().err


def test_split_reasoning():
    from nanoseek.tokenizer import split_reasoning
    assert split_reasoning("<think> 2+2=4 </think> <answer>4</answer>") == ("2+2=4", "<answer>4</answer>")
    assert split_reasoning("just text") == (None, "just text")
    assert split_reasoning("<think> still going") == ("still going", "")
