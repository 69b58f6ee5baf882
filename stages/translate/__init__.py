"""translate: LLM translation of conversations or pairs, sharded and resumable, with protected spans and a
quality gate; every row ends up exactly once in the output or in the quarantine."""
