"""evaluate: BLEU/chrF++ (sacrebleu), FP8 acceptance, Arabic benchmarks (LightEval, OALL v2)."""
