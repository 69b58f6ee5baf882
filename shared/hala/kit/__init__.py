"""The kit stages import beside the contract: the engine (vLLM or transformers behind one interface),
resumable chunks and the engine chunk loop, protected spans, script shares, and forked helper processes.
Imports the contract, never `hala.ops`."""
