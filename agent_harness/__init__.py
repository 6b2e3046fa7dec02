"""The agent loop: prompt and context management, tool calls, chunk segmentation, inference engines.

Public entry points: ``loop.run_episode``, ``engine.InferenceEngine`` (``torch_engine.TorchEngine``,
``sglang_engine.SGLangEngine``, ``scripted.ScriptedEngine`` for task families' experts),
``tools.ToolRegistry``, ``policy_init.create_tiny_policy``. It knows no task family.
"""
