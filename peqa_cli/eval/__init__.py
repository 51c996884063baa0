"""Evaluation core: lm-eval-compatible scoring, zero-shot tasks and GPTQ-protocol perplexity.

Entry point: :func:`peqa_cli.eval.runner.evaluate`; see docs/eval.md.
"""
