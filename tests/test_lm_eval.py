"""lm-evaluation-harness runs a pos_swap-patched model unchanged: the RULER code of docs/lm-eval.md, run with niah_single_1 on
the real SmolLM2 and no network. lm-eval, nltk and datasets are imported inside the tests: they take seconds to
import, which every collection of the suite would pay otherwise."""

import json
import re
import socket
from pathlib import Path

import pytest
import transformers as T

import pos_swap
from conftest import tiny
from pos_swap.evaluate import wilson_interval

pytestmark = pytest.mark.slow
PAGE = (Path(__file__).resolve().parent.parent / "docs" / "lm-eval.md").read_text()  # the lm-eval page of the docs
LOOPBACK = {"127.0.0.1", "::1", "localhost"}
# SmolLM2 declared as a 512-token model: 1024-token RULER prompts are then twice its context, as 16k prompts are
# for the real 8k model, at a cost a CPU test can pay
DECLARED_CONTEXT = 512
LENGTH = 1024


def readme_ruler_code(length: int, limit: int) -> str:
    """The lm-eval block of docs/lm-eval.md, with its prompt length and number of samples set for a CPU test."""
    section = PAGE.split("# Long-context benchmarks with lm-eval (RULER)", 1)[1]
    code = re.search(r"```py\n(.*?)```", section, re.S).group(1)
    for old, new in (("length = 16384", f"length = {length}"), ("limit=20", f"limit={limit}")):
        assert old in code, f"the lm-eval block of docs/lm-eval.md no longer contains {old!r}: update this test"
        code = code.replace(old, new)
    return code


@pytest.fixture
def network_cut(monkeypatch):
    """Hub and datasets offline; every connection off this machine and every nltk download recorded and refused."""
    import datasets
    import huggingface_hub
    import nltk

    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(variable, "1")
        monkeypatch.setattr(datasets.config, variable, True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    attempts = []

    def refuse(what):
        attempts.append(what)
        raise OSError(f"the network is cut off in this test: {what}")

    def local_only(original):
        def connect(sock, address):
            if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in LOOPBACK:
                refuse(f"connect to {address}")
            return original(sock, address)

        return connect

    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, local_only(getattr(socket.socket, name)))
    monkeypatch.setattr(nltk, "download", lambda *args, **kwargs: refuse(f"nltk.download{args}"))
    return attempts


@pytest.fixture
def no_network(network_cut, monkeypatch, tmp_path):
    """The network cut, and an empty punkt_tab entry for nltk.

    lm-eval's RULER module looks for nltk's punkt_tab on import and downloads it when missing. niah_single_1 never
    splits sentences (its haystack is one repeated line), so an empty punkt_tab entry satisfies that look-up; a
    task that did split sentences would raise LookupError on it instead of downloading anything.
    """
    import nltk

    (tmp_path / "tokenizers" / "punkt_tab").mkdir(parents=True)
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path), *nltk.data.path])
    return network_cut


def test_ruler_niah_runs_offline_on_a_patched_model(no_network, smollm2_dir):
    from lm_eval.models.huggingface import HFLM

    model = T.AutoModelForCausalLM.from_pretrained(smollm2_dir, max_position_embeddings=DECLARED_CONTEXT).eval()
    tokenizer = T.AutoTokenizer.from_pretrained(smollm2_dir)
    pos_swap.patch(model, "dynamic-yarn")  # reads the trained length from the config: it scales beyond 512 tokens
    assert pos_swap.describe(model)["params"]["original_max_position_embeddings"] == DECLARED_CONTEXT
    input_lengths = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: input_lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )

    namespace = {"model": model, "tokenizer": tokenizer, "path": smollm2_dir}
    exec(compile(readme_ruler_code(LENGTH, limit=2), "docs/lm-eval.md", "exec"), namespace)
    results, lm = namespace["results"], namespace["lm"]

    assert no_network == []
    samples = results["samples"]["niah_single_1"]
    assert len(samples) == 2 and all(sample["doc"]["max_length"] == LENGTH for sample in samples)
    # RULER's score, recomputed from the answers: the share of each sample's needles found in its answer, averaged
    found = [
        sum(needle.lower() in sample["resps"][0][0].lower() for needle in sample["doc"]["outputs"])
        / len(sample["doc"]["outputs"])
        for sample in samples
    ]  # fmt: skip
    assert results["results"]["niah_single_1"][f"{LENGTH},none"] == pytest.approx(sum(found) / len(found))
    assert lm.model is model and pos_swap.describe(model)["scheme"] == "dynamic-yarn"
    # every prompt reached the patched model whole (one prefill each, then one token per step), longer than the
    # declared context that HFLM would have cut it to without max_length
    prompt_lengths = [len(lm.tok_encode(sample["arguments"][0][0])) for sample in samples]
    assert sorted(n for n in input_lengths if n > 1) == sorted(prompt_lengths)
    assert min(prompt_lengths) > DECLARED_CONTEXT
    assert HFLM(pretrained=model, tokenizer=tokenizer).max_length == DECLARED_CONTEXT


