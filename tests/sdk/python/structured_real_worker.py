"""Structured outputs through the gateway with the OpenAI Python SDK's
`chat.completions.parse` (pydantic models, strict JSON schemas) and LangChain's
`with_structured_output`, on the real worker's default model.

Run by `tests/tests/it/real_worker.rs` with GATEWAY_BASE_URL, GATEWAY_API_KEY and
GATEWAY_MODEL (PROMPTS_PER_SCHEMA prompts per schema, 4 by default; the issue's check
runs 20); prints one line per schema and exits non-zero unless every answer parsed,
except those cut by max_tokens (finish_reason `length`).
"""

import enum
import json
import os
from typing import List, Optional

import openai
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

base_url, api_key, model = os.environ["GATEWAY_BASE_URL"], os.environ["GATEWAY_API_KEY"], os.environ["GATEWAY_MODEL"]
per_schema = int(os.environ.get("PROMPTS_PER_SCHEMA", "4"))
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=300)


class City(BaseModel):
    name: str
    country: str
    population: int


class Address(BaseModel):
    street: str
    city: str


class Person(BaseModel):
    name: str
    age: int
    address: Address


class Colour(str, enum.Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Sky(BaseModel):
    colour: Colour


class Item(BaseModel):
    name: str
    quantity: int


class Order(BaseModel):
    items: List[Item]


class Book(BaseModel):
    title: str
    subtitle: Optional[str]


SCHEMAS = [
    (City, ["Paris", "Tokyo", "Lagos", "Lima", "Oslo", "Cairo", "Delhi", "Quito", "Rome", "Seoul",
            "Accra", "Hanoi", "Sydney", "Toronto", "Madrid", "Nairobi", "Berlin", "Dakar", "Bogota", "Manila"],
     "Describe the city of {} as JSON."),
    (Person, ["Alice", "Bob", "Carol", "Dan", "Eve", "Frank", "Grace", "Heidi", "Ivan", "Judy",
              "Mallory", "Niaj", "Olivia", "Peggy", "Rupert", "Sybil", "Trent", "Victor", "Walter", "Zoe"],
     "Invent a person called {} with an address."),
    (Sky, ["noon", "sunset", "night", "a storm", "dawn", "fog", "summer", "winter", "rain", "snow",
           "spring", "autumn", "a clear day", "an eclipse", "midnight", "twilight", "a heat wave", "the desert", "the sea", "the mountains"],
     "What colour is the sky at {}?"),
    (Order, ["apples", "pens", "books", "shoes", "cups", "chairs", "lamps", "socks", "plates", "bikes",
             "pencils", "hats", "bags", "phones", "keys", "boxes", "coins", "rings", "maps", "tents"],
     "Make a small order of {}."),
    (Book, ["the sea", "cooking", "space", "history", "music", "gardens", "trains", "birds", "poetry", "maths",
            "chess", "rivers", "dogs", "cities", "painting", "law", "medicine", "war", "love", "travel"],
     "Suggest a book about {}."),
]

failures = []
for schema, topics, template in SCHEMAS:
    parsed = cut = 0
    for topic in topics[:per_schema]:
        try:
            completion = client.chat.completions.parse(
                model=model,
                messages=[{"role": "user", "content": template.format(topic)}],
                response_format=schema,
                max_tokens=160,
                temperature=0,
            )
        except openai.LengthFinishReasonError as e:
            # The SDK raises on `length` (the answer is a prefix, as documented).
            assert e.completion.choices[0].finish_reason == "length"
            cut += 1
            continue
        choice = completion.choices[0]
        if choice.message.parsed is None:
            failures.append((schema.__name__, topic, choice.message.content))
            continue
        schema.model_validate_json(choice.message.content)
        parsed += 1
    print(f"{schema.__name__}: {parsed} parsed, {cut} cut by max_tokens, of {min(per_schema, len(topics))}")

# json_object mode: any JSON object.
obj = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Give me a JSON object about cats."}],
    response_format={"type": "json_object"},
    max_tokens=160,
    temperature=0,
)
if obj.choices[0].finish_reason != "length":
    assert isinstance(json.loads(obj.choices[0].message.content), dict), obj.choices[0].message.content

# A schema keyword the grammar cannot enforce is refused by name.
try:
    client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "hi"}],
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "format": "made-up"}}},
    )
    failures.append(("unknown format", "", "accepted"))
except openai.BadRequestError as e:
    assert e.param == "response_format", e

# LangChain's with_structured_output (json_schema through the same SDK call).
llm = ChatOpenAI(model=model, base_url=base_url, api_key=api_key, temperature=0, max_tokens=160, max_retries=0)
city = llm.with_structured_output(City).invoke("Describe the city of Paris as JSON.")
assert isinstance(city, City), city

assert not failures, failures
print("structured outputs against the real worker (python SDK parse, LangChain): ok")
