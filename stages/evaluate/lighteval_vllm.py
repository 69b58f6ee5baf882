"""A LightEval model on vLLM: multiple-choice log-likelihoods from vLLM's prompt log-probabilities.

LightEval 0.13's own vLLM backend wants vLLM < 0.10.2 and APIs vLLM has since removed; LightEval also takes
a custom model class from a file (`CustomModelConfig`), which is this one. The evaluate stage loads it with
`benchmark_engine: vllm`; settings come in HALA_LIGHTEVAL_VLLM (JSON: dtype, max_model_len, engine_args,
chat_template), since LightEval builds the model from its own config object.

Scoring: for each choice, the context and the choice are tokenized together (LightEval's tok_encode_pair),
vLLM returns the log-probability of every prompt token, and the choice's score is the sum over its tokens,
exactly what the transformers backend computes from the logits.
"""

from __future__ import annotations

import json
import os
from typing import Any

from lighteval.models.abstract_model import LightevalModel
from lighteval.models.model_output import ModelResponse
from lighteval.tasks.prompt_manager import PromptManager
from transformers import AutoTokenizer


class _NoCache:
    """LightEval's pipeline registers tasks with the model's sample cache; this model keeps none (a cache
    keyed on a path would return a retrained model's old scores)."""

    def _init_registry(self, registry: Any) -> None:
        return None


class VllmLogprobModel(LightevalModel):
    def __init__(self, config: Any) -> None:
        from hala.kit.engine import prepare_vllm_env

        prepare_vllm_env()
        from vllm import LLM

        settings = json.loads(os.environ.get("HALA_LIGHTEVAL_VLLM", "{}"))
        self.config = config
        self._cache = _NoCache()
        self._tokenizer = AutoTokenizer.from_pretrained(config.model_name)
        if self._tokenizer.pad_token is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token
        self._max_length = int(settings.get("max_model_len", 2048))
        self.llm = LLM(
            model=config.model_name,
            dtype=settings.get("dtype", "auto"),
            max_model_len=self._max_length,
            seed=0,
            **settings.get("engine_args", {}),
        )
        self.prompt_manager = PromptManager(
            use_chat_template=bool(settings.get("chat_template")), tokenizer=self._tokenizer
        )
        self.pairwise_tokenization = False

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def add_special_tokens(self) -> bool:
        return True

    @property
    def max_length(self) -> int:
        return self._max_length

    def loglikelihood(self, docs: list) -> list[ModelResponse]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts, spans, meta = [], [], []
        for doc in docs:
            context = self.prompt_manager.prepare_prompt(doc)
            ctx_encs, cont_encs = self.tok_encode_pair(
                context, doc.choices, pairwise=self.pairwise_tokenization
            )
            meta.append((context, ctx_encs, cont_encs))
            for ctx, cont in zip(ctx_encs, cont_encs):
                ids = (ctx + cont)[-self._max_length :]
                prompts.append(TokensPrompt(prompt_token_ids=ids))
                spans.append((len(ids) - len(cont), cont))
        # one token of output is the least vLLM generates; prompt_logprobs=1 gives each prompt token's own
        # log-prob
        outs = self.llm.generate(
            prompts, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1), use_tqdm=False
        )
        responses, k = [], 0
        for context, ctx_encs, cont_encs in meta:
            logprobs, greedy = [], []
            for _ in cont_encs:
                start, cont = spans[k]
                table = outs[k].prompt_logprobs
                picked = [table[start + i][tok] for i, tok in enumerate(cont)]
                logprobs.append(sum(p.logprob for p in picked))
                greedy.append(all(p.rank == 1 for p in picked))
                k += 1
            responses.append(
                ModelResponse(
                    input=context,
                    input_tokens=ctx_encs,
                    output_tokens=cont_encs,
                    logprobs=logprobs,
                    argmax_logits_eq_gold=greedy,
                )
            )
        return responses

    def greedy_until(self, docs: list) -> list[ModelResponse]:
        from vllm import SamplingParams

        prompts = [self.prompt_manager.prepare_prompt(doc) for doc in docs]
        params = [
            SamplingParams(
                temperature=0.0,
                max_tokens=doc.generation_size or 256,
                stop=list(doc.stop_sequences or []) or None,
            )
            for doc in docs
        ]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return [
            ModelResponse(
                input=p,
                input_tokens=list(o.prompt_token_ids),
                output_tokens=[list(o.outputs[0].token_ids)],
                text=[o.outputs[0].text],
            )
            for p, o in zip(prompts, outs)
        ]

    def loglikelihood_rolling(self, docs: list) -> list[ModelResponse]:
        raise NotImplementedError(
            "perplexity tasks are not among the OALL v2 tasks; use benchmark_engine: transformers"
        )

    def cleanup(self) -> None:
        del self.llm
