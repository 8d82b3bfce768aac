"""The vLLM backend plugin for Llumnix Backend (entry point `vllm`)."""
