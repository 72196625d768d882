"""Measure positional schemes: perplexity against context length, passkey and multi-key retrieval, a ranked
recommendation for a target length, and the one-command demo.

    from pos_swap import evaluate
    rows = evaluate.perplexity(model, ids, lengths=[2048, 8192])           # one dict per window
    losses, held = evaluate.stream_losses(model, ids, SinkCache(model), step=512)   # a stream through a cache
    hits = evaluate.passkey(model, tokenizer, lengths=[4096], depths=[0.0, 0.5, 1.0], trials=3)  # + answer_logprob
    result = evaluate.calibrate(model, tokenizer, 16384, quick=True)     # dpe's group sizes; result["python"]
    low, high = evaluate.wilson_interval(sum(h["correct"] for h in hits), len(hits))   # 95% interval of the accuracy
    run = evaluate.evaluate(model, tokenizer, evaluate.Plan(schemes=evaluate.parse_schemes("native,dynamic-yarn"),
                                                            lengths=[2048, 16384]), out="runs/eval")
    evaluate.write_report(evaluate.merge_runs(["runs/eval", "runs/eval-more"], "runs/eval-all"))  # runs as one
"""

from . import calibration, choose, demo, merge, run, specs  # modules: the CLI reads their docs
from .calibration import calibrate
from .ppl import perplexity, stream_losses, summarize, token_losses
from .choose import recommend
from .merge import merge_runs
from .retrieval import DEPTHS, multikey, passkey, wilson_interval
from .run import Plan, evaluate, write_report
from .specs import parse_lengths, parse_schemes

__all__ = [
    "DEPTHS", "Plan", "calibrate", "evaluate", "merge_runs", "multikey", "parse_lengths", "parse_schemes", "passkey", "perplexity",
    "recommend", "stream_losses", "summarize", "token_losses", "wilson_interval", "write_report",
]  # fmt: skip
