"""Chat templates and tokenizer directories, checked against transformers on a synthetic hub
tokenizer directory (a small byte-level BPE with ChatML special tokens; no download)."""

import json

import jinja2
import pytest
import transformers
from chat_testing import write_tokenizer_dir

from mimo_jax import chat, data

# ChatML in the style of Qwen3 / MiMo: indented tags and line breaks that only vanish with
# trim_blocks + lstrip_blocks, {% continue %} (loopcontrols), tools through tojson, an unknown
# role through raise_exception, reasoning traces, and an enable_thinking switch that writes an
# empty think block when thinking is off.
TEMPLATE = """\
{% if tools %}
<|im_start|>system
    {% if messages[0]['role'] == 'system' %}
{{ messages[0]['content'] }}

    {% endif %}
# Tools
<tools>
    {% for tool in tools %}
{{ tool | tojson }}
    {% endfor %}
</tools>{{ eos_token }}
{% elif messages[0]['role'] == 'system' %}
<|im_start|>system
{{ messages[0]['content'] }}{{ eos_token }}
{% endif %}
{% for message in messages %}
    {% if message['role'] == 'system' %}
        {% if not loop.first %}{{ raise_exception('system message must come first') }}{% endif %}
        {% continue %}
    {% elif message['role'] not in ['user', 'assistant', 'tool'] %}
        {{ raise_exception('unknown role: ' + message['role']) }}
    {% endif %}
<|im_start|>{{ message['role'] }}
    {% if message['role'] == 'assistant' and message.reasoning_content is defined %}
<think>
{{ message.reasoning_content }}
</think>

    {% endif %}
    {% if message.tool_calls is defined %}
        {% for call in message.tool_calls %}
<tool_call>{{ call | tojson }}</tool_call>
        {% endfor %}
    {% endif %}
{{ message['content'] }}{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
    {% if enable_thinking is defined and enable_thinking is false %}
<think>

</think>

    {% endif %}
{% endif %}
"""
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": 'Weather in a city, e.g. <b>Zürich</b> & "Paris"',
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
CONVERSATIONS = {
    "system_user": [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "def f(x): return x + 1 — what is f(2)?"},
    ],
    "multi_turn": [
        {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": "3", "reasoning_content": "2 + 1", "tool_calls": None},
        {"role": "user", "content": "and  f(10)?\n  indented"},
    ],
    "tool_turn": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Zürich?"},
        {
            "role": "assistant",
            "content": "",
            "reasoning": "look it up",  # an older name of reasoning_content
            "tool_calls": [{"name": "get_weather", "arguments": {"city": "Zürich"}}],
        },
        {"role": "tool", "content": '{"temp": 21}'},
    ],
}
CASES = [
    ("system_user", {}),
    ("system_user", {"add_generation_prompt": False}),
    ("multi_turn", {}),
    ("multi_turn", {"add_generation_prompt": False}),
    ("multi_turn", {"enable_thinking": False}),
    ("multi_turn", {"enable_thinking": True}),
    ("tool_turn", {"tools": TOOLS}),
    ("tool_turn", {"tools": TOOLS, "enable_thinking": False}),
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """tokenizer.json, tokenizer_config.json (with TEMPLATE), special_tokens_map.json and
    generation_config.json, as a hub directory lays them out."""
    d = tmp_path_factory.mktemp("tok")
    write_tokenizer_dir(d, [json.dumps(c) for c in CONVERSATIONS.values()] + [TEMPLATE], TEMPLATE)
    return d


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


@pytest.mark.parametrize(("name", "kwargs"), CASES)
def test_render_and_ids_equal_transformers(tok_dir, hf_tok, name, kwargs):
    template = chat.ChatTemplate.from_dir(str(tok_dir))
    messages = CONVERSATIONS[name]
    kwargs = {"add_generation_prompt": True, **kwargs}
    text = template.render(messages, **kwargs)
    assert text == hf_tok.apply_chat_template(messages, tokenize=False, **kwargs)
    want = hf_tok.apply_chat_template(messages, tokenize=True, **kwargs)["input_ids"]
    assert template.encode(messages, **kwargs) == want
    # Each special token is one id, never split into its characters.
    im_start = hf_tok.convert_tokens_to_ids("<|im_start|>")
    assert want.count(im_start) == text.count("<|im_start|>") > 0


def test_whitespace_control_and_thinking_switch(tok_dir):
    template = chat.ChatTemplate.from_dir(str(tok_dir))
    user = [{"role": "user", "content": "hi"}]
    assert template.render(user) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    off = template.render(user, enable_thinking=False)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert template.render(user, add_generation_prompt=False) == "<|im_start|>user\nhi<|im_end|>\n"


def test_special_ids_equal_transformers(tok_dir, hf_tok):
    tok = data.load_tokenizer(str(tok_dir))  # a directory: HFTokenizer.from_dir
    assert isinstance(tok, data.HFTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (
        hf_tok.bos_token_id,
        hf_tok.eos_token_id,
        hf_tok.pad_token_id,
    )
    assert tok.eos_id is not None and tok.pad_id is not None and tok.bos_id is None
    generation = transformers.GenerationConfig.from_pretrained(str(tok_dir))
    assert list(tok.stop_ids) == generation.eos_token_id
    assert tok.special_tokens == {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    # A tokenizer.json path alone has no special tokens but keeps its document separator.
    plain = data.load_tokenizer(str(tok_dir / "tokenizer.json"))
    assert plain.special_tokens == {} and plain.stop_ids == () and plain.doc_sep_id == 0


def test_bad_role_raises_in_both(tok_dir, hf_tok):
    template = chat.ChatTemplate.from_dir(str(tok_dir))
    bad = [{"role": "robot", "content": "beep"}]
    with pytest.raises(jinja2.exceptions.TemplateError, match="unknown role: robot"):
        template.render(bad)
    with pytest.raises(jinja2.exceptions.TemplateError, match="unknown role: robot"):
        hf_tok.apply_chat_template(bad, tokenize=False)


def test_template_file_wins_and_missing_template_names_files(tok_dir, tmp_path):
    for name in ("tokenizer.json", "special_tokens_map.json"):
        (tmp_path / name).write_bytes((tok_dir / name).read_bytes())
    with pytest.raises(ValueError, match=r"tokenizer_config\.json has no 'chat_template'"):
        chat.ChatTemplate.from_dir(str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] | upper }}")
    assert chat.ChatTemplate.from_dir(str(tmp_path)).render([{"role": "u", "content": "a"}]) == "A"


def test_named_templates_pick_tool_use(tok_dir):
    tok = data.HFTokenizer.from_dir(str(tok_dir))
    template = chat.ChatTemplate({"default": "d{{ eos_token }}", "tool_use": "t"}, tok)
    user = [{"role": "user", "content": "x"}]
    assert template.render(user) == "d<|im_end|>" and template.render(user, tools=TOOLS) == "t"
    assert template.encode(user) == [*tok.encode("d"), tok.eos_id]
    with pytest.raises(ValueError, match="none 'default'"):
        chat.ChatTemplate({"tool_use": "t"}, tok)
    # transformers' training-mask tag renders its body unchanged.
    marked = chat.ChatTemplate("{% generation %}a{% endgeneration %}b", tok)
    assert marked.render(user) == "ab"


@pytest.mark.parametrize("has_added_tokens_decoder", [False, True])
def test_special_tokens_map_precedence_as_transformers(tmp_path, has_added_tokens_decoder):
    write_tokenizer_dir(tmp_path, ["hello world"])
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["pad_token"] = "<|im_start|>"
    if has_added_tokens_decoder:  # then transformers ignores special_tokens_map.json
        config["added_tokens_decoder"] = {"0": {"content": "<|endoftext|>", "special": True}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    overrides = {"pad_token": "<think>", "eos_token": {"content": "</think>"}}
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(overrides))
    ours = data.HFTokenizer.from_dir(str(tmp_path))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (ours.special_tokens["pad_token"], ours.special_tokens["eos_token"]) == (
        theirs.pad_token,
        theirs.eos_token,
    )
    assert (ours.pad_id, ours.eos_id) == (theirs.pad_token_id, theirs.eos_token_id)
    assert ours.pad_id == ours.tok.token_to_id(
        "<|im_start|>" if has_added_tokens_decoder else "<think>"
    )