def test_the_network_guard_refuses_and_records(no_network):
    import nltk

    with pytest.raises(OSError, match="cut off"):
        socket.create_connection(("192.0.2.1", 80), timeout=1)  # TEST-NET-1: an address off this machine
    with pytest.raises(OSError, match="cut off"):
        nltk.download("punkt_tab")
    assert len(no_network) == 2
    assert nltk.data.find("tokenizers/punkt_tab")  # the look-up RULER makes on import succeeds...
    with pytest.raises(LookupError):
        nltk.sent_tokenize("One sentence. Another one.")  # ...yet nothing can split sentences with the empty entry


def test_eval_runs_ruler_tasks_on_the_patched_model_offline(network_cut, monkeypatch, tmp_path, smollm2_tokenizer):
    """`pos-swap eval --tasks ruler:...` answers RULER's prompts with the patched model, whole and longer than its
    trained context, with no network even where nltk's punkt_tab is not installed, and records RULER's score."""
    import nltk

    from pos_swap import cli
    from pos_swap.evaluate import ruler

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "no-nltk-data")])  # punkt_tab missing, as on CI
    model_dir = tmp_path / "tiny"
    model = tiny("llama", vocab_size=len(smollm2_tokenizer), max_position_embeddings=64)
    model.save_pretrained(model_dir)
    smollm2_tokenizer.save_pretrained(model_dir)
    calls = []
    real_run = ruler.run

    def recording_run(model, tokenizer, name, length, samples, seed=0):
        lengths = []
        hook = model.register_forward_pre_hook(
            lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
        )
        try:
            result = real_run(model, tokenizer, name, length, samples, seed)
        finally:
            hook.remove()
        calls.append((pos_swap.describe(model), lengths))
        return result

    monkeypatch.setattr(ruler, "run", recording_run)
    out = tmp_path / "run"
    cli.main(["eval", str(model_dir), "--schemes", "native,rerope:window=32", "--lengths", "256", "--tasks",
              "ruler:niah_single_1", "--trials", "2", "--out", str(out)])  # fmt: skip

    assert network_cut == []
    assert [described and described["scheme"] for described, _ in calls] == [None, "rerope"]
    for _, lengths in calls:
        prompts = [n for n in lengths if n > 1]  # one prefill per sample, then one token per step
        # whole prompts (RULER keeps 128 of the 256 tokens for the answer), past the trained 64 positions
        assert len(prompts) == 2 and min(prompts) > 64
    data = json.loads((out / "results.json").read_text())
    native, rerope = [c for c in data["cells"] if c["task"] == "ruler:niah_single_1"]
    assert native["targets"] == rerope["targets"]  # both schemes answered the same seeded samples
    for cell in (native, rerope):
        # RULER's score recomputed from what the model answered: the share of each sample's needles in its answer
        found = [sum(t.lower() in a.lower() for t in targets) / len(targets)
                 for targets, a in zip(cell["targets"], cell["answers"])]  # fmt: skip
        assert cell["sample_scores"] == pytest.approx(found) and cell["score"] == pytest.approx(sum(found) / 2)
        assert (cell["low"], cell["high"]) == pytest.approx(wilson_interval(sum(found), 2))
    assert [row["score"] for row in data["summary"]["ruler:niah_single_1"]] == [native["score"], rerope["score"]]
    assert (out / "ruler.png").exists() and "ruler:niah_single_1" in (out / "report.html").read_text()


def test_a_ruler_cell_scores_the_answers_by_rulers_rule(no_network, monkeypatch, smollm2_tokenizer):
    """With answers known in advance (every other sample answered with its needles), the cell's score, sample scores
    and interval are RULER's: 1 for a sample whose needles all appear, 0 otherwise, averaged."""
    from lm_eval.models.huggingface import HFLM

    from pos_swap.evaluate import ruler

    def known_answers(self, requests, disable_tqdm=False):
        return [" ".join(r.doc["outputs"]) if i % 2 == 0 else "I do not know." for i, r in enumerate(requests)]

    monkeypatch.setattr(HFLM, "generate_until", known_answers)
    model = tiny("llama", vocab_size=len(smollm2_tokenizer), max_position_embeddings=64)
    cell = ruler.run(model, smollm2_tokenizer, "niah_single_1", 256, samples=4)
    assert cell["sample_scores"] == [1.0, 0.0, 1.0, 0.0] and cell["score"] == 0.5
    assert cell["answers"][1] == "I do not know." and all(cell["targets"])
    assert (cell["low"], cell["high"]) == pytest.approx(wilson_interval(2, 4))
