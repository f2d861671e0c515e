"""Instruction synthesis: the paper's describe (MLLM) and instruct (LLM) steps.

``prompts`` builds both prompts and parses the LLM's reply; it imports neither Ray nor vLLM.
"""
