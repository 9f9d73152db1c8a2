"""Tool calls and `n > 1` through the gateway on the real worker's default model, with
the OpenAI Python SDK (`tool_choice: "required"`, streamed and not, and a named
function through `chat.completions.parse`) and LangChain's `bind_tools`.

Run by `tests/tests/it/real_worker.rs` with GATEWAY_BASE_URL, GATEWAY_API_KEY and
GATEWAY_MODEL; exits non-zero when a call does not validate against its tool's schema.
"""

import os
from typing import Literal

import openai
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

base_url, api_key, model = os.environ["GATEWAY_BASE_URL"], os.environ["GATEWAY_API_KEY"], os.environ["GATEWAY_MODEL"]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=300)


class GetWeather(BaseModel):
    """The current weather of a city."""

    city: str = Field(max_length=40)
    unit: Literal["celsius", "fahrenheit"]


class GetTime(BaseModel):
    """The time in a timezone."""

    zone: str = Field(max_length=40)


TOOLS = [openai.pydantic_function_tool(GetWeather), openai.pydantic_function_tool(GetTime)]
SCHEMAS = {"GetWeather": GetWeather, "GetTime": GetTime}
messages = [{"role": "user", "content": "What is the weather in Paris?"}]

# Not streamed: at least one call, each naming a declared tool, arguments that validate.
done = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice="required",
                                      max_tokens=120, temperature=0)
choice = done.choices[0]
assert choice.finish_reason == "tool_calls", choice
assert choice.message.tool_calls, choice
for call in choice.message.tool_calls:
    SCHEMAS[call.function.name].model_validate_json(call.function.arguments)
print("required, whole:", [(c.function.name, c.function.arguments) for c in choice.message.tool_calls])

# Streamed: the name once, the arguments in deltas that add up to a valid call.
calls, deltas, finish = {}, 0, None
for chunk in client.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice="required",
                                            parallel_tool_calls=False, max_tokens=120, temperature=0, stream=True):
    for c in chunk.choices:
        finish = c.finish_reason or finish
        for d in c.delta.tool_calls or []:
            call = calls.setdefault(d.index, {"name": None, "arguments": ""})
            if d.function and d.function.name:
                assert call["name"] is None, "the name comes once"
                call["name"] = d.function.name
            if d.function and d.function.arguments:
                call["arguments"] += d.function.arguments
                deltas += 1
assert finish == "tool_calls" and list(calls) == [0], (finish, calls)
SCHEMAS[calls[0]["name"]].model_validate_json(calls[0]["arguments"])
assert deltas > 1, f"arguments arrive as deltas ({deltas})"
print("required, streamed:", calls[0], f"in {deltas} deltas")

# A named function through the SDK's parse helper (strict tools): parsed arguments.
parsed = client.chat.completions.parse(model=model, messages=[{"role": "user", "content": "What time is it in Tokyo?"}],
                                       tools=TOOLS, tool_choice={"type": "function", "function": {"name": "GetTime"}},
                                       max_tokens=120, temperature=0)
call = parsed.choices[0].message.tool_calls[0]
assert call.function.name == "GetTime" and isinstance(call.function.parsed_arguments, GetTime), call
print("named, parsed:", call.function.parsed_arguments)

# LangChain agents bind tools the same way.
llm = ChatOpenAI(model=model, base_url=base_url, api_key=api_key, temperature=0, max_tokens=120, max_retries=0)
ai = llm.bind_tools([GetWeather], tool_choice="required").invoke("Weather in Oslo, please.")
assert ai.tool_calls and ai.tool_calls[0]["name"] == "GetWeather", ai
GetWeather.model_validate(ai.tool_calls[0]["args"])
print("langchain bind_tools:", ai.tool_calls[0]["args"])

# n = 3: three choices, every one counted in usage.
three = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Name a fruit."}], n=3,
                                       max_tokens=12, temperature=1.0, seed=5)
assert [c.index for c in three.choices] == [0, 1, 2], three
assert three.usage.completion_tokens >= 3, three.usage
print("n=3:", [c.message.content for c in three.choices], three.usage)

print("tool calls and n > 1 against the real worker (python SDK, LangChain): ok")
