"""Embeddings through the gateway with the official OpenAI Python SDK and LangChain's
OpenAIEmbeddings, served by the real worker's all-MiniLM-L6-v2.

Run by `tests/tests/it/real_worker.rs` with GATEWAY_BASE_URL, GATEWAY_API_KEY and
GATEWAY_EMBEDDING_MODEL; exits non-zero on a failure. LangChain's OpenAIEmbeddings
counts tokens with tiktoken and sends OpenAI's token ids unless told not to
(`check_embedding_ctx_length=False`), as for any embedding model that is not OpenAI's.
"""

import math
import os

import openai
from langchain_openai import OpenAIEmbeddings

base_url, api_key = os.environ["GATEWAY_BASE_URL"], os.environ["GATEWAY_API_KEY"]
model = os.environ["GATEWAY_EMBEDDING_MODEL"]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)

sentences = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The stock market fell sharply on Monday.",
]


def cosine(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


# The SDK asks for base64 unless told otherwise, and decodes it.
default = client.embeddings.create(model=model, input=sentences)
assert [d.index for d in default.data] == [0, 1, 2], default
vectors = [d.embedding for d in default.data]
assert all(len(v) == 384 for v in vectors), [len(v) for v in vectors]
assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-4 for v in vectors), "normalised, as the model's modules.json says"
assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.2, "related sentences are closer"
assert default.usage.prompt_tokens > 3 * 2 and default.usage.total_tokens == default.usage.prompt_tokens, default.usage

floats = client.embeddings.create(model=model, input=sentences, encoding_format="float")
for a, b in zip(vectors, (d.embedding for d in floats.data)):
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-6

one = client.embeddings.create(model=model, input=sentences[2])
assert max(abs(x - y) for x, y in zip(one.data[0].embedding, vectors[2])) < 1e-5, "batched or alone, the same vector"

try:
    client.embeddings.create(model=model, input="")
    raise AssertionError("an empty input was accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400 and e.param == "input", e
try:
    client.embeddings.create(model=model, input="hello", dimensions=64)
    raise AssertionError("dimensions the model lacks were accepted")
except openai.BadRequestError as e:
    assert e.param == "dimensions", e

lc = OpenAIEmbeddings(model=model, base_url=base_url, api_key=api_key, check_embedding_ctx_length=False, max_retries=0)
documents = lc.embed_documents(sentences)
query = lc.embed_query(sentences[0])
for a, b in zip(vectors, documents):
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5
assert cosine(query, documents[1]) > cosine(query, documents[2])
print("embeddings against the real worker (python SDK, LangChain): ok")
