"""The stock `openai` client against `server serve` on SmolLM2: logprobs (completions and chat, streamed
and not), n, best_of, echo, penalties, logit_bias and response_format (on the base and on an adapter,
validated with jsonschema), as a user's code would send them."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import EXAMPLE_ADAPTERS
from tests.integration.test_serve_e2e import running_server

PROMPT = "The capital of France is"
BASE = "smollm2-135m"


def test_sampling_and_logprobs_through_the_openai_client(tmp_path, smollm2_base):
    openai = pytest.importorskip("openai")
    from transformers import AutoTokenizer

    paris = AutoTokenizer.from_pretrained(smollm2_base.path)(" Paris", add_special_tokens=False)["input_ids"]
    assert len(paris) == 1
    with running_server(tmp_path, BASE, {"chatbot-tech": EXAMPLE_ADAPTERS / "chatbot-tech"}) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        greedy = {"model": BASE, "max_tokens": 6, "temperature": 0}

        out = client.completions.create(prompt=PROMPT, logprobs=3, **greedy)
        logprobs = out.choices[0].logprobs
        assert len(logprobs.tokens) == len(logprobs.token_logprobs) == out.usage.completion_tokens
        assert "Paris" in out.choices[0].text
        for chosen, top in zip(logprobs.token_logprobs, logprobs.top_logprobs):
            assert chosen == pytest.approx(max(top.values()), abs=1e-5)  # greedy: the most likely token
        assert math.exp(logprobs.token_logprobs[logprobs.tokens.index(" Paris")]) > 0.3

        streamed = client.completions.create(prompt=PROMPT, logprobs=3, stream=True, **greedy)
        tokens, values = [], []
        for chunk in streamed:
            if chunk.choices and chunk.choices[0].logprobs:
                tokens += chunk.choices[0].logprobs.tokens
                values += chunk.choices[0].logprobs.token_logprobs
        assert tokens == logprobs.tokens and values == pytest.approx(logprobs.token_logprobs, abs=1e-6)

        echoed = client.completions.create(prompt=PROMPT, logprobs=1, echo=True, **greedy)
        assert echoed.choices[0].text == PROMPT + out.choices[0].text
        assert echoed.choices[0].logprobs.token_logprobs[0] is None

        chat = client.chat.completions.create(messages=[{"role": "user", "content": "What is the capital of France?"}],
                                              logprobs=True, top_logprobs=2, **greedy)
        content = chat.choices[0].logprobs.content
        assert content and all(len(entry.top_logprobs) == 2 for entry in content)
        assert bytes(content[0].bytes).decode() == content[0].token
        chat_stream = client.chat.completions.create(
            messages=[{"role": "user", "content": "What is the capital of France?"}], logprobs=True, top_logprobs=2,
            stream=True, **greedy)
        streamed_content = [e for c in chat_stream if c.choices and c.choices[0].logprobs
                            for e in c.choices[0].logprobs.content]
        assert [e.token for e in streamed_content] == [e.token for e in content]

        sampled = {"model": BASE, "max_tokens": 8, "temperature": 1.0, "seed": 3}
        two = client.completions.create(prompt=PROMPT, n=2, **sampled)
        assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text != two.choices[1].text
        best = client.completions.create(prompt=PROMPT, best_of=3, n=1, **sampled)
        assert len(best.choices) == 1 and best.choices[0].logprobs is None

        banned = client.completions.create(prompt=PROMPT, **greedy, logit_bias={str(paris[0]): -100}, logprobs=1)
        at = logprobs.tokens.index(" Paris")
        assert banned.choices[0].logprobs.tokens[:at] == logprobs.tokens[:at]
        assert banned.choices[0].logprobs.tokens[at] != " Paris"
        # logprobs are the raw model's: the banned token is still the most likely one there
        assert banned.choices[0].logprobs.top_logprobs[at] == pytest.approx({" Paris": logprobs.token_logprobs[at]},
                                                                            abs=1e-5)
        penalized = client.completions.create(prompt="one one one one one", presence_penalty=2.0,
                                              frequency_penalty=2.0, extra_body={"repetition_penalty": 2.0}, **greedy)
        plain = client.completions.create(prompt="one one one one one", **greedy)
        assert penalized.choices[0].text != plain.choices[0].text

        with pytest.raises(openai.BadRequestError, match="logprobs"):
            client.completions.create(prompt=PROMPT, logprobs=21, **greedy)
        with pytest.raises(openai.BadRequestError, match="tool calling is not supported"):
            client.chat.completions.create(messages=[{"role": "user", "content": "hi"}], tools=[
                {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}], **greedy)

        jsonschema = pytest.importorskip("jsonschema")
        schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                   "country": {"type": "string", "maxLength": 40}},
                  "required": ["city", "country"]}
        response_format = {"type": "json_schema", "json_schema": {"name": "place", "schema": schema, "strict": True}}
        question = [{"role": "user", "content": "Where is the Eiffel Tower? Answer in JSON."}]
        for model in (BASE, "chatbot-tech"):
            reply = client.chat.completions.create(messages=question, model=model, max_tokens=48, temperature=0,
                                                   response_format=response_format)
            jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
        anything = client.chat.completions.create(messages=question, model="chatbot-tech", max_tokens=48,
                                                  temperature=0, response_format={"type": "json_object"})
        text = anything.choices[0].message.content  # free keys: the 135M model may run on past max_tokens
        assert text.startswith('{"') and (anything.choices[0].finish_reason == "length" or isinstance(json.loads(text), dict))
        with pytest.raises(openai.BadRequestError, match="response_format"):
            client.chat.completions.create(messages=question, model=BASE, max_tokens=8,
                                           response_format={"type": "json_schema", "json_schema": {"schema": 3}})
