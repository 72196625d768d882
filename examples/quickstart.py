"""The README's quick start: patch the packaged SmolLM2 with YaRN, generate, remove, save and load."""

import tempfile

import pos_swap
from pos_swap import offline
from transformers import AutoModelForCausalLM, AutoTokenizer

path = offline.smollm2()  # online: "HuggingFaceTB/SmolLM2-135M"
model = AutoModelForCausalLM.from_pretrained(path)
tokenizer = AutoTokenizer.from_pretrained(path)
ids = tokenizer("The capital of France is", return_tensors="pt").input_ids

for scheme, params in [(None, {}), ("yarn", dict(factor=4.0)), ("dynamic", dict(factor=2.0)), ("dynamic-yarn", {})]:
    handle = pos_swap.patch(model, scheme, **params) if scheme else None
    text = tokenizer.decode(model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :])
    print(f"{scheme or 'native':13s} -> {text!r}")
    if handle:
        handle.remove()

pos_swap.patch(model, "yarn", factor=4.0)
with tempfile.TemporaryDirectory() as folder:
    model.save_pretrained(folder)
    loaded = pos_swap.from_pretrained(folder)
    print("loaded back:", pos_swap.describe(loaded))
